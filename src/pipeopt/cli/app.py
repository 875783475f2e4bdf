"""What every ``pipeopt`` command shares: exit codes, the parser, the console, safe text.

Exit codes
    0 success; 1 a task failed (or the run was cancelled, or a benchmark
    regressed); 2 bad usage, an invalid pipeline or an unusable run store;
    130 stopped by Ctrl-C (SIGINT); 143 stopped by SIGTERM.

Errors
    A user's mistake is one line on stderr, ``pipeopt COMMAND: message``,
    and exit code 2: :class:`~pipeopt.errors.UsageError` for command-line input, any other
    :class:`~pipeopt.errors.PipeoptError` for the pipeline or the run store.
    A traceback means a bug in pipeopt (or in a task, when a task's own
    error is asked for with ``show --tracebacks``).

Safe text
    Task names, pipeline names and error texts come from user code. Every
    one of them goes through :func:`clean` before it reaches the terminal,
    so that escape sequences (a window title, a cleared screen) are shown
    as text rather than obeyed; rich's markup is never applied to them.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, Protocol, TextIO

from rich.console import Console

from pipeopt.errors import PipeoptError, RunInterrupted, UsageError

if TYPE_CHECKING:
    from rich.text import Text

DEFAULT_STATE_DIR = ".pipeopt"
STATE_DIR_ENV = "PIPEOPT_STATE_DIR"
MAX_WORKERS = 10_000  # a bound for --workers options, far above any useful value
PIPELINE_HELP = (
    "a Python file; after a colon, the module-level pipeline (or a function returning one) "
    "to use when the file defines several"
)


class ExitCode(enum.IntEnum):
    """The exit codes of the ``pipeopt`` command."""

    OK = 0
    """Success: every task succeeded (or the command did what it was asked)."""
    FAILED = 1
    """A task failed, the run was cancelled, or ``bench --check`` found a regression."""
    USAGE = 2
    """Bad command-line input, an invalid pipeline or an unusable run store (one line on stderr)."""
    SIGINT = 130
    """Stopped by Ctrl-C (SIGINT); every task's final state is recorded."""
    SIGTERM = 143
    """Stopped by SIGTERM; every task's final state is recorded."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that a run stops as it does on Ctrl-C."""


def interrupt_code(interrupt: BaseException) -> ExitCode:
    """Return 143 for an interrupt raised by SIGTERM, else 130 (also inside a RunInterrupted)."""
    if isinstance(interrupt, RunInterrupted):
        return interrupt_code(interrupt.reason) if interrupt.reason is not None else ExitCode.SIGINT
    return ExitCode.SIGTERM if isinstance(interrupt, _Terminated) else ExitCode.SIGINT


# -- safe text ---------------------------------------------------------------------

_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
# C0 and C1 controls and DEL, which terminals obey, plus the characters that
# reorder or break lines invisibly (bidi overrides, line/paragraph separators).
_UNSAFE: dict[int, str] = {
    code: _NAMED.get(code, f"\\x{code:02x}") for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))
}
_UNSAFE.update(
    {
        code: f"\\u{code:04x}"
        for code in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F))
    }
)
_UNSAFE.update({code: f"\\u{code:04x}" for code in range(0x2066, 0x206A)})
_UNSAFE_KEEP_LINES = {code: text for code, text in _UNSAFE.items() if code != 0x0A}


def clean(value: object, *, lines: bool = False) -> str:
    """Return ``value`` as text that is safe to print: control characters shown escaped.

    ``"\\x1b]0;title\\x07"`` becomes the visible text ``\\x1b]0;title\\x07``.

    Args:
        value: any object; non-strings are converted with ``str()`` (an
            object whose ``__str__`` fails is shown by its type).
        lines: keep newlines (for multi-line texts such as tracebacks);
            by default they are escaped too, so the text stays on one line.
    """
    if isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception:
            text = f"<unprintable {type(value).__name__}>"
    return text.translate(_UNSAFE_KEEP_LINES if lines else _UNSAFE)


def cell(value: object, style: str = "") -> Text:
    """Return ``value`` as a rich ``Text`` (never parsed as markup), cleaned."""
    from rich.text import Text

    return Text(clean(value), style=style)


def markup(value: object) -> str:
    """Return ``value`` cleaned and escaped for a rich markup string."""
    from rich.markup import escape

    return escape(clean(value))


def error_text(error: BaseException) -> str:
    """Return ``Type: message`` of an error, cleaned, on one line."""
    return clean(f"{type(error).__name__}: {clean(error)}")


