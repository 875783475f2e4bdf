"""Criticality labels, the priority job queue and starvation-free ordering.

Policy
    Six labels, most urgent first: ``blocker`` > ``critical`` > ``high`` >
    ``medium`` > ``low`` > ``deferred`` (levels 0..5). Items come out most
    urgent level first; within a level by ``rank`` (lower first; the scheduler
    passes the negated remaining critical path), then first in, first out.

Aging
    An item waiting in the queue is promoted one level for every
    ``aging_interval`` seconds it waits, and promotion does not stop at
    ``blocker``: an item of level ``L`` that has waited ``L + 1`` intervals
    ranks above every item that waited less than one, whatever its rank.
    So ``deferred`` work waits at most about ``6 * aging_interval`` behind a
    sustained stream of ``blocker`` work, even one of lower rank (the
    scheduler's longer critical paths). ``aging_interval=None`` gives
    strict priority.

State
    Per level, a heap of the distinct ranks present and one FIFO of entries
    per rank (so the level's next entry is the head of its lowest rank's
    FIFO), plus, when aging, a FIFO of all the level's entries in arrival
    order (the oldest item of a level is the first to be promoted). Removal
    is lazy: an entry popped through one structure is marked dead and
    skipped by the other.

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
from typing import Any, Generic, TypeVar

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
_CRITICAL = int(Criticality.CRITICAL)  # a plain int: comparing with an IntEnum is slower


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


# A queued item is a list ``[item, level, rank, seq, enqueued_at, alive]``: one
# allocation per push on the scheduler's hot path (a slotted object costs ten times more).
_ITEM, _LEVEL, _RANK, _SEQ, _ENQUEUED, _ALIVE = range(6)
# Dead entries an aging FIFO may hold beyond twice its live ones before it is compacted.
_FIFO_SLACK = 64


class LeveledQueue(Generic[T]):
    """Not thread-safe core of :class:`PriorityJobQueue`, also used by the scheduler.

    Within a level, items of equal rank wait in one FIFO (a rank held by a
    single item is its own bucket) and a heap holds the distinct ranks, so
    pushing and popping cost O(1) when few ranks are in use (tasks ranked by
    hop count) and O(log n) at worst (every task its own estimate).

    Args:
        aging_interval: seconds of waiting that promote an item one level;
            ``None`` for strict priority.
        clock: monotonic clock in seconds (injected in tests).
    """

    __slots__ = (
        "_aging",
        "_buckets",
        "_clock",
        "_fifos",
        "_ranks",
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
        # Per level: a heap of the ranks present, and per rank its items in arrival order.
        self._ranks: list[list[float]] = [[] for _ in range(_LEVELS)]
        # A bucket is one entry (a list) or a deque of entries: typed Any for the hot path.
        self._buckets: list[dict[float, Any]] = [{} for _ in range(_LEVELS)]
        # Per level, every item in arrival order (only when aging): the oldest is promoted first.
        self._fifos: list[collections.deque[list[Any]]] = [
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
        aging = self._aging
        entry = [item, level, rank, self._seq, self._clock() if aging else 0.0, True]
        buckets = self._buckets[level]
        bucket = buckets.get(rank)
        if bucket is None:
            # A rank's first item is its own bucket: no FIFO for ranks seen once
            # (distinct critical paths are the common case with duration estimates).
            buckets[rank] = entry
            heapq.heappush(self._ranks[level], rank)
        elif type(bucket) is list:
            buckets[rank] = collections.deque((bucket, entry))
        else:
            bucket.append(entry)
        if aging is not None:
            self._fifos[level].append(entry)
        self._sizes[level] += 1
        self.size += 1
        if level <= _CRITICAL:
            self.critical_backlog += 1

    def _head(self, level: int) -> list[Any]:
        """Return the live item of ``level`` with the lowest (rank, seq), leaving it queued."""
        ranks = self._ranks[level]
        buckets = self._buckets[level]
        while True:
            bucket = buckets[ranks[0]]
            if type(bucket) is list:
                if bucket[_ALIVE]:
                    return bucket
            else:
                while bucket and not bucket[0][_ALIVE]:
                    bucket.popleft()
                if bucket:
                    return bucket[0]  # type: ignore[no-any-return]
            del buckets[heapq.heappop(ranks)]

    def pop(self) -> T | None:
        """Remove and return the most urgent item, or ``None`` when empty."""
        if not self.size:
            return None
        sizes = self._sizes
        first = 0
        while not sizes[first]:
            first += 1
        aging = self._aging
        size = self.size
        if aging is None or size == sizes[first]:
            # Only one level holds items (or no aging): the head of its lowest rank's FIFO
            # wins (the scheduler's hot path: _head and _taken inline).
            ranks = self._ranks[first]
            buckets = self._buckets[first]
            entry: list[Any] | None
            while True:
                bucket = buckets[ranks[0]]
                if type(bucket) is list:
                    del buckets[heapq.heappop(ranks)]
                    if bucket[_ALIVE]:
                        entry = bucket
                        break
                    continue
                entry = bucket.popleft() if bucket else None
                while entry is not None and not entry[_ALIVE]:
                    entry = bucket.popleft() if bucket else None
                if entry is not None:
                    break
                del buckets[heapq.heappop(ranks)]
            entry[_ALIVE] = False
            self.size = size - 1
            if first <= _CRITICAL:
                self.critical_backlog -= 1
            left = sizes[first] - 1
            sizes[first] = left
            if not left:
                ranks.clear()
                buckets.clear()
                self._fifos[first].clear()
            elif aging is not None and len(self._fifos[first]) > 2 * left + _FIFO_SLACK:
                self._compact(first)
            return entry[_ITEM]  # type: ignore[no-any-return]
        now = self._clock()
        best: list[Any] | None = None
        best_key: tuple[int, float, int] = (_LEVELS, 0.0, 0)
        for level in range(first, _LEVELS):
            if not sizes[level]:
                continue
            head = self._head(level)
            key = (level, head[_RANK], head[_SEQ])
            if key < best_key:
                best, best_key = head, key
            if level > best_key[0]:
                fifo = self._fifos[level]
                while not fifo[0][_ALIVE]:
                    fifo.popleft()
                oldest = fifo[0]
                # Below 0 on purpose: a long wait must beat a stream of blockers.
                effective = level - int((now - oldest[_ENQUEUED]) / aging)
                key = (effective, oldest[_RANK], oldest[_SEQ])
                if key < best_key:
                    best, best_key = oldest, key
        assert best is not None
        if best_key[0] < best[_LEVEL]:
            self.promoted_total += 1
        self._taken(best)
        return best[_ITEM]  # type: ignore[no-any-return]

    def _taken(self, entry: list[Any]) -> None:
        # Entries stay in the other structures, marked dead, until they reach a head.
        entry[_ALIVE] = False
        level = entry[_LEVEL]
        self._sizes[level] -= 1
        self.size -= 1
        if level <= _CRITICAL:
            self.critical_backlog -= 1
        left = self._sizes[level]
        if not left:
            self._ranks[level].clear()
            self._buckets[level].clear()
            self._fifos[level].clear()
        elif len(self._fifos[level]) > 2 * left + _FIFO_SLACK:
            self._compact(level)

    def _compact(self, level: int) -> None:
        # Popped entries stay in the aging FIFO until they reach its head; a queue
        # that never empties would keep every entry it ever held without this.
        self._fifos[level] = collections.deque([e for e in self._fifos[level] if e[_ALIVE]])

    def drain(self) -> list[T]:
        """Remove and return every item, most urgent first (no aging applied)."""
        items: list[T] = []
        for level in range(_LEVELS):
            buckets = self._buckets[level]
            for rank in sorted(buckets):
                bucket = buckets[rank]
                for entry in (bucket,) if type(bucket) is list else bucket:
                    if entry[_ALIVE]:
                        entry[_ALIVE] = False
                        items.append(entry[_ITEM])
            buckets.clear()
            self._ranks[level].clear()
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
