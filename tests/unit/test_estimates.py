"""Duration estimates: windows and medians, each task's source, critical paths recomputed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeopt import Pipeline, PipelineTask
from pipeopt.estimates import (
    HINT,
    NONE,
    WINDOW,
    LearnedDurations,
    Samples,
    estimate_text,
    event_samples,
    learn,
    median,
    plan,
)


def test_median_of_odd_and_even_windows() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert median([0.5]) == 0.5


def window(learned: LearnedDurations, name: str) -> list[float]:
    i = learned.names.index(name)
    return [column[i] for column in learned.windows]


def test_a_window_keeps_the_latest_samples_and_counts_all() -> None:
    # "a" is a mapped task: two items this run.
    first = learn(None, Samples({"b": 2.0}, {"a": [1.0, 100.0]}), keep=["a", "b"])
    assert first.lookup() == {"a": (1.0, 2), "b": (2.0, 1)}
    assert window(first, "a")[-2:] == [1.0, 100.0]
    later = first
    for _ in range(WINDOW):
        later = learn(later, Samples({"a": 3.0}, {}), keep=["a", "b"])
    assert window(later, "a") == [3.0] * WINDOW  # the outlier has left the window
    assert later.lookup() == {"a": (3.0, 2 + WINDOW), "b": (2.0, 1)}
    everyone = learn(later, Samples({"a": 5.0, "b": 4.0}, {}), keep=["a", "b"])
    assert window(everyone, "b")[-2:] == [2.0, 4.0]
    assert everyone.lookup() == {"a": (3.0, 3 + WINDOW), "b": (2.0, 2)}


def test_an_outlier_does_not_move_the_median() -> None:
    learned = learn(None, Samples({}, {"a": [1.0, 1.1, 0.9]}), keep=["a"])
    learned = learn(learned, Samples({"a": 60.0}, {}), keep=["a"])
    assert learned.lookup()["a"][0] == 1.0


def test_tasks_no_longer_in_the_pipeline_are_dropped() -> None:
    learned = learn(None, Samples({"a": 1.0, "gone": 2.0}, {}), keep=["a", "gone"])
    assert set(learn(learned, Samples({}, {}), keep=["a", "new"]).lookup()) == {"a"}


def test_plan_prefers_the_hint_then_learned_then_none() -> None:
    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("hinted", print, expected_duration=0.25))
    pipeline.add(PipelineTask("known", print))
    pipeline.add(PipelineTask("new", print))
    learned = LearnedDurations(("hinted", "known"), [9.0, 2.0], [4, 3])
    estimates = plan(pipeline.compile(), learned)
    assert estimates.seconds == [0.25, 2.0, None]
    assert estimates.samples == [HINT, 3, NONE]
    assert estimates.learned == 1
    assert estimates.costs() == [0.25, 2.0, 1.0]
    assert [estimates.source(i) for i in range(3)] == ["hint", "learned (3 samples)", "none"]
    assert estimate_text(2.0, 1) == "2s, learned (1 sample)"
    assert estimate_text(None, NONE) == "none"


def test_reestimate_recomputes_the_critical_path_only() -> None:
    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("a", print, criticality="low"))
    pipeline.add(PipelineTask("b", print, dependencies=["a"], criticality="high"))
    pipeline.add(PipelineTask("c", print, dependencies=["a"]))
    compiled = pipeline.compile()
    assert compiled.critical_path == [2.0, 1.0, 1.0]
    levels, order = list(compiled.levels), list(compiled.order)
    compiled.reestimate([0.5, 1.0, 3.0])
    assert compiled.critical_path == [3.5, 1.0, 3.0]
    assert (compiled.levels, compiled.order) == (levels, order)
    with pytest.raises(ValueError, match="one entry per task"):
        compiled.reestimate([1.0])


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from("abcd"),
            st.lists(st.floats(0.0, 100.0), min_size=1, max_size=4),
            max_size=4,
        ),
        max_size=14,
    )
)
def test_learn_keeps_the_median_of_each_tasks_latest_samples(
    runs: list[dict[str, list[float]]],
) -> None:
    learned = None
    history: dict[str, list[float]] = {}
    for samples in runs:
        single = {k: v[0] for k, v in samples.items() if len(v) == 1}
        grouped = {k: v for k, v in samples.items() if len(v) > 1}
        learned = learn(learned, Samples(single, grouped), keep="abcd")
        for name, durations in samples.items():
            history.setdefault(name, []).extend(durations)
    expected = {k: (median(v[-WINDOW:]), len(v)) for k, v in history.items()}
    assert (learned.lookup() if learned is not None else {}) == expected


def test_plan_without_hints_takes_every_learned_duration() -> None:
    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("a", print))
    pipeline.add(PipelineTask("b", print, dependencies=["a"]))
    learned = LearnedDurations(("b", "a", "gone"), [2.0, 0.5, 9.0], [1, 4, 2])
    compiled = pipeline.compile()
    estimates = plan(compiled, learned)
    assert (estimates.seconds, estimates.samples, estimates.learned) == ([0.5, 2.0], [4, 1], 2)
    compiled.reestimate(estimates.costs())
    assert compiled.critical_path == [2.5, 2.0]
    assert plan(compiled, None).seconds == [None, None]


def test_the_same_tasks_in_the_same_order_learn_as_any_other_order() -> None:
    first = learn(None, Samples({"a": 1.0, "b": 4.0, "c": 9.0}, {}), keep="abc")
    assert first.names == ("a", "b", "c")
    in_order = learn(first, Samples({"a": 3.0, "b": 2.0, "c": 9.5}, {}), keep="abc")
    shuffled = learn(first, Samples({"c": 9.5, "a": 3.0, "b": 2.0}, {}), keep="abc")
    assert in_order.lookup() == shuffled.lookup() == {"a": (1.0, 2), "b": (2.0, 2), "c": (9.0, 2)}
    assert [list(c) for c in in_order.windows] == [list(c) for c in shuffled.windows]


def test_event_samples_take_successful_attempts_and_group_items() -> None:
    batches = [
        (
            ("a", "a", "b", "m[0]"),
            (0.5, 0.1, math.nan, 0.2),
            ("retrying", "succeeded", "succeeded", "succeeded"),
        ),
        (("m[1]", "c", "m[2]"), (0.4, 0.3, 0.1), ("succeeded", "cached", "failed")),
    ]
    samples = event_samples(batches, mapped={"m"})
    assert samples.single == {"a": 0.1}  # b: a result without an attempt; c: cached
    assert samples.grouped == {"m": [0.2, 0.4]}
    assert event_samples(batches[:1], mapped=()).single == {"a": 0.1, "m[0]": 0.2}
