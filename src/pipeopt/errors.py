"""The pipeopt exception tree.

Every error pipeopt raises on purpose derives from :class:`PipeoptError`, and
each one also subclasses the builtin it specialises, so callers may catch
either::

    PipeoptError(Exception)
    ├── PipelineError                       invalid pipeline or bad use of one
    │   ├── CycleError(ValueError)          .cycle: task names in order, first repeated last
    │   ├── SelfDependencyError(ValueError) .task
    │   ├── UnknownDependencyError(KeyError).task, .dependency, .suggestion
    │   ├── DuplicateTaskError(ValueError)  .task
    │   ├── UnknownCriticalityError(ValueError) .value, .choices
    │   ├── NotCallableError(TypeError)     .task
    │   ├── PipelineRunningError(RuntimeError) .pipeline
    │   ├── NotPicklableError(TypeError)    .task, .reason (process and Dask executors)
    │   ├── MissingMainGuardError(RuntimeError) .script (process executor)
    │   ├── TaskSignatureError(TypeError)   .task, .parameter
    │   ├── ParameterError(ValueError)      .name, .suggestion: a bad run parameter
    │   └── PipelineLoadError(ValueError)   a FILE[:PIPELINE] that does not load
    ├── TaskError                           a task body's failure, as seen by callers
    │   ├── TaskTimeoutError(TimeoutError)  .task, .timeout
    │   ├── UpstreamFailedError(RuntimeError) .task, .upstream
    │   ├── WorkerCrashedError(RuntimeError) .task, .attempt, .pid, .exitcode
    │   ├── RemoteTaskError(RuntimeError)   a body's error that could not be pickled back
    │   ├── MapSourceError(TypeError)       .task, .source: mapped over a non-list
    │   └── MappedItemsFailedError(RuntimeError) .task, .failed, .first
    ├── RemoteTraceback                     .text: another process's traceback, as a __cause__
    ├── RetryError(RuntimeError)            .last_exception, .attempts
    ├── CircuitOpenError(RuntimeError)      .breaker, .retry_after
    ├── SinkError(RuntimeError)             a sink that cannot be opened or written
    │   ├── WriteAbortedError               .report: what was written before the sink failed
    │   │   └── DeadLetterBudgetError(ValueError) .dead_letters, .rows_seen, .limit
    │   └── LoadConflictError               .key, .expected, .found: the ledger moved
    ├── WriteCancelledError(CancelledError, RuntimeError) .report: a load stopped by cancellation
    ├── RunStoreError(RuntimeError)         a run store that is missing, locked or corrupt
    │   └── RunLockedError                  .run_id, .host, .pid: another process resumes the run
    ├── BenchmarkError(RuntimeError)        a benchmark pipeline that did not succeed
    └── UsageError(ValueError)              bad command-line input (one line, exit code 2)

    KeyboardInterrupt
    └── RunInterrupted                      .result: the partial RunResult, .reason

:class:`RunInterrupted` is the one class outside ``PipeoptError``: it stands
for Ctrl-C (or a signal handler's ``KeyboardInterrupt``), and deriving from
``Exception`` would let every ``except Exception`` swallow it.

Parameter validation raises the plain builtins (``ValueError``/``TypeError``)
with a message naming the parameter, the rule and the value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeopt.result import RunResult
    from pipeopt.sinks.write import WriteReport

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

    #: Names a message lists at each end of a longer cycle (all are in ``cycle``).
    SHOWN = 10

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        shown = self.SHOWN
        if len(self.cycle) > 2 * shown + 1:
            hidden = len(self.cycle) - 2 * shown
            names = [*self.cycle[:shown], f"({hidden:,} more)", *self.cycle[-shown:]]
        else:
            names = list(self.cycle)
        path = " -> ".join(names)
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
    """A pipeline was changed while it runs, or an optimizer already runs one.

    ``pipeline`` names the pipeline that is running.
    """

    def __init__(self, pipeline: str, message: str | None = None) -> None:
        self.pipeline = pipeline
        default = f"pipeline {pipeline!r} is running; add tasks before calling run() or after"
        super().__init__(message or f"{default} it returns")


class NotPicklableError(PipelineError, TypeError):
    """A task cannot be sent to a worker process or a Dask worker.

    ``reason`` says which object the task uses that cannot be pickled.
    """

    def __init__(self, task: str, reason: str) -> None:
        self.task = task
        self.reason = reason
        super().__init__(
            f"task {task!r} cannot be sent to another process: {reason}; create such "
            "objects inside the task body (pass a path or settings instead), or run it "
            "with executor='thread'"
        )


class MissingMainGuardError(PipelineError, RuntimeError):
    """A script runs a pipeline when imported, so worker processes cannot start."""

    def __init__(self, script: str) -> None:
        self.script = script
        super().__init__(
            f"{script} runs its pipeline when it is imported, and worker processes of the "
            "process executor import it: put the code that runs the pipeline under "
            '`if __name__ == "__main__":`'
        )


class ParameterError(PipelineError, ValueError):
    """A run parameter is unknown, or its value does not fit the declared default."""

    def __init__(self, message: str, name: str, suggestion: str | None = None) -> None:
        self.name = name
        self.suggestion = suggestion
        super().__init__(message)


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


class MapSourceError(TaskError, TypeError):
    """A mapped task's upstream returned something that is not a list of items."""

    def __init__(self, task: str, source: str, value: object) -> None:
        self.task = task
        self.source = source
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"task {task!r} maps over {source!r}, which returned {type(value).__name__} {shown}; "
            f"make {source!r} return a list (or another iterable that is not a string or a dict)"
        )


