"""The Dask executor: cluster ownership, priorities, the install hint, and a real cluster.

The conformance suite (``test_executor_conformance.py``) runs the shared
scheduling semantics against an in-process ``LocalCluster``; this module
covers what is specific to Dask, ending with one test against a real
``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, one of
which is killed mid-run.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, RunResult, RunStatus, TaskState
from pipeopt.executors import create_executor
from pipeopt.retry import RetryPolicy

pytestmark = pytest.mark.dask

distributed = pytest.importorskip("distributed")

HERE = Path(__file__).resolve().parent
DASK = Path(sys.executable).with_name("dask")


# -- bodies (module level: Dask workers import this module by name) ------------


def lineage(context: Any, **upstream: Any) -> list[str]:
    """Return this task's name and every name its upstream results carry."""
    seen = {context.task}
    for value in upstream.values():
        seen.update(value)
    return sorted(seen)


def commit_once(context: Any, ledger: str = "", seconds: float = 0.0, **upstream: Any) -> Any:
    """Do some work, then commit the side effect idempotently, keyed by task name.

    Dask re-runs a task whose worker died, so the body may run twice; the
    marker file, created exclusively, lets only the first run append to the
    ledger. Every run is also noted in ``runs.txt``.
    """
    worker = distributed.get_worker().name
    folder = Path(ledger).parent
    with (folder / "runs.txt").open("a") as runs:
        runs.write(f"{context.task} {worker}\n")
    time.sleep(seconds)
    try:
        fd = os.open(folder / "markers" / context.task, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pass  # a re-run: the side effect is already committed
    else:
        os.close(fd)
        with Path(ledger).open("a") as out:
            out.write(f"{context.task}\n")
    return {"names": lineage(context, **{k: v["names"] for k, v in upstream.items()})}


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A ``Client`` of an in-process ``LocalCluster``, owned by the test, not the executors."""
    with (
        distributed.LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=2,
            dashboard_address=None,
            # Dask serves its HTTP routes even without a dashboard, on port
            # 8787 by default: a free loopback port lets runs go side by side.
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            worker_dashboard_address="127.0.0.1:0",
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as dask_client,
    ):
        yield dask_client


def chain(n: int) -> Pipeline:
    """Return a chain of ``n`` tasks, each carrying its ancestors' names."""
    p = Pipeline("chain")
    for k in range(n):
        p.add(PipelineTask(f"t{k}", lineage, dependencies=[f"t{k - 1}"] if k else []))
    return p


# -- ownership ---------------------------------------------------------------------


def test_a_local_cluster_is_started_and_closed_by_the_executor() -> None:
    from pipeopt.executors import DaskExecutor

    executor = DaskExecutor()
    executor.start(2)
    client = executor.client
    try:
        info = client.scheduler_info()
        assert client.scheduler.address.startswith("inproc://")  # no network
        assert sum(w["nthreads"] for w in info["workers"].values()) == 2
        cluster = executor._cluster
        servers = [
            cluster.scheduler.http_server,
            *(w.http_server for w in cluster.workers.values()),
        ]
        assert {server.address for server in servers} == {"127.0.0.1"}
        assert 8787 not in {server.port for server in servers}
    finally:
        executor.shutdown()
    assert executor.client is None
    assert client.status == "closed"

    result = PipelineOptimizer(max_workers=2, executor="dask").run(chain(3))
    assert result.status is RunStatus.SUCCEEDED
    assert result.results["t2"] == ["t0", "t1", "t2"]


def test_a_users_client_is_left_open(client: Any) -> None:
    from pipeopt.executors import DaskExecutor

    result = PipelineOptimizer(max_workers=2, executor=DaskExecutor(client=client)).run(chain(4))
    assert result.status is RunStatus.SUCCEEDED
    assert client.status == "running"
    assert client.submit(sum, [1, 2], pure=False).result() == 3


class RecordingClient:
    """Delegates to a real client and records what ``submit`` was given."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.submitted: list[dict[str, Any]] = []

    def submit(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        self.submitted.append(kwargs)
        return self._client.submit(func, *args, **kwargs)


def test_criticality_maps_to_dask_priority_and_keys_name_the_task(client: Any) -> None:
    from pipeopt.executors import DaskExecutor

    recording = RecordingClient(client)
    p = Pipeline("priorities")
    for label in ("blocker", "critical", "high", "medium", "low", "deferred"):
        p.add(PipelineTask(label, lineage, criticality=label))
    result = PipelineOptimizer(max_workers=1, executor=DaskExecutor(client=recording)).run(p)
    assert result.status is RunStatus.SUCCEEDED
    by_task = {kw["key"].split("-")[0]: kw for kw in recording.submitted}
    assert {task: kw["priority"] for task, kw in by_task.items()} == {
        "blocker": 5,
        "critical": 4,
        "high": 3,
        "medium": 2,
        "low": 1,
        "deferred": 0,
    }
    assert all(kw["pure"] is False for kw in recording.submitted)
    assert by_task["blocker"]["key"].startswith("blocker-1-")
    assert len({kw["key"] for kw in recording.submitted}) == 6


def test_settings_that_cannot_apply_are_refused(client: Any) -> None:
    from pipeopt.executors import DaskExecutor

    with pytest.raises(ValueError, match="address= or client=, not both"):
        DaskExecutor("tcp://127.0.0.1:8786", client=client)
    with pytest.raises(ValueError, match=r"LocalCluster settings \(n_workers\) apply only"):
        DaskExecutor("tcp://127.0.0.1:8786", n_workers=2)


def test_missing_distributed_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeopt.executors import DaskExecutor

    monkeypatch.setitem(sys.modules, "distributed", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'pipeopt\[dask\]'"):
        DaskExecutor()
    with pytest.raises(ImportError, match=r"pip install 'pipeopt\[dask\]'"):
        create_executor("dask")


# -- a real cluster ----------------------------------------------------------------


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(DASK), *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent
        )


def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _layered(ledger: Path, layers: int = 5, width: int = 8) -> Pipeline:
    p = Pipeline("real-cluster")
    policy = RetryPolicy(max_attempts=3, base_delay=0.05, jitter=0.0)
    for layer in range(layers):
        for k in range(width):
            deps = [f"L{layer - 1}n{j}" for j in {k, (k + 3) % width}] if layer else []
            body = functools.partial(commit_once, ledger=str(ledger), seconds=0.12)
            p.add(PipelineTask(f"L{layer}n{k}", body, dependencies=deps, retry_policy=policy))
    return p


@pytest.mark.slow
def test_a_real_cluster_finishes_every_task_exactly_once_when_a_worker_dies(
    tmp_path: Path,
) -> None:
    from pipeopt.executors import DaskExecutor

    (tmp_path / "markers").mkdir()
    ledger = tmp_path / "ledger.txt"
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ)
    # Workers unpickle the bodies by reference: they must import this module.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    processes = [
        _spawn(
            ["scheduler", "--port", "0", "--scheduler-file", str(scheduler_file), *common],
            tmp_path / "scheduler.log",
            env,
        )
    ]
    try:
        _wait_for(scheduler_file.exists, "the scheduler file")
        _wait_for(lambda: "address" in scheduler_file.read_text(), "the scheduler address")
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        workers = [
            _spawn(
                [
                    "worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--nthreads",
                    "2",
                    "--no-nanny",  # the process we kill is the worker itself
                    "--name",
                    f"w{i}",
                    "--death-timeout",
                    "60",
                    *common,
                ],
                tmp_path / f"worker{i}.log",
                env,
            )
            for i in range(2)
        ]
        processes.extend(workers)
        with distributed.Client(address, set_as_default=False) as probe:
            probe.wait_for_workers(2, timeout=60)

        pipeline = _layered(ledger)
        outcome: list[RunResult] = []
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                optimizer = PipelineOptimizer(max_workers=4, executor=DaskExecutor(address))
                outcome.append(optimizer.run(pipeline))
            except BaseException as exc:
                failure.append(exc)

        runner = threading.Thread(target=drive)
        runner.start()
        victim = workers[0]

        def victim_has_run_tasks() -> bool:
            runs = tmp_path / "runs.txt"
            return runs.exists() and runs.read_text().count(" w0\n") >= 4

        _wait_for(victim_has_run_tasks, "worker w0 to run some tasks", timeout=60)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        runner.join(timeout=120)
        assert not runner.is_alive(), "the run did not finish"
        assert not failure, failure
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    (result,) = outcome
    assert result.status is RunStatus.SUCCEEDED, {
        name: (o.state, o.error) for name, o in result.tasks.items() if o.error
    }
    names = sorted(task.name for task in pipeline)
    assert all(o.state is TaskState.SUCCEEDED for o in result.tasks.values())
    assert sorted(ledger.read_text().split()) == names  # each side effect exactly once
    runs = (tmp_path / "runs.txt").read_text().split("\n")
    survivors = {line.split()[1] for line in runs if line}
    assert survivors == {"w0", "w1"}  # both workers took part before w0 died
    final = result.results["L4n0"]["names"]
    assert {"L4n0", "L3n0", "L3n3", "L0n0"} <= set(final)
