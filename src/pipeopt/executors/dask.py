"""Run task bodies on a Dask cluster (``DaskExecutor``), for when one machine is not enough.

Policy
    The scheduler, retries, circuit breakers and metrics stay in the
    driver; Dask only runs bodies. Each attempt becomes one
    ``client.submit(run_on_dask, call, context, key=..., priority=...,
    pure=False)``: the key names the task and attempt (``extract-1-<uuid>``,
    so the Dask dashboard reads like the pipeline), and the criticality maps
    to Dask's ``priority=`` (blocker 5 ... deferred 0: higher runs first on
    a busy worker). Retries are pipeopt's, never Dask's.

Where the cluster comes from
    ``DaskExecutor()`` starts a ``LocalCluster`` in this process, sized to
    the run's ``max_workers`` (``processes=False``: threads, in-process
    transport, no dashboard, and the HTTP endpoints Dask serves anyway on a
    free port of 127.0.0.1); ``cluster_kwargs`` override its settings, e.g.
    ``processes=True, n_workers=4`` for CPU-bound bodies (then bound to
    127.0.0.1). ``DaskExecutor(address=...)``
    connects to a running scheduler; ``DaskExecutor(client=...)`` uses a
    ``Client`` the caller owns. Whatever the executor created it closes in
    ``shutdown()``; a caller's client is left open.

Data movement
    A body's result comes back to the driver when the attempt ends: the
    driver needs it to decide what runs next and hands it to the dependents,
    which ship it out to a worker again with their own call. That is cheap
    for counts, small frames and file paths, and wasteful for gigabytes. To
    keep large data on the workers, return a handle instead of the data (a
    path or URL of a Parquet file on shared storage, a table name), or keep
    the heavy lifting inside one body with ``dask.dataframe`` /
    ``dask.array``, which runs on the same cluster (``distributed.get_client()``
    inside the body) and returns only a summary.

Shipping
    Task functions that Dask workers cannot import (decorated functions,
    closures, lambdas, functions of the driver's ``__main__`` or of a file
    loaded by ``pipeopt run``) travel by value, see
    :mod:`pipeopt.executors.shipping`; :meth:`DaskExecutor.check_pipeline`
    names, before the run, a task that uses something that cannot be pickled.

Context
    Bodies get a :class:`~pipeopt.executors.remote.RemoteContext`, the same
    :class:`~pipeopt.context.TaskContext` as on threads; its log records,
    custom metrics and batches come back with the outcome and are replayed
    into the driver's logging and context. ``context.cancelled`` reads the
    attempt's state on its worker: it turns true once the driver cancelled
    the Dask future.

Timeouts and cancellation
    ``cancel(future)`` cancels the Dask future: an attempt still queued on
    the cluster never runs; one already running on a worker thread cannot
    be interrupted by Dask, so it runs to its end there and its result is
    dropped (a worker process that must die is the process executor's job).
    The attempt's future is cancelled; the run loop, which asked for it,
    records whether that was a timeout or the run stopping.
    If a worker dies, Dask itself re-runs the tasks it held on another
    worker, so a body may run twice: make side effects idempotent (keyed by
    task name), as Dask's docs advise for any task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from pipeopt.executors.process import AttemptFuture
from pipeopt.executors.remote import RemoteContext, RemoteOutcome, run_remote
from pipeopt.executors.shipping import Shipper
from pipeopt.priority import LABELS

if TYPE_CHECKING:
    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall
    from pipeopt.graph import CompiledPipeline

__all__ = ["DaskAttempt", "DaskExecutor", "run_on_dask"]

_INSTALL_HINT = "the dask executor needs dask.distributed: pip install 'pipeopt[dask]'"
_MOST_URGENT_PRIORITY = len(LABELS) - 1
_LOOPBACK_ANY_PORT = "127.0.0.1:0"
# States of a worker's task that mean its client no longer wants it.
_ABANDONED = frozenset({"cancelled", "released", "forgotten"})


def _distributed() -> Any:
    """Import ``distributed`` or fail with an install hint."""
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return distributed


def run_on_dask(call: TaskCall, context: RemoteContext | None) -> RemoteOutcome:
    """Run one attempt on a Dask worker; ``context.cancelled`` follows the task's state there."""
    if context is not None:
        try:
            worker = _distributed().get_worker()
            key = worker.get_current_task()
        except ValueError:  # not on a worker (a test calling this directly)
            pass
        else:

            def cancelled() -> bool:
                state = worker.state.tasks.get(key)
                return state is None or state.state in _ABANDONED

            context.install(cancelled=cancelled)
    return run_remote(call, context)


