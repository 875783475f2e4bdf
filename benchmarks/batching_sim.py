"""Tier A: the adaptive batcher against the best fixed size, on simulated sinks.

Each simulated sink answers a batch of ``n`` rows in ``(a + b·n) × noise``
seconds, where ``noise`` is lognormal (σ = 0.15) and, in the spike phase,
1 % of batches are another 5× slower. ``a`` and ``b`` were measured on this
machine (``benchmarks/batching_real.py`` fits the same line):

=================  =========  ===========
sink               a          b
=================  =========  ===========
sqlite             0.84 ms    1.16 µs/row
pg-executemany     0.48 ms    8.9 µs/row
pg-copy            0.46 ms    2.1 µs/row
=================  =========  ===========

A run goes through four phases of equal row counts (about 400 batches of the
best base size each), with a step change between phases:

``base`` → ``b×2`` (rows cost twice as much: a secondary index) → ``a×30``
(back to base ``b``, but each batch costs 30× more: a remote round trip) →
``spikes`` (base, with 1 % of batches 5× slower).

One :class:`~pipeopt.batching.AdaptiveBatcher` runs through all four phases
without being told about them. Its rival in each phase is the *oracle*: the
fixed size with the most rows per second whose p95 latency meets the SLO in
that phase, found by a grid search in hindsight over the very same noise (the
oracle is re-chosen per phase; a real fixed size would have to be one size
for all). Both draw the noise of the j-th batch of a phase from the same
seeded stream, so the comparison is paired. Time is simulated: nothing
sleeps, and the run is deterministic for a seed.

Reported per sink, SLO and phase (median over the seeds): the oracle's size
and rows/s, the adaptive batcher's rows/s and the ratio, the p95 latency of
both as a fraction of the SLO, and the adaptive batcher's batches over the
SLO in the first 30 batches after the step ("at step", the worst seed) and
in the whole phase.

Usage::

    python benchmarks/batching_sim.py                 # SLOs 20 ms and 100 ms, 5 seeds
    python benchmarks/batching_sim.py --slo 0.1 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeopt.batching import AdaptiveBatcher

SINKS: dict[str, tuple[float, float]] = {
    "sqlite": (0.84e-3, 1.16e-6),
    "pg-executemany": (0.48e-3, 8.9e-6),
    "pg-copy": (0.46e-3, 2.1e-6),
}
SIGMA = 0.15
SPIKE_RATE = 0.01
SPIKE_FACTOR = 5.0
STEP_WINDOW = 30  # batches after a step that count as the transition
PHASE_BATCHES = 400  # a phase lasts this many SLOs of sink time


@dataclass(frozen=True)
class Phase:
    """One stretch of the run: multipliers of the base ``a`` and ``b``, and a spike rate."""

    name: str
    a_factor: float = 1.0
    b_factor: float = 1.0
    spike_rate: float = 0.0


PHASES = (
    Phase("base"),
    Phase("b×2", b_factor=2.0),
    Phase("a×30", a_factor=30.0),
    Phase("spikes 1%", spike_rate=SPIKE_RATE),
)


class Noise:
    """The seeded multipliers of one phase: batch j of the phase gets ``self[j]``."""

    def __init__(self, seed: str, spike_rate: float) -> None:
        self._rng = random.Random(seed)
        self._spike_rate = spike_rate
        self._values: list[float] = []

    def __getitem__(self, j: int) -> float:
        while len(self._values) <= j:
            factor = math.exp(self._rng.gauss(0.0, SIGMA))
            if self._rng.random() < self._spike_rate:
                factor *= SPIKE_FACTOR
            self._values.append(factor)
        return self._values[j]


@dataclass
class PhaseResult:
    """What one controller did in one phase."""

    rows: int = 0
    seconds: float = 0.0
    latencies: list[float] | None = None
    over_at_step: int = 0
    over: int = 0

    @property
    def throughput(self) -> float:
        return self.rows / self.seconds

    def p95(self) -> float:
        return percentile(self.latencies or [0.0], 0.95)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q`` quantile of ``values`` (linear interpolation)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run_phase(
    plan: Callable[[int | None], int],
    record: Callable[[int, float], None],
    *,
    a: float,
    b: float,
    noise: Noise,
    duration: float,
    slo: float,
) -> PhaseResult:
    """Run a controller for ``duration`` seconds of sink time; return its figures."""
    result = PhaseResult(latencies=[])
    assert result.latencies is not None
    j = 0
    while result.seconds < duration:
        size = plan(None)
        latency = (a + b * size) * noise[j]
        record(size, latency)
        result.rows += size
        result.seconds += latency
        result.latencies.append(latency)
        if latency > slo:
            result.over += 1
            if j < STEP_WINDOW:
                result.over_at_step += 1
        j += 1
    return result


def fixed(size: int) -> tuple[Callable[[int | None], int], Callable[[int, float], None]]:
    """Return the plan/record pair of a fixed size."""
    return (lambda _pending: size), (lambda _size, _latency: None)


def oracle(
    a: float, b: float, noise: Noise, duration: float, slo: float
) -> tuple[int, PhaseResult] | None:
    """Return the largest fixed size whose p95 meets ``slo`` and its result, or ``None``.

    Rows per second grow with the size, so the largest size that meets the
    SLO is the best one; a bisection finds it on the phase's own noise.
    """

    def meets(size: int) -> PhaseResult | None:
        result = run_phase(*fixed(size), a=a, b=b, noise=noise, duration=duration, slo=slo)
        return result if result.p95() <= slo else None

    low, high = 1, 2
    if meets(low) is None:
        return None
    while meets(high) is not None:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle) is None:
            high = middle
        else:
            low = middle
    best = meets(low)
    assert best is not None
    return low, best


Outcome = tuple[Phase, "tuple[int, PhaseResult] | None", PhaseResult]


def simulate(sink: str, slo: float, seed: int) -> list[Outcome]:
    """Run one seed on one sink; return (phase, oracle or None, adaptive) per phase."""
    a0, b0 = SINKS[sink]
    duration = PHASE_BATCHES * slo
    clock = [0.0]
    batcher = AdaptiveBatcher(
        slo, min_size=1, max_size=10_000_000, clock=lambda: clock[0], rng=random.Random(seed)
    )

    def record(size: int, latency: float) -> None:
        clock[0] += latency
        batcher.record(size, latency)

    out: list[Outcome] = []
    for k, phase in enumerate(PHASES):
        a, b = a0 * phase.a_factor, b0 * phase.b_factor
        noise_seed = f"{sink}-{slo}-{seed}-{k}"
        best = oracle(a, b, Noise(noise_seed, phase.spike_rate), duration, slo)
        adaptive = run_phase(
            batcher.plan,
            record,
            a=a,
            b=b,
            noise=Noise(noise_seed, phase.spike_rate),
            duration=duration,
            slo=slo,
        )
        out.append((phase, best, adaptive))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; return 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--slo", type=float, action="append", help="SLO in seconds (repeatable)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sinks", default=",".join(SINKS))
    args = parser.parse_args(argv)
    slos = args.slo or [0.02, 0.1]
    started = time.perf_counter()
    misses: list[str] = []
    for slo in slos:
        print(f"\nSLO {slo * 1e3:g} ms, median of {args.seeds} seeds\n")
        print(
            "| sink | phase | oracle size | oracle rows/s | adaptive rows/s | ratio "
            "| adaptive p95/SLO | oracle p95/SLO | over SLO at step (worst seed) "
            "| over SLO in phase |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for sink in args.sinks.split(","):
            print(f"simulating {sink} at {slo * 1e3:g} ms", file=sys.stderr)
            runs = [simulate(sink, slo, seed) for seed in range(args.seeds)]
            for k, phase in enumerate(PHASES):
                adaptive = [run[k][2] for run in runs]
                oracles = [run[k][1] for run in runs]
                p95 = statistics.median(r.p95() / slo for r in adaptive)
                at_step = max(r.over_at_step for r in adaptive) if k else "-"
                over = statistics.median(r.over for r in adaptive)
                mine = statistics.median(r.throughput for r in adaptive)
                found = [o for o in oracles if o is not None]
                if len(found) < len(oracles):
                    print(
                        f"| {sink} | {phase.name} | none meets the SLO | - | {mine:,.0f} | - "
                        f"| {p95:.2f} | - | {at_step} | {over:.0f} |"
                    )
                    continue
                ratio = statistics.median(
                    r.throughput / o[1].throughput for r, o in zip(adaptive, found, strict=True)
                )
                print(
                    f"| {sink} | {phase.name} | {statistics.median(o[0] for o in found):,.0f} "
                    f"| {statistics.median(o[1].throughput for o in found):,.0f} "
                    f"| {mine:,.0f} | {ratio:.3f} | {p95:.2f} "
                    f"| {statistics.median(o[1].p95() / slo for o in found):.2f} "
                    f"| {at_step} | {over:.0f} |"
                )
                if ratio < 0.9 or p95 > 1.0 or (k > 0 and int(at_step) > 3):
                    misses.append(f"{sink} {phase.name} @ {slo * 1e3:g} ms")
    print(f"\n{time.perf_counter() - started:.1f} s")
    if misses:
        print("\nbelow target (ratio >= 0.90, p95 <= SLO, <= 3 over the SLO at a step):")
        for miss in misses:
            print("- " + miss)
    else:
        print("\nevery phase that a fixed size can serve meets the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
