"""Run task bodies in worker processes, for CPU-bound work (``executor="process"``).

Policy
    :class:`ProcessExecutor` keeps a fixed set of worker processes, by
    default one per CPU this process may run on, started from a clean
    interpreter (``forkserver`` where the platform has it, ``spawn``
    elsewhere; never a bare ``fork`` of a driver that runs threads). Each
    process runs one attempt at a time: the driver pickles the
    :class:`~pipeopt.executors.base.TaskCall` in the submitting thread, a
    proxy thread per process sends it and waits for the pickled outcome,
    and the outcome's value or exception settles the attempt's future.

Shipping
    Task functions travel by reference when the workers can import them and
    by value (cloudpickle) otherwise, see :mod:`pipeopt.executors.shipping`:
    decorated functions, closures, lambdas, partials and the functions of a
    file loaded by ``pipeopt run`` all run. What cannot be pickled at all is
    reported by :meth:`ProcessExecutor.check_pipeline` before the run.
    Workers import the driver's ``__main__`` script, as every
    ``multiprocessing`` worker does; a script that runs its pipeline when
    imported is refused before the run with
    :class:`~pipeopt.errors.MissingMainGuardError`.

Context
    A body that takes ``context`` gets a
    :class:`~pipeopt.executors.remote.RemoteContext`, the same
    :class:`~pipeopt.context.TaskContext` as on threads. Its log records
    reach the driver's logging as they are made (over the worker's pipe);
    custom metrics and batches travel back with the outcome and are
    replayed into the driver's context, success or failure.

Timeouts and cancellation
    ``cancel(future)`` on a queued attempt drops it. On a running attempt it
    settles the future at once (cancelled: the run loop, which asked for
    it, has already recorded its verdict, timed out or cancelled) and raises
    the worker's cancel flag, which the body sees as ``context.cancelled``;
    a body that has not returned ``cancel_grace`` seconds later is
    terminated (``SIGTERM``, then ``SIGKILL`` after ``terminate_grace``
    seconds) and a fresh process takes its slot, so a timed-out body really
    stops and its slot is whole again.

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
import contextvars
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import cloudpickle

from pipeopt._validate import check_float, check_int
from pipeopt.errors import MissingMainGuardError, WorkerCrashedError
from pipeopt.executors.base import MAIN_GUARD_EXIT, WORKER_NAME
from pipeopt.executors.remote import (
    PICKLE_PROTOCOL,
    RemoteContext,
    RemoteOutcome,
    _portable,
    deliver_record,
    dump_outcome,
    dumps,
    run_remote,
)
from pipeopt.executors.shipping import Shipper

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.sharedctypes import Synchronized

    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall
    from pipeopt.graph import CompiledPipeline

__all__ = [
    "AttemptFuture",
    "ProcessExecutor",
    "RemoteContext",
    "RemoteOutcome",
    "available_cpus",
    "run_remote",
]

_START_METHODS = ("forkserver", "spawn")
_SHUTDOWN_SLACK = 5.0  # seconds beyond terminate_grace that shutdown() waits for its threads
_READY_WAIT = 60.0  # seconds a first worker may take to start before the run goes on
# One-byte tags of the worker's messages to the driver.
_READY, _RECORD, _OUTCOME = b"R", b"L", b"O"


def available_cpus() -> int:
    """Return how many CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_main(conn: Connection, cancel_flag: Synchronized[int]) -> None:
    """Serve attempts from the driver until it closes the pipe (runs in the child)."""
    # Ctrl-C reaches the whole process group; the driver decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sending = threading.Lock()  # a body may log from threads of its own

    def send(tag: bytes, data: bytes) -> None:
        with sending:
            conn.send_bytes(tag + data)

    def emit(record: logging.LogRecord) -> None:
        send(_RECORD, dumps(record))

    def cancelled() -> bool:
        return bool(cancel_flag.value)

    send(_READY, b"")
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
            if context is not None:
                context.install(cancelled=cancelled, emit=emit)
                # The worker is ours: its loggers filter as the driver's do.
                logging.getLogger().setLevel(context.root_level)
            outcome = run_remote(call, context)
        except BaseException as exc:
            outcome = RemoteOutcome(error=_portable(exc), traceback=traceback.format_exc())
        send(_OUTCOME, dump_outcome(outcome, task))


def _probe_main() -> None:
    """Do nothing: a worker that gets here imported the driver's script without running it."""


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
    # The submitting thread's context: log records of the body are delivered
    # in it, so that the driver's log capture files them under the task.
    log_context: contextvars.Context
    worker: _Worker | None = None
    cancelled: bool = False


