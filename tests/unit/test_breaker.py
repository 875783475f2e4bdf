"""CircuitBreaker: the state machine by a fake clock, races, listeners and call forms."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import Any

import pytest

from pipeopt.breaker import BreakerState, BreakerStatistics, CircuitBreaker
from pipeopt.errors import CircuitOpenError

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def opened(clock: FakeClock, *, recovery: float = 10.0, slots: int = 1) -> CircuitBreaker:
    """Return a breaker that has just opened at ``clock.now``."""
    breaker = CircuitBreaker(1, recovery, slots, name="test", clock=clock)
    breaker.record_failure(RuntimeError("down"))
    assert breaker.state is OPEN
    return breaker


class Boom(Exception):
    pass


def test_opens_at_exactly_the_threshold_of_consecutive_failures() -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=FakeClock())
    for _ in range(2):
        assert breaker.try_acquire()
        breaker.record_failure(Boom())
    assert breaker.state is CLOSED
    assert breaker.try_acquire()
    breaker.record_success()  # a success resets the streak
    for expected in (CLOSED, CLOSED, OPEN):
        assert breaker.try_acquire()
        breaker.record_failure(Boom())
        assert breaker.state is expected
    stats = breaker.statistics()
    assert (stats.consecutive_failures, stats.total_failures, stats.times_opened) == (3, 5, 1)


def test_no_body_runs_while_open_and_refusals_are_counted() -> None:
    clock = FakeClock()
    breaker = opened(clock, recovery=30.0)
    calls = 0

    def body() -> None:
        nonlocal calls
        calls += 1

    for step in range(10):
        clock.now += 2.5
        with pytest.raises(CircuitOpenError) as info:
            breaker.call(body)
        assert info.value.breaker == "test"
        assert info.value.retry_after == pytest.approx(30.0 - 2.5 * (step + 1))
    assert calls == 0
    assert not breaker.try_acquire()
    assert breaker.statistics().rejected_calls == 11


def test_half_opens_at_exactly_the_recovery_time() -> None:
    clock = FakeClock(0.0)
    breaker = opened(clock, recovery=10.0)
    clock.now = 9.75
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(0.25)
    clock.now = 10.0
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_a_failed_trial_reopens_for_a_new_recovery_window() -> None:
    clock = FakeClock(0.0)
    breaker = opened(clock, recovery=10.0)
    clock.now = 12.0
    assert breaker.try_acquire()
    breaker.record_failure(Boom())
    assert breaker.state is OPEN
    assert breaker.retry_after() == 10.0  # measured from the failed trial, not the first opening
    clock.now = 21.5
    assert breaker.state is OPEN
    clock.now = 22.0
    assert breaker.state is HALF_OPEN
    assert breaker.statistics().times_opened == 2


def test_a_successful_trial_closes_and_resets_the_streak() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 5.0, name="db", clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5.0
    assert breaker.try_acquire()
    breaker.record_success()
    assert breaker.state is CLOSED
    stats = breaker.statistics()
    assert stats.consecutive_failures == 0
    assert stats.half_open_in_flight == 0
    breaker.record_failure()
    assert breaker.state is CLOSED  # one failure is below the threshold again


def test_half_open_admits_only_its_trial_slots_and_release_frees_one() -> None:
    clock = FakeClock()
    breaker = opened(clock, slots=2)
    clock.now += 10.0
    assert breaker.try_acquire()
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    assert breaker.retry_after() == math.inf
    assert breaker.statistics().half_open_in_flight == 2
    breaker.release()
    assert breaker.retry_after() == 0.0
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    stats = breaker.statistics()
    assert (stats.state, stats.half_open_in_flight, stats.rejected_calls) == (HALF_OPEN, 2, 2)


def test_excluded_exceptions_and_cancellations_give_no_verdict() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, name="api", clock=clock, excluded=(KeyError,))
    breaker.record_failure(KeyError("missing"))
    breaker.record_failure(asyncio.CancelledError())
    assert breaker.state is CLOSED
    assert breaker.statistics().total_failures == 0
    breaker.record_failure(Boom())
    clock.now += 10.0
    assert breaker.try_acquire()
    breaker.record_failure(KeyError("a caller's mistake, not the service's"))
    assert breaker.state is HALF_OPEN
    assert breaker.try_acquire()  # the excluded failure gave the trial slot back


def test_exactly_half_open_max_calls_trials_are_admitted_among_racing_threads() -> None:
    threads_count, rounds = 32, 1000
    start = threading.Barrier(threads_count + 1, timeout=30)
    done = threading.Barrier(threads_count + 1, timeout=30)
    current: list[CircuitBreaker] = []
    admitted = [False] * threads_count
    finished = threading.Event()

    def race(k: int) -> None:
        try:
            while True:
                start.wait()
                if finished.is_set():
                    return
                admitted[k] = current[0].try_acquire()
                done.wait()
        except threading.BrokenBarrierError:
            return

    threads = [threading.Thread(target=race, args=(k,), daemon=True) for k in range(32)]
    for thread in threads:
        thread.start()
    try:
        for round_number in range(rounds):
            slots = round_number % 4 + 1
            clock = FakeClock(0.0)
            breaker = opened(clock, recovery=10.0, slots=slots)
            clock.now = 10.0  # exactly the recovery time: the racers trigger the half-open move
            current[:] = [breaker]
            start.wait()
            done.wait()
            assert sum(admitted) == slots, f"round {round_number}"
            stats = breaker.statistics()
            assert stats.state is HALF_OPEN
            assert stats.half_open_in_flight == slots
            assert stats.rejected_calls == threads_count - slots
        finished.set()
        start.wait()
    finally:
        start.abort()
        done.abort()
        for thread in threads:
            thread.join(timeout=30)


def test_concurrent_calls_keep_the_counters_consistent() -> None:
    breaker = CircuitBreaker(failure_threshold=10**9, name="busy")
    per_thread = 2000
    barrier = threading.Barrier(8, timeout=30)

    def hammer(k: int) -> None:
        barrier.wait()
        for n in range(per_thread):
            if breaker.try_acquire():
                if (n + k) % 3 == 0:
                    breaker.record_failure(Boom())
                else:
                    breaker.record_success()

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stats = breaker.statistics()
    assert stats.total_successes + stats.total_failures == 8 * per_thread
    assert stats.total_failures == sum(
        1 for k in range(8) for n in range(per_thread) if (n + k) % 3 == 0
    )


def test_listeners_see_every_transition_in_order_and_logs_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    breaker = CircuitBreaker(2, 10.0, name="warehouse", clock=clock)
    seen: list[tuple[str, BreakerState, BreakerState]] = []
    breaker.add_listener(lambda b, old, new: seen.append((b.name, old, new)))
    caplog.set_level(logging.INFO, logger="pipeopt.breaker")

    breaker.record_failure()
    breaker.record_failure()  # CLOSED -> OPEN
    clock.now = 10.0
    assert breaker.try_acquire()  # OPEN -> HALF_OPEN
    breaker.record_failure()  # HALF_OPEN -> OPEN
    clock.now = 20.0
    assert breaker.try_acquire()  # OPEN -> HALF_OPEN
    breaker.record_success()  # HALF_OPEN -> CLOSED

    assert [(old, new) for _, old, new in seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]
    assert {name for name, _, _ in seen} == {"warehouse"}
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pipeopt.breaker"]
    assert [level for level, _ in levels] == [
        logging.WARNING,
        logging.INFO,
        logging.WARNING,
        logging.INFO,
        logging.INFO,
    ]
    assert "'warehouse' opened after 2 consecutive failures" in levels[0][1]


def test_a_failing_listener_is_logged_and_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    breaker = CircuitBreaker(1, name="flaky-listener", clock=FakeClock())
    seen: list[BreakerState] = []

    def broken(b: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("listener bug")

    def reentrant(b: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        seen.append(b.statistics().state)  # calling back into the breaker must not deadlock

    breaker.add_listener(broken)
    breaker.add_listener(reentrant)
    breaker.record_failure()
    assert seen == [OPEN]
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)
    breaker.remove_listener(broken)
    with pytest.raises(ValueError, match="not in list"):
        breaker.remove_listener(broken)


def test_call_records_outcomes_and_reraises() -> None:
    breaker = CircuitBreaker(2, name="svc", clock=FakeClock())

    def add(x: int, *, y: int) -> int:
        return x + y

    assert breaker.call(add, 1, y=2) == 3

    def fail() -> None:
        raise Boom("no")

    with pytest.raises(Boom):
        breaker.call(fail)
    with pytest.raises(Boom):
        breaker.call(fail)
    assert breaker.state is OPEN
    stats = breaker.statistics()
    assert (stats.total_successes, stats.total_failures) == (1, 2)


def test_call_releases_the_slot_on_keyboard_interrupt() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 10.0

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        breaker.call(interrupted)
    stats = breaker.statistics()
    assert (stats.state, stats.half_open_in_flight, stats.total_failures) == (HALF_OPEN, 0, 1)


def test_call_rejects_an_async_function() -> None:
    async def body() -> None:
        pass

    with pytest.raises(TypeError, match="use call_async"):
        CircuitBreaker().call(body)  # type: ignore[unused-coroutine]


def test_decorator_guards_sync_functions() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, name="deco", clock=clock)
    calls: list[int] = []

    @breaker
    def work(n: int) -> int:
        calls.append(n)
        if n < 0:
            raise Boom
        return n * 2

    assert work.__name__ == "work"
    assert work(2) == 4
    with pytest.raises(Boom):
        work(-1)
    with pytest.raises(CircuitOpenError):
        work(3)
    clock.now += 10.0
    assert work(5) == 10
    assert calls == [2, -1, 5]
    assert breaker.state is CLOSED


def test_decorator_and_call_async_guard_coroutines() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(1, 10.0, name="async", clock=clock)
    calls: list[int] = []

    async def body(n: int) -> int:
        await asyncio.sleep(0)
        calls.append(n)
        if n < 0:
            raise Boom
        return n + 1

    fetch = breaker(body)
    assert fetch.__name__ == "body"

    async def main() -> None:
        assert await fetch(1) == 2
        with pytest.raises(Boom):
            await fetch(-1)
        with pytest.raises(CircuitOpenError):
            await fetch(7)
        with pytest.raises(CircuitOpenError):
            await breaker.call_async(body, 8)
        clock.now += 10.0
        assert await breaker.call_async(body, 9) == 10

    asyncio.run(main())
    assert calls == [1, -1, 9]
    assert breaker.state is CLOSED


def test_async_cancellation_gives_the_trial_back() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.now += 10.0

    async def main() -> None:
        started = asyncio.Event()

        async def hang() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(breaker.call_async(hang))
        await started.wait()
        assert breaker.statistics().half_open_in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert breaker.statistics().half_open_in_flight == 0
    assert breaker.state is HALF_OPEN


def test_context_managers_record_outcomes() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(2, 10.0, name="cm", clock=clock)
    with breaker as entered:
        assert entered is breaker
    for _ in range(2):
        with pytest.raises(Boom), breaker:
            raise Boom
    ran = False
    with pytest.raises(CircuitOpenError), breaker:
        ran = True
    assert not ran

    async def main() -> None:
        clock.now += 10.0
        async with breaker:
            await asyncio.sleep(0)

    asyncio.run(main())
    stats = breaker.statistics()
    assert stats.state is CLOSED
    assert (stats.total_successes, stats.total_failures, stats.rejected_calls) == (2, 2, 1)


def test_statistics_is_a_frozen_snapshot() -> None:
    clock = FakeClock(0.0)
    breaker = opened(clock, recovery=4.0)
    clock.now = 1.0
    stats = breaker.statistics()
    assert stats == BreakerStatistics(
        name="test",
        state=OPEN,
        consecutive_failures=1,
        total_successes=0,
        total_failures=1,
        rejected_calls=0,
        times_opened=1,
        half_open_in_flight=0,
        retry_after=3.0,
    )
    assert int(stats.state) == 2
    with pytest.raises(AttributeError):
        stats.state = CLOSED  # type: ignore[misc]
    clock.now = 4.0
    assert stats.state is OPEN  # the snapshot does not follow the breaker
    assert breaker.statistics().state is HALF_OPEN


def test_default_names_are_unique_and_repr_is_informative() -> None:
    first, second = CircuitBreaker(), CircuitBreaker()
    assert first.name.startswith("breaker-")
    assert first.name != second.name
    assert repr(CircuitBreaker(3, name="db")) == "<CircuitBreaker 'db' state=CLOSED failures=0/3>"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"failure_threshold": 0}, ValueError, "failure_threshold must be an integer >= 1, got 0"),
        ({"failure_threshold": True}, TypeError, "failure_threshold must be an integer >= 1"),
        ({"failure_threshold": 2.5}, TypeError, "failure_threshold must be an integer >= 1"),
        ({"recovery_timeout": 0}, ValueError, "recovery_timeout must be > 0, got 0"),
        ({"recovery_timeout": -1.0}, ValueError, "recovery_timeout must be > 0, got -1.0"),
        ({"recovery_timeout": math.inf}, ValueError, "recovery_timeout must be a finite number"),
        ({"recovery_timeout": math.nan}, ValueError, "recovery_timeout must be a finite number"),
        ({"recovery_timeout": False}, TypeError, "recovery_timeout must be a number, got bool"),
        ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls must be an integer >= 1"),
        ({"half_open_max_calls": True}, TypeError, "half_open_max_calls must be an integer >= 1"),
        ({"name": ""}, ValueError, "name must be a non-empty string"),
        ({"name": 7}, TypeError, "name must be a string, got int 7"),
        ({"clock": 3.0}, TypeError, "clock must be callable"),
        ({"excluded": [KeyError]}, TypeError, "excluded must be a tuple of exception types"),
        ({"excluded": (KeyError, "x")}, TypeError, "excluded must be a tuple of exception types"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        CircuitBreaker(**kwargs)
    assert message in str(info.value)


def test_decorator_rejects_generators_and_non_callables() -> None:
    breaker = CircuitBreaker()

    def numbers() -> Any:
        yield 1

    with pytest.raises(TypeError, match="cannot guard generator function"):
        breaker(numbers)
    with pytest.raises(TypeError, match="fn must be callable"):
        breaker(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="listener must be callable"):
        breaker.add_listener(None)  # type: ignore[arg-type]
