"""Mapping, trigger rules, parameters, logs, results and settings through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PIPELINE = """
import datetime as dt
import logging

from pipeopt import Pipeline

pipeline = Pipeline("daily", params={"day": dt.date(2013, 1, 1), "limit": 3, "fail": False})
log = logging.getLogger("daily.jobs")


@pipeline.task(criticality="low")
def list_files(params):
    return [f"{params['day']}-{k}.csv" for k in range(params["limit"])]


@pipeline.task(map_over=list_files)
def load(list_files, context, params):
    context.logger.info("loading %s", list_files)
    if params["fail"] and list_files.endswith("-1.csv"):
        log.error("cannot load %s", list_files)
        raise ValueError(f"bad file {list_files}")
    return len(list_files)


@pipeline.task(dependencies=[load], criticality="blocker", trigger="all_done")
def report(load):
    return {"loaded": sum(n for n in load if n), "missing": sum(1 for n in load if not n)}
"""

MANY = """
from pipeopt import Pipeline

pipeline = Pipeline("many")


def fail():
    raise RuntimeError("boom")


for k in range(300):
    pipeline.task(name=f"ok{k:03d}")(lambda: 1)
for k in range(30):
    pipeline.task(name=f"bad{k:02d}")(fail)
"""


def pipeopt(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "pipeopt"), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def daily(tmp_path: Path) -> Path:
    path = tmp_path / "daily.py"
    path.write_text(textwrap.dedent(PIPELINE))
    return path


def test_params_mapping_logs_and_results_through_run_history_and_show(
    tmp_path: Path, daily: Path
) -> None:
    state = str(tmp_path / "state")
    done = pipeopt(
        tmp_path,
        "run",
        str(daily),
        "--param",
        "day=2013-02-01",
        "-p",
        "limit=4",
        "--json",
        "--state-dir",
        state,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["params"] == {"day": "2013-02-01", "limit": 4, "fail": False}
    assert doc["tasks"]["report"]["result"] == "{'loaded': 64, 'missing': 0}"
    assert doc["tasks"]["load[3]"]["result"] == "16"
    assert doc["tasks"]["list_files"]["criticality"] == "blocker"
    assert doc["tasks"]["list_files"]["declared_criticality"] == "low"
    assert "[load[2] #1] loading 2013-02-01-2.csv" in done.stderr  # --log-level INFO
    assert doc["tasks"]["load[2]"]["logs"][0].endswith("loading 2013-02-01-2.csv")
    run_id = doc["run_id"]

    history = pipeopt(tmp_path, "history", "--state-dir", state)
    assert history.returncode == 0, history.stderr
    assert "day=2013-02-01" in history.stdout

    shown = pipeopt(tmp_path, "show", run_id, "--state-dir", state)
    assert shown.returncode == 0, shown.stderr
    assert "low → blocker" in shown.stdout
    assert "load[3]" in shown.stdout
    assert "day=2013-02-01, limit=4, fail=False" in shown.stdout

    logs = pipeopt(tmp_path, "show", run_id, "--logs", "load[1]", "--state-dir", state)
    assert logs.returncode == 0, logs.stderr
    assert "[load[1] #1] loading 2013-02-01-1.csv" in logs.stdout

    value = pipeopt(tmp_path, "show", run_id, "--result", "report", "--json", "--state-dir", state)
    assert value.returncode == 0, value.stderr
    assert json.loads(value.stdout) == {"loaded": 64, "missing": 0}
    plain = pipeopt(tmp_path, "show", run_id, "--result", "list_files", "--state-dir", state)
    assert "2013-02-01-0.csv" in plain.stdout

    as_json = json.loads(pipeopt(tmp_path, "show", run_id, "--json", "--state-dir", state).stdout)
    results = {t["name"]: t.get("result") for t in as_json["tasks"]}
    assert results["load[0]"] == "16"

    typo = pipeopt(tmp_path, "show", run_id, "--logs", "lod[1]", "--state-dir", state)
    assert typo.returncode == 2
    assert "did you mean 'load[1]'" in typo.stderr


def test_a_failed_item_with_all_done_downstream_and_resume_with_params(
    tmp_path: Path, daily: Path
) -> None:
    state = str(tmp_path / "state")
    failed = pipeopt(
        tmp_path, "run", str(daily), "-p", "fail=yes", "--log-level", "ERROR", "--state-dir", state
    )
    assert failed.returncode == 1, failed.stderr
    assert "cannot load 2013-01-01-1.csv" in failed.stderr
    assert "loading" not in failed.stderr  # INFO is below --log-level ERROR
    assert "{'loaded': 32, 'missing': 1}" in failed.stdout

    changed = pipeopt(tmp_path, "resume", "--last", "-p", "fail=no", "--state-dir", state)
    assert changed.returncode == 2
    assert "'fail' was True, now False" in changed.stderr
    forced = pipeopt(
        tmp_path, "resume", "--last", "-p", "fail=no", "--force", "--json", "--state-dir", state
    )
    assert forced.returncode == 0, forced.stderr
    doc = json.loads(forced.stdout)
    assert doc["params"]["fail"] is False
    assert doc["tasks"]["load[0]"]["attempts"] == 0  # kept from the failed run
    assert doc["tasks"]["load[1]"]["attempts"] == 1


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-p", "limt=5"], {}, "unknown parameter 'limt'; did you mean 'limit'?"),
        (["-p", "limit=five"], {}, "'limit' must be int like its default 3"),
        (["-p", "day"], {}, "--param takes KEY=VALUE"),
        (["--batch-slo", "fast"], {}, "--batch-slo: must be a number"),
        ([], {"PIPEOPT_AGING_INTERVAL": "-1"}, "PIPEOPT_AGING_INTERVAL: must be seconds > 0"),
        ([], {"PIPEOPT_WORKERS": "0"}, "PIPEOPT_WORKERS: must be an integer >= 1"),
        ([], {"PIPEOPT_EXECUTOR": "gpu"}, "PIPEOPT_EXECUTOR: must be one of"),
        ([], {"PIPEOPT_FAIL_FAST": "maybe"}, "PIPEOPT_FAIL_FAST: must be a yes/no value"),
        (["--log-level", "loud"], {}, "--log-level: must be one of DEBUG"),
    ],
)
def test_bad_parameters_and_settings_are_one_line_and_exit_2(
    tmp_path: Path, daily: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    done = pipeopt(tmp_path, "run", str(daily), "--no-state", *args, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_settings_from_the_environment_reach_the_optimizer(tmp_path: Path, daily: Path) -> None:
    done = pipeopt(
        tmp_path,
        "run",
        str(daily),
        "--no-state",
        "--json",
        "--aging-interval",
        "off",
        env={"PIPEOPT_BATCH_SLO": "off", "PIPEOPT_WORKERS": "1", "PIPEOPT_SEED": "7"},
    )
    assert done.returncode == 0, done.stderr


def test_a_large_run_summary_counts_then_lists_at_most_twenty_failures(tmp_path: Path) -> None:
    path = tmp_path / "many.py"
    path.write_text(textwrap.dedent(MANY))
    done = pipeopt(tmp_path, "run", str(path), "--no-state", "--log-level", "CRITICAL")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("failed in ")
    assert "300 succeeded, 30 failed" in lines[0]
    assert sum("RuntimeError: boom" in line for line in lines) == 20
    assert "and 10 more tasks that did not succeed" in done.stdout
    assert "ok001" not in done.stdout


def test_graph_shows_declared_and_effective_criticality(tmp_path: Path, daily: Path) -> None:
    done = pipeopt(tmp_path, "graph", str(daily))
    assert done.returncode == 0, done.stderr
    assert "low → blocker" in done.stdout
