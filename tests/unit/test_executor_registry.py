"""The executor registry: one list of names, one resolver, early and clear rejections."""

from __future__ import annotations

import pytest

from pipeopt import PipelineOptimizer
from pipeopt.executors import (
    EXECUTOR_NAMES,
    Executor,
    SyncExecutor,
    create_executor,
    executor_names,
)

CHOICES = "thread, process, async, sync, dask"


def test_the_names_are_listed_once_with_the_default_first() -> None:
    assert executor_names() == EXECUTOR_NAMES
    assert ", ".join(EXECUTOR_NAMES) == CHOICES
    assert PipelineOptimizer().executor.name == EXECUTOR_NAMES[0]


@pytest.mark.parametrize("name", ["thread", "sync", "async"])
def test_a_name_gives_a_fresh_executor_of_that_kind(name: str) -> None:
    first, second = create_executor(name), create_executor(f" {name.upper()} ")
    assert first.name == second.name == name
    assert first is not second
    assert isinstance(first, Executor)


def test_an_instance_passes_through() -> None:
    executor = SyncExecutor()
    assert create_executor(executor) is executor
    assert PipelineOptimizer(executor=executor).executor is executor


@pytest.mark.parametrize("bad", [None, 42, 1.5, ["thread"], object()])
def test_the_optimizer_rejects_what_is_neither_a_name_nor_an_executor(bad: object) -> None:
    with pytest.raises(TypeError, match=f"executor must be one of {CHOICES} or an Executor"):
        PipelineOptimizer(executor=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["gpu", "", "threads"])
def test_the_optimizer_rejects_an_unknown_name_with_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match=f"executor must be one of {CHOICES}, got {bad!r}"):
        PipelineOptimizer(executor=bad)


def test_an_address_is_for_dask_only() -> None:
    with pytest.raises(ValueError, match="dask executor only"):
        create_executor("thread", address="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="not an instance"):
        create_executor(SyncExecutor(), address="tcp://127.0.0.1:8786")


def test_dask_is_not_imported_until_a_dask_executor_is_made() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pipeopt, pipeopt.executors\n"
        "pipeopt.PipelineOptimizer(executor='thread')\n"
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules, 'eager'\n"
        "assert 'pipeopt.executors.dask' not in sys.modules, 'eager backend'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
