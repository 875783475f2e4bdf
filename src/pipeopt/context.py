"""The :class:`ExecutionContext` handed to each task attempt.

A task asks for it with a parameter named ``context``. It gives the task its
upstream results, which attempt this is, a logger that names the task and
attempt, a cancellation flag, custom metrics, and the batching loop:
``plan_batch(pending)`` asks the task's batcher for the next batch size and
``record_batch(size, latency)`` feeds the measured latency back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pipeopt._validate import check_float, check_int

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.sinks import Sink, WriteReport

_log = logging.getLogger("pipeopt.task")


class _TaskLogAdapter(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = self.extra or {}
        return f"[{extra['task']} #{extra['attempt']}] {msg}", kwargs


class ExecutionContext:
    """What a task attempt can see and report.

    Attributes:
        task: the task's name.
        attempt: which attempt this is, 1 for the first try.
        run_id: the id of the run.
        criticality: the task's effective criticality label.
    """

    __slots__ = (
        "_batch_observer",
        "_batcher",
        "_batcher_factory",
        "_cancelled",
        "_custom",
        "_dependencies",
        "_logger",
        "_results",
        "attempt",
        "criticality",
        "run_id",
        "task",
    )

    def __init__(
        self,
        task: str,
        *,
        attempt: int = 1,
        run_id: str = "",
        criticality: str = "medium",
        dependencies: tuple[str, ...] = (),
        results: Mapping[str, Any] | None = None,
        batcher: Batcher | None = None,
        batcher_factory: Callable[[], Batcher] | None = None,
        custom_metrics: dict[str, float] | None = None,
        cancelled: threading.Event | None = None,
        batch_observer: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.task = task
        self.attempt = attempt
        self.run_id = run_id
        self.criticality = criticality
        self._dependencies = dependencies
        self._results: Mapping[str, Any] = results if results is not None else {}
        self._batcher = batcher
        self._batcher_factory = batcher_factory
        self._custom: dict[str, float] = custom_metrics if custom_metrics is not None else {}
        self._cancelled = cancelled if cancelled is not None else threading.Event()
        self._batch_observer = batch_observer
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    def __repr__(self) -> str:
        return f"ExecutionContext(task={self.task!r}, attempt={self.attempt})"

    @property
    def upstream(self) -> dict[str, Any]:
        """Return the results of this task's dependencies, by task name."""
        return {name: self._results[name] for name in self._dependencies}

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """Return a logger whose records name the task and the attempt."""
        if self._logger is None:
            self._logger = _TaskLogAdapter(_log, {"task": self.task, "attempt": self.attempt})
        return self._logger

    @property
    def cancelled(self) -> bool:
        """Return whether the run asked this attempt to stop (timeout or interrupt).

        Long-running bodies should check it between units of work: a thread
        cannot be stopped from outside.
        """
        return self._cancelled.is_set()

    def record_custom_metric(self, name: str, value: float) -> None:
        """Record a named number for this task (last value wins).

        It appears in the task's outcome, the dashboard and as
        ``pipeline_task_custom_metric{task, name}``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        self._custom[name] = check_float(f"metric {name!r} value", value)

    def _get_batcher(self) -> Batcher:
        if self._batcher is None:
            if self._batcher_factory is not None:
                self._batcher = self._batcher_factory()
            else:
                from pipeopt.batching import AdaptiveBatcher

                self._batcher = AdaptiveBatcher(target_latency=0.1, initial_size=1000)
        return self._batcher

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
        if self._batch_observer is not None:
            self._batch_observer(self.task, size, latency)

    def write_batches(self, rows: Iterable[Any], sink: Sink) -> WriteReport:
        """Write ``rows`` to ``sink`` in batches sized by this task's batcher.

        Failing batches are split to isolate bad rows, which go to the sink's
        dead-letter table; every other row is written once.
        """
        from pipeopt.sinks import write_batches

        def observe(size: int, latency: float) -> None:
            if self._batch_observer is not None:
                self._batch_observer(self.task, size, latency)

        report = write_batches(rows, sink, self._get_batcher(), on_batch=observe)
        self._custom["rows_written"] = self._custom.get("rows_written", 0.0) + report.rows_written
        self._custom["rows_dead_lettered"] = (
            self._custom.get("rows_dead_lettered", 0.0) + report.rows_dead_lettered
        )
        return report
