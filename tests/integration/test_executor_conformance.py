"""One conformance suite that every executor must pass, like dask's ``GetFunctionTestMixin``.

Each test runs against ``thread``, ``sync``, ``process``, ``async`` and ``dask``
(an in-process ``LocalCluster`` shared by the module). Bodies type their
``context`` as :class:`~pipeopt.TaskContext`, and one test uses every member
of it on every executor. Tasks are written every way users write them:
module-level functions bound with :func:`functools.partial`, decorated
functions, closures and lambdas made in a loop. "Exactly once" is checked with a
ledger file that each body appends its task name to, which works across
processes; "after its dependencies" is checked through the results: each
body returns its own name plus every name its upstream results carry, which
it can only know once those dependencies have finished.

Executor-specific behaviour (a crashing or timed-out worker process, a
coroutine cancelled for real, a pickling error) is tested at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pipeopt import (
    Missing,
    Pipeline,
    PipelineOptimizer,
    PipelineTask,
    RunResult,
    RunStatus,
    TaskContext,
    TaskState,
    TaskTimeoutError,
    UpstreamFailedError,
)
from pipeopt.errors import NotPicklableError
from pipeopt.executors import EXECUTOR_NAMES, Executor, create_executor
from pipeopt.retry import RetryPolicy

EXECUTORS = EXECUTOR_NAMES

# Set at the end of every test, so that bodies abandoned on a timeout in
# this process (thread, async and in-process Dask workers) stop waiting.
# Worker processes have their own copy that is never set: they are killed.
_RELEASE = threading.Event()


# -- bodies (module level, so that they pickle) ---------------------------------


def _append(ledger: str, name: str) -> None:
    # One short O_APPEND write per line: atomic, whichever process writes.
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{name}\n".encode())
    finally:
        os.close(fd)


def _lineage(context: TaskContext, upstream: dict[str, Any]) -> list[str]:
    seen = {context.task}
    for value in upstream.values():
        seen.update(value)
    return sorted(seen)


def trace(context: TaskContext, ledger: str = "", **upstream: Any) -> list[str]:
    """Record the run in the ledger; return the names of this task and all its ancestors."""
    _append(ledger, context.task)
    return _lineage(context, upstream)


async def trace_async(context: TaskContext, ledger: str = "", **upstream: Any) -> list[str]:
    """``trace`` as a coroutine."""
    await asyncio.sleep(0)
    _append(ledger, context.task)
    return _lineage(context, upstream)


def trace_generator(context: TaskContext, ledger: str = "", **upstream: Any) -> Iterator[str]:
    """``trace`` as a generator: the names are streamed and collected into a list."""
    _append(ledger, context.task)
    yield from _lineage(context, upstream)


async def trace_async_generator(
    context: TaskContext, ledger: str = "", **upstream: Any
) -> AsyncIterator[str]:
    """``trace`` as an async generator."""
    _append(ledger, context.task)
    for name in _lineage(context, upstream):
        await asyncio.sleep(0)
        yield name


def explode(context: TaskContext, ledger: str = "", **upstream: Any) -> None:
    """Fail with an error whose type and message the run must keep."""
    _append(ledger, context.task)
    raise ValueError(f"bad row 7 in {context.task}")


def flaky(context: TaskContext, ledger: str = "", **upstream: Any) -> str:
    """Fail the first attempt with a transient error, succeed on the next."""
    _append(ledger, f"{context.task}#{context.attempt}")
    if context.attempt == 1:
        raise ConnectionError("transient: connection reset")
    return f"ok on attempt {context.attempt}"


def stall(context: TaskContext, ledger: str = "", pid_file: str = "") -> str:
    """Run for 30 s unless released: only a timeout can end it in time."""
    if pid_file:
        # Written whole, then renamed: a reader that sees the file sees the pid.
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)
    _append(ledger, context.task)
    _RELEASE.wait(30)
    return "finished"


def measure(context: TaskContext, ledger: str = "") -> int:
    """Report custom metrics and a batch through the context."""
    _append(ledger, context.task)
    context.record_custom_metric("rows", 42)
    context.record_custom_metric("ratio", 0.25)
    context.record_batch(500, 0.02)
    return 42


def crash_once(context: TaskContext, ledger: str = "", how: str = "exit") -> str:
    """Kill the worker process on the first attempt, succeed on the next."""
    _append(ledger, f"{context.task}#{context.attempt}")
    if context.attempt == 1:
        if how == "segfault":
            ctypes.string_at(0)
        os._exit(1)
    return f"survived on attempt {context.attempt}"


async def cancellable(context: TaskContext, ledger: str = "", marker: str = "") -> str:
    """Sleep 30 s; note a real cancellation in ``marker``."""
    _append(ledger, context.task)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        Path(marker).write_text("cancelled")
        raise
    return "finished"


_loops: set[int] = set()
_active = 0
_peak = 0
_gauge = threading.Lock()


async def overlap(context: TaskContext, ledger: str = "") -> int:
    """Track how many coroutines run at once, and on which loops."""
    global _active, _peak
    _loops.add(id(asyncio.get_running_loop()))
    with _gauge:
        _active += 1
        _peak = max(_peak, _active)
    try:
        await asyncio.sleep(0.05)
    finally:
        with _gauge:
            _active -= 1
    _append(ledger, context.task)
    return _peak


def use_everything(context: TaskContext, db: str = "", **upstream: Any) -> dict[str, Any]:
    """Use every member of the context and report what it saw."""
    from pipeopt.sinks import SQLiteSink

    assert isinstance(context, TaskContext)
    context.logger.info("hello from %s", context.task)
    context.record_custom_metric("seen", len(context.upstream))
    planned = context.plan_batch(7)
    context.record_batch(planned, 0.004)
    with SQLiteSink(db, "items", columns=["id", "name"], create=True) as sink:
        report = context.write_batches(({"id": k, "name": f"n{k}"} for k in range(25)), sink)
    return {
        "upstream": context.upstream,
        "planned": planned,
        "written": report.rows_written,
        "cancelled": context.cancelled,
        "identity": [context.task, context.attempt, context.run_id, context.criticality],
    }


def log_from_module(source: list[int]) -> int:
    """Log through a module logger, as library code does, from a body without a context."""
    log = logging.getLogger("conformance.module")
    log.warning("module logger saw %d items", len(source))
    log.info("below the root's level: not kept")
    try:
        raise ZeroDivisionError("on purpose")
    except ZeroDivisionError:
        log.exception("caught it")
    return len(source)


def wait_for_cancel(context: TaskContext, marker: str = "") -> str:
    """Work in small steps until the run cancels the attempt, then say so in ``marker``."""
    Path(marker).write_text("started")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if context.cancelled:
            Path(marker).write_text("saw cancelled")
            return "stopped"
        time.sleep(0.01)
    return "never cancelled"


# Decorated module-level functions: each name is bound to a PipelineTask, not a function.
DECORATED = Pipeline("decorated")


@DECORATED.task(criticality="critical")
def numbers() -> list[int]:
    """Return a few numbers."""
    return [1, 2, 3, 4]


@DECORATED.task(dependencies=[numbers])
def squares(numbers: list[int], context: TaskContext) -> list[int]:
    """Square them, logging through the context."""
    context.logger.info("squaring %d numbers", len(numbers))
    return [n * n for n in numbers]


@DECORATED.task(dependencies=[squares])
async def total(squares: list[int]) -> int:
    """Add them up in a coroutine."""
    await asyncio.sleep(0)
    return sum(squares)


def _scale(value: int, factor: int) -> int:
    return value * factor


def fan_out(n: int) -> Pipeline:
    """Tasks made in a loop: closures, lambdas and partials, joined by a closure."""
    pipeline = Pipeline("fan-out")
    offset = 100
    for k in range(n):

        def closure(k: int = k) -> int:
            return k + offset

        pipeline.add(PipelineTask(f"closure{k}", closure))
        pipeline.add(PipelineTask(f"lambda{k}", lambda k=k: k * k))
        pipeline.add(PipelineTask(f"partial{k}", functools.partial(_scale, k, factor=3)))
    names = list(pipeline.tasks)

    def join(**upstream: int) -> int:
        return sum(upstream.values())

    pipeline.add(PipelineTask("join", join, dependencies=names))
    return pipeline


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """The client of a ``LocalCluster`` in this process, shared by the module's Dask runs.

    It is made by a ``DaskExecutor`` (threads, in-process transport, no
    dashboard, HTTP endpoints on a free loopback port) and lent to the
    executors under test, which must leave it open.
    """
    pytest.importorskip("distributed")
    from pipeopt.executors import DaskExecutor

    owner = DaskExecutor(threads_per_worker=4)
    owner.start(4)
    yield owner.client
    owner.shutdown()


@pytest.fixture(
    params=[
        pytest.param(name, marks=pytest.mark.dask) if name == "dask" else name for name in EXECUTORS
    ]
)
def executor_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """The name of the executor under test; releases abandoned bodies afterwards."""
    _RELEASE.clear()
    yield request.param
    _RELEASE.set()


def process_executor(processes: int | None = None) -> Executor:
    """Return a process executor with ``processes`` workers (the run's ``max_workers`` if None)."""
    from pipeopt.executors import ProcessExecutor

    return ProcessExecutor(processes)


@pytest.fixture
def make_executor(request: pytest.FixtureRequest, executor_name: str) -> Callable[[], Executor]:
    """Return a factory of fresh executors of the kind under test."""
    if executor_name == "dask":
        from pipeopt.executors import DaskExecutor

        client = request.getfixturevalue("dask_client")
        return lambda: DaskExecutor(client=client)
    if executor_name == "process":
        return process_executor
    return lambda: create_executor(executor_name)


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """The file every body appends its task name to."""
    return tmp_path / "ledger.txt"


def entries(ledger: Path) -> list[str]:
    """Return the ledger's lines, in the order they were written."""
    return ledger.read_text().split() if ledger.exists() else []


def run(
    make_executor: Callable[[], Executor],
    pipeline: Pipeline,
    *,
    max_workers: int = 4,
    registry: CollectorRegistry | None = None,
    fail_fast: bool = False,
) -> RunResult:
    """Run ``pipeline`` on a fresh executor of the kind under test."""
    optimizer = PipelineOptimizer(
        max_workers=max_workers,
        executor=make_executor(),
        registry=registry,
        fail_fast=fail_fast,
        seed=7,
    )
    return optimizer.run(pipeline)


BODIES = (trace, trace_async, trace_generator, trace_async_generator)


def layered_dag(ledger: Path, *, seed: int) -> tuple[Pipeline, dict[str, set[str]]]:
    """A 4-layer DAG of 16 mixed bodies, inserted in a shuffled order; return it and ancestries."""
    rng = random.Random(seed)
    layers = [[f"L{layer}n{k}" for k in range(4)] for layer in range(4)]
    deps: dict[str, list[str]] = {}
    for layer, names in enumerate(layers):
        for name in names:
            below = layers[layer - 1] if layer else []
            deps[name] = rng.sample(below, k=min(len(below), rng.randint(1, 3)))
    ancestry: dict[str, set[str]] = {}
    for names in layers:
        for name in names:
            ancestry[name] = {name}.union(*(ancestry[d] for d in deps[name]))
    order = [name for names in layers for name in names]
    rng.shuffle(order)  # nothing may depend on insertion order
    pipeline = Pipeline(f"layered-{seed}")
    labels = ["blocker", "critical", "high", "medium", "low", "deferred"]
    for k, name in enumerate(order):
        body = BODIES[k % len(BODIES)]
        pipeline.add(
            PipelineTask(
                name,
                functools.partial(body, ledger=str(ledger)),
                dependencies=deps[name],
                criticality=labels[k % len(labels)],
            )
        )
    return pipeline, ancestry


# -- the suite -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_every_task_runs_once_after_its_dependencies(
    make_executor: Callable[[], Executor], ledger: Path, seed: int
) -> None:
    pipeline, ancestry = layered_dag(ledger, seed=seed)
    result = run(make_executor, pipeline)
    assert result.status is RunStatus.SUCCEEDED, result.tasks
    assert sorted(entries(ledger)) == sorted(ancestry)  # each task exactly once
    for name, expected in ancestry.items():
        # A task knows every ancestor's name only if each of them finished before it started.
        assert set(result.results[name]) == expected, name
        assert result.tasks[name].attempts == 1


