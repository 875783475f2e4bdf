"""The run store: every run recorded in SQLite, for history, resume and caching.

Layout
    One file, ``<state_dir>/runs.sqlite``, in WAL mode with
    ``synchronous=NORMAL``. Tables:

    ``runs``        one row per run: pipeline, fingerprint, status, start and
                    end, executor, workers, the run it resumed, the host and
                    process that ran it, the ``FILE[:PIPELINE]`` it came from,
                    and its final counts;
    ``structures``  per fingerprint, the graph as JSON (task names,
                    dependencies, own and effective criticality);
    ``batches``     the attempts of a run, one row per writer flush: a pickled
                    tuple of columns (task, attempt number, start, duration,
                    state after the attempt, error type, message and
                    traceback of failed attempts, and each succeeded task's
                    pickled result), plus how many attempts ended succeeded,
                    failed and cached;
    ``finals``      per run, the final states the last attempt does not tell
                    (skipped, cancelled, resumed, failed without an attempt);
    ``cache``       the results of tasks with a ``cache_key``, indexed by
                    pipeline, task and key.

    Attempts go in batches rather than a row each because a row costs about
    as much as scheduling a task: batches keep the store within 2 µs per
    task (``benchmarks/store_overhead.py``).

Off the hot path
    The scheduler calls a run's observer under its lock, so the observer
    only appends a tuple to a deque (and sets an event when the writer
    sleeps). One writer thread per store wakes on the first event, lets more
    gather for ``flush_interval`` seconds, then pickles the results and
    writes the batch in one short ``BEGIN IMMEDIATE`` transaction.
    :meth:`RunStore.end_run` writes the final states and waits until
    everything of the run is committed.

Durability: what a crash loses
    An event is committed by the writer's next transaction: normally at
    most ``flush_interval`` seconds plus the time of one write after it
    happened, later when task bodies keep the interpreter busy (the writer
    needs the GIL too). A crash of the process, even
    ``kill -9``, loses only the attempts still running and the events of
    that last window: a committed transaction survives it (the WAL is in the
    operating system's cache). With ``synchronous=NORMAL`` the last
    transactions may roll back on power loss or an operating-system crash,
    which never corrupts the file. Dependents do not wait for their
    upstream results to be committed: a task that finished in the last
    window before a crash runs again on resume, so its side effects may
    happen twice (make them idempotent); a task whose result was committed
    never runs again on resume. A result that cannot be pickled, or is
    larger than ``max_result_bytes`` pickled, is not stored (a warning is
    logged) and its task runs again on resume; tasks with ``persist=False``
    are never stored. The writer pickles a result shortly after its task
    succeeded: a dependent that changes its input in place may change what
    is stored.

Resume
    :meth:`RunStore.load_results` returns the results of the tasks that
    succeeded in a run or in any run it resumed from (the newest wins), so a
    chain of crashed and resumed runs loses nothing. A run still going on in
    another live process cannot be resumed.

Caching
    Before a task with a ``cache_key`` runs, the store looks for a result of
    the same pipeline, task name and key from any earlier run in which that
    task succeeded (the newest wins); if found, the task ends ``cached``
    without running its body.

Concurrency
    Several processes may share a state folder: writes are short
    transactions, and SQLite's busy timeout waits up to ``lock_timeout``
    seconds for another writer; longer than that is a :class:`RunStoreError`.

Bad state
    A missing folder is created. A file that is not a SQLite database or
    fails ``PRAGMA quick_check``, a store written by a newer pipeopt, or a
    lock held too long raise :class:`RunStoreError` saying what to do; the
    file is never deleted, replaced or repaired.

Security
    Results and batches are stored with :mod:`pickle`, and unpickling can
    run arbitrary code. The store is trusted local data: never open a
    ``runs.sqlite`` that came from elsewhere (a download, an archive,
    another user's folder).
"""

from __future__ import annotations

import array
import base64
import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from pipeopt._validate import check_float, check_int
from pipeopt.errors import RunStoreError
from pipeopt.priority import LABELS
from pipeopt.result import AttemptRecord, RunResult, TaskState

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline
    from pipeopt.scheduler import RunObserver

_log = logging.getLogger("pipeopt.store")

DB_NAME: Final = "runs.sqlite"
SCHEMA_VERSION: Final = 1

_SQLITE_HEADER = b"SQLite format 3\x00"
_PICKLE_PROTOCOL = 5
_NONE_PICKLE = pickle.dumps(None, protocol=_PICKLE_PROTOCOL)
_MESSAGE_LIMIT = 4_000  # characters of an error message kept
_TRACEBACK_LIMIT = 64_000  # characters of a traceback kept (its end)
_DIFF_LIMIT = 50  # differences listed before "and N more"
_CHUNK = 2048  # events encoded at a time (one batches row each)
_DIGITS = bytes.maketrans(bytes(range(10)), b"0123456789")
_HOST = socket.gethostname()

_NOTHING: Any = object()  # an event without a result (a failed or retried attempt)
_NO_ATTEMPT = AttemptRecord(0, math.nan, math.nan)  # a result reported without its attempt
_CRITICALITY_OF = operator.attrgetter("criticality")
_STATE_OF = operator.attrgetter("state")
_ATTEMPTS_OF = operator.attrgetter("attempts")

_SUCCEEDED = TaskState.SUCCEEDED
_CACHED = TaskState.CACHED
_STATE_TEXT = {state: state.value for state in TaskState}

# What a batch holds for each event's result.
_R_NONE = 0  # no result stored (none, not picklable, too large, persist=False)
_R_NULL = 1  # the task returned None
_R_PICKLED = 2  # the next pickle of the batch's blobs
_R_CACHE = 3  # in the cache table; the batch's refs say where

_SCHEMA = """
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
"""


