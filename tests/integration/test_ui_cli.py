"""``pipeopt ui`` as a real command over a real run store, and ``run --push-gateway``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from cli_process import run_pipeopt

pytest.importorskip("aiohttp", reason="pipeopt ui needs aiohttp: pipeopt[dashboard]")

PIPELINE = textwrap.dedent(
    """
    from pipeopt import Pipeline

    pipeline = Pipeline("ui-cli")

    @pipeline.task
    def extract():
        return 1

    @pipeline.task(dependencies=["extract"])
    def load(extract):
        raise ValueError("refused")
    """
)


pipeopt = run_pipeopt


def test_ui_serves_the_runs_of_a_store_until_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "etl.py").write_text(PIPELINE)
    state = tmp_path / "state"
    ran = pipeopt("run", "etl.py", "--state-dir", str(state), cwd=tmp_path)
    assert ran.returncode == 1, ran.stderr
    argv = [sys.executable, "-m", "pipeopt.cli", "ui", "--state-dir", str(state), "--port", "0"]
    with subprocess.Popen(argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True) as ui:
        try:
            assert ui.stderr is not None
            line = ui.stderr.readline()
            found = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            assert found, line
            with urllib.request.urlopen(found.group(1) + "api/runs", timeout=10) as response:
                runs = json.loads(response.read())["runs"]
            assert [(r["pipeline"], r["status"]) for r in runs] == [("ui-cli", "failed")]
            with urllib.request.urlopen(found.group(1), timeout=10) as response:
                assert b"runs.js" in response.read()
        finally:
            ui.send_signal(signal.SIGINT)
            code = ui.wait(30)
    assert code == 0


def test_ui_refuses_a_missing_store_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = pipeopt("ui", "--state-dir", str(missing), cwd=tmp_path)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert not missing.exists()


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://h:99999"])
def test_run_refuses_a_bad_push_gateway_in_one_line(tmp_path: Path, bad: str) -> None:
    (tmp_path / "etl.py").write_text(PIPELINE)
    done = pipeopt("run", "etl.py", "--no-state", "--push-gateway", bad, cwd=tmp_path)
    assert done.returncode == 2
    assert "push_gateway" in done.stderr or "push-gateway" in done.stderr
    assert "Traceback" not in done.stderr
