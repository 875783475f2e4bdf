"""Ctrl-C and SIGTERM during a real ``pipeopt run``: clean stop, every state recorded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from cli_process import run_pipeopt

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


RESUMABLE = """
import time
import urllib.request
from pathlib import Path
from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("resumable")
here = Path(__file__).parent

def quick():
    return 1

def hang():
    if not (here / "resuming").exists():
        raise RuntimeError("the first run fails here")
    (here / "started").touch()
    while not (here / "gate").exists():
        time.sleep(0.01)
    return 2

pipeline.add(PipelineTask("quick", quick, criticality="blocker"))
pipeline.add(PipelineTask("hang", hang, dependencies=["quick"]))
for n in range(5):
    pipeline.add(PipelineTask(f"later-{n}", quick, dependencies=["hang"]))
"""


def pipeopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_pipeopt(*args, cwd=cwd, timeout=60)


def start_resume(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    """Run the pipeline once (it fails), then start `pipeopt resume --last` on it."""
    (tmp_path / "resumable.py").write_text(textwrap.dedent(RESUMABLE))
    first = pipeopt("run", "resumable.py", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    (tmp_path / "resuming").touch()
    return subprocess.Popen(
        [sys.executable, "-m", "pipeopt.cli", "resume", "--last", "--json", *extra],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_a_resume_as_it_stops_a_run(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    proc = start_resume(tmp_path)
    try:
        wait_for(tmp_path / "started", proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert (result["status"], result["interrupted"]) == ("cancelled", True)
    states = {name: task["state"] for name, task in result["tasks"].items()}
    assert states["hang"] == "cancelled"
    assert all(states[f"later-{n}"] == "cancelled" for n in range(5))

    history = pipeopt("history", "--json", cwd=tmp_path)
    assert history.returncode == 0, history.stderr
    resumed, first = json.loads(history.stdout)
    assert resumed["resumed_from"] == first["run_id"]
    assert (resumed["status"], resumed["cancelled"]) == ("cancelled", 6)


def test_resume_serves_the_dashboard(tmp_path: Path) -> None:
    proc = start_resume(tmp_path, "--dashboard", "--no-wait")
    try:
        assert proc.stderr is not None
        # Log records (--log-level INFO by default) may come before the URL line.
        lines = [proc.stderr.readline()]
        while not lines[-1].startswith("dashboard: ") and lines[-1] and len(lines) < 20:
            lines.append(proc.stderr.readline())
        url_line = lines[-1]
        assert url_line.startswith("dashboard: http://127.0.0.1:"), lines
        url = url_line.split()[1]
        wait_for(tmp_path / "started", proc)
        with urllib.request.urlopen(url + "metrics", timeout=10) as response:
            live = json.load(response)
        (tmp_path / "gate").touch()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (live["pipeline"], live["status"]) == ("resumable", "running")
    assert {t["name"]: t["state"] for t in live["tasks"]}["hang"] == "running"
    assert json.loads(out)["status"] == "succeeded"
