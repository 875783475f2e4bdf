"""The run store when things go wrong, on real SQLite files.

The writer's failure path (a commit that fails, a connection that cannot be
opened, a disk that fills), a damaged JSON column, the read-only open that
``history`` and ``show`` use, and the resume lock within one process.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.errors import RunLockedError, RunStoreError
from pipeopt.store import DB_NAME, SCHEMA_VERSION, RunStore

TASKS = 40


def pipeline(name: str = "faults", payload: int = 16) -> Pipeline:
    """``TASKS`` independent tasks, each returning ``payload`` bytes."""
    p = Pipeline(name)
    for i in range(TASKS):
        p.add(PipelineTask(f"t{i:02d}", lambda i=i: bytes([i]) * payload))
    return p


class FlakyConnection(sqlite3.Connection):
    """A real connection whose next ``failures`` COMMITs fail as a broken disk would."""

    failures = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def flaky_factory(path: Path, *, refused: int, failures: int) -> Callable[[], sqlite3.Connection]:
    """Return a factory that fails ``refused`` times, then gives flaky connections."""
    state = {"refused": refused}

    def connect() -> sqlite3.Connection:
        if state["refused"] > 0:
            state["refused"] -= 1
            raise sqlite3.OperationalError("unable to open database file")
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=FlakyConnection
        )
        assert isinstance(conn, FlakyConnection)
        conn.failures = failures
        return conn

    return connect


def reopened(state: Path) -> RunStore:
    return RunStore(state, read_only=True)


# -- the writer ---------------------------------------------------------------------------


def test_the_writer_retries_failed_commits_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(
        tmp_path,
        flush_interval=0.0,
        connect_writer=flaky_factory(tmp_path / DB_NAME, refused=1, failures=2),
    )
    with caplog.at_level(logging.WARNING, logger="pipeopt"):
        result = PipelineOptimizer(max_workers=4, state_dir=store).run(pipeline())
        assert result.ok  # the run itself never depends on its record
        store.close()  # the writer retries until it is closed
    assert "cannot write, will retry" in caplog.text
    assert "writing again after" in caplog.text
    assert "not recorded" not in caplog.text
    with reopened(tmp_path) as again:
        summary = again.summary(result.run_id)
        assert (summary.status, summary.succeeded) == ("succeeded", TASKS)
        detail = again.show_run(result.run_id)
        assert {t.state for t in detail.tasks} == {"succeeded"}
        assert {t.attempts for t in detail.tasks} == {1}
        loaded = again.load_results(result.run_id, names=set(result.results))
    assert loaded == result.results


def test_a_writer_that_never_commits_reports_and_does_not_hang_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(
        tmp_path,
        lock_timeout=0.5,
        flush_interval=0.0,
        connect_writer=flaky_factory(tmp_path / DB_NAME, refused=0, failures=10**9),
    )
    optimizer = PipelineOptimizer(max_workers=4, state_dir=store)
    with caplog.at_level(logging.WARNING, logger="pipeopt"):
        # Returns: end_run is told of the failure at once instead of waiting for it.
        result = optimizer.run(pipeline())
        assert result.ok
        assert len(result.results) == TASKS
        with pytest.raises(RunStoreError, match="disk I/O error"):
            store.flush()
        store.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"run {result.run_id} finished but could not be recorded" in e for e in errors)
    assert any(f"events of run {result.run_id} not recorded" in e and "closed" in e for e in errors)
    assert any(f"the end of run {result.run_id} (succeeded) was not recorded" in e for e in errors)
    with reopened(tmp_path) as again:
        # What was not written shows as what it is: a run that never recorded its end.
        assert again.summary(result.run_id).status == "crashed"


def test_a_full_disk_still_records_how_the_run_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / DB_NAME
    RunStore(tmp_path).close()

    def capped() -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # room for a start, not a run
        return conn

    store = RunStore(tmp_path, flush_interval=0.0, connect_writer=capped)
    with caplog.at_level(logging.WARNING, logger="pipeopt"):
        result = PipelineOptimizer(max_workers=4, state_dir=store).run(pipeline(payload=20_000))
        assert result.ok
        store.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("database or disk is full" in e and "free space" in e for e in errors), errors
    assert any(f"events of run {result.run_id} not recorded" in e for e in errors), errors
    with reopened(tmp_path) as again:
        summary = again.summary(result.run_id)
    # The attempts did not fit, but the outcome did: status and counts.
    assert (summary.status, summary.succeeded, summary.tasks) == ("succeeded", TASKS, TASKS)


def test_a_store_locked_by_another_process_is_written_once_the_lock_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RunStore(tmp_path, lock_timeout=0.2, flush_interval=0.0)
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None, check_same_thread=False)
    locked = Pipeline("locked")

    @locked.task()
    def take_the_lock() -> int:
        holder.execute("BEGIN IMMEDIATE")  # as another process's long write would
        return 1

    @locked.task(dependencies=[take_the_lock])
    def later(take_the_lock: int) -> int:
        return take_the_lock + 1

    try:
        with caplog.at_level(logging.WARNING, logger="pipeopt"):
            result = PipelineOptimizer(max_workers=2, state_dir=store).run(locked)
        assert result.results == {"take_the_lock": 1, "later": 2}
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("locked by another process" in e for e in errors), errors
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.close()  # the lock is gone: the writer's retry commits everything
    with reopened(tmp_path) as again:
        detail = again.show_run(result.run_id)
    assert detail.summary.status == "succeeded"
    assert [(t.name, t.state, t.attempts) for t in detail.tasks] == [
        ("take_the_lock", "succeeded", 1),
        ("later", "succeeded", 1),
    ]


# -- a damaged JSON column ---------------------------------------------------------------


@pytest.mark.parametrize("counts", ["{not json", "[1, 2]", '{"succeeded": "many"}'])
def test_a_damaged_counts_column_names_the_run_and_column(tmp_path: Path, counts: str) -> None:
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path) as optimizer:
        run_id = optimizer.run(pipeline()).run_id
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE runs SET counts = ? WHERE run_id = ?", (counts, run_id))
    conn.close()
    with reopened(tmp_path) as store:
        for read in (store.list_runs, lambda: store.show_run(run_id)):
            with pytest.raises(RunStoreError) as info:
                read()
            message = str(info.value)
            assert f"run {run_id}" in message
            assert "runs.counts" in message
            assert "move it aside" in message


# -- the read-only open -------------------------------------------------------------------


def test_read_only_refuses_a_missing_folder_and_creates_nothing(tmp_path: Path) -> None:
    typo = tmp_path / "stat"
    with pytest.raises(RunStoreError, match="does not exist") as info:
        RunStore(typo, read_only=True)
    assert "--state-dir" in str(info.value)
    assert not typo.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunStoreError, match="no run store in"):
        RunStore(empty, read_only=True)
    assert list(empty.iterdir()) == []

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunStoreError, match="is not a folder"):
        RunStore(a_file, read_only=True)


def test_read_only_reads_and_refuses_to_write(tmp_path: Path) -> None:
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path) as optimizer:
        run_id = optimizer.run(pipeline()).run_id
    before = (tmp_path / DB_NAME).read_bytes()
    with RunStore(tmp_path, read_only=True) as store:
        assert [r.run_id for r in store.list_runs()] == [run_id]
        assert len(store.show_run("last").tasks) == TASKS
        with pytest.raises(RunStoreError, match="read-only"):
            store.set_source(run_id, "elsewhere.py")
        with pytest.raises(RunStoreError, match="read-only"):
            PipelineOptimizer(state_dir=store).run(pipeline("other"))
    assert (tmp_path / DB_NAME).read_bytes() == before


def test_a_schema_1_store_is_read_as_is_and_upgraded_when_written(tmp_path: Path) -> None:
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path) as optimizer:
        run_id = optimizer.run(pipeline()).run_id
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("DROP TABLE run_locks")
        conn.execute("DROP TABLE run_params")
        conn.execute("DROP TABLE task_logs")
        conn.execute("DROP TABLE task_estimates")
        conn.execute("DROP TABLE run_estimates")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    conn.close()
    with RunStore(tmp_path, read_only=True) as store:
        assert store.summary(run_id).succeeded == TASKS
        assert store.summary(run_id).params == {}
        assert all(t.logs == () for t in store.show_run(run_id).tasks)
    with RunStore(tmp_path) as store, store.lock_run(run_id):
        pass
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    assert version == (str(SCHEMA_VERSION),)
    conn.close()


# -- the resume lock ------------------------------------------------------------------------


def test_a_held_run_is_refused_and_released_after(tmp_path: Path) -> None:
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path) as optimizer:
        run_id = optimizer.run(pipeline()).run_id
    with RunStore(tmp_path) as first, RunStore(tmp_path) as second:
        with first.lock_run(run_id):
            with pytest.raises(RunLockedError) as info, second.lock_run(run_id):
                pass
            assert (info.value.run_id, info.value.pid) == (run_id, os.getpid())
            assert isinstance(info.value, RunStoreError)
            assert "is being resumed by another process" in str(info.value)
            copy = pickle.loads(pickle.dumps(info.value))
            assert (copy.run_id, copy.host, copy.pid) == (run_id, info.value.host, os.getpid())
            with pytest.raises(RunLockedError):
                PipelineOptimizer(state_dir=second).resume(pipeline(), run_id)
        with second.lock_run(run_id):  # released: free again
            pass


def test_the_lock_of_a_dead_process_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path) as optimizer:
        run_id = optimizer.run(pipeline()).run_id
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeopt.store import RunStore\n"
            "store = RunStore(sys.argv[1])\n"
            "with store.lock_run(sys.argv[2]):\n"
            "    print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
            run_id,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    with RunStore(tmp_path) as store:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"), store.lock_run(run_id):
            pass
        holder.kill()
        holder.communicate()
        with caplog.at_level(logging.WARNING, logger="pipeopt.store"), store.lock_run(run_id):
            assert f"taking over the resume lock of pid {holder.pid}" in caplog.text
