"""Ctrl-C and SIGTERM stop a real ``pipeopt run`` on every executor, cleanly.

Each case starts ``python -m pipeopt.cli run`` in a subprocess, waits until
the bodies that ignore cancellation are running (each touches a file when
it starts), sends the real signal and checks the exit code (130 for
SIGINT, 143 for SIGTERM) and that every task's final state is reported.
How fast the process exits is measured by ``benchmarks/stop_latency.py``,
not here. The bodies live in a module beside the run file, on
``PYTHONPATH``, so that worker processes import them like any installed
module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BODIES = """
import threading
from pathlib import Path

never = threading.Event()


def quick():
    return 1


def hang(started):
    Path(started).touch()
    never.wait(600)  # ignores cancellation: the run must not wait for it
"""

PIPELINE = """
import functools
from pathlib import Path

from pipeopt import Pipeline, PipelineTask
from stopbodies import hang, quick

here = Path(__file__).parent
pipeline = Pipeline("slow")
pipeline.add(PipelineTask("quick", quick, criticality="blocker"))
pipeline.add(
    PipelineTask(
        "hang",
        functools.partial(hang, str(here / "started")),
        dependencies=["quick"],
        criticality="critical",
    )
)
for n in range(10):
    pipeline.add(PipelineTask(f"later-{n}", quick, dependencies=["hang"]))
pipeline.add(
    PipelineTask("side", functools.partial(hang, str(here / "side")), criticality="deferred")
)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "executor",
    ["thread", "sync", "process", "async", pytest.param("dask", marks=pytest.mark.dask)],
)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_executor_and_records_every_state(
    tmp_path: Path, executor: str, sig: signal.Signals, code: int
) -> None:
    if executor == "dask":
        pytest.importorskip("distributed")
    (tmp_path / "stopbodies.py").write_text(textwrap.dedent(BODIES))
    (tmp_path / "slow.py").write_text(textwrap.dedent(PIPELINE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    command = [sys.executable, "-m", "pipeopt.cli", "run", "slow.py", "--json"]
    command += ["--workers", "2", "--executor", executor]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Two slots run "side" beside "hang"; the sync executor, one body at a time, never
        # reaches "side".
        running = [tmp_path / "started"] + ([] if executor == "sync" else [tmp_path / "side"])
        deadline = time.monotonic() + 90
        while not all(path.exists() for path in running):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started its tasks"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)  # a guard against a hang, not a speed check
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    result = json.loads(out)
    assert result["status"] == "cancelled"
    assert result["interrupted"] is True
    states = {name: task["state"] for name, task in result["tasks"].items()}
    assert states == {
        "quick": "succeeded",
        "hang": "cancelled",
        "side": "cancelled",
        **{f"later-{n}": "cancelled" for n in range(10)},
    }
    assert "Traceback" not in err
