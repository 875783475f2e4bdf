"""The run store on real SQLite files: history, resume, caching, bad state, two processes."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, RunStatus, TaskState
from pipeopt.errors import RunStoreError
from pipeopt.retry import RetryPolicy
from pipeopt.store import DB_NAME, RunStore


def optimizer(state_dir: Path, **options: Any) -> PipelineOptimizer:
    return PipelineOptimizer(max_workers=4, state_dir=state_dir, **options)


def flaky_pipeline(fail: set[str], calls: list[str], *, changed: bool = False) -> Pipeline:
    """a -> b -> c and a -> d; the tasks named in ``fail`` raise.

    ``changed`` makes c depend on d too, d critical, and adds e after a and d.
    """
    pipeline = Pipeline("flaky")

    def body(name: str) -> Any:
        def run(**upstream: Any) -> Any:
            calls.append(name)
            if name in fail:
                raise ValueError(f"{name} cannot go on")
            return [name, *sorted(upstream.values())]

        return run

    pipeline.add(PipelineTask("a", body("a"), criticality="high"))
    pipeline.add(PipelineTask("b", body("b"), ["a"]))
    pipeline.add(PipelineTask("c", body("c"), ["b", "d"] if changed else ["b"]))
    pipeline.add(PipelineTask("d", body("d"), ["a"], criticality="critical" if changed else "low"))
    if changed:
        pipeline.add(PipelineTask("e", body("e"), ["a", "d"]))
    return pipeline


# -- history --------------------------------------------------------------------


def test_a_run_records_attempts_errors_and_every_final_state(tmp_path: Path) -> None:
    pipeline = Pipeline("history")
    tries = {"n": 0}

    @pipeline.task(retry_policy=RetryPolicy(max_attempts=3, base_delay=0.0, jitter=0.0))
    def flaky() -> str:
        tries["n"] += 1
        if tries["n"] < 3:
            raise ConnectionError(f"try {tries['n']} refused")
        return "connected"

    @pipeline.task
    def broken() -> None:
        raise KeyError("no such column: amount")

    @pipeline.task(dependencies=["broken"])
    def after_broken(broken: None) -> None:
        raise AssertionError("never runs")

    opt = optimizer(tmp_path)
    result = opt.run(pipeline)
    assert result.status is RunStatus.FAILED
    store = opt.store
    assert store is not None

    [summary] = store.list_runs()
    assert (summary.run_id, summary.pipeline, summary.status) == (
        result.run_id,
        "history",
        "failed",
    )
    assert (summary.tasks, summary.succeeded, summary.failed, summary.skipped) == (3, 1, 1, 1)
    assert summary.duration is not None
    assert summary.duration >= 0
    assert (summary.executor, summary.workers) == ("thread", 4)

    detail = store.show_run(result.run_id)
    tasks = {t.name: t for t in detail.tasks}
    assert [t.name for t in detail.tasks] == ["flaky", "broken", "after_broken"]
    assert tasks["flaky"].state == "succeeded"
    assert tasks["flaky"].attempts == 3
    assert [a.state for a in tasks["flaky"].history] == ["retrying", "retrying", "succeeded"]
    assert [a.error_type for a in tasks["flaky"].history] == ["ConnectionError"] * 2 + [None]
    assert tasks["flaky"].history[0].error == "try 1 refused"
    assert "ConnectionError: try 1 refused" in (tasks["flaky"].history[0].traceback or "")
    assert tasks["broken"].state == "failed"
    assert tasks["broken"].error_type == "KeyError"
    assert "no such column" in (tasks["broken"].error or "")
    assert "raise KeyError" in (tasks["broken"].traceback or "")
    assert tasks["after_broken"].state == "skipped"
    assert tasks["after_broken"].attempts == 0
    assert tasks["after_broken"].error_type == "UpstreamFailedError"
    assert all(t.duration is not None for t in (tasks["flaky"], tasks["broken"]))
    assert store.show_run("last").run_id == result.run_id
    store.close()


def test_cancelled_tasks_are_recorded(tmp_path: Path) -> None:
    pipeline = Pipeline("fail-fast")
    pipeline.add(PipelineTask("boom", _raise, criticality="blocker"))
    for i in range(5):
        pipeline.add(PipelineTask(f"later_{i}", _noop, ["boom"] if i == 0 else [f"later_{i - 1}"]))
    pipeline.add(PipelineTask("unrelated", _noop, criticality="deferred"))
    opt = PipelineOptimizer(max_workers=1, state_dir=tmp_path, fail_fast=True)
    result = opt.run(pipeline)
    assert opt.store is not None
    [summary] = opt.store.list_runs()
    assert summary.status == result.status.value == "cancelled"
    assert summary.cancelled == result.counts()["cancelled"] >= 1
    states = {t.name: t.state for t in opt.store.show_run(result.run_id).tasks}
    assert states == {name: outcome.state.value for name, outcome in result.tasks.items()}
    opt.store.close()


def _raise() -> None:
    raise RuntimeError("stop everything")


def _noop(**_: Any) -> None:
    return None


def test_resolve_run_by_last_prefix_and_pipeline(tmp_path: Path) -> None:
    opt = optimizer(tmp_path)
    first = opt.run(flaky_pipeline(set(), []))
    second = opt.run(flaky_pipeline(set(), []))
    other = Pipeline("other")
    other.add(PipelineTask("x", _noop))
    third = opt.run(other)
    store = opt.store
    assert store is not None
    assert store.resolve_run(None) == third.run_id
    assert store.resolve_run("last", pipeline="flaky") == second.run_id
    assert store.resolve_run(first.run_id) == first.run_id
    assert store.resolve_run(third.run_id[:-2]) == third.run_id  # a unique prefix
    with pytest.raises(RunStoreError, match="pipeopt history"):
        store.resolve_run("20000101-000000-abcdef")
    with pytest.raises(RunStoreError, match="several runs"):
        store.resolve_run(first.run_id[:4])
    with pytest.raises(RunStoreError, match="not 'flaky'"):
        store.resolve_run(third.run_id, pipeline="flaky")
    with pytest.raises(RunStoreError, match="no runs of pipeline 'nope'"):
        store.resolve_run(None, pipeline="nope")
    assert [r.run_id for r in store.list_runs(2)] == [third.run_id, second.run_id]
    store.close()


# -- resume -------------------------------------------------------------------------


def test_resume_reruns_only_what_did_not_succeed_across_a_chain(tmp_path: Path) -> None:
    calls: list[str] = []
    first = optimizer(tmp_path).run(flaky_pipeline({"b"}, calls))
    assert first.status is RunStatus.FAILED
    assert sorted(calls) == ["a", "b", "d"]

    calls.clear()
    second = optimizer(tmp_path).resume(flaky_pipeline({"c"}, calls))
    assert sorted(calls) == ["b", "c"]  # a and d succeeded before
    assert second.tasks["a"].state is TaskState.SUCCEEDED
    assert second.tasks["a"].attempts == 0

    calls.clear()
    opt = optimizer(tmp_path)
    third = opt.resume(flaky_pipeline(set(), calls))
    assert calls == ["c"]  # b's result comes from the second run, a's from the first
    assert third.ok
    assert third.results["c"] == ["c", ["b", ["a"]]]
    store = opt.store
    assert store is not None
    runs = store.list_runs()
    assert [r.resumed_from for r in runs] == [second.run_id, first.run_id, None]
    notes = {t.name: (t.state, t.note) for t in store.show_run(third.run_id).tasks}
    assert notes["a"] == ("succeeded", "resumed")
    assert notes["c"] == ("succeeded", None)
    store.close()


def test_structure_change_is_refused_with_the_differences_and_force_goes_on(
    tmp_path: Path,
) -> None:
    calls: list[str] = []
    optimizer(tmp_path).run(flaky_pipeline({"c"}, calls))

    changed = flaky_pipeline(set(), calls, changed=True)
    opt = optimizer(tmp_path)
    with pytest.raises(RunStoreError) as info:
        opt.resume(changed)
    message = str(info.value)
    assert "task 'e' added" in message
    assert "task 'c' dependencies changed: [b] -> [b, d]" in message
    assert "task 'd' criticality changed: low -> critical" in message
    assert "--force" in message
    store = opt.store
    assert store is not None
    previous = store.resolve_run(None)
    assert store.structure_diff(previous, flaky_pipeline(set(), []).compile()) == []
    smaller = Pipeline("flaky")
    smaller.add(PipelineTask("a", _noop))
    assert "task 'b' removed" in store.structure_diff(previous, smaller.compile())

    calls.clear()
    result = opt.resume(changed, force=True)
    assert result.ok
    assert sorted(calls) == ["c", "e"]
    store.close()


def test_unstorable_results_run_again_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Pipeline("unstorable")
    calls: list[str] = []

    def body(name: str, value: Any) -> Any:
        def run() -> Any:
            calls.append(name)
            return value

        return run

    pipeline.add(PipelineTask("plain", body("plain", {"rows": 3})))
    pipeline.add(PipelineTask("none", body("none", None)))
    pipeline.add(PipelineTask("private", body("private", "secret"), persist=False))
    pipeline.add(PipelineTask("lock", body("lock", threading.Lock())))
    pipeline.add(PipelineTask("big", body("big", b"x" * 10_000)))
    pipeline.add(PipelineTask("fails", _raise, ["plain", "none", "private", "lock", "big"]))

    store = RunStore(tmp_path, max_result_bytes=1_000)  # keeps small results only
    opt = PipelineOptimizer(max_workers=2, state_dir=store)
    with caplog.at_level(logging.WARNING, logger="pipeopt.store"):
        first = opt.run(pipeline)
    assert first.status is RunStatus.FAILED
    logged = caplog.text
    assert "'lock' not stored (cannot pickle" in logged
    assert "'big' not stored (10018 bytes pickled, max_result_bytes is 1000)" in logged
    loaded = store.load_results(first.run_id, names=set(pipeline.tasks))
    assert loaded == {"plain": {"rows": 3}, "none": None}
    opt.close()

    calls.clear()
    resumed = optimizer(tmp_path).resume(pipeline)
    assert sorted(calls) == ["big", "lock", "private"]
    assert resumed.results["none"] is None
    assert resumed.results["plain"] == {"rows": 3}


# -- cache ---------------------------------------------------------------------------


def test_a_cached_task_is_skipped_on_the_next_run(tmp_path: Path) -> None:
    calls: list[str] = []

    def build(day: str, name: str = "cached") -> Pipeline:
        pipeline = Pipeline(name)

        @pipeline.task
        def day_of_run() -> str:
            return day

        @pipeline.task(dependencies=[day_of_run], cache_key=lambda day_of_run: f"sum-{day_of_run}")
        def expensive(day_of_run: str) -> dict[str, int]:
            calls.append(day_of_run)
            return {"day": int(day_of_run), "total": 42}

        @pipeline.task(dependencies=[expensive])
        def report(expensive: dict[str, int]) -> int:
            return expensive["total"] + 1

        return pipeline

    first = optimizer(tmp_path).run(build("1"))
    assert first.tasks["expensive"].state is TaskState.SUCCEEDED
    assert calls == ["1"]

    opt = optimizer(tmp_path)
    second = opt.run(build("1"))
    assert calls == ["1"]  # the body did not run
    assert second.tasks["expensive"].state is TaskState.CACHED
    assert second.tasks["expensive"].attempts == 0
    assert second.results["expensive"] == {"day": 1, "total": 42}
    assert second.results["report"] == 43
    assert second.ok
    store = opt.store
    assert store is not None
    [summary] = store.list_runs(1)
    assert (summary.succeeded, summary.cached) == (2, 1)
    expensive = {t.name: t for t in store.show_run(second.run_id).tasks}["expensive"]
    assert (expensive.state, expensive.note) == ("cached", f"cached from run {first.run_id}")

    third = opt.run(build("2"))  # another key
    assert calls == ["1", "2"]
    assert third.tasks["expensive"].state is TaskState.SUCCEEDED
    fourth = opt.run(build("1", name="another-pipeline"))  # keys are per pipeline
    assert calls == ["1", "2", "1"]
    assert fourth.tasks["expensive"].state is TaskState.SUCCEEDED

    # A resumed run reuses the cached result recorded in the run it resumes.
    calls.clear()
    resumed = opt.resume(build("1"), second.run_id)
    assert calls == []
    assert resumed.results["expensive"] == {"day": 1, "total": 42}
    store.close()


# -- bad state -------------------------------------------------------------------------


def test_a_missing_folder_is_created(tmp_path: Path) -> None:
    folder = tmp_path / "deep" / "state"
    with RunStore(folder) as store:
        assert store.list_runs() == []
    assert (folder / DB_NAME).is_file()


def test_a_file_as_folder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a folder")
    with pytest.raises(RunStoreError, match="is a file"):
        RunStore(path)


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_a_corrupt_store_is_refused_and_left_untouched(tmp_path: Path, damage: str) -> None:
    path = tmp_path / DB_NAME
    if damage == "garbage":
        path.write_bytes(os.urandom(3000) + b"previous runs")
    else:
        calls: list[str] = []
        for _ in range(3):
            opt = optimizer(tmp_path)
            opt.run(flaky_pipeline({"c"}, calls))
            assert opt.store is not None
            opt.store.close()  # the last connection folds the WAL into the file
        data = bytearray(path.read_bytes())
        assert len(data) > 3 * 4096
        data[4096 : 3 * 4096] = b"\xa5" * (2 * 4096)  # the root pages after the schema
        path.write_bytes(bytes(data))
    before = path.read_bytes()

    with pytest.raises(RunStoreError) as info:
        RunStore(tmp_path)
    message = str(info.value)
    assert "not a usable run store" in message
    assert "left untouched: move it aside" in message
    assert path.read_bytes() == before

    ran: list[str] = []
    with pytest.raises(RunStoreError):
        optimizer(tmp_path).run(flaky_pipeline(set(), ran))
    assert ran == []  # nothing ran
    assert path.read_bytes() == before


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    conn.close()
    with pytest.raises(RunStoreError, match="newer pipeopt"):
        RunStore(tmp_path)


def test_a_store_locked_too_long_gives_a_clear_error(tmp_path: Path) -> None:
    RunStore(tmp_path).close()
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        store = RunStore(tmp_path, lock_timeout=0.2)  # reading needs no lock in WAL mode
        assert store.list_runs() == []
        pipeline = Pipeline("locked")
        pipeline.add(PipelineTask("x", _noop))
        with pytest.raises(RunStoreError, match="locked by another process") as info:
            store.begin_run(
                run_id="r1",
                pipeline="locked",
                compiled=pipeline.compile(),
                executor="thread",
                workers=1,
                resumed_from=None,
            )
        assert "pass another state dir" in str(info.value)
        store.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_new_store_locked_by_a_rollback_journal_writer(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE other (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RunStoreError, match="locked by another process"):
            RunStore(tmp_path, lock_timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# -- two processes ---------------------------------------------------------------------

CONCURRENT = """
import os, sys, time
from pathlib import Path
from pipeopt import Pipeline, PipelineOptimizer, PipelineTask

