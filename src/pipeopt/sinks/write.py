"""`write_batches`: rows into a sink, sized by a batcher, exactly once, bad rows set aside.

The loop: check for cancellation, ask the batcher for a size, take that many
rows from the input (and no more), write them in one transaction, time it,
tell the batcher. A batch the sink refuses because of its rows is split in
halves, and the halves in input order, depth first, until the failing rows
stand alone; those become dead letters with their error and input position.
Every other row is written once.

Exactly once
    With a load key (``load_id=``, or the ``load_key=`` a task's context
    derives from its run and task), the sink keeps a ledger row for the load
    in the target database: input rows consumed, rows written, rows
    dead-lettered. Each write moves it in the same transaction as its rows
    and the dead letters found before them, so the rows handled always form
    a committed prefix of the input. A load that starts again with the same
    key (a retry, ``pipeopt resume``, a rerun) skips that prefix and goes on
    after the last committed batch; a write that finds the ledger moved by
    another attempt meanwhile commits nothing and goes on from where the
    ledger stands. This relies on the input being the same rows in the same
    order each time (see :mod:`pipeopt.sinks.rows` for what is refused).
    Without a key there is no ledger: a retry writes everything again
    (upserts absorb that, appends do not).

Cancellation
    ``cancelled()`` is asked before every write, of a batch or of a part of
    a split one; when it answers true the call raises
    :class:`WriteCancelledError` and writes nothing more. The write in
    flight when cancellation came commits whole or not at all.

When to give up (raise :class:`WriteAbortedError`, a :class:`SinkError`):

1. any write fails with an error the sink does not call a row error
   (``sink.is_row_error`` is false): the database is gone, locked, timed
   out, or the schema is wrong, so every row would fail alike;
2. the splitting of one batch fails ``2**(max_failed_levels+1) - 1`` writes
   before any succeeds (every half, every quarter ... of 8 levels failed):
   the sink refuses everything, so it is the sink, not the rows;
3. the dead letters themselves cannot be written;
4. the dead letters exceed ``max_dead_letters`` (:class:`DeadLetterBudgetError`).

Rows of writes committed before the error stay written and counted in the
ledger; the exception's ``report`` says how many.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeopt._validate import check_int
from pipeopt.errors import (
    DeadLetterBudgetError,
    LoadConflictError,
    WriteAbortedError,
    WriteCancelledError,
)
from pipeopt.sinks.base import DeadLetter, LoadOrigin, LoadStep, Row, Sink, describe_error
from pipeopt.sinks.rows import RowSource

__all__ = ["WriteReport", "default_load_key", "write_batches"]

# A fractional budget is not judged on fewer handled rows than this until the input
# ends, so that one bad row among the first few does not stop a load.
_FRACTION_GRACE_ROWS = 100


class Planner(Protocol):
    """What ``write_batches`` needs of a batcher: a size to plan, a latency to record."""

    def plan(self, pending: int | None = None) -> int:
        """Return the next batch size (0 to stop)."""
        ...

    def record(self, size: int, latency: float) -> None:
        """Feed back one successful write."""
        ...


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What :func:`write_batches` did.

    Attributes:
        rows_written: rows this call committed to the table.
        rows_dead_lettered: rows this call stored in the dead-letter table instead.
        rows_skipped: input rows skipped because the ledger showed them
            handled by an earlier attempt, run or concurrent writer.
        batches: batches taken from the input, as sized by the batcher.
        writes: successful writes, including the parts of split batches.
        failed_writes: writes the sink refused (each split level adds some).
        min_batch_size, max_batch_size, mean_batch_size, median_batch_size:
            sizes of the batches taken from the input (0 when there were none).
        seconds: wall time of the whole call, by its ``clock``.
        write_seconds: time spent in successful writes.
        load_key: the ledger key, or ``None`` for a load without a ledger.
        load_rows_written, load_rows_dead_lettered: the whole load's counts
            in the ledger, earlier attempts and runs included (this call's
            counts without a ledger).
    """

    rows_written: int
    rows_dead_lettered: int
    batches: int
    writes: int
    failed_writes: int
    min_batch_size: int
    max_batch_size: int
    mean_batch_size: float
    median_batch_size: float
    seconds: float
    write_seconds: float
    rows_skipped: int = 0
    load_key: str | None = None
    load_rows_written: int = 0
    load_rows_dead_lettered: int = 0

    @property
    def rows(self) -> int:
        """Return the rows this call handled: written plus dead-lettered."""
        return self.rows_written + self.rows_dead_lettered

    @property
    def rows_per_second(self) -> float:
        """Return rows written per second of wall time (0.0 before any time passed)."""
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Progress:
    clock: Callable[[], float]
    started: float
    key: str | None
    written: int = 0
    dead: int = 0
    skipped: int = 0
    writes: int = 0
    failed: int = 0
    write_seconds: float = 0.0
    base_written: int = 0  # the ledger's counts when the call began
    base_dead: int = 0
    sizes: list[int] = field(default_factory=list)

    def report(self) -> WriteReport:
        sizes = self.sizes
        return WriteReport(
            rows_written=self.written,
            rows_dead_lettered=self.dead,
            batches=len(sizes),
            writes=self.writes,
            failed_writes=self.failed,
            min_batch_size=min(sizes, default=0),
            max_batch_size=max(sizes, default=0),
            mean_batch_size=statistics.fmean(sizes) if sizes else 0.0,
            median_batch_size=float(statistics.median(sizes)) if sizes else 0.0,
            seconds=self.clock() - self.started,
            write_seconds=self.write_seconds,
            rows_skipped=self.skipped,
            load_key=self.key,
            load_rows_written=self.base_written + self.written,
            load_rows_dead_lettered=self.base_dead + self.dead,
        )


