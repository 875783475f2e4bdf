"""Exactly-once loads: what the staging upsert and the load ledger cost, on real databases.

Two comparisons, each side by side in one process run, the runners' order
rotating between repetitions so that a slow spell of the (shared, 2-core)
machine hits them all alike; each figure is the median of ``--repeat`` runs
of rows per second of wall time of ``write_batches``:

1. ``upsert`` (PostgreSQL, ``--rows`` rows, default 400,000, batches of
   ``--batch`` rows into a fresh table with a primary key):
   ``copy-append`` (plain ``COPY``, no conflict handling: the ceiling),
   ``staging-upsert`` (``COPY`` into a temporary table, then one ``INSERT ...
   SELECT ... ON CONFLICT DO UPDATE``, what ``PostgresSink`` does now) and
   ``executemany-upsert`` (one ``INSERT ... ON CONFLICT`` per row, pipelined,
   what it did before). Targets: staging ≥ 3× executemany, ≥ 0.6× COPY.
2. ``ledger`` (SQLite file and PostgreSQL COPY appends): the same load with
   and without a ``load_id``, i.e. with and without the ledger row moved in
   each batch's transaction, at the batch size the adaptive batcher settles
   at for the SLO on that sink (found by an uncounted warm-up load). Target:
   the ledger costs ≤ 5 % of throughput.

Usage::

    python benchmarks/loads.py                  # 5 repetitions, a few minutes
    python benchmarks/loads.py --quick          # 1 repetition, 100,000 rows
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeopt.batching import AdaptiveBatcher, FixedBatcher
from pipeopt.sinks import PostgresSink, SQLiteSink, write_batches

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
COLUMNS = ("id", "k", "payload", "amount")


def rows(count: int) -> Iterator[tuple[int, int, str, float]]:
    """Yield ``count`` deterministic rows."""
    for i in range(count):
        mixed = (i * 2654435761) % 4294967296
        yield (i, mixed % 10_007, f"{mixed:08x}-{i:012d}-payload", (mixed % 100_000) / 7.0)


class Postgres:
    """Fresh tables in a schema of its own, dropped at the end."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.schema = f"pipeopt_bench_{uuid.uuid4().hex[:10]}"
        self.admin(f"CREATE SCHEMA {self.schema}")
        self.n = 0

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement)

    def table(self) -> str:
        self.n += 1
        name = f"{self.schema}.t{self.n}"
        self.admin(
            f"CREATE TABLE {name} (id bigint PRIMARY KEY, k integer, payload text, "
            "amount double precision)"
        )
        return name

    def close(self) -> None:
        self.admin(f"DROP SCHEMA {self.schema} CASCADE")


def timed(load: Callable[[], int]) -> float:
    """Return rows per second of wall time of ``load`` (which returns the rows written)."""
    began = time.perf_counter()
    written = load()
    return written / (time.perf_counter() - began)


def rotate(runners: list[Any], rep: int) -> list[Any]:
    k = rep % len(runners)
    return runners[k:] + runners[:k]


def bench_upsert(args: argparse.Namespace) -> dict[str, list[float]]:
    pg = Postgres(args.dsn)
    configs: list[tuple[str, dict[str, Any]]] = [
        ("copy-append", {"method": "copy"}),
        ("staging-upsert", {"method": "copy", "upsert_keys": ["id"]}),
        ("executemany-upsert", {"method": "executemany", "upsert_keys": ["id"]}),
    ]
    out: dict[str, list[float]] = {name: [] for name, _ in configs}
    try:
        for rep in range(args.repeat):
            for name, options in rotate(configs, rep):
                table = pg.table()
                with PostgresSink(args.dsn, table, COLUMNS, **options) as sink:
                    rate = timed(
                        lambda sink=sink: (
                            write_batches(
                                rows(args.rows), sink, FixedBatcher(args.batch)
                            ).rows_written
                        )
                    )
                pg.admin(f"DROP TABLE {table}")
                out[name].append(rate)
                print(f"upsert rep {rep + 1} {name}: {rate:,.0f} rows/s", file=sys.stderr)
    finally:
        pg.close()
    return out


