"""Learned task durations in the run store: kept up to date as runs end, loaded in one read.

``task_estimates`` holds one row per pipeline: its tasks' names, estimates,
sample counts and sample windows, each column a blob (see
:class:`~pipeopt.estimates.LearnedDurations`). A run's end folds its
successful attempts in, in the transaction that records the end, so runs of
one pipeline ending in several processes each see the others' samples.
Loading reads the names, estimates and counts only: a few C-level copies for
100,000 tasks, where a row per task would cost more than the budget of 1 µs
per task (``benchmarks/learned_durations.py``).

``run_estimates`` keeps, per run, the estimate each task was ranked by and
where it came from, so that ``pipeopt show`` tells what the run used: two
columns in the order of the run's stored structure (its ``names`` column is
left empty).
"""

from __future__ import annotations

import logging
import math
import pickle
import sqlite3
import time
from array import array
from collections.abc import Collection, Sequence
from typing import cast

from pipeopt.estimates import WINDOW, LearnedDurations, Samples, TaskEstimates, learn
from pipeopt.store.records import PICKLE_PROTOCOL

_log = logging.getLogger("pipeopt.store")


def load(conn: sqlite3.Connection, pipeline: str, *, windows: bool = False) -> LearnedDurations:
    """Return the durations learned for ``pipeline`` (empty when none).

    ``windows`` also loads the recent samples (needed to learn more, not to rank).

    Raises:
        ValueError: the row is damaged (a blob of the wrong size or not a pickle).
    """
    return _decode(_row(conn, pipeline, windows=windows))


def _row(conn: sqlite3.Connection, pipeline: str, *, windows: bool) -> tuple[bytes, ...] | None:
    columns = "names, seconds, samples" + (", windows" if windows else "")
    try:
        row: tuple[bytes, ...] | None = conn.execute(
            f"SELECT {columns} FROM task_estimates WHERE pipeline = ?", (pipeline,)
        ).fetchone()
    except sqlite3.OperationalError:  # a store of schema 3, opened read-only
        return None
    return row


def _decode(row: tuple[bytes, ...] | None) -> LearnedDurations:
    if row is None:
        return LearnedDurations((), (), ())
    try:
        names = pickle.loads(row[0])
    except Exception as exc:
        raise ValueError(f"task names unreadable: {exc}") from None
    if not isinstance(names, tuple):
        raise ValueError(f"task names are a {type(names).__name__}, not a tuple")
    count = len(names)
    seconds = _floats(row[1], count)
    samples = array("q")
    samples.frombytes(row[2])
    kept: tuple[array[float], ...] = ()
    if len(row) > 3:
        flat = _floats(row[3], count * WINDOW)
        kept = tuple(flat[k * count : (k + 1) * count] for k in range(WINDOW))
    if len(samples) != count:
        raise ValueError("columns of different lengths")
    return LearnedDurations(names, seconds, samples, kept)


def _floats(blob: bytes, count: int) -> array[float]:
    values = array("d")
    if len(blob) != count * values.itemsize:
        raise ValueError(f"{len(blob)} bytes where {count} numbers were expected")
    values.frombytes(blob)
    return values


def record(conn: sqlite3.Connection, pipeline: str, new: Samples, keep: Collection[str]) -> None:
    """Fold a run's samples into ``pipeline``'s learned durations, for the tasks in ``keep``.

    A damaged summary is replaced by one learned from this run (logged).
    """
    row = _row(conn, pipeline, windows=True)
    try:
        old = _decode(row)
    except ValueError as exc:
        _log.warning(
            "pipeline %r: learned durations unreadable (%s); learning them anew", pipeline, exc
        )
        old = LearnedDurations((), (), ())
    if not len(new) and not len(old):
        return
    learned = learn(old, new, keep)
    # The same tasks as last time (the usual): their names are stored already.
    same = row is not None and learned.names == old.names
    conn.execute(
        "INSERT OR REPLACE INTO task_estimates "
        "(pipeline, updated_at, tasks, names, seconds, samples, windows) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            pipeline,
            time.time(),
            len(learned),
            row[0] if same and row else pickle.dumps(learned.names, protocol=PICKLE_PROTOCOL),
            array("d", learned.seconds).tobytes(),
            array("q", learned.samples).tobytes(),
            b"".join(array("d", column).tobytes() for column in learned.windows),
        ),
    )


def save_used(conn: sqlite3.Connection, key: int, estimates: TaskEstimates) -> None:
    """Record the estimates a run (``runs.id`` ``key``) used, if any.

    Aligned with the run's stored structure (its task order), so the names
    are not stored again: NaN seconds for a task without an estimate.
    """
    seconds = estimates.seconds
    if seconds.count(None) == len(seconds):
        return
    if None in seconds:
        seconds = [math.nan if s is None else s for s in seconds]
    conn.execute(
        "INSERT OR REPLACE INTO run_estimates (run, names, seconds, samples) VALUES (?, ?, ?, ?)",
        (
            key,
            b"",
            array("d", cast("list[float]", seconds)).tobytes(),
            array("q", estimates.samples).tobytes(),
        ),
    )


def load_used(
    conn: sqlite3.Connection, key: int, names: Sequence[str]
) -> dict[str, tuple[float, int]]:
    """Return ``{task: (seconds, samples code)}`` of the estimates run ``key`` used.

    ``names`` are the tasks of the run's structure, in order.

    Raises:
        ValueError: the record does not match the structure.
    """
    try:
        row = conn.execute(
            "SELECT names, seconds, samples FROM run_estimates WHERE run = ?", (key,)
        ).fetchone()
    except sqlite3.OperationalError:  # a store of schema 3, opened read-only
        return {}
    if row is None:
        return {}
    seconds = _floats(row[1], len(names))
    samples = array("q")
    samples.frombytes(row[2])
    if len(samples) != len(names):
        raise ValueError(f"{len(samples)} sample counts for {len(names)} tasks")
    return {
        name: (s, n)
        for name, s, n in zip(names, seconds, samples, strict=True)
        if not math.isnan(s)
    }