def test_failure_skips_descendants_and_siblings_go_on(
    make_executor: Callable[[], Executor], ledger: Path
) -> None:
    p = Pipeline("failure")
    bind = functools.partial
    p.add(PipelineTask("extract", bind(trace, ledger=str(ledger))))
    p.add(PipelineTask("parse", bind(explode, ledger=str(ledger)), dependencies=["extract"]))
    p.add(PipelineTask("load", bind(trace, ledger=str(ledger)), dependencies=["parse"]))
    p.add(PipelineTask("report", bind(trace, ledger=str(ledger)), dependencies=["load"]))
    p.add(PipelineTask("audit", bind(trace, ledger=str(ledger)), dependencies=["extract"]))
    result = run(make_executor, p)
    assert result.status is RunStatus.FAILED
    states = {name: outcome.state for name, outcome in result.tasks.items()}
    assert states == {
        "extract": TaskState.SUCCEEDED,
        "parse": TaskState.FAILED,
        "load": TaskState.SKIPPED,
        "report": TaskState.SKIPPED,
        "audit": TaskState.SUCCEEDED,
    }
    error = result.tasks["parse"].error
    assert isinstance(error, ValueError)
    assert str(error) == "bad row 7 in parse"  # kept whole across process boundaries
    assert isinstance(result.tasks["load"].error, UpstreamFailedError)
    assert sorted(entries(ledger)) == ["audit", "extract", "parse"]


