"""The forwarding store's outbox: a SQLite file of events not yet sent.

Shared by the store (which appends to it) and the sender (which ships and
deletes from it); tables ``outbox`` and ``dead_letter``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pixel_middleware.stores import _create_private, _unwritable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL UNIQUE,
    write_key TEXT NOT NULL,
    event TEXT NOT NULL,
    queued_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_key ON outbox (write_key, seq);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    write_key TEXT,
    event TEXT NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL,
    queued_at TEXT NOT NULL,
    failed_at TEXT NOT NULL
);
"""


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path: Path) -> sqlite3.Connection:
    # Private (0600) whatever the umask; SQLite gives its -wal and -shm files
    # the same mode.
    try:
        _create_private(path)
    except OSError as e:
        raise sqlite3.OperationalError(f"cannot create {path}: {e}") from e
    # Writes start with BEGIN IMMEDIATE (so two writers queue on the busy timeout
    # instead of failing on a lock upgrade); ``with db`` commits or rolls back.
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level="IMMEDIATE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def check_writable(db: sqlite3.Connection, path: Path) -> None:
    """Raise StoreError unless the outbox can be written (see SQLiteStore._check_writable).

    An outbox another process is writing (busy) is not waited for: it can be written.
    """
    (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
    try:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            db.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
    except sqlite3.Error as e:
        name = getattr(e, "sqlite_errorname", "") or ""
        if not (name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e)):
            raise _unwritable(path, e) from e
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(timeout)}")


def try_lock(outbox: Path) -> IO[str] | None:
    """An exclusive hold on the outbox's sender lock, or ``None`` if another has it."""
    fd = os.open(f"{outbox}.lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "a")  # held for the sender's life
    if fcntl is None:  # pragma: no cover - Windows: one process per outbox
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle
