"""`SQLiteSink`: rows into a table of an SQLite file, one transaction per batch."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pipeopt._validate import check_float
from pipeopt.errors import SinkError
from pipeopt.sinks.base import (
    DEAD_LETTER_COLUMNS,
    LEDGER_TABLE,
    LoadOrigin,
    LoadProgress,
    LoadStep,
    Row,
    TableSink,
)

_T = TypeVar("_T")

__all__ = ["SQLiteSink"]

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _quote(name: str) -> str:
    """Return ``name`` (``table`` or ``schema.table``) as quoted SQLite identifiers."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


class SQLiteSink(TableSink):
    """Write rows into an SQLite table; each :meth:`write` is one transaction.

    The load ledger and the dead letters are tables of the same database
    file (of the same attached schema for ``schema.table``), written in the
    batch's transaction.

    The database runs in WAL mode, so readers are not blocked while a batch
    is written. Appends use ``INSERT``; with ``upsert_keys`` a row whose keys
    exist updates it instead (``INSERT ... ON CONFLICT (keys) DO UPDATE``),
    so sending a batch again never duplicates rows. That needs a primary key
    or unique index on exactly those columns; a table this sink creates gets
    one.

    Args:
        path: the database file (created if missing).
        table: the table, optionally ``schema.table`` for an attached database.
        columns: the columns to write, in the order of sequence rows. By
            default those of the existing table, or, for a table still to be
            created, the keys of the first mapping row.
        upsert_keys: the conflict target of upserts; appends when ``None``.
        create: create ``table`` (untyped columns) if it does not exist.
        dead_letter_table: where refused rows go; ``<table>_dead_letter`` by
            default, created on the first refused row.
        synchronous: SQLite's ``PRAGMA synchronous``. ``NORMAL`` (default)
            is safe against a crash of the process in WAL mode and may lose
            the last commits on power loss; ``FULL`` syncs every commit.
        busy_timeout: seconds to wait for another connection's write lock
            before the write fails with "database is locked" (the load then
            stops; nothing of the batch is written).

    Raises:
        TypeError, ValueError: an argument is malformed.
        SinkError: the database cannot be opened, the table is missing and
            ``create`` is false, or ``columns`` names a column it lacks.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        table: str,
        columns: Sequence[str] | None = None,
        *,
        upsert_keys: Sequence[str] | None = None,
        create: bool = True,
        dead_letter_table: str | None = None,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
    ) -> None:
        super().__init__(table, columns, upsert_keys, dead_letter_table)
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        busy_timeout = check_float("busy_timeout", busy_timeout, minimum=0.0)
        self.path = os.fspath(path)
        self.create = bool(create)
        self._insert_sql: str | None = None
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            existing = _while_locked(busy_timeout, lambda: self._prepare(synchronous))
        except sqlite3.Error as exc:
            self._conn.close()
            raise SinkError(f"cannot use SQLite database {self.path!r}: {exc}") from exc
        if existing is None:
            if not self.create:
                self._conn.close()
                raise SinkError(
                    f"table {self.table!r} does not exist in {self.path!r}; "
                    "create it or pass create=True"
                )
            if self._columns is not None:
                self._create_table(self._columns)
        else:
            self._adopt_columns(existing)

    def __repr__(self) -> str:
        return f"SQLiteSink({self.path!r}, {self.table!r})"

    def _prepare(self, synchronous: str) -> tuple[str, ...] | None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        return self._table_columns(self.table)

    def _table_columns(self, name: str) -> tuple[str, ...] | None:
        schema, _, table = name.rpartition(".")
        pragma = f"PRAGMA {_quote(schema)}.table_info" if schema else "PRAGMA table_info"
        rows = self._conn.execute(f"{pragma}({_quote(table)})").fetchall()
        return tuple(row[1] for row in rows) or None

    def _create_table(self, columns: tuple[str, ...]) -> None:
        if self.upsert_keys is not None:
            missing = [k for k in self.upsert_keys if k not in columns]
            if missing:
                raise SinkError(f"upsert_keys {missing} are not among the columns {list(columns)}")
        parts = [_quote(c) for c in columns]
        if self.upsert_keys is not None:
            parts.append(f"UNIQUE ({', '.join(_quote(k) for k in self.upsert_keys)})")
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {_quote(self.table)} ({', '.join(parts)})")

    def _insert(self, columns: tuple[str, ...]) -> str:
        if self._insert_sql is None:
            names = ", ".join(_quote(c) for c in columns)
            marks = ", ".join("?" * len(columns))
            sql = f"INSERT INTO {_quote(self.table)} ({names}) VALUES ({marks})"
            if self.upsert_keys is not None:
                keys = ", ".join(_quote(k) for k in self.upsert_keys)
                updates = [
                    f"{_quote(c)} = excluded.{_quote(c)}"
                    for c in columns
                    if c not in self.upsert_keys
                ]
                action = f"DO UPDATE SET {', '.join(updates)}" if updates else "DO NOTHING"
                sql += f" ON CONFLICT ({keys}) {action}"
            self._insert_sql = sql
        return self._insert_sql

    def _schema_prefix(self) -> str:
        schema, _, _ = self.table.rpartition(".")
        return f"{schema}." if schema else ""

    def _existing_columns(self, name: str) -> tuple[str, ...] | None:
        return self._table_columns(name)

    def _add_dead_letter_column(self, name: str, sqlite_type: str, postgres_type: str) -> None:
        self._conn.execute(
            f"ALTER TABLE {_quote(self.dead_letter_table)} ADD COLUMN {_quote(name)} {sqlite_type}"
        )

    def _open_ledger(self, key: str, origin: LoadOrigin) -> LoadProgress:
        ledger = _quote(self._schema_prefix() + LEDGER_TABLE)
        now = dt.datetime.now(dt.UTC).isoformat()
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ledger} ("
            "load_key TEXT NOT NULL, target TEXT NOT NULL, "
            "rows_consumed INTEGER NOT NULL DEFAULT 0, rows_written INTEGER NOT NULL DEFAULT 0, "
            "rows_dead_lettered INTEGER NOT NULL DEFAULT 0, batches INTEGER NOT NULL DEFAULT 0, "
            "run_id TEXT, task TEXT, attempt INTEGER, started_at TEXT NOT NULL, "
            "updated_at TEXT NOT NULL, PRIMARY KEY (load_key, target))"
        )
        self._conn.execute(
            f"INSERT INTO {ledger} (load_key, target, run_id, task, attempt, started_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (key, self.table, origin.run_id, origin.task, origin.attempt, now, now),
        )
        row = self._conn.execute(
            f"SELECT rows_consumed, rows_written, rows_dead_lettered, batches FROM {ledger} "
            "WHERE load_key = ? AND target = ?",
            (key, self.table),
        ).fetchone()
        return LoadProgress(key, *row)

    def write(self, rows: Sequence[Row], step: LoadStep | None = None) -> None:
        """Write ``rows`` and ``step`` in one transaction: all of it, or none if it raises.

        Args:
            rows: mappings by column name, or sequences in column order.
            step: dead letters to store and the ledger move to commit with the rows.

        Raises:
            SinkError: the sink is closed, the columns are unknown (tuple
                rows for a table that does not exist yet), or the dead
                letters cannot be written.
            LoadConflictError: the ledger does not show ``step.before``.
            ValueError, TypeError: a row has the wrong shape.
            sqlite3.Error: the database refused the batch (see :meth:`is_row_error`).
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not rows and (step is None or (step.key is None and not step.dead_letters)):
            return
        values: list[tuple[Any, ...]] = []
        if rows:
            if self._columns is None:
                first = rows[0]
                if not isinstance(first, Mapping):
                    raise SinkError(
                        f"table {self.table!r} does not exist and its columns are unknown; "
                        "pass columns= or write mappings"
                    )
                self._columns = tuple(str(k) for k in first)
                self._create_table(self._columns)
            values = self._values(rows, self._columns)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if step is not None and step.key is not None:
                self._move_ledger(step, len(values))
            if values:
                assert self._columns is not None
                conn.executemany(self._insert(self._columns), values)
            if step is not None and step.dead_letters:
                self._insert_dead_letters(step)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # The original error says more than a failed rollback would.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        if step is not None and step.dead_letters:
            self._dead_letters_ready = True

    def _move_ledger(self, step: LoadStep, written: int) -> None:
        origin = step.origin
        ledger = _quote(self._schema_prefix() + LEDGER_TABLE)
        moved = self._conn.execute(
            f"UPDATE {ledger} SET rows_consumed = ?, rows_written = rows_written + ?, "
            "rows_dead_lettered = rows_dead_lettered + ?, batches = batches + 1, "
            "run_id = ?, task = ?, attempt = ?, updated_at = ? "
            "WHERE load_key = ? AND target = ? AND rows_consumed = ?",
            (
                step.after,
                written,
                len(step.dead_letters),
                origin.run_id,
                origin.task,
                origin.attempt,
                dt.datetime.now(dt.UTC).isoformat(),
                step.key,
                self.table,
                step.before,
            ),
        )
        if moved.rowcount != 1:
            found = self._conn.execute(
                f"SELECT rows_consumed FROM {ledger} WHERE load_key = ? AND target = ?",
                (step.key, self.table),
            ).fetchone()
            raise self._conflict(step, None if found is None else int(found[0]))

    def _insert_dead_letters(self, step: LoadStep) -> None:
        table = _quote(self.dead_letter_table)
        names = [name for name, _, _ in DEAD_LETTER_COLUMNS]
        try:
            if not self._dead_letters_ready:
                kinds = ", ".join(f"{_quote(c)} {k}" for c, k, _ in DEAD_LETTER_COLUMNS)
                self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, {kinds})"
                )
            self._conn.executemany(
                f"INSERT INTO {table} ({', '.join(map(_quote, names))}) "
                f"VALUES ({', '.join('?' * len(names))})",
                self._dead_letter_rows(step),
            )
        except sqlite3.Error as exc:
            raise SinkError(
                f"cannot write {len(step.dead_letters)} dead letters to "
                f"{self.dead_letter_table!r}: {exc}"
            ) from exc

    def is_row_error(self, exc: Exception) -> bool:
        """Return whether ``exc`` is caused by the rows rather than the database.

        Row errors: constraint and type violations (``IntegrityError``,
        ``DataError``), values sqlite3 cannot bind, integers too large, and
        rows of the wrong shape. Everything else (``OperationalError`` such
        as a locked or missing database, a closed connection) is the sink's.
        """
        if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError):
            return True
        if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
            return "binding" in str(exc).lower()  # a value of a type sqlite3 cannot store
        if isinstance(exc, sqlite3.Error):
            return False
        return isinstance(exc, ValueError | TypeError | OverflowError)

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._conn.close()


def _while_locked(budget: float, step: Callable[[], _T]) -> _T:
    """Run ``step``, again while SQLite says the database is locked, for up to ``budget`` seconds.

    Switching a new database to WAL while other connections open it fails at
    once with "database is locked" (SQLite does not wait on a busy handler
    there); waiting a little and trying again is what the busy timeout
    promises for every other statement.
    """
    deadline = time.monotonic() + budget
    pause = 0.002
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
