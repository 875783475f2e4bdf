"""Prometheus metrics of one optimizer, read at scrape time, with a bounded number of series.

The scheduler keeps append-only logs (attempts, retries, completions) and
counters; :class:`PipelineCollector` folds the entries added since the last
scrape into its totals when Prometheus (or the dashboard) asks, so the hot
path pays one list append per attempt and nothing per metric. Batch metrics
are observed directly, once per batch.

Series; every series carries a ``pipeline`` label:

================================== ========= =============================================
name                               type      meaning, labels besides ``pipeline``
================================== ========= =============================================
pipeline_tasks_active              gauge     attempts running now
pipeline_critical_backlog          gauge     ready blocker/critical tasks waiting
pipeline_task_latency_seconds      histogram seconds per attempt; ``group``, ``task``
pipeline_task_failures_total       counter   tasks failed after their retries; ``group``, ``task``
pipeline_task_retries_total        counter   attempts retried; ``group``, ``task``
pipeline_task_custom_metric        gauge     ``context.record_custom_metric``; ``group``, ``task``,
                                             ``name``
pipeline_circuit_breaker_state     gauge     0 closed, 1 half-open, 2 open; ``breaker``
pipeline_batch_size                gauge     last batch size; ``group``, ``task``
pipeline_batch_latency_seconds     histogram seconds per batch; ``group``, ``task``
pipeline_runs_total                counter   finished runs; ``status``
================================== ========= =============================================

Bounded series (policy)
    A task's *group* is its ``group=`` if declared; else, for a mapped item
    named ``name[i]``, the group of ``name``; else its declared criticality
    label. A pipeline of at most ``task_series_limit`` tasks (100 by default)
    has series per task: ``task`` is the task's name, ``group`` its group.
    Above that, the per-task label folds into the group: ``task="*"`` and
    one series per group (custom metrics summed over the group's tasks). At
    most ``group_limit`` groups (10) are labelled per pipeline; tasks of
    further groups share ``group="other"``. So a run of any size exposes at
    most (groups + 1) x 21 task series, plus as many for batch metrics when
    its tasks write batches: a 10,000-task run stays under 500.
"""

from __future__ import annotations

import bisect
import logging
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeopt.priority import Criticality, parse_criticality
from pipeopt.result import outcome_metrics

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline, PipelineTask
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

#: Pipelines with more tasks than this get one series per group, not per task.
TASK_SERIES_LIMIT: Final = 100

#: Groups labelled per pipeline; tasks of further groups share :data:`OTHER_GROUP`.
GROUP_LIMIT: Final = 10

#: The ``task`` label of a series that folds every task of its group.
FOLDED_TASK: Final = "*"

#: The group of tasks beyond :data:`GROUP_LIMIT` distinct groups.
OTHER_GROUP: Final = "other"

#: Custom-metric series kept per pipeline; further names are not exported.
CUSTOM_SERIES_LIMIT: Final = 200

_MAPPED_ITEM = re.compile(r"^(.*)\[\d+\]$")


def task_group(task: PipelineTask) -> str:
    """Return the metrics group of ``task``: ``group=``, a mapped item's task, or criticality."""
    declared = getattr(task, "group", None)
    if declared:
        return str(declared)
    mapped = _MAPPED_ITEM.match(task.name)
    if mapped and mapped.group(1):
        return mapped.group(1)
    return parse_criticality(task.criticality).label


_LABEL_OF: dict[object, str] = {level: level.label for level in Criticality}
_GROUPS: weakref.WeakKeyDictionary[CompiledPipeline, list[str]] = weakref.WeakKeyDictionary()
_GROUPS_LOCK = threading.Lock()


