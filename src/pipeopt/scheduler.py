"""The scheduling state machine and the threaded run loop.

Policy
    A task becomes *ready* when all its dependencies have succeeded (its
    ``trigger`` may ask instead for every dependency to be final, or final
    with at least one success). Ready
    tasks leave the queue by effective criticality (inherited from the tasks
    that wait on them), then by remaining critical path (longest first), then
    first in, first out; waiting ages a task one level per
    ``aging_interval`` so low criticality work is never starved.

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

Drivers (:class:`RunLoop`)
    With the thread executor the core runs on ``max_workers`` worker
    threads that pull work themselves: the thread that finishes a task takes
    the next ready one under the same lock, so a chain never waits for a
    thread hand-off and the run needs no polling. The calling thread sleeps
    on a condition and wakes only for attempt deadlines, interrupts and the
    end. The sync executor runs everything in the calling thread.
    Executors that hand out futures (process, async, Dask) are fed by the
    calling thread alone, at most ``max_workers`` attempts in flight; each
    future's done-callback records its attempt and wakes the caller, so no
    thread is parked per attempt.

Stopping
    The run loop, not the executor, says what an interrupted attempt was:
    past its deadline it is a :class:`TaskTimeoutError` (recorded before
    the executor is asked to cancel it); stopped by the run (Ctrl-C,
    SIGTERM, ``fail_fast``) it is ``cancelled``, after running bodies had
    ``interrupt_grace`` seconds to finish.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pipeopt.context import ExecutionContext
from pipeopt.errors import (
    CircuitOpenError,
    MappedItemsFailedError,
    MapSourceError,
    TaskTimeoutError,
    UpstreamFailedError,
)
from pipeopt.executors.base import (
    SyncExecutor,
    TaskCall,
    ThreadExecutor,
    close_thread_loop,
    resolve_output,
)
from pipeopt.logs import current as current_task
from pipeopt.params import RunParams
from pipeopt.priority import LABELS, LeveledQueue
from pipeopt.result import AttemptRecord, Missing, TaskOutcome, TaskState

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.executors.base import Executor
    from pipeopt.graph import CompiledPipeline, PipelineTask

_dispatching = threading.local()  # set while a callback thread submits follow-ups
_PARK_FOR_BUSY_BREAKER = 0.05  # re-check a half-open breaker whose trial slots are all taken
# (value, error, traceback text, cached, started, ended) of one attempt.
_Ran = tuple[Any, BaseException | None, str | None, bool, float, float]
_FAST_BODY_SECONDS = 50e-6  # bodies faster than this are claimed several at a time
_FAST_CLAIM = 8
_SUCCESS = (TaskState.SUCCEEDED, TaskState.CACHED)
# Raised by a body (or delivered into one by a signal): the run stops, the task is cancelled.
_STOPS_THE_RUN = (KeyboardInterrupt, SystemExit)


@dataclass(slots=True)
class Attempt:
    """One attempt of a task: its slot bookkeeping and, once it ran, its outcome."""

    index: int
    number: int
    started_wall: float
    started: float
    deadline: float | None
    cancel: threading.Event | None = None
    abandoned: bool = False
    stopped: bool = False  # the run asked it to stop (interrupt or fail_fast)
    stop_reason: BaseException | None = None
    future: Future[Any] | None = None
    cache_key: str | None = None
    value: Any = None
    error: BaseException | None = None
    text: str | None = None
    cached: bool = False
    ended: float = 0.0

    def cancel_event(self) -> threading.Event:
        """Return the attempt's cancel flag, made on first use."""
        if self.cancel is None:
            self.cancel = threading.Event()
        return self.cancel


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
        self.tasks: list[PipelineTask] = list(compiled.tasks)
        self.injections = list(compiled.injections)
        self.names: list[str] = list(compiled.names)
        self.groups: list[str] = list(compiled.names)  # metrics label: items share their task's
        self.levels: list[int] = list(compiled.levels)
        self.outcomes = [
            TaskOutcome(
                name=task.name,
                criticality=LABELS[compiled.levels[i]],
                declared_criticality=task.level.label,
            )
            for i, task in enumerate(compiled.tasks)
        ]
        self.results: dict[str, Any] = {}
        self._remaining = [len(d) for d in compiled.dependencies]
        self._dependents = compiled.dependents
        self._breakers = [task.circuit_breaker for task in compiled.tasks]
        self._levels = self.levels
        self._ranks = [-cost for cost in compiled.critical_path]
        self._static = n
        self._map_sources = compiled.map_sources
        self._triggers = [task.trigger for task in compiled.tasks]
        # Per task: its arguments need more than the succeeded dependencies' results.
        self.special = [
            task.trigger != "all_success" or inj.wants_params
            for task, inj in zip(compiled.tasks, compiled.injections, strict=True)
        ]
        self.parents: list[int] = [-1] * n
        self._inputs: list[Any] = [None] * n
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
        self.attempt_log: list[tuple[int, float, bool]] = []  # (index, seconds, failed)
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
        for i in self.compiled.order:
            if self._remaining[i] == 0 and self.outcomes[i].state is TaskState.PENDING:
                self._wake(i)

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
        self._ready.push(i, self._levels[i], self._ranks[i])

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
        self.outcomes.extend([TaskOutcome(n, label, declared) for n in item_names])
        self.names.extend(item_names)
        self.groups.extend([name] * count)
        self.tasks.extend([task] * count)
        self.injections.extend([self.injections[i]] * count)
        self._levels.extend([self._levels[i]] * count)
        self._ranks.extend([self._ranks[i]] * count)
        self._breakers.extend([self._breakers[i]] * count)
        self._remaining.extend([0] * count)
        self.special.extend([True] * count)
        self.parents.extend([i] * count)
        self._inputs.extend(elements)
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
        triggers = self._triggers
        stack = [(i, outcomes[i].name)]
        while stack:
            k, origin = stack.pop()
            for j in self._dependents[k]:
                dependent = outcomes[j]
                if dependent.state is not TaskState.PENDING:
                    continue
                trigger = triggers[j]
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
        if self.stopped:
            return None
        if self._parked and self._parked[0][0] <= now:
            self.release_due(now)
        tasks = self.tasks
        while True:
            i = self._ready.pop()
            if i is None:
                return None
            breaker = tasks[i].circuit_breaker
            if breaker is not None and not breaker.try_acquire():
                self.breaker_rejections += 1
                wait = breaker.retry_after()
                policy = tasks[i].retry_policy
                if policy is not None and policy.max_attempts > 1:
                    self._park(i, now + (wait if math.isfinite(wait) else _PARK_FOR_BUSY_BREAKER))
                else:
                    error = CircuitOpenError(breaker.name, wait)
                    self._finish_failed(i, error, None, now)
                continue
            outcome = self.outcomes[i]
            outcome.state = TaskState.RUNNING
            outcome.attempts += 1
            self.active += 1
            return i

    def unclaim(self, i: int) -> None:
        """Put a task taken by :meth:`next_task` but never started back in the queue."""
        outcome = self.outcomes[i]
        outcome.attempts -= 1
        if outcome.attempts == 0:
            outcome.started_at = None
        self.active -= 1
        breaker = self._breakers[i]
        if breaker is not None:
            breaker.release()
        if self.stopped:  # the run stopped while the task was claimed: it never starts
            outcome.state = TaskState.CANCELLED
            self._final(i)
            return
        self._make_ready(i)

    def succeed(self, i: int, result: Any, record: AttemptRecord | None) -> int:
        """Record a successful attempt; return how many tasks became ready."""
        outcome = self.outcomes[i]
        outcome.state = TaskState.SUCCEEDED
        if record is not None:
            outcome.attempt_history.append(record)
            self.attempt_log.append((i, record.duration, False))
            outcome.finished_at = record.started_at + record.duration
        else:
            outcome.finished_at = time.time()
        if outcome.error is not None:  # an earlier attempt failed
            outcome.error = None
            outcome.traceback = None
        self.results[outcome.name] = result
        self.active -= 1
        breaker = self._breakers[i]
        if breaker is not None:
            breaker.record_success()
        if self.parents[i] >= 0:
            return self._final(i)
        self.finished += 1
        self.completed.append(i)
        if self.stopped:
            return 0
        woken = 0
        remaining = self._remaining
        outcomes = self.outcomes
        mapped = self._map_sources
        for j in self._dependents[i]:
            remaining[j] -= 1
            if remaining[j] == 0 and outcomes[j].state is TaskState.PENDING:
                if mapped[j] < 0:
                    self._make_ready(j)
                    woken += 1
                else:
                    woken += self._expand(j)
        return woken

    def fail(self, i: int, error: BaseException, record: AttemptRecord, now: float) -> bool:
        """Record a failed attempt; return ``True`` if the task was parked for a retry."""
        outcome = self.outcomes[i]
        outcome.attempt_history.append(record)
        self.attempt_log.append((i, record.duration, True))
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
            breaker = self._breakers[i]
            if breaker is not None:
                breaker.release()
            self._final(i)


