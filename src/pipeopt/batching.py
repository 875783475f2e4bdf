"""Batch-size controllers: the largest batch whose latency meets an SLO.

A sink's batch latency grows with the batch: more rows per batch amortise the
fixed cost of a round trip and a commit, but one batch must not run longer
than the latency SLO (``target_latency``), because it holds locks, a
transaction and the caller's progress for that long. :class:`AdaptiveBatcher`
finds that size while the pipeline runs and follows it when the sink changes;
:class:`FixedBatcher` answers one size, to compare against. Both are pure
controllers: they do no I/O and never sleep; time comes from an injected
``clock`` and randomness from an injected ``rng``. Callers alternate
``plan()`` (how many rows next?) and ``record(size, latency)`` (how long it
took); ``statistics()`` returns a frozen snapshot for metrics.

Model
    ``latency(size) ≈ a + b·size``: ``a`` is the fixed cost of one batch, ``b``
    the cost of one row. Both are fitted by weighted least squares over the
    last ``window`` executions. Each weight halves every ``window / 3``
    batches of age (recent batches count most) and is divided by the observed
    latency squared, so the fit minimises *relative* error: noise on a sink is
    multiplicative, small batches (which tell ``a`` from ``b``) count as much
    as big ones, and a latency spike barely moves the line. ``a`` and ``b`` are
    kept ``>= 0``. When the window's sizes are too alike to separate the two,
    ``a`` keeps its last separable value and only ``b`` is fitted. The *tail
    factor* is the 95th percentile of observed/predicted latency over the
    window's batches of at least a quarter of the current size (at least 1):
    how far above the line a bad batch like the next one lands.

Policy (decided in ``record``, read by ``plan``)
    1. Aim: the size whose predicted latency times the tail factor is
       ``headroom × target_latency``, i.e. ``(headroom·SLO/tail − a) / b``;
       ``max_size`` when ``b`` is 0; ``min_size`` when ``a`` alone is over
       budget ("slo unreachable").
    2. Grow by at most ``max_growth`` (2×) per batch; shrink at once.
    3. SLO miss: the next size is at most ``size · headroom·SLO / latency``,
       a proportional cut, whatever the model says.
    4. Surprise: a one-sided CUSUM in each direction over
       ``z = log(observed/predicted) / σ`` (σ from the tail factor, ``z``
       clipped to ±3 so one spike never suffices) raises an alarm after about
       two batches far off the line, or four moderately off. The window then
       forgets every sample before the run of surprises, and the batcher
       re-learns the sink from there.
    5. Learning: with fewer than 4 samples (at the start, after a surprise)
       the size follows the last batch, ``size · headroom·SLO /
       (tail·latency)``: exact when ``a`` is 0, cautious otherwise, and it
       converges to the aim either way. Until the window holds 40 samples
       the tail factor leans on its last reliable value (1.5 at first),
       less with each sample.
    6. Probe: when the window has held no batch under half the current size
       for about ``probe_interval`` batches (jittered by ``rng``), ``plan``
       answers one batch of an eighth of the size, so ``a`` stays measurable.
       A probe does not change the current size.
    7. Staleness: samples older than ``max_age`` seconds (by ``clock``) are
       dropped, so a batcher that sat idle re-learns instead of trusting
       numbers from before.

State
    the window of ``(size, latency, time)`` samples, the fitted ``a`` and
    ``b``, the tail factor and its prior, the two CUSUM sums and where their
    run began, the current size, a pending probe, and counters.

Invariants
    ``min_size <= current_size <= max_size``; ``plan(p) <= p`` and
    ``plan(p) >= min(min_size, p)``; the window holds at most ``window``
    samples; ``a >= 0``, ``b >= 0`` and ``tail >= 1`` whenever they are set;
    ``plan`` does not change the state, so calling it twice answers the same.
    Every method is thread-safe.

On simulated sinks with this machine's SQLite and PostgreSQL costs and a
100 ms SLO, the policy reaches 0.94–1.00× the throughput of the best fixed
size chosen in hindsight, p95 under the SLO, through steps of ``b``×2 and
``a``×30 and 1 % spikes (``benchmarks/batching_sim.py``; real sinks in
``benchmarks/batching_real.py``; figures in ``benchmarks/README.md``). Where
the fixed cost alone takes most of the SLO, any size near the limit is a
gamble on the noise, and the headroom costs more throughput.
"""

