"""pipeopt: run data pipelines fast and safely.

Build a :class:`Pipeline` of tasks, run it with a :class:`PipelineOptimizer`,
and read the :class:`RunResult`::

    from pipeopt import Pipeline, PipelineOptimizer

    pipeline = Pipeline("etl")

    @pipeline.task(criticality="critical")
    def extract() -> list[int]:
        return [1, 2, 3]

    @pipeline.task(dependencies=[extract])
    def load(extract: list[int]) -> int:
        return sum(extract)

    result = PipelineOptimizer(max_workers=4).run(pipeline)
    assert result.results["load"] == 6
"""

from typing import TYPE_CHECKING, Any

from pipeopt.batching import AdaptiveBatcher, FixedBatcher
from pipeopt.breaker import BreakerState, CircuitBreaker
from pipeopt.context import ExecutionContext, TaskContext
from pipeopt.errors import (
    BenchmarkError,
    CircuitOpenError,
    CycleError,
    DeadLetterBudgetError,
    DuplicateTaskError,
    LoadConflictError,
    MappedItemsFailedError,
    MapSourceError,
    MissingMainGuardError,
    NotCallableError,
    NotPicklableError,
    ParameterError,
    PipelineError,
    PipelineLoadError,
    PipelineRunningError,
    PipeoptError,
    RemoteTaskError,
    RemoteTraceback,
    RetryError,
    RunInterrupted,
    RunLockedError,
    RunStoreError,
    SelfDependencyError,
    SinkError,
    TaskError,
    TaskSignatureError,
    TaskTimeoutError,
    UnknownCriticalityError,
    UnknownDependencyError,
    UpstreamFailedError,
    UsageError,
    WorkerCrashedError,
    WriteAbortedError,
    WriteCancelledError,
)
from pipeopt.graph import Pipeline, PipelineTask
from pipeopt.optimizer import PipelineOptimizer
from pipeopt.priority import LABELS, Criticality, PriorityJobQueue
from pipeopt.result import Missing, RunResult, RunSnapshot, RunStatus, TaskOutcome, TaskState
from pipeopt.retry import RetryPolicy, retry_with_backoff
from pipeopt.streaming import (
    read_csv_chunks,
    read_parquet_chunks,
    stream_dataframe,
    stream_iterable,
)

if TYPE_CHECKING:
    from pipeopt.bench import BenchmarkSuite
    from pipeopt.dashboard import PipelineDashboard

__version__ = "0.1.0"

__all__ = [
    "LABELS",
    "AdaptiveBatcher",
    "BenchmarkError",
    "BenchmarkSuite",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "Criticality",
    "CycleError",
    "DeadLetterBudgetError",
    "DuplicateTaskError",
    "ExecutionContext",
    "FixedBatcher",
    "LoadConflictError",
    "MapSourceError",
    "MappedItemsFailedError",
    "Missing",
    "MissingMainGuardError",
    "NotCallableError",
    "NotPicklableError",
    "ParameterError",
    "Pipeline",
    "PipelineDashboard",
    "PipelineError",
    "PipelineLoadError",
    "PipelineOptimizer",
    "PipelineRunningError",
    "PipelineTask",
    "PipeoptError",
    "PriorityJobQueue",
    "RemoteTaskError",
    "RemoteTraceback",
    "RetryError",
    "RetryPolicy",
    "RunInterrupted",
    "RunLockedError",
    "RunResult",
    "RunSnapshot",
    "RunStatus",
    "RunStoreError",
    "SelfDependencyError",
    "SinkError",
    "TaskContext",
    "TaskError",
    "TaskOutcome",
    "TaskSignatureError",
    "TaskState",
    "TaskTimeoutError",
    "UnknownCriticalityError",
    "UnknownDependencyError",
    "UpstreamFailedError",
    "UsageError",
    "WorkerCrashedError",
    "WriteAbortedError",
    "WriteCancelledError",
    "read_csv_chunks",
    "read_parquet_chunks",
    "retry_with_backoff",
    "stream_dataframe",
    "stream_iterable",
]


# Names whose modules need optional extras (aiohttp, matplotlib) load on first use.
_LAZY = {"PipelineDashboard": "pipeopt.dashboard", "BenchmarkSuite": "pipeopt.bench"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeopt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
