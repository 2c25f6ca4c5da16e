"""PostHog: the capture API's ``/e``, ``/i/v0/e``, ``/capture`` and ``/batch``.

Payloads, as PostHog's capture endpoint reads them:

- a JSON body: one event ``{"api_key", "event", "distinct_id", "properties",
  "timestamp"}``, a batch ``{"api_key", "batch": [...]}``, or a JSON list of
  events (posthog-js);
- ``data=`` in a form body or in the query (posthog-js's image fallback):
  base64 JSON, or raw JSON;
- ``compression=gzip-js`` (query or form; or ``Content-Encoding: gzip``): the
  body is gzip; ``compression=lz64``: ``data=`` is LZ-string base64
  (``lz-string``'s ``compressToBase64``). Every decompressed size is held to
  ``Limits.max_decompressed_bytes``.

The project key is ``api_key`` or ``token`` (posthog-js sends it as
``properties.token``), per event or once for a batch. ``distinct_id`` may be
the event's or its properties'. Required: the key, ``event``, ``distinct_id``.

``/e``, ``/capture`` and ``/batch`` are common paths: on PostHog's hosts
(``*.posthog.com``, ``*.i.posthog.com``) they are always PostHog's, elsewhere
only when the decoded payload carries a project key; otherwise the application
keeps the request (and its whole body). ``/i/v0/e`` names PostHog in its path.
Answered as PostHog does: ``200`` ``{"status":1}``.

Sources: posthog.com/docs/api/capture, and posthog-js's request formats
(github.com/PostHog/posthog-js, ``src/request.ts``: ``compression`` values
``gzip-js``, ``base64``, ``lz64``).
"""

from __future__ import annotations

from typing import Any