@dataclass(frozen=True, slots=True)
class _Budget:
    limit: float
    fraction: bool

    def exceeded(self, dead: int, seen: int, *, final: bool) -> bool:
        if not self.fraction:
            return dead > self.limit
        if not final and seen < _FRACTION_GRACE_ROWS:
            return False
        return dead > self.limit * seen

    def __str__(self) -> str:
        return f"{self.limit:g}" if self.fraction else str(int(self.limit))


def _check_budget(value: object) -> _Budget | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            "max_dead_letters must be a count (int >= 0), a fraction of the rows seen "
            f"(float between 0 and 1) or None, got {type(value).__name__} {value!r}"
        )
    if isinstance(value, int):
        return _Budget(float(check_int("max_dead_letters", value, minimum=0)), fraction=False)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"max_dead_letters as a fraction must be between 0.0 and 1.0, got {value!r}; "
            "pass an int for a count"
        )
    return _Budget(value, fraction=True)


@dataclass(frozen=True, slots=True)
class _Moved:
    """The ledger moved under this call from ``expected`` to ``position``; go on from there."""

    expected: int
    position: int


class _Loader:
    """One call of :func:`write_batches`: the state its helpers share."""

    def __init__(
        self,
        sink: Sink,
        batcher: Planner,
        *,
        clock: Callable[[], float],
        on_batch: Callable[[int, float], None] | None,
        max_failed_levels: int,
        key: str | None,
        budget: _Budget | None,
        cancelled: Callable[[], bool] | None,
        origin: LoadOrigin,
    ) -> None:
        self.sink = sink
        self.batcher = batcher
        self.clock = clock
        self.on_batch = on_batch
        self.max_failed_levels = max_failed_levels
        self.max_failed_writes = 2 ** (max_failed_levels + 1) - 1
        self.key = key
        self.budget = budget
        self.cancelled = cancelled
        self.origin = origin
        self.progress = _Progress(clock=clock, started=clock(), key=key)
        self.consumed = 0  # input rows the ledger shows handled (this call's view)

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise WriteCancelledError(self.progress.report())

    def write(
        self, rows: list[Row], letters: list[DeadLetter], after: int
    ) -> Exception | _Moved | None:
        """Commit ``rows`` and ``letters``, moving the ledger to ``after``.

        Return ``None`` when committed, the row error when the rows were
        refused, or where the ledger stands when another writer moved it.
        """
        self.check_cancelled()
        step = LoadStep(self.key, self.consumed, after, tuple(letters), self.origin)
        begun = self.clock()
        try:
            self.sink.write(rows, step)
        except LoadConflictError as exc:
            if exc.found is None or exc.found < self.consumed:
                raise WriteAbortedError(
                    f"the ledger of load {self.key!r} went back from {self.consumed} to "
                    f"{exc.found} input rows while this load ran; was it reset?",
                    self.progress.report(),
                ) from exc
            return _Moved(self.consumed, exc.found)
        except Exception as exc:
            if rows:
                self.progress.failed += 1
            if rows and self.sink.is_row_error(exc):
                return exc
            what = f"a batch of {len(rows)} rows" if rows else f"{len(letters)} dead letters"
            raise WriteAbortedError(
                f"the sink failed on {what}: {describe_error(exc)}", self.progress.report()
            ) from exc
        latency = max(0.0, self.clock() - begun)
        self.consumed = after
        progress = self.progress
        progress.dead += len(letters)
        if rows:
            progress.written += len(rows)
            progress.writes += 1
            progress.write_seconds += latency
            self.batcher.record(len(rows), latency)
            if self.on_batch is not None:
                self.on_batch(len(rows), latency)
        return None

    def over_budget(self, dead: int, seen: int, *, final: bool) -> bool:
        return self.budget is not None and self.budget.exceeded(dead, seen, final=final)

    def budget_error(self, dead: int, seen: int, last: str | None) -> DeadLetterBudgetError:
        progress = self.progress
        share = f" ({dead / seen:.1%})" if seen else ""
        where = getattr(self.sink, "dead_letter_table", "the dead-letter table")
        outcome = (
            f"the load stopped; last error: {last}"
            if last is not None
            else "the load went through the whole input, but fails"
        )
        return DeadLetterBudgetError(
            f"{dead} of {seen} input rows{share} were refused, over max_dead_letters="
            f"{self.budget}: {outcome}. Fix the rows or the table, or allow more with "
            f"max_dead_letters=; the refused rows and their errors are in {where!r}",
            progress.report(),
            dead,
            seen,
            self.budget.limit if self.budget is not None else float("inf"),
        )

    def batch(self, batch: list[Row], start: int) -> _Moved | None:
        """Write one batch taken at input position ``start``, splitting it if refused.

        Return where the ledger stands if another writer moved it meanwhile.
        """
        end = start + len(batch)
        letters: list[DeadLetter] = []
        failures = 0
        succeeded = False
        stack = [(0, len(batch))]
        last = ""
        while stack:
            lo, hi = stack.pop()
            error = self.write(batch[lo:hi], letters, start + hi)
            if error is None:
                succeeded = True
                letters = []
                continue
            if isinstance(error, _Moved):
                return error
            failures += 1
            last = describe_error(error)
            if not succeeded and failures >= self.max_failed_writes:
                raise WriteAbortedError(
                    f"every write of a batch of {len(batch)} rows failed through "
                    f"{self.max_failed_levels} levels of splitting ({failures} writes), so "
                    f"the sink looks broken, not the rows; last error: {last}",
                    self.progress.report(),
                ) from error
            if hi - lo == 1:
                letters.append(DeadLetter(batch[lo], last, start + lo, type(error).__name__))
                dead = self.progress.base_dead + self.progress.dead + len(letters)
                handled = start + lo + 1  # every row before this one is written or refused
                if self.over_budget(dead, handled, final=False):
                    raise self.budget_error(dead, handled, last) from error
                continue
            middle = (lo + hi) // 2
            stack.append((middle, hi))
            stack.append((lo, middle))
        if letters:
            moved = self.write([], letters, end)
            if isinstance(moved, _Moved):
                return moved
        return None


