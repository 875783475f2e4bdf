"""What the command line shows of results: short reprs, criticality, the run summary."""

from __future__ import annotations

import reprlib
from typing import TYPE_CHECKING, Any

from pipeopt.cli.app import cell, clean, error_text

if TYPE_CHECKING:
    from rich.console import Console

    from pipeopt.result import RunResult

_STATE_STYLES = {
    "succeeded": "green",
    "cached": "cyan",
    "failed": "red",
    "crashed": "red",
    "skipped": "yellow",
    "cancelled": "magenta",
    "running": "blue",
    "retrying": "yellow",
}
SUMMARY_ALL = 20  # runs of up to this many tasks list every task
SUMMARY_NOT_OK = 20  # larger runs list at most this many tasks that did not succeed
REPR_CHARS = 120

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxset = _short.maxdict = 6
_short.maxlevel = 3


def state_cell(state: str) -> Any:
    """Return a task or run state as a coloured table cell."""
    return cell(state, _STATE_STYLES.get(state, ""))


def short_repr(value: Any) -> str:
    """Return a one-line repr of a result, at most ``REPR_CHARS`` characters."""
    try:
        text = _short.repr(value)
    except Exception:
        text = f"<{type(value).__name__}: repr failed>"
    text = clean(text)
    return text if len(text) <= REPR_CHARS else text[: REPR_CHARS - 3] + "..."


def criticality_text(effective: str, declared: str | None) -> str:
    """Return ``low → blocker`` when a task inherited a more urgent label, else the label."""
    if declared and declared != effective:
        return f"{declared} → {effective}"
    return effective


def results_json(result: RunResult) -> dict[str, Any]:
    """Return the run's JSON with a short repr of each task's result."""
    doc = result.to_dict()
    for name, task in doc["tasks"].items():
        if name in result.results:
            task["result"] = short_repr(result.results[name])
    return doc


def print_summary(result: RunResult, out: Console) -> None:
    """Print the run's summary.

    A run of up to ``SUMMARY_ALL`` tasks gets a row per task; a larger one
    the counts by state, then at most ``SUMMARY_NOT_OK`` tasks that did not
    succeed and how many more there are.
    """
    from rich.table import Table
    from rich.text import Text

    outcomes = list(result.tasks.values())
    counts = ", ".join(f"{v} {k}" for k, v in result.counts().items() if v)
    line = Text(result.status.value, style="bold")
    line.append(f" in {result.wall_time:.2f}s — {counts}")
    small = len(outcomes) <= SUMMARY_ALL
    more = 0
    shown = outcomes
    if not small:
        shown = [o for o in outcomes if o.state.value not in ("succeeded", "cached")]
        more = max(0, len(shown) - SUMMARY_NOT_OK)
        shown = shown[:SUMMARY_NOT_OK]
    if not small:
        out.print(line)
    if shown:
        title = f"{result.pipeline} — run {result.run_id}"
        if not small:
            title += " — tasks that did not succeed"
        table = Table(title=cell(title), title_justify="left")
        columns = ["task", "criticality", "state", "attempts", "duration"]
        columns.append("result / error")
        for column in columns:
            table.add_column(column, overflow="fold")
        for o in shown:
            if o.error is not None:
                detail = error_text(o.error)[:200]
            elif o.name in result.results:
                detail = short_repr(result.results[o.name])
            else:
                detail = ""
            table.add_row(
                cell(o.name),
                cell(criticality_text(o.criticality, o.declared_criticality)),
                state_cell(o.state.value),
                str(o.attempts),
                f"{o.duration:.3f}s" if o.duration is not None else "-",
                cell(detail),
            )
        out.print(table)
    if more:
        hint = f"pipeopt show {result.run_id}"
        out.print(cell(f"and {more} more tasks that did not succeed ({hint})"))
    if small:
        out.print(line)
