"""Tier B: the adaptive batcher against fixed sizes on a real SQLite file and the real PostgreSQL.

For each sink (``sqlite``: a file in a temporary folder, WAL; ``pg-copy`` and
``pg-executemany``: PostgreSQL named by ``PIPEOPT_TEST_POSTGRES_DSN`` or
``--dsn``) a repetition writes the same rows through several runners, one
after the other into a fresh table each:

* ``adaptive``: ``AdaptiveBatcher(target_latency=SLO, min_size=100)``, cold;
* four ``FixedBatcher`` sizes: 0.75× and 1.25× the size the adaptive batcher
  settled at on the indexed table in an uncounted warm-up run, and 0.9× and
  1.25× the size it settled at on the bare table, so in each phase some
  fixed sizes land under the SLO and some over it.

Halfway through, three secondary indexes are built on the table (not
timed): rows get dearer, so the size that meets the SLO falls. That is the
drift. The first phase holds about ``--batches-per-phase`` SLO-sized batches
of the bare table, the second as many of the indexed one, and at least two
of the bare table's. The runners'
order rotates between repetitions, so a slow spell of the (shared, 2-core)
machine hits them all alike.

Throughput is rows per second of sink time (the sum of the batch latencies
``write_batches`` measured), per phase and for the whole run. The *oracle*
of a phase is the fixed size with the most rows/s whose p95 latency met the
SLO in that phase of that repetition; the whole-run oracle is the best
fixed size that met it in both phases (a fixed size must serve both). The
ratio adaptive/oracle is paired within a repetition; the table shows the
median over repetitions and its range.

Usage::

    python benchmarks/batching_real.py            # 5 repetitions, a few minutes
    python benchmarks/batching_real.py --quick    # 1 repetition, smaller phases
    python benchmarks/batching_real.py --sinks sqlite --repeat 3
    python benchmarks/batching_real.py --ledger   # every load keeps its exactly-once ledger
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeopt.batching import AdaptiveBatcher, Batcher, FixedBatcher
from pipeopt.sinks import PostgresSink, Row, SQLiteSink, write_batches

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SINKS = ("sqlite", "pg-copy", "pg-executemany")
COLUMNS = ("id", "k", "payload", "amount")
INDEXES = ("k", "payload", "amount, k")
TAIL = 1.3  # a p95/mean allowance used only to size the phases


def rows(start: int, count: int) -> Iterator[tuple[int, int, str, float]]:
    """Yield deterministic rows ``start .. start+count-1``."""
    for i in range(start, start + count):
        mixed = (i * 2654435761) % 4294967296
        yield (i, mixed % 10_007, f"{mixed:08x}-{i:012d}-payload", (mixed % 100_000) / 7.0)


# -- sinks -------------------------------------------------------------------------


class Target:
    """Makes fresh tables on one database and opens sinks on them."""

    def __init__(self, kind: str, folder: Path, dsn: str) -> None:
        self.kind = kind
        self.folder = folder
        self.dsn = dsn
        self.schema = f"pipeopt_bench_{uuid.uuid4().hex[:10]}"
        if kind != "sqlite":
            self._admin("CREATE SCHEMA {schema}")

    @staticmethod
    def _sqlite(path: Path, statement: str) -> None:
        conn = sqlite3.connect(path)
        try:
            conn.execute(statement)
        finally:
            conn.close()

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement.format(schema=self.schema))

    def open(self, name: str) -> SQLiteSink | PostgresSink:
        """Create table ``name`` afresh and return a sink on it."""
        if self.kind == "sqlite":
            path = self.folder / f"{name}.db"
            self._sqlite(
                path,
                f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, k INTEGER, "
                "payload TEXT, amount REAL)",
            )
            return SQLiteSink(path, name, COLUMNS, create=False)
        self._admin(
            f"CREATE TABLE {{schema}}.{name} "
            "(id bigint PRIMARY KEY, k integer, payload text, amount double precision)"
        )
        method: Literal["copy", "executemany"] = "copy" if self.kind == "pg-copy" else "executemany"
        return PostgresSink(self.dsn, f"{self.schema}.{name}", COLUMNS, method=method)

    def add_indexes(self, sink: SQLiteSink | PostgresSink, name: str) -> None:
        """Build the secondary indexes on table ``name`` (the drift)."""
        for n, columns in enumerate(INDEXES):
            if self.kind == "sqlite":
                self._sqlite(
                    self.folder / f"{name}.db", f"CREATE INDEX {name}_i{n} ON {name} ({columns})"
                )
            else:
                self._admin(f"CREATE INDEX {name}_i{n} ON {{schema}}.{name} ({columns})")

    def drop(self, sink: SQLiteSink | PostgresSink, name: str) -> None:
        """Close ``sink`` and remove its table."""
        sink.close()
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.folder / name}.db{suffix}").unlink(missing_ok=True)
        else:
            self._admin(f"DROP TABLE {{schema}}.{name}")

    def close(self) -> None:
        if self.kind != "sqlite":
            self._admin("DROP SCHEMA {schema} CASCADE")


# -- calibration -------------------------------------------------------------------


def fit_line(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Return (a, b) of the least-squares line latency = a + b·size."""
    n = len(samples)
    mx = sum(s for s, _ in samples) / n
    my = sum(t for _, t in samples) / n
    sxx = sum((s - mx) ** 2 for s, _ in samples)
    sxy = sum((s - mx) * (t - my) for s, t in samples)
    b = sxy / sxx
    return max(0.0, my - b * mx), b


