"""Run store overhead: microseconds per no-op task with the store on and off.

The same ``Pipeline`` of no-op tasks runs with ``PipelineOptimizer(max_workers=8)``
twice per repetition in one process, once without a store and once with
``state_dir=`` (a fresh folder in a temporary directory), alternating which
goes first so that drift in the machine's speed hits both alike. The table
shows medians over the repetitions: wall time per task, the time the store
adds (the budget is 2 µs per task) and the ratio on/off, and the process's
CPU time per task (all threads), which moves less when other programs
compete for the cores.

A run's time is ``optimizer.run(pipeline)`` from call to return: with the
store it includes recording the run's start (its structure and
fingerprint), every attempt and result, and ``end_run`` waiting until the
last batch is committed. Opening the store (``PRAGMA quick_check``, the
schema) happens before the clock starts, once per optimizer. Shapes, as in
``overhead.py``: ``independent`` (no edges) and ``layered`` (20 layers, each
task on 1-3 random tasks of the layer before; seeded).

Usage::

    python benchmarks/store_overhead.py              # 10k and 100k tasks, median of 3
    python benchmarks/store_overhead.py --quick      # 10k tasks, one repetition
    python benchmarks/store_overhead.py --sizes 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHAPES = ("independent", "layered")
MODES = ("off", "on")
WORKERS = 8
LAYERS = 20
SEED = 20240601
BUDGET_US = 2.0


def noop(**_upstream: Any) -> None:
    """Do nothing."""


def build_pipeline(shape: str, n: int) -> Any:
    """Return a pipeline of ``n`` no-op tasks: no edges, or 20 layers of 1-3 random edges."""
    from pipeopt import Pipeline, PipelineTask

    rng = random.Random(SEED)
    pipeline = Pipeline(f"store-overhead-{shape}")
    names = [f"t{i}" for i in range(n)]
    layers = LAYERS if shape == "layered" else 1
    width = n // layers
    previous: list[str] = []
    for layer in range(layers):
        start = layer * width
        current = names[start : n if layer == layers - 1 else start + width]
        for name in current:
            deps = rng.sample(previous, rng.randint(1, min(3, len(previous)))) if previous else []
            pipeline.add(PipelineTask(name, noop, sorted(deps)))
        previous = current
    return pipeline


def timed_run(optimizer: Any, pipeline: Any, n: int) -> tuple[float, float]:
    """Return the wall and CPU seconds of ``optimizer.run(pipeline)``; check it succeeded."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    result = optimizer.run(pipeline)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not result.ok or len(result.results) != n:
        raise RuntimeError(f"run did not succeed: {result.counts()}")
    return wall, cpu


def measure(sizes: Sequence[int], repeat: int, folder: Path) -> list[dict[str, Any]]:
    """Return one row per (size, shape) with the raw seconds of both modes."""
    from pipeopt import PipelineOptimizer

    rows: list[dict[str, Any]] = []
    for n in sizes:
        for shape in SHAPES:
            pipeline = build_pipeline(shape, n)
            optimizers = {
                "off": PipelineOptimizer(max_workers=WORKERS),
                "on": PipelineOptimizer(max_workers=WORKERS, state_dir=folder / f"{shape}-{n}"),
            }
            store = optimizers["on"].store  # opened here, outside the timed runs
            assert store is not None
            wall: dict[str, list[float]] = {mode: [] for mode in MODES}
            cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
            for rep in range(repeat):
                for mode in MODES if rep % 2 == 0 else reversed(MODES):
                    w, c = timed_run(optimizers[mode], pipeline, n)
                    wall[mode].append(w)
                    cpu[mode].append(c)
                off, on = (wall[mode][-1] / n * 1e6 for mode in MODES)
                print(
                    f"  n={n:>7} {shape:<11} rep {rep + 1}/{repeat}: "
                    f"off {off:6.2f} µs  on {on:6.2f} µs",
                    file=sys.stderr,
                    flush=True,
                )
            size = sum(p.stat().st_size for p in store.state_dir.iterdir() if p.is_file())
            store.close()
            rows.append({"n": n, "shape": shape, "wall": wall, "cpu": cpu, "bytes": size})
    return rows


def render(rows: list[dict[str, Any]], repeat: int) -> str:
    """Return the results as a Markdown table."""
    lines = [
        f"µs per no-op task, median of {repeat}, {WORKERS} workers; "
        f"the store may add {BUDGET_US:g} µs",
        "",
        "| tasks | shape | off | on | added | on/off | CPU off | CPU on | CPU added "
        "| store bytes/task |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        n = row["n"]
        off, on = (statistics.median(row["wall"][mode]) / n * 1e6 for mode in MODES)
        cpu_off, cpu_on = (statistics.median(row["cpu"][mode]) / n * 1e6 for mode in MODES)
        verdict = "" if on - off <= BUDGET_US else " (over)"
        lines.append(
            f"| {n:,} | {row['shape']} | {off:.2f} | {on:.2f} | {on - off:+.2f}{verdict} "
            f"| {on / off:.2f} | {cpu_off:.2f} | {cpu_on:.2f} | {cpu_on - cpu_off:+.2f} "
            f"| {row['bytes'] / (n * repeat):.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10k tasks, one repetition")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated task counts")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median is shown)")
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeat = 1 if args.quick else args.repeat
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    print(
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, {WORKERS} workers, "
        f"{repeat} repetition(s)",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="pipeopt-store-bench-") as folder:
        rows = measure(sizes, repeat, Path(folder))
    print(render(rows, repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
