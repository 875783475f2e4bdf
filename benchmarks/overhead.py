"""Scheduler overhead: microseconds per no-op task, pipeopt against two peers.

Three runners execute the same graph of no-op tasks in one process, side by
side, with 8 worker threads each:

* ``pipeopt``  - ``PipelineOptimizer(max_workers=8).run(pipeline)`` (metrics
  are always on);
* ``naive``    - ``graphlib.TopologicalSorter`` driving a
  ``ThreadPoolExecutor(8)``: submit every ready node, ``wait(FIRST_COMPLETED)``,
  ``done()`` the finished ones;
* ``dask``     - ``dask.threaded.get`` on a dask graph dict, ``num_workers=8``.

Shapes: ``independent`` (no edges), ``chain`` (each task on the previous one),
``layered`` (20 layers; each node depends on 1-3 random nodes of the layer
before; seeded) and ``mapped`` (one source task and ``n - 1`` tasks that each
depend on it). On the ``mapped`` shape a fourth runner takes part:

* ``pipeopt_map`` - the same work as one task mapped over the source's
  ``n - 1`` items (``@pipeline.task(map_over=source)``), so its figure is
  the cost per mapped item next to pipeopt's cost per static task.

Each repetition runs the runners one after the other in a rotated order, so
drift in the machine's speed hits them all alike; the table shows the median
over the repetitions.

Run time starts from a graph the runner accepts (a ``Pipeline``, a
dependency dict, a dask dict) and ends when every task is done; for pipeopt it
therefore includes the validation ``run()`` performs. Building that graph is
timed separately ("build"), and so is ``Pipeline.compile()`` on its own
("compile", already contained in pipeopt's run time).

Usage::

    python benchmarks/overhead.py            # 10k and 100k tasks, 3 repetitions
    python benchmarks/overhead.py --quick    # 10k tasks, 1 repetition
    python benchmarks/overhead.py --sizes 10000 --repeat 5 --runners pipeopt,naive
    python benchmarks/overhead.py --shapes mapped --runners pipeopt,pipeopt_map,naive
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import graphlib
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

Graph = list[tuple[int, ...]]  # per task, the indices of its dependencies
SHAPES = ("independent", "chain", "layered", "mapped")
RUNNERS = ("pipeopt", "pipeopt_map", "naive", "dask")
WORKERS = 8
LAYERS = 20
SEED = 20240601


def noop(*_args: Any) -> None:
    """Do nothing (dask passes dependency results positionally)."""


# -- graphs ------------------------------------------------------------------


def make_graph(shape: str, n: int, seed: int = SEED) -> Graph:
    """Return the dependency lists of a graph of ``n`` tasks of the given shape."""
    if shape == "independent":
        return [() for _ in range(n)]
    if shape == "chain":
        return [()] + [(i - 1,) for i in range(1, n)]
    if shape == "layered":
        rng = random.Random(seed)
        width = n // LAYERS
        graph: Graph = []
        previous: list[int] = []
        for layer in range(LAYERS):
            count = width if layer < LAYERS - 1 else n - width * (LAYERS - 1)
            current = list(range(len(graph), len(graph) + count))
            for _ in current:
                if previous:
                    k = rng.randint(1, min(3, len(previous)))
                    graph.append(tuple(sorted(rng.sample(previous, k))))
                else:
                    graph.append(())
            previous = current
        return graph
    if shape == "mapped":
        return [()] + [(0,)] * (n - 1)
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")


# -- runners: each returns (build seconds, run seconds, run CPU seconds) ------


def build_pipeline(graph: Graph) -> Any:
    """Return a ``Pipeline`` of no-op tasks shaped like ``graph``."""
    from pipeopt import Pipeline, PipelineTask

    pipeline = Pipeline("overhead")
    names = [f"t{i}" for i in range(len(graph))]
    for i, deps in enumerate(graph):
        pipeline.add(PipelineTask(names[i], noop, tuple(names[d] for d in deps)))
    return pipeline


def run_pipeopt(graph: Graph) -> tuple[float, float, float]:
    """Build a pipeline and run it with ``PipelineOptimizer(max_workers=8)``."""
    from pipeopt import PipelineOptimizer

    t0 = time.perf_counter()
    pipeline = build_pipeline(graph)
    t1, c1 = time.perf_counter(), time.process_time()
    result = PipelineOptimizer(max_workers=WORKERS).run(pipeline)
    t2, c2 = time.perf_counter(), time.process_time()
    if not result.ok or len(result.results) != len(graph):
        raise RuntimeError(f"pipeopt run did not succeed: {result.counts()}")
    return t1 - t0, t2 - t1, c2 - c1


def items(count: int) -> list[int]:
    """Return the list a mapped task runs over."""
    return list(range(count))


def each(source: int) -> None:
    """Do nothing with one mapped item."""


def run_pipeopt_map(graph: Graph) -> tuple[float, float, float]:
    """Run the ``mapped`` shape as one task mapped over ``n - 1`` items."""
    from functools import partial

    from pipeopt import Pipeline, PipelineOptimizer, PipelineTask

    t0 = time.perf_counter()
    pipeline = Pipeline("overhead-mapped")
    pipeline.add(PipelineTask("source", partial(items, len(graph) - 1)))
    pipeline.add(PipelineTask("each", each, map_over="source"))
    t1, c1 = time.perf_counter(), time.process_time()
    result = PipelineOptimizer(max_workers=WORKERS).run(pipeline)
    t2, c2 = time.perf_counter(), time.process_time()
    if not result.ok or len(result.results["each"]) != len(graph) - 1:
        raise RuntimeError(f"pipeopt mapped run did not succeed: {result.counts()}")
    return t1 - t0, t2 - t1, c2 - c1


def time_compile(graph: Graph) -> float:
    """Return the seconds ``Pipeline.compile()`` takes on ``graph``."""
    pipeline = build_pipeline(graph)
    t0 = time.perf_counter()
    pipeline.compile()
    return time.perf_counter() - t0


def run_naive(graph: Graph) -> tuple[float, float, float]:
    """Run ``graph`` with a TopologicalSorter feeding a ThreadPoolExecutor."""
    t0 = time.perf_counter()
    deps = dict(enumerate(graph))
    t1, c1 = time.perf_counter(), time.process_time()
    done_count = 0
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        sorter = graphlib.TopologicalSorter(deps)
        sorter.prepare()
        pending: dict[cf.Future[None], int] = {}
        while sorter.is_active():
            for node in sorter.get_ready():
                pending[pool.submit(noop)] = node
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                future.result()
                sorter.done(pending.pop(future))
                done_count += 1
    t2, c2 = time.perf_counter(), time.process_time()
    if done_count != len(graph):
        raise RuntimeError(f"naive run finished {done_count} of {len(graph)} tasks")
    return t1 - t0, t2 - t1, c2 - c1


def run_dask(graph: Graph) -> tuple[float, float, float]:
    """Run ``graph`` with ``dask.threaded.get(num_workers=8)``."""
    import dask.threaded

    t0 = time.perf_counter()
    dsk: dict[str, Any] = {
        f"t{i}": (noop, *(f"t{d}" for d in deps)) for i, deps in enumerate(graph)
    }
    keys = list(dsk)
    t1, c1 = time.perf_counter(), time.process_time()
    dask.threaded.get(dsk, keys, num_workers=WORKERS)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c1


RUNNER_FUNCS: dict[str, Callable[[Graph], tuple[float, float, float]]] = {
    "pipeopt": run_pipeopt,
    "pipeopt_map": run_pipeopt_map,
    "naive": run_naive,
    "dask": run_dask,
}


# -- driver ------------------------------------------------------------------


def measure(
    sizes: Sequence[int],
    repeat: int,
    runners: Sequence[str],
    shapes: Sequence[str] = SHAPES,
) -> dict[tuple[int, str], dict[str, Any]]:
    """Return, per (size, shape), the raw build/run seconds of each runner."""
    table: dict[tuple[int, str], dict[str, Any]] = {}
    for n in sizes:
        for shape in shapes:
            graph = make_graph(shape, n)
            raw: dict[str, dict[str, list[float]]] = {
                r: {"build": [], "run": [], "cpu": []} for r in runners
            }
            compile_times: list[float] = []
            for rep in range(repeat):
                order = list(runners[rep % len(runners) :]) + list(runners[: rep % len(runners)])
                for name in order:
                    if name == "pipeopt_map" and shape != "mapped":
                        continue
                    gc.collect()
                    build, run, cpu = RUNNER_FUNCS[name](graph)
                    raw[name]["build"].append(build)
                    raw[name]["run"].append(run)
                    raw[name]["cpu"].append(cpu)
                if "pipeopt" in runners:
                    gc.collect()
                    compile_times.append(time_compile(graph))
                print(
                    f"  n={n:>7} {shape:<11} rep {rep + 1}/{repeat}: "
                    + "  ".join(
                        f"{r} {raw[r]['run'][-1] / n * 1e6:7.1f} µs"
                        for r in runners
                        if raw[r]["run"]
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            table[(n, shape)] = {"raw": raw, "compile": compile_times}
    return table


def per_task(seconds: list[float], n: int) -> float:
    """Return the median of ``seconds`` in microseconds per task (NaN if not measured)."""
    return statistics.median(seconds) / n * 1e6 if seconds else float("nan")


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Return the median of ``times[i] / baseline[i]`` (runs of the same repetition)."""
    if not times:
        return float("nan")
    return statistics.median(a / b for a, b in zip(times, baseline, strict=True))


