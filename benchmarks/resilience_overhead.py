"""Scheduler overhead with a retry policy and a circuit breaker on every task.

Runs the same no-op pipelines with and without resilience settings (no
faults injected) in one process, alternating, and reports µs per task and
the ratio. Target: with resilience ≤ 1.2× plain.

    python benchmarks/resilience_overhead.py [--tasks 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from pipeopt import CircuitBreaker, Pipeline, PipelineOptimizer, PipelineTask, RetryPolicy


def noop() -> None:
    return None


def build(n: int, shape: str, resilient: bool) -> Pipeline:
    policy = RetryPolicy(max_attempts=3, base_delay=0.01) if resilient else None
    breakers = [CircuitBreaker(failure_threshold=5, name=f"svc-{k}") for k in range(8)]
    rng = random.Random(1)
    p = Pipeline(f"{shape}-{'resilient' if resilient else 'plain'}")
    previous: list[str] = []
    per_layer = n // 20 if shape == "layered" else n
    for k in range(n):
        name = f"t{k}"
        deps = rng.sample(previous, rng.randint(1, 3)) if previous else []
        p.add(
            PipelineTask(
                name,
                noop,
                dependencies=deps,
                retry_policy=policy,
                circuit_breaker=breakers[k % 8] if resilient else None,
            )
        )
        if shape == "layered" and (k + 1) % per_layer == 0:
            previous = [f"t{j}" for j in range(k + 1 - per_layer, k + 1)]
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    print(f"{args.tasks} no-op tasks, {args.workers} workers, median of {args.repeat}")
    print(f"{'shape':10} {'plain µs/task':>14} {'resilient µs/task':>18} {'ratio':>7}")
    for shape in ("independent", "layered"):
        plain = build(args.tasks, shape, resilient=False)
        resilient = build(args.tasks, shape, resilient=True)
        times: dict[str, list[float]] = {"plain": [], "resilient": []}
        for _ in range(args.repeat):
            for label, pipeline in (("plain", plain), ("resilient", resilient)):
                optimizer = PipelineOptimizer(max_workers=args.workers)
                start = time.perf_counter()
                result = optimizer.run(pipeline)
                times[label].append(time.perf_counter() - start)
                assert result.ok
        a = statistics.median(times["plain"]) / args.tasks * 1e6
        b = statistics.median(times["resilient"]) / args.tasks * 1e6
        print(f"{shape:10} {a:14.2f} {b:18.2f} {b / a:7.2f}")


if __name__ == "__main__":
    main()
