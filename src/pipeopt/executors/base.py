"""The executor protocol: executors only run task bodies.

The scheduler, retries, breakers and metrics stay in the driver. A worker
slot of the run loop takes a ready task, builds a :class:`TaskCall` and hands
it to the executor:

* an *inline* executor (``ThreadExecutor``, ``SyncExecutor``) is called as
  ``executor.run_inline(call, context)`` in the slot's own thread;
* any other executor gets ``executor.submit(call, context) -> Future`` and
  the slot waits on the future; on a timeout or an interrupt the run loop
  calls ``executor.cancel(future)``.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pipeopt.context import ExecutionContext
    from pipeopt.injection import BodyKind


WORKER_NAME = "pipeopt-worker"
MAIN_GUARD_EXIT = 86  # the exit code of a worker that found the driver's script running a pipeline


def exit_if_importing_main() -> None:
    """Exit at once in a pipeopt worker process that is still importing the driver's script.

    Worker processes import the driver's ``__main__`` script before they
    serve attempts. A script without an ``if __name__ == "__main__":``
    guard would start a run from there; the worker exits with
    ``MAIN_GUARD_EXIT`` instead, and the driver turns that into one clear
    :class:`~pipeopt.errors.MissingMainGuardError`.
    """
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return
    current = process.current_process()
    if getattr(current, "_inheriting", False) and current.name == WORKER_NAME:
        os._exit(MAIN_GUARD_EXIT)


@dataclass(frozen=True, slots=True)
class TaskCall:
    """One attempt of one task body, with its arguments resolved.

    ``kwargs`` holds the upstream results by parameter name but not the
    context: ``wants_context`` says whether the body takes one.
    """

    task: str
    func: Callable[..., Any]
    kwargs: dict[str, Any]
    wants_context: bool
    kind: BodyKind
    attempt: int
    level: int
    timeout: float | None


@runtime_checkable
class Executor(Protocol):
    """Anything that can run task bodies for the scheduler."""

    name: str
    inline: bool

    def start(self, max_workers: int) -> None:
        """Prepare to run up to ``max_workers`` bodies at once."""

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Start ``call`` and return a future of its result (non-inline executors)."""

    def cancel(self, future: Future[Any]) -> bool:
        """Try to stop a submitted call; return whether it was stopped."""

    def shutdown(self, *, cancel: bool = False) -> None:
        """Release the executor's resources."""


_loops = threading.local()


def _run_coroutine(awaitable: Any, timeout: float | None) -> Any:
    runner: asyncio.Runner | None = getattr(_loops, "runner", None)
    if runner is None:
        runner = asyncio.Runner()
        _loops.runner = runner
    # The runner would otherwise run every coroutine in the context of its first
    # one: the caller's context says which task the body's log records belong to.
    context = contextvars.copy_context()
    if timeout is not None:
        return runner.run(asyncio.wait_for(awaitable, timeout), context=context)
    return runner.run(awaitable, context=context)


def close_thread_loop() -> None:
    """Close the calling thread's event loop for coroutine bodies, if it made one."""
    runner: asyncio.Runner | None = getattr(_loops, "runner", None)
    if runner is not None:
        _loops.runner = None
        runner.close()


async def _collect_async(agen: Any) -> list[Any]:
    return [item async for item in agen]


#: Result types a plain function's result is returned as without a further look.
PLAIN_RESULTS = frozenset({type(None), int, float, str, bytes, list, dict, tuple, set, bool})


def resolve_output(out: Any, kind: BodyKind, timeout: float | None) -> Any:
    """Turn what a body returned into its result.

    Generators are drained into a list; coroutines and async generators run
    on the calling thread's event loop, cancelled for real at ``timeout``.
    """
    if type(out) in PLAIN_RESULTS and kind == "function":
        return out
    if kind == "generator" or inspect.isgenerator(out):
        return list(out)
    if kind == "async_generator" or inspect.isasyncgen(out):
        return _run_coroutine(_collect_async(out), timeout)
    if inspect.isawaitable(out):
        return _run_coroutine(out, timeout)
    return out


def invoke(call: TaskCall, context: ExecutionContext | None) -> Any:
    """Run one task body in the calling thread and return its result."""
    kwargs = call.kwargs
    if call.wants_context:
        kwargs = {**kwargs, "context": context}
    return resolve_output(call.func(**kwargs), call.kind, call.timeout)


class ThreadExecutor:
    """Run bodies in the scheduler's worker threads (the default, for I/O-bound work).

    A thread cannot be killed: when an attempt times out, its task is failed
    (and retried if its policy allows), the worker slot is handed to a fresh
    thread, and the abandoned thread runs on until the body returns; its
    result is then discarded. Bodies should check ``context.cancelled``.
    """

    name = "thread"
    inline = True

    def start(self, max_workers: int) -> None:
        """Nothing to prepare: the run loop owns the threads."""

    def run_inline(self, call: TaskCall, context: ExecutionContext) -> Any:
        """Run ``call`` in the calling worker thread."""
        return invoke(call, context)

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Run ``call`` now and return a completed future (for callers outside the run loop)."""
        future: Future[Any] = Future()
        try:
            future.set_result(invoke(call, context))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def cancel(self, future: Future[Any]) -> bool:
        """Threads cannot be cancelled once started."""
        return future.cancel()

    def shutdown(self, *, cancel: bool = False) -> None:
        """Nothing to release."""


class SyncExecutor(ThreadExecutor):
    """Run every body in the caller's thread, one at a time (for debugging).

    ``pdb`` and profilers see the task bodies in the main thread; timeouts
    are checked after a body returns.
    """

    name = "sync"