me, other, state = sys.argv[1], sys.argv[2], sys.argv[3]
pipeline = Pipeline(f"concurrent-{me}")

def meet():
    # Both runs are under way before either records much.
    Path(state, f"started-{me}").touch()
    deadline = time.monotonic() + 30
    while not Path(state, f"started-{other}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the other run never started")
        time.sleep(0.005)
    return me

def work(meet, **_):
    time.sleep(0.0005)
    return meet

pipeline.add(PipelineTask("meet", meet, criticality="blocker"))
for i in range(300):
    pipeline.add(PipelineTask(f"t{i}", work, ["meet"]))
result = PipelineOptimizer(max_workers=4, state_dir=state).run(pipeline)
sys.exit(0 if result.ok else 1)
"""


def test_two_processes_record_runs_in_one_state_folder(tmp_path: Path) -> None:
    script = tmp_path / "two_runs.py"  # not concurrent.py: that would shadow the stdlib
    script.write_text(textwrap.dedent(CONCURRENT))
    state = tmp_path / "state"
    state.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), me, other, str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    with RunStore(state) as store:
        runs = store.list_runs()
        assert sorted(r.pipeline for r in runs) == ["concurrent-a", "concurrent-b"]
        for run in runs:
            assert (run.status, run.succeeded, run.tasks) == ("succeeded", 301, 301)
            detail = store.show_run(run.run_id)
            assert all(t.state == "succeeded" and t.attempts == 1 for t in detail.tasks)
