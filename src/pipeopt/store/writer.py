"""The writer thread: the runs' event deques into SQLite, in batched transactions.

Policy
    One writer per store wakes on the first event of a quiet period, lets
    more gather for ``flush_interval`` seconds, then encodes what is queued
    (column-wise, one ``batches`` row per 2,048 events; results pickled one
    by one) and commits it in one short ``BEGIN IMMEDIATE`` transaction.
    Ends of runs (:class:`End`) and flush requests (:class:`Flush`) queue
    behind the events they follow and are done when those are committed.

Failure
    A failed commit (locked too long, disk full, read-only file, a
    connection that cannot be opened) keeps every encoded row and retries
    every ``retry_interval`` seconds; the waiting ends and flushes are told
    at once, with the reason, so a run never hangs on its record. The ends
    are then written on their own (the run's status, counts and final
    states; then, if even that fails, the status and counts alone), so that
    ``history`` shows how a run ended even when its attempts could not be
    written. When the store closes, the writer tries once more and then
    gives up: it logs an error naming the runs and how many events were not
    recorded. A bug in the writer ends the thread the same way; the runs go
    on.

Durability
    An event is committed by the writer's next transaction: normally at
    most ``flush_interval`` seconds plus one write after it happened, later
    when task bodies keep the interpreter busy (the writer needs the GIL
    too). A crash of the process, even ``kill -9``, loses only the attempts
    still running and the events of that last window; with
    ``synchronous=NORMAL`` the last transactions may roll back on power
    loss, which never corrupts the file.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import operator
import pickle
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from pipeopt.estimates import event_samples
from pipeopt.result import RunResult, TaskState, outcome_logs
from pipeopt.store import estimates
from pipeopt.store.recorder import Recorder
from pipeopt.store.records import (
    NOTHING,
    PICKLE_PROTOCOL,
    R_CACHE,
    R_NONE,
    R_NULL,
    R_PICKLED,
    Event,
    EventColumns,
    clip_traceback,
    message_of,
)

_log = logging.getLogger("pipeopt.store")

CHUNK: Final = 2048  # events encoded at a time (one batches row each)
_NONE_PICKLE = pickle.dumps(None, protocol=PICKLE_PROTOCOL)
_SUCCEEDED = TaskState.SUCCEEDED
_CACHED = TaskState.CACHED
_STATE_TEXT = {state: state.value for state in TaskState}
_STATE_OF = operator.attrgetter("state")
_ATTEMPTS_OF = operator.attrgetter("attempts")


class End:
    """The end of a run, queued after its last event; ``done`` is set once handled.

    ``error`` says why the record is incomplete; ``None`` when all was written.
    ``mapped`` names the run's mapped tasks, whose items learn durations as
    one; ``None`` when the run does not teach the learned durations.
    """

    def __init__(
        self, recorder: Recorder, result: RunResult, mapped: frozenset[str] | None = None
    ) -> None:
        self.recorder = recorder
        self.result = result
        self.mapped = mapped
        self.done = threading.Event()
        self.error: str | None = None
        self.written = False  # the status and counts are committed
        self._payload: bytes | None = None
        self._counts: dict[str, int] = {}

    def payload(self) -> bytes:
        """Return the pickled final states that the recorded attempts may not tell.

        A task that succeeded in an attempt or was cached always reached the
        observer; any other final state may not have (skipped, cancelled,
        resumed, or failed by an interrupt or an open breaker with no attempt).
        """
        if self._payload is None:
            outcomes = list(self.result.tasks.values())
            tally = collections.Counter(map(_STATE_OF, outcomes))
            self._counts = {state.value: count for state, count in tally.items()}
            # Fast path: all succeeded in attempts or were cached (no task resumed).
            told = (
                tally[_SUCCEEDED] + tally[_CACHED] == len(outcomes)
                and list(map(_ATTEMPTS_OF, outcomes)).count(0) == tally[_CACHED]
            )
            untold = []
            if not told:
                untold = [
                    o
                    for o in outcomes
                    if not ((o.state is _SUCCEEDED and o.attempts) or o.state is _CACHED)
                ]
            rows = tuple(
                (
                    o.name,
                    _STATE_TEXT[o.state],
                    o.attempts,
                    None if o.error is None else type(o.error).__name__,
                    None if o.error is None else message_of(o.error),
                    clip_traceback(o.traceback),
                    "resumed" if o.state is _SUCCEEDED and not o.attempts else None,
                )
                for o in untold
            )
            self._payload = pickle.dumps(rows, protocol=PICKLE_PROTOCOL)
        return self._payload

    def write(self, conn: sqlite3.Connection, *, finals: bool = True) -> None:
        """Write the final states (unless ``finals`` is false) and close the run's row."""
        result = self.result
        key = self.recorder.key
        payload = self.payload()
        if finals:
            logs = {o.name: o.logs for o in result.tasks.values() if outcome_logs(o)}
            conn.execute("DELETE FROM task_logs WHERE run = ?", (key,))
            if logs:
                conn.execute(
                    "INSERT INTO task_logs (run, payload) VALUES (?, ?)",
                    (key, pickle.dumps(logs, protocol=PICKLE_PROTOCOL)),
                )
            conn.execute("DELETE FROM finals WHERE run = ?", (key,))  # a retried commit
            conn.execute("INSERT INTO finals (run, payload) VALUES (?, ?)", (key, payload))
            self._learn(conn)
        conn.execute(
            "UPDATE runs SET ended_at = ?, status = ?, counts = ? WHERE id = ?",
            (
                result.started_at + result.wall_time,
                result.status.value,
                json.dumps(self._counts),
                key,
            ),
        )

    def _learn(self, conn: sqlite3.Connection) -> None:
        columns = self.recorder.samples
        if self.mapped is None or columns is None:
            return
        try:
            samples = event_samples(columns, self.mapped)
            estimates.record(conn, self.recorder.pipeline, samples, self.result.tasks)
        except sqlite3.Error:
            raise
        except Exception as exc:  # learning must never cost the run its record
            _log.warning(
                "run %s: learned durations of pipeline %r not updated: %s: %s",
                self.recorder.run_id,
                self.recorder.pipeline,
                type(exc).__name__,
                exc,
            )


