"""Executors run task bodies; the scheduler, retries and metrics stay in the driver.

``"thread"`` (default) and ``"sync"`` live in :mod:`pipeopt.executors.base`;
``"process"`` in :mod:`~pipeopt.executors.process`, ``"async"`` in
:mod:`~pipeopt.executors.aio`, and :class:`DaskExecutor` in
:mod:`~pipeopt.executors.dask` (which imports ``distributed`` only when an
executor is made). Those three modules load on first use, so that
``import pipeopt`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeopt.executors.base import Executor, SyncExecutor, TaskCall, ThreadExecutor, invoke

if TYPE_CHECKING:
    from pipeopt.executors.aio import AsyncExecutor
    from pipeopt.executors.dask import DaskExecutor
    from pipeopt.executors.process import ProcessExecutor, RemoteContext, WorkerCrashedError

NAMES = ("thread", "sync", "process", "async", "dask")

_LAZY = {
    "AsyncExecutor": "pipeopt.executors.aio",
    "DaskExecutor": "pipeopt.executors.dask",
    "ProcessExecutor": "pipeopt.executors.process",
    "RemoteContext": "pipeopt.executors.process",
    "WorkerCrashedError": "pipeopt.executors.process",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def by_name(name: str) -> Executor:
    """Return a new executor with default settings for ``name``.

    Args:
        name: one of ``thread``, ``sync``, ``process``, ``async``, ``dask``.

    Raises:
        ValueError: ``name`` is not one of those.
        ImportError: ``dask`` without ``distributed`` installed.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "thread":
        return ThreadExecutor()
    if key == "sync":
        return SyncExecutor()
    if key == "process":
        from pipeopt.executors.process import ProcessExecutor

        return ProcessExecutor()
    if key == "async":
        from pipeopt.executors.aio import AsyncExecutor

        return AsyncExecutor()
    if key == "dask":
        from pipeopt.executors.dask import DaskExecutor

        return DaskExecutor()
    raise ValueError(f"executor must be one of {', '.join(NAMES)}, got {name!r}")


__all__ = [
    "NAMES",
    "AsyncExecutor",
    "DaskExecutor",
    "Executor",
    "ProcessExecutor",
    "RemoteContext",
    "SyncExecutor",
    "TaskCall",
    "ThreadExecutor",
    "WorkerCrashedError",
    "by_name",
    "invoke",
]
