"""The WSGI apps the benchmarks compare, importable by gunicorn.

- :func:`noop_gif_app`: answers every request with the GIF and does nothing else;
  the fastest any pixel endpoint could be on the same server (the limit). Its
  answer is the middleware's to an accepted Segment pixel, header for header, so
  that both put the same bytes on the wire.
- :func:`site_app`: a tiny Flask site (one page, a small HTML answer): the
  realistic "bare app" that pass-through overhead is measured against.
- :func:`middleware_app`: that site wrapped in :class:`PixelMiddleware`, store from
  ``BENCH_STORE`` (durable, as it ships).
- :func:`handwritten_app`: what a user would write instead: a Flask view that
  base64-decodes and ``json.loads`` the Segment ``data`` and inserts it into
  SQLite with a commit per request, with the same journal mode and synchronous
  setting as the project's SQLite store (``BENCH_SQLITE_PATH``,
  ``BENCH_SQLITE_SYNCHRONOUS``). Each thread keeps its own connection: kinder to
  the baseline than a connection per request.

Gunicorn loads them as factories: ``gunicorn 'bench.apps:middleware_app()'``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
import threading
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request

from pixel_middleware.core import GIF, PixelConfig, Route, default_answer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

# The middleware's own answer to an accepted Segment pixel (the no-cache headers,
# Content-Type, Content-Length), from the definition it uses.
GIF_HEADERS = default_answer(Route("segment", "track"), "GET", PixelConfig()).headers
NO_CACHE = dict(GIF_HEADERS)["Cache-Control"]

PAGE = (
    "<!doctype html><html><head><title>Shop</title></head>"
    "<body><h1>Winter boots</h1><p>Warm, dry, in stock.</p></body></html>"
)


def noop_gif(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
    start_response("200 OK", GIF_HEADERS)
    return [GIF]


def noop_gif_app() -> WSGIApplication:
    return noop_gif


def site_app() -> Flask:
    app = Flask("bench_site")

    @app.get("/")
    def home() -> str:
        return PAGE

    @app.get("/catalogue/<item>")
    def item(item: str) -> dict[str, Any]:
        return {"item": item, "price": 42.5, "currency": "EUR"}

    return app


def middleware_app(store: str | None = None) -> Flask:
    from pixel_middleware.middleware import PixelMiddleware

    app = site_app()
    app.wsgi_app = PixelMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, store=store or os.environ["BENCH_STORE"], durable=True
    )
    return app


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pixels ("
    " id INTEGER PRIMARY KEY, call TEXT NOT NULL, message_id TEXT, event TEXT NOT NULL)"
)


def _connect(path: str, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def handwritten_app(path: str | None = None, synchronous: str | None = None) -> Flask:
    path = path or os.environ["BENCH_SQLITE_PATH"]
    synchronous = synchronous or os.environ.get("BENCH_SQLITE_SYNCHRONOUS", "NORMAL")
    with _connect(path, synchronous) as conn:
        conn.execute(SCHEMA)
    local = threading.local()
    app = Flask("bench_handwritten")

    @app.get("/v1/pixel/<call>")
    def pixel(call: str) -> Response:
        try:
            data = request.args["data"]
            event = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        except (KeyError, ValueError, binascii.Error):
            return Response("bad pixel", status=400)
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = _connect(path, synchronous)
        conn.execute(
            "INSERT INTO pixels (call, message_id, event) VALUES (?, ?, ?)",
            (call, event.get("messageId"), json.dumps(event)),
        )
        conn.commit()
        return Response(GIF, headers={"Cache-Control": NO_CACHE}, mimetype="image/gif")

    return app


def handwritten_message_ids(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT message_id FROM pixels")]