# -- console -------------------------------------------------------------------------


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 here; `pipeopt show RUN | head` is a success, which main() reports.
        self.quiet = True
        raise BrokenPipeError


def console(*, stderr: bool = False) -> Console:
    """Return a rich console on stdout (or stderr) that never applies highlighting."""
    out = _Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        # Pipes and logs have no width to fit: keep rows and errors on one line.
        out = _Console(stderr=stderr, highlight=False, width=200)
    return out


class _CleanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record), lines=True)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write to the ``sys.stderr`` of the moment.

    A live progress display replaces ``sys.stderr`` while it runs, and prints
    what is written there above itself.
    """

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _log_handler() -> logging.Handler:
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_CleanFormatter("pipeopt: %(levelname)s: %(message)s"))
    return handler


@contextlib.contextmanager
def _log_level(args: argparse.Namespace, handler: logging.Handler) -> Iterator[None]:
    """Show every logger's records from ``--log-level`` on (commands that run pipelines)."""
    if not hasattr(args, "log_level"):
        yield
        return
    from pipeopt.cli.options import log_level

    level = log_level(args)
    root = logging.getLogger()
    pipeopt_logger = logging.getLogger("pipeopt")
    saved = root.level
    pipeopt_logger.removeHandler(handler)
    handler.setLevel(level)
    handler.setFormatter(
        _CleanFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


# -- parser ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (one line, exit 2)."""

    commands: argparse._SubParsersAction[Parser] | None = None

    def error(self, message: str) -> NoReturn:
        """Raise the parse error as a :class:`UsageError` naming the command."""
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def int_range(minimum: int, maximum: int) -> Callable[[str], int]:
    """Return an argparse ``type`` that accepts integers from ``minimum`` to ``maximum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}, got {text!r}"
            ) from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {minimum} to {maximum}, got {value}"
            )
        return value

    return parse


def add_state_dir_option(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """Add ``--state-dir`` (and ``--no-state`` when recording is ``optional``)."""
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help=f"run store folder (default: ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})",
    )
    if optional:
        parser.add_argument("--no-state", action="store_true", help="do not record the run")


def state_dir(args: argparse.Namespace) -> Path | None:
    """Return the run store folder the command uses, or ``None`` with ``--no-state``."""
    if getattr(args, "no_state", False):
        return None
    return Path(args.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


# -- entry point -------------------------------------------------------------------------


class Command(Protocol):
    """A module of one or more commands: it adds them to the ``pipeopt`` parser."""

    def register(self, commands: argparse._SubParsersAction[Parser]) -> None:
        """Add this module's subcommands, each with ``func`` set to its handler."""
        ...


def build_parser(modules: Sequence[Command]) -> Parser:
    """Return the ``pipeopt`` parser with the subcommands of ``modules``."""
    from pipeopt import __version__

    parser = Parser(prog="pipeopt", description="Run data pipelines fast and safely.")
    parser.add_argument("--version", action="version", version=f"pipeopt {__version__}")
    parser.commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=Parser, required=True
    )
    for module in modules:
        module.register(parser.commands)
    return parser


def _parse(parser: Parser, argv: Sequence[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Name the command in the message: `pipeopt bench: unrecognized arguments: ...`.
        assert parser.commands is not None
        parser.commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated("terminated")


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    """Make SIGTERM raise an interrupt (see :func:`interrupt_code`), and SIGINT too if ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell's `cmd &` starts us with SIGINT ignored; Ctrl-C must still stop a run.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _say(message: str) -> None:
    with contextlib.suppress(OSError):
        print(message, file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(modules: Sequence[Command], argv: Sequence[str]) -> int:
    """Parse ``argv``, run the command, and return its exit code (see the module docs)."""
    logger = logging.getLogger("pipeopt")
    handler = _log_handler()
    logger.addHandler(handler)
    prog = "pipeopt"
    try:
        with _signals():
            try:
                args = _parse(build_parser(modules), argv)
            except UsageError as exc:
                _say(clean(exc))
                return ExitCode.USAGE
            prog = f"pipeopt {args.command}"
            with _log_level(args, handler):
                code: int = args.func(args)
            return code
    except PipeoptError as exc:
        _say(f"{prog}: {clean(exc)}")
        return ExitCode.USAGE
    except KeyboardInterrupt as exc:
        code = interrupt_code(exc)
        _say(f"{prog}: {'terminated' if code == ExitCode.SIGTERM else 'interrupted'}")
        return code
    except BrokenPipeError:
        # `pipeopt show RUN | head`: the reader has all it wanted.
        _silence_stdout()
        return ExitCode.OK
    finally:
        logger.removeHandler(handler)
