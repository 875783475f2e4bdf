"""Retries with exponential backoff and bounded proportional jitter.

Policy
    A call is tried at most ``max_attempts`` times. After failed attempt
    ``n`` (1-based) the wait before attempt ``n + 1`` has the nominal value::

        d(n) = min(max_delay, base_delay * multiplier ** (n - 1))

    and the actual wait is drawn uniformly from ``[d(n) * (1 - jitter), d(n)]``
    ("bounded proportional jitter"). ``jitter=1`` is AWS-style full jitter
    (uniform on ``[0, d(n)]``, mean ``d(n) / 2``); ``jitter=0`` is deterministic
    (exactly ``d(n)``). In general the mean wait is ``d(n) * (1 - jitter / 2)``.

Which exceptions are retried, in this order of precedence
    1. no exception is retried once ``max_attempts`` attempts have been made;
    2. instances of ``give_up_on`` are never retried;
    3. interrupts and cancellations (``KeyboardInterrupt``, ``SystemExit``,
       ``GeneratorExit``, ``asyncio.CancelledError``,
       ``concurrent.futures.CancelledError``) are retried only when a type
       in a ``retry_on`` tuple is one of them or a subclass of one; a
       predicate never unlocks them;
    4. :class:`~pipeopt.errors.TaskTimeoutError` (an attempt that outran its
       task's timeout) is retried exactly when ``retry_timeouts`` is true; a
       plain ``TimeoutError`` raised by the body itself is an ordinary
       exception;
    5. anything else is retried when it is an instance of a ``retry_on``
       type, or when the ``retry_on`` predicate returns true.

Invariants
    every delay is finite, ``>= 0`` and ``<= max_delay``; with ``jitter=0``
    delays never decrease from one attempt to the next; :meth:`RetryPolicy.delay`
    and :meth:`RetryPolicy.should_retry` are pure (no clock, no sleep, no
    state), so the scheduler can park a task in backoff without holding a
    worker.

Drivers
    :func:`retry_with_backoff` runs a function under a policy: a tiny state
    machine (:class:`_RetryState`) decides "retry after N seconds" or "stop";
    a synchronous and an asynchronous driver of a few lines each do the
    calling and the sleeping, with ``sleep`` and ``clock`` injectable.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

from pipeopt._validate import check_float, check_int
from pipeopt.errors import INTERRUPTS, RetryError, TaskTimeoutError

__all__ = ["RetryEvent", "RetryPolicy", "retry_with_backoff"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("pipeopt.retry")


RetryPredicate = Callable[[BaseException], bool]


def _exception_types(name: str, value: object) -> tuple[type[BaseException], ...] | None:
    """Return ``value`` as a tuple of exception types, or ``None`` if it is not one."""
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, tuple):
        for item in value:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise TypeError(
                    f"{name} must contain only exception types, got {type(item).__name__} {item!r}"
                )
        return value
    return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a failing call is retried: how often, after which waits, on what.

    Args:
        max_attempts: total attempts, the first included; 1 means no retry.
        base_delay: nominal wait in seconds after the first failed attempt.
        multiplier: growth factor of the nominal wait per failed attempt.
        max_delay: upper bound of every wait, in seconds.
        jitter: the fraction of each nominal wait that is randomised, in
            ``[0, 1]``: the wait is drawn from ``[d * (1 - jitter), d]``.
        retry_on: exception types to retry, or a predicate on the exception.
        give_up_on: exception types never retried, whatever ``retry_on`` says.
        retry_timeouts: retry attempts that failed with
            :class:`~pipeopt.errors.TaskTimeoutError`.

    Raises:
        TypeError: a parameter has the wrong type (``True`` is not an int).
        ValueError: a parameter is out of range, NaN or infinite, or
            ``max_delay < base_delay``.
    """

    max_attempts: int = 3
    base_delay: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 1.0
    retry_on: tuple[type[BaseException], ...] | RetryPredicate = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()
    retry_timeouts: bool = False

    def __post_init__(self) -> None:
        check_int("max_attempts", self.max_attempts, minimum=1)
        base_delay = check_float("base_delay", self.base_delay, minimum=0)
        multiplier = check_float("multiplier", self.multiplier, minimum=1)
        max_delay = check_float("max_delay", self.max_delay, minimum=0)
        if max_delay < base_delay:
            raise ValueError(
                f"max_delay must be >= base_delay ({base_delay:g}), got {self.max_delay!r}"
            )
        jitter = check_float("jitter", self.jitter, minimum=0, maximum=1)
        retry_on = _exception_types("retry_on", self.retry_on)
        if retry_on is None and not callable(self.retry_on):
            raise TypeError(
                "retry_on must be a tuple of exception types or a predicate, "
                f"got {type(self.retry_on).__name__} {self.retry_on!r}"
            )
        give_up_on = _exception_types("give_up_on", self.give_up_on)
        if give_up_on is None:
            raise TypeError(
                "give_up_on must be a tuple of exception types, "
                f"got {type(self.give_up_on).__name__} {self.give_up_on!r}"
            )
        if not isinstance(self.retry_timeouts, bool):
            raise TypeError(
                "retry_timeouts must be a bool, "
                f"got {type(self.retry_timeouts).__name__} {self.retry_timeouts!r}"
            )
        for name, value in (
            ("base_delay", base_delay),
            ("multiplier", multiplier),
            ("max_delay", max_delay),
            ("jitter", jitter),
            ("give_up_on", give_up_on),
        ):
            object.__setattr__(self, name, value)
        if retry_on is not None:
            object.__setattr__(self, "retry_on", retry_on)

    def nominal_delay(self, attempt: int) -> float:
        """Return ``d(attempt)``, the wait after failed ``attempt`` before jitter.

        Args:
            attempt: the number of the attempt that failed, from 1.

        Raises:
            TypeError: ``attempt`` is not an int.
            ValueError: ``attempt`` is below 1.
        """
        check_int("attempt", attempt, minimum=1)
        try:
            growth = self.multiplier ** (attempt - 1)
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, self.base_delay * growth)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the wait after failed ``attempt`` before attempt ``attempt + 1``.

        The wait is drawn uniformly from ``[d * (1 - jitter), d]`` where ``d``
        is :meth:`nominal_delay`; it never exceeds ``max_delay``.

        Args:
            attempt: the number of the attempt that failed, from 1.
            rng: the source of the random draw; the ``random`` module's
                shared generator when ``None``.

        Raises:
            TypeError: ``attempt`` is not an int.
            ValueError: ``attempt`` is below 1.
        """
        nominal = self.nominal_delay(attempt)
        if self.jitter == 0.0:
            return nominal
        draw = rng.random() if rng is not None else random.random()
        return nominal * (1.0 - self.jitter * draw)

    def is_retryable(self, exc: BaseException) -> bool:
        """Return whether ``exc`` may be retried, attempts left aside."""
        if self.give_up_on and isinstance(exc, self.give_up_on):
            return False
        retry_on = self.retry_on
        if isinstance(exc, INTERRUPTS):
            return isinstance(retry_on, tuple) and any(
                isinstance(exc, kind) and issubclass(kind, INTERRUPTS) for kind in retry_on
            )
        if isinstance(exc, TaskTimeoutError):
            return self.retry_timeouts
        if isinstance(retry_on, tuple):
            return isinstance(exc, retry_on)
        return bool(retry_on(exc))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Return whether to try again after ``exc`` ended attempt number ``attempt``.

        Args:
            exc: the exception that ended the attempt.
            attempt: the number of the attempt that failed, from 1.

        Raises:
            TypeError: ``attempt`` is not an int.
            ValueError: ``attempt`` is below 1.
        """
        check_int("attempt", attempt, minimum=1)
        return attempt < self.max_attempts and self.is_retryable(exc)

    def schedule(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the ``max_attempts - 1`` waits of a call that fails every time.

        Args:
            rng: the source of the random draws; see :meth:`delay`.
        """
        for attempt in range(1, self.max_attempts):
            yield self.delay(attempt, rng)


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A failed attempt that will be retried, as handed to ``on_retry``.

    Attributes:
        attempt: the number of the attempt that failed, from 1.
        exception: the exception that ended it.
        delay: seconds to wait before the next attempt.
        elapsed: seconds since the first attempt started, by the driver's clock.
    """

    attempt: int
    exception: BaseException
    delay: float
    elapsed: float


class _RetryState:
    """The state of one retried call: count attempts, decide what follows a failure."""

    __slots__ = ("attempt", "clock", "policy", "rng", "started")

    def __init__(
        self, policy: RetryPolicy, rng: random.Random | None, clock: Callable[[], float]
    ) -> None:
        self.policy = policy
        self.rng = rng
        self.clock = clock
        self.attempt = 0
        self.started = 0.0

    def begin(self) -> None:
        """Count the attempt about to start."""
        if self.attempt == 0:
            self.started = self.clock()
        self.attempt += 1

    def after_failure(self, exc: BaseException) -> RetryEvent | None:
        """Return the retry that follows ``exc``, or ``None`` to re-raise ``exc`` as is.

        Raises:
            RetryError: ``exc`` is retryable but no attempt is left.
        """
        policy = self.policy
        if not policy.is_retryable(exc):
            return None
        if self.attempt >= policy.max_attempts:
            raise RetryError(exc, self.attempt) from exc
        wait = policy.delay(self.attempt, self.rng)
        return RetryEvent(self.attempt, exc, wait, self.clock() - self.started)


@dataclass(frozen=True, slots=True)
class _Driver:
    """What a driver needs besides the function: the policy and the injected effects."""

    policy: RetryPolicy
    sleep: Callable[[float], object]
    clock: Callable[[], float]
    rng: random.Random | None
    on_retry: Callable[[RetryEvent], object] | None

    def announce(self, event: RetryEvent) -> None:
        logger.debug(
            "attempt %d failed with %s: %s; retrying in %.3gs",
            event.attempt,
            type(event.exception).__name__,
            event.exception,
            event.delay,
        )
        if self.on_retry is not None:
            self.on_retry(event)


def _run_sync(
    fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], driver: _Driver
) -> T:
    state = _RetryState(driver.policy, driver.rng, driver.clock)
    while True:
        state.begin()
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            event = state.after_failure(exc)
            if event is None:
                raise
        # Waiting outside the except block keeps the next failure from chaining onto this one.
        driver.announce(event)
        pending = driver.sleep(event.delay)
        if inspect.isawaitable(pending):
            if inspect.iscoroutine(pending):
                pending.close()
            raise TypeError(
                "sleep returned an awaitable in a synchronous call; pass a blocking sleep"
            )