def test_failed_attempt_is_retried(make_executor: Callable[[], Executor], ledger: Path) -> None:
    registry = CollectorRegistry()
    p = Pipeline("retries")
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, jitter=0.0)
    p.add(PipelineTask("fetch", functools.partial(flaky, ledger=str(ledger)), retry_policy=policy))
    result = run(make_executor, p, registry=registry)
    assert result.status is RunStatus.SUCCEEDED
    outcome = result.tasks["fetch"]
    assert outcome.attempts == 2
    assert result.results["fetch"] == "ok on attempt 2"
    assert isinstance(outcome.attempt_history[0].error, ConnectionError)
    assert entries(ledger) == ["fetch#1", "fetch#2"]
    assert (
        registry.get_sample_value(
            "pipeline_task_retries_total",
            {"pipeline": "retries", "group": "medium", "task": "fetch"},
        )
        == 1
    )


def test_timeout_fails_a_stuck_body(
    make_executor: Callable[[], Executor], executor_name: str, ledger: Path
) -> None:
    if executor_name == "sync":
        pytest.skip("the sync executor runs bodies in the caller's thread and cannot interrupt one")
    p = Pipeline("timeouts")
    p.add(PipelineTask("stuck", functools.partial(stall, ledger=str(ledger)), timeout=0.5))
    p.add(PipelineTask("quick", functools.partial(trace, ledger=str(ledger))))
    p.add(
        PipelineTask("after", functools.partial(trace, ledger=str(ledger)), dependencies=["stuck"])
    )
    started = time.monotonic()
    result = run(make_executor, p, max_workers=2)
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"a 30 s body held the run for {elapsed:.1f}s"
    assert result.tasks["stuck"].state is TaskState.FAILED
    assert isinstance(result.tasks["stuck"].error, TaskTimeoutError)
    assert result.tasks["quick"].state is TaskState.SUCCEEDED
    assert result.tasks["after"].state is TaskState.SKIPPED


