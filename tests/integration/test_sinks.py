"""Sinks against a real SQLite file and the real PostgreSQL, and write_batches' rules.

PostgreSQL tests use the server named by ``PIPEOPT_TEST_POSTGRES_DSN`` and
skip when it is unreachable (fail with ``PIPEOPT_REQUIRE_POSTGRES=1``). Each
test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import pytest

from pipeopt.batching import AdaptiveBatcher, BatcherStatistics, FixedBatcher
from pipeopt.errors import SinkError
from pipeopt.sinks import (
    DeadLetter,
    DeadLetterBudgetError,
    LoadOrigin,
    LoadProgress,
    LoadStep,
    PostgresSink,
    Row,
    Sink,
    SQLiteSink,
    WriteAbortedError,
    WriteCancelledError,
    WriteReport,
    write_batches,
)

ROWS = 10_000
POISON_AT = (0, 1, 2500, 5000, 5001, 7777, 9999)

SQLITE_DDL = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    qty INTEGER CHECK (qty >= 0),
    note TEXT CHECK (length(note) <= 20)
) STRICT
"""

POSTGRES_DDL = """
CREATE TABLE {schema}.items (
    id integer PRIMARY KEY,
    name text NOT NULL,
    qty integer CHECK (qty >= 0),
    note varchar(20)
)
"""


def good_row(i: int) -> tuple[Any, ...]:
    return (i, f"item {i}", i % 97, "ok" if i % 2 else None)


def poisoned_rows() -> list[tuple[Any, ...]]:
    """Return 10,000 rows of which 7, of 7 different kinds, no database accepts."""
    rows = [good_row(i) for i in range(ROWS)]
    bad: list[tuple[Any, ...]] = [
        (0, "negative", -1, None),  # CHECK constraint
        (1, None, 1, None),  # NOT NULL
        (2500, "not a number", "abc", None),  # type
        (5000, "too long", 3, "x" * 40),  # length
        (5001, "short row", 4),  # three values for four columns
        (7777, "unadaptable", {"a": 1}, None),  # the driver cannot send a dict
        (9999, "negative again", -9, None),
    ]
    for row in bad:
        rows[row[0]] = row
    return rows


def dead_letter_ids(letters: Sequence[tuple[str, Any]]) -> list[int]:
    ids = []
    for _error, raw in letters:
        row = json.loads(raw) if isinstance(raw, str) else raw
        ids.append(row["id"] if isinstance(row, dict) else row[0])
    return sorted(ids)


def check_poison_outcome(
    report: WriteReport, ids: list[int], letters: Sequence[tuple[str, Any]]
) -> None:
    assert report.rows_written == ROWS - len(POISON_AT)
    assert report.rows_dead_lettered == len(POISON_AT)
    assert report.rows == ROWS
    # 0 lost and 0 duplicated: the table holds exactly the good ids, once each.
    assert len(ids) == ROWS - len(POISON_AT)
    assert sorted(ids) == sorted(set(range(ROWS)) - set(POISON_AT))
    assert dead_letter_ids(letters) == sorted(POISON_AT)
    errors = [error for error, _ in letters]
    assert all(error and ":" in error for error in errors)
    assert len(set(errors)) >= 5  # each kind says what went wrong


# -- SQLite ------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    path = tmp_path / f"test-{uuid.uuid4().hex[:8]}.db"
    with sqlite3.connect(path) as conn:
        conn.execute(SQLITE_DDL)
    conn.close()
    return path


