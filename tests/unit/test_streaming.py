"""Streaming: chunks concatenate to the input, boundaries are fixed, nothing is read early."""

from __future__ import annotations

import itertools
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeopt.streaming import (
    read_csv_chunks,
    read_parquet_chunks,
    stream_dataframe,
    stream_iterable,
)

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

chunk_sizes = st.integers(min_value=1, max_value=40)

BAD_CHUNK_SIZES = [
    (0, ValueError, "chunk_size must be an integer >= 1, got 0"),
    (-3, ValueError, "chunk_size must be an integer >= 1, got -3"),
    (True, TypeError, "chunk_size must be an integer >= 1, got bool True"),
    (2.0, TypeError, "chunk_size must be an integer >= 1, got float 2.0"),
    ("10", TypeError, "chunk_size must be an integer >= 1, got str '10'"),
    (None, TypeError, "chunk_size must be an integer >= 1, got NoneType None"),
]


def frame(rows: int) -> Any:
    return pd.DataFrame(
        {
            "id": range(rows),
            "name": [f"row {i}" for i in range(rows)],
            "value": [i * 0.5 for i in range(rows)],
        }
    )


# -- iterables -----------------------------------------------------------------


@given(items=st.lists(st.integers()), size=chunk_sizes)
def test_iterable_chunks_concatenate_to_the_input(items: list[int], size: int) -> None:
    chunks = list(stream_iterable(items, size))
    assert list(itertools.chain.from_iterable(chunks)) == items
    assert all(len(chunk) == size for chunk in chunks[:-1])
    assert all(1 <= len(chunk) <= size for chunk in chunks)
    assert len(chunks) == -(-len(items) // size)


@given(items=st.lists(st.text(max_size=3)), size=chunk_sizes)
def test_iterable_boundaries_are_deterministic(items: list[str], size: int) -> None:
    first = list(stream_iterable(iter(items), size))
    second = list(stream_iterable(list(items), size))
    assert first == second


def test_a_generator_that_fails_later_still_yields_the_first_chunks() -> None:
    def source() -> Iterator[int]:
        yield from range(7)
        raise RuntimeError("source broke after 7 items")

    chunks = stream_iterable(source(), 3)
    assert next(chunks) == [0, 1, 2]
    assert next(chunks) == [3, 4, 5]
    with pytest.raises(RuntimeError, match="after 7 items"):
        next(chunks)


def test_a_chunk_is_produced_without_consuming_beyond_it() -> None:
    consumed: list[int] = []

    def source() -> Iterator[int]:
        for i in itertools.count():
            consumed.append(i)
            yield i

    chunks = stream_iterable(source(), 4)
    assert consumed == []  # nothing is read before the first next()
    assert next(chunks) == [0, 1, 2, 3]
    assert consumed == [0, 1, 2, 3]
    assert next(chunks) == [4, 5, 6, 7]
    assert consumed == list(range(8))


def test_an_endless_iterable_streams() -> None:
    chunks = stream_iterable(itertools.count(), 1000)
    assert [chunk[0] for chunk in itertools.islice(chunks, 3)] == [0, 1000, 2000]


def test_empty_input_gives_no_chunks() -> None:
    assert list(stream_iterable([], 5)) == []
    assert list(stream_dataframe(frame(0), 5)) == []


@pytest.mark.parametrize(("size", "error", "message"), BAD_CHUNK_SIZES)
def test_bad_chunk_sizes_fail_at_the_call(size: Any, error: type[Exception], message: str) -> None:
    class NeverRead:
        def __iter__(self) -> Iterator[int]:
            raise AssertionError("the iterable was read")

    with pytest.raises(error) as info:
        stream_iterable(NeverRead(), size)
    assert str(info.value) == message
    calls: list[Callable[[], object]] = [
        lambda: stream_dataframe(frame(3), size),
        lambda: read_csv_chunks("missing.csv", size),
        lambda: read_parquet_chunks("missing.parquet", size),
    ]
    for call in calls:
        with pytest.raises(error, match="chunk_size must be an integer >= 1"):
            call()


def test_not_iterable_fails_at_the_call() -> None:
    with pytest.raises(TypeError):
        stream_iterable(42, 3)  # type: ignore[arg-type]


# -- DataFrames ----------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(min_value=0, max_value=120), size=chunk_sizes)
def test_dataframe_chunks_concatenate_to_the_input(rows: int, size: int) -> None:
    df = frame(rows)
    chunks = list(stream_dataframe(df, size))
    assert [len(c) for c in chunks] == [min(size, rows - start) for start in range(0, rows, size)]
    if rows:
        pd.testing.assert_frame_equal(pd.concat(chunks), df)
    again = list(stream_dataframe(df, size))
    assert [list(c.index) for c in again] == [list(c.index) for c in chunks]


def test_dataframe_chunks_are_positional_slices_sharing_data() -> None:
    np = pytest.importorskip("numpy")
    df = pd.DataFrame({"x": np.arange(10, dtype="int64")}, index=list("abcdefghij"))
    chunks = stream_dataframe(df, 4)
    first = next(chunks)
    assert list(first.index) == list("abcd")
    assert np.shares_memory(first["x"].to_numpy(), df["x"].to_numpy())
    assert [list(c.index) for c in chunks] == [list("efgh"), list("ij")]


def test_stream_dataframe_wants_a_dataframe() -> None:
    with pytest.raises(TypeError, match="df must be a pandas DataFrame, got list"):
        stream_dataframe([1, 2, 3], 2)  # type: ignore[arg-type]


# -- files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rows.csv", "rows.csv.gz"])
def test_csv_chunks_match_reading_the_whole_file(tmp_path: Path, name: str) -> None:
    df = frame(1003)
    path = tmp_path / name
    df.to_csv(path, index=False)
    chunks = list(read_csv_chunks(path, 250))
    assert [len(c) for c in chunks] == [250, 250, 250, 250, 3]
    pd.testing.assert_frame_equal(pd.concat(chunks), pd.read_csv(path))
    assert chunks[1].index[0] == 250  # rows are numbered across chunks


def test_csv_chunks_from_a_zip_archive(tmp_path: Path) -> None:
    df = frame(500)
    path = tmp_path / "rows.csv.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("rows.csv", df.to_csv(index=False))
    chunks = list(read_csv_chunks(path, 128, usecols=["id", "value"]))
    assert [len(c) for c in chunks] == [128, 128, 128, 116]
    pd.testing.assert_frame_equal(pd.concat(chunks), df[["id", "value"]])


def test_csv_chunks_read_lazily(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    frame(100).to_csv(path, index=False)
    chunks = read_csv_chunks(path, 10)
    path.unlink()  # on POSIX an open file stays readable; a closed one would be gone
    with pytest.raises(FileNotFoundError):
        next(chunks)


def test_csv_reader_checks_its_arguments_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_csv_chunks(tmp_path / "absent.csv", 10)
    with pytest.raises(TypeError, match="sets chunksize itself"):
        read_csv_chunks(tmp_path / "absent.csv", 10, chunksize=5)


def test_parquet_chunks_cut_across_row_groups(tmp_path: Path) -> None:
    df = frame(1000)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=300)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    chunks = list(read_parquet_chunks(path, 128))
    assert [len(c) for c in chunks] == [128] * 7 + [104]
    pd.testing.assert_frame_equal(pd.concat(chunks), df)
    assert all(isinstance(c, pd.DataFrame) for c in chunks)


def test_parquet_chunks_select_columns(tmp_path: Path) -> None:
    df = frame(50)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    chunks = list(read_parquet_chunks(path, 20, columns=["value", "id"]))
    assert [list(c.columns) for c in chunks] == [["value", "id"]] * 3
    pd.testing.assert_frame_equal(pd.concat(chunks), df[["value", "id"]])
    with pytest.raises(TypeError, match="not a string"):
        read_parquet_chunks(path, 20, columns="id")


def test_parquet_reader_opens_nothing_before_next(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(frame(10), preserve_index=False), path)
    chunks = read_parquet_chunks(path, 4)
    path.write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid):
        next(chunks)


def test_missing_pandas_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert list(stream_iterable(range(3), 2)) == [[0, 1], [2]]  # needs no pandas
    calls: list[Callable[[], object]] = [
        lambda: stream_dataframe(object(), 2),  # type: ignore[arg-type]
        lambda: read_csv_chunks("rows.csv", 2),
        lambda: read_parquet_chunks("rows.parquet", 2),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=r"pip install 'pipeopt\[pandas\]'"):
            call()
