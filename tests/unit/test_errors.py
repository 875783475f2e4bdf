"""The exception tree: one module, one root, a builtin beside it, everything exported."""

from __future__ import annotations

import _thread
import importlib
import inspect
import pickle
import pkgutil
import threading

import pytest

import pipeopt
from pipeopt import errors
from pipeopt.errors import (
    PipeoptError,
    RunInterrupted,
    TaskError,
    UsageError,
    WorkerCrashedError,
    WriteAbortedError,
)

ERROR_CLASSES = [
    obj
    for _, obj in inspect.getmembers(errors, inspect.isclass)
    if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
]
ROOTS = {PipeoptError, RunInterrupted}


def test_every_error_is_defined_in_the_errors_module() -> None:
    strays = []
    for info in pkgutil.walk_packages(pipeopt.__path__, prefix="pipeopt."):
        if info.name.endswith(".__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if not (isinstance(obj, type) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != info.name or info.name == errors.__name__:
                continue
            # A private marker a signal handler raises to tell SIGTERM from Ctrl-C.
            if name.startswith("_") and issubclass(obj, KeyboardInterrupt):
                continue
            strays.append(f"{info.name}.{name}")
    assert strays == []


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_derives_from_the_root_and_a_builtin(cls: type[BaseException]) -> None:
    if cls is RunInterrupted:
        # Deliberately not an Exception: `except Exception` must not swallow Ctrl-C.
        assert issubclass(cls, KeyboardInterrupt)
        assert not issubclass(cls, Exception)
        return
    assert issubclass(cls, PipeoptError)
    if cls in (PipeoptError, errors.PipelineError, TaskError, errors.RemoteTraceback):
        return  # the branches themselves; every leaf below names a builtin too
    builtins = [
        b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException)
    ]
    assert builtins, f"{cls.__name__} should also subclass the builtin it specialises"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_is_exported_from_pipeopt_and_drawn_in_the_tree(
    cls: type[BaseException],
) -> None:
    assert getattr(pipeopt, cls.__name__) is cls
    assert cls.__name__ in pipeopt.__all__
    assert errors.__doc__ is not None
    assert cls.__name__ in errors.__doc__


def test_documented_old_locations_still_import() -> None:
    from pipeopt.executors import WorkerCrashedError as from_executors
    from pipeopt.sinks import SinkError
    from pipeopt.sinks import WriteAbortedError as from_sinks

    assert from_executors is WorkerCrashedError
    assert from_sinks is WriteAbortedError
    assert SinkError is errors.SinkError


def test_worker_crashed_error_keeps_its_data_through_pickle() -> None:
    error = WorkerCrashedError("load", 2, 4242, -9)
    assert "killed by SIGKILL" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.task, copy.attempt, copy.pid, copy.exitcode) == ("load", 2, 4242, -9)
    assert isinstance(copy, TaskError)
    assert isinstance(copy, RuntimeError)


def test_usage_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--port"):
        raise UsageError("--port must be between 1 and 65535, got 99999")


def test_an_interrupted_run_raises_run_interrupted_with_the_partial_result() -> None:
    release = threading.Event()
    pipeline = pipeopt.Pipeline("stopped")

    @pipeline.task()
    def first() -> int:
        return 1

    @pipeline.task(dependencies=[first])
    def second() -> int:
        _thread.interrupt_main()  # what Ctrl-C does to the main thread
        release.wait(5)
        return 2

    @pipeline.task(dependencies=[second])
    def third() -> int:
        return 3

    optimizer = pipeopt.PipelineOptimizer(max_workers=2, interrupt_grace=0.0)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            optimizer.run(pipeline)
    finally:
        release.set()
    assert isinstance(info.value, RunInterrupted)
    result = info.value.result
    assert result is not None
    assert result.interrupted
    assert result.status is pipeopt.RunStatus.CANCELLED
    assert result.results == {"first": 1}
    assert result.tasks["third"].state is not pipeopt.TaskState.SUCCEEDED
    assert isinstance(info.value.reason, KeyboardInterrupt)
    assert info.value.__cause__ is info.value.reason
