"""The run store: every run recorded in SQLite, for history, resume and caching.

One concern per module, each layer importing only those listed before it:

``records``     the records it returns and keeps (:class:`RunSummary`, …)
``structure``   a pipeline's structure as stored, and its fingerprint
``liveness``    whether the process of a run or a lock still runs
``schema``      the tables and the schema version
``connection``  opening the file; refusing a corrupt, locked or newer one
``estimates``   the learned task durations, and the estimates each run used
``recorder``    the observer of one run: events into a deque
``writer``      the thread that commits the events in batches, and its failures
``queries``     ``history`` and ``show``
``resume``      resume's results, the result cache, the run lock
``run_store``   :class:`RunStore`, the facade over all of them
"""

from __future__ import annotations

from pipeopt.store.connection import DB_NAME
from pipeopt.store.records import AttemptSummary, RunDetail, RunSummary, TaskSummary
from pipeopt.store.run_store import RunStore
from pipeopt.store.schema import SCHEMA_VERSION
from pipeopt.store.structure import structure_of

__all__ = [
    "DB_NAME",
    "SCHEMA_VERSION",
    "AttemptSummary",
    "RunDetail",
    "RunStore",
    "RunSummary",
    "TaskSummary",
    "structure_of",
]
