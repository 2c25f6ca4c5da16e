"""Records appended to a Redis stream, so that many app servers share one log.

Usage::

    store = RedisStore("redis://127.0.0.1:6379/0?stream=pixel-events&maxlen=1000000")

The URL::

    redis://[[user]:password@]host[:port][/db][?option=value&...]
    rediss://...                      the same over TLS

Options (query parameters):

``stream``
    The stream key (default ``pixel-events``).
``maxlen``
    Trim the stream to about this many entries on every append (``XADD MAXLEN ~``;
    approximate trimming is what keeps appends O(1)). Default: never trim.
``timeout``
    Seconds to wait for a connection or a reply (default 2). Short on purpose: when
    Redis is down a write fails within seconds and the recorder spools the batch,
    instead of a pixel request hanging on a dead server.

A few redis-py connection settings pass through unchanged (``socket_timeout``,
``socket_connect_timeout``, ``health_check_interval``, ``client_name``, the
``ssl_*`` settings); anything else is refused at construction.

Each record is one stream entry with the fields ``id`` (the record's id: an entry
written twice carries the same id, so a reader can drop the repeat), ``call``,
``accepted`` (``1`` or ``0``) and ``record`` (the whole record as JSON). Positions
are stream ids (``1700000000000-0``); ``read()`` filters on the client, paging
through ``XRANGE``/``XREVRANGE``. Exclusive ranges need Redis 6.2 or later.

Guarantees: one ``write()`` is one ``MULTI``/``EXEC``, so Redis applies all of its
entries or none. If the connection drops after ``EXEC`` was sent, the outcome is
unknown: ``write()`` raises ``StoreError``, the recorder writes the batch again, and
the entries may then be in the stream twice (at-least-once; dedupe on ``id``).

The ``redis`` package is needed only when this store is used
(``pip install 'pixel-middleware[redis]'``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError, StoreError, _check_limit, redact_url

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["DEFAULT_STREAM", "RedisStore"]

DEFAULT_STREAM = "pixel-events"
DEFAULT_TIMEOUT = 2.0

# Entries fetched per XRANGE/XREVRANGE round trip while filtering on the client.
_PAGE = 500

# redis-py settings a URL may carry through to the client. A closed list, so that a
# misspelt option fails here instead of at the first connection.
_PASSTHROUGH = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "health_check_interval",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)
_OPTIONS = frozenset({"stream", "maxlen", "timeout"})

# ASCII digits only (\d would take any script's), each part at most 20 digits:
# a stream id is two unsigned 64-bit numbers, and Redis answers anything past
# that with an error (a StoreError here) instead of a ValueError.
_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_MAX_ID_PART = 2**64 - 1

_N = TypeVar("_N", int, float)


class RedisStore:
    """Appends records to a Redis stream and reads them back; see the module docs."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(
                f"a Redis store URL starts with redis:// or rediss://, not {redact_url(url)!r}"
            )
        options: dict[str, str] = {}
        passthrough: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _OPTIONS:
                options[key] = value
            elif key in _PASSTHROUGH:
                passthrough.append((key, value))
            else:
                known = ", ".join(sorted(_OPTIONS | _PASSTHROUGH))
                raise ValueError(f"unknown option {key!r} in Redis store URL; known: {known}")

        # Printed by the recorder's logs and the CLI: never with the password.
        self.url = redact_url(url)
        # The URL as given, for a recorder's spool directory: see Store.
        self.spool_key = url
        self.stream = options.get("stream", DEFAULT_STREAM)
        if not self.stream:
            raise ValueError("stream= must name a stream key")
        self.maxlen: int | None = _positive(options, "maxlen", int)
        self.timeout: float = _positive(options, "timeout", float) or DEFAULT_TIMEOUT
        self._where = _redacted(parts)
        self._closed = False

        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
            from redis.retry import Retry
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise StoreError(
                "the Redis store needs the redis package: pip install 'pixel-middleware[redis]'"
            ) from e

        # What a dead or unreachable server raises: redis-py wraps most socket
        # errors in its own, but not all of them.
        self._failures: tuple[type[Exception], ...] = (RedisError, OSError)
        client_url = urlunsplit(parts._replace(query=urlencode(passthrough)))
        self._client: Redis = redis.Redis.from_url(
            client_url,
            decode_responses=True,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            # One immediate retry covers a pooled connection that a Redis restart
            # closed; more would only stretch the time a down Redis takes to fail.
            retry=Retry(NoBackoff(), 1),
        )

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Append ``records`` in one transaction; raise StoreError if it may not have happened."""
        if self._closed:
            raise StoreError(f"{self._where}: the store is closed")
        if not records:
            return
        try:
            entries = [_entry(record) for record in records]
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"a record cannot be stored: {e!r}") from e
        try:
            pipe = self._client.pipeline(transaction=True)
            for entry in entries:
                pipe.xadd(self.stream, entry, maxlen=self.maxlen, approximate=True)
            pipe.execute()
        except self._failures as e:
            raise StoreError(
                f"{self._where}: could not append {len(records)} records to stream "
                f"{self.stream!r}: {e}"
            ) from e

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        """Matching records after stream id ``after``, oldest first; see ``Store.read``."""
        if after is not None and not _is_stream_id(after):
            shown = after[:40] + "..." if isinstance(after, str) and len(after) > 40 else after
            raise ValueError(f"not a position of this store (a Redis stream id): {shown!r}")
        _check_limit(limit)
        if self._closed:
            raise StoreError(f"{self._where}: the store is closed")
        if limit == 0:
            return []
        lowest = f"({after}" if after is not None else "-"
        want_accepted = None if accepted is None else ("1" if accepted else "0")
        found: list[tuple[str, PixelRecord]] = []
        try:
            if limit is None or after is not None:
                # Everything after ``after`` (paging forward: the oldest
                # ``limit`` of it), oldest first, a page at a time.
                start = lowest
                while limit is None or len(found) < limit:
                    page = self._range(start, "+")
                    found.extend(self._matching(page, want_accepted, call))
                    if len(page) < _PAGE:
                        break
                    start = f"({page[-1][0]}"
                return found if limit is None else found[:limit]
            # The newest ``limit`` matches: walk backwards, then turn them around.
            end = "+"
            while len(found) < limit:
                page = self._revrange(end, lowest)
                found.extend(self._matching(page, want_accepted, call))
                if len(page) < _PAGE:
                    break
                end = f"({page[-1][0]}"
        except self._failures as e:
            raise StoreError(f"{self._where}: could not read stream {self.stream!r}: {e}") from e
        del found[limit:]
        found.reverse()
        return found

    def ping(self) -> None:
        """Raise :class:`StoreError` unless Redis answers now (``serve`` asks at start)."""
        try:
            self._client.ping()
        except self._failures as e:
            raise StoreError(f"{self._where}: Redis does not answer: {e}") from e

    def close(self) -> None:
        """Close the connections; idempotent. Writes and reads after it fail."""
        self._closed = True
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, stream={self.stream!r})"

    def _range(self, start: str, end: str) -> list[tuple[str, dict[str, str]]]:
        return cast(Any, self._client.xrange(self.stream, min=start, max=end, count=_PAGE)) or []

    def _revrange(self, end: str, start: str) -> list[tuple[str, dict[str, str]]]:
        return cast(Any, self._client.xrevrange(self.stream, max=end, min=start, count=_PAGE)) or []

    def _matching(
        self,
        entries: list[tuple[str, dict[str, str]]],
        accepted: str | None,
        call: str | None,
    ) -> list[tuple[str, PixelRecord]]:
        out: list[tuple[str, PixelRecord]] = []
        for entry_id, fields in entries:
            # Entries that another writer put in the stream are not records: skip them.
            if "record" not in fields:
                continue
            if accepted is not None and fields.get("accepted") != accepted:
                continue
            if call is not None and fields.get("call") != call:
                continue
            try:
                record = cast(PixelRecord, json.loads(fields["record"]))
            except ValueError as e:
                raise StoreError(f"{self._where}: entry {entry_id} is not a JSON record") from e
            out.append((entry_id, record))
        return out


def _is_stream_id(text: object) -> bool:
    return (
        isinstance(text, str)
        and _STREAM_ID.fullmatch(text) is not None
        and all(int(part) <= _MAX_ID_PART for part in text.split("-"))
    )


def _entry(record: PixelRecord) -> dict[Any, Any]:  # redis-py wants its own key types
    return {
        "id": str(record["id"]),
        "call": str(record["call"]),
        "accepted": "1" if record["accepted"] else "0",
        # ASCII JSON: a lone surrogate (what a decoder keeps of invalid UTF-8)
        # survives as an escape, where UTF-8 encoding would fail.
        "record": json.dumps(record, separators=(",", ":"), allow_nan=False),
    }


def _positive(options: dict[str, str], name: str, kind: Callable[[str], _N]) -> _N | None:
    if name not in options:
        return None
    try:
        value = kind(options[name])
    except ValueError:
        raise ValueError(f"{name}= must be a positive number, not {options[name]!r}") from None
    if value <= 0:
        raise ValueError(f"{name}= must be a positive number, not {options[name]!r}")
    return value


def _redacted(parts: Any) -> str:
    """The server a URL names, without its password, for messages."""
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
