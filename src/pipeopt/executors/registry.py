"""The one list of executor names, and the one place that turns a name into an executor.

The optimizer, the command line, the run store and the benchmarks all take
an executor by name (``"thread"``, ``"process"``, ...) or as an instance;
:func:`create_executor` resolves both. The process, async and dask backends
are imported only when one is created, so that ``import pipeopt`` stays
light and ``distributed`` is never needed until a dask executor is made.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeopt.executors.base import Executor, SyncExecutor, ThreadExecutor

__all__ = ["EXECUTOR_NAMES", "create_executor", "executor_names"]


def _process() -> Executor:
    from pipeopt.executors.process import ProcessExecutor

    return ProcessExecutor()


def _async() -> Executor:
    from pipeopt.executors.aio import AsyncExecutor

    return AsyncExecutor()


def _dask(address: str | None = None) -> Executor:
    from pipeopt.executors.dask import DaskExecutor

    return DaskExecutor(address=address)


_FACTORIES: dict[str, Callable[[], Executor]] = {
    "thread": ThreadExecutor,
    "process": _process,
    "async": _async,
    "sync": SyncExecutor,
    "dask": _dask,
}

EXECUTOR_NAMES: tuple[str, ...] = tuple(_FACTORIES)
"""Every executor name :func:`create_executor` accepts, the default first."""


def executor_names() -> tuple[str, ...]:
    """Return every executor name :func:`create_executor` accepts, the default first."""
    return EXECUTOR_NAMES


def create_executor(spec: str | Executor, *, address: str | None = None) -> Executor:
    """Return a new executor with default settings for a name, or pass an instance through.

    Args:
        spec: one of :data:`EXECUTOR_NAMES` (case and surrounding spaces
            ignored), or an object implementing
            :class:`~pipeopt.executors.base.Executor`.
        address: the ``tcp://host:port`` of a dask scheduler; only with
            ``"dask"`` (without it, dask starts a ``LocalCluster``).

    Raises:
        TypeError: ``spec`` is neither a name nor an executor.
        ValueError: an unknown name, or ``address`` with another executor.
        ImportError: ``"dask"`` without ``distributed`` installed.
    """
    choices = ", ".join(EXECUTOR_NAMES)
    if not isinstance(spec, str):
        if isinstance(spec, Executor):
            if address is not None:
                raise ValueError("address applies to an executor name ('dask'), not an instance")
            return spec
        raise TypeError(
            f"executor must be one of {choices} or an Executor instance, "
            f"got {type(spec).__name__} {spec!r}"
        )
    name = spec.strip().lower()
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"executor must be one of {choices}, got {spec!r}")
    if name == "dask":
        return _dask(address)
    if address is not None:
        raise ValueError(f"address applies to the dask executor only, not {name!r}")
    return factory()
