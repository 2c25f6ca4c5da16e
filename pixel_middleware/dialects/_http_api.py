"""Request bodies of Segment's HTTP Tracking API, which RudderStack's API shares.

``POST /v1/<call>`` carries one event as JSON; ``POST /v1/batch`` an object
``{"batch": [events], "sentAt": ..., "context": ..., "integrations": ...,
"writeKey": ...}`` whose events each name their ``type``. The write key is the
event's ``writeKey``, else the batch's, else the HTTP Basic user name (the
password empty), else a ``writeKey`` query parameter (RudderStack's beacon).
Any content type is read as JSON: analytics.js sends ``text/plain`` to spare
the browser a CORS preflight. Bodies may be gzip (``Content-Encoding: gzip``),
inflated incrementally and never past ``Limits.max_decompressed_bytes``.

Sources: Segment's *HTTP Tracking API* document (limits of 32 KB per event and
500 KB per batch request; 200 for a good request, 400 for invalid JSON or too
large), RudderStack's *HTTP API* document and its JavaScript SDK's beacon
transport (``/beacon/v1/batch?writeKey=``).
"""

from __future__ import annotations

import binascii
import copy
import zlib
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pixel_middleware._query import decode_component, split_query
from pixel_middleware._segment_data import decode_data
from pixel_middleware.dialects.base import (
    _MAX_CALL_CHARS,
    DialectName,
    PixelRecord,
    PixelRequest,
    Problem,
    QueryDecoder,
    Route,
    _note,
    _Notes,
    _problem,
    _usable_key,
    check_event,
    make_record,
    query_record,
    request_facts,
)

if TYPE_CHECKING:
    from pixel_middleware.core import PixelConfig

__all__ = ["API_CALLS", "REQUEST_RULES", "basic_auth_user", "body_records", "pixel_or_body"]

#: The calls of the HTTP API, each a route, and batch.
API_CALLS: tuple[str, ...] = ("identify", "track", "page", "screen", "group", "alias")
#: Rules that make the whole request a bad one (Segment answers 400 to them).
REQUEST_RULES = frozenset(
    {
        "bad_json",
        "not_an_object",
        "too_large",
        "too_deep",
        "bad_gzip",
        "unsupported_encoding",
        "bad_batch",
        "too_many_events",
    }
)
# Inflate in steps of this many bytes of input, so memory follows the cap.
_CHUNK = 64 * 1024


def basic_auth_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header, or ``None``."""
    if not header:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic" or len(credentials) > 4096:
        return None
    try:
        decoded = binascii.a2b_base64(credentials.strip().encode("ascii"), strict_mode=True)
        text = decoded.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    return _usable_key(text.partition(":")[0])


def _inflate(body: bytes, max_bytes: int) -> bytes | None:
    """The gzip ``body`` inflated, ``b""`` past ``max_bytes``, ``None`` if not gzip."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    try:
        view = memoryview(body)
        for start in range(0, len(body), _CHUNK):
            data = view[start : start + _CHUNK]
            while data:
                # Never more than one byte over the cap in memory.
                out += inflater.decompress(data, max_bytes + 1 - len(out))
                if len(out) > max_bytes:
                    return b""
                data = memoryview(inflater.unconsumed_tail)
        out += inflater.flush(max_bytes + 1 - len(out))
    except zlib.error:
        return None
    if len(out) > max_bytes:
        return b""
    if not inflater.eof:
        return None  # cut short
    return bytes(out)


def _query_write_key(query: bytes) -> str | None:
    pieces = split_query(query, 100) or []
    for piece in pieces:
        key, _, value = piece.partition(b"=")
        if decode_component(key) == b"writeKey":
            return _usable_key(decode_component(value).decode("utf-8", "replace"))
    return None


def _decode_body(
    request: PixelRequest, config: PixelConfig, batch: bool, notes: _Notes
) -> tuple[Any, str | None]:
    """The body's JSON value, or (None, rule)."""
    limits = config.limits
    body = request.body
    if len(body) > limits.max_body_bytes:
        return None, "too_large"
    encoding = (request.content_encoding or "").strip().lower()
    if encoding in ("gzip", "x-gzip"):
        inflated = _inflate(body, limits.max_decompressed_bytes)
        if inflated is None:
            return None, "bad_gzip"
        if not inflated:
            return None, "too_large"
        body = inflated
    elif encoding not in ("", "identity"):
        return None, "unsupported_encoding"
    text = body.lstrip()
    if text[:1] != b"{":
        return None, "not_an_object" if text[:1] == b"[" else "bad_json"
    # Raw JSON through the same decoder as Segment's data=: the same refusals
    # (NaN, huge integers), depth check and surrogate repair. A batch nests two
    # levels ({"batch": [...]}) above its events.
    value, rule, data_notes = decode_data(
        text, limits.max_decompressed_bytes, limits.max_depth + (2 if batch else 0)
    )
    for note in data_notes:
        if note != "raw_json":
            _note(notes, note)
    return value, rule


