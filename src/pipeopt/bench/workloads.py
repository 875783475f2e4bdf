"""Synthetic benchmark workloads: deterministic pipelines built from a seed.

Each workload is a function ``(seed, scale, workdir) -> Pipeline``. The same
seed and scale give the same graph, the same task costs and the same data;
``scale`` multiplies the amount of work (``--quick`` uses a fraction of it).

=========== ========= ==============================================================
workload    executor  shape
=========== ========= ==============================================================
``io``      thread    ETL: 6 sources fan out into partitions (sleep bodies with
                      lognormal durations), fan back in to loads, quality checks,
                      two reference-data chains, reports of mixed criticality and
                      deferred housekeeping
``cpu``     process   pure-Python number crunching, fan-out/fan-in (threads when
                      the process executor is not available)
``mixed``   thread    fetch (sleep) → parse (pure Python) → load (sleep) → report
``batching`` thread   12 partitions: fetch 4 pages (sleep) of rows, write them
                      into a real SQLite file via ``context.plan_batch`` /
                      ``context.record_batch`` (one writer at a time), verify
=========== ========= ==============================================================

Task bodies are module-level functions bound with :func:`functools.partial`,
so they pickle for the process executor and for dask distributed; each task
carries its nominal duration as ``expected_duration`` (the critical-path hint).
"""

from __future__ import annotations

import functools
import math
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt.graph import Pipeline, PipelineTask

if TYPE_CHECKING:
    from pipeopt.context import ExecutionContext

WorkloadFactory = Callable[[int, float, Path], Pipeline]

_FALLBACK_BATCH = 1000  # rows per batch when a body runs without a pipeopt context


# -- task bodies ---------------------------------------------------------------


def sleep_body(seconds: float, **_upstream: Any) -> float:
    """Wait ``seconds`` (an I/O call stand-in) and return the seconds asked for."""
    time.sleep(seconds)
    return seconds


def cpu_body(iterations: int, seed: int, **upstream: Any) -> int:
    """Run ``iterations`` steps of a linear congruential generator (pure Python)."""
    x = (seed + sum(v for v in upstream.values() if isinstance(v, int))) & 0x7FFFFFFF
    for _ in range(iterations):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


def fetch_rows(
    pages: tuple[float, ...], rows: int, seed: int, part: int
) -> list[tuple[int, int, str, float]]:
    """Wait for each page like a paged API call, then return ``rows`` deterministic rows."""
    for seconds in pages:
        time.sleep(seconds)
    base = part * 10_000_000
    kinds = ("click", "view", "purchase", "refund")
    step = 1 + (seed + part) % 97
    return [(base + k, part, kinds[k & 3], (k * step) % 10_000 / 100) for k in range(rows)]


def prepare_table(path: str) -> str:
    """Create (or empty) the ``events`` table of the SQLite file at ``path``."""
    with _connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("DROP TABLE IF EXISTS events")
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, part INTEGER, kind TEXT, amount REAL)"
        )
    return path


def write_rows(
    path: str, source: str, context: ExecutionContext | None = None, **upstream: Any
) -> int:
    """Write the rows fetched by task ``source`` in batches sized by the context's batcher."""
    rows: list[tuple[int, int, str, float]] = upstream[source]
    written = 0
    lock = _writer_lock(path)
    with _connect(path) as conn:
        while written < len(rows):
            left = len(rows) - written
            size = context.plan_batch(left) if context is not None else _FALLBACK_BATCH
            size = max(1, min(size, left))
            with lock:
                started = time.perf_counter()
                conn.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?)", rows[written : written + size]
                )
                conn.commit()
                latency = time.perf_counter() - started
            if context is not None:
                context.record_batch(size, latency)
            written += size
    return written


_writer_locks: dict[str, threading.Lock] = {}
_writer_locks_guard = threading.Lock()


def _writer_lock(path: str) -> threading.Lock:
    """Return the lock that lets one thread at a time write to the SQLite file at ``path``.

    SQLite has one writer at a time; waiting on its busy handler means
    sleeping in steps of up to 100 ms, so writers queue on a lock instead,
    as a SQLite sink with one writer connection would.
    """
    with _writer_locks_guard:
        return _writer_locks.setdefault(path, threading.Lock())


def verify_rows(path: str, expected: int, **_upstream: Any) -> int:
    """Count the rows written; raise if any is missing or doubled."""
    with _connect(path) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM events").fetchone()
    if count != expected:
        raise RuntimeError(f"expected {expected} rows in {path}, found {count}")
    return int(count)


class _Closing:
    """A SQLite connection that is closed (not only committed) on leaving ``with``."""

    def __init__(self, path: str) -> None:
        # Writers wait for each other's transactions instead of failing.
        self.conn = sqlite3.connect(path, timeout=60.0, check_same_thread=False)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.conn.commit()
        finally:
            self.conn.close()


