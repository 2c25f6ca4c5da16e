"""The standalone collector app: its page's files, its JSON feed (the API: test_api.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client, TestResponse

from pixel_middleware import GIF, PixelMiddleware, PixelRecord
from pixel_middleware.collector import create_app
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import StoreError, open_store
from pixel_middleware.stores.memory import MemoryStore


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


@pytest.fixture
def collector() -> Iterator[PixelMiddleware]:
    app = create_app(store="memory://")
    yield app
    app.close()


def get(app: Any, path: str, method: str = "GET", **kw: Any) -> TestResponse:
    return Client(LintMiddleware(app)).open(path, method=method, buffered=True, **kw)


def records(app: PixelMiddleware) -> list[PixelRecord]:
    return [record for _, record in app.store.read()]


def test_index_is_the_live_page_and_sends_no_pixel(collector: PixelMiddleware) -> None:
    page = get(collector, "/")
    assert page.status_code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    text = page.get_data(as_text=True)
    assert '<script src="static/collector.js" defer></script>' in text
    assert '<link rel="stylesheet" href="static/collector.css">' in text
    assert "<img" not in text, "opening the page must not fire a pixel"
    for path, content_type in (
        ("/static/collector.js", "text/javascript; charset=utf-8"),
        ("/static/collector.css", "text/css; charset=utf-8"),
    ):
        response = get(collector, path)
        assert (response.status_code, response.headers["Content-Type"]) == (200, content_type)
        assert response.get_data()
    assert records(collector) == []


def test_the_page_holds_no_inline_script_or_style(collector: PixelMiddleware) -> None:
    text = get(collector, "/").get_data(as_text=True)
    assert re.findall(r"<script[^>]*>", text) == ['<script src="static/collector.js" defer>']
    assert "<style" not in text
    assert " style=" not in text
    assert re.search(r" on[a-z]+=", text) is None


def test_pages_forbid_scripts(collector: PixelMiddleware) -> None:
    headers = get(collector, "/").headers
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "style-src 'self';" in policy
    assert "unsafe" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        pytest.param("/favicon.ico", "GET", 404, id="favicon"),
        pytest.param("/v1/pixel/nope", "GET", 404, id="unknown-call"),
        pytest.param("/index.html", "GET", 404, id="other-page"),
        pytest.param("/", "POST", 405, id="post-index"),
        pytest.param("/events.json", "DELETE", 405, id="delete-events"),
    ],
)
def test_other_paths_and_methods(
    path: str, method: str, status: int, collector: PixelMiddleware
) -> None:
    response = get(collector, path, method)
    assert response.status_code == status
    assert response.headers.get("Allow") == ("GET, HEAD" if status == 405 else None)


# LintMiddleware does not know that a HEAD answer keeps GET's Content-Length.
@pytest.mark.filterwarnings(
    "ignore:Content-Length and the number of bytes:werkzeug.middleware.lint.WSGIWarning"
)
def test_head_of_the_index_has_no_body(collector: PixelMiddleware) -> None:
    response = get(collector, "/", "HEAD")
    assert response.status_code == 200
    assert response.get_data() == b""


def test_events_json_filters_and_pages(collector: PixelMiddleware) -> None:
    for path, event in [
        ("/v1/pixel/track", {"writeKey": "k", "userId": "u", "event": "A"}),
        ("/v1/pixel/page", {"writeKey": "k", "userId": "u", "name": "P"}),
        ("/v1/pixel/track", {"writeKey": "k", "event": "no identity"}),
    ]:
        get(collector, path, query_string="data=" + b64(event))

    def feed(query: str = "") -> dict[str, Any]:
        response = get(collector, "/events.json", query_string=query)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        data: dict[str, Any] = response.get_json()
        return data

    every = feed()
    assert [r["call"] for r in every["records"]] == ["track", "page", "track"]
    assert [r["accepted"] for r in feed("accepted=false")["records"]] == [False]
    assert [r["call"] for r in feed("call=page")["records"]] == ["page"]
    assert [r["event"]["name"] for r in feed("limit=2")["records"][:1]] == ["P"]
    first = feed("limit=1&accepted=true")
    assert first["records"][0]["event"]["name"] == "P"
    last = every["last"]
    assert feed(f"after={last}") == {"records": [], "last": last, "spooled": 0}


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=many", "limit=100000", "accepted=maybe", "after=not-a-position"]
)
def test_events_json_bad_queries_are_400(query: str, collector: PixelMiddleware) -> None:
    response = get(collector, "/events.json", query_string=query)
    assert response.status_code == 400
    assert "error" in response.get_json()


class UnreadableStore:
    url = "unreadable://"

    def write(self, records: Any) -> None:
        pass

    def read(self, **kw: Any) -> list[tuple[str, PixelRecord]]:
        raise StoreError("cannot read")

    def close(self) -> None:
        pass


def test_an_unreadable_store_is_reported_not_raised() -> None:
    app = create_app(store=UnreadableStore())
    assert get(app, "/").status_code == 200
    assert get(app, "/events.json").status_code == 503
    answer = get(app, "/api/events")
    assert answer.status_code == 503
    assert answer.get_json() == {"error": "the store could not be read"}
    app.close()


class RecoveringStore:
    """A memory store whose writes fail until ``up`` is set."""

    url = "memory://recovering"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.up = threading.Event()

    def write(self, records: Any) -> None:
        if not self.up.is_set():
            raise StoreError("the store is down")
        self.inner.write(records)

    def read(self, **kw: Any) -> list[tuple[str, PixelRecord]]:
        return self.inner.read(**kw)

    def close(self) -> None:
        pass


def test_records_waiting_in_the_spool_are_shown_until_the_store_takes_them(
    tmp_path: Path,
) -> None:
    store = RecoveringStore()
    recorder = Recorder(store, spool_path=tmp_path / "spool", retry_interval=0.05)
    app = create_app(store=recorder)
    try:
        assert get(app, "/api/status").get_json()["spooled"] == 0
        for n in range(3):
            event = {"writeKey": "k", "userId": "u", "event": f"E{n}"}
            get(app, "/v1/pixel/track", query_string="data=" + b64(event))
        assert get(app, "/events.json").get_json()["spooled"] == 3
        assert get(app, "/api/status").get_json()["spooled"] == 3
        assert get(app, "/api/events").get_json()["spooled"] == 3

        store.up.set()
        deadline = time.monotonic() + 5
        while get(app, "/events.json").get_json()["spooled"]:
            assert time.monotonic() < deadline, "the spool did not drain"
            time.sleep(0.02)
        feed = get(app, "/events.json").get_json()
        assert [r["event"]["event"] for r in feed["records"]] == ["E0", "E1", "E2"]
        assert get(app, "/api/status").get_json()["spooled"] == 0
    finally:
        app.close()
        recorder.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_gunicorn_runs_the_factory_with_the_store_from_the_environment(tmp_path: Path) -> None:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    port = free_port()
    store_url = f"sqlite:///{tmp_path}/gunicorn.sqlite3"
    process = subprocess.Popen(
        [
            str(gunicorn),
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "1",
            "pixel_middleware.collector:create_app()",
        ],
        env={**os.environ, "PIXEL_STORE": store_url},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                page = requests.get(base + "/", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        assert page.status_code == 200
        status = requests.get(base + "/api/status", timeout=5).json()
        assert status["store"] == "sqlite"
        pixel = requests.get(base + status["testPixels"][0]["path"], timeout=5)
        assert pixel.content == GIF
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
        if process.stderr:
            process.stderr.close()
    store = open_store(store_url)
    [(_, record)] = store.read()
    store.close()
    assert record["accepted"] is True
