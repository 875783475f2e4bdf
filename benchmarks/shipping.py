"""What shipping task functions by value costs the process executor, per task.

Workers import a module-level function by name (by reference); closures,
lambdas and decorated functions travel by value (cloudpickle). Three runners
time the same ``--tasks`` no-op tasks through
``PipelineOptimizer(executor=ProcessExecutor(processes=W))``, side by side
in one process:

* ``by-reference``  - ``functools.partial(noop, k)`` of a module-level function;
* ``by-value``      - one closure per task, made in a loop (``def body(): return k``),
  the way users fan out;
* ``by-value-one``  - one lambda shared by every task (``functools.partial(f, k)``
  of a lambda).

Two tables. *Shipping path*: the CPU work shipping adds to each task, timed
alone and single-threaded (fastest of ``--repeat`` rounds, so a busy machine
inflates it least): planning the run (``Shipper.prepare``, once per run,
divided by the tasks), pickling each attempt's call in the driver and
unpickling it as a worker does (the by-value template is cached per worker,
as in a real worker). *Whole runs*: every timed run includes the pre-run
check and starting and stopping the worker processes, as a user's run does;
one untimed round first starts the fork server; repetitions rotate the
order of the runners; medians, and the cost per task over by-reference,
``(T - T_ref) / tasks``. On a busy machine the whole-run difference is
mostly noise; the shipping-path figure is the cost itself.

Usage::

    python benchmarks/shipping.py
    python benchmarks/shipping.py --tasks 2000 --repeat 5 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.executors import ProcessExecutor
from pipeopt.executors.base import TaskCall
from pipeopt.executors.shipping import Shipper

RUNNERS = ("by-reference", "by-value", "by-value-one")


def noop(k: int) -> int:
    """Return ``k``: the task does nothing, so shipping is all there is to time."""
    return k


def pipeline_of(name: str, tasks: int) -> Pipeline:
    """Return ``tasks`` independent no-op tasks written the ``name`` way."""
    pipeline = Pipeline(name)
    shared = lambda k: k  # noqa: E731 - a lambda is the point
    for k in range(tasks):
        body: Callable[[], Any]
        if name == "by-reference":
            body = functools.partial(noop, k)
        elif name == "by-value":

            def body(k: int = k) -> int:
                return k

        else:
            body = functools.partial(shared, k)
        pipeline.add(PipelineTask(f"t{k:05d}", body))
    return pipeline


def run_once(name: str, tasks: int, workers: int) -> float:
    """Time one run; return seconds."""
    pipeline = pipeline_of(name, tasks)
    optimizer = PipelineOptimizer(max_workers=workers, executor=ProcessExecutor(workers))
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    elapsed = time.perf_counter() - started
    if result.status.value != "succeeded":
        raise SystemExit(f"{name}: run {result.status.value}: {result.counts()}")
    return elapsed


def shipping_path(name: str, tasks: int, repeat: int) -> tuple[float, float, float]:
    """Return the fastest µs per task of planning, pickling and unpickling ``name``'s calls."""
    import pickle

    compiled = pipeline_of(name, tasks).compile()

    def fastest(work: Callable[[], object]) -> float:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - started)
        return best / tasks * 1e6

    shipper = Shipper(main_importable=True)
    plan = fastest(lambda: shipper.prepare(compiled))
    calls = [
        shipper.ship(TaskCall(t.name, t.func, {}, False, "function", 1, 3, None))
        for t in compiled.tasks
    ]
    dump = fastest(lambda: [pickle.dumps((call, None), 5) for call in calls])
    payloads = [pickle.dumps((call, None), 5) for call in calls]
    load = fastest(lambda: [pickle.loads(payload) for payload in payloads])
    return plan, dump, load


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.tasks} no-op tasks, {args.workers} worker processes, median of {args.repeat}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print("Shipping path, µs per task (fastest of the repetitions):")
    print()
    print("| runner | plan | pickle | unpickle | total | over by-reference |")
    print("|---|---|---|---|---|---|")
    paths = {name: shipping_path(name, args.tasks, max(args.repeat, 5)) for name in RUNNERS}
    ref_path = sum(paths["by-reference"])
    for name, (plan, dump, load) in paths.items():
        total = plan + dump + load
        print(
            f"| {name} | {plan:.1f} | {dump:.1f} | {load:.1f} | {total:.1f} "
            f"| {total - ref_path:+.1f} |"
        )
    for name in RUNNERS:  # warm-up: the fork server, imports, caches
        run_once(name, 50, args.workers)
    times: dict[str, list[float]] = {name: [] for name in RUNNERS}
    for rep in range(args.repeat):
        order = RUNNERS[rep % len(RUNNERS) :] + RUNNERS[: rep % len(RUNNERS)]
        for name in order:
            times[name].append(run_once(name, args.tasks, args.workers))
            print(f"rep {rep + 1} {name}: {times[name][-1]:.3f}s", file=sys.stderr)
    ref = statistics.median(times["by-reference"])
    print()
    print("Whole runs:")
    print()
    print("| runner | run (median) | µs per task | over by-reference, µs per task |")
    print("|---|---|---|---|")
    for name in RUNNERS:
        median = statistics.median(times[name])
        extra = (median - ref) / args.tasks * 1e6
        per_task = median / args.tasks * 1e6
        print(f"| {name} | {median:.3f} s | {per_task:.1f} | {extra:+.1f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
