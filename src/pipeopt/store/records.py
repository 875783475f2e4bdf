"""The run store's records: what it returns to callers and what it keeps.

Public (returned by :class:`~pipeopt.store.RunStore`): :class:`RunSummary`,
:class:`RunDetail`, :class:`TaskSummary`, :class:`AttemptSummary`.

Internal: :data:`Event` (one attempt or result on its way to the writer)
and :class:`EventColumns` (events transposed, as the writer reads them),
:class:`RunRow` (a ``runs`` row), :class:`Batch` (the columns of one
``batches`` row) and :class:`FinalRow` (a final state the attempts do not
tell). Batches and final rows are pickled as plain tuples, so the stored
format does not depend on these class names.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from pipeopt.result import AttemptRecord, TaskState

PICKLE_PROTOCOL: Final = 5
MESSAGE_LIMIT: Final = 4_000  # characters of an error message kept
TRACEBACK_LIMIT: Final = 64_000  # characters of a traceback kept (its end)

NOTHING: Any = object()  # an event without a result (a failed or retried attempt)
NO_ATTEMPT: Final = AttemptRecord(0, math.nan, math.nan)  # a result reported without its attempt

# What a batch holds for each event's result.
R_NONE: Final = 0  # no result stored (none, not picklable, too large, persist=False)
R_NULL: Final = 1  # the task returned None
R_PICKLED: Final = 2  # the next pickle of the batch's blobs
R_CACHE: Final = 3  # in the cache table; the batch's refs say where


# -- public records -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One recorded run, as listed by ``pipeopt history``.

    ``status`` is a :class:`~pipeopt.result.RunStatus` value, ``"running"``
    for a run still going on, or ``"crashed"`` for a run whose process ended
    without recording its end. Counts are of tasks by final state; for a
    running or crashed run they count the attempts recorded so far.
    """

    run_id: str
    pipeline: str
    status: str
    started_at: float
    ended_at: float | None
    duration: float | None
    tasks: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int
    cached: int
    executor: str
    workers: int
    resumed_from: str | None
    source: str | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttemptSummary:
    """One recorded attempt of a task (``number`` 0: a result without an attempt)."""

    number: int
    started_at: float | None
    duration: float | None
    state: str
    error_type: str | None
    error: str | None
    traceback: str | None


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """What one run recorded about one task.

    ``state`` is a :class:`~pipeopt.result.TaskState` value (``"pending"``
    for a task the run never reached); ``attempts`` counts the attempts that
    ran its body; ``note`` says where the result came from when the task did
    not run (``"resumed"``, ``"cached from run …"``). ``criticality`` is
    the effective label, ``declared_criticality`` the one written on the
    task; ``logs`` are the records its attempts logged (bounded);
    ``dependencies`` names the tasks it waited on. ``estimate`` is the
    duration in seconds the run ranked it by on the critical path, and
    ``estimate_source`` where that came from: ``"hint"`` (its
    ``expected_duration``), ``"learned (n samples)"`` or ``"none"`` (it
    counted as one hop).
    """

    name: str
    criticality: str
    state: str
    attempts: int
    started_at: float | None
    duration: float | None
    error_type: str | None
    error: str | None
    traceback: str | None
    note: str | None
    history: tuple[AttemptSummary, ...]
    declared_criticality: str | None = None
    logs: tuple[str, ...] = ()
    dependencies: tuple[str, ...] = ()
    estimate: float | None = None
    estimate_source: str = "none"


@dataclass(frozen=True, slots=True)
class RunDetail:
    """One recorded run with a row per task, as shown by ``pipeopt show``."""

    summary: RunSummary
    fingerprint: str
    host: str
    pid: int
    tasks: tuple[TaskSummary, ...]

    @property
    def run_id(self) -> str:
        """Return the run's id."""
        return self.summary.run_id


# -- internal records -------------------------------------------------------------


#: One attempt (and, when it succeeded, its result) on its way to the writer,
#: in the order of :class:`EventColumns`: task, attempt number, start,
#: duration, state after the attempt, result, cache key, failed attempt.
#: A plain tuple because the scheduler builds one per task under its lock:
#: building a NamedTuple there cost a third more of that path
#: (``benchmarks/README.md``, run store); the writer reads the events
#: back as named columns.
Event = tuple[str, int, float, float, TaskState, Any, "str | None", "AttemptRecord | None"]