def default_load_key(lineage_id: str, task: str, sink: object, ordinal: int) -> str:
    """Return the load key of a task's ``ordinal``-th load (1 for the first) into ``sink``.

    ``<lineage_id>/<task>/<table>#<ordinal>``: the same in every attempt and
    every resume of a run, one per load when a body writes chunk after chunk.
    Every task context computes its default key with this function.
    """
    return f"{lineage_id}/{task}/{sink_table(sink)}#{ordinal}"


def sink_table(sink: object) -> str:
    """Return the table ``sink`` writes (its class name for a sink without one)."""
    return str(getattr(sink, "table", type(sink).__name__))


def write_batches(
    rows: Any,
    sink: Sink,
    batcher: Planner,
    *,
    clock: Callable[[], float] = time.perf_counter,
    on_batch: Callable[[int, float], None] | None = None,
    max_failed_levels: int = 8,
    load_id: str | None = None,
    load_key: str | None = None,
    max_dead_letters: int | float | None = 0.1,
    cancelled: Callable[[], bool] | None = None,
    origin: LoadOrigin | None = None,
    on_report: Callable[[WriteReport], None] | None = None,
) -> WriteReport:
    """Write ``rows`` to ``sink`` in batches sized by ``batcher``; dead-letter the bad rows.

    Rows are taken from ``rows`` lazily, one batch at a time. Each successful
    write, whole batch or part of a split one, is timed with ``clock`` and
    fed back with ``batcher.record(size, latency)`` and ``on_batch(size,
    latency)``; refused writes are not. See the module docstring for the
    ledger, cancellation, splitting and when the call gives up.

    Args:
        rows: an iterable of rows (mappings by column name or sequences in
            column order), a pandas DataFrame, a pyarrow Table or
            RecordBatch, or an iterable of such frames; it must give the
            same rows in the same order each time it is loaded again.
        sink: where to write (:class:`SQLiteSink`, :class:`PostgresSink`, ...).
        batcher: the batch-size controller (anything with ``plan`` and ``record``).
        clock: returns seconds; ``time.perf_counter`` by default.
        on_batch: called after each successful write, e.g. to feed metrics.
        max_failed_levels: split levels without any success before giving up.
        load_id: a key naming this load across runs, e.g. ``"orders-2024-06-01"``:
            loading it again with the same key writes only what is missing.
        load_key: the key used when ``load_id`` is not given (a task's
            context passes one tied to the run's lineage and the task);
            with neither, the load keeps no ledger.
        max_dead_letters: how many refused rows the load tolerates: a count
            (``int``), or a fraction of the input rows handled so far
            (``float``; judged once 100 rows were handled, and on the whole
            input at its end), or ``None`` for no limit. The default, 0.1, fails a load in
            which more than a tenth of the rows are refused.
        cancelled: asked before every write; true stops the load.
        origin: the run, task and attempt stored with the ledger and dead letters.
        on_report: called once with the call's report however it ends —
            returned, aborted, cancelled, or stopped by an exception of
            ``rows`` itself (a failing generator), which no report rides on.

    Returns:
        The counts, sizes and times of the call.

    Raises:
        TypeError: ``rows`` is not an acceptable input, or holds something
            that is not a row (see :mod:`pipeopt.sinks.rows`); raised before
            the batch holding it is written, and for a list before anything is.
        ValueError: an argument is out of range.
        WriteAbortedError: the sink failed; :class:`DeadLetterBudgetError`:
            too many rows were refused. The error's ``report`` counts what
            was committed before.
        WriteCancelledError: ``cancelled()`` answered true.
    """
    check_int("max_failed_levels", max_failed_levels, minimum=1)
    budget = _check_budget(max_dead_letters)
    key = load_id if load_id is not None else load_key
    if key is not None and (not isinstance(key, str) or not key.strip()):
        name = "load_id" if load_id is not None else "load_key"
        raise ValueError(f"{name} must be a non-empty string, got {key!r}")
    source = RowSource(rows, sink.columns)
    loader = _Loader(
        sink,
        batcher,
        clock=clock,
        on_batch=on_batch,
        max_failed_levels=max_failed_levels,
        key=key,
        budget=budget,
        cancelled=cancelled,
        origin=origin or LoadOrigin(),
    )
    if on_report is None:
        return _load(loader, source, batcher)
    try:
        return _load(loader, source, batcher)
    finally:
        on_report(loader.progress.report())


