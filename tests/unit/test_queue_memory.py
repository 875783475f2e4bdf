"""The ready queue holds memory for its live items only, even when it never empties."""

from __future__ import annotations

import itertools

from pipeopt.priority import LeveledQueue


def test_aging_queue_that_never_empties_drops_popped_entries() -> None:
    ticks = itertools.count()
    queue: LeveledQueue[int] = LeveledQueue(aging_interval=1e9, clock=lambda: float(next(ticks)))
    for i in range(10):
        queue.push(i, 3)
    popped = []
    for i in range(10, 20_000):
        queue.push(i, 3)
        popped.append(queue.pop())
    assert popped == list(range(19_990))  # FIFO among peers, as before
    assert queue.size == 10
    held = sum(len(fifo) for fifo in queue._fifos)
    assert held <= 2 * queue.size + 64


def test_aging_across_levels_keeps_every_live_item_after_compaction() -> None:
    now = [0.0]
    queue: LeveledQueue[str] = LeveledQueue(aging_interval=10.0, clock=lambda: now[0])
    queue.push("old-low", 5)
    for i in range(2000):
        if i % 4 == 0:
            queue.push(f"keep-{i}", 1, rank=1.0)
        queue.push(f"high-{i}", 1, rank=0.0)
        assert queue.pop() == f"high-{i}"
    assert sum(len(fifo) for fifo in queue._fifos) <= 2 * queue.size + 64
    now[0] = 1_000.0  # the deferred item has waited long enough to beat every other level
    assert queue.pop() == "old-low"
    rest = [queue.pop() for _ in range(queue.size)]
    assert rest == [f"keep-{i}" for i in range(0, 2000, 4)]
