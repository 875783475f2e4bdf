"""The live dashboard: the run page, its JSON and Prometheus metrics of a running optimizer.

Security policy and lifecycle: :mod:`pipeopt.dashboard.server`.

State: the sampled chart history, appended by one sampler task on the app's
own loop every ``refresh_interval`` (never on the request path), and the last
rendered ``/metrics`` and ``/prometheus`` bodies, reused within a CPU budget
(:mod:`pipeopt.dashboard.cache`) so that heavy scraping cannot slow the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from aiohttp import web
from prometheus_client.exposition import (
    CONTENT_TYPE_LATEST,
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
)
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)

from pipeopt.dashboard.cache import RenderCache
from pipeopt.dashboard.model import (
    History,
    Memo,
    build_metrics_json,
    encode_json,
    sample,
    task_detail,
)
from pipeopt.dashboard.server import (
    CONTENT_SECURITY_POLICY,
    Body,
    SafeServer,
    error_response,
    generate_token,
    is_loopback,
    positive,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pipeopt.result import RunSnapshot

_log = logging.getLogger("pipeopt.dashboard")

_CACHED_EXPOSITIONS: Final = frozenset({CONTENT_TYPE_LATEST, OPENMETRICS_CONTENT_TYPE})

#: Where the live run page reads its document (``/metrics`` serves the same).
LIVE_API: Final = "/api/run"


@runtime_checkable
class MetricsSource(Protocol):
    """What the dashboard reads: a :class:`~pipeopt.PipelineOptimizer` or any look-alike."""

    def snapshot(self) -> RunSnapshot:
        """Return a consistent view of the current (or last) run; callable from any thread."""
        ...

    @property
    def registry(self) -> CollectorRegistry:
        """Return the Prometheus registry exported at ``/prometheus``."""
        ...


class PipelineDashboard(SafeServer):
    """Serve a live view of a run: the run page, JSON, and Prometheus metrics.

    Routes: ``/`` (the run page), ``/metrics`` and ``/api/run`` (JSON, schema
    in :mod:`pipeopt.dashboard`), ``/api/run/task?name=`` (one task's
    details), ``/prometheus`` (text exposition, OpenMetrics on ``Accept:
    application/openmetrics-text``), ``/healthz`` and ``/static/<file>``.
    Security policy: see :mod:`pipeopt.dashboard.server`.

    Use it inside a running event loop (``await dash.start()`` /
    ``await dash.stop()``, or ``async with``) or from synchronous code, which
    runs it on a background thread with its own loop
    (``dash.start_in_thread()`` / ``dash.stop_in_thread()``, or ``with``)::

        with PipelineDashboard(optimizer) as dash:
            print("dashboard:", dash.page_url)
            optimizer.run(pipeline)

    Args:
        source: what to show; anything with ``snapshot()`` and ``registry``.
        host: address to bind; loopback by default.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        token: secret required by every route but ``/healthz``; mandatory
            when ``host`` is not a loopback address (see :func:`generate_token`).
        allowed_hosts: extra ``Host`` header values to accept, as ``name`` (any
            port) or ``name:port``, e.g. a reverse proxy's name.
        refresh_interval: seconds between chart samples and page refreshes.
        history_seconds: how far back the chart history goes.
        render_budget: share of one core that rendering ``/metrics`` and
            ``/prometheus`` may use under any request rate (bodies are reused
            meanwhile, see :mod:`pipeopt.dashboard.cache`); None renders a
            fresh body for every request.
        clock: wall clock returning ``time.time()`` epochs (tests inject one).

    Raises:
        ValueError: a parameter is out of range, or a non-loopback ``host``
            has no token.
    """

    _what = "dashboard"

    def __init__(
        self,
        source: MetricsSource,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
        refresh_interval: float = 1.0,
        history_seconds: float = 600.0,
        render_budget: float | None = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(getattr(source, "snapshot", None)) or not hasattr(source, "registry"):
            raise TypeError(
                f"source must have snapshot() and registry (a PipelineOptimizer), "
                f"got {type(source).__name__}"
            )
        if not positive(history_seconds):
            raise ValueError(
                f"history_seconds must be a number of seconds > 0, got {history_seconds!r}"
            )
        if render_budget is not None and not (positive(render_budget) and render_budget <= 1):
            raise ValueError(
                f"render_budget must be a share of one core in (0, 1] or None, "
                f"got {render_budget!r}"
            )
        super().__init__(
            host=host,
            port=port,
            token=token,
            allowed_hosts=allowed_hosts,
            refresh_interval=refresh_interval,
            clock=clock,
        )
        self.source = source
        self.history_seconds = float(history_seconds)
        self.render_budget = render_budget
        self._history = History(self.history_seconds)
        self._index = self.render_page("index.html", LIVE_API)
        self._sampler: asyncio.Task[None] | None = None
        self._caches: dict[str, RenderCache[Body]] = {}
        self._memo: Memo = {}
        self._memo_run: str | None = None

    # -- routes ------------------------------------------------------------------

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._handle_index)
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get(LIVE_API, self._handle_metrics)
        app.router.add_get(LIVE_API + "/task", self._handle_task)
        app.router.add_get("/prometheus", self._handle_prometheus)

    async def _handle_index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._index,
            headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
        )

    def render_metrics(self) -> bytes:
        """Return a fresh ``/metrics`` body (thread-safe; the route reuses it per budget)."""
        snapshot = self.source.snapshot()
        memo = self._memo
        if snapshot.run_id != self._memo_run or len(memo) > 2 * len(snapshot.tasks):
            # Renders run one at a time (see RenderCache), so the memo needs no lock.
            memo = self._memo = {}
            self._memo_run = snapshot.run_id
        document = build_metrics_json(snapshot, self._history.points(), self._clock(), memo)
        document["refresh_interval"] = self.refresh_interval
        return encode_json(document)

    def render_task(self, name: str) -> bytes | None:
        """Return the details of task ``name`` as JSON, or None if the run has no such task."""
        document = task_detail(self.source.snapshot(), name, self._clock())
        return None if document is None else encode_json(document)

    def _cache(self, key: str, render: Callable[[], bytes]) -> RenderCache[Body]:
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = RenderCache(
                lambda: Body.of(render()), budget=self.render_budget
            )
        return cache

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = await self._cache("metrics", self.render_metrics).get()
        return body.response(request, "application/json")

    async def _handle_task(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            return error_response(400, "name the task: ?name=<task>")
        body = await asyncio.to_thread(self.render_task, name)
        if body is None:
            return error_response(404, "no such task in this run")
        return Body.of(body).response(request, "application/json")

    async def _handle_prometheus(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        if content_type == CONTENT_TYPE_PLAIN_0_0_4:
            content_type = CONTENT_TYPE_LATEST  # the same body, as prometheus_client labels it
        registry = self.source.registry
        if content_type in _CACHED_EXPOSITIONS:
            body = await self._cache(content_type, lambda: encoder(registry)).get()
        else:
            # A rarer negotiated variant (another version or escaping): render it each time.
            body = await asyncio.to_thread(lambda: Body.of(encoder(registry)))
        return body.response(request, content_type)

    # -- sampling --------------------------------------------------------------

    def sample_now(self) -> None:
        """Take one chart sample from the source (the sampler calls this periodically)."""
        try:
            snapshot = self.source.snapshot()
        except Exception:
            # A broken source must not stop the sampler; the page shows the gap.
            _log.exception("dashboard: snapshot() failed")
            return
        self._history.add(sample(snapshot, self._clock()))

    async def _sample_forever(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            self.sample_now()
            due += self.refresh_interval
            # Keep the cadence fixed; after a stall, skip the missed ticks.
            due = max(due, loop.time())
            await asyncio.sleep(due - loop.time())

    async def _on_started(self) -> None:
        self._sampler = asyncio.get_running_loop().create_task(
            self._sample_forever(), name="pipeopt-dashboard-sampler"
        )

    async def _on_stopping(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        caches, self._caches = list(self._caches.values()), {}
        for cache in caches:
            await cache.close()


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "LIVE_API",
    "MetricsSource",
    "PipelineDashboard",
    "generate_token",
    "is_loopback",
]
