"""The task context and the outcome of an attempt that runs in another process.

Policy
    A body in a worker process or on a Dask worker gets a
    :class:`RemoteContext`: the same :class:`~pipeopt.context.TaskContext`
    as in the driver, built from the driver's context when the attempt is
    submitted. It carries the upstream results, a copy of the task's batcher
    (so ``plan_batch`` answers from the driver's model) and the driver's log
    level. What the body records travels back in the :class:`RemoteOutcome`
    and is replayed into the driver's context: custom metrics, every batch
    (which feeds the driver's batcher and metrics, so its model is merged
    back), and log records — of the context's logger and of any logger the
    body uses — which the driver hands to its own logging, so a task's logs
    are the same on every executor.

State
    The executor that runs the body installs two hooks with
    :func:`run_remote`: ``cancelled``, which tells the body whether the
    driver asked the attempt to stop (a flag shared with a worker process,
    the task's state on a Dask worker), and ``emit``, which sends a log
    record to the driver at once (the process executor's pipe); without it
    records wait in the outcome.

Invariants
    :func:`run_remote` never raises: every failure of the body is in the
    outcome, with an exception that pickles and its formatted traceback.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import logging
import pickle
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle

from pipeopt.context import ContextBase, ExecutionContext
from pipeopt.errors import RemoteTaskError, RemoteTraceback
from pipeopt.executors.base import close_thread_loop, resolve_output

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.executors.base import TaskCall

__all__ = [
    "RemoteContext",
    "RemoteOutcome",
    "deliver_record",
    "dump_outcome",
    "run_remote",
]

PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL
_ASYNC_KINDS = ("coroutine", "async_generator")
_TASK_LOGGER = "pipeopt.task"


class _Forward(logging.Handler):
    """Hand each record, made picklable, to the context's ``emit`` hook or its buffer."""

    def __init__(self, context: RemoteContext) -> None:
        super().__init__()
        self._context = context

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._context.send_record(_sendable(record))
        except Exception:
            self.handleError(record)


def _sendable(record: logging.LogRecord) -> logging.LogRecord:
    """Return a copy of ``record`` that pickles: message formatted, traceback as text."""
    sent = copy.copy(record)
    sent.msg = record.getMessage()
    sent.args = None
    if record.exc_info:
        sent.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
        sent.exc_info = None
    return sent


_body: contextvars.ContextVar[RemoteContext | None] = contextvars.ContextVar(
    "pipeopt_remote_body", default=None
)
_capture_lock = threading.Lock()
_capture_installed = False


class _WorkerCapture(logging.Handler):
    """On the worker's root logger: forward a copy of each record a body emits to its context.

    Records of the body's own loggers (``logging.getLogger(__name__)`` in
    user code) reach the driver as they would on a thread; the worker's
    other handlers still see the original record.
    """

    def emit(self, record: logging.LogRecord) -> None:
        context = _body.get()
        if context is None:
            return
        try:
            context.send_record(_sendable(record))
        except Exception:
            self.handleError(record)


def _install_worker_capture() -> None:
    global _capture_installed
    with _capture_lock:
        if not _capture_installed:
            logging.getLogger().addHandler(_WorkerCapture())
            _capture_installed = True


