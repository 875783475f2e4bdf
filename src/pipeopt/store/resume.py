"""What resume and the result cache read, and the lock that keeps a resume alone.

Resume
    :func:`read_results` returns the results of the tasks that succeeded in
    a run or in any run it resumed from (the newest wins), so a chain of
    crashed and resumed runs loses nothing. A run still going on in another
    live process cannot be resumed. Dependents do not wait for their
    upstream results to be committed: a task that finished in the last
    window before a crash runs again on resume, so its side effects may
    happen twice (make them idempotent); a task whose result was committed
    never runs again on resume. A result that cannot be pickled, or is
    larger than ``max_result_bytes`` pickled, is not stored and its task
    runs again; tasks with ``persist=False`` are never stored.

The run lock
    One process at a time may resume a run: :func:`acquire_lock` inserts a
    ``run_locks`` row naming the process (host, pid, start time) in the same
    transaction that checks for one, and :func:`release_lock` deletes it
    when the resumed run has ended. A second resume while the holder lives
    raises :class:`~pipeopt.errors.RunLockedError` at once; a lock whose
    holder has died (``kill -9``, a crash) is stale and taken over.

Caching
    Before a task with a ``cache_key`` runs, :func:`cached_result` looks for
    a result of the same pipeline, task name and key from any earlier run in
    which that task succeeded (the newest wins).

Security
    Results are stored with :mod:`pickle`, and unpickling can run arbitrary
    code. The store is trusted local data: never open a ``runs.sqlite`` that
    came from elsewhere.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import time
from collections.abc import Container
from typing import Any

from pipeopt.errors import RunLockedError, RunStoreError
from pipeopt.store.liveness import HOST, process_alive, process_start
from pipeopt.store.queries import RunReader
from pipeopt.store.records import R_CACHE, R_NULL, R_PICKLED, CacheRef

_log = logging.getLogger("pipeopt.store")


def read_results(
    reader: RunReader, conn: sqlite3.Connection, run_id: str, names: Container[str]
) -> dict[str, Any]:
    """Return the stored results of the tasks in ``names`` that succeeded (see above).

    Raises:
        RunStoreError: no such run, or it is still running in a live process.
    """
    row = reader.row(conn, run_id)
    if reader.status(row) == "running":
        raise RunStoreError(
            f"run {run_id} is still running (pid {row.pid} on {row.host}); "
            "wait for it to end, or stop it, before resuming it"
        )
    chain: list[int] = []
    current: str | None = run_id
    while current is not None:
        link = conn.execute(
            "SELECT id, resumed_from FROM runs WHERE run_id = ?", (current,)
        ).fetchone()
        if link is None or link[0] in chain:
            break
        chain.append(int(link[0]))
        current = link[1]
    found: dict[str, tuple[int, bytes | CacheRef | None]] = {}
    for key in chain:
        in_run: dict[str, tuple[int, bytes | CacheRef | None]] = {}
        for batch in reader.batches(conn, key):
            for task, code, stored in batch.stored():
                if task in names and task not in found:
                    in_run[task] = (code, stored)  # a later attempt wins
        found.update(in_run)
    for task, (code, stored) in found.items():
        if code == R_CACHE and isinstance(stored, CacheRef):
            data = conn.execute(
                "SELECT data FROM cache WHERE run = ? AND task = ? AND cache_key = ? "
                "ORDER BY rowid DESC LIMIT 1",
                (stored.run, task, stored.key),
            ).fetchone()
            found[task] = (R_PICKLED, None if data is None else bytes(data[0]))
    results: dict[str, Any] = {}
    for task, (code, stored) in found.items():
        if code == R_NULL:
            results[task] = None
        elif isinstance(stored, bytes):
            try:
                results[task] = pickle.loads(stored)
            except Exception as exc:
                _log.warning(
                    "task %r: stored result cannot be loaded (%s: %s); it will run again",
                    task,
                    type(exc).__name__,
                    exc,
                )
    return results


def cached_result(
    conn: sqlite3.Connection, pipeline: str, task: str, key: str
) -> tuple[int, Any] | None:
    """Return ``(runs.id that stored it, result)`` for a cache key, or ``None``."""
    row = conn.execute(
        "SELECT run, data FROM cache WHERE pipeline = ? AND task = ? "
        "AND cache_key = ? ORDER BY rowid DESC LIMIT 1",
        (pipeline, task, key),
    ).fetchone()
    if row is None:
        return None
    try:
        return int(row[0]), pickle.loads(row[1])
    except Exception as exc:
        _log.warning(
            "task %r: cached result cannot be loaded (%s: %s); running it",
            task,
            type(exc).__name__,
            exc,
        )
        return None


def acquire_lock(conn: sqlite3.Connection, run_id: str) -> None:
    """Lock ``run_id`` for this process (the caller holds a write transaction).

    Raises:
        RunLockedError: another live process holds the lock.
    """
    row = conn.execute(
        "SELECT host, pid, process_start FROM run_locks WHERE run_id = ?", (run_id,)
    ).fetchone()
    if row is not None:
        host, pid, started = str(row[0]), int(row[1]), row[2]
        if process_alive(host, pid, started):
            raise RunLockedError(run_id, host, pid)
        _log.warning(
            "run %s: taking over the resume lock of pid %d on %s, which has ended",
            run_id,
            pid,
            host,
        )
    pid = os.getpid()
    conn.execute(
        "INSERT OR REPLACE INTO run_locks (run_id, host, pid, process_start, locked_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (run_id, HOST, pid, process_start(pid), time.time()),
    )


def release_lock(conn: sqlite3.Connection, run_id: str) -> None:
    """Remove this process's lock of ``run_id`` (the caller holds a write transaction)."""
    conn.execute(
        "DELETE FROM run_locks WHERE run_id = ? AND host = ? AND pid = ?",
        (run_id, HOST, os.getpid()),
    )
