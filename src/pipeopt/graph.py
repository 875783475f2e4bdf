"""Pipelines as validated task graphs (pure: no threads, no I/O).

A :class:`Pipeline` is a named set of :class:`PipelineTask` objects whose
``dependencies`` name other tasks. :meth:`Pipeline.compile` validates the whole
graph before anything runs and returns a :class:`CompiledPipeline`: integer
indices, dependency and dependent lists, a topological order, each task's
effective criticality (the most urgent of its own and of every task that
waits on it, transitively) and its remaining critical path (the longest chain
of expected work from the task to a sink of the graph, itself included).

Parameter injection: a parameter named ``context`` receives the
:class:`~pipeopt.context.ExecutionContext`; a parameter named like a
dependency receives that dependency's result; a parameter named ``params``
receives the run's parameters (a read-only mapping); ``**kwargs`` receives
the results of the dependencies not named otherwise. Any other parameter
must have a default.

Mapping: a task with ``map_over=upstream`` runs once per item of that
upstream's result; each run is a task of its own named ``name[i]`` and
receives its item where it would have received the whole result. Trigger
rules: ``trigger="all_success"`` (the default) runs a task when every
dependency succeeded; ``"all_done"`` when every dependency is final,
whatever its state; ``"any_success"`` when every dependency is final and at
least one succeeded. The last two receive a :class:`~pipeopt.result.Missing`
for each dependency (or mapped item) that did not succeed.
"""

from __future__ import annotations

import collections
import difflib
import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from pipeopt._gc import holding_gc
from pipeopt._validate import check_float
from pipeopt.errors import (
    CycleError,
    DuplicateTaskError,
    NotCallableError,
    PipelineRunningError,
    SelfDependencyError,
    UnknownDependencyError,
)
from pipeopt.injection import injections_of
from pipeopt.priority import Criticality, parse_criticality

if TYPE_CHECKING:
    from pipeopt.breaker import CircuitBreaker
    from pipeopt.retry import RetryPolicy

TRIGGERS: tuple[str, ...] = ("all_success", "all_done", "any_success")


@dataclass(eq=False, slots=True)
class PipelineTask:
    """One unit of work in a pipeline.

    Args:
        name: unique within its pipeline.
        func: the body; a plain function, an ``async def`` function, a
            generator (its items are collected into a list) or an async
            generator.
        dependencies: names of (or the tasks themselves) that must finish
            first; by default they must succeed (see ``trigger``).
        criticality: one of ``blocker``, ``critical``, ``high``, ``medium``,
            ``low``, ``deferred``.
        retry_policy: how failed attempts are retried; ``None`` for one attempt.
        circuit_breaker: a breaker guarding the downstream service the task
            calls; may be shared by many tasks.
        timeout: seconds an attempt may run before it is failed.
        expected_duration: a cost hint in seconds used to rank tasks by their
            remaining critical path; unknown tasks count as 1.
        cache_key: a function of the task's inputs naming its result, so a
            run store can reuse it.
        persist: whether a run store may keep the result.
        description: free text shown by ``pipeopt graph`` and the dashboard.
        group: names the task's metrics group: pipelines above a size report
            Prometheus series per group instead of per task (see
            :mod:`pipeopt.metrics`); ``None`` uses the criticality label.
        map_over: a dependency (name or task) whose result is a list (or any
            iterable): the task runs once per item, as ``name[0]``,
            ``name[1]``, ..., each with its own attempts, retries, timeout
            and state; its dependents receive the list of item results in
            input order. Added to ``dependencies`` if missing there.
        trigger: when the task runs: ``"all_success"`` (every dependency
            succeeded), ``"all_done"`` (every dependency is final) or
            ``"any_success"`` (every dependency is final, at least one
            succeeded); dependencies that did not succeed are passed as
            :class:`~pipeopt.result.Missing`.
    """

    name: str
    func: Callable[..., Any]
    dependencies: Sequence[str | PipelineTask] = ()
    criticality: Criticality | str = Criticality.MEDIUM
    retry_policy: RetryPolicy | None = None
    circuit_breaker: CircuitBreaker | None = None
    timeout: float | None = None
    expected_duration: float | None = None
    cache_key: Callable[..., str] | None = None
    persist: bool = True
    description: str = ""
    group: str | None = None
    map_over: str | PipelineTask | None = None
    trigger: str = "all_success"
    _deps: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if not callable(self.func):
            raise NotCallableError(self.name, self.func)
        self.criticality = parse_criticality(self.criticality)
        if self.map_over is not None:
            source = self.map_over
            if isinstance(source, PipelineTask):
                source = source.name
            if not isinstance(source, str) or not source:
                raise TypeError(
                    f"task {self.name!r}: map_over must be a task or a task name, "
                    f"got {type(self.map_over).__name__} {self.map_over!r}"
                )
            self.map_over = source
        self._deps = _dependency_names(self.name, self.dependencies, self.map_source)
        if self.trigger not in TRIGGERS:
            close = difflib.get_close_matches(str(self.trigger), TRIGGERS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"task {self.name!r}: trigger must be one of {', '.join(TRIGGERS)}, "
                f"got {self.trigger!r}{hint}"
            )
        self.dependencies = self._deps
        if self.timeout is not None:
            self.timeout = check_float(
                f"task {self.name!r}: timeout", self.timeout, minimum=0.0, strict_minimum=True
            )
        if self.expected_duration is not None:
            self.expected_duration = check_float(
                f"task {self.name!r}: expected_duration", self.expected_duration, minimum=0.0
            )
        if self.cache_key is not None and not callable(self.cache_key):
            raise TypeError(f"task {self.name!r}: cache_key must be callable or None")
        if self.group is not None and (not isinstance(self.group, str) or not self.group.strip()):
            raise ValueError(
                f"task {self.name!r}: group must be a non-empty string or None, got {self.group!r}"
            )

    @property
    def dependency_names(self) -> tuple[str, ...]:
        """Return the names of the tasks this one depends on, in declared order."""
        return self._deps

    @property
    def map_source(self) -> str | None:
        """Return the name of the dependency this task maps over, or ``None``."""
        return self.map_over if isinstance(self.map_over, str) else None

    @property
    def level(self) -> Criticality:
        """Return the task's own criticality as a :class:`Criticality`."""
        return parse_criticality(self.criticality)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task's function directly, outside any pipeline."""
        return self.func(*args, **kwargs)


