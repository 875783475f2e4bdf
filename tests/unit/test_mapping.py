"""Dynamic mapping: one real task per item of an upstream result known only at run time."""

from __future__ import annotations

import collections
import random
import threading
from typing import Any

import pytest

from pipeopt import (
    CircuitBreaker,
    MappedItemsFailedError,
    MapSourceError,
    Pipeline,
    PipelineOptimizer,
    PipelineTask,
    RetryPolicy,
    RunStatus,
    TaskSignatureError,
    TaskState,
    UpstreamFailedError,
)
from pipeopt.scheduler import SchedulerCore


def test_each_item_is_a_task_and_dependents_get_results_in_input_order() -> None:
    p = Pipeline("files")

    @p.task
    def list_files() -> list[str]:
        return ["c.csv", "a.csv", "b.csv"]

    @p.task(dependencies=[list_files], map_over=list_files)
    def size(list_files: str) -> int:
        return len(list_files) * 10 + ord(list_files[0])

    @p.task(dependencies=[size])
    def total(size: list[int]) -> list[int]:
        return size

    result = PipelineOptimizer(max_workers=4).run(p)
    assert result.status is RunStatus.SUCCEEDED
    expected = [50 + ord("c"), 50 + ord("a"), 50 + ord("b")]
    assert result.results["total"] == expected
    assert result.results["size"] == expected
    for k in range(3):
        item = result.tasks[f"size[{k}]"]
        assert item.state is TaskState.SUCCEEDED
        assert item.attempts == 1
        assert item.criticality == "medium"
    assert result.tasks["size"].state is TaskState.SUCCEEDED
    assert result.tasks["size"].attempts == 0


def test_a_thousand_items_with_faults_and_retries_each_succeed_exactly_once() -> None:
    faults = random.Random(7)
    fault_lock = threading.Lock()
    ledger: collections.Counter[int] = collections.Counter()
    tries: collections.Counter[int] = collections.Counter()
    p = Pipeline("flaky")

    @p.task
    def ids() -> range:
        return range(1000)

    @p.task(
        map_over=ids,
        retry_policy=RetryPolicy(max_attempts=20, base_delay=0.0, max_delay=0.0, jitter=0.0),
    )
    def call(ids: int) -> int:
        with fault_lock:
            tries[ids] += 1
            fail = faults.random() < 0.2
            if not fail:
                ledger[ids] += 1
        if fail:
            raise ConnectionError(f"item {ids}: flaky")
        return ids * ids

    @p.task(dependencies=[call])
    def checksum(call: list[int]) -> int:
        return sum(call)

    result = PipelineOptimizer(max_workers=8, seed=1).run(p)
    assert result.ok, result.failed
    assert ledger == collections.Counter(range(1000))  # every item once
    assert result.results["checksum"] == sum(i * i for i in range(1000))
    retried = [k for k in range(1000) if tries[k] > 1]
    assert retried, "p=0.2 faults over 1,000 items must retry some"
    for k in retried:
        assert result.tasks[f"call[{k}]"].attempts == tries[k]
    assert sum(o.attempts for n, o in result.tasks.items() if n.startswith("call[")) == sum(
        tries.values()
    )


def test_mapping_over_an_empty_list_succeeds_with_an_empty_list() -> None:
    p = Pipeline("empty")
    ran: list[Any] = []

    @p.task
    def nothing() -> list[int]:
        return []

    @p.task(map_over=nothing)
    def each(nothing: int) -> int:
        ran.append(nothing)
        return nothing

    @p.task(dependencies=[each])
    def after(each: list[int]) -> int:
        return len(each)

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.ok
    assert ran == []
    assert result.results["each"] == []
    assert result.results["after"] == 0
    assert result.tasks["each"].state is TaskState.SUCCEEDED


def test_nested_mapping_maps_over_a_mapped_task() -> None:
    p = Pipeline("nested")

    @p.task
    def days() -> list[int]:
        return [1, 2, 3]

    @p.task(map_over=days)
    def hours(days: int) -> list[int]:
        return [days * 100 + h for h in range(days)]

    @p.task(map_over=hours)
    def count(hours: list[int]) -> int:
        return len(hours)

    @p.task(map_over=count, criticality="blocker")
    def square(count: int) -> int:
        return count * count

    result = PipelineOptimizer(max_workers=3).run(p)
    assert result.ok, result.failed
    assert result.results["hours"] == [[100], [200, 201], [300, 301, 302]]
    assert result.results["count"] == [1, 2, 3]
    assert result.results["square"] == [1, 4, 9]
    # Inherited criticality reaches the items of upstream mapped tasks.
    assert result.tasks["count[2]"].criticality == "blocker"
    assert result.tasks["count[2]"].declared_criticality == "medium"