def task_groups(compiled: CompiledPipeline) -> list[str]:
    """Return :func:`task_group` of every task of ``compiled``, computed once per pipeline."""
    with _GROUPS_LOCK:
        found = _GROUPS.get(compiled)
    if found is not None:
        return found
    label_of = _LABEL_OF.get
    groups: list[str] = []
    append = groups.append
    for task in compiled.tasks:
        # The common case, a plain name without group=, costs two lookups.
        label = None if task.group or task.name[-1] == "]" else label_of(task.criticality)
        append(label if label is not None else task_group(task))
    with _GROUPS_LOCK:
        _GROUPS[compiled] = groups
    return groups


@dataclass(frozen=True, slots=True)
class SeriesLabels:
    """The label values each task of one pipeline reports under.

    ``per_task[i]`` is ``(pipeline, group, task)`` for task ``i`` (the same
    tuple object for every task of a folded group); ``keys`` lists the
    distinct ones; :meth:`of_task` finds a task's by name; ``folded`` says
    whether the per-task label folded into the group.
    """

    pipeline: str
    per_task: list[tuple[str, str, str]]
    keys: tuple[tuple[str, str, str], ...]
    index: Mapping[str, int]
    folded: bool

    @classmethod
    def of(
        cls,
        compiled: CompiledPipeline,
        *,
        task_series_limit: int = TASK_SERIES_LIMIT,
        group_limit: int = GROUP_LIMIT,
    ) -> SeriesLabels:
        """Return the labels of ``compiled``'s tasks under the limits (see the module docstring)."""
        pipeline = compiled.name
        folded = len(compiled.tasks) > task_series_limit
        shown: dict[str, str] = {}
        for group in dict.fromkeys(task_groups(compiled)):
            shown[group] = group if len(shown) < group_limit else OTHER_GROUP
        if folded:
            key_of = {group: (pipeline, label, FOLDED_TASK) for group, label in shown.items()}
            per_task = list(map(key_of.__getitem__, task_groups(compiled)))
        else:
            per_task = [
                (pipeline, shown[group], name)
                for group, name in zip(task_groups(compiled), compiled.names, strict=True)
            ]
        return cls(pipeline, per_task, tuple(dict.fromkeys(per_task)), compiled.index, folded)

    def of_task(self, name: str) -> tuple[str, str, str] | None:
        """Return the labels of the task called ``name``, or ``None`` if there is none."""
        i = self.index.get(name)
        return None if i is None else self.per_task[i]


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
        self._labels: SeriesLabels | None = None
        self._totals: dict[tuple[str, str, str], _TaskTotals] = {}
        self._seen_attempts = 0
        self._seen_retries = 0
        self._seen_completed = 0
        self._runs: dict[tuple[str, str], int] = {}

    def attach(self, core: SchedulerCore, lock: threading.Lock, labels: SeriesLabels) -> None:
        """Start reading a new run's scheduler (folding in the previous one first)."""
        with self._lock:
            self._fold()
            self._core, self._core_lock, self._labels = core, lock, labels
            self._seen_attempts = self._seen_retries = self._seen_completed = 0
            # A run's task series exist from its start, zero until something happens.
            for key in labels.keys:
                self._totals.setdefault(key, _TaskTotals())

    def run_finished(self, status: str) -> None:
        """Count a finished run by status (its logs are folded at the next scrape)."""
        with self._lock:
            pipeline = self._labels.pipeline if self._labels is not None else ""
            key = (pipeline, status)
            self._runs[key] = self._runs.get(key, 0) + 1

    def _fold(self) -> None:
        core, labels = self._core, self._labels
        if core is None or labels is None:
            return
        keys = _item_keys(core, labels)
        totals = self._totals
        indices, seconds_of = core.attempt_tasks, core.attempt_seconds
        end = min(len(indices), len(seconds_of))  # equal, unless read outside the core's lock
        for k in range(self._seen_attempts, end):
            seconds = seconds_of[k]
            entry = totals[keys[indices[k]]]
            entry.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            entry.count += 1
            entry.sum += seconds
        self._seen_attempts = end
        retries = core.retry_log
        end = len(retries)
        for k in range(self._seen_retries, end):
            totals[keys[retries[k]]].retries += 1
        self._seen_retries = end
        completed = core.completed
        end = len(completed)
        outcomes = core.outcomes
        for k in range(self._seen_completed, end):
            i = completed[k]
            if outcomes[i].state == "failed":
                totals[keys[i]].failures += 1
        self._seen_completed = end

    def collect(self) -> Iterator[Metric]:
        """Yield every series, consistent with one moment of the run."""
        with self._lock:
            core, core_lock, labels = self._core, self._core_lock, self._labels
            pipeline = labels.pipeline if labels is not None else None
            active = backlog = 0
            breakers: dict[str, int] = {}
            custom: dict[tuple[str, str, str, str], float] = {}
            if core is not None and core_lock is not None and labels is not None:
                with core_lock:
                    self._fold()
                    active = core.active
                    backlog = core.critical_backlog
                for task in core.compiled.tasks:
                    breaker = task.circuit_breaker
                    if breaker is not None and breaker.name not in breakers:
                        breakers[breaker.name] = int(breaker.statistics().state)
                _custom_series(core, labels, custom)

            active_family = GaugeMetricFamily(
                "pipeline_tasks_active", "Task attempts running now.", labels=["pipeline"]
            )
            backlog_family = GaugeMetricFamily(
                "pipeline_critical_backlog",
                "Ready blocker and critical tasks waiting for a worker.",
                labels=["pipeline"],
            )
            if pipeline is not None:
                active_family.add_metric([pipeline], active)
                backlog_family.add_metric([pipeline], backlog)
            yield active_family
            yield backlog_family
            task_labels = ["pipeline", "group", "task"]
            latency = HistogramMetricFamily(
                "pipeline_task_latency_seconds", "Seconds per task attempt.", labels=task_labels
            )
            failures = CounterMetricFamily(
                "pipeline_task_failures_total",
                "Tasks that failed after their retries.",
                labels=task_labels,
            )
            retries = CounterMetricFamily(
                "pipeline_task_retries_total",
                "Task attempts that were retried.",
                labels=task_labels,
            )
            for key, entry in self._totals.items():
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, hits in zip(LATENCY_BUCKETS, entry.buckets, strict=False):
                    cumulative += hits
                    buckets.append((repr(bound), cumulative))
                buckets.append(("+Inf", entry.count))
                latency.add_metric(list(key), buckets, entry.sum)
                failures.add_metric(list(key), entry.failures)
                retries.add_metric(list(key), entry.retries)
            yield latency
            yield failures
            yield retries
            state = GaugeMetricFamily(
                "pipeline_circuit_breaker_state",
                "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                labels=["pipeline", "breaker"],
            )
            for name, code in breakers.items():
                state.add_metric([pipeline or "", name], code)
            yield state
            custom_family = GaugeMetricFamily(
                "pipeline_task_custom_metric",
                "Values tasks recorded with context.record_custom_metric "
                "(summed over a group when task is *).",
                labels=[*task_labels, "name"],
            )
            for custom_key, value in custom.items():
                custom_family.add_metric(list(custom_key), value)
            yield custom_family
            runs = CounterMetricFamily(
                "pipeline_runs_total", "Finished runs by status.", labels=["pipeline", "status"]
            )
            for (run_pipeline, status), count in self._runs.items():
                runs.add_metric([run_pipeline, status], count)
            yield runs


