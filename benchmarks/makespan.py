"""Makespan: how close pipeopt's schedule comes to the lower bound, against peers.

One seeded graph of 300 ``time.sleep(d)`` tasks, ``d`` lognormal (median
8 ms, sigma 0.8) clipped to 1-40 ms:

* three long chains of 25 tasks (the critical path: 60-90% of work / 8);
* nine independent fan-out/fan-in blocks: a source, 23 parallel tasks, a sink.

Runners, 8 workers each, alternating within each repetition:
``pipeopt`` with ``expected_duration=d`` hints, ``pipeopt`` without hints
(every task costs 1, so the critical path counts tasks), ``dask.threaded.get``
and a ``ThreadPoolExecutor`` loop over a ``graphlib`` order (both running the
same bodies through :mod:`pipeopt.bench.suite`). The table shows the median
makespan over the repetitions and ``makespan / max(critical path, total
work / 8)`` computed from the nominal durations, so sleep overshoot counts
against every runner. The last line simulates pipeopt's ordering with zero
overhead and exact durations: what any list scheduler with that priority
reaches on this graph, which tells graph-inherent slack from run-time cost.

Usage::

    python benchmarks/makespan.py             # median of 5
    python benchmarks/makespan.py --repeat 9 --seed 7
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import statistics
import sys
from collections.abc import Sequence

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.bench import schedule
from pipeopt.bench.schedule import Bound
from pipeopt.bench.suite import run_peer
from pipeopt.bench.workloads import sleep_body

WORKERS = 8
CHAINS, CHAIN_LENGTH = 3, 25
BLOCKS, FAN_OUT = 9, 23
RUNNERS = ("pipeopt-hints", "pipeopt-no-hints", "dask-threaded", "threadpool")


def durations(seed: int) -> dict[str, float]:
    """Return the task names and nominal durations (seconds) of the graph, in build order."""
    rng = random.Random(seed)

    def draw() -> float:
        return round(min(0.040, max(0.001, rng.lognormvariate(math.log(0.008), 0.8))), 4)

    names: list[str] = []
    for c in range(CHAINS):
        names += [f"chain{c}_{k:02d}" for k in range(CHAIN_LENGTH)]
    for b in range(BLOCKS):
        names += [
            f"block{b}_source",
            *(f"block{b}_{k:03d}" for k in range(FAN_OUT)),
            f"block{b}_sink",
        ]
    return {name: draw() for name in names}


def dependencies(name: str) -> tuple[str, ...]:
    """Return the dependencies of task ``name``."""
    if name.startswith("chain"):
        c, k = name[5:].split("_")
        return (f"chain{c}_{int(k) - 1:02d}",) if int(k) else ()
    block, part = name.split("_")
    if part == "source":
        return ()
    if part == "sink":
        return tuple(f"{block}_{k:03d}" for k in range(FAN_OUT))
    return (f"{block}_source",)


def build(costs: dict[str, float], *, hints: bool) -> Pipeline:
    """Return the pipeline, with or without ``expected_duration`` hints."""
    pipeline = Pipeline("makespan")
    # Insert the fan-out blocks first: a FIFO scheduler then starts the chains late.
    for name in sorted(costs, key=lambda n: not n.startswith("block")):
        pipeline.add(
            PipelineTask(
                name,
                functools.partial(sleep_body, costs[name]),
                dependencies=dependencies(name),
                expected_duration=costs[name] if hints else None,
            )
        )
    return pipeline


def lower_bound(costs: dict[str, float]) -> Bound:
    """Return ``(bound, critical path, total work)`` from the nominal durations."""
    compiled = build(costs, hints=True).compile()
    return schedule.lower_bound(compiled, [costs[n] for n in compiled.names], WORKERS)


def simulate(costs: dict[str, float], *, hints: bool) -> float:
    """Return the makespan of pipeopt's order with zero overhead and exact costs.

    Ranked by the hints, or without them by counting tasks (see
    :func:`pipeopt.bench.schedule.simulate`).
    """
    compiled = build(costs, hints=hints).compile()
    return schedule.simulate(compiled, [costs[n] for n in compiled.names], WORKERS)


def run_once(runner: str, costs: dict[str, float]) -> float:
    """Run the graph once with ``runner`` and return its makespan in seconds."""
    pipeline = build(costs, hints=runner != "pipeopt-no-hints")
    if runner.startswith("pipeopt"):
        return schedule.time_run(PipelineOptimizer(max_workers=WORKERS), pipeline)
    return run_peer(runner, pipeline, WORKERS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every runner ``--repeat`` times and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median is shown)")
    parser.add_argument("--seed", type=int, default=2024, help="seeds the durations")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    costs = durations(args.seed)
    bound, path, work = lower_bound(costs)
    print(
        f"{len(costs)} tasks, total work {work:.3f} s, critical path {path:.3f} s, "
        f"work/{WORKERS} {work / WORKERS:.3f} s, bound {bound:.3f} s",
        file=sys.stderr,
    )
    times: dict[str, list[float]] = {r: [] for r in RUNNERS}
    run_once("dask-threaded", costs)  # warm-up: imports dask outside the timed runs
    for rep in range(args.repeat):
        order = RUNNERS[rep % len(RUNNERS) :] + RUNNERS[: rep % len(RUNNERS)]
        for runner in order:
            times[runner].append(run_once(runner, costs))
        print(
            f"  rep {rep + 1}/{args.repeat}: "
            + "  ".join(f"{r} {times[r][-1] / bound:.3f}" for r in RUNNERS),
            file=sys.stderr,
            flush=True,
        )
    print(f"| runner | makespan (median of {args.repeat}) | makespan / bound | vs dask-threaded |")
    print("|---|---|---|---|")
    dask_median = statistics.median(times["dask-threaded"])
    for runner in RUNNERS:
        median = statistics.median(times[runner])
        print(f"| {runner} | {median:.3f} s | {median / bound:.3f} | {median / dask_median:.3f} |")
    print(f"\nbound = max(critical path {path:.3f} s, work / {WORKERS} = {work / WORKERS:.3f} s)")
    ideal = {hints: simulate(costs, hints=hints) / bound for hints in (True, False)}
    print(
        f"ideal pipeopt order (zero-overhead simulation): {ideal[True]:.3f} with hints, "
        f"{ideal[False]:.3f} without"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
