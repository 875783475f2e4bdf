"""The run page's documents for runs read back from the run store, purely.

:func:`build_stored_json` returns the same document as
:func:`~pipeopt.dashboard.model.build_metrics_json` (the ``/metrics`` schema)
for a :class:`~pipeopt.store.RunDetail`, so ``pipeopt ui`` and a live
dashboard show one page. What a store does not keep is reported empty, not
invented: no chart history, breakers or batch sizes; ``tasks_active`` and
``critical_backlog`` are 0; a crashed run's clock stops at its last recorded
attempt. ``source`` is ``"store"``; ``status`` may also be ``"crashed"``.

Nothing here does I/O or reads a clock: callers pass the records and ``now``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pipeopt.dashboard.model import (
    MAX_ERROR_CHARS,
    SCHEMA_VERSION,
    clip_traceback,
    critical_path,
    elapsed_seconds,
    isoformat,
    log_lines,
)
from pipeopt.result import TaskState

if TYPE_CHECKING:
    from pipeopt.store import AttemptSummary, RunDetail, RunSummary, TaskSummary

_FINAL = frozenset(state.value for state in TaskState if state.is_final)


def _error_text(error_type: str | None, message: str | None) -> str | None:
    if error_type is None and message is None:
        return None
    text = f"{error_type or 'Error'}: {message or ''}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _attempt_outcome(attempt: AttemptSummary, last: bool) -> str:
    if attempt.state == "retrying" or (attempt.error_type is not None and not last):
        return "retried"
    if attempt.error_type is not None or attempt.state == "failed":
        return "failed"
    return "succeeded"


def _timed(task: TaskSummary) -> list[AttemptSummary]:
    return [
        a
        for a in task.history
        if a.number > 0 and a.started_at is not None and a.duration is not None
    ]


def _task_document(task: TaskSummary) -> dict[str, Any]:
    return {
        "name": task.name,
        "state": task.state,
        "attempts": task.attempts,
        "duration_ms": None if task.duration is None else round(task.duration * 1e3, 3),
        "criticality": task.criticality,
        "error": _error_text(task.error_type, task.error),
    }


def _end(task: TaskSummary) -> float | None:
    if task.started_at is None or task.duration is None:
        return None
    return task.started_at + task.duration


def _run_end(detail: RunDetail, now: float) -> float | None:
    summary = detail.summary
    if summary.ended_at is not None:
        return summary.ended_at
    if summary.status == "running":
        return None
    # Crashed: the clock stops at the last thing the run recorded.
    ends = [end for end in (_end(t) for t in detail.tasks) if end is not None]
    return max(ends, default=summary.started_at)


def _dependencies(detail: RunDetail) -> list[tuple[int, ...]]:
    names = {task.name: i for i, task in enumerate(detail.tasks)}
    return [tuple(names[d] for d in task.dependencies if d in names) for task in detail.tasks]


def build_stored_json(detail: RunDetail, now: float) -> dict[str, Any]:
    """Return the run page's document for a stored run (the ``/metrics`` schema)."""
    summary = detail.summary
    tasks = detail.tasks
    origin = summary.started_at
    ended = _run_end(detail, now)
    counts = dict.fromkeys((state.value for state in TaskState), 0)
    rows: list[list[Any]] = []
    documents: list[dict[str, Any]] = []
    durations: list[float] = []
    retries = 0
    for i, task in enumerate(tasks):
        counts[task.state] = counts.get(task.state, 0) + 1
        timed = _timed(task)
        for k, attempt in enumerate(timed):
            outcome = _attempt_outcome(attempt, k == len(timed) - 1)
            retries += outcome == "retried"
            rows.append(
                [
                    i,
                    attempt.number,
                    round(((attempt.started_at or origin) - origin) * 1000.0, 1),
                    round((attempt.duration or 0.0) * 1000.0, 1),
                    outcome,
                ]
            )
        if task.state in _FINAL and task.duration is not None:
            durations.append(task.duration)
        documents.append(_task_document(task))
    finished = sum(1 for task in tasks if task.state in _FINAL)
    elapsed = elapsed_seconds(origin, ended, now)
    ends = [_end(task) for task in tasks]
    return {
        "schema": SCHEMA_VERSION,
        "source": "store",
        "run_id": summary.run_id,
        "pipeline": summary.pipeline,
        "status": summary.status,
        "started_at": isoformat(origin),
        "ended_at": isoformat(ended),
        "elapsed_s": elapsed,
        "workers": summary.workers,
        "last_update": isoformat(now),
        "tasks_total": summary.tasks,
        "tasks_finished": finished,
        "tasks_active": 0,
        "critical_backlog": 0,
        "failures_total": counts.get("failed", 0),
        "retries_total": retries,
        "throughput_per_minute": round(len(durations) * 60.0 / elapsed, 3) if elapsed else 0.0,
        "avg_latency_ms": round(sum(durations) / len(durations) * 1e3, 3) if durations else None,
        "recent_latency_ms": None,
        "counts": counts,
        "tasks": documents,
        "attempts": rows,
        "critical_path": critical_path(_dependencies(detail), ends),
        "loads": [],
        "breakers": {},
        "batch_sizes": {},
        "history": [],
        "executor": summary.executor,
        "resumed_from": summary.resumed_from,
        "source_file": summary.source,
    }


