"""Scheduling quality: makespan over its lower bound on random weighted DAGs, against peers.

Seeded random DAGs of ``time.sleep(d)`` tasks, ``d`` lognormal (median 4 ms,
sigma 0.6) clipped to 1-25 ms, each task on 1-3 tasks of the one or two
layers before it:

* ``wide``: 4 layers of 250 tasks (work / P bounds the makespan);
* ``deep``: 50 layers of 20 tasks (the critical path bounds it at 16 workers).

Runners, interleaved in one process (their order rotates each round):

* ``hints``: pipeopt with ``expected_duration=d`` on every task;
* ``no-hints``: pipeopt without hints, ranking by hop counts
  (``learn_durations=False``, so it does not update learned durations either);
* ``learned``: pipeopt without hints, ranked by the durations learned from a
  first run (untimed) of the same graph;
* ``hints-bare``: ``hints`` without a run store.
* ``threadpool``: a ``ThreadPoolExecutor`` fed in ``graphlib`` order;
* ``dask-threaded``: ``dask.threaded.get`` (its own static ordering).

The first three record to a temporary run store (``learned`` needs one),
so they differ only in how they rank (and ``hints`` and ``learned`` both
update the learned durations as they end); ``hints-bare`` shows what
recording costs.

Each cell is the median over seeds x repeats of ``makespan / max(critical
path, work / P)``, the bound taken from the nominal durations (so sleep
overshoot counts against every runner). ``sim`` columns simulate pipeopt's
policy with zero overhead, each task taking exactly its nominal duration,
ranked by the hints (``sim``), by the durations learned from the real runs
(``sim-learned``) or by hop counts (``sim-hops``): the gap between ``sim``
and ``hints`` is run-time overhead, the gap between ``sim`` and 1 is what the
policy leaves on that graph.

Usage::

    python benchmarks/scheduling_quality.py                     # 3 seeds, 1 repeat
    python benchmarks/scheduling_quality.py --seeds 5 --repeat 2 --workers 16
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.bench.schedule import lower_bound, simulate, time_run
from pipeopt.bench.suite import run_peer
from pipeopt.bench.workloads import lognormal, sleep_body
from pipeopt.estimates import plan
from pipeopt.store import RunStore

SHAPES = {"wide": (4, 250), "deep": (50, 20)}  # layers, tasks per layer
RUNNERS = ("hints", "no-hints", "learned", "threadpool", "dask-threaded", "hints-bare")


@dataclass(frozen=True)
class Graph:
    """A seeded random DAG: names, dependencies and nominal durations, in build order."""

    shape: str
    seed: int
    names: list[str]
    dependencies: list[tuple[str, ...]]
    seconds: list[float]


def make_graph(shape: str, seed: int) -> Graph:
    """Return the ``shape`` DAG of ``seed``, each task on 1-3 tasks of the two layers before."""
    layers, width = SHAPES[shape]
    rng = random.Random(f"{shape}-{seed}")
    names: list[str] = []
    deps: list[tuple[str, ...]] = []
    seconds: list[float] = []
    for layer in range(layers):
        before = names[max(0, (layer - 2) * width) : layer * width]
        for k in range(width):
            names.append(f"L{layer:02d}_{k:03d}")
            deps.append(tuple(rng.sample(before, rng.randint(1, 3))) if before else ())
            seconds.append(lognormal(rng, 0.004, 0.6, 0.001, 0.025))
    # Shuffle the build order (a topological one still), so FIFO has no hidden advantage.
    order = list(range(len(names)))
    rng.shuffle(order)
    order.sort(key=lambda i: names[i][:3])
    return Graph(
        shape,
        seed,
        [names[i] for i in order],
        [deps[i] for i in order],
        [seconds[i] for i in order],
    )


def build(graph: Graph, *, hints: bool) -> Pipeline:
    """Return the graph as a pipeline of sleeping tasks, with or without duration hints."""
    pipeline = Pipeline(f"quality-{graph.shape}-{graph.seed}")
    for name, deps, seconds in zip(graph.names, graph.dependencies, graph.seconds, strict=True):
        pipeline.add(
            PipelineTask(
                name,
                functools.partial(sleep_body, seconds),
                dependencies=deps,
                expected_duration=seconds if hints else None,
            )
        )
    return pipeline


def run_once(runner: str, graph: Graph, workers: int, state: Path) -> float:
    """Run ``graph`` once with ``runner`` on ``workers`` workers; return the makespan (s).

    ``learned`` learns in and records to ``state``; ``hints`` and
    ``no-hints`` record to a folder beside it.
    """
    pipeline = build(graph, hints=runner.startswith("hints"))
    if runner in ("hints", "no-hints", "learned", "hints-bare"):
        folder = None if runner == "hints-bare" else state
        if runner in ("hints", "no-hints"):
            folder = state.with_name(f"{state.name}-{runner}")
        learn = {"hints": None, "no-hints": False, "learned": True, "hints-bare": None}[runner]
        optimizer = PipelineOptimizer(max_workers=workers, state_dir=folder, learn_durations=learn)
        with optimizer:
            return time_run(optimizer, pipeline)
    return run_peer(runner, pipeline, workers)


def simulated(graph: Graph, workers: int, state: Path) -> dict[str, float]:
    """Return zero-overhead makespans over the bound, ranked by each source of estimates.

    ``sim``: the hints (exact durations); ``sim-learned``: what ``state``
    learned from real runs; ``sim-hops``: hop counts. Every task takes its
    nominal duration.
    """
    cost = graph.seconds  # build order is index order
    hinted = build(graph, hints=True).compile()
    unhinted = build(graph, hints=False).compile()
    with RunStore(state, read_only=True) as store:
        learned = store.learned_durations(unhinted.name)
    ranked = build(graph, hints=False).compile()
    ranked.reestimate(plan(ranked, learned).costs())
    bound = lower_bound(hinted, cost, workers).bound
    return {
        "sim": simulate(hinted, cost, workers) / bound,
        "sim-learned": simulate(ranked, cost, workers) / bound,
        "sim-hops": simulate(unhinted, cost, workers) / bound,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every runner on every shape, seed and worker count; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=3, help="random graphs per shape")
    parser.add_argument("--repeat", type=int, default=1, help="rounds per graph")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16], help="worker counts")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    ratios: dict[tuple[str, int, str], list[float]] = {}
    learned_vs_hints: dict[tuple[str, int], list[float]] = {}
    run_once("dask-threaded", make_graph("wide", 0), 4, Path())  # imports dask outside the timings
    round_number = 0
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            for seed in range(1, args.seeds + 1):
                graph = make_graph(shape, seed)
                state = Path(folder) / f"{shape}-{seed}"
                run_once("learned", graph, max(args.workers), state)  # the run it learns from
                for workers in args.workers:
                    compiled = build(graph, hints=True).compile()
                    bound = lower_bound(compiled, graph.seconds, workers).bound
                    for column, ratio in simulated(graph, workers, state).items():
                        ratios.setdefault((shape, workers, column), []).append(ratio)
                    for _ in range(args.repeat):
                        shift = round_number % len(RUNNERS)
                        round_number += 1
                        times = {}
                        for runner in RUNNERS[shift:] + RUNNERS[:shift]:
                            times[runner] = run_once(runner, graph, workers, state)
                            ratios.setdefault((shape, workers, runner), []).append(
                                times[runner] / bound
                            )
                        learned_vs_hints.setdefault((shape, workers), []).append(
                            times["learned"] / times["hints"]
                        )
                        print(
                            f"  {shape} seed {seed} P={workers}: "
                            + "  ".join(f"{r} {times[r] / bound:.3f}" for r in RUNNERS),
                            file=sys.stderr,
                            flush=True,
                        )
    columns = (*RUNNERS, "sim", "sim-learned", "sim-hops")
    samples = args.seeds * args.repeat
    print(
        f"makespan / max(critical path, work / P), median of {args.seeds} seeds x "
        f"{args.repeat} repeats ({samples} runs per cell)\n"
    )
    print("| shape | P | " + " | ".join(columns) + " | learned / hints |")
    print("|---|---|" + "---|" * len(columns) + "---|")
    for shape in args.shapes:
        for workers in args.workers:
            cells = [f"{statistics.median(ratios[(shape, workers, c)]):.3f}" for c in columns]
            paired = statistics.median(learned_vs_hints[(shape, workers)])
            print(f"| {shape} | {workers} | " + " | ".join(cells) + f" | {paired:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
