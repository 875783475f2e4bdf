"""The run loop: drive a :class:`~pipeopt.scheduler.SchedulerCore` with an executor.

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
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Future
from typing import TYPE_CHECKING, Any

from pipeopt.attempt import Attempt, attempt_call, attempt_context
from pipeopt.errors import (
    TaskTimeoutError,
)
from pipeopt.executors.base import (
    PLAIN_RESULTS,
    SyncExecutor,
    ThreadExecutor,
    close_thread_loop,
    resolve_output,
)
from pipeopt.hooks import RunHooks, RunObserver
from pipeopt.logs import current as current_task
from pipeopt.result import AttemptRecord
from pipeopt.scheduler import SchedulerCore

if TYPE_CHECKING:
    from pipeopt.executors.base import Executor

_dispatching = threading.local()  # set while a callback thread submits follow-ups
# (value, error, traceback text, cached, started, ended) of one attempt.
_Ran = tuple[Any, BaseException | None, str | None, bool, float, float]
_FAST_BODY_SECONDS = 50e-6  # bodies faster than this are claimed several at a time
_FAST_CLAIM = 32  # per lock acquisition: fewer hand-offs of the lock between 8+ workers
# Raised by a body (or delivered into one by a signal): the run stops, the task is cancelled.
_STOPS_THE_RUN = (KeyboardInterrupt, SystemExit)
_wall_clock = time.time
_new_tuple = tuple.__new__
_set_task, _reset_task = current_task.set, current_task.reset


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
        self._observer = hooks.observer
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
            attempt.ended = now
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
        claimed = self._begin_all(core.take(self._clock(), self.max_workers - len(self._running)))
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
            kwargs = core.arguments(i)
            observer = self._observer
            if task.cache_key is not None and observer is not None:
                key = attempt.cache_key = task.cache_key(**kwargs)
                hit, cached_value = observer.cache_lookup(core.names[i], key)
                if hit:
                    self._settle(
                        attempt, (cached_value, None, None, True, attempt.started, self._clock())
                    )
                    return
            call = attempt_call(self.core, i, attempt, kwargs)
            future = self.executor.submit(call, attempt_context(self.core, self.hooks, i, attempt))
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
        run_body, record_all, begin_all = self._run_body, self._record_all, self._begin_all
        take, workers = core.take, self.max_workers
        claim = 1
        lock.acquire()
        try:
            while True:
                if self._over():
                    self._main.notify()
                    self._work.notify_all()
                    return
                wanted = claim if claim > 1 and core.ready_count >= claim * workers else 1
                taken = take(clock(), wanted)
                if not taken:
                    if core.stopped and not self._halted:
                        self._halt(None)  # take failed a task under fail_fast (open breaker)
                    if self._over():
                        continue  # take itself failed the last tasks (open breaker)
                    due = core.next_due()
                    self._idle += 1
                    self._work.wait(None if due is None else max(0.0, due - clock()))
                    self._idle -= 1
                    continue
                batch = begin_all(taken)
                lock.release()
                outcomes: list[_Ran] = []
                slow = False
                try:
                    for attempt in batch:
                        ran = run_body(attempt)
                        outcomes.append(ran)
                        if ran[5] - ran[4] > _FAST_BODY_SECONDS:
                            slow = True
                            break
                finally:
                    lock.acquire()
                claim = 1 if slow else _FAST_CLAIM
                abandoned = record_all(batch, outcomes)
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
        return self._begin_all((i,))[0]

    def _begin_all(self, indices: Sequence[int]) -> list[Attempt]:
        """Start an attempt of each task taken (caller holds the lock)."""
        core = self.core
        outcomes, tasks, running = core.outcomes, core.tasks, self._running
        now = self._clock()
        wall = _wall_clock()
        attempts: list[Attempt] = []
        for i in indices:
            outcome = outcomes[i]
            if outcome.started_at is None:
                outcome.started_at = wall
            timeout = tasks[i].timeout
            if timeout is None:
                attempt = running[i] = Attempt(i, outcome.attempts, wall, now, None)
            else:
                deadline = now + timeout
                attempt = running[i] = Attempt(i, outcome.attempts, wall, now, deadline)
                heapq.heappush(self._deadlines, (deadline, next(self._deadline_seq), attempt))
                self._main.notify()
            attempts.append(attempt)
        return attempts

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
        token = _set_task(core.outcomes[i])  # log records of the body are the task's
        started = clock()
        try:
            injection = core.injections[i]
            if core.special[i]:
                kwargs = core.arguments(i)
            else:  # core.arguments' plain case, inline: one call less per task
                kwargs = {}
                results = core.results
                for param, dep in injection.by_name:
                    kwargs[param] = results[dep]
                for dep in injection.rest_as_kwargs:
                    kwargs[dep] = results[dep]
            if task.cache_key is not None and self._observer is not None:
                key = attempt.cache_key = task.cache_key(**kwargs)
                hit, cached_value = self._observer.cache_lookup(core.names[i], key)
                if hit:
                    return (cached_value, None, None, True, started, clock())
            if self._own_threads:
                if injection.wants_context:
                    kwargs["context"] = attempt_context(self.core, self.hooks, i, attempt)
                value = task.func(**kwargs)
                kind = injection.kind
                if kind != "function" or type(value) not in PLAIN_RESULTS:
                    value = resolve_output(value, kind, task.timeout)
                return (value, None, None, False, started, clock())
            call = attempt_call(self.core, i, attempt, kwargs)
            # Worker threads serve inline executors only; the others are dispatched to.
            context = (
                attempt_context(self.core, self.hooks, i, attempt)
                if injection.wants_context
                else None
            )
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
            _reset_task(token)

    def _record(self, attempt: Attempt, ran: _Ran) -> None:
        """Record how an attempt went (caller holds the lock); ignore an abandoned one."""
        self._record_all((attempt,), (ran,))

    def _record_all(self, attempts: Sequence[Attempt], outcomes: Sequence[_Ran]) -> bool:
        """Record how each attempt went, in order (caller holds the lock); ignore abandoned ones.

        Successes, the common case, are recorded here in one loop; the rest
        go through :meth:`_record_failure`. Return whether any was abandoned.
        """
        core = self.core
        running = self._running
        observer = self._observer
        succeed = core.succeed
        woken = 0
        abandoned = False
        for attempt, ran in zip(attempts, outcomes, strict=False):
            if attempt.abandoned:
                abandoned = True
                continue
            i = attempt.index
            del running[i]
            value, error, _, cached, started, ended = ran
            if error is not None:
                self._record_failure(attempt, ran)
                continue
            # tuple.__new__ skips the named tuple's own __new__, a Python frame per attempt.
            record = _new_tuple(
                AttemptRecord, (attempt.number, attempt.started_wall, ended - started, None, None)
            )
            woken += core.cached(i, value) if cached else succeed(i, value, record)
            if observer is not None:
                name = core.names[i]
                observer.attempt_finished(name, record, core.outcomes[i].state)
                observer.task_succeeded(name, value, attempt.cache_key)
        if woken > 1 and self._idle:
            self._work.notify(woken - 1)
        if core.finished == core.total:
            self._work.notify_all()
            self._main.notify()
        return abandoned

    def _record_failure(self, attempt: Attempt, ran: _Ran) -> None:
        """Record an attempt that raised (caller holds the lock; its slot is free already)."""
        _, error, text, _, started, ended = ran
        assert error is not None
        attempt.error, attempt.text, attempt.started, attempt.ended = error, text, started, ended
        if not attempt.stopped and isinstance(error, _STOPS_THE_RUN):
            # A body (or, under the sync executor, Ctrl-C in it) interrupted the run.
            self.interrupted = True
            attempt.stopped, attempt.stop_reason = True, error
            self._halt(error)
        if attempt.stopped:
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
        observer = self._observer
        if observer is not None:
            outcome = core.outcomes[i]
            observer.attempt_finished(outcome.name, record, outcome.state)
        self._wake_if_done()

    def _finish_attempt(self, attempt: Attempt) -> None:
        """Record a failed attempt (caller holds the lock): retry, fail, or stop the run."""
        core = self.core
        i = attempt.index
        error = attempt.error
        assert error is not None
        record = AttemptRecord(
            attempt.number,
            attempt.started_wall,
            attempt.ended - attempt.started,
            error,
            attempt.text,
        )
        retried = core.fail(i, error, record, self._clock())
        observer = self._observer
        if observer is not None:
            outcome = core.outcomes[i]
            observer.attempt_finished(outcome.name, record, outcome.state)
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


__all__ = ["Attempt", "RunHooks", "RunLoop", "RunObserver"]
