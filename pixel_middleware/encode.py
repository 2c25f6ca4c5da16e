"""Pixel URLs and ``<img>`` tags: the inverse of :func:`~pixel_middleware.core.decode_pixel`.

Usage::

    url = encode_pixel_url(
        {"userId": "u1", "event": "Email Opened"}, call="track", write_key="KEY"
    )
    html = pixel_img_tag(url)

Segment URLs carry the event as ``data=`` base64 (URL-safe alphabet, no padding,
the writeKey inside the JSON). RudderStack URLs carry it as dot-notation query
parameters with ``writeKey`` first; that form can only express string leaves,
so numbers become their decimal text and booleans ``true``/``false`` (what a
browser SDK would send), and whatever the form cannot express at all raises
``ValueError``. Stdlib only, like the core.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from pixel_middleware.core import CALLS, DEFAULT_DIALECTS

__all__ = ["encode_pixel_url", "pixel_img_tag"]

_ROUTE_ROOTS = {"segment": "/v1/pixel/", "rudderstack": "/pixel/v1/"}


def _numeric(segment: str) -> bool:
    return segment.isdigit() and segment.isascii()


def _leaf_text(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"rudderstack cannot express {value!r} at {path}")
        return repr(value)
    if value is None:
        raise ValueError(f"rudderstack cannot express null (at {path}): leave the field out")
    raise ValueError(
        f"rudderstack can only express strings, numbers and booleans, "
        f"got {type(value).__name__} at {path}"
    )


def _flatten(value: Any, path: str, out: list[tuple[str, str]], top: bool) -> None:
    """Append (dot path, text) pairs for ``value``, which sits at ``path``."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"rudderstack cannot express an empty object (at {path})")
        for key, child in value.items():
            if not isinstance(key, str):
                raise ValueError(f"keys must be strings, got {key!r} at {path}")
            if key == "" or "." in key:
                raise ValueError(
                    f"rudderstack keys cannot be empty or contain '.': {key!r} at {path}"
                )
            if not top and _numeric(key):
                raise ValueError(
                    f"rudderstack reads a numeric key below the top level as an array "
                    f"index: {key!r} at {path}"
                )
            _flatten(child, key if top else f"{path}.{key}", out, top=False)
    elif isinstance(value, (list, tuple)):
        if not value or value[-1] is None:
            raise ValueError(
                f"rudderstack cannot express an empty array or one ending in null (at {path})"
            )
        for index, child in enumerate(value):
            if child is not None:  # a gap: the decoder pads it with null again
                _flatten(child, f"{path}.{index}", out, top=False)
    else:
        out.append((path, _leaf_text(value, path)))


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or (prefix and (prefix[0] != "/" or prefix[-1] == "/")):
        raise ValueError(
            f"prefix must be '' or start with '/' and not end with '/' "
            f"(like '/collect'), got {prefix!r}"
        )


def encode_pixel_url(
    event: Mapping[str, Any],
    *,
    call: str,
    write_key: str,
    dialect: str = "segment",
    base_url: str = "http://127.0.0.1:8000",
    prefix: str = "",
) -> str:
    """The pixel URL that makes the collector record ``event`` as a ``call``.

    ``event`` holds the spec fields (``userId``, ``event``, ``properties``, ...),
    without ``writeKey`` (pass ``write_key``) and without a ``type`` other than
    ``call`` (the route sets it). Raises ``ValueError`` for an unknown dialect
    or call, a bad prefix, or an event the dialect cannot express.
    """
    if dialect not in DEFAULT_DIALECTS:
        raise ValueError(f"dialect must be one of {', '.join(DEFAULT_DIALECTS)}, got {dialect!r}")
    calls = CALLS[dialect]
    if call not in calls:
        raise ValueError(f"call for {dialect} must be one of {', '.join(calls)}, got {call!r}")
    if not isinstance(write_key, str) or not write_key.strip():
        raise ValueError("write_key must be a non-empty string")
    _check_prefix(prefix)
    if not isinstance(event, Mapping):
        raise ValueError(f"event must be a mapping (a JSON object), got {type(event).__name__}")
    if event.get("writeKey", write_key) != write_key:
        raise ValueError("event has a writeKey different from write_key: pass it once")
    if event.get("type", call) != call:
        raise ValueError(f"event has type {event.get('type')!r}, but the route sets {call!r}")
    fields = {key: value for key, value in event.items() if key not in ("writeKey", "type")}
    url = f"{base_url.rstrip('/')}{prefix}{_ROUTE_ROOTS[dialect]}{call}?"
    try:
        if dialect == "segment":
            text = json.dumps(
                {"writeKey": write_key, **fields},
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
            )
            data = base64.urlsafe_b64encode(text.encode("utf-8")).rstrip(b"=")
            return url + "data=" + data.decode("ascii")
        params: list[tuple[str, str]] = [("writeKey", write_key)]
        if fields:
            _flatten(fields, "", params, top=True)
        encoded = []
        for key, value in params:
            if key == "anonymousId" and value[:1] == value[-1:] == '"':
                # The decoder strips one pair of quotes (as rudder-server does for
                # AMP's JSON-quoted cookie): add one so the value survives.
                value = f'"{value}"'
            encoded.append(f"{quote(key, safe='')}={quote(value, safe='')}")
        return url + "&".join(encoded)
    except UnicodeEncodeError as exc:
        raise ValueError(f"the event holds text that is not valid Unicode: {exc}") from None
    except TypeError as exc:  # json.dumps of a value that is not JSON
        raise ValueError(f"the event is not JSON-serialisable: {exc}") from None


def pixel_img_tag(url: str) -> str:
    """An invisible 1x1 ``<img>`` tag that loads ``url`` (HTML-escaped)."""
    src = html.escape(url, quote=True)
    return f'<img src="{src}" width="1" height="1" alt="" style="display:none">'
