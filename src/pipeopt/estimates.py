"""Task duration estimates: the cost of each task on the critical path.

Policy
    A task costs its ``expected_duration`` hint when it has one; without a
    hint, its duration learned from earlier runs of the same pipeline (the
    median of its last :data:`WINDOW` successful attempts, the lower middle
    one of an even number; the items ``name[i]`` of a mapped task are
    attempts of ``name``); with neither, 1.0 (the critical path then counts
    tasks). Estimates only rank tasks of one criticality level against each
    other: criticality still comes first.

State
    :class:`LearnedDurations` is what a run store keeps per pipeline: task
    names with their estimate, sample count and recent samples, as columns
    (loading 100,000 of them is one row and a few C-level copies).
    :class:`TaskEstimates` is what one run used, per task of its graph.

Invariants
    every estimate is a finite number of seconds >= 0; a window holds the
    last k = min(samples, :data:`WINDOW`) samples, newest last, after
    :data:`WINDOW` - k placeholders, as many -inf as +inf give or take one,
    such that the 5th smallest of the 10 slots is the lower median of the k
    samples (so the median is found without knowing k).
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, compress, repeat
from typing import TYPE_CHECKING, Final, NamedTuple, cast

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline

WINDOW: Final = 10  # samples per task behind the median
# The window of a task without samples: shifting in samples keeps the lower
# median of the samples at index _MIDDLE of the sorted window.
_EMPTY: Final = tuple(-math.inf if k % 2 == 0 else math.inf for k in range(WINDOW))
_MIDDLE = operator.itemgetter(WINDOW // 2 - 1)
HINT: Final = -1  # TaskEstimates.samples of a task ranked by its expected_duration
NONE: Final = 0  # ... of a task ranked by hop count (no hint, no history)


@dataclass(frozen=True, slots=True)
class LearnedDurations:
    """The durations learned for one pipeline's tasks (columns, aligned by index).

    Attributes:
        names: task names (a mapped task's items learn under the task's name).
        seconds: the estimate per task: the median of its window.
        samples: how many successful attempts were learned per task, in all.
        windows: the latest :data:`WINDOW` durations of every task as
            :data:`WINDOW` columns, oldest first, infinite placeholders for
            slots not yet filled; empty when loaded only to rank a run.
    """

    names: tuple[str, ...]
    seconds: Sequence[float]
    samples: Sequence[int]
    windows: tuple[Sequence[float], ...] = ()

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
        if None not in self.seconds:
            return cast("list[float]", list(self.seconds))
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
    """Return an estimate and its source for people: ``0.12s, learned (5 samples)``."""
    if seconds is None or samples == NONE:
        return "none"
    return f"{seconds:.3g}s, {source_text(samples)}"


def plan(compiled: CompiledPipeline, learned: LearnedDurations | None) -> TaskEstimates:
    """Return the estimate of each task of ``compiled``: its hint, else ``learned``, else none."""
    tasks = compiled.tasks
    hints: list[float | None] = list(map(_HINT, tasks))
    unhinted = hints.count(None)
    if not learned or not unhinted:
        samples = [NONE if h is None else HINT for h in hints] if unhinted else [HINT] * len(hints)
        return TaskEstimates(hints, samples, 0)
    index = dict(zip(learned.names, range(len(learned.names)), strict=True))
    found = list(map(index.get, compiled.names))
    if unhinted == len(hints) and None not in found:  # the usual: no hints, all learned
        rows = cast("list[int]", found)
        seconds: list[float | None] = list(map(learned.seconds.__getitem__, rows))
        return TaskEstimates(seconds, list(map(learned.samples.__getitem__, rows)), len(rows))
    seconds, counts, used = [], [], 0
    for hint, row in zip(hints, found, strict=True):
        if hint is not None:
            seconds.append(hint)
            counts.append(HINT)
        elif row is None:
            seconds.append(None)
            counts.append(NONE)
        else:
            seconds.append(learned.seconds[row])
            counts.append(learned.samples[row])
            used += 1
    return TaskEstimates(seconds, counts, used)


class Samples(NamedTuple):
    """The durations of one run's successful attempts.

    Attributes:
        single: one duration per task that ran (not mapped).
        grouped: per mapped task, its items' durations in the order they ended.
    """

    single: dict[str, float]
    grouped: dict[str, list[float]]

    def __len__(self) -> int:
        return len(self.single) + sum(map(len, self.grouped.values()))


_HINT = operator.attrgetter("expected_duration")

#: One encoded batch of a run's events: task names, attempt durations, state values.
EventBatch = tuple[Sequence[str], Sequence[float], Sequence[str]]


def event_samples(batches: Iterable[EventBatch], mapped: Collection[str]) -> Samples:
    """Return the durations of a run's successful attempts; items under their task.

    ``batches`` are its recorded events as columns. A task that succeeded
    after retries counts its successful attempt only; cached and resumed
    tasks ran nothing and count nothing. (Columns of C calls: the end of a
    100,000-task run must not wait on a Python loop.)
    """
    batches = list(batches)
    tasks = list(chain.from_iterable(b[0] for b in batches))
    durations = list(chain.from_iterable(b[1] for b in batches))
    states = chain.from_iterable(b[2] for b in batches)
    ok = list(map(operator.eq, states, repeat("succeeded")))
    names = list(compress(tasks, ok))
    seconds = list(compress(durations, ok))
    grouped: dict[str, list[float]] = {}
    if mapped or not all(map(math.isfinite, seconds)):
        single: dict[str, float] = {}
        for name, duration in zip(names, seconds, strict=True):
            if not math.isfinite(duration) or duration < 0:
                continue  # a result recorded without its attempt
            if name[-1:] == "]" and (base := name.partition("[")[0]) in mapped:
                grouped.setdefault(base, []).append(duration)
            else:
                single[name] = duration
        return Samples(single, grouped)
    return Samples(dict(zip(names, seconds, strict=True)), grouped)


def learn(old: LearnedDurations | None, new: Samples, keep: Collection[str]) -> LearnedDurations:
    """Return ``old`` with the samples ``new`` added, for the tasks in ``keep``.

    ``keep`` lists the run's tasks in the pipeline's order: a task of ``old``
    not in it (no longer in the pipeline) is dropped, and tasks learned for
    the first time are added in its order.
    Each window keeps the last :data:`WINDOW` samples. Done column by column
    in C calls (the end of a 100,000-task run must not wait on a Python loop
    per task), except for the items of mapped tasks.
    """
    width = WINDOW
    old_names: Sequence[str] = ()
    columns: list[array[float]] = []
    counts = array("q")
    if old is not None and len(old.windows) == width:
        old_names, columns, counts = (
            old.names,
            [array("d", c) for c in old.windows],
            array("q", old.samples),
        )
        single = new.single
        if not new.grouped and len(single) == len(old_names) == len(keep):
            # The usual: the same tasks as last time, each ran once. Comparing the
            # names in order costs far less than looking up names read from the store.
            order = tuple(keep)
            if order == old_names:
                ordered = list(map(single.get, order))
                if None not in ordered:
                    columns = [*columns[1:], array("d", cast("list[float]", ordered))]
                    counts = array("q", map(operator.add, counts, repeat(1)))
                    return _with_medians(tuple(old_names), columns, counts)
    kept = list(map(keep.__contains__, old_names))
    names = list(old_names)
    if not all(kept):
        names = list(compress(old_names, kept))
        columns = [array("d", compress(c, kept)) for c in columns]
        counts = array("q", compress(counts, kept))
    single = new.single
    # Each task's new sample, None where it did not run (the shift never reads those).
    latest: list[float | None] = list(map(single.get, names)) if single else []
    added: list[str] = []
    if len(latest) - latest.count(None) != len(single) or new.grouped:
        known = set(names)  # new tasks go last, in the pipeline's order
        grouped = new.grouped
        added = [name for name in keep if (name in single or name in grouped) and name not in known]
    if not columns:
        columns = [array("d") for _ in range(width)]
    if added:
        names += added
        for column, empty in zip(columns, _EMPTY, strict=True):
            column.extend(repeat(empty, len(added)))
        counts.extend(repeat(0, len(added)))
        if single:
            latest += map(single.get, added)
    if single:
        if None not in latest:  # every task ran once: shift every window by one
            columns = [*columns[1:], array("d", cast("list[float]", latest))]
            counts = array("q", map(operator.add, counts, repeat(1)))
        else:
            ran = list(map(operator.is_not, latest, repeat(None)))
            shifted = [
                array("d", map(operator.getitem, zip(columns[k], columns[k + 1], strict=True), ran))
                for k in range(width - 1)
            ]
            last = zip(columns[-1], cast("list[float]", latest), strict=True)
            shifted.append(array("d", map(operator.getitem, last, ran)))
            columns = shifted
            counts = array("q", map(operator.add, counts, ran))
    if new.grouped:
        position = dict(zip(names, range(len(names)), strict=True))
        for name, durations in new.grouped.items():
            i = position[name]
            row = [*[c[i] for c in columns], *durations][-width:]
            for column, value in zip(columns, row, strict=True):
                column[i] = value
            counts[i] += len(durations)
    return _with_medians(tuple(names), columns, counts)


def _with_medians(
    names: tuple[str, ...], columns: list[array[float]], counts: array[int]
) -> LearnedDurations:
    seconds = array("d", map(_MIDDLE, map(sorted, zip(*columns, strict=True))))
    return LearnedDurations(names, seconds, counts, tuple(columns))


def median(values: Sequence[float]) -> float:
    """Return the median of a non-empty sequence (the lower middle one if even)."""
    return sorted(values)[(len(values) - 1) // 2]
