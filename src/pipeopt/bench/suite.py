"""`BenchmarkSuite`: sequential against optimized runs, and against peers.

Method
    Every workload runs ``repetitions`` times in each mode, and the modes of
    one repetition run back to back in an order rotated per repetition, so a
    slow patch of the machine hits all modes alike; reports use medians.

    * *sequential*: ``PipelineOptimizer(max_workers=1, executor="thread")``,
      one body at a time in one thread (the baseline a plain loop gives);
    * *optimized*: ``PipelineOptimizer(max_workers=workers)`` with the
      workload's executor (``process`` for the ``cpu`` workload when
      available);
    * *peers* (``peers=``): ``threadpool`` - a ``ThreadPoolExecutor(workers)``
      fed from ``graphlib.TopologicalSorter``, submitting ready tasks in
      topological order and waiting ``FIRST_COMPLETED``; ``dask-threaded`` -
      ``dask.threaded.get(num_workers=workers)``; ``dask-distributed`` - a
      ``distributed.LocalCluster`` (one process with ``workers`` threads, or
      one single-threaded process per core for process workloads). Peers run
      the same task bodies with the same arguments; a body that asks for a
      ``context`` gets one whose batcher always answers 1,000 rows.

    Each timed run covers ``run(pipeline)`` (or the peer's equivalent) from
    the graph to the last result; building the pipeline and starting a
    dask cluster are not timed.

Lower bound
    For workloads whose tasks share no serial resource, the makespan of any
    schedule on ``workers`` slots is at least ``max(critical path, total
    work / workers, CPU work / cores)``, where the task costs are the body
    durations measured in the sequential runs (per task, the median) and CPU
    work counts the pure-Python tasks, which use one core at a time under
    threads and ``min(workers, cpus)`` cores under processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import functools
import graphlib
import importlib.metadata
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt.batching import AdaptiveBatcher, FixedBatcher
from pipeopt.bench.report import BenchmarkReport, PeerResult, WorkloadResult
from pipeopt.bench.workloads import BUILTIN_WORKLOADS, cpu_body, process_executor_available
from pipeopt.context import ExecutionContext
from pipeopt.errors import BenchmarkError
from pipeopt.executors.base import resolve_output
from pipeopt.executors.registry import EXECUTOR_NAMES
from pipeopt.graph import Pipeline, PipelineTask

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.executors.base import Executor
    from pipeopt.graph import CompiledPipeline
    from pipeopt.injection import BodyKind
    from pipeopt.result import RunResult

PEERS: tuple[str, ...] = ("threadpool", "dask-threaded", "dask-distributed")
PEER_ALIASES: dict[str, tuple[str, ...]] = {
    "threadpool": ("threadpool",),
    "dask": ("dask-threaded", "dask-distributed"),
    "dask-threaded": ("dask-threaded",),
    "dask-distributed": ("dask-distributed",),
    "distributed": ("dask-distributed",),
}
PEER_BATCH_SIZE = 1000
BATCH_SLO = 0.05  # seconds per batch the adaptive batcher of the optimized runs aims at

ProgressHook = Callable[[int, int, str], None]  # (steps done, steps in all, what runs next)


def parse_peers(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Return the peers named by ``spec`` (``"dask,threadpool"`` or a list), in order.

    ``dask`` stands for ``dask-threaded`` plus ``dask-distributed``; the
    latter is dropped when ``distributed`` is not installed.

    Raises:
        ValueError: a name is not a known peer.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in PEER_ALIASES:
            valid = ", ".join(sorted(PEER_ALIASES))
            raise ValueError(f"unknown peer {raw.strip()!r}; choose from {valid}")
        for peer in PEER_ALIASES[name]:
            explicit = name in ("dask-distributed", "distributed")
            if peer == "dask-distributed" and not explicit and not _installed("distributed"):
                continue
            if peer not in chosen:
                chosen.append(peer)
    return tuple(chosen)


@dataclass(slots=True)
class Workload:
    """A named pipeline factory and what the suite needs to know to bound it.

    Attributes:
        factory: builds a fresh pipeline for each run, given a scratch folder.
        executor: executor of the optimized run.
        cpu_tasks: predicate telling which tasks hold the GIL (pure Python).
        is_dag: whether the lower bound applies (no shared serial resource).
    """

    name: str
    description: str
    factory: Callable[[Path], Pipeline]
    executor: str = "thread"
    cpu_tasks: Callable[[str], bool] = field(default=lambda _name: False)
    is_dag: bool = True
    cpu_bound: bool = False


class BenchmarkSuite:
    """Run named workloads sequentially and optimized, and compare them with peers.

    Built-in workloads (see :mod:`pipeopt.bench.workloads`): ``io``, ``cpu``,
    ``mixed``, ``batching``. Add your own with :meth:`add`::

        suite = BenchmarkSuite(workers=8, repetitions=5, peers=["threadpool"])
        suite.add("nightly", make_nightly_pipeline)
        report = suite.run(["io", "nightly"])
        report.write_json("pipeline_optimizer_benchmarks.json")
        report.write_png("benchmarks.png")

    Args:
        workers: worker slots of the optimized runs and of the peers.
        repetitions: runs per mode; reports show medians.
        seed: seeds the built-in workloads (same seed, same graphs and data).
        scale: multiplies the built-in workloads' amount of work.
        peers: peers to run too: ``threadpool``, ``dask`` (threaded and,
            when installed, distributed), ``dask-threaded``, ``dask-distributed``.

    Raises:
        ValueError: an argument is out of range or a peer is unknown.
    """

    def __init__(
        self,
        *,
        workers: int = 8,
        repetitions: int = 5,
        seed: int = 0,
        scale: float = 1.0,
        peers: str | Iterable[str] = (),
    ) -> None:
        if not isinstance(workers, int) or workers < 2:
            raise ValueError(f"workers must be an integer >= 2, got {workers!r}")
        if not isinstance(repetitions, int) or repetitions < 1:
            raise ValueError(f"repetitions must be an integer >= 1, got {repetitions!r}")
        if not isinstance(scale, int | float) or not 0 < scale <= 100:
            raise ValueError(f"scale must be a number > 0 and <= 100, got {scale!r}")
        self.workers = workers
        self.repetitions = repetitions
        self.seed = int(seed)
        self.scale = float(scale)
        self.peers = parse_peers(peers)
        self._workloads: dict[str, Workload] = {}
        self._process: bool | None = None
        for builtin in BUILTIN_WORKLOADS.values():
            prefixes = builtin.cpu_prefixes

            def factory(workdir: Path, make: Any = builtin.factory) -> Pipeline:
                built: Pipeline = make(self.seed, self.scale, workdir)
                return built

            self._workloads[builtin.name] = Workload(
                builtin.name,
                builtin.description,
                factory,
                executor="process" if builtin.wants_process else "thread",
                cpu_tasks=_prefix_matcher(prefixes),
                is_dag=builtin.is_dag,
                cpu_bound=builtin.wants_process,
            )

    @property
    def workloads(self) -> list[str]:
        """Return the names of the registered workloads."""
        return list(self._workloads)

    def add(
        self,
        name: str,
        pipeline_factory: Callable[[], Pipeline],
        *,
        description: str = "",
        executor: str = "thread",
        cpu_bound: bool = False,
        is_dag: bool = True,
    ) -> None:
        """Register a workload built by ``pipeline_factory`` (called once per run).

        Args:
            name: the workload's name in reports; replaces a workload of that name.
            pipeline_factory: returns a fresh :class:`Pipeline` each call.
            executor: executor of the optimized run, one of
                :data:`~pipeopt.executors.EXECUTOR_NAMES`.
            cpu_bound: the task bodies are pure Python (for the lower bound).
            is_dag: false when the tasks share a serial resource, which voids
                the lower bound.

        Raises:
            ValueError: an empty name or an unknown executor.
            TypeError: ``pipeline_factory`` is not callable.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"workload name must be a non-empty string, got {name!r}")
        if not callable(pipeline_factory):
            raise TypeError(f"pipeline_factory must be callable, got {pipeline_factory!r}")
        if executor not in EXECUTOR_NAMES:
            raise ValueError(
                f"executor must be one of {', '.join(EXECUTOR_NAMES)}, got {executor!r}"
            )

        def factory(workdir: Path) -> Pipeline:
            del workdir
            pipeline = pipeline_factory()
            if not isinstance(pipeline, Pipeline):
                raise TypeError(
                    f"workload {name!r}: the factory must return a Pipeline, "
                    f"got {type(pipeline).__name__}"
                )
            return pipeline

        self._workloads[name] = Workload(
            name,
            description,
            factory,
            executor=executor,
            cpu_tasks=lambda _task: cpu_bound,
            is_dag=is_dag,
            cpu_bound=cpu_bound,
        )

    def run(
        self, names: Sequence[str] | None = None, *, progress: ProgressHook | None = None
    ) -> BenchmarkReport:
        """Run the named workloads (all registered by default) and return the report.

        Raises:
            KeyError: a name is not a registered workload.
            BenchmarkError: a run did not succeed (the workload is broken).
        """
        chosen = list(names) if names else self.workloads
        for name in chosen:
            if name not in self._workloads:
                raise KeyError(
                    f"unknown workload {name!r}; choose from {', '.join(self.workloads)}"
                )
        load = _load_average()
        modes = ["sequential", "optimized", *self.peers]
        total = len(chosen) * self.repetitions * len(modes)
        done = 0
        results: list[WorkloadResult] = []
        with (
            tempfile.TemporaryDirectory(prefix="pipeopt-bench-") as tmp,
            _Peers(self.workers) as peers,
        ):
            executors = {name: self._executor_for(self._workloads[name]) for name in chosen}
            _warm_up(self.workers)
            if "process" in executors.values():
                _warm_up(2, _executor("process", 2, cpu_bound=True))
            for name in chosen:
                workload = self._workloads[name]
                executor = executors[name]
                workdir = Path(tmp) / name
                workdir.mkdir()
                times: dict[str, list[float]] = {mode: [] for mode in modes}
                durations: dict[str, list[float]] = {}
                compiled: CompiledPipeline | None = None
                for rep in range(self.repetitions):
                    shift = rep % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        if progress is not None:
                            progress(done, total, f"{name} {mode} {rep + 1}/{self.repetitions}")
                        pipeline = workload.factory(workdir)
                        if mode == "sequential":
                            seconds, result = _run_pipeopt(pipeline, 1, "thread")
                            for task, outcome in result.tasks.items():
                                if outcome.duration is not None:
                                    durations.setdefault(task, []).append(outcome.duration)
                            if compiled is None:
                                compiled = pipeline.compile()
                        elif mode == "optimized":
                            runner = _executor(executor, self.workers, workload.cpu_bound)
                            seconds, _ = _run_pipeopt(pipeline, self.workers, runner)
                        else:
                            seconds = peers.run(mode, pipeline, processes=executor != "thread")
                        times[mode].append(seconds)
                        done += 1
                assert compiled is not None
                results.append(
                    self._result(
                        workload,
                        executor=executor,
                        compiled=compiled,
                        times=times,
                        durations=durations,
                        peers=self.peers,
                    )
                )
            if progress is not None:
                progress(done, total, "done")
        return BenchmarkReport(
            workloads=tuple(results),
            timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            cpu_count=cpu_count(),
            versions=versions(),
            peers=self.peers,
            settings={
                "workers": self.workers,
                "repetitions": self.repetitions,
                "seed": self.seed,
                "scale": self.scale,
            },
            load_average=load,
        )

    def _executor_for(self, workload: Workload) -> str:
        if workload.executor != "process":
            return workload.executor
        if self._process is None:
            self._process = process_executor_available()
        return "process" if self._process else "thread"

    def _result(
        self,
        workload: Workload,
        *,
        executor: str,
        compiled: CompiledPipeline,
        times: Mapping[str, list[float]],
        durations: Mapping[str, list[float]],
        peers: Sequence[str],
    ) -> WorkloadResult:
        cost = [statistics.median(durations.get(name, [0.0])) for name in compiled.names]
        work = sum(cost)
        path = critical_path(compiled, cost)
        bound: float | None = None
        if workload.is_dag:
            cpu_work = sum(
                c for c, n in zip(cost, compiled.names, strict=True) if workload.cpu_tasks(n)
            )
            cores = min(self.workers, cpu_count()) if executor != "thread" else 1
            bound = max(path, work / self.workers, cpu_work / cores)
        return WorkloadResult(
            workload=workload.name,
            description=workload.description,
            tasks=len(compiled),
            workers=self.workers,
            executor=executor,
            sequential=tuple(times["sequential"]),
            optimized=tuple(times["optimized"]),
            total_work_s=work,
            critical_path_s=path,
            lower_bound_s=bound,
            peers={p: PeerResult(p, tuple(times[p])) for p in peers},
        )


