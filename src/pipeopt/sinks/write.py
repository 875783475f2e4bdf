"""`write_batches`: an iterable of rows into a sink, sized by a batcher, bad rows set aside.

The loop: ask the batcher for a size, take that many rows from the input (and
no more), write them in one transaction, time it, tell the batcher. A batch
the sink refuses because of its rows is split in halves, and each failing
half again, until the failing rows stand alone; those go to the sink's
dead-letter table with their error, every other row is written exactly
once. Splitting goes level by level (both halves, then the failing halves'
halves, ...), so the parts of a split batch may commit out of input order:
when one batch repeats an upsert key, which of its values wins is then not
defined.

When to give up (raise :class:`WriteAbortedError`, a :class:`SinkError`):

1. any write, of a whole batch or of a part, fails with an error the sink
   does not call a row error (``sink.is_row_error`` is false): the database
   is gone, locked, or the schema is wrong, so every row would fail alike
   and none is dead-lettered;
2. the splitting of one batch reaches ``max_failed_levels`` levels without a
   single write succeeding (every half, every quarter, ... failed): the sink
   refuses everything, so it is the sink, not the rows (with the default of
   8 levels, 510 failed writes);
3. the dead letters themselves cannot be written.

Rows of batches written before the error stay written; the exception's
``report`` says how many.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeopt._validate import check_int
from pipeopt.errors import WriteAbortedError
from pipeopt.sinks.base import DeadLetter, Row, Sink, describe_error

if TYPE_CHECKING:
    from pipeopt.batching import Batcher

__all__ = ["WriteReport", "write_batches"]


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What :func:`write_batches` did.

    Attributes:
        rows_written: rows committed to the table.
        rows_dead_lettered: rows stored in the dead-letter table instead.
        batches: batches taken from the input, as sized by the batcher.
        writes: successful writes, including the parts of split batches.
        failed_writes: writes the sink refused (each split level adds some).
        min_batch_size, max_batch_size, mean_batch_size, median_batch_size:
            sizes of the batches taken from the input (0 when there were none).
        seconds: wall time of the whole call, by its ``clock``.
        write_seconds: time spent in successful writes.
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

    @property
    def rows(self) -> int:
        """Return every row taken from the input: written plus dead-lettered."""
        return self.rows_written + self.rows_dead_lettered

    @property
    def rows_per_second(self) -> float:
        """Return rows written per second of wall time (0.0 before any time passed)."""
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Progress:
    clock: Callable[[], float]
    started: float
    written: int = 0
    dead: int = 0
    writes: int = 0
    failed: int = 0
    write_seconds: float = 0.0
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
        )


def write_batches(
    rows: Iterable[Row],
    sink: Sink,
    batcher: Batcher,
    *,
    clock: Callable[[], float] = time.perf_counter,
    on_batch: Callable[[int, float], None] | None = None,
    max_failed_levels: int = 8,
) -> WriteReport:
    """Write ``rows`` to ``sink`` in batches sized by ``batcher``; dead-letter the bad rows.

    Rows are taken from ``rows`` lazily, one batch at a time. Each successful
    write, whole batch or part of a split one, is timed with ``clock`` and
    fed back with ``batcher.record(size, latency)`` and ``on_batch(size,
    latency)``; refused writes are not. See the module docstring for how
    failing batches are split and when the call gives up.

    Args:
        rows: mappings by column name or sequences in column order; when it
            has a ``len()``, the batcher is told how many rows are pending.
        sink: where to write (:class:`SQLiteSink`, :class:`PostgresSink`, ...).
        batcher: the batch-size controller.
        clock: returns seconds; ``time.perf_counter`` by default.
        on_batch: called after each successful write, e.g. to feed metrics.
        max_failed_levels: split levels without any success before giving up.

    Returns:
        The counts, sizes and times of the run.

    Raises:
        WriteAbortedError: the sink failed (see the module docstring); the
            error's ``report`` counts what was written before.
        TypeError, ValueError: ``max_failed_levels`` is not an integer >= 1.
    """
    check_int("max_failed_levels", max_failed_levels, minimum=1)
    progress = _Progress(clock=clock, started=clock())
    pending = len(rows) if isinstance(rows, Sized) else None
    source = iter(rows)

    def attempt(chunk: list[Row]) -> Exception | None:
        """Write ``chunk``; return its row error, or ``None`` when it was written."""
        begun = clock()
        try:
            sink.write(chunk)
        except Exception as exc:
            progress.failed += 1
            if not sink.is_row_error(exc):
                raise WriteAbortedError(
                    f"the sink failed on a batch of {len(chunk)} rows: {describe_error(exc)}",
                    progress.report(),
                ) from exc
            return exc
        latency = max(0.0, clock() - begun)
        progress.written += len(chunk)
        progress.writes += 1
        progress.write_seconds += latency
        batcher.record(len(chunk), latency)
        if on_batch is not None:
            on_batch(len(chunk), latency)
        return None

    while True:
        size = batcher.plan(None if pending is None else max(pending, 0))
        if size < 1:
            break
        batch = list(itertools.islice(source, size))
        if not batch:
            break
        if pending is not None:
            pending -= len(batch)
        progress.sizes.append(len(batch))
        error = attempt(batch)
        if error is not None:
            _isolate(batch, error, attempt, sink=sink, progress=progress, levels=max_failed_levels)
        del batch
    return progress.report()


def _isolate(
    batch: list[Row],
    error: Exception,
    attempt: Callable[[list[Row]], Exception | None],
    *,
    sink: Sink,
    progress: _Progress,
    levels: int,
) -> None:
    """Split the refused ``batch`` until its bad rows stand alone; dead-letter them."""
    letters: list[DeadLetter] = []
    failing = [batch]
    if len(batch) == 1:
        letters.append(DeadLetter(batch[0], describe_error(error)))
        failing = []
    level = 0
    any_success = False
    while failing:
        level += 1
        if level > levels and not any_success:
            raise WriteAbortedError(
                f"every write of a batch of {len(batch)} rows failed through "
                f"{levels} levels of splitting, so the sink looks broken, "
                f"not the rows; last error: {describe_error(error)}",
                progress.report(),
            )
        next_failing: list[list[Row]] = []
        for chunk in failing:
            middle = len(chunk) // 2
            for half in (chunk[:middle], chunk[middle:]):
                found = attempt(half)
                if found is None:
                    any_success = True
                    continue
                error = found
                if len(half) == 1:
                    letters.append(DeadLetter(half[0], describe_error(found)))
                else:
                    next_failing.append(half)
        failing = next_failing
    if not letters:
        return
    try:
        sink.write_dead_letters(letters)
    except Exception as exc:
        raise WriteAbortedError(
            f"cannot write {len(letters)} dead letters: {describe_error(exc)}",
            progress.report(),
        ) from exc
    progress.dead += len(letters)
