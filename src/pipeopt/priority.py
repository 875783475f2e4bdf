"""Criticality labels, the priority job queue and starvation-free ordering.

Policy
    Six labels, most urgent first: ``blocker`` > ``critical`` > ``high`` >
    ``medium`` > ``low`` > ``deferred`` (levels 0..5). Items come out most
    urgent level first; within a level by ``rank`` (lower first; the scheduler
    passes the negated remaining critical path), then first in, first out.

Aging
    An item waiting in the queue is promoted one level for every
    ``aging_interval`` seconds it waits, up to ``blocker`` (level 0), so
    ``deferred`` work waits at most about ``5 * aging_interval`` behind a
    sustained stream of ``critical`` work. Promotion stops at level 0, where
    ``rank`` still comes before arrival: with equal ranks (as in
    :class:`PriorityJobQueue`) the promoted item is the oldest and goes
    first; a stream of ``blocker`` items of lower rank (the scheduler's
    longer critical paths) keeps going ahead of it. ``aging_interval=None``
    gives strict priority.

State
    One heap per level keyed ``(rank, seq)`` plus, when aging, a FIFO of the
    same entries in arrival order (the oldest item of a level is the first to
    be promoted). Removal from either structure is lazy: an entry popped
    through one is marked dead and skipped by the other.

Invariants
    ``len(queue)`` counts live entries; ``critical_backlog`` counts live
    entries whose own level is ``blocker`` or ``critical``; ``seq`` grows
    strictly, so equal keys never compare items.
"""

from __future__ import annotations

import collections
import enum
import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeopt._validate import check_float
from pipeopt.errors import UnknownCriticalityError

T = TypeVar("T")


class Criticality(enum.IntEnum):
    """How urgent a task or job is; lower values run first."""

    BLOCKER = 0
    CRITICAL = 1
    HIGH = 2
    MEDIUM = 3
    LOW = 4
    DEFERRED = 5

    @property
    def label(self) -> str:
        """Return the lowercase label, e.g. ``"critical"``."""
        return LABELS[self._value_]


LABELS: tuple[str, ...] = tuple(c.name.lower() for c in Criticality)
_BY_LABEL = {c.label: c for c in Criticality}
_LEVELS = len(Criticality)


def parse_criticality(value: Criticality | str) -> Criticality:
    """Return the :class:`Criticality` for a label or member.

    Raises:
        UnknownCriticalityError: ``value`` is not one of :data:`LABELS`.
    """
    if isinstance(value, Criticality):
        return value
    if isinstance(value, str):
        found = _BY_LABEL.get(value.strip().lower())
        if found is not None:
            return found
    raise UnknownCriticalityError(value, LABELS)


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    """A point-in-time view of a :class:`PriorityJobQueue`."""

    size: int
    critical_backlog: int
    by_criticality: dict[str, int]
    put_total: int
    get_total: int
    promoted_total: int


class _Entry(Generic[T]):
    __slots__ = ("alive", "enqueued_at", "item", "level", "rank", "seq")

    def __init__(self, item: T, level: int, rank: float, seq: int, enqueued_at: float) -> None:
        self.item = item
        self.level = level
        self.rank = rank
        self.seq = seq
        self.enqueued_at = enqueued_at
        self.alive = True


