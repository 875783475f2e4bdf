"""Sinks: write rows to SQLite or PostgreSQL in batches, with dead letters.

::

    from pipeopt.batching import AdaptiveBatcher
    from pipeopt.sinks import SQLiteSink, write_batches

    with SQLiteSink("shop.db", "orders", columns=["id", "qty"], upsert_keys=["id"]) as sink:
        report = write_batches(rows, sink, AdaptiveBatcher(target_latency=0.1))
    print(report.rows_written, report.rows_dead_lettered)

:class:`PostgresSink` needs psycopg 3 (``pip install 'pipeopt[postgres]'``),
imported when a sink is created, not by this package.
"""

from pipeopt.errors import SinkError, WriteAbortedError
from pipeopt.sinks.base import DeadLetter, Row, Sink
from pipeopt.sinks.postgres import PostgresSink
from pipeopt.sinks.sqlite import SQLiteSink
from pipeopt.sinks.write import WriteReport, write_batches

__all__ = [
    "DeadLetter",
    "PostgresSink",
    "Row",
    "SQLiteSink",
    "Sink",
    "SinkError",
    "WriteAbortedError",
    "WriteReport",
    "write_batches",
]
