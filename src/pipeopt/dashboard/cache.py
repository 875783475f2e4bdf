"""Reuse rendered response bodies within a CPU budget, so scrapes cannot slow a run.

Rendering ``/prometheus`` for a 1,000-task run takes tens of milliseconds of
pure Python (holding the GIL the run's threads need), and ``/metrics`` takes a
snapshot under the scheduler's lock. A tight scrape loop must not turn that
into a tax on the pipeline, so each route keeps its last body and renders a
new one only when the old one has had its turn.

Policy (:func:`cache_action`), for a body that took ``cost`` seconds to render:

* it is **reused** for ``cost / budget`` seconds, so renders take at most
  ``budget`` of one core however hard clients poll (budget 0.02: a 1 ms body
  is reused for 50 ms, a 90 ms body for 4.5 s);
* after that, a request **waits** for a fresh render when rendering is cheap
  (``cost <= wait_limit``) or the body is older than ``max_stale``;
* otherwise (an expensive body, a little stale) the request gets the old body
  at once and a fresh render starts in the background (stale-while-revalidate);
  while that refresh runs, requests keep getting the old body even if it
  passes ``max_stale`` meanwhile, since the new one is at most a render away.

Renders run on a worker thread, one at a time per route (concurrent requests
share the one in flight), so the event loop keeps answering meanwhile.

State: the last body, when its render started, what it cost, and the render
in flight if any. Only the event loop's thread touches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_log = logging.getLogger("pipeopt.dashboard")

#: Seconds a render may take and still be waited for once the body is due.
WAIT_LIMIT = 0.02

#: Oldest body (seconds) served without waiting for a fresh one.
MAX_STALE = 5.0


class CacheAction(enum.Enum):
    """What a request does with the cached body."""

    SERVE = "serve"  # the body is young enough
    SERVE_STALE = "serve-stale"  # serve it, and refresh in the background
    WAIT = "wait"  # wait for a fresh render


def cache_action(
    age: float | None,
    cost: float,
    *,
    budget: float | None,
    refresh_age: float | None = None,
    wait_limit: float = WAIT_LIMIT,
    max_stale: float = MAX_STALE,
) -> CacheAction:
    """Return what to do with a cached body ``age`` seconds old that cost ``cost`` to render.

    Args:
        age: seconds since the cached body's render started; None if there is none.
        cost: seconds the cached body took to render.
        budget: share of one core renders may use (0.02 = 2 %); None disables reuse.
        refresh_age: the body's age when the render now in flight started, or
            None when no render is in flight.
        wait_limit: renders up to this many seconds are waited for.
        max_stale: bodies older than this are not served without a fresh render
            (unless a refresh started before they got that old is under way).
    """
    if age is None:
        return CacheAction.WAIT
    if budget is not None and age <= cost / budget:
        return CacheAction.SERVE
    if cost > wait_limit:
        if age <= max_stale:
            return CacheAction.SERVE_STALE
        if refresh_age is not None and refresh_age <= max_stale:
            return CacheAction.SERVE_STALE
    return CacheAction.WAIT


class RenderCache(Generic[T]):
    """The last body of one route, re-rendered on a worker thread per :func:`cache_action`.

    Args:
        render: builds the body; called on a worker thread, so it must be thread-safe.
        budget: share of one core renders may use; None renders for every request
            (concurrent requests still share a render in flight).
        clock: a monotonic clock (tests inject one).
    """

    def __init__(
        self,
        render: Callable[[], T],
        *,
        budget: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._render = render
        self.budget = budget
        self._clock = clock
        self._value: T | None = None
        self._has_value = False
        self._rendered_at = 0.0
        self._cost = 0.0
        self._inflight: asyncio.Task[T] | None = None
        self._refresh_started = 0.0
        self.renders = 0

    async def get(self) -> T:
        """Return a body per the policy, rendering a fresh one when due."""
        now = self._clock()
        age = refresh_age = None
        if self._has_value:
            age = now - self._rendered_at
            if self._inflight is not None:
                refresh_age = self._refresh_started - self._rendered_at
        action = cache_action(age, self._cost, budget=self.budget, refresh_age=refresh_age)
        if action is CacheAction.SERVE:
            return self._value  # type: ignore[return-value]
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.get_running_loop().create_task(self._refresh())
            task.add_done_callback(_log_failure)
        if action is CacheAction.SERVE_STALE:
            return self._value  # type: ignore[return-value]
        # Shield: one impatient client must not cancel the render others wait for.
        return await asyncio.shield(task)

    async def _refresh(self) -> T:
        started = self._refresh_started = self._clock()
        try:
            value = await asyncio.to_thread(self._render)
        finally:
            self._inflight = None
        self._value, self._has_value = value, True
        self._rendered_at, self._cost = started, self._clock() - started
        self.renders += 1
        return value

    async def close(self) -> None:
        """Cancel a render in flight (its thread finishes on its own)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _log_failure(task: asyncio.Task[T]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("dashboard: rendering a response failed", exc_info=task.exception())
