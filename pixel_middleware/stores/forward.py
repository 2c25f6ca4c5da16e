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
  store with a readable one in a fan-out (``fanout:sqlite:///events.db forward+...``).
  ``pending()``, ``dead_lettered()`` and ``dead_letters()`` tell what is waiting and
  what was given up on; the outbox is a plain SQLite file (tables ``outbox`` and
  ``dead_letter``) for anything more.

``urllib3`` is needed only when this store is used (``pip install 'pixel-middleware[forward]'``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypedDict
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError, StoreError

if TYPE_CHECKING:
    import urllib3

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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

# Segment's HTTP Tracking API limits (see docs/dialects.md). Counted in bytes of the
# JSON we send, with decimal kilobytes: the stricter reading of "32 KB" and "500 KB".
MAX_EVENT_BYTES = 32_000
MAX_BATCH_BYTES = 500_000
MAX_BATCH_EVENTS = 2_500

# Answers worth trying again: the server or a proxy is overloaded or restarting.
# Other 4xx answers say the batch itself is wrong, and sending it again won't help.
_RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})

_DEFAULTS: dict[str, float] = {
    "timeout": 10.0,
    "retries": 5,
    "backoff": 0.5,
    "backoff_max": 60.0,
    "poll": 1.0,
    "drain": 5.0,
}
_OPTIONS = frozenset({"outbox", "write_key", *_DEFAULTS})

# Clients kept for write keys with nothing waiting (their connections are reused
# when the key's next events come); the least recently used beyond these go.
_IDLE_CLIENTS = 32

# The write keys with events waiting, sorted, one index lookup each (a skip scan
# of outbox_by_key) instead of reading the whole outbox as GROUP BY would.
_PENDING_KEYS = """
WITH RECURSIVE keys(key) AS (
    SELECT (SELECT min(write_key) FROM outbox)
    UNION ALL
    SELECT (SELECT min(write_key) FROM outbox WHERE write_key > keys.key)
    FROM keys WHERE keys.key IS NOT NULL
)
SELECT key FROM keys WHERE key IS NOT NULL
"""

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
                f"not {url!r}"
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

        self.url = url
        path = parts.path.rstrip("/")
        if not path.endswith("/v1/batch"):
            path += "/v1/batch"
        self.endpoint = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.outbox = Path(outbox if outbox is not None else query.get("outbox") or DEFAULT_OUTBOX)
        self.write_key = write_key if write_key is not None else query.get("write_key") or None
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
                text = _dumps(event)
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
            "fan out to a readable store as well (fanout:sqlite:///events.db forward+...)"
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
            self._db = _connect(self.outbox)
        except sqlite3.Error as e:
            raise StoreError(f"{self._where}: cannot open the outbox: {e}") from e
        self._sender = threading.Thread(
            target=self._send_forever, name=f"pixel-forward {self.endpoint}", daemon=True
        )
        self._sender.start()
        return self._db

    def _count(self, table: str) -> int:
        ((count,),) = self._query(f"SELECT count(*) FROM {table}", ())
        return int(count)

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                if self._closed or self._db is None or self._pid != os.getpid():
                    with _connect(self.outbox) as db:
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

    # -- the sender's side ----------------------------------------------------------

    def _send_forever(self) -> None:
        lock: IO[str] | None = None
        db: sqlite3.Connection | None = None
        sender = _Sender(self)
        pause = 0.0  # after an unexpected error
        try:
            while True:
                stopping = self._stop.is_set()
                if stopping and time.monotonic() >= self._drain_until:
                    return
                if lock is None:
                    lock = _try_lock(self.outbox)
                    if lock is None:  # another process or store is sending
                        if stopping or self._stop.wait(self.poll):
                            return
                        continue
                try:
                    if db is None:
                        db = _connect(self.outbox)
                    idle = sender.send_next(db, draining=stopping)
                except Exception as e:  # keep the sender alive whatever happens
                    logger.exception("pixel forwarding: unexpected error")
                    self.last_error = f"unexpected: {e!r}"
                    if stopping:
                        return
                    # Never zero: a broken outbox must not turn into a busy loop.
                    pause = max(0.05, min(self.backoff_max, max(self.backoff, pause * 2)))
                    if self._stop.wait(pause):
                        return
                    continue
                pause = 0.0
                if idle is None:  # a batch went (or was tried): look again at once
                    continue
                if stopping:  # nothing more to send within the drain
                    return
                # Nothing to send until a key's backoff ends, or until new events
                # come (write() wakes us; other processes' writes are seen at the
                # next poll).
                self._wake.wait(min(self.poll, idle))
                self._wake.clear()
        finally:
            sender.close()
            if db is not None:
                db.close()
            if lock is not None:
                lock.close()  # releases the flock

    def _retry(self) -> urllib3.Retry:
        """The retry policy of one batch: which failures to retry, how often, how
        long to back off. The sender keeps one per write key and waits out its
        pauses itself (see _Sender) instead of letting urllib3 sleep."""
        from urllib3.util import Retry

        return Retry(
            total=self.retries,
            redirect=0,
            # POST is not idempotent, but an event sent twice is deduplicated by its
            # messageId downstream, while an event not sent is lost.
            allowed_methods=None,
            status_forcelist=_RETRY_STATUSES,
            backoff_factor=self.backoff,
            backoff_max=self.backoff_max,
            respect_retry_after_header=True,
            raise_on_status=False,
            raise_on_redirect=False,
        )