from __future__ import annotations

import collections
import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from pipeopt._validate import check_float, check_int

__all__ = ["AdaptiveBatcher", "Batcher", "BatcherStatistics", "FixedBatcher"]

_MIN_FIT = 4  # samples before the fitted line replaces proportional steps
_MIN_FIT_AFTER_RESET = 8  # the same after a surprise: a few noisy points mislead a fit
_MIN_TAIL_SAMPLES = 40  # samples before the empirical tail factor stands on its own
_TAIL_QUANTILE = 0.95
_FIRST_TAIL_PRIOR = 1.5
_MAX_TAIL = 20.0
_TAIL_SIZE_SHARE = 4  # the tail factor looks at batches of at least 1/4 the size
_MIN_SPREAD = 0.01  # weighted variance / mean square of sizes needed to fit a and b apart
_Z_CLIP = 3.0
_CUSUM_SLACK = 1.0
_CUSUM_LIMIT = 4.0
_STREAK_Z = 2.0  # a sample this far off starts the streak an alarm keeps
_MIN_SIGMA = 0.03  # floor on the log-noise scale, so a very quiet sink is not all surprise
_PROBE_DIVISOR = 8
_MIN_ROW_SHARE = 0.1  # rows always get at least this share of the fixed cost a


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a batcher, as returned by ``statistics()``.

    Attributes:
        current_size: the size ``plan()`` answers next (probes aside).
        intercept: fitted fixed cost per batch ``a``, seconds; ``None`` before
            a fit (and always for a :class:`FixedBatcher`).
        slope: fitted cost per row ``b``, seconds; ``None`` likewise.
        tail_factor: p95 of observed/predicted latency in use; ``None`` likewise.
        samples: executions in the window.
        batches: executions recorded since creation.
        batches_over_slo: of those, how many took longer than ``target_latency``.
        rows: rows recorded since creation.
        probes: small probe batches recorded.
        resets: times the window was forgotten after a surprise.
        last_decision: why the current size is what it is.
        throughput: rows per second of sink time over the window (sum of
            sizes over sum of latencies); ``None`` while the window is empty.
        target_latency: the latency SLO in seconds, if there is one.
    """

    current_size: int
    intercept: float | None
    slope: float | None
    tail_factor: float | None
    samples: int
    batches: int
    batches_over_slo: int
    rows: int
    probes: int
    resets: int
    last_decision: str
    throughput: float | None
    target_latency: float | None


@runtime_checkable
class Batcher(Protocol):
    """What pipeopt asks of a batch-size controller."""

    def plan(self, pending: int | None = None) -> int:
        """Return the next batch size, at most ``pending`` when given."""
        ...

    def record(self, size: int, latency: float) -> None:
        """Feed back one execution: ``size`` rows took ``latency`` seconds."""
        ...

    def statistics(self) -> BatcherStatistics:
        """Return a snapshot of the controller."""
        ...


class _Sample(NamedTuple):
    size: int
    latency: float
    time: float
    seq: int


def _check_record(size: object, latency: object) -> tuple[int, float]:
    return check_int("size", size, minimum=0), check_float("latency", latency, minimum=0.0)


def _check_pending(pending: object) -> int | None:
    if pending is None:
        return None
    return check_int("pending", pending, minimum=0)


def _quantile(values: list[float], q: float) -> float:
    """Return the ``q`` quantile of ``values`` by linear interpolation."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _window_throughput(samples: collections.deque[_Sample]) -> float | None:
    seconds = sum(s.latency for s in samples)
    if not samples or seconds <= 0:
        return None
    return sum(s.size for s in samples) / seconds


