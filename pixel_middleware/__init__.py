"""Segment- and RudderStack-style tracking pixels for any Python web app.

``pixel_middleware.core`` is stdlib-only; the names that need werkzeug are
imported on first use, so the mitmproxy addon can load the core anywhere.
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
    from pixel_middleware.middleware import PixelMiddleware

__all__ = [
    "GIF",
    "Limits",
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
    raise AttributeError(f"module 'pixel_middleware' has no attribute {name!r}")
