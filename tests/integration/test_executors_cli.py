"""Pipelines written the README's way run unchanged on every executor, through the real CLI.

Each pipeline file is run by ``pipeopt run FILE --executor NAME`` in a
subprocess, once per executor; the task states, attempts and results (read
back from the run store the command wrote) must be the same everywhere.
The files cover how users write tasks: ``@pipeline.task``-decorated
module-level functions (the README's first example, ``examples/etl.py``),
``pipeline.add(PipelineTask(...))``, closures, lambdas and partials made in
a loop, a helper module imported from beside the file, and a task that
loads rows with ``context.write_batches``. Scripts run with ``python`` show
the ``__main__`` guard: with it they run on worker processes, without it
pipeopt says what to change instead of multiprocessing's bootstrap traceback.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from cli_process import run_pipeopt

ROOT = Path(__file__).resolve().parents[2]
EXECUTORS = ("thread", "sync", "process", "async", "dask")

HELPER = """
from pipeopt import Pipeline

helpers = Pipeline("helpers")


@helpers.task
def shout(word: str = "rows") -> str:
    return word.upper()


def label(k: int) -> str:
    return f"item-{k}"
"""

FAN_OUT = """
import functools

from pipeopt import Pipeline, PipelineTask, TaskContext
from pipeopt.sinks import SQLiteSink

from fanout_helpers import label, shout

pipeline = Pipeline("fan-out")
DB = {db!r}


def scale(value: int, factor: int) -> int:
    return value * factor


for k in range(3):
    offset = 10 * k

    def closure(offset: int = offset) -> int:
        return offset + 1

    pipeline.add(PipelineTask(f"closure{{k}}", closure))
    pipeline.add(PipelineTask(f"lambda{{k}}", lambda k=k: label(k)))
    pipeline.add(PipelineTask(f"partial{{k}}", functools.partial(scale, k, factor=7)))


def load(context: TaskContext, **upstream: object) -> int:
    rows = [{{"name": name, "value": str(value)}} for name, value in sorted(upstream.items())]
    with SQLiteSink(DB, "loaded", columns=["name", "value"]) as sink:
        report = context.write_batches(rows, sink)
    context.logger.info("loaded %d rows", report.rows_written)
    return report.rows_written


pipeline.add(PipelineTask("load", load, dependencies=list(pipeline.tasks)))
pipeline.add(PipelineTask("shout", shout.func, dependencies=["load"]))
"""


def readme_example() -> str:
    """Return the README's first Python example, as written there."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match is not None
    return match.group(1)


def pipeopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_pipeopt(*args, cwd=cwd, timeout=180)


def outcome_of(path: Path, executor: str, workdir: Path) -> dict[str, Any]:
    """Run ``path`` on ``executor`` through the CLI; return states, attempts and results."""
    from pipeopt.store import RunStore

    state = workdir / f"state-{executor}"
    done = pipeopt(
        "run", str(path), "--executor", executor, "--json", "--state-dir", str(state), cwd=workdir
    )
    assert done.returncode == 0, (executor, done.stdout[-2000:], done.stderr[-4000:])
    report = json.loads(done.stdout)
    tasks = {name: (t["state"], t["attempts"]) for name, t in report["tasks"].items()}
    store = RunStore(state)
    try:
        results = store.load_results(report["run_id"], names=set(tasks))
    finally:
        store.close()
    return {"status": report["status"], "tasks": tasks, "results": results}


@pytest.mark.slow
@pytest.mark.dask
@pytest.mark.parametrize("which", ["readme", "etl", "fan-out"])
def test_the_same_pipeline_gives_the_same_results_on_every_executor(
    tmp_path: Path, which: str
) -> None:
    pytest.importorskip("distributed")
    db = tmp_path / "loaded.db"
    if which == "readme":
        path = tmp_path / "orders.py"
        path.write_text(readme_example())
    elif which == "etl":
        path = ROOT / "examples" / "etl.py"
    else:
        (tmp_path / "fanout_helpers.py").write_text(textwrap.dedent(HELPER))
        path = tmp_path / "fanout.py"
        path.write_text(textwrap.dedent(FAN_OUT.format(db=str(db))))
    outcomes = {name: outcome_of(path, name, tmp_path) for name in EXECUTORS}
    expected = outcomes["thread"]
    assert expected["status"] == "succeeded"
    assert all(state == "succeeded" for state, _ in expected["tasks"].values())
    for name, outcome in outcomes.items():
        assert outcome == expected, name
    if which == "etl":
        assert expected["tasks"]["publish"] == ("succeeded", 2)  # retried once, everywhere
        assert expected["results"]["publish"] == "total=5409.09"
    if which == "readme":
        assert expected["results"]["transform"][:2] == [
            {"id": 0, "eur": 11.7},
            {"id": 1, "eur": 12.87},
        ]
    if which == "fan-out":
        assert expected["results"]["lambda2"] == "item-2"
        assert expected["results"]["partial2"] == 14
        assert expected["results"]["load"] == 9
        assert expected["results"]["shout"] == "ROWS"
        with closing(sqlite3.connect(db)) as conn:
            # Every executor wrote the same 9 rows: 45 in all.
            assert conn.execute("SELECT count(*) FROM loaded").fetchone() == (45,)


CAPTURES_A_LOCK = """
import threading

from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("captures")
guard = threading.Lock()


def locked() -> int:
    with guard:
        return 1


pipeline.add(PipelineTask("locked", locked))
"""


