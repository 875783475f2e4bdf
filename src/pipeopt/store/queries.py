"""Reading runs back: ``history`` (summaries) and ``show`` (a run task by task).

Each function takes an open connection inside one read transaction (a
consistent snapshot) and raises :class:`~pipeopt.errors.RunStoreError` for
a run that is not there or a row that cannot be read: a damaged row names
the run and the column, and the file is left as it is.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeopt.errors import RunStoreError
from pipeopt.estimates import source_text
from pipeopt.priority import LABELS
from pipeopt.result import TaskState
from pipeopt.store.connection import Database
from pipeopt.store.estimates import load_used
from pipeopt.store.liveness import HOST, process_alive
from pipeopt.store.records import (
    RUN_COLUMNS,
    AttemptSummary,
    Batch,
    FinalRow,
    RunDetail,
    RunRow,
    RunSummary,
    TaskSummary,
    nan_to_none,
)
from pipeopt.store.structure import Structure

_COUNTED = ("succeeded", "failed", "skipped", "cancelled", "cached")


class RunReader:
    """Read runs from a store's connection.

    Args:
        db: the store (for its path in messages).
        recording: whether this process is still recording a run id (a run
            of this process that is not recording any more has crashed).
    """

    def __init__(self, db: Database, recording: Callable[[str], bool]) -> None:
        self.db = db
        self._recording = recording

    def _no_run(self, run_id: str) -> RunStoreError:
        return RunStoreError(
            f"no run {run_id!r} in {self.db.path}; list the recorded runs with `pipeopt history`"
        )

    def resolve(self, conn: sqlite3.Connection, run_id: str | None, pipeline: str | None) -> str:
        """Return the id of the run ``run_id`` names (see ``RunStore.resolve_run``)."""
        if run_id is None or run_id == "last":
            where, params = ("WHERE pipeline = ?", (pipeline,)) if pipeline else ("", ())
            row = conn.execute(
                f"SELECT run_id FROM runs {where} ORDER BY started_at DESC, id DESC LIMIT 1",
                params,
            ).fetchone()
            if row is None:
                of = f" of pipeline {pipeline!r}" if pipeline is not None else ""
                raise RunStoreError(
                    f"no runs{of} are recorded in {self.db.path}; start one with `pipeopt run`"
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
            raise self._no_run(run_id)
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

    def row(self, conn: sqlite3.Connection, run_id: str) -> RunRow:
        """Return the ``runs`` row of ``run_id``."""
        row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise self._no_run(run_id)
        return RunRow._make(row)

    def status(self, row: RunRow) -> str:
        """Return the run's status, ``"crashed"`` for a run whose process ended."""
        if row.status != "running":
            return row.status
        if row.pid == os.getpid() and row.host == HOST:
            return "running" if self._recording(row.run_id) else "crashed"
        return "running" if process_alive(row.host, row.pid, row.process_start) else "crashed"

    def _counts(self, conn: sqlite3.Connection, row: RunRow) -> dict[str, int]:
        if row.counts is None:
            sums = conn.execute(
                "SELECT SUM(succeeded), SUM(failed), SUM(cached) FROM batches WHERE run = ?",
                (row.id,),
            ).fetchone()
            return {"succeeded": sums[0] or 0, "failed": sums[1] or 0, "cached": sums[2] or 0}
        try:
            counts: Any = json.loads(row.counts)
        except ValueError as exc:
            raise RunStoreError(
                self.db.corrupt_text(f"run {row.run_id}: column runs.counts is not JSON: {exc}")
            ) from None
        if not isinstance(counts, dict) or not all(type(counts.get(k, 0)) is int for k in _COUNTED):
            raise RunStoreError(
                self.db.corrupt_text(
                    f"run {row.run_id}: column runs.counts is not a JSON object of task "
                    f"counts: {row.counts[:80]!r}"
                )
            )
        return counts

    def summary(self, conn: sqlite3.Connection, row: RunRow) -> RunSummary:
        """Return the summary of one ``runs`` row."""
        counts = self._counts(conn, row)
        return RunSummary(
            run_id=row.run_id,
            pipeline=row.pipeline,
            status=self.status(row),
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
            params=self.params(conn, row.id),
        )

    def params(self, conn: sqlite3.Connection, key: int) -> dict[str, Any]:
        """Return the parameters a run was started with (empty if none or unreadable)."""
        try:
            found = conn.execute("SELECT params FROM run_params WHERE run = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a store of schema 2, opened read-only
            return {}
        if found is None:
            return {}
        try:
            values = pickle.loads(found[0])
        except Exception as exc:
            raise RunStoreError(self.db.corrupt_text(f"parameters unreadable: {exc}")) from None
        return dict(values)

    def logs(self, conn: sqlite3.Connection, key: int) -> dict[str, list[str]]:
        """Return the captured log lines of a run's tasks, by task name."""
        try:
            rows = conn.execute("SELECT payload FROM task_logs WHERE run = ?", (key,)).fetchall()
        except sqlite3.OperationalError:  # a store of schema 2, opened read-only
            return {}
        found: dict[str, list[str]] = {}
        for (payload,) in rows:
            try:
                found.update(pickle.loads(payload))
            except Exception as exc:
                raise RunStoreError(self.db.corrupt_text(f"task logs unreadable: {exc}")) from None
        return found

    def list_runs(self, conn: sqlite3.Connection, limit: int) -> list[RunSummary]:
        """Return the newest ``limit`` runs, newest first."""
        rows = conn.execute(
            f"SELECT {RUN_COLUMNS} FROM runs ORDER BY started_at DESC, id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [self.summary(conn, RunRow._make(row)) for row in rows]

    def detail(self, conn: sqlite3.Connection, run_id: str) -> RunDetail:
        """Return a run with a row per task."""
        row = self.row(conn, run_id)
        summary = self.summary(conn, row)
        structure = self.structure(conn, row.fingerprint)
        batches = self.batches(conn, row.id)
        finals = self.finals(conn, row.id)
        origins = dict(conn.execute("SELECT id, run_id FROM runs").fetchall())
        history: dict[str, list[AttemptSummary]] = {}
        cached_from: dict[str, str] = {}
        for batch in batches:
            errors = {e.event: e for e in batch.errors}
            for i, task in enumerate(batch.tasks):
                failure = errors.get(i)
                history.setdefault(task, []).append(
                    AttemptSummary(
                        batch.numbers[i],
                        nan_to_none(batch.started[i]),
                        nan_to_none(batch.durations[i]),
                        batch.states[i],
                        None if failure is None else failure.error_type,
                        None if failure is None else failure.message,
                        None if failure is None else failure.traceback,
                    )
                )
            for ref in batch.refs:
                if ref.run != row.id:
                    cached_from[batch.tasks[ref.event]] = origins.get(ref.run, f"#{ref.run}")
        logs = self.logs(conn, row.id)
        names = structure.names
        try:
            used = load_used(conn, row.id, names)
        except ValueError as exc:
            raise RunStoreError(
                self.db.corrupt_text(f"run {run_id}: estimates unreadable: {exc}")
            ) from None
        tasks = tuple(
            task_summary(
                name,
                LABELS[int(structure.levels[i])],
                history.get(name, []),
                finals.get(name),
                cached_from.get(name),
                dependencies=tuple(structure.dependency_names(i)),
                declared=LABELS[int(structure.criticality[i])],
                logs=logs.get(name, ()),
                estimate=used.get(names[i]),  # an item was ranked by its task's estimate
            )
            for i, name in _with_items(names, history, finals)
        )
        return RunDetail(summary, row.fingerprint, row.host, row.pid, tasks)

    def structure(self, conn: sqlite3.Connection, fingerprint: str) -> Structure:
        """Return the stored structure of ``fingerprint``."""
        row = conn.execute(
            "SELECT data FROM structures WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        if row is None:
            raise RunStoreError(self.db.corrupt_text(f"no structure {fingerprint}"))
        try:
            return Structure.parse(str(row[0]))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunStoreError(
                self.db.corrupt_text(f"structure {fingerprint} unreadable: {exc}")
            ) from None

    def batches(self, conn: sqlite3.Connection, key: int) -> list[Batch]:
        """Return the batches of the run with ``runs.id`` ``key``, in order."""
        payloads = conn.execute(
            "SELECT payload FROM batches WHERE run = ? ORDER BY rowid", (key,)
        ).fetchall()
        try:
            return [Batch.load(payload) for (payload,) in payloads]
        except Exception as exc:
            raise RunStoreError(self.db.corrupt_text(f"a batch cannot be read: {exc}")) from None

    def finals(self, conn: sqlite3.Connection, key: int) -> dict[str, FinalRow]:
        """Return the final states recorded at the end of a run, by task."""
        row = conn.execute(
            "SELECT payload FROM finals WHERE run = ? ORDER BY rowid DESC LIMIT 1", (key,)
        ).fetchone()
        if row is None:
            return {}
        try:
            rows = [FinalRow._make(final) for final in pickle.loads(row[0])]
        except Exception as exc:
            raise RunStoreError(
                self.db.corrupt_text(f"final states cannot be read: {exc}")
            ) from None
        return {final.task: final for final in rows}


def _with_items(names: list[str], *recorded: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """Yield ``(index, name)`` of each task, each mapped item after its task.

    Items (``name[k]``) are not in the stored structure: they exist only in
    the run's records. An item yields its task's index.
    """
    known = set(names)
    items: dict[str, dict[int, str]] = {}
    for found in recorded:
        for name in found:
            if name in known or name[-1:] != "]":
                continue
            base, _, number = name[:-1].partition("[")
            if base in known and number.isdigit():
                items.setdefault(base, {})[int(number)] = name
    for i, name in enumerate(names):
        yield i, name
        mine = items.get(name)
        if mine:
            for k in sorted(mine):
                yield i, mine[k]


def task_summary(
    name: str,
    criticality: str,
    history: list[AttemptSummary],
    final: FinalRow | None,
    cached_from: str | None,
    *,
    dependencies: tuple[str, ...] = (),
    declared: str | None = None,
    logs: Iterable[str] = (),
    estimate: tuple[float, int] | None = None,
) -> TaskSummary:
    """Return what a run recorded about one task, from its attempts and final row."""
    ran = [a for a in history if a.number > 0 and a.state != "cached"]
    last = history[-1] if history else None
    error_type = error = text = note = None
    if final is not None:
        state, attempts = final.state, final.attempts
        error_type, error, text, note = final.error_type, final.error, final.traceback, final.note
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
        dependencies=dependencies,
        declared_criticality=declared,
        logs=tuple(logs),
        estimate=None if estimate is None else estimate[0],
        estimate_source="none" if estimate is None else source_text(estimate[1]),
    )