class EventColumns(NamedTuple):
    """A list of :data:`Event` transposed: one tuple per field, one entry per event.

    ``numbers`` 0 with NaN times mark a result reported without its
    attempt; a ``results`` entry is :data:`NOTHING` when there is none (a
    failed or retried attempt, or a success whose result never came);
    ``failures`` holds the record of each failed attempt (else ``None``),
    for its error and traceback.
    """

    tasks: tuple[str, ...]
    numbers: tuple[int, ...]
    started: tuple[float, ...]
    durations: tuple[float, ...]
    states: tuple[TaskState, ...]
    results: tuple[Any, ...]
    cache_keys: tuple[str | None, ...]
    failures: tuple[AttemptRecord | None, ...]

    @classmethod
    def of(cls, events: list[Event]) -> EventColumns:
        """Return ``events`` as columns (one ``zip``, in C)."""
        return cls._make(zip(*events, strict=True))


class RunRow(NamedTuple):
    """A ``runs`` row; the field names are the column names."""

    id: int
    run_id: str
    pipeline: str
    fingerprint: str
    tasks: int
    started_at: float
    ended_at: float | None
    status: str
    executor: str
    workers: int
    resumed_from: str | None
    host: str
    pid: int
    process_start: str | None
    source: str | None
    counts: str | None


RUN_COLUMNS: Final = ", ".join(RunRow._fields)


class FinalRow(NamedTuple):
    """A task's final state that its recorded attempts may not tell."""

    task: str
    state: str
    attempts: int
    error_type: str | None
    error: str | None
    traceback: str | None
    note: str | None


class FailureEntry(NamedTuple):
    """The error of one failed attempt in a batch (``event``: its index there)."""

    event: int
    error_type: str
    message: str
    traceback: str | None


class CacheRef(NamedTuple):
    """Where a batch's cached result is: the ``cache`` row of ``run`` and ``key``."""

    event: int
    run: int
    key: str


class Batch(NamedTuple):
    """The columns of one ``batches`` row, one entry per event (pickled as a plain tuple)."""

    tasks: tuple[str, ...]
    numbers: tuple[int, ...]
    started: tuple[float, ...]
    durations: tuple[float, ...]
    states: tuple[str, ...]
    errors: tuple[FailureEntry, ...]
    results: bytes  # one R_* code per event
    blobs: tuple[bytes, ...]  # the pickles of the R_PICKLED events, in order
    refs: tuple[CacheRef, ...]  # the R_CACHE events

    @classmethod
    def load(cls, payload: bytes) -> Batch:
        """Return the batch pickled in ``payload``."""
        tasks, numbers, started, durations, states, errors, results, blobs, refs = pickle.loads(
            payload
        )
        return cls(
            tasks,
            numbers,
            started,
            durations,
            states,
            tuple(map(FailureEntry._make, errors)),
            results,
            blobs,
            tuple(map(CacheRef._make, refs)),
        )

    def stored(self) -> Iterator[tuple[str, int, bytes | CacheRef | None]]:
        """Yield ``(task, code, pickle or cache ref or None)`` of each stored result."""
        blobs = iter(self.blobs)
        refs = {ref.event: ref for ref in self.refs}
        for i, code in enumerate(self.results):
            if code == R_PICKLED:
                yield self.tasks[i], code, next(blobs)
            elif code == R_CACHE:
                yield self.tasks[i], code, refs[i]
            elif code == R_NULL:
                yield self.tasks[i], code, None


# -- text of errors ------------------------------------------------------------------


def message_of(error: BaseException) -> str:
    """Return ``str(error)``, clipped; never raises."""
    try:
        text = str(error)
    except Exception:  # a broken __str__ must not stop the recording
        text = f"<{type(error).__name__}: str() failed>"
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "…"


def clip_traceback(text: str | None) -> str | None:
    """Return the end of a traceback text, clipped to :data:`TRACEBACK_LIMIT`."""
    if text is None or len(text) <= TRACEBACK_LIMIT:
        return text
    return "…" + text[-TRACEBACK_LIMIT:]


def nan_to_none(value: float | None) -> float | None:
    """Return ``None`` for NaN (an unknown time), else ``value``."""
    return None if value is None or math.isnan(value) else value