class DaskAttempt(AttemptFuture):
    """The :class:`concurrent.futures.Future` of one attempt, backed by a Dask future.

    It settles when the attempt's outcome has been gathered from the
    cluster; the gathering runs on the client's event loop, concurrently for
    every attempt in flight, so no thread waits on Dask. :meth:`cancel` and
    :meth:`stop` cancel the Dask future as well.
    """

    def __init__(self, dask_future: Any, task: str, timeout: float | None) -> None:
        super().__init__(task, timeout)
        self.dask_future = dask_future
        self.key: str = dask_future.key

    def __repr__(self) -> str:
        return f"<DaskAttempt {self.key} state={self._state.lower()}>"

    def release(self) -> None:
        """Cancel the Dask future without waiting: the request is queued on the client's loop.

        An attempt still queued on the cluster never runs; a body already
        running on a worker runs to its end there and its result is dropped.
        """
        client = self.dask_future.client
        client.loop.add_callback(
            functools.partial(
                client.cancel, [self.dask_future], asynchronous=True, reason="cancelled by pipeopt"
            )
        )

    def cancel(self) -> bool:
        """Cancel the attempt and its Dask future."""
        # Settle first: once Dask has cancelled its future, settle() would
        # cancel this one too, whatever stop() meant to report.
        if not super().cancel():
            return False
        self.release()
        return True

    def stop(self) -> bool:
        """Stop the attempt and cancel its Dask future (see :meth:`AttemptFuture.stop`)."""
        if not super().stop():
            return False
        self.release()
        return True

    async def settle(self, context: ExecutionContext | None) -> None:
        """Wait for the Dask future, gather its outcome, settle this future (on the client loop)."""
        value: Any = None
        error: BaseException | None = None
        try:
            (outcome,) = await self.dask_future.client.gather([self.dask_future], asynchronous=True)
            outcome.replay(context)
            value = outcome.unwrap()
        except CancelledError:
            Future.cancel(self)
            return
        except asyncio.CancelledError:  # the client's loop is closing
            Future.cancel(self)
            raise
        except BaseException as exc:  # the body's error, or Dask's (e.g. KilledWorker)
            error = exc
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            if error is None:
                self.set_result(value)
            else:
                self.set_exception(error)


