"""Live dashboard and run store UI: the run page, its JSON, and Prometheus metrics over HTTP.

:class:`PipelineDashboard` serves, for any source with ``snapshot()`` and
``registry`` (a :class:`~pipeopt.PipelineOptimizer`):

==================== =====================================================
route                content
==================== =====================================================
``/``                the run page (refreshes itself from ``/api/run``)
``/metrics``         the JSON document below (``/api/run`` is the same)
``/api/run/task``    ``?name=<task>``: one task's details
``/prometheus``      ``generate_latest(registry)``; OpenMetrics when
                     ``Accept`` asks for ``application/openmetrics-text``
``/healthz``         ``{"status": "ok"}`` (needs no token)
``/static/*``        the page's scripts, style sheet and icon
==================== =====================================================

:class:`RunStoreUI` (``pipeopt ui``) serves the same run page for any run of a
run store, from the same document built from the store
(:mod:`pipeopt.dashboard.ui`). Both need the ``dashboard`` extra
(``pip install 'pipeopt[dashboard]'``).

``/metrics`` schema (version 2; times are ISO 8601 UTC strings, durations ms)::

    {
      "schema": 2,
      "source": "live" | "store",
      "run_id": str | null,            # null before the first run
      "pipeline": str | null,
      "status": "running" | "succeeded" | "failed" | "cancelled" | "crashed" | null,
      "started_at": str | null,
      "ended_at": str | null,          # set once the run is over
      "elapsed_s": float | null,       # run start to now, frozen at the run's end
      "workers": int | null,
      "last_update": str,              # when the snapshot was taken
      "refresh_interval": float,       # seconds between page refreshes
      "tasks_total": int,
      "tasks_finished": int,           # tasks in a final state, skipped ones included
      "tasks_active": int,             # attempts running now
      "critical_backlog": int,         # ready blocker/critical tasks waiting
      "failures_total": int,
      "retries_total": int,
      "throughput_per_minute": float,  # finished in the last 60 s (scaled if younger)
      "avg_latency_ms": float | null,  # mean duration of every finished task
      "recent_latency_ms": float | null,  # the same over the throughput window
      "counts": {state: int},          # every TaskState value, zeros included
      "tasks": [                       # in pipeline order; index i = task i below
        {"name": str, "state": str, "attempts": int,
         "duration_ms": float | null,  # a running task's runs to now
         "criticality": str,           # effective (inherited) criticality
         "error": str | null}          # "Type: message", at most 2000 chars
      ],
      "attempts": [                    # the timeline: one row per attempt
        [task_index, attempt, start_ms, duration_ms | null, outcome]
      ],                               # ms since the run's start; outcome one of
                                       # succeeded, failed, retried, running
      "critical_path": [task_index],   # the chain that decided the end, first first
      "loads": [                       # tasks that wrote batches
        {"task", "state", "rows_written", "rows_dead_lettered", "rows_per_s",
         "batch_size", "batches", "batches_over_slo", "target_latency_ms",
         "fixed_cost_ms", "per_row_us", "sink_rows_per_s", "last_decision"}
      ],
      "breakers": {name: {"value": 0 | 1 | 2, "state": "closed" | "half-open" | "open"}},
      "batch_sizes": {task: int},
      "history": [                     # one point per refresh_interval, oldest first
        {"t": float,                   # epoch seconds
         "throughput_per_minute": float, "avg_latency_ms": float | null,
         "recent_latency_ms": float | null, "tasks_active": int, "tasks_finished": int}
      ]
    }

A task's details (``/api/run/task?name=``) add to its ``tasks`` entry:
``declared_criticality``, ``group``, ``description``, ``dependencies``,
``dependents``, ``started_at``, ``traceback``, ``attempts_detail`` (number,
started_at, duration_ms, outcome, error, traceback), ``custom_metrics``,
``logs`` (``{t, level, message}``, the last 200 captured lines) and ``load``.

Task states: ``pending``, ``ready``, ``running``, ``retrying``, ``succeeded``,
``failed``, ``skipped``, ``cancelled``, ``cached``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeopt.dashboard.model import (
    SCHEMA_VERSION,
    History,
    HistoryPoint,
    build_metrics_json,
    encode_json,
    sample,
)

if TYPE_CHECKING:
    from pipeopt.dashboard.app import (
        CONTENT_SECURITY_POLICY,
        MetricsSource,
        PipelineDashboard,
        generate_token,
        is_loopback,
    )
    from pipeopt.dashboard.ui import RunStoreUI

_APP_NAMES = frozenset(
    {
        "CONTENT_SECURITY_POLICY",
        "MetricsSource",
        "PipelineDashboard",
        "RunStoreUI",
        "generate_token",
        "is_loopback",
    }
)

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "SCHEMA_VERSION",
    "History",
    "HistoryPoint",
    "MetricsSource",
    "PipelineDashboard",
    "RunStoreUI",
    "build_metrics_json",
    "encode_json",
    "generate_token",
    "is_loopback",
    "sample",
]


def __getattr__(name: str) -> Any:
    # The web layer needs aiohttp, an optional extra: import it on first use only.
    if name not in _APP_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        from pipeopt.dashboard import app, ui
    except ImportError as exc:
        if exc.name != "aiohttp":
            raise
        raise ImportError(
            "the pipeopt dashboard needs aiohttp; install it with: pip install 'pipeopt[dashboard]'"
        ) from exc
    return getattr(ui if name == "RunStoreUI" else app, name)