def sqlite_rows(path: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_sqlite_isolates_seven_poison_rows_in_ten_thousand(sqlite_path: Path) -> None:
    sizes: list[int] = []
    batcher = AdaptiveBatcher(0.05, min_size=10)
    with SQLiteSink(sqlite_path, "items") as sink:
        report = write_batches(
            poisoned_rows(), sink, batcher, on_batch=lambda size, _latency: sizes.append(size)
        )
    ids = [row[0] for row in sqlite_rows(sqlite_path, "SELECT id FROM items")]
    letters = sqlite_rows(sqlite_path, "SELECT error, row_json FROM items_dead_letter")
    check_poison_outcome(report, ids, letters)
    assert sum(sizes) == report.rows_written  # every successful write was reported
    assert batcher.statistics().rows == report.rows_written
    errors = " | ".join(error for error, _ in letters)
    for fragment in ("CHECK constraint failed", "NOT NULL", "cannot store TEXT", "binding"):
        assert fragment in errors
    assert "row has 3 values, expected 4" in errors


def test_sqlite_dead_letters_keep_the_row_as_json(sqlite_path: Path) -> None:
    rows = [{"id": 1, "name": "fine", "qty": 1, "note": None, "extra": "ignored"}]
    rows.append({"id": 2, "name": "bad", "qty": -3, "note": "ünïcode"})
    origin = LoadOrigin("run-1", "load_items", 2)
    with SQLiteSink(sqlite_path, "items") as sink:
        report = write_batches(
            rows, sink, FixedBatcher(10), load_id="k1", origin=origin, max_dead_letters=None
        )
    assert (report.rows_written, report.rows_dead_lettered) == (1, 1)
    [(failed_at, error, raw, run_id, task, attempt, key, position, error_class)] = sqlite_rows(
        sqlite_path,
        "SELECT failed_at, error, row_json, run_id, task, attempt, load_key, position, "
        "error_class FROM items_dead_letter",
    )
    assert error.startswith("IntegrityError: CHECK constraint failed")
    assert json.loads(raw) == {"id": 2, "name": "bad", "qty": -3, "note": "ünïcode"}
    assert failed_at.endswith("+00:00")
    assert (run_id, task, attempt, key, position, error_class) == (
        "run-1",
        "load_items",
        2,
        "k1",
        1,
        "IntegrityError",
    )


def test_sqlite_upsert_never_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "upsert.db"
    first = [{"id": i, "qty": i} for i in range(500)]
    again = [{"id": i, "qty": i * 10} for i in range(250, 750)]
    with SQLiteSink(path, "stock", upsert_keys=["id"]) as sink:  # creates the table
        write_batches(first, sink, FixedBatcher(64))
        write_batches(again, sink, FixedBatcher(100))
        write_batches(again, sink, FixedBatcher(33))  # the same batch, sent again
    rows = dict(sqlite_rows(path, "SELECT id, qty FROM stock"))
    assert len(rows) == 750
    assert rows[0] == 0
    assert rows[249] == 249
    assert rows[250] == 2500
    assert rows[749] == 7490


def test_sqlite_columns_from_the_table_and_tuple_rows(sqlite_path: Path) -> None:
    with SQLiteSink(sqlite_path, "items") as sink:
        assert sink.columns == ("id", "name", "qty", "note")
        sink.write([(1, "a", 1, None), (2, "b", 2, "x")])
    with SQLiteSink(sqlite_path, "items", columns=["name", "id"]) as sink:
        sink.write([("c", 3)])
    assert sqlite_rows(sqlite_path, "SELECT id, name, qty FROM items ORDER BY id") == [
        (1, "a", 1),
        (2, "b", 2),
        (3, "c", None),
    ]


def test_sqlite_write_is_one_transaction(sqlite_path: Path) -> None:
    with SQLiteSink(sqlite_path, "items") as sink:
        with pytest.raises(sqlite3.IntegrityError):
            sink.write([good_row(1), good_row(2), (3, "bad", -1, None)])
        assert sqlite_rows(sqlite_path, "SELECT count(*) FROM items") == [(0,)]
        sink.write([good_row(1)])
    assert sqlite_rows(sqlite_path, "SELECT count(*) FROM items") == [(1,)]
    mode = sqlite_rows(sqlite_path, "PRAGMA journal_mode")
    assert mode == [("wal",)]


def test_sqlite_refuses_bad_setups(tmp_path: Path, sqlite_path: Path) -> None:
    with pytest.raises(SinkError, match=r"does not exist.*create=True"):
        SQLiteSink(tmp_path / "empty.db", "missing", create=False)
    with pytest.raises(SinkError, match="has no writable column 'colour'"):
        SQLiteSink(sqlite_path, "items", columns=["id", "colour"])
    with pytest.raises(SinkError, match="cannot open SQLite database"):
        SQLiteSink(tmp_path / "no" / "such" / "dir.db", "t")
    with pytest.raises(ValueError, match="upsert_keys \\['key'\\] are not among columns"):
        SQLiteSink(sqlite_path, "items", columns=["id"], upsert_keys=["key"])
    with pytest.raises(ValueError, match="synchronous must be one of"):
        SQLiteSink(sqlite_path, "items", synchronous="sometimes")
    with pytest.raises(TypeError, match="table must be a string"):
        SQLiteSink(sqlite_path, 3)  # type: ignore[arg-type]
    with (
        SQLiteSink(tmp_path / "new.db", "fresh") as sink,
        pytest.raises(SinkError, match="columns are unknown"),
    ):
        sink.write([(1, 2)])
    with pytest.raises(SinkError, match="is closed"):
        sink.write([{"a": 1}])


def test_sqlite_an_old_dead_letter_table_is_upgraded_in_place(sqlite_path: Path) -> None:
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute(
            "CREATE TABLE items_dead_letter (id INTEGER PRIMARY KEY, failed_at TEXT NOT NULL, "
            "error TEXT NOT NULL, row_json TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO items_dead_letter VALUES (1, 'then', 'old', '{}')")
    conn.close()
    rows = [good_row(1), (2, "bad", -1, None)]
    with SQLiteSink(sqlite_path, "items") as sink:
        write_batches(rows, sink, FixedBatcher(10), load_id="k", max_dead_letters=1)
    letters = sqlite_rows(
        sqlite_path, "SELECT error, load_key, position FROM items_dead_letter ORDER BY id"
    )
    assert letters[0] == ("old", None, None)
    assert letters[1][1:] == ("k", 1)


def test_a_foreign_dead_letter_table_is_refused_before_anything_is_written(
    sqlite_path: Path,
) -> None:
    with sqlite3.connect(sqlite_path) as conn:
        conn.execute("CREATE TABLE items_dead_letter (sku TEXT, reason TEXT)")
    conn.close()
    with (
        SQLiteSink(sqlite_path, "items") as sink,
        pytest.raises(WriteAbortedError, match=r"lacks failed_at, error, row_json.*rename or drop"),
    ):
        write_batches([good_row(1)], sink, FixedBatcher(10))
    assert sqlite_rows(sqlite_path, "SELECT count(*) FROM items") == [(0,)]


def test_sqlite_busy_timeout_stops_a_load_on_a_locked_database(sqlite_path: Path) -> None:
    sink = SQLiteSink(sqlite_path, "items", busy_timeout=0.05)
    other = sqlite3.connect(sqlite_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with sink, pytest.raises(WriteAbortedError, match="database is locked"):
            write_batches([good_row(1)], sink, FixedBatcher(10))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert sqlite_rows(sqlite_path, "SELECT count(*) FROM items") == [(0,)]


def test_sqlite_a_vanished_table_aborts_without_dead_letters(sqlite_path: Path) -> None:
    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(2000):
            if i == 1000:
                with sqlite3.connect(sqlite_path) as other:
                    other.execute("DROP TABLE items")
                other.close()
            yield good_row(i)

    with (
        SQLiteSink(sqlite_path, "items") as sink,
        pytest.raises(WriteAbortedError, match="no such table") as info,
    ):
        write_batches(rows(), sink, FixedBatcher(100))
    assert isinstance(info.value, SinkError)
    assert info.value.report.rows_written == 1000
    assert info.value.report.rows_dead_lettered == 0
    tables = {name for (name,) in sqlite_rows(sqlite_path, "SELECT name FROM sqlite_master")}
    assert "items_dead_letter" not in tables


# -- PostgreSQL --------------------------------------------------------------------


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    import psycopg

    schema = f"pipeopt_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(POSTGRES_DDL.format(schema=schema))
    try:
        yield schema
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_rows(dsn: str, sql: str) -> list[Any]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("method", "upsert"), [("copy", False), ("executemany", False), ("copy", True)]
)
def test_postgres_isolates_seven_poison_rows_in_ten_thousand(
    postgres_dsn: str, pg_schema: str, method: Any, upsert: bool
) -> None:
    table = f"{pg_schema}.items"
    keys = ["id"] if upsert else None
    with PostgresSink(postgres_dsn, table, method=method, upsert_keys=keys) as sink:
        assert sink.method == method
        report = write_batches(poisoned_rows(), sink, AdaptiveBatcher(0.05, min_size=10))
    ids = [row[0] for row in pg_rows(postgres_dsn, f"SELECT id FROM {table}")]
    letters = pg_rows(postgres_dsn, f"SELECT error, row_json FROM {table}_dead_letter")
    check_poison_outcome(report, ids, letters)
    errors = " | ".join(error for error, _ in letters)
    for fragment in (
        "CheckViolation",
        "NotNullViolation",
        "InvalidTextRepresentation",
        "StringDataRightTruncation",
        "cannot adapt type 'dict'",
        "row has 3 values, expected 4",
    ):
        assert fragment in errors


@pytest.mark.postgres
def test_postgres_upsert_never_duplicates(postgres_dsn: str, pg_schema: str) -> None:
    table = f"{pg_schema}.items"
    first = [good_row(i) for i in range(400)]
    again = [(i, f"renamed {i}", 1, None) for i in range(200, 600)]
    with PostgresSink(postgres_dsn, table, upsert_keys=["id"]) as sink:
        assert sink.method == "copy"  # through the staging table
        write_batches(first, sink, FixedBatcher(64))
        write_batches(again, sink, FixedBatcher(100))
        write_batches(again, sink, FixedBatcher(37))  # the same rows, sent again
        # One batch that repeats a key: its last row wins, as with executemany.
        write_batches([(7, "first", 1, None), (7, "last", 2, None)], sink, FixedBatcher(10))
    with PostgresSink(postgres_dsn, table, upsert_keys=["id"], method="executemany") as sink:
        write_batches([(8, "by executemany", 1, None)], sink, FixedBatcher(10))
    rows = dict(pg_rows(postgres_dsn, f"SELECT id, name FROM {table}"))
    assert len(rows) == 600
    assert rows[199] == "item 199"
    assert rows[200] == "renamed 200"
    assert rows[599] == "renamed 599"
    assert (rows[7], rows[8]) == ("last", "by executemany")


@pytest.mark.postgres
def test_postgres_columns_and_mapping_rows(postgres_dsn: str, pg_schema: str) -> None:
    table = f"{pg_schema}.items"
    with PostgresSink(postgres_dsn, table) as sink:
        assert sink.columns == ("id", "name", "qty", "note")
    with PostgresSink(postgres_dsn, table, columns=["id", "name"]) as sink:
        sink.write([{"name": "m", "id": 1, "other": 0}])
    assert pg_rows(postgres_dsn, f"SELECT id, name, qty FROM {table}") == [(1, "m", None)]
    with pytest.raises(SinkError, match="does not exist; create it first"):
        PostgresSink(postgres_dsn, f"{pg_schema}.nothing")
    with pytest.raises(SinkError, match="no writable column 'colour'"):
        PostgresSink(postgres_dsn, table, columns=["id", "colour"])


@pytest.mark.postgres
def test_postgres_a_lost_connection_aborts_without_dead_letters(
    postgres_dsn: str, pg_schema: str
) -> None:
    import psycopg

    table = f"{pg_schema}.items"
    name = f"pipeopt-test-{uuid.uuid4().hex[:8]}"

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(3000):
            if i == 1000:  # the database goes away under the sink
                with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s",
                        [name],
                    )
            yield good_row(i)

    with (
        PostgresSink(postgres_dsn, table, application_name=name) as sink,
        pytest.raises(WriteAbortedError) as info,
    ):
        write_batches(rows(), sink, FixedBatcher(250))
    assert info.value.report.rows_written == 1000
    assert info.value.report.rows_dead_lettered == 0
    assert isinstance(info.value.__cause__, psycopg.OperationalError)
    assert pg_rows(postgres_dsn, f"SELECT count(*) FROM {table}") == [(1000,)]
    found = pg_rows(postgres_dsn, f"SELECT to_regclass('{table}_dead_letter')")
    assert found == [(None,)]