def _connect(path: str) -> _Closing:
    return _Closing(path)


# -- helpers -------------------------------------------------------------------


def lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    """Return a lognormal duration in seconds, clipped to ``[low, high]``, rounded to 0.1 ms."""
    return round(min(high, max(low, rng.lognormvariate(math.log(median), sigma))), 4)


def _sleep_task(
    name: str, seconds: float, deps: tuple[str, ...] = (), criticality: str = "medium"
) -> PipelineTask:
    return PipelineTask(
        name,
        functools.partial(sleep_body, seconds),
        dependencies=deps,
        criticality=criticality,
        expected_duration=seconds,
    )


def _cpu_task(
    name: str,
    iterations: int,
    seed: int,
    *,
    deps: tuple[str, ...] = (),
    criticality: str = "medium",
    seconds_per_iteration: float = 70e-9,
) -> PipelineTask:
    return PipelineTask(
        name,
        functools.partial(cpu_body, iterations, seed),
        dependencies=deps,
        criticality=criticality,
        expected_duration=iterations * seconds_per_iteration,
    )


def _count(base: int, scale: float, minimum: int = 2) -> int:
    return max(minimum, round(base * scale))


# -- workloads -----------------------------------------------------------------


def io_workload(seed: int, scale: float, workdir: Path) -> Pipeline:
    """Return the I/O-bound ETL: fan-out/fan-in over 6 sources, chains, reports."""
    del workdir  # sleep bodies only
    rng = random.Random(f"io:{seed}")
    pipeline = Pipeline("bench-io", description="I/O-bound fan-out/fan-in ETL (sleep bodies)")
    partitions = _count(20, scale)
    source_levels = ("critical", "high", "medium", "medium", "low", "low")
    loads: list[str] = []
    for s, level in enumerate(source_levels):
        extract = f"extract_{s}"
        pipeline.add(_sleep_task(extract, lognormal(rng, 0.03, 0.5, 0.01, 0.06), (), level))
        parts = [f"transform_{s}_{p:02d}" for p in range(partitions)]
        for name in parts:
            duration = lognormal(rng, 0.012, 0.7, 0.001, 0.06)
            pipeline.add(_sleep_task(name, duration, (extract,), level))
        load = f"load_{s}"
        pipeline.add(
            _sleep_task(load, lognormal(rng, 0.015, 0.4, 0.005, 0.04), tuple(parts), level)
        )
        loads.append(load)
        for k in range(3):
            check = lognormal(rng, 0.006, 0.5, 0.002, 0.015)
            pipeline.add(_sleep_task(f"quality_{s}_{k}", check, (load,), "low"))
    chains: list[str] = []
    for c in range(2):
        previous: tuple[str, ...] = ()
        for k in range(_count(10, scale, 3)):
            name = f"refresh_dim_{c}_{k:02d}"
            pipeline.add(_sleep_task(name, lognormal(rng, 0.015, 0.4, 0.005, 0.03), previous))
            previous = (name,)
        chains.append(previous[0])
    reports = (
        ("report_revenue", "blocker", (loads[0], loads[1], chains[0])),
        ("report_operations", "high", (loads[2], loads[3], chains[1])),
        ("report_marketing", "low", (loads[4], loads[5])),
    )
    for name, level, deps in reports:
        pipeline.add(_sleep_task(name, lognormal(rng, 0.015, 0.3, 0.005, 0.03), deps, level))
    for k in range(_count(12, scale)):
        duration = lognormal(rng, 0.01, 0.4, 0.003, 0.02)
        pipeline.add(_sleep_task(f"archive_{k:02d}", duration, (), "deferred"))
    return pipeline


def cpu_workload(seed: int, scale: float, workdir: Path) -> Pipeline:
    """Return the CPU-bound workload: 4 parsers, 8 feature tasks each, aggregates, a model."""
    del workdir
    rng = random.Random(f"cpu:{seed}")
    pipeline = Pipeline("bench-cpu", description="CPU-bound pure Python, fan-out/fan-in")
    features = _count(8, scale)

    def iterations(median: int) -> int:
        return max(1000, int(median * scale * rng.uniform(0.6, 1.4)))

    aggregates: list[str] = []
    for s in range(4):
        parse = f"parse_{s}"
        pipeline.add(_cpu_task(parse, iterations(200_000), rng.randrange(1 << 30)))
        names = [f"features_{s}_{f}" for f in range(features)]
        for name in names:
            pipeline.add(
                _cpu_task(name, iterations(400_000), rng.randrange(1 << 30), deps=(parse,))
            )
        aggregate = f"aggregate_{s}"
        pipeline.add(
            _cpu_task(aggregate, iterations(150_000), rng.randrange(1 << 30), deps=tuple(names))
        )
        aggregates.append(aggregate)
    pipeline.add(
        _cpu_task(
            "model", iterations(200_000), seed, deps=tuple(aggregates), criticality="critical"
        )
    )
    return pipeline


