"""Opening the run store's SQLite file, and turning SQLite errors into advice.

Bad state
    For writing, a missing folder is created. Read-only, a missing folder
    or file is refused (so a mistyped ``--state-dir`` creates nothing). A
    file that is not a SQLite database or fails ``PRAGMA quick_check``, a
    store written by a newer pipeopt, or a lock held longer than
    ``lock_timeout`` raise :class:`~pipeopt.errors.RunStoreError` saying
    what to do; the file is never deleted, replaced or repaired.

Concurrency
    Several processes may share a state folder: writes are short
    ``BEGIN IMMEDIATE`` transactions, and SQLite's busy timeout waits up to
    ``lock_timeout`` seconds for another writer.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pipeopt.errors import RunStoreError
from pipeopt.store.schema import SCHEMA_VERSION, create_or_upgrade, stored_version

_log = logging.getLogger("pipeopt.store")

DB_NAME: Final = "runs.sqlite"
_SQLITE_HEADER = b"SQLite format 3\x00"


class Database:
    """Where a run store lives and how to connect to it.

    Args:
        state_dir: the store's folder.
        lock_timeout: seconds SQLite waits for another process's lock.
        read_only: open without ever writing: refuse a missing folder or file.
    """

    def __init__(self, state_dir: Path, *, lock_timeout: float, read_only: bool = False) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self.lock_timeout = lock_timeout
        self.read_only = read_only

    # -- opening -------------------------------------------------------------

    def open(self) -> sqlite3.Connection:
        """Check the folder and file, then return a connection to a usable store.

        Raises:
            RunStoreError: see the module's docstring.
        """
        if self.read_only:
            self._check_exists()
        else:
            self._make_folder()
        self._check_header()
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

    def connect(self, *, writer: bool = False) -> sqlite3.Connection:
        """Return a new connection with the store's settings (autocommit mode)."""
        if self.read_only:
            target, uri = self.path.resolve().as_uri() + "?mode=ro", True
        else:
            target, uri = str(self.path), False
        conn = sqlite3.connect(
            target,
            timeout=self.lock_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=uri,
        )
        try:
            if not self.read_only:
                conn.execute("PRAGMA synchronous = NORMAL")
            if writer:
                # Checkpoint (copy the WAL into the file) every ~40 MB rather than
                # every 4 MB: fewer, larger copies; closing checkpoints the rest.
                conn.execute("PRAGMA wal_autocheckpoint = 10000")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_exists(self) -> None:
        if not self.state_dir.is_dir():
            what = "is not a folder" if self.state_dir.exists() else "does not exist"
            raise RunStoreError(
                f"state folder {self.state_dir} {what}; check --state-dir "
                "(or PIPEOPT_STATE_DIR) names the folder of a run store"
            )
        if not self.path.is_file():
            raise RunStoreError(
                f"no run store in {self.state_dir} ({DB_NAME} is missing); no run was "
                "recorded there: check --state-dir (or PIPEOPT_STATE_DIR)"
            )

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
            raise RunStoreError(self.corrupt_text("not a SQLite database"))
        if not head and self.read_only:
            raise RunStoreError(
                f"{self.path} is empty, not a run store; check --state-dir (or PIPEOPT_STATE_DIR)"
            )

    def _open_once(self) -> sqlite3.Connection:
        try:
            conn = self.connect()
        except sqlite3.Error as exc:
            raise self.error(exc, "open the run store") from None
        try:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise RunStoreError(
                    self.corrupt_text("PRAGMA quick_check: " + "; ".join(problems[:3]))
                )
            if not self.read_only:
                self._use_wal(conn)
            self._check_schema(conn)
        except RunStoreError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise self.error(exc, "open the run store") from None
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            _log.warning("run store %s: WAL mode not available, using %s", self.path, mode)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        version = stored_version(conn)
        if version is not None and version > SCHEMA_VERSION:
            raise RunStoreError(
                f"the run store {self.path} was written by a newer pipeopt "
                f"(schema {version}, this one reads {SCHEMA_VERSION}); "
                "upgrade pipeopt or pass another state dir"
            )
        if self.read_only:
            if version is None:
                raise RunStoreError(self.corrupt_text("no run store tables"))
            return  # an older layout reads alike; upgrading it is a write
        if version != SCHEMA_VERSION:
            with self.transaction(conn, "create the run store"):
                create_or_upgrade(conn)

    # -- errors ------------------------------------------------------------------

    def corrupt_text(self, detail: str) -> str:
        """Return the advice for a file that is not a usable run store."""
        return (
            f"{self.path} is not a usable run store ({detail}); it was left untouched: "
            f"move it aside (e.g. to {DB_NAME}.broken) to start a new history, "
            "or pass another state dir"
        )

    def explain(self, exc: sqlite3.Error, doing: str) -> str:
        """Return a one-line explanation of a SQLite error that says what to do."""
        text = str(exc)
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            return (
                f"cannot {doing}: {self.path} is locked by another process "
                f"(waited {self.lock_timeout:g}s); let that process finish, "
                "or pass another state dir"
            )
        if "full" in lowered:
            return (
                f"cannot {doing}: {self.path}: {text}; free space on the disk of "
                f"{self.state_dir} or pass another state dir"
            )
        if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
            return self.corrupt_text(text)
        if "readonly" in lowered or "unable to open" in lowered or "permission" in lowered:
            return (
                f"cannot {doing}: {self.path}: {text}; check the permissions of "
                f"{self.state_dir} or pass another state dir"
            )
        return f"cannot {doing} in {self.path}: {text}"

    def error(self, exc: sqlite3.Error, doing: str) -> RunStoreError:
        """Return :meth:`explain` as a :class:`RunStoreError`."""
        return RunStoreError(self.explain(exc, doing))

    @contextlib.contextmanager
    def transaction(self, conn: sqlite3.Connection, doing: str) -> Iterator[sqlite3.Connection]:
        """Run the block in one ``BEGIN IMMEDIATE`` transaction (short: others wait)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self.error(exc, doing) from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self.error(exc, doing) from None
            raise


class SharedConnection:
    """The store's connection for the calling threads, one at a time.

    The writer thread has a connection of its own; this one serves reads,
    the start of runs and the locks.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.lock = threading.RLock()
        self.closed = False
        self._conn = db.open()

    def _check_open(self) -> sqlite3.Connection:
        if self.closed:
            raise RunStoreError(f"the run store {self.db.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Hold the connection for one consistent read (a snapshot)."""
        with self.lock:
            conn = self._check_open()
            try:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self.db.error(exc, doing) from None

    @contextlib.contextmanager
    def writing(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Hold the connection for one write transaction.

        Raises:
            RunStoreError: the store is read-only, closed, or locked too long.
        """
        if self.db.read_only:
            raise RunStoreError(f"cannot {doing}: the run store {self.db.path} is open read-only")
        with self.lock:
            conn = self._check_open()
            with self.db.transaction(conn, doing):
                yield conn

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self._conn.close()