class DaskExecutor:
    """Run task bodies on a Dask cluster; criticality maps to Dask's ``priority=``.

    Args:
        address: a scheduler address such as ``"tcp://10.0.0.5:8786"``;
            ``None`` starts a ``LocalCluster`` in this process.
        client: a ``distributed.Client`` to use as is (not closed by
            ``shutdown()``); excludes ``address``.
        **cluster_kwargs: ``LocalCluster`` settings overriding the defaults
            (``processes=False``, one worker with ``max_workers`` threads,
            no dashboard, HTTP endpoints on 127.0.0.1); only without
            ``address`` and ``client``.

    Raises:
        ImportError: ``distributed`` is not installed (``pip install 'pipeopt[dask]'``).
        ValueError: both ``address`` and ``client``, or cluster settings
            with either.
    """

    name = "dask"
    inline = False

    def __init__(
        self, address: str | None = None, client: Any = None, **cluster_kwargs: Any
    ) -> None:
        _distributed()
        if address is not None and client is not None:
            raise ValueError("pass address= or client=, not both")
        if cluster_kwargs and (address is not None or client is not None):
            names = ", ".join(sorted(cluster_kwargs))
            raise ValueError(
                f"LocalCluster settings ({names}) apply only when neither address= nor client= "
                "is given"
            )
        self.address = address
        self.cluster_kwargs = cluster_kwargs
        self._user_client = client
        self._client: Any = client
        self._cluster: Any = None
        self._lock = threading.Lock()
        self._inflight: set[DaskAttempt] = set()
        self._shipper = Shipper(main_importable=False)

    @property
    def client(self) -> Any:
        """Return the ``distributed.Client`` in use, or ``None`` before ``start()``."""
        return self._client

    def start(self, max_workers: int) -> None:
        """Connect to the cluster: the caller's client, ``address``, or a new ``LocalCluster``."""
        if self._client is not None:
            return
        distributed = _distributed()
        if self.address is not None:
            self._client = distributed.Client(self.address, set_as_default=False)
            return
        settings: dict[str, Any] = {
            "processes": False,
            "n_workers": 1,
            "threads_per_worker": max_workers,
            "dashboard_address": None,
            "worker_dashboard_address": _LOOPBACK_ANY_PORT,
        }
        settings.update(self.cluster_kwargs)
        if settings["dashboard_address"] is None and "scheduler_kwargs" not in settings:
            # Without a dashboard the scheduler still serves its HTTP routes
            # (health, metrics), by default on port 8787 of the machine's
            # address: keep them on a free loopback port instead.
            settings["scheduler_kwargs"] = {
                "dashboard": False,
                "dashboard_address": _LOOPBACK_ANY_PORT,
            }
        if settings["processes"]:
            settings.setdefault("host", "127.0.0.1")
        cluster = distributed.LocalCluster(**settings)
        try:
            self._client = distributed.Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        self._cluster = cluster

    def check_pipeline(self, compiled: CompiledPipeline) -> None:
        """Check, before the run, that every task can be sent to a Dask worker.

        Raises:
            NotPicklableError: a task uses an object that cannot be pickled;
                names the task and the object.
        """
        self._shipper.prepare(compiled)

    def submit(self, call: TaskCall, context: ExecutionContext) -> Future[Any]:
        """Submit one attempt to the cluster and return a future of its result.

        Raises:
            NotPicklableError: the task's function cannot be pickled.
            RuntimeError: the executor is not started.
        """
        client = self._client
        if client is None:
            raise RuntimeError("the dask executor is not started; call start(max_workers)")
        call = self._shipper.ship(call)
        remote = RemoteContext.from_context(context, for_body=call.wants_context)
        dask_future = client.submit(
            run_on_dask,
            call,
            remote,
            key=f"{call.task}-{call.attempt}-{uuid.uuid4().hex}",
            priority=_MOST_URGENT_PRIORITY - call.level,
            pure=False,
        )
        attempt = DaskAttempt(dask_future, call.task, call.timeout)
        with self._lock:
            self._inflight.add(attempt)
        attempt.add_done_callback(self._forget)
        dask_future.client.loop.add_callback(
            attempt.settle, context if call.wants_context else None
        )
        return attempt

    def _forget(self, attempt: Future[Any]) -> None:
        with self._lock:
            self._inflight.discard(attempt)

    def cancel(self, future: Future[Any]) -> bool:
        """Cancel the attempt and its Dask future; return whether it was still pending here."""
        if isinstance(future, AttemptFuture):
            return future.stop()
        return future.cancel()

    def shutdown(self, *, cancel: bool = False) -> None:
        """Cancel what is in flight (when ``cancel``); close the client and cluster made here."""
        with self._lock:
            inflight, self._inflight = self._inflight, set()
        if cancel:
            for attempt in inflight:
                attempt.cancel()
        if self._user_client is not None:
            return
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        with _quiet_closed_comms():
            if client is not None:
                client.close()
            if cluster is not None:
                _close_cluster(cluster)


@contextlib.contextmanager
def _quiet_closed_comms() -> Iterator[None]:
    """Hold back Dask's note, with a traceback, that a comm closed while this closes it.

    Cancelled attempts make the scheduler answer the client while the client
    closes; its batched stream then logs the ``CommClosedError`` at INFO level
    with the whole traceback, which ``pipeopt run`` would print for an
    ordinary Ctrl-C.
    """
    batched = logging.getLogger("distributed.batched")
    saved = batched.level
    batched.setLevel(max(logging.WARNING, saved))
    try:
        yield
    finally:
        batched.setLevel(saved)


def _close_cluster(cluster: Any) -> None:
    """Close a ``LocalCluster`` made here without waiting for bodies still running.

    Closing a worker waits, by default, up to 30 s for the threads of its
    executor; a body that ignores cancellation (a timed-out or interrupted
    attempt) would hold the run that long. In-process workers are closed
    first without that wait: their threads are daemon threads, which run
    the abandoned body to its end and die with the process at the latest.
    Worker processes (``processes=True``) are stopped by their nannies.
    """
    distributed = _distributed()
    for worker in list(cluster.workers.values()):
        if isinstance(worker, distributed.Worker):
            with contextlib.suppress(Exception):
                cluster.sync(worker.close, executor_wait=False, reason="pipeopt executor shutdown")
    cluster.close()
