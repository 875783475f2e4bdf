"""Graph building and validation: every bad input gets its own clear error."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from pipeopt import (
    CycleError,
    DuplicateTaskError,
    NotCallableError,
    Pipeline,
    PipelineError,
    PipelineOptimizer,
    PipelineRunningError,
    PipelineTask,
    SelfDependencyError,
    TaskSignatureError,
    UnknownCriticalityError,
    UnknownDependencyError,
)


def noop() -> None:
    return None


def test_decorator_registers_tasks_and_dependencies_by_name_or_object() -> None:
    p = Pipeline("g")

    @p.task
    def a() -> int:
        return 1

    @p.task(dependencies=[a], criticality="high")
    def b(a: int) -> int:
        return a + 1

    @p.task(dependencies="b")
    def c(b: int) -> int:
        return b

    assert isinstance(a, PipelineTask)
    assert a() == 1  # still callable like the function
    assert b.dependency_names == ("a",)
    assert c.dependency_names == ("b",)
    compiled = p.compile()
    assert [compiled.tasks[i].name for i in compiled.order] == ["a", "b", "c"]


def test_cycle_error_lists_the_cycle_in_order() -> None:
    p = Pipeline("cyclic")
    p.add(PipelineTask("start", noop))
    p.add(PipelineTask("a", noop, dependencies=["start", "c"]))
    p.add(PipelineTask("b", noop, dependencies=["a"]))
    p.add(PipelineTask("c", noop, dependencies=["b"]))
    with pytest.raises(CycleError) as info:
        p.compile()
    cycle = info.value.cycle
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    # each name depends on the next one: a needs c needs b needs a
    for here, there in itertools.pairwise(cycle):
        assert there in p[here].dependency_names
    assert " -> ".join(cycle) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PipelineError)


def test_self_dependency() -> None:
    with pytest.raises(SelfDependencyError, match="depends on itself"):
        PipelineTask("x", noop, dependencies=["x"])


def test_unknown_dependency_suggests_the_closest_name() -> None:
    p = Pipeline("typo")
    p.add(PipelineTask("extract_orders", noop))
    p.add(PipelineTask("load", noop, dependencies=["extract_order"]))
    with pytest.raises(UnknownDependencyError) as info:
        p.compile()
    assert info.value.suggestion == "extract_orders"
    assert "did you mean 'extract_orders'?" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_duplicate_name() -> None:
    p = Pipeline("dup")
    p.add(PipelineTask("a", noop))
    with pytest.raises(DuplicateTaskError, match="already exists"):
        p.add(PipelineTask("a", noop))


@pytest.mark.parametrize("label", ["urgent", "", 3, None])
def test_unknown_criticality(label: Any) -> None:
    with pytest.raises(UnknownCriticalityError) as info:
        PipelineTask("a", noop, criticality=label)
    assert "blocker, critical, high, medium, low, deferred" in str(info.value)


def test_criticality_labels_are_case_insensitive() -> None:
    assert PipelineTask("a", noop, criticality="CRITICAL").criticality.label == "critical"


def test_not_callable() -> None:
    with pytest.raises(NotCallableError, match="func must be callable"):
        PipelineTask("a", 42)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True])
def test_bad_timeout(timeout: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="timeout"):
        PipelineTask("a", noop, timeout=timeout)


def test_parameter_that_matches_nothing() -> None:
    p = Pipeline("sig")

    @p.task
    def a() -> int:
        return 1

    @p.task(dependencies=[a])
    def b(a: int, mystery: int) -> int:
        return a + mystery

    with pytest.raises(TaskSignatureError, match="'mystery' matches no dependency"):
        p.compile()


def test_adding_to_a_running_pipeline_is_refused() -> None:
    p = Pipeline("live")
    errors: list[BaseException] = []

    @p.task
    def grow() -> None:
        try:
            p.add(PipelineTask("late", noop))
        except PipelineRunningError as exc:
            errors.append(exc)

    PipelineOptimizer(max_workers=1).run(p)
    assert len(errors) == 1
    assert isinstance(errors[0], RuntimeError)
    p.add(PipelineTask("late", noop))  # allowed again once the run is over


def test_inherited_criticality_and_critical_path() -> None:
    p = Pipeline("inherit")
    p.add(PipelineTask("extract", noop, criticality="low", expected_duration=2.0))
    p.add(PipelineTask("report", noop, dependencies=["extract"], criticality="blocker"))
    p.add(PipelineTask("side", noop, criticality="deferred"))
    compiled = p.compile()
    levels = {compiled.tasks[i].name: compiled.levels[i] for i in range(len(compiled))}
    assert levels == {"extract": 0, "report": 0, "side": 5}
    paths = dict(zip(compiled.names, compiled.critical_path, strict=True))
    assert paths == {"extract": 3.0, "report": 1.0, "side": 1.0}