@pytest.mark.postgres
def test_postgres_lock_timeout_stops_a_load_on_a_locked_table(
    postgres_dsn: str, pg_schema: str
) -> None:
    import psycopg

    table = f"{pg_schema}.items"
    with psycopg.connect(postgres_dsn) as holder:
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")  # held until the end
        with (
            PostgresSink(postgres_dsn, table, lock_timeout=0.1, statement_timeout=5) as sink,
            pytest.raises(WriteAbortedError, match="lock timeout") as info,
        ):
            write_batches([good_row(1)], sink, FixedBatcher(10))
        assert isinstance(info.value.__cause__, psycopg.errors.LockNotAvailable)
        holder.rollback()
    assert pg_rows(postgres_dsn, f"SELECT count(*) FROM {table}") == [(0,)]
    with pytest.raises(ValueError, match="statement_timeout must be > 0"):
        PostgresSink(postgres_dsn, table, statement_timeout=0)


@pytest.mark.postgres
def test_postgres_an_old_dead_letter_table_is_upgraded_in_place(
    postgres_dsn: str, pg_schema: str
) -> None:
    import psycopg

    table = f"{pg_schema}.items"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table}_dead_letter (id bigint GENERATED ALWAYS AS IDENTITY "
            "PRIMARY KEY, failed_at timestamptz NOT NULL, error text NOT NULL, "
            "row_json jsonb NOT NULL)"
        )
        conn.execute(
            f"INSERT INTO {table}_dead_letter (failed_at, error, row_json) "
            "VALUES (now(), 'old', '{}')"
        )
    origin = LoadOrigin("run-9", "load", 1)
    with PostgresSink(postgres_dsn, table) as sink:
        rows = [good_row(1), (2, "bad", -1, None)]
        write_batches(rows, sink, FixedBatcher(10), load_id="k", origin=origin, max_dead_letters=1)
    letters = pg_rows(
        postgres_dsn,
        f"SELECT error, run_id, load_key, position, error_class FROM {table}_dead_letter "
        "ORDER BY id",
    )
    assert letters[0] == ("old", None, None, None, None)
    assert letters[1][1:] == ("run-9", "k", 1, "CheckViolation")


