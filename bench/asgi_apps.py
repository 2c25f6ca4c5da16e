"""The ASGI apps the ``asgi`` benchmark compares, importable by uvicorn as factories.

- :func:`noop_gif_app`: answers every request with the GIF and does nothing else;
  the fastest any pixel endpoint could be on the same server (the limit), with
  the middleware's own headers (:data:`bench.apps.GIF_HEADERS`).
- :func:`middleware_app`: :class:`PixelASGIMiddleware` in front of that no-op app,
  store from ``BENCH_STORE`` (durable, as it ships).

``uvicorn --factory bench.asgi_apps:middleware_app``.
"""

from __future__ import annotations

import os
from typing import Any

from pixel_middleware.core import GIF, PixelConfig, Route, default_answer

# The middleware's answer to an accepted Segment pixel, as ASGI sends it.
GIF_HEADERS = [
    (name.encode("latin-1"), value.encode("latin-1"))
    for name, value in default_answer(Route("segment", "track"), "GET", PixelConfig()).headers
]


async def noop_gif(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start or stop
    await send({"type": "http.response.start", "status": 200, "headers": GIF_HEADERS})
    await send({"type": "http.response.body", "body": GIF})


def noop_gif_app() -> Any:
    return noop_gif


def middleware_app() -> Any:
    from pixel_middleware.asgi import PixelASGIMiddleware

    return PixelASGIMiddleware(noop_gif, store=os.environ["BENCH_STORE"], durable=True)
