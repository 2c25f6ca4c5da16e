"""The forwarding store's sender: ships the outbox to ``/v1/batch``, key by key.

:mod:`pixel_middleware.stores.forward` is the Store side (URL, options,
``write()`` into the outbox, what is pending); this module is the HTTP side: one
thread per outbox that takes the write keys with events waiting in turn, sends
one batch at a time, and keeps each key's retries and backoff apart (see
:class:`_Sender`). What it logs goes to the ``pixel_middleware.stores.forward``
logger, as before the split.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from pixel_middleware.display import terminal_text
from pixel_middleware.stores._outbox import connect, dumps, now, try_lock

if TYPE_CHECKING:
    import urllib3

    from pixel_middleware.stores.forward import ForwardStore

logger = logging.getLogger("pixel_middleware.stores.forward")

# Segment's HTTP Tracking API limits (see docs/dialects.md). Counted in bytes of the
# JSON we send, with decimal kilobytes: the stricter reading of "32 KB" and "500 KB".
MAX_BATCH_BYTES = 500_000
MAX_BATCH_EVENTS = 2_500

# Answers worth trying again: the server or a proxy is overloaded or restarting.
# Other 4xx answers say the batch itself is wrong, and sending it again won't help.
_RETRY_STATUSES = frozenset({408, 429, *range(500, 600)})

# Characters of a server's answer (or error) kept in logs and dead letters.
_SHOWN_ANSWER = 200

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


def send_forever(store: ForwardStore) -> None:
    """The sender thread of ``store``: ships its outbox until it is closed and drained."""
    lock: IO[str] | None = None
    db: sqlite3.Connection | None = None
    sender = _Sender(store)
    pause = 0.0  # after an unexpected error
    try:
        while True:
            stopping = store._stop.is_set()
            if stopping and time.monotonic() >= store._drain_until:
                return
            if lock is None:
                lock = try_lock(store.outbox)
                if lock is None:  # another process or store is sending
                    if stopping or store._stop.wait(store.poll):
                        return
                    continue
            try:
                if db is None:
                    db = connect(store.outbox)
                idle = sender.send_next(db, draining=stopping)
            except Exception as e:  # keep the sender alive whatever happens
                logger.exception("pixel forwarding: unexpected error")
                store.last_error = f"unexpected: {e!r}"
                if stopping:
                    return
                # Never zero: a broken outbox must not turn into a busy loop.
                pause = max(0.05, min(store.backoff_max, max(store.backoff, pause * 2)))
                if store._stop.wait(pause):
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
            store._wake.wait(min(store.poll, idle))
            store._wake.clear()
    finally:
        sender.close()
        if db is not None:
            db.close()
        if lock is not None:
            lock.close()  # releases the flock


def retry_policy(store: ForwardStore) -> urllib3.Retry:
    """The retry policy of one batch: which failures to retry, how often, how
    long to back off. The sender keeps one per write key and waits out its
    pauses itself (see _Sender) instead of letting urllib3 sleep."""
    from urllib3.util import Retry

    return Retry(
        total=store.retries,
        redirect=0,
        # POST is not idempotent, but an event sent twice is deduplicated by its
        # messageId downstream, while an event not sent is lost.
        allowed_methods=None,
        status_forcelist=_RETRY_STATUSES,
        backoff_factor=store.backoff,
        backoff_max=store.backoff_max,
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
            client = self.clients[key] = _KeyClient(key, http, retry_policy(store))
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
        body, seqs = _batch_body(rows, client.key, now())
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
            # The error can quote what the server sent (a bad status line).
            message = f"{len(seqs)} events not sent: {_shown(str(e))}"
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
        text = _shown(response.data[:_SHOWN_ANSWER].decode("utf-8", "replace").strip())
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
                (status, reason, now(), *seqs),
            )
            db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", seqs)
        logger.warning(
            "pixel forwarding: %d events dead-lettered by %s: %s", len(seqs), store.endpoint, reason
        )
        # The key's next batch starts a fresh run of retries.
        client.retry = retry_policy(store)
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
        client.retry = retry_policy(store)
        # Nothing kept open to an endpoint that fails while the key waits.
        client.http.clear()

    def _succeeded(self, client: _KeyClient) -> None:
        if client.retry.history:
            client.retry = retry_policy(self.store)
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
    return dumps(event)


def _shown(text: str) -> str:
    """What the server said, fit for a log line, the dead-letter table and a page.

    A hostile or broken endpoint must not write newlines (fake log lines) or
    terminal escapes into our logs, nor fill them: escaped and capped.
    """
    shown = terminal_text(text)
    return shown if len(shown) <= _SHOWN_ANSWER else shown[:_SHOWN_ANSWER] + "..."


def _short(key: str) -> str:
    """Enough of a write key to tell keys apart in a log, not enough to use it."""
    return key[:4] + "..." if len(key) > 8 else "..."