class RemoteContext(ContextBase):
    """The :class:`~pipeopt.context.TaskContext` of an attempt in another process."""

    __slots__ = ("_batcher", "_batches", "_emit", "_level", "_probe", "_records", "root_level")

    def __init__(
        self,
        task: str,
        *,
        attempt: int = 1,
        run_id: str = "",
        lineage_id: str | None = None,
        criticality: str = "medium",
        upstream: Mapping[str, Any] | None = None,
        batcher: Batcher | None = None,
        log_level: int = logging.NOTSET,
        root_level: int = logging.WARNING,
    ) -> None:
        super().__init__(
            task,
            attempt=attempt,
            run_id=run_id,
            lineage_id=lineage_id,
            criticality=criticality,
            custom_metrics=None,
        )
        self._upstream: dict[str, Any] = dict(upstream or {})
        self._batcher = batcher
        self._level = log_level
        self.root_level = root_level
        self._batches: list[tuple[int, float]] = []
        self._records: list[logging.LogRecord] = []
        self._probe: Callable[[], bool] | None = None
        self._emit: Callable[[logging.LogRecord], None] | None = None

    @classmethod
    def from_context(cls, context: ExecutionContext, *, for_body: bool = True) -> RemoteContext:
        """Return the context a remote attempt of ``context``'s task starts with.

        With ``for_body=False`` (a body that takes no ``context``) it carries
        no upstream results and no batcher: it only brings the body's log
        records back.
        """
        return cls(
            context.task,
            attempt=context.attempt,
            run_id=context.run_id,
            lineage_id=context.lineage_id,
            criticality=context.criticality,
            upstream=context.upstream if for_body else None,
            batcher=context.batcher_for_remote() if for_body else None,
            log_level=logging.getLogger(_TASK_LOGGER).getEffectiveLevel(),
            root_level=logging.getLogger().getEffectiveLevel(),
        )

    def __getstate__(self) -> tuple[Any, ...]:
        return (
            self.task,
            self.attempt,
            self.run_id,
            self.lineage_id,
            self.criticality,
            self._upstream,
            _batcher_bytes(self._batcher),
            self._level,
            self.root_level,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self.task,
            self.attempt,
            self.run_id,
            self.lineage_id,
            self.criticality,
            self._upstream,
            batcher,
            self._level,
            self.root_level,
        ) = state
        self._batcher = pickle.loads(batcher) if batcher is not None else None
        self._custom = {}
        self._loads = {}
        self._batches = []
        self._records = []
        self._probe = None
        self._emit = None
        self._logger = None

    @property
    def upstream(self) -> dict[str, Any]:
        """Return the results of this task's dependencies, by task name."""
        return self._upstream

    @property
    def cancelled(self) -> bool:
        """Return whether the driver asked this attempt to stop (timeout or interrupt).

        The process executor gives a cancelled attempt's body a short grace
        period to return before it terminates the process; on Dask a running
        body cannot be interrupted at all, so long bodies should check this
        between units of work.
        """
        return self._probe is not None and self._probe()

    def _get_batcher(self) -> Batcher:
        if self._batcher is None:
            from pipeopt.context import _default_batcher

            self._batcher = _default_batcher()
        return self._batcher

    def _batch_done(self, size: int, latency: float) -> None:
        self._batches.append((size, latency))

    def _base_logger(self) -> logging.Logger:
        # Not registered with logging: its records go to the driver, never to
        # the worker's own handlers.
        logger = logging.Logger(_TASK_LOGGER, self._level)
        logger.propagate = False
        logger.addHandler(_Forward(self))
        return logger

    def send_record(self, record: logging.LogRecord) -> None:
        """Send a log record to the driver now, or keep it for the outcome."""
        if self._emit is not None:
            self._emit(record)
        else:
            self._records.append(record)

    def install(
        self,
        *,
        cancelled: Callable[[], bool] | None = None,
        emit: Callable[[logging.LogRecord], None] | None = None,
    ) -> None:
        """Connect the context to its executor: how to see a cancellation, where records go."""
        self._probe = cancelled
        self._emit = emit

    def outcome(self) -> RemoteOutcome:
        """Return an empty outcome carrying what the body recorded."""
        return RemoteOutcome(
            custom_metrics=self._custom, batches=self._batches, records=self._records
        )


def _batcher_bytes(batcher: Batcher | None) -> bytes | None:
    """Pickle a copy of ``batcher``; a batcher that does not pickle is replaced by a fixed size."""
    if batcher is None:
        return None
    try:
        return pickle.dumps(batcher, PICKLE_PROTOCOL)
    except Exception:
        from pipeopt.batching import FixedBatcher

        return pickle.dumps(FixedBatcher(batcher.plan(None)), PICKLE_PROTOCOL)


def deliver_record(record: logging.LogRecord) -> None:
    """Hand a record made in another process to the driver's logging."""
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


@dataclass(slots=True)
class RemoteOutcome:
    """What an attempt in another process sends back: a value or an error, plus what it recorded."""

    value: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    custom_metrics: dict[str, float] = field(default_factory=dict)
    batches: list[tuple[int, float]] = field(default_factory=list)
    records: list[logging.LogRecord] = field(default_factory=list)

    def replay(self, context: ExecutionContext | None) -> None:
        """Record the attempt's metrics, batches and log records in the driver."""
        for record in self.records:
            deliver_record(record)
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
        pickle.loads(dumps(error))
    except Exception:
        return RemoteTaskError(f"{type(error).__qualname__}: {error}")
    return error


def dumps(obj: Any) -> bytes:
    """Pickle ``obj``; what plain pickle refuses (a class made by value) goes by cloudpickle."""
    try:
        return pickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        data: bytes = cloudpickle.dumps(obj, PICKLE_PROTOCOL)
        return data


def run_remote(call: TaskCall, context: RemoteContext | None) -> RemoteOutcome:
    """Run one attempt in a worker (process or Dask) and return its outcome; never raise.

    Generators are drained into a list; coroutines and async generators run
    on an event loop that is closed again before returning, so worker
    threads keep no loops alive.
    """
    outcome = context.outcome() if context is not None else RemoteOutcome()
    token = None
    if context is not None:
        _install_worker_capture()
        token = _body.set(context)
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
    finally:
        if token is not None:
            _body.reset(token)
    return outcome


def dump_outcome(outcome: RemoteOutcome, task: str) -> bytes:
    """Pickle ``outcome`` for the driver; a result that does not pickle fails the attempt."""
    try:
        return dumps(outcome)
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
        return dumps(failed)
