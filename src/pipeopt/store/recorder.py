"""The observer of one run being recorded: events into a deque, nothing more.

The scheduler calls :class:`Recorder` under its lock, so each call only
appends one :data:`~.records.Event` tuple to the run's deque (and wakes the
writer when it sleeps); the writer thread does the rest.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeopt.result import AttemptRecord, TaskState
from pipeopt.store.records import NO_ATTEMPT, NOTHING, Event

if TYPE_CHECKING:
    from pipeopt.store.writer import Writer

#: ``(pipeline, task, cache key) -> (runs.id that stored it, result)`` or ``None``.
CacheLookup = Callable[[str, str, str], "tuple[int, Any] | None"]

_SUCCEEDED = TaskState.SUCCEEDED
_CACHED = TaskState.CACHED


class Recorder:
    """The :class:`~pipeopt.hooks.RunObserver` of one run.

    A successful attempt is held back until its ``task_succeeded``, which
    the scheduler calls right after it under the same lock, so that both
    travel as one event.
    """

    __slots__ = (
        "_append",
        "_held_record",
        "_held_state",
        "_held_task",
        "_lookup",
        "events",
        "hits",
        "key",
        "no_persist",
        "pipeline",
        "run_id",
        "samples",
        "writer",
    )

    def __init__(
        self,
        writer: Writer,
        lookup: CacheLookup,
        *,
        key: int,
        run_id: str,
        pipeline: str,
        no_persist: frozenset[str],
        learns: bool = False,
    ) -> None:
        self.writer = writer
        self._lookup = lookup
        self.events: collections.deque[Event] = collections.deque()
        self._append = self.events.append
        self._held_task: str | None = None
        self._held_record = NO_ATTEMPT
        self._held_state = _SUCCEEDED
        self.key = key  # runs.id
        self.run_id = run_id
        self.pipeline = pipeline
        self.no_persist = no_persist
        # Columns of the encoded events (tasks, durations, states), kept by the
        # writer for learning durations at the end; None when the run does not learn.
        self.samples: list[tuple[tuple[str, ...], tuple[float, ...], tuple[str, ...]]] | None = (
            [] if learns else None
        )
        self.hits: dict[str, int] = {}  # task -> runs.id of the cached result it reused

    def attempt_finished(self, task: str, record: AttemptRecord, state: TaskState) -> None:
        """Queue the attempt (called under the scheduler's lock)."""
        if self._held_task is not None:
            self.release_held()
        if state is _SUCCEEDED or state is _CACHED:
            self._held_task, self._held_record, self._held_state = task, record, state
            return
        self._append(
            (
                task,
                record.number,
                record.started_at,
                record.duration,
                state,
                NOTHING,
                None,
                record,
            )
        )
        writer = self.writer
        if not writer.signalled:
            writer.signal()

    def task_succeeded(self, task: str, result: Any, cache_key: str | None) -> None:
        """Queue the result with its attempt (called under the scheduler's lock)."""
        if self._held_task == task:
            self._queue_held(task, result, cache_key)
        else:
            if self._held_task is not None:
                self.release_held()
            self._append((task, 0, math.nan, math.nan, _SUCCEEDED, result, cache_key, None))
        writer = self.writer
        if not writer.signalled:
            writer.signal()

    def cache_lookup(self, task: str, cache_key: str) -> tuple[bool, Any]:
        """Return ``(True, result)`` if an earlier run stored ``task`` under ``cache_key``."""
        found = self._lookup(self.pipeline, task, cache_key)
        if found is None:
            return False, None
        origin, value = found
        self.hits[task] = origin
        return True, value

    def release_held(self) -> None:
        """Queue a held successful attempt whose result never came."""
        task = self._held_task
        if task is not None:
            self._queue_held(task, NOTHING, None)

    def _queue_held(self, task: str, result: Any, cache_key: str | None) -> None:
        record = self._held_record
        self._held_task = None
        self._append(
            (
                task,
                record.number,
                record.started_at,
                record.duration,
                self._held_state,
                result,
                cache_key,
                None,
            )
        )