def _prefix_matcher(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    def matches(name: str) -> bool:
        return bool(prefixes) and name.startswith(prefixes)

    return matches


# -- measuring -----------------------------------------------------------------------


def critical_path(compiled: CompiledPipeline, cost: Sequence[float]) -> float:
    """Return the longest chain of ``cost`` through ``compiled`` (by task index)."""
    finish = [0.0] * len(compiled)
    for i in compiled.order:
        start = max((finish[d] for d in compiled.dependencies[i]), default=0.0)
        finish[i] = start + cost[i]
    return max(finish, default=0.0)


def _adaptive_batcher(_task: str) -> Batcher:
    # Start where the peers' fixed batcher stays, and let the SLO move it from there.
    return AdaptiveBatcher(target_latency=BATCH_SLO, initial_size=PEER_BATCH_SIZE)


def _executor(name: str, workers: int, cpu_bound: bool) -> str | Executor:
    """Return what the optimized run uses: a name, or a process pool sized to the cores."""
    if name != "process" or not cpu_bound:
        return name
    try:
        from pipeopt.executors.process import ProcessExecutor
    except ImportError:
        return name
    # CPU-bound bodies gain nothing from more processes than cores, and each costs a start.
    return ProcessExecutor(
        processes=min(workers, cpu_count()), preload=("pipeopt.bench.workloads",)
    )


def _run_pipeopt(
    pipeline: Pipeline, workers: int, executor: str | Executor
) -> tuple[float, RunResult]:
    from pipeopt.optimizer import PipelineOptimizer

    optimizer = PipelineOptimizer(
        max_workers=workers, executor=executor, batcher_factory=_adaptive_batcher
    )
    started = time.perf_counter()
    result = optimizer.run(pipeline)
    seconds = time.perf_counter() - started
    if not result.ok:
        failed = {n: repr(o.error) for n, o in result.tasks.items() if o.error is not None}
        first = next(iter(failed.items()), ("?", "no error recorded"))
        raise BenchmarkError(
            f"benchmark pipeline {pipeline.name!r} {result.status.value}: "
            f"task {first[0]!r} failed with {first[1]}"
        )
    return seconds, result


def _warm_up(workers: int, executor: str | Executor = "thread") -> None:
    """Run a two-task pipeline once, so imports and first-use costs are not timed.

    With a process executor this also starts the interpreter's fork server,
    a once-per-process cost.
    """
    pipeline = Pipeline("bench-warm-up")
    pipeline.add(PipelineTask("a", functools.partial(cpu_body, 10, 1)))
    pipeline.add(PipelineTask("b", functools.partial(cpu_body, 10, 2), dependencies=("a",)))
    _run_pipeopt(pipeline, workers, executor)


@dataclass(frozen=True, slots=True)
class PeerTask:
    """One task of a pipeline, callable by a peer with the upstream results.

    Reproduces pipeopt's argument injection (``context``, dependencies by
    parameter name, the rest through ``**kwargs``) so peers run the same
    bodies with the same arguments.
    """

    name: str
    func: Callable[..., Any]
    dependencies: tuple[str, ...]
    by_name: tuple[tuple[str, str], ...]
    rest: tuple[str, ...]
    wants_context: bool
    kind: BodyKind

    def __call__(self, *values: Any) -> Any:
        """Run with the dependencies' results in ``dependencies`` order (as dask passes them)."""
        return self.call(dict(zip(self.dependencies, values, strict=True)))

    def call(self, results: Mapping[str, Any]) -> Any:
        """Run with ``results`` holding at least this task's dependencies."""
        kwargs = {param: results[dep] for param, dep in self.by_name}
        for dep in self.rest:
            kwargs[dep] = results[dep]
        if self.wants_context:
            kwargs["context"] = ExecutionContext(
                self.name,
                dependencies=self.dependencies,
                results=results,
                batcher=FixedBatcher(PEER_BATCH_SIZE),
            )
        out = self.func(**kwargs)
        return out if self.kind == "function" else resolve_output(out, self.kind, None)


def peer_tasks(pipeline: Pipeline) -> list[PeerTask]:
    """Return the pipeline's tasks in topological order, ready for a peer to call."""
    compiled = pipeline.compile()
    tasks: list[PeerTask] = []
    for i in compiled.order:
        task = compiled.tasks[i]
        injection = compiled.injections[i]
        tasks.append(
            PeerTask(
                task.name,
                task.func,
                task.dependency_names,
                injection.by_name,
                injection.rest_as_kwargs,
                injection.wants_context,
                injection.kind,
            )
        )
    return tasks


def run_threadpool(tasks: Sequence[PeerTask], workers: int) -> dict[str, Any]:
    """Run ``tasks`` on a ``ThreadPoolExecutor`` fed in topological order; return the results."""
    by_name = {t.name: t for t in tasks}
    results: dict[str, Any] = {}
    sorter = graphlib.TopologicalSorter({t.name: t.dependencies for t in tasks})
    sorter.prepare()
    with cf.ThreadPoolExecutor(workers) as pool:
        pending: dict[cf.Future[Any], str] = {}
        while sorter.is_active():
            for name in sorter.get_ready():
                pending[pool.submit(by_name[name].call, results)] = name
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                name = pending.pop(future)
                results[name] = future.result()
                sorter.done(name)
    return results


def dask_graph(tasks: Sequence[PeerTask]) -> dict[str, Any]:
    """Return a dask graph dict running ``tasks`` (dependencies passed positionally)."""
    return {t.name: (t, *t.dependencies) for t in tasks}


class _Peers:
    """Peer runners of one suite run; dask clusters are started once and reused."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._clients: dict[bool, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def run(self, peer: str, pipeline: Pipeline, *, processes: bool) -> float:
        """Run ``pipeline`` through ``peer`` and return the seconds it took."""
        tasks = peer_tasks(pipeline)
        keys = [t.name for t in tasks]
        if peer == "threadpool":
            started = time.perf_counter()
            run_threadpool(tasks, self.workers)
            return time.perf_counter() - started
        if peer == "dask-threaded":
            import dask.threaded

            graph = dask_graph(tasks)
            started = time.perf_counter()
            dask.threaded.get(graph, keys, num_workers=self.workers)
            return time.perf_counter() - started
        if peer == "dask-distributed":
            client = self._client(processes)
            graph = dask_graph(tasks)
            started = time.perf_counter()
            client.get(graph, keys)
            return time.perf_counter() - started
        raise ValueError(f"unknown peer {peer!r}")

    def _client(self, processes: bool) -> Any:
        client = self._clients.get(processes)
        if client is None:
            from distributed import Client, LocalCluster

            if processes:
                n, threads = min(self.workers, cpu_count()), 1
            else:
                n, threads = 1, self.workers
            cluster = self._stack.enter_context(
                LocalCluster(  # type: ignore[no-untyped-call]
                    n_workers=n,
                    threads_per_worker=threads,
                    processes=processes,
                    dashboard_address=":0",  # any free port: never clash with a running one
                    silence_logs=logging.ERROR,
                )
            )
            client = self._clients[processes] = self._stack.enter_context(
                Client(cluster)  # type: ignore[no-untyped-call]
            )
        return client


def run_peer(peer: str, pipeline: Pipeline, workers: int) -> float:
    """Run ``pipeline`` once through ``threadpool`` or ``dask-threaded``; return the seconds.

    Raises:
        ValueError: ``peer`` is not one of those two.
    """
    if peer not in ("threadpool", "dask-threaded"):
        raise ValueError(f"peer must be 'threadpool' or 'dask-threaded', got {peer!r}")
    with _Peers(workers) as peers:
        return peers.run(peer, pipeline, processes=False)


# -- environment ---------------------------------------------------------------------


def cpu_count() -> int:
    """Return the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _load_average() -> tuple[float, ...] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except (AttributeError, OSError):  # not available on this platform
        return None


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def versions() -> dict[str, str]:
    """Return the versions that matter for comparing reports."""
    from pipeopt import __version__

    found = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pipeopt": __version__,
        "platform": platform.platform(),
    }
    for distribution in ("dask", "distributed", "matplotlib", "prometheus_client"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[distribution] = importlib.metadata.version(distribution)
    return found


__all__ = [
    "PEERS",
    "BenchmarkSuite",
    "PeerTask",
    "ProgressHook",
    "Workload",
    "cpu_count",
    "critical_path",
    "dask_graph",
    "parse_peers",
    "peer_tasks",
    "run_threadpool",
    "versions",
]
