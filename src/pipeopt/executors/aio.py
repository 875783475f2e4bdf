"""Run coroutine bodies on one event loop (``executor="async"``).

Policy
    :class:`AsyncExecutor` owns one event loop running in a background
    thread. Coroutine and async-generator bodies are scheduled on it with
    :func:`asyncio.run_coroutine_threadsafe`, at most ``max_workers`` at a
    time (a semaphore on the loop); plain and generator bodies run in a
    bounded pool of ``max_workers`` daemon threads beside it, and an
    awaitable that a plain function returns is awaited on the shared loop
    too, so every coroutine of a run shares one loop (and its connection
    pools, if the bodies keep some on it).

Timeouts and cancellation
    ``cancel(future)`` of a coroutine attempt cancels its task on the loop:
    the body sees :class:`asyncio.CancelledError` at its current ``await``
    and its ``finally`` blocks run, and the attempt's future is cancelled
    (the run loop records whether that was a timeout or the run stopping). An
    attempt also stops itself at its task's ``timeout``
    (``asyncio.timeout``), so a coroutine is cancelled even without the run
    loop's deadline. A plain body already running in the thread pool
    cannot be stopped, as with the thread executor: it is abandoned, runs
    to its end, and its result is discarded.

Shutdown
    ``shutdown()`` waits up to ``shutdown_timeout`` seconds for coroutines
    still on the loop, then cancels them; ``shutdown(cancel=True)`` cancels
    them at once. The loop is then closed and its thread joined.

A coroutine that never yields
    A body that blocks the loop (``time.sleep``, a busy loop, a blocking
    driver call inside ``async def``) cannot be cancelled: cancellation is
    delivered at an ``await``. The run loop still fails it at its
    ``timeout`` with :class:`~pipeopt.errors.TaskTimeoutError` and the run
    goes on, but every other coroutine of the run waits behind it (give
    such tasks a timeout). At the end of the run ``shutdown()`` sees that
    the loop does not answer within half a second, asks it to cancel its
    tasks and stop once the body gives control back, and returns without
    waiting; the loop's daemon thread runs the body to its end and then
    stops, or dies with the process. The next run gets a fresh loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from pipeopt._validate import check_float
from pipeopt.executors.base import resolve_output
from pipeopt.executors.process import AttemptFuture

if TYPE_CHECKING:
    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall

__all__ = ["AsyncExecutor"]

_log = logging.getLogger("pipeopt.executors")
_ASYNC_KINDS = ("coroutine", "async_generator")
_LOOP_RESPONSE = 0.5  # seconds a healthy loop needs, at most, to run a callback
_DRAIN_SLACK = 2.0  # seconds beyond the grace period for cancelled coroutines to unwind


class _DaemonPool:
    """At most ``size`` daemon threads running plain bodies.

    Daemon threads, unlike ``ThreadPoolExecutor``'s, do not hold up
    interpreter exit when an abandoned body never returns.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._work: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any], future: Future[Any]) -> Future[Any]:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._serve, name="pipeopt-async-sync", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._work.put((fn, future))
        return future

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            fn, future = item
            if _claim(future):
                try:
                    value = fn()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(value)
            with self._lock:
                self._idle += 1

    def shutdown(self) -> None:
        """Cancel bodies not started; idle threads exit, busy ones when their body returns."""
        with self._lock:
            threads, self._threads = self._threads, []
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].cancel()
        for _ in threads:
            self._work.put(None)


