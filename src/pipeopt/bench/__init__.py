"""Benchmarks that prove the gain: sequential vs optimized runs, and peers.

:class:`BenchmarkSuite` runs named synthetic workloads (``io``, ``cpu``,
``mixed``, ``batching``) and your own pipelines, sequentially
(``max_workers=1``) and optimized (``max_workers>1``), optionally beside
peers (a thread pool loop, dask threaded, dask distributed), and returns a
:class:`BenchmarkReport` that writes ``pipeline_optimizer_benchmarks.json``
and a PNG chart, and checks ratios against a baseline. ``pipeopt bench`` is
its command line (:mod:`pipeopt.cli.bench`).
"""

from pipeopt.bench.report import (
    BenchmarkReport,
    PeerResult,
    Regression,
    WorkloadResult,
    check_regressions,
)
from pipeopt.bench.suite import PEERS, BenchmarkSuite, parse_peers

__all__ = [
    "PEERS",
    "BenchmarkReport",
    "BenchmarkSuite",
    "PeerResult",
    "Regression",
    "WorkloadResult",
    "check_regressions",
    "parse_peers",
]
