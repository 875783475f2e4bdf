"""Turn a :class:`~pipeopt.RunSnapshot` into the dashboard's JSON, purely.

Nothing here does I/O, reads a clock or imports aiohttp: every function takes
the snapshot, the sampled history and ``now`` (a ``time.time()`` epoch) and
returns plain data, so the web layer stays thin and this module is unit-tested
without a server.

Definitions (the same in ``/metrics`` and in each history point):

* **finished task** – a task in a final state with a ``finished_at`` time
  (succeeded, failed or cached; skipped and cancelled tasks never ran).
* **throughput_per_minute** – finished tasks whose ``finished_at`` falls in
  the last 60 s before ``now``. While the run is younger than 60 s the window
  is the run's age instead (at least one second), scaled to a minute, so a
  young run does not look slow.
* **avg_latency_ms** – mean ``duration`` (first start to end, backoff
  included) of every finished task of the run; ``None`` before the first one.
* **recent_latency_ms** – the same mean over the throughput window only.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeopt.result import AttemptRecord, RunSnapshot, TaskOutcome, TaskState, outcome_metrics

if TYPE_CHECKING:
    from pipeopt.batching import BatcherStatistics

#: Version of the ``/metrics`` document; bumped on incompatible changes.
SCHEMA_VERSION = 2

#: Seconds of finished work that ``throughput_per_minute`` looks back over.
THROUGHPUT_WINDOW = 60.0

#: Longest error text sent per task; the full error stays in the run result.
MAX_ERROR_CHARS = 2000

#: Longest traceback sent in a task's details (its end is kept).
MAX_TRACEBACK_CHARS = 20_000

#: Log lines sent in a task's details (the last ones).
MAX_LOG_LINES = 200

#: How an attempt ended, as the timeline colours it.
ATTEMPT_OUTCOMES = ("succeeded", "failed", "retried", "running")

BREAKER_STATES: Mapping[int, str] = {0: "closed", 1: "half-open", 2: "open"}


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One sample for the dashboard chart, taken every ``refresh_interval``.

    ``t`` is a ``time.time()`` epoch; latencies are milliseconds or ``None``
    when no task had finished.
    """

    t: float
    throughput_per_minute: float
    avg_latency_ms: float | None
    recent_latency_ms: float | None
    tasks_active: int
    tasks_finished: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of this point (values rounded for size)."""
        return {
            "t": round(self.t, 3),
            "throughput_per_minute": round(self.throughput_per_minute, 3),
            "avg_latency_ms": _round(self.avg_latency_ms),
            "recent_latency_ms": _round(self.recent_latency_ms),
            "tasks_active": self.tasks_active,
            "tasks_finished": self.tasks_finished,
        }


class History:
    """The last ``seconds`` of :class:`HistoryPoint` samples, oldest first.

    Thread-safe: the sampler appends on the event loop while responses are
    rendered on worker threads.
    """

    def __init__(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"history seconds must be a positive number, got {seconds!r}")
        self.seconds = float(seconds)
        self._points: deque[HistoryPoint] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._points)

    def __iter__(self) -> Iterator[HistoryPoint]:
        return iter(self.points())

    def add(self, point: HistoryPoint) -> None:
        """Append ``point`` and forget the points older than ``seconds`` before it."""
        with self._lock:
            points = self._points
            if points and point.t < points[-1].t:
                # The wall clock stepped back (NTP): keep the series monotonic.
                points.clear()
            points.append(point)
            horizon = point.t - self.seconds
            while points and points[0].t < horizon:
                points.popleft()

    def points(self) -> list[HistoryPoint]:
        """Return a copy of the samples, oldest first."""
        with self._lock:
            return list(self._points)


def isoformat(epoch: float | None) -> str | None:
    """Return ``epoch`` as ISO 8601 UTC with milliseconds, or None."""
    if epoch is None:
        return None
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _finished(outcome: TaskOutcome) -> bool:
    return outcome.state.is_final and outcome.finished_at is not None


def window_stats(snapshot: RunSnapshot, now: float) -> tuple[float, float | None]:
    """Return (throughput per minute, mean latency in ms) over the recent window.

    See the module docstring for the window: the last 60 s, or the run's age
    (at least 1 s) while the run is younger.
    """
    window = THROUGHPUT_WINDOW
    if snapshot.started_at is not None:
        window = min(window, max(1.0, now - snapshot.started_at))
    since = now - window
    count = 0
    total = 0.0
    for outcome in snapshot.tasks.values():
        finished_at = outcome.finished_at
        if finished_at is None or not outcome.state.is_final or finished_at < since:
            continue
        count += 1
        duration = outcome.duration
        total += duration if duration is not None else 0.0
    throughput = count * 60.0 / window
    return throughput, (total / count * 1000.0 if count else None)


def mean_latency_ms(tasks: Iterable[TaskOutcome]) -> float | None:
    """Return the mean duration of the finished ``tasks`` in ms, or None if none finished."""
    count = 0
    total = 0.0
    for outcome in tasks:
        if not _finished(outcome):
            continue
        duration = outcome.duration
        if duration is None:
            continue
        count += 1
        total += duration
    return total / count * 1000.0 if count else None


def sample(snapshot: RunSnapshot, now: float) -> HistoryPoint:
    """Return the chart point for ``snapshot`` at ``now``."""
    throughput, recent = window_stats(snapshot, now)
    return HistoryPoint(
        t=now,
        throughput_per_minute=throughput,
        avg_latency_ms=mean_latency_ms(snapshot.tasks.values()),
        recent_latency_ms=recent,
        tasks_active=snapshot.tasks_active,
        tasks_finished=snapshot.tasks_finished,
    )


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    try:
        text = f"{type(error).__name__}: {error}"
    except Exception:  # a broken __str__ must not break the dashboard
        text = type(error).__name__
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def task_dict(outcome: TaskOutcome, now: float) -> dict[str, Any]:
    """Return the JSON form of one task; a running task's duration runs to ``now``."""
    duration = outcome.duration
    if duration is None and outcome.started_at is not None and not outcome.state.is_final:
        duration = max(0.0, now - outcome.started_at)
    return {
        "name": outcome.name,
        "state": outcome.state.value,
        "attempts": outcome.attempts,
        "duration_ms": _round(None if duration is None else duration * 1000.0),
        "criticality": str(outcome.criticality),
        "error": _error_text(outcome.error),
    }


