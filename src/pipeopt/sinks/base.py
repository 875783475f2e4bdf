"""The sink protocol, dead letters, and what the SQL sinks share.

A sink writes rows to one table. Its contract, which :func:`write_batches`
relies on:

* ``write(rows)`` is all or nothing: one transaction per call, committed
  when it returns, rolled back when it raises.
* ``is_row_error(exc)`` tells a failure caused by the rows' contents (a
  constraint, a value of the wrong type or shape: splitting the batch can
  isolate the culprits) from a failure of the sink itself (the connection,
  the schema, the disk: every row would fail alike).
* ``write_dead_letters(letters)`` stores rows that were refused, each with
  the error's text, in one transaction.
* ``close()`` releases the connection; a sink is its own context manager.

Rows are mappings from column name to value, or sequences of values in the
sink's column order. A mapping may carry keys the sink does not write; a
missing column, or a sequence of the wrong length, is a row error.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeAlias, runtime_checkable

from pipeopt.errors import SinkError

__all__ = ["DeadLetter", "Row", "Sink"]

Row: TypeAlias = Mapping[str, Any] | Sequence[Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row a sink refused, and why.

    Attributes:
        row: the row as it was given.
        error: the error's type and text, e.g. ``"IntegrityError: CHECK constraint failed: qty"``.
    """

    row: Row
    error: str


@runtime_checkable
class Sink(Protocol):
    """What :func:`~pipeopt.sinks.write_batches` needs of a destination."""

    def write(self, rows: Sequence[Row]) -> None:
        """Write ``rows`` in one transaction: all of them or, when it raises, none."""
        ...

    def is_row_error(self, exc: Exception) -> bool:
        """Return whether ``exc`` from :meth:`write` is caused by the rows, not the sink."""
        ...

    def write_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Store refused rows with their errors, in one transaction."""
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
        for row in rows:
            if isinstance(row, Mapping):
                try:
                    out.append(tuple(row[c] for c in columns))
                except KeyError as exc:
                    raise ValueError(f"row has no value for column {exc.args[0]!r}") from None
            elif isinstance(row, str | bytes) or not isinstance(row, Sequence):
                raise TypeError(
                    f"a row must be a mapping or a sequence of values, got {type(row).__name__}"
                )
            else:
                if len(row) != width:
                    raise ValueError(
                        f"row has {len(row)} values, expected {width} ({', '.join(columns)})"
                    )
                out.append(row if isinstance(row, tuple) else tuple(row))
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

    def _dead_letter_rows(self, letters: Sequence[DeadLetter]) -> list[tuple[str, str, str]]:
        now = dt.datetime.now(dt.UTC).isoformat()
        return [(now, letter.error, self._row_json(letter.row)) for letter in letters]
