"""Run task bodies in worker processes, for CPU-bound work (``executor="process"``).

Policy
    :class:`ProcessExecutor` keeps one worker process per worker slot of the
    run (``max_workers``), started from a clean interpreter (``forkserver``
    where the platform has it, ``spawn`` elsewhere; never a bare ``fork`` of
    a driver that runs threads). Each process runs one attempt at a time: the
    driver pickles the :class:`~pipeopt.executors.base.TaskCall` (function by
    reference, arguments by value) in the submitting thread, a proxy thread
    per process sends it and waits for the pickled outcome, and the outcome's
    value or exception settles the attempt's future.

Context
    The :class:`~pipeopt.context.ExecutionContext` holds locks and the
    driver's batchers and cannot cross a process boundary; a body that takes
    ``context`` gets a :class:`RemoteContext` instead (task, attempt, run id,
    criticality, upstream results, a logger, ``record_custom_metric``,
    ``record_batch``). What it records travels back with the outcome and is
    replayed into the real context in the driver, success or failure.

Timeouts and cancellation
    ``cancel(future)`` on a queued attempt drops it; on a running attempt it
    terminates the worker process running it (``SIGTERM``, then ``SIGKILL``
    after ``terminate_grace`` seconds) and starts a fresh process in its
    place, so a timed-out body really stops and its slot is whole again. A
    body in a worker process never sees ``context.cancelled`` become true: it
    is stopped instead. The attempt's future is then cancelled; the run
    loop, which asked for it, records the verdict (timed out or cancelled).

Crashes
    A worker process that dies while running an attempt (``os._exit``, a
    segfault, the OOM killer) fails that attempt alone with
    :class:`WorkerCrashedError`, which retry policies retry like any other
    exception; the process is replaced and every other attempt goes on. This
    is why the executor runs its own small pool instead of
    :class:`concurrent.futures.ProcessPoolExecutor`, whose pool breaks as a
    whole (``BrokenProcessPool``) when one worker dies and which cannot
    stop a single running call.

Invariants
    a slot's process runs at most one attempt; every submitted future is
    settled exactly once (result, exception or cancelled); a process that
    was terminated is never handed another attempt.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from pipeopt._validate import check_float, check_int
from pipeopt.errors import (
    NotPicklableError,
    RemoteTaskError,
    RemoteTraceback,
    WorkerCrashedError,
)
from pipeopt.executors.base import close_thread_loop, resolve_output

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess

    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall
    from pipeopt.graph import CompiledPipeline

__all__ = [
    "AttemptFuture",
    "ProcessExecutor",
    "RemoteContext",
    "RemoteOutcome",
    "run_remote",
]

_log = logging.getLogger("pipeopt.task")
_START_METHODS = ("forkserver", "spawn")
_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_ASYNC_KINDS = ("coroutine", "async_generator")
_SHUTDOWN_SLACK = 5.0  # seconds beyond terminate_grace that shutdown() waits for its threads


class RemoteContext:
    """A picklable stand-in for :class:`~pipeopt.context.ExecutionContext` in another process.

    Custom metrics and batches recorded here are sent back with the outcome
    and replayed into the driver's context. ``plan_batch`` answers a fixed
    size: the adaptive batcher lives in the driver.

    Attributes:
        task: the task's name.
        attempt: which attempt this is, 1 for the first try.
        run_id: the id of the run.
        criticality: the task's effective criticality label.
    """

    __slots__ = (
        "_batch_size",
        "_logger",
        "attempt",
        "batches",
        "criticality",
        "custom_metrics",
        "run_id",
        "task",
        "upstream",
    )

    def __init__(
        self,
        task: str,
        *,
        attempt: int = 1,
        run_id: str = "",
        criticality: str = "medium",
        upstream: Mapping[str, Any] | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.task = task
        self.attempt = attempt
        self.run_id = run_id
        self.criticality = criticality
        self.upstream: dict[str, Any] = dict(upstream or {})
        self.custom_metrics: dict[str, float] = {}
        self.batches: list[tuple[int, float]] = []
        self._batch_size = check_int("batch_size", batch_size, minimum=1)
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    @classmethod
    def from_context(cls, context: ExecutionContext) -> RemoteContext:
        """Return a stand-in carrying what ``context`` shows a body."""
        return cls(
            context.task,
            attempt=context.attempt,
            run_id=context.run_id,
            criticality=context.criticality,
            upstream=context.upstream,
        )

    def __getstate__(self) -> tuple[Any, ...]:
        return (
            self.task,
            self.attempt,
            self.run_id,
            self.criticality,
            self.upstream,
            self.custom_metrics,
            self.batches,
            self._batch_size,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self.task,
            self.attempt,
            self.run_id,
            self.criticality,
            self.upstream,
            self.custom_metrics,
            self.batches,
            self._batch_size,
        ) = state
        self._logger = None

    def __repr__(self) -> str:
        return f"RemoteContext(task={self.task!r}, attempt={self.attempt})"

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Return a logger of the worker process whose records name the task and attempt."""
        if self._logger is None:
            self._logger = _RemoteLogAdapter(_log, {"task": self.task, "attempt": self.attempt})
        return self._logger

    @property
    def cancelled(self) -> bool:
        """Return ``False``: a cancelled attempt's process is terminated, not asked to stop."""
        return False

    def record_custom_metric(self, name: str, value: float) -> None:
        """Record a named number for this task (last value wins); the driver gets it back."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        self.custom_metrics[name] = check_float(f"metric {name!r} value", value)

    def plan_batch(self, pending: int | None = None) -> int:
        """Return the fixed batch size, never more than ``pending``."""
        if pending is not None:
            check_int("pending", pending, minimum=0)
            return min(self._batch_size, pending)
        return self._batch_size

    def record_batch(self, size: int, latency: float) -> None:
        """Record one batch; the driver feeds it to the task's batcher after the attempt."""
        check_int("size", size, minimum=0)
        check_float("latency", latency, minimum=0.0)
        self.batches.append((size, latency))