class LeveledQueue(Generic[T]):
    """Not thread-safe core of :class:`PriorityJobQueue`, also used by the scheduler.

    Args:
        aging_interval: seconds of waiting that promote an item one level;
            ``None`` for strict priority.
        clock: monotonic clock in seconds (injected in tests).
    """

    __slots__ = (
        "_aging",
        "_clock",
        "_fifos",
        "_heaps",
        "_seq",
        "_sizes",
        "critical_backlog",
        "promoted_total",
        "size",
    )

    def __init__(
        self,
        aging_interval: float | None = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if aging_interval is not None:
            aging_interval = check_float(
                "aging_interval", aging_interval, minimum=0.0, strict_minimum=True
            )
        self._aging = aging_interval
        self._clock = clock
        self._heaps: list[list[tuple[float, int, _Entry[T]]]] = [[] for _ in range(_LEVELS)]
        self._fifos: list[collections.deque[_Entry[T]]] = [
            collections.deque() for _ in range(_LEVELS)
        ]
        self._sizes = [0] * _LEVELS
        self._seq = 0
        self.size = 0
        self.critical_backlog = 0
        self.promoted_total = 0

    def push(self, item: T, level: int, rank: float = 0.0) -> None:
        """Add ``item`` at ``level`` (0 = blocker .. 5 = deferred) with ``rank``."""
        self._seq += 1
        entry = _Entry(item, level, rank, self._seq, self._clock() if self._aging else 0.0)
        heapq.heappush(self._heaps[level], (rank, self._seq, entry))
        if self._aging is not None:
            self._fifos[level].append(entry)
        self._sizes[level] += 1
        self.size += 1
        if level <= Criticality.CRITICAL:
            self.critical_backlog += 1

    def pop(self) -> T | None:
        """Remove and return the most urgent item, or ``None`` when empty."""
        if not self.size:
            return None
        sizes = self._sizes
        first = 0
        while not sizes[first]:
            first += 1
        aging = self._aging
        if aging is None or self.size == sizes[first]:
            # Only one level holds items (or no aging): its heap head wins.
            heap = self._heaps[first]
            entry = heapq.heappop(heap)[2]
            while not entry.alive:
                entry = heapq.heappop(heap)[2]
            self._taken(entry)
            return entry.item
        now = self._clock()
        best: _Entry[T] | None = None
        best_key: tuple[int, float, int] = (_LEVELS, 0.0, 0)
        for level in range(first, _LEVELS):
            if not sizes[level]:
                continue
            heap = self._heaps[level]
            while not heap[0][2].alive:
                heapq.heappop(heap)
            head = heap[0][2]
            key = (level, head.rank, head.seq)
            if key < best_key:
                best, best_key = head, key
            if level > best_key[0]:
                fifo = self._fifos[level]
                while not fifo[0].alive:
                    fifo.popleft()
                oldest = fifo[0]
                effective = max(0, level - int((now - oldest.enqueued_at) / aging))
                key = (effective, oldest.rank, oldest.seq)
                if key < best_key:
                    best, best_key = oldest, key
        assert best is not None
        if best_key[0] < best.level:
            self.promoted_total += 1
        self._taken(best)
        return best.item

    def _taken(self, entry: _Entry[T]) -> None:
        # Entries stay in the other structure, marked dead, until they reach its head.
        entry.alive = False
        level = entry.level
        self._sizes[level] -= 1
        self.size -= 1
        if level <= Criticality.CRITICAL:
            self.critical_backlog -= 1
        if not self._sizes[level]:
            self._heaps[level].clear()
            self._fifos[level].clear()

    def drain(self) -> list[T]:
        """Remove and return every item, most urgent first (no aging applied)."""
        items: list[T] = []
        for level in range(_LEVELS):
            heap = self._heaps[level]
            while heap:
                _, _, entry = heapq.heappop(heap)
                if entry.alive:
                    entry.alive = False
                    items.append(entry.item)
            self._fifos[level].clear()
            self._sizes[level] = 0
        self.size = 0
        self.critical_backlog = 0
        return items

    def counts(self) -> dict[str, int]:
        """Return the number of live items per criticality label."""
        return {label: self._sizes[level] for level, label in enumerate(LABELS)}


class PriorityJobQueue(Generic[T]):
    """A thread-safe priority queue of jobs by criticality, FIFO among peers.

    Usable on its own, outside pipelines::

        queue: PriorityJobQueue[str] = PriorityJobQueue()
        queue.put("rebuild-index", "deferred")
        queue.put("page-oncall", "blocker")
        queue.get()  # "page-oncall"

    Args:
        aging_interval: seconds of waiting that promote a job one level, so
            ``deferred`` jobs are not starved; ``None`` for strict priority.
        maxsize: ``put`` blocks while this many jobs wait (0 = unbounded).
        clock: monotonic clock in seconds, injected in tests.
    """

    def __init__(
        self,
        aging_interval: float | None = 1.0,
        *,
        maxsize: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"maxsize must be an integer >= 0, got {maxsize!r}")
        self._queue: LeveledQueue[T] = LeveledQueue(aging_interval, clock)
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._put_total = 0
        self._get_total = 0

    def put(
        self,
        item: T,
        criticality: Criticality | str = Criticality.MEDIUM,
        *,
        block: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Add ``item`` with the given criticality.

        Raises:
            UnknownCriticalityError: the label is not one of :data:`LABELS`.
            queue.Full: the queue is bounded and stayed full.
        """
        import queue as queue_module

        level = parse_criticality(criticality)
        with self._not_full:
            if self._maxsize and not self._not_full.wait_for(
                lambda: self._queue.size < self._maxsize, timeout if block else 0
            ):
                raise queue_module.Full
            self._queue.push(item, level)
            self._put_total += 1
            self._not_empty.notify()

    def get(self, block: bool = True, timeout: float | None = None) -> T:
        """Remove and return the most urgent job (aging applied).

        Raises:
            queue.Empty: no job arrived in time (or at once when ``block=False``).
        """
        import queue as queue_module

        with self._not_empty:
            if not self._not_empty.wait_for(lambda: self._queue.size > 0, timeout if block else 0):
                raise queue_module.Empty
            item = self._queue.pop()
            self._get_total += 1
            self._not_full.notify()
            return item  # type: ignore[return-value]

    def get_nowait(self) -> T:
        """Return the most urgent job without waiting; raise ``queue.Empty`` if none."""
        return self.get(block=False)

    def __len__(self) -> int:
        with self._lock:
            return self._queue.size

    @property
    def critical_backlog(self) -> int:
        """Return how many ``blocker`` and ``critical`` jobs are waiting."""
        with self._lock:
            return self._queue.critical_backlog

    def statistics(self) -> QueueStatistics:
        """Return a frozen view of sizes and counters."""
        with self._lock:
            return QueueStatistics(
                size=self._queue.size,
                critical_backlog=self._queue.critical_backlog,
                by_criticality=self._queue.counts(),
                put_total=self._put_total,
                get_total=self._get_total,
                promoted_total=self._queue.promoted_total,
            )