class _LockedState:
    """Pickle a batcher without its lock, so that a copy can start a worker's batching."""

    _lock: threading.Lock

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class AdaptiveBatcher(_LockedState):
    """Choose batch sizes that meet a latency SLO with the most rows per second.

    See the module docstring for the model, the policy and its invariants.

    Args:
        target_latency: the latency SLO of one batch, in seconds.
        min_size: the smallest size ever planned (unless fewer rows are pending).
        max_size: the largest size ever planned.
        window: how many recent executions the model is fitted on.
        initial_size: the first size; ``min_size`` by default.
        clock: returns the time in seconds; used to age samples out.
        rng: source of the probe jitter; a fixed-seed ``random.Random`` by
            default, so equal inputs give equal sizes.
        headroom: the fraction of ``target_latency`` the p95 latency aims at.
        max_growth: the largest factor by which the size grows per batch.
        probe_interval: batches between probes when the window lacks small
            batches; ``None`` never probes.
        max_age: seconds after which a sample is dropped; ``None`` keeps them.

    Raises:
        TypeError: a parameter has the wrong type.
        ValueError: a parameter is out of range, e.g. ``max_size < min_size``.
    """

    def __init__(
        self,
        target_latency: float,
        min_size: int = 1,
        max_size: int = 100_000,
        window: int = 50,
        *,
        initial_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        headroom: float = 0.9,
        max_growth: float = 2.0,
        probe_interval: int | None = 25,
        max_age: float | None = 300.0,
    ) -> None:
        self.target_latency = check_float(
            "target_latency", target_latency, minimum=0.0, strict_minimum=True
        )
        self.min_size = check_int("min_size", min_size, minimum=1)
        self.max_size = check_int("max_size", max_size, minimum=self.min_size)
        self.window = check_int("window", window, minimum=3)
        if initial_size is None:
            initial_size = self.min_size
        check_int("initial_size", initial_size, minimum=self.min_size)
        if initial_size > self.max_size:
            raise ValueError(
                f"initial_size must be between min_size and max_size "
                f"({self.min_size}..{self.max_size}), got {initial_size!r}"
            )
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__} {clock!r}")
        if rng is not None and not callable(getattr(rng, "random", None)):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__} {rng!r}")
        self.headroom = check_float(
            "headroom", headroom, minimum=0.0, maximum=1.0, strict_minimum=True
        )
        self.max_growth = check_float("max_growth", max_growth, minimum=1.0, strict_minimum=True)
        if probe_interval is not None:
            check_int("probe_interval", probe_interval, minimum=1)
        self.probe_interval = probe_interval
        if max_age is not None:
            max_age = check_float("max_age", max_age, minimum=0.0, strict_minimum=True)
        self.max_age = max_age
        self._clock = clock
        self._rng = rng if rng is not None else random.Random(0)

        self._lock = threading.Lock()
        self._samples: collections.deque[_Sample] = collections.deque(maxlen=self.window)
        self._size = initial_size
        self._a: float | None = None
        self._b: float | None = None
        self._separable_a: float | None = None  # last a fitted from well-spread sizes
        self._tail = _FIRST_TAIL_PRIOR
        self._tail_prior = _FIRST_TAIL_PRIOR
        self._cusum_up = 0.0
        self._cusum_down = 0.0
        self._run_start = 0  # seq of the first sample kept after an alarm
        self._streak_up = 0  # seq where the current run of high samples began, 0 if none
        self._streak_down = 0
        self._seq = 0
        self._probe_due = False
        self._since_probe_check = 0
        self._next_probe_check = self._probe_gap()
        self._batches = 0
        self._over_slo = 0
        self._rows = 0
        self._probes = 0
        self._resets = 0
        self._decision = "initial size"

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatcher(target_latency={self.target_latency:g}, size={self._size}, "
            f"min_size={self.min_size}, max_size={self.max_size}, window={self.window})"
        )

    # -- the public protocol -------------------------------------------------

    def plan(self, pending: int | None = None) -> int:
        """Return the next batch size.

        Args:
            pending: rows still to write, if known; the answer never exceeds it.

        Raises:
            TypeError, ValueError: ``pending`` is not an integer >= 0.
        """
        limit = _check_pending(pending)
        with self._lock:
            size = self._probe_size() if self._probe_due else self._size
        return size if limit is None else min(size, limit)

    def record(self, size: int, latency: float) -> None:
        """Feed back one execution and decide the next size.

        Args:
            size: rows the batch held (need not be what ``plan`` answered).
            latency: seconds it took.

        Raises:
            TypeError, ValueError: ``size`` is not an integer >= 0 or
                ``latency`` not a finite number >= 0.
        """
        size, latency = _check_record(size, latency)
        with self._lock:
            self._record(size, latency)

    def statistics(self) -> BatcherStatistics:
        """Return a snapshot of the batcher."""
        with self._lock:
            fitted = self._a is not None
            return BatcherStatistics(
                current_size=self._size,
                intercept=self._a,
                slope=self._b,
                tail_factor=self._tail if fitted else None,
                samples=len(self._samples),
                batches=self._batches,
                batches_over_slo=self._over_slo,
                rows=self._rows,
                probes=self._probes,
                resets=self._resets,
                last_decision=self._decision,
                throughput=_window_throughput(self._samples),
                target_latency=self.target_latency,
            )

    # -- the state machine ---------------------------------------------------

    def _record(self, size: int, latency: float) -> None:
        was_probe = self._probe_due and size != self._size
        self._probe_due = False
        self._batches += 1
        self._rows += size
        missed = latency > self.target_latency
        if missed:
            self._over_slo += 1
        if size == 0:
            return  # an empty batch says nothing about the sink
        if was_probe:
            self._probes += 1
        now = self._clock()
        self._drop_stale(now)
        alarm = self._surprised(size, latency)
        self._seq += 1
        self._samples.append(_Sample(size, max(latency, 1e-9), now, self._seq))
        notes: list[str] = []
        if alarm:
            kept = [s for s in self._samples if s.seq >= self._run_start]
            notes.append(f"surprise ({alarm}): forgot {len(self._samples) - len(kept)} samples")
            self._samples = collections.deque(kept, maxlen=self.window)
            self._separable_a = None
            self._resets += 1
        self._fit()
        self._decide(size, latency, missed, notes)
        self._schedule_probe()

    def _drop_stale(self, now: float) -> None:
        if self.max_age is None:
            return
        while self._samples and now - self._samples[0].time > self.max_age:
            self._samples.popleft()
        if not self._samples:
            self._a = self._b = None
            self._cusum_up = self._cusum_down = 0.0

    def _surprised(self, size: int, latency: float) -> str | None:
        """Update the CUSUMs with this sample; return the alarm's direction, if any."""
        if self._a is None or self._b is None:
            return None
        predicted = self._a + self._b * size
        if predicted <= 0 or latency <= 0:
            return None
        # The noise scale of the last reliable tail: the current one may already
        # be inflated by the very samples that are off.
        sigma = max(math.log(self._tail_prior) / 1.645, _MIN_SIGMA)
        z = max(-_Z_CLIP, min(_Z_CLIP, math.log(latency / predicted) / sigma))
        seq = self._seq + 1  # the sample about to be appended
        # Where the current streak of clearly-off samples began, per direction:
        # an alarm forgets what came before it, and keeps the streak.
        if z <= _STREAK_Z:
            self._streak_up = 0
        elif not self._streak_up:
            self._streak_up = seq
        if z >= -_STREAK_Z:
            self._streak_down = 0
        elif not self._streak_down:
            self._streak_down = seq
        self._cusum_up = max(0.0, self._cusum_up + z - _CUSUM_SLACK)
        self._cusum_down = max(0.0, self._cusum_down - z - _CUSUM_SLACK)
        direction = None
        if self._cusum_up >= _CUSUM_LIMIT:
            direction, self._run_start = "slower", self._streak_up or seq
        elif self._cusum_down >= _CUSUM_LIMIT:
            direction, self._run_start = "faster", self._streak_down or seq
        if direction is not None:
            self._cusum_up = self._cusum_down = 0.0
            self._streak_up = self._streak_down = 0
        return direction

    def _fit(self) -> None:
        """Fit ``a`` and ``b`` on the window and update the tail factor."""
        samples = self._samples
        n = len(samples)
        if n < (_MIN_FIT_AFTER_RESET if self._resets else _MIN_FIT):
            self._a = self._b = None
            self._tail = self._tail_prior
            return
        half_life = self.window / 3
        newest = samples[-1].seq
        sw = sx = sy = sxx = sxy = 0.0
        for s in samples:
            w = 0.5 ** ((newest - s.seq) / half_life) / (s.latency * s.latency)
            sw += w
            sx += w * s.size
            sy += w * s.latency
            sxx += w * s.size * s.size
            sxy += w * s.size * s.latency
        det = sw * sxx - sx * sx
        a: float
        b: float
        if det > _MIN_SPREAD * sw * sxx:
            b = (sw * sxy - sx * sy) / det
            a = (sy - b * sx) / sw
            if a < 0:
                a, b = 0.0, sxy / sxx
            elif b < 0:
                a, b = sy / sw, 0.0
            self._separable_a = a
        else:
            # Sizes too alike to tell a from b: keep the last a, fit b through it.
            a = min(self._separable_a or 0.0, *(s.latency for s in samples))
            b = max(0.0, (sxy - a * sx) / sxx)
        self._a, self._b = a, b
        # The tail that matters is that of batches like the ones planned: the
        # relative jitter of tiny batches (ramp-up, probes) would inflate it.
        ratios = [
            s.latency / max(a + b * s.size, 1e-12)
            for s in samples
            if s.size * _TAIL_SIZE_SHARE >= self._size
        ]
        if not ratios:
            self._tail = self._tail_prior
            return
        empirical = max(1.0, min(_MAX_TAIL, _quantile(ratios, _TAIL_QUANTILE)))
        enough = min(_MIN_TAIL_SAMPLES, self.window)
        if len(ratios) >= enough:
            self._tail = self._tail_prior = empirical
        else:
            # A p95 of few samples runs low: lean on the prior, less so as samples come.
            trust = len(ratios) / enough
            self._tail = max(empirical, trust * empirical + (1 - trust) * self._tail_prior)

    def _decide(self, size: int, latency: float, missed: bool, notes: list[str]) -> None:
        budget = self.headroom * self.target_latency
        aim: float
        if self._a is None or self._b is None:
            recent = list(self._samples)[-3:]
            per_row = statistics.median(s.latency / s.size for s in recent)
            aim = budget / (self._tail * per_row)
            reason = f"learning: {per_row * 1e6:.3g} µs/row over the last {len(recent)} batches"
        else:
            spare = budget / self._tail - self._a
            if self._b <= 0:
                # Grow only while batches cost what the flat line says (or fit the
                # budget): a flat line fitted on few or odd samples must not run
                # the size up while the latency climbs with it.
                usual = max(budget, self._a * (1 + _MIN_ROW_SHARE) * self._tail)
                aim = math.inf if latency <= usual else size
                reason = "latency does not grow with size"
            elif spare < _MIN_ROW_SHARE * self._a:
                # The fixed cost alone eats (nearly) the whole budget: single rows
                # would miss the SLO anyway, or meet it at a ruinous throughput.
                aim = _MIN_ROW_SHARE * self._a / self._b
                reason = (
                    f"slo (nearly) out of reach: fixed cost {self._a * 1e3:.3g} ms × tail "
                    f"{self._tail:.2f} vs {budget * 1e3:.3g} ms; rows get a tenth of it"
                )
            else:
                aim = spare / self._b
                reason = (
                    f"model a={self._a * 1e3:.3g} ms b={self._b * 1e6:.3g} µs/row "
                    f"tail={self._tail:.2f}"
                )
        ceiling = self._size * self.max_growth
        if aim > ceiling:
            aim = ceiling
            reason += f"; growth capped at ×{self.max_growth:g}"
        if missed:
            cut = size * budget / latency
            if self._a is not None and self._b is not None:
                # Below this size the fixed cost is the miss; smaller batches cannot help.
                floor = _MIN_ROW_SHARE * self._a / self._b if self._b > 0 else math.inf
                cut = max(cut, floor)
            if cut < aim:
                aim = cut
                reason = (
                    f"cut after slo miss ({latency * 1e3:.3g} ms > "
                    f"{self.target_latency * 1e3:.3g} ms)"
                )
        if aim == math.inf:
            self._size = self.max_size
        else:
            self._size = max(self.min_size, min(self.max_size, math.floor(aim)))
        self._decision = "; ".join([*notes, reason])

    def _probe_gap(self) -> int:
        if self.probe_interval is None:
            return 0
        return max(1, round(self.probe_interval * (0.5 + self._rng.random())))

    def _probe_size(self) -> int:
        smaller = self._size // _PROBE_DIVISOR
        if smaller >= self.min_size:
            return smaller
        # Too close to min_size to probe below: probe above, so that a sink
        # stuck at min_size (its fixed cost over the SLO) can learn its slope.
        return min(self.max_size, self._size * 2)

    def _schedule_probe(self) -> None:
        if self.probe_interval is None or self._a is None:
            return
        self._since_probe_check += 1
        if self._since_probe_check < self._next_probe_check:
            return
        self._since_probe_check = 0
        self._next_probe_check = self._probe_gap()
        sizes = [s.size for s in self._samples]
        if max(sizes) < 2 * min(sizes) and self._probe_size() != self._size:
            self._probe_due = True


