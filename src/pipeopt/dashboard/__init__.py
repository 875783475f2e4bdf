"""Live dashboard: an HTML page, a JSON feed and Prometheus metrics over HTTP.

:class:`PipelineDashboard` serves, for any source with ``snapshot()`` and
``registry`` (a :class:`~pipeopt.PipelineOptimizer`):

============== ===========================================================
route          content
============== ===========================================================
``/``          the live page (refreshes itself from ``/metrics``)
``/metrics``   the JSON document below
``/prometheus`` ``generate_latest(registry)``; OpenMetrics when ``Accept``
               asks for ``application/openmetrics-text``
``/healthz``   ``{"status": "ok"}`` (needs no token)
``/static/*``  the page's script, style sheet and icon
============== ===========================================================

It needs the ``dashboard`` extra (``pip install 'pipeopt[dashboard]'``).

``/metrics`` schema (version 1; times are ISO 8601 UTC strings, durations ms)::

    {
      "schema": 1,
      "run_id": str | null,            # null before the first run
      "pipeline": str | null,
      "status": "running" | "succeeded" | "failed" | "cancelled" | null,
      "started_at": str | null,
      "elapsed_s": float | null,       # seconds since the run started
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
      "tasks": [                       # in pipeline order
        {"name": str, "state": str, "attempts": int,
         "duration_ms": float | null,  # a running task's runs to now
         "criticality": str,
         "error": str | null}          # "Type: message", at most 2000 chars
      ],
      "breakers": {name: {"value": 0 | 1 | 2, "state": "closed" | "half-open" | "open"}},
      "batch_sizes": {task: int},
      "history": [                     # one point per refresh_interval, oldest first
        {"t": float,                   # epoch seconds
         "throughput_per_minute": float, "avg_latency_ms": float | null,
         "recent_latency_ms": float | null, "tasks_active": int, "tasks_finished": int}
      ]
    }

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

_APP_NAMES = frozenset(
    {
        "CONTENT_SECURITY_POLICY",
        "MetricsSource",
        "PipelineDashboard",
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
        from pipeopt.dashboard import app
    except ImportError as exc:
        if exc.name != "aiohttp":
            raise
        raise ImportError(
            "the pipeopt dashboard needs aiohttp; install it with: pip install 'pipeopt[dashboard]'"
        ) from exc
    return getattr(app, name)
