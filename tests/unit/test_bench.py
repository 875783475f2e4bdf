"""BenchmarkSuite, its workloads, peers, report, regression check and CLI parsing.

No assertion here depends on how fast anything ran: times are only checked
for being recorded, and ratios are checked on hand-made reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.bench import (
    BenchmarkReport,
    BenchmarkSuite,
    PeerResult,
    WorkloadResult,
    check_regressions,
    parse_peers,
)
from pipeopt.bench.suite import critical_path, dask_graph, peer_tasks, run_threadpool
from pipeopt.bench.workloads import BUILTIN_WORKLOADS, batching_workload, io_workload
from pipeopt.cli import bench as bench_cli
from pipeopt.cli import build_parser, main

WORKLOAD_KEYS = {
    "workload",
    "description",
    "tasks",
    "sequential_s",
    "optimized_s",
    "improvement_pct",
    "speedup",
    "total_work_s",
    "critical_path_s",
    "lower_bound_s",
    "makespan_over_bound",
    "repetitions",
    "workers",
    "executor",
    "peers",
}
TOP_KEYS = {
    "schema_version",
    "timestamp",
    "cpu_count",
    "versions",
    "peers",
    "settings",
    "load_average",
    "workloads",
}


def _shape(pipeline: Pipeline) -> list[tuple[str, tuple[str, ...], float | None, str]]:
    return [(t.name, t.dependency_names, t.expected_duration, t.level.label) for t in pipeline]


def _result(**changes: Any) -> WorkloadResult:
    base = WorkloadResult(
        workload="io",
        description="test",
        tasks=10,
        workers=8,
        executor="thread",
        sequential=(2.0, 2.2, 2.1),
        optimized=(0.3, 0.25, 0.28),
        total_work_s=2.0,
        critical_path_s=0.1,
        lower_bound_s=0.25,
        peers={"threadpool": PeerResult("threadpool", (0.4, 0.42, 0.41))},
    )
    return dataclasses.replace(base, **changes)


def _report(*results: WorkloadResult) -> BenchmarkReport:
    return BenchmarkReport(
        workloads=results or (_result(),),
        timestamp="2026-01-01T00:00:00+00:00",
        cpu_count=8,
        versions={"python": "3.11", "pipeopt": "0.1.0"},
        peers=("threadpool",),
        settings={"workers": 8, "repetitions": 3, "seed": 0, "scale": 1.0},
        load_average=(0.5, 0.4, 0.3),
    )


# -- workloads -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_WORKLOADS))
def test_builtin_workloads_are_deterministic_and_valid(name: str, tmp_path: Path) -> None:
    factory = BUILTIN_WORKLOADS[name].factory
    first, again = factory(7, 0.5, tmp_path), factory(7, 0.5, tmp_path)
    assert _shape(first) == _shape(again)
    first.validate()
    assert len(first) > 5


def test_seed_changes_the_costs_and_scale_the_size(tmp_path: Path) -> None:
    assert _shape(io_workload(1, 1.0, tmp_path)) != _shape(io_workload(2, 1.0, tmp_path))
    assert len(io_workload(1, 0.25, tmp_path)) < len(io_workload(1, 1.0, tmp_path))


def test_io_workload_has_hints_mixed_criticality_and_fan_in(tmp_path: Path) -> None:
    pipeline = io_workload(0, 1.0, tmp_path)
    assert all(t.expected_duration is not None for t in pipeline)
    assert {t.level.label for t in pipeline} >= {"blocker", "high", "low", "deferred"}
    assert max(len(t.dependency_names) for t in pipeline) >= 10


def test_batching_workload_writes_every_row_once_through_the_context(tmp_path: Path) -> None:
    pipeline = batching_workload(3, 0.05, tmp_path)
    result = PipelineOptimizer(max_workers=4).run(pipeline)
    result.raise_for_status()
    expected = result.results["verify"]
    with sqlite3.connect(tmp_path / "bench_batching.sqlite") as conn:
        rows = conn.execute("SELECT COUNT(DISTINCT id), COUNT(*) FROM events").fetchone()
    conn.close()
    assert rows == (expected, expected)
    assert sum(result.results[f"write_{p}"] for p in range(12)) == expected


# -- peers -----------------------------------------------------------------------


def _injection_pipeline() -> Pipeline:
    pipeline = Pipeline("injection")

    @pipeline.task
    def source() -> int:
        return 2

    @pipeline.task
    def other() -> int:
        return 5

    @pipeline.task(dependencies=[source, other])
    def named(source: int, context: Any) -> tuple[int, str]:
        return source * 10, context.task

    @pipeline.task(dependencies=[named, other])
    def rest(**upstream: Any) -> int:
        return upstream["named"][0] + upstream["other"]

    @pipeline.task(dependencies=[rest])
    def stream(rest: int) -> Any:
        yield rest
        yield rest + 1

    return pipeline


def test_peers_run_the_same_bodies_with_the_same_arguments() -> None:
    expected = PipelineOptimizer(max_workers=2).run(_injection_pipeline()).results
    assert expected["stream"] == [25, 26]
    tasks = peer_tasks(_injection_pipeline())
    assert run_threadpool(tasks, 3) == expected
    if importlib.util.find_spec("dask") is not None:
        import dask.threaded

        graph = dask_graph(tasks)
        values = dask.threaded.get(graph, list(graph), num_workers=3)
        assert dict(zip(graph, values, strict=True)) == expected


def test_parse_peers_expands_dask_and_rejects_unknown_names() -> None:
    assert parse_peers("threadpool, dask-threaded") == ("threadpool", "dask-threaded")
    assert parse_peers("") == ()
    chosen = parse_peers("dask,threadpool")
    assert chosen[0] == "dask-threaded"
    assert chosen[-1] == "threadpool"
    with pytest.raises(ValueError, match="unknown peer 'spark'"):
        parse_peers("threadpool,spark")


def test_critical_path_follows_the_longest_chain() -> None:
    pipeline = Pipeline("path")
    pipeline.add(PipelineTask("a", print))
    pipeline.add(PipelineTask("b", print, dependencies=["a"]))
    pipeline.add(PipelineTask("c", print, dependencies=["a"]))
    pipeline.add(PipelineTask("d", print, dependencies=["b", "c"]))
    assert critical_path(pipeline.compile(), [1.0, 5.0, 2.0, 1.0]) == 7.0


# -- the suite -------------------------------------------------------------------


def _tiny() -> Pipeline:
    pipeline = Pipeline("tiny")
    pipeline.add(PipelineTask("a", lambda: 1))
    for k in range(4):
        pipeline.add(PipelineTask(f"b{k}", lambda a: a + 1, dependencies=["a"]))
    pipeline.add(PipelineTask("c", lambda **up: sum(up.values()), dependencies=["b0", "b1"]))
    return pipeline


def test_suite_runs_a_user_pipeline_and_reports_every_field() -> None:
    suite = BenchmarkSuite(workers=4, repetitions=2, peers=["threadpool"])
    suite.add("tiny", _tiny, description="six tasks")
    assert suite.workloads[-1] == "tiny"
    steps: list[tuple[int, int, str]] = []
    report = suite.run(["tiny"], progress=lambda *step: steps.append(step))
    assert steps[-1] == (6, 6, "done")  # 2 repetitions x (sequential, optimized, threadpool)
    result = report["tiny"]
    assert result.tasks == 6
    assert len(result.sequential) == len(result.optimized) == 2
    assert len(result.peers["threadpool"].repetitions) == 2
    assert result.lower_bound_s is not None
    assert result.lower_bound_s >= (result.critical_path_s or 0.0)
    data = report.to_dict()
    assert set(data) == TOP_KEYS
    assert set(data["workloads"][0]) == WORKLOAD_KEYS
    assert data["peers"] == ["threadpool"]
    assert data["cpu_count"] >= 1
    assert data["versions"]["pipeopt"]


def test_suite_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers must be an integer >= 2"):
        BenchmarkSuite(workers=1)
    with pytest.raises(ValueError, match="repetitions"):
        BenchmarkSuite(repetitions=0)
    with pytest.raises(ValueError, match="unknown peer"):
        BenchmarkSuite(peers="nope")
    suite = BenchmarkSuite()
    with pytest.raises(KeyError, match="unknown workload 'nope'"):
        suite.run(["nope"])
    with pytest.raises(TypeError, match="callable"):
        suite.add("x", 3)  # type: ignore[arg-type]


def test_a_failing_workload_is_reported_not_timed() -> None:
    def broken() -> Pipeline:
        pipeline = Pipeline("broken")
        pipeline.add(PipelineTask("boom", lambda: 1 / 0))
        return pipeline

    suite = BenchmarkSuite(repetitions=1)
    suite.add("broken", broken)
    with pytest.raises(RuntimeError, match="task 'boom' failed with ZeroDivisionError"):
        suite.run(["broken"])


# -- the report ------------------------------------------------------------------


def test_derived_figures_follow_their_definitions() -> None:
    result = _result()
    assert result.sequential_s == 2.1
    assert result.optimized_s == 0.28
    assert result.speedup == pytest.approx(2.1 / 0.28)
    assert result.improvement_pct == pytest.approx((1 - 0.28 / 2.1) * 100)
    assert result.makespan_over_bound == pytest.approx(0.28 / 0.25)
    assert result.peer_ratio("threadpool") == pytest.approx(0.41 / 0.28)
    assert _result(lower_bound_s=None).makespan_over_bound is None


def test_json_has_the_documented_schema_and_round_trips(tmp_path: Path) -> None:
    report = _report(_result(), _result(workload="batching", lower_bound_s=None))
    path = report.write_json(tmp_path / "pipeline_optimizer_benchmarks.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == TOP_KEYS
    io, batching = data["workloads"]
    assert set(io) == WORKLOAD_KEYS
    assert io["repetitions"] == {"sequential": [2.0, 2.2, 2.1], "optimized": [0.3, 0.25, 0.28]}
    assert io["improvement_pct"] == pytest.approx(86.67, abs=0.01)
    assert io["peers"]["threadpool"]["median_s"] == 0.41
    assert batching["lower_bound_s"] is None
    assert batching["makespan_over_bound"] is None
    again = BenchmarkReport.read_json(path)
    assert again.to_dict() == report.to_dict()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"workloads": "no"}, "no 'workloads' list"),
        ({"schema_version": 99, "workloads": []}, "schema_version must be 1"),
        ({"workloads": [{"workload": "io"}]}, "not a benchmark workload entry"),
    ],
)
def test_reading_a_non_report_says_why(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchmarkReport.from_dict(document)


def test_png_is_a_real_png_of_some_size(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = _report(_result(), _result(workload="cpu", executor="process", peers={}))
    path = report.write_png(tmp_path / "bench.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


# -- the regression check -----------------------------------------------------------


def test_a_report_never_regresses_against_itself() -> None:
    report = _report()
    assert check_regressions(report, report, 0.0) == []
    assert report.check(report) == []


def test_each_ratio_regresses_in_its_own_direction() -> None:
    baseline = _report()
    slower = _report(_result(optimized=(0.6, 0.6, 0.6)))
    found = {r.metric for r in check_regressions(slower, baseline, 0.15)}
    assert found == {"speedup", "makespan_over_bound", "ratio vs threadpool"}
    # Better everywhere is never a regression.
    assert check_regressions(baseline, slower, 0.15) == []
    # Within tolerance: 10% slower with 15% slack.
    slightly = _report(_result(optimized=(0.3, 0.308, 0.3)))
    assert check_regressions(slightly, baseline, 0.15) == []
    assert check_regressions(slightly, baseline, 0.01) != []


def test_absolute_times_alone_never_regress() -> None:
    baseline = _report()
    slow_machine = _report(
        _result(
            sequential=(4.0, 4.4, 4.2),
            optimized=(0.6, 0.5, 0.56),
            lower_bound_s=0.5,
            peers={"threadpool": PeerResult("threadpool", (0.8, 0.84, 0.82))},
        )
    )
    assert check_regressions(slow_machine, baseline, 0.0) == []


def test_check_skips_what_the_baseline_lacks() -> None:
    baseline = _report(_result(workload="other", optimized=(0.01,)))
    assert check_regressions(_report(), baseline, 0.15) == []
    no_peers = _report(_result(peers={}))
    assert check_regressions(_report(_result(optimized=(9.0,))), no_peers, 0.15)[0].metric == (
        "speedup"
    )


def test_regressions_print_as_one_readable_line() -> None:
    (regression, *_) = check_regressions(_report(_result(optimized=(0.6,))), _report(), 0.15)
    assert str(regression) == "io: speedup fell from 7.500 to 3.500"


def test_tolerance_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tolerance must be >= 0 and < 1, got 1\.5"):
        check_regressions(_report(), _report(), 1.5)


# -- the command line, in process -------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_bench_is_registered_with_its_defaults() -> None:
    args = _parse([])
    assert args.func is bench_cli.bench
    assert (args.workers, args.repeat, args.tolerance, args.seed) == (8, None, 0.15, 0)
    assert args.out == "pipeline_optimizer_benchmarks.json"
    args = _parse(["--workload", "io", "cpu", "--workload", "mixed", "--quick"])
    assert args.workloads == ["io", "cpu", "mixed"]
    assert args.quick


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "nope"], "unknown workload 'nope'; choose from io, cpu, mixed, batching"),
        (["--workers", "1"], "argument --workers: must be an integer from 2 to 10000, got 1"),
        (["--repeat", "0"], "argument --repeat: must be an integer from 1 to 1000, got 0"),
        (["--tolerance", "1"], "--tolerance must be >= 0 and < 1, got 1.0"),
        (["--scale", "0"], "--scale must be a number > 0 and <= 100, got 0.0"),
        (["--compare", "spark"], "--compare: unknown peer 'spark'"),
        (["--compare", ","], "--compare needs at least one peer"),
        (["--out", "/no/such/dir/x.json"], "--out: no such directory"),
        (["--check", "/no/such/baseline.json"], "--check: cannot read /no/such/baseline.json"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("pipeopt bench: ")
    assert message in err


def test_a_baseline_without_these_workloads_is_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    baseline = _report(_result(workload="other")).write_json(tmp_path / "base.json")
    assert main(["bench", "--workload", "io", "--check", str(baseline)]) == 2
    assert "has none of the workloads run (io)" in capsys.readouterr().err


def test_the_summary_table_names_every_workload_and_peer() -> None:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(bench_cli.summary_table(_report(_result(), _result(workload="mixed"))))
    text = console.export_text()
    for word in ("io (thread)", "mixed", "threadpool", "7.50×", "1.120", "(1.46)"):
        assert word in text
    assert not math.isnan(_result().speedup)