def _dependency_names(
    task: str, dependencies: Iterable[str | PipelineTask] | str | PipelineTask, source: str | None
) -> tuple[str, ...]:
    """Return ``task``'s dependency names, deduplicated, with its map source last if missing."""
    if source is None and (type(dependencies) is list or type(dependencies) is tuple):
        # The common case first: distinct names, none of them the task's own.
        found = tuple(dependencies)
        for dep in found:
            if type(dep) is not str or dep == task:
                break
        else:
            if len(found) < 2 or len(set(found)) == len(found):
                return found
    if isinstance(dependencies, str | PipelineTask):
        dependencies = (dependencies,)
    names: list[str] = []
    for dep in dependencies:
        dep_name = dep.name if isinstance(dep, PipelineTask) else dep
        if not isinstance(dep_name, str):
            raise TypeError(
                f"task {task!r}: dependencies must be task names or tasks, "
                f"got {type(dep).__name__} {dep!r}"
            )
        if dep_name == task:
            raise SelfDependencyError(task)
        if dep_name not in names:
            names.append(dep_name)
    if source is not None:
        if source == task:
            raise SelfDependencyError(task)
        if source not in names:
            names.append(source)
    return tuple(names)


def _like(template: PipelineTask, name: str, deps: tuple[str, ...]) -> PipelineTask:
    """Return a task with ``template``'s settings (already checked) under another name."""
    task = object.__new__(PipelineTask)
    task.name = name
    task.func = template.func
    task.dependencies = task._deps = deps
    task.criticality = template.criticality
    task.retry_policy = template.retry_policy
    task.circuit_breaker = template.circuit_breaker
    task.timeout = template.timeout
    task.expected_duration = template.expected_duration
    task.cache_key = template.cache_key
    task.persist = template.persist
    task.description = template.description
    task.group = template.group
    task.map_over = template.map_over
    task.trigger = template.trigger
    return task


