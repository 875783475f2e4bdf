"""What pipeopt's scheduling costs on top of Dask: the same graph, two drivers, one cluster.

A layered DAG of no-op tasks (20 layers; each node depends on 1-3 random
nodes of the layer before; seeded) runs on one in-process ``LocalCluster``
(``processes=False``, one worker with ``--threads`` threads, no dashboard),
through two drivers:

* ``dask``    - ``client.submit(noop, *dependency_futures, pure=False)`` for
  every node in topological order, then ``client.gather`` of every result
  (pipeopt brings every result back too): the graph lives on the Dask
  scheduler, and dependencies are resolved on the workers without a trip
  back to the client (the baseline of the ratios);
* ``dask-graph`` - the whole graph as one task-graph dict through
  ``client.get(graph, keys)``: one message instead of one per task, shown
  as the ceiling of what Dask itself can do;
* ``pipeopt`` - ``PipelineOptimizer(max_workers=M, executor=DaskExecutor(client=client))``:
  pipeopt's run loop decides what is ready, submits each attempt when its
  dependencies have succeeded and gathers its result back (so that
  retries, breakers, criticality and metrics stay in the driver). At most
  ``M`` attempts are in flight; each Dask future's done-callback records
  its attempt and submits what became ready, with no driver thread parked
  per attempt. Rows for several ``M`` show how throughput follows the
  number of attempts in flight.

Each repetition runs the drivers in a rotated order; the table shows the
median and the ratio of each median to Dask's own.

Usage::

    python benchmarks/dask_overhead.py
    python benchmarks/dask_overhead.py --sizes 1000 --repeat 3 --slots 8,32
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

LAYERS = 20
SEED = 20240601


def noop(*_args: Any, **_kwargs: Any) -> None:
    """Do nothing (Dask passes dependency results positionally, pipeopt by name)."""


def layered(n: int, seed: int = SEED) -> list[tuple[int, ...]]:
    """Return, per node, the indices of its dependencies in a 20-layer DAG of ``n`` nodes."""
    rng = random.Random(seed)
    per_layer = max(1, n // LAYERS)
    deps: list[tuple[int, ...]] = []
    for i in range(n):
        layer = min(i // per_layer, LAYERS - 1)
        if layer == 0:
            deps.append(())
            continue
        start = (layer - 1) * per_layer
        below = range(start, start + per_layer)
        deps.append(tuple(sorted(rng.sample(below, k=min(len(below), rng.randint(1, 3))))))
    return deps


def run_dask(client: Any, graph: list[tuple[int, ...]]) -> float:
    """Submit the graph straight to Dask and wait for every node; return seconds."""
    started = time.perf_counter()
    futures: list[Any] = []
    for i, deps in enumerate(graph):
        args = [futures[d] for d in deps]
        futures.append(client.submit(noop, *args, key=f"n{i}-{started}", pure=False))
    results = client.gather(futures)  # pipeopt brings every result back too
    elapsed = time.perf_counter() - started
    assert len(results) == len(graph)
    del futures
    return elapsed


def run_dask_graph(client: Any, graph: list[tuple[int, ...]]) -> float:
    """Hand Dask the whole graph at once and gather every result; return seconds."""
    started = time.perf_counter()
    tag = f"{started}"
    dsk = {f"g{i}-{tag}": (noop, *(f"g{d}-{tag}" for d in deps)) for i, deps in enumerate(graph)}
    results = client.get(dsk, list(dsk))
    elapsed = time.perf_counter() - started
    assert len(results) == len(graph)
    return elapsed


def run_pipeopt(client: Any, graph: list[tuple[int, ...]], slots: int) -> float:
    """Run the graph through pipeopt on the same client; return seconds."""
    from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
    from pipeopt.executors import DaskExecutor

    pipeline = Pipeline("dask-overhead")
    for i, deps in enumerate(graph):
        pipeline.add(PipelineTask(f"n{i}", noop, dependencies=[f"n{d}" for d in deps]))
    optimizer = PipelineOptimizer(max_workers=slots, executor=DaskExecutor(client=client))
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    elapsed = time.perf_counter() - started
    if result.status.value != "succeeded":
        raise SystemExit(f"pipeopt run {result.status.value}: {result.counts()}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8, help="threads of the Dask worker")
    parser.add_argument("--slots", default="8,32", help="pipeopt max_workers values to try")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    slots = [int(s) for s in args.slots.split(",")]

    import dask
    import distributed

    logging.getLogger("distributed").setLevel(logging.ERROR)
    print(
        f"python {platform.python_version()}, dask {dask.__version__}, "
        f"distributed {distributed.__version__}, {os.cpu_count()} CPUs; LocalCluster "
        f"processes=False, 1 worker x {args.threads} threads; median of {args.repeat}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    drivers = ["dask", "dask-graph", *(f"pipeopt/{m}" for m in slots)]
    rows: list[tuple[int, str, float, float, float]] = []
    with (
        distributed.LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=args.threads,
            dashboard_address=None,
            # Without a dashboard Dask still serves HTTP routes, on port 8787
            # of the machine's address by default: use a free loopback port.
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            worker_dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):

        def once(driver: str, graph: list[tuple[int, ...]]) -> float:
            if driver == "dask":
                return run_dask(client, graph)
            if driver == "dask-graph":
                return run_dask_graph(client, graph)
            return run_pipeopt(client, graph, int(driver.split("/")[1]))

        for driver in drivers:  # warm-up
            once(driver, layered(200))
        for n in sizes:
            graph = layered(n)
            times: dict[str, list[float]] = {d: [] for d in drivers}
            for rep in range(args.repeat):
                order = drivers[rep % len(drivers) :] + drivers[: rep % len(drivers)]
                for driver in order:
                    times[driver].append(once(driver, graph))
            base = statistics.median(times["dask"])
            for driver in drivers:
                median = statistics.median(times[driver])
                rows.append((n, driver, median, median / base, n / median))

    print()
    print(f"{'tasks':>6}  {'driver':<12} {'median s':>9} {'vs dask':>8} {'tasks/s':>8}")
    for n, driver, median, ratio, rate in rows:
        print(f"{n:>6}  {driver:<12} {median:>9.3f} {ratio:>7.2f}x {rate:>8.0f}")
    print()
    print(f"target: pipeopt <= 1.1x dask's own time; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
