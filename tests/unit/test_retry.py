"""RetryPolicy's delay schedule and rules, and the retry_with_backoff drivers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import statistics
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeopt.errors import RetryError, TaskTimeoutError
from pipeopt.retry import RetryEvent, RetryPolicy, retry_with_backoff


class Flaky:
    """Fail with the given exceptions in turn, then return ``value``."""

    def __init__(self, *errors: BaseException, value: object = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


class RecordingSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def nominal(policy: RetryPolicy, attempt: int) -> float:
    return min(policy.max_delay, policy.base_delay * policy.multiplier ** (attempt - 1))


# -- the delay schedule -------------------------------------------------------


@pytest.mark.parametrize("jitter", [1.0, 0.5, 0.1])
def test_delays_stay_in_bounds_and_average_to_the_analytic_mean(jitter: float) -> None:
    policy = RetryPolicy(
        max_attempts=9, base_delay=0.1, multiplier=2.0, max_delay=5.0, jitter=jitter
    )
    rng = random.Random(20240611)
    draws = 10_000
    for attempt in range(1, 9):
        d = nominal(policy, attempt)
        assert policy.nominal_delay(attempt) == d
        delays = [policy.delay(attempt, rng) for _ in range(draws)]
        assert all(d * (1 - jitter) <= x <= d <= policy.max_delay for x in delays)
        # uniform on [d(1-j), d]: mean d(1 - j/2), standard deviation d*j/sqrt(12)
        sigma_of_mean = d * jitter / math.sqrt(12) / math.sqrt(draws)
        assert statistics.fmean(delays) == pytest.approx(
            d * (1 - jitter / 2), abs=5 * sigma_of_mean
        )


def test_the_nominal_delay_is_capped_by_max_delay() -> None:
    policy = RetryPolicy(base_delay=1.0, multiplier=10.0, max_delay=50.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 5)] == [1.0, 10.0, 50.0, 50.0]
    assert policy.delay(10_000) == 50.0  # multiplier ** 9999 overflows a float


def test_no_jitter_is_deterministic_and_does_not_draw() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=0.5, multiplier=3.0, max_delay=20.0, jitter=0)

    class NoDraws(random.Random):
        def random(self) -> float:
            raise AssertionError("jitter=0 must not draw")

    assert list(policy.schedule(NoDraws())) == [0.5, 1.5, 4.5, 13.5, 20.0]


def test_schedule_yields_one_wait_per_retry_and_is_reproducible() -> None:
    policy = RetryPolicy(max_attempts=5)
    first = list(policy.schedule(random.Random(7)))
    assert len(first) == 4
    assert first == list(policy.schedule(random.Random(7)))
    assert list(RetryPolicy(max_attempts=1).schedule()) == []


@st.composite
def policies(draw: st.DrawFn) -> RetryPolicy:
    base = draw(st.floats(min_value=0, max_value=1e6))
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=50)),
        base_delay=base,
        multiplier=draw(st.floats(min_value=1, max_value=1e3)),
        max_delay=draw(st.floats(min_value=base, max_value=1e9)),
        jitter=draw(st.floats(min_value=0, max_value=1)),
    )


@given(policies(), st.integers(min_value=1, max_value=5_000), st.integers(0, 2**32))
def test_any_valid_policy_gives_delays_within_bounds(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    d = policy.nominal_delay(attempt)
    x = policy.delay(attempt, random.Random(seed))
    assert math.isfinite(x)
    assert 0 <= d * (1 - policy.jitter) <= x <= d <= policy.max_delay


@given(policies(), st.integers(min_value=1, max_value=200))
def test_without_jitter_delays_never_decrease(policy: RetryPolicy, attempt: int) -> None:
    steady = RetryPolicy(
        base_delay=policy.base_delay,
        multiplier=policy.multiplier,
        max_delay=policy.max_delay,
        jitter=0,
    )
    assert steady.delay(attempt) <= steady.delay(attempt + 1)


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_attempts": 0}, ValueError, "max_attempts must be an integer >= 1, got 0"),
        ({"max_attempts": True}, TypeError, "max_attempts must be an integer >= 1, got bool"),
        ({"max_attempts": 2.0}, TypeError, "max_attempts must be an integer >= 1, got float"),
        ({"base_delay": -0.1}, ValueError, "base_delay must be >= 0, got -0.1"),
        ({"base_delay": math.nan}, ValueError, "base_delay must be a finite number, got nan"),
        ({"base_delay": "1"}, TypeError, "base_delay must be a number, got str"),
        ({"multiplier": 0.5}, ValueError, "multiplier must be >= 1, got 0.5"),
        ({"multiplier": math.inf}, ValueError, "multiplier must be a finite number, got inf"),
        ({"max_delay": math.inf}, ValueError, "max_delay must be a finite number, got inf"),
        (
            {"base_delay": 2.0, "max_delay": 1.0},
            ValueError,
            "max_delay must be >= base_delay (2), got 1.0",
        ),
        ({"jitter": 1.5}, ValueError, "jitter must be <= 1, got 1.5"),
        ({"jitter": -0.1}, ValueError, "jitter must be >= 0, got -0.1"),
        ({"jitter": True}, TypeError, "jitter must be a number, got bool"),
        ({"retry_on": "ValueError"}, TypeError, "retry_on must be a tuple of exception types"),
        ({"retry_on": (ValueError, 3)}, TypeError, "retry_on must contain only exception types"),
        ({"give_up_on": [ValueError]}, TypeError, "give_up_on must be a tuple of exception types"),
        ({"retry_timeouts": 1}, TypeError, "retry_timeouts must be a bool, got int 1"),
    ],
)
def test_bad_parameters_raise_at_construction_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        RetryPolicy(**kwargs)
    assert message in str(info.value)


def test_policy_normalises_numbers_and_single_exception_types() -> None:
    # a bare exception type, a common slip for (KeyError,), must not be taken for a predicate
    policy = RetryPolicy(
        base_delay=1,
        multiplier=2,
        max_delay=3,
        jitter=0,
        retry_on=KeyError,  # type: ignore[arg-type]
    )
    assert isinstance(policy.base_delay, float)
    assert isinstance(policy.jitter, float)
    assert policy.retry_on == (KeyError,)
    assert policy == RetryPolicy(
        base_delay=1.0, multiplier=2.0, max_delay=3.0, jitter=0.0, retry_on=(KeyError,)
    )
    with pytest.raises(AttributeError):
        policy.max_attempts = 5  # type: ignore[misc]


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_numbers_start_at_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt must be an integer >= 1"):
        RetryPolicy().delay(attempt)
    with pytest.raises(ValueError, match="attempt must be an integer >= 1"):
        RetryPolicy().should_retry(ValueError(), attempt)


# -- which exceptions are retried ------------------------------------------------


def test_should_retry_stops_at_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.should_retry(ValueError(), n) for n in (1, 2, 3, 4)] == [
        True,
        True,
        False,
        False,
    ]
    assert not RetryPolicy(max_attempts=1).should_retry(ValueError(), 1)


def test_retry_on_types_and_give_up_on() -> None:
    policy = RetryPolicy(retry_on=(OSError,), give_up_on=(FileNotFoundError,))
    assert policy.should_retry(ConnectionError(), 1)
    assert not policy.should_retry(FileNotFoundError(), 1)  # an OSError, but given up on
    assert not policy.should_retry(ValueError(), 1)


def test_retry_on_predicate() -> None:
    policy = RetryPolicy(retry_on=lambda exc: "transient" in str(exc), give_up_on=(KeyError,))
    assert policy.should_retry(RuntimeError("transient glitch"), 1)
    assert not policy.should_retry(RuntimeError("bad input"), 1)
    assert not policy.should_retry(KeyError("transient"), 1)


@pytest.mark.parametrize(
    "exc",
    [
        KeyboardInterrupt(),
        SystemExit(1),
        GeneratorExit(),
        asyncio.CancelledError(),
        concurrent.futures.CancelledError(),
    ],
)
def test_interrupts_and_cancellations_are_never_retried_unless_listed(exc: BaseException) -> None:
    assert not RetryPolicy().should_retry(exc, 1)
    assert not RetryPolicy(retry_on=(BaseException,)).should_retry(exc, 1)
    assert not RetryPolicy(retry_on=lambda _: True).should_retry(exc, 1)
    assert RetryPolicy(retry_on=(type(exc),)).should_retry(exc, 1)


def test_task_timeouts_are_retried_only_when_asked() -> None:
    timeout = TaskTimeoutError("extract", 5.0)
    assert not RetryPolicy().should_retry(timeout, 1)
    assert not RetryPolicy(retry_on=(TimeoutError,)).should_retry(timeout, 1)
    assert RetryPolicy(retry_timeouts=True).should_retry(timeout, 1)
    assert RetryPolicy(retry_timeouts=True, retry_on=(KeyError,)).should_retry(timeout, 1)
    assert not RetryPolicy(retry_timeouts=True, give_up_on=(TaskTimeoutError,)).should_retry(
        timeout, 1
    )
    # a TimeoutError the body raises itself (a socket, say) is an ordinary exception
    assert RetryPolicy().should_retry(TimeoutError("read timed out"), 1)


# -- retry_with_backoff: call form ---------------------------------------------------


def test_call_form_returns_the_value_of_the_third_attempt() -> None:
    sleep = RecordingSleep()
    fn = Flaky(ConnectionError("1"), ConnectionError("2"), value=42)
    policy = RetryPolicy(max_attempts=5, base_delay=0.25, multiplier=2.0, jitter=0)
    assert retry_with_backoff(fn, policy, sleep=sleep) == 42
    assert fn.calls == 3
    assert sleep.waits == [0.25, 0.5]


def test_exhausted_attempts_raise_retry_error_chained_from_the_last_exception() -> None:
    sleep = RecordingSleep()
    last = ValueError("third")
    fn = Flaky(ValueError("first"), ValueError("second"), last)
    with pytest.raises(RetryError) as info:
        retry_with_backoff(fn, RetryPolicy(max_attempts=3, jitter=0), sleep=sleep)
    assert info.value.attempts == 3
    assert info.value.last_exception is last
    assert info.value.__cause__ is last
    assert "gave up after 3 attempts: ValueError: third" in str(info.value)
    assert fn.calls == 3
    assert sleep.waits == [0.1, 0.2]


def test_a_single_attempt_policy_wraps_the_failure_without_sleeping() -> None:
    sleep = RecordingSleep()
    with pytest.raises(RetryError) as info:
        retry_with_backoff(Flaky(ValueError()), RetryPolicy(max_attempts=1), sleep=sleep)
    assert info.value.attempts == 1
    assert sleep.waits == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), PermissionError("denied")])
def test_non_retryable_exceptions_propagate_unchanged_at_once(exc: BaseException) -> None:
    sleep = RecordingSleep()
    fn = Flaky(exc)
    with pytest.raises(type(exc)) as info:
        retry_with_backoff(fn, RetryPolicy(give_up_on=(PermissionError,)), sleep=sleep)
    assert info.value is exc
    assert fn.calls == 1
    assert sleep.waits == []


def test_retry_on_predicate_decides_in_the_driver() -> None:
    sleep = RecordingSleep()
    fn = Flaky(RuntimeError("503"), RuntimeError("400"))
    policy = RetryPolicy(retry_on=lambda exc: str(exc).startswith("5"), jitter=0)
    with pytest.raises(RuntimeError, match="400"):
        retry_with_backoff(fn, policy, sleep=sleep)
    assert fn.calls == 2
    assert sleep.waits == [0.1]


def test_on_retry_sees_each_retry_with_the_injected_clock_and_rng() -> None:
    events: list[RetryEvent] = []
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    errors = (OSError("a"), OSError("b"))
    policy = RetryPolicy(max_attempts=3)
    retry_with_backoff(
        Flaky(*errors),
        policy,
        sleep=sleep,
        clock=lambda: now[0],
        rng=random.Random(3),
        on_retry=events.append,
    )
    expected = list(policy.schedule(random.Random(3)))
    assert [(e.attempt, e.exception, e.delay) for e in events] == [
        (1, errors[0], expected[0]),
        (2, errors[1], expected[1]),
    ]
    assert [e.elapsed for e in events] == [0.0, pytest.approx(expected[0])]


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="policy must be a RetryPolicy"):
        retry_with_backoff(Flaky(), {"max_attempts": 2})  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="fn must be callable"):
        retry_with_backoff(42, RetryPolicy())  # type: ignore[call-overload]

    def numbers() -> Any:
        yield 1

    with pytest.raises(TypeError, match="cannot retry generator function"):
        retry_with_backoff(numbers)


def test_sync_call_rejects_an_async_sleep() -> None:
    async def async_sleep(seconds: float) -> None:
        pass

    with pytest.raises(TypeError, match="pass a blocking sleep"):
        retry_with_backoff(Flaky(OSError()), RetryPolicy(), sleep=async_sleep)


# -- retry_with_backoff: decorator forms ------------------------------------------------


def test_decorator_with_a_policy_retries_each_call_afresh() -> None:
    sleep = RecordingSleep()
    failures = [OSError("x")]

    @retry_with_backoff(policy=RetryPolicy(max_attempts=2, jitter=0), sleep=sleep)
    def fetch(key: str, *, suffix: str = "") -> str:
        if failures:
            raise failures.pop(0)
        return key + suffix

    assert fetch.__name__ == "fetch"
    assert fetch("a", suffix="!") == "a!"  # one failure, then success
    failures += [OSError("y"), OSError("z"), OSError("never raised")]
    with pytest.raises(RetryError) as info:
        fetch("b")  # two failures: the attempt count starts again at 1
    assert info.value.attempts == 2
    assert str(info.value.last_exception) == "z"
    assert [str(e) for e in failures] == ["never raised"]
    assert sleep.waits == [0.1, 0.1]


def test_bare_decorator_uses_the_default_policy() -> None:
    calls = 0

    @retry_with_backoff
    def always_ok(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * 2

    assert always_ok(21) == 42
    assert calls == 1


def test_bare_decorator_retries_three_times_by_default() -> None:
    sleep = RecordingSleep()
    fn = Flaky(OSError(), OSError(), OSError())
    decorated = retry_with_backoff(fn, sleep=sleep)
    with pytest.raises(RetryError) as info:
        decorated()
    assert info.value.attempts == 3
    assert len(sleep.waits) == 2
    assert all(0 <= w <= 0.1 * 2**n for n, w in enumerate(sleep.waits))


# -- retry_with_backoff: async ---------------------------------------------------------


class AsyncRecordingSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def async_flaky(*errors: BaseException, value: object = "ok") -> tuple[Flaky, Callable[[], Any]]:
    counter = Flaky(*errors, value=value)

    async def fn() -> object:
        await asyncio.sleep(0)
        return counter()

    return counter, fn


@pytest.mark.asyncio
async def test_async_decorator_retries_with_an_awaited_sleep() -> None:
    sleep = AsyncRecordingSleep()
    errors = [OSError("1"), OSError("2")]

    @retry_with_backoff(policy=RetryPolicy(max_attempts=3, jitter=0), sleep=sleep)
    async def load(n: int) -> int:
        await asyncio.sleep(0)
        if errors:
            raise errors.pop(0)
        return n + 1

    assert await load(1) == 2
    assert sleep.waits == [0.1, 0.2]


def test_async_call_form_with_asyncio_run_and_a_plain_sleep() -> None:
    sleep = RecordingSleep()
    counter, fn = async_flaky(OSError(), OSError(), OSError())

    async def main() -> object:
        return await retry_with_backoff(fn, RetryPolicy(max_attempts=3, jitter=0), sleep=sleep)

    with pytest.raises(RetryError) as info:
        asyncio.run(main())
    assert info.value.attempts == 3
    assert counter.calls == 3
    assert sleep.waits == [0.1, 0.2]


@pytest.mark.asyncio
async def test_async_default_sleep_is_asyncio_sleep() -> None:
    counter, fn = async_flaky(OSError(), value="done")
    policy = RetryPolicy(base_delay=0.0, max_delay=0.0)
    assert await retry_with_backoff(fn, policy) == "done"
    assert counter.calls == 2


@pytest.mark.asyncio
async def test_async_cancellation_is_not_retried() -> None:
    counter, fn = async_flaky(asyncio.CancelledError())
    sleep = AsyncRecordingSleep()
    with pytest.raises(asyncio.CancelledError):
        await retry_with_backoff(fn, RetryPolicy(), sleep=sleep)
    assert counter.calls == 1
    assert sleep.waits == []
