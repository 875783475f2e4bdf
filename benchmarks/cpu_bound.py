"""CPU-bound tasks: pipeopt's process executor against threads and a plain process pool.

The workload is 200 independent tasks of about 5 ms of pure-Python
arithmetic each (calibrated at start-up on this machine). Four runners
execute it, side by side, in one process:

* ``sequential``  - ``PipelineOptimizer(max_workers=1, executor="thread")``,
  the baseline;
* ``threads``     - ``PipelineOptimizer(max_workers=W, executor="thread")``:
  the GIL lets one body run at a time, so no speed-up is expected;
* ``process``     - ``PipelineOptimizer(max_workers=W, executor=ProcessExecutor())``;
* ``plain-pool``  - ``concurrent.futures.ProcessPoolExecutor(W)`` (same
  ``forkserver`` start method) mapping the same function over the inputs:
  what the process executor costs over the bare standard library.

``W`` is the number of CPUs (``--workers`` to change it). Every timed run
includes starting and stopping its worker processes, as a user's run does;
one untimed round first starts the interpreter's fork server. Each
repetition runs the runners in a rotated order so that drift in the
machine's speed hits them alike; the table shows the median of the
repetitions (3 by default) and the ratios of those medians.

Usage::

    python benchmarks/cpu_bound.py
    python benchmarks/cpu_bound.py --tasks 200 --ms 5 --repeat 3 --workers 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.executors import ProcessExecutor

RUNNERS = ("sequential", "threads", "process", "plain-pool")


def burn(n: int) -> int:
    """Spend CPU time in pure Python (holds the GIL throughout)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def calibrate(ms: float) -> int:
    """Return the loop count that makes :func:`burn` take about ``ms`` milliseconds here.

    The fastest of several 50 ms samples counts: on a busy machine the
    slower ones measure the neighbours, not the loop.
    """
    n = 100_000
    fastest = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        burn(n)
        fastest = min(fastest, time.perf_counter() - started)
    return max(1, int(n * (ms / 1000) / fastest))


def pipeline_of(tasks: int, n: int) -> Pipeline:
    """Return ``tasks`` independent tasks, each running ``burn(n)``."""
    pipeline = Pipeline("cpu-bound")
    body = functools.partial(burn, n)
    for k in range(tasks):
        pipeline.add(PipelineTask(f"burn{k:03d}", body))
    return pipeline


def run_pipeopt(tasks: int, n: int, workers: int, executor: str) -> float:
    """Time one pipeopt run; return seconds."""
    pipeline = pipeline_of(tasks, n)
    chosen = ProcessExecutor() if executor == "process" else "thread"
    optimizer = PipelineOptimizer(max_workers=workers, executor=chosen)
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    elapsed = time.perf_counter() - started
    if result.status.value != "succeeded":
        raise SystemExit(f"pipeopt run {result.status.value}: {result.counts()}")
    return elapsed


def run_plain_pool(tasks: int, n: int, workers: int) -> float:
    """Time the same work through a bare ``ProcessPoolExecutor``; return seconds."""
    context = multiprocessing.get_context("forkserver")
    started = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
        results = list(pool.map(burn, [n] * tasks))
    elapsed = time.perf_counter() - started
    assert len(results) == tasks
    return elapsed


def runner(name: str, tasks: int, n: int, workers: int) -> Callable[[], float]:
    """Return a zero-argument function that performs one timed run of ``name``."""
    if name == "sequential":
        return lambda: run_pipeopt(tasks, n, 1, "thread")
    if name == "threads":
        return lambda: run_pipeopt(tasks, n, workers, "thread")
    if name == "process":
        return lambda: run_pipeopt(tasks, n, workers, "process")
    return lambda: run_plain_pool(tasks, n, workers)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--ms", type=float, default=5.0, help="CPU milliseconds per task")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)

    n = calibrate(args.ms)
    one = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        burn(n)
        one = min(one, (time.perf_counter() - started) * 1000)
    print(
        f"python {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.tasks} tasks x burn({n}) ~ {one:.1f} ms; "
        f"workers={args.workers}; median of {args.repeat}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for name in RUNNERS:  # warm-up: start the fork server, fill caches
        runner(name, min(args.tasks, 20), n, args.workers)()

    times: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for rep in range(args.repeat):
        order = RUNNERS[rep % len(RUNNERS) :] + RUNNERS[: rep % len(RUNNERS)]
        for name in order:
            times[name].append(runner(name, args.tasks, n, args.workers)())

    median = {name: statistics.median(values) for name, values in times.items()}
    base = median["sequential"]
    pool = median["plain-pool"]
    print()
    print(f"{'runner':<12} {'median s':>9} {'min s':>8} {'speed-up':>9} {'vs plain pool':>14}")
    for name in RUNNERS:
        print(
            f"{name:<12} {median[name]:>9.3f} {min(times[name]):>8.3f} "
            f"{base / median[name]:>8.2f}x {median[name] / pool:>13.2f}x"
        )
    speedup = base / median["process"]
    print()
    print(
        f"process executor speed-up over sequential: {speedup:.2f}x (target >= 1.8x); "
        f"time relative to a plain ProcessPoolExecutor: {median['process'] / pool:.2f}x; "
        f"load average now {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