def bench_ledger(
    kind: str, args: argparse.Namespace, folder: Path
) -> tuple[int, dict[str, list[float]]]:
    pg = Postgres(args.dsn) if kind == "postgres" else None
    made = 0

    def sink() -> SQLiteSink | PostgresSink:
        nonlocal made
        made += 1
        if pg is not None:
            return PostgresSink(args.dsn, pg.table(), COLUMNS)
        path = folder / f"ledger{made}.db"
        conn = sqlite3.connect(path)
        conn.execute(
            f"CREATE TABLE t{made} (id INTEGER PRIMARY KEY, k INTEGER, payload TEXT, amount REAL)"
        )
        conn.close()
        return SQLiteSink(path, f"t{made}", COLUMNS, create=False)

    try:
        sizes: list[int] = []
        with sink() as warm:  # the sizes the adaptive batcher settles at
            write_batches(
                rows(args.rows),
                warm,
                AdaptiveBatcher(args.slo, min_size=100, max_size=1_000_000),
                on_batch=lambda size, _latency: sizes.append(size),
            )
        size = int(statistics.median(sizes[len(sizes) // 2 :]))
        out: dict[str, list[float]] = {"no ledger": [], "ledger": []}
        runners = [("no ledger", None), ("ledger", "bench-load")]
        for rep in range(args.repeat):
            for name, load_id in rotate(runners, rep):
                with sink() as target:
                    rate = timed(
                        lambda target=target, load_id=load_id: (
                            write_batches(
                                rows(args.rows), target, FixedBatcher(size), load_id=load_id
                            ).rows_written
                        )
                    )
                out[name].append(rate)
                print(f"{kind} ledger rep {rep + 1} {name}: {rate:,.0f} rows/s", file=sys.stderr)
    finally:
        if pg is not None:
            pg.close()
    return size, out


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons; print Markdown tables; return 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, 100,000 rows")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=10_000, help="upsert batch size")
    parser.add_argument("--slo", type=float, default=0.1, help="the adaptive batcher's SLO, s")
    parser.add_argument("--dsn", default=os.environ.get("PIPEOPT_TEST_POSTGRES_DSN", DEFAULT_DSN))
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.rows = args.rows or (100_000 if args.quick else 400_000)
    load = os.getloadavg()
    print(
        f"{args.rows:,} rows, {args.repeat} repetitions, python {platform.python_version()}, "
        f"{os.cpu_count()} cpus, load average {load[0]:.1f} at the start"
    )

    upsert = bench_upsert(args)
    print(f"\n### PostgreSQL upsert, {args.rows:,} rows, batches of {args.batch:,}\n")
    print("| runner | rows/s (median) | range |")
    print("|---|---|---|")
    for name, rates in upsert.items():
        print(f"| {name} | {median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} |")
    staging = median(upsert["staging-upsert"])
    print(
        f"\nstaging / executemany upsert: {staging / median(upsert['executemany-upsert']):.2f}× "
        f"(target ≥ 3); staging upsert / COPY append: "
        f"{staging / median(upsert['copy-append']):.2f}× (target ≥ 0.6)"
    )

    print("\n### Ledger cost at the adaptive batcher's size\n")
    print("| sink | batch size | no ledger rows/s | ledger rows/s | ledger/no ledger |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="pipeopt-bench-") as folder:
        for kind in ("sqlite", "postgres"):
            size, rates = bench_ledger(kind, args, Path(folder))
            ratio = median(rates["ledger"]) / median(rates["no ledger"])
            print(
                f"| {kind} | {size:,} | {median(rates['no ledger']):,.0f} "
                f"| {median(rates['ledger']):,.0f} | {ratio:.3f} |"
            )
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} at the end (target: ledger/no ledger ≥ 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