def mixed_workload(seed: int, scale: float, workdir: Path) -> Pipeline:
    """Return the mixed workload: fetch (I/O), parse (CPU), load (I/O), one report."""
    del workdir
    rng = random.Random(f"mixed:{seed}")
    pipeline = Pipeline("bench-mixed", description="fetch (sleep) → parse (CPU) → load (sleep)")
    loads: list[str] = []
    for s in range(_count(8, scale)):
        fetch = f"fetch_{s}"
        pipeline.add(_sleep_task(fetch, lognormal(rng, 0.04, 0.5, 0.01, 0.1)))
        parses: list[str] = []
        for c in range(4):
            parse = f"parse_{s}_{c}"
            it = int(60_000 * rng.uniform(0.6, 1.4))
            pipeline.add(_cpu_task(parse, it, rng.randrange(1 << 30), deps=(fetch,)))
            parses.append(parse)
        load = f"load_{s}"
        pipeline.add(_sleep_task(load, lognormal(rng, 0.03, 0.5, 0.01, 0.08), tuple(parses)))
        loads.append(load)
    pipeline.add(_sleep_task("report", 0.02, tuple(loads), "critical"))
    return pipeline


def batching_workload(seed: int, scale: float, workdir: Path) -> Pipeline:
    """Return the batching workload: fetch row pages, write them to SQLite in batches, verify."""
    rng = random.Random(f"batching:{seed}")
    path = str(workdir / "bench_batching.sqlite")
    pipeline = Pipeline("bench-batching", description="rows into a SQLite file via plan_batch")
    pipeline.add(PipelineTask("prepare", functools.partial(prepare_table, path)))
    rows = _count(6_000, scale, 200)
    partitions = 12
    writes: list[str] = []
    for part in range(partitions):
        fetch = f"fetch_{part}"
        pages = tuple(lognormal(rng, 0.02, 0.5, 0.005, 0.08) for _ in range(4))
        fetch_body = functools.partial(fetch_rows, pages, rows, seed, part)
        cost = sum(pages) + rows * 1e-6
        pipeline.add(PipelineTask(fetch, fetch_body, expected_duration=cost))
        write = f"write_{part}"
        write_body = functools.partial(write_rows, path, fetch)
        pipeline.add(
            PipelineTask(
                write, write_body, dependencies=("prepare", fetch), expected_duration=rows * 3e-6
            )
        )
        writes.append(write)
    verify = functools.partial(verify_rows, path, rows * partitions)
    pipeline.add(PipelineTask("verify", verify, dependencies=tuple(writes), criticality="critical"))
    return pipeline


@dataclass(frozen=True, slots=True)
class BuiltinWorkload:
    """A built-in workload: its factory, executor preference and how to bound it.

    Attributes:
        cpu_bound: names of tasks whose bodies hold the GIL (pure Python).
        is_dag: whether ``max(critical path, work / workers)`` bounds the
            makespan; false when the tasks share a serial resource (a
            SQLite writer).
    """

    name: str
    description: str
    factory: WorkloadFactory
    wants_process: bool = False
    is_dag: bool = True
    cpu_prefixes: tuple[str, ...] = ()


BUILTIN_WORKLOADS: dict[str, BuiltinWorkload] = {
    w.name: w
    for w in (
        BuiltinWorkload("io", "I/O-bound fan-out/fan-in ETL", io_workload),
        BuiltinWorkload(
            "cpu",
            "CPU-bound pure Python",
            cpu_workload,
            wants_process=True,
            cpu_prefixes=("parse_", "features_", "aggregate_", "model"),
        ),
        BuiltinWorkload(
            "mixed", "I/O fetch, CPU parse, I/O load", mixed_workload, cpu_prefixes=("parse_",)
        ),
        BuiltinWorkload(
            "batching", "SQLite writes via plan_batch", batching_workload, is_dag=False
        ),
    )
}


def process_executor_available() -> bool:
    """Return whether a process executor can be created here."""
    try:
        from pipeopt.executors.registry import create_executor

        executor = create_executor("process")
    except Exception:  # any failure means: not usable here, fall back to threads
        return False
    executor.shutdown()
    return True


__all__ = [
    "BUILTIN_WORKLOADS",
    "BuiltinWorkload",
    "WorkloadFactory",
    "batching_workload",
    "cpu_workload",
    "io_workload",
    "mixed_workload",
    "process_executor_available",
]