def test_missing_psycopg_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ImportError, match=r"pip install 'pipeopt\[postgres\]'"):
        PostgresSink("postgresql://nowhere", "t")


def test_postgres_unreachable_is_a_sink_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(SinkError, match="cannot connect to PostgreSQL"):
        PostgresSink("postgresql://postgres@127.0.0.1:9/none", "t", connect_timeout=2)


# -- write_batches' rules, on an in-memory sink ----------------------------------


class MemorySink:
    """A sink in a list with a ledger: refuses rows marked bad; can break like a lost connection."""

    def __init__(self, *, broken_after: int | None = None, blame_rows: bool = False) -> None:
        self.rows: list[Row] = []
        self.dead: list[DeadLetter] = []
        self.ledger: dict[str, int] = {}
        self.broken_after = broken_after
        self.blame_rows = blame_rows  # call every error a row error (a sink that misjudges)
        self.writes = 0
        self.before_write: list[Any] = []  # callables run before each write (a second writer)

    @property
    def columns(self) -> tuple[str, ...] | None:
        return None

    def begin_load(self, key: str | None, origin: LoadOrigin) -> LoadProgress:
        if key is None:
            return LoadProgress("")
        return LoadProgress(key, self.ledger.setdefault(key, 0))

    def write(self, rows: Sequence[Row], step: LoadStep | None = None) -> None:
        for hook in self.before_write:
            hook(self)
        if rows:
            self.writes += 1
        if self.broken_after is not None and len(self.rows) >= self.broken_after:
            raise ConnectionError("server closed the connection")
        for row in rows:
            if isinstance(row, dict) and row.get("bad"):
                raise ValueError(f"row {row['id']} is bad")
        if step is not None and step.key is not None:
            if self.ledger[step.key] != step.before:
                from pipeopt.errors import LoadConflictError

                raise LoadConflictError(step.key, step.before, self.ledger[step.key])
            self.ledger[step.key] = step.after
        self.rows.extend(rows)
        if step is not None:
            self.dead.extend(step.dead_letters)

    def is_row_error(self, exc: Exception) -> bool:
        return self.blame_rows or isinstance(exc, ValueError)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingBatcher:
    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: list[int | None] = []
        self.recorded: list[tuple[int, float]] = []

    def plan(self, pending: int | None = None) -> int:
        self.pending.append(pending)
        return self.size if pending is None else min(self.size, pending)

    def record(self, size: int, latency: float) -> None:
        self.recorded.append((size, latency))

    def statistics(self) -> BatcherStatistics:
        raise NotImplementedError


