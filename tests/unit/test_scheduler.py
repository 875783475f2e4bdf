"""The scheduler: exactly-once execution, dispatch order, failure semantics, metrics."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeopt import (
    ExecutionContext,
    Pipeline,
    PipelineOptimizer,
    PipelineTask,
    RunStatus,
    TaskState,
    TaskTimeoutError,
    UpstreamFailedError,
)


@st.composite
def dags(draw: st.DrawFn) -> tuple[int, list[list[int]], list[int]]:
    """A random DAG: n nodes, each depending on earlier ones, plus an insertion order."""
    n = draw(st.integers(min_value=1, max_value=40))
    deps = [
        sorted(draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=3))) if i else []
        for i in range(n)
    ]
    order = draw(st.permutations(range(n)))
    return n, deps, list(order)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags(), st.sampled_from([1, 2, 8]), st.sampled_from(["thread", "sync"]))
def test_every_task_runs_once_and_after_all_its_dependencies(
    dag: tuple[int, list[list[int]], list[int]], workers: int, executor: str
) -> None:
    n, deps, order = dag
    log: list[str] = []
    lock = threading.Lock()
    p = Pipeline("random")
    labels = ["blocker", "critical", "high", "medium", "low", "deferred"]

    def body(name: str) -> Any:
        def run() -> str:
            with lock:
                log.append(name)
            return name

        return run

    for i in order:  # permuted insertion order: nothing may depend on it
        p.add(
            PipelineTask(
                f"t{i}",
                body(f"t{i}"),
                dependencies=[f"t{d}" for d in deps[i]],
                criticality=labels[i % 6],
            )
        )
    result = PipelineOptimizer(max_workers=workers, executor=executor).run(p)
    assert result.status is RunStatus.SUCCEEDED
    assert sorted(log) == sorted(f"t{i}" for i in range(n))  # exactly once
    position = {name: k for k, name in enumerate(log)}
    for i in range(n):
        for d in deps[i]:
            assert position[f"t{d}"] < position[f"t{i}"]
    assert all(o.attempts == 1 for o in result.tasks.values())


def _recording_pipeline(
    specs: list[tuple[str, str, list[str], float | None]],
) -> tuple[Pipeline, list[str]]:
    ran: list[str] = []
    p = Pipeline("order")
    for name, level, deps, cost in specs:
        p.add(
            PipelineTask(
                name,
                lambda name=name: ran.append(name),
                dependencies=deps,
                criticality=level,
                expected_duration=cost,
            )
        )
    return p, ran


def test_one_worker_dispatches_by_criticality_then_critical_path_then_fifo() -> None:
    p, ran = _recording_pipeline(
        [
            ("low-1", "low", [], None),
            ("medium-short", "medium", [], 1.0),
            ("medium-long", "medium", [], 5.0),
            ("critical", "critical", [], None),
            ("medium-short-2", "medium", [], 1.0),
            ("deferred", "deferred", [], None),
            ("high", "high", [], None),
        ]
    )
    PipelineOptimizer(max_workers=1, aging_interval=None).run(p)
    assert ran == [
        "critical",
        "high",
        "medium-long",
        "medium-short",
        "medium-short-2",
        "low-1",
        "deferred",
    ]


def test_low_upstream_of_a_blocker_runs_first() -> None:
    p, ran = _recording_pipeline(
        [
            ("critical-a", "critical", [], None),
            ("critical-b", "critical", [], None),
            ("low-extract", "low", [], None),
            ("report", "blocker", ["low-extract"], None),
        ]
    )
    result = PipelineOptimizer(max_workers=1, aging_interval=None).run(p)
    assert ran[:2] == ["low-extract", "report"]
    assert result.tasks["low-extract"].criticality == "blocker"


def test_aging_lets_deferred_finish_under_sustained_critical_load() -> None:
    ran: list[str] = []
    p = Pipeline("aging")
    p.add(PipelineTask("deferred", lambda: ran.append("deferred"), criticality="deferred"))
    for n in range(150):

        def critical(n: int = n) -> None:
            time.sleep(0.002)
            ran.append(f"critical-{n}")

        p.add(PipelineTask(f"critical-{n}", critical, criticality="critical"))
    PipelineOptimizer(max_workers=1, aging_interval=0.001).run(p)
    assert ran.index("deferred") < 100  # not last: aging promoted it
    ran.clear()
    PipelineOptimizer(max_workers=1, aging_interval=None).run(p)
    assert ran[-1] == "deferred"  # the control: strict priority starves it to the end


def test_failure_skips_exactly_the_descendants_and_siblings_go_on() -> None:
    p = Pipeline("fail")
    graph = {
        "root": [],
        "bad": ["root"],
        "child": ["bad"],
        "grandchild": ["child", "sibling"],
        "sibling": ["root"],
        "cousin": ["sibling"],
        "other": [],
    }

    def make(name: str) -> Any:
        def body() -> str:
            if name == "bad":
                raise ValueError("bad input row 17")
            return name

        return body

    for name, deps in graph.items():
        p.add(PipelineTask(name, make(name), dependencies=deps))
    result = PipelineOptimizer(max_workers=3).run(p)
    states = {name: o.state for name, o in result.tasks.items()}
    assert states == {
        "root": TaskState.SUCCEEDED,
        "bad": TaskState.FAILED,
        "child": TaskState.SKIPPED,
        "grandchild": TaskState.SKIPPED,
        "sibling": TaskState.SUCCEEDED,
        "cousin": TaskState.SUCCEEDED,
        "other": TaskState.SUCCEEDED,
    }
    assert result.status is RunStatus.FAILED
    error = result.tasks["bad"].error
    assert isinstance(error, ValueError)
    assert str(error) == "bad input row 17"
    assert "bad input row 17" in (result.tasks["bad"].traceback or "")
    skipped = result.tasks["grandchild"].error
    assert isinstance(skipped, UpstreamFailedError)
    assert skipped.upstream == "bad"
    with pytest.raises(ValueError, match="row 17"):
        result.raise_for_status()


def test_fail_fast_cancels_what_has_not_started() -> None:
    p = Pipeline("ff")
    gate = threading.Event()
    slow_started = threading.Event()

    def boom() -> None:
        slow_started.wait(5)
        raise RuntimeError("x")

    def slow() -> str:
        slow_started.set()
        gate.wait(5)
        return "done"

    p.add(PipelineTask("boom", boom, criticality="blocker"))
    p.add(PipelineTask("slow", slow, criticality="critical"))
    for n in range(20):
        p.add(PipelineTask(f"later-{n}", lambda: None, criticality="low"))
    optimizer = PipelineOptimizer(max_workers=2, fail_fast=True)

    def release_after_failure() -> None:
        while optimizer.progress()[3] == 0:
            time.sleep(0.001)
        gate.set()

    threading.Thread(target=release_after_failure, daemon=True).start()
    result = optimizer.run(p)
    assert result.status is RunStatus.CANCELLED
    assert result.tasks["boom"].state is TaskState.FAILED
    assert result.tasks["slow"].state is TaskState.SUCCEEDED  # running ones finish
    cancelled = [n for n, o in result.tasks.items() if o.state is TaskState.CANCELLED]
    assert len(cancelled) == 20


def test_context_upstream_custom_metrics_and_injection() -> None:
    p = Pipeline("ctx")
    seen: dict[str, Any] = {}

    @p.task
    def a() -> int:
        return 2

    @p.task(name="b-with-dash")
    def b() -> int:
        return 3

    @p.task(dependencies=["a", "b-with-dash"], criticality="high")
    def c(context: ExecutionContext, a: int, **rest: int) -> int:
        seen["upstream"] = context.upstream
        seen["rest"] = rest
        seen["attempt"] = context.attempt
        seen["criticality"] = context.criticality
        context.record_custom_metric("rows", 42)
        context.logger.info("hello")
        return a * rest["b-with-dash"]

    registry = CollectorRegistry()
    result = PipelineOptimizer(max_workers=2, registry=registry).run(p)
    assert result.results["c"] == 6
    assert seen == {
        "upstream": {"a": 2, "b-with-dash": 3},
        "rest": {"b-with-dash": 3},
        "attempt": 1,
        "criticality": "high",
    }
    assert result.tasks["c"].custom_metrics == {"rows": 42.0}
    assert (
        registry.get_sample_value(
            "pipeline_task_custom_metric",
            {"pipeline": p.name, "group": "high", "task": "c", "name": "rows"},
        )
        == 42.0
    )


def test_async_generator_and_plain_bodies() -> None:
    p = Pipeline("kinds")

    @p.task
    async def fetch() -> int:
        await asyncio.sleep(0.001)
        return 5

    @p.task(dependencies=[fetch])
    def chunks(fetch: int) -> Any:
        yield from range(fetch)

    @p.task(dependencies=[chunks])
    async def agen(chunks: list[int]) -> Any:
        for item in chunks:
            yield item * 2

    result = PipelineOptimizer(max_workers=2).run(p)
    assert result.results == {"fetch": 5, "chunks": [0, 1, 2, 3, 4], "agen": [0, 2, 4, 6, 8]}


def test_timeout_fails_the_attempt_and_frees_the_slot() -> None:
    p = Pipeline("timeout")
    release = threading.Event()

    @p.task(timeout=0.2)
    def stuck(context: ExecutionContext) -> None:
        release.wait(30)

    @p.task
    def independent() -> str:
        return "ran"

    @p.task(timeout=0.2)
    async def stuck_async() -> None:
        await asyncio.sleep(30)

    result = PipelineOptimizer(max_workers=1).run(p)
    release.set()
    assert result.tasks["stuck"].state is TaskState.FAILED
    assert isinstance(result.tasks["stuck"].error, TaskTimeoutError)
    assert isinstance(result.tasks["stuck_async"].error, TaskTimeoutError)
    assert result.results["independent"] == "ran"


def test_metrics_in_the_optimizers_own_registry() -> None:
    p = Pipeline("metrics")
    for n in range(5):
        p.add(PipelineTask(f"ok-{n}", lambda: None, criticality="critical"))
    p.add(PipelineTask("bad", lambda: 1 / 0))
    registry = CollectorRegistry()
    optimizer = PipelineOptimizer(max_workers=2, registry=registry)
    optimizer.run(p)
    get = registry.get_sample_value
    ok0 = {"pipeline": "metrics", "group": "critical", "task": "ok-0"}
    bad = {"pipeline": "metrics", "group": "medium", "task": "bad"}
    this = {"pipeline": "metrics"}
    assert get("pipeline_task_latency_seconds_count", ok0) == 1.0
    assert get("pipeline_task_failures_total", bad) == 1.0
    assert get("pipeline_task_failures_total", ok0) == 0.0
    assert get("pipeline_tasks_active", this) == 0.0
    assert get("pipeline_critical_backlog", this) == 0.0
    assert get("pipeline_runs_total", {**this, "status": "failed"}) == 1.0
    optimizer.run(p)
    assert get("pipeline_task_latency_seconds_count", ok0) == 2.0
    # a second optimizer has its own registry: nothing leaks between them
    other = PipelineOptimizer(max_workers=1)
    failed_runs = {**this, "status": "failed"}
    assert other.registry.get_sample_value("pipeline_runs_total", failed_runs) is None


def test_live_gauges_while_running() -> None:
    p = Pipeline("live")
    started = threading.Barrier(3)
    release = threading.Event()
    for n in range(2):

        def hold() -> None:
            started.wait(5)
            release.wait(5)

        p.add(PipelineTask(f"hold-{n}", hold, criticality="low"))
    for n in range(3):
        p.add(PipelineTask(f"crit-{n}", lambda: None, criticality="critical", dependencies=[]))
    # the critical ones run first; make them wait behind the holders instead
    p2 = Pipeline("live2")
    for task in p:
        p2.add(task)
    optimizer = PipelineOptimizer(max_workers=2, aging_interval=None)
    thread = threading.Thread(target=optimizer.run, args=(p,))
    thread.start()
    try:
        snapshot = None
        for _ in range(500):
            snapshot = optimizer.snapshot()
            if snapshot.tasks_finished >= 3:
                break
            time.sleep(0.01)
        started.wait(5)
        snapshot = optimizer.snapshot()
        assert snapshot.tasks_active == 2
        active = optimizer.registry.get_sample_value("pipeline_tasks_active", {"pipeline": "live"})
        assert active == 2.0
        assert snapshot.tasks["hold-0"].state is TaskState.RUNNING
    finally:
        release.set()
        thread.join(10)
    assert optimizer.snapshot().status is RunStatus.SUCCEEDED


def test_many_tasks_wide_and_deep() -> None:
    p = Pipeline("big")
    rng = random.Random(7)
    layers: list[list[str]] = []
    for layer in range(20):
        names = [f"l{layer}-{k}" for k in range(100)]
        for name in names:
            deps = rng.sample(layers[-1], rng.randint(1, 3)) if layers else []
            p.add(PipelineTask(name, lambda: None, dependencies=deps))
        layers.append(names)
    result = PipelineOptimizer(max_workers=8).run(p)
    assert result.ok
    assert result.counts()["succeeded"] == 2000
