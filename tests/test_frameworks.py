"""A real Flask app and a real Django project, wrapped as the README says, over HTTP.

Each is served by a real WSGI server (werkzeug's, on port 0, in a thread) and
called with ``requests``, so the middleware sees what a deployment would give it.
"""

from __future__ import annotations

import base64
import importlib
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from pixel_middleware import GIF, PixelMiddleware
from pixel_middleware.stores import open_store

APPS = Path(__file__).parent / "apps"


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(wsgi_app) -> base URL; the servers stop at the end of the test."""
    servers = []

    def start(app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def apps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


@pytest.mark.usefixtures("apps_on_path")
def test_flask_app_keeps_its_routes_and_answers_pixels(serve: Any, tmp_path: Path) -> None:
    flask_site = importlib.import_module("flask_site")
    store_url = f"sqlite:///{tmp_path}/flask.sqlite3"
    app = flask_site.create_app(store=store_url, write_keys={"flask-key"})
    assert isinstance(app.wsgi_app, PixelMiddleware)
    base = serve(app)

    home = requests.get(base + "/", timeout=5)
    assert (home.status_code, home.text) == (200, "Hello from Flask")
    order = requests.post(base + "/orders", json={"sku": "A1"}, timeout=5)
    assert (order.status_code, order.json()) == (201, {"received": {"sku": "A1"}})
    assert requests.get(base + "/stream", timeout=5).text == "one,two,three"
    assert requests.get(base + "/missing", timeout=5).status_code == 404

    event = {"writeKey": "flask-key", "userId": "u1", "event": "Email Opened"}
    pixel = requests.get(base + "/v1/pixel/track", params={"data": b64(event)}, timeout=5)
    assert (pixel.status_code, pixel.content) == (200, GIF)
    assert pixel.headers["Content-Type"] == "image/gif"
    assert pixel.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    stranger = {**event, "writeKey": "someone-else"}
    requests.get(base + "/v1/pixel/track", params={"data": b64(stranger)}, timeout=5)
    app.wsgi_app.close()

    store = open_store(store_url)
    kept = [record for _, record in store.read()]
    store.close()
    assert [(r["accepted"], r["writeKey"]) for r in kept] == [
        (True, "flask-key"),
        (False, "someone-else"),
    ]
    assert kept[0]["request"]["ip"] == "127.0.0.1"
    assert kept[0]["request"]["userAgent"].startswith("python-requests/")
    assert [p["rule"] for p in kept[1]["problems"]] == ["unknown_write_key"]


@pytest.mark.usefixtures("apps_on_path")
def test_django_project_through_its_wsgi_py(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = f"jsonl:///{tmp_path}/django.jsonl"
    monkeypatch.setenv("PIXEL_STORE", store_url)
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "django_site.settings")
    for name in [m for m in sys.modules if m.startswith("django_site")]:
        monkeypatch.delitem(sys.modules, name)
    wsgi = importlib.import_module("django_site.wsgi")
    application: PixelMiddleware = wsgi.application
    base = serve(application)

    home = requests.get(base + "/", timeout=5)
    assert (home.status_code, home.text) == (200, "Hello from Django")
    assert requests.get(base + "/echo", params={"q": "x y"}, timeout=5).json() == {"q": "x y"}
    assert requests.get(base + "/nope", timeout=5).status_code == 404

    query = {"writeKey": "django-site-key", "anonymousId": '"amp-123"', "name": "Home"}
    page = requests.get(base + "/pixel/v1/page", params=query, timeout=5)
    assert (page.status_code, page.text) == (200, "OK")
    bad = requests.get(base + "/pixel/v1/track", params={"writeKey": "django-site-key"}, timeout=5)
    assert bad.status_code == 400
    assert bad.headers["X-Pixel-Rejected"] == "missing_identity, missing_event"
    assert requests.post(base + "/pixel/v1/page", timeout=5).status_code == 405
    application.close()

    store = open_store(store_url)
    kept = [record for _, record in store.read()]
    store.close()
    assert [(r["call"], r["accepted"]) for r in kept] == [("page", True), ("track", False)]
    assert kept[0]["event"] is not None
    assert kept[0]["event"]["anonymousId"] == "amp-123"