def test_memory_sink_and_recording_batcher_fit_the_protocols() -> None:
    assert isinstance(MemorySink(), Sink)


def test_every_good_row_is_written_once() -> None:
    rows = [{"id": i, "bad": i % 37 == 5} for i in range(1000)]
    sink = MemorySink()
    report = write_batches(rows, sink, FixedBatcher(128))
    good = [r["id"] for r in rows if not r["bad"]]
    assert sorted(r["id"] for r in sink.rows) == good  # type: ignore[call-overload]
    assert sorted(letter.row["id"] for letter in sink.dead) == [  # type: ignore[call-overload]
        r["id"] for r in rows if r["bad"]
    ]
    assert all(letter.error.startswith("ValueError: row ") for letter in sink.dead)
    assert report.batches == 8
    assert (report.min_batch_size, report.max_batch_size) == (104, 128)
    assert report.mean_batch_size == 125.0
    assert report.failed_writes > 0
    assert report.writes > report.batches


def test_pending_is_told_and_successful_writes_are_recorded() -> None:
    ticks = iter(float(i) for i in range(10_000))
    batcher = RecordingBatcher(40)
    rows = [{"id": i, "bad": i == 50} for i in range(100)]
    seen: list[tuple[int, float]] = []
    report = write_batches(
        rows,
        MemorySink(),
        batcher,
        clock=lambda: next(ticks),
        on_batch=lambda size, latency: seen.append((size, latency)),
    )
    assert batcher.pending == [100, 60, 20, 0]
    assert seen == batcher.recorded
    assert all(latency == 1.0 for _, latency in seen)  # one tick per write
    assert sum(size for size, _ in seen) == 99 == report.rows_written
    assert report.seconds > 0