class Flush:
    """A request to commit everything queued before it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None


Control = End | Flush


class Writer:
    """Drain the runs' event deques into the database (see the module's docstring).

    Args:
        connect: returns a new connection to the store (autocommit mode);
            called in the writer thread, again after a failure to connect.
        explain: turns a SQLite error and what was being done into advice.
        flush_interval: seconds events gather before a transaction.
        retry_interval: seconds between attempts after a failed commit.
        max_result_bytes: larger pickled results are not stored.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        explain: Callable[[sqlite3.Error, str], str],
        *,
        flush_interval: float,
        retry_interval: float,
        max_result_bytes: int,
    ) -> None:
        self._connect = connect
        self._explain = explain
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.max_result_bytes = max_result_bytes
        self._recorders: list[Recorder] = []  # replaced under _lock, never changed in place
        self._lock = threading.Lock()
        self._queued: collections.deque[Control] = collections.deque()
        self.signalled = False
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._stopping = False
        # Encoded but not yet committed (kept across a failed commit, to retry).
        self._batches: list[tuple[int, int, int, int, int, bytes]] = []
        self._cache: list[tuple[str, str, str, int, bytes]] = []
        self._controls: list[Control] = []
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._main, name="pipeopt-store-writer", daemon=True)
        self._thread.start()

    # -- the store's side ------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Return whether encoded rows wait for a commit."""
        return bool(self._batches or self._cache or self._controls)

    @property
    def alive(self) -> bool:
        """Return whether the writer thread runs."""
        return self._thread.is_alive()

    def add(self, recorder: Recorder) -> None:
        """Start draining ``recorder``'s events."""
        with self._lock:
            self._recorders = [*self._recorders, recorder]

    def signal(self) -> None:
        """Wake the writer (it then waits ``flush_interval`` for more events)."""
        self.signalled = True
        self._wake.set()

    def submit(self, control: Control) -> None:
        """Queue an end or a flush behind the events queued so far; write soon."""
        self._queued.append(control)
        self._urgent.set()
        self.signal()

    def wait(self, control: Control) -> None:
        """Wait until ``control`` is handled (or the writer thread ended)."""
        while not control.done.wait(0.5):
            if not self._thread.is_alive():
                control.error = control.error or "the writer stopped"
                return

    def stop(self, timeout: float) -> bool:
        """Write what is queued, end the thread; return whether it ended in time."""
        self._stopping = True
        self._urgent.set()
        self.signal()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread --------------------------------------------------------------

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                # With rows that failed to commit, retry after a pause even without news.
                self._wake.wait(self.retry_interval if self.pending else None)
                if not self._stopping and not self.pending:
                    self._urgent.wait(self.flush_interval)
                self.signalled = False
                self._wake.clear()
                self._urgent.clear()
                self._take_queued()
                if self.pending:
                    conn = self._commit(conn)
                if self._stopping and not self._queued and not self._has_events():
                    if self.pending:
                        self._give_up("the store was closed")
                    return
        except Exception as exc:  # the recording must never take the run down
            _log.error("run store writer stopped: %s: %s", type(exc).__name__, exc)
            self._give_up(f"the writer stopped: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def _has_events(self) -> bool:
        return any(r.events for r in self._recorders)

    def _take_queued(self) -> None:
        # Controls first: the events queued before an end are then drained too.
        controls = _drain(self._queued)
        for recorder in self._recorders:
            # What is queued now, in chunks; later events wait for the next commit.
            left = len(recorder.events)
            while left > 0:
                events = _drain(recorder.events, min(left, CHUNK))
                left -= len(events)
                self._encode(recorder, events)
                # Let the scheduler have the GIL: a long C call here (zip,
                # pickle) would stall a worker that holds the scheduler's lock.
                time.sleep(0)
        for control in controls:
            if isinstance(control, End):
                control.payload()
                with self._lock:
                    self._recorders = [r for r in self._recorders if r is not control.recorder]
        self._controls.extend(controls)

    def _encode(self, recorder: Recorder, events: list[Event]) -> None:
        """Encode events of one run as one ``batches`` row (column-wise, in C loops)."""
        columns = EventColumns.of(events)
        tasks, results, keys, failed = (
            columns.tasks,
            columns.results,
            columns.cache_keys,
            columns.failures,
        )
        state_texts = tuple(map(_STATE_TEXT.__getitem__, columns.states))
        if recorder.samples is not None:
            recorder.samples.append((tasks, columns.durations, state_texts))
        failures: tuple[tuple[int, str, str, str | None], ...] = ()
        if failed.count(None) != len(failed):
            failures = tuple(
                (i, type(r.error).__name__, message_of(r.error), clip_traceback(r.traceback))
                for i, r in enumerate(failed)
                if r is not None and r.error is not None
            )
        codes = bytearray(
            [R_NONE if v is NOTHING else R_NULL if v is None else R_PICKLED for v in results]
        )
        blobs: list[bytes] = []
        refs: list[tuple[int, int, str]] = []
        if recorder.no_persist or keys.count(None) != len(keys) or R_PICKLED in codes:
            self._store_results(
                recorder, tasks, results, keys=keys, codes=codes, blobs=blobs, refs=refs
            )
        payload = pickle.dumps(
            (
                tasks,
                columns.numbers,
                columns.started,
                columns.durations,
                state_texts,
                failures,
                bytes(codes),
                tuple(blobs),
                tuple(refs),
            ),
            protocol=PICKLE_PROTOCOL,
        )
        self._batches.append(
            (
                recorder.key,
                len(tasks),
                state_texts.count("succeeded"),
                state_texts.count("failed"),
                state_texts.count("cached"),
                payload,
            )
        )

    def _store_results(
        self,
        recorder: Recorder,
        tasks: tuple[str, ...],
        values: tuple[Any, ...],
        *,
        keys: tuple[str | None, ...],
        codes: bytearray,
        blobs: list[bytes],
        refs: list[tuple[int, int, str]],
    ) -> None:
        """Pickle the results that need it; route keyed ones to the cache table."""
        no_persist = recorder.no_persist
        for i, code in enumerate(codes):
            if code == R_NONE:
                continue
            task = tasks[i]
            # A mapped item ("load[7]") is kept or not as its task is.
            if task in no_persist or (task[-1:] == "]" and task.partition("[")[0] in no_persist):
                codes[i] = R_NONE
                recorder.hits.pop(task, None)
                continue
            key = keys[i]
            if key is not None:
                origin = recorder.hits.pop(task, None)
                if origin is None:
                    data = self._pickle(recorder, task, values[i])
                    if data is None:
                        codes[i] = R_NONE
                        continue
                    self._cache.append((recorder.pipeline, task, key, recorder.key, data))
                    origin = recorder.key
                codes[i] = R_CACHE
                refs.append((i, origin, key))
            elif code == R_PICKLED:
                data = self._pickle(recorder, task, values[i])
                if data is None:
                    codes[i] = R_NONE
                else:
                    blobs.append(data)

    def _pickle(self, recorder: Recorder, task: str, value: Any) -> bytes | None:
        if value is None:
            return _NONE_PICKLE
        try:
            data = pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            _log.warning(
                "run %s: result of task %r not stored (cannot pickle %s: %s); "
                "it will run again on resume",
                recorder.run_id,
                task,
                type(value).__name__,
                exc,
            )
            return None
        limit = self.max_result_bytes
        if len(data) > limit:
            _log.warning(
                "run %s: result of task %r not stored (%d bytes pickled, max_result_bytes "
                "is %d); it will run again on resume",
                recorder.run_id,
                task,
                len(data),
                limit,
            )
            return None
        return data

    # -- committing ------------------------------------------------------------------

    def _commit(self, conn: sqlite3.Connection | None) -> sqlite3.Connection | None:
        """Commit what is pending; return the connection to use next time."""
        controls = self._controls
        try:
            if conn is None:
                conn = self._connect()
            with _immediate(conn):
                if self._batches:
                    conn.executemany(
                        "INSERT INTO batches (run, events, succeeded, failed, cached, payload) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        self._batches,
                    )
                if self._cache:
                    conn.executemany(
                        "INSERT INTO cache (pipeline, task, cache_key, run, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        self._cache,
                    )
                for control in controls:
                    if isinstance(control, End):
                        control.write(conn)
        except sqlite3.Error as exc:
            self._failed(conn, exc)
            return conn
        if self._failing_since is not None:
            _log.warning(
                "run store: writing again after %.1fs", time.monotonic() - self._failing_since
            )
            self._failing_since = None
        self._batches.clear()
        self._cache.clear()
        for control in controls:
            if isinstance(control, End):
                control.written = True
            control.done.set()
        controls.clear()
        return conn

    def _failed(self, conn: sqlite3.Connection | None, exc: sqlite3.Error) -> None:
        """Tell the waiters why, write the ends alone if possible; keep the rest to retry."""
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            _log.warning("run store: cannot write, will retry: %s", exc)
        reason = self._explain(exc, "record the run")
        ends = [c for c in self._controls if isinstance(c, End) and not c.written]
        if conn is not None and ends:
            self._write_ends_alone(conn, ends)
        for control in self._controls:
            if not control.done.is_set():
                control.error = reason
                control.done.set()

    def _write_ends_alone(self, conn: sqlite3.Connection, ends: list[End]) -> None:
        for finals in (True, False):
            try:
                with _immediate(conn):
                    for end in ends:
                        end.write(conn, finals=finals)
            except sqlite3.Error:
                continue
            for end in ends:
                end.written = True
            return

    def _give_up(self, why: str) -> None:
        lost: collections.Counter[int] = collections.Counter()
        names: dict[int, str] = {}
        for key, events, *_ in self._batches:
            lost[key] += events
        for recorder in self._recorders:
            lost[recorder.key] += len(recorder.events)
            names[recorder.key] = recorder.run_id
        for control in [*self._controls, *self._queued]:
            if isinstance(control, End):
                names[control.recorder.key] = control.recorder.run_id
                if not control.written:
                    _log.error(
                        "run store: the end of run %s (%s) was not recorded (%s)",
                        control.recorder.run_id,
                        control.result.status.value,
                        why,
                    )
        for key, count in lost.items():
            if count:
                _log.error(
                    "run store: %d events of run %s not recorded (%s)",
                    count,
                    names.get(key, f"#{key}"),
                    why,
                )
        for control in [*self._controls, *_drain(self._queued)]:
            control.error = control.error or why
            control.done.set()
        self._batches.clear()
        self._cache.clear()
        self._controls.clear()


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one ``BEGIN IMMEDIATE`` transaction, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _drain(queue: collections.deque[Any], limit: int | None = None) -> list[Any]:
    """Take what is in ``queue`` now, at most ``limit`` items (appends may go on meanwhile)."""
    popleft = queue.popleft
    count = len(queue) if limit is None else min(limit, len(queue))
    return [popleft() for _ in range(count)]