class AsyncExecutor:
    """Run coroutine bodies on one shared event loop (``executor="async"``).

    Best for I/O-bound work written with ``async def`` (HTTP clients,
    database drivers with asyncio support): thousands of waits cost one
    thread. The body gets the real :class:`~pipeopt.context.ExecutionContext`
    (same process), so ``context.cancelled`` works.

    Args:
        shutdown_timeout: seconds ``shutdown()`` waits for coroutines still
            running before it cancels them.
    """

    name = "async"
    inline = False

    def __init__(self, *, shutdown_timeout: float = 5.0) -> None:
        self.shutdown_timeout = check_float("shutdown_timeout", shutdown_timeout, minimum=0.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._limit: asyncio.Semaphore | None = None
        self._pool: _DaemonPool | None = None
        # The loop's future of each coroutine attempt, by the future handed out.
        self._inner: dict[Future[Any], Future[Any]] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """Return the executor's event loop while it is started, else ``None``."""
        return self._loop

    def start(self, max_workers: int) -> None:
        """Start the event loop thread; allow ``max_workers`` bodies at once."""
        if self._loop is not None:
            self.shutdown(cancel=True)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(
            target=_run_forever, args=(loop, ready), name="pipeopt-async-loop", daemon=True
        )
        thread.start()
        ready.wait()
        self._loop, self._thread = loop, thread
        self._limit = asyncio.Semaphore(max_workers)
        self._pool = _DaemonPool(max_workers)

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Schedule a coroutine body on the loop, or a plain body in the thread pool.

        Raises:
            RuntimeError: the executor is not started.
        """
        loop, pool = self._loop, self._pool
        if loop is None or pool is None:
            raise RuntimeError("the async executor is not started; call start(max_workers)")
        outer = AttemptFuture(call.task, call.timeout)
        if call.kind in _ASYNC_KINDS:
            inner = asyncio.run_coroutine_threadsafe(self._run_async(call, context), loop)
            self._inner[outer] = inner
            inner.add_done_callback(functools.partial(self._copy, outer))
            return outer
        # The body's thread sees the submitter's context variables (the task its logs go to).
        submitted = contextvars.copy_context()
        return pool.submit(lambda: submitted.run(self._run_sync, call, context, loop), outer)

    def _copy(self, outer: AttemptFuture, inner: Future[Any]) -> None:
        self._inner.pop(outer, None)
        if inner.cancelled():
            outer.stop()
            return
        error = inner.exception()
        with contextlib.suppress(InvalidStateError):  # the outer future was cancelled first
            if error is None:
                outer.set_result(inner.result())
            else:
                outer.set_exception(error)

    async def _run_async(self, call: TaskCall, context: ExecutionContext) -> Any:
        assert self._limit is not None
        async with self._limit, asyncio.timeout(call.timeout):
            out = call.func(**_arguments(call, context))
            if inspect.isasyncgen(out):
                return [item async for item in out]
            return await out

    @staticmethod
    def _run_sync(
        call: TaskCall, context: ExecutionContext, loop: asyncio.AbstractEventLoop
    ) -> Any:
        out = call.func(**_arguments(call, context))
        if inspect.isawaitable(out) or inspect.isasyncgen(out):
            # A plain function that returns a coroutine: await it on the shared loop.
            return asyncio.run_coroutine_threadsafe(_await(out, call.timeout), loop).result()
        return resolve_output(out, call.kind, call.timeout)

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel the attempt: a coroutine is cancelled on the loop, a queued body dropped.

        Returns ``False`` for a plain body already running in a thread,
        which cannot be stopped.
        """
        inner = self._inner.pop(future, None)
        if inner is not None:
            inner.cancel()  # cancels the task on the loop
        # Settled last, so that the thread waiting on it wakes after the caller's bookkeeping.
        if isinstance(future, AttemptFuture) and (inner is not None or not future.running()):
            return future.stop()
        return future.cancel()

    def shutdown(self, *, cancel: bool = False) -> None:
        """Cancel or finish the coroutines still on the loop, then close it; never hang.

        A loop that does not answer within ``_LOOP_RESPONSE`` seconds is
        blocked by a coroutine that never yields (see the module's docs):
        it is told to cancel everything and stop as soon as it gets control
        back, and left behind without waiting.
        """
        loop, thread, pool = self._loop, self._thread, self._pool
        self._loop = self._thread = self._pool = self._limit = None
        if pool is not None:
            pool.shutdown()
        if loop is None or thread is None:
            return
        if not _responsive(loop):
            asyncio.run_coroutine_threadsafe(_wind_down(loop, 0.0), loop)
            _log.warning(
                "the async executor's event loop is blocked by a coroutine that does not yield "
                "(a blocking call in an async def body?); its thread is left behind and stops "
                "when the body returns, or with the process"
            )
            return
        grace = 0.0 if cancel else self.shutdown_timeout
        asyncio.run_coroutine_threadsafe(_wind_down(loop, grace), loop)
        thread.join(grace + _DRAIN_SLACK)


def _responsive(loop: asyncio.AbstractEventLoop) -> bool:
    """Return whether ``loop`` runs a callback within ``_LOOP_RESPONSE`` seconds."""
    answered = threading.Event()
    try:
        loop.call_soon_threadsafe(answered.set)
    except RuntimeError:  # closed already
        return False
    return answered.wait(_LOOP_RESPONSE)


def _claim(future: Future[Any]) -> bool:
    """Mark a queued body's future running; ``False`` if it was stopped meanwhile."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # already failed by a timeout
        return False


def _arguments(call: TaskCall, context: ExecutionContext) -> dict[str, Any]:
    if call.wants_context:
        return {**call.kwargs, "context": context}
    return call.kwargs


async def _await(out: Any, timeout: float | None) -> Any:
    async with asyncio.timeout(timeout):
        if inspect.isasyncgen(out):
            return [item async for item in out]
        return await out


def _run_forever(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    try:
        loop.run_forever()
    finally:
        # Closed here, by its own thread, so that a loop left behind blocked closes too.
        loop.close()


async def _wind_down(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """Drain the loop (see :func:`_drain`), then stop it; its thread then closes it."""
    try:
        await _drain(loop, grace)
    finally:
        loop.stop()


async def _drain(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    """Wait up to ``grace`` seconds for the loop's other tasks, cancel the rest."""
    me = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks(loop) if task is not me]
    if tasks and grace > 0:
        await asyncio.wait(tasks, timeout=grace)
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()
