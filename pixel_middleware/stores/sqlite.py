"""``sqlite:///path``: one SQLite file, safe for several processes at once.

The default store. Several processes (gunicorn workers, the CLI following the
events) may use one file at the same time: it is in WAL mode, so readers never
block the writer, and each :meth:`SQLiteStore.write` is one ``BEGIN
IMMEDIATE`` transaction that waits up to ``timeout`` seconds for the other
writers instead of failing with "database is locked".

Writers of this package take turns through an exclusive ``flock`` on a file
beside the database (``<path>-writer.lock``) before they begin: SQLite's own
busy handler sleeps 1, 2, 5, 10 ms and more between tries, so two workers
contending for the write lock spent most of their time asleep (a second
gunicorn worker added under half its worth). A process waiting on ``flock``
wakes the moment the other commits, and its recorder's queue meanwhile grows
into a larger group commit. (A separate file, because closing any descriptor
of the database itself would drop SQLite's own POSIX locks.)

URL: ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` (SQLAlchemy's
spelling), with the options ``?timeout=SECONDS`` and ``?synchronous=normal|full``.

Durability: a write that returned survives the writing process being killed
(``kill -9``) at any moment. With the default ``synchronous=normal`` the last
writes before a power loss or an operating system crash may be lost (the
database stays intact); ``synchronous=full`` syncs the disk on every write and
survives that too, at a cost per write.

Positions are the rows' sequence numbers (``seq``), as decimal strings.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Literal, cast
from urllib.parse import quote

from pixel_middleware import _json
from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import (
    PRIVATE_MODE,
    RecordError,
    StoreError,
    StoreNotFoundError,
    _check_limit,
    _create_private,
    _file_url_parts,
    _parse_position,
    _unknown_options,
    _unwritable,
    redact_url,
)

__all__ = ["SQLiteStore"]

Synchronous = Literal["normal", "full"]

# user_version of a database with this schema. A file of schema 1 (the record
# beside copies of id, receivedAt, messageId and writeKey; seq AUTOINCREMENT)
# is read and written as it is, never migrated: rewriting the table in one
# transaction took 171 s for a million records (1.4 GB, on a loaded 2-core
# machine), with every writer waiting and the file doubled, to save under a
# tenth of each commit; and older versions keep working with the file during
# an upgrade. Its reads are the same queries (a call alone as one query, on
# its (call, seq) index).
SCHEMA_VERSION = 2

# The record is kept whole as one JSON text; beside it only what reads filter
# and sort on: the verdict and the call, indexed with the position, so that
# every filter read() takes reads only the rows it returns, at any size:
# (accepted, seq) for the verdict; (call, accepted, seq) for a call with a
# verdict, and for a call alone as two ranges (accepted 0 and 1, each in seq
# order) merged by read(). A third index for the pair would cost each commit
# about a fifth more. Every other column or index made each commit dearer (a
# random messageId sends each insert to a random page) and nothing queried
# it: the layout of schema 1, four more columns and AUTOINCREMENT, cost
# 1.07-1.10x the CPU per commit (bench/sqlite_layout.py commits).
#
# No AUTOINCREMENT (it rewrites a row of sqlite_sequence, one more page, in
# every commit), yet a position is never reused: `clear()` notes the newest
# seq it deleted in pixel_records_cleared, and an insert into an empty table
# continues from there (_NEWEST), so a follower's cursor never
# skips a row written after a reset.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pixel_records (
    seq      INTEGER PRIMARY KEY,
    accepted INTEGER NOT NULL,
    call     TEXT NOT NULL,
    record   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pixel_records_accepted ON pixel_records (accepted, seq);
CREATE INDEX IF NOT EXISTS pixel_records_call ON pixel_records (call, accepted, seq);
CREATE TABLE IF NOT EXISTS pixel_records_cleared (seq INTEGER NOT NULL);
"""

# Positions are given by write() itself, under the write lock: the newest seq,
# or the cleared floor when the table is empty, read once a commit (max(seq) of
# an INTEGER PRIMARY KEY is one step to the b-tree's last entry; coalesce
# reads the floor only when it must).
_NEWEST = (
    "SELECT coalesce(max(seq), (SELECT max(seq) FROM pixel_records_cleared), 0) FROM pixel_records"
)
_INSERT = "INSERT INTO pixel_records (seq, accepted, call, record) VALUES (?, ?, ?, ?)"