#: What :func:`build_metrics_json` remembers of a final task between documents.
Memo = dict[int, tuple[TaskOutcome, dict[str, Any], list[list[Any]]]]


def _task_parts(
    i: int,
    outcome: TaskOutcome,
    snapshot: RunSnapshot,
    now: float,
    memo: Memo | None,
) -> tuple[dict[str, Any], list[list[Any]]]:
    final = memo is not None and outcome.state.is_final
    if final:
        assert memo is not None
        hit = memo.get(id(outcome))
        if hit is not None and hit[0] is outcome:
            return hit[1], hit[2]
    document = task_dict(outcome, now)
    rows = _attempts_of(i, outcome, snapshot.running_since, snapshot.started_at)
    if final:
        assert memo is not None
        memo[id(outcome)] = (outcome, document, rows)
    return document, rows


def build_metrics_json(
    snapshot: RunSnapshot,
    history: Iterable[HistoryPoint],
    now: float,
    memo: Memo | None = None,
) -> dict[str, Any]:
    """Return the ``/metrics`` document for ``snapshot`` (schema in :mod:`pipeopt.dashboard`).

    Args:
        snapshot: the source's state, from ``source.snapshot()``.
        history: the sampled chart points, oldest first.
        now: the current ``time.time()``; windows and running durations end here.
        memo: a dict kept between calls: the parts of final tasks are built once
            and reused while the snapshots share their outcome objects (the
            optimizer copies a final outcome once per run).
    """
    throughput, recent = window_stats(snapshot, now)
    counts = dict.fromkeys((state.value for state in TaskState), 0)
    for outcome in snapshot.tasks.values():
        counts[outcome.state.value] += 1
    started = snapshot.started_at
    ended = snapshot.ended_at
    tasks = list(snapshot.tasks.values())
    documents: list[dict[str, Any]] = []
    attempts: list[list[Any]] = []
    for i, outcome in enumerate(tasks):
        document, rows = _task_parts(i, outcome, snapshot, now, memo)
        documents.append(document)
        attempts.extend(rows)
    return {
        "schema": SCHEMA_VERSION,
        "source": "live",
        "run_id": snapshot.run_id,
        "pipeline": snapshot.pipeline,
        "status": None if snapshot.status is None else snapshot.status.value,
        "started_at": isoformat(started),
        "ended_at": isoformat(ended),
        "elapsed_s": elapsed_seconds(started, ended, now),
        "workers": snapshot.workers,
        "last_update": isoformat(snapshot.taken_at),
        "tasks_total": snapshot.tasks_total,
        "tasks_finished": snapshot.tasks_finished,
        "tasks_active": snapshot.tasks_active,
        "critical_backlog": snapshot.critical_backlog,
        "failures_total": snapshot.failures_total,
        "retries_total": snapshot.retries_total,
        "throughput_per_minute": round(throughput, 3),
        "avg_latency_ms": _round(mean_latency_ms(snapshot.tasks.values())),
        "recent_latency_ms": _round(recent),
        "counts": counts,
        "tasks": documents,
        "attempts": attempts,
        "critical_path": critical_path(
            None if snapshot.graph is None else snapshot.graph.dependencies,
            [_end_of(outcome, now) for outcome in tasks],
        ),
        "loads": load_rows(tasks, snapshot.batchers, snapshot.batch_sizes, now),
        "breakers": {
            name: {"value": int(value), "state": BREAKER_STATES.get(int(value), "unknown")}
            for name, value in snapshot.breakers.items()
        },
        "batch_sizes": {name: int(size) for name, size in snapshot.batch_sizes.items()},
        "history": [point.to_dict() for point in history],
    }