def test_rows_are_pulled_one_batch_at_a_time() -> None:
    pulled: list[int] = []
    sink = MemorySink()

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(250):
            pulled.append(i)
            if i == 120:
                assert len(sink.rows) >= 100  # the first batch went out before
                raise RuntimeError("source failed")
            yield {"id": i}

    with pytest.raises(RuntimeError, match="source failed"):
        write_batches(rows(), sink, FixedBatcher(50))
    assert len(sink.rows) == 100
    assert len(pulled) == 121


def test_an_operational_error_aborts_at_once() -> None:
    sink = MemorySink(broken_after=300)
    with pytest.raises(WriteAbortedError, match="server closed the connection") as info:
        write_batches([{"id": i} for i in range(1000)], sink, FixedBatcher(100))
    assert info.value.report.rows_written == 300
    assert sink.dead == []
    assert sink.writes == 4  # no splitting


def test_a_sink_that_refuses_everything_gives_up_after_bounded_levels() -> None:
    sink = MemorySink(broken_after=0, blame_rows=True)
    with pytest.raises(WriteAbortedError, match="failed through 3 levels") as info:
        write_batches(
            [{"id": i} for i in range(1000)], sink, FixedBatcher(1000), max_failed_levels=3
        )
    assert sink.dead == []
    assert sink.writes == 1 + 2 + 4 + 8
    assert info.value.report.rows_dead_lettered == 0


def test_a_small_all_bad_batch_is_dead_lettered_row_by_row() -> None:
    sink = MemorySink()
    rows = [{"id": i, "bad": True} for i in range(5)]
    report = write_batches(rows, sink, FixedBatcher(5), max_dead_letters=None)
    assert report.rows_dead_lettered == 5
    assert [letter.position for letter in sink.dead] == [0, 1, 2, 3, 4]
    assert sink.rows == []
    with pytest.raises(DeadLetterBudgetError, match=r"5 of 5 input rows \(100.0%\) were refused"):
        write_batches(rows, MemorySink(), FixedBatcher(5))  # the default fails such a load