# How schema 1 inserted a record (its reads are the same as schema 2's).
_INSERT_1 = (
    "INSERT INTO pixel_records (id, receivedAt, accepted, call, messageId, writeKey, record)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)

# Connections left behind by a fork: closing them in the child could disturb the
# parent's locks (SQLite: "do not carry an open connection across fork"), so the
# child only drops its use of them and keeps them referenced.
_ABANDONED: list[sqlite3.Connection] = []
_LIVE_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


# How far each recorder journal segment is stored, updated in the transaction
# that stores its records (see Recorder): a table of its own, one small row
# per segment, outside the records' schema.
_POSITIONS = "pixel_journal_positions"
_POSITIONS_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {_POSITIONS}"
    " (segment TEXT PRIMARY KEY, end_offset INTEGER NOT NULL) WITHOUT ROWID"
)
_SET_POSITION = (
    f"INSERT INTO {_POSITIONS} (segment, end_offset) VALUES (?, ?)"
    " ON CONFLICT (segment) DO UPDATE SET end_offset = excluded.end_offset"
)


class SQLiteStore:
    """Records in one SQLite file, in WAL mode; thread- and process-safe.

    Usage::

        store = SQLiteStore("pixel-events.sqlite3")  # or open_store("sqlite:///...")
        store.write(records)
        newest = store.read(accepted=True, call="track", limit=20)

    :param path: The database file; created with its schema when missing (its
        directory must exist).
    :param timeout: Seconds a write waits for other writers before it fails
        with :class:`~pixel_middleware.stores.StoreError`.
    :param synchronous: ``"normal"`` (the default) keeps every returned write
        through a crash of the process; ``"full"`` also through a power loss.
    :param create: ``False`` for readers: a missing file raises
        :class:`~pixel_middleware.stores.StoreNotFoundError` instead of being
        created.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        synchronous: Synchronous = "normal",
        create: bool = True,
    ) -> None:
        if not timeout >= 0:
            raise ValueError(f"SQLiteStore: timeout must be 0 or more seconds, got {timeout!r}")
        if synchronous not in ("normal", "full"):
            raise ValueError(
                f"SQLiteStore: synchronous must be 'normal' or 'full', got {synchronous!r}"
            )
        raw = os.fspath(path)
        if raw in ("", ":memory:") or raw.startswith("file:"):
            raise ValueError(
                f"SQLiteStore: {raw!r} is not a database file;"
                " use memory:// for an in-process store"
            )
        self.path = os.path.abspath(raw)
        self.url = "sqlite:///" + raw
        self.spool_key = self.url
        self.timeout = float(timeout)
        self.synchronous: Synchronous = synchronous
        self.create = create
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._writer_lock: int | None = None  # this process's descriptor of the lock file
        self._writer_lock_pid = 0
        self._closed = False
        self._schema = SCHEMA_VERSION  # of the file, once a connection is made
        self._journal_table = False  # the journal positions' table is known to exist
        if create:
            # Private (0600) from the start: SQLite gives its -wal and -shm
            # files the database file's mode, so they are private too.
            try:
                _create_private(self.path)
            except OSError as exc:
                raise StoreError(f"cannot open the SQLite database {self.path}: {exc}") from exc
        # Create the schema now, so that a wrong path fails here and not at the
        # first pixel; the connection is opened again on first use (after a
        # fork, say, in a pre-forking server).
        conn = self._connect()
        try:
            if create:
                self._check_writable(conn)
        finally:
            conn.close()
        _LIVE_STORES.add(self)

    @classmethod
    def from_url(cls, url: str, *, create: bool = True) -> SQLiteStore:
        """The store for ``sqlite:///relative/path`` or ``sqlite:////absolute/path``."""
        path, options = _file_url_parts(url, "sqlite")
        timeout = options.pop("timeout", None)
        synchronous = options.pop("synchronous", "normal").lower()
        if options:
            raise _unknown_options(url, options, ["timeout", "synchronous"])
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be normal or full in {redact_url(url)!r}")
        try:
            seconds = 5.0 if timeout is None else float(timeout)
        except ValueError:
            raise ValueError(
                f"timeout must be a number of seconds in {redact_url(url)!r}"
            ) from None
        store = cls(
            path, timeout=seconds, synchronous=cast(Synchronous, synchronous), create=create
        )
        store.url = redact_url(url)
        store.spool_key = url
        return store

    def write(self, records: Sequence[PixelRecord]) -> None:
        self._write(records, None)

    #: The recorder may hand :meth:`write_journaled` each record's text as well.
    takes_journal_texts = True

    def write_journaled(
        self,
        records: Sequence[PixelRecord],
        *,
        journal_position: tuple[str, int],
        texts: Sequence[bytes | None] | None = None,
    ) -> None:
        """Write ``records`` and, in the same transaction, that a recorder's journal
        segment is stored up to ``journal_position`` (segment name, end offset):
        a replay of the segment after a crash starts there, with no duplicates.

        ``texts``: for each record, its UTF-8 JSON exactly as ``_json.dumps``
        writes it (the recorder's journal line, which it already encoded), or
        ``None`` to encode it here."""
        self._write(records, journal_position, texts)

    def journal_positions(self, segments: Sequence[str]) -> dict[str, int]:
        """How far into each of ``segments`` the records are stored (those known)."""
        if not segments:
            return {}
        with self._lock:
            try:
                conn = self._connection()
                if not self._journal_table_exists(conn):
                    return {}
                marks = ",".join("?" * len(segments))
                rows = conn.execute(
                    f"SELECT segment, end_offset FROM {_POSITIONS} WHERE segment IN ({marks})",
                    list(segments),
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(
                    f"reading journal positions from {self.path} failed: {exc}"
                ) from exc
        return {str(segment): int(end) for segment, end in rows}

    def _journal_table_exists(self, conn: sqlite3.Connection) -> bool:
        if not self._journal_table:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_POSITIONS,)
            ).fetchone()
            self._journal_table = found is not None
        return self._journal_table

    def _write(
        self,
        records: Sequence[PixelRecord],
        position: tuple[str, int] | None,
        texts: Sequence[bytes | None] | None = None,
    ) -> None:
        if not records:
            return
        try:
            # The file's schema is known from the constructor's connection on.
            if self._schema == 1:
                rows = [_row_1(record) for record in records]
            elif texts is not None and len(texts) == len(records):
                rows = [_row(record, text) for record, text in zip(records, texts, strict=True)]
            else:
                rows = [_row(record) for record in records]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"a record cannot be stored: {exc!r}") from exc
        with self._lock:
            try:
                conn = self._connection()
                lock = self._writer_lock_fd()
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    # IMMEDIATE takes the write lock up front, waiting
                    # (busy_timeout) for writers that do not take the flock; a
                    # deferred transaction would upgrade its lock on the first
                    # INSERT and could fail there without waiting.
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        if self._schema == 1:
                            conn.executemany(_INSERT_1, rows)
                        else:
                            newest: int = conn.execute(_NEWEST).fetchone()[0]
                            conn.executemany(
                                _INSERT,
                                [(seq, *values) for seq, values in enumerate(rows, newest + 1)],
                            )
                        if position is not None:
                            if not self._journal_table_exists(conn):
                                conn.execute(_POSITIONS_TABLE)
                                self._journal_table = True
                            conn.execute(_SET_POSITION, position)
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            except OSError as exc:
                raise StoreError(
                    f"writing {len(rows)} records to {self.path} failed: {exc}"
                ) from exc
            except sqlite3.Error as exc:
                raise StoreError(
                    f"writing {len(rows)} records to {self.path} failed: {exc}"
                ) from exc

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        _check_limit(limit)
        position = None if after is None else _parse_position(after)
        if call is not None and accepted is None and self._schema != 1:
            # Both verdicts of the call, each a range of the index read in
            # order, merged here: each query stops after `limit` rows.
            rows = [
                *self._select(accepted=False, call=call, after=position, limit=limit),
                *self._select(accepted=True, call=call, after=position, limit=limit),
            ]
            rows.sort()
            if limit is not None:
                rows = rows[-limit:] if position is None else rows[:limit]
        else:
            rows = self._select(accepted=accepted, call=call, after=position, limit=limit)
        if len(rows) < _GC_PAUSE_ROWS:
            return [(str(seq), _json.loads(text)) for seq, text in rows]
        with _gc_paused():
            return [(str(seq), _json.loads(text)) for seq, text in rows]

    def _select(
        self, *, accepted: bool | None, call: str | None, after: int | None, limit: int | None
    ) -> list[tuple[int, str]]:
        """Rows (seq, record text) oldest first: with ``limit``, the newest ones
        (or, ``after`` a position, the oldest ones after it)."""
        where: list[str] = []
        params: list[Any] = []
        if accepted is not None:
            where.append("accepted = ?")
            params.append(int(accepted))
        if call is not None:
            where.append("call = ?")
            params.append(call)
        if after is not None:
            where.append("seq > ?")
            params.append(after)
        sql = "SELECT seq, record FROM pixel_records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        newest = limit is not None and after is None
        if newest:
            # The newest `limit`, read newest first through the index, then
            # turned around.
            sql += " ORDER BY seq DESC LIMIT ?"
            params.append(limit)
        elif limit is not None:
            # Paging forward: the oldest `limit` after `after`.
            sql += " ORDER BY seq LIMIT ?"
            params.append(limit)
        else:
            sql += " ORDER BY seq"
        with self._lock:
            try:
                rows: list[tuple[int, str]] = self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading {self.path} failed: {exc}") from exc
        if newest:
            rows.reverse()
        return rows

    def close(self) -> None:
        """Close the connection; idempotent. Writes and reads after it fail."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                conn, self._conn = self._conn, None
                if self._pid == os.getpid():
                    conn.close()
            if self._writer_lock is not None:
                lock, self._writer_lock = self._writer_lock, None
                if self._writer_lock_pid == os.getpid():
                    os.close(lock)
        _LIVE_STORES.discard(self)

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, opened on first use; call with the lock held."""
        if self._closed:
            raise sqlite3.ProgrammingError("the store is closed")
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Raise StoreError unless records can be written to the database.

        SQLite opens a file it may not write (mode 0444, ``chattr +i``, a
        read-only mount) read-only without a word, and even ``BEGIN IMMEDIATE``
        succeeds: only a write tells. So write the header's user_version (its
        own value) and roll back. The writers' lock file must open too.

        A database another writer holds (busy, locked) is not waited for: it
        is written to, so it can be, and the store must start during an outage.
        """
        try:
            with self._lock:
                self._writer_lock_fd()
            # This connection is closed after the check: no need to restore it.
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if _busy(exc):
                return
            raise _unwritable(self.path, exc) from exc
        except OSError as exc:
            raise _unwritable(self.path, exc) from exc

    def _writer_lock_fd(self) -> int:
        """This process's descriptor of the writers' lock file; call with the lock held.

        Opened again in a forked child: a descriptor inherited from the parent
        shares the parent's flock, so it would not keep the two apart.
        """
        if self._writer_lock is None or self._writer_lock_pid != os.getpid():
            self._writer_lock = os.open(
                self.path + "-writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE
            )
            self._writer_lock_pid = os.getpid()
        return self._writer_lock

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; write() says
            # BEGIN IMMEDIATE itself. check_same_thread=False: the connection is
            # used from several threads, but only ever under self._lock.
            conn = sqlite3.connect(
                # mode=rw: open the file if it is there, never create it.
                self.path if self.create else f"file:{quote(self.path)}?mode=rw",
                uri=not self.create,
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            if not self.create and not os.path.exists(self.path):
                raise StoreNotFoundError(
                    f"no store at {self.path}: the file does not exist"
                ) from exc
            raise StoreError(f"cannot open the SQLite database {self.path}: {exc}") from exc
        try:
            self._prepare(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot set up the SQLite database {self.path}: {exc}") from exc
            raise
        self._pid = os.getpid()
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        # synchronous=NORMAL in WAL mode: a commit is complete once its pages
        # are written to the WAL file (a write(2) into the page cache), so it
        # survives the process dying; the WAL is fsync'd only at checkpoints,
        # so a power loss may lose the last commits but never corrupts the
        # database. FULL adds an fsync to every commit.
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                # Switching to WAL (kept in the file, so done once) needs a moment
                # alone with the database, and so does creating the schema; when
                # several processes open a new file together one of them may be
                # told "locked" before the busy timeout applies: try again.
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                if mode.lower() != "wal":
                    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                    if mode.lower() != "wal":
                        raise StoreError(
                            f"{self.path} cannot be put in WAL mode (journal_mode stays"
                            f" {mode!r}); is it on a network file system?"
                        )
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (1, SCHEMA_VERSION):
                    version = self._create_schema(conn, version)
                self._schema = version
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _create_schema(self, conn: sqlite3.Connection, version: int) -> int:
        """Create the schema in a new file; the file's schema version."""
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer pixel-middleware (schema {version});"
                " upgrade pixel-middleware to read it"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have created it meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                _run_script(conn, _SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return int(version)

    def clear(self) -> None:
        """Delete every record (the collector's ``POST /api/reset``), as one transaction.

        Sequence numbers are never reused (the newest one deleted is kept as
        the floor of the next): a reader holding a position reads only what is
        written after the reset.
        """
        with self._lock:
            try:
                conn = self._connection()
                lock = self._writer_lock_fd()
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        if self._schema != 1:  # schema 1: AUTOINCREMENT keeps them
                            conn.execute(
                                "INSERT INTO pixel_records_cleared (seq)"
                                " SELECT max(seq) FROM pixel_records"
                                " HAVING max(seq) IS NOT NULL"
                            )
                            conn.execute(
                                "DELETE FROM pixel_records_cleared"
                                " WHERE seq < (SELECT max(seq) FROM pixel_records_cleared)"
                            )
                        conn.execute("DELETE FROM pixel_records")
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"clearing {self.path} failed: {exc}") from exc


