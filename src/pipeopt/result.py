"""Run outcomes: task states, per-task outcomes, the run result and live snapshots.

These are plain records. The scheduler fills them; the CLI, the dashboard,
the run store and callers read them. Times are ``time.time()`` epochs for
wall-clock instants and seconds (``float``) for durations.
"""

from __future__ import annotations

import collections
import enum
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pipeopt.batching import BatcherStatistics


class TaskState(enum.StrEnum):
    """Where a task is in its life; the last five are final."""

    PENDING = "pending"  # waiting for dependencies
    READY = "ready"  # dependencies met, waiting for a worker
    RUNNING = "running"
    RETRYING = "retrying"  # parked until its next attempt (backoff or an open breaker)
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # an upstream task failed
    CANCELLED = "cancelled"  # fail_fast or an interrupt stopped it before it finished
    CACHED = "cached"  # result reused from the run store

    @property
    def is_final(self) -> bool:
        """Return whether the task will not change state again in this run."""
        return self in _FINAL_STATES


# Guards the first use of an outcome's lazily made containers (rare, so one lock for all).
_FIRST_USE = threading.Lock()

_FINAL_STATES = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.SKIPPED,
        TaskState.CANCELLED,
        TaskState.CACHED,
    }
)


class RunStatus(enum.StrEnum):
    """How a run ended."""

    SUCCEEDED = "succeeded"  # every task succeeded (or was cached)
    FAILED = "failed"  # some task failed; independent branches still ran to the end
    CANCELLED = "cancelled"  # fail_fast or an interrupt cancelled work that had not started
    RUNNING = "running"  # only seen in snapshots of a run in progress


@dataclass(frozen=True, slots=True)
class Missing:
    """Stands in for the result of an upstream task that did not succeed.

    A task whose ``trigger`` is ``"all_done"`` or ``"any_success"`` receives
    it in place of each such upstream result (for a mapped upstream, in
    place of each item that did not succeed). It is falsy, so
    ``[r for r in results if r]`` keeps only real results.

    Attributes:
        task: the upstream task (or item) that did not succeed.
        state: its final state: ``failed``, ``skipped`` or ``cancelled``.
        error: the exception it ended with, if any.
    """

    task: str
    state: TaskState
    error: BaseException | None = None

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        why = f", {type(self.error).__name__}: {self.error}" if self.error is not None else ""
        return f"Missing({self.task!r}, {self.state.value}{why})"


class AttemptRecord(NamedTuple):
    """One attempt of a task: its number (1-based), start, duration and error.

    A named tuple: the run loop builds one per attempt under the scheduler's
    lock, and a frozen dataclass costs three times as much to build.
    """

    number: int
    started_at: float
    duration: float
    error: BaseException | None = None
    traceback: str | None = None


