"""Schedule quality: lower bounds and a zero-overhead simulation of pipeopt's policy.

:func:`simulate` list-schedules a compiled pipeline on ``workers`` ideal
workers: no dispatch cost, each task taking exactly its ``cost``. Ready tasks
go as :class:`~pipeopt.scheduler.SchedulerCore` takes them: by effective
criticality, then longest remaining critical path (``compiled.critical_path``,
i.e. the estimates the run would rank by), then first in, first out. A real
run's makespan over the simulated one is the share of run-time overhead;
the simulated one over :func:`lower_bound` is what the policy leaves.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from pipeopt.bench.suite import critical_path

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline, Pipeline
    from pipeopt.optimizer import PipelineOptimizer


def time_run(optimizer: PipelineOptimizer, pipeline: Pipeline) -> float:
    """Run ``pipeline`` once; return its makespan in seconds (its run store opened first).

    Raises:
        Exception: the first task error, if the run did not succeed.
    """
    _ = optimizer.store  # opened before the clock starts, as a long-lived process has it
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    elapsed = time.perf_counter() - started
    result.raise_for_status()
    return elapsed


class Bound(NamedTuple):
    """A makespan lower bound: ``max(critical path, work / workers)``, and its parts."""

    bound: float
    critical_path: float
    work: float


def lower_bound(compiled: CompiledPipeline, cost: Sequence[float], workers: int) -> Bound:
    """Return the lower bound of any schedule of ``compiled`` with ``cost[i]`` per task."""
    path, work = critical_path(compiled, cost), sum(cost)
    return Bound(max(path, work / workers), path, work)


def simulate(compiled: CompiledPipeline, cost: Sequence[float], workers: int) -> float:
    """Return the makespan of pipeopt's ready-queue order with zero overhead.

    Args:
        compiled: the pipeline, ranked by its ``levels`` and ``critical_path``.
        cost: the true duration of each task (by index).
        workers: tasks running at once.
    """
    levels, ranks = compiled.levels, compiled.critical_path
    remaining = [len(d) for d in compiled.dependencies]
    ready: list[tuple[int, float, int, int]] = []
    seq = 0
    for i in compiled.order:
        if not remaining[i]:
            ready.append((levels[i], -ranks[i], seq, i))
            seq += 1
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < workers:
            i = heapq.heappop(ready)[-1]
            heapq.heappush(running, (now + cost[i], i))
        now, i = heapq.heappop(running)
        for j in compiled.dependents[i]:
            remaining[j] -= 1
            if not remaining[j]:
                heapq.heappush(ready, (levels[j], -ranks[j], seq, j))
                seq += 1
    return now