# -- public records ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One recorded run, as listed by ``pipeopt history``.

    ``status`` is a :class:`~pipeopt.result.RunStatus` value, ``"running"``
    for a run still going on, or ``"crashed"`` for a run whose process ended
    without recording its end. Counts are of tasks by final state; for a
    running or crashed run they count the attempts recorded so far.
    """

    run_id: str
    pipeline: str
    status: str
    started_at: float
    ended_at: float | None
    duration: float | None
    tasks: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int
    cached: int
    executor: str
    workers: int
    resumed_from: str | None
    source: str | None


@dataclass(frozen=True, slots=True)
class AttemptSummary:
    """One recorded attempt of a task (``number`` 0: a result without an attempt)."""

    number: int
    started_at: float | None
    duration: float | None
    state: str
    error_type: str | None
    error: str | None
    traceback: str | None


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """What one run recorded about one task.

    ``state`` is a :class:`~pipeopt.result.TaskState` value (``"pending"``
    for a task the run never reached); ``attempts`` counts the attempts that
    ran its body; ``note`` says where the result came from when the task did
    not run (``"resumed"``, ``"cached from run …"``).
    """

    name: str
    criticality: str
    state: str
    attempts: int
    started_at: float | None
    duration: float | None
    error_type: str | None
    error: str | None
    traceback: str | None
    note: str | None
    history: tuple[AttemptSummary, ...]


@dataclass(frozen=True, slots=True)
class RunDetail:
    """One recorded run with a row per task, as shown by ``pipeopt show``."""

    summary: RunSummary
    fingerprint: str
    host: str
    pid: int
    tasks: tuple[TaskSummary, ...]

    @property
    def run_id(self) -> str:
        """Return the run's id."""
        return self.summary.run_id


# -- the structure of a compiled pipeline -----------------------------------


def _packed(values: list[int]) -> str:
    numbers = array.array("i", values)
    if sys.byteorder == "big":
        numbers.byteswap()  # stored little-endian
    return base64.b64encode(numbers.tobytes()).decode("ascii")


def _unpacked(text: str) -> list[int]:
    numbers = array.array("i")
    numbers.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tolist()


def structure_of(compiled: CompiledPipeline) -> tuple[str, str]:
    """Return ``(fingerprint, JSON)`` of a compiled pipeline's structure.

    The JSON holds the task names in order, each task's own and effective
    criticality as one digit per task (0 blocker … 5 deferred), and the
    dependencies as two base64 arrays of little-endian int32 (how many per
    task, then the dependency indices): plain JSON lists of numbers would
    cost a good part of the store's budget on large pipelines. The
    fingerprint is a SHA-256 prefix of the JSON, so it also changes when
    tasks are only reordered; :meth:`RunStore.structure_diff` then finds no
    difference.
    """
    encoded = _encode_structure(compiled, bytes(map(_CRITICALITY_OF, compiled.tasks)))
    return encoded.fingerprint, encoded.text


class _Encoded(NamedTuple):
    """A structure's inputs and its encoding, to reuse for an identical graph."""

    names: list[str]
    dependencies: list[tuple[int, ...]]
    criticality: bytes
    levels: list[int]
    fingerprint: str
    text: str

    def encodes(self, compiled: CompiledPipeline, criticality: bytes) -> bool:
        """Return whether ``compiled`` has exactly this structure (cheap comparisons)."""
        return (
            self.criticality == criticality
            and self.levels == compiled.levels
            and self.names == compiled.names
            and self.dependencies == compiled.dependencies
        )


def _encode_structure(compiled: CompiledPipeline, criticality: bytes) -> _Encoded:
    deps = compiled.dependencies
    document = {
        "format": 1,
        "tasks": compiled.names,
        "criticality": criticality.translate(_DIGITS).decode("ascii"),
        "levels": bytes(compiled.levels).translate(_DIGITS).decode("ascii"),
        "dependency_counts": _packed(list(map(len, deps))),
        "dependencies": _packed(list(itertools.chain.from_iterable(deps))),
    }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _Encoded(
        list(compiled.names), list(deps), criticality, list(compiled.levels), fingerprint, text
    )


@dataclass(frozen=True, slots=True)
class _Structure:
    names: list[str]
    criticality: str
    levels: str
    dependencies: list[list[int]]

    @classmethod
    def parse(cls, text: str) -> _Structure:
        doc = json.loads(text)
        counts = _unpacked(doc["dependency_counts"])
        flat = _unpacked(doc["dependencies"])
        deps: list[list[int]] = []
        at = 0
        for count in counts:
            deps.append(flat[at : at + count])
            at += count
        return cls(list(doc["tasks"]), str(doc["criticality"]), str(doc["levels"]), deps)

    def dependency_names(self, i: int) -> list[str]:
        return sorted(self.names[d] for d in self.dependencies[i])


# -- batches of attempts ------------------------------------------------------


class _Batch(NamedTuple):
    """The columns of one ``batches`` row, one entry per event (pickled as a plain tuple)."""

    tasks: tuple[str, ...]
    numbers: tuple[int, ...]
    started: tuple[float, ...]
    durations: tuple[float, ...]
    states: tuple[str, ...]
    errors: tuple[tuple[int, str, str, str | None], ...]  # (event, type, message, traceback)
    results: bytes  # one _R_* code per event
    blobs: tuple[bytes, ...]  # the pickles of the _R_PICKLED events, in order
    refs: tuple[tuple[int, int, str], ...]  # (event, runs.id, cache key) of _R_CACHE events

    @classmethod
    def load(cls, payload: bytes) -> _Batch:
        return cls(*pickle.loads(payload))

    def stored(self) -> Iterator[tuple[str, int, bytes | tuple[int, str] | None]]:
        """Yield ``(task, code, pickle or (run, key) or None)`` of each stored result."""
        blobs = iter(self.blobs)
        refs = {ref[0]: (ref[1], ref[2]) for ref in self.refs}
        for i, code in enumerate(self.results):
            if code == _R_PICKLED:
                yield self.tasks[i], code, next(blobs)
            elif code == _R_CACHE:
                yield self.tasks[i], code, refs[i]
            elif code == _R_NULL:
                yield self.tasks[i], code, None