_HTML_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def encode_json(document: Mapping[str, Any]) -> bytes:
    """Return ``document`` as compact UTF-8 JSON with ``<``, ``>`` and ``&`` escaped.

    The escapes keep task names and error texts inert even if a browser were
    tricked into reading the JSON as HTML; ``json.loads`` gives the same data.

    Raises:
        ValueError: a value is NaN or infinite (not valid JSON).
    """
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.translate(_HTML_SAFE).encode("utf-8")


# -- the run page: timeline, critical path, loads and task details -----------------


def elapsed_seconds(started: float | None, ended: float | None, now: float) -> float | None:
    """Return the run's age at ``now``, frozen at ``ended`` once the run is over."""
    if started is None:
        return None
    end = now if ended is None else ended
    return round(max(0.0, end - started), 3)


def _end_of(outcome: TaskOutcome, now: float) -> float | None:
    if outcome.finished_at is not None and outcome.started_at is not None:
        return outcome.finished_at
    if outcome.state in (TaskState.RUNNING, TaskState.RETRYING):
        return now
    return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def attempt_outcome(record: AttemptRecord, last: bool, state: TaskState) -> str:
    """Return how an attempt ended: succeeded, failed, or retried (failed, then tried again)."""
    if record.error is None:
        return "succeeded"
    if not last or state in (TaskState.RETRYING, TaskState.RUNNING, TaskState.READY):
        return "retried"
    return "failed"


