"""Benchmark reports: the JSON file, the PNG chart and the regression check.

JSON schema of ``pipeline_optimizer_benchmarks.json`` (``schema_version`` 1)::

    {
      "schema_version": 1,
      "timestamp": "2026-11-28T14:32:05+00:00",     # ISO 8601, UTC
      "cpu_count": 8,
      "versions": {"python": "3.11.7", "pipeopt": "0.1.0", "dask": "...",
                   "distributed": "...", "platform": "Linux-...-x86_64"},
      "peers": ["threadpool", "dask-threaded"],     # what --compare ran
      "settings": {"workers": 8, "repetitions": 3, "seed": 0, "scale": 1.0},
      "load_average": [0.4, 0.6, 0.7],  # os.getloadavg() when the run began (null if unknown)
      "workloads": [
        {
          "workload": "io",
          "description": "I/O-bound fan-out/fan-in ETL",
          "tasks": 185,
          "workers": 8,                  # of the optimized run
          "executor": "thread",          # of the optimized run
          "sequential_s": 2.71,          # median; max_workers=1, thread executor
          "optimized_s": 0.342,          # median; max_workers=workers
          "improvement_pct": 87.4,       # (1 - optimized / sequential) * 100
          "speedup": 7.92,               # sequential / optimized
          "total_work_s": 2.70,          # sum of the task bodies' durations (sequential run)
          "critical_path_s": 0.21,       # longest dependency chain of those durations
          "lower_bound_s": 0.338,        # max(critical path, work / workers, CPU work / cores)
          "makespan_over_bound": 1.012,  # optimized / lower bound; null if not a pure DAG
          "repetitions": {"sequential": [...], "optimized": [...]},   # raw seconds
          "peers": {"threadpool": {"median_s": 0.41, "repetitions": [...],
                                   "ratio": 1.2}}   # peer median / optimized median
        }
      ]
    }

Ratios are what :func:`check_regressions` compares, never absolute times:
``speedup`` and each peer ``ratio`` (higher is better) and
``makespan_over_bound`` (lower is better).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
DEFAULT_JSON = "pipeline_optimizer_benchmarks.json"


@dataclass(frozen=True, slots=True)
class PeerResult:
    """One peer's times on one workload."""

    peer: str
    repetitions: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Return the median time in seconds."""
        return _median(self.repetitions)


@dataclass(frozen=True, slots=True)
class WorkloadResult:
    """The measured runs of one workload and what follows from them."""

    workload: str
    description: str
    tasks: int
    workers: int
    executor: str
    sequential: tuple[float, ...]
    optimized: tuple[float, ...]
    total_work_s: float | None = None
    critical_path_s: float | None = None
    lower_bound_s: float | None = None
    peers: Mapping[str, PeerResult] = field(default_factory=dict)

    @property
    def sequential_s(self) -> float:
        """Return the median sequential time in seconds."""
        return _median(self.sequential)

    @property
    def optimized_s(self) -> float:
        """Return the median optimized time in seconds."""
        return _median(self.optimized)

    @property
    def speedup(self) -> float:
        """Return sequential / optimized (medians)."""
        return _ratio(self.sequential_s, self.optimized_s)

    @property
    def improvement_pct(self) -> float:
        """Return (1 - optimized / sequential) as a percentage."""
        return (1.0 - _ratio(self.optimized_s, self.sequential_s)) * 100.0

    @property
    def makespan_over_bound(self) -> float | None:
        """Return optimized / lower bound, or ``None`` without a bound."""
        if self.lower_bound_s is None or self.lower_bound_s <= 0:
            return None
        return self.optimized_s / self.lower_bound_s

    def peer_ratio(self, peer: str) -> float:
        """Return the peer's median over pipeopt's optimized median (> 1: pipeopt is faster)."""
        return _ratio(self.peers[peer].median_s, self.optimized_s)

    def to_dict(self) -> dict[str, Any]:
        """Return the workload's entry of the JSON report."""
        return {
            "workload": self.workload,
            "description": self.description,
            "tasks": self.tasks,
            "workers": self.workers,
            "executor": self.executor,
            "sequential_s": _round(self.sequential_s),
            "optimized_s": _round(self.optimized_s),
            "improvement_pct": _round(self.improvement_pct, 2),
            "speedup": _round(self.speedup, 4),
            "total_work_s": _round(self.total_work_s),
            "critical_path_s": _round(self.critical_path_s),
            "lower_bound_s": _round(self.lower_bound_s),
            "makespan_over_bound": _round(self.makespan_over_bound, 4),
            "repetitions": {
                "sequential": [_round(t) for t in self.sequential],
                "optimized": [_round(t) for t in self.optimized],
            },
            "peers": {
                name: {
                    "median_s": _round(peer.median_s),
                    "repetitions": [_round(t) for t in peer.repetitions],
                    "ratio": _round(self.peer_ratio(name), 4),
                }
                for name, peer in self.peers.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkloadResult:
        """Rebuild a result from its JSON entry.

        Raises:
            ValueError: a required field is missing or has the wrong type.
        """
        try:
            reps = data["repetitions"]
            peers = {
                str(name): PeerResult(str(name), tuple(float(t) for t in entry["repetitions"]))
                for name, entry in dict(data.get("peers") or {}).items()
            }
            return cls(
                workload=str(data["workload"]),
                description=str(data.get("description", "")),
                tasks=int(data.get("tasks", 0)),
                workers=int(data["workers"]),
                executor=str(data["executor"]),
                sequential=tuple(float(t) for t in reps["sequential"]),
                optimized=tuple(float(t) for t in reps["optimized"]),
                total_work_s=_opt_float(data.get("total_work_s")),
                critical_path_s=_opt_float(data.get("critical_path_s")),
                lower_bound_s=_opt_float(data.get("lower_bound_s")),
                peers=peers,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a benchmark workload entry: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Regression:
    """A ratio that got worse than the baseline by more than the tolerance."""

    workload: str
    metric: str
    baseline: float
    current: float
    higher_is_better: bool

    def __str__(self) -> str:
        direction = "fell" if self.higher_is_better else "rose"
        return (
            f"{self.workload}: {self.metric} {direction} from {self.baseline:.3f} "
            f"to {self.current:.3f}"
        )


@dataclass(frozen=True, slots=True)
class BenchmarkReport:
    """The results of one :meth:`BenchmarkSuite.run`, ready to write or compare."""

    workloads: tuple[WorkloadResult, ...]
    timestamp: str
    cpu_count: int
    versions: Mapping[str, str]
    peers: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    load_average: tuple[float, ...] | None = None

    def __getitem__(self, name: str) -> WorkloadResult:
        for result in self.workloads:
            if result.workload == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as the JSON document described in this module."""
        return {
            "schema_version": SCHEMA_VERSION,
            "timestamp": self.timestamp,
            "cpu_count": self.cpu_count,
            "versions": dict(self.versions),
            "peers": list(self.peers),
            "settings": dict(self.settings),
            "load_average": None if self.load_average is None else list(self.load_average),
            "workloads": [w.to_dict() for w in self.workloads],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchmarkReport:
        """Rebuild a report from its JSON document.

        Raises:
            ValueError: the document is not a benchmark report.
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("workloads"), list):
            raise ValueError("not a benchmark report: no 'workloads' list")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
        return cls(
            workloads=tuple(WorkloadResult.from_dict(w) for w in data["workloads"]),
            timestamp=str(data.get("timestamp", "")),
            cpu_count=int(data.get("cpu_count") or 0),
            versions={str(k): str(v) for k, v in dict(data.get("versions") or {}).items()},
            peers=tuple(str(p) for p in data.get("peers") or ()),
            settings=dict(data.get("settings") or {}),
            load_average=_opt_floats(data.get("load_average")),
        )

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> BenchmarkReport:
        """Read a report written by :meth:`write_json`.

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not JSON or not a benchmark report.
        """
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from exc
        return cls.from_dict(data)

    def write_json(self, path: str | os.PathLike[str] = DEFAULT_JSON) -> Path:
        """Write the report as JSON (see the module docstring) and return the path."""
        target = Path(path)
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    def write_png(self, path: str | os.PathLike[str]) -> Path:
        """Draw the median times per workload (sequential, optimized, peers) as a PNG.

        Raises:
            ImportError: matplotlib is not installed (``pip install 'pipeopt[bench]'``).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "write_png needs matplotlib; install it with: pip install 'pipeopt[bench]'"
            ) from exc
        series = ["sequential", "pipeopt", *self.peers]
        names = [w.workload for w in self.workloads]
        # Workloads differ by orders of magnitude: show each against its own sequential time.
        fig = Figure(figsize=(max(6.0, 1.8 * len(names) + 3.0), 4.8), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        width = 0.8 / len(series)
        for k, label in enumerate(series):
            heights: list[float] = []
            for w in self.workloads:
                if label == "sequential":
                    value = w.sequential_s
                elif label == "pipeopt":
                    value = w.optimized_s
                else:
                    value = w.peers[label].median_s if label in w.peers else math.nan
                heights.append(value / w.sequential_s * 100.0 if w.sequential_s else math.nan)
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, heights, width, label=label)
            if label == "pipeopt":
                captions = [f"{w.speedup:.1f}×" for w in self.workloads]
                ax.bar_label(bars, labels=captions, padding=2, fontsize=8)
        ax.set_xticks(
            range(len(names)),
            [
                f"{n}\n({w.sequential_s:.2f} s seq)"
                for n, w in zip(names, self.workloads, strict=True)
            ],
        )
        ax.set_ylabel("median wall time, % of sequential")
        workers = sorted({w.workers for w in self.workloads})
        ax.set_title(
            f"pipeopt benchmarks: {', '.join(map(str, workers))} workers, "
            f"{self.cpu_count} CPUs (lower is better; label = speedup)"
        )
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        target = Path(path)
        fig.savefig(target, format="png")
        return target

    def check(self, baseline: BenchmarkReport, tolerance: float = 0.15) -> list[Regression]:
        """Return the ratios that regressed against ``baseline`` (see :func:`check_regressions`)."""
        return check_regressions(self, baseline, tolerance)


def check_regressions(
    current: BenchmarkReport, baseline: BenchmarkReport, tolerance: float = 0.15
) -> list[Regression]:
    """Return the ratios of ``current`` that are worse than ``baseline`` beyond ``tolerance``.

    Only workloads present in both are compared, and only ratios measured
    within one run (never absolute times): ``speedup`` and peer ratios
    regress when they fall below ``baseline * (1 - tolerance)``;
    ``makespan_over_bound`` regresses when it rises above
    ``baseline * (1 + tolerance)``. A peer missing from either run is skipped.

    Raises:
        ValueError: ``tolerance`` is not in [0, 1).
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be >= 0 and < 1, got {tolerance!r}")
    found: list[Regression] = []
    before = {w.workload: w for w in baseline.workloads}
    for now in current.workloads:
        old = before.get(now.workload)
        if old is None:
            continue
        pairs: list[tuple[str, float | None, float | None, bool]] = [
            ("speedup", old.speedup, now.speedup, True),
            ("makespan_over_bound", old.makespan_over_bound, now.makespan_over_bound, False),
        ]
        for peer in now.peers:
            if peer in old.peers:
                pairs.append((f"ratio vs {peer}", old.peer_ratio(peer), now.peer_ratio(peer), True))
        for metric, was, is_, higher in pairs:
            if was is None or is_ is None or not math.isfinite(was) or not math.isfinite(is_):
                continue
            worse = is_ < was * (1.0 - tolerance) if higher else is_ > was * (1.0 + tolerance)
            if worse:
                found.append(Regression(now.workload, metric, was, is_, higher))
    return found


def _median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _round(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


__all__ = [
    "DEFAULT_JSON",
    "SCHEMA_VERSION",
    "BenchmarkReport",
    "PeerResult",
    "Regression",
    "WorkloadResult",
    "check_regressions",
]