class Pipeline:
    """A named DAG of tasks.

    Build it with the :meth:`task` decorator or :meth:`add`; run it with
    :meth:`pipeopt.PipelineOptimizer.run`::

        pipeline = Pipeline("etl")

        @pipeline.task(criticality="critical")
        def extract() -> list[int]:
            return [1, 2, 3]

        @pipeline.task(dependencies=[extract])
        def load(extract: list[int]) -> int:
            return sum(extract)
    """

    def __init__(
        self,
        name: str = "pipeline",
        *,
        description: str = "",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"pipeline name must be a non-empty string, got {name!r}")
        self.name = name
        self.description = description
        self.params: dict[str, Any] = {}
        for key, value in (params or {}).items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(
                    f"pipeline {name!r}: parameter names must be identifiers, got {key!r}"
                )
            self.params[key] = value
        self._tasks: dict[str, PipelineTask] = {}
        self._running = 0

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, tasks={len(self._tasks)})"

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[PipelineTask]:
        return iter(self._tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __getitem__(self, name: str) -> PipelineTask:
        return self._tasks[name]

    @property
    def tasks(self) -> dict[str, PipelineTask]:
        """Return the tasks by name, in insertion order (a copy)."""
        return dict(self._tasks)

    @property
    def running(self) -> bool:
        """Return whether a run of this pipeline is in progress."""
        return self._running > 0

    def add(self, task: PipelineTask) -> PipelineTask:
        """Add ``task`` and return it.

        Unknown dependencies are allowed here (tasks may be added in any
        order) and reported by :meth:`compile`.

        Raises:
            DuplicateTaskError: a task of that name exists.
            PipelineRunningError: the pipeline is running.
        """
        if not isinstance(task, PipelineTask):
            raise TypeError(f"add() takes a PipelineTask, got {type(task).__name__}")
        if self._running:
            raise PipelineRunningError(self.name)
        if task.name in self._tasks:
            raise DuplicateTaskError(task.name)
        self._tasks[task.name] = task
        return task

    def add_many(
        self,
        names: Iterable[str],
        func: Callable[..., Any],
        dependencies: Iterable[Iterable[str | PipelineTask] | str | PipelineTask] | None = None,
        *,
        criticality: Criticality | str = Criticality.MEDIUM,
        retry_policy: RetryPolicy | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        timeout: float | None = None,
        expected_duration: float | None = None,
        cache_key: Callable[..., str] | None = None,
        persist: bool = True,
        description: str = "",
        group: str | None = None,
        map_over: str | PipelineTask | None = None,
        trigger: str = "all_success",
    ) -> list[PipelineTask]:
        """Add one task per name, all running ``func`` with the same settings; return them.

        The fast way to build a large pipeline from a table: the settings
        are checked once for all rows, and each row costs a few attribute
        stores. The rows are checked as a whole before any is added, so a
        bad row adds nothing. As with :meth:`add`, dependencies may name
        tasks added later; :meth:`compile` reports unknown ones.

        Args:
            names: the task names, one per task.
            func: the body every task runs.
            dependencies: one row per name, in the same order: the names
                (or tasks) that task depends on; ``None`` for no dependencies.
                A generator of rows is cheapest for large tables: its rows
                are made while the garbage collector is held off.
            criticality: as for :class:`PipelineTask`, shared by every
                task; so are ``retry_policy``, ``circuit_breaker``,
                ``timeout``, ``expected_duration``, ``cache_key``,
                ``persist``, ``description``, ``group``, ``map_over`` and
                ``trigger``.

        Raises:
            DuplicateTaskError: a name is taken, or given twice.
            SelfDependencyError: a row names its own task.
            ValueError: a name is not a non-empty string, or ``dependencies``
                has more or fewer rows than there are names.
            PipelineRunningError: the pipeline is running.
        """
        if self._running:
            raise PipelineRunningError(self.name)
        names = names if isinstance(names, list) else list(names)
        if not names:
            return []
        with holding_gc(len(names)):  # rows given lazily are made under the hold too
            rows: Iterable[Iterable[str | PipelineTask] | str | PipelineTask]
            if dependencies is None:
                rows = itertools.repeat(())
            else:
                rows = dependencies if isinstance(dependencies, list) else list(dependencies)
                if len(rows) != len(names):
                    raise ValueError(
                        f"add_many: dependencies has {len(rows)} rows for {len(names)} names; "
                        "give one row (empty for none) per name"
                    )
            # The first task checks the shared settings once, for every row.
            template = PipelineTask(
                names[0],
                func,
                (),
                criticality=criticality,
                retry_policy=retry_policy,
                circuit_breaker=circuit_breaker,
                timeout=timeout,
                expected_duration=expected_duration,
                cache_key=cache_key,
                persist=persist,
                description=description,
                group=group,
                map_over=map_over,
                trigger=trigger,
            )
            source = template.map_source
            tasks = self._tasks
            added: list[PipelineTask] = []
            try:
                for name, row in zip(names, rows, strict=False):
                    if not isinstance(name, str) or not name.strip():
                        raise ValueError(f"task name must be a non-empty string, got {name!r}")
                    if name in tasks:
                        raise DuplicateTaskError(name)
                    deps = _dependency_names(name, row, source) if row or source else ()
                    task = tasks[name] = _like(template, name, deps)
                    added.append(task)
            except BaseException:
                for task in added:  # all or nothing
                    del tasks[task.name]
                raise
        return added

    @overload
    def task(self, func: Callable[..., Any], /) -> PipelineTask: ...

    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        dependencies: Iterable[str | PipelineTask] | str | PipelineTask = (),
        criticality: Criticality | str = Criticality.MEDIUM,
        retry_policy: RetryPolicy | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        timeout: float | None = None,
        expected_duration: float | None = None,
        cache_key: Callable[..., str] | None = None,
        persist: bool = True,
        description: str | None = None,
        group: str | None = None,
        map_over: str | PipelineTask | None = None,
        trigger: str = "all_success",
    ) -> Callable[[Callable[..., Any]], PipelineTask]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        dependencies: Iterable[str | PipelineTask] | str | PipelineTask = (),
        criticality: Criticality | str = Criticality.MEDIUM,
        retry_policy: RetryPolicy | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        timeout: float | None = None,
        expected_duration: float | None = None,
        cache_key: Callable[..., str] | None = None,
        persist: bool = True,
        description: str | None = None,
        group: str | None = None,
        map_over: str | PipelineTask | None = None,
        trigger: str = "all_success",
    ) -> PipelineTask | Callable[[Callable[..., Any]], PipelineTask]:
        """Register a function as a task; use bare (``@p.task``) or with options.

        The task's name defaults to the function's name; the decorated name
        is bound to the :class:`PipelineTask`, which can be passed as a
        dependency and still be called like the function.
        """

        def register(f: Callable[..., Any]) -> PipelineTask:
            if isinstance(dependencies, str | PipelineTask):
                deps: tuple[str | PipelineTask, ...] = (dependencies,)
            else:
                deps = tuple(dependencies)
            return self.add(
                PipelineTask(
                    name=name if name is not None else getattr(f, "__name__", repr(f)),
                    func=f,
                    dependencies=deps,
                    criticality=criticality,
                    retry_policy=retry_policy,
                    circuit_breaker=circuit_breaker,
                    timeout=timeout,
                    expected_duration=expected_duration,
                    cache_key=cache_key,
                    persist=persist,
                    description=description
                    if description is not None
                    else (inspect.getdoc(f) or "").split("\n", 1)[0],
                    group=group,
                    map_over=map_over,
                    trigger=trigger,
                )
            )

        if func is not None:
            return register(func)
        return register

    def compile(self) -> CompiledPipeline:
        """Validate the whole graph and return its compiled form.

        Raises:
            UnknownDependencyError: a dependency names no task (with a suggestion).
            CycleError: the graph has a cycle (its tasks listed in order).
            TaskSignatureError: a parameter matches neither ``context`` nor a dependency.
        """
        with holding_gc(len(self._tasks)):
            return CompiledPipeline(self.name, list(self._tasks.values()), self.params)

    def validate(self) -> None:
        """Raise the first problem :meth:`compile` would find; return if none."""
        self.compile()


