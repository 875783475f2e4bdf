"""The context handed to each task attempt: the :class:`TaskContext` protocol and its two forms.

A task asks for it with a parameter named ``context``. It gives the task its
upstream results, which attempt this is, a logger that names the task and
attempt, a cancellation flag, custom metrics, and the batching loop:
``plan_batch(pending)`` asks the task's batcher for the next batch size,
``record_batch(size, latency)`` feeds the measured latency back, and
``write_batches(rows, sink)`` runs that loop into a sink, exactly once.

:class:`TaskContext` names that role. :class:`ExecutionContext` plays it in
the driver's process (thread, sync and async executors);
:class:`~pipeopt.executors.remote.RemoteContext` plays it in worker
processes and on Dask workers, and sends what it records back to the
driver. Both share :class:`ContextBase`, so a body sees the same behaviour
wherever it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pipeopt._validate import check_float, check_int

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.sinks import Sink, WriteReport

_log = logging.getLogger("pipeopt.task")


@runtime_checkable
class TaskContext(Protocol):
    """What a task attempt can see and report, on every executor.

    Annotate a body's ``context`` parameter with it; the type checker holds
    every executor's context to it.

    Attributes:
        task: the task's name.
        attempt: which attempt this is, 1 for the first try.
        run_id: the id of the run.
        lineage_id: the id of the run this one resumes, first of the chain
            (``pipeopt resume`` of a resume keeps the original's id); the
            run's own id when it resumes nothing.
        criticality: the task's effective criticality label.
    """

    task: str
    attempt: int
    run_id: str
    lineage_id: str
    criticality: str

    @property
    def upstream(self) -> dict[str, Any]:
        """Return the results of this task's dependencies, by task name."""

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Return a logger whose records name the task and attempt; they reach the driver."""

    @property
    def cancelled(self) -> bool:
        """Return whether the run asked this attempt to stop (timeout or interrupt)."""

    def record_custom_metric(self, name: str, value: float) -> None:
        """Record a named number for this task (last value wins)."""

    def plan_batch(self, pending: int | None = None) -> int:
        """Return how many items the next batch should hold."""

    def record_batch(self, size: int, latency: float) -> None:
        """Feed back one batch: its size and how long it took, in seconds."""

    def write_batches(
        self,
        rows: Any,
        sink: Sink,
        *,
        load_id: str | None = None,
        max_dead_letters: int | float | None = 0.1,
    ) -> WriteReport:
        """Write ``rows`` to ``sink`` exactly once, in batches sized by this task's batcher."""


class TaskLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefix each message with ``[task #attempt]``."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Return the message with the task and attempt in front."""
        extra = self.extra or {}
        return f"[{extra['task']} #{extra['attempt']}] {msg}", kwargs


class ContextBase:
    """The parts of a :class:`TaskContext` that do not depend on where the body runs.

    Subclasses say where the batcher comes from (:meth:`_get_batcher`),
    what happens after a batch was fed to it (:meth:`_batch_done`), which
    logger records go to (:meth:`_base_logger`) and whether the attempt
    was cancelled.
    """

    __slots__ = (
        "_custom",
        "_loads",
        "_logger",
        "_upstream",
        "attempt",
        "criticality",
        "lineage_id",
        "run_id",
        "task",
    )

    def __init__(
        self,
        task: str,
        *,
        attempt: int,
        run_id: str,
        lineage_id: str | None,
        criticality: str,
        custom_metrics: dict[str, float] | None,
    ) -> None:
        self.task = task
        self.attempt = attempt
        self.run_id = run_id
        self.lineage_id = lineage_id or run_id
        self.criticality = criticality
        self._custom = custom_metrics if custom_metrics is not None else {}
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._loads: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, attempt={self.attempt})"

    @property
    def upstream(self) -> dict[str, Any]:
        """Return the results of this task's dependencies, by task name."""
        raise NotImplementedError

    @property
    def cancelled(self) -> bool:
        """Return whether the run asked this attempt to stop."""
        raise NotImplementedError

    def _get_batcher(self) -> Batcher:
        raise NotImplementedError

    def _batch_done(self, size: int, latency: float) -> None:
        """Note a batch already fed to this context's batcher."""

    def _base_logger(self) -> logging.Logger:
        return _log

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Return a logger whose records name the task and the attempt."""
        if self._logger is None:
            self._logger = TaskLogAdapter(
                self._base_logger(), {"task": self.task, "attempt": self.attempt}
            )
        return self._logger

    def record_custom_metric(self, name: str, value: float) -> None:
        """Record a named number for this task (last value wins).

        It appears in the task's outcome, the live dashboard and as
        ``pipeline_task_custom_metric{pipeline, group, task, name}``; the run
        store does not keep it.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        self._custom[name] = check_float(f"metric {name!r} value", value)

    def plan_batch(self, pending: int | None = None) -> int:
        """Return how many items the next batch should hold.

        Args:
            pending: items still to write, if known; the answer never exceeds it.
        """
        if pending is not None:
            check_int("pending", pending, minimum=0)
        return self._get_batcher().plan(pending)

    def record_batch(self, size: int, latency: float) -> None:
        """Feed back one batch: its size and how long it took, in seconds."""
        check_int("size", size, minimum=0)
        check_float("latency", latency, minimum=0.0)
        self._get_batcher().record(size, latency)
        self._batch_done(size, latency)

    def load_key(self, sink: Sink) -> str | None:
        """Return the default load key of this attempt's next load into ``sink``.

        ``<lineage_id>/<task>/<table>#<n>``, where ``n`` counts this
        attempt's loads into that table (1 for the first), so that a body
        writing chunk after chunk gets one key per chunk, the same ones in
        every attempt and every resume of the run. ``None`` outside a run.
        """
        from pipeopt.sinks.write import default_load_key, sink_table

        if not self.lineage_id:
            return None
        ordinal = self._loads.get(sink_table(sink), 0) + 1
        return default_load_key(self.lineage_id, self.task, sink, ordinal)

    def write_batches(
        self,
        rows: Any,
        sink: Sink,
        *,
        load_id: str | None = None,
        max_dead_letters: int | float | None = 0.1,
    ) -> WriteReport:
        """Write ``rows`` to ``sink`` exactly once, in batches sized by this task's batcher.

        The load keeps a ledger in the target database, keyed by ``load_id``
        or by default by :meth:`load_key` (the run's lineage and the task):
        a retry of this task, or ``pipeopt resume`` of the run, goes on after
        the last committed batch; ``load_id="orders-2024-06-01"`` makes reruns
        of the same data skip what is loaded. The rows must come in the same
        order each time. Cancellation (a timeout, Ctrl-C) is checked before
        every write. Refused rows go to the sink's dead-letter table with
        the run, task, attempt and their input position. See
        :func:`pipeopt.sinks.write_batches` for accepted inputs and errors.

        The counts land in the task's custom metrics: ``rows_written``,
        ``rows_dead_lettered`` and ``rows_skipped`` (already loaded by an
        earlier attempt or run), summed over its loads and attempts, however
        each call ended (an exception of ``rows`` itself included).
        """
        from pipeopt.sinks import LoadOrigin, write_batches
        from pipeopt.sinks.write import sink_table

        key = self.load_key(sink) if load_id is None else None
        table = sink_table(sink)
        self._loads[table] = self._loads.get(table, 0) + 1
        return write_batches(
            rows,
            sink,
            self._get_batcher(),
            on_batch=self._batch_done,
            load_id=load_id,
            load_key=key,
            max_dead_letters=max_dead_letters,
            cancelled=lambda: self.cancelled,
            origin=LoadOrigin(self.run_id, self.task, self.attempt),
            on_report=self._count,
        )

    def _count(self, report: WriteReport) -> None:
        for name, value in (
            ("rows_written", report.rows_written),
            ("rows_dead_lettered", report.rows_dead_lettered),
            ("rows_skipped", report.rows_skipped),
        ):
            self._custom[name] = self._custom.get(name, 0.0) + value


class ExecutionContext(ContextBase):
    """The :class:`TaskContext` of an attempt that runs in the driver's process."""

    __slots__ = (
        "_batch_observer",
        "_batcher",
        "_batcher_factory",
        "_batcher_template",
        "_cancelled",
        "_dependencies",
        "_results",
    )

    def __init__(
        self,
        task: str,
        *,
        attempt: int = 1,
        run_id: str = "",
        lineage_id: str | None = None,
        criticality: str = "medium",
        dependencies: tuple[str, ...] = (),
        results: Mapping[str, Any] | None = None,
        batcher: Batcher | None = None,
        batcher_factory: Callable[[], Batcher] | None = None,
        batcher_template: Callable[[], Batcher] | None = None,
        custom_metrics: dict[str, float] | None = None,
        cancelled: threading.Event | None = None,
        batch_observer: Callable[[str, int, float], None] | None = None,
    ) -> None:
        super().__init__(
            task,
            attempt=attempt,
            run_id=run_id,
            lineage_id=lineage_id,
            criticality=criticality,
            custom_metrics=custom_metrics,
        )
        self._dependencies = dependencies
        self._results: Mapping[str, Any] = results if results is not None else {}
        self._batcher = batcher
        self._batcher_factory = batcher_factory
        self._batcher_template = batcher_template
        self._cancelled = cancelled if cancelled is not None else threading.Event()
        self._batch_observer = batch_observer

    @property
    def upstream(self) -> dict[str, Any]:
        """Return the results of this task's dependencies, by task name."""
        return {name: self._results[name] for name in self._dependencies}

    @property
    def cancelled(self) -> bool:
        """Return whether the run asked this attempt to stop (timeout or interrupt).

        Long-running bodies should check it between units of work: a thread
        cannot be stopped from outside.
        """
        return self._cancelled.is_set()

    def _get_batcher(self) -> Batcher:
        if self._batcher is None:
            if self._batcher_factory is not None:
                self._batcher = self._batcher_factory()
            else:
                self._batcher = _default_batcher()
        return self._batcher

    def batcher_for_remote(self) -> Batcher:
        """Return the batcher a copy of which an attempt in another process starts from.

        The task's batcher when it has one; otherwise a fresh one made like
        it, without registering it for the run (so that tasks that never
        batch do not show up with a batcher).
        """
        if self._batcher is not None:
            return self._batcher
        if self._batcher_template is not None:
            return self._batcher_template()
        if self._batcher_factory is not None:
            return self._get_batcher()
        return _default_batcher()

    def _batch_done(self, size: int, latency: float) -> None:
        if self._batch_observer is not None:
            self._batch_observer(self.task, size, latency)


def _default_batcher() -> Batcher:
    from pipeopt.batching import AdaptiveBatcher

    return AdaptiveBatcher(target_latency=0.1, initial_size=1000)
