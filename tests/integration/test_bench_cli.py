"""``pipeopt bench`` in a subprocess: the files it writes, ``--check``, clean errors.

Every run is ``--quick`` at a small ``--scale``, so each takes a few seconds.
Nothing asserts on how fast a run was: the ``--check`` that must pass runs
with a wide tolerance, and the one that must fail checks against a baseline
doctored far beyond any timing noise.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = [sys.executable, "-m", "pipeopt.cli", "bench"]
TINY = ["--quick", "--scale", "0.05", "--workers", "4"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _bench(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run every workload once, tiny, with a threadpool peer and a chart; return the JSON."""
    folder = tmp_path_factory.mktemp("bench")
    argv = [*TINY, "--compare", "threadpool", *(["--png", "bench.png"] if HAS_MATPLOTLIB else [])]
    done = _bench(*argv, cwd=folder)
    assert done.returncode == 0, done.stderr
    report = folder / "pipeline_optimizer_benchmarks.json"
    return folder, json.loads(report.read_text(encoding="utf-8"))


def test_the_report_holds_every_workload_with_the_documented_fields(
    first_run: tuple[Path, dict[str, Any]],
) -> None:
    _, data = first_run
    assert data["schema_version"] == 1
    assert data["peers"] == ["threadpool"]
    assert data["settings"] == {"workers": 4, "repetitions": 1, "seed": 0, "scale": 0.05}
    assert {"python", "pipeopt"} <= set(data["versions"])
    assert isinstance(data["cpu_count"], int)
    assert data["timestamp"].endswith("+00:00")
    by_name = {w["workload"]: w for w in data["workloads"]}
    assert list(by_name) == ["io", "cpu", "mixed", "batching"]
    for entry in by_name.values():
        assert entry["workers"] == 4
        assert entry["executor"] in ("thread", "process")
        assert len(entry["repetitions"]["sequential"]) == 1
        assert len(entry["repetitions"]["optimized"]) == 1
        assert entry["sequential_s"] > 0
        assert entry["optimized_s"] > 0
        seq, opt = entry["sequential_s"], entry["optimized_s"]
        assert entry["improvement_pct"] == pytest.approx((1 - opt / seq) * 100, abs=0.01)
        assert entry["speedup"] == pytest.approx(seq / opt, rel=1e-3)
        assert set(entry["peers"]) == {"threadpool"}
    assert by_name["io"]["makespan_over_bound"] > 0
    assert by_name["batching"]["lower_bound_s"] is None


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed: pipeopt[bench]")
def test_the_chart_is_a_png_of_some_size(first_run: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = first_run
    data = (folder / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_check_passes_against_its_own_output(first_run: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = first_run
    done = _bench(
        *TINY,
        "--workload",
        "io",
        "--check",
        "pipeline_optimizer_benchmarks.json",
        "--tolerance",
        "0.9",  # a loaded test machine may double a tiny run's ratios; a regression is 10x
        "--out",
        "again.json",
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    assert "no ratio regressed" in done.stdout


def test_check_fails_on_a_doctored_baseline(first_run: tuple[Path, dict[str, Any]]) -> None:
    folder, data = first_run
    for entry in data["workloads"]:
        entry["repetitions"]["sequential"] = [t * 1000 for t in entry["repetitions"]["sequential"]]
    (folder / "doctored.json").write_text(json.dumps(data), encoding="utf-8")
    done = _bench(
        *TINY, "--workload", "io", "--check", "doctored.json", "--out", "third.json", cwd=folder
    )
    assert done.returncode == 1, done.stderr
    assert "regression(s) against doctored.json" in done.stderr
    assert "io: speedup fell from" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "nope"], "unknown workload 'nope'"),
        (
            ["--workers", "many"],
            "argument --workers: must be an integer from 2 to 10000, got 'many'",
        ),
        (["--compare", "spark"], "--compare: unknown peer 'spark'"),
        (["--check", "missing.json"], "--check: cannot read missing.json"),
        (["--tolerance", "-1"], "--tolerance must be >= 0 and < 1"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_usage_exits_2_with_one_clear_line(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    done = _bench(*argv, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("pipeopt bench: ")
    assert message in done.stderr
    assert not (tmp_path / "pipeline_optimizer_benchmarks.json").exists()


def test_a_non_report_baseline_is_bad_usage(tmp_path: Path) -> None:
    (tmp_path / "base.json").write_text('{"workloads": 3}', encoding="utf-8")
    done = _bench("--check", "base.json", cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr.strip() == "pipeopt bench: --check: not a benchmark report: no 'workloads' list"
    )


def test_the_main_command_offers_bench(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeopt.cli", "bench", "--workload", "nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "unknown workload 'nope'" in done.stderr
