"""Executors run task bodies; the scheduler, retries and metrics stay in the driver.

``"thread"`` (default) and ``"sync"`` live in :mod:`pipeopt.executors.base`.
"""

from __future__ import annotations

from pipeopt.executors.base import Executor, SyncExecutor, TaskCall, ThreadExecutor, invoke

__all__ = ["Executor", "SyncExecutor", "TaskCall", "ThreadExecutor", "invoke"]
