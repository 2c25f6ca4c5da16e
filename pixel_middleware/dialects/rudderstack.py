"""RudderStack: the Pixel API, the HTTP API and the JavaScript SDK's beacon.

- ``GET /pixel/v1/{page,track}``: dot-notation query parameters, every value a
  string, as rudder-server builds them. Answered ``200 OK`` / ``400`` with the
  problems (its Pixel API document), or always the GIF
  (``rudderstack_response="gif"``, what rudder-server does since 2021).
- ``POST /v1/{identify,track,page,screen,group,alias,batch}`` (the HTTP API,
  Segment's body format; these paths belong to Segment when both dialects are
  enabled) and ``POST /beacon/v1/batch?writeKey=`` (the JavaScript SDK's
  ``sendBeacon`` transport): answered ``200 OK`` or ``400`` with the problems.

Sources: RudderStack's *Pixel API* and *HTTP API* documents, rudder-server's
gateway; docs/dialects.md lists every rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixel_middleware._query import ParsedQuery
from pixel_middleware.dialects._http_api import API_CALLS, REQUEST_RULES, pixel_or_body
from pixel_middleware.dialects.base import (
    _ABSENT,
    _OK_BODY,
    _TEXT,
    GIF,
    Answer,
    Dialect,
    Limits,
    PixelRecord,
    Problem,
    Route,
    _dot_form_event,
    _note,
    _Notes,
    fixed_answer,
    gif_answer,
    parsed_query,
    rejected_header,
    text_answer,
)

if TYPE_CHECKING:
    from pixel_middleware.core import PixelConfig

__all__ = ["RUDDERSTACK"]

CALLS: tuple[str, ...] = ("page", "track")
BODY_ROUTES: dict[str, str] = {
    **{f"/v1/{call}": call for call in (*API_CALLS, "batch")},
    "/beacon/v1/batch": "batch",
}
_NOT_KEPT_BODY = b"Service Unavailable: the pixel could not be recorded; send it again later.\n"


def _rudderstack_event(
    parsed: ParsedQuery,
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
    received_at: str,
) -> tuple[dict[str, Any] | None, str | None]:
    built, write_key = _dot_form_event(parsed, call, limits, notes, problems, strip_quotes=True)
    if built is None:
        return None, write_key
    # rudder-server starts from {"channel": "web", "integrations": {"All": true}}
    # plus both timestamps, then sets the parameters over it: parameters win.
    integrations = built.pop("integrations", _ABSENT)
    if integrations is _ABSENT:
        integrations = {"All": True}
    elif isinstance(integrations, dict):
        integrations = {"All": True, **integrations}
    event: dict[str, Any] = {
        "channel": built.pop("channel", "web"),
        "integrations": integrations,
        "originalTimestamp": built.pop("originalTimestamp", received_at),
        "sentAt": built.pop("sentAt", received_at),
    }
    event.update(built)
    if call == "page" and event.get("name") == "":
        event["name"] = "Unknown Page"
        _note(notes, "unknown_page_name")
    return event, write_key


def _event_from_query(
    pieces: list[bytes],
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
    received_at: str,
) -> tuple[dict[str, Any] | None, str | None]:
    return _rudderstack_event(
        parsed_query(pieces, notes), call, limits, notes, problems, received_at
    )


def _answer(records: list[PixelRecord], route: Route, config: PixelConfig) -> Answer:
    if route.body:
        # rudder-server answers a well-formed request "OK" and a bad one 400
        # with the reason; events it drops later are not the client's to know.
        bad = [r for r in records if any(p["rule"] in REQUEST_RULES for p in r["problems"])]
        if bad:
            return text_answer(bad)
        status, headers, body = fixed_answer(200, _TEXT, _OK_BODY)
        rejected = rejected_header(records)
        if rejected is not None:
            headers.append(rejected)
        return status, headers, body
    if config.rudderstack_response == "seed":
        return text_answer(records)
    return gif_answer(records)


def _accepted_answer(route: Route, config: PixelConfig) -> Answer:
    if route.body or config.rudderstack_response == "seed":
        return fixed_answer(200, _TEXT, _OK_BODY)
    return gif_answer([])


def _not_kept(route: Route, config: PixelConfig) -> tuple[str, bytes]:
    if route.body or config.rudderstack_response == "seed":
        return _TEXT, _NOT_KEPT_BODY
    return "image/gif", GIF


RUDDERSTACK = Dialect(
    name="rudderstack",
    pixel_root="/pixel/v1/",
    calls=CALLS,
    body_routes=BODY_ROUTES,
    decode=pixel_or_body("rudderstack", calls=CALLS, event_from_query=_event_from_query),
    answer=_answer,
    accepted_answer=_accepted_answer,
    not_kept=_not_kept,
)
