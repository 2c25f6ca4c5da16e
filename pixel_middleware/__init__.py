"""Segment- and RudderStack-style tracking pixels for any Python web app.

``pixel_middleware.core`` is stdlib-only, and so are the WSGI and ASGI
middlewares, the recorder and the SQLite, JSONL and memory stores; werkzeug is
needed only by the standalone collector (and granian or waitress by
``pixel-middleware serve``). ``PixelMiddleware`` (WSGI) and ``PixelASGIMiddleware`` are imported on
first use, so that importing the package for the core starts no recorder and
loads no store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixel_middleware.core import (
    GIF,
    Limits,
    PixelConfig,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    decode_pixel,
    match_route,
)

if TYPE_CHECKING:
    from pixel_middleware.asgi import PixelASGIMiddleware
    from pixel_middleware.middleware import PixelMiddleware

__all__ = [
    "GIF",
    "Limits",
    "PixelASGIMiddleware",
    "PixelConfig",
    "PixelMiddleware",
    "PixelOutcome",
    "PixelRecord",
    "PixelRequest",
    "decode_pixel",
    "match_route",
]


def __getattr__(name: str) -> Any:
    if name == "PixelMiddleware":
        from pixel_middleware.middleware import PixelMiddleware

        return PixelMiddleware
    if name == "PixelASGIMiddleware":
        from pixel_middleware.asgi import PixelASGIMiddleware

        return PixelASGIMiddleware
    raise AttributeError(f"module 'pixel_middleware' has no attribute {name!r}")
