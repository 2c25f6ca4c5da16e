"""Jitsu: ``/api/px/<type>`` and the classic ``/api/v1/p.gif``, on any host.

- ``/api/px/<type>?data=<base64 JSON>``: Jitsu's pixel, the event in Segment's
  format (``type`` from the path: ``page``, ``track``, ``identify``, ...), the
  write key in the event's ``writeKey`` or a ``writeKey`` parameter.
- ``/api/v1/p.gif?data=<base64 JSON>``: Jitsu Classic's pixel, an event with
  ``api_key``, ``event_type``, ``user`` (``anonymous_id``, ``id``), ``url``,
  ``page_title``, ``referer``.

Required: a write key (``writeKey`` / ``api_key``) and ``data``. Answered
with a GIF, as Jitsu does.

Sources: docs.jitsu.com/sending-data/pixel and
classic.jitsu.com/docs/sending-data/js-sdk/direct-tracking
"""

from __future__ import annotations

from typing import Any

from pixel_middleware.dialects._vendor import (
    Hit,
    HitError,
    decode_base64_json,
    page_context,
    query_params,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import Limits, PixelRequest, Route, _Notes

__all__ = ["JITSU"]

_CALLS = frozenset({"page", "track", "identify", "group", "alias", "screen"})


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    params = query_params(request.query, limits, notes)
    data = params.get("data")
    if data is None:
        return [
            Hit(
                "track",
                _text(params.get("writeKey")),
                vendor_event(dialect="jitsu", fields=dict(params)),
                ["data"],
            )
        ]
    payload = decode_base64_json(data, limits, notes)
    if not isinstance(payload, dict):
        raise HitError("not_an_object")
    fields = dict(payload)
    if route.call == "p.gif":  # Jitsu Classic
        user = _object(payload.get("user"))
        event_type = _text(payload.get("event_type"))
        page = page_context(
            _text(payload.get("url")),
            _text(payload.get("page_title")),
            _text(payload.get("referer")),
        )
        common: dict[str, Any] = {
            "dialect": "jitsu",
            "fields": fields,
            "user_id": _text(user.get("id")),
            "anonymous_id": _text(user.get("anonymous_id")),
            "page": page,
        }
        if event_type in ("pageview", "page"):
            event = vendor_event(page_name=page.get("title"), **common)
            call = "page"
        else:
            event = vendor_event(event_name=event_type, **common)
            call = "track"
        key = _text(payload.get("api_key")) or _text(params.get("writeKey"))
        missing = [] if key else ["api_key"]
        return [Hit(call, key, event, missing)]
    call = route.call if route.call in _CALLS else "track"
    key = _text(payload.get("writeKey")) or _text(params.get("writeKey"))
    properties = _object(payload.get("properties"))
    page = _object(_object(payload.get("context")).get("page"))
    event = vendor_event(
        dialect="jitsu",
        fields=fields,
        user_id=_text(payload.get("userId")),
        anonymous_id=_text(payload.get("anonymousId")),
        event_name=_text(payload.get("event")) if call == "track" else None,
        page_name=_text(payload.get("name")) if call in ("page", "screen") else None,
        page=page,
        properties=dict(properties),
        traits=_object(payload.get("traits")),
    )
    missing = [] if key else ["writeKey"]
    if call == "track" and "event" not in event:
        missing.append("event")
    return [Hit(call, key, event, missing)]


JITSU = vendor_dialect(
    name="jitsu",
    paths={"/api/v1/p.gif": "p.gif"},
    path_roots=("/api/px/",),
    reader=_reader,
)
