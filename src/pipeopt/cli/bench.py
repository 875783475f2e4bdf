"""``pipeopt bench``: run the benchmark suite from the command line.

Usage::

    pipeopt bench [--workload NAME ...] [--workers N] [--repeat K] [--out FILE]
                  [--png FILE] [--compare dask,threadpool] [--check BASELINE.json]
                  [--tolerance 0.15] [--seed S] [--scale X] [--quick]

It runs each workload sequentially (``max_workers=1``) and optimized
(``--workers``, 8 by default), ``--repeat`` times each (5; 1 with
``--quick``), and with ``--compare`` through the peers too, in the same
process run. A progress display runs on stderr, a summary table goes to
stdout, and the report is written to ``--out``
(``pipeline_optimizer_benchmarks.json``; schema in
:mod:`pipeopt.bench.report`) and, with ``--png``, drawn as a chart.

Exit codes: 0 done (and no regression), 1 ``--check`` found a regression
(or a workload failed), 2 bad usage, reported as one line on stderr.

Regression checks in CI
    ``--check BASELINE.json`` compares this run's *ratios* with the
    baseline's, never absolute times: the speedup over sequential and each
    peer ratio must not fall below ``baseline × (1 − tolerance)``, and
    makespan / lower bound must not rise above ``baseline × (1 + tolerance)``.
    Ratios are measured within one process run, sequential and optimized
    runs alternating, so a slower or busier CI machine moves both sides
    alike. To keep the check free of timing flakiness:

    * commit a baseline produced on the same kind of runner, e.g.
      ``pipeopt bench --workload io --repeat 5 --out bench-baseline.json``;
    * check with the sleep-based ``io`` workload, whose ratios do not depend
      on CPU speed: ``pipeopt bench --workload io --repeat 5 --check
      bench-baseline.json``; the CPU-bound workloads depend on how many
      cores the runner really has to spare;
    * use ``--repeat 5`` or more (medians) and keep ``--tolerance`` at
      0.15 or above on shared runners;
    * run it as its own CI job, not beside the test suite, so other jobs do
      not compete for the cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt.cli.app import (
    MAX_WORKERS,
    ExitCode,
    Parser,
    cell,
    clean,
    console,
    int_range,
    markup,
)
from pipeopt.errors import BenchmarkError, UsageError

if TYPE_CHECKING:
    from pipeopt.bench.report import BenchmarkReport
    from pipeopt.bench.suite import BenchmarkSuite

QUICK_SCALE = 0.25
DEFAULT_REPEAT, QUICK_REPEAT, MAX_REPEAT = 5, 1, 1000


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``bench``."""
    parser = commands.add_parser(
        "bench",
        help="benchmark sequential vs optimized runs (and peers)",
        description="Run the benchmark suite: sequential vs optimized runs, and peers.",
    )
    add_arguments(parser)
    parser.set_defaults(func=bench)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    from pipeopt.bench.report import DEFAULT_JSON
    from pipeopt.bench.workloads import BUILTIN_WORKLOADS

    names = ", ".join(BUILTIN_WORKLOADS)
    parser.add_argument(
        "--workload",
        dest="workloads",
        metavar="NAME",
        nargs="+",
        action="extend",
        help=f"workloads to run (default: all of {names})",
    )
    parser.add_argument(
        "--workers",
        type=int_range(2, MAX_WORKERS),
        default=8,
        metavar="N",
        help="workers of the optimized runs (8)",
    )
    parser.add_argument(
        "--repeat",
        type=int_range(1, MAX_REPEAT),
        default=None,
        metavar="K",
        help="runs per mode; medians (5)",
    )
    parser.add_argument(
        "--out", default=DEFAULT_JSON, metavar="FILE", help=f"JSON report ({DEFAULT_JSON})"
    )
    parser.add_argument("--png", default=None, metavar="FILE", help="also draw a PNG chart")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="PEERS",
        help="run peers too: threadpool, dask (threaded and distributed), "
        "dask-threaded, dask-distributed; comma-separated",
    )
    parser.add_argument(
        "--check",
        default=None,
        metavar="BASELINE.json",
        help="exit 1 if a ratio regressed against this earlier report",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.15,
        metavar="F",
        help="relative slack of --check, 0 <= F < 1 (0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="workload seed (0)")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        metavar="X",
        help=f"multiply the workloads' size (1; {QUICK_SCALE} with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller workloads, one repetition (~10 s)"
    )


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite; exit 1 if a workload failed or a ratio regressed."""
    from pipeopt.bench.report import BenchmarkReport
    from pipeopt.bench.suite import BenchmarkSuite, parse_peers
    from pipeopt.bench.workloads import BUILTIN_WORKLOADS

    workloads = list(dict.fromkeys(args.workloads or BUILTIN_WORKLOADS))
    for name in workloads:
        if name not in BUILTIN_WORKLOADS:
            raise UsageError(
                f"unknown workload {name!r}; choose from {', '.join(BUILTIN_WORKLOADS)}"
            )
    repeat = (
        args.repeat if args.repeat is not None else (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    )
    scale = args.scale if args.scale is not None else (QUICK_SCALE if args.quick else 1.0)
    if not math.isfinite(scale) or not 0 < scale <= 100:
        raise UsageError(f"--scale must be a number > 0 and <= 100, got {scale}")
    if not math.isfinite(args.tolerance) or not 0 <= args.tolerance < 1:
        raise UsageError(f"--tolerance must be >= 0 and < 1, got {args.tolerance}")
    try:
        peers = parse_peers(args.compare or "")
    except ValueError as exc:
        raise UsageError(f"--compare: {exc}") from None
    if args.compare is not None and not peers:
        raise UsageError("--compare needs at least one peer, e.g. --compare dask,threadpool")
    if any(p.startswith("dask") for p in peers) and not _has_module("dask"):
        raise UsageError("--compare dask needs dask: pip install 'pipeopt[dask]'")
    if "dask-distributed" in peers and not _has_module("distributed"):
        raise UsageError(
            "--compare dask-distributed needs distributed: pip install 'pipeopt[dask]'"
        )
    if args.png and not _has_module("matplotlib"):
        raise UsageError("--png needs matplotlib: pip install 'pipeopt[bench]'")
    for option, value in (("--out", args.out), ("--png", args.png)):
        if value and not Path(value).expanduser().resolve().parent.is_dir():
            raise UsageError(f"{option}: no such directory for {value}")
    baseline: BenchmarkReport | None = None
    if args.check:
        try:
            baseline = BenchmarkReport.read_json(args.check)
        except OSError as exc:
            raise UsageError(f"--check: cannot read {args.check}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--check: {exc}") from None
        common = {w.workload for w in baseline.workloads} & set(workloads)
        if not common:
            raise UsageError(
                f"--check: {args.check} has none of the workloads run ({', '.join(workloads)})"
            )

    suite = BenchmarkSuite(
        workers=args.workers, repetitions=repeat, seed=args.seed, scale=scale, peers=peers
    )
    out = console()
    try:
        report = _run_with_progress(suite, workloads)
    except BenchmarkError as exc:
        # A workload's pipeline failed, so its timings mean nothing.
        print(f"pipeopt bench: {clean(exc)}", file=sys.stderr)
        return ExitCode.FAILED
    out.print(summary_table(report))
    if args.out:
        report.write_json(args.out)
        out.print(cell(f"wrote {args.out}"))
    if args.png:
        report.write_png(args.png)
        out.print(cell(f"wrote {args.png}"))
    if baseline is not None:
        regressions = report.check(baseline, args.tolerance)
        if regressions:
            err = console(stderr=True)
            err.print(
                f"[bold red]{len(regressions)} regression(s)[/] against {markup(args.check)} "
                f"(tolerance {args.tolerance:.0%}):"
            )
            for item in regressions:
                err.print(cell(f"  {item}"))
            return ExitCode.FAILED
        out.print(cell(f"no ratio regressed beyond {args.tolerance:.0%} against {args.check}"))
    return ExitCode.OK


def _run_with_progress(suite: BenchmarkSuite, workloads: Sequence[str]) -> BenchmarkReport:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def update(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total, description=markup(label))

        return suite.run(workloads, progress=update)


def summary_table(report: BenchmarkReport) -> Any:
    """Return a ``rich`` table of the report: medians, ratios, bounds, and peers."""
    from rich.console import Group
    from rich.table import Table

    settings = report.settings
    table = Table(
        title=f"pipeopt bench: {settings.get('workers', '?')} workers, "
        f"{report.cpu_count} CPUs, median of {settings.get('repetitions', '?')}",
        caption="gain = 1 - optimized/sequential; bound = max(critical path, "
        "work/workers, CPU work/cores)",
    )
    for header in ("workload", "tasks", "sequential", "optimized", "gain", "speedup", "/bound"):
        table.add_column(header, justify="left" if header == "workload" else "right")
    for w in report.workloads:
        bound = w.makespan_over_bound
        table.add_row(
            cell(f"{w.workload} ({w.executor})"),
            str(w.tasks),
            f"{w.sequential_s:.3f} s",
            f"{w.optimized_s:.3f} s",
            f"{w.improvement_pct:.1f}%",
            f"{w.speedup:.2f}×",
            "-" if bound is None else f"{bound:.3f}",
        )
    if not report.peers:
        return table
    peers = Table(
        title="peers: median time (peer / pipeopt)",
        caption="> 1 means pipeopt is faster",
    )
    peers.add_column("workload")
    peers.add_column("pipeopt", justify="right")
    for peer in report.peers:
        peers.add_column(peer, justify="right")
    for w in report.workloads:
        cells: list[Any] = [cell(w.workload), f"{w.optimized_s:.3f} s"]
        for peer in report.peers:
            if peer in w.peers:
                cells.append(f"{w.peers[peer].median_s:.3f} s ({w.peer_ratio(peer):.2f})")
            else:
                cells.append("-")
        peers.add_row(*cells)
    return Group(table, peers)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
