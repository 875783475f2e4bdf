"""``pipeopt history``, ``pipeopt show`` and ``pipeopt resume``: the run store's commands.

:func:`add_parsers` adds the three subcommands to the ``pipeopt`` parser;
:func:`main` runs them on their own (``python -m pipeopt.store_cli ...``).
Exit codes as for ``pipeopt``: 0 success, 1 a task failed (or the run was
cancelled), 2 bad usage, an invalid pipeline or a store error (one line on
stderr, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pipeopt.errors import PipelineError, PipeoptError, RunInterrupted, UsageError
from pipeopt.executors.registry import EXECUTOR_NAMES

if TYPE_CHECKING:
    from rich.console import Console

    from pipeopt.optimizer import PipelineOptimizer
    from pipeopt.result import RunResult
    from pipeopt.store import RunDetail, RunStore, RunSummary, TaskSummary

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT = 0, 1, 2, 130
SHOW_LIMIT = 200  # task rows `show` prints without --all


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def default_state_dir() -> str:
    """Return the state folder used when ``--state-dir`` is not given."""
    return os.environ.get("PIPEOPT_STATE_DIR") or ".pipeopt"


def add_parsers(subparsers: Any) -> None:
    """Add ``history``, ``show`` and ``resume`` to a ``pipeopt`` subparsers action."""
    state_help = "run store folder (default: $PIPEOPT_STATE_DIR or .pipeopt)"

    history = subparsers.add_parser("history", help="list recorded runs, newest first")
    history.add_argument("--limit", "-n", type=int, default=20, help="runs to list (default 20)")
    history.add_argument("--json", action="store_true", help="print the runs as JSON")
    history.add_argument("--state-dir", default=None, help=state_help)
    history.set_defaults(func=cmd_history)

    show = subparsers.add_parser("show", help="show a recorded run task by task")
    show.add_argument(
        "run_id", metavar="RUN_ID", help="a run id, a unique prefix of one, or 'last'"
    )
    show.add_argument(
        "--all", action="store_true", help=f"list every task, not the first {SHOW_LIMIT}"
    )
    show.add_argument("--tracebacks", action="store_true", help="print failed tasks' tracebacks")
    show.add_argument("--json", action="store_true", help="print the run as JSON")
    show.add_argument("--state-dir", default=None, help=state_help)
    show.set_defaults(func=cmd_show)

    resume = subparsers.add_parser(
        "resume", help="run again only what did not succeed in a recorded run"
    )
    resume.add_argument("run_id", metavar="RUN_ID", nargs="?", default=None, help="default: --last")
    resume.add_argument("--last", action="store_true", help="resume the newest run")
    resume.add_argument(
        "--file",
        metavar="FILE[:PIPELINE]",
        default=None,
        help="the pipeline to run (default: the file the run was started from)",
    )
    resume.add_argument(
        "--force", action="store_true", help="resume even if the pipeline's structure changed"
    )
    resume.add_argument("--workers", "-w", type=int, default=None, help="default: as the run")
    resume.add_argument(
        "--executor", choices=EXECUTOR_NAMES, default=None, help="default: as the run"
    )
    resume.add_argument("--fail-fast", action="store_true", help="cancel the rest on a failure")
    resume.add_argument("--json", action="store_true", help="print the result as JSON")
    resume.add_argument("--state-dir", default=None, help=state_help)
    resume.set_defaults(func=cmd_resume)


# -- helpers ----------------------------------------------------------------------


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        # Pipes and logs have no width to fit: keep rows on one line.
        console = Console(stderr=stderr, highlight=False, width=200)
    return console


def _fail(message: str) -> int:
    print(f"pipeopt: {message}", file=sys.stderr)
    return EXIT_USAGE


def _open_store(args: argparse.Namespace) -> RunStore:
    from pipeopt.store import RunStore

    return RunStore(args.state_dir or default_state_dir())


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)}m{seconds:04.1f}s"


_STYLES = {
    "succeeded": "green",
    "cached": "cyan",
    "failed": "red",
    "crashed": "red",
    "skipped": "yellow",
    "cancelled": "magenta",
    "running": "blue",
    "retrying": "yellow",
}


def _state(text: str) -> Any:
    from rich.text import Text

    return Text(text, style=_STYLES.get(text, ""))


# -- history ------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    """List the recorded runs, newest first."""
    if args.limit < 1:
        return _fail(f"--limit must be an integer >= 1, got {args.limit}")
    try:
        with _open_store(args) as store:
            runs = store.list_runs(args.limit)
            path = store.path
    except PipeoptError as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.write(json.dumps([dataclasses.asdict(r) for r in runs], indent=2) + "\n")
        return EXIT_OK
    console = _console()
    if not runs:
        console.print(f"no runs recorded in {path}", markup=False)
        return EXIT_OK
    console.print(_history_table(runs, str(path)))
    return EXIT_OK


def _history_table(runs: list[RunSummary], path: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"runs in {path}, newest first", title_justify="left")
    for column in ("run", "pipeline", "status", "started", "duration", "tasks"):
        table.add_column(column, no_wrap=column in ("run", "started"))
    for column in ("ok", "failed", "skipped", "cancelled", "cached"):
        table.add_column(column, justify="right")
    table.add_column("resumed from")
    for run in runs:
        table.add_row(
            Text(run.run_id),
            Text(run.pipeline),
            _state(run.status),
            _when(run.started_at),
            _seconds(run.duration),
            str(run.tasks),
            str(run.succeeded),
            str(run.failed),
            str(run.skipped),
            str(run.cancelled),
            str(run.cached),
            Text(run.resumed_from or ""),
        )
    return table


# -- show -------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    """Show one recorded run: its summary and a row per task."""
    try:
        with _open_store(args) as store:
            detail = store.show_run(args.run_id)
    except PipeoptError as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.write(json.dumps(dataclasses.asdict(detail), indent=2, default=str) + "\n")
        return EXIT_OK
    _print_detail(detail, _console(), every=args.all, tracebacks=args.tracebacks)
    return EXIT_OK


def _print_detail(detail: RunDetail, console: Console, *, every: bool, tracebacks: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    run = detail.summary
    facts = [
        ("run", run.run_id),
        ("pipeline", run.pipeline),
        ("status", run.status),
        ("started", _when(run.started_at)),
        ("ended", _when(run.ended_at)),
        ("duration", _seconds(run.duration)),
        ("executor", f"{run.executor}, {run.workers} workers"),
        ("host", f"{detail.host} (pid {detail.pid})"),
        ("fingerprint", detail.fingerprint),
    ]
    if run.resumed_from:
        facts.append(("resumed from", run.resumed_from))
    if run.source:
        facts.append(("source", run.source))
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        console.print(Text(f"{label:<{width}}  {value}"))
    tasks = list(detail.tasks)
    hidden = 0
    if not every and len(tasks) > SHOW_LIMIT:
        # Whatever did not succeed comes first: it is what one looks for.
        notable = [t for t in tasks if t.state not in ("succeeded", "cached")]
        rest = [t for t in tasks if t.state in ("succeeded", "cached")]
        tasks = (notable + rest)[:SHOW_LIMIT]
        hidden = len(detail.tasks) - len(tasks)
    table = Table(title_justify="left")
    for column in ("task", "criticality", "state", "attempts", "duration", "error / note"):
        table.add_column(
            column, overflow="fold", justify="right" if column == "attempts" else "left"
        )
    for task in tasks:
        table.add_row(
            Text(task.name),
            task.criticality,
            _state(task.state),
            str(task.attempts),
            _seconds(task.duration),
            Text(_error_or_note(task)[:300]),
        )
    if tasks:
        console.print(table)
    if hidden:
        console.print(Text(f"{hidden} more tasks not listed; --all lists every task"))
    counts = {
        "succeeded": run.succeeded,
        "failed": run.failed,
        "skipped": run.skipped,
        "cancelled": run.cancelled,
        "cached": run.cached,
    }
    tally = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tasks finished"
    console.print(Text(f"{run.status} — {tally} of {run.tasks} tasks"))
    if tracebacks:
        for task in detail.tasks:
            if task.traceback:
                console.print(Text(f"\n--- {task.name} ---", style="bold"))
                console.print(Text(task.traceback.rstrip()))


def _error_or_note(task: TaskSummary) -> str:
    if task.error_type is not None:
        return f"{task.error_type}: {task.error}"
    return task.note or ""


# -- resume --------------------------------------------------------------------------


def _source(store: RunStore, run: RunSummary) -> str | None:
    """Return the pipeline file of ``run``, or of the run it resumed, and so on."""
    seen = {run.run_id}
    while run.source is None and run.resumed_from is not None and run.resumed_from not in seen:
        seen.add(run.resumed_from)
        try:
            run = store.summary(run.resumed_from)
        except PipeoptError:
            return None
    return run.source


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume a recorded run: run again only the tasks that did not succeed."""
    from pipeopt.cli import load_pipeline
    from pipeopt.optimizer import PipelineOptimizer

    if args.last and args.run_id is not None:
        return _fail("give a RUN_ID or --last, not both")
    if args.workers is not None and args.workers < 1:
        return _fail(f"--workers must be an integer >= 1, got {args.workers}")
    state_dir = args.state_dir or default_state_dir()
    try:
        with _open_store(args) as store:
            run = store.summary(store.resolve_run(args.run_id))
            source = args.file or _source(store, run)
        if source is None:
            return _fail(
                f"run {run.run_id} has no recorded pipeline file; pass --file FILE[:PIPELINE]"
            )
        pipeline = load_pipeline(source)
        if pipeline.name != run.pipeline:
            return _fail(
                f"{source} holds pipeline {pipeline.name!r}, but run {run.run_id} is a run "
                f"of {run.pipeline!r}; pass its file with --file"
            )
        optimizer = PipelineOptimizer(
            max_workers=args.workers or run.workers,
            executor=args.executor or run.executor,
            fail_fast=args.fail_fast,
            state_dir=state_dir,
        )
    except (PipelineError, PipeoptError) as exc:
        return _fail(str(exc))
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    code = EXIT_OK
    try:
        result = optimizer.resume(pipeline, run.run_id, force=args.force)
    except KeyboardInterrupt as exc:
        partial: RunResult | None = exc.result if isinstance(exc, RunInterrupted) else None
        if partial is None:
            _finish(optimizer, None, source)
            print("pipeopt: interrupted", file=sys.stderr)
            return EXIT_SIGINT
        result, code = partial, EXIT_SIGINT
    except (PipelineError, PipeoptError) as exc:
        _finish(optimizer, None, source)
        return _fail(str(exc))
    _finish(optimizer, result.run_id, source)
    if code == EXIT_OK and not result.ok:
        code = EXIT_FAILED
    _report(result, json_output=args.json)
    return code


def _finish(optimizer: PipelineOptimizer, run_id: str | None, source: str) -> None:
    """Record where the new run came from (so it resumes in turn) and close the store."""
    try:
        store = optimizer.store
    except PipeoptError:
        return  # it never opened; the error was reported
    if store is None:
        return
    try:
        if run_id is not None:
            store.set_source(run_id, source)
    except PipeoptError as exc:
        print(f"pipeopt: warning: {exc}", file=sys.stderr)
    finally:
        store.close()


def _report(result: RunResult, *, json_output: bool) -> None:
    if json_output:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        return
    from pipeopt.cli import print_summary

    print_summary(result)


# -- entry point --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return a parser with just the run store's commands."""
    parser = _Parser(prog="pipeopt", description="The run store's commands.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    add_parsers(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``history``, ``show`` or ``resume`` and return the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("pipeopt: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:
        return EXIT_OK
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
