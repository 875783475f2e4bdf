"""A run killed with SIGKILL halfway, then resumed through the API and the command line.

The pipeline has ten ``extract`` tasks, ten ``load`` tasks that each need two
extracts, and a ``report`` that needs every load. Each task appends its name
to a ledger file when it does its work; the loads first wait for a gate
file. So "halfway" is a state, not a time: the ten extracts are in the ledger
and recorded in the store, and every load is blocked before its side effect.
After the kill the gate opens and the run is resumed: every task must be in
the ledger exactly once, and the outputs must equal those of a run that was
never interrupted.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeopt import PipelineOptimizer
from pipeopt.cli import load_pipeline
from pipeopt.store import RunStore

LEDGER_PIPELINE = """
import hashlib
import os
import time
from pathlib import Path

from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("ledger")
EXTRACTS = [f"extract_{i:02d}" for i in range(10)]
LOADS = [f"load_{i:02d}" for i in range(10)]


def side_effect(name):
    with open(os.environ["LEDGER"], "a") as ledger:
        ledger.write(name + "\\n")


def digest(*parts):
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def extract(name):
    def body():
        side_effect(name)
        return digest(name)

    return body


def load(name):
    def body(**upstream):
        gate = Path(os.environ["GATE"])
        while not gate.exists():
            time.sleep(0.005)
        side_effect(name)
        return digest(name, *(upstream[k] for k in sorted(upstream)))

    return body


for name in EXTRACTS:
    pipeline.add(PipelineTask(name, extract(name), criticality="high"))
for i, name in enumerate(LOADS):
    needs = [EXTRACTS[i], EXTRACTS[(i + 1) % 10]]
    pipeline.add(PipelineTask(name, load(name), needs, criticality="low"))


@pipeline.task(dependencies=LOADS, criticality="low")
def report(**loads):
    out = digest("report", *(loads[k] for k in sorted(loads)))
    Path(os.environ["OUTPUT"]).write_text(out)
    side_effect("report")
    return out
"""

# What `pipeopt run` could do: name the run first and record its file before it starts.
DRIVER = """
import sys
from pipeopt import PipelineOptimizer
from pipeopt.cli import load_pipeline
from pipeopt.optimizer import new_run_id

ref, state = sys.argv[1], sys.argv[2]
optimizer = PipelineOptimizer(max_workers=12, state_dir=state)
run_id = new_run_id()
optimizer.store.set_source(run_id, ref)
optimizer.run(load_pipeline(ref), run_id=run_id)
"""

ALL_TASKS = sorted([f"extract_{i:02d}" for i in range(10)] + [f"load_{i:02d}" for i in range(10)])
ALL_TASKS.append("report")


class Workspace:
    """The files of one scenario: pipeline, ledger, gate, output, state folder."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        self.root.mkdir()
        self.pipeline = root / "ledger_pipeline.py"
        if not self.pipeline.exists():
            self.pipeline.write_text(textwrap.dedent(LEDGER_PIPELINE))
        self.ledger = self.root / "ledger.txt"
        self.gate = self.root / "gate"
        self.output = self.root / "output.txt"
        self.state = self.root / "state"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LEDGER": str(self.ledger),
            "GATE": str(self.gate),
            "OUTPUT": str(self.output),
        }

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for key in ("LEDGER", "GATE", "OUTPUT"):
            monkeypatch.setenv(key, self.env[key])

    def entries(self) -> list[str]:
        if not self.ledger.exists():
            return []
        return self.ledger.read_text().split()


def results_digest(results: dict[str, object]) -> str:
    return hashlib.sha256(repr(sorted(results.items())).encode()).hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Return (results digest, output file) of an uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    space = Workspace(root, "plain")
    space.gate.touch()
    with pytest.MonkeyPatch.context() as monkeypatch:
        space.use(monkeypatch)
        result = PipelineOptimizer(max_workers=12).run(load_pipeline(str(space.pipeline)))
    assert result.ok
    assert sorted(space.entries()) == ALL_TASKS
    return results_digest(result.results), space.output.read_text()


