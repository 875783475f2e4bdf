"""``pipeopt ui``: the run store in a browser, a runs list and the run page of each run.

It only reads the store (a state folder that does not exist is an error, never
created) and serves until Ctrl-C, the normal way to stop it (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import threading

from pipeopt.cli.app import ExitCode, Parser, add_state_dir_option, console
from pipeopt.cli.history import open_store
from pipeopt.cli.session import add_server_options, serve
from pipeopt.errors import UsageError


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``ui``."""
    parser = commands.add_parser(
        "ui", help="serve the recorded runs in a browser: a runs list and each run's page"
    )
    add_state_dir_option(parser)
    add_server_options(parser, what="UI")
    parser.set_defaults(func=ui_command)


def ui_command(args: argparse.Namespace) -> int:
    """Serve the run store until Ctrl-C."""
    try:
        from pipeopt.dashboard import RunStoreUI
    except ImportError as exc:
        raise UsageError(
            f"pipeopt ui needs aiohttp: pip install 'pipeopt[dashboard]' ({exc})"
        ) from None
    with open_store(args) as store:
        server = serve(lambda **options: RunStoreUI(store, **options), args, what="ui")
        out = console(stderr=True)
        out.print(f"run store UI: {server.page_url}", markup=False)
        out.print("serving the runs of the store until Ctrl-C", markup=False)
        try:
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        finally:
            server.stop_in_thread()
    return ExitCode.OK
