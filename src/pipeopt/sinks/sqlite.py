"""`SQLiteSink`: rows into a table of an SQLite file, one transaction per batch."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from pipeopt._validate import check_float
from pipeopt.errors import SinkError
from pipeopt.sinks.base import DeadLetter, Row, TableSink

__all__ = ["SQLiteSink"]

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _quote(name: str) -> str:
    """Return ``name`` (``table`` or ``schema.table``) as quoted SQLite identifiers."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


class SQLiteSink(TableSink):
    """Write rows into an SQLite table; each :meth:`write` is one transaction.

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
        timeout: seconds to wait for another writer's lock.

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
        timeout: float = 30.0,
    ) -> None:
        super().__init__(table, columns, upsert_keys, dead_letter_table)
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {synchronous!r}"
            )
        timeout = check_float("timeout", timeout, minimum=0.0)
        self.path = os.fspath(path)
        self.create = bool(create)
        self._insert_sql: str | None = None
        self._dead_letters_ready = False
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SinkError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            existing = self._table_columns(self.table)
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

    def _in_transaction(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany(sql, params)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                # The original error says more than a failed rollback would.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
            raise

    def write(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` in one transaction: all of them, or none if it raises.

        Args:
            rows: mappings by column name, or sequences in column order.

        Raises:
            SinkError: the sink is closed, or the columns are unknown (tuple
                rows for a table that does not exist yet).
            ValueError, TypeError: a row has the wrong shape.
            sqlite3.Error: the database refused the batch (see :meth:`is_row_error`).
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not rows:
            return
        if self._columns is None:
            first = rows[0]
            if not isinstance(first, Mapping):
                raise SinkError(
                    f"table {self.table!r} does not exist and its columns are unknown; "
                    "pass columns= or write mappings"
                )
            self._columns = tuple(str(k) for k in first)
            self._create_table(self._columns)
        columns = self._columns
        self._in_transaction(self._insert(columns), self._values(rows, columns))

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

    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Append refused rows to the dead-letter table (created if missing), in one transaction.

        Each gets the time (UTC, ISO 8601), the error text and the row as JSON.

        Raises:
            SinkError: the sink is closed.
            sqlite3.Error: the database refused the write.
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not letters:
            return
        table = _quote(self.dead_letter_table)
        if not self._dead_letters_ready:
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                "id INTEGER PRIMARY KEY, failed_at TEXT NOT NULL, "
                "error TEXT NOT NULL, row_json TEXT NOT NULL)"
            )
            self._dead_letters_ready = True
        self._in_transaction(
            f"INSERT INTO {table} (failed_at, error, row_json) VALUES (?, ?, ?)",
            self._dead_letter_rows(letters),
        )

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._conn.close()