# Criticality members and labels to plain level numbers (members hash as their value).
_LEVEL_OF: dict[object, int] = {
    **{c.label: int(c) for c in Criticality},
    **{int(c): int(c) for c in Criticality},
}


class CompiledPipeline:
    """A validated pipeline in index form, ready for the scheduler.

    Every pass is a loop over flat lists (no per-edge objects), and every
    list below holds the same int object for a task index: compiling costs
    a few microseconds and a few hundred bytes per task.

    Attributes:
        tasks: the tasks in insertion order; index ``i`` everywhere below.
        index: task name -> index.
        names: the task names, by index.
        dependencies: per task, the indices it waits on.
        dependents: per task, the indices waiting on it.
        order: a topological order: insertion order when every task was added
            after its dependencies, else dependencies first and insertion
            order among peers.
        levels: effective criticality per task (inherited from dependents).
        critical_path: remaining critical path per task, in expected seconds.
        injections: how to call each task's function.
        map_sources: per task, the index of the dependency it maps over, or -1.
        params: the pipeline's declared parameters and their defaults.
    """

    def __init__(
        self, name: str, tasks: list[PipelineTask], params: Mapping[str, Any] | None = None
    ) -> None:
        self.name = name
        self.tasks = tasks
        self.params: dict[str, Any] = dict(params or {})
        self.names: list[str] = [task.name for task in tasks]
        self.index: dict[str, int] = dict(zip(self.names, range(len(tasks)), strict=True))
        if len(self.index) != len(tasks):
            counts = collections.Counter(self.names)
            raise DuplicateTaskError(next(n for n in self.names if counts[n] > 1))
        # One int object per index, shared by every list below.
        ids = list(self.index.values())
        get = self.index.__getitem__
        try:
            self.dependencies: list[tuple[int, ...]] = [
                tuple(map(get, task._deps)) if task._deps else () for task in tasks
            ]
        except KeyError:
            self._raise_unknown_dependency()
            raise
        lists: list[list[int]] = [[] for _ in ids]
        for i, deps_i in zip(ids, self.dependencies, strict=True):
            for d in deps_i:
                lists[d].append(i)
        self.dependents: list[tuple[int, ...]] = [tuple(d) if d else () for d in lists]
        del lists
        self.order = self._toposort(ids)
        self.levels = self._inherit_levels()
        self.critical_path = self._critical_path()
        self.injections = injections_of(tasks)
        self.map_sources: list[int] = [
            get(task.map_over) if isinstance(task.map_over, str) else -1 for task in tasks
        ]

    def __len__(self) -> int:
        return len(self.tasks)

    def _raise_unknown_dependency(self) -> None:
        for task in self.tasks:
            for dep in task.dependency_names:
                if dep not in self.index:
                    close = difflib.get_close_matches(dep, list(self.index), n=1, cutoff=0.6)
                    raise UnknownDependencyError(task.name, dep, close[0] if close else None)

    def _toposort(self, ids: list[int]) -> list[int]:
        # Tables added in order (every task after its dependencies) are sorted already.
        for i, deps_i in zip(ids, self.dependencies, strict=True):
            if deps_i and max(deps_i) >= i:
                break
        else:
            return ids
        remaining = list(map(len, self.dependencies))
        order = [i for i, r in zip(ids, remaining, strict=True) if not r]
        dependents = self.dependents
        for i in order:  # the list grows while we walk it
            for j in dependents[i]:
                left = remaining[j] - 1
                remaining[j] = left
                if not left:
                    order.append(j)
        if len(order) != len(self.tasks):
            raise CycleError(self._find_cycle({i for i, r in enumerate(remaining) if r > 0}))
        return order

    def _find_cycle(self, stuck: set[int]) -> list[str]:
        # Every stuck task has a stuck dependency, so walking dependencies
        # from any stuck task must revisit one: that loop is a cycle.
        start = min(stuck)
        seen: dict[int, int] = {}
        path: list[int] = []
        node = start
        while node not in seen:
            seen[node] = len(path)
            path.append(node)
            node = next(d for d in self.dependencies[node] if d in stuck)
        loop = path[seen[node] :]
        # Report in "a needs b needs c needs a" order, starting at the earliest-added task.
        first = loop.index(min(loop))
        loop = loop[first:] + loop[:first]
        return [self.tasks[i].name for i in [*loop, loop[0]]]

    def _inherit_levels(self) -> list[int]:
        own = [task.criticality for task in self.tasks]
        try:
            levels = list(map(_LEVEL_OF.__getitem__, own))
        except (KeyError, TypeError):  # a criticality changed after the task was made
            levels = [int(parse_criticality(c)) for c in own]
        if not levels or min(levels) == max(levels):
            return levels  # one level for all: nothing to inherit
        dependents = self.dependents
        at = levels.__getitem__
        for i in reversed(self.order):
            below = dependents[i]
            if below:
                urgent = min(map(at, below))
                levels[i] = min(levels[i], urgent)
        return levels

    def _critical_path(self, costs: Sequence[float] | None = None) -> list[float]:
        path = [expected_cost(task) for task in self.tasks] if costs is None else list(costs)
        dependents = self.dependents
        at = path.__getitem__
        for i in reversed(self.order):
            below = dependents[i]
            if len(below) == 1:
                path[i] += path[below[0]]
            elif below:
                path[i] += max(map(at, below))
        return path

    def reestimate(self, costs: Sequence[float]) -> None:
        """Recompute ``critical_path`` with ``costs[i]`` seconds for task ``i``.

        For costs known only at run time, such as durations learned from
        earlier runs; levels and order do not change.

        Raises:
            ValueError: ``costs`` does not have one entry per task.
        """
        if len(costs) != len(self.tasks):
            raise ValueError(
                f"costs must have one entry per task ({len(self.tasks)}), got {len(costs)}"
            )
        self.critical_path = self._critical_path(costs)

    def longest_path(self) -> float:
        """Return the length of the graph's critical path in expected seconds."""
        return max(self.critical_path, default=0.0)

    def descendants(self, i: int) -> list[int]:
        """Return every task that depends on task ``i``, transitively."""
        seen: set[int] = set()
        stack = list(self.dependents[i])
        while stack:
            j = stack.pop()
            if j not in seen:
                seen.add(j)
                stack.extend(self.dependents[j])
        return sorted(seen)


def expected_cost(task: PipelineTask) -> float:
    """Return the task's cost hint in seconds (1.0 when unknown)."""
    return 1.0 if task.expected_duration is None else task.expected_duration
