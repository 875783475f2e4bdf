"""Task duration estimates: the cost of each task on the critical path.

Policy
    A task costs its ``expected_duration`` hint when it has one; without a
    hint, its duration learned from earlier runs of the same pipeline (the
    median of its last :data:`WINDOW` successful attempts; the items
    ``name[i]`` of a mapped task are attempts of ``name``); with neither, 1.0
    (the critical path then counts tasks). Estimates only rank tasks of one
    criticality level against each other: criticality still comes first.

State
    :class:`LearnedDurations` is what a run store keeps per pipeline: task
    names with their estimate, sample count and recent samples, as columns
    (loading 100,000 of them is one row and a few C-level copies).
    :class:`TaskEstimates` is what one run used, per task of its graph.

Invariants
    every estimate is a finite number of seconds >= 0; a window holds at
    most :data:`WINDOW` samples, oldest first; ``samples`` counts every
    sample ever learned, the window only the latest.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline
    from pipeopt.result import RunResult

WINDOW: Final = 10  # samples per task behind the median
HINT: Final = -1  # TaskEstimates.samples of a task ranked by its expected_duration
NONE: Final = 0  # ... of a task ranked by hop count (no hint, no history)


@dataclass(frozen=True, slots=True)
class LearnedDurations:
    """The durations learned for one pipeline's tasks (columns, aligned by index).

    Attributes:
        names: task names (a mapped task's items learn under the task's name).
        seconds: the estimate per task: the median of its window.
        samples: how many successful attempts were learned per task, in all.
        windows: the latest :data:`WINDOW` durations per task, oldest first;
            empty when loaded only to rank a run.
    """

    names: tuple[str, ...]
    seconds: Sequence[float]
    samples: Sequence[int]
    windows: tuple[tuple[float, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self) -> dict[str, tuple[float, int]]:
        """Return ``{task: (seconds, samples)}``."""
        return dict(zip(self.names, zip(self.seconds, self.samples, strict=True), strict=True))


@dataclass(frozen=True, slots=True)
class TaskEstimates:
    """The estimate each task of a run was ranked by.

    Attributes:
        seconds: per task (compiled order), the estimate in seconds, or
            ``None`` when it had none (it then cost 1.0).
        samples: per task, :data:`HINT` for an ``expected_duration``,
            :data:`NONE` for no estimate, else the learned sample count.
        learned: how many tasks used a learned duration.
    """

    seconds: list[float | None]
    samples: list[int]
    learned: int

    def costs(self) -> list[float]:
        """Return each task's cost on the critical path (1.0 where it had no estimate)."""
        return [1.0 if s is None else s for s in self.seconds]

    def source(self, i: int) -> str:
        """Return where task ``i``'s estimate came from (see :func:`source_text`)."""
        return source_text(self.samples[i])


def source_text(samples: int) -> str:
    """Return ``"hint"``, ``"learned (n samples)"`` or ``"none"`` for a samples code."""
    if samples == HINT:
        return "hint"
    if samples <= NONE:
        return "none"
    return f"learned ({samples} sample{'s' if samples != 1 else ''})"


def estimate_text(seconds: float | None, samples: int) -> str:
    """Return an estimate and its source for people: ``0.120s (learned (5 samples))``."""
    if seconds is None or samples == NONE:
        return "none"
    return f"{seconds:.3g}s ({source_text(samples)})"


def plan(compiled: CompiledPipeline, learned: LearnedDurations | None) -> TaskEstimates:
    """Return the estimate of each task of ``compiled``: its hint, else ``learned``, else none."""
    found = learned.lookup() if learned else {}
    seconds: list[float | None] = []
    samples: list[int] = []
    used = 0
    for task in compiled.tasks:
        hint = task.expected_duration
        if hint is not None:
            seconds.append(hint)
            samples.append(HINT)
            continue
        entry = found.get(task.name)
        if entry is None:
            seconds.append(None)
            samples.append(NONE)
        else:
            seconds.append(entry[0])
            samples.append(entry[1])
            used += 1
    return TaskEstimates(seconds, samples, used)


def run_samples(result: RunResult, mapped: Iterable[str]) -> dict[str, list[float]]:
    """Return the durations of ``result``'s successful attempts, by task or mapped task.

    A task that succeeded after retries counts its successful attempt only;
    cached and resumed tasks ran nothing and count nothing.
    """
    from pipeopt.result import TaskState

    groups = frozenset(mapped)
    succeeded = TaskState.SUCCEEDED
    found: dict[str, list[float]] = {}
    for outcome in result.tasks.values():
        history = outcome.attempt_history
        if outcome.state is not succeeded or not history:
            continue
        duration = history[-1].duration
        if not math.isfinite(duration) or duration < 0:
            continue
        name = outcome.name
        if groups and name[-1:] == "]":
            base = name.partition("[")[0]
            if base in groups:
                name = base
        window = found.get(name)
        if window is None:
            found[name] = [duration]
        else:
            window.append(duration)
    return found


def learn(
    old: LearnedDurations | None, new: Mapping[str, Sequence[float]], keep: Iterable[str]
) -> LearnedDurations:
    """Return ``old`` with the samples ``new`` added, for the tasks in ``keep``.

    A task of ``old`` not in ``keep`` (no longer in the pipeline) is dropped.
    Each window keeps the last :data:`WINDOW` samples; ``new`` samples of one
    task are in the order they came.
    """
    windows: dict[str, tuple[float, ...]] = {}
    counts: dict[str, int] = {}
    if old is not None:
        windows = dict(zip(old.names, old.windows, strict=True))
        counts = dict(zip(old.names, old.samples, strict=True))
    names: list[str] = []
    kept_windows: list[tuple[float, ...]] = []
    seconds = array("d")
    samples = array("q")
    for name in keep:
        added = new.get(name)
        window = windows.get(name)
        count = counts.get(name, 0)
        if added:
            window = (*window, *added)[-WINDOW:] if window else tuple(added[-WINDOW:])
            count += len(added)
        if not window:
            continue
        names.append(name)
        kept_windows.append(window)
        seconds.append(median(window))
        samples.append(count)
    return LearnedDurations(tuple(names), seconds, samples, tuple(kept_windows))


def median(values: Sequence[float]) -> float:
    """Return the median of a non-empty sequence (the mean of the middle two if even)."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2