def attempt_rows(
    tasks: list[TaskOutcome], running_since: Mapping[str, float], origin: float | None
) -> list[list[Any]]:
    """Return one compact row per attempt, for the timeline.

    Each row is ``[task index, attempt number, start ms, duration ms, outcome]``
    with times relative to ``origin`` (the run's start); a running attempt
    has a null duration and outcome ``running``.
    """
    rows: list[list[Any]] = []
    for i, outcome in enumerate(tasks):
        rows.extend(_attempts_of(i, outcome, running_since, origin))
    return rows


def _attempts_of(
    i: int, outcome: TaskOutcome, running_since: Mapping[str, float], origin: float | None
) -> list[list[Any]]:
    if origin is None:
        return []
    history = outcome.attempt_history
    last = len(history) - 1
    rows = [
        [
            i,
            record.number,
            _ms(record.started_at - origin),
            _ms(record.duration),
            attempt_outcome(record, k == last, outcome.state),
        ]
        for k, record in enumerate(history)
    ]
    since = running_since.get(outcome.name)
    if since is not None:
        rows.append([i, outcome.attempts, _ms(since - origin), None, "running"])
    return rows


def critical_path(
    dependencies: Sequence[Sequence[int]] | None, ends: Sequence[float | None]
) -> list[int]:
    """Return the chain of tasks that decided when the run ended, first task first.

    It starts at the task that ended last and steps, each time, to the
    dependency that ended last (the one the task waited for), until a task
    without dependencies that ran. ``ends[i]`` is when task ``i`` ended (or
    now for a running one), None when it never ran.
    """
    if dependencies is None:
        return []
    if len(dependencies) < len(ends):
        # Tasks added while running (mapped items) are not in the graph: no known dependencies.
        dependencies = [*dependencies, *([()] * (len(ends) - len(dependencies)))]
    current = max(
        (i for i, end in enumerate(ends) if end is not None),
        key=lambda i: (ends[i], -i),
        default=None,
    )
    path: list[int] = []
    seen: set[int] = set()
    while current is not None and current not in seen:
        path.append(current)
        seen.add(current)
        ran = [d for d in dependencies[current] if ends[d] is not None]
        current = max(ran, key=lambda d: (ends[d], -d), default=None)
    path.reverse()
    return path


def load_rows(
    tasks: list[TaskOutcome],
    batchers: Mapping[str, BatcherStatistics],
    batch_sizes: Mapping[str, int],
    now: float,
) -> list[dict[str, Any]]:
    """Return the loads panel: one row per task that wrote batches.

    Rows written and dead-lettered come from the task's ``rows_written`` and
    ``rows_dead_lettered`` custom metrics (set by ``context.write_batches``),
    else from the rows its batcher saw; rows/s divide them by the task's
    time so far. The model is the batcher's fit: a fixed cost per batch
    and a cost per row.
    """
    rows: list[dict[str, Any]] = []
    for outcome in tasks:
        stats = batchers.get(outcome.name)
        custom = outcome_metrics(outcome)
        if stats is None and "rows_written" not in custom:
            continue
        written = custom.get("rows_written")
        if written is None and stats is not None:
            written = float(stats.rows)
        end = outcome.finished_at if outcome.finished_at is not None else now
        seconds = None if outcome.started_at is None else end - outcome.started_at
        rate = written / seconds if written is not None and seconds else None
        row: dict[str, Any] = {
            "task": outcome.name,
            "state": outcome.state.value,
            "rows_written": written,
            "rows_dead_lettered": custom.get("rows_dead_lettered"),
            "rows_per_s": _round(rate, 1),
            "batch_size": batch_sizes.get(outcome.name),
        }
        if stats is not None:
            row["batch_size"] = stats.current_size
            row.update(
                batches=stats.batches,
                batches_over_slo=stats.batches_over_slo,
                target_latency_ms=_round(
                    None if stats.target_latency is None else stats.target_latency * 1000.0
                ),
                fixed_cost_ms=_round(None if stats.intercept is None else stats.intercept * 1e3),
                per_row_us=_round(None if stats.slope is None else stats.slope * 1e6),
                sink_rows_per_s=_round(stats.throughput, 1),
                last_decision=stats.last_decision,
            )
        rows.append(row)
    return rows


