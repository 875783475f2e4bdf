"""One run on the command line, as ``run``, ``resume`` and ``demo`` all do it.

:func:`run_session` serves the dashboard when asked, shows a progress bar
on a terminal, turns Ctrl-C and SIGTERM into a clean stop (every task's
final state recorded, exit code 130 or 143), then prints the summary or
the JSON result and keeps the dashboard up until Ctrl-C when told to.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import re
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeopt.cli.app import (
    ExitCode,
    console,
    error_text,
    int_range,
    interrupt_code,
    markup,
)
from pipeopt.cli.summary import print_summary, results_json
from pipeopt.errors import RunInterrupted, UsageError

if TYPE_CHECKING:
    from pipeopt.optimizer import PipelineOptimizer
    from pipeopt.result import RunResult

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
# -- the dashboard's options ---------------------------------------------------------


def _token(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            "must be a non-empty string of letters, digits and -._~+/=; "
            "leave --token out to get a random one"
        )
    return text


def add_dashboard_options(parser: argparse.ArgumentParser, *, default_on: bool = False) -> None:
    """Add the dashboard's options: ``--dashboard`` (or ``--no-dashboard``), host, port, token."""
    if default_on:
        parser.add_argument(
            "--no-dashboard",
            dest="dashboard",
            action="store_false",
            help="do not serve the live dashboard",
        )
    else:
        parser.add_argument("--dashboard", action="store_true", help="serve the live dashboard")
    add_server_options(parser)
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="exit when the run ends instead of keeping the dashboard up",
    )


def add_server_options(parser: argparse.ArgumentParser, *, what: str = "dashboard") -> None:
    """Add ``--host``, ``--port`` and ``--token`` of a server (the dashboard, ``pipeopt ui``)."""
    parser.add_argument("--host", default="127.0.0.1", help=f"{what} bind address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int_range(0, 65535),
        default=0,
        help=f"{what} port (0: any free port)",
    )
    parser.add_argument(
        "--token",
        type=_token,
        default=None,
        help=f"{what} access token (random when binding beyond loopback)",
    )


def _bind_error(exc: OSError, host: str, port: int) -> UsageError:
    if isinstance(exc, socket.gaierror):
        return UsageError(
            f"--host {host!r}: cannot resolve it ({exc.strerror}); "
            "pass a name or address of this machine, such as 127.0.0.1"
        )
    if exc.errno == errno.EADDRINUSE:
        return UsageError(
            f"--port {port}: already in use on {host}; pass another port, or 0 for any free one"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return UsageError(
            f"--host {host!r}: not an address of this machine; "
            "pass one of its addresses, such as 127.0.0.1"
        )
    if exc.errno == errno.EACCES:
        return UsageError(
            f"--port {port}: permission denied; ports below 1024 need privileges, "
            "pass a higher port or 0"
        )
    return UsageError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}")


def serve(make: Callable[..., Any], args: argparse.Namespace, *, what: str = "dashboard") -> Any:
    """Start the server ``make(host=, port=, token=)`` builds on a background thread; return it.

    Without ``--token``, a server bound beyond loopback gets a random one.

    Raises:
        UsageError: the host, port or token is unusable.
    """
    token = args.token
    if token is None and args.host not in _LOOPBACK:
        token = secrets.token_urlsafe(16)
    try:
        server = make(host=args.host, port=args.port, token=token)
        server.start_in_thread()
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    except OSError as exc:
        raise _bind_error(exc, args.host, args.port) from None
    return server


def start_dashboard(optimizer: PipelineOptimizer, args: argparse.Namespace) -> Any:
    """Serve the dashboard of ``optimizer`` from a background thread and print its URL.

    Raises:
        UsageError: aiohttp is missing, or the host, port or token is unusable.
    """
    try:
        from pipeopt.dashboard import PipelineDashboard
    except ImportError as exc:
        raise UsageError(
            f"the dashboard needs aiohttp: pip install 'pipeopt[dashboard]' ({exc})"
        ) from None
    dashboard = serve(lambda **options: PipelineDashboard(optimizer, **options), args)
    console(stderr=True).print(f"dashboard: {dashboard.page_url}", markup=False)
    return dashboard


def _keep_dashboard_up(dashboard: Any, args: argparse.Namespace) -> None:
    """After the run, serve the final state until Ctrl-C (only on a terminal)."""
    if args.no_wait or not sys.stdin.isatty():
        return
    console(stderr=True).print("run finished; dashboard stays up — Ctrl-C to exit")
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


# -- running -----------------------------------------------------------------------------


def _run_with_progress(
    optimizer: PipelineOptimizer,
    start: Callable[[], RunResult],
    *,
    title: str,
    total: int,
    quiet: bool,
) -> tuple[RunResult, int]:
    """Call ``start`` under a live progress bar; return the (partial) result and exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = console()
    stop = threading.Event()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("active {task.fields[active]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=out,
        transient=True,
        disable=quiet or not out.is_terminal,
    )
    bar = progress.add_task(markup(title), total=total, active=0, failed=0)

    def refresh() -> None:
        while not stop.wait(0.1):
            finished, total, active, failed = optimizer.progress()
            progress.update(bar, completed=finished, total=total, active=active, failed=failed)

    watcher = threading.Thread(target=refresh, name="pipeopt-progress", daemon=True)
    with progress:
        watcher.start()
        try:
            result = start()
        except RunInterrupted as exc:
            if exc.result is None:
                raise  # stopped before the run began: nothing ran, nothing to show
            return exc.result, interrupt_code(exc)
        except OSError as exc:
            # Task errors are in the result; this is the executor's (an unreachable
            # dask scheduler, say), raised before any task ran.
            raise UsageError(f"the run could not start: {error_text(exc)}") from None
        finally:
            stop.set()
            watcher.join()
    return result, ExitCode.OK if result.ok else ExitCode.FAILED


def run_session(
    optimizer: PipelineOptimizer,
    args: argparse.Namespace,
    start: Callable[[], RunResult],
    *,
    title: str,
    total: int,
    after: Callable[[RunResult], None] | None = None,
) -> int:
    """Run ``start()`` (a run or a resume of ``optimizer``) as the command line does.

    Args:
        optimizer: the optimizer ``start`` runs; its progress is shown.
        args: the command's options: ``json``, and the dashboard's options.
        start: begins the run and returns its result.
        title: the progress bar's label (the pipeline's name).
        total: the number of tasks.
        after: called with the (possibly partial) result before it is
            printed, e.g. to record where the run came from.

    Returns:
        0 every task succeeded, 1 one did not, 130/143 a signal stopped the run.
    """
    dashboard = start_dashboard(optimizer, args) if args.dashboard else None
    try:
        result, code = _run_with_progress(
            optimizer, start, title=title, total=total, quiet=args.json
        )
        if after is not None:
            after(result)
        if args.json:
            sys.stdout.write(json.dumps(results_json(result), indent=2, default=str) + "\n")
        else:
            print_summary(result, console())
        if dashboard is not None and code in (ExitCode.OK, ExitCode.FAILED):
            _keep_dashboard_up(dashboard, args)
        return code
    finally:
        if dashboard is not None:
            dashboard.stop_in_thread()
