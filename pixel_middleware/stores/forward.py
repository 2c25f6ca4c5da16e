"""Forwards accepted events to a Segment-compatible HTTP Tracking API (``/v1/batch``).

Usage::

    store = ForwardStore("forward+https://api.segment.io?outbox=/var/lib/pixel/outbox.sqlite3")

The URL is ``forward+`` followed by the API's base URL: Segment
(``forward+https://api.segment.io``), a RudderStack data plane
(``forward+https://YOUR-DATA-PLANE``) or anything else that takes ``POST /v1/batch``.
Events go to ``<base>/v1/batch``; a base that already ends in ``/v1/batch`` is used as
it is. Options (query parameters, or the keyword arguments of the same names, which
win over the URL):

``outbox``
    The SQLite file that holds unsent events (default ``pixel-outbox.sqlite3``).
``write_key``
    Send every event under this write key instead of the pixel's own.
``timeout``
    Seconds one HTTP attempt may take to connect, and again to answer (default 10).
``retries``
    Retries of one batch, with exponential backoff, on connection errors, 408, 429
    and 5xx answers (default 5). ``Retry-After`` is honoured, up to ``backoff_max``.
``backoff``, ``backoff_max``
    The backoff factor (pauses of about 0, 2, 4, 8 ... times ``backoff`` seconds; default
    0.5) and the longest pause (default 60). After the retries run out the batch
    stays in the outbox and is tried again after a pause that grows the same way.
``poll``
    Seconds between looks at the outbox when nothing was written in this process
    (default 1): another process may have written, or taken over sending.
``drain``
    Seconds ``close()`` keeps sending what is left (default 5).

What is forwarded, and how:

- Only accepted records: a rejected pixel is not an event. The event is sent as the
  core decoded it, with one exception: an event that carries its own ``sentAt`` gets
  the send time there too, because the receiver's clock-skew correction
  (``timestamp = receivedAt - (sentAt - originalTimestamp)``) would otherwise move
  the event by however long it waited in the outbox.
- ``write()`` only appends to the outbox (one SQLite transaction, ``synchronous=FULL``)
  and returns; events survive a crash or restart from that moment. A background
  sender ships them in batches of one write key each (Segment's limits: at most
  2,500 events and 500 KB per request, 32 KB per event). The write key is sent as
  the HTTP Basic user with an empty password and as ``writeKey`` in the body;
  ``sentAt`` is the send time.
- One client per write key: each key has its own connection pool, its Basic-auth
  header made once, and its own retries, backoff and ``Retry-After``. The sender
  (one thread, one request at a time) takes the keys with events waiting in turn
  and passes over a key while it backs off, so a key that is rate-limited (429) or
  failing (5xx) does not hold up the others. (A key whose requests get no answer
  at all still costs the others up to ``timeout`` per attempt at it.) Each key's
  events go oldest first, one batch at a time: order is kept per key, not across
  keys.
- Delivery is at-least-once: a batch whose answer was lost (a timeout after the
  server took it, a crash between the answer and the outbox update) is sent again.
  Receivers dedupe on ``messageId`` (Segment does, for about a day).
- An event over 32 KB, or without a write key, goes straight to the dead-letter
  table with the reason. A batch answered with another 4xx (400 invalid or too
  large, 401/403 bad write key, 413 ...) moves there whole, with the status and
  the answer's text. A 3xx answer (a misconfigured base URL) leaves it in the outbox.
- One sender per outbox: the sender holds an exclusive lock on ``<outbox>.lock``,
  so N worker processes sharing an outbox never send the same batch at once; when
  the holder dies another takes over within ``poll`` seconds. (The lock needs
  ``fcntl``; elsewhere, give each process its own outbox.)
- ``read()`` raises ``StoreError``: forwarded events are not kept here. Pair this
  store with a readable one in a fan-out
  (``fanout://sqlite:///pixel-events.sqlite3 forward+https://...``).
  ``pending()``, ``dead_lettered()`` and ``dead_letters()`` tell what is waiting and
  what was given up on; the outbox is a plain SQLite file (tables ``outbox`` and
  ``dead_letter``) for anything more.

``urllib3`` is needed only when this store is used (``pip install 'pixel-middleware[forward]'``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pixel_middleware._process import start_thread
from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError, StoreError, redact_url
from pixel_middleware.stores._forward_sender import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, send_forever
from pixel_middleware.stores._outbox import check_writable, connect, dumps
from pixel_middleware.stores._outbox import now as _now

__all__ = [
    "DEFAULT_OUTBOX",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "MAX_EVENT_BYTES",
    "DeadLetter",
    "ForwardStore",
]

logger = logging.getLogger(__name__)

DEFAULT_OUTBOX = "pixel-outbox.sqlite3"

# Segment's HTTP Tracking API limit per event (MAX_BATCH_BYTES and
# MAX_BATCH_EVENTS, the sender's, are re-exported here).
MAX_EVENT_BYTES = 32_000

_DEFAULTS: dict[str, float] = {
    "timeout": 10.0,
    "retries": 5,
    "backoff": 0.5,
    "backoff_max": 60.0,
    "poll": 1.0,
    "drain": 5.0,
}
_OPTIONS = frozenset({"outbox", "write_key", *_DEFAULTS})

_LIVE: weakref.WeakSet[ForwardStore] = weakref.WeakSet()


class DeadLetter(TypedDict):
    """An event the store gave up on; ``status`` is ``None`` when it was never sent."""

    recordId: str
    writeKey: str | None
    event: dict[str, Any]
    status: int | None
    reason: str
    queuedAt: str
    failedAt: str


class ForwardStore:
    """Keeps accepted events in a local outbox and ships them to ``/v1/batch``."""

    #: A fan-out reads from its first child that can be read; this one cannot.
    readable = False

    def __init__(
        self,
        url: str,
        *,
        outbox: str | os.PathLike[str] | None = None,
        write_key: str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float | None = None,
        backoff_max: float | None = None,
        poll: float | None = None,
        drain: float | None = None,
    ) -> None:
        scheme, _, rest = url.partition("+")
        parts = urlsplit(rest)
        if scheme != "forward" or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"a forwarding store URL is forward+https://HOST or forward+http://HOST:PORT, "
                f"not {redact_url(url)!r}"
            )
        if parts.username or parts.password:
            raise ValueError("put the write key in write_key=, not in the forwarding URL")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(query) - _OPTIONS
        if unknown:
            raise ValueError(
                f"unknown option {sorted(unknown)[0]!r} in forwarding store URL; "
                f"known: {', '.join(sorted(_OPTIONS))}"
            )
        given: dict[str, float | None] = {
            "timeout": timeout,
            "retries": retries,
            "backoff": backoff,
            "backoff_max": backoff_max,
            "poll": poll,
            "drain": drain,
        }
        numbers = {name: _number(name, given[name], query.get(name)) for name in _DEFAULTS}

        # Shown at start, in logs, on the collector's page: write_key= masked.
        self.url = redact_url(url)
        path = parts.path.rstrip("/")
        if not path.endswith("/v1/batch"):
            path += "/v1/batch"
        self.endpoint = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.outbox = Path(outbox if outbox is not None else query.get("outbox") or DEFAULT_OUTBOX)
        self.write_key = write_key if write_key is not None else query.get("write_key") or None
        # The URL as given, for a recorder's spool directory (see Store), with
        # what the keyword arguments changed: another key or outbox is another store.
        self.spool_key = url
        if outbox is not None or write_key is not None:
            self.spool_key += f"#outbox={self.outbox}&write_key={self.write_key or ''}"
        self.timeout = numbers["timeout"]
        self.retries = int(numbers["retries"])
        if self.retries != numbers["retries"]:
            raise ValueError(f"retries= must be a whole number, not {numbers['retries']}")
        self.backoff = numbers["backoff"]
        self.backoff_max = numbers["backoff_max"]
        self.poll = numbers["poll"]
        self.drain = numbers["drain"]
        if self.timeout <= 0 or self.poll <= 0:
            raise ValueError("timeout= and poll= must be more than 0 seconds")

        try:
            import urllib3  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise StoreError(
                "the forwarding store needs urllib3: pip install 'pixel-middleware[forward]'"
            ) from e

        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._pid = 0
        self._db: sqlite3.Connection | None = None
        self._sender: threading.Thread | None = None
        self._drain_until = 0.0
        with self._lock:
            self._start()
        _LIVE.add(self)

    # -- the Store interface ------------------------------------------------------

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Append the accepted records' events to the outbox, all or none, and return."""
        now = _now()
        queued: list[tuple[str, str, str, str]] = []
        dead: list[tuple[str, str | None, str, None, str, str, str]] = []
        for record in records:
            event = record["event"]
            if not record["accepted"] or event is None:
                continue
            key = self.write_key or record["writeKey"]
            try:
                text = dumps(event)
                size = len(text.encode())
            except UnicodeEncodeError:
                # A lone surrogate (what a decoder keeps of invalid UTF-8) cannot
                # be UTF-8: send it as a JSON escape instead.
                text = json.dumps(event, separators=(",", ":"), allow_nan=False)
                size = len(text)
            except (TypeError, ValueError) as e:
                raise RecordError(f"record {record['id']}: its event is not JSON: {e!r}") from e
            if not key:
                dead.append(
                    (record["id"], None, text, None, "no write key to send it with", now, now)
                )
            elif size > MAX_EVENT_BYTES:
                reason = f"event is {size} bytes; the Tracking API takes at most 32 KB per event"
                dead.append((record["id"], key, text, None, reason, now, now))
            else:
                queued.append((record["id"], key, text, now))
        if not queued and not dead:
            return
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where}: the store is closed")
            db = self._start()
            try:
                with db:
                    # A record the recorder retries while it is still queued stays
                    # queued once (its id is unique in the outbox).
                    db.executemany(
                        "INSERT OR IGNORE INTO outbox (record_id, write_key, event, queued_at)"
                        " VALUES (?, ?, ?, ?)",
                        queued,
                    )
                    db.executemany(
                        "INSERT INTO dead_letter (record_id, write_key, event, status, reason,"
                        " queued_at, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        dead,
                    )
            except sqlite3.Error as e:
                raise StoreError(f"{self._where}: could not queue {len(queued)} events: {e}") from e
        for row in dead:
            logger.warning("pixel event %s dead-lettered: %s", row[0], row[4])
        self._wake.set()

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        raise StoreError(
            f"{self.url} forwards events and keeps none to read; to read them too, "
            "fan out to a readable store as well"
            " (fanout://sqlite:///pixel-events.sqlite3 forward+https://...)"
        )

    def close(self) -> None:
        """Stop the sender after sending what it can within ``drain`` seconds.

        Events still unsent stay in the outbox for the next start.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drain_until = time.monotonic() + self.drain
            self._stop.set()
            self._wake.set()
            sender, db = self._sender, self._db
        if self._pid != os.getpid():
            # A forked child that never wrote: the connection and the sender are
            # the parent's (closing an inherited SQLite connection could drop the
            # parent's locks), so leave them be.
            return
        if sender is not None and sender.is_alive():
            # Past this, a request still in flight finishes on its own (daemon thread).
            sender.join(self.drain + self.timeout + 1)
        if db is not None:
            db.close()

    # -- what is waiting ------------------------------------------------------------

    def pending(self) -> int:
        """Events in the outbox, not yet accepted by the API."""
        return self._count("outbox")

    def dead_lettered(self) -> int:
        """Events given up on (see ``dead_letters()`` for why)."""
        return self._count("dead_letter")

    def dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, oldest first."""
        rows = self._query(
            "SELECT record_id, write_key, event, status, reason, queued_at, failed_at"
            " FROM dead_letter ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [
            DeadLetter(
                recordId=row[0],
                writeKey=row[1],
                event=json.loads(row[2]),
                status=row[3],
                reason=row[4],
                queuedAt=row[5],
                failedAt=row[6],
            )
            for row in reversed(rows)
        ]

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the outbox to empty; whether it did."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- the writer's side ----------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"forwarding store {self.endpoint} (outbox {self.outbox})"

    def _start(self) -> sqlite3.Connection:
        """This process's connection and sender, made again after a fork. Holds _lock."""
        if self._db is not None and self._pid == os.getpid():
            return self._db
        # After a fork the parent's connection and thread are not ours to use.
        self._pid = os.getpid()
        try:
            self._db = connect(self.outbox)
        except sqlite3.Error as e:
            raise StoreError(f"{self._where}: cannot open the outbox: {e}") from e
        try:
            check_writable(self._db, self.outbox)
        except StoreError:
            self._db.close()
            self._db = None
            raise
        self._sender = threading.Thread(
            target=send_forever, args=(self,), name=f"pixel-forward {self.endpoint}", daemon=True
        )
        start_thread(self._sender)
        return self._db

    def _count(self, table: str) -> int:
        ((count,),) = self._query(f"SELECT count(*) FROM {table}", ())
        return int(count)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                if self._closed or self._db is None or self._pid != os.getpid():
                    # closing(): `with db` alone commits but never closes,
                    # and Python 3.13 warns of each connection left open.
                    with contextlib.closing(connect(self.outbox)) as db:
                        return db.execute(sql, args).fetchall()
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"{self._where}: {e}") from e

    def _after_fork_in_child(self) -> None:
        # Only the forking thread lives on: a lock another thread held stays held
        # forever, and the parent's connection and sender are not ours. write()
        # opens this process's own connection and sender (see _start).
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        if self._closed:
            self._stop.set()


def _number(name: str, given: float | None, text: str | None) -> float:
    if given is not None:
        value = float(given)
    elif text is not None:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}= must be a number, not {text!r}") from None
    else:
        return _DEFAULTS[name]
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}= must be 0 or more, not {value}")
    return value


def _after_fork_in_child() -> None:
    for store in list(_LIVE):
        store._after_fork_in_child()


from pixel_middleware._process import after_fork_in_child  # noqa: E402 - one hook for all

after_fork_in_child(_after_fork_in_child)
