"""The forwarding store's outbox: a SQLite file of events not yet sent.

Shared by the store (which appends to it) and the sender (which ships and
deletes from it); tables ``outbox`` and ``dead_letter``.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

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
    # Writes start with BEGIN IMMEDIATE (so two writers queue on the busy timeout
    # instead of failing on a lock upgrade); ``with db`` commits or rolls back.
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level="IMMEDIATE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def try_lock(outbox: Path) -> IO[str] | None:
    """An exclusive hold on the outbox's sender lock, or ``None`` if another has it."""
    handle = open(f"{outbox}.lock", "a")  # noqa: SIM115 - held for the sender's life
    if fcntl is None:  # pragma: no cover - Windows: one process per outbox
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle
