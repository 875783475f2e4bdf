"""The dashboard's pure parts: snapshot → JSON, chart history, response reuse."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from pipeopt.dashboard.cache import CacheAction, RenderCache, cache_action
from pipeopt.dashboard.model import (
    MAX_ERROR_CHARS,
    SCHEMA_VERSION,
    History,
    HistoryPoint,
    build_metrics_json,
    encode_json,
    isoformat,
    sample,
)
from pipeopt.result import RunSnapshot, RunStatus, TaskOutcome, TaskState

NOW = 1_800_000_000.0

REQUIRED_KEYS = {
    "schema",
    "run_id",
    "pipeline",
    "status",
    "started_at",
    "elapsed_s",
    "last_update",
    "tasks_total",
    "tasks_finished",
    "tasks_active",
    "critical_backlog",
    "failures_total",
    "retries_total",
    "throughput_per_minute",
    "avg_latency_ms",
    "recent_latency_ms",
    "counts",
    "tasks",
    "breakers",
    "batch_sizes",
    "history",
}


def outcome(
    name: str,
    state: TaskState,
    *,
    started: float | None = None,
    finished: float | None = None,
    attempts: int = 0,
    criticality: str = "medium",
    error: BaseException | None = None,
) -> TaskOutcome:
    return TaskOutcome(
        name=name,
        criticality=criticality,
        state=state,
        attempts=attempts,
        started_at=started,
        finished_at=finished,
        error=error,
    )


def snapshot(
    tasks: Sequence[TaskOutcome] = (),
    *,
    started_at: float | None = NOW - 120.0,
    status: RunStatus | None = RunStatus.RUNNING,
    **fields: Any,
) -> RunSnapshot:
    values: dict[str, Any] = {
        "run_id": "run-1" if started_at is not None else None,
        "pipeline": "etl" if started_at is not None else None,
        "status": status,
        "started_at": started_at,
        "taken_at": NOW,
        "tasks_total": len(tasks),
        "tasks_active": sum(t.state is TaskState.RUNNING for t in tasks),
        "critical_backlog": 0,
        "tasks_finished": sum(t.state.is_final for t in tasks),
        "failures_total": sum(t.state is TaskState.FAILED for t in tasks),
        "retries_total": 0,
        "tasks": {t.name: t for t in tasks},
        "batch_sizes": {},
        "breakers": {},
    }
    values.update(fields)
    return RunSnapshot(**values)


def test_before_any_run_every_key_is_present_and_empty() -> None:
    doc = build_metrics_json(snapshot(started_at=None, status=None), [], NOW)

    assert doc.keys() >= REQUIRED_KEYS
    assert doc["schema"] == SCHEMA_VERSION
    assert doc["run_id"] is None
    assert doc["pipeline"] is None
    assert doc["status"] is None
    assert doc["elapsed_s"] is None
    assert doc["tasks"] == []
    assert doc["throughput_per_minute"] == 0.0
    assert doc["avg_latency_ms"] is None
    assert doc["counts"] == dict.fromkeys((s.value for s in TaskState), 0)
    assert doc["last_update"] == isoformat(NOW)
    json.loads(encode_json(doc))


def test_last_update_is_iso_8601_utc() -> None:
    stamp = isoformat(NOW + 0.25)
    assert stamp is not None
    assert stamp.endswith("Z")
    parsed = dt.datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert parsed.timestamp() == pytest.approx(NOW + 0.25)
    assert isoformat(None) is None


def test_counts_and_tasks_follow_the_snapshot_in_order() -> None:
    tasks = [
        outcome("extract", TaskState.SUCCEEDED, started=NOW - 50, finished=NOW - 48, attempts=1),
        outcome("transform", TaskState.RUNNING, started=NOW - 3, attempts=2, criticality="high"),
        outcome("load", TaskState.PENDING),
        outcome("report", TaskState.SKIPPED),
    ]
    doc = build_metrics_json(snapshot(tasks), [], NOW)

    assert [t["name"] for t in doc["tasks"]] == ["extract", "transform", "load", "report"]
    assert doc["counts"]["succeeded"] == 1
    assert doc["counts"]["running"] == 1
    assert doc["counts"]["pending"] == 1
    assert doc["counts"]["skipped"] == 1
    assert sum(doc["counts"].values()) == doc["tasks_total"] == 4
    extract, transform, load, _ = doc["tasks"]
    assert extract == {
        "name": "extract",
        "state": "succeeded",
        "attempts": 1,
        "duration_ms": 2000.0,
        "criticality": "medium",
        "error": None,
    }
    # A running task's duration runs up to now; a pending one has none.
    assert transform["duration_ms"] == pytest.approx(3000.0)
    assert transform["attempts"] == 2
    assert transform["criticality"] == "high"
    assert load["duration_ms"] is None


def test_throughput_counts_the_last_minute_only() -> None:
    tasks = [
        outcome("old", TaskState.SUCCEEDED, started=NOW - 100, finished=NOW - 90),
        outcome("recent", TaskState.SUCCEEDED, started=NOW - 40, finished=NOW - 30),
        outcome("failed", TaskState.FAILED, started=NOW - 12, finished=NOW - 10),
        outcome("skipped", TaskState.SKIPPED),
    ]
    doc = build_metrics_json(snapshot(tasks, started_at=NOW - 120), [], NOW)

    assert doc["throughput_per_minute"] == 2.0
    # Mean over every finished task, and over the window only.
    assert doc["avg_latency_ms"] == pytest.approx((10 + 10 + 2) / 3 * 1000)
    assert doc["recent_latency_ms"] == pytest.approx((10 + 2) / 2 * 1000)


def test_throughput_of_a_young_run_is_scaled_to_a_minute() -> None:
    tasks = [
        outcome(f"t{i}", TaskState.SUCCEEDED, started=NOW - 10, finished=NOW - 9 + i)
        for i in range(5)
    ]
    doc = build_metrics_json(snapshot(tasks, started_at=NOW - 10), [], NOW)
    assert doc["throughput_per_minute"] == pytest.approx(30.0)
    assert doc["elapsed_s"] == 10.0


def test_throughput_window_is_at_least_one_second() -> None:
    tasks = [outcome("quick", TaskState.SUCCEEDED, started=NOW - 0.01, finished=NOW - 0.005)]
    doc = build_metrics_json(snapshot(tasks, started_at=NOW - 0.01), [], NOW)
    assert doc["throughput_per_minute"] == 60.0


def test_cached_tasks_count_as_finished() -> None:
    tasks = [outcome("c", TaskState.CACHED, started=NOW - 1, finished=NOW - 1)]
    doc = build_metrics_json(snapshot(tasks), [], NOW)
    assert doc["throughput_per_minute"] == 1.0
    assert doc["avg_latency_ms"] == 0.0


def test_errors_are_type_and_message_and_truncated() -> None:
    tasks = [
        outcome(
            "boom",
            TaskState.FAILED,
            started=NOW - 2,
            finished=NOW - 1,
            error=ValueError("bad row 7"),
        ),
        outcome(
            "huge",
            TaskState.FAILED,
            started=NOW - 2,
            finished=NOW - 1,
            error=RuntimeError("x" * 10_000),
        ),
    ]
    doc = build_metrics_json(snapshot(tasks), [], NOW)
    assert doc["tasks"][0]["error"] == "ValueError: bad row 7"
    assert len(doc["tasks"][1]["error"]) == MAX_ERROR_CHARS
    assert doc["tasks"][1]["error"].startswith("RuntimeError: xxx")


def test_an_error_whose_str_raises_still_renders() -> None:
    class Nasty(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    tasks = [outcome("n", TaskState.FAILED, started=NOW - 1, finished=NOW, error=Nasty())]
    assert build_metrics_json(snapshot(tasks), [], NOW)["tasks"][0]["error"] == "Nasty"


def test_breakers_and_batch_sizes() -> None:
    doc = build_metrics_json(
        snapshot(breakers={"db": 2, "api": 0, "s3": 1}, batch_sizes={"load": 500}), [], NOW
    )
    assert doc["breakers"] == {
        "db": {"value": 2, "state": "open"},
        "api": {"value": 0, "state": "closed"},
        "s3": {"value": 1, "state": "half-open"},
    }
    assert doc["batch_sizes"] == {"load": 500}


def test_markup_in_names_and_errors_stays_data() -> None:
    evil = "<img src=x onerror=alert(1)>"
    tasks = [outcome(evil, TaskState.FAILED, started=NOW - 1, finished=NOW, error=ValueError(evil))]
    body = encode_json(build_metrics_json(snapshot(tasks), [], NOW))

    assert b"<" not in body
    assert b">" not in body
    parsed = json.loads(body)
    assert parsed["tasks"][0]["name"] == evil
    assert parsed["tasks"][0]["error"] == f"ValueError: {evil}"


def test_encode_json_refuses_nan() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_json({"x": float("nan")})


def test_sample_matches_the_document() -> None:
    tasks = [
        outcome("a", TaskState.SUCCEEDED, started=NOW - 5, finished=NOW - 4),
        outcome("b", TaskState.RUNNING, started=NOW - 1),
    ]
    snap = snapshot(tasks, started_at=NOW - 30)
    point = sample(snap, NOW)
    doc = build_metrics_json(snap, [point], NOW)

    assert point.t == NOW
    assert point.throughput_per_minute == doc["throughput_per_minute"] == 2.0
    assert point.avg_latency_ms == doc["avg_latency_ms"] == 1000.0
    assert point.tasks_active == 1
    assert point.tasks_finished == 1
    assert doc["history"] == [point.to_dict()]
    assert doc["history"][0] == {
        "t": NOW,
        "throughput_per_minute": 2.0,
        "avg_latency_ms": 1000.0,
        "recent_latency_ms": 1000.0,
        "tasks_active": 1,
        "tasks_finished": 1,
    }


def point(t: float) -> HistoryPoint:
    return HistoryPoint(t, 0.0, None, None, 0, 0)


def test_history_keeps_only_its_horizon() -> None:
    history = History(10.0)
    for t in range(25):
        history.add(point(NOW + t))
    assert [p.t for p in history] == [NOW + t for t in range(14, 25)]
    assert len(history) == 11
    assert history.points() == list(history)


def test_history_restarts_when_the_clock_steps_back() -> None:
    history = History(60.0)
    history.add(point(NOW))
    history.add(point(NOW + 1))
    history.add(point(NOW - 5))
    assert [p.t for p in history] == [NOW - 5]


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf")])
def test_history_rejects_a_bad_horizon(seconds: float) -> None:
    with pytest.raises(ValueError, match="history seconds must be a positive number"):
        History(seconds)


# -- response reuse within the CPU budget ---------------------------------------------


@pytest.mark.parametrize(
    ("age", "cost", "budget", "refresh_age", "action"),
    [
        (None, 0.0, 0.02, None, CacheAction.WAIT),  # nothing rendered yet
        (0.040, 0.001, 0.02, None, CacheAction.SERVE),  # 1 ms body: reused for 50 ms
        (0.060, 0.001, 0.02, None, CacheAction.WAIT),  # then cheap enough to wait for
        (4.0, 0.090, 0.02, None, CacheAction.SERVE),  # 90 ms body: reused for 4.5 s
        (4.8, 0.090, 0.02, None, CacheAction.SERVE_STALE),  # then served while refreshing
        (6.0, 0.090, 0.02, None, CacheAction.WAIT),  # too stale: wait for a fresh one
        (5.1, 0.090, 0.02, 4.9, CacheAction.SERVE_STALE),  # unless a refresh began in time
        (9.0, 0.090, 0.02, 8.9, CacheAction.WAIT),  # and not if it began too late
        (5.1, 0.001, 0.02, 4.9, CacheAction.WAIT),  # cheap renders are always waited for
        (0.0, 0.001, None, None, CacheAction.WAIT),  # no budget: always fresh
        (1.0, 0.090, None, None, CacheAction.SERVE_STALE),
    ],
)
def test_cache_action(
    age: float | None,
    cost: float,
    budget: float | None,
    refresh_age: float | None,
    action: CacheAction,
) -> None:
    assert cache_action(age, cost, budget=budget, refresh_age=refresh_age) is action


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_render_cache_reuses_bodies_within_budget() -> None:
    clock = FakeClock()
    calls: list[float] = []

    def render() -> bytes:
        calls.append(clock.now)
        clock.now += 0.002  # each render "costs" 2 ms on the fake clock
        return f"body {len(calls)}".encode()

    cache = RenderCache(render, budget=0.1, clock=clock)
    assert await cache.get() == b"body 1"
    clock.now += 0.01  # 12 ms after the render started: within 2 ms / 0.1 = 20 ms
    assert await cache.get() == b"body 1"
    clock.now += 0.01
    assert await cache.get() == b"body 2"
    assert cache.renders == len(calls) == 2


@pytest.mark.asyncio
async def test_render_cache_shares_one_render_among_waiters() -> None:
    clock = FakeClock()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()
    count = 0

    def render() -> bytes:
        nonlocal count
        count += 1
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return b"shared"

    cache = RenderCache(render, budget=None, clock=clock)
    waiters = [asyncio.ensure_future(cache.get()) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == [b"shared"] * 5
    assert count == 1
    await cache.close()


@pytest.mark.asyncio
async def test_render_cache_serves_stale_while_an_expensive_render_runs() -> None:
    clock = FakeClock()
    gate = threading.Event()
    count = 0

    def render() -> bytes:
        nonlocal count
        count += 1
        if count > 1:
            assert gate.wait(5)
        clock.now += 0.1  # an expensive body: 100 ms, reused for 100 ms / 0.05 = 2 s
        return f"body {count}".encode()

    cache = RenderCache(render, budget=0.05, clock=clock)
    assert await cache.get() == b"body 1"
    clock.now += 3.0  # past its reuse time, not yet too stale
    assert await cache.get() == b"body 1"  # at once, while "body 2" renders
    clock.now += 3.0  # now too stale, but the refresh began in time
    assert await cache.get() == b"body 1"
    gate.set()
    while cache.renders < 2:
        await asyncio.sleep(0.001)
    assert await cache.get() == b"body 2"
    assert count == 2