def _load(loader: _Loader, source: RowSource, batcher: Planner) -> WriteReport:
    """Run the load of :func:`write_batches` from its ledger to the end of ``source``."""
    progress = loader.progress
    sink = loader.sink
    loader.check_cancelled()
    try:
        found = sink.begin_load(loader.key, loader.origin)
    except Exception as exc:
        raise WriteAbortedError(
            f"cannot start the load: {describe_error(exc)}", progress.report()
        ) from exc
    loader.consumed = found.rows_consumed
    progress.base_written, progress.base_dead = found.rows_written, found.rows_dead_lettered
    progress.skipped = source.skip(found.rows_consumed)
    while True:
        loader.check_cancelled()
        pending = source.pending
        size = batcher.plan(pending)
        if size < 1:
            break
        batch = source.take(size)
        if not batch:
            break
        progress.sizes.append(len(batch))
        start = loader.consumed
        moved = loader.batch(batch, start)
        if moved is not None:
            handled = moved.position - start
            if handled < len(batch):
                source.put_back(batch[handled:])
            else:
                source.skip(handled - len(batch))
            progress.skipped += moved.position - moved.expected
            loader.consumed = moved.position
        del batch
    seen = loader.consumed
    dead = progress.base_dead + progress.dead
    if dead and loader.over_budget(dead, seen, final=True):
        raise loader.budget_error(dead, seen, None)
    return progress.report()
