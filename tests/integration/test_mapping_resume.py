"""A run killed with SIGKILL in the middle of a mapped task, resumed from the command line.

``list_files`` returns 40 names; ``process`` is mapped over them. Each item
appends its name to a ledger when it does its work; items 20 and up first
wait for a gate file. "Mid-map" is therefore a state: 20 items are done and
committed, 20 are blocked before their side effect. After the kill the gate
opens and ``pipeopt resume --last`` runs again: the items the store had
recorded as succeeded must not run again, every other item must run exactly
once, and the dependent ``report`` must see all 40 results in input order.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeopt.store import RunStore

MAPPED_PIPELINE = """
import os
import time
from pathlib import Path

from pipeopt import Pipeline

pipeline = Pipeline("mapped")


@pipeline.task
def list_files():
    return [f"file{k:02d}.csv" for k in range(40)]


@pipeline.task(map_over=list_files)
def process(list_files):
    if int(list_files[4:6]) >= 20:
        gate = Path(os.environ["GATE"])
        while not gate.exists():
            time.sleep(0.005)
    with open(os.environ["LEDGER"], "a") as ledger:
        ledger.write(list_files + "\\n")
    return list_files.upper()


@pipeline.task(dependencies=[process])
def report(process):
    Path(os.environ["OUTPUT"]).write_text(",".join(process))
    return len(process)
"""

FILES = [f"file{k:02d}.csv" for k in range(40)]


def _pipeopt() -> str:
    return str(Path(sys.executable).parent / "pipeopt")


def _committed_successes(state: Path) -> int:
    db = state / "runs.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            (count,) = conn.execute("SELECT COALESCE(SUM(succeeded), 0) FROM batches").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(count)


def test_a_run_killed_mid_map_resumes_only_the_unfinished_items(tmp_path: Path) -> None:
    pipeline = tmp_path / "mapped_pipeline.py"
    pipeline.write_text(textwrap.dedent(MAPPED_PIPELINE))
    ledger, gate, output, state = (
        tmp_path / "ledger.txt",
        tmp_path / "gate",
        tmp_path / "out.txt",
        tmp_path / "state",
    )
    env = {**os.environ, "LEDGER": str(ledger), "GATE": str(gate), "OUTPUT": str(output)}

    def entries() -> list[str]:
        return ledger.read_text().split() if ledger.exists() else []

    argv = [_pipeopt(), "run", str(pipeline), "--workers", "24", "--state-dir", str(state)]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        # The source and 20 items are done and committed; 20 items block at the gate.
        while len(entries()) < 20 or _committed_successes(state) < 21:
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the run never got to the middle of the map"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    first = entries()
    assert sorted(first) == FILES[:20]

    with RunStore(state) as store:
        [crashed] = store.list_runs()
        assert crashed.status == "crashed"
        names = {f"process[{k}]" for k in range(40)}
        recorded = set(store.load_results(crashed.run_id, names=names))
        shown = {t.name: t.state for t in store.show_run(crashed.run_id).tasks}
    assert recorded == {f"process[{k}]" for k in range(20)}
    assert [n for n in shown if n.startswith("process")] == [
        "process",
        *(f"process[{k}]" for k in range(20)),
    ]
    assert {shown[f"process[{k}]"] for k in range(20)} == {"succeeded"}

    gate.touch()
    resumed = subprocess.run(
        [_pipeopt(), "resume", "--last", "--json", "--state-dir", str(state)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["status"] == "succeeded"
    counts = collections.Counter(entries())
    assert sorted(counts) == FILES
    assert set(counts.values()) == {1}, counts  # no item that finished ran again
    assert output.read_text() == ",".join(f.upper() for f in FILES)
    tasks = report["tasks"]
    assert tasks["process[3]"]["attempts"] == 0  # reused from the killed run
    assert tasks["process[33]"]["attempts"] == 1
