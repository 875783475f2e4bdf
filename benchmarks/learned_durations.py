"""Learned durations at scale: what loading, using and updating them costs per task.

A 100,000-task pipeline (no-op bodies, 20 layers, each task on 1-3 tasks of
the layer before) runs once into a temporary run store, so that every task
has a learned duration. Then, side by side in this process:

* ``load``: ``RunStore.learned_durations`` (one query of the pipeline's
  summary row) — the cost a run start pays (target: <= 1 µs per task);
* ``plan``: each task's estimate: its hint, else learned, else none;
* ``reestimate``: the critical path recomputed with those costs;
* ``compile``: ``Pipeline.compile()``, for scale;
* ``update``: folding one run's 100,000 attempts into the summary, which the
  end of each recorded run pays in the store's writer thread;
* ``run, learning`` against ``run, learn_durations=False``: whole recorded
  runs (``run()`` from call to return), alternating, which is what learning
  adds end to end (reading and using the durations, then updating them);
  and the same run with those learned durations written as hints, which
  tells the cost of ranking by distinct durations (hints pay it too) from
  the cost of the learning itself.

Each step shows its wall time and the process's CPU time (all threads),
which moves less when other programs compete for the cores.

Usage::

    python benchmarks/learned_durations.py                 # 100,000 tasks
    python benchmarks/learned_durations.py --tasks 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.estimates import event_samples, plan
from pipeopt.store import DB_NAME, RunStore
from pipeopt.store import estimates as stored

LAYERS = 20


def _noop(**_: object) -> None:
    return None


def layered(tasks: int, seed: int = 1) -> Pipeline:
    """Return ``tasks`` no-op tasks in ``LAYERS`` layers, each on 1-3 tasks of the layer before."""
    rng = random.Random(seed)
    pipeline = Pipeline("learned-scale")
    width = max(1, tasks // LAYERS)
    previous: list[str] = []
    for k in range(tasks):
        layer, slot = divmod(k, width)
        name = f"t{layer}_{slot}"
        deps = rng.sample(previous, min(len(previous), rng.randint(1, 3))) if layer else []
        pipeline.add(PipelineTask(name, _noop, dependencies=deps))
        if slot == width - 1:
            previous = [f"t{layer}_{s}" for s in range(width)]
    return pipeline


Figure = tuple[float, float]  # median wall seconds, median CPU seconds (all threads)


def timed(repeat: int, step: Callable[[], object]) -> Figure:
    """Return the median wall and CPU seconds of ``repeat`` calls of ``step``."""
    walls, cpus = [], []
    for _ in range(repeat):
        cpu, started = time.process_time(), time.perf_counter()
        step()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline once into a temporary store, then time each step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median is shown)")
    args = parser.parse_args(argv)
    pipeline = layered(args.tasks)
    with tempfile.TemporaryDirectory() as folder:
        with PipelineOptimizer(max_workers=8, state_dir=folder) as optimizer:
            result = optimizer.run(pipeline)
        result.raise_for_status()
        with RunStore(folder) as store:
            learned = store.learned_durations(pipeline.name)
            assert len(learned) == args.tasks, len(learned)
            compiled = pipeline.compile()
            estimates = plan(compiled, learned)
            figures = {
                "load": timed(args.repeat, lambda: store.learned_durations(pipeline.name)),
                "plan": timed(args.repeat, lambda: plan(compiled, learned)),
                "reestimate": timed(args.repeat, lambda: compiled.reestimate(estimates.costs())),
                "compile": timed(args.repeat, pipeline.compile),
            }
        conn = sqlite3.connect(Path(folder) / DB_NAME, isolation_level=None)
        try:
            # The run's events as the store's writer has them, in columns.
            outcomes = list(result.tasks.values())
            batch = (
                tuple(o.name for o in outcomes),
                tuple(o.attempt_history[-1].duration for o in outcomes),
                tuple(o.state.value for o in outcomes),
            )

            def update() -> None:
                conn.execute("BEGIN IMMEDIATE")
                stored.record(conn, pipeline.name, event_samples([batch], ()), result.tasks)
                conn.execute("ROLLBACK")

            figures["update"] = timed(args.repeat, update)
        finally:
            conn.close()
        # The same ranks as learning gives, from hints: what ranking by them costs.
        hinted = Pipeline(pipeline.name)
        for task, seconds in zip(compiled.tasks, estimates.costs(), strict=True):
            hinted.add(dataclasses.replace(task, expected_duration=seconds))
        variants = {
            "run, learning": (pipeline, True),
            "run, learn_durations=False": (pipeline, False),
            "run, those durations as hints, learn_durations=False": (hinted, False),
        }
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
        for k in range(args.repeat):
            for label in sorted(runs, reverse=k % 2 == 1):
                which, learn = variants[label]
                with PipelineOptimizer(
                    max_workers=8, state_dir=folder, learn_durations=learn
                ) as optimizer:
                    _ = optimizer.store  # opened before the clock starts
                    runs[label].append(
                        timed(1, lambda o=optimizer, w=which: o.run(w).raise_for_status())
                    )
        for label, pairs in runs.items():
            walls, cpus = zip(*pairs, strict=True)
            figures[label] = (statistics.median(walls), statistics.median(cpus))
    n = args.tasks
    print(f"| step ({n:,} tasks, median of {args.repeat}) | wall | per task | CPU per task |")
    print("|---|---|---|---|")
    for step, (wall, cpu) in figures.items():
        print(
            f"| {step} | {wall * 1e3:.1f} ms | {wall / n * 1e6:.2f} µs | {cpu / n * 1e6:.2f} µs |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