def stored_task_detail(detail: RunDetail, name: str) -> dict[str, Any] | None:
    """Return a stored task's details (the live details' keys), or None if the run has none."""
    index = next((i for i, task in enumerate(detail.tasks) if task.name == name), None)
    if index is None:
        return None
    task = detail.tasks[index]
    dependents = [t.name for t in detail.tasks if name in t.dependencies]
    timed = [a for a in task.history if a.number > 0]
    attempts = [
        {
            "number": a.number,
            "started_at": isoformat(a.started_at),
            "duration_ms": None if a.duration is None else round(a.duration * 1e3, 1),
            "outcome": _attempt_outcome(a, k == len(timed) - 1),
            "error": _error_text(a.error_type, a.error),
            "traceback": clip_traceback(a.traceback),
        }
        for k, a in enumerate(timed)
    ]
    return {
        **_task_document(task),
        "declared_criticality": task.declared_criticality,
        "group": getattr(task, "group", None),
        "description": task.note or "",
        "dependencies": list(task.dependencies),
        "dependents": dependents,
        "started_at": isoformat(task.started_at),
        "traceback": clip_traceback(task.traceback),
        "attempts_detail": attempts,
        "custom_metrics": dict(getattr(task, "custom_metrics", None) or {}),
        "logs": log_lines(getattr(task, "logs", None)),
        "load": None,
    }


def runs_list_json(runs: Iterable[RunSummary], now: float) -> dict[str, Any]:
    """Return the runs list document: ``{"schema", "last_update", "runs": [...]}``.

    Each run: ``run_id``, ``pipeline``, ``status`` (a run status, ``running``
    or ``crashed``), ``started_at``, ``ended_at``, ``duration_s``, ``tasks``,
    ``counts`` (succeeded, failed, skipped, cancelled, cached), ``executor``,
    ``workers``, ``resumed_from``, ``source`` and ``parameters`` (the run's
    parameters where the store records them, else null).
    """
    documents: list[dict[str, Any]] = []
    for run in runs:
        params = getattr(run, "params", None)
        documents.append(
            {
                "run_id": run.run_id,
                "pipeline": run.pipeline,
                "status": run.status,
                "started_at": isoformat(run.started_at),
                "ended_at": isoformat(run.ended_at),
                "duration_s": None if run.duration is None else round(run.duration, 3),
                "tasks": run.tasks,
                "counts": {
                    "succeeded": run.succeeded,
                    "failed": run.failed,
                    "skipped": run.skipped,
                    "cancelled": run.cancelled,
                    "cached": run.cached,
                },
                "executor": run.executor,
                "workers": run.workers,
                "resumed_from": run.resumed_from,
                "source": run.source,
                "parameters": None if params is None else dict(params),
            }
        )
    return {"schema": SCHEMA_VERSION, "last_update": isoformat(now), "runs": documents}


__all__: Sequence[str] = ["build_stored_json", "runs_list_json", "stored_task_detail"]