def test_fail_fast_cancels_what_has_not_started(
    make_executor: Callable[[], Executor], ledger: Path
) -> None:
    p = Pipeline("fail-fast")
    p.add(
        PipelineTask("boom", functools.partial(explode, ledger=str(ledger)), criticality="blocker")
    )
    for k in range(6):
        p.add(
            PipelineTask(
                f"later{k}", functools.partial(trace, ledger=str(ledger)), criticality="low"
            )
        )
    result = run(make_executor, p, max_workers=1, fail_fast=True)
    assert result.status is RunStatus.CANCELLED
    assert result.tasks["boom"].state is TaskState.FAILED
    assert all(result.tasks[f"later{k}"].state is TaskState.CANCELLED for k in range(6))
    assert entries(ledger) == ["boom"]


def test_metrics_reach_the_registry(make_executor: Callable[[], Executor], ledger: Path) -> None:
    registry = CollectorRegistry()
    p = Pipeline("metrics")
    p.add(PipelineTask("measure", functools.partial(measure, ledger=str(ledger))))
    p.add(PipelineTask("fail", functools.partial(explode, ledger=str(ledger))))
    result = run(make_executor, p, registry=registry)
    assert result.tasks["measure"].custom_metrics == {"rows": 42.0, "ratio": 0.25}
    get = registry.get_sample_value
    measured = {"pipeline": "metrics", "group": "medium", "task": "measure"}
    failed = {**measured, "task": "fail"}
    assert get("pipeline_task_custom_metric", {**measured, "name": "rows"}) == 42
    assert get("pipeline_task_custom_metric", {**measured, "name": "ratio"}) == 0.25
    assert get("pipeline_batch_size", measured) == 500
    assert get("pipeline_batch_latency_seconds_count", measured) == 1
    assert get("pipeline_task_latency_seconds_count", measured) == 1
    assert get("pipeline_task_latency_seconds_count", failed) == 1
    assert get("pipeline_task_failures_total", failed) == 1
    assert get("pipeline_task_failures_total", measured) == 0
    assert get("pipeline_tasks_active", {"pipeline": "metrics"}) == 0
    assert get("pipeline_runs_total", {"pipeline": "metrics", "status": "failed"}) == 1


