"""Matomo (formerly Piwik): ``/matomo.php`` and ``/piwik.php``, on any host.

The Tracking HTTP API: ``idsite`` (the site id), ``rec=1`` (required to
record), ``action_name`` (the page title), ``url``, ``urlref``, ``_id`` (the
visitor id), ``uid`` (the user id), ``e_c``/``e_a``/``e_n``/``e_v`` (an event's
category, action, name, value), ``cvar`` (custom variables, JSON
``{"1": ["name", "value"]}``). GET, or POST with the same parameters as a form
body. Required: ``idsite`` and ``rec``. Answered with a GIF, as Matomo does.

Source: developer.matomo.org/api-reference/tracking-api
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
    parse_json_text,
    query_params,
    read_body,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import Limits, PixelRequest, Route, _Notes, parsed_query

__all__ = ["MATOMO"]


def _custom_variables(text: str, limits: Limits, notes: _Notes) -> dict[str, Any]:
    try:
        value = parse_json_text(text, limits, notes)
    except HitError:
        return {}  # kept as sent in context.vendor.fields
    variables: dict[str, Any] = {}
    if isinstance(value, dict):
        for pair in value.values():
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str):
                variables[pair[0]] = pair[1]
    return variables


def _matomo_hit(params: Params, limits: Limits, notes: _Notes) -> Hit:
    page = page_context(params.get("url"), params.get("action_name"), params.get("urlref"))
    properties: dict[str, Any] = {}
    if params.get("cvar"):
        properties["customVariables"] = _custom_variables(params["cvar"], limits, notes)
    common: dict[str, Any] = {
        "dialect": "matomo",
        "fields": dict(params),
        "user_id": params.get("uid"),
        "anonymous_id": params.get("_id"),
        "page": page,
    }
    if params.get("e_a") or params.get("e_c"):
        for source, target in (("e_c", "category"), ("e_n", "name")):
            if source in params:
                properties[target] = params[source]
        if "e_v" in params:
            properties["value"] = number(params["e_v"])
        event = vendor_event(event_name=params.get("e_a") or None, properties=properties, **common)
        call = "track"
    else:
        for key in ("url", "title", "referrer"):
            if key in page:
                properties.setdefault(key, page[key])
        event = vendor_event(
            page_name=params.get("action_name") or None, properties=properties, **common
        )
        call = "page"
    missing = [f for f in ("idsite", "rec") if not params.get(f, "").strip()]
    return Hit(call, params.get("idsite") or None, event, missing)


def _reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    params = query_params(request.query, limits, notes)
    if request.method == "POST":
        body = read_body(request, limits)
        pieces = split_query(body.strip(), limits.max_params) if body.strip() else []
        if pieces is None:
            raise HitError("too_many_params")
        params = {**params, **first_values(parsed_query(pieces, notes)[0], notes)}
    return [_matomo_hit(params, limits, notes)]


MATOMO = vendor_dialect(
    name="matomo",
    paths={"/matomo.php": "matomo", "/piwik.php": "matomo"},
    reader=_reader,
)
