"""Meta (Facebook) Pixel: ``/tr`` on ``www.facebook.com`` and ``facebook.com``.

The image form of the pixel (``<img src="https://www.facebook.com/tr?id=...&ev=PageView">``)
and what fbevents.js sends: ``id`` (the pixel id), ``ev`` (the event:
``PageView``, ``Purchase``, ...), ``cd[...]`` (custom data: ``value``,
``currency``, ...), ``dl`` (page URL), ``rl`` (referrer), ``ud[...]``
(advanced matching: hashed email, phone, ...), ``fbp`` (the browser id
cookie). Required: ``id`` and ``ev``. Answered with a GIF, as Meta does.

Source: developers.facebook.com/docs/meta-pixel/advanced (image pixel) and
/docs/meta-pixel/reference (standard events and their parameters).
"""

from __future__ import annotations

import re
from typing import Any

from pixel_middleware._query import split_query
from pixel_middleware.dialects._vendor import (
    Hit,
    HitError,
    first_values,
    number,
    page_context,
    query_params,
    read_body,
    vendor_dialect,
    vendor_event,
)
from pixel_middleware.dialects.base import Limits, PixelRequest, Route, _Notes, parsed_query

__all__ = ["META"]

META_HOSTS = frozenset({"www.facebook.com", "facebook.com"})
# cd[value], ud[em]: one level of brackets.
_BRACKETED = re.compile(r"\A(cd|ud)\[([^\[\]]*)\]\Z")
# Custom data Meta reads as numbers (its standard parameters).
_NUMERIC = frozenset({"value", "num_items", "predicted_ltv"})


def _meta_hit(params: dict[str, str]) -> Hit:
    properties: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    for key, value in params.items():
        match = _BRACKETED.match(key)
        if match is None:
            continue
        kind, name = match.groups()
        if kind == "cd":
            properties[name] = number(value) if name in _NUMERIC else value
        else:
            traits[name] = value
    name = params.get("ev") or None
    page = page_context(params.get("dl"), None, params.get("rl"))
    common: dict[str, Any] = {
        "dialect": "meta",
        "fields": dict(params),
        "anonymous_id": params.get("fbp"),
        "page": page,
        "traits": traits,
    }
    if name == "PageView":
        if "url" in page:
            properties.setdefault("url", page["url"])
        event = vendor_event(page_name=None, properties=properties, **common)
        call = "page"
    else:
        event = vendor_event(event_name=name, properties=properties, **common)
        call = "track"
    missing = [field for field in ("id", "ev") if not params.get(field, "").strip()]
    return Hit(call, params.get("id") or None, event, missing)


def _reader(request: PixelRequest, route: Route, limits: Limits, notes: _Notes) -> list[Hit]:
    params = query_params(request.query, limits, notes)
    if request.method == "POST":
        # fbevents.js posts the same parameters as a form when the URL is too long.
        body = read_body(request, limits)
        pieces = split_query(body, limits.max_params) if body.strip() else []
        if pieces is None:
            raise HitError("too_many_params")
        own = first_values(parsed_query(pieces, notes)[0], notes)
        params = {**params, **own}
    return [_meta_hit(params)]


META = vendor_dialect(
    name="meta",
    paths={"/tr": "tr", "/tr/": "tr"},
    hosts={"/tr": META_HOSTS, "/tr/": META_HOSTS},
    reader=_reader,
)
