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

import json
from typing import TYPE_CHECKING, Any

from pixel_middleware._query import decode_component, decode_text
from pixel_middleware._segment_data import decode_data
from pixel_middleware.dialects._http_api import API_CALLS, REQUEST_RULES, pixel_or_body
from pixel_middleware.dialects.base import (
    GIF,
    Answer,
    Dialect,
    Limits,
    PixelRecord,
    Problem,
    Route,
    _dot_form_event,
    _invalid_field,
    _note,
    _Notes,
    _problem,
    _usable_key,
    fixed_answer,
    gif_answer,
    parsed_query,
    rejected_header,
)

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


def _answer(records: list[PixelRecord], route: Route, config: PixelConfig) -> Answer:
    if not route.body:
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
)
