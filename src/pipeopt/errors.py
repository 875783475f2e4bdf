"""The pipeopt exception tree.

Every error pipeopt raises on purpose derives from :class:`PipeoptError`, and
each one also subclasses the builtin it specialises, so callers may catch
either::

    PipeoptError
    ├── PipelineError                       invalid pipeline or bad use of one
    │   ├── CycleError(ValueError)          .cycle: task names in order, first repeated last
    │   ├── SelfDependencyError(ValueError) .task
    │   ├── UnknownDependencyError(KeyError).task, .dependency, .suggestion
    │   ├── DuplicateTaskError(ValueError)  .task
    │   ├── UnknownCriticalityError(ValueError) .value
    │   ├── NotCallableError(TypeError)     .task
    │   ├── PipelineRunningError(RuntimeError) .pipeline
    │   ├── NotPicklableError(TypeError)    .task (process executor)
    │   ├── TaskSignatureError(TypeError)   .task, .parameter
    │   └── PipelineLoadError(ValueError)   a FILE[:PIPELINE] that does not load
    ├── TaskError                           a task body's failure, as seen by callers
    │   ├── TaskTimeoutError(TimeoutError)  .task, .timeout
    │   └── UpstreamFailedError(RuntimeError) .task, .upstream
    ├── RetryError(RuntimeError)            .last_exception, .attempts
    ├── CircuitOpenError(RuntimeError)      .breaker, .retry_after
    ├── SinkError(RuntimeError)             a sink that cannot be opened or written
    └── RunStoreError(RuntimeError)         a run store that is missing, locked or corrupt

Parameter validation raises the plain builtins (``ValueError``/``TypeError``)
with a message naming the parameter, the rule and the value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

# Interrupts and cancellations: they say nothing about a task or the service it
# called, so retries never repeat them and circuit breakers never count them.
INTERRUPTS: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    asyncio.CancelledError,
    concurrent.futures.CancelledError,
)


class PipeoptError(Exception):
    """Base class of every error pipeopt raises on purpose."""


class PipelineError(PipeoptError):
    """A pipeline is invalid or used wrongly; raised before anything runs."""


class CycleError(PipelineError, ValueError):
    """The dependency graph has a cycle.

    ``cycle`` lists the task names along the cycle, the first name repeated
    at the end: ``("a", "b", "c", "a")`` means a needs b needs c needs a.
    """

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        path = " -> ".join(self.cycle)
        super().__init__(f"dependency cycle: {path}; remove one of these dependencies")


class SelfDependencyError(PipelineError, ValueError):
    """A task lists itself as a dependency."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"task {task!r} depends on itself; remove {task!r} from its dependencies")


class UnknownDependencyError(PipelineError, KeyError):
    """A task depends on a name that is not in the pipeline."""

    def __init__(self, task: str, dependency: str, suggestion: str | None = None) -> None:
        self.task = task
        self.dependency = dependency
        self.suggestion = suggestion
        hint = f"; did you mean {suggestion!r}?" if suggestion else "; add that task first"
        super().__init__(f"task {task!r} depends on unknown task {dependency!r}{hint}")

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0])


class DuplicateTaskError(PipelineError, ValueError):
    """Two tasks share a name."""

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"a task named {task!r} already exists; task names must be unique")


class UnknownCriticalityError(PipelineError, ValueError):
    """A criticality label is not one of the known labels."""

    def __init__(self, value: object, choices: Sequence[str]) -> None:
        self.value = value
        self.choices = tuple(choices)
        super().__init__(f"criticality must be one of {', '.join(self.choices)}; got {value!r}")


class NotCallableError(PipelineError, TypeError):
    """A task's ``func`` is not callable."""

    def __init__(self, task: str, func: object) -> None:
        self.task = task
        super().__init__(
            f"task {task!r}: func must be callable, got {type(func).__name__} {func!r}"
        )


class PipelineRunningError(PipelineError, RuntimeError):
    """A pipeline was changed while it runs."""

    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        super().__init__(
            f"pipeline {pipeline!r} is running; add tasks before calling run() or after it returns"
        )


class NotPicklableError(PipelineError, TypeError):
    """A task cannot be sent to a process or a remote worker."""

    def __init__(self, task: str, reason: str) -> None:
        self.task = task
        super().__init__(
            f"task {task!r} cannot be pickled for another process ({reason}); "
            "define its function at module level, not as a lambda or closure"
        )


class PipelineLoadError(PipelineError, ValueError):
    """A ``FILE[:PIPELINE]`` reference does not name a loadable pipeline."""


class TaskError(PipeoptError):
    """Base class of failures attributed to one task."""


class TaskTimeoutError(TaskError, TimeoutError):
    """An attempt ran longer than its task's ``timeout``."""

    def __init__(self, task: str, timeout: float) -> None:
        self.task = task
        self.timeout = timeout
        super().__init__(f"task {task!r} exceeded its timeout of {timeout:g}s")


class UpstreamFailedError(TaskError, RuntimeError):
    """A task was skipped because a task it depends on failed."""

    def __init__(self, task: str, upstream: str) -> None:
        self.task = task
        self.upstream = upstream
        super().__init__(f"task {task!r} skipped: upstream task {upstream!r} failed")


class RetryError(PipeoptError, RuntimeError):
    """Every allowed attempt failed; carries the last exception and the count."""

    def __init__(self, last_exception: BaseException, attempts: int) -> None:
        self.last_exception = last_exception
        self.attempts = attempts
        super().__init__(
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
            f"{type(last_exception).__name__}: {last_exception}"
        )


class CircuitOpenError(PipeoptError, RuntimeError):
    """A call was refused because its circuit breaker is open."""

    def __init__(self, breaker: str, retry_after: float) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        when = (
            "after a running trial call ends"
            if retry_after == float("inf")
            else f"in {retry_after:.3g}s"
        )
        super().__init__(f"circuit breaker {breaker!r} is open; next trial {when}")


class SinkError(PipeoptError, RuntimeError):
    """A sink cannot be opened or written."""


class RunStoreError(PipeoptError, RuntimeError):
    """The run store is missing, locked or corrupt."""


class TaskSignatureError(PipelineError, TypeError):
    """A task function has a parameter that nothing can fill."""

    def __init__(self, task: str, parameter: str, dependencies: Sequence[str]) -> None:
        self.task = task
        self.parameter = parameter
        deps = ", ".join(repr(d) for d in dependencies) or "none"
        super().__init__(
            f"task {task!r}: parameter {parameter!r} matches no dependency "
            f"(dependencies: {deps}); name it 'context' or after a dependency, "
            "or give it a default"
        )
