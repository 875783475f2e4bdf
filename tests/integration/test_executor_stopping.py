"""Stopping runs on every executor: the run, not the executor, says what an attempt was.

An attempt the run stops (Ctrl-C, SIGTERM, ``fail_fast``) is ``cancelled``;
an attempt over its timeout fails with :class:`TaskTimeoutError`; whatever the
executor and whenever in the attempt it happens. Also: nothing hangs (a
coroutine that never yields), and an optimizer that is running refuses a
second run instead of sharing its executor with it.

Ctrl-C is a real ``SIGINT`` sent to this process, so that the
``KeyboardInterrupt`` lands wherever the main thread is: waiting for the
workers, or inside the body itself under the sync executor.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeopt import (
    Pipeline,
    PipelineOptimizer,
    PipelineTask,
    RunResult,
    RunStatus,
    TaskState,
    TaskTimeoutError,
)
from pipeopt.errors import PipelineRunningError
from pipeopt.executors import Executor, create_executor

EXECUTORS = ("thread", "sync", "process", "async", "dask")

# Set at the end of every test so that bodies left running in this process stop.
_RELEASE = threading.Event()


def _append(ledger: str, line: str) -> None:
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def entries(ledger: Path) -> list[str]:
    """Return the lines the bodies wrote."""
    return ledger.read_text().split() if ledger.exists() else []


def stall(context: Any, ledger: str = "") -> str:
    """Note the start, then ignore every request to stop for 30 s."""
    _append(ledger, context.task)
    _RELEASE.wait(30)
    return "finished"


def gate(context: Any, ledger: str = "", opens: str = "") -> str:
    """Note the start, then wait until the file ``opens`` exists (works across processes)."""
    _append(ledger, context.task)
    deadline = time.monotonic() + 30
    while not os.path.exists(opens) and time.monotonic() < deadline:
        time.sleep(0.005)
    return "opened"


def nap(seconds: float) -> str:
    """Sleep past a timeout, then return."""
    time.sleep(seconds)
    return "late"


def quick(context: Any, ledger: str = "", **upstream: Any) -> str:
    """Finish at once."""
    _append(ledger, context.task)
    return context.task


def fail_when_started(context: Any, ledger: str = "", other: str = "") -> None:
    """Fail as soon as ``other`` has started (so that it is running when this fails)."""
    deadline = time.monotonic() + 30
    while other not in entries(Path(ledger)) and time.monotonic() < deadline:
        time.sleep(0.01)
    _append(ledger, context.task)
    raise ValueError(f"{context.task} failed")


async def block_the_loop(ledger: str = "") -> str:
    """A coroutine that never yields: it blocks its event loop's thread."""
    _append(ledger, "blocker")
    _RELEASE.wait(30)  # a blocking call inside async def, the classic mistake
    return "finished"


async def sleepy(ledger: str = "") -> str:
    """A well-behaved coroutine."""
    await asyncio.sleep(0.01)
    _append(ledger, "sleepy")
    return "slept"


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """The client of one in-process ``LocalCluster`` lent to the module's Dask runs."""
    pytest.importorskip("distributed")
    from pipeopt.executors import DaskExecutor

    owner = DaskExecutor(threads_per_worker=4)
    owner.start(4)
    yield owner.client
    owner.shutdown()


def _params(names: tuple[str, ...]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.dask) if n == "dask" else n for n in names]


def _factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Executor]]:
    _RELEASE.clear()
    name = request.param
    if name == "dask":
        from pipeopt.executors import DaskExecutor

        client = request.getfixturevalue("dask_client")
        yield lambda: DaskExecutor(client=client)
    else:
        yield lambda: create_executor(name)
    _RELEASE.set()


@pytest.fixture(params=_params(EXECUTORS))
def make_executor(request: pytest.FixtureRequest) -> Iterator[Callable[[], Executor]]:
    """A factory of fresh executors of the kind under test; releases stuck bodies afterwards."""
    yield from _factory(request)


@pytest.fixture(params=_params(tuple(n for n in EXECUTORS if n != "sync")))
def make_parallel_executor(request: pytest.FixtureRequest) -> Iterator[Callable[[], Executor]]:
    """As ``make_executor``, for the executors that run several bodies at once (not sync)."""
    yield from _factory(request)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """The file bodies note their start in."""
    return tmp_path / "ledger.txt"


def wait_for(ledger: Path, line: str) -> None:
    """Wait until a body wrote ``line`` (worker processes take a moment to start)."""
    deadline = time.monotonic() + 60
    while line not in entries(ledger):
        assert time.monotonic() < deadline, f"{line!r} never started"
        time.sleep(0.005)


def ctrl_c_when(ledger: Path, line: str, at: float) -> threading.Thread:
    """Send SIGINT to this process once ``line``'s body runs, not before ``at`` (monotonic)."""

    def send() -> None:
        wait_for(ledger, line)
        time.sleep(max(0.0, at - time.monotonic()))
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def run_interrupted(optimizer: PipelineOptimizer, pipeline: Pipeline) -> RunResult:
    """Run ``pipeline`` expecting Ctrl-C; return the partial result the interrupt carries."""
    with pytest.raises(KeyboardInterrupt) as caught:
        optimizer.run(pipeline)
    result: RunResult = caught.value.result  # type: ignore[attr-defined]
    return result


