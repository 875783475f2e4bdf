"""Retries, breakers and timeouts inside the scheduler (no long real sleeps)."""

from __future__ import annotations

import random
import threading
from collections import Counter

from prometheus_client import CollectorRegistry

from pipeopt import ExecutionContext, Pipeline, PipelineOptimizer, PipelineTask, TaskState
from pipeopt.breaker import CircuitBreaker
from pipeopt.errors import CircuitOpenError, TaskTimeoutError
from pipeopt.retry import RetryPolicy


def test_task_in_backoff_does_not_hold_the_only_worker() -> None:
    order: list[str] = []
    p = Pipeline("backoff")
    calls = Counter[str]()

    def flaky() -> str:
        calls["flaky"] += 1
        order.append(f"flaky-{calls['flaky']}")
        if calls["flaky"] == 1:
            raise ConnectionError("first try fails")
        return "ok"

    p.add(
        PipelineTask(
            "flaky",
            flaky,
            criticality="blocker",
            retry_policy=RetryPolicy(max_attempts=2, base_delay=0.3, jitter=0.0, max_delay=0.3),
        )
    )
    p.add(PipelineTask("independent", lambda: order.append("independent"), criticality="low"))
    result = PipelineOptimizer(max_workers=1).run(p)
    assert result.ok
    # the blocker ran first, failed, was parked; the low task used the worker meanwhile
    assert order == ["flaky-1", "independent", "flaky-2"]
    outcome = result.tasks["flaky"]
    assert outcome.attempts == 2
    assert [type(a.error) for a in outcome.attempt_history] == [ConnectionError, type(None)]


def test_ten_thousand_flaky_tasks_all_succeed_exactly_once() -> None:
    ledger: list[str] = []
    lock = threading.Lock()
    attempts = Counter[str]()
    rng = random.Random(42)
    fail_plan = {f"t{n}": [rng.random() < 0.2 for _ in range(8)] for n in range(10_000)}

    def make(name: str) -> object:
        def body(context: ExecutionContext) -> None:
            assert context.attempt == attempts[name] + 1
            attempts[name] += 1
            if fail_plan[name][context.attempt - 1] and context.attempt < 8:
                raise OSError(f"{name} transient failure")
            with lock:
                ledger.append(name)

        return body

    policy = RetryPolicy(max_attempts=8, base_delay=0.0005, max_delay=0.002)
    p = Pipeline("flaky")
    for name in fail_plan:
        p.add(PipelineTask(name, make(name), retry_policy=policy))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    result = PipelineOptimizer(max_workers=8, registry=registry, seed=1).run(p)
    assert result.ok
    assert sorted(ledger) == sorted(fail_plan)  # each side effect exactly once
    retries = sum(o.attempts - 1 for o in result.tasks.values())
    assert retries == sum(attempts.values()) - len(fail_plan) > 1_000
    exported = sum(
        sample.value
        for family in registry.collect()
        if family.name == "pipeline_task_retries"
        for sample in family.samples
        if sample.name == "pipeline_task_retries_total"
    )
    assert exported == retries


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_open_breaker_fails_fast_without_running_bodies() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        failure_threshold=2, recovery_timeout=60, name="warehouse", clock=clock
    )
    ran: list[str] = []

    def down(name: str) -> object:
        def body() -> None:
            ran.append(name)
            raise ConnectionError("warehouse is down")

        return body

    p = Pipeline("breaker")
    for n in range(6):
        p.add(PipelineTask(f"load-{n}", down(f"load-{n}"), circuit_breaker=breaker))  # type: ignore[arg-type]
    registry = CollectorRegistry()
    result = PipelineOptimizer(max_workers=1, registry=registry).run(p)
    assert len(ran) == 2  # the threshold; the other four never ran
    errors = [type(o.error) for o in result.tasks.values()]
    assert errors.count(ConnectionError) == 2
    assert errors.count(CircuitOpenError) == 4
    assert all(
        o.attempts == 0 for o in result.tasks.values() if isinstance(o.error, CircuitOpenError)
    )
    assert (
        registry.get_sample_value(
            "pipeline_circuit_breaker_state", {"pipeline": "breaker", "breaker": "warehouse"}
        )
        == 2
    )


def test_retry_waits_for_the_breaker_instead_of_spending_attempts() -> None:
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=0.2, name="api")
    calls = Counter[str]()

    def body() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("blip")
        return "ok"

    p = Pipeline("wait")
    p.add(
        PipelineTask(
            "call-api",
            body,
            circuit_breaker=breaker,
            retry_policy=RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001),
        )
    )
    result = PipelineOptimizer(max_workers=1).run(p)
    assert result.ok
    assert result.tasks["call-api"].attempts == 2  # the open period cost no attempt
    assert breaker.statistics().rejected_calls >= 1
    assert breaker.statistics().state == 0


def test_timeout_is_retried_only_when_the_policy_says_so() -> None:
    release = threading.Event()
    seen = Counter[str]()

    def stuck(name: str) -> object:
        def body(context: ExecutionContext) -> str:
            seen[name] += 1
            if context.attempt == 1:
                release.wait(10)
            return "done"

        return body

    p = Pipeline("timeouts")
    p.add(
        PipelineTask(
            "retried",
            stuck("retried"),  # type: ignore[arg-type]
            timeout=0.2,
            retry_policy=RetryPolicy(max_attempts=2, base_delay=0.0, retry_timeouts=True),
        )
    )
    p.add(
        PipelineTask(
            "not-retried",
            stuck("not-retried"),  # type: ignore[arg-type]
            timeout=0.2,
            retry_policy=RetryPolicy(max_attempts=2, base_delay=0.0),
        )
    )
    result = PipelineOptimizer(max_workers=2).run(p)
    release.set()
    assert result.tasks["retried"].state is TaskState.SUCCEEDED
    assert result.tasks["retried"].attempts == 2
    assert result.tasks["not-retried"].state is TaskState.FAILED
    assert isinstance(result.tasks["not-retried"].error, TaskTimeoutError)
    assert result.tasks["not-retried"].attempts == 1