class _RemoteLogAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra['task']} #{extra['attempt']}] {msg}", kwargs


@dataclass(slots=True)
class RemoteOutcome:
    """What an attempt in another process sends back: a value or an error, plus metrics."""

    value: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    custom_metrics: dict[str, float] = field(default_factory=dict)
    batches: list[tuple[int, float]] = field(default_factory=list)

    def replay(self, context: ExecutionContext | None) -> None:
        """Record the attempt's custom metrics and batches in the driver's ``context``."""
        if context is None:
            return
        for name, value in self.custom_metrics.items():
            context.record_custom_metric(name, value)
        for size, latency in self.batches:
            context.record_batch(size, latency)

    def unwrap(self) -> Any:
        """Return the value, or raise the error with the remote traceback as its cause."""
        if self.error is None:
            return self.value
        error = self.error
        if self.traceback is not None:
            error.__cause__ = RemoteTraceback(self.traceback)
        raise error


def _portable(error: BaseException) -> BaseException:
    """Return ``error`` if it survives a pickle round trip, else a :class:`RemoteTaskError`."""
    try:
        pickle.loads(pickle.dumps(error, _PICKLE_PROTOCOL))
    except Exception:
        return RemoteTaskError(f"{type(error).__qualname__}: {error}")
    return error


def run_remote(call: TaskCall, context: RemoteContext | None) -> RemoteOutcome:
    """Run one attempt in a worker (process or Dask) and return its outcome; never raise.

    Generators are drained into a list; coroutines and async generators run
    on an event loop that is closed again before returning, so worker
    threads keep no loops alive.
    """
    outcome = RemoteOutcome()
    try:
        kwargs = call.kwargs
        if call.wants_context:
            kwargs = {**kwargs, "context": context}
        out = call.func(**kwargs)
        asynchronous = (
            call.kind in _ASYNC_KINDS or inspect.isawaitable(out) or inspect.isasyncgen(out)
        )
        try:
            outcome.value = resolve_output(out, call.kind, call.timeout)
        finally:
            if asynchronous:
                close_thread_loop()
    except BaseException as exc:  # the driver decides what to do with any failure
        outcome.error = _portable(exc)
        outcome.traceback = traceback.format_exc()
    if context is not None:
        outcome.custom_metrics = context.custom_metrics
        outcome.batches = context.batches
    return outcome


