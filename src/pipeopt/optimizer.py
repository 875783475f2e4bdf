"""`PipelineOptimizer`: validate a pipeline, run it, and report what happened."""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import CollectorRegistry

from pipeopt._gc import holding_gc
from pipeopt._validate import check_float, check_int
from pipeopt.errors import ParameterError, PipelineRunningError, RunInterrupted, RunStoreError
from pipeopt.executors.base import Executor, exit_if_importing_main
from pipeopt.executors.registry import create_executor
from pipeopt.logs import capture as log_capture
from pipeopt.metrics import OptimizerMetrics
from pipeopt.params import resolve_params
from pipeopt.result import (
    RunGraph,
    RunResult,
    RunSnapshot,
    RunStatus,
    TaskOutcome,
    TaskState,
    copy_outcome,
)
from pipeopt.run_loop import RunHooks, RunLoop
from pipeopt.scheduler import SchedulerCore

if TYPE_CHECKING:
    from pipeopt.batching import Batcher
    from pipeopt.estimates import TaskEstimates
    from pipeopt.graph import CompiledPipeline, Pipeline
    from pipeopt.store import RunStore

_log = logging.getLogger("pipeopt.run")


def default_workers() -> int:
    """Return the default worker count: as for ``ThreadPoolExecutor``, min(32, cpus + 4)."""
    return min(32, (os.cpu_count() or 1) + 4)