def _message(error: BaseException) -> str:
    try:
        text = str(error)
    except Exception:  # a broken __str__ must not stop the recording
        text = f"<{type(error).__name__}: str() failed>"
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "…"


def _clip_traceback(text: str | None) -> str | None:
    if text is None or len(text) <= _TRACEBACK_LIMIT:
        return text
    return "…" + text[-_TRACEBACK_LIMIT:]


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


# -- processes ----------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """Return the start time of process ``pid`` from /proc, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":  # a zombie has ended already
        return None
    return fields[19].decode("ascii")


def _process_alive(host: str, pid: int, started: str | None) -> bool:
    """Return whether the process that recorded a run may still be running it."""
    if host != _HOST:
        return True  # cannot tell from here
    if started is not None and os.path.isdir("/proc"):
        # The start time tells a live process from a new one that got its pid.
        return _process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- one run being recorded ---------------------------------------------------


class _Recorder:
    """The :class:`~pipeopt.scheduler.RunObserver` of one run.

    ``attempt_finished`` and ``task_succeeded`` run under the scheduler's
    lock: they append one tuple to the run's deque and nothing else (the
    writer wakes by itself within ``flush_interval`` when it is asleep, or
    is signalled). A successful attempt is held back until its
    ``task_succeeded``, which the scheduler calls right after it under the
    same lock, so that both travel as one event. Each event is
    ``(task, attempt number, start, duration, state after, result, cache
    key, record of a failed attempt)``; ``result`` is ``_NOTHING`` when there
    is none.
    """

    __slots__ = (
        "_append",
        "_held_record",
        "_held_state",
        "_held_task",
        "_store",
        "_writer",
        "events",
        "hits",
        "key",
        "no_persist",
        "pipeline",
        "run_id",
    )

    def __init__(
        self,
        store: RunStore,
        writer: _Writer,
        *,
        key: int,
        run_id: str,
        pipeline: str,
        no_persist: frozenset[str],
    ) -> None:
        self._store = store
        self._writer = writer
        self.events: collections.deque[tuple[Any, ...]] = collections.deque()
        self._append = self.events.append
        self._held_task: str | None = None
        self._held_record = _NO_ATTEMPT
        self._held_state = _SUCCEEDED
        self.key = key
        self.run_id = run_id
        self.pipeline = pipeline
        self.no_persist = no_persist
        self.hits: dict[str, int] = {}  # task -> runs.id of the cached result it reused

    def attempt_finished(self, task: str, record: AttemptRecord, state: TaskState) -> None:
        """Queue the attempt (called under the scheduler's lock)."""
        if self._held_task is not None:
            self.release_held()
        if state is _SUCCEEDED or state is _CACHED:
            self._held_task, self._held_record, self._held_state = task, record, state
            return
        self._append(
            (task, record.number, record.started_at, record.duration, state, _NOTHING, None, record)
        )
        if not self._writer.signalled:
            self._writer.signal()

    def task_succeeded(self, task: str, result: Any, cache_key: str | None) -> None:
        """Queue the result with its attempt (called under the scheduler's lock)."""
        if self._held_task == task:
            self._queue_held(result, cache_key)
        else:
            if self._held_task is not None:
                self.release_held()
            self._append((task, 0, math.nan, math.nan, _SUCCEEDED, result, cache_key, None))
        if not self._writer.signalled:
            self._writer.signal()

    def cache_lookup(self, task: str, cache_key: str) -> tuple[bool, Any]:
        """Return ``(True, result)`` if an earlier run stored ``task`` under ``cache_key``."""
        found = self._store._cache_lookup(self.pipeline, task, cache_key)
        if found is None:
            return False, None
        origin, value = found
        self.hits[task] = origin
        return True, value

    def release_held(self) -> None:
        """Queue a held successful attempt whose result never came."""
        if self._held_task is not None:
            self._queue_held(_NOTHING, None)

    def _queue_held(self, result: Any, cache_key: str | None) -> None:
        task, record = self._held_task, self._held_record
        self._held_task = None
        self._append(
            (
                task,
                record.number,
                record.started_at,
                record.duration,
                self._held_state,
                result,
                cache_key,
                None,
            )
        )


class _End:
    """The end of a run, queued after its last event; ``done`` is set once written."""

    def __init__(self, recorder: _Recorder, result: RunResult) -> None:
        self.recorder = recorder
        self.result = result
        self.done = threading.Event()
        self.error: str | None = None
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
                    None if o.error is None else _message(o.error),
                    _clip_traceback(o.traceback),
                    "resumed" if o.state is _SUCCEEDED and not o.attempts else None,
                )
                for o in untold
            )
            self._payload = pickle.dumps(rows, protocol=_PICKLE_PROTOCOL)
        return self._payload

    def write(self, conn: sqlite3.Connection) -> None:
        """Write the final states and close the run's row."""
        result = self.result
        key = self.recorder.key
        conn.execute("DELETE FROM finals WHERE run = ?", (key,))  # a retried commit
        payload = self.payload()
        conn.execute("INSERT INTO finals (run, payload) VALUES (?, ?)", (key, payload))
        conn.execute(
            "UPDATE runs SET ended_at = ?, status = ?, counts = ? WHERE id = ?",
            (
                result.started_at + result.wall_time,
                result.status.value,
                json.dumps(self._counts),
                key,
            ),
        )


