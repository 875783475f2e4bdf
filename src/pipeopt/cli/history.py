"""``pipeopt history`` and ``pipeopt show RUN_ID``: read the run store.

Both open it read-only: a state folder without a store is an error (a
mistyped ``--state-dir`` must not leave a new, empty store behind).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt.cli.app import (
    ExitCode,
    Parser,
    add_state_dir_option,
    cell,
    clean,
    console,
    int_range,
    state_dir,
)
from pipeopt.cli.summary import criticality_text, short_repr, state_cell
from pipeopt.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from pipeopt.store import RunDetail, RunStore, RunSummary, TaskSummary

SHOW_LIMIT = 200  # task rows `show` prints without --all
MAX_LIMIT = 1_000_000


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``history`` and ``show``."""
    history = commands.add_parser("history", help="list recorded runs, newest first")
    history.add_argument(
        "--limit",
        "-n",
        type=int_range(1, MAX_LIMIT),
        default=20,
        help="runs to list (default 20)",
    )
    history.add_argument("--json", action="store_true", help="print the runs as JSON")
    add_state_dir_option(history)
    history.set_defaults(func=history_command)

    show = commands.add_parser("show", help="show a recorded run task by task")
    show.add_argument(
        "run_id", metavar="RUN_ID", help="a run id, a unique prefix of one, or 'last'"
    )
    show.add_argument(
        "--all", action="store_true", help=f"list every task, not the first {SHOW_LIMIT}"
    )
    show.add_argument(
        "--tracebacks", action="store_true", help="print the tracebacks of failed attempts"
    )
    show.add_argument(
        "--logs",
        metavar="TASK",
        default=None,
        help="print a task's captured log records and its failed attempts' tracebacks",
    )
    show.add_argument(
        "--result",
        metavar="TASK",
        default=None,
        help="print a task's stored result (as JSON with --json, when it is JSON-able)",
    )
    show.add_argument("--json", action="store_true", help="print the run as JSON")
    add_state_dir_option(show)
    show.set_defaults(func=show_command)