def _outcome_bytes(outcome: RemoteOutcome, task: str) -> bytes:
    try:
        return pickle.dumps(outcome, _PICKLE_PROTOCOL)
    except Exception as exc:
        failed = RemoteOutcome(
            error=TypeError(
                f"task {task!r}: its result cannot be pickled back to the driver "
                f"({type(exc).__name__}: {exc}); return plain data, or a path to it"
            ),
            traceback=traceback.format_exc(),
            custom_metrics=outcome.custom_metrics,
            batches=outcome.batches,
        )
        return pickle.dumps(failed, _PICKLE_PROTOCOL)


def _worker_main(conn: Connection) -> None:
    """Serve attempts from the driver until it closes the pipe (runs in the child)."""
    # Ctrl-C reaches the whole process group; the driver decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        task = "?"
        try:
            call, context = pickle.loads(data)
            task = call.task
            outcome = run_remote(call, context)
        except BaseException as exc:
            outcome = RemoteOutcome(error=_portable(exc), traceback=traceback.format_exc())
        conn.send_bytes(_outcome_bytes(outcome, task))


class AttemptFuture(Future[Any]):
    """The future of one attempt; knows its task and its timeout.

    :meth:`stop` is how executors settle an attempt they were asked to
    cancel: the future is cancelled, whatever the reason. Whether that
    was a timeout or the run stopping (Ctrl-C, ``fail_fast``) is the run
    loop's to say, not the executor's: it records its verdict before it
    asks the executor to cancel.
    """

    def __init__(self, task: str, timeout: float | None) -> None:
        super().__init__()
        self.task = task
        self.timeout = timeout

    def stop(self) -> bool:
        """Cancel the attempt; return whether it was still pending."""
        return self.cancel()


@dataclass(slots=True, eq=False)
class _Job:
    task: str
    attempt: int
    payload: bytes
    future: AttemptFuture
    context: ExecutionContext | None
    worker: _Worker | None = None
    cancelled: bool = False


