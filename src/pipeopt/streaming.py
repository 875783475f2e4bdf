"""Lazy, deterministic chunking of iterables, DataFrames and files.

Every function here returns an iterator that produces one chunk per
``next()`` and reads no further than that chunk: memory stays flat however
long the input is. The producer holds at most the chunk it is building, so
at most one chunk beyond the one the caller holds is alive. Boundaries
depend only on the input and ``chunk_size``: chunk ``k`` holds rows
``k·chunk_size`` to ``(k+1)·chunk_size - 1``, the last chunk the rest; an
empty input gives no chunks.

Arguments are checked when the function is called, not at the first
``next()``: a bad ``chunk_size`` or a missing file fails where the mistake is.

pandas and pyarrow are optional (``pip install 'pipeopt[pandas]'``); they are
imported by the functions that need them, so this module imports without them.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from pipeopt._validate import check_int

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["read_csv_chunks", "read_parquet_chunks", "stream_dataframe", "stream_iterable"]

T = TypeVar("T")

_PANDAS_HINT = "pip install 'pipeopt[pandas]'"


def _import_pandas(what: str) -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(f"{what} needs pandas: {_PANDAS_HINT}") from exc
    return pandas


def _import_parquet(what: str) -> Any:
    try:
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError(f"{what} needs pyarrow: {_PANDAS_HINT}") from exc
    return pyarrow.parquet


def _check_exists(path: object) -> None:
    """Raise ``FileNotFoundError`` now for a local path that does not exist."""
    if isinstance(path, str | os.PathLike):
        text = os.fspath(path)
        if isinstance(text, str) and "://" not in text and not Path(text).exists():
            raise FileNotFoundError(f"no such file: {text!r}")


def stream_iterable(iterable: Iterable[T], chunk_size: int) -> Iterator[list[T]]:
    """Yield lists of ``chunk_size`` consecutive items of ``iterable``; the last may be shorter.

    Each chunk is taken from the input only when it is asked for, and no item
    beyond it is consumed.

    Args:
        iterable: any iterable, including a generator or an endless one.
        chunk_size: items per chunk.

    Raises:
        TypeError: ``chunk_size`` is not an integer, or ``iterable`` is not iterable.
        ValueError: ``chunk_size`` is below 1.
    """
    size = check_int("chunk_size", chunk_size, minimum=1)
    return _chunks(iter(iterable), size)


def _chunks(iterator: Iterator[T], size: int) -> Iterator[list[T]]:
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk
        # Drop our reference before building the next chunk, so a caller that
        # let go of this one does not pay for two.
        del chunk


def stream_dataframe(df: pd.DataFrame, chunk_size: int) -> Iterator[pd.DataFrame]:
    """Yield ``df`` in slices of ``chunk_size`` rows, by position (``iloc``).

    A slice shares the frame's data where pandas allows (a view, or a lazy
    copy under copy-on-write); nothing is copied up front. The frame's length
    is taken at the call: rows appended later are not streamed.

    Args:
        df: a pandas DataFrame.
        chunk_size: rows per slice.

    Raises:
        TypeError: ``df`` is not a DataFrame or ``chunk_size`` not an integer.
        ValueError: ``chunk_size`` is below 1.
        ImportError: pandas is not installed.
    """
    size = check_int("chunk_size", chunk_size, minimum=1)
    pandas = _import_pandas("stream_dataframe")
    if not isinstance(df, pandas.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    return _frame_slices(df, len(df), size)


def _frame_slices(df: pd.DataFrame, rows: int, size: int) -> Iterator[pd.DataFrame]:
    for start in range(0, rows, size):
        yield df.iloc[start : start + size]


def read_csv_chunks(
    path: str | os.PathLike[str] | IO[Any], chunk_size: int, **read_csv_kwargs: Any
) -> Iterator[pd.DataFrame]:
    """Yield a CSV file as DataFrames of ``chunk_size`` rows, reading it as it goes.

    This is ``pandas.read_csv(path, chunksize=chunk_size, **read_csv_kwargs)``:
    compressed files (``.gz``, ``.zip`` with one member, ``.bz2``, ``.xz``,
    ``.zst``) are decompressed as a stream, and the index numbers the rows
    across chunks (0, 1, ... on). The file is closed when the iterator is
    exhausted or closed.

    Args:
        path: a file path, URL or open file.
        chunk_size: rows per DataFrame.
        **read_csv_kwargs: passed to ``pandas.read_csv`` (``usecols``,
            ``dtype``, ``compression``, ...).

    Raises:
        TypeError: ``chunk_size`` is not an integer, or ``chunksize``,
            ``iterator`` or ``nrows`` is among the keyword arguments.
        ValueError: ``chunk_size`` is below 1.
        FileNotFoundError: ``path`` is a local path that does not exist.
        ImportError: pandas is not installed.
    """
    size = check_int("chunk_size", chunk_size, minimum=1)
    for taken in ("chunksize", "iterator", "nrows"):
        if taken in read_csv_kwargs:
            raise TypeError(f"read_csv_chunks sets {taken} itself; pass chunk_size instead")
    pandas = _import_pandas("read_csv_chunks")
    _check_exists(path)
    return _csv_chunks(pandas, path, size, read_csv_kwargs)


def _csv_chunks(
    pandas: Any, path: object, size: int, kwargs: dict[str, Any]
) -> Iterator[pd.DataFrame]:
    with pandas.read_csv(path, chunksize=size, **kwargs) as reader:
        yield from reader


def read_parquet_chunks(
    path: str | os.PathLike[str] | IO[bytes],
    chunk_size: int,
    columns: Sequence[str] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield a Parquet file as pandas DataFrames of exactly ``chunk_size`` rows (the last fewer).

    Record batches are read one at a time with
    ``pyarrow.parquet.ParquetFile.iter_batches`` and re-cut where a row group
    ends early, so the boundaries match :func:`read_csv_chunks` on the same
    rows; the index numbers the rows across chunks. At most one chunk and one
    record batch are in memory.

    Args:
        path: a file path or an open binary file.
        chunk_size: rows per DataFrame.
        columns: read only these columns, in this order.

    Raises:
        TypeError: ``chunk_size`` is not an integer, or ``columns`` is a string.
        ValueError: ``chunk_size`` is below 1.
        FileNotFoundError: ``path`` is a local path that does not exist.
        ImportError: pandas or pyarrow is not installed.
    """
    size = check_int("chunk_size", chunk_size, minimum=1)
    if isinstance(columns, str):
        raise TypeError(f"columns must be a sequence of names, not a string: {columns!r}")
    pandas = _import_pandas("read_parquet_chunks")
    parquet = _import_parquet("read_parquet_chunks")
    _check_exists(path)
    return _parquet_chunks(pandas, parquet, path, size, None if columns is None else list(columns))


def _parquet_chunks(
    pandas: Any, parquet: Any, path: object, size: int, columns: list[str] | None
) -> Iterator[pd.DataFrame]:
    import pyarrow

    start = 0

    def frame(parts: list[Any]) -> pd.DataFrame:
        table = pyarrow.Table.from_batches(parts)
        out: pd.DataFrame = table.to_pandas()
        out.index = pandas.RangeIndex(start, start + len(out))
        return out

    with parquet.ParquetFile(path) as source:
        pending: list[Any] = []
        held = 0
        for batch in source.iter_batches(batch_size=size, columns=columns):
            rest = batch
            while rest.num_rows:
                take = min(size - held, rest.num_rows)
                pending.append(rest.slice(0, take))
                held += take
                rest = rest.slice(take)
                if held == size:
                    chunk = frame(pending)
                    pending, held = [], 0
                    yield chunk
                    start += size
                    del chunk
        if held:
            yield frame(pending)
