"""The scheduling state machine and the threaded run loop.

Policy
    A task becomes *ready* when all its dependencies have succeeded. Ready
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
    are skipped (unless ``fail_fast`` cancels everything not started).

Drivers
    :class:`RunLoop` runs the core with ``max_workers`` worker threads
    that pull work themselves: the thread that finishes a task takes the
    next ready one under the same lock, so a chain never waits for a thread
    hand-off and the run needs no polling. The calling thread sleeps on a
    condition and wakes only for attempt deadlines, interrupts and the end.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pipeopt.context import ExecutionContext
from pipeopt.errors import CircuitOpenError, TaskTimeoutError, UpstreamFailedError
from pipeopt.executors.base import (
    SyncExecutor,
    TaskCall,
    ThreadExecutor,
    close_thread_loop,
    resolve_output,
)
from pipeopt.priority import LABELS, LeveledQueue
from pipeopt.result import AttemptRecord, TaskOutcome, TaskState

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.executors.base import Executor
    from pipeopt.graph import CompiledPipeline

_PARK_FOR_BUSY_BREAKER = 0.05  # re-check a half-open breaker whose trial slots are all taken
# (value, error, traceback text, cached, started, ended) of one attempt.
_Ran = tuple[Any, BaseException | None, str | None, bool, float, float]
_FAST_BODY_SECONDS = 50e-6  # bodies faster than this are claimed several at a time
_FAST_CLAIM = 8


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
    """The pure scheduling state machine of one run (callers hold the lock)."""

    def __init__(
        self,
        compiled: CompiledPipeline,
        *,
        fail_fast: bool = False,
        aging_interval: float | None = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.compiled = compiled
        self.fail_fast = fail_fast
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        n = len(compiled)
        self.outcomes = [
            TaskOutcome(name=task.name, criticality=LABELS[compiled.levels[i]])
            for i, task in enumerate(compiled.tasks)
        ]
        self.results: dict[str, Any] = {}
        self._remaining = [len(d) for d in compiled.dependencies]
        self._dependents = compiled.dependents
        self._breakers = [task.circuit_breaker for task in compiled.tasks]
        self._levels = compiled.levels
        self._ranks = [-cost for cost in compiled.critical_path]
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
                self._make_ready(i)

    def cached(self, i: int, result: Any) -> int:
        """Finish a running task with a result reused from the store; return tasks woken."""
        woken = self.succeed(i, result, None)
        self.outcomes[i].state = TaskState.CACHED
        self.outcomes[i].attempts = 0
        return woken

    def _make_ready(self, i: int) -> None:
        self.outcomes[i].state = TaskState.READY
        self._ready.push(i, self._levels[i], self._ranks[i])

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
        tasks = self.compiled.tasks
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
        breaker = self.compiled.tasks[i].circuit_breaker
        if breaker is not None:
            breaker.release()
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
        self.finished += 1
        self.completed.append(i)
        breaker = self._breakers[i]
        if breaker is not None:
            breaker.record_success()
        if self.stopped:
            return 0
        woken = 0
        remaining = self._remaining
        outcomes = self.outcomes
        for j in self._dependents[i]:
            remaining[j] -= 1
            if remaining[j] == 0 and outcomes[j].state is TaskState.PENDING:
                self._make_ready(j)
                woken += 1
        return woken

    def fail(self, i: int, error: BaseException, record: AttemptRecord, now: float) -> bool:
        """Record a failed attempt; return ``True`` if the task was parked for a retry."""
        outcome = self.outcomes[i]
        outcome.attempt_history.append(record)
        self.attempt_log.append((i, record.duration, True))
        self.active -= 1
        task = self.compiled.tasks[i]
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
        outcome = self.outcomes[i]
        outcome.state = TaskState.FAILED
        outcome.error = error
        outcome.traceback = text
        if outcome.started_at is None:
            outcome.started_at = time.time()
        outcome.finished_at = time.time()
        self.finished += 1
        self.failures_total += 1
        self.completed.append(i)
        name = outcome.name
        for j in self.compiled.descendants(i):
            dependent = self.outcomes[j]
            if dependent.state is TaskState.PENDING:
                dependent.state = TaskState.SKIPPED
                dependent.error = UpstreamFailedError(dependent.name, name)
                self.finished += 1
                self.completed.append(j)
        if self.fail_fast:
            self.stop()

    def stop(self, reason: BaseException | None = None) -> list[int]:
        """Stop dispatching and cancel every task that has not started.

        Returns the indices of the cancelled tasks. Running tasks are left to
        the driver.
        """
        self.stopped = True
        cancelled: list[int] = []
        for i, outcome in enumerate(self.outcomes):
            if outcome.state in (TaskState.PENDING, TaskState.READY, TaskState.RETRYING):
                outcome.state = TaskState.CANCELLED
                if reason is not None and outcome.error is None:
                    outcome.error = reason
                self.finished += 1
                self.completed.append(i)
                cancelled.append(i)
        self._ready.drain()
        self._parked.clear()
        return cancelled

    def abandon_running(self, i: int, error: BaseException) -> None:
        """Mark a running task cancelled (an interrupt gave up waiting for it)."""
        outcome = self.outcomes[i]
        if outcome.state is TaskState.RUNNING:
            outcome.state = TaskState.CANCELLED
            outcome.error = error
            outcome.finished_at = time.time()
            self.active -= 1
            self.finished += 1
            self.completed.append(i)
            breaker = self.compiled.tasks[i].circuit_breaker
            if breaker is not None:
                breaker.release()


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


class RunLoop:
    """Drive a :class:`SchedulerCore` with worker threads until every task is final.

    Args:
        core: the state machine of this run.
        executor: runs the bodies; inline executors run them in the workers.
        max_workers: how many bodies run at once.
        hooks: per-run services for the contexts.
        interrupt_grace: seconds an interrupt waits for running bodies.
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
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)
        self._main = threading.Condition(self.lock)
        self._running: dict[int, Attempt] = {}
        self._deadlines: list[tuple[float, int, Attempt]] = []
        self._deadline_seq = itertools.count()
        self._idle = 0
        self._workers: list[threading.Thread] = []
        self._clock = core.clock
        self.interrupted = False

    # -- the calling thread ------------------------------------------------

    def run(self, preloaded: Mapping[str, Any] | None = None) -> None:
        """Run the pipeline to the end; on ``KeyboardInterrupt`` stop cleanly and re-raise."""
        core = self.core
        with self.lock:
            core.start(preloaded)
            if core.done:
                return
        if self.executor.name == "sync":
            self._run_in_caller()
            return
        count = max(1, min(self.max_workers, core.total))
        try:
            # Inside the try: the first workers run bodies while the others start,
            # so an interrupt may arrive here already.
            for _ in range(count):
                self._spawn_worker()
            with self.lock:
                while not core.done:
                    self._expire_deadlines()
                    self._main.wait(self._main_timeout())
        except KeyboardInterrupt:
            self.interrupt(KeyboardInterrupt("interrupted"))
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
            timeout = self.core.compiled.tasks[attempt.index].timeout
            assert timeout is not None
            attempt.error = TaskTimeoutError(self.core.outcomes[attempt.index].name, timeout)
            attempt.value, attempt.cached, attempt.ended = None, False, now
            self._abandon(attempt)
            self._finish_attempt(attempt)
            # The stuck thread keeps running the body; a fresh one takes its slot.
            self._spawn_worker()

    def _abandon(self, attempt: Attempt) -> None:
        attempt.abandoned = True
        attempt.cancel_event().set()
        if attempt.future is not None:
            self.executor.cancel(attempt.future)
        del self._running[attempt.index]

    def interrupt(self, reason: BaseException) -> None:
        """Stop dispatching, cancel what has not started, give running bodies a grace period."""
        self.interrupted = True
        with self.lock:
            self.core.stop(reason)
            for attempt in self._running.values():
                attempt.cancel_event().set()
                if attempt.future is not None:
                    self.executor.cancel(attempt.future)
            self._work.notify_all()
            deadline = time.monotonic() + self.interrupt_grace
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._main.wait(left)
            for attempt in list(self._running.values()):
                self._abandon(attempt)
                self.core.abandon_running(attempt.index, reason)

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
            timeout = core.compiled.tasks[attempt.index].timeout
            if ran[1] is None and timeout is not None and ran[5] - ran[4] > timeout:
                # The caller's thread cannot be interrupted: judge the attempt when it returns.
                name = core.outcomes[attempt.index].name
                ran = (None, TaskTimeoutError(name, timeout), None, False, ran[4], ran[5])
            with self.lock:
                self._record(attempt, ran)

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
        task = core.compiled.tasks[i]
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
        compiled = core.compiled
        task = compiled.tasks[i]
        clock = self._clock
        started = clock()
        try:
            injection = compiled.injections[i]
            results = core.results
            kwargs = {param: results[dep] for param, dep in injection.by_name}
            for dep in injection.rest_as_kwargs:
                kwargs[dep] = results[dep]
            observer = self.hooks.observer
            if task.cache_key is not None and observer is not None:
                key = attempt.cache_key = task.cache_key(**kwargs)
                hit, cached_value = observer.cache_lookup(task.name, key)
                if hit:
                    return (cached_value, None, None, True, started, clock())
            if self._own_threads:
                if injection.wants_context:
                    kwargs["context"] = self._context(i, attempt)
                out = task.func(**kwargs)
                value = resolve_output(out, injection.kind, task.timeout)
                return (value, None, None, False, started, clock())
            call = TaskCall(
                task.name,
                task.func,
                kwargs,
                injection.wants_context,
                injection.kind,
                attempt.number,
                compiled.levels[i],
                task.timeout,
            )
            if self.executor.inline:
                context = self._context(i, attempt) if injection.wants_context else None
                value = self.executor.run_inline(call, context)  # type: ignore[attr-defined]
            else:
                future = self.executor.submit(call, self._context(i, attempt))
                attempt.future = future
                if attempt.abandoned:  # timed out while submitting: stop it now
                    self.executor.cancel(future)
                value = future.result()
            return (value, None, None, False, started, clock())
        except BaseException as exc:
            error: BaseException = exc
            text = traceback.format_exc()
            if isinstance(exc, TimeoutError) and task.timeout is not None:
                # asyncio.wait_for and executors report a timeout as TimeoutError.
                error = TaskTimeoutError(task.name, task.timeout)
                error.__cause__ = exc
            return (None, error, text, False, started, clock())

    def _record(self, attempt: Attempt, ran: _Ran) -> None:
        """Record how an attempt went (caller holds the lock); ignore abandoned ones."""
        if attempt.abandoned:
            return
        attempt.value, attempt.error, attempt.text, attempt.cached = ran[:4]
        attempt.started, attempt.ended = ran[4], ran[5]
        del self._running[attempt.index]
        self._finish_attempt(attempt)

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
        elif isinstance(error, KeyboardInterrupt | SystemExit):
            core.fail(attempt.index, error, record, now)
            core.stop(error)
            self._work.notify_all()
        else:
            retried = core.fail(attempt.index, error, record, now)
            if self.hooks.observer is not None:
                outcome = core.outcomes[i]
                self.hooks.observer.attempt_finished(outcome.name, record, outcome.state)
            if retried and self._idle:
                self._work.notify()
            elif core.stopped:
                self._work.notify_all()
        if core.done:
            self._work.notify_all()
            self._main.notify()

    def _context(self, i: int, attempt: Attempt) -> ExecutionContext:
        core = self.core
        task = core.compiled.tasks[i]
        hooks = self.hooks
        name = task.name

        def batcher() -> Batcher:
            found = hooks.batchers.get(name)
            if found is None:
                found = hooks.batchers[name] = hooks.batcher_factory(name)
            return found

        return ExecutionContext(
            task.name,
            attempt=attempt.number,
            run_id=hooks.run_id,
            criticality=LABELS[core.compiled.levels[i]],
            dependencies=task.dependency_names,
            results=core.results,
            batcher_factory=batcher,
            custom_metrics=core.outcomes[i].custom_metrics,
            cancelled=attempt.cancel_event(),
            batch_observer=hooks.batch_observer,
        )


__all__ = ["Attempt", "RunHooks", "RunLoop", "RunObserver", "SchedulerCore"]
