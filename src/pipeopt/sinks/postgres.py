"""`PostgresSink`: rows into a PostgreSQL table with psycopg 3, one transaction per batch."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pipeopt._validate import check_float
from pipeopt.errors import SinkError
from pipeopt.sinks.base import DeadLetter, Row, TableSink

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

__all__ = ["PostgresSink"]

_METHODS = ("copy", "executemany")

_writing = threading.local()
_filter_lock = threading.Lock()
_filter_installed = False


class _RefusedBatchNoise(logging.Filter):
    """Drop psycopg's "error ignored terminating <Pipeline>" while this module writes.

    When the server refuses a row of an executemany, psycopg raises that
    error and then logs a warning that closing the aborted pipeline failed
    too. For a sink that splits refused batches on purpose that is noise, one
    line per split; the error itself still propagates.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = str(record.msg).startswith("error ignored terminating")
        return not (noisy and getattr(_writing, "active", False))


def _install_filter() -> None:
    global _filter_installed
    with _filter_lock:
        if not _filter_installed:
            logging.getLogger("psycopg").addFilter(_RefusedBatchNoise())
            _filter_installed = True


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ImportError("PostgresSink needs psycopg 3: pip install 'pipeopt[postgres]'") from exc
    return psycopg


class PostgresSink(TableSink):
    """Write rows into a PostgreSQL table; each :meth:`write` is one transaction.

    Appends stream the batch with ``COPY ... FROM STDIN`` (``method="copy"``,
    the default) or send parameterised ``INSERT`` statements in a pipeline
    (``method="executemany"``). With ``upsert_keys`` each row is an
    ``INSERT ... ON CONFLICT (keys) DO UPDATE``, which COPY cannot express,
    so upserts always use executemany; sending a batch again never
    duplicates rows. The conflict target needs a primary key or unique index
    on exactly those columns.

    The table must exist (its types are the schema's business); the
    dead-letter table is created on the first refused row, with a ``jsonb``
    column for the row.

    Args:
        dsn: a libpq connection string or URI.
        table: the table, optionally ``schema.table``.
        columns: the columns to write, in the order of sequence rows; by
            default every column of the table that accepts values (not
            generated, not ``GENERATED ALWAYS AS IDENTITY``).
        upsert_keys: the conflict target of upserts; appends when ``None``.
        method: ``"copy"`` or ``"executemany"``; by default COPY for appends
            and executemany for upserts.
        dead_letter_table: where refused rows go; ``<table>_dead_letter`` by default.
        connect_timeout: seconds to wait for the connection.
        application_name: how the connection shows in ``pg_stat_activity``.

    Raises:
        ImportError: psycopg is not installed.
        TypeError, ValueError: an argument is malformed, e.g. ``method="copy"``
            with ``upsert_keys``.
        SinkError: the server cannot be reached, the table does not exist,
            or ``columns`` names a column it lacks.
    """

    def __init__(
        self,
        dsn: str,
        table: str,
        columns: Sequence[str] | None = None,
        *,
        upsert_keys: Sequence[str] | None = None,
        method: Literal["copy", "executemany"] | None = None,
        dead_letter_table: str | None = None,
        connect_timeout: float = 10.0,
        application_name: str = "pipeopt",
    ) -> None:
        super().__init__(table, columns, upsert_keys, dead_letter_table)
        if method is None:
            method = "executemany" if self.upsert_keys else "copy"
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        if method == "copy" and self.upsert_keys is not None:
            raise ValueError("COPY cannot upsert; use method='executemany' with upsert_keys")
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a connection string, got {type(dsn).__name__}")
        connect_timeout = check_float(
            "connect_timeout", connect_timeout, minimum=0.0, strict_minimum=True
        )
        self.method: Literal["copy", "executemany"] = method
        psycopg_module = _import_psycopg()
        self._psycopg = psycopg_module
        self._sql = psycopg_module.sql
        self._dead_letters_ready = False
        _install_filter()
        try:
            self._conn: psycopg.Connection[Any] = psycopg_module.connect(
                dsn,
                autocommit=True,
                connect_timeout=max(1, math.ceil(connect_timeout)),
                application_name=application_name,
            )
        except psycopg_module.Error as exc:
            raise SinkError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            existing = self._table_columns()
        except psycopg_module.Error as exc:
            self._conn.close()
            raise SinkError(f"cannot read the columns of {self.table!r}: {exc}") from exc
        if existing is None:
            self._conn.close()
            raise SinkError(f"table {self.table!r} does not exist; create it first")
        self._statement = self._build_statement(self._adopt_columns(existing))

    def __repr__(self) -> str:
        return f"PostgresSink({self.table!r}, method={self.method!r})"

    def _identifier(self, name: str) -> sql.Identifier:
        return self._sql.Identifier(*name.split("."))  # type: ignore[no-any-return]

    def _table_columns(self) -> tuple[str, ...] | None:
        regclass = self._identifier(self.table).as_string(self._conn)
        found = self._conn.execute("SELECT to_regclass(%s)::oid", [regclass]).fetchone()
        if found is None or found[0] is None:
            return None
        rows = self._conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped AND attgenerated = '' AND attidentity <> 'a' "
            "ORDER BY attnum",
            [found[0]],
        ).fetchall()
        return tuple(row[0] for row in rows)

    def _build_statement(self, columns: tuple[str, ...]) -> sql.Composed:
        sql_ = self._sql
        table = self._identifier(self.table)
        names = sql_.SQL(", ").join(sql_.Identifier(c) for c in columns)
        if self.method == "copy":
            return sql_.SQL("COPY {} ({}) FROM STDIN").format(table, names)  # type: ignore[no-any-return]
        statement = sql_.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            table, names, sql_.SQL(", ").join(sql_.Placeholder() for _ in columns)
        )
        if self.upsert_keys is not None:
            keys = sql_.SQL(", ").join(sql_.Identifier(k) for k in self.upsert_keys)
            updates = [
                sql_.SQL("{} = EXCLUDED.{}").format(sql_.Identifier(c), sql_.Identifier(c))
                for c in columns
                if c not in self.upsert_keys
            ]
            action = (
                sql_.SQL("DO UPDATE SET ") + sql_.SQL(", ").join(updates)
                if updates
                else sql_.SQL("DO NOTHING")
            )
            statement = statement + sql_.SQL(" ON CONFLICT ({}) ").format(keys) + action
        return statement  # type: ignore[no-any-return]

    def write(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` in one transaction: all of them, or none if it raises.

        Args:
            rows: mappings by column name, or sequences in column order.

        Raises:
            SinkError: the sink is closed.
            ValueError, TypeError: a row has the wrong shape.
            psycopg.Error: the server refused the batch (see :meth:`is_row_error`).
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not rows:
            return
        assert self._columns is not None
        values = self._values(rows, self._columns)
        if self.method == "copy":
            with (
                self._conn.transaction(),
                self._conn.cursor() as cursor,
                cursor.copy(self._statement) as copy,
            ):
                for row in values:
                    copy.write_row(row)
        else:
            _writing.active = True
            try:
                with self._conn.transaction(), self._conn.cursor() as cursor:
                    cursor.executemany(self._statement, values)
            finally:
                _writing.active = False

    def is_row_error(self, exc: Exception) -> bool:
        """Return whether ``exc`` is caused by the rows rather than the server.

        Row errors: SQLSTATE classes 22 (data exception: a bad value, out of
        range, malformed text) and 23 (integrity constraint violation), a
        value psycopg cannot adapt, and rows of the wrong shape. Everything
        else (a lost connection, a missing table or column, a timeout, a
        full disk) is the sink's.
        """
        psycopg_module = self._psycopg
        if isinstance(exc, psycopg_module.DataError | psycopg_module.IntegrityError):
            return True
        if isinstance(exc, psycopg_module.ProgrammingError):
            # No SQLSTATE: raised by psycopg itself, e.g. "cannot adapt type 'dict'".
            return exc.sqlstate is None and not self._conn.closed
        if isinstance(exc, psycopg_module.Error):
            return False
        return isinstance(exc, ValueError | TypeError | OverflowError)

    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Append refused rows to the dead-letter table (created if missing), in one transaction.

        Each gets the time, the error text and the row as ``jsonb``.

        Raises:
            SinkError: the sink is closed.
            psycopg.Error: the server refused the write.
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not letters:
            return
        sql_ = self._sql
        table = self._identifier(self.dead_letter_table)
        with self._conn.transaction(), self._conn.cursor() as cursor:
            if not self._dead_letters_ready:
                cursor.execute(
                    sql_.SQL(
                        "CREATE TABLE IF NOT EXISTS {} ("
                        "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                        "failed_at timestamptz NOT NULL, error text NOT NULL, "
                        "row_json jsonb NOT NULL)"
                    ).format(table)
                )
            cursor.executemany(
                sql_.SQL(
                    "INSERT INTO {} (failed_at, error, row_json) VALUES (%s, %s, %s::jsonb)"
                ).format(table),
                self._dead_letter_rows(letters),
            )
        self._dead_letters_ready = True

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._conn.close()
