"""Prometheus metrics of one optimizer, read at scrape time.

The scheduler keeps append-only logs (attempts, retries, completions) and
counters; :class:`PipelineCollector` folds the entries added since the last
scrape into its totals when Prometheus (or the dashboard) asks, so the hot
path pays one list append per attempt and nothing per metric. Batch metrics
are observed directly, once per batch.

Series (DESIGN.md §5):

================================== ========= =====================================
name                               type      meaning
================================== ========= =====================================
pipeline_tasks_active              gauge     attempts running now
pipeline_critical_backlog          gauge     ready blocker/critical tasks waiting
pipeline_task_latency_seconds      histogram seconds per attempt, label ``task``
pipeline_task_failures_total       counter   tasks failed after their retries, ``task``
pipeline_task_retries_total        counter   attempts retried, label ``task``
pipeline_task_custom_metric        gauge     ``context.record_custom_metric``, ``task``, ``name``
pipeline_circuit_breaker_state     gauge     0 closed, 1 half-open, 2 open, ``breaker``
pipeline_batch_size                gauge     last batch size, label ``task``
pipeline_batch_latency_seconds     histogram seconds per batch, label ``task``
pipeline_runs_total                counter   finished runs, label ``status``
================================== ========= =====================================
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pipeopt.scheduler import SchedulerCore

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
)


class _TaskTotals:
    __slots__ = ("buckets", "count", "failures", "retries", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.failures = 0
        self.retries = 0


class PipelineCollector(Collector):
    """Export the scheduler's state and logs as Prometheus metric families."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._core: SchedulerCore | None = None
        self._core_lock: threading.Lock | None = None
        self._totals: dict[str, _TaskTotals] = {}
        self._seen_attempts = 0
        self._seen_retries = 0
        self._seen_completed = 0
        self._runs: dict[str, int] = {}

    def attach(self, core: SchedulerCore, lock: threading.Lock) -> None:
        """Start reading a new run's scheduler (folding in the previous one first)."""
        with self._lock:
            self._fold()
            self._core, self._core_lock = core, lock
            self._seen_attempts = self._seen_retries = self._seen_completed = 0

    def run_finished(self, status: str) -> None:
        """Count a finished run by status (its logs are folded at the next scrape)."""
        with self._lock:
            self._runs[status] = self._runs.get(status, 0) + 1

    def _fold(self) -> None:
        core = self._core
        if core is None:
            return
        names = core.compiled.names
        totals = self._totals
        attempts = core.attempt_log
        end = len(attempts)
        for k in range(self._seen_attempts, end):
            i, seconds, _failed = attempts[k]
            entry = totals.get(names[i])
            if entry is None:
                entry = totals[names[i]] = _TaskTotals()
            entry.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            entry.count += 1
            entry.sum += seconds
        self._seen_attempts = end
        retries = core.retry_log
        end = len(retries)
        for k in range(self._seen_retries, end):
            name = names[retries[k]]
            totals.setdefault(name, _TaskTotals()).retries += 1
        self._seen_retries = end
        completed = core.completed
        end = len(completed)
        failed = core.outcomes
        for k in range(self._seen_completed, end):
            i = completed[k]
            if failed[i].state == "failed":
                totals.setdefault(names[i], _TaskTotals()).failures += 1
        self._seen_completed = end

    def collect(self) -> Iterator[Metric]:
        """Yield every series, consistent with one moment of the run."""
        with self._lock:
            core, core_lock = self._core, self._core_lock
            active = backlog = 0
            breakers: dict[str, int] = {}
            custom: list[tuple[str, str, float]] = []
            if core is not None and core_lock is not None:
                with core_lock:
                    self._fold()
                    active = core.active
                    backlog = core.critical_backlog
                for task in core.compiled.tasks:
                    breaker = task.circuit_breaker
                    if breaker is not None and breaker.name not in breakers:
                        breakers[breaker.name] = int(breaker.statistics().state)
                for outcome in core.outcomes:
                    if outcome.custom_metrics:
                        custom.extend(
                            (outcome.name, key, value)
                            for key, value in list(outcome.custom_metrics.items())
                        )

            yield GaugeMetricFamily(
                "pipeline_tasks_active", "Task attempts running now.", value=active
            )
            yield GaugeMetricFamily(
                "pipeline_critical_backlog",
                "Ready blocker and critical tasks waiting for a worker.",
                value=backlog,
            )
            latency = HistogramMetricFamily(
                "pipeline_task_latency_seconds",
                "Seconds per task attempt.",
                labels=["task"],
            )
            failures = CounterMetricFamily(
                "pipeline_task_failures_total",
                "Tasks that failed after their retries.",
                labels=["task"],
            )
            retries = CounterMetricFamily(
                "pipeline_task_retries_total", "Task attempts that were retried.", labels=["task"]
            )
            for name, entry in self._totals.items():
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, hits in zip(LATENCY_BUCKETS, entry.buckets, strict=False):
                    cumulative += hits
                    buckets.append((repr(bound), cumulative))
                buckets.append(("+Inf", entry.count))
                latency.add_metric([name], buckets, entry.sum)
                failures.add_metric([name], entry.failures)
                retries.add_metric([name], entry.retries)
            yield latency
            yield failures
            yield retries
            state = GaugeMetricFamily(
                "pipeline_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                labels=["breaker"],
            )
            for name, code in breakers.items():
                state.add_metric([name], code)
            yield state
            custom_family = GaugeMetricFamily(
                "pipeline_task_custom_metric",
                "Values tasks recorded with context.record_custom_metric.",
                labels=["task", "name"],
            )
            for task_name, key, value in custom:
                custom_family.add_metric([task_name, key], value)
            yield custom_family
            runs = CounterMetricFamily(
                "pipeline_runs_total", "Finished runs by status.", labels=["status"]
            )
            for status, count in self._runs.items():
                runs.add_metric([status], count)
            yield runs


class OptimizerMetrics:
    """The metrics of one :class:`~pipeopt.PipelineOptimizer`, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.collector = PipelineCollector()
        self.registry.register(self.collector)
        self.batch_size = Gauge(
            "pipeline_batch_size",
            "Size of the last batch a task wrote.",
            ["task"],
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "pipeline_batch_latency_seconds",
            "Seconds per batch written.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.last_batch_size: dict[str, int] = {}

    def observe_batch(self, task: str, size: int, latency: float) -> None:
        """Record one batch of ``task``: its size and latency in seconds."""
        self.batch_size.labels(task).set(size)
        self.batch_latency.labels(task).observe(latency)
        self.last_batch_size[task] = size
