"""Load the dashboard while a 10,000-task pipeline runs; report latency and run slowdown.

One process runs the pipeline (tasks sleeping a few ms each) and the
dashboard on a loopback port. A second process (this file with ``--client``)
loads ``/metrics`` (the run page's whole document: every task and, for the
timeline, every attempt) and ``/prometheus`` with an aiohttp client loop,
bounded in requests and seconds, and reports requests/s and latency
percentiles.

Every scenario alternates unscraped and scraped runs of the same pipeline in
the same process (ABBA order, so drift cancels out) and compares the median
wall times. Scenarios:

* ``saturate``: ``--concurrency`` clients in a closed loop, no pause;
* ``paced``: ``--rate`` requests/s per endpoint, about what a few open
  dashboards plus a Prometheus scraper send;
* ``browser``: one request per second per endpoint, what one open run page
  (it polls its document every second) and one scraper send.

The load client is pinned to the last CPU and the benchmark process to the
others (Linux, 2+ CPUs; ``--no-pin`` to turn off), so the slowdown measures
the dashboard's cost to the run, not the load generator's CPU use.

Targets: p99 <= 50 ms per endpoint, run slowdown <= 5 %.

    python benchmarks/dashboard_load.py            # the full benchmark
    python benchmarks/dashboard_load.py --quick    # 1,000 tasks, 1 repeat
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = ("/metrics", "/prometheus")
P99_TARGET_MS = 50.0
SLOWDOWN_TARGET = 0.05


# -- the load client (second process) -------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Return the ``q`` quantile (0..1) of ``values`` by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    latencies: dict[str, list[float]] = {path: [] for path in ENDPOINTS}
    errors: dict[str, int] = dict.fromkeys(ENDPOINTS, 0)
    sent = 0

    def watch_stdin() -> None:
        sys.stdin.readline()  # any line (or EOF) means stop
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    loop.call_later(args.max_seconds, stop.set)
    base = args.client.rstrip("/")
    period = args.concurrency / args.rate if args.rate else 0.0

    async def fetch(session: aiohttp.ClientSession, path: str) -> None:
        started = time.perf_counter()
        try:
            async with session.get(base + path) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        if ok:
            latencies[path].append((time.perf_counter() - started) * 1000.0)
        else:
            errors[path] += 1

    async def worker(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal sent
        turn = index
        due = loop.time() + period * index / args.concurrency
        while not stop.is_set() and sent < args.max_requests:
            if period:
                await asyncio.sleep(max(0.0, due - loop.time()))
                due += period
                if stop.is_set():
                    return
            sent += 1
            await fetch(session, ENDPOINTS[turn % len(ENDPOINTS)])
            turn += 1

    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for path in ENDPOINTS:  # warm up: the first render of each body is not measured
            async with session.get(base + path) as response:
                await response.read()
        print("ready", flush=True)
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, i) for i in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "latencies_ms": latencies, "errors": errors}


# -- the pipeline and the runs (first process) ----------------------------------------------


def build_pipeline(tasks: int, sleep_s: float) -> Any:
    """Return ``tasks`` sleeping tasks in layers of 100, each needing two of the layer above."""
    from pipeopt import Pipeline

    pipeline = Pipeline("dashboard-load")
    width = min(100, tasks)
    labels = ("critical", "high", "medium", "low")

    def body() -> None:
        time.sleep(sleep_s)

    for i in range(tasks):
        layer, slot = divmod(i, width)
        deps = []
        if layer:
            above = (layer - 1) * width
            deps = sorted({f"t{above + slot:05d}", f"t{above + (slot * 7 + 3) % width:05d}"})
        pipeline.task(name=f"t{i:05d}", dependencies=deps, criticality=labels[i % 4])(body)
    return pipeline


@dataclass
class Scenario:
    name: str
    concurrency: int
    rate: float | None
    plain: list[float] = field(default_factory=list)
    scraped: list[float] = field(default_factory=list)
    latencies_ms: dict[str, list[float]] = field(
        default_factory=lambda: {path: [] for path in ENDPOINTS}
    )
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    load_seconds: float = 0.0

    def slowdown(self) -> float:
        return statistics.median(self.scraped) / statistics.median(self.plain) - 1.0


def timed_run(optimizer: Any, pipeline: Any) -> float:
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise SystemExit(f"benchmark run failed: {result.counts()}")
    return elapsed


def describe(dash: Any, optimizer: Any) -> None:
    """Print the size and render cost of both bodies after a run (what clients fetch)."""
    import gzip

    from prometheus_client import generate_latest

    for name, render in (
        ("/metrics", dash.render_metrics),
        ("/prometheus", lambda: generate_latest(optimizer.registry)),
    ):
        costs = []
        for _ in range(5):
            started = time.perf_counter()
            body = render()
            costs.append((time.perf_counter() - started) * 1000.0)
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        extra = f", {series} series" if name == "/prometheus" else ""
        print(
            f"{name}: {len(body) / 1024:.0f} KB ({len(gzip.compress(body, 1)) / 1024:.0f} KB "
            f"gzipped){extra}, render median {statistics.median(costs):.1f} ms"
        )


def scraped_run(optimizer: Any, pipeline: Any, url: str, scenario: Scenario, args: Any) -> float:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--client",
        url,
        "--concurrency",
        str(scenario.concurrency),
        "--max-requests",
        str(args.max_requests),
        "--max-seconds",
        str(args.max_seconds),
    ]
    if scenario.rate:
        command += ["--rate", str(scenario.rate)]
    if args.client_cpu is not None:
        command += ["--cpu", str(args.client_cpu)]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as client:
        assert client.stdin is not None
        assert client.stdout is not None
        line = client.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"load client did not start: {line!r}")
        elapsed = timed_run(optimizer, pipeline)
        client.stdin.write("stop\n")
        client.stdin.flush()
        report = json.loads(client.stdout.read())
    scenario.load_seconds += report["elapsed"]
    for path in ENDPOINTS:
        scenario.latencies_ms[path].extend(report["latencies_ms"][path])
        scenario.requests[path] += len(report["latencies_ms"][path])
        scenario.errors[path] += report["errors"][path]
    return elapsed


def report(scenarios: list[Scenario], args: argparse.Namespace) -> dict[str, Any]:
    print(
        f"\n{args.tasks} tasks x {args.sleep_ms:g} ms sleep, {args.workers} workers, "
        f"median of {args.repeats} (ABBA order), Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, render_budget={args.render_budget}"
        + ("" if args.client_cpu is None else f", load client pinned to CPU {args.client_cpu}")
    )
    header = (
        f"{'scenario':<10} {'endpoint':<12} {'requests':>8} {'req/s':>7} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[str, Any] = {"config": vars(args), "scenarios": {}}
    for scenario in scenarios:
        rows: dict[str, Any] = {}
        for path in ENDPOINTS:
            values = scenario.latencies_ms[path]
            rps = scenario.requests[path] / scenario.load_seconds if scenario.load_seconds else 0
            rows[path] = {
                "requests": scenario.requests[path],
                "requests_per_s": rps,
                "p50_ms": percentile(values, 0.50),
                "p95_ms": percentile(values, 0.95),
                "p99_ms": percentile(values, 0.99),
                "max_ms": max(values, default=float("nan")),
                "errors": scenario.errors[path],
            }
            row = rows[path]
            print(
                f"{scenario.name:<10} {path:<12} {row['requests']:>8} {rps:>7.0f} "
                f"{row['p50_ms']:>7.2f} {row['p95_ms']:>7.2f} {row['p99_ms']:>7.2f} "
                f"{row['max_ms']:>7.2f} {row['errors']:>6}"
            )
        slowdown = scenario.slowdown()
        plain = statistics.median(scenario.plain)
        scraped = statistics.median(scenario.scraped)
        print(
            f"{scenario.name:<10} run wall time: {plain:.3f} s unscraped, {scraped:.3f} s "
            f"scraped -> slowdown {slowdown:+.1%}"
        )
        summary["scenarios"][scenario.name] = {
            "concurrency": scenario.concurrency,
            "rate_per_s": scenario.rate,
            "endpoints": rows,
            "wall_unscraped_s": scenario.plain,
            "wall_scraped_s": scenario.scraped,
            "slowdown": slowdown,
            "p99_ok": all(row["p99_ms"] <= P99_TARGET_MS for row in rows.values()),
            "slowdown_ok": slowdown <= SLOWDOWN_TARGET,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--sleep-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="saturating clients")
    parser.add_argument(
        "--rate", type=float, default=None, help="paced requests/s per endpoint (default 10)"
    )
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=("saturate", "paced", "browser"),
        help="default: all three",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, 1 repeat")
    parser.add_argument(
        "--render-budget",
        default="0.02",
        help="PipelineDashboard(render_budget=...); 'none' renders every request",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the load client
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)  # internal: client's CPU
    args = parser.parse_args(argv)

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.client:
        result = asyncio.run(client_main(args))
        print(json.dumps(result), flush=True)
        return 0
    if args.quick:
        args.tasks, args.repeats = 1000, 1

    args.client_cpu = None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not args.no_pin and len(cpus) >= 2:
        # Before any thread starts: threads inherit the affinity of their creator.
        args.client_cpu = cpus[-1]
        os.sched_setaffinity(0, set(cpus[:-1]))

    from pipeopt import PipelineOptimizer
    from pipeopt.dashboard import PipelineDashboard

    pipeline = build_pipeline(args.tasks, args.sleep_ms / 1000.0)
    optimizer = PipelineOptimizer(max_workers=args.workers)
    scenarios = [
        Scenario("saturate", args.concurrency, None),
        Scenario("paced", 2, (args.rate or 10.0) * len(ENDPOINTS)),
        Scenario("browser", 2, 1.0 * len(ENDPOINTS)),
    ]
    if args.scenario:
        scenarios = [s for s in scenarios if s.name in args.scenario]
    budget = None if args.render_budget.lower() == "none" else float(args.render_budget)
    with PipelineDashboard(optimizer, render_budget=budget) as dash:
        print(f"dashboard at {dash.url}; warm-up run")
        timed_run(optimizer, pipeline)  # fills the registry with every task's series
        describe(dash, optimizer)
        for scenario in scenarios:
            for repeat in range(args.repeats):
                order = ("plain", "scraped") if repeat % 2 == 0 else ("scraped", "plain")
                for kind in order:
                    if kind == "plain":
                        scenario.plain.append(timed_run(optimizer, pipeline))
                    else:
                        scenario.scraped.append(
                            scraped_run(optimizer, pipeline, dash.url, scenario, args)
                        )
                print(
                    f"{scenario.name} #{repeat + 1}: unscraped {scenario.plain[-1]:.3f} s, "
                    f"scraped {scenario.scraped[-1]:.3f} s"
                )
    summary = report(scenarios, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
