"""Graph building and validation: every bad input gets its own clear error."""

from __future__ import annotations

import dataclasses
import gc
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
    RetryPolicy,
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


# -- bulk adding -------------------------------------------------------------


def test_add_many_makes_the_tasks_add_would() -> None:
    policy = RetryPolicy(max_attempts=3)
    settings: dict[str, Any] = {
        "criticality": "high",
        "retry_policy": policy,
        "timeout": 2.0,
        "expected_duration": 0.5,
        "persist": False,
        "description": "one of many",
        "group": "bulk",
        "trigger": "all_done",
    }
    bulk = Pipeline("bulk")
    made = bulk.add_many(["a", "b", "c"], noop, [[], ["a"], ["a", "b", "a"]], **settings)
    single = Pipeline("single")
    single.add(PipelineTask("a", noop, (), **settings))
    single.add(PipelineTask("b", noop, ["a"], **settings))
    single.add(PipelineTask("c", noop, ["a", "b", "a"], **settings))
    assert made == list(bulk)
    fields = [f.name for f in dataclasses.fields(PipelineTask)]
    for mine, theirs in zip(bulk, single, strict=True):
        assert [getattr(mine, f) for f in fields] == [getattr(theirs, f) for f in fields]
    assert bulk["c"].dependency_names == ("a", "b")


def test_add_many_takes_its_rows_from_a_generator() -> None:
    rows = [[], ["a"], ["a", "b"]]
    listed, generated = Pipeline("listed"), Pipeline("generated")
    listed.add_many(["a", "b", "c"], noop, rows)
    generated.add_many(["a", "b", "c"], noop, (row for row in rows))
    assert [t.dependency_names for t in generated] == [t.dependency_names for t in listed]
    with pytest.raises(ValueError, match="2 rows for 3 names"):
        Pipeline("short").add_many(["a", "b", "c"], noop, (row for row in rows[:2]))


def test_add_many_without_dependencies_and_with_map_over() -> None:
    p = Pipeline("bulk")
    p.add(PipelineTask("source", lambda: [1, 2]))
    p.add_many(["x", "y"], lambda source: source * 10, map_over="source")
    assert p["x"].dependency_names == ("source",)
    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.results["x"] == result.results["y"] == [10, 20]


@pytest.mark.parametrize(
    ("names", "rows", "error", "match"),
    [
        (["a", "b", "a"], None, DuplicateTaskError, "'a' already exists"),
        (["b", "old"], None, DuplicateTaskError, "'old' already exists"),
        (["a", "b"], [[], ["b"]], SelfDependencyError, "'b' depends on itself"),
        (["a", ""], None, ValueError, "non-empty string, got ''"),
        (["a", "b"], [[]], ValueError, "1 rows for 2 names"),
        (["a", "b"], [[], [3]], TypeError, "dependencies must be task names or tasks"),
    ],
)
def test_add_many_refuses_bad_rows_and_adds_nothing(
    names: list[Any], rows: Any, error: type[Exception], match: str
) -> None:
    p = Pipeline("bulk")
    p.add(PipelineTask("old", noop))
    with pytest.raises(error, match=match):
        p.add_many(names, noop, rows)
    assert list(p.tasks) == ["old"]


def test_add_many_checks_shared_settings_once() -> None:
    p = Pipeline("bulk")
    with pytest.raises(UnknownCriticalityError):
        p.add_many(["a", "b"], noop, criticality="urgent")
    with pytest.raises(NotCallableError):
        p.add_many(["a", "b"], 42)  # type: ignore[arg-type]
    assert len(p) == 0


def test_bulk_graphs_get_the_same_validation_errors() -> None:
    names = [f"task_{i}" for i in range(2_000)]
    rows = [[names[i - 1]] if i else [] for i in range(2_000)]
    typo = Pipeline("typo")
    typo.add_many(names, noop, [*rows[:-1], ["task_1998x"]])
    with pytest.raises(UnknownDependencyError, match="did you mean 'task_1998'"):
        typo.compile()
    cyclic = Pipeline("cyclic")
    cyclic.add_many(names, noop, [["task_1500"], *rows[1:]])
    with pytest.raises(CycleError) as info:
        cyclic.compile()
    assert info.value.cycle == ("task_0", "task_1500", *names[1:1500][::-1], "task_0")
    shown = "task_0 -> task_1500 -> task_1499 -> task_1498"
    assert str(info.value).startswith(f"dependency cycle: {shown}")
    assert "-> (1,482 more) ->" in str(info.value)
    assert str(info.value).endswith("task_2 -> task_1 -> task_0; remove one of these dependencies")


def test_tasks_sharing_a_function_share_its_injections() -> None:
    def body(a: int = 0, b: int = 0, **rest: int) -> int:
        return a + b + sum(rest.values())

    def pick(a: int = 0, b: int = 0) -> int:
        return a * 10 + b

    p = Pipeline("shared")
    p.add_many(["a", "b", "c"], lambda: 1)
    p.add_many(["p1", "p2", "p3"], pick, [["a"], ["b"], ["a", "c"]])
    p.add_many(["s1", "s2"], body, [["a", "c"], ["b", "c"]])
    p.add_many(["k1", "k2"], lambda **up: sorted(up), [["a"], ["b", "c"]])
    p.add_many(["n1", "n2"], lambda *_: 0, [["a"], ["b"]])
    compiled = p.compile()
    inj = {name: compiled.injections[compiled.index[name]] for name in compiled.names}
    assert inj["p1"] is inj["p3"]  # both name only 'a' of pick's parameters
    assert inj["p2"].by_name == (("b", "b"),)
    assert inj["s1"].rest_as_kwargs == ("c",)
    assert inj["n1"] is inj["n2"]  # a body that takes no upstream result by name
    result = PipelineOptimizer(max_workers=2).run(p)
    assert [result.results[n] for n in ("p1", "p2", "p3", "s1", "s2")] == [10, 1, 10, 2, 2]
    assert (result.results["k1"], result.results["k2"]) == (["a"], ["b", "c"])


def test_bulk_building_and_compiling_give_the_garbage_collector_back() -> None:
    before = gc.get_threshold()
    p = Pipeline("big")
    p.add_many([f"t{i}" for i in range(1_500)], noop)
    with pytest.raises(DuplicateTaskError):
        p.add_many(["fresh", "t3"], noop)
    assert "fresh" not in p
    p.compile()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