@dataclass(slots=True, eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    cancel_flag: Any  # a shared ctypes byte: non-zero asks the running body to stop
    job: _Job | None = None
    killed: bool = False


class _Pool:
    """The processes of one run and the proxy threads that feed them."""

    def __init__(
        self, ctx: BaseContext, size: int, terminate_grace: float, cancel_grace: float
    ) -> None:
        self._ctx = ctx
        self._grace = terminate_grace
        self._cancel_grace = cancel_grace
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
        flag = self._ctx.RawValue("b", 0)
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main, args=(child, flag), name=WORKER_NAME, daemon=True
        )
        process.start()
        # Only the child may hold its end: the parent must see EOF when the child dies.
        child.close()
        return _Worker(process, parent, flag)

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
                worker = job.worker
                if worker is not None:
                    # Running: ask the body to stop, and terminate it if it does not.
                    worker.cancel_flag.value = 1
                    if self._cancel_grace > 0:
                        timer = threading.Timer(self._cancel_grace, self._kill_job, (job, worker))
                        timer.daemon = True
                        timer.start()
                    else:
                        self._kill(worker)
        # Settled last, so that the thread waiting on it wakes after the caller's bookkeeping.
        return _stop(future)

    def _kill_job(self, job: _Job, worker: _Worker) -> None:
        with self._lock:
            if worker.job is job:
                self._kill(worker)

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
            worker.job = job
            worker.cancel_flag.value = 0
        data = self._exchange(worker, job)
        with self._lock:
            job.worker = None
            worker.job = None
            self._by_future.pop(job.future, None)
            killed = worker.killed
            stopped = _cancelled(job)
        if data is None:
            pid = worker.process.pid
            exitcode = self._retire(slot)
            if killed:
                job.future.stop()
            elif exitcode == MAIN_GUARD_EXIT:
                self._settle(job, error=MissingMainGuardError(_main_script()))
            else:
                crash = WorkerCrashedError(job.task, job.attempt, pid, exitcode)
                self._settle(job, error=crash)
            with self._lock:
                closing = self._closing
            if not closing:  # a fresh process now, so that a retry does not wait for one
                self._replace(slot)
            return
        if stopped:  # returned within its grace period: the attempt stays stopped
            job.future.stop()
            return
        self._settle(job, outcome=pickle.loads(data))

    def _replace(self, slot: int) -> _Worker:
        worker = self._spawn()
        with self._lock:
            self._workers[slot] = worker
        return worker

    @staticmethod
    def _exchange(worker: _Worker, job: _Job) -> bytes | None:
        """Send one attempt, pass its log records on, return its outcome; ``None`` if it died."""
        try:
            worker.conn.send_bytes(job.payload)
            while True:
                # Wait on the sentinel too: a grandchild holding the pipe must not hide a death.
                ready = wait([worker.conn, worker.process.sentinel])
                if worker.conn not in ready:
                    return None
                message = worker.conn.recv_bytes()
                tag = message[:1]
                if tag == _OUTCOME:
                    return message[1:]
                if tag == _RECORD:
                    job.log_context.run(deliver_record, pickle.loads(message[1:]))
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
                        job.worker.cancel_flag.value = 1
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

    For CPU-bound bodies that the GIL would serialise in threads. Any task
    that runs on threads runs here: functions workers cannot import travel
    by value (see :mod:`pipeopt.executors.shipping`), and
    :meth:`check_pipeline` names, before the run, a task that uses
    something no process can receive (a lock, a connection, an open file).
    Guard a script's entry point with ``if __name__ == "__main__":``:
    workers start from a fresh interpreter that imports the main script.
    Arguments and results cross process boundaries by pickling, so they
    should be reasonably small; pass paths for bulk data. Module globals
    are per process: a body that changes one does not change the driver's.

    A cancelled attempt's body sees ``context.cancelled`` and gets
    ``cancel_grace`` seconds to return before its process is terminated and
    replaced; a worker that crashes fails only the attempt it ran, with
    :class:`WorkerCrashedError`.

    Args:
        processes: how many worker processes to run; by default one per
            CPU this process may run on (:func:`available_cpus`), whatever
            the run's ``max_workers``. Attempts beyond it wait in the
            executor, and that wait counts towards their timeout.
        start_method: ``"forkserver"`` (the default where available) or
            ``"spawn"``. ``"fork"`` is refused: the driver runs threads.
        terminate_grace: seconds between ``SIGTERM`` and ``SIGKILL`` when a
            worker is stopped.
        cancel_grace: seconds a cancelled attempt's body may take to notice
            ``context.cancelled`` and return before its process is
            terminated; 0 terminates at once.
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
        cancel_grace: float = 0.2,
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
        self.cancel_grace = check_float("cancel_grace", cancel_grace, minimum=0.0)
        if isinstance(preload, str) or not all(isinstance(m, str) for m in preload):
            raise TypeError(f"preload must be a sequence of module names, got {preload!r}")
        self.preload = tuple(preload)
        self._shipper = Shipper(main_importable=True)
        self._pool: _Pool | None = None

    def _context(self) -> BaseContext:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            # Python 3.11's fork server never preloads __main__ (it is not
            # given the path), so without this every worker would import
            # pipeopt all over again.
            ctx.set_forkserver_preload(["__main__", __name__, *self.preload])
        return ctx

    def check_pipeline(self, compiled: CompiledPipeline) -> None:
        """Check, before the run, that every task can be sent to a worker process.

        Raises:
            NotPicklableError: a task uses an object that cannot be pickled;
                names the task and the object.
            MissingMainGuardError: the driver's script runs its pipeline
                when imported, so no worker process could start.
        """
        self._shipper.prepare(compiled)
        _check_main_guard(self._context())

    def start(self, max_workers: int) -> None:
        """Start the worker processes: ``processes`` of them, or one per available CPU."""
        if self._pool is not None:
            self._pool.shutdown(cancel=True)
        size = self.processes if self.processes is not None else available_cpus()
        self._pool = _Pool(
            self._context(),
            check_int("processes", size, minimum=1),
            self.terminate_grace,
            self.cancel_grace,
        )

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Pickle ``call`` and queue it for the next free worker process.

        Raises:
            NotPicklableError: the task's function cannot be pickled.
            TypeError: its arguments (upstream results) cannot be pickled.
            RuntimeError: the executor is not started.
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("the process executor is not started; call start(max_workers)")
        shipper = self._shipper
        call = shipper.ship(call)
        remote = RemoteContext.from_context(context, for_body=call.wants_context)
        try:
            payload = pickle.dumps((call, remote), PICKLE_PROTOCOL)
            if shipper.local_modules and shipper.refers_to_local_module(payload):
                payload = cloudpickle.dumps((call, remote), PICKLE_PROTOCOL)
        except Exception:
            try:
                payload = cloudpickle.dumps((call, remote), PICKLE_PROTOCOL)
            except Exception as exc:
                raise TypeError(
                    f"task {call.task!r}: its arguments cannot be pickled for a worker process "
                    f"({type(exc).__name__}: {exc}); upstream tasks must return picklable "
                    "results"
                ) from exc
        future = AttemptFuture(call.task, call.timeout)
        wants = context if call.wants_context else None
        job = _Job(call.task, call.attempt, payload, future, wants, contextvars.copy_context())
        pool.submit(job)
        return future

    def cancel(self, future: Future[Any]) -> bool:
        """Drop a queued attempt, or stop the body that runs it; return ``True``."""
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


