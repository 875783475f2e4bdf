"""Trigger rules: all_success (default), all_done, any_success, with pipeopt.Missing."""

from __future__ import annotations

from typing import Any

import pytest

from pipeopt import (
    Missing,
    Pipeline,
    PipelineOptimizer,
    RunStatus,
    TaskState,
    UpstreamFailedError,
)


def _boom() -> int:
    raise ValueError("404 not found")


def test_all_done_runs_after_a_failed_upstream_and_receives_missing() -> None:
    p = Pipeline("calls")
    p.task(name="ok_call")(lambda: 1)
    p.task(name="bad_call")(_boom)
    seen: dict[str, Any] = {}

    @p.task(dependencies=["ok_call", "bad_call"], trigger="all_done")
    def aggregate(**calls: Any) -> int:
        seen.update(calls)
        return sum(v for v in calls.values() if v)

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.results["aggregate"] == 1
    missing = seen["bad_call"]
    assert isinstance(missing, Missing)
    assert not missing
    assert missing.task == "bad_call"
    assert missing.state is TaskState.FAILED
    assert isinstance(missing.error, ValueError)
    assert "404" in repr(missing)
    # The aggregate ran, but the run still reports the failure.
    assert result.status is RunStatus.FAILED
    assert result.tasks["aggregate"].state is TaskState.SUCCEEDED


def test_all_done_receives_a_skipped_upstream_and_default_trigger_is_skipped() -> None:
    p = Pipeline("chain")
    p.task(name="extract")(_boom)

    @p.task(dependencies=["extract"])
    def transform(extract: int) -> int:
        return extract

    @p.task(dependencies=[transform], trigger="all_done")
    def cleanup(transform: Any) -> str:
        assert isinstance(transform, Missing)
        return f"{transform.task} {transform.state.value}"

    @p.task(dependencies=[cleanup])
    def after_cleanup(cleanup: str) -> str:
        return cleanup.upper()

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.tasks["transform"].state is TaskState.SKIPPED
    assert isinstance(result.tasks["transform"].error, UpstreamFailedError)
    assert result.results["cleanup"] == "transform skipped"
    assert result.results["after_cleanup"] == "TRANSFORM SKIPPED"
    assert result.status is RunStatus.FAILED


def test_an_all_done_task_is_cancelled_with_everything_else_under_fail_fast() -> None:
    p = Pipeline("fast")
    p.task(name="bad")(_boom)
    ran: list[str] = []

    @p.task(dependencies=["bad"], trigger="all_done")
    def cleanup(bad: Any) -> None:
        ran.append("cleanup")

    result = PipelineOptimizer(max_workers=1, fail_fast=True).run(p)
    assert ran == []
    assert result.tasks["cleanup"].state is TaskState.CANCELLED
    assert result.status is RunStatus.CANCELLED


def test_all_done_receives_a_cancelled_upstream_of_an_interrupted_run() -> None:
    """A cancelled upstream is final too: the Missing says so (seen through the core)."""
    from pipeopt.scheduler import SchedulerCore

    p = Pipeline("core")
    p.task(name="a")(lambda: 1)

    @p.task(dependencies=["a"], trigger="all_done")
    def b(a: Any) -> Any:
        return a

    core = SchedulerCore(p.compile(), aging_interval=None)
    core.start()
    i = core.next_task(0.0)
    assert i == 0
    core.abandon_running(i, KeyboardInterrupt("stop"))
    assert core.outcomes[0].state is TaskState.CANCELLED
    missing = core.value_of(0)
    assert isinstance(missing, Missing)
    assert missing.state is TaskState.CANCELLED
    assert isinstance(missing.error, KeyboardInterrupt)


def test_any_success_runs_with_one_success_and_is_skipped_with_none() -> None:
    p = Pipeline("mirrors")
    p.task(name="mirror_a")(_boom)
    p.task(name="mirror_b")(lambda: "payload")
    p.task(name="mirror_c")(_boom)

    @p.task(dependencies=["mirror_a", "mirror_b"], trigger="any_success")
    def download(mirror_a: Any, mirror_b: Any) -> str:
        return str(next(v for v in (mirror_a, mirror_b) if v))

    @p.task(dependencies=["mirror_a", "mirror_c"], trigger="any_success")
    def hopeless(mirror_a: Any, mirror_c: Any) -> str:
        return "never"

    result = PipelineOptimizer(max_workers=3).run(p)
    assert result.results["download"] == "payload"
    assert result.tasks["hopeless"].state is TaskState.SKIPPED
    assert isinstance(result.tasks["hopeless"].error, UpstreamFailedError)


def test_a_mapped_upstream_is_passed_with_one_missing_per_failed_item() -> None:
    p = Pipeline("api")

    @p.task
    def urls() -> list[str]:
        return ["/a", "/missing", "/c"]

    @p.task(map_over=urls)
    def fetch(urls: str) -> str:
        if urls == "/missing":
            raise LookupError("404")
        return urls.upper()

    @p.task(dependencies=[fetch], trigger="all_done")
    def aggregate(fetch: list[Any]) -> list[str]:
        return [r if r else f"missing:{r.task}:{type(r.error).__name__}" for r in fetch]

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.results["aggregate"] == ["/A", "missing:fetch[1]:LookupError", "/C"]
    assert result.status is RunStatus.FAILED


def test_a_mapped_task_with_all_done_maps_over_missing_items_too() -> None:
    p = Pipeline("chained")

    @p.task
    def numbers() -> list[int]:
        return [1, 0, 4]

    @p.task(map_over=numbers)
    def invert(numbers: int) -> float:
        return 1 / numbers

    @p.task(map_over=invert, trigger="all_done")
    def describe(invert: Any) -> str:
        return f"{invert:g}" if not isinstance(invert, Missing) else "n/a"

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.results["describe"] == ["1", "n/a", "0.25"]


def test_an_unknown_trigger_is_refused_with_a_suggestion() -> None:
    p = Pipeline("typo")
    with pytest.raises(ValueError, match="did you mean 'all_done'"):
        p.task(name="x", trigger="all_don")(lambda: 1)
