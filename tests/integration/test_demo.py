"""The demo and the examples run for real, as a user would start them."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeopt.store import RunStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_loads_nycflights13_into_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "demo.sqlite"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeopt.cli",
            "demo",
            "--database",
            str(database),
            "--workers",
            "2",
            "--no-dashboard",
            "--no-wait",
        ],
        env={**os.environ, "PIPEOPT_STATE_DIR": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded 336,771 flights" in done.stdout
    assert "5 rows dead-lettered" in done.stdout
    conn = sqlite3.connect(database)
    try:
        (flights,) = conn.execute("SELECT COUNT(*) FROM flights").fetchone()
        (rejected,) = conn.execute("SELECT COUNT(*) FROM flights_dead_letter").fetchone()
        (carriers,) = conn.execute("SELECT COUNT(*) FROM carrier_kpis").fetchone()
        (worst,) = conn.execute("SELECT MAX(dep_delay) FROM flights").fetchone()
    finally:
        conn.close()
    assert (flights, rejected) == (336_771, 5)  # every row either loaded or dead-lettered
    assert carriers == 16
    assert worst < 1000
    with RunStore(tmp_path / "state") as store:  # PIPEOPT_STATE_DIR is honoured
        [run] = store.list_runs()
    assert (run.pipeline, run.status, run.succeeded) == ("nycflights13-etl", "succeeded", 12)
    assert not (tmp_path / ".pipeopt").exists()


def test_example_pipeline_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeopt.cli",
            "run",
            str(ROOT / "examples" / "etl.py"),
            "--no-state",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 succeeded" in done.stdout