def test_the_dead_letter_budget_as_a_count_and_a_fraction() -> None:
    rows = [{"id": i, "bad": i % 100 == 7} for i in range(1000)]  # 10 bad rows
    write_batches(rows, MemorySink(), FixedBatcher(100), max_dead_letters=10)
    sink = MemorySink()
    with pytest.raises(DeadLetterBudgetError, match="over max_dead_letters=9") as info:
        write_batches(rows, sink, FixedBatcher(100), max_dead_letters=9)
    assert (info.value.dead_letters, info.value.rows_seen) == (10, 908)
    assert len(sink.dead) == 9  # the tenth was not committed
    with pytest.raises(DeadLetterBudgetError, match=r"over max_dead_letters=0\.005"):
        write_batches(rows, MemorySink(), FixedBatcher(100), max_dead_letters=0.005)
    write_batches(rows, MemorySink(), FixedBatcher(100), max_dead_letters=0.02)
    for bad in (-1, 1.5, "10", True):
        with pytest.raises((TypeError, ValueError), match="max_dead_letters"):
            write_batches(rows, MemorySink(), FixedBatcher(100), max_dead_letters=bad)  # type: ignore[arg-type]


def test_dead_letters_commit_with_the_next_rows_and_the_ledger_stays_a_prefix() -> None:
    sink = MemorySink()
    rows = [{"id": i, "bad": i in (3, 4, 9)} for i in range(10)]
    write_batches(rows, sink, FixedBatcher(10), load_id="k", max_dead_letters=None)
    assert [r["id"] for r in sink.rows] == [0, 1, 2, 5, 6, 7, 8]  # type: ignore[call-overload]
    assert [letter.position for letter in sink.dead] == [3, 4, 9]
    assert sink.ledger == {"k": 10}


def test_cancellation_is_checked_before_every_batch_and_every_part() -> None:
    sink = MemorySink()

    def cancelled() -> bool:
        return len(sink.rows) >= 250

    rows = [{"id": i, "bad": i == 260} for i in range(1000)]
    with pytest.raises(WriteCancelledError, match="cancelled after 250 rows written") as info:
        write_batches(rows, sink, FixedBatcher(50), load_id="c", cancelled=cancelled)
    assert len(sink.rows) == 250
    assert info.value.report.rows_written == 250
    assert sink.ledger == {"c": 250}
    # Cancelled in the middle of splitting a refused batch: no part is written after it.
    sink = MemorySink()
    parts: list[int] = []
    sink.before_write.append(lambda s: parts.append(len(s.rows)))

    def mid_split() -> bool:
        return len(parts) >= 3

    with pytest.raises(WriteCancelledError):
        write_batches(rows[250:], sink, FixedBatcher(50), cancelled=mid_split)
    assert len(parts) == 3


def test_a_retry_goes_on_after_the_last_committed_batch() -> None:
    sink = MemorySink()

    def failing() -> Iterator[dict[str, Any]]:
        for i in range(1000):
            if i == 640:
                raise RuntimeError("source failed")
            yield {"id": i}

    with pytest.raises(RuntimeError):
        write_batches(failing(), sink, FixedBatcher(100), load_id="r")
    assert sink.ledger == {"r": 600}
    report = write_batches(({"id": i} for i in range(1000)), sink, FixedBatcher(100), load_id="r")
    assert (report.rows_skipped, report.rows_written) == (600, 400)
    assert sorted(r["id"] for r in sink.rows) == list(range(1000))  # type: ignore[call-overload]


def test_a_second_writer_that_moved_the_ledger_is_not_written_over() -> None:
    sink = MemorySink()
    done: list[bool] = []

    def other_writer(s: MemorySink) -> None:
        # Another attempt of the same load commits rows 200..349 before our third batch.
        if s.ledger.get("x") == 200 and not done:
            s.rows.extend({"id": i} for i in range(200, 350))
            s.ledger["x"] = 350
            done.append(True)

    sink.before_write.append(other_writer)
    report = write_batches(({"id": i} for i in range(1000)), sink, FixedBatcher(100), load_id="x")
    assert sorted(r["id"] for r in sink.rows) == list(range(1000))  # type: ignore[call-overload]
    assert report.rows_skipped == 150
    assert report.rows_written == 850


