"""The scheduling state machine: readiness, ordering, parking, fail/skip, mapping.

Policy
    A task becomes *ready* when all its dependencies have succeeded (its
    ``trigger`` may ask instead for every dependency to be final, or final
    with at least one success). Ready
    tasks leave the queue by effective criticality (inherited from the tasks
    that wait on them), then by remaining critical path (longest first), then
    first in, first out; waiting ages a task one level per
    ``aging_interval``, past ``blocker`` if it must, so low criticality
    work is never starved (see :mod:`pipeopt.priority`).

State (:class:`SchedulerCore`, no threads and no I/O)
    per task: unmet dependency count and a :class:`TaskOutcome`; a
    :class:`~pipeopt.priority.LeveledQueue` of ready tasks; a heap of tasks
    *parked* until a due time (retry backoff, or an open circuit breaker);
    counters of active, finished, failed and retried work.

Invariants
    a task is in at most one of ready / parked / running; it runs only after
    every dependency succeeded; each final state is set exactly once;
    ``finished`` counts tasks in a final state and the run is over when it
    equals the number of tasks; a failed task's descendants, and only they,
    are skipped (unless ``fail_fast`` cancels everything not started), or
    notified when their trigger accepts a dependency that did not succeed.

Mapping
    A task with ``map_over`` does not run itself: when it becomes ready it
    *expands* into one item per element of its source's result. Items are
    tasks like any other, appended to the per-task lists (index ``>=`` the
    number of static tasks), with the parent's settings and rank and no
    dependencies of their own. The parent stays ``running`` until its last
    item is final; it then succeeds with the items' results in input order,
    or fails (or is cancelled) if any item did not succeed. Items have no
    dependents: the parent's dependents wait on the parent.

    The threaded driver is :mod:`pipeopt.run_loop`.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
import time
from array import array
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeopt.errors import (
    CircuitOpenError,
    MappedItemsFailedError,
    MapSourceError,
    UpstreamFailedError,
)
from pipeopt.params import RunParams
from pipeopt.priority import LABELS, Criticality, LeveledQueue, parse_criticality
from pipeopt.result import AttemptRecord, Missing, TaskOutcome, TaskState

if TYPE_CHECKING:
    from pipeopt.breaker import CircuitBreaker
    from pipeopt.graph import CompiledPipeline, PipelineTask

_PARK_FOR_BUSY_BREAKER = 0.05  # re-check a half-open breaker whose trial slots are all taken
_SUCCESS = (TaskState.SUCCEEDED, TaskState.CACHED)
_trigger_of = operator.attrgetter("trigger")
_wants_params_of = operator.attrgetter("wants_params")
_DECLARED: dict[Criticality | str, str] = {c: c.label for c in Criticality}
_PENDING, _READY, _RUNNING = TaskState.PENDING, TaskState.READY, TaskState.RUNNING
_SUCCEEDED = TaskState.SUCCEEDED


class SchedulerCore:
    """The pure scheduling state machine of one run (callers hold the lock).

    Per-task lists (``tasks``, ``names``, ``groups``, ``levels``,
    ``outcomes``, ...) are indexed like the compiled pipeline and grow when a
    mapped task expands into its items.
    """

    def __init__(
        self,
        compiled: CompiledPipeline,
        *,
        fail_fast: bool = False,
        aging_interval: float | None = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.compiled = compiled
        self.fail_fast = fail_fast
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.params: Mapping[str, Any] = RunParams(compiled.params if params is None else params)
        n = len(compiled)
        # Shared with the compiled pipeline until mapped items extend them (_own_lists).
        self.tasks: list[PipelineTask] = compiled.tasks
        self.injections = compiled.injections
        self.names: list[str] = compiled.names
        self.groups: list[str] = compiled.names  # metrics label: items share their task's
        self.levels: list[int] = compiled.levels
        self._owns_lists = False
        declared = _DECLARED.get
        self.outcomes = [
            TaskOutcome(
                name,
                LABELS[level],
                declared(task.criticality) or parse_criticality(task.criticality).label,
            )
            for name, level, task in zip(self.names, self.levels, self.tasks, strict=True)
        ]
        self.results: dict[str, Any] = {}
        self._remaining = list(map(len, compiled.dependencies))
        self._dependents = compiled.dependents
        # Only the tasks that have a circuit breaker: most have none, and a list
        # would hold a None per task.
        self._breakers: dict[int, CircuitBreaker] = {
            i: task.circuit_breaker
            for i, task in enumerate(self.tasks)
            if task.circuit_breaker is not None
        }
        self._levels = self.levels
        # Remaining critical path per task; the queue gets it negated (longest first).
        self._paths = compiled.critical_path
        self._static = n
        self._map_sources = compiled.map_sources
        # Per task: its arguments need more than the succeeded dependencies' results
        # (bytes: a list would hold a pointer per task).
        if any(map(_wants_params_of, self.injections)):
            self.special = bytearray(
                task.trigger != "all_success" or inj.wants_params
                for task, inj in zip(self.tasks, self.injections, strict=True)
            )
        else:
            self.special = bytearray(
                trigger != "all_success" for trigger in map(_trigger_of, self.tasks)
            )
        self.parents: list[int] = [-1] * n
        self._inputs: dict[int, Any] = {}  # each mapped item's element
        self._items: dict[int, range] = {}
        self._items_left: dict[int, int] = {}
        self._preloaded: Mapping[str, Any] = {}
        self._ready: LeveledQueue[int] = LeveledQueue(aging_interval, clock)
        self._parked: list[tuple[float, int, int]] = []
        self._parked_seq = 0
        self.total = n
        self.active = 0
        self.finished = 0
        self.failures_total = 0
        self.retries_total = 0
        self.breaker_rejections = 0
        self.stopped = False
        self.completed: list[int] = []  # indices in the order they reached a final state
        # Per attempt that ran, its task's index and its seconds (arrays: no object per entry).
        self.attempt_tasks = array("q")
        self.attempt_seconds = array("d")
        self.retry_log: list[int] = []  # index of each task parked for a retry

    # -- queries ---------------------------------------------------------

    @property
    def done(self) -> bool:
        """Return whether every task reached a final state."""
        return self.finished == self.total

    @property
    def critical_backlog(self) -> int:
        """Return how many ready tasks are ``blocker`` or ``critical``."""
        return self._ready.critical_backlog

    @property
    def ready_count(self) -> int:
        """Return how many tasks wait for a worker."""
        return self._ready.size

    def next_due(self) -> float | None:
        """Return the clock time at which the earliest parked task falls due."""
        return self._parked[0][0] if self._parked else None

    # -- transitions -----------------------------------------------------

    def start(self, preloaded: Mapping[str, Any] | None = None) -> None:
        """Make every task without dependencies ready.

        Args:
            preloaded: results of tasks that already succeeded (a resumed
                run); those tasks are marked succeeded without running, with
                zero attempts, and their dependents see the results.
        """
        if preloaded:
            self._preloaded = preloaded
            for name, value in preloaded.items():
                i = self.compiled.index.get(name)
                if i is None:
                    continue
                outcome = self.outcomes[i]
                outcome.state = TaskState.SUCCEEDED
                self.results[name] = value
                self.finished += 1
                self.completed.append(i)
                for j in self.compiled.dependents[i]:
                    self._remaining[j] -= 1
        remaining, outcomes, mapped = self._remaining, self.outcomes, self._map_sources
        push, levels, paths = self._ready.push, self._levels, self._paths
        for i in self.compiled.order:
            if remaining[i] == 0:
                outcome = outcomes[i]
                if outcome.state is not _PENDING:
                    continue
                if mapped[i] < 0:
                    outcome.state = _READY
                    push(i, levels[i], -paths[i])
                else:
                    self._expand(i)

    # -- arguments -------------------------------------------------------

    def value_of(self, d: int) -> Any:
        """Return what dependents receive from final task ``d``.

        Its result if it succeeded; otherwise a :class:`Missing`, or, for a
        mapped task, the list of its items' results with a :class:`Missing`
        for each item that did not succeed.
        """
        outcome = self.outcomes[d]
        if outcome.state in _SUCCESS:
            return self.results[outcome.name]
        items = self._items.get(d)
        if items is None:
            return Missing(outcome.name, outcome.state, outcome.error)
        outcomes, results = self.outcomes, self.results
        return [
            results[o.name] if o.state in _SUCCESS else Missing(o.name, o.state, o.error)
            for o in (outcomes[j] for j in items)
        ]

    def inputs(self, i: int) -> dict[str, Any]:
        """Return the upstream values task ``i`` sees, by dependency name.

        An item sees its own element in place of the list it was mapped over.
        """
        parent = self.parents[i]
        static = i if parent < 0 else parent
        names = self.names
        values = {names[d]: self.value_of(d) for d in self.compiled.dependencies[static]}
        if parent >= 0:
            values[names[self._map_sources[parent]]] = self._inputs[i]
        return values

    def arguments(self, i: int) -> dict[str, Any]:
        """Return the keyword arguments of task ``i``'s body (without ``context``)."""
        injection = self.injections[i]
        if not self.special[i]:
            results = self.results
            kwargs = {param: results[dep] for param, dep in injection.by_name}
            for dep in injection.rest_as_kwargs:
                kwargs[dep] = results[dep]
            return kwargs
        parent = self.parents[i]
        if parent >= 0 and not self.special[parent]:
            # An item of a plain mapped task: its dependencies all succeeded.
            results = self.results
            source = self.names[self._map_sources[parent]]
            item = self._inputs[i]
            kwargs = {
                param: item if dep == source else results[dep] for param, dep in injection.by_name
            }
            for dep in injection.rest_as_kwargs:
                kwargs[dep] = item if dep == source else results[dep]
            return kwargs
        values = self.inputs(i)
        kwargs = {param: values[dep] for param, dep in injection.by_name}
        for dep in injection.rest_as_kwargs:
            kwargs[dep] = values[dep]
        if injection.wants_params:
            kwargs["params"] = self.params
        return kwargs

    def cached(self, i: int, result: Any) -> int:
        """Finish a running task with a result reused from the store; return tasks woken."""
        woken = self.succeed(i, result, None)
        self.outcomes[i].state = TaskState.CACHED
        self.outcomes[i].attempts = 0
        return woken

    def _make_ready(self, i: int) -> None:
        self.outcomes[i].state = TaskState.READY
        self._ready.push(i, self._levels[i], -self._paths[i])

    def _wake(self, i: int) -> int:
        """Make a static task whose dependencies are met ready (or expand it); return items."""
        if self._map_sources[i] < 0:
            self._make_ready(i)
            return 1
        return self._expand(i)

    def _expand(self, i: int) -> int:
        """Turn mapped task ``i`` into one item per element of its source; return items ready."""
        outcome = self.outcomes[i]
        outcome.state = TaskState.RUNNING
        outcome.started_at = time.time()
        task = self.tasks[i]
        source = self._map_sources[i]
        value = self.value_of(source)
        if isinstance(value, Missing):
            self._end_unsuccessful(i, TaskState.SKIPPED, UpstreamFailedError(task.name, value.task))
            return 0
        try:
            if isinstance(value, str | bytes | Mapping):
                raise TypeError
            elements = list(value)
        except TypeError:
            self._end_unsuccessful(
                i, TaskState.FAILED, MapSourceError(task.name, self.names[source], value)
            )
            return 0
        count = len(elements)
        if count == 0:
            self._end_mapped(i, ())
            return 0
        start = len(self.outcomes)
        items = range(start, start + count)
        name = task.name
        item_names = [f"{name}[{k}]" for k in range(count)]
        label, declared = outcome.criticality, outcome.declared_criticality
        self._own_lists()
        self.outcomes.extend([TaskOutcome(n, label, declared) for n in item_names])
        self.names.extend(item_names)
        self.groups.extend([name] * count)
        self.tasks.extend([task] * count)
        self.injections.extend([self.injections[i]] * count)
        self._levels.extend([self._levels[i]] * count)
        self._paths.extend([self._paths[i]] * count)
        breaker = self._breakers.get(i)
        if breaker is not None:
            self._breakers.update(dict.fromkeys(items, breaker))
        self._remaining.extend([0] * count)
        self.special.extend(b"\x01" * count)
        self.parents.extend([i] * count)
        self._inputs.update(zip(items, elements, strict=True))
        self._items[i] = items
        self._items_left[i] = count
        self.total += count
        preloaded = self._preloaded
        ready = 0
        for j in items:
            if preloaded and item_names[j - start] in preloaded:
                item = self.outcomes[j]
                item.state = TaskState.SUCCEEDED
                self.results[item.name] = preloaded[item.name]
                self._final(j)
            else:
                self._make_ready(j)
                ready += 1
        return ready

    def _own_lists(self) -> None:
        """Copy the per-task lists shared with the compiled pipeline, before items extend them."""
        if self._owns_lists:
            return
        self._owns_lists = True
        self.tasks = list(self.tasks)
        self.injections = list(self.injections)
        self.names = list(self.names)
        self.groups = list(self.groups)
        self.levels = self._levels = list(self.levels)
        self._paths = list(self._paths)

    def _final(self, i: int) -> int:
        """Count task ``i`` as final; return tasks made ready (by a mapped task ending)."""
        self.finished += 1
        self.completed.append(i)
        parent = self.parents[i]
        if parent < 0:
            return 0
        left = self._items_left[parent] - 1
        self._items_left[parent] = left
        if left:
            return 0
        return self._end_mapped(parent, self._items[parent])

    def _end_mapped(self, i: int, items: range | tuple[()]) -> int:
        """End mapped task ``i`` once every item is final; return tasks made ready."""
        outcomes = self.outcomes
        bad = [j for j in items if outcomes[j].state not in _SUCCESS]
        if bad:
            first = outcomes[bad[0]]
            error = MappedItemsFailedError(self.names[i], len(bad), len(items), first.name)
            error.__cause__ = first.error
            cancelled = any(outcomes[j].state is TaskState.CANCELLED for j in bad)
            self._end_unsuccessful(
                i, TaskState.CANCELLED if cancelled else TaskState.FAILED, error, count=False
            )
            return 0
        results = self.results
        outcome = outcomes[i]
        outcome.state = TaskState.SUCCEEDED
        outcome.finished_at = time.time()
        results[outcome.name] = [results[outcomes[j].name] for j in items]
        woken = self._final(i)
        if self.stopped:
            return woken
        remaining = self._remaining
        for j in self._dependents[i]:
            remaining[j] -= 1
            if remaining[j] == 0 and outcomes[j].state is TaskState.PENDING:
                woken += self._wake(j)
        return woken

    def _end_unsuccessful(
        self, i: int, state: TaskState, error: BaseException, *, count: bool = True
    ) -> None:
        """End task ``i`` in ``state`` without running it (or its items) again."""
        outcome = self.outcomes[i]
        outcome.state = state
        outcome.error = error
        if outcome.started_at is None:
            outcome.started_at = time.time()
        outcome.finished_at = time.time()
        if state is TaskState.FAILED and count:
            self.failures_total += 1
        self._final(i)
        if state is not TaskState.CANCELLED:
            self._notify_unsuccessful(i)
        if state is TaskState.FAILED and self.fail_fast:
            self.stop()

    def _notify_unsuccessful(self, i: int) -> None:
        """Tell the dependents of task ``i``, which ended without success.

        A default-trigger dependent is skipped, and so on down the graph; a
        dependent with another trigger counts the dependency as final and
        runs (or, for ``any_success`` without any success, is skipped) once
        its last dependency is final.
        """
        if i >= self._static:
            return  # an item: its mapped task tells the dependents
        outcomes = self.outcomes
        remaining = self._remaining
        tasks = self.tasks
        stack = [(i, outcomes[i].name)]
        while stack:
            k, origin = stack.pop()
            for j in self._dependents[k]:
                dependent = outcomes[j]
                if dependent.state is not TaskState.PENDING:
                    continue
                trigger = tasks[j].trigger
                if trigger != "all_success":
                    remaining[j] -= 1
                    if remaining[j]:
                        continue
                    if trigger == "all_done" or any(
                        outcomes[d].state in _SUCCESS for d in self.compiled.dependencies[j]
                    ):
                        if not self.stopped:
                            self._wake(j)
                        continue
                dependent.state = TaskState.SKIPPED
                dependent.error = UpstreamFailedError(dependent.name, origin)
                self._final(j)
                stack.append((j, origin))

    def _park(self, i: int, due: float) -> None:
        self.outcomes[i].state = TaskState.RETRYING
        self._parked_seq += 1
        heapq.heappush(self._parked, (due, self._parked_seq, i))

    def release_due(self, now: float) -> int:
        """Move parked tasks whose due time has come to the ready queue."""
        moved = 0
        parked = self._parked
        while parked and parked[0][0] <= now:
            _, _, i = heapq.heappop(parked)
            if self.outcomes[i].state is TaskState.RETRYING:
                self._make_ready(i)
                moved += 1
        return moved

    def next_task(self, now: float) -> int | None:
        """Take the most urgent ready task and mark it running, or return ``None``.

        A task whose circuit breaker refuses the call is not started: it is
        parked until the breaker half-opens when its retry policy allows
        another attempt, and failed with :class:`CircuitOpenError` otherwise.
        """
        taken = self.take(now, 1)
        return taken[0] if taken else None

    def take(self, now: float, limit: int) -> list[int]:
        """Take up to ``limit`` of the most urgent ready tasks, as :meth:`next_task` does."""
        taken: list[int] = []
        if self.stopped:
            return taken
        if self._parked and self._parked[0][0] <= now:
            self.release_due(now)
        breakers, outcomes, pop = self._breakers, self.outcomes, self._ready.pop
        while len(taken) < limit:
            i = pop()
            if i is None:
                break
            breaker = breakers.get(i) if breakers else None
            if breaker is not None and not breaker.try_acquire():
                self.breaker_rejections += 1
                wait = breaker.retry_after()
                policy = self.tasks[i].retry_policy
                if policy is not None and policy.max_attempts > 1:
                    self._park(i, now + (wait if math.isfinite(wait) else _PARK_FOR_BUSY_BREAKER))
                else:
                    error = CircuitOpenError(breaker.name, wait)
                    self._finish_failed(i, error, None, now)
                continue
            outcome = outcomes[i]
            outcome.state = _RUNNING
            outcome.attempts += 1
            taken.append(i)
        self.active += len(taken)
        return taken

    def unclaim(self, i: int) -> None:
        """Put a task taken by :meth:`next_task` but never started back in the queue."""
        outcome = self.outcomes[i]
        outcome.attempts -= 1
        if outcome.attempts == 0:
            outcome.started_at = None
        self.active -= 1
        breaker = self._breakers.get(i) if self._breakers else None
        if breaker is not None:
            breaker.release()
        if self.stopped:  # the run stopped while the task was claimed: it never starts
            outcome.state = TaskState.CANCELLED
            self._final(i)
            return
        self._make_ready(i)

    def succeed(self, i: int, result: Any, record: AttemptRecord | None) -> int:
        """Record a successful attempt; return how many tasks became ready."""
        outcomes = self.outcomes
        outcome = outcomes[i]
        outcome.state = _SUCCEEDED
        if record is not None:
            duration = record[2]
            self.attempt_tasks.append(i)
            self.attempt_seconds.append(duration)
            if outcome._history is None and record[0] == 1 and record[1] == outcome.started_at:
                # The common case: keep the duration alone; the outcome builds
                # its history and end time from it when they are asked for.
                outcome._history = duration
            else:
                outcome.attempt_history.append(record)
                outcome.finished_at = record.started_at + duration
        else:
            outcome.finished_at = time.time()
        if outcome.error is not None:  # an earlier attempt failed
            outcome.error = None
            outcome.traceback = None
        self.results[outcome.name] = result
        self.active -= 1
        breaker = self._breakers.get(i) if self._breakers else None
        if breaker is not None:
            breaker.record_success()
        if self.parents[i] >= 0:
            return self._final(i)
        self.finished += 1
        self.completed.append(i)
        dependents = self._dependents[i]
        if not dependents or self.stopped:
            return 0
        woken = 0
        remaining = self._remaining
        mapped = self._map_sources
        ready = self._ready
        levels, paths = self._levels, self._paths
        for j in dependents:
            left = remaining[j] - 1
            remaining[j] = left
            if left == 0:
                dependent = outcomes[j]
                if dependent.state is not _PENDING:
                    continue
                if mapped[j] < 0:
                    dependent.state = _READY
                    ready.push(j, levels[j], -paths[j])
                    woken += 1
                else:
                    woken += self._expand(j)
        return woken

    def fail(self, i: int, error: BaseException, record: AttemptRecord, now: float) -> bool:
        """Record a failed attempt; return ``True`` if the task was parked for a retry."""
        outcome = self.outcomes[i]
        outcome.attempt_history.append(record)
        self.attempt_tasks.append(i)
        self.attempt_seconds.append(record.duration)
        self.active -= 1
        task = self.tasks[i]
        breaker = task.circuit_breaker
        if breaker is not None and not isinstance(error, CircuitOpenError):
            breaker.record_failure(error)
        policy = task.retry_policy
        if not self.stopped and policy is not None and policy.should_retry(error, outcome.attempts):
            self.retries_total += 1
            self.retry_log.append(i)
            outcome.error = error
            outcome.traceback = record.traceback
            self._park(i, now + policy.delay(outcome.attempts, self.rng))
            return True
        self._finish_failed(i, error, record.traceback, now)
        return False

    def _finish_failed(self, i: int, error: BaseException, text: str | None, now: float) -> None:
        self.outcomes[i].traceback = text
        self._end_unsuccessful(i, TaskState.FAILED, error)

    def stop(self, reason: BaseException | None = None) -> list[int]:
        """Stop dispatching and cancel every task that has not started.

        Returns the indices of the cancelled tasks. Running tasks are left to
        the driver.
        """
        self.stopped = True
        cancelled: list[int] = []
        waiting = (TaskState.PENDING, TaskState.READY, TaskState.RETRYING)
        # Items come after every static task, so a mapped task ended by its last
        # cancelled item has had its pending dependents cancelled already.
        for i, outcome in enumerate(self.outcomes):
            if outcome.state in waiting:
                outcome.state = TaskState.CANCELLED
                if reason is not None and outcome.error is None:
                    outcome.error = reason
                cancelled.append(i)
                self._final(i)
        self._ready.drain()
        self._parked.clear()
        return cancelled

    def abandon_running(
        self, i: int, error: BaseException | None, record: AttemptRecord | None = None
    ) -> None:
        """Mark a running task cancelled: the run stopped it (an interrupt or ``fail_fast``).

        ``record`` is the attempt's own account when it ended after being
        asked to stop; ``None`` when the run gave up waiting for it.
        """
        outcome = self.outcomes[i]
        if outcome.state is TaskState.RUNNING:
            if record is not None:
                outcome.attempt_history.append(record)
            outcome.state = TaskState.CANCELLED
            outcome.error = error
            outcome.finished_at = time.time()
            self.active -= 1
            breaker = self._breakers.get(i) if self._breakers else None
            if breaker is not None:
                breaker.release()
            self._final(i)


__all__ = ["SchedulerCore"]