# Reads of this many records or more decode them with the collector paused.
_GC_PAUSE_ROWS = 1000


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while many records are decoded.

    A record decodes into a few dozen dicts and lists, none in a cycle, and
    every few hundred of them set off a collection that walks what was decoded
    before: reading the newest 100,000 records (the collector API's counts, any
    filter the store cannot answer) spent half its time or more in collections.
    The collector is left as it was found (an application may keep it off).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # One statement at a time: executescript() would COMMIT the transaction
    # the caller holds.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says another connection holds the database (not that it is read-only)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc)


def _row(record: PixelRecord, text: bytes | None = None) -> tuple[Any, ...]:
    # Every field a record must have is read here, so that a record missing
    # one fails its write (RecordError) rather than being stored and failing
    # each later read.
    for name in _REQUIRED:
        if name not in record:
            raise KeyError(name)
    return (
        1 if record["accepted"] else 0,
        record["call"],
        # A lone surrogate (which UTF-8 cannot carry) is escaped rather than
        # failing the write (see _json.dumps). A text given is that same JSON.
        _json.dumps(record) if text is None else text.decode(),
    )


_REQUIRED = ("id", "receivedAt", "writeKey")


def _row_1(record: PixelRecord) -> tuple[Any, ...]:
    """The row of schema 1 (a file written by pixel-middleware before schema 2)."""
    event = record["event"]
    message_id = event.get("messageId") if isinstance(event, dict) else None
    return (
        record["id"],
        record["receivedAt"],
        1 if record["accepted"] else 0,
        record["call"],
        message_id if isinstance(message_id, str) else None,
        record["writeKey"],
        _json.dumps(record),
    )


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork stays held forever in the
    # child, and the parent's connection must not be used here: start afresh.
    for store in list(_LIVE_STORES):
        store._lock = threading.Lock()
        if store._conn is not None:
            _ABANDONED.append(store._conn)
            store._conn = None


from pixel_middleware._process import after_fork_in_child  # noqa: E402 - one hook for all

after_fork_in_child(_after_fork_in_child)
