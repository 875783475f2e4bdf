"""Ctrl-C and SIGTERM during a real ``pipeopt run``: clean stop, every state recorded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PIPELINE = """
import threading
from pathlib import Path
from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("slow")
started = Path(__file__).with_name("started")
never = threading.Event()

def quick():
    return 1

def hang():
    started.touch()
    never.wait(600)  # a body that ignores cancellation: the run must not wait for it

pipeline.add(PipelineTask("quick", quick, criticality="blocker"))
pipeline.add(PipelineTask("hang", hang, dependencies=["quick"], criticality="critical"))
for n in range(20):
    pipeline.add(PipelineTask(f"later-{n}", quick, dependencies=["hang"]))
pipeline.add(PipelineTask("side", hang, criticality="deferred"))
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_run_and_records_every_state(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    (tmp_path / "slow.py").write_text(textwrap.dedent(PIPELINE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeopt.cli", "run", "slow.py", "--workers", "2", "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started its tasks"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)  # hanging daemon threads must not keep it alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert result["interrupted"] is True
    states = {name: task["state"] for name, task in result["tasks"].items()}
    assert len(states) == 23
    assert states["quick"] == "succeeded"
    assert states["hang"] == "cancelled"
    assert all(states[f"later-{n}"] == "cancelled" for n in range(20))
    assert "Traceback" not in err