@dataclass(slots=True, eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    killed: bool = False


class _Pool:
    """The processes of one run and the proxy threads that feed them."""

    def __init__(self, ctx: BaseContext, size: int, terminate_grace: float) -> None:
        self._ctx = ctx
        self._grace = terminate_grace
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._by_future: dict[Future[Any], _Job] = {}
        self._closing = False
        self._workers: list[_Worker | None] = [self._spawn() for _ in range(size)]
        self._threads = [
            threading.Thread(
                target=self._serve, args=(slot,), name=f"pipeopt-process-{slot}", daemon=True
            )
            for slot in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child,), name="pipeopt-worker", daemon=True
        )
        process.start()
        # Only the child may hold its end: the parent must see EOF when the child dies.
        child.close()
        return _Worker(process, parent)

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the process executor is shut down; call start() first")
            self._by_future[job.future] = job
        self._jobs.put(job)

    def cancel(self, future: Future[Any]) -> bool:
        with self._lock:
            job = self._by_future.pop(future, None)
            if job is not None:
                job.cancelled = True
                if job.worker is not None:
                    # Running: the proxy thread settles the future once the process is dead.
                    self._kill(job.worker)
                    return True
        # Settled last, so that the thread waiting on it wakes after the caller's bookkeeping.
        return _stop(future)

    def _kill(self, worker: _Worker) -> None:
        # Caller holds the lock. The proxy thread notices the death and replaces the process.
        if not worker.killed:
            worker.killed = True
            worker.process.terminate()
            # A body that handles SIGTERM must not keep its slot (or the shutdown) waiting.
            timer = threading.Timer(self._grace, _kill_if_alive, (worker.process,))
            timer.daemon = True
            timer.start()

    def _serve(self, slot: int) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                self._run_job(slot, job)
            except BaseException as exc:  # keep the slot alive whatever happens
                self._settle(job, error=exc)
        self._retire(slot, stop=True)

    def _run_job(self, slot: int, job: _Job) -> None:
        with self._lock:
            if job.cancelled or job.future.done():  # cancelled while queued
                return
            worker = self._workers[slot]
            healthy = worker is not None and not worker.killed and worker.process.is_alive()
        if worker is None or not healthy:
            self._retire(slot)
            worker = self._replace(slot)
        with self._lock:
            if job.cancelled or job.future.done():
                return
            job.worker = worker
        data = self._exchange(worker, job.payload)
        with self._lock:
            job.worker = None
            self._by_future.pop(job.future, None)
            killed = worker.killed
        if data is None:
            pid = worker.process.pid
            exitcode = self._retire(slot)
            if killed:
                job.future.stop()
            else:
                crash = WorkerCrashedError(job.task, job.attempt, pid, exitcode)
                self._settle(job, error=crash)
            with self._lock:
                closing = self._closing
            if not closing:  # a fresh process now, so that a retry does not wait for one
                self._replace(slot)
            return
        self._settle(job, outcome=pickle.loads(data))

    def _replace(self, slot: int) -> _Worker:
        worker = self._spawn()
        with self._lock:
            self._workers[slot] = worker
        return worker

    @staticmethod
    def _exchange(worker: _Worker, payload: bytes) -> bytes | None:
        """Send one attempt and wait for its outcome; ``None`` if the process died."""
        try:
            worker.conn.send_bytes(payload)
            # Wait on the sentinel too: a grandchild holding the pipe must not hide a death.
            ready = wait([worker.conn, worker.process.sentinel])
            if worker.conn in ready:
                return worker.conn.recv_bytes()
        except (EOFError, OSError):
            pass
        return None

    def _retire(self, slot: int, *, stop: bool = False) -> int | None:
        """Stop the slot's process (politely when ``stop``); return its exit code."""
        with self._lock:
            worker = self._workers[slot]
            self._workers[slot] = None
        if worker is None:
            return None
        process = worker.process
        if process.is_alive() and not worker.killed:
            if stop:
                with contextlib.suppress(OSError):
                    worker.conn.send_bytes(b"")
            else:
                process.terminate()
        process.join(self._grace)
        if process.is_alive():
            process.kill()
            process.join()
        worker.conn.close()
        exitcode = process.exitcode
        process.close()
        return exitcode

    @staticmethod
    def _settle(
        job: _Job, *, outcome: RemoteOutcome | None = None, error: BaseException | None = None
    ) -> None:
        value: Any = None
        if outcome is not None:
            try:
                outcome.replay(job.context)
                value = outcome.unwrap()
            except BaseException as exc:
                error = exc
        future = job.future
        try:
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile: the run loop has already given up on it

    def shutdown(self, *, cancel: bool) -> None:
        with self._lock:
            self._closing = True
            if cancel:
                for future, job in list(self._by_future.items()):
                    future.cancel()
                    if job.worker is not None:
                        self._kill(job.worker)
                self._by_future.clear()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + self._grace + _SHUTDOWN_SLACK
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = [w for w in self._workers if w is not None and w.process.is_alive()]
        for worker in left:  # a proxy thread still waits on it: end it the hard way
            _kill_if_alive(worker.process)