class FixedBatcher(_LockedState):
    """Answer one batch size always; the baseline the adaptive batcher is measured against.

    Args:
        size: the batch size.
        target_latency: an SLO to count misses against, if any.
        window: how many recent executions the throughput estimate covers.

    Raises:
        TypeError, ValueError: ``size`` is not an integer >= 1, or another
            parameter is out of range.
    """

    def __init__(self, size: int, *, target_latency: float | None = None, window: int = 50) -> None:
        self.size = check_int("size", size, minimum=1)
        if target_latency is not None:
            target_latency = check_float(
                "target_latency", target_latency, minimum=0.0, strict_minimum=True
            )
        self.target_latency = target_latency
        self.window = check_int("window", window, minimum=1)
        self._lock = threading.Lock()
        self._samples: collections.deque[_Sample] = collections.deque(maxlen=self.window)
        self._batches = 0
        self._over_slo = 0
        self._rows = 0

    def __repr__(self) -> str:
        return f"FixedBatcher(size={self.size})"

    def plan(self, pending: int | None = None) -> int:
        """Return ``size``, or ``pending`` when fewer rows are pending.

        Raises:
            TypeError, ValueError: ``pending`` is not an integer >= 0.
        """
        limit = _check_pending(pending)
        return self.size if limit is None else min(self.size, limit)

    def record(self, size: int, latency: float) -> None:
        """Count one execution.

        Raises:
            TypeError, ValueError: ``size`` or ``latency`` is negative or not a number.
        """
        size, latency = _check_record(size, latency)
        with self._lock:
            self._batches += 1
            self._rows += size
            if self.target_latency is not None and latency > self.target_latency:
                self._over_slo += 1
            if size:
                self._samples.append(_Sample(size, latency, 0.0, self._batches))

    def statistics(self) -> BatcherStatistics:
        """Return a snapshot of the batcher."""
        with self._lock:
            return BatcherStatistics(
                current_size=self.size,
                intercept=None,
                slope=None,
                tail_factor=None,
                samples=len(self._samples),
                batches=self._batches,
                batches_over_slo=self._over_slo,
                rows=self._rows,
                probes=0,
                resets=0,
                last_decision="fixed",
                throughput=_window_throughput(self._samples),
                target_latency=self.target_latency,
            )
