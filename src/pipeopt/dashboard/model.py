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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeopt.result import RunSnapshot, TaskOutcome, TaskState

#: Version of the ``/metrics`` document; bumped on incompatible changes.
SCHEMA_VERSION = 1

#: Seconds of finished work that ``throughput_per_minute`` looks back over.
THROUGHPUT_WINDOW = 60.0

#: Longest error text sent per task; the full error stays in the run result.
MAX_ERROR_CHARS = 2000

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


def build_metrics_json(
    snapshot: RunSnapshot, history: Iterable[HistoryPoint], now: float
) -> dict[str, Any]:
    """Return the ``/metrics`` document for ``snapshot`` (schema in :mod:`pipeopt.dashboard`).

    Args:
        snapshot: the source's state, from ``source.snapshot()``.
        history: the sampled chart points, oldest first.
        now: the current ``time.time()``; windows and running durations end here.
    """
    throughput, recent = window_stats(snapshot, now)
    counts = dict.fromkeys((state.value for state in TaskState), 0)
    for outcome in snapshot.tasks.values():
        counts[outcome.state.value] += 1
    started = snapshot.started_at
    return {
        "schema": SCHEMA_VERSION,
        "run_id": snapshot.run_id,
        "pipeline": snapshot.pipeline,
        "status": None if snapshot.status is None else snapshot.status.value,
        "started_at": isoformat(started),
        "elapsed_s": None if started is None else round(max(0.0, now - started), 3),
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
        "tasks": [task_dict(outcome, now) for outcome in snapshot.tasks.values()],
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