from pixel_middleware._lzstring import TooLarge, decompress_from_base64
from pixel_middleware._query import parse_query
from pixel_middleware.dialects._vendor import (
    Hit,
    HitError,
    Params,
    decode_base64_json,
    first_values,
    page_context,
    parse_json_text,
    query_params,
    read_body,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import Limits, PixelRequest, Route, _note, _Notes

__all__ = ["POSTHOG"]

_NAME = "posthog"
_GZIP = frozenset({"gzip", "gzip-js"})
# The special events with a Segment call of their own; any other is a track.
_CALLS = {
    "$pageview": "page",
    "$screen": "screen",
    "$identify": "identify",
    "$groupidentify": "group",
    "$create_alias": "alias",
}
_PATHS = {
    path + tail: call
    for path, call in (("/e", "e"), ("/i/v0/e", "e"), ("/capture", "capture"), ("/batch", "batch"))
    for tail in ("", "/")
}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _form(body: bytes, limits: Limits, notes: _Notes) -> Params:
    """A form body's fields, held to ``max_params``."""
    parsed = parse_query(body, limits.max_params)
    if parsed is None:
        raise HitError("too_many_params")
    pairs, _, replaced = parsed
    if replaced:
        _note(notes, "invalid_utf8")
    return first_values(pairs, notes)


def _data(data: str, compression: str, limits: Limits, notes: _Notes) -> Any:
    """``data=``: LZ-string base64 (``lz64``), raw JSON, or base64 JSON."""
    if compression == "lz64":
        # Form decoding turns an unencoded "+" of the alphabet into a space.
        cleaned = data.strip().replace(" ", "+")
        if len(cleaned) > 2 * limits.max_decompressed_bytes:
            raise HitError("too_large")
        try:
            text = decompress_from_base64(cleaned, max_chars=limits.max_decompressed_bytes)
        except TooLarge:
            raise HitError("too_large") from None
        except ValueError:
            raise HitError("bad_base64") from None
        if text is None:
            raise HitError("bad_base64")
        return parse_json_text(text, limits, notes)
    if data.lstrip().startswith(("{", "[")):
        return parse_json_text(data, limits, notes)
    return decode_base64_json(data, limits, notes)


def _payload(request: PixelRequest, limits: Limits, notes: _Notes) -> Any:
    """The request's decoded payload: its body's, else its query's ``data=``."""
    params = query_params(request.query, limits, notes)
    compression = params.get("compression", "").strip().lower()
    if request.method == "POST" and request.body.strip():
        body = read_body(request, limits, gzip=compression in _GZIP)
        if body.lstrip().startswith((b"{", b"[")):
            return parse_json_text(body, limits, notes)
        form = _form(body, limits, notes)
        if "data" not in form:
            # Neither a form nor an object: read as JSON, whose error says what it is.
            return parse_json_text(body, limits, notes)
        compression = form.get("compression", compression).strip().lower()
        return _data(form["data"], compression, limits, notes)
    if "data" in params:
        return _data(params["data"], compression, limits, notes)
    return {}


def _key(event: dict[str, Any], shared: str | None) -> str | None:
    properties = _object(event.get("properties"))
    return (
        _text(event.get("api_key"))
        or _text(event.get("token"))
        or _text(properties.get("token"))
        or shared
    )


def _distinct_id(event: dict[str, Any]) -> str | None:
    properties = _object(event.get("properties"))
    for value in (
        event.get("distinct_id"),
        event.get("$distinct_id"),
        properties.get("distinct_id"),
        properties.get("$distinct_id"),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # PostHog reads a numeric id as its text
        if _text(value):
            return str(value)
    return None


def _hit(event: dict[str, Any], shared: dict[str, Any], shared_key: str | None) -> Hit:
    properties = dict(_object(event.get("properties")))
    name = _text(event.get("event"))
    call = _CALLS.get(name or "", "track")
    distinct_id = _distinct_id(event)
    device_id = _text(properties.get("$device_id"))
    anon_id = _text(properties.get("$anon_distinct_id"))
    # distinct_id is a person's id once identified; before, posthog-js sends the
    # device's (anonymous) id as distinct_id, which the Spec calls anonymousId.
    anonymous = distinct_id is not None and distinct_id in (device_id, anon_id)
    user_id = None if anonymous else distinct_id
    anonymous_id = distinct_id if anonymous else (anon_id or device_id)
    page = page_context(
        _text(properties.get("$current_url")),
        _text(properties.get("$title")) or _text(properties.get("title")),
        _text(properties.get("$referrer")),
    )
    traits = _object(event.get("$set")) or _object(properties.get("$set"))
    fields = {**{k: v for k, v in shared.items() if k != "batch"}, **event}
    common: dict[str, Any] = {
        "dialect": _NAME,
        "fields": fields,
        "user_id": user_id,
        "anonymous_id": anonymous_id,
        "page": page,
    }
    missing: list[str] = []
    if call == "page":
        for key in ("url", "title", "referrer"):
            if key in page:
                properties.setdefault(key, page[key])
        out = vendor_event(
            page_name=page.get("title") or page.get("url"),
            properties=properties,
            traits=traits,
            **common,
        )
    elif call == "screen":
        out = vendor_event(
            page_name=_text(properties.get("$screen_name")),
            properties=properties,
            traits=traits,
            **common,
        )
    elif call == "identify":
        out = vendor_event(properties=properties, **common)
        out["traits"] = traits
    elif call == "group":
        out = vendor_event(properties=properties, **common)
        group_key = properties.get("$group_key")
        if _text(group_key):
            out["groupId"] = group_key
        out["traits"] = _object(properties.get("$group_set"))
    elif call == "alias":
        # posthog-js alias(alias): the alias is the id the person goes by from now
        # on; distinct_id the one they had, Segment's previousId.
        out = vendor_event(properties=properties, **common)
        alias = _text(properties.get("alias"))
        out.pop("userId", None)
        out.pop("anonymousId", None)
        if alias is not None:
            out["userId"] = alias
        if distinct_id is not None:
            out["previousId"] = distinct_id
    else:
        out = vendor_event(event_name=name, properties=properties, traits=traits, **common)
    if isinstance(event.get("uuid"), str) and event["uuid"]:
        out["messageId"] = event["uuid"]
    if isinstance(event.get("timestamp"), str) and event["timestamp"]:
        out["originalTimestamp"] = event["timestamp"]
    project_key = _key(event, shared_key)
    if project_key is None:
        missing.append("api_key")
    if name is None:
        missing.append("event")
    if distinct_id is None:
        missing.append("distinct_id")
    return Hit(call, project_key, out, missing)


def _events(payload: Any, limits: Limits) -> tuple[list[Any], dict[str, Any]]:
    """The payload's events and what a batch shares (its ``api_key``, ``sent_at``)."""
    if isinstance(payload, list):
        events, shared = payload, {}
    elif isinstance(payload, dict) and "batch" in payload:
        if not isinstance(payload["batch"], list):
            raise HitError("bad_batch")
        events, shared = payload["batch"], payload
    elif isinstance(payload, dict):
        events, shared = [payload], {}
    else:
        raise HitError("not_an_object")
    if len(events) > limits.max_batch_events:
        raise HitError("too_many_events")
    return events, shared


def _reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    events, shared = _events(_payload(request, limits, notes), limits)
    shared_key = _key(shared, None)
    hits: list[Hit] = []
    for event in events:
        if not isinstance(event, dict):
            raise HitError("not_an_object")
        hits.append(_hit(event, shared, shared_key))
    return hits


def _on_posthog_host(host: str | None) -> bool:
    """posthog.com and its subdomains (us.i.posthog.com, eu.i.posthog.com, ...)."""
    name = (host or "").strip().lower()
    if name.count(":") == 1:  # the port, as routing ignores it
        name = name.partition(":")[0]
    return name == "posthog.com" or name.endswith(".posthog.com")


def _claims(request: PixelRequest, route: Route, limits: Limits) -> bool:
    """PostHog's host or ``/i/v0/e``: always; elsewhere only with a project key."""
    if _on_posthog_host(request.host) or request.path.rstrip("/").endswith("/i/v0/e"):
        return True
    try:
        events, shared = _events(_payload(request, limits, {}), limits)
    except (HitError, RecursionError):
        return False
    if _key(shared, None) is not None:
        return True
    return any(isinstance(event, dict) and _key(event, None) for event in events)


POSTHOG = vendor_dialect(
    name=_NAME,
    paths=_PATHS,
    reader=_reader,
    claims=_claims,
    # PostHog's capture endpoint answers {"status": 1}, to a GET as to a POST.
    get_answer=(200, "application/json", b'{"status":1}'),
    post_answer=(200, "application/json", b'{"status":1}'),
)