def _cancelled(job: _Job) -> bool:
    # A function, so that the type checker does not assume the flag kept its earlier value.
    return job.cancelled


def _stop(future: Future[Any]) -> bool:
    return future.stop() if isinstance(future, AttemptFuture) else future.cancel()


def _main_script() -> str:
    main = sys.modules.get("__main__")
    return str(getattr(main, "__file__", None) or getattr(main, "__name__", "__main__"))


_guard_checked: set[str] = set()
_guard_lock = threading.Lock()


def _check_main_guard(ctx: BaseContext) -> None:
    """Start one worker process to see that importing the driver's script does not run it.

    Done once per script and interpreter; a worker that finds the script
    starting a run while it imports it exits with ``MAIN_GUARD_EXIT``
    (see :func:`pipeopt.executors.base.exit_if_importing_main`).
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if script is None:
        return
    with _guard_lock:
        if script in _guard_checked:
            return
        probe = ctx.Process(  # type: ignore[attr-defined]
            target=_probe_main, name=WORKER_NAME, daemon=True
        )
        probe.start()
        probe.join(_READY_WAIT)
        if probe.is_alive():  # slow to import: the run will tell
            probe.kill()
            probe.join()
            return
        exitcode = probe.exitcode
        probe.close()
        if exitcode == MAIN_GUARD_EXIT:
            raise MissingMainGuardError(script)
        _guard_checked.add(script)