class MappedItemsFailedError(TaskError, RuntimeError):
    """Some items of a mapped task did not succeed.

    ``failed`` counts them; ``first`` is the name of the first one.
    """

    def __init__(self, task: str, failed: int, total: int, first: str) -> None:
        self.task = task
        self.failed = failed
        self.total = total
        self.first = first
        super().__init__(
            f"task {task!r}: {failed} of {total} mapped items did not succeed (first: {first!r})"
        )


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


class RunLockedError(RunStoreError):
    """Another live process is resuming the same run."""

    def __init__(self, run_id: str, host: str, pid: int) -> None:
        self.run_id = run_id
        self.host = host
        self.pid = pid
        super().__init__(
            f"run {run_id} is being resumed by another process (pid {pid} on {host}); "
            "wait for it to end, or stop it, then resume again"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.run_id, self.host, self.pid))


class TaskSignatureError(PipelineError, TypeError):
    """A task function has a parameter that nothing can fill."""

    def __init__(
        self, task: str, parameter: str, dependencies: Sequence[str], *, hint: str | None = None
    ) -> None:
        self.task = task
        self.parameter = parameter
        deps = ", ".join(repr(d) for d in dependencies) or "none"
        if hint is not None:
            super().__init__(f"task {task!r} has no parameter {parameter!r}: {hint}")
            return
        super().__init__(
            f"task {task!r}: parameter {parameter!r} matches no dependency "
            f"(dependencies: {deps}); name it 'context', 'params' or after a dependency, "
            "or give it a default"
        )


class WorkerCrashedError(TaskError, RuntimeError):
    """A worker process died while it ran an attempt; retry policies may retry it.

    Attributes:
        task: the task whose attempt was lost.
        attempt: the attempt's number.
        pid: the dead process's id.
        exitcode: its exit code; negative for the signal that killed it.
    """

    def __init__(self, task: str, attempt: int, pid: int | None, exitcode: int | None) -> None:
        self.task = task
        self.attempt = attempt
        self.pid = pid
        self.exitcode = exitcode
        super().__init__(
            f"task {task!r}: worker process {pid} died ({_describe_exit(exitcode)}) "
            f"while running attempt {attempt}; the attempt failed and a retry policy may retry it"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task, self.attempt, self.pid, self.exitcode))


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class RemoteTaskError(TaskError, RuntimeError):
    """Stands in for a body's exception that could not be pickled back to the driver."""


class RemoteTraceback(PipeoptError):
    """The formatted traceback of an exception raised in another process.

    Set as the ``__cause__`` of the error it explains, so that a traceback
    printed in the driver shows where the body failed.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class WriteAbortedError(SinkError):
    """:func:`~pipeopt.sinks.write_batches` stopped because the sink, not the rows, failed.

    Attributes:
        report: what was written and dead-lettered before the failure.
    """

    def __init__(self, message: str, report: WriteReport) -> None:
        self.report = report
        super().__init__(
            f"{message} ({report.rows_written} rows written and "
            f"{report.rows_dead_lettered} dead-lettered before it)"
        )


class DeadLetterBudgetError(WriteAbortedError, ValueError):
    """More rows were refused than ``max_dead_letters`` allows; the load stopped.

    Attributes:
        report: what was written and dead-lettered before the load stopped.
        dead_letters: rows refused in the whole load when it stopped.
        rows_seen: input rows the load had handled.
        limit: the ``max_dead_letters`` in force.
    """

    def __init__(
        self, message: str, report: WriteReport, dead_letters: int, rows_seen: int, limit: float
    ) -> None:
        self.dead_letters = dead_letters
        self.rows_seen = rows_seen
        self.limit = limit
        super().__init__(message, report)


class LoadConflictError(SinkError):
    """Another writer moved a load's ledger first; nothing of this write was committed.

    :func:`~pipeopt.sinks.write_batches` handles it by going on from where
    the ledger stands, so two attempts of one load never write a row twice.

    Attributes:
        key: the load key.
        expected: the input rows the writer believed consumed.
        found: the input rows the ledger shows (``None``: no ledger row).
    """

    def __init__(self, key: str, expected: int, found: int | None) -> None:
        self.key = key
        self.expected = expected
        self.found = found
        super().__init__(
            f"load {key!r}: the ledger shows {found} input rows consumed, expected {expected}; "
            "another attempt of this load wrote meanwhile"
        )


class WriteCancelledError(PipeoptError, concurrent.futures.CancelledError, RuntimeError):
    """The attempt was cancelled (timed out, interrupted) while it loaded; it wrote no more.

    A cancellation, so retry policies never repeat it and breakers never count it.

    Attributes:
        report: what was written before; the ledger holds the same, so the
            next attempt goes on from there.
    """

    def __init__(self, report: WriteReport) -> None:
        self.report = report
        super().__init__(
            f"the load was cancelled after {report.rows_written} rows written and "
            f"{report.rows_dead_lettered} dead-lettered; a retry or resume goes on from there"
        )


class BenchmarkError(PipeoptError, RuntimeError):
    """A benchmark pipeline did not succeed, so its timings mean nothing."""


class UsageError(PipeoptError, ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (or a signal handler's ``KeyboardInterrupt``).

    Raised by :meth:`~pipeopt.PipelineOptimizer.run` after every task's final
    state is recorded; ``except KeyboardInterrupt`` catches it. (A run
    stopped by ``optimizer.interrupt()`` from another thread returns its
    cancelled result instead: the caller did not ask to be interrupted.)

    Attributes:
        result: the partial result: what finished, what was cancelled.
        reason: the interrupt that stopped the run (a ``KeyboardInterrupt``
            or a subclass a signal handler raised).
    """

    def __init__(self, result: RunResult | None, reason: BaseException | None = None) -> None:
        self.result = result
        self.reason = reason
        name = f"run {result.run_id}" if result is not None else "run"
        super().__init__(f"{name} interrupted")
