"""One attempt of a task: its bookkeeping, and the context and call it runs with.

An :class:`Attempt` lives from the moment a worker claims the task until
its outcome is recorded; :func:`attempt_context` and :func:`attempt_call`
build what the body and the executor receive.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeopt.context import ExecutionContext
from pipeopt.executors.base import TaskCall
from pipeopt.priority import LABELS

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.hooks import RunHooks
    from pipeopt.scheduler import SchedulerCore

__all__ = ["Attempt", "attempt_call", "attempt_context"]


@dataclass(slots=True)
class Attempt:
    """One attempt of a task: its slot bookkeeping and, once it ran, its outcome."""

    index: int
    number: int
    started_wall: float
    started: float
    deadline: float | None
    cancel: threading.Event | None = None
    abandoned: bool = False
    stopped: bool = False  # the run asked it to stop (interrupt or fail_fast)
    stop_reason: BaseException | None = None
    future: Future[Any] | None = None
    cache_key: str | None = None
    error: BaseException | None = None
    text: str | None = None
    ended: float = 0.0

    def cancel_event(self) -> threading.Event:
        """Return the attempt's cancel flag, made on first use."""
        if self.cancel is None:
            self.cancel = threading.Event()
        return self.cancel


def attempt_context(
    core: SchedulerCore, hooks: RunHooks, i: int, attempt: Attempt
) -> ExecutionContext:
    """Return the context task ``i``'s ``attempt`` runs with in this process."""
    task = core.tasks[i]
    name = core.groups[i]  # items share their task's batcher

    def batcher() -> Batcher:
        found = hooks.batchers.get(name)
        if found is None:
            found = hooks.batchers[name] = hooks.batcher_factory(name)
        return found

    def template() -> Batcher:
        found = hooks.batchers.get(name)
        return found if found is not None else hooks.batcher_factory(name)

    return ExecutionContext(
        core.names[i],
        attempt=attempt.number,
        run_id=hooks.run_id,
        lineage_id=hooks.lineage_id,
        criticality=LABELS[core.levels[i]],
        dependencies=task.dependency_names,
        results=core.inputs(i) if core.special[i] else core.results,
        batcher_factory=batcher,
        batcher_template=template,
        custom_metrics=core.outcomes[i].custom_metrics,
        cancelled=attempt.cancel_event(),
        batch_observer=hooks.batch_observer,
    )


def attempt_call(core: SchedulerCore, i: int, attempt: Attempt, kwargs: dict[str, Any]) -> TaskCall:
    """Return what an executor needs to run task ``i``'s ``attempt`` with ``kwargs``."""
    task = core.tasks[i]
    injection = core.injections[i]
    return TaskCall(
        core.names[i],
        task.func,
        kwargs,
        injection.wants_context,
        injection.kind,
        attempt.number,
        core.levels[i],
        task.timeout,
    )
