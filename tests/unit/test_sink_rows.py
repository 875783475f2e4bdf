"""RowSource: every accepted input shape as one stream of rows, and what it refuses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipeopt.sinks.rows import RowSource


def test_rows_are_taken_in_order_and_can_be_put_back_or_skipped() -> None:
    source = RowSource([(i, i) for i in range(10)], None)
    assert source.pending == 10
    first = source.take(4)
    assert first == [(0, 0), (1, 1), (2, 2), (3, 3)]
    source.put_back(first[2:])
    assert source.pending == 8
    assert source.skip(3) == 3
    assert source.take(100) == [(i, i) for i in range(5, 10)]
    assert source.take(1) == []
    assert source.skip(5) == 0


def test_mappings_sequences_generators_and_dict_values_are_rows() -> None:
    rows = {"a": {"id": 1}, "b": {"id": 2}}
    assert RowSource(rows.values(), None).take(5) == [{"id": 1}, {"id": 2}]
    generated: Iterator[Any] = (list(range(i, i + 2)) for i in range(3))
    source = RowSource(generated, None)
    assert source.pending is None
    assert source.take(5) == [[0, 1], [1, 2], [2, 3]]
    assert RowSource(iter(()), None).take(3) == []


def test_a_bad_item_in_an_iterator_is_refused_before_its_batch() -> None:
    source = RowSource(iter([(1,), (2,), None, (4,)]), None)
    assert source.take(2) == [(1,), (2,)]
    with pytest.raises(TypeError, match=r"row 2 is a NoneType \(None\)"):
        source.take(2)
    with pytest.raises(TypeError, match=r"row 0 is a NoneType"):
        RowSource(iter([None]), None)
    with pytest.raises(TypeError, match=r"row 1 is a bytes"):
        RowSource([(1,), b"raw"], None)


def test_inputs_whose_order_changes_or_that_are_not_rows_are_refused() -> None:
    with pytest.raises(TypeError, match="rows is a frozenset"):
        RowSource(frozenset({(1,), (2,)}), None)
    with pytest.raises(TypeError, match="got str 'abc'"):
        RowSource("abc", None)
    with pytest.raises(TypeError, match="got int"):
        RowSource(42, None)


def test_frames_become_tuples_in_the_sink_order_with_none_for_missing_values() -> None:
    pandas = pytest.importorskip("pandas")
    pyarrow = pytest.importorskip("pyarrow")
    frame = pandas.DataFrame({"b": [1.5, float("nan"), 3.0], "a": ["x", None, "z"], "c": [1, 2, 3]})
    assert RowSource(frame, ("a", "b")).take(5) == [("x", 1.5), (None, None), ("z", 3.0)]
    values = RowSource(frame, ("c",)).take(1)[0]
    assert type(values[0]) is int  # not a numpy scalar
    assert RowSource(frame, None).take(1) == [{"b": 1.5, "a": "x", "c": 1}]
    table = pyarrow.Table.from_pandas(frame, preserve_index=False)
    assert RowSource(table, ("c", "a")).take(5) == [(1, "x"), (2, None), (3, "z")]
    batch = table.to_batches()[0]
    assert RowSource(batch, ("c",)).pending == 3
    chunks = iter([frame.iloc[:2], frame.iloc[2:]])
    assert RowSource(chunks, ("c",)).take(5) == [(1,), (2,), (3,)]
    with pytest.raises(ValueError, match=r"no column 'd' that the sink writes"):
        RowSource(frame, ("a", "d")).take(1)
    mixed = RowSource(iter([frame, (1, 2)]), ("c",))
    with pytest.raises(TypeError, match="item 1 of the input is a tuple"):
        mixed.take(10)