def calibrate(target: Target, sizes: Sequence[int]) -> tuple[float, float]:
    """Return the (a, b) line of a small bare table: a first guess of the scale."""
    name = "calibrate"
    sink = target.open(name)
    samples = []
    start = 0
    try:
        for size in [*sizes, *sizes, *sizes]:
            batch = list(rows(start, size))
            start += size
            began = time.perf_counter()
            sink.write(batch)
            samples.append((size, time.perf_counter() - began))
    finally:
        target.drop(sink, name)
    return fit_line(samples)


def slo_size(line: tuple[float, float], slo: float) -> int:
    a, b = line
    return max(100, int((slo / TAIL - a) / b))


# -- one run -----------------------------------------------------------------------


@dataclass
class Phase:
    """The batches of one phase of one run."""

    latencies: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    rows: int = 0

    def add(self, size: int, latency: float) -> None:
        self.rows += size
        self.sizes.append(size)
        self.latencies.append(latency)

    def settled_size(self) -> int:
        """Return the median size of the last third of the phase."""
        return int(statistics.median(self.sizes[-max(1, len(self.sizes) // 3) :]))

    @property
    def throughput(self) -> float:
        return self.rows / sum(self.latencies)

    def p95(self) -> float:
        ordered = sorted(self.latencies)
        position = 0.95 * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(
    target: Target,
    name: str,
    batcher: Batcher,
    counts: tuple[int, int],
    budget: float | None = None,
    *,
    ledger: bool = False,
) -> tuple[Phase, Phase]:
    """Write ``counts`` rows in two phases through ``batcher``; build the indexes in between.

    With ``budget``, the second phase also stops after that many seconds.
    With ``ledger``, each phase is a load with a key, so every batch also
    moves the load's ledger row in its transaction.
    """
    sink = target.open(name)
    phases = (Phase(), Phase())
    try:
        for k, phase in enumerate(phases):
            source: Iterator[Row] = rows(k * counts[0], counts[k])
            if k == 1:
                target.add_indexes(sink, name)
                if budget is not None:
                    source = until(source, time.perf_counter() + budget)
            load_id = f"{name}-{k}" if ledger else None
            write_batches(source, sink, batcher, on_batch=phase.add, load_id=load_id)
    finally:
        target.drop(sink, name)
    return phases


def until(source: Iterator[Row], deadline: float) -> Iterator[Row]:
    """Yield from ``source`` until ``deadline`` (by ``time.perf_counter``)."""
    for row in source:
        if time.perf_counter() > deadline:
            return
        yield row


# -- the benchmark -----------------------------------------------------------------


@dataclass
class Figures:
    """Per runner, per repetition: (phase 1, phase 2)."""

    runs: dict[str, list[tuple[Phase, Phase]]] = field(default_factory=dict)

    def add(self, runner: str, phases: tuple[Phase, Phase]) -> None:
        self.runs.setdefault(runner, []).append(phases)


def oracle_ratios(figures: Figures, slo: float) -> tuple[list[float], list[float], list[float]]:
    """Return, per repetition, adaptive/oracle for phase 1, phase 2 and the whole run."""
    fixed = [name for name in figures.runs if name != "adaptive"]
    out: tuple[list[float], list[float], list[float]] = ([], [], [])
    for rep, (p1, p2) in enumerate(figures.runs["adaptive"]):
        for k, mine in enumerate((p1, p2)):
            meeting = [
                figures.runs[f][rep][k].throughput
                for f in fixed
                if figures.runs[f][rep][k].p95() <= slo
            ]
            if meeting:
                out[k].append(mine.throughput / max(meeting))
        both = [
            whole(figures.runs[f][rep])
            for f in fixed
            if all(phase.p95() <= slo for phase in figures.runs[f][rep])
        ]
        if both:
            out[2].append(whole((p1, p2)) / max(both))
    return out


def whole(phases: tuple[Phase, Phase]) -> float:
    return sum(p.rows for p in phases) / sum(sum(p.latencies) for p in phases)


def make_adaptive(slo: float) -> AdaptiveBatcher:
    """Return the batcher under test, as a pipeline would configure it."""
    return AdaptiveBatcher(slo, min_size=100, max_size=1_000_000)


def _fixed(size: int) -> Callable[[], Batcher]:
    return lambda: FixedBatcher(size)


def bench_sink(kind: str, args: argparse.Namespace, folder: Path) -> list[str]:
    """Benchmark one sink; print its table; return its summary lines."""
    slo = args.slo
    target = Target(kind, folder, args.dsn)
    try:
        a, b = calibrate(target, args.calibration_sizes)
        per_phase = args.batches_per_phase * slo_size((a, b), slo)
        # A warm-up run of the adaptive batcher (not counted) finds the sizes
        # that meet the SLO on tables of the real size, before and after the
        # indexes; the fixed sizes straddle those.
        warm = run(
            target,
            "warmup",
            make_adaptive(slo),
            (per_phase, per_phase),
            budget=5 * args.batches_per_phase * slo,
            ledger=args.ledger,
        )
        s_bare, s_indexed = (phase.settled_size() for phase in warm)
        # Phase 2 must also outlast the first batches after the drift, which
        # still have the bare table's size.
        counts = (per_phase, max(args.batches_per_phase * round(s_indexed * 1.1), 2 * s_bare))
        sizes = sorted(
            {round(s_indexed * 0.75), round(s_indexed * 1.25), round(s_bare * 0.9)}
            | {round(s_bare * 1.25)}
        )
        print(
            f"\n### {kind}\n\nsmall bare table a={a * 1e3:.2f} ms b={b * 1e6:.2f} µs/row; "
            f"warm-up sizes {s_bare:,} bare, {s_indexed:,} indexed; "
            f"{counts[0]:,} + {counts[1]:,} rows; fixed sizes {sizes}"
        )
        runners: list[tuple[str, Callable[[], Batcher]]] = [
            ("adaptive", lambda: make_adaptive(slo)),
        ]
        runners += [(f"fixed {s}", _fixed(s)) for s in sizes]
        figures = Figures()
        for rep in range(args.repeat):
            order = runners[rep % len(runners) :] + runners[: rep % len(runners)]
            for name, make in order:
                table = f"t_{name.replace(' ', '_')}_{rep}"
                print(f"{kind} repetition {rep + 1}: {name}", file=sys.stderr)
                figures.add(name, run(target, table, make(), counts, ledger=args.ledger))
    finally:
        target.close()

    print(
        "\n| runner | phase 1 rows/s | phase 1 p95 | phase 2 rows/s | phase 2 p95 "
        "| whole rows/s | batches over SLO |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, reps in figures.runs.items():
        over = statistics.median(
            sum(t > slo for p in phases for t in p.latencies) for phases in reps
        )
        batches = statistics.median(sum(len(p.latencies) for p in phases) for phases in reps)
        print(
            f"| {name} "
            f"| {statistics.median(p[0].throughput for p in reps):,.0f} "
            f"| {statistics.median(p[0].p95() for p in reps) * 1e3:.0f} ms "
            f"| {statistics.median(p[1].throughput for p in reps):,.0f} "
            f"| {statistics.median(p[1].p95() for p in reps) * 1e3:.0f} ms "
            f"| {statistics.median(whole(p) for p in reps):,.0f} "
            f"| {over:.0f} of {batches:.0f} |"
        )
    lines = []
    for label, ratios in zip(
        ("phase 1", "phase 2", "whole run"), oracle_ratios(figures, slo), strict=True
    ):
        if ratios:
            text = (
                f"| {kind} | {label} | {statistics.median(ratios):.3f} "
                f"| {min(ratios):.3f}–{max(ratios):.3f} | {len(ratios)} |"
            )
        else:
            text = f"| {kind} | {label} | no fixed size met the SLO | - | 0 |"
        lines.append(text)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller phases")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--slo", type=float, default=0.1, help="latency SLO in seconds")
    parser.add_argument("--sinks", default=",".join(SINKS))
    parser.add_argument("--batches-per-phase", type=int, default=None)
    parser.add_argument("--ledger", action="store_true", help="keep a load ledger (load_id=)")
    parser.add_argument("--dsn", default=os.environ.get("PIPEOPT_TEST_POSTGRES_DSN", DEFAULT_DSN))
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.batches_per_phase = args.batches_per_phase or (8 if args.quick else 12)
    args.calibration_sizes = (500, 2000, 8000) if args.quick else (1000, 4000, 16000)
    print(
        f"SLO {args.slo * 1e3:g} ms, {args.repeat} repetitions, "
        f"ledger {'on' if args.ledger else 'off'}, "
        f"python {platform.python_version()}, {os.cpu_count()} cpus"
    )
    started = time.perf_counter()
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pipeopt-bench-") as folder:
        for kind in args.sinks.split(","):
            began = time.perf_counter()
            try:
                summary += bench_sink(kind, args, Path(folder))
            except Exception as exc:  # a missing server skips that sink, not the rest
                if kind == "sqlite":
                    raise
                print(f"\n{kind}: skipped ({type(exc).__name__}: {exc})")
            print(f"{kind}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    print(f"\nadaptive/oracle, paired per repetition ({time.perf_counter() - started:.0f} s)\n")
    print("| sink | phase | median | range | repetitions |")
    print("|---|---|---|---|---|")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