class TaskOutcome:
    """Everything known about one task of a run.

    ``duration`` covers the first attempt's start to the last attempt's end,
    backoff included; each attempt's own timing is in ``attempt_history``.
    ``error`` is the exception of the final attempt, kept whole (type, args,
    ``__cause__`` and traceback); ``traceback`` is its formatted text.
    ``criticality`` is the effective label the task ran with (inherited from
    the tasks waiting on it); ``declared_criticality`` is the label written
    on the task. ``logs`` holds the log records its attempts emitted,
    formatted, at most a bounded number per task (a last line says how many
    were left out).

    Compares, prints and pickles like a dataclass of these fields. A run
    holds one per task, so ``attempt_history``, ``custom_metrics`` and
    ``logs`` are made on first use, and a task that succeeded at its first
    attempt keeps only that attempt's duration until its history is asked for.
    """

    __slots__ = (
        "_finished",
        "_history",
        "_logs",
        "_metrics",
        "attempts",
        "criticality",
        "declared_criticality",
        "error",
        "name",
        "started_at",
        "state",
        "traceback",
    )
    __match_args__ = (
        "name",
        "criticality",
        "declared_criticality",
        "state",
        "attempts",
        "started_at",
        "finished_at",
        "error",
        "traceback",
        "attempt_history",
        "custom_metrics",
        "logs",
    )

    name: str
    criticality: str
    declared_criticality: str | None
    state: TaskState
    attempts: int
    started_at: float | None
    error: BaseException | None
    traceback: str | None
    # None (no attempt recorded yet), the history list, or, for a task whose
    # first attempt succeeded, that attempt's duration alone.
    _history: list[AttemptRecord] | float | None
    _finished: float | None
    _metrics: dict[str, float] | None
    _logs: list[str] | None

    def __init__(  # noqa: PLR0917 - positional, as the dataclass it replaces took them
        self,
        name: str,
        criticality: str,
        declared_criticality: str | None = None,
        state: TaskState = TaskState.PENDING,
        attempts: int = 0,
        started_at: float | None = None,
        finished_at: float | None = None,
        error: BaseException | None = None,
        traceback: str | None = None,
        attempt_history: list[AttemptRecord] | None = None,
        custom_metrics: dict[str, float] | None = None,
        logs: list[str] | None = None,
    ) -> None:
        self.name = name
        self.criticality = criticality
        self.declared_criticality = declared_criticality
        self.state = state
        self.attempts = attempts
        self.started_at = started_at
        self._finished = finished_at
        self.error = error
        self.traceback = traceback
        self._history = attempt_history
        self._metrics = custom_metrics
        self._logs = logs

    @property
    def finished_at(self) -> float | None:
        """Return when the last attempt ended (an epoch), or None if the task has not."""
        finished = self._finished
        if finished is None:
            history = self._history
            if isinstance(history, int | float):
                return self.started_at + history  # type: ignore[operator]
        return finished

    @finished_at.setter
    def finished_at(self, value: float | None) -> None:
        if value is None:
            self._own_history()
        self._finished = value

    @property
    def attempt_history(self) -> list[AttemptRecord]:
        """Return the record of each attempt, in order."""
        history = self._history
        if history is None or isinstance(history, int | float):
            return self._own_history()
        return history

    @attempt_history.setter
    def attempt_history(self, value: list[AttemptRecord]) -> None:
        self._history = value

    @property
    def custom_metrics(self) -> dict[str, float]:
        """Return the custom metrics its body recorded, by name."""
        metrics = self._metrics
        if metrics is None:
            with _FIRST_USE:  # a body's own threads may record at once: one dict for all
                metrics = self._metrics
                if metrics is None:
                    metrics = self._metrics = {}
        return metrics

    @custom_metrics.setter
    def custom_metrics(self, value: dict[str, float]) -> None:
        self._metrics = value

    @property
    def logs(self) -> list[str]:
        """Return the log records its attempts emitted, formatted."""
        logs = self._logs
        if logs is None:
            with _FIRST_USE:
                logs = self._logs
                if logs is None:
                    logs = self._logs = []
        return logs

    @logs.setter
    def logs(self, value: list[str]) -> None:
        self._logs = value

    def _own_history(self) -> list[AttemptRecord]:
        with _FIRST_USE:
            return self._make_history()

    def _make_history(self) -> list[AttemptRecord]:
        history = self._history
        if history is None:
            made: list[AttemptRecord] = []
        elif isinstance(history, int | float):
            finished = self.finished_at
            made = [AttemptRecord(1, self.started_at, history)]  # type: ignore[arg-type]
            self._finished = finished
        else:
            return history
        self._history = made
        return made

    @property
    def duration(self) -> float | None:
        """Return seconds from the first start to the end, or None if it never ran."""
        finished = self.finished_at
        if self.started_at is None or finished is None:
            return None
        return finished - self.started_at

    def _values(self) -> tuple[Any, ...]:
        # Read without making the containers this outcome does not have yet.
        history = self._history
        if history is None:
            history = []
        elif isinstance(history, int | float):
            history = [AttemptRecord(1, self.started_at, history)]  # type: ignore[arg-type]
        return (
            self.name,
            self.criticality,
            self.declared_criticality,
            self.state,
            self.attempts,
            self.started_at,
            self.finished_at,
            self.error,
            self.traceback,
            history,
            {} if self._metrics is None else self._metrics,
            [] if self._logs is None else self._logs,
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{field}={value!r}"
            for field, value in zip(self.__match_args__, self._values(), strict=True)
        )
        return f"{type(self).__qualname__}({shown})"

    def __getstate__(self) -> list[Any]:
        return list(self._values())

    def __setstate__(self, state: list[Any]) -> None:
        self.__init__(*state)  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of this outcome (errors as type and message)."""
        return {
            "name": self.name,
            "criticality": self.criticality,
            "declared_criticality": self.declared_criticality or self.criticality,
            "state": self.state.value,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "duration_s": self.duration,
            "error_type": type(self.error).__name__ if self.error is not None else None,
            "error": str(self.error) if self.error is not None else None,
            "custom_metrics": dict(self._metrics or ()),
            "logs": list(self._logs or ()),
        }


def copy_outcome(outcome: TaskOutcome) -> TaskOutcome:
    """Return a copy of ``outcome`` with containers of its own, made only where it has them."""
    copied = TaskOutcome.__new__(TaskOutcome)
    copied.name = outcome.name
    copied.criticality = outcome.criticality
    copied.declared_criticality = outcome.declared_criticality
    copied.state = outcome.state
    copied.attempts = outcome.attempts
    copied.started_at = outcome.started_at
    copied._finished = outcome._finished
    copied.error = outcome.error
    copied.traceback = outcome.traceback
    history, metrics, logs = outcome._history, outcome._metrics, outcome._logs
    copied._history = list(history) if isinstance(history, list) else history
    copied._metrics = dict(metrics) if metrics else None
    copied._logs = list(logs) if logs else None
    return copied


def outcome_metrics(outcome: TaskOutcome) -> Mapping[str, float]:
    """Return the outcome's custom metrics without making a dict for an outcome that has none."""
    metrics = outcome._metrics
    return _NO_METRICS if metrics is None else metrics


