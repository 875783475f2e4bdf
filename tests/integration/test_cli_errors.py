"""A user's mistakes through the real ``pipeopt`` command: one line naming the problem, exit 2.

Each case here once printed a traceback and exited 1. Also: ``show | head``
exits 0, the read-only commands never create a mistyped state folder, and
``PIPEOPT_STATE_DIR`` is where every command records and reads.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_process import run_pipeopt

PIPELINES = """
from pipeopt import Pipeline

pipeline = Pipeline("ok")

@pipeline.task
def extract():
    return [1, 2, 3]

@pipeline.task(dependencies=[extract])
def load(extract):
    return sum(extract)


def raises():
    raise RuntimeError("the config server is down")


def needs(region, stage="prod"):
    return pipeline
"""


pipeopt = run_pipeopt


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 2 with exactly one line on stderr and no traceback; return the line."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "f.py").write_text(textwrap.dedent(PIPELINES))
    return tmp_path


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["f.py:raises"], "f.py:raises() failed while building the pipeline: RuntimeError: the"),
        (["f.py:needs"], "f.py:needs needs arguments (region); name a Pipeline or a function"),
        (["f.py", "--dashboard", "--token="], "argument --token: must be a non-empty string"),
        (["f.py", "--dashboard", "--token=a b<"], "argument --token: must be a non-empty string"),
        (["f.py", "--dashboard", "--port", "99999"], "--port: must be an integer from 0 to 65535"),
        (
            ["f.py", "--dashboard", "--port=-5"],
            "--port: must be an integer from 0 to 65535, got -5",
        ),
        (
            ["f.py", "--dashboard", "--host", "nonexistent.invalid"],
            "--host 'nonexistent.invalid': cannot resolve it",
        ),
    ],
)
def test_run_refuses_bad_input_in_one_line(workdir: Path, args: list[str], expected: str) -> None:
    line = one_line(pipeopt("run", *args, "--no-state", "--no-wait", cwd=workdir))
    assert line.startswith("pipeopt run: ")
    assert expected in line


def test_a_dashboard_port_in_use_is_one_line(workdir: Path, busy_port: int) -> None:
    done = pipeopt("run", "f.py", "--dashboard", "--port", str(busy_port), cwd=workdir)
    line = one_line(done)
    assert f"--port {busy_port}: already in use" in line
    assert "pass another port, or 0" in line


def test_history_limit_out_of_range_is_one_line(workdir: Path) -> None:
    assert pipeopt("run", "f.py", cwd=workdir).returncode == 0
    line = one_line(pipeopt("history", "--limit", "99999999999999999999", cwd=workdir))
    assert "argument --limit/-n: must be an integer from 1 to" in line


def test_unreadable_run_counts_are_one_line(workdir: Path) -> None:
    assert pipeopt("run", "f.py", cwd=workdir).returncode == 0
    with sqlite3.connect(workdir / ".pipeopt" / "runs.sqlite") as conn:
        conn.execute("UPDATE runs SET counts = '{not json'")
    conn.close()
    for args in (["history"], ["show", "last"]):
        line = one_line(pipeopt(*args, cwd=workdir))
        assert line.startswith(f"pipeopt {args[0]}: ")


def test_read_only_commands_do_not_create_a_mistyped_state_dir(workdir: Path) -> None:
    assert pipeopt("run", "f.py", "--state-dir", "state", cwd=workdir).returncode == 0
    for args in (["history"], ["show", "last"], ["resume", "--last"]):
        line = one_line(pipeopt(*args, "--state-dir", "stat", cwd=workdir))
        assert "state folder stat does not exist" in line
    assert not (workdir / "stat").exists()
    assert sorted(p.name for p in workdir.iterdir()) == ["f.py", "state"]


def test_show_into_a_closed_pipe_exits_0(workdir: Path) -> None:
    many = textwrap.dedent("""
        from pipeopt import Pipeline, PipelineTask
        pipeline = Pipeline("many")
        for i in range(600):
            pipeline.add(PipelineTask(f"task-{i:04d}", int))
    """)
    (workdir / "many.py").write_text(many)
    assert pipeopt("run", "many.py", cwd=workdir).returncode == 0
    # As `pipeopt show last --all | head -1`: the reader leaves after one line.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeopt.cli", "show", "last", "--all"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.readline().startswith(b"run ")
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert err == b""


def test_every_command_honours_pipeopt_state_dir(workdir: Path) -> None:
    state = workdir / "elsewhere"
    env = {**os.environ, "PIPEOPT_STATE_DIR": str(state)}
    (workdir / "fails.py").write_text(
        textwrap.dedent("""
            import os
            from pipeopt import Pipeline
            pipeline = Pipeline("flaky")

            @pipeline.task
            def once():
                if not os.path.exists("fixed"):
                    raise RuntimeError("not yet")
        """)
    )
    assert pipeopt("run", "fails.py", cwd=workdir, env=env).returncode == 1
    (workdir / "fixed").touch()
    assert pipeopt("resume", "--last", cwd=workdir, env=env).returncode == 0
    history = pipeopt("history", "--json", cwd=workdir, env=env)
    assert history.returncode == 0, history.stderr
    assert history.stdout.count('"pipeline": "flaky"') == 2
    shown = pipeopt("show", "last", cwd=workdir, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout
    assert not (workdir / ".pipeopt").exists()
    assert (state / "runs.sqlite").exists()
