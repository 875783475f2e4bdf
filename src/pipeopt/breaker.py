"""A thread-safe circuit breaker with an injected clock.

State machine::

                 failure_threshold consecutive failures
        CLOSED ------------------------------------------> OPEN
          ^                                                |  ^
          |  a trial succeeds                              |  |  a trial fails
          |                        recovery_timeout passed |  |  (new recovery window)
          +------------------ HALF_OPEN <------------------+  |
                                  |                           |
                                  +---------------------------+

    CLOSED     every call is admitted; a success resets the consecutive
               failure count, a failure increments it and the breaker opens
               when it reaches ``failure_threshold``.
    OPEN       every call is refused (counted in ``rejected_calls``) until
               ``recovery_timeout`` seconds have passed since the breaker
               opened. The OPEN -> HALF_OPEN move is lazy: it happens when
               anything reads the breaker after that time, by the clock.
    HALF_OPEN  at most ``half_open_max_calls`` trial calls are admitted at a
               time; the first trial to succeed closes the breaker, the
               first to fail reopens it. Other callers are refused.

Protocol
    :meth:`CircuitBreaker.try_acquire` admits one call, which then ends with
    exactly one of :meth:`~CircuitBreaker.record_success`,
    :meth:`~CircuitBreaker.record_failure` or :meth:`~CircuitBreaker.release`
    (no verdict, e.g. the call was cancelled). A failure with an ``excluded``
    exception type, or with an interrupt or cancellation
    (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``,
    ``asyncio.CancelledError``, ``concurrent.futures.CancelledError``), is a
    release: it says nothing about the guarded service. :meth:`call`,
    :meth:`call_async`, the decorator and the context manager follow the
    protocol for you. One breaker may guard many tasks.

Invariants
    ``0 <= half_open_in_flight <= half_open_max_calls``, and it is 0 outside
    HALF_OPEN; ``consecutive_failures`` counts failures since the last
    success; in CLOSED it stays below ``failure_threshold``; every state
    change is reported to the listeners exactly once, in order, outside the
    lock. The breaker does not tell calls apart: a verdict reported in
    HALF_OPEN counts as a trial's verdict even if the call was admitted
    while CLOSED, and verdicts reported while OPEN only update the counters.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import itertools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from pipeopt._validate import check_float, check_int
from pipeopt.errors import INTERRUPTS, CircuitOpenError

__all__ = ["BreakerListener", "BreakerState", "BreakerStatistics", "CircuitBreaker"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("pipeopt.breaker")


_names = itertools.count(1)
_names_lock = threading.Lock()


def _exception_types(name: str, value: object) -> tuple[type[BaseException], ...]:
    if isinstance(value, type) and issubclass(value, BaseException):
        return (value,)
    if isinstance(value, tuple) and all(
        isinstance(kind, type) and issubclass(kind, BaseException) for kind in value
    ):
        return value
    raise TypeError(
        f"{name} must be a tuple of exception types, got {type(value).__name__} {value!r}"
    )


class BreakerState(enum.IntEnum):
    """The state of a circuit breaker; the value is the Prometheus gauge value."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a circuit breaker, as returned by :meth:`CircuitBreaker.statistics`.

    Attributes:
        name: the breaker's name.
        state: the state at the time of the snapshot.
        consecutive_failures: failures since the last success.
        total_successes: successes recorded since the breaker was created.
        total_failures: failures recorded (excluded exceptions are not).
        rejected_calls: calls refused while OPEN or with every trial slot taken.
        times_opened: how often the breaker went to OPEN.
        half_open_in_flight: trial calls admitted and not yet ended.
        retry_after: seconds until a call may be admitted (0.0 if now; ``inf``
            while every trial slot is taken).
    """

    name: str
    state: BreakerState
    consecutive_failures: int
    total_successes: int
    total_failures: int
    rejected_calls: int
    times_opened: int
    half_open_in_flight: int
    retry_after: float


BreakerListener = Callable[["CircuitBreaker", BreakerState, BreakerState], None]


class CircuitBreaker:
    """Fail fast while a service keeps failing; probe it again after a pause.

    Args:
        failure_threshold: consecutive failures that open the breaker.
        recovery_timeout: seconds the breaker stays OPEN before trials.
        half_open_max_calls: trial calls admitted at a time in HALF_OPEN.
        name: shown in errors, logs and metrics; ``breaker-<n>`` by default.
        clock: a monotonic clock in seconds.
        excluded: exception types that do not count as failures (the call
            ends without a verdict).

    Raises:
        TypeError: a parameter has the wrong type (``True`` is not an int).
        ValueError: a parameter is out of range, NaN or infinite.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        half_open_max_calls: int = 1,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        excluded: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.failure_threshold = check_int("failure_threshold", failure_threshold, minimum=1)
        self.recovery_timeout = check_float(
            "recovery_timeout", recovery_timeout, minimum=0, strict_minimum=True
        )
        self.half_open_max_calls = check_int("half_open_max_calls", half_open_max_calls, minimum=1)
        if name is None:
            with _names_lock:
                name = f"breaker-{next(_names)}"
        elif not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__} {name!r}")
        elif not name:
            raise ValueError("name must be a non-empty string, got ''")
        self.name: str = name
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__} {clock!r}")
        self._clock = clock
        self.excluded: tuple[type[BaseException], ...] = _exception_types("excluded", excluded)
        self._no_verdict = excluded + INTERRUPTS

        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._total_successes = 0
        self._total_failures = 0
        self._rejected_calls = 0
        self._times_opened = 0
        self._opened_at = 0.0
        self._in_flight = 0
        self._listeners: list[BreakerListener] = []
        self._pending: collections.deque[tuple[BreakerState, BreakerState, int]] = (
            collections.deque()
        )
        self._dispatching = False

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.name!r} state={self._state.name} "
            f"failures={self._consecutive_failures}/{self.failure_threshold}>"
        )

    # -- state machine (every _locked method runs with self._lock held) -----

    def _move_locked(self, new: BreakerState) -> None:
        self._pending.append((self._state, new, self._consecutive_failures))
        self._state = new

    def _open_locked(self) -> None:
        self._opened_at = self._clock()
        self._times_opened += 1
        self._in_flight = 0
        self._move_locked(BreakerState.OPEN)

    def _refresh_locked(self) -> float:
        """Apply a due OPEN -> HALF_OPEN move; return the clock's reading."""
        now = self._clock()
        if now >= self._opened_at + self.recovery_timeout:
            self._in_flight = 0
            self._move_locked(BreakerState.HALF_OPEN)
        return now

    def _retry_after_locked(self, now: float) -> float:
        state = self._state
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.recovery_timeout - now)
        if state is BreakerState.HALF_OPEN and self._in_flight >= self.half_open_max_calls:
            return math.inf
        return 0.0

    def _claim_dispatch_locked(self) -> bool:
        if self._pending and not self._dispatching:
            self._dispatching = True
            return True
        return False

    def _dispatch(self) -> None:
        """Report queued transitions in order; only one thread dispatches at a time."""
        while True:
            with self._lock:
                if not self._pending:
                    self._dispatching = False
                    return
                old, new, failures = self._pending.popleft()
                listeners = tuple(self._listeners)
            if new is BreakerState.OPEN:
                logger.warning(
                    "circuit breaker %r opened after %d consecutive failures (%s -> OPEN); "
                    "next trial in %.3gs",
                    self.name,
                    failures,
                    old.name,
                    self.recovery_timeout,
                )
            else:
                logger.info("circuit breaker %r: %s -> %s", self.name, old.name, new.name)
            for listener in listeners:
                try:
                    listener(self, old, new)
                except Exception:
                    logger.exception(
                        "listener %r of circuit breaker %r failed", listener, self.name
                    )

    def _acquire(self) -> float | None:
        """Admit one call and return ``None``, or refuse it and return the retry-after."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return None
            # The clock is read only in OPEN, the one state whose answer depends on it.
            now = self._refresh_locked() if self._state is BreakerState.OPEN else 0.0
            wait: float | None
            if self._state is BreakerState.HALF_OPEN and self._in_flight < self.half_open_max_calls:
                self._in_flight += 1
                wait = None
            else:
                self._rejected_calls += 1
                wait = self._retry_after_locked(now)
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()
        return wait

    # -- public protocol ----------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state, after any OPEN -> HALF_OPEN move due by the clock."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                self._refresh_locked()
            state = self._state
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()
        return state

    def try_acquire(self) -> bool:
        """Ask to run one call now; return whether it is admitted.

        In HALF_OPEN an admitted call takes one of the ``half_open_max_calls``
        trial slots. An admitted call must end with :meth:`record_success`,
        :meth:`record_failure` or :meth:`release`. A refusal is counted in
        ``rejected_calls``.
        """
        return self._acquire() is None

    def retry_after(self) -> float:
        """Return the seconds until a call would be admitted.

        ``0.0`` when a call would be admitted now; the rest of the recovery
        window while OPEN; ``math.inf`` in HALF_OPEN while every trial slot is
        taken, as the answer then depends on how a trial ends.
        """
        with self._lock:
            now = self._refresh_locked() if self._state is BreakerState.OPEN else 0.0
            wait = self._retry_after_locked(now)
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()
        return wait

    def record_success(self) -> None:
        """End an admitted call that succeeded; a successful trial closes the breaker."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                self._refresh_locked()
            self._total_successes += 1
            self._consecutive_failures = 0
            if self._state is BreakerState.HALF_OPEN:
                self._in_flight = 0
                self._move_locked(BreakerState.CLOSED)
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()

    def record_failure(self, exc: BaseException | None = None) -> None:
        """End an admitted call that failed.

        In CLOSED the breaker opens when the consecutive failures reach
        ``failure_threshold``; in HALF_OPEN a failed trial reopens it for a
        new recovery window. An ``excluded`` exception, an interrupt or a
        cancellation ends the call without a verdict, as :meth:`release`.

        Args:
            exc: the exception that ended the call, if known.
        """
        if exc is not None and isinstance(exc, self._no_verdict):
            self.release()
            return
        with self._lock:
            if self._state is BreakerState.OPEN:
                self._refresh_locked()
            self._total_failures += 1
            self._consecutive_failures += 1
            state = self._state
            if state is BreakerState.HALF_OPEN or (
                state is BreakerState.CLOSED
                and self._consecutive_failures >= self.failure_threshold
            ):
                self._open_locked()
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()

    def release(self) -> None:
        """End an admitted call without a verdict, giving back its trial slot if it had one."""
        with self._lock:
            if self._state is BreakerState.HALF_OPEN and self._in_flight > 0:
                self._in_flight -= 1

    def add_listener(self, fn: BreakerListener) -> None:
        """Call ``fn(breaker, old_state, new_state)`` on every state change.

        Listeners run in the order of the changes, outside the breaker's
        lock, in the thread of one of the callers; an exception in a
        listener is logged and does not reach that caller.

        Raises:
            TypeError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise TypeError(f"listener must be callable, got {type(fn).__name__} {fn!r}")
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: BreakerListener) -> None:
        """Stop calling ``fn`` on state changes.

        Raises:
            ValueError: ``fn`` is not a listener of this breaker.
        """
        with self._lock:
            self._listeners.remove(fn)

    def statistics(self) -> BreakerStatistics:
        """Return a consistent snapshot of the breaker's state and counters."""
        with self._lock:
            now = self._refresh_locked() if self._state is BreakerState.OPEN else 0.0
            stats = BreakerStatistics(
                name=self.name,
                state=self._state,
                consecutive_failures=self._consecutive_failures,
                total_successes=self._total_successes,
                total_failures=self._total_failures,
                rejected_calls=self._rejected_calls,
                times_opened=self._times_opened,
                half_open_in_flight=self._in_flight,
                retry_after=self._retry_after_locked(now),
            )
            dispatch = self._claim_dispatch_locked()
        if dispatch:
            self._dispatch()
        return stats

    # -- conveniences -------------------------------------------------------

    def _admit_or_raise(self) -> None:
        wait = self._acquire()
        if wait is not None:
            raise CircuitOpenError(self.name, wait)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` under the breaker and return its value.

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` was not called.
            TypeError: ``fn`` is an ``async def`` function (use :meth:`call_async`).
        """
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} is an async function; use call_async()"
            )
        self._admit_or_raise()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success()
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` under the breaker and return its value.

        Raises:
            CircuitOpenError: the breaker refused the call; ``fn`` was not called.
        """
        self._admit_or_raise()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success()
        return result

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Decorate a plain or ``async def`` function so that every call goes through the breaker.

        Raises:
            TypeError: ``fn`` is not callable or is a generator function.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__} {fn!r}")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"cannot guard generator function {getattr(fn, '__qualname__', fn)!r}: "
                "calling it only creates the generator"
            )
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(async_fn, *args, **kwargs)

            return cast(Callable[P, T], guarded_async)

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return guarded

    def __enter__(self) -> CircuitBreaker:
        """Admit the block as one call.

        Raises:
            CircuitOpenError: the breaker refused the call; the block does not run.
        """
        self._admit_or_raise()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Record the block's outcome; an exception propagates unchanged."""
        if exc is None:
            self.record_success()
        else:
            self.record_failure(exc)

    async def __aenter__(self) -> CircuitBreaker:
        """Admit the block as one call, as :meth:`__enter__`."""
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Record the block's outcome, as :meth:`__exit__`."""
        self.__exit__(exc_type, exc, tb)
