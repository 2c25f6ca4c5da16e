"""A small Flask app with pixels, wrapped the way the README tells users to.

Its own routes must keep working exactly as without the middleware.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request

from pixel_middleware import PixelMiddleware


def create_app(**pixel_options: Any) -> Flask:
    app = Flask(__name__)

    @app.get("/")
    def index() -> str:
        return "Hello from Flask"

    @app.post("/orders")
    def create_order() -> tuple[Response, int]:
        return jsonify(received=request.get_json()), 201

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            yield from ("one,", "two,", "three")

        return Response(chunks(), mimetype="text/plain")

    # Wrap the WSGI callable, not the Flask object: `flask run` needs app to stay a Flask.
    app.wsgi_app = PixelMiddleware(app.wsgi_app, **pixel_options)  # type: ignore[method-assign]
    return app