def _per_task_table(
    title: str, table: dict[tuple[int, str], dict[str, Any]], columns: dict[str, tuple[str, str]]
) -> list[str]:
    """Return a Markdown table of medians per task.

    ``columns`` maps each heading to ``(runner, measure)``; runner ``""``
    reads a measure of the whole entry (``compile``).
    """
    lines = [
        "",
        title,
        "",
        "| tasks | shape | " + " | ".join(columns) + " |",
        "|" + "---|" * (2 + len(columns)),
    ]
    for (n, shape), entry in table.items():
        cells = []
        for runner, measure in columns.values():
            seconds = entry["raw"][runner][measure] if runner else entry[measure]
            cells.append(f"{per_task(seconds, n):.1f}" if seconds else "-")
        lines.append(f"| {n:,} | {shape} | " + " | ".join(cells) + " |")
    return lines


def render(table: dict[tuple[int, str], dict[str, Any]], runners: Sequence[str]) -> str:
    """Return the results as Markdown tables (run time, then build/compile)."""
    lines = [
        "Run time, µs per task (median); ratio = median over repetitions of runner / naive"
        " in the same repetition",
        "",
        "| tasks | shape | "
        + " | ".join(runners)
        + " | "
        + " | ".join(f"{r}/naive" for r in runners if r != "naive")
        + " |",
        "|" + "---|" * (2 + len(runners) + len([r for r in runners if r != "naive"])),
    ]
    for (n, shape), entry in table.items():
        runs = {r: per_task(entry["raw"][r]["run"], n) for r in runners}
        cells = [f"{runs[r]:.1f}" for r in runners]
        if "naive" in runs:
            ratios = [
                f"{paired_ratio(entry['raw'][r]['run'], entry['raw']['naive']['run']):.2f}"
                for r in runners
                if r != "naive"
            ]
        else:
            ratios = ["-" for r in runners if r != "naive"]
        lines.append(f"| {n:,} | {shape} | " + " | ".join(cells + ratios) + " |")
    lines += _per_task_table(
        "CPU time of the run, µs per task (median; every thread of the process, so it moves"
        " less with the machine's load than the run time)",
        table,
        {f"{r} CPU": (r, "cpu") for r in runners},
    )
    lines += _per_task_table(
        "Graph construction and validation, µs per task (median; not in the run times above,"
        " except that pipeopt's run validates again)",
        table,
        {**{f"{r} build": (r, "build") for r in runners}, "pipeopt compile": ("", "compile")},
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the measurements and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="10k tasks, one repetition")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated task counts")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median is shown)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="subset of runners")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="subset of shapes")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write raw numbers")
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeat = 1 if args.quick else args.repeat
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [r for r in runners if r not in RUNNER_FUNCS] + [s for s in shapes if s not in SHAPES]
    if unknown or repeat < 1:
        parser.error(
            f"runners must be among {', '.join(RUNNERS)}, shapes among {', '.join(SHAPES)}, "
            "and --repeat >= 1"
        )
    print(
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{__import__('os').cpu_count()} cpus, {WORKERS} workers, {repeat} repetition(s)",
        file=sys.stderr,
    )
    table = measure(sizes, repeat, runners, shapes)
    print(render(table, runners))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({f"{n}/{shape}": v for (n, shape), v in table.items()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