def open_store(args: argparse.Namespace) -> RunStore:
    """Open the run store of ``--state-dir`` to read it; never create one.

    Raises:
        RunStoreError: the folder or its store does not exist or cannot be read.
    """
    from pipeopt.store import RunStore

    folder = state_dir(args)
    assert folder is not None
    return RunStore(folder, read_only=True)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    """Return a duration as ``1.234s``, ``12.3s`` or ``2m03.4s``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.3f}s" if value < 10 else f"{value:.1f}s"
    minutes, rest = divmod(value, 60)
    return f"{int(minutes)}m{rest:04.1f}s"


# -- history -----------------------------------------------------------------------------


def history_command(args: argparse.Namespace) -> int:
    """List the recorded runs, newest first."""
    with open_store(args) as store:
        runs = store.list_runs(args.limit)
        path = store.path
    if args.json:
        doc = [dataclasses.asdict(r) for r in runs]
        sys.stdout.write(json.dumps(doc, indent=2, default=params_json) + "\n")
        return ExitCode.OK
    out = console()
    if not runs:
        out.print(cell(f"no runs recorded in {path}"))
        return ExitCode.OK
    out.print(_history_table(runs, path))
    return ExitCode.OK


def _history_table(runs: list[RunSummary], path: Path) -> Any:
    from rich.table import Table

    table = Table(title=cell(f"runs in {path}, newest first"), title_justify="left")
    for column in ("run", "pipeline", "status", "started", "duration", "tasks"):
        table.add_column(column, no_wrap=column in ("run", "started"))
    show_params = any(run.params for run in runs)
    for column in ("ok", "failed", "skipped", "cancelled", "cached"):
        table.add_column(column, justify="right")
    table.add_column("resumed from")
    if show_params:
        table.add_column("params", overflow="fold")
    for run in runs:
        extra = [cell(params_text(run.params))] if show_params else []
        table.add_row(
            cell(run.run_id),
            cell(run.pipeline),
            state_cell(run.status),
            _when(run.started_at),
            seconds(run.duration),
            str(run.tasks),
            str(run.succeeded),
            str(run.failed),
            str(run.skipped),
            str(run.cancelled),
            str(run.cached),
            cell(run.resumed_from or ""),
            *extra,
        )
    return table


# -- show ----------------------------------------------------------------------------------


def show_command(args: argparse.Namespace) -> int:
    """Show one recorded run: its summary and a row per task (or one task's logs or result)."""
    results: dict[str, Any] = {}
    with open_store(args) as store:
        detail = store.show_run(args.run_id)
        if args.result is not None:
            name = find_task(detail, args.result).name
            results = store.load_results(detail.run_id, names={name})
        elif args.json and args.logs is None and detail.summary.status != "running":
            results = store.load_results(detail.run_id, names={t.name for t in detail.tasks})
    if args.logs is not None:
        print_logs(find_task(detail, args.logs), console())
        return ExitCode.OK
    if args.result is not None:
        print_result(detail, args.result, results, as_json=args.json)
        return ExitCode.OK
    if args.json:
        doc = dataclasses.asdict(detail)
        for task in doc["tasks"]:
            if task["name"] in results:
                task["result"] = short_repr(results[task["name"]])
        sys.stdout.write(json.dumps(doc, indent=2, default=params_json) + "\n")
        return ExitCode.OK
    _print_detail(detail, console(), every=args.all, tracebacks=args.tracebacks)
    return ExitCode.OK


def _print_detail(detail: RunDetail, out: Console, *, every: bool, tracebacks: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    run = detail.summary
    facts = [
        ("run", run.run_id),
        ("pipeline", run.pipeline),
        ("status", run.status),
        ("started", _when(run.started_at)),
        ("ended", _when(run.ended_at)),
        ("duration", seconds(run.duration)),
        ("executor", f"{run.executor}, {run.workers} workers"),
        ("host", f"{detail.host} (pid {detail.pid})"),
        ("fingerprint", detail.fingerprint),
    ]
    if run.resumed_from:
        facts.append(("resumed from", run.resumed_from))
    if run.source:
        facts.append(("source", run.source))
    if run.params:
        facts.append(("params", params_text(run.params)))
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        out.print(cell(f"{label:<{width}}  {value}"))
    tasks = list(detail.tasks)
    hidden = 0
    if not every and len(tasks) > SHOW_LIMIT:
        # Whatever did not succeed comes first: it is what one looks for.
        notable = [t for t in tasks if t.state not in ("succeeded", "cached")]
        rest = [t for t in tasks if t.state in ("succeeded", "cached")]
        tasks = (notable + rest)[:SHOW_LIMIT]
        hidden = len(detail.tasks) - len(tasks)
    table = Table(title_justify="left")
    estimated = any(task.estimate is not None for task in detail.tasks)
    columns = ["task", "criticality", "state", "attempts", "duration", "error / note"]
    if estimated:
        columns[5:5] = ["estimate", "source"]
    for column in columns:
        table.add_column(
            column, overflow="fold", justify="right" if column == "attempts" else "left"
        )
    for task in tasks:
        row = [
            cell(task.name),
            cell(criticality_text(task.criticality, task.declared_criticality)),
            state_cell(task.state),
            str(task.attempts),
            seconds(task.duration),
            cell(_error_or_note(task)[:300]),
        ]
        if estimated:
            row[5:5] = [seconds(task.estimate), task.estimate_source]
        table.add_row(*row)
    if tasks:
        out.print(table)
    if hidden:
        out.print(Text(f"{hidden} more tasks not listed; --all lists every task"))
    counts = {
        "succeeded": run.succeeded,
        "failed": run.failed,
        "skipped": run.skipped,
        "cancelled": run.cancelled,
        "cached": run.cached,
    }
    tally = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tasks finished"
    out.print(cell(f"{run.status} — {tally} of {run.tasks} tasks"))
    if tracebacks:
        for task in detail.tasks:
            print_tracebacks(task, out)


def _error_or_note(task: TaskSummary) -> str:
    if task.error_type is not None:
        return f"{task.error_type}: {task.error}"
    return task.note or ""


def params_text(params: dict[str, Any]) -> str:
    """Return run parameters as ``k=v, k=v``."""
    from pipeopt.params import show_value

    return ", ".join(f"{k}={show_value(v)}" for k, v in params.items())


def params_json(value: Any) -> Any:
    """Return a JSON stand-in for a parameter value ``json`` cannot encode (a date: ISO)."""
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


def find_task(detail: RunDetail, name: str) -> TaskSummary:
    """Return the task of ``detail`` named ``name``.

    Raises:
        UsageError: no such task (with the nearest name).
    """
    import difflib

    for task in detail.tasks:
        if task.name == name:
            return task
    names = [t.name for t in detail.tasks]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"run {detail.run_id} has no task {clean(name)!r}{clean(hint)}")


def print_tracebacks(task: TaskSummary, out: Console) -> None:
    """Print the traceback of each failed attempt of ``task`` (or its final one)."""
    from rich.text import Text

    failed = [a for a in task.history if a.traceback]
    if not failed and task.traceback:
        out.print(cell(f"--- {task.name} ---", "bold"))
        out.print(Text(clean(task.traceback.rstrip(), lines=True)))
    for attempt in failed:
        assert attempt.traceback is not None
        out.print(cell(f"--- {task.name}, attempt {attempt.number} ---", "bold"))
        out.print(Text(clean(attempt.traceback.rstrip(), lines=True)))


def print_logs(task: TaskSummary, out: Console) -> None:
    """Print a task's captured log records, then the tracebacks of its failed attempts."""
    from rich.text import Text

    if not task.logs:
        out.print(cell(f"task {task.name} logged nothing"))
    for line in task.logs:
        out.print(Text(clean(line, lines=True)))
    print_tracebacks(task, out)


def print_result(detail: RunDetail, name: str, results: dict[str, Any], *, as_json: bool) -> None:
    """Print a stored result, as JSON or as its (pretty) repr.

    Raises:
        UsageError: the task has no stored result, or ``as_json`` and it is not JSON-able.
    """
    import pprint

    from rich.text import Text

    if name not in results:
        raise UsageError(
            f"task {clean(name)!r} of run {detail.run_id} has no stored result: it did not "
            "succeed, or its result was not kept (persist=False, not picklable or too large)"
        )
    value = results[name]
    if as_json:
        try:
            text = json.dumps(value, indent=2)
        except (TypeError, ValueError):
            raise UsageError(
                f"the result of {clean(name)!r} is {type(value).__name__}, not JSON-able; "
                "leave out --json to print its repr"
            ) from None
        sys.stdout.write(text + "\n")
        return
    console().print(Text(clean(pprint.pformat(value, width=100), lines=True)))