def outcome_logs(outcome: TaskOutcome) -> Sequence[str]:
    """Return the outcome's log lines without making a list for an outcome that has none."""
    logs = outcome._logs
    return () if logs is None else logs


_NO_METRICS: Mapping[str, float] = types.MappingProxyType({})


@dataclass(slots=True)
class RunResult:
    """The result of :meth:`PipelineOptimizer.run`.

    ``results`` maps each succeeded task to its return value; ``tasks`` maps
    every task, whatever happened to it, to its :class:`TaskOutcome`.
    """

    run_id: str
    pipeline: str
    status: RunStatus
    tasks: dict[str, TaskOutcome]
    results: dict[str, Any]
    started_at: float
    wall_time: float
    interrupted: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Return whether every task succeeded."""
        return self.status is RunStatus.SUCCEEDED

    def counts(self) -> dict[str, int]:
        """Return how many tasks ended in each state (every state listed)."""
        by_state = collections.Counter(outcome.state for outcome in self.tasks.values())
        return {state.value: by_state[state] for state in TaskState}

    @property
    def failed(self) -> dict[str, TaskOutcome]:
        """Return the outcomes of the tasks that failed."""
        return {n: o for n, o in self.tasks.items() if o.state is TaskState.FAILED}

    def raise_for_status(self) -> None:
        """Raise the error of the first failed task, if any task failed.

        Raises:
            BaseException: the failed task's own exception, kept whole.
            RuntimeError: the run was cancelled without a task error.
        """
        for outcome in self.tasks.values():
            if outcome.state is TaskState.FAILED and outcome.error is not None:
                raise outcome.error
        if self.status is RunStatus.CANCELLED:
            raise RuntimeError(f"run {self.run_id} of {self.pipeline!r} was cancelled")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict of the run (without task results)."""
        return {
            "run_id": self.run_id,
            "pipeline": self.pipeline,
            "status": self.status.value,
            "started_at": self.started_at,
            "wall_time_s": self.wall_time,
            "interrupted": self.interrupted,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
            "counts": self.counts(),
            "tasks": {name: o.to_dict() for name, o in self.tasks.items()},
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    isoformat = getattr(value, "isoformat", None)
    return isoformat() if callable(isoformat) else str(value)


@dataclass(frozen=True, slots=True)
class RunGraph:
    """The static shape of a run's pipeline, for displays (index ``i`` = task ``i``).

    ``dependencies[i]`` lists the indices task ``i`` waits on; ``declared[i]``
    is its own criticality label (the effective one is on its outcome);
    ``groups[i]`` its metrics group; ``descriptions[i]`` its description.
    """

    names: tuple[str, ...]
    dependencies: tuple[tuple[int, ...], ...]
    declared: tuple[str, ...]
    groups: tuple[str, ...]
    descriptions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """A consistent view of a run in progress (or finished), for live displays.

    Taken under the scheduler's lock by :meth:`PipelineOptimizer.snapshot`;
    ``tasks`` holds copies, so readers never see a half-updated outcome.
    ``ended_at`` is set once the run is over; ``running_since`` maps each
    task with an attempt running now to that attempt's start; ``batchers``
    holds the statistics of each task's batch-size controller.
    """

    run_id: str | None
    pipeline: str | None
    status: RunStatus | None
    started_at: float | None
    taken_at: float
    tasks_total: int
    tasks_active: int
    critical_backlog: int
    tasks_finished: int
    failures_total: int
    retries_total: int
    tasks: Mapping[str, TaskOutcome]
    batch_sizes: Mapping[str, int]
    breakers: Mapping[str, int]
    ended_at: float | None = None
    workers: int | None = None
    graph: RunGraph | None = None
    running_since: Mapping[str, float] = field(default_factory=dict)
    batchers: Mapping[str, BatcherStatistics] = field(default_factory=dict)
