"""Snowplow: the tracker protocol's ``/i`` pixel and its ``tp2`` POST route.

- ``GET /i?e=pv&tv=js-3.0.0&p=web&aid=...``: one event in the query.
- ``POST /com.snowplowanalytics.snowplow/tp2``: ``{"schema":
  "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4", "data":
  [{...}, ...]}``, each object one event with the query's fields (as strings).

Fields: ``e`` (event type: ``pv`` page view, ``pp`` page ping, ``se``
structured, ``ue`` self-describing, ``tr`` / ``ti`` transaction and item),
``aid`` (app id), ``p`` (platform), ``tv`` (tracker version), ``duid``
(domain user id), ``uid`` (user id), ``sid`` (session id), ``eid`` (event
id), ``dtm`` / ``stm`` (created and sent times, epoch milliseconds), ``url``,
``page``, ``refr``, ``se_ca`` / ``se_ac`` / ``se_la`` / ``se_pr`` / ``se_va``,
and self-describing JSON as plain ``ue_pr`` / ``co`` or base64url ``ue_px`` /
``cx``. Required: ``e``, ``tv``, ``p``.

``/i`` is far too common a path to own outright (any site may have one): it is
Snowplow's only when its query carries the tracker protocol's markers, ``e=``
and ``tv=`` (every Snowplow tracker sends both), or when the user maps it with
a custom route (``collector.example.com/i=snowplow:i``). Answered as the
Snowplow collector does: the GIF for ``/i``, ``200 ok`` for ``tp2``.

Source: docs.snowplow.io/docs/collecting-data/collecting-from-own-applications/
snowplow-tracker-protocol/ (its examples are the golden cases).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pixel_middleware.dialects._vendor import (
    Hit,
    HitError,
    Params,
    decode_base64_json,
    number,
    page_context,
    parse_json_text,
    query_params,
    read_body,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import (
    Limits,
    PixelRequest,
    Route,
    _format_time,
    _Notes,
)

__all__ = ["SNOWPLOW"]

_REQUIRED = ("e", "tv", "p")
# The tracker protocol's markers: every tracker sends both in every event.
_MARKERS = frozenset({b"e", b"tv"})
# Event types without a name of their own get Snowplow's enriched event_name.
_EVENT_NAMES = {"pp": "page_ping", "tr": "transaction", "ti": "transaction_item"}
# Epoch milliseconds up to the year 9999, no more digits than that.
_MAX_EPOCH_MS = 253_402_300_799_999


def _has_markers(query: bytes) -> bool:
    """Whether the raw query names both ``e`` and ``tv`` (no decoding: they are ASCII)."""
    found: set[bytes] = set()
    for piece in query.split(b"&"):
        key = piece.partition(b"=")[0]
        if key in _MARKERS:
            found.add(key)
            if len(found) == len(_MARKERS):
                return True
    return False


def _claims(request: PixelRequest, route: Route, limits: Limits) -> bool:
    # tp2 names Snowplow in its path; /i needs the protocol's markers.
    return route.call != "i" or _has_markers(request.query[: limits.max_query_bytes])


def _time(text: str | None) -> str | None:
    """Epoch milliseconds as an ISO 8601 time; ``None`` when it is not one."""
    if not text or not text.isdigit() or len(text) > 15:
        return None
    millis = int(text)
    if millis > _MAX_EPOCH_MS:
        return None
    return _format_time(datetime.fromtimestamp(millis / 1000, UTC))


def _self_describing(
    params: Params, plain: str, encoded: str, limits: Limits, notes: _Notes
) -> Any:
    """``ue_pr`` / ``co`` as JSON, or ``ue_px`` / ``cx`` as base64url JSON; ``None``
    when absent or unreadable (kept as sent in ``context.vendor.fields`` then)."""
    try:
        if params.get(plain):
            return parse_json_text(params[plain], limits, notes)
        if params.get(encoded):
            return decode_base64_json(params[encoded], limits, notes)
    except HitError:
        return None
    return None


def _schema_name(schema: Any) -> str | None:
    """``iglu:com.acme/link_click/jsonschema/1-0-0`` -> ``link_click``."""
    if not isinstance(schema, str) or not schema.startswith("iglu:"):
        return None
    parts = schema[5:].split("/")
    return parts[1] if len(parts) == 4 and parts[1] else None


def _hit(params: Params, limits: Limits, notes: _Notes) -> Hit:
    kind = params.get("e", "")
    page = page_context(params.get("url"), params.get("page"), params.get("refr"))
    properties: dict[str, Any] = {}
    common: dict[str, Any] = {
        "dialect": "snowplow",
        "fields": dict(params),
        "user_id": params.get("uid"),
        "anonymous_id": params.get("duid"),
        "page": page,
    }
    missing = [name for name in _REQUIRED if not params.get(name, "").strip()]
    if kind == "pv":
        for key in ("url", "title", "referrer"):
            if key in page:
                properties.setdefault(key, page[key])
        event = vendor_event(page_name=params.get("page") or None, properties=properties, **common)
        call = "page"
    else:
        name: str | None
        if kind == "se":
            for source, target in (("se_ca", "category"), ("se_la", "label")):
                if source in params:
                    properties[target] = params[source]
            if "se_pr" in params:
                properties["property"] = params["se_pr"]
            if "se_va" in params:
                properties["value"] = number(params["se_va"])
            name = params.get("se_ac") or None
            if name is None:
                missing.append("se_ac")
        elif kind == "ue":
            # {"schema": ".../unstruct_event/...", "data": {"schema": <the event's>, "data": {...}}}
            outer = _self_describing(params, "ue_pr", "ue_px", limits, notes)
            inner = outer.get("data") if isinstance(outer, dict) else None
            name = _schema_name(inner.get("schema")) if isinstance(inner, dict) else None
            if name is None:
                missing.append("ue_pr")
            elif isinstance(inner, dict) and isinstance(inner.get("data"), dict):
                properties.update(inner["data"])
        else:
            name = _EVENT_NAMES.get(kind, kind) or None
        event = vendor_event(event_name=name, properties=properties, **common)
        call = "track"
    contexts = _self_describing(params, "co", "cx", limits, notes)
    if isinstance(contexts, dict) and isinstance(contexts.get("data"), list):
        # The entities attached to the event, decoded (the fields keep them as sent).
        event["context"]["vendor"]["contexts"] = contexts["data"]
    if params.get("eid"):
        event["messageId"] = params["eid"]
    for source, target in (("dtm", "originalTimestamp"), ("stm", "sentAt")):
        moment = _time(params.get(source))
        if moment is not None:
            event[target] = moment
    return Hit(call, params.get("aid") or None, event, missing)


def _text_fields(event: dict[str, Any]) -> Params:
    # Trackers send every value as a string; a number or boolean is read as its text.
    fields: Params = {}
    for key, value in event.items():
        if isinstance(value, str):
            fields[key] = value
        elif isinstance(value, bool):
            fields[key] = "true" if value else "false"
        elif isinstance(value, (int, float)):
            fields[key] = str(value)
    return fields


def _reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    params = query_params(request.query, limits, notes)
    if route.call == "i" or request.method != "POST":
        return [_hit(params, limits, notes)]
    payload = parse_json_text(read_body(request, limits), limits, notes)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise HitError("bad_batch")
    events = payload["data"]
    if len(events) > limits.max_batch_events:
        raise HitError("too_many_events")
    hits: list[Hit] = []
    for event in events:
        if not isinstance(event, dict):
            raise HitError("not_an_object")
        fields = _text_fields(event)
        if len(fields) > limits.max_params:
            raise HitError("too_many_params")
        hits.append(_hit(fields, limits, notes))
    return hits


SNOWPLOW = vendor_dialect(
    name="snowplow",
    paths={"/i": "i", "/com.snowplowanalytics.snowplow/tp2": "tp2"},
    reader=_reader,
    claims=_claims,
    # The Snowplow collector answers a GET with the GIF and a POST with "ok".
    post_answer=(200, "text/plain; charset=utf-8", b"ok"),
)