@pytest.mark.parametrize("executor", ["process", pytest.param("dask", marks=pytest.mark.dask)])
def test_a_task_that_captures_a_lock_is_refused_in_one_line(tmp_path: Path, executor: str) -> None:
    if executor == "dask":
        pytest.importorskip("distributed")
    path = tmp_path / "captures.py"
    path.write_text(textwrap.dedent(CAPTURES_A_LOCK))
    done = pipeopt("run", str(path), "--executor", executor, "--no-state", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "task 'locked' cannot be sent to another process" in lines[0]
    assert "global 'guard' used by 'locked' is a _thread.lock" in lines[0]
    assert "Traceback" not in done.stderr


SCRIPT = """
import functools
import json

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, TaskContext

from script_helpers import helpers

pipeline = Pipeline("script")


@pipeline.task
def extract() -> list[int]:
    return [1, 2, 3]


@pipeline.task(dependencies=[extract])
def double(extract: list[int], context: TaskContext) -> list[int]:
    context.record_custom_metric("n", len(extract))
    return [2 * x for x in extract]


for k in range(2):
    pipeline.add(PipelineTask(f"square{{k}}", lambda k=k: k * k))


def main() -> None:
    optimizer = PipelineOptimizer(max_workers=2, executor="process")
    result = optimizer.run(pipeline)
    more = optimizer.run(helpers)
    print(json.dumps({{"status": result.status.value, "results": result.results,
                      "helpers": more.results, "metrics": result.tasks["double"].custom_metrics}}))

{entry}
"""

SCRIPT_HELPERS = """
from pipeopt import Pipeline

helpers = Pipeline("helpers")


@helpers.task
def shout() -> str:
    return "HELLO"
"""


def run_script(tmp_path: Path, entry: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "script_helpers.py").write_text(textwrap.dedent(SCRIPT_HELPERS))
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(entry=entry)))
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_a_script_with_a_main_guard_runs_its_tasks_on_processes(tmp_path: Path) -> None:
    done = run_script(tmp_path, 'if __name__ == "__main__":\n    main()')
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {
        "status": "succeeded",
        "results": {"extract": [1, 2, 3], "double": [2, 4, 6], "square0": 0, "square1": 1},
        "helpers": {"shout": "HELLO"},
        "metrics": {"n": 3.0},
    }


def test_a_script_without_a_main_guard_gets_pipeopts_own_error(tmp_path: Path) -> None:
    done = run_script(tmp_path, "main()")
    assert done.returncode == 1
    assert "MissingMainGuardError" in done.stderr
    assert "script.py runs its pipeline when it is imported" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "bootstrapping phase" not in done.stderr
    assert done.stdout == ""


SELF_CONTAINED = """
import functools

from pipeopt import Pipeline, PipelineTask, TaskContext
from pipeopt.sinks import SQLiteSink

pipeline = Pipeline("remote")
DB = {db!r}


@pipeline.task(criticality="critical")
def extract() -> list[int]:
    return list(range(10))


def scale(value: int, factor: int) -> int:
    return value * factor


for k in range(3):
    part = lambda extract, k=k: extract[k::3]  # noqa: E731
    pipeline.add(PipelineTask(f"part{{k}}", part, dependencies=["extract"]))
    pipeline.add(PipelineTask(f"scaled{{k}}", functools.partial(scale, k, factor=5)))


def load(context: TaskContext, **upstream: object) -> int:
    rows = [{{"name": name, "value": str(value)}} for name, value in sorted(upstream.items())]
    with SQLiteSink(DB, "loaded", columns=["name", "value"]) as sink:
        return context.write_batches(rows, sink).rows_written


pipeline.add(PipelineTask("load", load, dependencies=[f"part{{k}}" for k in range(3)]))
"""


@pytest.fixture
def real_cluster(tmp_path: Path) -> Any:
    """A ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1; yields the address.

    They run in their own folder without ``PYTHONPATH``: they can import
    pipeopt, but not the pipeline file the test writes.
    """
    pytest.importorskip("distributed")
    import os
    import time

    dask = Path(sys.executable).with_name("dask")
    home = tmp_path / "cluster"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    scheduler_file = home / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    commands = [["scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common]]
    commands += [
        ["worker", "--scheduler-file", str(scheduler_file), "--nthreads", "2", *common]
        for _ in range(2)
    ]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for k, command in enumerate(commands):
            with (home / f"{k}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [str(dask), *command],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=home,
                    )
                )
            if k == 0:
                deadline = time.monotonic() + 60
                while "address" not in (
                    scheduler_file.read_text() if scheduler_file.exists() else ""
                ):
                    assert time.monotonic() < deadline, "the scheduler did not start"
                    time.sleep(0.05)
        import distributed

        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, set_as_default=False) as probe:
            probe.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.dask
def test_a_run_file_runs_on_a_real_cluster_whose_workers_cannot_import_it(
    tmp_path: Path, real_cluster: str
) -> None:
    db = tmp_path / "loaded.db"
    path = tmp_path / "remote.py"
    path.write_text(textwrap.dedent(SELF_CONTAINED.format(db=str(db))))
    state = tmp_path / "state-cluster"
    done = pipeopt(
        "run", str(path), "--executor", "dask", "--dask-address", real_cluster,
        "--json", "--state-dir", str(state), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    report = json.loads(done.stdout)
    from pipeopt.store import RunStore

    store = RunStore(state)
    try:
        results = store.load_results(report["run_id"], names=set(report["tasks"]))
    finally:
        store.close()
    assert report["status"] == "succeeded"
    assert results == {
        "extract": list(range(10)),
        **{f"part{k}": list(range(10))[k::3] for k in range(3)},
        **{f"scaled{k}": 5 * k for k in range(3)},
        "load": 3,
    }
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM loaded").fetchone() == (3,)
