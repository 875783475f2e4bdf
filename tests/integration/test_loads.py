"""Exactly-once loads under faults, on a real SQLite file and the real PostgreSQL.

Every scenario loads N = 300,000 rows of which 7 are poison (a CHECK, a
NOT NULL and a length violation) and expects exactly N - 7 rows written,
the 7 poison rows dead-lettered with their input positions, and no id twice:
(a) an attempt timed out mid-load, then retried; (b) the connection killed
mid-COPY / mid-upsert (PostgreSQL) or the database locked mid-load (SQLite),
then retried; (c) ``kill -9`` of ``pipeopt run`` mid-load, then ``pipeopt
resume --last``; (d) the same ``load_id`` loaded again after a crash and
after success; (e) DataFrame, Arrow and chunked inputs; (f) strings as rows
refused before anything is written; (g) every row refused fails the task.

Append tables have no unique key, so a row written twice would show.
Faults are triggered at a set point of the input (a row generator or a
watcher armed by it), not after a sleep.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, RetryPolicy
from pipeopt.batching import FixedBatcher
from pipeopt.context import ExecutionContext
from pipeopt.sinks import (
    DeadLetterBudgetError,
    PostgresSink,
    SQLiteSink,
    WriteAbortedError,
    write_batches,
)

pytestmark = pytest.mark.slow

N = 300_000
POISON = (0, 1, 40_000, 150_000, 150_001, 222_222, 299_999)
GOOD_SUM = N * (N - 1) // 2 - sum(POISON)
BATCH = 10_000

COLUMNS_SQL = "name {text} NOT NULL, qty integer CHECK (qty >= 0), note {note}"


def row(i: int) -> tuple[Any, ...]:
    if i in (0, 150_000):
        return (i, f"item {i}", -1, None)  # CHECK
    if i in (1, 222_222):
        return (i, None, 1, None)  # NOT NULL
    if i in (40_000, 150_001, 299_999):
        return (i, f"item {i}", 2, "x" * 40)  # too long
    return (i, f"item {i}", i % 97, "ok" if i % 2 else None)


_ROWS: list[tuple[Any, ...]] = []


def all_rows() -> list[tuple[Any, ...]]:
    """Return the N rows, made once for the whole module."""
    if not _ROWS:
        _ROWS.extend(row(i) for i in range(N))
    return _ROWS


def rows(hold: Callable[[int], None] | None = None) -> Iterator[tuple[Any, ...]]:
    """Yield the N rows one by one; ``hold(i)`` runs before row ``i``."""
    if hold is None:
        yield from all_rows()
        return
    for i, item in enumerate(all_rows()):
        hold(i)
        yield item


@dataclass
class Target:
    """One database with an append table ``items`` and an upsert table ``stock``."""

    kind: str
    where: str  # SQLite path or PostgreSQL DSN
    schema: str = ""

    def table(self, name: str) -> str:
        return f"{self.schema}.{name}" if self.schema else name

    def sink(self, name: str = "items", **options: Any) -> SQLiteSink | PostgresSink:
        upsert = ["id"] if name == "stock" else None
        if self.kind == "sqlite":
            return SQLiteSink(self.where, name, upsert_keys=upsert, **options)
        return PostgresSink(self.where, self.table(name), upsert_keys=upsert, **options)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.where)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.where) as conn:
            return conn.execute(sql).fetchall()

    def check_exact(self, name: str = "items") -> None:
        """Assert N - 7 rows once each, the 7 poison rows dead-lettered once each."""
        [(count, distinct, total)] = self.query(
            f"SELECT count(*), count(DISTINCT id), sum(id) FROM {self.table(name)}"
        )
        assert (count, distinct) == (N - len(POISON), N - len(POISON))
        assert int(total) == GOOD_SUM
        letters = self.query(
            f"SELECT position, error_class, load_key, task FROM {self.table(name)}_dead_letter"
        )
        assert sorted(p for p, *_ in letters) == list(POISON)
        assert all(cls and key for _, cls, key, _ in letters)

    def ledger(self) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT load_key, rows_consumed, rows_written, rows_dead_lettered "
            f"FROM {self.table('pipeopt_load_progress')}"
        )


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "sqlite":
        path = tmp_path / "loads.db"
        conn = sqlite3.connect(path)
        cols = COLUMNS_SQL.format(text="text", note="text CHECK (length(note) <= 20)")
        conn.execute(f"CREATE TABLE items (id integer NOT NULL, {cols})")
        conn.execute(f"CREATE TABLE stock (id integer PRIMARY KEY, {cols})")
        conn.commit()
        conn.close()
        yield Target("sqlite", str(path))
        return
    import psycopg

    dsn = request.getfixturevalue("postgres_dsn")
    schema = f"pipeopt_loads_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        cols = COLUMNS_SQL.format(text="text", note="varchar(20)")
        conn.execute(f"CREATE TABLE {schema}.items (id integer NOT NULL, {cols})")
        conn.execute(f"CREATE TABLE {schema}.stock (id integer PRIMARY KEY, {cols})")
    try:
        yield Target("postgres", dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def optimizer() -> PipelineOptimizer:
    return PipelineOptimizer(max_workers=2, batch_latency_slo=None, batch_size=BATCH)


# -- (a) an attempt times out mid-load and is retried ------------------------------------


def test_a_timed_out_attempt_stops_and_the_retry_finishes_the_load(target: Target) -> None:
    def load(context: ExecutionContext) -> int:
        def hold(i: int) -> None:
            if context.attempt == 1 and i == 2 * BATCH + 5:
                deadline = time.monotonic() + 30
                while not context.cancelled and time.monotonic() < deadline:
                    time.sleep(0.002)

        with target.sink() as sink:
            return context.write_batches(rows(hold), sink).rows_written

    pipeline = Pipeline("timeout")
    retry = RetryPolicy(max_attempts=10, base_delay=0.0, jitter=0.0, retry_timeouts=True)
    pipeline.add(PipelineTask("load", load, timeout=3.0, retry_policy=retry))
    result = optimizer().run(pipeline)
    assert result.ok, result.tasks["load"].error
    outcome = result.tasks["load"]
    assert outcome.attempts >= 2
    target.check_exact()
    [(key, consumed, written, dead)] = target.ledger()
    assert key == f"{result.run_id}/load/{target.table('items')}#1"
    assert (consumed, written, dead) == (N, N - 7, 7)
    assert outcome.custom_metrics["rows_written"] == N - 7
    assert outcome.custom_metrics["rows_dead_lettered"] == 7
    by_position = dict(
        target.query(f"SELECT position, attempt FROM {target.table('items_dead_letter')}")
    )
    # Attempt 1 wrote its first two batches, then nothing after it was timed out.
    assert (by_position[0], by_position[1]) == (1, 1)
    assert all(attempt >= 2 for p, attempt in by_position.items() if p >= 2 * BATCH)


# -- (b) the connection dies (PostgreSQL) or the database is locked (SQLite) mid-load ----


class BackendKiller:
    """Terminate the first COPY or INSERT of ``application`` seen running once armed."""

    def __init__(self, dsn: str, application: str) -> None:
        self.dsn = dsn
        self.application = application
        self.armed = threading.Event()
        self.killed = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as admin:
            self.armed.wait(60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'active' "
                    "AND (query LIKE 'COPY%%' OR query LIKE 'INSERT%%')",
                    [self.application],
                ).fetchall()
                if found and found[0][0]:
                    self.killed.set()
                    return

    def join(self) -> None:
        self._thread.join(5)


@pytest.mark.parametrize("table", ["items", "stock"])
def test_a_lost_connection_or_lock_mid_load_is_retried_exactly_once(
    target: Target, table: str
) -> None:
    application = f"pipeopt-loads-{uuid.uuid4().hex[:8]}"
    killer = BackendKiller(target.where, application) if target.kind == "postgres" else None
    locker: list[sqlite3.Connection] = []

    def load(context: ExecutionContext) -> int:
        def hold(i: int) -> None:
            if context.attempt != 1 or i != 10 * BATCH + 5:
                return
            if killer is not None:
                killer.armed.set()  # the next COPY / INSERT is killed while it runs
            else:
                other = sqlite3.connect(target.where, isolation_level=None)
                other.execute("BEGIN IMMEDIATE")  # hold the write lock past the busy timeout
                locker.append(other)

        options: dict[str, Any] = (
            {"application_name": application} if killer is not None else {"busy_timeout": 0.2}
        )
        with target.sink(table, **options) as sink:
            try:
                return context.write_batches(rows(hold), sink).rows_written
            finally:
                for conn in locker:
                    conn.execute("ROLLBACK")
                    conn.close()
                locker.clear()

    pipeline = Pipeline("faults")
    retry = RetryPolicy(max_attempts=3, base_delay=0.0, jitter=0.0)
    pipeline.add(PipelineTask("load", load, retry_policy=retry))
    result = optimizer().run(pipeline)
    assert result.ok, result.tasks["load"].error
    outcome = result.tasks["load"]
    assert outcome.attempts == 2
    if killer is not None:
        killer.join()
        assert killer.killed.is_set()
    target.check_exact(table)
    [(_, consumed, written, dead)] = target.ledger()
    assert (consumed, written, dead) == (N, N - 7, 7)
    assert outcome.custom_metrics["rows_skipped"] >= 10 * BATCH - 7


# -- (c) kill -9 of `pipeopt run` mid-load, then `pipeopt resume --last` ------------------

PIPELINE = """
import os, time
from pathlib import Path

