"""The sink protocol, dead letters, the load ledger, and what the SQL sinks share.

A sink writes rows to one table. Its contract, which :func:`write_batches`
relies on:

* ``begin_load(key)`` prepares a load: checks (and upgrades) the dead-letter
  table's layout and, for a load with a key, creates the ledger table and
  its row for ``key``, and returns the :class:`LoadProgress` recorded so far.
* ``write(rows, step)`` is all or nothing: one transaction per call,
  committed when it returns, rolled back when it raises. With a
  :class:`LoadStep`, the same transaction stores the step's dead letters and
  moves the ledger row of ``step.key`` from ``step.before`` to
  ``step.after`` input rows; if the ledger does not show ``step.before``
  (another attempt got there first) it raises :class:`LoadConflictError`
  and writes nothing.
* ``is_row_error(exc)`` tells a failure caused by the rows' contents (a
  constraint, a value of the wrong type or shape: splitting the batch can
  isolate the culprits) from a failure of the sink itself (the connection,
  the schema, the disk: every row would fail alike).
* ``close()`` releases the connection; a sink is its own context manager.

Rows are mappings from column name to value, or sequences of values in the
sink's column order. A mapping may carry keys the sink does not write; a
missing column, or a sequence of the wrong length, is a row error.

The ledger (:data:`LEDGER_TABLE`, in the target table's schema) holds one
row per load key and target table: input rows consumed, rows written, rows
dead-lettered, batches, and the run, task and attempt that last moved it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self, TypeAlias, runtime_checkable

from pipeopt.errors import LoadConflictError, SinkError

_log = logging.getLogger("pipeopt.sinks")

__all__ = [
    "LEDGER_TABLE",
    "DeadLetter",
    "LoadOrigin",
    "LoadProgress",
    "LoadStep",
    "Row",
    "Sink",
]

Row: TypeAlias = Mapping[str, Any] | Sequence[Any]

LEDGER_TABLE = "pipeopt_load_progress"

# The dead-letter layout: (column, SQLite type, PostgreSQL type); the first
# three columns are the layout before loads were traced.
DEAD_LETTER_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("failed_at", "TEXT", "timestamptz"),
    ("error", "TEXT", "text"),
    ("row_json", "TEXT", "jsonb"),
    ("run_id", "TEXT", "text"),
    ("task", "TEXT", "text"),
    ("attempt", "INTEGER", "integer"),
    ("load_key", "TEXT", "text"),
    ("position", "INTEGER", "bigint"),
    ("error_class", "TEXT", "text"),
)
_OLD_DEAD_LETTER_COLUMNS = ("failed_at", "error", "row_json")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row a sink refused, and why.

    Attributes:
        row: the row as it was given.
        error: the error's type and text, e.g. ``"IntegrityError: CHECK constraint failed: qty"``.
        position: the row's position in the load's input (0 for the first row), if known.
        error_class: the error's class name, e.g. ``"IntegrityError"``.
    """

    row: Row
    error: str
    position: int | None = None
    error_class: str = ""


@dataclass(frozen=True, slots=True)
class LoadOrigin:
    """Who writes a load: stored with its ledger row and its dead letters.

    Attributes:
        run_id: the run (empty outside a run).
        task: the task (empty outside a run).
        attempt: the task's attempt, 1 for the first (0 outside a run).
    """

    run_id: str = ""
    task: str = ""
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """A load's ledger row: how far it got, by committed batches.

    Attributes:
        key: the load key.
        rows_consumed: input rows handled (written or dead-lettered), a prefix of the input.
        rows_written: rows written to the table.
        rows_dead_lettered: rows stored as dead letters.
        batches: transactions that moved the ledger.
    """

    key: str
    rows_consumed: int = 0
    rows_written: int = 0
    rows_dead_lettered: int = 0
    batches: int = 0


@dataclass(frozen=True, slots=True)
class LoadStep:
    """What commits with one write besides its rows.

    Attributes:
        key: the ledger key, or ``None`` for a load without a ledger.
        before: the input rows the ledger must show as consumed.
        after: the input rows consumed once this write commits.
        dead_letters: refused rows committed in the same transaction.
        origin: who writes.
    """

    key: str | None
    before: int
    after: int
    dead_letters: Sequence[DeadLetter] = ()
    origin: LoadOrigin = field(default_factory=LoadOrigin)