class _KeyClient:
    """The sender's client for one write key: its own connection pool with the
    key's Basic-auth header made once, and its own retry and backoff state, so
    that a key told to wait (429, ``Retry-After``) or failing (5xx) holds up no
    other key."""

    __slots__ = ("http", "key", "last_error", "not_before", "pause", "retry")

    def __init__(self, key: str, http: urllib3.PoolManager, retry: urllib3.Retry) -> None:
        self.key = key
        self.http = http
        #: The attempts at the key's oldest batch so far, as urllib3 counts them.
        self.retry = retry
        #: Monotonic time before which the key sends nothing (its backoff).
        self.not_before = 0.0
        #: The pause after its last run of retries ran out; doubles each time.
        self.pause = 0.0
        self.last_error: str | None = None


class _Sender:
    """Ships the outbox one batch at a time, taking the write keys in turn.

    One thread, one request in flight. Each key has a :class:`_KeyClient`; a key
    in backoff is passed over until its pause ends, while the others go on, and
    each key's batches go oldest first, one at a time, so order is kept per key.
    urllib3's ``Retry`` decides what is retried, how often and how long to wait
    (``Retry-After`` included), but it would sleep inside the request and so hold
    up every key: the request is made without retries, and the ``Retry`` object
    is kept per key and stepped here instead.
    """

    def __init__(self, store: ForwardStore) -> None:
        self.store = store
        # Least recently served first; bounded by _IDLE_CLIENTS beyond the keys
        # that have events waiting.
        self.clients: OrderedDict[str, _KeyClient] = OrderedDict()
        self.last_key = ""  # the key served last: the turn goes to the next one
        self.given_up: set[str] = set()  # keys that failed while draining

    def close(self) -> None:
        for client in self.clients.values():
            client.http.clear()
        self.clients.clear()

    def send_next(self, db: sqlite3.Connection, *, draining: bool) -> float | None:
        """Send (or try) one batch of the next key whose turn it is: ``None``.

        Otherwise, seconds until a key in backoff may send again (``inf`` when
        nothing waits).
        """
        keys = [key for (key,) in db.execute(_PENDING_KEYS)]
        self._forget_idle(keys)
        now = time.monotonic()
        due: list[str] = []
        waits: list[float] = []
        for key in keys:
            if key in self.given_up:
                continue
            client = self.clients.get(key)
            if client is None or client.not_before <= now:
                due.append(key)
            else:
                waits.append(client.not_before - now)
        if not due:
            return min(waits, default=math.inf)
        # Keys are listed sorted: the first due one after the last served, so
        # that every key gets its turn whatever the others do.
        key = next((k for k in due if k > self.last_key), due[0])
        self.last_key = key
        self._send(db, self._client(key), draining=draining)
        errors = [c.last_error for c in self.clients.values() if c.last_error is not None]
        self.store.last_error = errors[-1] if errors else None
        return None

    def _client(self, key: str) -> _KeyClient:
        import urllib3

        client = self.clients.get(key)
        if client is None:
            store = self.store
            http = urllib3.PoolManager(
                # One host, one request at a time: one kept-alive connection.
                num_pools=1,
                maxsize=1,
                timeout=urllib3.Timeout(connect=store.timeout, read=store.timeout),
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "pixel-middleware",
                    **urllib3.make_headers(basic_auth=f"{key}:"),
                },
            )
            client = self.clients[key] = _KeyClient(key, http, store._retry())
        self.clients.move_to_end(key)
        return client

    def _forget_idle(self, pending: Sequence[str]) -> None:
        """Close the clients of keys with nothing waiting, past the newest few.

        Write keys come from the pixels: without a bound, a flood of made-up
        keys would leave a client (and a connection) behind for each.
        """
        waiting = set(pending)
        idle = [key for key in self.clients if key not in waiting]
        for key in idle[: max(0, len(idle) - _IDLE_CLIENTS)]:
            self.clients.pop(key).http.clear()
        self.given_up &= waiting

    def _send(self, db: sqlite3.Connection, client: _KeyClient, *, draining: bool) -> None:
        """One attempt at the key's oldest batch; the outcome goes into the outbox
        (sent: deleted; refused: dead-lettered) or into the key's backoff."""
        import urllib3

        store = self.store
        rows = db.execute(
            "SELECT seq, event FROM outbox WHERE write_key = ? ORDER BY seq LIMIT ?",
            (client.key, MAX_BATCH_EVENTS),
        ).fetchall()
        if not rows:
            return
        body, seqs = _batch_body(rows, client.key, _now())
        timeout = urllib3.Timeout(connect=store.timeout, read=store.timeout)
        if draining:
            # close() waits at most ``drain`` seconds.
            left = max(0.1, store._drain_until - time.monotonic())
            timeout = urllib3.Timeout(
                connect=min(store.timeout, left), read=min(store.timeout, left)
            )
        try:
            response = client.http.request(
                "POST", store.endpoint, body=body, retries=False, redirect=False, timeout=timeout
            )
        except (urllib3.exceptions.HTTPError, OSError) as e:
            message = f"{len(seqs)} events not sent: {e}"
            if draining or not self._retry_later(client, error=e):
                self._failed(client, message, draining=draining)
            return

        status = response.status
        marks = ",".join("?" * len(seqs))
        if 200 <= status < 300:
            with db:
                db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs)
            self._succeeded(client)
            return
        text = response.data[:500].decode("utf-8", "replace").strip()
        has_retry_after = bool(response.headers.get("Retry-After"))
        retryable = client.retry.is_retry("POST", status, has_retry_after)
        if retryable and not draining and self._retry_later(client, response=response):
            return
        if status in _RETRY_STATUSES or status < 400:
            message = f"{len(seqs)} events not sent: HTTP {status} {text}"
            self._failed(client, message, draining=draining)
            return
        reason = f"HTTP {status}: {text}" if text else f"HTTP {status}"
        with db:
            db.execute(
                "INSERT INTO dead_letter (record_id, write_key, event, status, reason,"
                " queued_at, failed_at)"
                f" SELECT record_id, write_key, event, ?, ?, queued_at, ? FROM outbox"
                f" WHERE seq IN ({marks}) ORDER BY seq",
                (status, reason, _now(), *seqs),
            )
            db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs)
        logger.warning(
            "pixel forwarding: %d events dead-lettered by %s: %s", len(seqs), store.endpoint, reason
        )
        # The key's next batch starts a fresh run of retries.
        client.retry = store._retry()
        client.not_before = 0.0

    def _retry_later(
        self,
        client: _KeyClient,
        *,
        response: urllib3.BaseHTTPResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        """Count a failed attempt and set the key's pause; False once the retries ran out."""
        import urllib3

        store = self.store
        try:
            client.retry = client.retry.increment(
                "POST", store.endpoint, response=response, error=error
            )
        except urllib3.exceptions.MaxRetryError:
            return False
        # What urllib3 would have slept: the answer's Retry-After if it has one,
        # else the exponential backoff. Retry-After is capped at backoff_max, so
        # that a server asking for hours cannot stall the key for hours.
        delay = client.retry.get_backoff_time()
        if response is not None:
            try:
                after = client.retry.get_retry_after(response)
            except urllib3.exceptions.InvalidHeader:
                after = None
            if after:
                delay = min(after, store.backoff_max)
        client.not_before = time.monotonic() + delay
        return True

    def _failed(self, client: _KeyClient, message: str, *, draining: bool) -> None:
        """The batch stays in the outbox: the key pauses, longer each time, then
        starts a fresh run of retries. While draining, the key is not tried again."""
        store = self.store
        if client.last_error is None:
            logger.warning(
                "pixel forwarding to %s (write key %s): %s (will retry)",
                store.endpoint,
                _short(client.key),
                message,
            )
        client.last_error = message
        if draining:
            self.given_up.add(client.key)
            return
        # Never zero: a down endpoint must not turn into a busy loop.
        client.pause = max(0.05, min(store.backoff_max, max(store.backoff, client.pause * 2)))
        client.not_before = time.monotonic() + client.pause
        client.retry = store._retry()
        # Nothing kept open to an endpoint that fails while the key waits.
        client.http.clear()

    def _succeeded(self, client: _KeyClient) -> None:
        if client.retry.history:
            client.retry = self.store._retry()
        client.pause = 0.0
        client.not_before = 0.0
        if client.last_error is not None:
            logger.info(
                "pixel forwarding to %s (write key %s) works again",
                self.store.endpoint,
                _short(client.key),
            )
            client.last_error = None


def _batch_body(rows: Sequence[tuple[int, str]], key: str, sent_at: str) -> tuple[bytes, list[int]]:
    """The JSON of one request, as many of ``rows`` as fit, and their outbox seqs."""
    tail = f'],"sentAt":{json.dumps(sent_at)},"writeKey":{json.dumps(key)}}}'.encode()
    head = b'{"batch":['
    size = len(head) + len(tail)
    parts: list[bytes] = []
    seqs: list[int] = []
    for seq, text in rows:
        part = _with_sent_at(text, sent_at).encode()
        grown = size + len(part) + (1 if parts else 0)
        if parts and grown > MAX_BATCH_BYTES:
            break
        parts.append(part)
        seqs.append(seq)
        size = grown
    return head + b",".join(parts) + tail, seqs


def _with_sent_at(text: str, sent_at: str) -> str:
    # Cheap test first: most events carry no sentAt of their own.
    if '"sentAt"' not in text:
        return text
    event = json.loads(text)
    if "sentAt" not in event:
        return text
    event["sentAt"] = sent_at
    return _dumps(event)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(key: str) -> str:
    """Enough of a write key to tell keys apart in a log, not enough to use it."""
    return key[:4] + "..." if len(key) > 8 else "..."


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


def _connect(path: Path) -> sqlite3.Connection:
    # Writes start with BEGIN IMMEDIATE (so two writers queue on the busy timeout
    # instead of failing on a lock upgrade); ``with db`` commits or rolls back.
    db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level="IMMEDIATE")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def _try_lock(outbox: Path) -> IO[str] | None:
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


def _after_fork_in_child() -> None:
    for store in list(_LIVE):
        store._after_fork_in_child()


from pixel_middleware._process import after_fork_in_child  # noqa: E402 - one hook for all

after_fork_in_child(_after_fork_in_child)