from pipeopt import Pipeline
from pipeopt.sinks import PostgresSink, SQLiteSink

pipeline = Pipeline("killed_load")
N = {n}
POISON_ROW = {row_source!r}
exec(POISON_ROW)


def rows():
    gate = Path(os.environ["GATE"])
    for i in range(N):
        if i == N // 3:
            while not gate.exists():
                time.sleep(0.01)
        yield row(i)


@pipeline.task
def load(context):
    if os.environ["KIND"] == "sqlite":
        sink = SQLiteSink(os.environ["WHERE"], "items")
    else:
        sink = PostgresSink(os.environ["WHERE"], os.environ["SCHEMA"] + ".items")
    with sink:
        return context.write_batches(rows(), sink).rows_written
"""

ROW_SOURCE = """
def row(i):
    if i in (0, 150_000):
        return (i, f"item {i}", -1, None)
    if i in (1, 222_222):
        return (i, None, 1, None)
    if i in (40_000, 150_001, 299_999):
        return (i, f"item {i}", 2, "x" * 40)
    return (i, f"item {i}", i % 97, "ok" if i % 2 else None)
"""


def test_kill_9_mid_load_then_resume_last_loads_every_row_once(
    target: Target, tmp_path: Path
) -> None:
    pipeline = tmp_path / "killed_load.py"
    pipeline.write_text(textwrap.dedent(PIPELINE.format(n=N, row_source=ROW_SOURCE)))
    gate = tmp_path / "gate"
    env = {
        **os.environ,
        "KIND": target.kind,
        "WHERE": target.where,
        "SCHEMA": target.schema,
        "GATE": str(gate),
    }
    state = tmp_path / "state"
    command = [sys.executable, "-m", "pipeopt.cli"]
    # The run's output goes to a file, never to a pipe nobody reads while the test polls.
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "run", str(pipeline), "--state-dir", str(state)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                progress = target.ledger()
            except Exception:  # the ledger table does not exist yet
                progress = []
            if progress and progress[0][1] >= N // 6:
                break
            assert time.monotonic() < deadline, f"the load never got going: {log.read_text()}"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    [(key, consumed, _, _)] = target.ledger()
    assert 0 < consumed < N

    gate.touch()
    resumed = subprocess.run(
        [*command, "resume", "--last", "--state-dir", str(state)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    target.check_exact()
    [(key_after, consumed_after, written, dead)] = target.ledger()
    assert key_after == key  # the resumed run continued the same load
    assert (consumed_after, written, dead) == (N, N - 7, 7)
    runs = {
        r
        for (r,) in target.query(f"SELECT DISTINCT run_id FROM {target.table('items')}_dead_letter")
    }
    assert len(runs) == 2  # poison rows before the kill by the first run, the rest by the resume


# -- (d) the same load_id again: after a crash the rest, after success nothing --------------


def test_the_same_load_id_loads_the_rest_after_a_crash_and_nothing_after_success(
    target: Target,
) -> None:
    def crash(i: int) -> None:
        if i == 123_456:
            raise RuntimeError("the extract died")

    with target.sink() as sink, pytest.raises(RuntimeError, match="the extract died"):
        write_batches(rows(crash), sink, FixedBatcher(BATCH), load_id="items-2024-06-01")
    [(_, consumed, _, _)] = target.ledger()
    assert consumed == 120_000
    with target.sink() as sink:
        rest = write_batches(rows(), sink, FixedBatcher(BATCH), load_id="items-2024-06-01")
    assert rest.rows_skipped == 120_000
    assert rest.rows_written + rest.rows_dead_lettered == N - 120_000
    assert (rest.load_rows_written, rest.load_rows_dead_lettered) == (N - 7, 7)
    target.check_exact()
    with target.sink() as sink:
        again = write_batches(rows(), sink, FixedBatcher(BATCH), load_id="items-2024-06-01")
    assert (again.rows_written, again.rows_dead_lettered, again.rows_skipped) == (0, 0, N)
    target.check_exact()


# -- (e) DataFrame, Arrow and chunked inputs -----------------------------------------------


@pytest.fixture(scope="module")
def frame() -> Any:
    pandas = pytest.importorskip("pandas")
    columns = zip(*all_rows(), strict=True)
    return pandas.DataFrame(dict(zip(("id", "name", "qty", "note"), columns, strict=True)))


@pytest.mark.parametrize("shape", ["dataframe", "arrow", "chunks"])
def test_every_input_shape_loads_every_row(target: Target, frame: Any, shape: str) -> None:
    from pipeopt import stream_dataframe

    if shape == "dataframe":
        data: Any = frame
    elif shape == "arrow":
        pyarrow = pytest.importorskip("pyarrow")
        data = pyarrow.Table.from_pandas(frame, preserve_index=False)
    else:
        data = stream_dataframe(frame[["note", "qty", "name", "id"]], 7_000)
    with target.sink() as sink:
        report = write_batches(data, sink, FixedBatcher(BATCH), load_id=f"shape-{shape}")
    assert (report.rows_written, report.rows_dead_lettered) == (N - 7, 7)
    target.check_exact()
    assert target.query(f"SELECT name, qty, note FROM {target.table('items')} WHERE id = 3") == [
        ("item 3", 3, "ok")
    ]
    assert target.query(f"SELECT note FROM {target.table('items')} WHERE id = 4") == [(None,)]


# -- (f) strings as rows: TypeError before anything is written ------------------------------


def test_strings_as_rows_are_refused_before_anything_is_written(target: Target, frame: Any) -> None:
    batcher = FixedBatcher(BATCH)
    with target.sink() as sink:
        with pytest.raises(TypeError, match=r"row 0 is a str \('id'\).*column names"):
            write_batches(list(frame.columns), sink, batcher)  # what `for r in df` gives
        with pytest.raises(TypeError, match=r"row 5 is a str"):
            write_batches([row(i) for i in range(5)] + ["oops"] + [row(6)], sink, batcher)
        with pytest.raises(TypeError, match="got a mapping"):
            write_batches({"id": 1}, sink, batcher)
        with pytest.raises(TypeError, match=r"rows is a set.*sorted\(rows\)"):
            write_batches({row(1), row(2)}, sink, batcher)
        with pytest.raises(TypeError, match=r"row 0 is a int \(7\)"):
            write_batches(iter([7, 8]), sink, batcher)
    assert target.query(f"SELECT count(*) FROM {target.table('items')}") == [(0,)]


# -- (g) every row refused: the task fails with a clear message ----------------------------


def test_a_load_whose_every_row_is_refused_fails_the_task(target: Target) -> None:
    def load(context: ExecutionContext) -> int:
        with target.sink() as sink:
            bad = ((i, f"item {i}", -1, None) for i in range(N))
            return context.write_batches(bad, sink).rows_written

    pipeline = Pipeline("refused")
    pipeline.add(PipelineTask("load", load))
    result = optimizer().run(pipeline)
    outcome = result.tasks["load"]
    assert not result.ok
    assert isinstance(outcome.error, DeadLetterBudgetError)
    assert isinstance(outcome.error, WriteAbortedError)
    message = str(outcome.error)
    assert "were refused, over max_dead_letters=0.1" in message
    assert "CHECK" in message or "Check" in message
    assert "items_dead_letter" in message
    assert target.query(f"SELECT count(*) FROM {target.table('items')}") == [(0,)]
    assert outcome.error.rows_seen < N  # it stopped early instead of refusing 300,000 rows