@runtime_checkable
class Sink(Protocol):
    """What :func:`~pipeopt.sinks.write_batches` needs of a destination."""

    @property
    def columns(self) -> tuple[str, ...] | None:
        """Return the columns written, in the order of sequence rows (``None`` until known)."""
        ...

    def begin_load(self, key: str | None, origin: LoadOrigin) -> LoadProgress:
        """Prepare a load; return the ledger's progress for ``key`` (empty without a key)."""
        ...

    def write(self, rows: Sequence[Row], step: LoadStep | None = None) -> None:
        """Write ``rows`` (and ``step``) in one transaction: all of it or, when it raises, none."""
        ...

    def is_row_error(self, exc: Exception) -> bool:
        """Return whether ``exc`` from :meth:`write` is caused by the rows, not the sink."""
        ...

    def close(self) -> None:
        """Release the sink's connection; closing twice is harmless."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def describe_error(exc: BaseException) -> str:
    """Return ``"Type: message"`` for a dead letter."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _plain(value: Any) -> Any:
    """Return ``value`` as something ``json.dumps`` writes as strict JSON."""
    if isinstance(value, str):
        # PostgreSQL's jsonb refuses \u0000, and such a row is often why it failed.
        return value.replace("\x00", "\\x00")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def check_name(what: str, name: object) -> str:
    """Return ``name`` if it is a usable table or column name."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__} {name!r}")
    if not name or any(not part for part in name.split(".")) or "\x00" in name:
        raise ValueError(
            f"{what} must be a non-empty name like 'events' or 'schema.events', got {name!r}"
        )
    return name


def check_names(what: str, names: object) -> tuple[str, ...] | None:
    """Return ``names`` as a tuple of distinct non-empty strings, or ``None``."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{what} must be a sequence of names, got {type(names).__name__} {names!r}")
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} must hold non-empty strings, got {name!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} must not repeat a name, got {list(out)!r}")
    if not out:
        raise ValueError(f"{what} must name at least one column, got []")
    return out


