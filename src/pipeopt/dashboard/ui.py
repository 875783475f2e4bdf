"""``pipeopt ui``: the run store over HTTP, a runs list and the run page of any stored run.

Routes:

============================== ==================================================
route                          content
============================== ==================================================
``/``                          the runs list (newest first; refreshes itself)
``/runs/<run id>``             the run page, the same page as the live dashboard's
``/api/runs``                  the runs list as JSON (:func:`.stored.runs_list_json`)
``/api/runs/<run id>``         the run's document (the ``/metrics`` schema)
``/api/runs/<run id>/task``    ``?name=<task>``: one task's details
``/healthz``, ``/static/*``    as on the dashboard
============================== ==================================================

Same safety rules as the live dashboard (:mod:`pipeopt.dashboard.server`):
loopback by default, a token off loopback, a Host allowlist, a strict CSP,
read-only, and every name written as text. The store is only read; reads run
on worker threads so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import quote

from aiohttp import web

from pipeopt.dashboard.model import encode_json
from pipeopt.dashboard.server import Body, SafeServer, error_response
from pipeopt.dashboard.stored import build_stored_json, runs_list_json, stored_task_detail
from pipeopt.errors import RunStoreError

if TYPE_CHECKING:
    from pipeopt.store import RunDetail, RunSummary

#: Runs listed on the runs page (the newest).
RUNS_LISTED: Final = 200


class StoreReader(Protocol):
    """What ``pipeopt ui`` reads: a :class:`~pipeopt.store.RunStore` (opened read-only)."""

    def list_runs(self, limit: int = 20) -> list[RunSummary]:
        """Return the newest ``limit`` runs, newest first."""
        ...

    def show_run(self, run_id: str) -> RunDetail:
        """Return one run with a row per task."""
        ...


class RunStoreUI(SafeServer):
    """Serve the runs of a run store: a runs list and a run page per run.

    Args:
        store: the run store to read (``RunStore(state_dir, read_only=True)``).
        host, port, token, allowed_hosts, refresh_interval, clock: as for
            :class:`~pipeopt.dashboard.PipelineDashboard`.
        limit: how many of the newest runs the list shows.

    Raises:
        ValueError: a parameter is out of range, or a non-loopback ``host``
            has no token.
    """

    _what = "run store UI"

    def __init__(
        self,
        store: StoreReader,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
        refresh_interval: float = 2.0,
        limit: int = RUNS_LISTED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(getattr(store, "list_runs", None)) or not callable(
            getattr(store, "show_run", None)
        ):
            raise TypeError(
                f"store must have list_runs() and show_run() (a RunStore), "
                f"got {type(store).__name__}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
        super().__init__(
            host=host,
            port=port,
            token=token,
            allowed_hosts=allowed_hosts,
            refresh_interval=refresh_interval,
            clock=clock,
        )
        self.store = store
        self.limit = limit
        self._runs_page = self.render_page("runs.html", "/api/runs")

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._handle_runs_page)
        app.router.add_get("/runs/{run_id}", self._handle_run_page)
        app.router.add_get("/api/runs", self._handle_runs)
        app.router.add_get("/api/runs/{run_id}", self._handle_run)
        app.router.add_get("/api/runs/{run_id}/task", self._handle_task)

    @staticmethod
    def _html(body: bytes) -> web.Response:
        return web.Response(
            body=body,
            headers={"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
        )

    async def _handle_runs_page(self, request: web.Request) -> web.Response:
        return self._html(self._runs_page)

    async def _handle_run_page(self, request: web.Request) -> web.Response:
        api = "/api/runs/" + quote(request.match_info["run_id"], safe="")
        return self._html(self.render_page("index.html", api))

    def _json(self, request: web.Request, document: dict[str, Any]) -> web.Response:
        document["refresh_interval"] = self.refresh_interval
        return Body.of(encode_json(document)).response(request, "application/json")

    async def _answer(
        self,
        request: web.Request,
        read: Callable[[], dict[str, Any] | None],
        *,
        unreadable: int = 404,
    ) -> web.Response:
        try:
            document = await asyncio.to_thread(read)
        except RunStoreError as exc:
            return error_response(unreadable, str(exc))
        if document is None:
            return error_response(404, "no such task in this run")
        return self._json(request, document)

    async def _handle_runs(self, request: web.Request) -> web.Response:
        return await self._answer(
            request,
            lambda: runs_list_json(self.store.list_runs(self.limit), self._clock()),
            unreadable=503,
        )

    async def _handle_run(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        return await self._answer(
            request, lambda: build_stored_json(self.store.show_run(run_id), self._clock())
        )

    async def _handle_task(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        name = request.query.get("name")
        if not name:
            return error_response(400, "name the task: ?name=<task>")
        return await self._answer(
            request, lambda: stored_task_detail(self.store.show_run(run_id), name)
        )


__all__ = ["RUNS_LISTED", "RunStoreUI", "StoreReader"]