def new_run_id() -> str:
    """Return a sortable, unique run id such as ``20261128-143205-1a2b3c``."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class PipelineOptimizer:
    """Run pipelines in parallel by criticality, with metrics.

    Args:
        max_workers: task bodies running at once; 1 is the sequential
            baseline. Defaults to min(32, cpus + 4).
        executor: ``"thread"`` (default, I/O-bound work), ``"process"``,
            ``"async"``, ``"sync"`` (everything in the caller's thread, for
            debugging), ``"dask"`` (a local cluster), or an executor
            instance such as ``pipeopt.executors.DaskExecutor(address=...)``;
            see :data:`pipeopt.executors.EXECUTOR_NAMES`.
        fail_fast: on the first task failure, cancel everything not started.
        registry: the Prometheus registry to export to; a fresh one by default.
        aging_interval: seconds of waiting that promote a ready task one
            criticality level (``None``: strict priority).
        batch_latency_slo: the latency SLO, in seconds, of each task's
            :class:`~pipeopt.AdaptiveBatcher` behind ``context.plan_batch``;
            ``None`` for fixed batches of ``batch_size``.
        batch_size: the first batch size (the fixed size without an SLO).
        batcher_factory: builds each task's batcher from its name, e.g.
            ``lambda task: AdaptiveBatcher(target_latency=0.1)``.
        seed: seeds the retry jitter, for reproducible runs.
        interrupt_grace: seconds an interrupt (or ``fail_fast``) gives running
            bodies to finish before they are stopped and their tasks cancelled.
        state_dir: folder of the run store (a SQLite file) that records runs
            for ``history``, ``resume`` and ``cache_key``, or a
            :class:`~pipeopt.store.RunStore`; ``None`` (the library default)
            records nothing. The CLI uses ``.pipeopt``.
        tune_gc: during runs of 1,000 tasks or more, freeze the objects that
            exist at the start and raise the garbage collector's young
            threshold (restored when the run ends); scheduling 100,000 tiny
            tasks is then about a third faster. Process-wide while it lasts.
        push_gateway: a Prometheus Pushgateway (``"http://127.0.0.1:9091"``)
            that receives the metrics at the end of each run, as job
            ``<pipeline>`` grouped by ``run=<run id>``; a gateway that cannot
            be reached is logged as an error and never fails the run.
        tracing: ``True`` emits an OpenTelemetry span per run and per attempt
            through the global tracer provider, or pass a ``TracerProvider``;
            needs the ``otel`` extra (see :mod:`pipeopt.tracing`).
        learn_durations: rank a task without ``expected_duration`` by its
            duration learned from the run store (the median of its last
            successful attempts in earlier runs of the pipeline) rather than
            as one hop, and teach the store this run's durations; see
            :mod:`pipeopt.estimates`. ``None`` (the default) learns when
            there is a ``state_dir``; ``True`` requires one; ``False``
            neither reads nor updates learned durations.

    Raises:
        TypeError: ``executor`` is neither a name nor an executor instance.
        ValueError: ``executor`` is not a known name, or another parameter
            is out of range (the message names it and the valid values).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        executor: str | Executor = "thread",
        *,
        fail_fast: bool = False,
        registry: CollectorRegistry | None = None,
        aging_interval: float | None = 5.0,
        batch_latency_slo: float | None = 0.1,
        batch_size: int = 1000,
        batcher_factory: Callable[[str], Batcher] | None = None,
        seed: int | None = None,
        interrupt_grace: float = 1.0,
        state_dir: str | os.PathLike[str] | RunStore | None = None,
        tune_gc: bool = True,
        push_gateway: str | None = None,
        tracing: object = False,
        learn_durations: bool | None = None,
    ) -> None:
        self.max_workers = (
            default_workers()
            if max_workers is None
            else check_int("max_workers", max_workers, minimum=1)
        )
        self.executor = create_executor(executor)
        self.fail_fast = bool(fail_fast)
        if aging_interval is not None:
            aging_interval = check_float(
                "aging_interval", aging_interval, minimum=0.0, strict_minimum=True
            )
        self.aging_interval = aging_interval
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if batch_latency_slo is not None:
            batch_latency_slo = check_float(
                "batch_latency_slo", batch_latency_slo, minimum=0.0, strict_minimum=True
            )
        self.batch_latency_slo = batch_latency_slo
        self.batcher_factory = batcher_factory
        self.seed = seed
        self.interrupt_grace = check_float("interrupt_grace", interrupt_grace, minimum=0.0)
        self.state_dir = state_dir
        if learn_durations and state_dir is None:
            raise ValueError(
                "learn_durations=True (--learn-durations yes) needs a run store to learn "
                "from: pass state_dir= (or drop --no-state), or leave it unset"
            )
        self.learn_durations = (
            state_dir is not None if learn_durations is None else bool(learn_durations)
        )
        self.tune_gc = bool(tune_gc)
        from pipeopt.metrics import check_push_gateway
        from pipeopt.tracing import check_tracing

        self.push_gateway = None if push_gateway is None else check_push_gateway(push_gateway)
        self._tracer_provider = check_tracing(tracing)
        self._store: RunStore | None = None
        self.metrics = OptimizerMetrics(registry)
        self._lock = threading.Lock()
        self._busy: str | None = None  # the pipeline being run, if any
        self._loop: RunLoop | None = None
        self._run_id: str | None = None
        self._pipeline_name: str | None = None
        self._started_at: float | None = None
        self._status: RunStatus | None = None
        self._batchers: dict[str, Batcher] = {}
        self._ended_at: float | None = None
        self._graph: RunGraph | None = None
        # Copies of the current run's final outcomes, reused by later snapshots.
        self._final_copies: tuple[RunLoop, list[TaskOutcome | None]] | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """Return this optimizer's Prometheus registry."""
        return self.metrics.registry

    def _make_batcher(self, task: str) -> Batcher:
        if self.batcher_factory is not None:
            return self.batcher_factory(task)
        from pipeopt.batching import AdaptiveBatcher, FixedBatcher

        if self.batch_latency_slo is None:
            return FixedBatcher(self.batch_size)
        return AdaptiveBatcher(self.batch_latency_slo, initial_size=self.batch_size)

    @property
    def store(self) -> RunStore | None:
        """Return the run store, opened on first use, or ``None`` when off."""
        if self.state_dir is None:
            return None
        if self._store is None:
            from pipeopt.store import RunStore

            if isinstance(self.state_dir, RunStore):
                self._store = self.state_dir
            else:
                self._store = RunStore(self.state_dir)
        return self._store

    def close(self) -> None:
        """Close the run store, if one was opened; the optimizer can still run again."""
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> PipelineOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resume(
        self,
        pipeline: Pipeline,
        run_id: str | None = None,
        *,
        force: bool = False,
        params: Mapping[str, Any] | None = None,
    ) -> RunResult:
        """Run again only what did not succeed in an earlier run of ``pipeline``.

        The run's parameters are reused.

        Args:
            run_id: the run to resume; the last run of this pipeline by default.
            force: go on even if the pipeline's structure or a parameter
                changed since.
            params: parameter values to check against (or, with ``force``,
                to replace) the run's.

        Raises:
            RunStoreError: no store, no such run, or the structure changed
                (the message lists the differences) and ``force`` is false.
            ParameterError: ``params`` changes a value of the run and
                ``force`` is false, or names an undeclared parameter.
            RunLockedError: another live process is resuming the same run
                (one resume of a run at a time; a dead one's lock is taken over).
        """
        store = self.store
        if store is None:
            raise RunStoreError("resume needs a run store; pass state_dir=")
        compiled = pipeline.compile()
        previous = store.resolve_run(run_id, pipeline=pipeline.name)
        with store.lock_run(previous):
            differences = store.structure_diff(previous, compiled)
            if differences and not force:
                listed = "; ".join(differences)
                raise RunStoreError(
                    f"pipeline {pipeline.name!r} changed since run {previous}: {listed}; "
                    "use --force to resume anyway"
                )
            values = _resumed_params(pipeline, previous, store.summary(previous).params)
            if params and not force:
                changed = [
                    f"{name!r} was {values[name]!r}, now {value!r}"
                    for name, value in resolve_params(pipeline.params, params).items()
                    if name in params and value != values[name]
                ]
                if changed:
                    raise ParameterError(
                        f"run {previous} ran with other parameters ({'; '.join(changed)}); "
                        "resume it as it ran, or use --force to resume with the new values",
                        next(iter(params)),
                    )
            preloaded = store.load_results(previous, names=_ResumableNames(compiled))
            return self.run(
                pipeline,
                params={**values, **(params or {})},
                _preloaded=preloaded,
                _resumed_from=previous,
                _compiled=compiled,
            )

    def _lineage(self, resumed_from: str | None) -> str | None:
        """Return the first run of the resume chain that ends in ``resumed_from``."""
        store = self.store
        if resumed_from is None or store is None:
            return resumed_from
        seen = {resumed_from}
        lineage = resumed_from
        while (parent := store.summary(lineage).resumed_from) is not None and parent not in seen:
            seen.add(parent)
            lineage = parent
        return lineage

    def run(
        self,
        pipeline: Pipeline,
        *,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        _preloaded: dict[str, object] | None = None,
        _resumed_from: str | None = None,
        _compiled: CompiledPipeline | None = None,
    ) -> RunResult:
        """Validate ``pipeline``, run every task, and return the outcome.

        One optimizer runs one pipeline at a time (its metrics, dashboard,
        ``progress()`` and ``interrupt()`` are about that run): a second
        ``run()`` while one is going is refused at once, so the running run
        never shares its executor. Concurrent runs each take their own
        ``PipelineOptimizer`` (they may share a Dask ``client=``).

        The graph is checked before anything runs. Task failures do not
        raise: they are in the result (``result.raise_for_status()`` raises
        the first). ``KeyboardInterrupt`` stops dispatching, cancels what has
        not started, records every task's state, and raises
        :class:`~pipeopt.errors.RunInterrupted` (a ``KeyboardInterrupt``) with
        the partial result as its ``result``.

        Args:
            params: values of the pipeline's declared parameters for this
                run; the rest keep their defaults. Bodies with a ``params``
                parameter receive all of them, read-only.

        Raises:
            PipelineError: the pipeline is invalid (see :mod:`pipeopt.errors`).
            PipelineRunningError: this optimizer is running a pipeline already.
            RunInterrupted: Ctrl-C (or a signal handler's ``KeyboardInterrupt``)
                stopped the run.
            ParameterError: a parameter is not declared or its value's type
                does not match its default's.
        """
        exit_if_importing_main()
        with self._lock:
            if self._busy is not None:
                raise PipelineRunningError(
                    self._busy,
                    f"this PipelineOptimizer is already running pipeline {self._busy!r}; "
                    "an optimizer runs one pipeline at a time: wait for that run() to return, "
                    "or give each concurrent run its own PipelineOptimizer",
                )
            self._busy = pipeline.name
        try:
            values = resolve_params(pipeline.params, params)
            with log_capture, holding_gc(len(pipeline), self.tune_gc):
                return self._run(pipeline, run_id, values, _preloaded, _resumed_from, _compiled)
        finally:
            with self._lock:
                self._busy = None

    def _run(
        self,
        pipeline: Pipeline,
        run_id: str | None,
        params: dict[str, Any],
        _preloaded: dict[str, object] | None,
        _resumed_from: str | None,
        compiled: CompiledPipeline | None = None,
    ) -> RunResult:
        if compiled is None:  # a resume has compiled it already, to compare structures
            compiled = pipeline.compile()
        if self.executor.name not in ("thread", "sync"):
            check = getattr(self.executor, "check_pipeline", None)
            if check is not None:
                check(compiled)
        run_id = run_id or new_run_id()
        estimates = self._rank_by_estimates(compiled)
        core = SchedulerCore(
            compiled,
            fail_fast=self.fail_fast,
            aging_interval=self.aging_interval,
            rng=random.Random(self.seed),
            params=params,
        )
        store = self.store
        observer = (
            store.begin_run(
                run_id=run_id,
                pipeline=pipeline.name,
                compiled=compiled,
                executor=self.executor.name,
                workers=self.max_workers,
                resumed_from=_resumed_from,
                params=params,
                estimates=estimates,
                learn=self.learn_durations,
            )
            if store is not None
            else None
        )
        self._batchers = {}
        hooks = RunHooks(
            run_id=run_id,
            batchers=self._batchers,
            batcher_factory=self._make_batcher,
            batch_observer=self.metrics.observe_batch,
            observer=observer,
            lineage_id=self._lineage(_resumed_from),
        )
        loop = RunLoop(
            core, self.executor, self.max_workers, hooks, interrupt_grace=self.interrupt_grace
        )
        started_wall = time.time()
        started = time.perf_counter()
        with self._lock:
            self._loop = loop
            self._run_id = run_id
            self._pipeline_name = pipeline.name
            self._started_at = started_wall
            self._status = RunStatus.RUNNING
            self._ended_at = None
            self._graph = None
        self.metrics.attach(core, loop.lock)
        pipeline._running += 1
        self.executor.start(self.max_workers)
        interrupted: BaseException | None = None
        try:
            loop.run(_preloaded)
        except KeyboardInterrupt as exc:
            interrupted = exc
        finally:
            pipeline._running -= 1
            self.executor.shutdown(cancel=interrupted is not None)
        wall = time.perf_counter() - started
        log_capture.handler.finish_run(core.outcomes)
        with loop.lock:
            status = _status(core, interrupted is not None or loop.interrupted)
            result = RunResult(
                run_id=run_id,
                pipeline=pipeline.name,
                status=status,
                tasks=_outcomes_by_name(core),
                results=core.results,  # the run is over: the core's own dict, not a copy
                started_at=started_wall,
                wall_time=wall,
                interrupted=interrupted is not None or loop.interrupted,
                params=params,
            )
        with self._lock:
            self._status = status
            self._ended_at = started_wall + wall
        if store is not None:
            try:
                store.end_run(result)
            except RunStoreError as exc:
                # The run itself is over and its result is whole; only its record failed.
                _log.error("run %s finished but could not be recorded: %s", run_id, exc)
        self.metrics.collector.run_finished(status.value)
        if self.push_gateway is not None:
            from pipeopt.metrics import push_run_metrics

            push_run_metrics(
                self.registry, self.push_gateway, pipeline=pipeline.name, run_id=run_id
            )
        if self._tracer_provider is not None:
            from pipeopt.tracing import export_run

            try:
                export_run(result, self._tracer_provider)
            except Exception:
                _log.exception("run %s: emitting its OpenTelemetry spans failed", run_id)
        if _log.isEnabledFor(logging.INFO):  # counting the states walks every task
            _log.info(
                "run %s of %r %s in %.3fs: %s",
                run_id,
                pipeline.name,
                status.value,
                wall,
                {k: v for k, v in result.counts().items() if v},
            )
        if interrupted is not None:
            raise RunInterrupted(result, interrupted) from interrupted
        return result

    def _rank_by_estimates(self, compiled: CompiledPipeline) -> TaskEstimates | None:
        """Rank tasks without a hint by their learned durations; return what each task used.

        ``None`` without a run store (nothing to learn from, nowhere to keep it).
        """
        store = self.store
        if store is None:
            return None
        from pipeopt.estimates import plan

        learned = store.learned_durations(compiled.name) if self.learn_durations else None
        estimates = plan(compiled, learned)
        if estimates.learned:
            compiled.reestimate(estimates.costs())
        return estimates

    def interrupt(self) -> None:
        """Stop the current run as Ctrl-C would (callable from any thread)."""
        with self._lock:
            loop = self._loop
        if loop is not None:
            loop.interrupt(KeyboardInterrupt("interrupted"))

    def batchers_of_last_run(self) -> dict[str, Batcher]:
        """Return the batchers the tasks of the current (or last) run used, by task."""
        return dict(self._batchers)

    def progress(self) -> tuple[int, int, int, int]:
        """Return ``(finished, total, active, failed)`` of the current run, cheaply."""
        with self._lock:
            loop = self._loop
        if loop is None:
            return (0, 0, 0, 0)
        core = loop.core
        return (core.finished, core.total, core.active, core.failures_total)

    def snapshot(self) -> RunSnapshot:
        """Return a consistent copy of the current (or last) run's state."""
        with self._lock:
            loop = self._loop
            run_id, name, started, status = (
                self._run_id,
                self._pipeline_name,
                self._started_at,
                self._status,
            )
            ended, graph = self._ended_at, self._graph
        batch_sizes = dict(self.metrics.last_batch_size)
        if loop is None:
            return RunSnapshot(
                run_id=None,
                pipeline=None,
                status=None,
                started_at=None,
                taken_at=time.time(),
                tasks_total=0,
                tasks_active=0,
                critical_backlog=0,
                tasks_finished=0,
                failures_total=0,
                retries_total=0,
                tasks={},
                batch_sizes=batch_sizes,
                breakers={},
            )
        core = loop.core
        if graph is None:
            # Built on the first snapshot of a run, so runs nobody watches never pay for it.
            graph = _run_graph(core.compiled)
            with self._lock:
                if self._loop is loop:
                    self._graph = graph
        finals = self._final_copies
        if finals is None or finals[0] is not loop:
            finals = self._final_copies = (loop, [None] * core.total)
        kept = finals[1]
        tasks: dict[str, TaskOutcome] = {}
        with loop.lock:
            if len(kept) < len(core.outcomes):  # mapped items were added
                kept.extend([None] * (len(core.outcomes) - len(kept)))
            # A final outcome never changes again: copy it once, not on every snapshot.
            for i, outcome in enumerate(core.outcomes):
                copied = kept[i]
                if copied is None:
                    copied = copy_outcome(outcome)
                    if copied.state.is_final:
                        kept[i] = copied
                tasks[copied.name] = copied
            active, backlog, finished = core.active, core.critical_backlog, core.finished
            failures, retries = core.failures_total, core.retries_total
            names = core.compiled.names
            running = {names[i]: started for i, started in loop.running_starts().items()}
        batchers = {task: b.statistics() for task, b in list(self._batchers.items())}
        breakers: dict[str, int] = {}
        for task in core.compiled.tasks:
            breaker = task.circuit_breaker
            if breaker is not None and breaker.name not in breakers:
                breakers[breaker.name] = int(breaker.statistics().state)
        return RunSnapshot(
            run_id=run_id,
            pipeline=name,
            status=status,
            started_at=started,
            taken_at=time.time(),
            tasks_total=core.total,
            tasks_active=active,
            critical_backlog=backlog,
            tasks_finished=finished,
            failures_total=failures,
            retries_total=retries,
            tasks=tasks,
            batch_sizes=batch_sizes,
            breakers=breakers,
            ended_at=ended,
            workers=self.max_workers,
            graph=graph,
            running_since=running,
            batchers=batchers,
        )


