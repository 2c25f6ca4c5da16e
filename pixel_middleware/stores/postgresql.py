"""``postgresql://``: records in a PostgreSQL table, shared by every app server.

Usage::

    store = PostgreSQLStore("postgresql://pixels@db.internal:5432/analytics?table=pixel_events")

The URL is libpq's (``postgres://`` too)::

    postgresql://[user[:password]@][host][:port][/database][?option=value&...]

Options (query parameters):

``table``
    The table, ``name`` or ``schema.name`` (default ``pixel_events``): letters,
    digits and ``_``, at most 48 characters each. Created with its indexes when
    missing (unless the store is opened for reading, ``create=False``).

libpq's own connection settings pass through unchanged: ``connect_timeout``
(default 5 seconds, so that a write to an unreachable server fails and is
spooled instead of hanging), ``sslmode``, ``sslrootcert``, ``sslcert``,
``sslkey``, ``sslcrl``, ``application_name``, ``target_session_attrs``,
``host``, ``port``, ``password``, ``passfile``; anything else is refused at
construction.

The table (see ``_SCHEMA``) keeps each record whole as JSONB in ``record``,
beside copies of what ``events`` and the collector's API filter on or a person
queries by (``id``, ``received_at``, ``accepted``, ``call``, ``dialect``,
``event_name``, ``write_key``, ``user_id``, ``anonymous_id``). Positions are the
``position`` column, an identity (bigserial) column, as decimal strings; only
``read()``'s own queries are indexed: ``(accepted, position)`` and
``(call, position)``.

JSONB cannot hold every record exactly: it refuses ``\\u0000`` and lone
surrogates (what a decoder keeps of invalid UTF-8), writes ``1e20`` as
``100000000000000000000`` and ``-0.0`` as ``0.0``. Such a record is kept in
``record_json`` too, as exact JSON text, and ``read()`` returns that; its JSONB
copy has U+FFFD in place of what it cannot hold. Key order within an object is
JSONB's (JSON objects have none); ``read()`` puts the record's own fields back in
their usual order.

Guarantees: one ``write()`` is one transaction, so all of its records are kept
or none. A write that returned is committed (with the server's default
``synchronous_commit = on``, flushed to its WAL). If the connection drops while
the commit is under way, its outcome is unknown: ``write()`` raises
``StoreError``, the recorder writes the batch again, and its records may then be
in the table twice (at-least-once; the same ``id`` twice is one record).

The ``psycopg`` package is needed only when this store is used
(``pip install 'pixel-middleware[postgresql]'``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

# Missing, open_store() names the extra that brings it.
import psycopg
from psycopg import sql

from pixel_middleware._process import after_fork_in_child
from pixel_middleware.core import PixelRecord
from pixel_middleware.display import event_name
from pixel_middleware.stores import (
    RecordError,
    StoreError,
    StoreNotFoundError,
    _check_limit,
    _parse_position,
    redact_url,
)

__all__ = ["DEFAULT_TABLE", "PostgreSQLStore"]

DEFAULT_TABLE = "pixel_events"
DEFAULT_CONNECT_TIMEOUT = 5

# libpq settings a URL may carry through to the connection. A closed list, so
# that a misspelt option fails here, with its name, instead of at connection.
_PASSTHROUGH = frozenset(
    {
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslcrl",
        "application_name",
        "target_session_attrs",
        "host",
        "port",
        "password",
        "passfile",
    }
)
_OPTIONS = frozenset({"table"})
# Unquoted-identifier characters only, short enough that "<table>_accepted_position"
# stays within PostgreSQL's 63-byte names.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")

# The record kept whole as JSONB; beside it, copies of the fields that reads
# filter on and that a person asks for in SQL. Only what read() queries is
# indexed: every index is one more page written by each commit.
_SCHEMA = """
CREATE TABLE {table} (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           text NOT NULL,
    received_at  text NOT NULL,
    accepted     boolean NOT NULL,
    call         text NOT NULL,
    dialect      text NOT NULL,
    event_name   text,
    write_key    text,
    user_id      text,
    anonymous_id text,
    record       jsonb NOT NULL,
    record_json  text
);
CREATE INDEX {accepted_index} ON {table} (accepted, position);
CREATE INDEX {call_index} ON {table} (call, position)
"""
_COLUMNS = (
    "id",
    "received_at",
    "accepted",
    "call",
    "dialect",
    "event_name",
    "write_key",
    "user_id",
    "anonymous_id",
    "record",
    "record_json",
)

# What JSONB would not give back as it was given (see the module docs): an
# escaped NUL, a float with an exponent, minus zero; a number is what follows
# ":", "," or "[" in json.dumps's compact output. A false match (such text
# inside a string) only keeps the exact copy too.
_JSONB_CHANGES = re.compile(r"\\u0000|[:,\[]-?[0-9.]+e|[:,\[]-0\.0[,\]}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# The order a record's fields are shown in (PixelRecord's), put back after JSONB.
_FIELD_ORDER = tuple(PixelRecord.__annotations__)

# Connections a forked child inherited: never used there, and never closed
# (closing would end the parent's session on the server); see _after_fork_in_child.
_ABANDONED: list[psycopg.Connection[Any]] = []
_LIVE_STORES: weakref.WeakSet[PostgreSQLStore] = weakref.WeakSet()


class PostgreSQLStore:
    """Records in a PostgreSQL table; thread-safe, and a forked child connects anew.

    :param url: ``postgresql://`` or ``postgres://``; see the module docs.
    :param create: ``False`` for readers: a missing table raises
        :class:`~pixel_middleware.stores.StoreNotFoundError` instead of being
        created, and nothing is written to check that writing works.

    Opening connects, so that a wrong URL fails here and not at the first
    pixel: it creates the table when missing, then checks that the user may
    insert into it (an insert rolled back), raising :class:`StoreError` naming
    the server, the database and the table otherwise.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        parts = urlsplit(url)
        shown = redact_url(url)
        if parts.scheme.lower() not in ("postgresql", "postgres"):
            raise ValueError(
                f"a PostgreSQL store URL starts with postgresql:// or postgres://, not {shown!r}"
            )
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the port in {shown!r} is not a number") from None
        options: dict[str, str] = {}
        passthrough: dict[str, str] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _OPTIONS:
                options[name] = value
            elif name in _PASSTHROUGH:
                passthrough[name] = value
            else:
                known = ", ".join(sorted(_OPTIONS | _PASSTHROUGH))
                raise ValueError(
                    f"unknown option {name[:40]!r} in {shown!r}; this store takes: {known}"
                )
        passthrough.setdefault("connect_timeout", str(DEFAULT_CONNECT_TIMEOUT))

        # Shown by the recorder's logs and the CLI: never with the password.
        self.url = shown
        # The URL as given, for a recorder's spool directory: see Store.
        self.spool_key = url
        self.create = create
        table = options.get("table", DEFAULT_TABLE)
        names = table.split(".")
        if len(names) > 2 or not all(_NAME.fullmatch(name) for name in names):
            raise ValueError(
                f"table={table[:60]!r} in {shown!r} is not a table name: letters, digits"
                " and _, at most 48 of them, as name or schema.name"
            )
        self.table = table
        self._table = sql.Identifier(*names)
        self._index_prefix = names[-1]
        # What the errors name: never the password. A password given as
        # ?password= is masked in the errors too (see _scrub).
        # libpq repeats a password that is not well percent-encoded in its
        # error ("invalid percent-encoded token"): both spellings are masked.
        secrets = [parts.password or "", unquote(parts.password or "")]
        secrets.append(passthrough.get("password", ""))
        # The longest first, so that a shorter one inside it leaves no part.
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)
        host = passthrough.get("host") or parts.hostname or "localhost"
        port_shown = passthrough.get("port") or (str(port) if port else "5432")
        database = unquote(parts.path.lstrip("/")) or "(the user's own)"
        user = unquote(parts.username or "") or "(the system user)"
        self._where = f"table {table} in database {database} on {host}:{port_shown} as user {user}"
        self._conninfo = urlunsplit(
            parts._replace(scheme="postgresql", query=urlencode(passthrough))
        )

        self._closed = False
        self._positions_ready = False  # the journal positions' table exists
        self._pid = os.getpid()
        # One connection for writes and one for reads, each used under its own
        # lock, so that a large read (the API, `events`) never holds up a commit.
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: psycopg.Connection[Any] | None = None
        self._reader: psycopg.Connection[Any] | None = None
        with self._write_lock:
            conn = self._writer_connection()
            try:
                self._prepare(conn)
            except BaseException:
                self._writer = None
                conn.close()
                raise
            if not create:
                # A reader writes nothing: its one connection is for reads.
                self._writer, self._reader = None, conn
        _LIVE_STORES.add(self)

    @classmethod
    def from_url(cls, url: str, *, create: bool = True) -> PostgreSQLStore:
        return cls(url, create=create)

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Insert ``records`` in one transaction; raise StoreError if it may not have happened."""
        self._write(records, None)

    def write_journaled(
        self, records: Sequence[PixelRecord], *, journal_position: tuple[str, int]
    ) -> None:
        """Write ``records`` and, in the same transaction, that a recorder's journal
        segment is stored up to ``journal_position`` (segment name, end offset):
        a replay of the segment after a crash starts there, with no duplicates.
        The positions live in ``<table>_journal_positions``, one row a segment."""
        self._write(records, journal_position)

    def journal_positions(self, segments: Sequence[str]) -> dict[str, int]:
        """How far into each of ``segments`` the records are stored (those known)."""
        if not segments:
            return {}
        with self._write_lock, self._failures("cannot read the journal positions of"):
            conn = self._writer_connection()
            exists = conn.execute("SELECT to_regclass(%s)", [self._positions_name()]).fetchone()
            if exists is None or exists[0] is None:
                return {}
            rows = conn.execute(
                sql.SQL("SELECT segment, end_offset FROM {} WHERE segment = ANY(%s)").format(
                    self._positions
                ),
                [list(segments)],
            ).fetchall()
        return {str(segment): int(end) for segment, end in rows}

    @property
    def _positions(self) -> sql.Identifier:
        return sql.Identifier(
            *self.table.split(".")[:-1], f"{self._index_prefix}_journal_positions"
        )

    def _positions_name(self) -> str:
        return self._positions.as_string(None)

    def _create_positions_table(self, conn: psycopg.Connection[Any]) -> None:
        statement = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (segment text PRIMARY KEY, end_offset bigint NOT NULL)"
        ).format(self._positions)
        try:
            with conn.transaction():
                conn.execute(statement)
        except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
            pass  # another process created it first
        self._positions_ready = True

    def _write(self, records: Sequence[PixelRecord], position: tuple[str, int] | None) -> None:
        if not records:
            return
        try:
            rows = [_row(record) for record in records]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordError(f"a record cannot be stored: {e!r}") from e
        with self._write_lock, self._failures(f"could not write {len(rows)} records to"):
            conn = self._writer_connection()
            # COPY, not executemany() (which psycopg sends in pipeline mode):
            # measured on a loopback server with this table and test records,
            # COPY took 0.37 ms for a batch of 1 against 0.40 ms, and 2.6 ms for
            # a batch of 100 against 5.7 ms: one statement streams the rows,
            # where executemany() has every row parsed, planned and answered.
            if position is not None and not self._positions_ready:
                self._create_positions_table(conn)
            with conn.transaction(), conn.cursor() as cursor:
                with cursor.copy(self._copy) as copy:
                    for row in rows:
                        copy.write_row(row)
                if position is not None:
                    cursor.execute(
                        sql.SQL(
                            "INSERT INTO {} (segment, end_offset) VALUES (%s, %s)"
                            " ON CONFLICT (segment) DO UPDATE SET end_offset = EXCLUDED.end_offset"
                        ).format(self._positions),
                        list(position),
                    )

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        """Matching records after position ``after``, oldest first; see ``Store.read``."""
        _check_limit(limit)
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if accepted is not None:
            conditions.append(sql.SQL("accepted = %s"))
            params.append(bool(accepted))
        if call is not None:
            conditions.append(sql.SQL("call = %s"))
            params.append(_text(call))
        if after is not None:
            conditions.append(sql.SQL("position > %s"))
            params.append(_parse_position(after))
        if limit == 0:
            if self._closed:
                raise StoreError(f"{self._where}: the store is closed")
            return []
        parts: list[sql.Composable] = [
            sql.SQL("SELECT position, coalesce(record_json, record::text) FROM {table}").format(
                table=self._table
            )
        ]
        if conditions:
            parts += [sql.SQL(" WHERE "), sql.SQL(" AND ").join(conditions)]
        newest = limit is not None and after is None
        if newest:
            # The newest `limit`, read newest first through the index, then
            # turned around.
            parts.append(sql.SQL(" ORDER BY position DESC LIMIT %s"))
            params.append(limit)
        elif limit is not None:
            # Paging forward: the oldest `limit` after `after`.
            parts.append(sql.SQL(" ORDER BY position LIMIT %s"))
            params.append(limit)
        else:
            parts.append(sql.SQL(" ORDER BY position"))
        query = sql.Composed(parts)
        with self._read_lock, self._failures("could not read"):
            conn = self._reader_connection()
            rows = conn.execute(query, params).fetchall()
        if newest:
            rows.reverse()
        try:
            return [(str(position), _record(text)) for position, text in rows]
        except ValueError as e:
            raise StoreError(f"{self._where}: a row's record is not JSON: {e}") from e

    def close(self) -> None:
        """Close the connections; idempotent. Writes and reads after it fail."""
        with self._write_lock, self._read_lock:
            self._closed = True
            for conn in (self._writer, self._reader):
                if conn is not None and self._pid == os.getpid():
                    conn.close()
            self._writer = self._reader = None
        _LIVE_STORES.discard(self)

    def __repr__(self) -> str:
        return f"PostgreSQLStore({self.url!r})"

    @property
    def _copy(self) -> sql.Composed:
        return sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
            table=self._table, columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        )

    @property
    def _insert(self) -> sql.Composed:
        return sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values})").format(
            table=self._table,
            columns=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            values=sql.SQL(", ").join(
                sql.SQL("%s::jsonb" if column == "record" else "%s") for column in _COLUMNS
            ),
        )

    def _writer_connection(self) -> psycopg.Connection[Any]:
        """This process's connection for writes; call with the write lock held."""
        if self._closed:
            raise StoreError(f"{self._where}: the store is closed")
        if self._writer is None or self._writer.closed:
            self._writer = self._connect()
        return self._writer

    def _reader_connection(self) -> psycopg.Connection[Any]:
        """This process's connection for reads; call with the read lock held."""
        if self._closed:
            raise StoreError(f"{self._where}: the store is closed")
        if self._reader is None or self._reader.closed:
            self._reader = self._connect()
        return self._reader

    def _connect(self) -> psycopg.Connection[Any]:
        with self._failures("cannot connect to"):
            conn = psycopg.connect(self._conninfo, autocommit=True)
        self._pid = os.getpid()
        return conn

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Create the table if missing (writers), then check it can be written or read."""
        with self._failures("cannot open"):
            exists = conn.execute("SELECT to_regclass(%s)", [self._qualified()]).fetchone()
        if exists is None or exists[0] is None:
            if not self.create:
                raise StoreNotFoundError(f"no store: there is no {self._where}")
            self._create_table(conn)
        if not self.create:
            with self._failures("cannot read"):
                conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 0").format(self._table))
            return
        try:
            # An insert, rolled back: what a write needs (the privilege, a
            # server that is not a read-only standby, the columns) is there.
            # (COPY needs the same INSERT privilege.)
            with conn.transaction(force_rollback=True):
                conn.execute(self._insert, _row(_PROBE))
        except psycopg.Error as e:
            raise StoreError(
                f"{self._where} cannot be written ({self._scrub(e)}), so every record"
                " would go to the spool: GRANT INSERT on the table to this user, or"
                " name a table it may write"
            ) from None

    def _create_table(self, conn: psycopg.Connection[Any]) -> None:
        statements = sql.SQL(_SCHEMA).format(
            table=self._table,
            accepted_index=sql.Identifier(f"{self._index_prefix}_accepted_position"),
            call_index=sql.Identifier(f"{self._index_prefix}_call_position"),
        )
        try:
            with conn.transaction():
                conn.execute(statements)
        except psycopg.errors.DuplicateTable:
            return  # another process created it first
        except psycopg.errors.UniqueViolation:
            return  # the same, caught in the catalogue instead
        except psycopg.Error as e:
            raise StoreError(
                f"{self._where} does not exist and cannot be created ({self._scrub(e)}):"
                " GRANT CREATE ON SCHEMA to this user, or create the table as its owner"
                " (open the store once as that user)"
            ) from None

    def _qualified(self) -> str:
        return self._table.as_string(None)

    @contextmanager
    def _failures(self, doing: str) -> Iterator[None]:
        """Raise a psycopg error as a StoreError naming the table, with no password in it.

        A connection that was lost (the server restarted) is closed by psycopg
        itself, and the next use connects again.
        """
        try:
            yield
        except psycopg.Error as e:
            raise StoreError(f"{doing} {self._where}: {self._scrub(e)}") from None

    def _scrub(self, error: BaseException) -> str:
        """The error's message with every password masked, and the same done to the error.

        libpq repeats a badly encoded password. ``raise ... from None`` hides the
        original error from a traceback, but it stays reachable as
        ``__context__``: so its message (and those it was raised from) is masked
        in place too.
        """
        seen: BaseException | None = error
        for _ in range(10):  # bounded: a chain could loop
            if seen is None:
                break
            if self._secrets:
                seen.args = tuple(
                    self._mask(arg) if isinstance(arg, str) else arg for arg in seen.args
                )
            seen = seen.__cause__ or seen.__context__
        return " ".join(self._mask(str(error)).split())[:500]

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _text(value: object) -> str | None:
    """A string as a text column can hold it (no NUL, no lone surrogate); None stays None."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return _SURROGATE.sub("\ufffd", text.replace("\x00", "\ufffd"))


