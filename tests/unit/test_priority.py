"""PriorityJobQueue: criticality order, FIFO among peers, aging, thread safety."""

from __future__ import annotations

import queue
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeopt import LABELS, PriorityJobQueue, UnknownCriticalityError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.sampled_from(LABELS), max_size=200))
def test_most_critical_first_and_fifo_among_peers(labels: list[str]) -> None:
    q: PriorityJobQueue[tuple[int, int]] = PriorityJobQueue(aging_interval=None)
    for n, label in enumerate(labels):
        q.put((LABELS.index(label), n), label)
    out = [q.get_nowait() for _ in labels]
    assert out == sorted(out)  # by level, then by arrival
    assert len(q) == 0


@given(
    st.lists(
        st.one_of(
            st.tuples(st.integers(0, 5), st.sampled_from([0.0, -1.0, -2.5])),  # shared ranks
            st.tuples(st.integers(0, 5), st.floats(-100, 0)),  # mostly distinct ranks
            st.none(),  # a pop
        ),
        max_size=300,
    )
)
def test_leveled_queue_pops_by_level_then_rank_then_arrival(
    ops: list[tuple[int, float] | None],
) -> None:
    from pipeopt.priority import LeveledQueue

    q: LeveledQueue[int] = LeveledQueue(aging_interval=None)
    waiting: list[tuple[int, float, int]] = []  # the reference: a sorted list
    for seq, op in enumerate(ops):
        if op is None:
            expected = min(waiting, default=None)
            if expected is not None:
                waiting.remove(expected)
            assert q.pop() == (expected[2] if expected else None)
        else:
            q.push(seq, op[0], op[1])
            waiting.append((op[0], op[1], seq))
    assert q.drain() == [seq for _, _, seq in sorted(waiting)]
    assert q.size == 0
    # With aging the order changes, but every item still leaves exactly once.
    clock = FakeClock()
    aged: LeveledQueue[int] = LeveledQueue(aging_interval=1.0, clock=clock)
    out: list[int | None] = []
    for seq, op in enumerate(ops):
        clock.now += 0.3
        if op is None:
            out.append(aged.pop())
        else:
            aged.push(seq, op[0], op[1])
    out += aged.drain()
    assert sorted(x for x in out if x is not None) == [s for s, op in enumerate(ops) if op]


def test_critical_backlog_counts_blockers_and_criticals() -> None:
    q: PriorityJobQueue[str] = PriorityJobQueue()
    for label in LABELS:
        q.put(label, label)
    assert q.critical_backlog == 2
    assert q.get() == "blocker"
    stats = q.statistics()
    assert stats.critical_backlog == 1
    assert stats.size == 5
    assert stats.by_criticality["deferred"] == 1
    assert (stats.put_total, stats.get_total) == (6, 1)


def test_aging_lets_deferred_work_finish_under_sustained_critical_load() -> None:
    clock = FakeClock()
    q: PriorityJobQueue[str] = PriorityJobQueue(aging_interval=1.0, clock=clock)
    q.put("nightly-report", "deferred")
    served: list[str] = []
    for n in range(100):
        q.put(f"critical-{n}", "critical")
        clock.now += 0.5
        served.append(q.get())
        if served[-1] == "nightly-report":
            break
    assert "nightly-report" in served
    # deferred (5) reaches critical (1) after 4 intervals, then wins as the older peer
    assert served.index("nightly-report") <= 10
    assert q.statistics().promoted_total == 1


def test_aging_outranks_a_sustained_stream_of_blockers_of_any_rank() -> None:
    from pipeopt.priority import LeveledQueue

    clock = FakeClock()
    q: LeveledQueue[str] = LeveledQueue(aging_interval=1.0, clock=clock)
    q.push("deferred", 5, rank=0.0)
    served = []
    for n in range(100):
        q.push(f"blocker-{n}", 0, rank=-1.0)  # a lower rank than the deferred item's
        clock.now += 0.5
        served.append(q.pop())
        if served[-1] == "deferred":
            break
    # Six intervals of waiting put it above every blocker that waited less than one.
    assert served.index("deferred") == 11


def test_without_aging_deferred_waits_behind_critical() -> None:
    clock = FakeClock()
    q: PriorityJobQueue[str] = PriorityJobQueue(aging_interval=None, clock=clock)
    q.put("nightly-report", "deferred")
    for n in range(50):
        q.put(f"critical-{n}", "critical")
        clock.now += 10
        assert q.get() != "nightly-report"


def test_unknown_label_and_bad_arguments() -> None:
    q: PriorityJobQueue[int] = PriorityJobQueue()
    with pytest.raises(UnknownCriticalityError):
        q.put(1, "urgent")
    with pytest.raises(ValueError, match="aging_interval"):
        PriorityJobQueue(aging_interval=0)
    with pytest.raises(ValueError, match="maxsize"):
        PriorityJobQueue(maxsize=-1)


def test_empty_and_full() -> None:
    q: PriorityJobQueue[int] = PriorityJobQueue(maxsize=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(2, block=False)


def test_many_threads_lose_and_duplicate_nothing() -> None:
    q: PriorityJobQueue[int] = PriorityJobQueue()
    producers = 4
    per_producer = 2_000
    got: list[int] = []
    lock = threading.Lock()

    def produce(base: int) -> None:
        for n in range(per_producer):
            q.put(base + n, LABELS[n % len(LABELS)])

    def consume() -> None:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                return
            with lock:
                got.append(item)

    threads = [threading.Thread(target=produce, args=(k * per_producer,)) for k in range(producers)]
    threads += [threading.Thread(target=consume) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(producers * per_producer))
