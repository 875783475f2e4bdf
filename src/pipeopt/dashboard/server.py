"""The HTTP server under the live dashboard and ``pipeopt ui``: security policy and lifecycle.

Policy, enforced for every request by one middleware, in this order:

1. **Host allowlist** (DNS rebinding). Bound to a loopback address, only
   ``127.0.0.1:<port>``, ``localhost:<port>``, ``[::1]:<port>``, the bound
   ``host:<port>`` and ``allowed_hosts`` are accepted; bound elsewhere, the
   list applies only when ``allowed_hosts`` is given. Others get 403.
2. **Read-only**. GET and HEAD only; anything else gets 405.
3. **Token**. With a token set, every route but ``/healthz`` needs it, as
   ``Authorization: Bearer <token>``, ``X-Pipeopt-Token: <token>`` or
   ``?token=<token>`` (compared in constant time); without it, 401. Binding
   a non-loopback address without a token is refused with ``ValueError``.

Every response carries a strict Content-Security-Policy (no inline script,
nothing remote), ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
no-referrer`` and ``X-Frame-Options: DENY``; dynamic responses are
``Cache-Control: no-store``.

:class:`SafeServer` holds that policy, the static files (the run page, its
scripts and style sheet, served from the package) and the lifecycle, in a
running event loop or on a background thread. Subclasses add their routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hmac
import html
import importlib.resources
import ipaddress
import logging
import math
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

from aiohttp import web

_log = logging.getLogger("pipeopt.dashboard")

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'none'"
)

_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

_GZIP_MIN_BYTES: Final = 1024
_READ_METHODS: Final = frozenset({"GET", "HEAD"})
_PUBLIC_PATHS: Final = frozenset({"/healthz"})
_ASSET_QUERY: Final = "__ASSET_QUERY__"
_API_BASE: Final = "__API_BASE__"
_TOKEN_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
)


def generate_token() -> str:
    """Return a fresh random token (URL-safe, 256 bits) for a dashboard."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Return whether ``host`` names only this machine (``localhost`` or a loopback IP)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    folder = importlib.resources.files("pipeopt.dashboard").joinpath("static")
    for entry in folder.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and suffix in _CONTENT_TYPES:
            files[name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return files


class SafeServer:
    """A read-only aiohttp server with the policy above; subclasses add routes.

    Args:
        host: address to bind; loopback by default.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        token: secret required by every route but ``/healthz``; mandatory
            when ``host`` is not a loopback address (see :func:`generate_token`).
        allowed_hosts: extra ``Host`` header values to accept, as ``name`` (any
            port) or ``name:port``, e.g. a reverse proxy's name.
        refresh_interval: seconds between page refreshes.
        clock: wall clock returning ``time.time()`` epochs (tests inject one).

    Raises:
        ValueError: a parameter is out of range, or a non-loopback ``host``
            has no token.
    """

    _what = "server"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        allowed_hosts: Iterable[str] | None = None,
        refresh_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
        if token is not None and (
            not isinstance(token, str) or not token or not set(token) <= _TOKEN_ALPHABET
        ):
            raise ValueError(
                "token must be a non-empty string of letters, digits and -._~+/= "
                "(use pipeopt.dashboard.generate_token())"
            )
        if not positive(refresh_interval):
            raise ValueError(
                f"refresh_interval must be a number of seconds > 0, got {refresh_interval!r}"
            )
        if isinstance(allowed_hosts, str):
            allowed_hosts = [allowed_hosts]
        self.host = host.strip()
        self.token = token
        self.allowed_hosts = tuple(h.strip().lower() for h in allowed_hosts or () if h.strip())
        self.refresh_interval = float(refresh_interval)
        self._requested_port = port
        self._clock = clock
        self._check_exposure()
        self._static = _load_static()
        self._port: int | None = None
        self._accepted_hosts: frozenset[str] = frozenset()
        self._check_hosts = False
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._thread_stop: asyncio.Event | None = None

    # -- configuration --------------------------------------------------------

    def _check_exposure(self) -> None:
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address, so the {self._what} would be "
                "reachable from other machines; pass token=pipeopt.dashboard.generate_token() "
                "or bind host='127.0.0.1'"
            )

    @property
    def asset_query(self) -> str:
        """Return the query string that carries the token in the page's links."""
        return "" if self.token is None else "?token=" + quote(self.token, safe="")

    def render_page(self, name: str, api: str) -> bytes:
        """Return static page ``name`` with its links and data address ``api`` filled in."""
        page = self._static[name][0].decode("utf-8")
        page = page.replace(_API_BASE, html.escape(api, quote=True))
        return page.replace(_ASSET_QUERY, html.escape(self.asset_query, quote=True)).encode("utf-8")

    @property
    def port(self) -> int:
        """Return the bound TCP port.

        Raises:
            RuntimeError: the server is not started.
        """
        if self._port is None:
            raise RuntimeError(
                f"the {self._what} is not started; call start() or start_in_thread()"
            )
        return self._port

    @property
    def url(self) -> str:
        """Return the page's address, without the token (safe to log)."""
        return f"http://{_url_host(self.host)}:{self.port}/"

    @property
    def page_url(self) -> str:
        """Return the address to open in a browser, with ``?token=`` when one is set."""
        if self.token is None:
            return self.url
        return f"{self.url}?token={quote(self.token, safe='')}"

    @property
    def running(self) -> bool:
        """Return whether the server is accepting connections."""
        return self._runner is not None

    # -- the aiohttp application ---------------------------------------------

    def _make_app(self) -> web.Application:
        """Return the aiohttp application (routes, policy middleware, headers)."""
        app = web.Application(middlewares=[self._policy])
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/static/{name}", self._handle_static)
        self._add_routes(app)
        app.on_response_prepare.append(_add_security_headers)
        return app

    def _add_routes(self, app: web.Application) -> None:
        """Add the subclass's routes."""

    async def _on_started(self) -> None:
        """Start the subclass's background work (the server is listening)."""

    async def _on_stopping(self) -> None:
        """Stop the subclass's background work (before connections close)."""

    @web.middleware
    async def _policy(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        host = request.headers.get("Host", "").strip().lower()
        if self._check_hosts and host not in self._accepted_hosts:
            # Another Host means a name that merely resolves here (DNS rebinding).
            return error_response(
                403, f"host not allowed; open the {self._what} by its own address"
            )
        if request.method not in _READ_METHODS:
            response = error_response(405, f"the {self._what} is read-only; use GET")
            response.headers["Allow"] = "GET, HEAD"
            return response
        if (
            self.token is not None
            and request.path not in _PUBLIC_PATHS
            and not self._authorized(request)
        ):
            response = error_response(
                401, "missing or wrong token; open the URL printed with the token"
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="pipeopt"'
            return response
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        assert self.token is not None
        expected = self.token.encode("utf-8")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        offered = [
            value.strip() if scheme.lower() == "bearer" else "",
            request.headers.get("X-Pipeopt-Token", "").strip(),
            request.query.get("token", ""),
        ]
        ok = False
        for candidate in offered:
            # Compare every candidate, so timing does not tell which one was tried.
            ok |= hmac.compare_digest(candidate.encode("utf-8"), expected)
        return ok

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})

    async def _handle_static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        found = self._static.get(name) if not name.endswith(".html") else None
        if found is None:
            return error_response(404, "no such file")
        body, content_type = found
        return web.Response(
            body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )

    # -- lifecycle in a running event loop -----------------------------------------

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(
            self.host.strip("[]"),
            self._requested_port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _set_hosts(self, port: int) -> None:
        names = {"127.0.0.1", "localhost", "[::1]", _url_host(self.host).lower()}
        accepted = {f"{name}:{port}" for name in names}
        if port == 80:
            accepted |= names  # browsers leave the default port out of Host
        for entry in self.allowed_hosts:
            if entry.endswith("]") or ":" not in entry:
                accepted |= {entry, f"{entry}:{port}"}
            else:
                accepted.add(entry)
        self._accepted_hosts = frozenset(accepted)
        self._check_hosts = is_loopback(self.host) or bool(self.allowed_hosts)

    async def start(self) -> None:
        """Bind and start serving on the running event loop.

        Raises:
            RuntimeError: the dashboard is already started.
            ValueError: a non-loopback host has no token.
            OSError: the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError(f"the {self._what} is already started")
        self._check_exposure()
        sock = self._bind()
        runner = web.AppRunner(
            self._make_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        try:
            await runner.setup()
            port = int(sock.getsockname()[1])
            self._set_hosts(port)
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = port
        self._runner = runner
        await self._on_started()
        _log.info("%s serving on %s", self._what, self.url)

    async def stop(self) -> None:
        """Stop background work, close connections and unbind; a no-op when not started."""
        await self._on_stopping()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- lifecycle on a background thread ---------------------------------------

    def start_in_thread(self, timeout: float = 10.0) -> str:
        """Serve from a daemon thread with its own event loop; return :attr:`url`.

        Raises:
            RuntimeError: the dashboard is already started.
            ValueError: a non-loopback host has no token.
            OSError: the address cannot be bound.
        """
        if self._thread is not None or self._runner is not None:
            raise RuntimeError(f"the {self._what} is already started")
        self._check_exposure()
        started: threading.Event = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._thread_loop = asyncio.get_running_loop()
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                failure.append(exc)
                return
            finally:
                started.set()
            try:
                await self._thread_stop.wait()
            finally:
                await self.stop()

        thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name=f"pipeopt-{self._what}", daemon=True
        )
        self._thread = thread
        thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"the {self._what} did not start within {timeout:g}s")
        if failure:
            thread.join(timeout)
            self._thread = None
            raise failure[0]
        return self.url

    def stop_in_thread(self, timeout: float = 10.0) -> None:
        """Stop a dashboard started by :meth:`start_in_thread` and join its thread."""
        thread, loop, stop = self._thread, self._thread_loop, self._thread_stop
        if thread is None:
            return
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"the {self._what} thread did not stop within {timeout:g}s")
        self._thread = self._thread_loop = self._thread_stop = None

    def __enter__(self) -> Self:
        self.start_in_thread()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_in_thread()


@dataclass(frozen=True, slots=True)
class Body:
    """A rendered response body, with its gzip form when it is worth sending."""

    raw: bytes
    gzipped: bytes | None

    @classmethod
    def of(cls, raw: bytes) -> Body:
        # Level 1: a 1.3 MB exposition shrinks ~15x in ~8 ms, outside the GIL.
        # One small write instead of a 1.3 MB one keeps the event loop's
        # thread from queueing for the GIL behind the run over and over.
        if len(raw) < _GZIP_MIN_BYTES:
            return cls(raw, None)
        return cls(raw, gzip.compress(raw, compresslevel=1, mtime=0))

    def response(self, request: web.Request, content_type: str) -> web.Response:
        """Return the response, gzipped when the client accepts it."""
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        body = self.raw
        if self.gzipped is not None:
            headers["Vary"] = "Accept-Encoding"
            if _accepts_gzip(request.headers.get("Accept-Encoding", "")):
                body = self.gzipped
                headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)


def _accepts_gzip(header: str) -> bool:
    for item in header.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        quality = params.strip().lower().removeprefix("q=").strip() if params else "1"
        try:
            return float(quality) > 0
        except ValueError:
            return False
    return False


def positive(value: Any) -> bool:
    """Return whether ``value`` is a finite number > 0 (not a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def error_response(status: int, message: str) -> web.Response:
    """Return a JSON error response."""
    return web.json_response(
        {"error": message, "status": status}, status=status, headers={"Cache-Control": "no-store"}
    )


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.update(_SECURITY_HEADERS)
    headers.setdefault("Cache-Control", "no-store")
    headers["Server"] = "pipeopt"