def _row(record: PixelRecord) -> tuple[Any, ...]:
    # allow_nan=False: NaN is not JSON (the core never keeps one).
    exact = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    jsonb = exact
    changed = _JSONB_CHANGES.search(exact) is not None
    if _SURROGATE.search(exact):
        changed = True
        jsonb = _SURROGATE.sub("\ufffd", jsonb)
    if changed:
        jsonb = jsonb.replace("\\u0000", "\\ufffd")
    event = record["event"] if isinstance(record["event"], dict) else {}
    return (
        _text(record["id"]),
        _text(record["receivedAt"]),
        bool(record["accepted"]),
        _text(record["call"]),
        _text(record["dialect"]),
        _text(event_name(record)) or None,
        _text(record["writeKey"]),
        _text(event.get("userId")),
        _text(event.get("anonymousId")),
        jsonb,
        # ASCII: a lone surrogate travels as an escape, where UTF-8 would fail.
        json.dumps(record, separators=(",", ":")) if changed else None,
    )


def _record(text: str) -> PixelRecord:
    loaded = json.loads(text)
    ordered = {name: loaded.pop(name) for name in _FIELD_ORDER if name in loaded}
    ordered.update(loaded)
    return cast(PixelRecord, ordered)


# What the check at open inserts (and rolls back).
_PROBE = cast(
    PixelRecord,
    {
        "id": "write-check",
        "receivedAt": "1970-01-01T00:00:00.000Z",
        "dialect": "segment",
        "call": "track",
        "writeKey": None,
        "accepted": False,
        "problems": [],
        "notes": [],
        "event": None,
        "request": {"method": "GET", "path": "/", "query": "", "ip": None, "userAgent": None},
    },
)


def _after_fork_in_child() -> None:
    # The parent's connections share their sockets with the parent: a query
    # here would mix with the parent's, and closing one would tell the server
    # to end the parent's session. So they are only set aside, never used or
    # closed (psycopg itself closes a connection, when collected, only in the
    # process that opened it), and the locks start afresh: one held by another
    # thread at the fork would stay held forever here.
    for store in list(_LIVE_STORES):
        store._write_lock = threading.Lock()
        store._read_lock = threading.Lock()
        _ABANDONED.extend(conn for conn in (store._writer, store._reader) if conn is not None)
        store._writer = store._reader = None


# Through the one registry of process-wide hooks (pixel_middleware._process).
after_fork_in_child(_after_fork_in_child)