class _Flush:
    """A request to commit everything queued before it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None


# -- the writer thread ------------------------------------------------------------


class _Writer:
    """Drains the runs' event deques into the database in batched transactions."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.recorders: list[_Recorder] = []  # replaced under `lock`, never changed in place
        self.lock = threading.Lock()
        self.controls: collections.deque[_End | _Flush] = collections.deque()
        self.signalled = False
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._stopping = False
        # Encoded but not yet committed (kept across a failed commit, to retry).
        self._batches: list[tuple[int, int, int, int, int, bytes]] = []
        self._cache: list[tuple[str, str, str, int, bytes]] = []
        self._controls: list[_End | _Flush] = []
        self._failing_since: float | None = None
        self.thread = threading.Thread(target=self._main, name="pipeopt-store-writer", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> bool:
        """Return whether encoded rows wait for a commit."""
        return bool(self._batches or self._cache or self._controls)

    def signal(self) -> None:
        """Wake the writer (it then waits ``flush_interval`` for more events)."""
        self.signalled = True
        self._wake.set()

    def urge(self) -> None:
        """Wake the writer and skip the coalescing delay."""
        self._urgent.set()
        self.signal()

    def stop(self, timeout: float) -> bool:
        """Write what is queued, end the thread; return whether it ended in time."""
        self._stopping = True
        self.urge()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _main(self) -> None:
        store = self.store
        conn: sqlite3.Connection | None = None
        try:
            conn = store._connect(writer=True)
            while True:
                # With rows that failed to commit, retry after a pause even without news.
                self._wake.wait(store.retry_interval if self.pending else None)
                if not self._stopping and not self.pending:
                    self._urgent.wait(store.flush_interval)
                self.signalled = False
                self._wake.clear()
                self._urgent.clear()
                # Controls first: the events queued before an end are then drained too.
                controls = _drain(self.controls)
                for recorder in self.recorders:
                    # What is queued now, in chunks; later events wait for the next commit.
                    left = len(recorder.events)
                    while left > 0:
                        events = _drain(recorder.events, min(left, _CHUNK))
                        left -= len(events)
                        self._encode(recorder, events)
                        # Let the scheduler have the GIL: a long C call here (zip,
                        # pickle) would stall a worker that holds the scheduler's lock.
                        time.sleep(0)
                for control in controls:
                    if isinstance(control, _End):
                        control.payload()
                        with self.lock:
                            self.recorders = [
                                r for r in self.recorders if r is not control.recorder
                            ]
                self._controls.extend(controls)
                if self.pending:
                    self._commit(conn)
                if (
                    self._stopping
                    and not self.controls
                    and not any(r.events for r in self.recorders)
                ):
                    if self.pending:
                        self._give_up("the store was closed")
                    return
        except Exception as exc:  # the recording must never take the run down
            _log.error("run store writer stopped: %s: %s", type(exc).__name__, exc)
            self._give_up(f"the writer stopped: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def _encode(self, recorder: _Recorder, events: list[tuple[Any, ...]]) -> None:
        """Encode events of one run as one ``batches`` row (column-wise, in C loops)."""
        tasks, numbers, started, durations, states, values, keys, failed = zip(*events, strict=True)
        state_texts = tuple(map(_STATE_TEXT.__getitem__, states))
        failures: tuple[tuple[int, str, str, str | None], ...] = ()
        if failed.count(None) != len(failed):
            failures = tuple(
                (i, type(r.error).__name__, _message(r.error), _clip_traceback(r.traceback))
                for i, r in enumerate(failed)
                if r is not None and r.error is not None
            )
        codes = bytearray(
            [_R_NONE if v is _NOTHING else _R_NULL if v is None else _R_PICKLED for v in values]
        )
        blobs: list[bytes] = []
        refs: list[tuple[int, int, str]] = []
        if recorder.no_persist or keys.count(None) != len(keys) or _R_PICKLED in codes:
            self._store_results(
                recorder, tasks, values, keys=keys, codes=codes, blobs=blobs, refs=refs
            )
        payload = pickle.dumps(
            (
                tasks,
                numbers,
                started,
                durations,
                state_texts,
                failures,
                bytes(codes),
                tuple(blobs),
                tuple(refs),
            ),
            protocol=_PICKLE_PROTOCOL,
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
        recorder: _Recorder,
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
            if code == _R_NONE:
                continue
            task = tasks[i]
            if task in no_persist:
                codes[i] = _R_NONE
                recorder.hits.pop(task, None)
                continue
            key = keys[i]
            if key is not None:
                origin = recorder.hits.pop(task, None)
                if origin is None:
                    data = self._pickle(recorder, task, values[i])
                    if data is None:
                        codes[i] = _R_NONE
                        continue
                    self._cache.append((recorder.pipeline, task, key, recorder.key, data))
                    origin = recorder.key
                codes[i] = _R_CACHE
                refs.append((i, origin, key))
            elif code == _R_PICKLED:
                data = self._pickle(recorder, task, values[i])
                if data is None:
                    codes[i] = _R_NONE
                else:
                    blobs.append(data)

    def _pickle(self, recorder: _Recorder, task: str, value: Any) -> bytes | None:
        if value is None:
            return _NONE_PICKLE
        try:
            data = pickle.dumps(value, protocol=_PICKLE_PROTOCOL)
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
        limit = self.store.max_result_bytes
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

    def _commit(self, conn: sqlite3.Connection) -> None:
        controls = self._controls
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
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
                    if isinstance(control, _End):
                        control.write(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                _log.warning("run store: cannot write, will retry: %s", exc)
            reason = self.store._explain(exc, "record the run")
            # Tell the waiters now, but keep every row (and the ends) to retry.
            for control in controls:
                if not control.done.is_set():
                    control.error = reason
                    control.done.set()
            return
        if self._failing_since is not None:
            _log.warning(
                "run store: writing again after %.1fs", time.monotonic() - self._failing_since
            )
            self._failing_since = None
        self._batches.clear()
        self._cache.clear()
        for control in controls:
            control.done.set()
        controls.clear()

    def _give_up(self, why: str) -> None:
        lost = sum(row[1] for row in self._batches)
        lost += sum(len(recorder.events) for recorder in self.recorders)
        if lost:
            _log.error("run store: %d events not recorded (%s)", lost, why)
        for control in [*self._controls, *_drain(self.controls)]:
            control.error = control.error or why
            control.done.set()


def _drain(queue: collections.deque[Any], limit: int | None = None) -> list[Any]:
    """Take what is in ``queue`` now, at most ``limit`` items (appends may go on meanwhile)."""
    popleft = queue.popleft
    count = len(queue) if limit is None else min(limit, len(queue))
    return [popleft() for _ in range(count)]


# -- the store ------------------------------------------------------------------


class RunStore:
    """Record runs in ``<state_dir>/runs.sqlite`` and read them back.

    Args:
        state_dir: the folder of the store; created if missing.
        lock_timeout: seconds to wait for another process's write lock
            before giving up with :class:`RunStoreError`.
        flush_interval: seconds the writer lets events gather before one
            transaction; a crash loses at most the events of this window.
        max_result_bytes: results larger than this, pickled, are not
            stored (their tasks run again on resume).

    Raises:
        RunStoreError: the folder cannot be created, the file is not a
            healthy SQLite database (it is left untouched), it was written by
            a newer pipeopt, or it stays locked longer than ``lock_timeout``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        lock_timeout: float = 5.0,
        flush_interval: float = 0.05,
        max_result_bytes: int = 64 * 2**20,
    ) -> None:
        self.lock_timeout = check_float("lock_timeout", lock_timeout, minimum=0.0)
        self.flush_interval = check_float("flush_interval", flush_interval, minimum=0.0)
        self.max_result_bytes = check_int("max_result_bytes", max_result_bytes, minimum=0)
        self.retry_interval = max(0.25, self.flush_interval)
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self._lock = threading.RLock()
        self._writer: _Writer | None = None
        self._active: dict[str, _Recorder] = {}
        self._sources: dict[str, str] = {}
        self._encoded: dict[str, _Encoded] = {}  # by pipeline: the last structure encoded
        self._closed = False
        self._make_folder()
        self._check_header()
        self._conn = self._open()

    def __repr__(self) -> str:
        return f"RunStore({str(self.state_dir)!r})"

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------

    def _make_folder(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunStoreError(
                f"state folder {self.state_dir} is a file; pass a folder as the state dir"
            ) from None
        except OSError as exc:
            raise RunStoreError(
                f"cannot create the state folder {self.state_dir}: {exc.strerror}; "
                "pass another state dir"
            ) from None

    def _check_header(self) -> None:
        # Read the header ourselves first: SQLite must not even open a file
        # that is not a database (it could create a journal beside it).
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(100)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise RunStoreError(
                f"{self.path} is a folder, not a run store; move it aside or pass another state dir"
            ) from None
        except OSError as exc:
            raise RunStoreError(
                f"cannot read the run store {self.path}: {exc.strerror}; "
                "check its permissions or pass another state dir"
            ) from None
        if head and (len(head) < 100 or not head.startswith(_SQLITE_HEADER)):
            raise RunStoreError(self._corrupt_text("not a SQLite database"))

    def _connect(self, *, writer: bool = False) -> sqlite3.Connection:
        """Return a new connection with the store's settings (autocommit mode)."""
        conn = sqlite3.connect(
            self.path, timeout=self.lock_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            if writer:
                # Checkpoint (copy the WAL into the file) every ~40 MB rather than
                # every 4 MB: fewer, larger copies; closing checkpoints the rest.
                conn.execute("PRAGMA wal_autocheckpoint = 10000")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open(self) -> sqlite3.Connection:
        # Two processes creating one store at once can meet SQLITE_BUSY where
        # the busy handler does not apply (switching to WAL, first schema):
        # try again until lock_timeout has passed.
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                return self._open_once()
            except RunStoreError as exc:
                cause = str(exc.__context__ or "")
                locked = "locked" in cause or "busy" in cause
                if not locked or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)

    def _open_once(self) -> sqlite3.Connection:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise self._error(exc, "open the run store") from None
        try:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise RunStoreError(
                    self._corrupt_text("PRAGMA quick_check: " + "; ".join(problems[:3]))
                )
            mode = conn.execute("PRAGMA journal_mode").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                _log.warning("run store %s: WAL mode not available, using %s", self.path, mode)
            self._ensure_schema(conn)
        except RunStoreError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "open the run store") from None
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = int(row[0]) if row is not None else 0
            if version > SCHEMA_VERSION:
                raise RunStoreError(
                    f"the run store {self.path} was written by a newer pipeopt "
                    f"(schema {version}, this one reads {SCHEMA_VERSION}); "
                    "upgrade pipeopt or pass another state dir"
                )
            if version == SCHEMA_VERSION:
                return
        with self._transaction(conn, "create the run store"):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)",
                (str(SCHEMA_VERSION),),
            )

    # -- errors -----------------------------------------------------------------

    def _corrupt_text(self, detail: str) -> str:
        return (
            f"{self.path} is not a usable run store ({detail}); it was left untouched: "
            f"move it aside (e.g. to {DB_NAME}.broken) to start a new history, "
            "or pass another state dir"
        )

    def _explain(self, exc: sqlite3.Error, doing: str) -> str:
        """Return a one-line explanation of a SQLite error that says what to do."""
        text = str(exc)
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            return (
                f"cannot {doing}: {self.path} is locked by another process "
                f"(waited {self.lock_timeout:g}s); let that process finish, "
                "or pass another state dir"
            )
        if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
            return self._corrupt_text(text)
        if "readonly" in lowered or "unable to open" in lowered or "permission" in lowered:
            return (
                f"cannot {doing}: {self.path}: {text}; check the permissions of "
                f"{self.state_dir} or pass another state dir"
            )
        return f"cannot {doing} in {self.path}: {text}"

    def _error(self, exc: sqlite3.Error, doing: str) -> RunStoreError:
        return RunStoreError(self._explain(exc, doing))

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection, doing: str) -> Iterator[sqlite3.Connection]:
        """Run the block in one ``BEGIN IMMEDIATE`` transaction (short: others wait)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, doing) from None
            raise

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Hold the store's connection for one consistent read (a snapshot)."""
        with self._lock:
            if self._closed:
                raise RunStoreError(f"the run store {self.path} is closed")
            conn = self._conn
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc, doing) from None

    # -- recording a run ----------------------------------------------------------

    def _structure_of(self, compiled: CompiledPipeline) -> tuple[str, str]:
        """Return :func:`structure_of`, reusing the last encoding of an identical graph.

        Comparing the graph with the last one of its pipeline costs a fifth
        of encoding it again; repeated runs of one pipeline then pay only that.
        """
        criticality = bytes(map(_CRITICALITY_OF, compiled.tasks))
        last = self._encoded.get(compiled.name)
        if last is None or not last.encodes(compiled, criticality):
            last = self._encoded[compiled.name] = _encode_structure(compiled, criticality)
        return last.fingerprint, last.text

    def begin_run(
        self,
        *,
        run_id: str,
        pipeline: str,
        compiled: CompiledPipeline,
        executor: str,
        workers: int,
        resumed_from: str | None,
    ) -> RunObserver:
        """Record the start of a run and return the observer that records its attempts.

        Raises:
            RunStoreError: the store is locked or closed, or already has ``run_id``.
        """
        fingerprint, structure = self._structure_of(compiled)
        no_persist = frozenset(task.name for task in compiled.tasks if not task.persist)
        pid = os.getpid()
        with self._lock:
            if self._closed:
                raise RunStoreError(f"the run store {self.path} is closed")
            conn = self._conn
            with self._transaction(conn, f"record the start of run {run_id}"):
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
                            _HOST,
                            pid,
                            _process_start(pid),
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
            if self._writer is None:
                self._writer = _Writer(self)
            writer = self._writer
            recorder = _Recorder(
                self, writer, key=key, run_id=run_id, pipeline=pipeline, no_persist=no_persist
            )
            with writer.lock:
                writer.recorders = [*writer.recorders, recorder]
            self._active[run_id] = recorder
        return recorder

    def end_run(self, result: RunResult) -> None:
        """Record every task's final state and the run's end; wait until all is written.

        The writer thread stops when no other run of this store is going on.

        Raises:
            RunStoreError: the record could not be written (e.g. the store
                stayed locked); the writer keeps retrying until :meth:`close`.
        """
        with self._lock:
            recorder = self._active.get(result.run_id)
        if recorder is None:
            _log.debug("end_run for run %s, which this store did not begin", result.run_id)
            return
        recorder.release_held()
        writer = recorder._writer
        end = _End(recorder, result)
        writer.controls.append(end)
        writer.urge()
        self._wait(writer, end)
        with self._lock:
            self._active.pop(result.run_id, None)
            if not self._active and writer is self._writer and not writer.pending:
                self._writer = None
                writer.stop(self.lock_timeout + 5.0)
        if end.error is not None:
            raise RunStoreError(
                f"run {result.run_id} ended ({result.status.value}) but its record is "
                f"incomplete: {end.error}"
            )

    @staticmethod
    def _wait(writer: _Writer, control: _End | _Flush) -> None:
        while not control.done.wait(0.5):
            if not writer.thread.is_alive():
                control.error = control.error or "the writer stopped"
                return

    def flush(self) -> None:
        """Wait until every event queued so far is committed.

        Raises:
            RunStoreError: the events could not be written.
        """
        with self._lock:
            writer = self._writer
        if writer is None:
            return
        request = _Flush()
        writer.controls.append(request)
        writer.urge()
        self._wait(writer, request)
        if request.error is not None:
            raise RunStoreError(request.error)

    def set_source(self, run_id: str, source: str) -> None:
        """Record the ``FILE[:PIPELINE]`` a run came from, so ``pipeopt resume`` finds it.

        May be called before the run begins (with the id it will get), or
        any time after.

        Raises:
            RunStoreError: the store is locked or closed.
        """
        with self._lock:
            if self._closed:
                raise RunStoreError(f"the run store {self.path} is closed")
            conn = self._conn
            with self._transaction(conn, f"record the pipeline file of run {run_id}"):
                cursor = conn.execute(
                    "UPDATE runs SET source = ? WHERE run_id = ?", (source, run_id)
                )
            if cursor.rowcount == 0:
                self._sources[run_id] = source

    def _cache_lookup(self, pipeline: str, task: str, key: str) -> tuple[int, Any] | None:
        """Return ``(runs.id that stored it, result)`` for a cache key, or ``None``."""
        try:
            with self._reading("look up a cached result") as conn:
                row = conn.execute(
                    "SELECT run, data FROM cache WHERE pipeline = ? AND task = ? "
                    "AND cache_key = ? ORDER BY rowid DESC LIMIT 1",
                    (pipeline, task, key),
                ).fetchone()
        except RunStoreError as exc:
            _log.warning("task %r: cache lookup failed, running it: %s", task, exc)
            return None
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

    # -- reading runs -------------------------------------------------------------------

    def resolve_run(self, run_id: str | None, *, pipeline: str | None = None) -> str:
        """Return the id of the run ``run_id`` names.

        ``None`` or ``"last"`` name the newest run (of ``pipeline`` if
        given); otherwise the exact id, or a prefix that names one run.

        Raises:
            RunStoreError: no such run, an ambiguous prefix, or a run of
                another pipeline than ``pipeline``.
        """
        with self._reading("look up runs") as conn:
            if run_id is None or run_id == "last":
                where, params = ("WHERE pipeline = ?", (pipeline,)) if pipeline else ("", ())
                row = conn.execute(
                    f"SELECT run_id FROM runs {where} ORDER BY started_at DESC, id DESC LIMIT 1",
                    params,
                ).fetchone()
                if row is None:
                    of = f" of pipeline {pipeline!r}" if pipeline is not None else ""
                    raise RunStoreError(
                        f"no runs{of} are recorded in {self.path}; start one with `pipeopt run`"
                    )
                return str(row[0])
            rows = conn.execute(
                "SELECT run_id, pipeline FROM runs WHERE run_id = ?", (run_id,)
            ).fetchall()
            if not rows:
                escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = conn.execute(
                    "SELECT run_id, pipeline FROM runs WHERE run_id LIKE ? ESCAPE '\\' "
                    "ORDER BY started_at DESC LIMIT 6",
                    (escaped + "%",),
                ).fetchall()
        if not rows:
            raise RunStoreError(
                f"no run {run_id!r} in {self.path}; list the recorded runs with `pipeopt history`"
            )
        if len(rows) > 1:
            shown = ", ".join(str(r[0]) for r in rows[:5])
            raise RunStoreError(
                f"run id {run_id!r} matches several runs ({shown}); give more of it"
            )
        found, found_pipeline = str(rows[0][0]), str(rows[0][1])
        if pipeline is not None and found_pipeline != pipeline:
            raise RunStoreError(
                f"run {found} is a run of pipeline {found_pipeline!r}, not {pipeline!r}; "
                "name a run of this pipeline (see `pipeopt history`)"
            )
        return found

    def _run_row(self, conn: sqlite3.Connection, run_id: str) -> _RunRow:
        row = conn.execute(
            f"SELECT {', '.join(_RunRow._fields)} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunStoreError(
                f"no run {run_id!r} in {self.path}; list the recorded runs with `pipeopt history`"
            )
        return _RunRow(*row)

    def _status(self, row: _RunRow) -> str:
        if row.status != "running":
            return row.status
        if row.pid == os.getpid() and row.host == _HOST:
            return "running" if row.run_id in self._active else "crashed"
        return "running" if _process_alive(row.host, row.pid, row.process_start) else "crashed"

    def _summary(self, conn: sqlite3.Connection, row: _RunRow) -> RunSummary:
        if row.counts is not None:
            counts: dict[str, int] = json.loads(row.counts)
        else:
            sums = conn.execute(
                "SELECT SUM(succeeded), SUM(failed), SUM(cached) FROM batches WHERE run = ?",
                (row.id,),
            ).fetchone()
            counts = {
                "succeeded": sums[0] or 0,
                "failed": sums[1] or 0,
                "cached": sums[2] or 0,
            }
        return RunSummary(
            run_id=row.run_id,
            pipeline=row.pipeline,
            status=self._status(row),
            started_at=row.started_at,
            ended_at=row.ended_at,
            duration=None if row.ended_at is None else row.ended_at - row.started_at,
            tasks=row.tasks,
            succeeded=counts.get("succeeded", 0),
            failed=counts.get("failed", 0),
            skipped=counts.get("skipped", 0),
            cancelled=counts.get("cancelled", 0),
            cached=counts.get("cached", 0),
            executor=row.executor,
            workers=row.workers,
            resumed_from=row.resumed_from,
            source=row.source,
        )

    def list_runs(self, limit: int = 20) -> list[RunSummary]:
        """Return the newest ``limit`` runs, newest first.

        Raises:
            RunStoreError: the store cannot be read.
        """
        limit = check_int("limit", limit, minimum=1)
        with self._reading("list runs") as conn:
            rows = conn.execute(
                f"SELECT {', '.join(_RunRow._fields)} FROM runs "
                "ORDER BY started_at DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [self._summary(conn, _RunRow(*row)) for row in rows]

    def summary(self, run_id: str) -> RunSummary:
        """Return one run's summary (``run_id`` as :meth:`resolve_run` takes it).

        Raises:
            RunStoreError: no such run.
        """
        run_id = self.resolve_run(run_id)
        with self._reading(f"read run {run_id}") as conn:
            return self._summary(conn, self._run_row(conn, run_id))

    def show_run(self, run_id: str) -> RunDetail:
        """Return a run with a row per task (``run_id`` as :meth:`resolve_run` takes it).

        Raises:
            RunStoreError: no such run.
        """
        run_id = self.resolve_run(run_id)
        with self._reading(f"read run {run_id}") as conn:
            row = self._run_row(conn, run_id)
            summary = self._summary(conn, row)
            structure = self._structure(conn, row.fingerprint)
            batches = self._batches(conn, row.id)
            finals = self._finals(conn, row.id)
            origins = dict(conn.execute("SELECT id, run_id FROM runs").fetchall())
        history: dict[str, list[AttemptSummary]] = {}
        cached_from: dict[str, str] = {}
        for batch in batches:
            errors = {e[0]: e[1:] for e in batch.errors}
            for i, task in enumerate(batch.tasks):
                error_type, error, text = errors.get(i, (None, None, None))
                history.setdefault(task, []).append(
                    AttemptSummary(
                        batch.numbers[i],
                        _nan_to_none(batch.started[i]),
                        _nan_to_none(batch.durations[i]),
                        batch.states[i],
                        error_type,
                        error,
                        text,
                    )
                )
            for i, origin, _ in batch.refs:
                if origin != row.id:
                    cached_from[batch.tasks[i]] = origins.get(origin, f"#{origin}")
        tasks = tuple(
            _task_summary(
                name,
                LABELS[int(structure.levels[i])],
                history.get(name, []),
                finals.get(name),
                cached_from.get(name),
            )
            for i, name in enumerate(structure.names)
        )
        return RunDetail(summary, row.fingerprint, row.host, row.pid, tasks)

    def _structure(self, conn: sqlite3.Connection, fingerprint: str) -> _Structure:
        row = conn.execute(
            "SELECT data FROM structures WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        if row is None:
            raise RunStoreError(self._corrupt_text(f"no structure {fingerprint}"))
        try:
            return _Structure.parse(str(row[0]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunStoreError(
                self._corrupt_text(f"structure {fingerprint} unreadable: {exc}")
            ) from None

    def _batches(self, conn: sqlite3.Connection, key: int) -> list[_Batch]:
        payloads = conn.execute(
            "SELECT payload FROM batches WHERE run = ? ORDER BY rowid", (key,)
        ).fetchall()
        try:
            return [_Batch.load(payload) for (payload,) in payloads]
        except Exception as exc:
            raise RunStoreError(self._corrupt_text(f"a batch cannot be read: {exc}")) from None

    def _finals(self, conn: sqlite3.Connection, key: int) -> dict[str, tuple[Any, ...]]:
        row = conn.execute(
            "SELECT payload FROM finals WHERE run = ? ORDER BY rowid DESC LIMIT 1", (key,)
        ).fetchone()
        if row is None:
            return {}
        try:
            return {final[0]: final[1:] for final in pickle.loads(row[0])}
        except Exception as exc:
            raise RunStoreError(self._corrupt_text(f"final states cannot be read: {exc}")) from None

    # -- resuming -------------------------------------------------------------------

    def structure_diff(self, run_id: str, compiled: CompiledPipeline) -> list[str]:
        """Return how ``compiled`` differs from the pipeline of ``run_id``, one line each.

        Lines read ``task 'x' added``, ``task 'y' removed``,
        ``task 'z' dependencies changed: [a] -> [a, b]`` and
        ``task 'z' criticality changed: low -> high``; an empty list means the
        same graph. Past 50 lines the rest is counted in a last line.

        Raises:
            RunStoreError: no such run.
        """
        fingerprint, _ = self._structure_of(compiled)
        with self._reading(f"read run {run_id}") as conn:
            row = self._run_row(conn, run_id)
            if row.fingerprint == fingerprint:
                return []
            old = self._structure(conn, row.fingerprint)
        old_index = {name: i for i, name in enumerate(old.names)}
        new_index = compiled.index
        differences = [f"task {name!r} removed" for name in old.names if name not in new_index]
        for task in compiled.tasks:
            j = old_index.get(task.name)
            if j is None:
                differences.append(f"task {task.name!r} added")
                continue
            before = old.dependency_names(j)
            after = sorted(task.dependency_names)
            if before != after:
                differences.append(
                    f"task {task.name!r} dependencies changed: "
                    f"[{', '.join(before)}] -> [{', '.join(after)}]"
                )
            was, now = LABELS[int(old.criticality[j])], LABELS[int(task.criticality)]
            if was != now:
                differences.append(f"task {task.name!r} criticality changed: {was} -> {now}")
        if len(differences) > _DIFF_LIMIT:
            more = len(differences) - _DIFF_LIMIT + 1
            differences = [*differences[: _DIFF_LIMIT - 1], f"and {more} more differences"]
        return differences

    def load_results(self, run_id: str, *, names: set[str]) -> dict[str, Any]:
        """Return the stored results of the tasks in ``names`` that succeeded.

        Looks in ``run_id`` and then in the runs it resumed from, newest
        first, so a chain of interrupted runs loses nothing. A result that
        cannot be unpickled is left out (a warning is logged): its task runs
        again.

        Raises:
            RunStoreError: no such run, or it is still running in a live process.
        """
        found: dict[str, tuple[int, bytes | tuple[int, str] | None]] = {}
        with self._reading(f"read the results of run {run_id}") as conn:
            row = self._run_row(conn, run_id)
            if self._status(row) == "running":
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
            for key in chain:
                in_run: dict[str, tuple[int, bytes | tuple[int, str] | None]] = {}
                for batch in self._batches(conn, key):
                    for task, code, stored in batch.stored():
                        if task in names and task not in found:
                            in_run[task] = (code, stored)  # a later attempt wins
                found.update(in_run)
            for task, (code, stored) in found.items():
                if code == _R_CACHE:
                    assert isinstance(stored, tuple)
                    data = conn.execute(
                        "SELECT data FROM cache WHERE run = ? AND task = ? AND cache_key = ? "
                        "ORDER BY rowid DESC LIMIT 1",
                        (stored[0], task, stored[1]),
                    ).fetchone()
                    found[task] = (_R_PICKLED, None if data is None else bytes(data[0]))
        results: dict[str, Any] = {}
        for task, (code, stored) in found.items():
            if code == _R_NULL:
                results[task] = None
                continue
            if not isinstance(stored, bytes):
                continue
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

    def close(self) -> None:
        """Write what is queued, stop the writer and close the database (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer, self._writer = self._writer, None
            for recorder in self._active.values():
                recorder.release_held()
            self._active.clear()
            if writer is not None and not writer.stop(self.lock_timeout + 5.0):
                _log.error("run store %s: the writer did not finish in time", self.path)
            self._conn.close()


class _RunRow(NamedTuple):
    """A ``runs`` row; the field names are the column names."""

    id: int
    run_id: str
    pipeline: str
    fingerprint: str
    tasks: int
    started_at: float
    ended_at: float | None
    status: str
    executor: str
    workers: int
    resumed_from: str | None
    host: str
    pid: int
    process_start: str | None
    source: str | None
    counts: str | None


def _task_summary(
    name: str,
    criticality: str,
    history: list[AttemptSummary],
    final: tuple[Any, ...] | None,
    cached_from: str | None,
) -> TaskSummary:
    ran = [a for a in history if a.number > 0 and a.state != "cached"]
    last = history[-1] if history else None
    error_type = error = text = note = None
    if final is not None:
        state, attempts, error_type, error, text, note = final
    elif last is not None:
        state, attempts = last.state, len(ran)
        if state in ("failed", "retrying"):
            error_type, error, text = last.error_type, last.error, last.traceback
    else:
        state, attempts = TaskState.PENDING.value, 0
    if cached_from is not None and note is None:
        note = f"cached from run {cached_from}"
    timed = [a for a in history if a.started_at is not None]
    started = timed[0].started_at if timed else None
    duration = None
    if timed and started is not None:
        end = timed[-1]
        duration = (end.started_at or 0.0) + (end.duration or 0.0) - started
    return TaskSummary(
        name=name,
        criticality=criticality,
        state=state,
        attempts=attempts,
        started_at=started,
        duration=duration,
        error_type=error_type,
        error=error,
        traceback=text,
        note=note,
        history=tuple(history),
    )


__all__ = [
    "DB_NAME",
    "AttemptSummary",
    "RunDetail",
    "RunStore",
    "RunSummary",
    "TaskSummary",
    "structure_of",
]
