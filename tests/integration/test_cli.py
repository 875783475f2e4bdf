"""The real ``pipeopt`` command in a subprocess: run, graph, exit codes, clean errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_process import run_pipeopt

PIPELINE_OK = """
from pipeopt import Pipeline

pipeline = Pipeline("ok")

@pipeline.task(criticality="critical")
def extract():
    return [1, 2, 3]

@pipeline.task(dependencies=[extract], criticality="low")
def load(extract):
    return sum(extract)
"""

PIPELINE_FAILS = """
from pipeopt import Pipeline

pipeline = Pipeline("fails")

@pipeline.task
def good():
    return 1

@pipeline.task
def bad():
    raise ValueError("row 3 has no id")

@pipeline.task(dependencies=[bad])
def after(bad):
    return bad
"""

PIPELINE_CYCLE = """
from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("cycle")
pipeline.add(PipelineTask("a", print, dependencies=["b"]))
pipeline.add(PipelineTask("b", print, dependencies=["a"]))
"""

TWO_PIPELINES = """
from pipeopt import Pipeline

first = Pipeline("first")
second = Pipeline("second")

@second.task(name="a \\"quoted\\" task")
def only():
    return 1
"""


pipeopt = run_pipeopt


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_run_succeeds_with_summary_and_json(tmp_path: Path) -> None:
    write(tmp_path, "ok.py", PIPELINE_OK)
    done = pipeopt("run", "ok.py", "--workers", "2", "--no-state", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    assert "2 succeeded" in done.stdout
    done = pipeopt("run", "ok.py", "--json", "--no-state", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["status"] == "succeeded"
    assert payload["tasks"]["extract"]["criticality"] == "critical"


def test_failed_task_exits_1_and_lists_every_state(tmp_path: Path) -> None:
    write(tmp_path, "fails.py", PIPELINE_FAILS)
    done = pipeopt("run", "fails.py", "--no-state", cwd=tmp_path)
    assert done.returncode == 1
    assert "ValueError: row 3 has no id" in done.stdout
    assert "skipped" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py"], "no such pipeline file"),
        (["run", "cycle.py"], "dependency cycle: a -> b -> a"),
        (["run", "two.py"], "defines several pipelines (first, second)"),
        (["run", "two.py:third"], "has no 'third'"),
        (["run", "ok.py", "--workers", "0"], "--workers/-w: must be an integer from 1 to"),
        (["run", "ok.py", "--workers", "many"], "must be an integer from 1 to 10000, got 'many'"),
        (["frobnicate"], "invalid choice"),
        (["graph", "cycle.py"], "dependency cycle"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    write(tmp_path, "ok.py", PIPELINE_OK)
    write(tmp_path, "cycle.py", PIPELINE_CYCLE)
    write(tmp_path, "two.py", TWO_PIPELINES)
    done = pipeopt(*args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_graph_mermaid_and_dot(tmp_path: Path) -> None:
    write(tmp_path, "ok.py", PIPELINE_OK)
    write(tmp_path, "two.py", TWO_PIPELINES)
    mermaid = pipeopt("graph", "ok.py", cwd=tmp_path)
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart LR")
    assert "t0 --> t1" in mermaid.stdout
    assert "extract<br/>critical" in mermaid.stdout
    dot = pipeopt("graph", "two.py:second", "--format", "dot", cwd=tmp_path)
    assert dot.returncode == 0, dot.stderr
    assert dot.stdout.startswith('digraph "second" {')
    assert 't0 [label="a \\"quoted\\" task\\nmedium"];' in dot.stdout
