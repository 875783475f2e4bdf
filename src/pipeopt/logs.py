"""Capture the log records a task's attempts emit into its outcome.

Policy
    While a run goes on, one :class:`CaptureHandler` sits on the root logger.
    A record is the task's when it was emitted while the task's body ran in
    this process (a :class:`contextvars.ContextVar` set around the body, so
    threads and coroutines each see their own task; coroutines inherit it from
    the thread that submits them). Each task keeps at most ``limit`` formatted records; the
    rest are counted and, when the run ends, a last line says how many were
    cut.

The handler does not change what reaches other handlers. When it is the
only handler on a record's way up, warnings and errors are still printed by
:data:`logging.lastResort`, as they were without it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeopt.result import TaskOutcome

DEFAULT_LIMIT = 200
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RECORD_CHARS = 4_000  # characters kept of one formatted record


current: contextvars.ContextVar[TaskOutcome | None] = contextvars.ContextVar(
    "pipeopt_task", default=None
)


class CaptureHandler(logging.Handler):
    """Route records to the :class:`TaskLog` of the task that emitted them."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.limit = DEFAULT_LIMIT
        self._cut: dict[int, int] = {}  # id(outcome) -> records not kept

    def emit(self, record: logging.LogRecord) -> None:
        """Capture ``record`` for its task, if it has one."""
        outcome = current.get()
        if outcome is not None:
            try:
                self.keep(outcome, self.format(record))
            except Exception:
                self.handleError(record)
        last = logging.lastResort
        if last is not None and record.levelno >= last.level and not _others(record, self):
            last.handle(record)

    def keep(self, outcome: TaskOutcome, text: str) -> None:
        """Add ``text`` to the outcome's logs if there is room; count it otherwise."""
        lines = outcome.logs
        if len(lines) < self.limit:
            if len(text) > _RECORD_CHARS:
                text = text[: _RECORD_CHARS - 3] + "..."
            lines.append(text)
        else:
            key = id(outcome)
            self._cut[key] = self._cut.get(key, 0) + 1

    def finish_run(self, outcomes: Iterable[TaskOutcome]) -> None:
        """End a run: note, in each of its outcomes' logs, how many records were cut."""
        if not self._cut:
            return
        for outcome in outcomes:
            cut = self._cut.pop(id(outcome), 0)
            if cut:
                outcome.logs.append(f"[{cut} more log records not kept: limit {self.limit}]")


def _others(record: logging.LogRecord, handler: logging.Handler) -> bool:
    """Return whether a handler other than ``handler`` will see ``record``."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not handler for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


class Capture:
    """Install one :class:`CaptureHandler` on the root logger while runs go on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self.handler = CaptureHandler()
        self._saved_task_level: int | None = None

    def __enter__(self) -> CaptureHandler:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                logging.getLogger().addHandler(self.handler)
                task_logger = logging.getLogger("pipeopt.task")
                if task_logger.level == logging.NOTSET:
                    # context.logger.info(...) must not vanish under the root's WARNING.
                    self._saved_task_level = task_logger.level
                    root_level = logging.getLogger().getEffectiveLevel()
                    task_logger.setLevel(min(logging.INFO, root_level))
        return self.handler

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                logging.getLogger().removeHandler(self.handler)
                if self._saved_task_level is not None:
                    logging.getLogger("pipeopt.task").setLevel(self._saved_task_level)
                    self._saved_task_level = None


capture = Capture()

__all__ = ["DEFAULT_LIMIT", "Capture", "CaptureHandler", "capture", "current"]