def _item_keys(core: SchedulerCore, labels: SeriesLabels) -> Sequence[tuple[str, str, str]]:
    """Return the labels per task index, mapped items reporting as their task."""
    keys = labels.per_task
    if len(core.outcomes) == len(keys):
        return keys
    parents = core.parents
    return [*keys, *(keys[parents[i]] for i in range(len(keys), len(core.outcomes)))]


def _custom_series(
    core: SchedulerCore, labels: SeriesLabels, into: dict[tuple[str, str, str, str], float]
) -> None:
    keys = _item_keys(core, labels)
    for i, outcome in enumerate(core.outcomes):
        custom = outcome_metrics(outcome)
        if not custom:
            continue
        pipeline, group, task = keys[i]
        for name, value in list(custom.items()):
            key = (pipeline, group, task, name)
            if key in into:
                into[key] += value  # several tasks folded into one series
            elif len(into) < CUSTOM_SERIES_LIMIT:
                into[key] = value


class OptimizerMetrics:
    """The metrics of one :class:`~pipeopt.PipelineOptimizer`, in its own registry.

    Args:
        registry: where to register; a fresh ``CollectorRegistry`` by default.
        task_series_limit: pipelines with more tasks report per group, not per task.
        group_limit: groups labelled per pipeline; further ones share ``"other"``.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        task_series_limit: int = TASK_SERIES_LIMIT,
        group_limit: int = GROUP_LIMIT,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.task_series_limit = task_series_limit
        self.group_limit = group_limit
        self.collector = PipelineCollector()
        self.registry.register(self.collector)
        self.batch_size = Gauge(
            "pipeline_batch_size",
            "Size of the last batch a task wrote.",
            ["pipeline", "group", "task"],
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "pipeline_batch_latency_seconds",
            "Seconds per batch written.",
            ["pipeline", "group", "task"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.last_batch_size: dict[str, int] = {}
        self._labels: SeriesLabels | None = None
        self._pipeline = ""

    def attach(self, core: SchedulerCore, lock: threading.Lock) -> SeriesLabels:
        """Start exporting the run that ``core`` schedules; return its series labels."""
        labels = SeriesLabels.of(
            core.compiled,
            task_series_limit=self.task_series_limit,
            group_limit=self.group_limit,
        )
        self._labels = labels
        self._pipeline = labels.pipeline
        self.last_batch_size = {}
        self.collector.attach(core, lock, labels)
        return labels

    def observe_batch(self, task: str, size: int, latency: float) -> None:
        """Record one batch of ``task``: its size and latency in seconds."""
        labels = self._labels
        key = labels.of_task(task) if labels is not None else None
        if key is None:
            key = (self._pipeline, OTHER_GROUP, FOLDED_TASK)
        self.batch_size.labels(*key).set(size)
        self.batch_latency.labels(*key).observe(latency)
        self.last_batch_size[task] = size


#: Seconds a push to the Pushgateway may take before it is given up.
PUSH_TIMEOUT: Final = 10.0

_log = logging.getLogger("pipeopt.metrics")


def check_push_gateway(url: object) -> str:
    """Return ``url`` as a Pushgateway address, or raise a ``ValueError`` that says what to pass.

    ``host:port`` is taken as ``http://host:port``.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"push_gateway must be a URL such as 'http://127.0.0.1:9091', got {url!r}")
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"push_gateway must be an http(s) URL such as 'http://127.0.0.1:9091', got {url!r}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError(f"push_gateway has an invalid port: {url!r}") from None
    return text.rstrip("/")


def push_run_metrics(
    registry: CollectorRegistry,
    gateway: str,
    *,
    pipeline: str,
    run_id: str,
    timeout: float = PUSH_TIMEOUT,
) -> bool:
    """Push ``registry`` to a Pushgateway as job ``pipeline``, grouped by ``run``; never raise.

    A gateway that cannot be reached or refuses the push is logged as an
    error naming the gateway and the reason; the caller's run is not failed.

    Returns:
        whether the gateway accepted the push.
    """
    from prometheus_client import push_to_gateway

    try:
        push_to_gateway(
            gateway, job=pipeline, registry=registry, grouping_key={"run": run_id}, timeout=timeout
        )
    except Exception as exc:
        _log.error(
            "could not push the metrics of run %s to the Pushgateway at %s: %s "
            "(the run itself is not affected; check the address and that the gateway is up)",
            run_id,
            gateway,
            exc,
        )
        return False
    _log.info("pushed the metrics of run %s to the Pushgateway at %s", run_id, gateway)
    return True