def test_failed_items_fail_the_mapped_task_and_skip_its_dependents() -> None:
    p = Pipeline("partial")

    @p.task
    def source() -> list[int]:
        return [1, 0, 2, 0]

    @p.task(map_over=source)
    def invert(source: int) -> float:
        return 1 / source

    @p.task(dependencies=[invert])
    def report(invert: list[float]) -> float:
        return sum(invert)

    @p.task
    def independent() -> str:
        return "still runs"

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.status is RunStatus.FAILED
    states = {n: o.state for n, o in result.tasks.items()}
    assert states["invert[0]"] is TaskState.SUCCEEDED
    assert states["invert[1]"] is TaskState.FAILED
    assert states["invert[2]"] is TaskState.SUCCEEDED
    assert states["invert[3]"] is TaskState.FAILED
    assert isinstance(result.tasks["invert[1]"].error, ZeroDivisionError)
    error = result.tasks["invert"].error
    assert isinstance(error, MappedItemsFailedError)
    assert (error.failed, error.total, error.first) == (2, 4, "invert[1]")
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert states["report"] is TaskState.SKIPPED
    assert isinstance(result.tasks["report"].error, UpstreamFailedError)
    assert result.results["independent"] == "still runs"


def test_fail_fast_cancels_the_items_not_started() -> None:
    p = Pipeline("fast")

    @p.task
    def source() -> list[int]:
        return list(range(50))

    @p.task(map_over=source)
    def work(source: int) -> int:
        if source == 0:
            raise ValueError("first item breaks")
        return source

    result = PipelineOptimizer(max_workers=1, fail_fast=True).run(p)
    assert result.status is RunStatus.CANCELLED
    assert result.tasks["work[0]"].state is TaskState.FAILED
    assert result.tasks["work[49]"].state is TaskState.CANCELLED
    assert result.tasks["work"].state is TaskState.CANCELLED


@pytest.mark.parametrize("value", [5, "abc", {"a": 1}, None])
def test_mapping_over_a_non_list_fails_with_a_clear_error(value: object) -> None:
    p = Pipeline("bad")

    @p.task
    def source() -> object:
        return value

    @p.task(map_over=source)
    def each(source: object) -> object:
        return source

    result = PipelineOptimizer(max_workers=1).run(p)
    error = result.tasks["each"].error
    assert isinstance(error, MapSourceError)
    assert "make 'source' return a list" in str(error)
    assert result.status is RunStatus.FAILED


def test_a_mapped_task_must_take_its_item() -> None:
    p = Pipeline("sig")

    @p.task
    def source() -> list[int]:
        return [1]

    @p.task(map_over=source)
    def each() -> int:
        return 1

    with pytest.raises(TaskSignatureError, match="receives each item as parameter 'source'"):
        p.compile()


def test_items_are_ordered_by_the_same_rules_as_tasks() -> None:
    p = Pipeline("order")
    order: list[str] = []

    @p.task
    def source() -> list[int]:
        return [0, 1, 2]

    @p.task(map_over=source, criticality="deferred")
    def low_items(source: int) -> None:
        order.append(f"low{source}")

    @p.task(map_over=source, criticality="blocker")
    def urgent_items(source: int) -> None:
        order.append(f"urgent{source}")

    result = PipelineOptimizer(max_workers=1, executor="sync").run(p)
    assert result.ok
    assert order == ["urgent0", "urgent1", "urgent2", "low0", "low1", "low2"]


def test_core_counts_items_in_the_total_and_ends_when_all_are_final() -> None:
    p = Pipeline("core")

    @p.task
    def source() -> list[str]:
        return ["x", "y"]

    @p.task(map_over=source)
    def each(source: str) -> str:
        return source.upper()

    compiled = p.compile()
    core = SchedulerCore(compiled, aging_interval=None)
    core.start()
    assert core.total == 2
    i = core.next_task(0.0)
    assert i == 0
    core.succeed(i, ["x", "y"], None)
    assert core.total == 4  # two items joined the run
    items = [core.next_task(0.0), core.next_task(0.0)]
    assert [core.outcomes[j].name for j in items if j is not None] == ["each[0]", "each[1]"]
    assert core.arguments(items[1] or 0) == {"source": "y"}
    for j in items:
        assert j is not None
        core.succeed(j, core.arguments(j)["source"].upper(), None)
    assert core.done
    assert core.results["each"] == ["X", "Y"]
    # The items joined the run's lists, not the compiled pipeline's (which later runs reuse).
    assert core.names == ["source", "each", "each[0]", "each[1]"]
    assert compiled.names == ["source", "each"]
    assert len(compiled.tasks) == len(compiled.levels) == len(compiled.critical_path) == 2


def test_items_share_their_tasks_circuit_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=2, recovery_timeout=100.0, name="api")

    def call(source: int) -> int:
        if source > 1:
            raise ValueError(source)
        return source

    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("source", lambda: [1, 2, 3, 4]))
    pipeline.add(
        PipelineTask("call", call, ("source",), map_over="source", circuit_breaker=breaker)
    )
    tasks = PipelineOptimizer(max_workers=1).run(pipeline).tasks
    errors = [type(tasks[f"call[{k}]"].error).__name__ for k in range(4)]
    assert errors == ["NoneType", "ValueError", "ValueError", "CircuitOpenError"]