# The moments of the report: "early" as soon as the body runs, "late" 2.5 s
# into a 4 s timeout (counted from the run's start, which is before the
# attempt's), which the process executor used to call a timeout.
@pytest.mark.parametrize("after", [0.0, 2.5], ids=["early", "late"])
def test_ctrl_c_cancels_the_running_attempt_at_any_moment(
    make_executor: Callable[[], Executor], ledger: Path, after: float
) -> None:
    p = Pipeline("interrupted")
    bind = functools.partial
    p.add(
        PipelineTask("running", bind(stall, ledger=str(ledger)), timeout=4.0, criticality="blocker")
    )
    p.add(PipelineTask("waiting", bind(stall, ledger=str(ledger)), timeout=4.0, criticality="low"))
    p.add(PipelineTask("after", bind(quick, ledger=str(ledger)), dependencies=["running"]))
    optimizer = PipelineOptimizer(max_workers=1, executor=make_executor(), interrupt_grace=0.2)
    sender = ctrl_c_when(ledger, "running", time.monotonic() + after)
    result = run_interrupted(optimizer, p)
    sender.join()
    assert result.status is RunStatus.CANCELLED
    assert result.interrupted
    states = {name: outcome.state for name, outcome in result.tasks.items()}
    assert states == {
        "running": TaskState.CANCELLED,  # stopped by the run: never a failure, never a timeout
        "waiting": TaskState.CANCELLED,  # not started
        "after": TaskState.CANCELLED,
    }, {name: repr(outcome.error) for name, outcome in result.tasks.items()}
    assert isinstance(result.tasks["running"].error, KeyboardInterrupt)
    assert result.tasks["running"].attempts == 1
    assert entries(ledger) == ["running"]


def test_a_timeout_is_a_timeout_on_every_executor(
    make_executor: Callable[[], Executor], ledger: Path
) -> None:
    executor = make_executor()
    if executor.name == "sync":
        _RELEASE.set()  # judged when the body returns: let it return, late
    p = Pipeline("timeout")
    p.add(PipelineTask("slow", functools.partial(stall, ledger=str(ledger)), timeout=1.0))
    if executor.name == "sync":
        p = Pipeline("timeout")
        p.add(PipelineTask("slow", functools.partial(nap, seconds=1.2), timeout=1.0))
    result = PipelineOptimizer(max_workers=1, executor=executor).run(p)
    assert result.tasks["slow"].state is TaskState.FAILED
    assert isinstance(result.tasks["slow"].error, TaskTimeoutError)


def test_fail_fast_cancels_what_still_runs(
    make_parallel_executor: Callable[[], Executor], ledger: Path
) -> None:
    p = Pipeline("fail-fast")
    bind = functools.partial
    p.add(
        PipelineTask(
            "boom",
            bind(fail_when_started, ledger=str(ledger), other="long"),
            criticality="blocker",
        )
    )
    p.add(PipelineTask("long", bind(stall, ledger=str(ledger)), criticality="high"))
    p.add(PipelineTask("never", bind(quick, ledger=str(ledger)), criticality="deferred"))
    optimizer = PipelineOptimizer(
        max_workers=2, executor=make_parallel_executor(), fail_fast=True, interrupt_grace=0.2
    )
    result = optimizer.run(p)
    assert result.status is RunStatus.CANCELLED
    assert result.tasks["boom"].state is TaskState.FAILED
    assert isinstance(result.tasks["boom"].error, ValueError)
    assert result.tasks["long"].state is TaskState.CANCELLED
    assert result.tasks["never"].state is TaskState.CANCELLED
    assert "never" not in entries(ledger)


# -- nothing hangs -------------------------------------------------------------------


def test_a_coroutine_that_never_yields_times_out_and_the_run_returns(ledger: Path) -> None:
    _RELEASE.clear()
    try:
        p = Pipeline("blocked-loop")
        p.add(
            PipelineTask(
                "blocker", functools.partial(block_the_loop, ledger=str(ledger)), timeout=1.0
            )
        )
        optimizer = PipelineOptimizer(max_workers=2, executor="async")
        started = time.monotonic()
        result = optimizer.run(p)
        elapsed = time.monotonic() - started
        assert isinstance(result.tasks["blocker"].error, TaskTimeoutError)
        # The target is timeout + 1 s; the margin is for a loaded machine, not a hang.
        assert elapsed < 1.0 + 1.5, f"run() took {elapsed:.1f}s"
        # The executor is whole again: the next run gets a fresh loop.
        q = Pipeline("after")
        q.add(PipelineTask("sleepy", functools.partial(sleepy, ledger=str(ledger))))
        assert optimizer.run(q).results == {"sleepy": "slept"}
    finally:
        _RELEASE.set()


# -- one run at a time per optimizer ---------------------------------------------------


@pytest.mark.parametrize("executor", ["thread", "async", "process"])
def test_a_second_run_on_a_running_optimizer_is_refused_and_the_first_loses_nothing(
    ledger: Path, executor: str, tmp_path: Path
) -> None:
    opens = tmp_path / "open"
    first = Pipeline("first")
    first.add(PipelineTask("gate", functools.partial(gate, ledger=str(ledger), opens=str(opens))))
    for k in range(20):
        first.add(
            PipelineTask(
                f"t{k}", functools.partial(quick, ledger=str(ledger)), dependencies=["gate"]
            )
        )
    second = Pipeline("second")
    second.add(PipelineTask("other", functools.partial(quick, ledger=str(ledger))))
    optimizer = PipelineOptimizer(max_workers=4, executor=executor)
    outcome: dict[str, RunResult] = {}
    runner = threading.Thread(target=lambda: outcome.update(first=optimizer.run(first)))
    runner.start()
    try:
        wait_for(ledger, "gate")
        with pytest.raises(PipelineRunningError, match="already running pipeline 'first'"):
            optimizer.run(second)
    finally:
        opens.touch()
        runner.join(60)
    result = outcome["first"]
    assert result.status is RunStatus.SUCCEEDED, result.counts()
    assert len(result.results) == 21
    assert "other" not in entries(ledger)
    # Once the first run is over, the optimizer runs again.
    assert optimizer.run(second).status is RunStatus.SUCCEEDED
