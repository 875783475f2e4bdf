"""The :class:`RunStore` facade: one object that records runs and reads them back."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeopt._validate import check_float, check_int
from pipeopt.errors import RunStoreError
from pipeopt.result import RunResult
from pipeopt.store import estimates as learned_store
from pipeopt.store.connection import Database, SharedConnection
from pipeopt.store.liveness import HOST, process_start
from pipeopt.store.queries import RunReader
from pipeopt.store.recorder import Recorder
from pipeopt.store.records import PICKLE_PROTOCOL, RunDetail, RunSummary
from pipeopt.store.resume import acquire_lock, cached_result, read_results, release_lock
from pipeopt.store.structure import StructureEncoder, differences
from pipeopt.store.writer import End, Flush, Writer

if TYPE_CHECKING:
    from pipeopt.estimates import LearnedDurations, TaskEstimates
    from pipeopt.graph import CompiledPipeline
    from pipeopt.hooks import RunObserver

_log = logging.getLogger("pipeopt.store")


class RunStore:
    """Record runs in ``<state_dir>/runs.sqlite`` and read them back.

    Recording is off the hot path (:mod:`pipeopt.store.writer`); reading is
    :mod:`pipeopt.store.queries`; resume, the result cache and the run lock
    are :mod:`pipeopt.store.resume`.

    Args:
        state_dir: the folder of the store; created if missing (unless
            ``read_only``).
        lock_timeout: seconds to wait for another process's write lock
            before giving up with :class:`RunStoreError`.
        flush_interval: seconds the writer lets events gather before one
            transaction; a crash loses at most the events of this window.
        max_result_bytes: results larger than this, pickled, are not
            stored (their tasks run again on resume).
        read_only: only read (``history``, ``show``): a missing folder or
            file is refused instead of created, and nothing is written.
        connect_writer: returns the writer thread's connection to the
            store's file (by default one with the store's settings); for
            extra pragmas, or to test how the writer survives failures.

    Raises:
        RunStoreError: the folder cannot be created (or, read-only, does not
            hold a store), the file is not a healthy SQLite database (it is
            left untouched), it was written by a newer pipeopt, or it stays
            locked longer than ``lock_timeout``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        lock_timeout: float = 5.0,
        flush_interval: float = 0.05,
        max_result_bytes: int = 64 * 2**20,
        read_only: bool = False,
        connect_writer: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        self.lock_timeout = check_float("lock_timeout", lock_timeout, minimum=0.0)
        self.flush_interval = check_float("flush_interval", flush_interval, minimum=0.0)
        self.max_result_bytes = check_int("max_result_bytes", max_result_bytes, minimum=0)
        self.retry_interval = max(0.25, self.flush_interval)
        self.state_dir = Path(state_dir)
        self.read_only = bool(read_only)
        self._db = Database(self.state_dir, lock_timeout=self.lock_timeout, read_only=read_only)
        self.path = self._db.path
        self._connect_writer = connect_writer or self._default_writer_connection
        self._lock = threading.RLock()  # guards _writer, _active, _sources
        self._writer: Writer | None = None
        self._active: dict[str, Recorder] = {}
        self._sources: dict[str, str] = {}
        # Per recording run that learns durations: its mapped tasks.
        self._mapped: dict[str, frozenset[str]] = {}
        self._encoder = StructureEncoder()
        self._reader = RunReader(self._db, self._active.__contains__)
        self._shared = SharedConnection(self._db)

    def __repr__(self) -> str:
        return f"RunStore({str(self.state_dir)!r})"

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _default_writer_connection(self) -> sqlite3.Connection:
        return self._db.connect(writer=True)

    # -- recording a run ----------------------------------------------------------

    def begin_run(
        self,
        *,
        run_id: str,
        pipeline: str,
        compiled: CompiledPipeline,
        executor: str,
        workers: int,
        resumed_from: str | None,
        params: Mapping[str, Any] | None = None,
        estimates: TaskEstimates | None = None,
        learn: bool = True,
    ) -> RunObserver:
        """Record the start of a run and return the observer that records its attempts.

        ``estimates`` are the durations its tasks are ranked by, kept for
        ``show``; ``learn`` folds the durations of its successful attempts
        into the pipeline's learned durations when it ends.

        Raises:
            RunStoreError: the store is locked, closed or read-only, or already has ``run_id``.
        """
        pid = os.getpid()
        no_persist = frozenset(task.name for task in compiled.tasks if not task.persist)
        with self._lock:
            fingerprint, structure = self._encoder.encode(compiled)
            with self._shared.writing(f"record the start of run {run_id}") as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO structures (fingerprint, data) VALUES (?, ?)",
                    (fingerprint, structure),
                )
                try:
                    cursor = conn.execute(
                        "INSERT INTO runs (run_id, pipeline, fingerprint, tasks, started_at, "
                        "status, executor, workers, resumed_from, host, pid, process_start, "
                        "source) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                        (
                            run_id,
                            pipeline,
                            fingerprint,
                            len(compiled.tasks),
                            time.time(),
                            executor,
                            workers,
                            resumed_from,
                            HOST,
                            pid,
                            process_start(pid),
                            self._sources.pop(run_id, None),
                        ),
                    )
                except sqlite3.IntegrityError:
                    raise RunStoreError(
                        f"run id {run_id!r} is already recorded in {self.path}; "
                        "leave run_id unset for a fresh one"
                    ) from None
                key = cursor.lastrowid
                assert key is not None
                if params:
                    conn.execute(
                        "INSERT INTO run_params (run, params) VALUES (?, ?)",
                        (key, pickle.dumps(dict(params), protocol=PICKLE_PROTOCOL)),
                    )
                if estimates is not None:
                    learned_store.save_used(conn, key, estimates)
            if self._writer is None:
                self._writer = Writer(
                    self._connect_writer,
                    self._db.explain,
                    flush_interval=self.flush_interval,
                    retry_interval=self.retry_interval,
                    max_result_bytes=self.max_result_bytes,
                )
            recorder = Recorder(
                self._writer,
                self._cached_result,
                key=key,
                run_id=run_id,
                pipeline=pipeline,
                no_persist=no_persist,
                learns=learn,
            )
            self._writer.add(recorder)
            self._active[run_id] = recorder
            if learn:
                self._mapped[run_id] = frozenset(
                    compiled.names[i]
                    for i, source in enumerate(compiled.map_sources)
                    if source >= 0
                )
        return recorder

    def end_run(self, result: RunResult) -> None:
        """Record every task's final state and the run's end; wait until all is written.

        The writer thread stops when no other run of this store is going on.

        Raises:
            RunStoreError: the record could not be written (e.g. the store
                stayed locked, the disk is full); the writer keeps retrying
                until :meth:`close`, and logs what it could not write then.
        """
        with self._lock:
            recorder = self._active.get(result.run_id)
        if recorder is None:
            _log.debug("end_run for run %s, which this store did not begin", result.run_id)
            return
        recorder.release_held()
        writer = recorder.writer
        with self._lock:
            mapped = self._mapped.pop(result.run_id, None)
        end = End(recorder, result, mapped)
        writer.submit(end)
        writer.wait(end)
        with self._lock:
            self._active.pop(result.run_id, None)
            if not self._active and writer is self._writer and not writer.pending:
                self._writer = None
                writer.stop(self.lock_timeout + 5.0)
        if end.error is not None:
            ended = "its end was recorded" if end.written else "its end was not recorded"
            raise RunStoreError(
                f"run {result.run_id} ended ({result.status.value}) but its record is "
                f"incomplete ({ended}): {end.error}"
            )

    def flush(self) -> None:
        """Wait until every event queued so far is committed.

        Raises:
            RunStoreError: the events could not be written (the writer retries).
        """
        with self._lock:
            writer = self._writer
        if writer is None:
            return
        request = Flush()
        writer.submit(request)
        writer.wait(request)
        if request.error is not None:
            raise RunStoreError(request.error)

    def set_source(self, run_id: str, source: str) -> None:
        """Record the ``FILE[:PIPELINE]`` a run came from, so ``pipeopt resume`` finds it.

        May be called before the run begins (with the id it will get), or
        any time after.

        Raises:
            RunStoreError: the store is locked, closed or read-only.
        """
        with self._lock, self._shared.writing(f"record the pipeline file of run {run_id}") as conn:
            cursor = conn.execute("UPDATE runs SET source = ? WHERE run_id = ?", (source, run_id))
            if cursor.rowcount == 0:
                self._sources[run_id] = source

    def _cached_result(self, pipeline: str, task: str, key: str) -> tuple[int, Any] | None:
        try:
            with self._shared.reading("look up a cached result") as conn:
                return cached_result(conn, pipeline, task, key)
        except RunStoreError as exc:
            _log.warning("task %r: cache lookup failed, running it: %s", task, exc)
            return None

    # -- reading runs --------------------------------------------------------------

    def resolve_run(self, run_id: str | None, *, pipeline: str | None = None) -> str:
        """Return the id of the run ``run_id`` names.

        ``None`` or ``"last"`` name the newest run (of ``pipeline`` if
        given); otherwise the exact id, or a prefix that names one run.

        Raises:
            RunStoreError: no such run, an ambiguous prefix, or a run of
                another pipeline than ``pipeline``.
        """
        with self._shared.reading("look up runs") as conn:
            return self._reader.resolve(conn, run_id, pipeline)

    def list_runs(self, limit: int = 20) -> list[RunSummary]:
        """Return the newest ``limit`` runs, newest first.

        Raises:
            RunStoreError: the store cannot be read, or a run's row is damaged.
        """
        limit = check_int("limit", limit, minimum=1)
        with self._shared.reading("list runs") as conn:
            return self._reader.list_runs(conn, limit)

    def summary(self, run_id: str) -> RunSummary:
        """Return one run's summary (``run_id`` as :meth:`resolve_run` takes it).

        Raises:
            RunStoreError: no such run, or its row is damaged.
        """
        run_id = self.resolve_run(run_id)
        with self._shared.reading(f"read run {run_id}") as conn:
            return self._reader.summary(conn, self._reader.row(conn, run_id))

    def show_run(self, run_id: str) -> RunDetail:
        """Return a run with a row per task (``run_id`` as :meth:`resolve_run` takes it).

        Raises:
            RunStoreError: no such run, or its record is damaged.
        """
        run_id = self.resolve_run(run_id)
        with self._shared.reading(f"read run {run_id}") as conn:
            return self._reader.detail(conn, run_id)

    def learned_durations(self, pipeline: str) -> LearnedDurations:
        """Return the task durations learned from the runs of ``pipeline`` (one read).

        A store that cannot be read, or a damaged record, gives no durations
        (logged as a warning): the run then ranks without them.
        """
        try:
            with self._shared.reading(f"read the learned durations of {pipeline!r}") as conn:
                return learned_store.load(conn, pipeline)
        except Exception as exc:
            _log.warning(
                "pipeline %r: learned durations unreadable, ranking without them: %s: %s",
                pipeline,
                type(exc).__name__,
                exc,
            )
            from pipeopt.estimates import LearnedDurations

            return LearnedDurations((), (), ())

    # -- resuming --------------------------------------------------------------------

    def structure_diff(self, run_id: str, compiled: CompiledPipeline) -> list[str]:
        """Return how ``compiled`` differs from the pipeline of ``run_id``, one line each.

        Lines read ``task 'x' added``, ``task 'y' removed``,
        ``task 'z' dependencies changed: [a] -> [a, b]`` and
        ``task 'z' criticality changed: low -> high``; an empty list means the
        same graph. Past 50 lines the rest is counted in a last line.

        Raises:
            RunStoreError: no such run.
        """
        with self._lock:
            fingerprint, _ = self._encoder.encode(compiled)
        with self._shared.reading(f"read run {run_id}") as conn:
            row = self._reader.row(conn, run_id)
            if row.fingerprint == fingerprint:
                return []
            old = self._reader.structure(conn, row.fingerprint)
        return differences(old, compiled)

    def load_results(self, run_id: str, *, names: Container[str]) -> dict[str, Any]:
        """Return the stored results of the tasks in ``names`` that succeeded.

        Looks in ``run_id`` and then in the runs it resumed from, newest
        first, so a chain of interrupted runs loses nothing. A result that
        cannot be unpickled is left out (a warning is logged): its task runs
        again.

        Raises:
            RunStoreError: no such run, or it is still running in a live process.
        """
        with self._shared.reading(f"read the results of run {run_id}") as conn:
            return read_results(self._reader, conn, run_id, names)

    @contextlib.contextmanager
    def lock_run(self, run_id: str) -> Iterator[None]:
        """Hold the resume lock of ``run_id`` for the block (see :mod:`pipeopt.store.resume`).

        Raises:
            RunLockedError: another live process holds it; a dead holder's
                lock is taken over.
        """
        with self._shared.writing(f"lock run {run_id}") as conn:
            acquire_lock(conn, run_id)
        try:
            yield
        finally:
            try:
                with self._shared.writing(f"unlock run {run_id}") as conn:
                    release_lock(conn, run_id)
            except RunStoreError as exc:
                # Left behind, the lock is stale once this process ends.
                _log.warning("run %s: could not release the resume lock: %s", run_id, exc)

    def close(self) -> None:
        """Write what is queued, stop the writer and close the database (idempotent)."""
        with self._lock:
            if self._shared.closed:
                return
            writer, self._writer = self._writer, None
            for recorder in self._active.values():
                recorder.release_held()
            self._active.clear()
            if writer is not None and not writer.stop(self.lock_timeout + 5.0):
                _log.error("run store %s: the writer did not finish in time", self.path)
            self._shared.close()
