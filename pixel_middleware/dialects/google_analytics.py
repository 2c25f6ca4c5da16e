"""Google Analytics: GA4's ``/g/collect`` and Universal Analytics' ``/collect``.

Two dialects in one module, since they share hosts and the one-hit-a-line body:

- ``ga4``: ``/g/collect`` (GET, and POST with one hit a line, the URL's query
  shared by every line), on any host (server-side tagging serves it from a
  first-party one). ``v=2``, ``tid`` (measurement id), ``cid`` (client id),
  ``en`` (event name), ``ep.*`` / ``epn.*`` (event parameters, text and
  number), ``up.*`` (user properties), ``uid``, ``_p``, ``sid``, ``dl``,
  ``dt``, ``dr``. Required: ``tid`` and ``cid``. Answered ``204``, as Google does.
- ``universal_analytics``: the Measurement Protocol v1, ``/collect`` and
  ``/r/collect`` on Google's hosts (the paths alone are too common), GET or a
  POST of one hit (``/batch``: one a line). ``v=1``, ``tid``, ``cid``, ``uid``,
  ``t`` (hit type), ``ec``/``ea``/``el``/``ev``, ``dp``, ``dl``, ``dt``,
  ``dr``. Required: ``v``, ``tid``, ``cid``, ``t``. Answered with a GIF.

Sources: developers.google.com/analytics/devguides/collection/protocol/v1/parameters
and /v1/devguide; GA4's wire format as gtag.js sends it (documented by
developers.google.com/tag-platform/tag-manager/server-side and Omnibug's GA4
provider).
"""

from __future__ import annotations

from typing import Any

from pixel_middleware._query import split_query
from pixel_middleware.dialects._vendor import (
    Hit,
    HitError,
    Params,
    first_values,
    number,
    page_context,
    query_params,
    read_body,
    split_lines,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import Limits, PixelRequest, Route, _Notes, parsed_query

__all__ = ["GA4", "UNIVERSAL_ANALYTICS"]

# www., ssl., region1. (the EU endpoint), ...
GOOGLE_ANALYTICS_HOSTS = frozenset({"google-analytics.com", ".google-analytics.com"})


def _hits(
    request: PixelRequest,
    limits: Limits,
    notes: _Notes,
    build: Any,
) -> list[Hit]:
    shared = query_params(request.query, limits, notes)
    if request.method != "POST" or not request.body.strip():
        return [build(shared)]
    hits: list[Hit] = []
    for line in split_lines(read_body(request, limits), limits):
        pieces = split_query(line, limits.max_params)
        if pieces is None:
            raise HitError("too_many_params")
        own = first_values(parsed_query(pieces, notes)[0], notes)
        hits.append(build({**shared, **own}))
    return hits


def _missing(params: Params, required: tuple[str, ...]) -> list[str]:
    return [name for name in required if not params.get(name, "").strip()]


def _ga4_hit(params: Params) -> Hit:
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    for key, value in params.items():
        if key.startswith("ep."):
            properties[key[3:]] = value
        elif key.startswith("epn."):
            properties[key[4:]] = number(value)
        elif key.startswith("up."):
            traits[key[3:]] = value
        elif key.startswith("upn."):
            traits[key[4:]] = number(value)
    name = params.get("en") or None
    page = page_context(params.get("dl"), params.get("dt"), params.get("dr"))
    common: dict[str, Any] = {
        "dialect": "ga4",
        "fields": dict(params),
        "user_id": params.get("uid"),
        "anonymous_id": params.get("cid"),
        "page": page,
        "traits": traits,
    }
    if name == "page_view":
        # Segment's page call: the page's title is its name.
        for key in ("url", "title", "referrer"):
            if key in page:
                properties.setdefault(key, page[key])
        event = vendor_event(page_name=params.get("dt") or None, properties=properties, **common)
        call = "page"
    else:
        event = vendor_event(event_name=name, properties=properties, **common)
        call = "track"
    missing = _missing(params, ("tid", "cid", "en"))
    return Hit(call, params.get("tid") or None, event, missing)


def _ga4_reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    return _hits(request, limits, notes, _ga4_hit)


# Hit types that are not events or pages keep their type as the event name.
_UA_PAGE_TYPES = frozenset({"pageview"})


def _ua_hit(params: Params) -> Hit:
    hit_type = params.get("t", "")
    page = page_context(params.get("dl"), params.get("dt"), params.get("dr"))
    properties: dict[str, Any] = {}
    common: dict[str, Any] = {
        "dialect": "universal_analytics",
        "fields": dict(params),
        "user_id": params.get("uid"),
        "anonymous_id": params.get("cid"),
        "page": page,
    }
    if hit_type in _UA_PAGE_TYPES:
        if params.get("dp"):
            properties["path"] = params["dp"]
        for key in ("url", "title", "referrer"):
            if key in page:
                properties.setdefault(key, page[key])
        event = vendor_event(page_name=params.get("dt") or None, properties=properties, **common)
        call = "page"
    elif hit_type == "screenview":
        event = vendor_event(page_name=params.get("cd") or None, properties=properties, **common)
        call = "screen"
    else:
        if hit_type == "event":
            for source, target in (("ec", "category"), ("el", "label")):
                if source in params:
                    properties[target] = params[source]
            if "ev" in params:
                properties["value"] = number(params["ev"])
            name = params.get("ea") or None
        else:
            name = hit_type or None
        event = vendor_event(event_name=name, properties=properties, **common)
        call = "track"
    missing = _missing(params, ("v", "tid", "cid", "t"))
    return Hit(call, params.get("tid") or None, event, missing)


def _ua_reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    return _hits(request, limits, notes, _ua_hit)


GA4 = vendor_dialect(
    name="ga4",
    paths={"/g/collect": "collect"},
    reader=_ga4_reader,
    # Google answers a GA4 hit 204 No Content.
    get_answer=(204, "text/plain", b""),
    post_answer=(204, "text/plain", b""),
)

UNIVERSAL_ANALYTICS = vendor_dialect(
    name="universal_analytics",
    paths={"/collect": "collect", "/r/collect": "collect", "/batch": "batch"},
    hosts={
        "/collect": GOOGLE_ANALYTICS_HOSTS,
        "/r/collect": GOOGLE_ANALYTICS_HOSTS,
        "/batch": GOOGLE_ANALYTICS_HOSTS,
    },
    reader=_ua_reader,
)