def test_failing_dead_letters_abort() -> None:
    class NoDeadLetters(MemorySink):
        def write(self, rows: Sequence[Row], step: LoadStep | None = None) -> None:
            if step is not None and step.dead_letters:
                raise SinkError("cannot write 1 dead letters: disk full")
            super().write(rows, step)

    with pytest.raises(WriteAbortedError, match="cannot write 1 dead letters: disk full"):
        write_batches([{"id": 1}, {"id": 2, "bad": True}], NoDeadLetters(), FixedBatcher(10))


def test_empty_input_writes_nothing() -> None:
    sink = MemorySink()
    report = write_batches([], sink, FixedBatcher(10))
    assert (report.rows_written, report.batches, sink.writes) == (0, 0, 0)
    assert report.median_batch_size == 0.0
    with pytest.raises(ValueError, match="max_failed_levels must be an integer >= 1, got 0"):
        write_batches([], sink, FixedBatcher(10), max_failed_levels=0)


def test_a_context_keys_each_load_by_lineage_task_table_and_ordinal(tmp_path: Path) -> None:
    from pipeopt.context import ExecutionContext

    context = ExecutionContext("load", attempt=2, run_id="run-2", lineage_id="run-1")
    assert ExecutionContext("t", run_id="solo").lineage_id == "solo"
    path = tmp_path / "keys.db"
    with SQLiteSink(path, "t", columns=["id"]) as sink:
        assert context.load_key(sink) == "run-1/load/t#1"
        context.write_batches([(1,), (2,)], sink)
        context.write_batches([(3,)], sink)
        assert context.load_key(sink) == "run-1/load/t#3"
        context.write_batches([(4,)], sink, load_id="explicit")
    keys = sqlite_rows(
        path, "SELECT load_key, rows_consumed, run_id, attempt FROM pipeopt_load_progress"
    )
    assert sorted(keys) == [
        ("explicit", 1, "run-2", 2),
        ("run-1/load/t#1", 2, "run-2", 2),
        ("run-1/load/t#2", 1, "run-2", 2),
    ]
    assert context._custom["rows_written"] == 4


def test_a_task_counts_what_a_load_committed_before_its_input_failed(tmp_path: Path) -> None:
    from pipeopt import Pipeline, PipelineOptimizer, RetryPolicy
    from pipeopt.context import TaskContext

    def extract(attempt: int) -> Iterator[tuple[int]]:
        for i in range(5_000):
            if attempt == 1 and i == 2_500:
                raise ConnectionError("the source went away")
            yield (i,)

    p = Pipeline("counts")

    @p.task(retry_policy=RetryPolicy(max_attempts=2, base_delay=0))
    def load(context: TaskContext) -> int:
        with SQLiteSink(tmp_path / "t.db", "t", columns=["id"], create=True) as sink:
            return context.write_batches(extract(context.attempt), sink).rows_written

    result = PipelineOptimizer(batch_latency_slo=None, batch_size=1_000).run(p)
    assert result.results["load"] == 3_000
    metrics = result.tasks["load"].custom_metrics
    # 2,000 committed by the attempt whose input failed, 3,000 by the retry.
    assert (metrics["rows_written"], metrics["rows_skipped"]) == (5_000, 2_000)
    assert sqlite_rows(tmp_path / "t.db", "SELECT count(DISTINCT id), count(*) FROM t") == [
        (5_000, 5_000)
    ]


def test_sinks_opening_a_new_database_at_once_all_get_it(tmp_path: Path) -> None:
    import threading

    # Switching a new file to WAL while others open it fails at once unless retried.
    for k in range(60):
        path = tmp_path / f"new{k}.db"
        start = threading.Barrier(3)
        errors: list[BaseException] = []

        def open_sink(
            table: str,
            path: Path = path,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                with SQLiteSink(path, table, columns=["id"], create=True) as sink:
                    sink.write([(1,)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_sink, args=(f"t{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert [sqlite_rows(path, f"SELECT count(*) FROM t{i}") for i in range(3)] == [[(1,)]] * 3