def kill_halfway(space: Workspace, argv: list[str]) -> None:
    """Start ``argv``, wait until the extracts are done and recorded, then SIGKILL it."""
    proc = subprocess.Popen(
        argv, env=space.env, cwd=space.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()
            if len(space.entries()) >= 10 and recorded_successes(space.state) >= 10:
                break
            assert time.monotonic() < deadline, "the run never got halfway"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(space.entries()) == ALL_TASKS[:10]  # the extracts, and nothing else


def recorded_successes(state: Path) -> int:
    if not (state / "runs.sqlite").exists():
        return 0
    with RunStore(state) as store:
        runs = store.list_runs(1)
    return runs[0].succeeded if runs else 0


def check_resumed(space: Workspace, reference: tuple[str, str]) -> None:
    counts = collections.Counter(space.entries())
    assert sorted(counts) == ALL_TASKS
    assert set(counts.values()) == {1}, counts  # nothing that had finished ran again
    assert space.output.read_text() == reference[1]


def pipeopt(space: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeopt.cli", *args, "--state-dir", str(space.state)],
        env=space.env,
        cwd=space.root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_killed_run_resumes_through_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[str, str]
) -> None:
    space = Workspace(tmp_path, "api")
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    kill_halfway(space, [sys.executable, str(driver), str(space.pipeline), str(space.state)])

    with RunStore(space.state) as store:
        [crashed] = store.list_runs()
        assert crashed.status == "crashed"
        assert crashed.succeeded == 10
        assert crashed.source == str(space.pipeline)
        states = {t.name: t.state for t in store.show_run(crashed.run_id).tasks}
        assert {states[name] for name in ALL_TASKS[:10]} == {"succeeded"}
        assert {states[name] for name in ALL_TASKS[10:]} == {"pending"}

    space.gate.touch()
    space.use(monkeypatch)
    optimizer = PipelineOptimizer(max_workers=12, state_dir=space.state)
    result = optimizer.resume(load_pipeline(str(space.pipeline)))
    assert result.ok
    assert results_digest(result.results) == reference[0]
    check_resumed(space, reference)
    assert optimizer.store is not None
    runs = optimizer.store.list_runs()
    assert [(r.status, r.resumed_from) for r in runs] == [
        ("succeeded", crashed.run_id),
        ("crashed", None),
    ]
    optimizer.store.close()

    # The command line finds the file through the run the resumed one came from.
    done = pipeopt(space, "resume", "--last")
    assert done.returncode == 0, done.stderr
    check_resumed(space, reference)  # everything was done: nothing ran again


def test_a_killed_run_resumes_from_the_command_line(
    tmp_path: Path, reference: tuple[str, str]
) -> None:
    space = Workspace(tmp_path, "cli")
    run = [sys.executable, "-m", "pipeopt.cli", "run", str(space.pipeline)]
    kill_halfway(space, [*run, "--workers", "12", "--state-dir", str(space.state)])

    history = pipeopt(space, "history")
    assert history.returncode == 0, history.stderr
    assert "crashed" in history.stdout

    space.gate.touch()
    resumed = pipeopt(space, "resume", "--last", "--file", str(space.pipeline), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert '"status": "succeeded"' in resumed.stdout
    check_resumed(space, reference)

    with RunStore(space.state) as store:
        runs = store.list_runs()
    assert [r.status for r in runs] == ["succeeded", "crashed"]
    assert runs[0].resumed_from == runs[1].run_id
    assert (runs[0].succeeded, runs[0].tasks) == (21, 21)

    shown = pipeopt(space, "show", runs[0].run_id[:-1])
    assert shown.returncode == 0, shown.stderr
    assert "resumed" in shown.stdout  # the extracts came from the killed run
    assert "report" in shown.stdout


CHANGING = """
from pipeopt import Pipeline

pipeline = Pipeline("changing")

@pipeline.task
def extract():
    return [1, 2, 3]

@pipeline.task(dependencies=[extract])
def load(extract):
    raise RuntimeError("the warehouse is down")
"""

CHANGED = """
from pipeopt import Pipeline

pipeline = Pipeline("changing")

@pipeline.task
def extract():
    return [1, 2, 3]

@pipeline.task
def audit():
    return "ok"

@pipeline.task(dependencies=[extract, audit], criticality="critical")
def load(extract, audit):
    return sum(extract)
"""


def test_the_command_line_refuses_a_changed_pipeline_unless_forced(tmp_path: Path) -> None:
    space = Workspace(tmp_path, "changed")
    first_file = space.root / "v1.py"
    first_file.write_text(textwrap.dedent(CHANGING))
    second_file = space.root / "v2.py"
    second_file.write_text(textwrap.dedent(CHANGED))
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeopt.cli",
            "run",
            str(first_file),
            "--state-dir",
            str(space.state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1, failed.stderr

    refused = pipeopt(space, "resume", "--file", str(second_file))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "task 'audit' added" in lines[0]
    assert "task 'load' dependencies changed: [extract] -> [audit, extract]" in lines[0]
    assert "task 'load' criticality changed: medium -> critical" in lines[0]
    assert "--force" in lines[0]

    forced = pipeopt(space, "resume", "--file", str(second_file), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "succeeded" in forced.stdout


def test_store_commands_fail_with_one_line(tmp_path: Path) -> None:
    space = Workspace(tmp_path, "errors")
    space.state.mkdir()
    for args in (("history",), ("show", "last"), ("resume", "--last")):
        empty = pipeopt(space, *args)
        assert empty.returncode == 2, args
        assert empty.stderr.count("\n") == 1, empty.stderr
        assert "no run store in" in empty.stderr
    assert list(space.state.iterdir()) == []  # reading never creates the store

    RunStore(space.state).close()
    unknown = pipeopt(space, "show", "20990101-000000-000000")
    assert unknown.returncode == 2
    assert unknown.stderr.count("\n") == 1
    assert "pipeopt history" in unknown.stderr

    nothing = pipeopt(space, "resume", "--last")
    assert nothing.returncode == 2
    assert "no runs are recorded" in nothing.stderr

    both = pipeopt(space, "resume", "abc", "--last")
    assert both.returncode == 2
    assert "not both" in both.stderr

    store_file = space.state / "runs.sqlite"
    store_file.write_bytes(b"these are not the runs you are looking for" * 10)
    before = store_file.read_bytes()
    for args in (("history",), ("show", "last"), ("resume", "--last")):
        broken = pipeopt(space, *args)
        assert broken.returncode == 2, args
        assert broken.stderr.count("\n") == 1, broken.stderr
        assert "Traceback" not in broken.stderr
        assert "not a usable run store" in broken.stderr
    assert store_file.read_bytes() == before


# -- one resume of a run at a time ---------------------------------------------------


def start_resume(space: Workspace, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeopt.cli",
            "resume",
            run_id,
            "--file",
            str(space.pipeline),
            "--state-dir",
            str(space.state),
        ],
        env=space.env,
        cwd=space.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def crashed_run(space: Workspace) -> str:
    run = [sys.executable, "-m", "pipeopt.cli", "run", str(space.pipeline)]
    kill_halfway(space, [*run, "--workers", "12", "--state-dir", str(space.state)])
    with RunStore(space.state, read_only=True) as store:
        return store.resolve_run(None)


def first_to_exit(procs: list[subprocess.Popen[str]], timeout: float) -> subprocess.Popen[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                return proc
        time.sleep(0.02)
    raise AssertionError("neither resume ended while the other held the run")


def lock_holders(state: Path) -> list[int]:
    import sqlite3

    conn = sqlite3.connect(state / "runs.sqlite")
    try:
        return [int(row[0]) for row in conn.execute("SELECT pid FROM run_locks")]
    finally:
        conn.close()


def test_two_resumes_of_one_run_started_at_once_run_it_once(
    tmp_path: Path, reference: tuple[str, str]
) -> None:
    space = Workspace(tmp_path, "race")
    crashed = crashed_run(space)
    # The gate stays shut: whichever resume holds the run blocks in its loads.
    racers = [start_resume(space, crashed), start_resume(space, crashed)]
    try:
        loser = first_to_exit(racers, timeout=30)
        _out, err = loser.communicate()
        assert loser.returncode == 2, err
        assert err.count("\n") == 1, err
        assert "is being resumed by another process" in err
        [winner] = [p for p in racers if p is not loser]
        assert winner.poll() is None
        assert lock_holders(space.state) == [winner.pid]
        space.gate.touch()
        _out, err = winner.communicate(timeout=60)
        assert winner.returncode == 0, err
    finally:
        for proc in racers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    check_resumed(space, reference)  # every task once: the loser ran nothing
    assert lock_holders(space.state) == []


def test_the_lock_of_a_killed_resume_is_taken_over(
    tmp_path: Path, reference: tuple[str, str]
) -> None:
    space = Workspace(tmp_path, "stale")
    crashed = crashed_run(space)
    holder = start_resume(space, crashed)
    try:
        deadline = time.monotonic() + 30
        while not (space.state / "runs.sqlite").exists() or not lock_holders(space.state):
            assert holder.poll() is None, holder.communicate()[1]
            assert time.monotonic() < deadline, "the first resume never locked the run"
            time.sleep(0.02)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)
    assert lock_holders(space.state) == [holder.pid]  # left behind by kill -9

    space.gate.touch()
    again = start_resume(space, crashed)
    _out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    check_resumed(space, reference)
    assert lock_holders(space.state) == []