class TableSink:
    """Shared machinery of the SQL sinks: names, row shapes, dead-letter rows, closing.

    Subclasses set ``self._columns`` (or leave it ``None`` until the first
    mapping row names them) and implement the I/O.
    """

    table: str
    dead_letter_table: str
    upsert_keys: tuple[str, ...] | None

    def __init__(
        self,
        table: str,
        columns: Sequence[str] | None,
        upsert_keys: Sequence[str] | None,
        dead_letter_table: str | None,
    ) -> None:
        self.table = check_name("table", table)
        self._columns = check_names("columns", columns)
        self.upsert_keys = check_names("upsert_keys", upsert_keys)
        if self._columns is not None and self.upsert_keys is not None:
            unknown = [k for k in self.upsert_keys if k not in self._columns]
            if unknown:
                raise ValueError(
                    f"upsert_keys {unknown} are not among columns {list(self._columns)}"
                )
        if dead_letter_table is None:
            dead_letter_table = f"{self.table}_dead_letter"
        self.dead_letter_table = check_name("dead_letter_table", dead_letter_table)
        self._closed = False
        self._dead_letters_ready = False

    @property
    def columns(self) -> tuple[str, ...] | None:
        """Return the columns written, in order (``None`` until known)."""
        return self._columns

    @property
    def closed(self) -> bool:
        """Return whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection; closing twice is harmless."""
        self._closed = True

    def _adopt_columns(self, existing: Sequence[str]) -> tuple[str, ...]:
        """Take the table's columns, or check that the configured ones exist in it.

        Raises:
            SinkError: a configured column is not in the table.
        """
        if self._columns is None:
            self._columns = tuple(existing)
            return self._columns
        missing = [c for c in self._columns if c not in existing]
        if missing:
            self.close()
            raise SinkError(
                f"table {self.table!r} has no writable column {', '.join(map(repr, missing))}; "
                f"its columns are {', '.join(existing)}"
            )
        return self._columns

    def _values(self, rows: Sequence[Row], columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """Return ``rows`` as tuples in column order; a bad row raises ValueError or TypeError."""
        width = len(columns)
        out: list[tuple[Any, ...]] = []
        append = out.append
        for row in rows:
            kind = type(row)
            # Exact types first: an ABC isinstance check per row costs more than the write.
            if kind is tuple and len(row) == width:
                append(row)  # type: ignore[arg-type]
            elif kind is dict or (kind is not tuple and isinstance(row, Mapping)):
                try:
                    append(tuple([row[c] for c in columns]))  # type: ignore[call-overload]
                except KeyError as exc:
                    raise ValueError(f"row has no value for column {exc.args[0]!r}") from None
            elif isinstance(row, str | bytes) or not isinstance(row, Sequence):
                raise TypeError(
                    f"a row must be a mapping or a sequence of values, got {kind.__name__}"
                )
            elif len(row) != width:
                raise ValueError(
                    f"row has {len(row)} values, expected {width} ({', '.join(columns)})"
                )
            else:
                append(tuple(row))
        return out

    def _row_json(self, row: Row) -> str:
        """Return ``row`` as a JSON object (by column name where the shape allows)."""
        if isinstance(row, Mapping):
            payload: Any = {str(k): _plain(v) for k, v in row.items()}
        elif (
            self._columns is not None
            and isinstance(row, Sequence)
            and not isinstance(row, str | bytes)
            and len(row) == len(self._columns)
        ):
            payload = {c: _plain(v) for c, v in zip(self._columns, row, strict=True)}
        elif isinstance(row, Sequence) and not isinstance(row, str | bytes):
            payload = [_plain(v) for v in row]
        else:
            payload = _plain(row)
        return json.dumps(payload, ensure_ascii=False)

    def _dead_letter_rows(self, step: LoadStep) -> list[tuple[Any, ...]]:
        """Return the step's dead letters as rows of :data:`DEAD_LETTER_COLUMNS`."""
        now = dt.datetime.now(dt.UTC).isoformat()
        origin = step.origin
        return [
            (
                now,
                letter.error,
                self._row_json(letter.row),
                origin.run_id,
                origin.task,
                origin.attempt,
                step.key,
                letter.position,
                letter.error_class or letter.error.partition(":")[0],
            )
            for letter in step.dead_letters
        ]

    def begin_load(self, key: str | None, origin: LoadOrigin) -> LoadProgress:
        """Check the dead-letter table and, with ``key``, read (creating) the load's ledger row.

        A dead-letter table of the layout before loads were traced gets the
        new columns added in place (a warning is logged); its old rows keep
        them empty.

        Raises:
            SinkError: the sink is closed, or the dead-letter table is not of
                a pipeopt layout (the message says what to do).
            sqlite3.Error, psycopg.Error: the database refused the statements.
        """
        if self._closed:
            raise SinkError(f"{self!r} is closed")
        existing = self._existing_columns(self.dead_letter_table)
        if existing is not None:
            missing_old = [c for c in _OLD_DEAD_LETTER_COLUMNS if c not in existing]
            if missing_old:
                raise SinkError(
                    f"dead-letter table {self.dead_letter_table!r} exists but lacks "
                    f"{', '.join(missing_old)} (its columns: {', '.join(existing)}); "
                    "rename or drop it, or pass dead_letter_table= to use another table"
                )
            added = [c for c in DEAD_LETTER_COLUMNS if c[0] not in existing]
            for column in added:
                self._add_dead_letter_column(*column)
            if added:
                _log.warning(
                    "upgraded dead-letter table %r: added %s (older rows leave them empty)",
                    self.dead_letter_table,
                    ", ".join(name for name, _, _ in added),
                )
            self._dead_letters_ready = True
        if key is None:
            return LoadProgress("")
        return self._open_ledger(key, origin)

    def _existing_columns(self, name: str) -> Sequence[str] | None:
        """Return the columns of table ``name``, or ``None`` if it does not exist."""
        raise NotImplementedError

    def _add_dead_letter_column(self, name: str, sqlite_type: str, postgres_type: str) -> None:
        raise NotImplementedError

    def _open_ledger(self, key: str, origin: LoadOrigin) -> LoadProgress:
        """Create the ledger table and the row of ``key`` if missing; return the row."""
        raise NotImplementedError

    @staticmethod
    def _conflict(step: LoadStep, found: int | None) -> LoadConflictError:
        return LoadConflictError(step.key or "", step.before, found)
