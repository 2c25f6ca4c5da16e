"""Segment: the Tracking Pixel API and the HTTP Tracking API.

- ``GET /v1/pixel/{identify,group,alias,page,screen,track}``: the event in
  ``data=`` (base64 in either alphabet, padding optional, or raw JSON), or since
  2025 as dot-notation query parameters. Always answered ``200`` with the GIF.
- ``POST /v1/{identify,track,page,screen,group,alias,batch}`` and analytics.js's
  short forms ``/v1/{i,t,p,s,g,a,b}``: JSON bodies (see :mod:`._http_api`),
  answered ``200 {"success": true}``, or ``400`` for a bad request.

Sources: Segment's *Tracking Pixel API*, *HTTP Tracking API* and *Spec*
documents; docs/dialects.md lists every rule.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pixel_middleware import _json
from pixel_middleware._query import decode_component, decode_text, percent_decode
from pixel_middleware._segment_data import decode_data
from pixel_middleware.dialects._http_api import API_CALLS, REQUEST_RULES, pixel_or_body
from pixel_middleware.dialects.base import (
    _ABSENT,
    _FIELD_KINDS,
    _GIF_HEADERS,
    _MAX_MESSAGE_ID,
    _SENT_TIMES,
    GIF,
    Answer,
    Dialect,
    Limits,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    Problem,
    Route,
    _dot_form_event,
    _format_time,
    _invalid_field,
    _is_time,
    _larger_than,
    _note,
    _Notes,
    _present,
    _problem,
    _render_notes,
    _request_headers,
    _stamp,
    _usable_key,
    fixed_answer,
    gif_answer,
    parsed_query,
    query_record,
    rejected_header,
)
from pixel_middleware.machine_opens import machine_open_kind

if TYPE_CHECKING:
    from pixel_middleware.core import PixelConfig

__all__ = ["SEGMENT"]

CALLS: tuple[str, ...] = ("identify", "group", "alias", "page", "screen", "track")
# analytics.js (Segment's browser library) posts to one-letter routes.
_SHORT = {"i": "identify", "t": "track", "p": "page", "s": "screen", "g": "group", "a": "alias"}
BODY_ROUTES: dict[str, str] = {
    **{f"/v1/{call}": call for call in (*API_CALLS, "batch")},
    **{f"/v1/{short}": call for short, call in _SHORT.items()},
    "/v1/b": "batch",
}
_JSON = "application/json"
_SUCCESS = b'{"success":true}'


def _segment_event(
    pieces: list[bytes],
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
) -> tuple[dict[str, Any] | None, str | None]:
    data: bytes | None = None
    query_key: str | None = None
    seen_key = False
    ignored: list[str] = []
    for piece in pieces:
        raw_key, _, raw_value = piece.partition(b"=")
        # data= stays bytes: base64 never needs to be text.
        if raw_key == b"data":
            if data is None:
                data = decode_component(raw_value)
            else:
                _note(notes, "duplicate_param", "data")
            continue
        key, replaced = decode_text(decode_component(raw_key))
        if replaced:
            _note(notes, "invalid_utf8")
        if key == "data":  # spelled with escapes, like d%61ta
            if data is None:
                data = decode_component(raw_value)
            else:
                _note(notes, "duplicate_param", "data")
        elif key == "writeKey":
            if seen_key:
                _note(notes, "duplicate_param", key)
            else:
                seen_key = True
                query_key, replaced = decode_text(decode_component(raw_value))
                if replaced:
                    _note(notes, "invalid_utf8")
        else:
            ignored.append(key)
    if data is None:
        # Segment's unencoded form (documented since 2025): dot-notation fields.
        _note(notes, "unencoded_form")
        return _dot_form_event(
            parsed_query(pieces, notes), call, limits, notes, problems, strip_quotes=False
        )
    for name in ignored:
        _note(notes, "params_ignored", name)
    query_key = _usable_key(query_key)
    event, rule, data_notes = decode_data(data, limits.max_event_bytes, limits.max_depth)
    for note in data_notes:
        _note(notes, note)
    if rule is not None:
        problems.append(_problem(rule))
        return None, query_key
    if not isinstance(event, dict):
        problems.append(_problem("not_an_object"))
        return None, query_key
    event_key = event.pop("writeKey", None)
    if event_key is not None and not isinstance(event_key, str):
        problems.append(_invalid_field("writeKey", "a string"))
        event_key = None
    event_key = _usable_key(event_key)
    if event_key is None:
        if query_key is not None:
            _note(notes, "write_key_from_query")
        return event, query_key
    if query_key is not None and query_key != event_key:
        _note(notes, "write_key_query_ignored")
    return event, event_key


def _event_from_query(
    pieces: list[bytes],
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
    received_at: str,
) -> tuple[dict[str, Any] | None, str | None]:
    return _segment_event(pieces, call, limits, notes, problems)


# The fast path ----------------------------------------------------------------
#
# Nearly every Segment pixel is one shape: the query is ``data=`` and nothing
# else, base64 of a JSON object whose Spec fields have their types, with a
# write key and an identity, and nothing to note or reject. For that shape,
# :func:`_common_pixel` makes the record in one function, without the general
# path's calls for each step (query pieces, parameter loop, ``decode_data``'s
# variants, the frame shared by every query dialect). It gives up (returns
# ``None``) on anything else, before a single id is drawn or anything noted,
# and the general path decides: so its records are the general path's, byte
# for byte (tests/test_dialects_segment.py compares them over generated pixels).

_FAST_LOADS = _json.fast_loads  # None without msgspec: the general path then
# A JSON text sent, decoded and stored again (compact, non-ASCII as \uXXXX)
# takes at most this many times its length, token by token: a byte of a
# string at most 6 characters (DEL or a UTF-8 byte becomes \u007f or part of
# \u00e9), a number at most 4.5 times its digits (1e15 is stored as
# 1000000000000000.0), whitespace and repeated keys none. Twice that, since a
# computed timestamp may copy the originalTimestamp sent.
# tests/test_dialects_segment.py checks the bound over generated texts.
_SENT_FACTOR = 12
# The keys and punctuation _enrich adds: ,"type":"",'messageId' and the like.
_ADDED_KEYS = 128
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# What _segment_data repairs (and notes): an escaped UTF-16 surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB-Fa-f]")
_MINUS = ord("-")
_UNDERSCORE = ord("_")
_PERCENT = ord("%")
_PLUS = ord("+")
_AMPERSAND = ord("&")
# base64 of a text starting with "{" starts with "e" (0x7B: 011110 11).
_OBJECT_START = b"e"
_TIME_FIELDS = _SENT_TIMES
# The Spec fields' allowed types (_validate's), and every type a JSON value can have.
_FIELD_TYPES = {name: types for name, (types, _) in _FIELD_KINDS.items()}
_JSON_TYPES = frozenset((dict, list, str, int, float, bool, type(None)))


class _Replay:
    """``new_id`` that first hands out the ids already drawn: the general path,
    taking over after them, draws the same sequence it would have drawn."""

    __slots__ = ("_drawn", "_new_id")

    def __init__(self, drawn: list[str], new_id: Callable[[], str]) -> None:
        self._drawn: Iterator[str] = iter(drawn)
        self._new_id = new_id

    def __call__(self) -> str:
        drawn = next(self._drawn, None)
        return self._new_id() if drawn is None else drawn


def _common_pixel(
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
) -> PixelOutcome | None:
    """The outcome of a GET pixel of the common shape, or ``None``: the general path's."""
    limits = config.limits
    query = request.query
    call = route.call
    if (
        _FAST_LOADS is None
        or query[:5] != b"data="
        or _AMPERSAND in query
        or _PLUS in query
        or len(query) > limits.max_query_bytes
        or call not in CALLS
    ):
        return None
    data = query[5:]
    if _PERCENT in data:
        data = percent_decode(data)
    if data[:1] != _OBJECT_START:
        return None
    if _MINUS in data or _UNDERSCORE in data:
        data = data.translate(_URL_SAFE_TO_STANDARD)
    unpadded = data.rstrip(b"=")
    remainder = len(unpadded) % 4
    if remainder == 1 or len(unpadded) // 4 * 3 + max(0, remainder - 1) > limits.max_event_bytes:
        return None
    if remainder:
        padded = unpadded + b"=" * (4 - remainder)
        if len(unpadded) != len(data) and len(padded) != len(data):
            return None  # wrong padding: noted by the general path
    else:
        padded = unpadded
        if len(padded) != len(data):
            return None
    try:
        raw = binascii.a2b_base64(padded, strict_mode=True)
        event = _FAST_LOADS(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None
    if (
        type(event) is not dict
        or raw.count(b"{") + raw.count(b"[") > limits.max_depth
        or (b"\\u" in raw and _SURROGATE_ESCAPE.search(raw))
    ):
        return None
    write_key = event.pop("writeKey", None)
    if type(write_key) is not str or not write_key or write_key.isspace():
        return None  # missing (a query without writeKey) or invalid: a problem
    if config.write_keys is not None and write_key not in config.write_keys:
        return None
    # What _validate checks: the Spec fields' types, then what the call needs.
    # (After the type check a str-or-None field is blank when falsy or spaces.)
    field_types = _FIELD_TYPES.get
    for name, value in event.items():
        if type(value) not in field_types(name, _JSON_TYPES):
            return None
    user_id = event.get("userId")
    if (user_id is None or (type(user_id) is str and (not user_id or user_id.isspace()))) and (
        call == "alias" or not _present(event.get("anonymousId"))
    ):
        return None
    if call == "track":
        name = event.get("event")
        if not name or name.isspace():
            return None
    elif call == "page" or call == "identify" or call == "screen":
        pass
    elif call == "group":
        group_id = event.get("groupId")
        if not group_id or group_id.isspace():
            return None
    else:  # alias
        previous_id = event.get("previousId")
        if not previous_id or previous_id.isspace():
            return None
    # What _enrich would note or reject, decided before any id is drawn.
    if event.get("type", call) != call or "receivedAt" in event:
        return None
    message_id = event.get("messageId", _ABSENT)
    if message_id is _ABSENT:
        generate_id = True
    elif (
        type(message_id) is str
        and message_id
        and len(message_id) <= _MAX_MESSAGE_ID
        and not message_id.isspace()
    ):
        generate_id = False
    else:
        return None
    received_at = _format_time(now)
    # make_record's unparsed_time, on the times as sent: a timestamp set below
    # is receivedAt, the originalTimestamp (checked here) or a formatted time.
    for key in _TIME_FIELDS:
        value = event.get(key)
        if value is not None and value != received_at and not _is_time(value):
            return None
    notes: _Notes = {}
    ip = request.peer
    user_agent = request.user_agent
    referer = request.referer
    max_chars = limits.max_header_chars
    if not (
        # What _request_headers keeps as it is: no proxy to trust, short ASCII.
        not config.trusted_proxies
        and (ip is None or (len(ip) <= max_chars and ip.isascii()))
        and (user_agent is None or (len(user_agent) <= max_chars and user_agent.isascii()))
        and (referer is None or (len(referer) <= max_chars and referer.isascii()))
    ):
        ip, user_agent, referer = _request_headers(request, config, notes)
    machine = machine_open_kind(user_agent, referer)
    if machine is not None:
        _note(notes, "machine_open", machine)
    # _enrich, in its order (the event's keys keep it).
    record_id = new_id()
    event["type"] = call
    if generate_id:
        event["messageId"] = new_id()
    _stamp(event, now, received_at, ip, user_agent)
    max_bytes = limits.max_event_bytes
    # The stored size (_larger_than's) without serialising: the text sent bounds
    # it (_SENT_FACTOR), and what was added counts 12 stored characters a
    # character at most (an astral character is a pair of \u escapes), plus
    # its keys. Only an event that may be near the limit is measured.
    added = len(received_at) * 2 + len(call) + len(ip or "") + len(user_agent or "")
    if generate_id:
        added += len(event["messageId"])
    bounded = _SENT_FACTOR * len(raw) + 12 * added + _ADDED_KEYS <= max_bytes
    if not bounded and _larger_than(event, max_bytes):
        # Rare, and known only once the ids are in: the general path rejects
        # it, drawing the ids drawn here again.
        drawn = [record_id, event["messageId"]] if generate_id else [record_id]
        records = _general(request, route, config, now, _Replay(drawn, new_id))
        status, headers, body = _answer(records, route, config)
        return PixelOutcome(status, headers, body, records[0], records)
    record: PixelRecord = {
        "id": record_id,
        "receivedAt": received_at,
        "dialect": "segment",
        "call": call,
        "writeKey": write_key,
        "accepted": True,
        "problems": [],
        "notes": _render_notes(notes) if notes else [],
        "event": event,
        "request": {
            "method": request.method,
            "path": request.path,
            "query": query.decode("utf-8", "backslashreplace"),
            "ip": ip,
            "userAgent": user_agent,
            "referer": referer,
        },
    }
    # gif_answer's, with no problem to name
    return PixelOutcome(200, list(_GIF_HEADERS), GIF, record, [record])


def _general(
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
) -> list[PixelRecord]:
    return [
        query_record(
            request, route, config, now, new_id, calls=CALLS, event_from_query=_event_from_query
        )
    ]


def _answer(records: list[PixelRecord], route: Route, config: PixelConfig) -> Answer:
    if not route.body:
        if not records[0]["problems"]:
            return 200, list(_GIF_HEADERS), GIF  # gif_answer's, nearly always
        return gif_answer(records)  # always the GIF, even for a bad pixel
    rejected = rejected_header(records)
    bad = [p["message"] for r in records for p in r["problems"] if p["rule"] in REQUEST_RULES]
    if bad:
        # Fixed messages only: nothing of the request is repeated.
        body = json.dumps({"success": False, "message": " ".join(dict.fromkeys(bad))}).encode()
        status, headers, body = fixed_answer(400, _JSON, body)
    else:
        # Segment answers 200 to a well-formed request even when it drops an
        # event (a wrong write key, a missing userId): the records say why.
        status, headers, body = fixed_answer(200, _JSON, _SUCCESS)
    if rejected is not None:
        headers.append(rejected)
    return status, headers, body


def _accepted_answer(route: Route, config: PixelConfig) -> Answer:
    if route.body:
        return fixed_answer(200, _JSON, _SUCCESS)
    return gif_answer([])


def _not_kept(route: Route, config: PixelConfig) -> tuple[str, bytes]:
    if route.body:
        return _JSON, b'{"success":false,"message":"The events could not be recorded."}'
    # Segment's contract is "always the GIF": a page showing it keeps its layout.
    return "image/gif", GIF


SEGMENT = Dialect(
    name="segment",
    pixel_root="/v1/pixel/",
    calls=CALLS,
    body_routes=BODY_ROUTES,
    decode=pixel_or_body("segment", calls=CALLS, event_from_query=_event_from_query),
    answer=_answer,
    accepted_answer=_accepted_answer,
    not_kept=_not_kept,
    fast_pixel=_common_pixel,
)