def test_every_context_member_works(
    make_executor: Callable[[], Executor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    db = tmp_path / "items.db"
    p = Pipeline("context")
    p.add(PipelineTask("source", lambda: [1, 2]))
    p.add(
        PipelineTask("use", functools.partial(use_everything, db=str(db)), dependencies=["source"])
    )
    optimizer = PipelineOptimizer(max_workers=2, executor=make_executor(), registry=registry)
    with caplog.at_level("INFO", logger="pipeopt.task"):
        result = optimizer.run(p)
    assert result.status is RunStatus.SUCCEEDED, result.tasks["use"].error
    seen = result.results["use"]
    assert seen["upstream"] == {"source": [1, 2]}
    assert seen["identity"] == ["use", 1, result.run_id, "medium"]
    assert seen["planned"] == 7
    assert seen["written"] == 25
    assert seen["cancelled"] is False
    # Log records reach the driver's logging, naming the task and attempt.
    assert "[use #1] hello from use" in [r.getMessage() for r in caplog.records]
    assert any("[use #1] hello from use" in line for line in result.tasks["use"].logs)
    # Custom metrics and the batches reach the driver's result, metrics and batcher.
    metrics = result.tasks["use"].custom_metrics
    assert metrics["seen"] == 1
    assert metrics["rows_written"] == 25
    get = registry.get_sample_value
    used = {"pipeline": "context", "group": "medium", "task": "use"}
    assert get("pipeline_task_custom_metric", {**used, "name": "rows_written"}) == 25
    batches = get("pipeline_batch_latency_seconds_count", used)
    assert batches is not None
    assert batches >= 2  # the recorded batch and at least one written batch
    assert optimizer.batchers_of_last_run()["use"].statistics().batches == batches
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (25,)


def test_records_of_module_loggers_are_the_task_logs(
    make_executor: Callable[[], Executor],
) -> None:
    p = Pipeline("module-logs")
    p.add(PipelineTask("source", lambda: [1, 2, 3]))
    p.add(PipelineTask("logs", log_from_module, dependencies=["source"]))
    result = PipelineOptimizer(max_workers=2, executor=make_executor()).run(p)
    assert result.status is RunStatus.SUCCEEDED, result.tasks["logs"].error
    lines = result.tasks["logs"].logs
    # Each record once, as on a thread; the traceback of log.exception comes along.
    assert [line.split(" ", 2)[2].splitlines()[0] for line in lines] == [
        "WARNING conformance.module: module logger saw 3 items",
        "ERROR conformance.module: caught it",
    ]
    assert "ZeroDivisionError: on purpose" in lines[1]
    assert result.tasks["source"].logs == []


# The sync executor judges a timeout when the body returns: nothing to see while it runs.
@pytest.mark.parametrize(
    "executor_name",
    [
        pytest.param(n, marks=pytest.mark.dask) if n == "dask" else n
        for n in EXECUTORS
        if n != "sync"
    ],
    indirect=True,
)
def test_a_running_body_sees_cancelled(
    make_executor: Callable[[], Executor], tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    p = Pipeline("cancelled")
    p.add(PipelineTask("waits", functools.partial(wait_for_cancel, marker=str(marker)), timeout=3))
    result = run(make_executor, p, max_workers=1)
    assert isinstance(result.tasks["waits"].error, TaskTimeoutError)
    if not marker.exists():
        # On a machine too busy to start the body within its timeout, the
        # attempt was cancelled while queued: there was no body to tell.
        return
    deadline = time.monotonic() + 10
    while marker.read_text() != "saw cancelled" and time.monotonic() < deadline:
        time.sleep(0.02)  # an abandoned body notices on its own time
    assert marker.read_text() == "saw cancelled"


def test_decorated_module_level_tasks_run(make_executor: Callable[[], Executor]) -> None:
    result = run(make_executor, DECORATED)
    assert result.status is RunStatus.SUCCEEDED, {n: o.error for n, o in result.tasks.items()}
    assert result.results == {"numbers": [1, 2, 3, 4], "squares": [1, 4, 9, 16], "total": 30}


def test_closures_lambdas_and_partials_made_in_a_loop_run(
    make_executor: Callable[[], Executor],
) -> None:
    result = run(make_executor, fan_out(4))
    assert result.status is RunStatus.SUCCEEDED, {n: o.error for n, o in result.tasks.items()}
    assert result.results["closure3"] == 103
    assert result.results["lambda3"] == 9
    assert result.results["partial3"] == 9
    assert result.results["join"] == sum(k + 100 + k * k + 3 * k for k in range(4))


# -- by name ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["thread", "sync", "process", "async"])
def test_executors_are_found_by_name(name: str) -> None:
    executor = create_executor(name)
    assert executor.name == name
    assert isinstance(executor, Executor)
    assert executor.inline is (name in ("thread", "sync"))
    assert PipelineOptimizer(executor=f" {name.upper()} ").executor.name == name


def test_an_unknown_executor_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="executor must be one of thread, process, async"):
        create_executor("gpu")


# -- process executor ------------------------------------------------------------


@pytest.mark.parametrize("remote", ["process", pytest.param("dask", marks=pytest.mark.dask)])
@pytest.mark.parametrize("what", ["lock", "connection", "file"])
def test_what_cannot_cross_is_named_before_anything_runs(
    request: pytest.FixtureRequest, ledger: Path, tmp_path: Path, remote: str, what: str
) -> None:
    if remote == "dask":
        from pipeopt.executors import DaskExecutor

        executor: Executor = DaskExecutor(client=request.getfixturevalue("dask_client"))
    else:
        executor = process_executor()
    held: Any
    if what == "lock":
        held = threading.Lock()
    elif what == "connection":
        held = sqlite3.connect(tmp_path / "held.db", check_same_thread=False)
    else:
        held = (tmp_path / "held.txt").open("w")
    try:

        def uses_it() -> str:
            return repr(held)

        p = Pipeline("captures")
        p.add(PipelineTask("fine", functools.partial(trace, ledger=str(ledger))))
        p.add(PipelineTask("holder", uses_it))
        with pytest.raises(NotPicklableError) as caught:
            PipelineOptimizer(max_workers=2, executor=executor).run(p)
    finally:
        if what != "lock":
            held.close()
    assert caught.value.task == "holder"
    message = str(caught.value)
    assert "variable 'held' captured by" in message
    assert type(held).__name__ in message
    assert "inside the task body" in message
    assert entries(ledger) == []  # nothing ran


def test_process_workers_default_to_the_cpus_available_to_the_process() -> None:
    executor = process_executor()
    executor.start(len(os.sched_getaffinity(0)) + 4)  # more slots than CPUs
    try:
        pool = executor._pool  # type: ignore[attr-defined]
        assert len(pool._workers) == len(os.sched_getaffinity(0))
    finally:
        executor.shutdown()


@pytest.mark.parametrize("how", ["exit", "segfault"])
def test_process_executor_survives_a_worker_crash(ledger: Path, how: str) -> None:
    from pipeopt.executors import WorkerCrashedError

    p = Pipeline("crash")
    policy = RetryPolicy(max_attempts=2, base_delay=0.01, jitter=0.0)
    crash = functools.partial(crash_once, ledger=str(ledger), how=how)
    p.add(PipelineTask("crashy", crash, retry_policy=policy))
    for k in range(6):
        p.add(PipelineTask(f"steady{k}", functools.partial(trace, ledger=str(ledger))))
    result = PipelineOptimizer(max_workers=2, executor=process_executor()).run(p)
    assert result.status is RunStatus.SUCCEEDED
    outcome = result.tasks["crashy"]
    assert outcome.attempts == 2
    first = outcome.attempt_history[0].error
    assert isinstance(first, WorkerCrashedError)
    expected = "killed by SIGSEGV" if how == "segfault" else "exit code 1"
    assert expected in str(first)
    assert result.results["crashy"] == "survived on attempt 2"
    assert sorted(entries(ledger)) == sorted(
        ["crashy#1", "crashy#2", *(f"steady{k}" for k in range(6))]
    )


def test_process_executor_kills_a_timed_out_body(ledger: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    p = Pipeline("kill")
    body = functools.partial(stall, ledger=str(ledger), pid_file=str(pid_file))
    # "stuck" waits for "quick", so that the worker processes are up when its timeout starts.
    p.add(PipelineTask("quick", functools.partial(trace, ledger=str(ledger))))
    p.add(PipelineTask("stuck", body, timeout=2.0, dependencies=["quick"]))
    result = PipelineOptimizer(max_workers=2, executor=process_executor()).run(p)
    assert isinstance(result.tasks["stuck"].error, TaskTimeoutError)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left running
        os.kill(pid, 0)


def test_process_executor_cancels_a_queued_attempt_without_running_it(ledger: Path) -> None:
    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall

    executor = process_executor(processes=1)
    executor.start(1)
    try:

        def call(name: str, func: Callable[..., Any]) -> Any:
            task = TaskCall(name, func, {}, True, "function", 1, 3, None)
            return executor.submit(task, ExecutionContext(name))

        running = call("first", functools.partial(stall, ledger=str(ledger)))
        queued = call("second", functools.partial(trace, ledger=str(ledger)))
        assert executor.cancel(queued)
        assert executor.cancel(running)
        with pytest.raises(CancelledError):
            running.result(timeout=10)
        assert queued.cancelled()
        # The slot gets a fresh process and goes on.
        assert executor.submit(
            TaskCall("third", trace, {"ledger": str(ledger)}, True, "function", 1, 3, None),
            ExecutionContext("third"),
        ).result(timeout=30) == ["third"]
    finally:
        executor.shutdown()
    assert "second" not in entries(ledger)


# -- async executor ----------------------------------------------------------------


def test_async_executor_cancels_a_coroutine_for_real(ledger: Path, tmp_path: Path) -> None:
    marker = tmp_path / "cancelled"
    p = Pipeline("cancel")
    body = functools.partial(cancellable, ledger=str(ledger), marker=str(marker))
    p.add(PipelineTask("sleepy", body, timeout=1.0))
    result = PipelineOptimizer(max_workers=2, executor="async").run(p)
    assert isinstance(result.tasks["sleepy"].error, TaskTimeoutError)
    assert marker.read_text() == "cancelled"


def test_async_executor_runs_coroutines_on_one_loop_within_max_workers(ledger: Path) -> None:
    global _peak
    _loops.clear()
    _peak = 0
    p = Pipeline("overlap")
    for k in range(8):
        p.add(PipelineTask(f"io{k}", functools.partial(overlap, ledger=str(ledger))))
    result = PipelineOptimizer(max_workers=3, executor="async").run(p)
    assert result.status is RunStatus.SUCCEEDED
    assert len(_loops) == 1
    assert 1 < _peak <= 3
    assert sorted(entries(ledger)) == sorted(f"io{k}" for k in range(8))


def test_async_executor_shutdown_cancels_leftover_coroutines(tmp_path: Path) -> None:
    from pipeopt.context import ExecutionContext
    from pipeopt.executors import AsyncExecutor
    from pipeopt.executors.base import TaskCall

    marker = tmp_path / "cancelled"
    ledger = tmp_path / "ledger.txt"
    executor = AsyncExecutor()
    executor.start(2)
    body = functools.partial(cancellable, ledger=str(ledger), marker=str(marker))
    future = executor.submit(
        TaskCall("left", body, {}, True, "coroutine", 1, 3, None), ExecutionContext("left")
    )
    deadline = time.monotonic() + 30
    while not entries(ledger) and time.monotonic() < deadline:  # until the body is running
        time.sleep(0.01)
    executor.shutdown(cancel=True)
    assert marker.read_text() == "cancelled"
    with contextlib.suppress(Exception):
        future.result(timeout=5)
    assert future.done()


def test_sigint_is_ignored_by_process_workers_so_the_driver_decides(ledger: Path) -> None:
    """Ctrl-C reaches the whole process group; workers must not die of it on their own."""
    from pipeopt.context import ExecutionContext
    from pipeopt.executors.base import TaskCall

    executor = process_executor(processes=1)
    executor.start(1)
    try:
        pid_file = ledger.with_suffix(".pid")
        body = functools.partial(stall, ledger=str(ledger), pid_file=str(pid_file))
        future = executor.submit(
            TaskCall("waits", body, {}, True, "function", 1, 3, None), ExecutionContext("waits")
        )
        deadline = time.monotonic() + 30
        # The worker creates the file before it writes the pid into it: wait for the pid.
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(int(pid_file.read_text()), signal.SIGINT)
        time.sleep(0.2)
        assert not future.done()
        executor.cancel(future)
    finally:
        executor.shutdown(cancel=True)


# -- mapping, trigger rules and parameters on every executor ---------------------


def count_up(params: Any) -> list[int]:
    """Return ``range(params["count"])`` as a list: the items to map over."""
    return list(range(params["count"]))


def square_or_fail(context: Any, ledger: str = "", count_up: int = 0) -> int:
    """Square one mapped item; item 3 fails."""
    _append(ledger, context.task)
    if count_up == 3:
        raise ValueError("item 3 is bad")
    return count_up * count_up


def collect(square: list[Any]) -> list[Any]:
    """Keep the results, and say which items are missing (an ``all_done`` task)."""
    return [f"missing {v.task} {v.state}" if isinstance(v, Missing) else v for v in square]


def test_mapped_items_triggers_and_params(
    make_executor: Callable[[], Executor], ledger: Path
) -> None:
    p = Pipeline("mapped", params={"count": 2})
    p.add(PipelineTask("count_up", count_up))
    p.add(
        PipelineTask(
            "square", functools.partial(square_or_fail, ledger=str(ledger)), map_over="count_up"
        )
    )
    p.add(PipelineTask("collect", collect, dependencies=["square"], trigger="all_done"))
    optimizer = PipelineOptimizer(max_workers=2, executor=make_executor())
    result = optimizer.run(p, params={"count": 5})
    assert result.status is RunStatus.FAILED
    assert result.results["collect"] == [0, 1, 4, "missing square[3] failed", 16]
    assert sorted(entries(ledger)) == [f"square[{k}]" for k in range(5)]
    assert isinstance(result.tasks["square[3]"].error, ValueError)