def body_records(
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
    *,
    dialect: DialectName,
) -> list[PixelRecord]:
    """Every record of an HTTP API request: one per event, or one saying why none."""
    facts = request_facts(request, config, now)
    request_notes = facts.notes
    batch = route.call == "batch"
    value, rule = _decode_body(request, config, batch, request_notes)
    fallback_key = basic_auth_user(request.authorization) or _query_write_key(request.query)
    if rule is None and not isinstance(value, dict):
        rule = "not_an_object"
    items: list[Any] = []
    defaults: dict[str, Any] = {}
    if rule is None:
        assert isinstance(value, dict)
        if batch:
            events = value.get("batch")
            if not isinstance(events, list):
                rule = "bad_batch"
            elif len(events) > config.limits.max_batch_events:
                rule = "too_many_events"
            else:
                items = events
                defaults = value
        else:
            items = [value]
    if batch:
        top_key = defaults.get("writeKey")
        if isinstance(top_key, str) and _usable_key(top_key):
            fallback_key = top_key

    def record(
        call: str,
        write_key: str | None,
        event: dict[str, Any] | None,
        problems: list[Problem],
        notes: _Notes,
    ) -> PixelRecord:
        return make_record(
            record_id=new_id(),
            facts=facts,
            dialect=dialect,
            call=call,
            write_key=write_key,
            event=event,
            problems=problems,
            notes=notes,
            method=request.method,
            path=request.path,
            query=request.query,
            max_query_bytes=config.limits.max_query_bytes,
        )

    if rule is not None:
        return [record(route.call, fallback_key, None, [_problem(rule)], dict(request_notes))]
    records: list[PixelRecord] = []
    for item in items:
        notes = {note: dict(names) for note, names in request_notes.items()}
        problems: list[Problem] = []
        call = route.call
        if not isinstance(item, dict):
            problems.append(_problem("not_an_object"))
            records.append(record(call, fallback_key, None, problems, notes))
            continue
        event: dict[str, Any] = item
        if batch:
            sent_type = event.get("type")
            if not isinstance(sent_type, str) or sent_type not in API_CALLS:
                # The type is request data: kept (cut) only to show what was sent.
                shown = sent_type[:_MAX_CALL_CHARS] if isinstance(sent_type, str) else "batch"
                problems.append(_problem("unknown_type"))
                records.append(record(shown, fallback_key, None, problems, notes))
                continue
            call = sent_type
            _apply_batch_defaults(event, defaults)
        write_key: Any = event.pop("writeKey", None)
        if write_key is not None and not isinstance(write_key, str):
            problems.append({"rule": "invalid_field", "message": "writeKey must be a string."})
            write_key = None
        write_key = _usable_key(write_key) or fallback_key
        checked = check_event(event, call, write_key, facts, config, now, new_id, notes, problems)
        records.append(record(call, write_key, checked, problems, notes))
    return records


def _apply_batch_defaults(event: dict[str, Any], batch: dict[str, Any]) -> None:
    """What the batch says for all its events, where an event says nothing itself."""
    sent_at = batch.get("sentAt")
    if isinstance(sent_at, str) and "sentAt" not in event:
        event["sentAt"] = sent_at
    for name in ("context", "integrations"):
        shared = batch.get(name)
        if isinstance(shared, dict) and shared:
            own = event.get(name)
            if own is None:
                # A copy each: enrichment writes into an event's context.
                event[name] = copy.deepcopy(shared)
            elif isinstance(own, dict):
                event[name] = {**copy.deepcopy(shared), **own}


def pixel_or_body(
    dialect: DialectName, *, calls: tuple[str, ...], event_from_query: QueryDecoder
) -> Callable[[PixelRequest, Route, PixelConfig, datetime, Callable[[], str]], list[PixelRecord]]:
    """The ``decode`` of a dialect with both a pixel (GET) and an HTTP API (POST):
    a body route's events through :func:`body_records`, a pixel through
    :func:`~pixel_middleware.dialects.base.query_record`."""

    def decode(
        request: PixelRequest,
        route: Route,
        config: PixelConfig,
        now: datetime,
        new_id: Callable[[], str],
    ) -> list[PixelRecord]:
        if route.body:
            return body_records(request, route, config, now, new_id, dialect=dialect)
        record = query_record(
            request, route, config, now, new_id, calls=calls, event_from_query=event_from_query
        )
        return [record]

    return decode