def clip_traceback(text: str | None) -> str | None:
    """Return ``text`` with at most :data:`MAX_TRACEBACK_CHARS`, keeping its end."""
    if text is None or len(text) <= MAX_TRACEBACK_CHARS:
        return text
    return "…" + text[-(MAX_TRACEBACK_CHARS - 1) :]


def log_lines(records: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Return the last :data:`MAX_LOG_LINES` of a task's captured log records as JSON.

    Takes ``logging.LogRecord`` objects, or any record with ``created`` /
    ``time``, ``levelname`` / ``level`` and ``getMessage()`` / ``message``.
    """
    if not records:
        return []
    lines: list[dict[str, Any]] = []
    for record in list(records)[-MAX_LOG_LINES:]:
        if isinstance(record, str):
            lines.append({"t": None, "level": None, "message": record})
            continue
        when = getattr(record, "created", None)
        if when is None:
            when = getattr(record, "time", None)
        level = getattr(record, "levelname", None) or getattr(record, "level", None)
        get_message = getattr(record, "getMessage", None)
        try:
            message = get_message() if callable(get_message) else getattr(record, "message", "")
        except Exception:  # a record whose arguments do not format
            message = str(getattr(record, "msg", ""))
        lines.append(
            {
                "t": isoformat(when) if isinstance(when, int | float) else None,
                "level": None if level is None else str(level),
                "message": str(message),
            }
        )
    return lines


def task_detail(snapshot: RunSnapshot, name: str, now: float) -> dict[str, Any] | None:
    """Return everything the run page shows when task ``name`` is opened, or None if unknown.

    Keys: those of a ``tasks`` entry, plus ``declared_criticality``,
    ``group``, ``description``, ``dependencies`` and ``dependents`` (names),
    ``started_at``, ``traceback``, ``attempts_detail`` (number, start,
    duration, outcome, error, traceback), ``custom_metrics``, ``logs`` and
    ``load`` (its loads row, or null).
    """
    outcome = snapshot.tasks.get(name)
    if outcome is None:
        return None
    document = task_dict(outcome, now)
    graph = snapshot.graph
    index = None if graph is None else graph.names.index(name) if name in graph.names else None
    dependencies: list[str] = []
    dependents: list[str] = []
    if graph is not None and index is not None:
        dependencies = [graph.names[d] for d in graph.dependencies[index]]
        dependents = [graph.names[j] for j, deps in enumerate(graph.dependencies) if index in deps]
    history = outcome.attempt_history
    attempts = [
        {
            "number": record.number,
            "started_at": isoformat(record.started_at),
            "duration_ms": _ms(record.duration),
            "outcome": attempt_outcome(record, k == len(history) - 1, outcome.state),
            "error": _error_text(record.error),
            "traceback": clip_traceback(record.traceback),
        }
        for k, record in enumerate(history)
    ]
    since = snapshot.running_since.get(name)
    if since is not None:
        attempts.append(
            {
                "number": outcome.attempts,
                "started_at": isoformat(since),
                "duration_ms": _ms(max(0.0, now - since)),
                "outcome": "running",
                "error": None,
                "traceback": None,
            }
        )
    loads = load_rows([outcome], snapshot.batchers, snapshot.batch_sizes, now)
    document.update(
        declared_criticality=None if graph is None or index is None else graph.declared[index],
        group=None if graph is None or index is None else graph.groups[index],
        description=None if graph is None or index is None else graph.descriptions[index],
        dependencies=dependencies,
        dependents=dependents,
        started_at=isoformat(outcome.started_at),
        traceback=clip_traceback(outcome.traceback),
        attempts_detail=attempts,
        custom_metrics=dict(outcome.custom_metrics),
        logs=log_lines(getattr(outcome, "logs", None)),
        load=loads[0] if loads else None,
    )
    return document
