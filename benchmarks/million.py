"""A million tasks: build, compile and run a layered DAG end to end, with peak memory.

The graph is the ``layered`` shape of ``overhead.py``: 20 layers, each task on
1-3 random tasks (seeded) of the layer before, no-op bodies, 8 worker
threads. Each size runs in a child process of its own, so its peak RSS
(``ru_maxrss``) is its own and not a leftover of a bigger size.

For each size the child

1. makes the graph as two flat integer arrays (CSR: offsets, dependencies)
   and notes the RSS it starts from ("base");
2. **build**: turns it into a ``Pipeline`` (``--build add``: one
   ``Pipeline.add(PipelineTask(...))`` per task; ``--build many``, the
   default: one ``Pipeline.add_many(...)`` call);
3. **compile**: ``pipeline.compile()`` alone (validation, topological
   order, inherited criticality, critical path, injection analysis), timed
   for information and then dropped;
4. **run**: ``PipelineOptimizer(max_workers=8).run(pipeline)`` until every
   result is in; it compiles the pipeline again, so its time includes
   the compile time.

"total" is build + run: everything from the graph's arrays to the
``RunResult``; "total CPU" is the process's CPU seconds over the same span
(all threads), steadier than wall time on a shared machine. The naive peer
(``graphlib.TopologicalSorter`` feeding a ``ThreadPoolExecutor(8)``, as in
``overhead.py``) runs the same graph in its own child, for the sizes up to
``--naive-max``; its "build" is the dependency dict graphlib takes.

Usage::

    python benchmarks/million.py                        # 10k, 100k, 1M
    python benchmarks/million.py --sizes 10000,100000   # quicker
    python benchmarks/million.py --build add            # per-task Pipeline.add
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import time
from array import array
from typing import Any

WORKERS = 8
LAYERS = 20
SEED = 20240601


def noop(*_args: Any) -> None:
    """Do nothing."""


def layered(n: int, seed: int = SEED) -> tuple[array[int], array[int]]:
    """Return the layered graph of ``n`` tasks as CSR arrays ``(offsets, dependencies)``.

    Task ``i``'s dependencies are ``dependencies[offsets[i]:offsets[i + 1]]``.
    """
    rng = random.Random(seed)
    width = n // LAYERS
    offsets = array("q", [0])
    flat = array("q")
    start = 0
    previous = range(0)
    for layer in range(LAYERS):
        count = width if layer < LAYERS - 1 else n - width * (LAYERS - 1)
        for _ in range(count):
            if previous:
                k = rng.randint(1, min(3, len(previous)))
                flat.extend(sorted(rng.sample(previous, k)))
            offsets.append(len(flat))
        previous = range(start, start + count)
        start += count
    return offsets, flat


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_pipeopt(n: int, build: str) -> dict[str, float]:
    """Build, compile and run the graph of ``n`` tasks with pipeopt; return the figures."""
    from pipeopt import Pipeline, PipelineOptimizer, PipelineTask

    offsets, flat = layered(n)
    gc.collect()
    base = _rss_mib()
    c0, t0 = time.process_time(), time.perf_counter()
    pipeline = Pipeline("million")
    names = [f"t{i}" for i in range(n)]
    if build == "many":
        pipeline.add_many(
            names,
            noop,
            # A generator: add_many makes the rows while the collector is held off.
            dependencies=([names[d] for d in flat[offsets[i] : offsets[i + 1]]] for i in range(n)),
        )
    else:
        for i in range(n):
            deps = tuple([names[d] for d in flat[offsets[i] : offsets[i + 1]]])
            pipeline.add(PipelineTask(names[i], noop, deps))
    del names
    c1, t1 = time.process_time(), time.perf_counter()
    pipeline.compile()
    compile_seconds = time.perf_counter() - t1
    gc.collect()
    c2, t2 = time.process_time(), time.perf_counter()
    result = PipelineOptimizer(max_workers=WORKERS).run(pipeline)
    c3, t3 = time.process_time(), time.perf_counter()
    if not result.ok or len(result.results) != n:
        raise RuntimeError(f"pipeopt run did not succeed: {result.counts()}")
    return {
        "build": t1 - t0,
        "compile": compile_seconds,
        "run": t3 - t2,
        "total": (t1 - t0) + (t3 - t2),
        "cpu": (c1 - c0) + (c3 - c2),
        "base_mib": base,
        "peak_mib": _peak_mib(),
    }


def child_naive(n: int) -> dict[str, float]:
    """Run the graph of ``n`` tasks as ``overhead.py``'s naive peer does; return the figures."""
    from overhead import run_naive

    offsets, flat = layered(n)
    graph = [tuple(flat[offsets[i] : offsets[i + 1]]) for i in range(n)]
    del offsets, flat
    gc.collect()
    base = _rss_mib()
    c0 = time.process_time()
    build, run, _ = run_naive(graph)  # its own CPU figure covers the run only
    cpu = time.process_time() - c0
    return {
        "build": build,
        "compile": 0.0,
        "run": run,
        "total": build + run,
        "cpu": cpu,
        "base_mib": base,
        "peak_mib": _peak_mib(),
    }


def measure(runner: str, n: int, build: str) -> dict[str, float]:
    """Run one runner on one size in a fresh child process and return its figures."""
    command = [sys.executable, __file__, "--child", runner, "--sizes", str(n), "--build", build]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{runner} at {n} tasks failed:\n{done.stderr}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str] | None = None) -> None:
    """Measure every size and runner; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--naive-max", type=int, default=1_000_000)
    parser.add_argument("--build", choices=("many", "add"), default="many")
    parser.add_argument("--runners", default="pipeopt,naive")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",")]
    if args.child:
        n = sizes[0]
        figures = child_pipeopt(n, args.build) if args.child == "pipeopt" else child_naive(n)
        print(json.dumps(figures))
        return
    runners = args.runners.split(",")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, build={args.build}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(
        "| tasks | runner | build s | compile s | run s | total s | total CPU s "
        "| µs/task (total) | peak RSS MiB | over base MiB | total / naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        rows: dict[str, dict[str, float]] = {}
        for runner in runners:
            if runner == "naive" and n > args.naive_max:
                continue
            print(f"{runner} {n:,}...", file=sys.stderr, flush=True)
            rows[runner] = measure(runner, n, args.build)
        naive = rows.get("naive")
        for runner, f in rows.items():
            ratio = f"{f['total'] / naive['total']:.2f}" if naive else "-"
            print(
                f"| {n:,} | {runner} | {f['build']:.2f} | {f['compile']:.2f} | {f['run']:.2f} "
                f"| {f['total']:.2f} | {f['cpu']:.2f} | {f['total'] / n * 1e6:.1f} "
                f"| {f['peak_mib']:.0f} "
                f"| {f['peak_mib'] - f['base_mib']:.0f} | {ratio} |",
                flush=True,
            )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
