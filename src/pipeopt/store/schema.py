"""The run store's tables and schema version.

One file, ``<state_dir>/runs.sqlite``, in WAL mode with ``synchronous=NORMAL``:

``meta``        ``schema``: the version of this layout;
``runs``        one row per run: pipeline, fingerprint, status, start and
                end, executor, workers, the run it resumed, the host and
                process that ran it, the ``FILE[:PIPELINE]`` it came from,
                and its final counts (JSON);
``structures``  per fingerprint, the graph as JSON (see :mod:`.structure`);
``batches``     the attempts of a run, one row per writer flush: a pickled
                tuple of columns (see :class:`~.records.Batch`), plus how
                many attempts ended succeeded, failed and cached;
``finals``      per run, the final states the last attempt does not tell
                (skipped, cancelled, resumed, failed without an attempt);
``cache``       the results of tasks with a ``cache_key``, indexed by
                pipeline, task and key;
``run_locks``   (schema 2) the process resuming a run: host, pid and start
                time, so that a second resume of the same run refuses;
``run_params``  (schema 3) per run, its parameters (pickled), which resume
                reuses;
``task_logs``   (schema 3) per run, the captured log records of the tasks
                that logged (a pickled dict of task name to lines);
``task_estimates`` (schema 4) per pipeline, the durations learned from
                its runs' successful attempts (see :mod:`.estimates`);
``run_estimates`` (schema 4) per run, the estimate each task was ranked by.

Attempts go in batches rather than a row each because a row costs about as
much as scheduling a task: batches keep the store within 2 µs per task
(``benchmarks/store_overhead.py``).

Versions: 1 had no ``run_locks``, 2 no ``run_params`` and ``task_logs``,
3 no ``task_estimates`` and ``run_estimates``; opening an older store for
writing adds the tables in place (its runs stay; durations are learned from
the runs that end from then on). Read-only, an older store reads as it is.
A store of a newer version is refused, because an older pipeopt would not
honour what it added (schema 2: the locks; schema 3: the parameters resume
must reuse; schema 4: the learned durations it would let go stale).
"""

from __future__ import annotations

import sqlite3
from typing import Final

SCHEMA_VERSION: Final = 4

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS structures (
    fingerprint TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    pipeline TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    tasks INTEGER NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    status TEXT NOT NULL,
    executor TEXT NOT NULL,
    workers INTEGER NOT NULL,
    resumed_from TEXT,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_start TEXT,
    source TEXT,
    counts TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_start ON runs (started_at);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs (pipeline, started_at);
CREATE TABLE IF NOT EXISTS batches (
    run INTEGER NOT NULL,
    events INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    cached INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_run ON batches (run);
CREATE TABLE IF NOT EXISTS finals (
    run INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS finals_by_run ON finals (run);
CREATE TABLE IF NOT EXISTS cache (
    pipeline TEXT NOT NULL,
    task TEXT NOT NULL,
    cache_key TEXT NOT NULL,
    run INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cache_by_key ON cache (pipeline, task, cache_key);
CREATE TABLE IF NOT EXISTS run_params (
    run INTEGER PRIMARY KEY,
    params BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS task_logs (
    run INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS task_logs_by_run ON task_logs (run);
CREATE TABLE IF NOT EXISTS task_estimates (
    pipeline TEXT PRIMARY KEY,
    updated_at REAL NOT NULL,
    tasks INTEGER NOT NULL,
    names BLOB NOT NULL,
    seconds BLOB NOT NULL,
    samples BLOB NOT NULL,
    windows BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS run_estimates (
    run INTEGER PRIMARY KEY,
    names BLOB NOT NULL,
    seconds BLOB NOT NULL,
    samples BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS run_locks (
    run_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    process_start TEXT,
    locked_at REAL NOT NULL
);
"""


def stored_version(conn: sqlite3.Connection) -> int | None:
    """Return the schema version of the open database, ``None`` if it has no ``meta``."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return int(row[0]) if row is not None else 0


def create_or_upgrade(conn: sqlite3.Connection) -> None:
    """Create the missing tables and record :data:`SCHEMA_VERSION` (caller holds a transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
    )