async def _run_async(
    fn: Callable[..., Awaitable[T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    driver: _Driver,
) -> T:
    state = _RetryState(driver.policy, driver.rng, driver.clock)
    while True:
        state.begin()
        try:
            return await fn(*args, **kwargs)
        except BaseException as exc:
            event = state.after_failure(exc)
            if event is None:
                raise
        driver.announce(event)
        pending = driver.sleep(event.delay)
        if inspect.isawaitable(pending):
            await pending


class _Decorator(Protocol):
    def __call__(self, fn: Callable[P, T], /) -> Callable[P, T]: ...


@overload
def retry_with_backoff(
    fn: Callable[[], Coroutine[Any, Any, T]],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[RetryEvent], object] | None = None,
) -> Coroutine[Any, Any, T]: ...
@overload
def retry_with_backoff(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[RetryEvent], object] | None = None,
) -> T: ...
@overload
def retry_with_backoff(
    fn: Callable[P, T],
    policy: None = None,
    *,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[RetryEvent], object] | None = None,
) -> Callable[P, T]: ...
@overload
def retry_with_backoff(
    fn: None = None,
    policy: RetryPolicy | None = None,
    *,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[RetryEvent], object] | None = None,
) -> _Decorator: ...
def retry_with_backoff(
    fn: Callable[..., Any] | None = None,
    policy: RetryPolicy | None = None,
    *,
    sleep: Callable[[float], object] | None = None,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[RetryEvent], object] | None = None,
) -> Any:
    """Call ``fn`` with retries, or decorate a function so that it retries.

    Three forms:

    * ``retry_with_backoff(fn, policy)`` calls ``fn()`` now and returns its
      value (for an ``async def`` function, a coroutine to await);
    * ``@retry_with_backoff(policy=policy)`` decorates a function;
    * ``@retry_with_backoff`` decorates a function with ``RetryPolicy()``.

    ``fn`` given without ``policy`` is the bare decorator form, so to call now
    with the default policy pass ``RetryPolicy()`` explicitly. Both plain and
    ``async def`` functions are supported. A non-retryable exception
    (``give_up_on``, interrupts, anything ``retry_on`` rejects) propagates
    unchanged from the attempt that raised it.

    Args:
        fn: the function to call or decorate.
        policy: the retry policy; ``RetryPolicy()`` in the decorator forms
            when ``None``.
        sleep: waits the given seconds between attempts; ``time.sleep`` for
            plain functions and ``asyncio.sleep`` for ``async def`` ones when
            ``None``. In async calls an awaitable it returns is awaited.
        clock: a monotonic clock, for :attr:`RetryEvent.elapsed`.
        rng: the source of the jitter draws; see :meth:`RetryPolicy.delay`.
        on_retry: called with a :class:`RetryEvent` before each wait.

    Returns:
        The value of the successful attempt in the call form; the decorated
        function or a decorator otherwise.

    Raises:
        RetryError: every allowed attempt failed with a retryable exception;
            chained from the last one.
        TypeError: ``fn`` is not callable, is a generator function, or
            ``policy`` is not a :class:`RetryPolicy`.
    """
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"policy must be a RetryPolicy, got {type(policy).__name__} {policy!r}")

    def wrap(func: Callable[P, T]) -> Callable[P, T]:
        return _decorate(
            func,
            policy=policy if policy is not None else RetryPolicy(),
            sleep=sleep,
            clock=clock,
            rng=rng,
            on_retry=on_retry,
        )

    if fn is None:
        return wrap
    if policy is None:
        return wrap(fn)
    _check_function(fn)
    if inspect.iscoroutinefunction(fn):
        driver = _Driver(policy, sleep or asyncio.sleep, clock, rng, on_retry)
        return _run_async(fn, (), {}, driver)
    return _run_sync(fn, (), {}, _Driver(policy, sleep or time.sleep, clock, rng, on_retry))


def _check_function(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__} {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"cannot retry generator function {getattr(fn, '__qualname__', fn)!r}: "
            "calling it only creates the generator; retry the code that consumes it"
        )


def _decorate(
    fn: Callable[P, T],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], object] | None,
    clock: Callable[[], float],
    rng: random.Random | None,
    on_retry: Callable[[RetryEvent], object] | None,
) -> Callable[P, T]:
    _check_function(fn)
    if inspect.iscoroutinefunction(fn):
        async_driver = _Driver(policy, sleep or asyncio.sleep, clock, rng, on_retry)
        async_fn = cast(Callable[..., Awaitable[Any]], fn)

        @functools.wraps(fn)
        async def retrying_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            return await _run_async(async_fn, args, kwargs, async_driver)

        return cast(Callable[P, T], retrying_async)

    driver = _Driver(policy, sleep or time.sleep, clock, rng, on_retry)

    @functools.wraps(fn)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
        return _run_sync(fn, args, kwargs, driver)

    return retrying