class ProcessExecutor:
    """Run task bodies in a pool of worker processes (``executor="process"``).

    For CPU-bound bodies that the GIL would serialise in threads. Task
    functions must pickle: define them at module level, not as lambdas or
    closures (:meth:`check_pipeline` says which task does not), and guard a
    script's entry point with ``if __name__ == "__main__":``, because workers
    start from a fresh interpreter that imports the main module. Arguments
    and results cross process boundaries by pickling, so they should be
    reasonably small; pass paths for bulk data.

    A timed-out or cancelled attempt's process is terminated and replaced; a
    worker that crashes fails only the attempt it ran, with
    :class:`WorkerCrashedError`.

    Args:
        processes: how many worker processes to run; by default the run's
            ``max_workers``. Attempts beyond it wait in the executor, and
            that wait counts towards their timeout.
        start_method: ``"forkserver"`` (the default where available) or
            ``"spawn"``. ``"fork"`` is refused: the driver runs threads.
        terminate_grace: seconds between ``SIGTERM`` and ``SIGKILL`` when a
            worker is stopped.
        preload: modules the fork server imports once, before it forks
            any worker (e.g. ``("numpy", "myproject.tasks")``), so that
            each worker, including each replacement of a killed one, starts
            without importing them again. They must be importable from the
            interpreter's default ``sys.path`` (Python 3.11's fork server
            ignores changes made at run time). pipeopt's own worker module
            is always preloaded. Only the first start of the interpreter's
            fork server applies the list, and it replaces any list set with
            :func:`multiprocessing.set_forkserver_preload`.
    """

    name = "process"
    inline = False

    def __init__(
        self,
        processes: int | None = None,
        *,
        start_method: str | None = None,
        terminate_grace: float = 1.0,
        preload: Sequence[str] = (),
    ) -> None:
        if processes is not None:
            processes = check_int("processes", processes, minimum=1)
        self.processes = processes
        available = multiprocessing.get_all_start_methods()
        if start_method is None:
            start_method = "forkserver" if "forkserver" in available else "spawn"
        if start_method not in _START_METHODS or start_method not in available:
            choices = ", ".join(m for m in _START_METHODS if m in available)
            raise ValueError(f"start_method must be one of {choices}, got {start_method!r}")
        self.start_method = start_method
        self.terminate_grace = check_float("terminate_grace", terminate_grace, minimum=0.0)
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise TypeError(f"preload must be a sequence of module names, got {preload!r}")
        self.preload = tuple(preload)
        self._pool: _Pool | None = None

    def check_pipeline(self, compiled: CompiledPipeline) -> None:
        """Check that every task's function can be sent to a worker process.

        Raises:
            NotPicklableError: names the first task whose function does not
                pickle, or lives in an interactive ``__main__`` that worker
                processes cannot import.
        """
        main = sys.modules.get("__main__")
        interactive = main is not None and not hasattr(main, "__file__")
        for task in compiled.tasks:
            func = task.func
            try:
                pickle.dumps(func, _PICKLE_PROTOCOL)
            except Exception as exc:
                raise NotPicklableError(task.name, f"{type(exc).__name__}: {exc}") from exc
            if interactive and getattr(func, "__module__", None) == "__main__":
                raise NotPicklableError(
                    task.name, "it is defined in an interactive session's __main__"
                )

    def start(self, max_workers: int) -> None:
        """Start the worker processes: ``processes`` of them, or ``max_workers``."""
        if self._pool is not None:
            self._pool.shutdown(cancel=True)
        size = self.processes if self.processes is not None else max_workers
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Python 3.11's fork server never preloads __main__ (it is not
            # given the path), so without this every worker would import
            # pipeopt all over again.
            ctx.set_forkserver_preload(["__main__", __name__, *self.preload])
        self._pool = _Pool(ctx, check_int("max_workers", size, minimum=1), self.terminate_grace)

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Pickle ``call`` and queue it for the next free worker process.

        Raises:
            NotPicklableError: the task's function does not pickle.
            TypeError: its arguments (upstream results) do not pickle.
            RuntimeError: the executor is not started.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("the process executor is not started; call start(max_workers)")
        remote = RemoteContext.from_context(context) if call.wants_context else None
        try:
            payload = pickle.dumps((call, remote), _PICKLE_PROTOCOL)
        except Exception as exc:
            raise _pickling_error(call, exc) from exc
        future = AttemptFuture(call.task, call.timeout)
        wants = context if call.wants_context else None
        pool.submit(_Job(call.task, call.attempt, payload, future, wants))
        return future

    def cancel(self, future: Future[Any]) -> bool:
        """Drop a queued attempt, or terminate the process that runs it; return ``True``."""
        pool = self._pool
        if pool is None:
            return _stop(future)
        return pool.cancel(future)

    def shutdown(self, *, cancel: bool = False) -> None:
        """Stop the worker processes (terminating busy ones when ``cancel``)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(cancel=cancel)

    def __repr__(self) -> str:
        return f"ProcessExecutor(processes={self.processes}, start_method={self.start_method!r})"


def _kill_if_alive(process: BaseProcess) -> None:
    with contextlib.suppress(ValueError, OSError):  # closed or reaped meanwhile
        if process.is_alive():
            process.kill()


def _stop(future: Future[Any]) -> bool:
    return future.stop() if isinstance(future, AttemptFuture) else future.cancel()


def _pickling_error(call: TaskCall, exc: Exception) -> Exception:
    try:
        pickle.dumps(call.func, _PICKLE_PROTOCOL)
    except Exception as func_exc:
        return NotPicklableError(call.task, f"{type(func_exc).__name__}: {func_exc}")
    return TypeError(
        f"task {call.task!r}: its arguments cannot be pickled for a worker process "
        f"({type(exc).__name__}: {exc}); upstream tasks must return picklable results"
    )
