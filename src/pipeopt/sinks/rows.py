"""What :func:`~pipeopt.sinks.write_batches` accepts as rows, as one stream in input order.

Accepted, each read lazily:

* an iterable of rows: mappings by column name or sequences in column order
  (a list, a tuple, a generator, ``dict.values()`` ...);
* a pandas DataFrame, a pyarrow Table or RecordBatch;
* an iterable whose items are such frames (what :func:`~pipeopt.read_csv_chunks`,
  :func:`~pipeopt.read_parquet_chunks` and :func:`~pipeopt.stream_dataframe`
  yield), taken as the concatenation of their rows.

A frame's rows become tuples in the sink's column order (mappings by the
frame's columns when the sink does not know its columns yet); missing values
(``NaN``, ``None``, ``NaT``, ``pd.NA``, Arrow nulls) become ``None`` and
numpy scalars plain Python values.

Refused before anything is written, with a ``TypeError`` naming the first
bad item: a ``str``, ``bytes`` or a scalar where a row belongs (the usual
sign of iterating a DataFrame's column names, a dict, or one row), a mapping
or a string as the whole input, and inputs whose order is not the same from
one run to the next (a ``set``): a resumed load skips rows by position. A
list or tuple is checked whole up front; an iterator is checked one batch at
a time, before that batch is written.
"""

from __future__ import annotations

import itertools
import reprlib
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any

from pipeopt.sinks.base import Row

__all__ = ["RowSource"]

_SLICE = 4096  # frame rows converted at a time
_DICT_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
_FAST_ROWS = (tuple, list, dict)
_END = object()
_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


def _frame_kind(value: object) -> str | None:
    """Return ``"pandas"`` or ``"arrow"`` for a frame, ``None`` for anything else."""
    module = type(value).__module__
    if module.startswith("pandas") and type(value).__name__ == "DataFrame":
        return "pandas"
    if module.startswith("pyarrow") and type(value).__name__ in ("Table", "RecordBatch"):
        return "arrow"
    return None


def _is_row(value: object) -> bool:
    if type(value) in _FAST_ROWS:
        return True
    if isinstance(value, Mapping):
        return True
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _bad_row(position: int, value: object) -> TypeError:
    hint = ""
    if isinstance(value, str | bytes):
        hint = (
            "; a string where a row belongs usually means a DataFrame's column names, "
            "a dict's keys, or one row were passed instead of rows"
        )
    return TypeError(
        f"row {position} is a {type(value).__name__} ({_short.repr(value)}), not a mapping "
        f"or a sequence of values{hint}; nothing of this batch was written"
    )


def _check_input(rows: object) -> None:
    if isinstance(rows, str | bytes | bytearray | memoryview):
        raise TypeError(
            f"rows must be an iterable of rows, got {type(rows).__name__} {_short.repr(rows)}"
        )
    if isinstance(rows, Mapping):
        raise TypeError(
            f"rows must be an iterable of rows, got a mapping ({type(rows).__name__}); "
            "pass [mapping] for one row or a list of mappings"
        )
    if isinstance(rows, Set) and not isinstance(rows, _DICT_VIEWS):
        raise TypeError(
            f"rows is a {type(rows).__name__}, whose order is not the same from one run to "
            "the next, but a resumed or retried load skips the rows it already wrote by "
            "position; pass them in a stable order, e.g. sorted(rows)"
        )
    if not isinstance(rows, Iterable):
        raise TypeError(f"rows must be an iterable of rows, got {type(rows).__name__}")


