"""Executors run task bodies; the scheduler, retries and metrics stay in the driver.

Names become executors in :mod:`pipeopt.executors.registry`, the one list of
names (:func:`create_executor`). ``"thread"`` (default) and ``"sync"`` live in
:mod:`pipeopt.executors.base`; ``"process"`` in
:mod:`~pipeopt.executors.process`, ``"async"`` in
:mod:`~pipeopt.executors.aio`, and :class:`DaskExecutor` in
:mod:`~pipeopt.executors.dask` (which imports ``distributed`` only when an
executor is made). Those three modules load on first use, so that
``import pipeopt`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeopt.errors import WorkerCrashedError
from pipeopt.executors.base import Executor, SyncExecutor, TaskCall, ThreadExecutor, invoke
from pipeopt.executors.registry import EXECUTOR_NAMES, create_executor, executor_names

if TYPE_CHECKING:
    from pipeopt.executors.aio import AsyncExecutor
    from pipeopt.executors.dask import DaskExecutor
    from pipeopt.executors.process import ProcessExecutor
    from pipeopt.executors.remote import RemoteContext

_LAZY = {
    "AsyncExecutor": "pipeopt.executors.aio",
    "DaskExecutor": "pipeopt.executors.dask",
    "ProcessExecutor": "pipeopt.executors.process",
    "RemoteContext": "pipeopt.executors.remote",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "EXECUTOR_NAMES",
    "AsyncExecutor",
    "DaskExecutor",
    "Executor",
    "ProcessExecutor",
    "RemoteContext",
    "SyncExecutor",
    "TaskCall",
    "ThreadExecutor",
    "WorkerCrashedError",
    "create_executor",
    "executor_names",
    "invoke",
]