def _outcomes_by_name(core: SchedulerCore) -> dict[str, TaskOutcome]:
    # Sized once from the name index: built by insertion, a dict of a million
    # tasks would briefly hold its last two tables at the end of the run.
    tasks = cast("dict[str, TaskOutcome]", dict.fromkeys(core.compiled.index))
    tasks.update(zip(core.names, core.outcomes, strict=True))
    return tasks


def _run_graph(compiled: CompiledPipeline) -> RunGraph:
    from pipeopt.metrics import task_groups
    from pipeopt.priority import parse_criticality

    tasks = compiled.tasks
    return RunGraph(
        names=tuple(compiled.names),
        dependencies=tuple(compiled.dependencies),
        declared=tuple(parse_criticality(t.criticality).label for t in tasks),
        groups=tuple(task_groups(compiled)),
        descriptions=tuple(t.description for t in tasks),
    )


def _resumed_params(pipeline: Pipeline, run_id: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    """Return the parameters a resumed run starts from: the run's, for names still declared."""
    values = resolve_params(
        pipeline.params, {k: v for k, v in stored.items() if k in pipeline.params}
    )
    dropped = sorted(set(stored) - set(pipeline.params))
    if dropped:
        _log.warning(
            "run %s had parameters the pipeline no longer declares: %s", run_id, ", ".join(dropped)
        )
    return values


class _ResumableNames:
    """The task names whose stored results a resumed run can reuse: tasks and mapped items."""

    def __init__(self, compiled: CompiledPipeline) -> None:
        self._index = compiled.index
        self._mapped = {compiled.names[i] for i, s in enumerate(compiled.map_sources) if s >= 0}

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self._index:
            return True
        base, bracket, rest = name.partition("[")
        return bool(bracket) and base in self._mapped and rest[:-1].isdigit()


def _status(core: SchedulerCore, interrupted: bool) -> RunStatus:
    states = {o.state for o in core.outcomes}
    if interrupted or TaskState.CANCELLED in states:
        return RunStatus.CANCELLED
    if TaskState.FAILED in states or TaskState.SKIPPED in states:
        return RunStatus.FAILED
    return RunStatus.SUCCEEDED