class RowSource:
    """The rows of any accepted input, taken in order: ``take(n)``, ``skip(n)``, ``put_back``.

    Args:
        rows: the input (see the module docstring).
        columns: the sink's columns, if it knows them: frames become tuples in that order.

    Raises:
        TypeError: the input, or a row of a list or tuple input, is not acceptable.
        ValueError: a frame lacks a column the sink writes.
    """

    def __init__(self, rows: object, columns: tuple[str, ...] | None) -> None:
        if _frame_kind(rows) is None:
            _check_input(rows)
        self._columns = columns
        self._position = 0  # input position of the next row handed out
        self._back: list[Row] = []
        self.pending: int | None = None
        self._checked = False
        if _frame_kind(rows) is not None:
            self.pending = len(rows)  # type: ignore[arg-type]
            self._rows: Iterator[Row] = self._from_frames(iter([rows]))
            self._checked = True
            return
        if isinstance(rows, list | tuple):
            for i, row in enumerate(rows):
                if not _is_row(row):
                    if i == 0 and _frame_kind(row) is not None:
                        break
                    raise _bad_row(i, row)
            else:
                self.pending = len(rows)
                self._checked = True
                self._rows = iter(rows)
                return
        iterator = iter(rows)  # type: ignore[call-overload]
        first = next(iterator, _END)
        if first is _END:
            self._rows = iter(())
        elif _frame_kind(first) is not None:
            self._rows = self._from_frames(itertools.chain([first], iterator))
            self._checked = True
        else:
            if not _is_row(first):
                raise _bad_row(0, first)
            self._rows = itertools.chain([first], iterator)  # type: ignore[list-item]

    def take(self, n: int) -> list[Row]:
        """Return the next ``n`` rows (fewer at the end), checked.

        Raises:
            TypeError: one of them is not a row (nothing of them is handed out).
        """
        out = self._back[:n]
        del self._back[: len(out)]
        if len(out) < n:
            fresh = list(itertools.islice(self._rows, n - len(out)))
            if not self._checked:
                for i, row in enumerate(fresh):
                    if not _is_row(row):
                        raise _bad_row(self._position + len(out) + i, row)
            out.extend(fresh)
        self._position += len(out)
        if self.pending is not None:
            self.pending = max(0, self.pending - len(out))
        return out

    def skip(self, n: int) -> int:
        """Drop the next ``n`` rows unread; return how many there were."""
        dropped = 0
        while dropped < n:
            got = len(self.take(min(n - dropped, 65536)))
            if not got:
                break
            dropped += got
        return dropped

    def put_back(self, rows: Sequence[Row]) -> None:
        """Return ``rows``, the last ones taken, to be taken again."""
        self._back[:0] = rows
        self._position -= len(rows)
        if self.pending is not None:
            self.pending += len(rows)

    def _from_frames(self, frames: Iterator[Any]) -> Iterator[Row]:
        for index, frame in enumerate(frames):
            kind = _frame_kind(frame)
            if kind is None:
                raise TypeError(
                    f"item {index} of the input is a {type(frame).__name__}, but the items "
                    "before it were DataFrames or Arrow tables; pass frames only, or rows only"
                )
            columns, as_dicts = self._frame_columns(
                list(frame.columns) if kind == "pandas" else list(frame.schema.names)
            )
            for start in range(0, len(frame), _SLICE):
                part = (
                    frame.iloc[start : start + _SLICE]
                    if kind == "pandas"
                    else frame.slice(start, _SLICE)
                )
                values = (
                    [_pandas_column(part[c]) for c in columns]
                    if kind == "pandas"
                    else [part.column(c).to_pylist() for c in columns]
                )
                if as_dicts:
                    yield from (
                        dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)
                    )
                else:
                    yield from zip(*values, strict=True)

    def _frame_columns(self, available: list[str]) -> tuple[list[str], bool]:
        if self._columns is None:
            return [str(c) for c in available], True
        missing = [c for c in self._columns if c not in available]
        if missing:
            raise ValueError(
                f"the frame has no column {', '.join(map(repr, missing))} that the sink writes; "
                f"its columns are {', '.join(map(str, available))}"
            )
        return list(self._columns), False


def _pandas_column(series: Any) -> list[Any]:
    """Return a Series as Python values, missing ones as ``None``."""
    values: list[Any] = series.tolist()
    mask = series.isna().to_numpy()
    if mask.any():
        for i in mask.nonzero()[0].tolist():
            values[i] = None
    return values