class RunObserver(Protocol):
    """Receives a run's events, e.g. to record them in a run store.

    ``attempt_finished`` and ``task_succeeded`` are called while the
    scheduler's lock is held: implementations must only hand the event to a
    background writer, never block.
    """

    def attempt_finished(self, task: str, record: AttemptRecord, state: TaskState) -> None:
        """One attempt ended; ``state`` is the task's state after it."""

    def task_succeeded(self, task: str, result: Any, cache_key: str | None) -> None:
        """A task succeeded with ``result`` (persist it if allowed)."""

    def cache_lookup(self, task: str, cache_key: str) -> tuple[bool, Any]:
        """Return ``(True, result)`` if ``cache_key`` already succeeded, else ``(False, None)``."""


@dataclass(slots=True)
class RunHooks:
    """Per-run services the run loop passes into each attempt."""

    run_id: str
    batchers: dict[str, Batcher]
    batcher_factory: Callable[[str], Batcher]
    batch_observer: Callable[[str, int, float], None] | None = None
    observer: RunObserver | None = None
    lineage_id: str | None = None


class RunLoop:
    """Drive a :class:`SchedulerCore` with worker threads until every task is final.

    Args:
        core: the state machine of this run.
        executor: runs the bodies; inline executors run them in the workers.
        max_workers: how many bodies run at once.
        hooks: per-run services for the contexts.
        interrupt_grace: seconds an interrupt, or ``fail_fast``, gives running
            bodies to finish before they are stopped and their tasks cancelled.
    """

    def __init__(
        self,
        core: SchedulerCore,
        executor: Executor,
        max_workers: int,
        hooks: RunHooks,
        *,
        interrupt_grace: float = 1.0,
    ) -> None:
        self.core = core
        self.executor = executor
        self.max_workers = max_workers
        self.hooks = hooks
        self.interrupt_grace = interrupt_grace
        # The built-in thread executors run bodies right here, without a TaskCall.
        self._own_threads = type(executor) in (ThreadExecutor, SyncExecutor)
        # Executors that hand out futures are fed by this thread, without worker threads.
        self._dispatching = not executor.inline
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)
        self._main = threading.Condition(self.lock)
        self._running: dict[int, Attempt] = {}
        self._deadlines: list[tuple[float, int, Attempt]] = []
        self._deadline_seq = itertools.count()
        self._idle = 0
        self._workers: list[threading.Thread] = []
        self._clock = core.clock
        self._halted = False
        self.interrupted = False

    # -- the calling thread ------------------------------------------------

    def run(self, preloaded: Mapping[str, Any] | None = None) -> None:
        """Run the pipeline to the end; on ``KeyboardInterrupt`` stop cleanly and re-raise."""
        core = self.core
        with self.lock:
            core.start(preloaded)
            if core.done:
                return
        inline = self.executor.name == "sync"
        try:
            if inline:
                self._run_in_caller()
                return
            if self._dispatching:
                self._dispatch_until_done()
                return
            count = max(1, min(self.max_workers, core.total))
            # Inside the try: the first workers run bodies while the others start,
            # so an interrupt may arrive here already.
            for _ in range(count):
                self._spawn_worker()
            with self.lock:
                while not core.done:
                    self._expire_deadlines()
                    if not core.done:
                        self._main.wait(self._main_timeout())
        except KeyboardInterrupt as exc:
            # The sync executor ran the bodies in this very thread: none is left to wait for.
            self.interrupt(exc, wait=not inline)
            raise
        finally:
            with self.lock:
                core.stopped = True
                self._work.notify_all()

    def running_starts(self) -> dict[int, float]:
        """Return, per task running now, its attempt's wall-clock start (caller holds the lock)."""
        return {i: attempt.started_wall for i, attempt in self._running.items()}

    def _main_timeout(self) -> float | None:
        if not self._deadlines:
            return None
        return max(0.0, self._deadlines[0][0] - self._clock())

    def _expire_deadlines(self) -> None:
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, attempt = heapq.heappop(self._deadlines)
            if attempt.abandoned or self._running.get(attempt.index) is not attempt:
                continue
            if attempt.stopped:
                # The run stopped it before its deadline: cancelled, not timed out.
                self._abandon(attempt)
                self.core.abandon_running(attempt.index, attempt.stop_reason)
                self._wake_if_done()
                continue
            timeout = self.core.tasks[attempt.index].timeout
            assert timeout is not None
            attempt.error = TaskTimeoutError(self.core.outcomes[attempt.index].name, timeout)
            attempt.value, attempt.cached, attempt.ended = None, False, now
            self._abandon(attempt)
            self._finish_attempt(attempt)
            if not self._dispatching:
                # The stuck thread keeps running the body; a fresh one takes its slot.
                self._spawn_worker()

    def _abandon(self, attempt: Attempt) -> None:
        attempt.abandoned = True
        attempt.cancel_event().set()
        if attempt.future is not None:
            self.executor.cancel(attempt.future)
        del self._running[attempt.index]

    def _halt(self, reason: BaseException | None) -> None:
        """Stop dispatching and ask every running attempt to stop (caller holds the lock).

        Running bodies see ``context.cancelled`` and may finish: one that
        succeeds keeps its result. The verdict on the others is the run's,
        whatever the executor reports: an attempt asked to stop here that
        then fails, however its executor ends it (a cancelled future, a
        killed process, ``CancelledError`` in a coroutine), is ``cancelled``.
        """
        if not self._halted:
            self._halted = True
            self.core.stop(reason)
        # Past the grace period the main thread stops them through the executor.
        cutoff = self._clock() + self.interrupt_grace
        for attempt in self._running.values():
            if not attempt.stopped:
                attempt.stopped = True
                attempt.stop_reason = reason
                attempt.cancel_event().set()
                heapq.heappush(self._deadlines, (cutoff, next(self._deadline_seq), attempt))
        self._work.notify_all()
        self._main.notify_all()

    def interrupt(self, reason: BaseException, *, wait: bool = True) -> None:
        """Stop dispatching, cancel what has not started, give running bodies a grace period.

        Every attempt still running after ``interrupt_grace`` seconds (at
        once when ``wait`` is false) is stopped through its executor (a
        cancelled future, a terminated worker process) and its task cancelled.
        """
        self.interrupted = True
        with self.lock:
            self._halt(reason)
            deadline = time.monotonic() + (self.interrupt_grace if wait else 0.0)
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._main.wait(left)
            for attempt in list(self._running.values()):
                self._abandon(attempt)
                self.core.abandon_running(attempt.index, reason)
            self._wake_if_done()

    def _wake_if_done(self) -> None:
        if self.core.done:
            self._work.notify_all()
            self._main.notify_all()

    # -- dispatching to an executor's futures --------------------------------

    def _dispatch_until_done(self) -> None:
        """Feed the executor from this thread, at most ``max_workers`` attempts in flight.

        Each future settles the attempt through a done-callback, in
        whatever thread the executor settles it (a process executor's proxy
        thread, Dask's client loop); the callback records the outcome under
        the lock and wakes this thread, which submits what became ready. So
        no thread waits on an attempt, and a slot is free again as soon as
        its attempt is recorded, timed out or given up.
        """
        core = self.core
        while True:
            with self.lock:
                self._expire_deadlines()
                claimed = self._claim()
                if core.done:
                    return
                if not claimed:
                    self._main.wait(self._dispatch_timeout())
                    continue
            for attempt in claimed:
                self._dispatch(attempt)

    def _claim(self) -> list[Attempt]:
        """Begin ready tasks up to the in-flight bound (caller holds the lock)."""
        core = self.core
        claimed: list[Attempt] = []
        while len(self._running) < self.max_workers:
            i = core.next_task(self._clock())
            if i is None:
                break
            claimed.append(self._begin(i))
        if core.stopped and not self._halted:
            self._halt(None)  # next_task failed a task under fail_fast (open breaker)
        return claimed

    def _dispatch_timeout(self) -> float | None:
        """Return how long the dispatcher may sleep: until a deadline or a parked task falls due."""
        waits: list[float] = []
        if self._deadlines:
            waits.append(self._deadlines[0][0])
        due = self.core.next_due()
        if due is not None and len(self._running) < self.max_workers:
            waits.append(due)
        if not waits:
            return None
        return max(0.0, min(waits) - self._clock())

    def _dispatch(self, attempt: Attempt) -> None:
        """Submit one attempt (lock not held); its future's callback records the outcome."""
        core = self.core
        i = attempt.index
        task = core.tasks[i]
        # Log records of the body are the task's: executors that run it in
        # this process (async, in-process Dask) carry the context along.
        token = current_task.set(core.outcomes[i])
        try:
            injection = core.injections[i]
            kwargs = core.arguments(i)
            observer = self.hooks.observer
            if task.cache_key is not None and observer is not None:
                key = attempt.cache_key = task.cache_key(**kwargs)
                hit, cached_value = observer.cache_lookup(core.names[i], key)
                if hit:
                    self._settle(
                        attempt, (cached_value, None, None, True, attempt.started, self._clock())
                    )
                    return
            call = TaskCall(
                core.names[i],
                task.func,
                kwargs,
                injection.wants_context,
                injection.kind,
                attempt.number,
                core.levels[i],
                task.timeout,
            )
            future = self.executor.submit(call, self._context(i, attempt))
        except Exception as exc:  # e.g. arguments that do not pickle
            text = traceback.format_exc()
            self._settle(attempt, (None, exc, text, False, attempt.started, self._clock()))
            return
        finally:
            current_task.reset(token)
        attempt.future = future
        if attempt.abandoned:  # timed out or given up while submitting: stop it now
            self.executor.cancel(future)
        future.add_done_callback(functools.partial(self._settled, attempt))

    def _settled(self, attempt: Attempt, future: Future[Any]) -> None:
        """Done-callback of an attempt's future: record its outcome and wake the dispatcher."""
        if attempt.abandoned:
            # Given up under the lock (whose holder may be the thread running this callback).
            return
        ended = self._clock()
        value: Any = None
        error: BaseException | None = None
        text: str | None = None
        if future.cancelled():
            error = CancelledError()
        else:
            error = future.exception()
            if error is None:
                value = future.result()
            else:
                text = "".join(traceback.format_exception(error))
                timeout = self.core.tasks[attempt.index].timeout
                if isinstance(error, TimeoutError) and timeout is not None:
                    # asyncio.timeout and executors report a timeout as TimeoutError.
                    cause = error
                    error = TaskTimeoutError(self.core.outcomes[attempt.index].name, timeout)
                    error.__cause__ = cause
        self._settle(attempt, (value, error, text, False, attempt.started, ended))

    def _settle(self, attempt: Attempt, ran: _Ran) -> None:
        """Record an attempt, then submit what it made ready from this same thread.

        Like a worker thread that takes the next task itself, the thread
        that settles a future (the executor's) submits the follow-ups, so a
        chain does not wait for the dispatcher to wake up. A submission that
        settles at once (a cache hit) is left to the dispatcher instead of
        recursing.
        """
        nested = getattr(_dispatching, "active", False)
        with self.lock:
            self._record(attempt, ran)
            claimed = [] if nested else self._claim()
            self._main.notify()
        if claimed:
            _dispatching.active = True
            try:
                for follower in claimed:
                    self._dispatch(follower)
            finally:
                _dispatching.active = False

    # -- worker threads ----------------------------------------------------

    def _spawn_worker(self) -> None:
        thread = threading.Thread(target=self._worker, name="pipeopt-worker", daemon=True)
        self._workers.append(thread)
        thread.start()

    def _run_in_caller(self) -> None:
        core = self.core
        while True:
            with self.lock:
                if core.done:
                    return
                i = core.next_task(self._clock())
                if i is None:
                    due = core.next_due()
                    if due is None:
                        return
                    wait = max(0.0, due - self._clock())
                else:
                    attempt = self._begin(i)
            if i is None:
                time.sleep(wait)
                continue
            ran = self._run_body(attempt)
            timeout = core.tasks[attempt.index].timeout
            if ran[1] is None and timeout is not None and ran[5] - ran[4] > timeout:
                # The caller's thread cannot be interrupted: judge the attempt when it returns.
                name = core.outcomes[attempt.index].name
                ran = (None, TaskTimeoutError(name, timeout), None, False, ran[4], ran[5])
            with self.lock:
                self._record(attempt, ran)
            if isinstance(ran[1], KeyboardInterrupt):
                # Ctrl-C (or SIGTERM) landed in the body, which runs in this thread.
                raise ran[1]

    def _over(self) -> bool:
        return self.core.done or self.core.stopped

    def _worker(self) -> None:
        """Pull ready tasks until the run is over.

        A worker whose bodies finish in microseconds claims several ready
        tasks per lock acquisition (in priority order), so tiny tasks do not
        spend their time fighting over the scheduler's lock; a worker with
        slower bodies claims one at a time, which keeps the load balanced.
        """
        core = self.core
        lock = self.lock
        clock = self._clock
        claim = 1
        lock.acquire()
        try:
            while True:
                if self._over():
                    self._main.notify()
                    self._work.notify_all()
                    return
                i = core.next_task(clock())
                if i is None:
                    if core.stopped and not self._halted:
                        self._halt(None)  # next_task failed a task under fail_fast (open breaker)
                    if self._over():
                        continue  # next_task itself failed the last tasks (open breaker)
                    due = core.next_due()
                    self._idle += 1
                    self._work.wait(None if due is None else max(0.0, due - clock()))
                    self._idle -= 1
                    continue
                batch = [self._begin(i)]
                if claim > 1 and core.ready_count >= claim * self.max_workers:
                    while len(batch) < claim:
                        j = core.next_task(clock())
                        if j is None:
                            break
                        batch.append(self._begin(j))
                lock.release()
                outcomes: list[_Ran] = []
                slow = False
                try:
                    for attempt in batch:
                        ran = self._run_body(attempt)
                        outcomes.append(ran)
                        if ran[5] - ran[4] > _FAST_BODY_SECONDS:
                            slow = True
                            break
                finally:
                    lock.acquire()
                claim = 1 if slow else _FAST_CLAIM
                abandoned = False
                for attempt, ran in zip(batch, outcomes, strict=False):
                    abandoned |= attempt.abandoned
                    self._record(attempt, ran)
                for attempt in batch[len(outcomes) :]:
                    # Claimed behind a body that turned out slow: let other workers have it.
                    if not attempt.abandoned:
                        del self._running[attempt.index]
                        core.unclaim(attempt.index)
                if abandoned:
                    # A fresh worker took this slot when the attempt timed out.
                    return
        finally:
            lock.release()
            close_thread_loop()

    def _begin(self, i: int) -> Attempt:
        core = self.core
        outcome = core.outcomes[i]
        task = core.tasks[i]
        now = self._clock()
        wall = time.time()
        if outcome.started_at is None:
            outcome.started_at = wall
        deadline = now + task.timeout if task.timeout is not None else None
        attempt = Attempt(i, outcome.attempts, wall, now, deadline)
        self._running[i] = attempt
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._deadline_seq), attempt))
            self._main.notify()
        return attempt

    def _run_body(self, attempt: Attempt) -> _Ran:
        """Run one attempt outside the lock and return how it went.

        Nothing here writes the attempt's outcome: the main thread may time
        the attempt out meanwhile, and only :meth:`_record`, under the lock,
        decides which verdict stands.
        """
        core = self.core
        i = attempt.index
        task = core.tasks[i]
        clock = self._clock
        started = clock()
        token = current_task.set(core.outcomes[i])  # log records of the body are the task's
        try:
            injection = core.injections[i]
            if core.special[i]:
                kwargs = core.arguments(i)
            else:  # core.arguments' plain case, inline: one call less per task
                results = core.results
                kwargs = {param: results[dep] for param, dep in injection.by_name}
                for dep in injection.rest_as_kwargs:
                    kwargs[dep] = results[dep]
            observer = self.hooks.observer
            if task.cache_key is not None and observer is not None:
                key = attempt.cache_key = task.cache_key(**kwargs)
                hit, cached_value = observer.cache_lookup(core.names[i], key)
                if hit:
                    return (cached_value, None, None, True, started, clock())
            if self._own_threads:
                if injection.wants_context:
                    kwargs["context"] = self._context(i, attempt)
                out = task.func(**kwargs)
                value = resolve_output(out, injection.kind, task.timeout)
                return (value, None, None, False, started, clock())
            call = TaskCall(
                core.names[i],
                task.func,
                kwargs,
                injection.wants_context,
                injection.kind,
                attempt.number,
                core.levels[i],
                task.timeout,
            )
            # Worker threads serve inline executors only; the others are dispatched to.
            context = self._context(i, attempt) if injection.wants_context else None
            value = self.executor.run_inline(call, context)  # type: ignore[attr-defined]
            return (value, None, None, False, started, clock())
        except BaseException as exc:
            error: BaseException = exc
            text = traceback.format_exc()
            if isinstance(exc, TimeoutError) and task.timeout is not None:
                # asyncio.wait_for and executors report a timeout as TimeoutError.
                error = TaskTimeoutError(task.name, task.timeout)
                error.__cause__ = exc
            return (None, error, text, False, started, clock())
        finally:
            current_task.reset(token)

    def _record(self, attempt: Attempt, ran: _Ran) -> None:
        """Record how an attempt went (caller holds the lock); ignore abandoned ones."""
        if attempt.abandoned:
            return
        attempt.value, attempt.error, attempt.text, attempt.cached = ran[:4]
        attempt.started, attempt.ended = ran[4], ran[5]
        del self._running[attempt.index]
        error = attempt.error
        if error is not None and not attempt.stopped and isinstance(error, _STOPS_THE_RUN):
            # A body (or, under the sync executor, Ctrl-C in it) interrupted the run.
            self.interrupted = True
            attempt.stopped, attempt.stop_reason = True, error
            self._halt(error)
        if error is not None and attempt.stopped:
            self._finish_stopped(attempt)
        else:
            self._finish_attempt(attempt)

    def _finish_stopped(self, attempt: Attempt) -> None:
        """Record an attempt the run stopped and that did not succeed: its task is cancelled."""
        core = self.core
        i = attempt.index
        record = AttemptRecord(
            attempt.number,
            attempt.started_wall,
            attempt.ended - attempt.started,
            attempt.error,
            attempt.text,
        )
        core.abandon_running(i, attempt.stop_reason, record)
        observer = self.hooks.observer
        if observer is not None:
            outcome = core.outcomes[i]
            observer.attempt_finished(outcome.name, record, outcome.state)
        self._wake_if_done()

    def _finish_attempt(self, attempt: Attempt) -> None:
        core = self.core
        now = self._clock()
        i = attempt.index
        error, value = attempt.error, attempt.value
        record = AttemptRecord(
            attempt.number,
            attempt.started_wall,
            attempt.ended - attempt.started,
            error,
            attempt.text,
        )
        if error is None:
            woken = core.cached(i, value) if attempt.cached else core.succeed(i, value, record)
            observer = self.hooks.observer
            if observer is not None:
                name = core.outcomes[i].name
                observer.attempt_finished(name, record, core.outcomes[i].state)
                observer.task_succeeded(name, value, attempt.cache_key)
            if woken > 1 and self._idle:
                self._work.notify(woken - 1)
        else:
            retried = core.fail(attempt.index, error, record, now)
            if self.hooks.observer is not None:
                outcome = core.outcomes[i]
                self.hooks.observer.attempt_finished(outcome.name, record, outcome.state)
            if retried and self._idle:
                self._work.notify()
            elif core.stopped:
                if self._halted:
                    self._work.notify_all()
                else:
                    self._halt(None)  # fail_fast: stop what still runs
        if core.done:
            self._work.notify_all()
            self._main.notify()

    def _context(self, i: int, attempt: Attempt) -> ExecutionContext:
        core = self.core
        task = core.tasks[i]
        hooks = self.hooks
        name = core.groups[i]  # items share their task's batcher

        def batcher() -> Batcher:
            found = hooks.batchers.get(name)
            if found is None:
                found = hooks.batchers[name] = hooks.batcher_factory(name)
            return found

        def template() -> Batcher:
            found = hooks.batchers.get(name)
            return found if found is not None else hooks.batcher_factory(name)

        return ExecutionContext(
            core.names[i],
            attempt=attempt.number,
            run_id=hooks.run_id,
            lineage_id=hooks.lineage_id,
            criticality=LABELS[core.levels[i]],
            dependencies=task.dependency_names,
            results=core.inputs(i) if core.special[i] else core.results,
            batcher_factory=batcher,
            batcher_template=template,
            custom_metrics=core.outcomes[i].custom_metrics,
            cancelled=attempt.cancel_event(),
            batch_observer=hooks.batch_observer,
        )


__all__ = ["Attempt", "RunHooks", "RunLoop", "RunObserver", "SchedulerCore"]
