"""Sinks: write rows to SQLite or PostgreSQL in batches, exactly once, with dead letters.

::

    from pipeopt.batching import AdaptiveBatcher
    from pipeopt.sinks import SQLiteSink, write_batches

    with SQLiteSink("shop.db", "orders", columns=["id", "qty"], upsert_keys=["id"]) as sink:
        report = write_batches(rows, sink, AdaptiveBatcher(0.1), load_id="orders-2024-06-01")
    print(report.rows_written, report.rows_dead_lettered, report.rows_skipped)

Inside a task, ``context.write_batches(rows, sink)`` does the same with the
task's batcher, its cancellation, and a load key tied to the run and task.
:class:`PostgresSink` needs psycopg 3 (``pip install 'pipeopt[postgres]'``),
imported when a sink is created, not by this package.
"""

from pipeopt.errors import (
    DeadLetterBudgetError,
    LoadConflictError,
    SinkError,
    WriteAbortedError,
    WriteCancelledError,
)
from pipeopt.sinks.base import (
    LEDGER_TABLE,
    DeadLetter,
    LoadOrigin,
    LoadProgress,
    LoadStep,
    Row,
    Sink,
)
from pipeopt.sinks.postgres import PostgresSink
from pipeopt.sinks.sqlite import SQLiteSink
from pipeopt.sinks.write import WriteReport, default_load_key, write_batches

__all__ = [
    "LEDGER_TABLE",
    "DeadLetter",
    "DeadLetterBudgetError",
    "LoadConflictError",
    "LoadOrigin",
    "LoadProgress",
    "LoadStep",
    "PostgresSink",
    "Row",
    "SQLiteSink",
    "Sink",
    "SinkError",
    "WriteAbortedError",
    "WriteCancelledError",
    "WriteReport",
    "default_load_key",
    "write_batches",
]
