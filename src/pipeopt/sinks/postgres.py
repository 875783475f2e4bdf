"""`PostgresSink`: rows into a PostgreSQL table with psycopg 3, one transaction per batch."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

__all__ = ["PostgresSink"]

_METHODS = ("copy", "executemany")

_STAGE = "pipeopt_stage"
_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE, without importing psycopg here
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
    (``method="executemany"``). Upserts (``upsert_keys``) with ``"copy"``
    COPY the batch into a temporary staging table and move it with one
    ``INSERT ... SELECT ... ON CONFLICT (keys) DO UPDATE`` in the same
    transaction (when a batch repeats a key, its last row wins); with
    ``"executemany"`` each row is its own ``INSERT ... ON CONFLICT``. Sending
    a batch again never duplicates rows. The conflict target needs a primary
    key or unique index on exactly those columns.

    The table must exist (its types are the schema's business). The load
    ledger and the dead-letter table (a ``jsonb`` column for the row) live
    in the table's schema and are written in the batch's transaction.

    Args:
        dsn: a libpq connection string or URI.
        table: the table, optionally ``schema.table``.
        columns: the columns to write, in the order of sequence rows; by
            default every column of the table that accepts values (not
            generated, not ``GENERATED ALWAYS AS IDENTITY``).
        upsert_keys: the conflict target of upserts; appends when ``None``.
        method: ``"copy"`` (default) or ``"executemany"``.
        dead_letter_table: where refused rows go; ``<table>_dead_letter`` by default.
        connect_timeout: seconds to wait for the connection.
        application_name: how the connection shows in ``pg_stat_activity``.
        statement_timeout: seconds one statement may run before the server
            cancels it (the load then stops; nothing of the batch is
            written); ``None`` keeps the server's setting.
        lock_timeout: seconds a statement may wait for a lock, e.g. on a
            table another session holds; ``None`` keeps the server's setting.

    Raises:
        ImportError: psycopg is not installed.
        TypeError, ValueError: an argument is malformed.
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
        statement_timeout: float | None = None,
        lock_timeout: float | None = None,
    ) -> None:
        super().__init__(table, columns, upsert_keys, dead_letter_table)
        if method is None:
            method = "copy"
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        settings: list[tuple[str, int]] = []
        for name, value in (
            ("statement_timeout", statement_timeout),
            ("lock_timeout", lock_timeout),
        ):
            if value is not None:
                seconds = check_float(name, value, minimum=0.0, strict_minimum=True)
                settings.append((name, max(1, round(seconds * 1000))))
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a connection string, got {type(dsn).__name__}")
        connect_timeout = check_float(
            "connect_timeout", connect_timeout, minimum=0.0, strict_minimum=True
        )
        self.method: Literal["copy", "executemany"] = method
        psycopg_module = _import_psycopg()
        self._psycopg = psycopg_module
        self._sql = psycopg_module.sql
        self._staged = False
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
            for name, millis in settings:
                # SET takes no parameters; the value is an int we formatted.
                self._conn.execute(f"SET {name} = {millis}")
            existing = self._table_columns()
        except psycopg_module.Error as exc:
            self._conn.close()
            raise SinkError(f"cannot read the columns of {self.table!r}: {exc}") from exc
        if existing is None:
            self._conn.close()
            raise SinkError(f"table {self.table!r} does not exist; create it first")
        self._statement = self._build_statement(self._adopt_columns(existing))
        self._schema = self.table.rpartition(".")[0]

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
        if self.method == "copy" and self.upsert_keys is None:
            return sql_.SQL("COPY {} ({}) FROM STDIN").format(table, names)  # type: ignore[no-any-return]
        if self.method == "copy":
            return sql_.SQL("COPY {} ({}) FROM STDIN").format(sql_.Identifier(_STAGE), names)  # type: ignore[no-any-return]
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

    def _conflict_action(self, columns: tuple[str, ...]) -> sql.Composable:
        sql_ = self._sql
        assert self.upsert_keys is not None
        updates = [
            sql_.SQL("{} = EXCLUDED.{}").format(sql_.Identifier(c), sql_.Identifier(c))
            for c in columns
            if c not in self.upsert_keys
        ]
        keys = sql_.SQL(", ").join(sql_.Identifier(k) for k in self.upsert_keys)
        action = (
            sql_.SQL("DO UPDATE SET ") + sql_.SQL(", ").join(updates)
            if updates
            else sql_.SQL("DO NOTHING")
        )
        return sql_.SQL("ON CONFLICT ({}) ").format(keys) + action  # type: ignore[no-any-return]

    def _stage(self, columns: tuple[str, ...]) -> sql.Composed:
        """Create the session's staging table once; return the statement that moves it."""
        sql_ = self._sql
        names = sql_.SQL(", ").join(sql_.Identifier(c) for c in columns)
        stage = sql_.Identifier(_STAGE)
        if not self._staged:
            # Same types as the target, no constraints: the INSERT below checks them.
            self._conn.execute(
                sql_.SQL(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS "
                    "SELECT {} FROM {} WITH NO DATA"
                ).format(stage, names, self._identifier(self.table))
            )
            self._staged = True
        return sql_.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ").format(  # type: ignore[no-any-return]
            self._identifier(self.table), names, names, stage
        ) + self._conflict_action(columns)

    def _last_per_key(self, values: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Return ``values`` with only the last row of each upsert key, as executemany would leave.

        One ``INSERT ... ON CONFLICT DO UPDATE`` cannot touch a row twice.
        """
        assert self.upsert_keys is not None
        assert self._columns is not None
        at = [self._columns.index(k) for k in self.upsert_keys]
        if len(at) == 1:
            i = at[0]
            last = {row[i]: row for row in values}
        else:
            last = {tuple(row[j] for j in at): row for row in values}
        return values if len(last) == len(values) else list(last.values())

    def _ledger(self) -> sql.Identifier:
        if self._schema:
            return self._sql.Identifier(self._schema, LEDGER_TABLE)  # type: ignore[no-any-return]
        return self._sql.Identifier(LEDGER_TABLE)  # type: ignore[no-any-return]

    def _existing_columns(self, name: str) -> list[str] | None:
        return self._columns_of(name)

    def _add_dead_letter_column(self, name: str, sqlite_type: str, postgres_type: str) -> None:
        sql_ = self._sql
        self._conn.execute(
            sql_.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} " + postgres_type).format(
                self._identifier(self.dead_letter_table), sql_.Identifier(name)
            )
        )

    def _open_ledger(self, key: str, origin: LoadOrigin) -> LoadProgress:
        sql_ = self._sql
        ledger = self._ledger()
        with self._conn.transaction():
            self._conn.execute(
                sql_.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    "load_key text NOT NULL, target text NOT NULL, "
                    "rows_consumed bigint NOT NULL DEFAULT 0, "
                    "rows_written bigint NOT NULL DEFAULT 0, "
                    "rows_dead_lettered bigint NOT NULL DEFAULT 0, "
                    "batches bigint NOT NULL DEFAULT 0, "
                    "run_id text, task text, attempt integer, "
                    "started_at timestamptz NOT NULL DEFAULT now(), "
                    "updated_at timestamptz NOT NULL DEFAULT now(), "
                    "PRIMARY KEY (load_key, target))"
                ).format(ledger)
            )
            self._conn.execute(
                sql_.SQL(
                    "INSERT INTO {} (load_key, target, run_id, task, attempt) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(ledger),
                [key, self.table, origin.run_id, origin.task, origin.attempt],
            )
            row = self._conn.execute(
                sql_.SQL(
                    "SELECT rows_consumed, rows_written, rows_dead_lettered, batches FROM {} "
                    "WHERE load_key = %s AND target = %s"
                ).format(ledger),
                [key, self.table],
            ).fetchone()
        assert row is not None
        return LoadProgress(key, *(int(v) for v in row))

    def _columns_of(self, name: str) -> list[str] | None:
        regclass = self._identifier(name).as_string(self._conn)
        found = self._conn.execute("SELECT to_regclass(%s)::oid", [regclass]).fetchone()
        if found is None or found[0] is None:
            return None
        rows = self._conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            [found[0]],
        ).fetchall()
        return [row[0] for row in rows]

    def write(self, rows: Sequence[Row], step: LoadStep | None = None) -> None:
        """Write ``rows`` and ``step`` in one transaction: all of it, or none if it raises.

        Args:
            rows: mappings by column name, or sequences in column order.
            step: dead letters to store and the ledger move to commit with the rows.

        Raises:
            SinkError: the sink is closed, or the dead letters cannot be written.
            LoadConflictError: the ledger does not show ``step.before``.
            ValueError, TypeError: a row has the wrong shape.
            psycopg.Error: the server refused the batch (see :meth:`is_row_error`).
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        if not rows and (step is None or (step.key is None and not step.dead_letters)):
            return
        assert self._columns is not None
        values = self._values(rows, self._columns) if rows else []
        move = (
            self._stage(self._columns)
            if values and self.method == "copy" and self.upsert_keys
            else None
        )
        conn = self._conn
        _writing.active = True
        try:
            with conn.cursor() as cursor:
                try:
                    if step is not None and step.key is not None:
                        self._begin_moving_ledger(cursor, step, len(values))
                    else:
                        cursor.execute("BEGIN")
                    if values and self.method == "copy":
                        if move is not None:
                            values = self._last_per_key(values)
                        with cursor.copy(self._statement) as copy:
                            for row in values:
                                copy.write_row(row)
                        if move is not None:
                            cursor.execute(move)
                    elif values:
                        cursor.executemany(self._statement, values)
                    if step is not None and step.dead_letters:
                        self._insert_dead_letters(cursor, step)
                    cursor.execute("COMMIT")
                except BaseException:
                    if not conn.closed and conn.info.transaction_status != _IDLE:
                        # The original error says more than a failed rollback would.
                        with contextlib.suppress(self._psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
        finally:
            _writing.active = False
        if step is not None and step.dead_letters:
            self._dead_letters_ready = True

    def _begin_moving_ledger(
        self, cursor: psycopg.Cursor[Any], step: LoadStep, written: int
    ) -> None:
        """Open the transaction and move the ledger row first, in one round trip.

        Moving it first takes its row lock, so a second writer of the same
        load waits here for this transaction, then sees the ledger moved.
        """
        origin = step.origin
        literal = self._sql.Literal
        # Literal values, no parameters: psycopg then sends both statements as one message.
        cursor.execute(
            self._sql.SQL(
                "BEGIN; UPDATE {} SET rows_consumed = {}, rows_written = rows_written + {}, "
                "rows_dead_lettered = rows_dead_lettered + {}, batches = batches + 1, "
                "run_id = {}, task = {}, attempt = {}, updated_at = now() "
                "WHERE load_key = {} AND target = {} AND rows_consumed = {}"
            ).format(
                self._ledger(),
                literal(step.after),
                literal(written),
                literal(len(step.dead_letters)),
                literal(origin.run_id),
                literal(origin.task),
                literal(origin.attempt),
                literal(step.key),
                literal(self.table),
                literal(step.before),
            )
        )
        cursor.nextset()  # from BEGIN's result to the UPDATE's
        if cursor.rowcount != 1:
            found = cursor.execute(
                self._sql.SQL(
                    "SELECT rows_consumed FROM {} WHERE load_key = %s AND target = %s"
                ).format(self._ledger()),
                [step.key, self.table],
            ).fetchone()
            raise self._conflict(step, None if found is None else int(found[0]))

    def _insert_dead_letters(self, cursor: psycopg.Cursor[Any], step: LoadStep) -> None:
        sql_ = self._sql
        table = self._identifier(self.dead_letter_table)
        names = [name for name, _, _ in DEAD_LETTER_COLUMNS]
        try:
            with self._conn.transaction():  # a savepoint: its error is the sink's, not the rows'
                if not self._dead_letters_ready:
                    kinds = sql_.SQL(", ").join(
                        sql_.SQL("{} " + kind).format(sql_.Identifier(c))
                        for c, _, kind in DEAD_LETTER_COLUMNS
                    )
                    cursor.execute(
                        sql_.SQL(
                            "CREATE TABLE IF NOT EXISTS {} ("
                            "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, {})"
                        ).format(table, kinds)
                    )
                marks = [sql_.SQL("%s::jsonb" if c == "row_json" else "%s") for c in names]
                cursor.executemany(
                    sql_.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                        table,
                        sql_.SQL(", ").join(sql_.Identifier(c) for c in names),
                        sql_.SQL(", ").join(marks),
                    ),
                    self._dead_letter_rows(step),
                )
        except self._psycopg.Error as exc:
            raise SinkError(
                f"cannot write {len(step.dead_letters)} dead letters to "
                f"{self.dead_letter_table!r}: {exc}"
            ) from exc

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

    def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._conn.close()
