"""AdaptiveBatcher on simulated sinks (fake clock, seeded noise), FixedBatcher, validation."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from pipeopt.batching import AdaptiveBatcher, Batcher, BatcherStatistics, FixedBatcher

SIGMA = 0.15
SLO = 0.1
# (a seconds per batch, b seconds per row), as measured for the real sinks.
SINKS = {
    "sqlite": (0.84e-3, 1.16e-6),
    "pg-executemany": (0.48e-3, 8.9e-6),
    "pg-copy": (0.46e-3, 2.1e-6),
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedSink:
    """Latency ``(a + b·size) × lognormal noise``; batch j of a run gets the j-th noise draw."""

    def __init__(self, a: float, b: float, seed: int, spike_rate: float = 0.0) -> None:
        self.a, self.b = a, b
        rng = random.Random(seed)
        self.noise = []
        for _ in range(5000):
            factor = math.exp(rng.gauss(0.0, SIGMA))
            if rng.random() < spike_rate:
                factor *= 5.0
            self.noise.append(factor)

    def run(
        self, plan: Callable[[], int], record: Callable[[int, float], None], batches: int
    ) -> list[tuple[int, float]]:
        out = []
        for j in range(batches):
            size = plan()
            latency = (self.a + self.b * size) * self.noise[j]
            record(size, latency)
            out.append((size, latency))
        return out


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    position = 0.95 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def throughput(batches: list[tuple[int, float]]) -> float:
    return sum(s for s, _ in batches) / sum(t for _, t in batches)


def best_fixed(sink: SimulatedSink, batches: int) -> float:
    """Return the throughput of the largest fixed size whose p95 meets the SLO (bisection)."""

    def run(size: int) -> list[tuple[int, float]]:
        return sink.run(lambda: size, lambda _s, _t: None, batches)

    low, high = 1, 1 << 24
    while high - low > 1:
        middle = (low + high) // 2
        if p95([t for _, t in run(middle)]) <= SLO:
            low = middle
        else:
            high = middle
    return throughput(run(low))


def make(clock: FakeClock | None = None, **kwargs: Any) -> AdaptiveBatcher:
    kwargs.setdefault("max_size", 10_000_000)
    return AdaptiveBatcher(SLO, clock=clock or FakeClock(), rng=random.Random(7), **kwargs)


def drive(batcher: AdaptiveBatcher, clock: FakeClock) -> Callable[[int, float], None]:
    def record(size: int, latency: float) -> None:
        clock.now += latency
        batcher.record(size, latency)

    return record


# -- convergence on simulated sinks --------------------------------------------


@pytest.mark.parametrize("sink_name", list(SINKS))
@pytest.mark.parametrize("seed", [1, 2])
def test_converges_to_the_best_fixed_throughput_within_the_slo(sink_name: str, seed: int) -> None:
    a, b = SINKS[sink_name]
    sink = SimulatedSink(a, b, seed)
    clock = FakeClock()
    batcher = make(clock)
    history = sink.run(batcher.plan, drive(batcher, clock), 400)
    steady = history[100:]
    oracle = best_fixed(SimulatedSink(a, b, seed + 100), 300)
    assert throughput(steady) >= 0.9 * oracle
    assert p95([t for _, t in history]) <= SLO
    stats = batcher.statistics()
    assert stats.intercept is not None
    assert stats.slope is not None
    assert stats.slope == pytest.approx(b, rel=0.35)


@pytest.mark.parametrize("sink_name", list(SINKS))
def test_reconverges_after_a_step_change(sink_name: str) -> None:
    a, b = SINKS[sink_name]
    clock = FakeClock()
    batcher = make(clock)
    record = drive(batcher, clock)
    SimulatedSink(a, b, 3).run(batcher.plan, record, 300)
    before = batcher.statistics()

    stepped = SimulatedSink(30 * a, 2 * b, 4)  # a secondary index and a slow network at once
    history = stepped.run(batcher.plan, record, 400)
    over_at_step = sum(t > SLO for _, t in history[:30])
    assert over_at_step <= 3
    assert p95([t for _, t in history]) <= SLO
    oracle = best_fixed(SimulatedSink(30 * a, 2 * b, 5), 300)
    assert throughput(history[60:]) >= 0.9 * oracle
    after = batcher.statistics()
    assert after.current_size < before.current_size
    assert after.intercept is not None
    assert after.intercept > 10 * a


def test_a_faster_sink_is_followed_up() -> None:
    a, b = SINKS["pg-executemany"]
    clock = FakeClock()
    batcher = make(clock)
    record = drive(batcher, clock)
    SimulatedSink(a, b, 8).run(batcher.plan, record, 200)
    slow_size = batcher.statistics().current_size
    history = SimulatedSink(a, b / 4, 9).run(batcher.plan, record, 200)
    assert batcher.statistics().current_size > 3 * slow_size
    assert p95([t for _, t in history]) <= SLO


def test_single_spikes_cut_once_but_do_not_make_it_forget() -> None:
    a, b = SINKS["sqlite"]
    clock = FakeClock()
    batcher = make(clock)
    record = drive(batcher, clock)
    SimulatedSink(a, b, 10).run(batcher.plan, record, 200)
    settled = batcher.statistics()
    size = batcher.plan()
    record(size, 5 * SLO)  # one batch 5× over the SLO
    cut = batcher.statistics()
    assert cut.current_size <= size * 0.9 * SLO / (5 * SLO) + 1
    assert "slo miss" in cut.last_decision
    assert cut.samples == min(settled.samples + 1, 50)
    assert cut.resets == settled.resets
    history = SimulatedSink(a, b, 11).run(batcher.plan, record, 40)
    assert batcher.statistics().resets == settled.resets
    assert batcher.statistics().current_size >= 0.8 * settled.current_size
    assert sum(t > SLO for _, t in history) <= 2


def test_probes_keep_the_intercept_measurable() -> None:
    a, b = 5e-3, 2.1e-6  # a fixed cost large enough to stand out of the noise
    clock = FakeClock()
    batcher = make(clock)
    history = SimulatedSink(a, b, 12).run(batcher.plan, drive(batcher, clock), 400)
    stats = batcher.statistics()
    assert stats.probes >= 3
    settled = stats.current_size
    assert any(size <= settled // 8 + 1 for size, _ in history[200:])
    assert stats.intercept == pytest.approx(a, rel=0.5)
    assert stats.slope == pytest.approx(b, rel=0.2)


def test_is_deterministic() -> None:
    a, b = SINKS["sqlite"]
    runs = []
    for _ in range(2):
        clock = FakeClock()
        batcher = make(clock)
        runs.append(SimulatedSink(a, b, 13).run(batcher.plan, drive(batcher, clock), 150))
    assert runs[0] == runs[1]


# -- edge behaviour --------------------------------------------------------------


def test_slo_out_of_reach_keeps_useful_batches_instead_of_single_rows() -> None:
    clock = FakeClock()
    batcher = make(clock)
    sink = SimulatedSink(0.2, 1e-6, 14)  # every batch costs 2× the SLO
    sink.run(batcher.plan, drive(batcher, clock), 100)
    stats = batcher.statistics()
    assert "out of reach" in stats.last_decision
    # rows get a tenth of the fixed cost: about 0.1 · 0.2 s / 1 µs = 20,000 rows
    assert 5_000 <= stats.current_size <= 60_000


def test_latency_independent_of_size_grows_to_max_size_by_doubling() -> None:
    clock = FakeClock()
    batcher = make(clock, max_size=5000)
    sizes = []
    for _ in range(20):
        size = batcher.plan()
        sizes.append(size)
        batcher.record(size, 0.001)
    assert sizes[:4] == [1, 2, 4, 8]
    assert all(later <= 2 * earlier for earlier, later in itertools.pairwise(sizes))
    assert batcher.plan() == 5000


def test_growth_is_capped_at_twice_per_batch() -> None:
    batcher = make(initial_size=100)
    batcher.record(100, 1e-6)
    assert batcher.plan() == 200


def test_plan_respects_pending_and_min_size() -> None:
    batcher = make(min_size=50, initial_size=400)
    assert batcher.plan(10_000) == 400
    assert batcher.plan(120) == 120
    assert batcher.plan(7) == 7
    assert batcher.plan(0) == 0
    assert batcher.plan() == batcher.plan()  # planning does not change the state
    for _ in range(10):
        size = batcher.plan()
        batcher.record(size, size * 0.01)  # 10 ms a row: far over the SLO at any size
    assert batcher.plan() == 50  # never below min_size


def test_stale_samples_age_out_by_the_clock() -> None:
    clock = FakeClock()
    batcher = make(clock, max_age=60.0)
    for _ in range(20):
        batcher.record(batcher.plan(), 0.01)
    assert batcher.statistics().samples == 20
    clock.now += 61.0
    batcher.record(batcher.plan(), 0.01)
    assert batcher.statistics().samples == 1


def test_statistics_is_a_frozen_snapshot() -> None:
    batcher = make()
    batcher.record(10, 0.01)
    batcher.record(20, 0.5)
    stats = batcher.statistics()
    assert isinstance(stats, BatcherStatistics)
    assert stats.batches == 2
    assert stats.batches_over_slo == 1
    assert stats.rows == 30
    assert stats.samples == 2
    assert stats.throughput == pytest.approx(30 / 0.51)
    assert stats.target_latency == SLO
    assert stats.intercept is None  # too few samples to fit
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.current_size = 5  # type: ignore[misc]


def test_empty_batches_are_counted_but_not_modelled() -> None:
    batcher = make()
    batcher.record(0, 0.0)
    stats = batcher.statistics()
    assert (stats.batches, stats.samples, stats.throughput) == (1, 0, None)


# -- FixedBatcher and the protocol ---------------------------------------------


def test_fixed_batcher() -> None:
    batcher = FixedBatcher(500, target_latency=0.05)
    assert batcher.plan() == 500
    assert batcher.plan(20) == 20
    batcher.record(500, 0.04)
    batcher.record(500, 0.06)
    stats = batcher.statistics()
    assert (stats.current_size, stats.batches, stats.batches_over_slo, stats.rows) == (
        500,
        2,
        1,
        1000,
    )
    assert stats.throughput == pytest.approx(1000 / 0.1)
    assert stats.last_decision == "fixed"


def test_both_batchers_follow_the_protocol() -> None:
    assert isinstance(make(), Batcher)
    assert isinstance(FixedBatcher(10), Batcher)


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_latency": 0}, ValueError, "target_latency must be > 0, got 0"),
        ({"target_latency": -1.0}, ValueError, "target_latency must be > 0"),
        ({"target_latency": math.inf}, ValueError, "target_latency must be a finite number"),
        ({"target_latency": math.nan}, ValueError, "target_latency must be a finite number"),
        ({"target_latency": "0.1"}, TypeError, "target_latency must be a number, got str"),
        ({"min_size": 0}, ValueError, "min_size must be an integer >= 1, got 0"),
        ({"min_size": 1.5}, TypeError, "min_size must be an integer >= 1, got float"),
        ({"min_size": 10, "max_size": 5}, ValueError, "max_size must be an integer >= 10, got 5"),
        ({"window": 2}, ValueError, "window must be an integer >= 3, got 2"),
        ({"window": True}, TypeError, "window must be an integer >= 3, got bool"),
        ({"initial_size": 0}, ValueError, "initial_size must be an integer >= 1"),
        ({"initial_size": 10**9}, ValueError, "initial_size must be between"),
        ({"clock": 3}, TypeError, "clock must be callable"),
        ({"rng": 3}, TypeError, "rng must be a random.Random"),
        ({"headroom": 0}, ValueError, "headroom must be > 0"),
        ({"headroom": 1.5}, ValueError, "headroom must be <= 1"),
        ({"max_growth": 1.0}, ValueError, "max_growth must be > 1"),
        ({"probe_interval": 0}, ValueError, "probe_interval must be an integer >= 1"),
        ({"max_age": 0}, ValueError, "max_age must be > 0"),
    ],
)
def test_rejects_bad_parameters(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    kwargs = {"target_latency": 0.1, **kwargs}
    with pytest.raises(error, match=message.replace("(", r"\(")):
        AdaptiveBatcher(**kwargs)


@pytest.mark.parametrize("batcher", [make(), FixedBatcher(10)], ids=["adaptive", "fixed"])
def test_rejects_bad_feedback(batcher: Batcher) -> None:
    with pytest.raises(ValueError, match="pending must be an integer >= 0, got -1"):
        batcher.plan(-1)
    with pytest.raises(TypeError, match="pending must be an integer"):
        batcher.plan(2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size must be an integer >= 0, got -1"):
        batcher.record(-1, 0.1)
    with pytest.raises(ValueError, match="latency must be >= 0"):
        batcher.record(1, -0.1)
    with pytest.raises(ValueError, match="latency must be a finite number"):
        batcher.record(1, math.nan)


def test_fixed_batcher_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 1, got 0"):
        FixedBatcher(0)
