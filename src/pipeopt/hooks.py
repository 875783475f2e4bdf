"""What a run calls out to: a store-like observer of its events and the per-run services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.result import AttemptRecord, TaskState


class RunObserver(Protocol):
    """Receives a run's events, e.g. to record them in a run store.

    ``attempt_finished`` and ``task_succeeded`` are called while the
    scheduler's lock is held: implementations must only hand the event to a
    background writer, never block.
    """

    def attempt_finished(self, task: str, record: AttemptRecord, state: TaskState) -> None:
        """One attempt ended; ``state`` is the task's state after it."""

    def task_succeeded(self, task: str, result: Any, cache_key: str | None) -> None:
        """A task succeeded with ``result`` (persist it if allowed)."""

    def cache_lookup(self, task: str, cache_key: str) -> tuple[bool, Any]:
        """Return ``(True, result)`` if ``cache_key`` already succeeded, else ``(False, None)``."""


@dataclass(slots=True)
class RunHooks:
    """Per-run services the run loop passes into each attempt."""

    run_id: str
    batchers: dict[str, Batcher]
    batcher_factory: Callable[[str], Batcher]
    batch_observer: Callable[[str, int, float], None] | None = None
    observer: RunObserver | None = None
    lineage_id: str | None = None


__all__ = ["RunHooks", "RunObserver"]
