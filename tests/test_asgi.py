"""PixelASGIMiddleware: real uvicorn servers in front of FastAPI, Starlette and Django.

The sites in tests/apps run as ``uvicorn`` subprocesses on 127.0.0.1 (port 0,
the bound port read from uvicorn's start line) and are stopped with SIGTERM, as a
deployment stops them. The shared cases of tests/cases.py go byte for byte to a
uvicorn server in this process; the rest drives the middleware in-process with
httpx's ASGITransport, or speaks ASGI lifespan to it directly.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
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

import httpx
import pytest
import uvicorn
from websockets.sync.client import connect as websocket_connect

import pixel_middleware._adapter
from pixel_middleware import GIF, Limits, PixelASGIMiddleware, PixelMiddleware, PixelRecord
from pixel_middleware.asgi import DECODE_ON_LOOP_BYTES
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, open_store

APPS = Path(__file__).parent / "apps"
NO_CACHE = "no-cache, no-store, must-revalidate"
READY = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


def records(store: Store) -> list[PixelRecord]:
    return [record for _, record in store.read()]


def rules(record: PixelRecord) -> list[str]:
    return [problem["rule"] for problem in record["problems"]]


def read_store(url: str) -> list[PixelRecord]:
    store = open_store(url)
    try:
        return records(store)
    finally:
        store.close()


# --- real uvicorn subprocesses in front of the sites ----------------------------------


class Site:
    """``python -m uvicorn TARGET`` on 127.0.0.1:0 in ``workdir``, stopped by SIGTERM."""

    def __init__(self, target: str, workdir: Path, **env: str) -> None:
        self.log_path = workdir / "uvicorn.log"
        self.lifespan_log = workdir / "lifespan.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    target,
                    "--app-dir",
                    str(APPS),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "LIFESPAN_LOG": str(self.lifespan_log), **env},
            )
        deadline = time.monotonic() + 30
        while not (match := READY.search(self.log())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"uvicorn did not start:\n{self.log()}")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{match.group(1)}"
        self.client = httpx.Client(base_url=self.base, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lifespan(self) -> list[str]:
        return self.lifespan_log.read_text().split() if self.lifespan_log.exists() else []

    def stop(self) -> int:
        """SIGTERM, as a process manager stops a server; its exit status.

        uvicorn shuts down gracefully on SIGTERM, then raises the signal again
        once done, as the process's exit status: -SIGTERM is a clean stop.
        """
        if hasattr(self, "client"):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Any]:
    """site(target, **env) -> a running Site; every one is stopped at the end."""
    started: list[Site] = []

    def start(target: str, **env: str) -> Site:
        workdir = tmp_path / f"site{len(started)}"
        workdir.mkdir()
        started.append(Site(target, workdir, **env))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def websocket_echo(base: str, text: str) -> str:
    with websocket_connect(base.replace("http://", "ws://") + "/ws", open_timeout=10) as ws:
        ws.send(text)
        answer = ws.recv(timeout=10)
    assert isinstance(answer, str)
    return answer


@pytest.mark.parametrize(
    ("target", "key", "hello"),
    [
        pytest.param("fastapi_site:app", "fastapi-key", "Hello from FastAPI", id="fastapi"),
        pytest.param("starlette_site:app", "starlette-key", "Hello from Starlette", id="starlette"),
    ],
)
def test_site_keeps_its_routes_and_lifespan_and_answers_pixels(
    target: str, key: str, hello: str, site: Any, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path}/pixels.sqlite3"
    served: Site = site(target, PIXEL_STORE=store_url)
    http = served.client

    assert served.lifespan() == ["startup"]
    assert http.get("/started").json() == {"started": True}
    home = http.get("/")
    assert (home.status_code, home.text) == (200, hello)
    order = http.post("/orders", json={"sku": "A1", "note": "x" * 5000})
    assert (order.status_code, order.json()) == (
        201,
        {"received": {"sku": "A1", "note": "x" * 5000}},
    )
    with http.stream("GET", "/stream") as streamed:
        assert list(streamed.iter_text()) != []
        assert streamed.headers.get("transfer-encoding") == "chunked"
    assert http.get("/stream").text == "one,two,three"
    assert websocket_echo(served.base, "hi") == "echo: hi"
    assert http.get("/missing").status_code == 404

    event = {"writeKey": key, "userId": "u1", "event": "Email Opened"}
    pixel = http.get("/v1/pixel/track", params={"data": b64(event)}, headers={"Referer": "r"})
    assert (pixel.status_code, pixel.content) == (200, GIF)
    assert pixel.headers["Content-Type"] == "image/gif"
    assert pixel.headers["Cache-Control"] == NO_CACHE
    stranger = http.get("/v1/pixel/track", params={"data": b64({**event, "writeKey": "other"})})
    assert (stranger.status_code, stranger.headers["X-Pixel-Rejected"]) == (
        200,
        "unknown_write_key",
    )
    head = http.head("/pixel/v1/page", params={"writeKey": key, "anonymousId": "a1"})
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", "2")
    post = http.post("/v1/pixel/track", content=b"data=e30")
    assert (post.status_code, post.headers["Allow"]) == (405, "GET, HEAD")

    assert served.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in served.log()
    assert served.lifespan() == ["startup", "shutdown"]
    kept = read_store(store_url)
    assert [(r["accepted"], r["writeKey"]) for r in kept] == [(True, key), (False, "other")]
    assert kept[0]["request"]["ip"] == "127.0.0.1"
    assert kept[0]["request"]["referer"] == "r"
    assert kept[0]["request"]["userAgent"].startswith("python-httpx/")


def test_django_project_through_its_asgi_py(site: Any, tmp_path: Path) -> None:
    store_url = f"jsonl:///{tmp_path}/django.jsonl"
    served: Site = site(
        "django_site.asgi:application",
        PIXEL_STORE=store_url,
        DJANGO_SETTINGS_MODULE="django_site.settings",
    )
    http = served.client
    home = http.get("/")
    assert (home.status_code, home.text) == (200, "Hello from Django")
    assert http.get("/echo", params={"q": "x y"}).json() == {"q": "x y"}
    assert http.get("/nope").status_code == 404

    query = {"writeKey": "django-site-key", "anonymousId": '"amp-123"', "name": "Home"}
    page = http.get("/pixel/v1/page", params=query)
    assert (page.status_code, page.text) == (200, "OK")
    bad = http.get("/pixel/v1/track", params={"writeKey": "django-site-key"})
    assert bad.status_code == 400
    assert bad.headers["X-Pixel-Rejected"] == "missing_identity, missing_event"
    assert http.post("/pixel/v1/page").status_code == 405

    assert served.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in served.log()
    # Django refuses lifespan; the middleware answered it instead of uvicorn's guess.
    assert "lifespan' protocol appears unsupported" not in served.log()
    assert "Application shutdown complete" in served.log()
    kept = read_store(store_url)
    assert [(r["call"], r["accepted"]) for r in kept] == [("page", True), ("track", False)]
    assert kept[0]["event"] is not None
    assert kept[0]["event"]["anonymousId"] == "amp-123"


@pytest.mark.parametrize(
    ("target", "key", "env"),
    [
        pytest.param("fastapi_site:app", "fastapi-key", {}, id="fastapi"),
        pytest.param("starlette_site:app", "starlette-key", {}, id="starlette"),
        pytest.param(
            "django_site.asgi:application",
            "django-site-key",
            {"DJANGO_SETTINGS_MODULE": "django_site.settings"},
            id="django",
        ),
    ],
)
def test_sigterm_stores_every_answered_pixel(
    target: str, key: str, env: dict[str, str], site: Any, tmp_path: Path
) -> None:
    """Fire and forget (durable=False): what was answered is written at shutdown."""
    store_url = f"jsonl:///{tmp_path}/pixels.jsonl"
    served: Site = site(target, PIXEL_STORE=store_url, PIXEL_DURABLE="0", **env)
    answered = 0
    for n in range(40):
        event = {"writeKey": key, "userId": f"u{n}", "event": "Opened"}
        answer = served.client.get("/v1/pixel/track", params={"data": b64(event)})
        assert answer.status_code == 200
        answered += 1
    assert served.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in served.log()
    kept = read_store(store_url)
    assert sorted(r["event"]["userId"] for r in kept if r["event"]) == sorted(
        f"u{n}" for n in range(answered)
    )
    assert all(r["accepted"] for r in kept)


# --- the shared cases, byte for byte through a real uvicorn ----------------------------


class InProcessServer:
    """A uvicorn server for ``app`` in a thread of this process, on 127.0.0.1:0."""

    def __init__(self, app: Any, *, lifespan: str = "on", root_path: str = "") -> None:
        # proxy_headers=False: uvicorn would otherwise take the client address
        # from X-Forwarded-For sent from 127.0.0.1 (its default), before us.
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan=lifespan,
            proxy_headers=False,
            root_path=root_path,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            assert time.monotonic() < deadline, "uvicorn did not start in time"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


# h11 (uvicorn's HTTP/1.1 parser) refuses request lines past this size.
MAX_LINE = 16_000


def send_raw(
    port: int, method: str, target: bytes, headers: dict[str, str], body: bytes | None = None
) -> Any:
    sized = {} if body is None else {"Content-Length": str(len(body))}
    head = b"".join(
        f"{name}: {value}\r\n".encode("latin-1")
        for name, value in {
            "Host": "pixels.test",
            **headers,
            **sized,
            "Connection": "close",
        }.items()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            method.encode() + b" " + target + b" HTTP/1.1\r\n" + head + b"\r\n" + (body or b"")
        )
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    header_block, _, body = rest.partition(b"\r\n\r\n")
    parsed = {}
    for line in header_block.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(": ")
        parsed[name.lower()] = value
    if parsed.get("transfer-encoding") == "chunked":
        raise AssertionError("a pixel answer has a Content-Length")
    return int(status_line.split(b" ")[1]), parsed, body


def call_in_process(
    app: PixelASGIMiddleware, method: str, target: bytes, headers: dict[str, str]
) -> Any:
    """The scope a server builds for ``target``, raw bytes and all (h11 refuses those)."""
    from urllib.parse import unquote_to_bytes

    raw_path, _, query = target.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote_to_bytes(raw_path).decode("utf-8", "replace"),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    parsed = {k.decode().lower(): v.decode("latin-1") for k, v in start["headers"]}
    return start["status"], parsed, body["body"]


async def not_found_app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] in ("http", "lifespan")
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"not found"})


def test_every_shared_case_through_a_real_uvicorn() -> None:
    """Each request of tests/cases.py gives the case's answer and record, as through
    the WSGI middleware: the raw target's bytes decode the same way."""
    from cases import CASES

    groups: dict[str, list[Any]] = {}
    for case in CASES:
        groups.setdefault(repr(sorted(case.config.items())), []).append(case)
    checked = over_socket = 0
    for cases in groups.values():
        middleware = PixelASGIMiddleware(not_found_app, store="memory://", **cases[0].config)
        server = InProcessServer(middleware)
        try:
            for case in cases:
                before = len(records(middleware.store))
                headers = dict(case.headers)
                if case.target.isascii() and len(case.target) < MAX_LINE:
                    status, answer, body = send_raw(server.port, case.method, case.target, headers)
                    over_socket += 1
                else:
                    status, answer, body = call_in_process(
                        middleware, case.method, case.target, headers
                    )
                assert status == case.expect_status, case.id
                rejected = answer.get("x-pixel-rejected")
                assert (set(rejected.split(", ")) if rejected else set()) == case.expect_rules
                if case.expect_accepted is None:
                    assert len(records(middleware.store)) == before, case.id
                    continue
                record = records(middleware.store)[-1]
                assert record["accepted"] is case.expect_accepted, case.id
                assert {p["rule"] for p in record["problems"]} == case.expect_rules, case.id
                assert {n["rule"] for n in record["notes"]} == case.expect_notes, case.id
                sent = {name.lower(): value for name, value in case.headers.items()}
                assert record["request"]["userAgent"] == (
                    sent["user-agent"][:1024] if "user-agent" in sent else None
                ), case.id
                assert record["request"].get("referer") == (
                    sent["referer"][:1024] if "referer" in sent else None
                ), case.id
                if case.check is not None:
                    case.check(record["event"])
                if answer["content-type"] == "image/gif":
                    assert body == GIF
                checked += 1
        finally:
            server.stop()
    assert checked == sum(case.expect_accepted is not None for case in CASES)
    assert over_socket > len(CASES) // 2, "most cases went over a real socket"


# What differs between two records of one request: ids, and times the middleware makes.
VOLATILE = {"id", "receivedAt", "messageId", "timestamp", "sentAt", "originalTimestamp"}


def stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def test_records_match_the_wsgi_middleware_field_for_field() -> None:
    """The same request through both adapters: the same record, but for ids and times."""
    from cases import CASES
    from test_middleware import get, hello_app

    compared = 0
    for case in CASES:
        if case.expect_accepted is None or not case.target.isascii() or case.config:
            continue
        wsgi = PixelMiddleware(hello_app, store="memory://")
        asgi = PixelASGIMiddleware(not_found_app, store="memory://")
        path, _, query = case.target.partition(b"?")
        get(
            wsgi,
            path.decode(),
            query.decode("ascii"),
            case.method,
            headers=dict(case.headers),
            environ_overrides={"REMOTE_ADDR": "127.0.0.1"},
        )
        call_in_process(asgi, case.method, case.target, dict(case.headers))
        [via_wsgi] = records(wsgi.store)
        [via_asgi] = records(asgi.store)
        assert stable(via_asgi) == stable(via_wsgi), case.id
        wsgi.close()
        asgi.close()
        compared += 1
    assert compared > 20


def test_every_body_case_gives_the_wsgi_middlewares_answer_and_records() -> None:
    """Each HTTP API body of tests/cases.py, byte for byte over real sockets to the
    ASGI middleware under uvicorn and to the WSGI one: the same status, answer and
    records (one per event of a batch), but for ids and times."""
    from cases import BODY_CASES
    from collector_server import not_found, serving

    groups: dict[str, list[Any]] = {}
    for case in BODY_CASES:
        groups.setdefault(repr(sorted(case.config.items())), []).append(case)
    compared = 0
    for cases in groups.values():
        config = dict(cases[0].config)
        wsgi = PixelMiddleware(not_found, store="memory://", **config)
        asgi = PixelASGIMiddleware(not_found_app, store="memory://", **config)
        server = InProcessServer(asgi)
        try:
            with serving(wsgi) as url:
                wsgi_port = int(url.rsplit(":", 1)[1])
                for case in cases:
                    sent = ("POST", case.target, dict(case.headers), case.body)
                    via_wsgi = send_raw(wsgi_port, *sent)
                    status, headers, body = send_raw(server.port, *sent)
                    assert status == via_wsgi[0] == case.expect_status, case.id
                    assert body == via_wsgi[2], case.id
                    assert headers["content-type"] == via_wsgi[1]["content-type"], case.id
        finally:
            server.stop()
        by_wsgi, by_asgi = records(wsgi.store), records(asgi.store)
        wsgi.close()
        asgi.close()
        assert [r["call"] for r in by_asgi] == [call for c in cases for call in c.expect_calls]
        assert [stable(r) for r in by_asgi] == [stable(r) for r in by_wsgi]
        compared += len(by_asgi)
    assert compared == sum(len(case.expect_calls) for case in BODY_CASES)


# --- in-process: pass-through, answers, failures ---------------------------------------


class Recording:
    """An ASGI app that notes what it was called with and echoes the request body."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append((scope, receive, send))
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-app", b"yes"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
            }
        )
        await send({"type": "http.response.body", "body": b"echo:" + body})


def asgi_get(app: Any, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("192.0.2.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://pixels.test") as c:
            return await c.request(kw.pop("method", "GET"), path, **kw)

    return asyncio.run(go())


@pytest.fixture
def store() -> Iterator[Store]:
    opened = open_store("memory://")
    yield opened
    opened.close()


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("http", "/"),
        ("http", "/v1/pixel/purchase"),
        ("http", "/v1/pixels/track"),
        ("websocket", "/v1/pixel/track"),
        ("websocket", "/ws"),
    ],
)
def test_other_scopes_reach_the_app_untouched(kind: str, path: str, store: Store) -> None:
    app = Recording()
    middleware = PixelASGIMiddleware(app, store=store)
    scope = {"type": kind, "path": path, "raw_path": path.encode(), "query_string": b""}
    scope["method"] = "GET"

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    asyncio.run(middleware(scope, receive, send))
    [(got_scope, got_receive, got_send)] = app.calls
    assert (got_scope, got_receive, got_send) == (scope, receive, send)
    assert got_scope is scope
    assert got_receive is receive
    assert got_send is send
    assert records(store) == []


def test_a_post_body_stream_reaches_the_app(store: Store) -> None:
    middleware = PixelASGIMiddleware(Recording(), store=store)

    async def chunks() -> Any:
        for part in (b"one,", b"two,", b"three"):
            yield part

    answer = asgi_get(middleware, "/orders", method="POST", content=chunks())
    assert (answer.status_code, answer.content) == (200, b"echo:one,two,three")
    assert answer.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert records(store) == []


def test_pixels_answer_as_the_core_says(store: Store) -> None:
    seen: list[PixelRecord] = []
    middleware = PixelASGIMiddleware(Recording(), store=store, on_record=seen.append)
    event = {"writeKey": "k1", "userId": "u1", "event": "Email Opened"}
    ok = asgi_get(
        middleware,
        "/v1/pixel/track",
        params={"data": b64(event)},
        headers={"User-Agent": "Mail/1", "X-Forwarded-For": "203.0.113.9"},
    )
    assert (ok.status_code, ok.content, ok.headers["Cache-Control"]) == (200, GIF, NO_CACHE)
    seed = asgi_get(middleware, "/pixel/v1/page", params={"writeKey": "k1"})
    assert (seed.status_code, seed.headers["X-Pixel-Rejected"]) == (400, "missing_identity")
    head = asgi_get(middleware, "/v1/pixel/track", method="HEAD", params={"data": b64(event)})
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", "43")
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        other = asgi_get(middleware, "/v1/pixel/track", method=method)
        assert (other.status_code, other.headers["Allow"]) == (405, "GET, HEAD")
    kept = records(store)
    assert [(r["dialect"], r["accepted"]) for r in kept] == [
        ("segment", True),
        ("rudderstack", False),
    ]
    assert seen == kept
    assert kept[0]["request"]["ip"] == "192.0.2.1", "X-Forwarded-For is not trusted by default"
    assert kept[0]["request"]["userAgent"] == "Mail/1"


def test_headers_in_any_case_and_as_bytearrays_are_read(store: Store) -> None:
    """ASGI servers send lower-case bytes; others are lowered (and copied) first."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/pixel/track",
        "query_string": ("data=" + b64({"writeKey": "k1", "event": "E"})).encode(),
        "headers": [
            (b"User-Agent", b"Mail/1"),
            (bytearray(b"referer"), bytearray(b"https://shop.example/")),
            (b"x-forwarded-for", b"198.51.100.7"),
            (b"X-Forwarded-For", b"203.0.113.9"),
            (b"accept", b"image/gif"),
        ],
        "client": ("127.0.0.1", 50000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    middleware = PixelASGIMiddleware(Recording(), store=store, trusted_proxies=1)
    asyncio.run(middleware(scope, receive, send))
    [record] = records(store)
    assert record["request"]["userAgent"] == "Mail/1"
    assert record["request"]["referer"] == "https://shop.example/"
    # Both X-Forwarded-For headers, joined: the last one the trusted proxy's.
    assert record["request"]["ip"] == "203.0.113.9"


@pytest.mark.parametrize(
    ("trusted", "forwarded", "ip"),
    [
        pytest.param(0, ["203.0.113.9"], "192.0.2.1", id="untrusted"),
        pytest.param(1, ["203.0.113.9"], "203.0.113.9", id="one-proxy"),
        pytest.param(1, ["6.6.6.6", "203.0.113.9"], "203.0.113.9", id="two-headers-joined"),
        pytest.param(2, ["6.6.6.6", "203.0.113.9"], "6.6.6.6", id="two-proxies"),
        pytest.param(3, ["6.6.6.6", "203.0.113.9"], "192.0.2.1", id="one-over"),
    ],
)
def test_repeated_forwarded_headers_count_as_one_list(
    trusted: int, forwarded: list[str], ip: str, store: Store
) -> None:
    middleware = PixelASGIMiddleware(Recording(), store=store, trusted_proxies=trusted)
    event = {"writeKey": "k1", "userId": "u1", "event": "E"}
    headers = [("X-Forwarded-For", value) for value in forwarded]
    asgi_get(middleware, "/v1/pixel/track", params={"data": b64(event)}, headers=headers)
    [record] = records(store)
    assert record["request"]["ip"] == ip


def test_a_pixel_not_kept_gets_503_with_retry_after(store: Store) -> None:
    recorder = Recorder(store)
    middleware = PixelASGIMiddleware(Recording(), store=recorder)
    recorder.close()
    answer = asgi_get(middleware, "/v1/pixel/track", params={"data": "e30"})
    assert (answer.status_code, answer.content) == (503, GIF)
    assert answer.headers["Retry-After"] == "5"


def test_a_batch_not_kept_gets_503_and_no_record_is_handed_on(store: Store) -> None:
    # on_record hears only of kept records: the client sends these again (503).
    seen: list[PixelRecord] = []
    recorder = Recorder(store)
    middleware = PixelASGIMiddleware(Recording(), store=recorder, on_record=seen.append)
    recorder.close()
    batch = [{"type": "track", "userId": "u", "event": f"E{i}"} for i in range(3)]
    answer = asgi_get(
        middleware, "/v1/batch", method="POST", json={"writeKey": "k", "batch": batch}
    )
    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "5")
    assert seen == []
    assert records(store) == []


class RefusingE1(Recorder):
    """Keeps every record but the one of event "E1", as a store failing for a moment."""

    def record(self, record: PixelRecord) -> bool:
        return not _is_e1(record) and super().record(record)

    def offer(self, record: PixelRecord) -> bool:
        # Not durable: E0 and E2 are queued on the loop, E1 goes to record() in a thread.
        return not _is_e1(record) and super().offer(record)


def _is_e1(record: PixelRecord) -> bool:
    return record["event"] is not None and record["event"].get("event") == "E1"


@pytest.mark.parametrize("durable", [True, False])
def test_on_record_hears_of_the_kept_records_of_a_batch_and_only_those(
    durable: bool, store: Store
) -> None:
    seen: list[PixelRecord] = []
    recorder = RefusingE1(store, durable=durable)
    middleware = PixelASGIMiddleware(Recording(), store=recorder, on_record=seen.append)
    batch = [{"type": "track", "userId": "u", "event": f"E{i}"} for i in range(3)]
    try:
        answer = asgi_get(
            middleware, "/v1/batch", method="POST", json={"writeKey": "k", "batch": batch}
        )
        recorder.flush(5)
        assert (answer.status_code, answer.headers["Retry-After"]) == (503, "5")
        assert [r["event"]["event"] for r in seen] == ["E0", "E2"]
        assert seen == records(store)
    finally:
        recorder.close()


def gzip_batch(events: int) -> bytes:
    """A gzip batch that inflates to about 450 KB (near Limits.max_decompressed_bytes)."""
    batch = [
        {"type": "track", "userId": f"u{i}", "event": "E", "properties": {"pad": "x" * 400}}
        for i in range(events)
    ]
    return gzip.compress(json.dumps({"writeKey": "k", "batch": batch}).encode())


def test_a_large_gzip_body_decodes_while_the_loop_answers_other_pixels(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The big body's decode waits until the loop has answered a pixel sent after
    it started: on the loop itself it would wait in vain (and hold every request)."""
    real_decode = pixel_middleware._adapter.decode_pixel
    decode_started = threading.Event()
    pixel_answered = threading.Event()
    waited_in_vain: list[bool] = []

    def decode_waiting_for_the_pixel(request: Any, **kw: Any) -> Any:
        if request.body:
            decode_started.set()
            waited_in_vain.append(not pixel_answered.wait(5))
        return real_decode(request, **kw)

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", decode_waiting_for_the_pixel)
    middleware = PixelASGIMiddleware(Recording(), store=store)
    body = gzip_batch(1000)
    assert len(body) < DECODE_ON_LOOP_BYTES, "small on the wire, large once inflated"

    async def go() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=middleware, client=("192.0.2.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://pixels.test") as c:
            big = asyncio.create_task(
                c.post("/v1/batch", content=body, headers={"Content-Encoding": "gzip"})
            )
            await asyncio.to_thread(decode_started.wait, 5)
            pixel = await c.get("/v1/pixel/track", params={"data": b64({"event": "P"})})
            pixel_answered.set()
            return await big, pixel

    try:
        big, pixel = asyncio.run(go())
    finally:
        middleware.close()
    assert waited_in_vain == [False]
    assert (big.status_code, pixel.status_code, pixel.content) == (200, 200, GIF)
    assert len(records(store)) == 1001


@pytest.mark.parametrize(
    ("size", "encoding", "in_a_thread"),
    [
        pytest.param(DECODE_ON_LOOP_BYTES, None, False, id="at-the-limit"),
        pytest.param(DECODE_ON_LOOP_BYTES + 1, None, True, id="one-over"),
        pytest.param(DECODE_ON_LOOP_BYTES + 1, " Identity", True, id="one-over-identity"),
        pytest.param(DECODE_ON_LOOP_BYTES, " Identity", False, id="identity-at-the-limit"),
        pytest.param(DECODE_ON_LOOP_BYTES, "gzip", True, id="gzip"),
        pytest.param(DECODE_ON_LOOP_BYTES, "br", True, id="unknown-encoding"),
    ],
)
def test_bodies_above_the_limit_or_compressed_decode_in_a_thread(
    size: int, encoding: str | None, in_a_thread: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_decode = pixel_middleware._adapter.decode_pixel
    decoded_on: list[bool] = []

    def noting_the_thread(request: Any, **kw: Any) -> Any:
        decoded_on.append(threading.current_thread() is not threading.main_thread())
        return real_decode(request, **kw)

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", noting_the_thread)
    head = b'{"writeKey":"k","userId":"u","event":"E","pad":"'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    headers = {} if encoding is None else {"Content-Encoding": encoding}
    middleware = PixelASGIMiddleware(Recording(), store="memory://")
    try:
        asgi_get(middleware, "/v1/track", method="POST", content=body, headers=headers)
        # A GET pixel has no body: decoded on the loop, no hand-over.
        asgi_get(middleware, "/v1/pixel/track", params={"data": b64({"event": "P"})})
    finally:
        middleware.close()
    assert decoded_on == [in_a_thread, False]


def test_a_body_is_read_to_one_byte_over_the_limit_and_no_further(store: Store) -> None:
    """max_body_bytes is a body's size: at it accepted, one over too_large; a body
    that never ends is read only to max_body_bytes + 1 bytes."""
    limit = 1000
    middleware = PixelASGIMiddleware(Recording(), store=store, limits=Limits(max_body_bytes=limit))

    def track_of(size: int) -> bytes:
        head = b'{"writeKey":"k","userId":"u","event":"E","pad":"'
        body = head + b"x" * (size - len(head) - 2) + b'"}'
        assert len(body) == size
        return body

    at_limit = asgi_get(middleware, "/v1/track", method="POST", content=track_of(limit))
    over = asgi_get(middleware, "/v1/track", method="POST", content=track_of(limit + 1))
    assert (at_limit.status_code, over.status_code) == (200, 400)
    assert [(r["accepted"], rules(r)) for r in records(store)] == [
        (True, []),
        (False, ["too_large"]),
    ]

    taken = 0
    sent: list[Any] = []

    async def endless() -> dict[str, Any]:
        nonlocal taken
        taken += 1
        await asyncio.sleep(0)  # as a server's receive does: the loop may cancel it
        return {"type": "http.request", "body": b"y" * 100, "more_body": True}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/track", "query_string": b""}
    asyncio.run(asyncio.wait_for(middleware(scope, endless, send), 10))
    assert taken == 11  # 1100 bytes: the first read past limit + 1 = 1001
    assert sent[0]["status"] == 400
    assert rules(records(store)[-1]) == ["too_large"]


def test_a_decoder_bug_gets_the_default_answer_and_a_record(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("core bug")

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    middleware = PixelASGIMiddleware(Recording(), store=store)
    answer = asgi_get(middleware, "/pixel/v1/page", params={"anything": "1"})
    assert (answer.status_code, answer.content) == (200, b"OK")
    [record] = records(store)
    assert rules(record) == ["internal_error"]
    assert record["request"]["query"] == "anything=1"
    assert [r.name for r in caplog.records] == ["pixel_middleware.asgi"]


def test_a_route_matcher_bug_passes_the_request_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("matcher bug")

    monkeypatch.setattr("pixel_middleware._adapter.match_route", broken)
    answer = asgi_get(PixelASGIMiddleware(Recording(), store=store), "/v1/pixel/track")
    assert answer.content == b"echo:"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"dialects": "segment"}, ValueError, "not a string", id="dialects-str"),
        pytest.param({"trusted_proxies": -1}, ValueError, "integer >= 0", id="proxies-negative"),
        pytest.param({"prefix": "/collect/"}, ValueError, "not end with '/'", id="prefix-slash"),
        pytest.param({"store": "mysql://x"}, ValueError, "unknown store URL scheme", id="scheme"),
        pytest.param({"store": 42}, TypeError, "store must be a store URL", id="store-type"),
        pytest.param({"on_record": "print"}, TypeError, "on_record must be a callable", id="cb"),
    ],
)
def test_bad_configuration_fails_in_the_constructor(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    options.setdefault("store", "memory://")
    with pytest.raises(error, match=match):
        PixelASGIMiddleware(Recording(), **options)
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        PixelASGIMiddleware("app", store="memory://")  # type: ignore[arg-type]


def test_custom_routes_as_the_wsgi_middleware_takes_them(store: Store) -> None:
    middleware = PixelASGIMiddleware(
        Recording(),
        store=store,
        routes={
            "/t.gif": "segment:track",
            "px.example.com/e": "rudderstack:page",
            "/collect/": "segment",
        },
    )
    event = {"writeKey": "k", "userId": "u", "event": "Opened"}
    pixel = asgi_get(middleware, "/t.gif", params={"data": b64(event)})
    assert (pixel.status_code, pixel.content) == (200, GIF)
    posted = asgi_get(middleware, "/t.gif", method="POST", json=event)
    assert (posted.status_code, posted.json()) == (200, {"success": True})
    identify = asgi_get(middleware, "/collect/identify", params={"data": b64(event)})
    assert identify.content == GIF
    # A host and path: only for that host (any port); for another, the app's.
    query = {"writeKey": "k", "anonymousId": "a"}
    other = asgi_get(middleware, "/e", params=query)
    assert (other.status_code, other.content) == (200, b"echo:")
    ours = asgi_get(middleware, "/e", params=query, headers={"Host": "px.example.com:8080"})
    assert (ours.status_code, ours.content) == (200, b"OK")
    assert [(r["dialect"], r["call"], r["accepted"]) for r in records(store)] == [
        ("segment", "track", True),
        ("segment", "track", True),
        ("segment", "identify", True),
        ("rudderstack", "page", True),
    ]


def test_debug_twins_answer_the_verdict_and_record_nothing(store: Store) -> None:
    off = PixelASGIMiddleware(Recording(), store=store)
    assert asgi_get(off, "/debug/v1/pixel/track", params={"data": "e30"}).content == b"echo:"
    middleware = PixelASGIMiddleware(Recording(), store=store, debug_routes=True, write_keys={"wk"})
    query = {"writeKey": "wk", "anonymousId": "a-1", "event": "Opened", "properties.plan": "pro"}
    answer = asgi_get(middleware, "/debug/pixel/v1/track", params=query)
    assert (answer.status_code, answer.headers["Content-Type"]) == (200, "application/json")
    verdict = answer.json()
    assert verdict["recorded"] is False
    assert (verdict["accepted"], verdict["status"], verdict["dialect"]) == (
        True,
        200,
        "rudderstack",
    )
    assert verdict["event"]["properties"] == {"plan": "pro"}
    bad = asgi_get(middleware, "/debug/pixel/v1/track", params={"writeKey": "nope"}).json()
    assert (bad["accepted"], bad["status"]) == (False, 400)
    assert "unknown_write_key" in [p["rule"] for p in bad["problems"]]
    head = asgi_get(middleware, "/debug/pixel/v1/track", method="HEAD", params=query)
    assert (head.status_code, head.content) == (200, b"")
    post = asgi_get(middleware, "/debug/pixel/v1/track", method="POST", params=query)
    assert (post.status_code, post.headers["Allow"]) == (405, "GET, HEAD")
    # The HTTP API's twin reads the body, as its route does.
    batch = {"writeKey": "wk", "batch": [{"type": "identify", "userId": "u"}]}
    api = asgi_get(middleware, "/debug/v1/batch", method="POST", json=batch).json()
    assert (api["accepted"], api["call"], api["event"]["userId"]) == (True, "identify", "u")
    # Not a pixel route below /debug: the app's, body and all.
    other = asgi_get(middleware, "/debug/other", method="POST", content=b"mine")
    assert other.content == b"echo:mine"
    assert records(store) == []


def test_a_non_pixel_requests_body_reaches_the_app_whole(store: Store) -> None:
    """Near the body routes but not one of them (the HTTP API's paths by PUT, a
    host-bound route for another host, ...): the app reads every byte, over a
    real server, though the body is larger than a pixel may read."""
    middleware = PixelASGIMiddleware(
        Recording(),
        store=store,
        limits=Limits(max_body_bytes=1000),
        routes={"px.example.com/t": "segment:track"},
    )
    body = bytes(range(256)) * 40  # 10240 bytes, more than one message
    server = InProcessServer(middleware)
    try:
        for method, path in [
            ("PUT", "/v1/batch"),
            ("POST", "/v1/tracks"),
            ("POST", "/v1/pixel/batch"),
            ("POST", "/api/v1/track"),
            ("POST", "/t"),
        ]:
            answer = httpx.request(method, server.base + path, content=body)
            assert (answer.status_code, answer.content) == (200, b"echo:" + body), path
        ours = httpx.post(server.base + "/t", content=b"{}", headers={"Host": "px.example.com"})
        assert (ours.status_code, ours.json()) == (200, {"success": True})
    finally:
        server.stop()
    [record] = records(store)
    assert (record["call"], record["request"]["path"]) == ("track", "/t")


def test_a_body_route_the_core_passes_on_gets_its_body_whole(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the core hands a request back (no route after all), the app gets the
    body the middleware already read, then the rest."""
    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", lambda *a, **kw: None)
    app = Recording()
    middleware = PixelASGIMiddleware(app, store=store, limits=Limits(max_body_bytes=10))
    parts = [b'{"type":', b'"track",', b'"userId":"u"}']
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/track", "query_string": b""}
    asyncio.run(asyncio.wait_for(middleware(scope, receive, send), 10))
    assert sent[-1]["body"] == b'echo:{"type":"track","userId":"u"}'
    assert records(store) == []


def test_routes_are_below_the_servers_root_path(store: Store) -> None:
    """uvicorn --root-path puts the mount point in front of scope["path"]; WSGI keeps
    it in SCRIPT_NAME: the routes and the recorded path are below it, as for WSGI."""
    server = InProcessServer(
        PixelASGIMiddleware(Recording(), store=store, prefix="/collect"), root_path="/shop"
    )
    try:
        pixel = httpx.get(server.base + "/collect/v1/pixel/track?data=e30")
    finally:
        server.stop()
    assert (pixel.status_code, pixel.content) == (200, GIF)
    [record] = records(store)
    assert record["request"]["path"] == "/collect/v1/pixel/track"


# --- the event loop is never blocked ----------------------------------------------------


class SlowStore:
    """A memory store whose every write takes ``delay`` seconds."""

    url = "slow://"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inner = open_store("memory://")

    def write(self, batch: Any) -> None:
        time.sleep(self.delay)
        self.inner.write(batch)

    def read(self, **kw: Any) -> Any:
        return self.inner.read(**kw)

    def close(self) -> None:
        self.inner.close()


def test_a_slow_durable_commit_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    # A commit far longer than the bound below: a loop held for it fails the
    # test, and a loaded machine still has seconds to answer.
    slow = SlowStore(3.0)
    recorder = Recorder(slow, spool_path=tmp_path / "spool")
    middleware = PixelASGIMiddleware(Recording(), store=recorder)
    server = InProcessServer(middleware)
    try:
        pixel_answer: list[int] = []
        pixel = threading.Thread(
            target=lambda: pixel_answer.append(
                httpx.get(server.base + "/v1/pixel/track?data=e30", timeout=10).status_code
            )
        )
        started = time.monotonic()
        pixel.start()
        time.sleep(0.2)  # the pixel's commit is under way
        other = httpx.get(server.base + "/elsewhere", timeout=10)
        assert other.content == b"echo:"
        assert time.monotonic() - started < 2.0, "the app answered while the commit ran"
        pixel.join(10)
        assert pixel_answer == [200]
        # A durable pixel waits for its journal append, not for the store's
        # commit, which the recorder's writer thread makes.
        assert time.monotonic() - started < 2.0, "the pixel did not wait for the slow store"
        assert middleware._pool is not None, "the append was waited for in a pool thread"
        assert len(slow.read()) == 1, "in the store once the commit is over"
    finally:
        server.stop()
        middleware.close()
        recorder.close()


def test_fire_and_forget_queues_without_a_thread(store: Store) -> None:
    middleware = PixelASGIMiddleware(Recording(), store=store, durable=False)
    for _ in range(3):
        assert asgi_get(middleware, "/v1/pixel/track", params={"data": "e30"}).status_code == 200
    assert middleware._pool is None, "no thread pool was needed"
    middleware.close()
    assert len(records(store)) == 3


# --- lifespan ---------------------------------------------------------------------------


class LifespanApp:
    """A lifespan-speaking app that notes its own startup and shutdown."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await Recording()(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.events.append("startup")
                await send({"type": "lifespan.startup.complete"})
            else:
                self.events.append("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return


def test_lifespan_shutdown_flushes_after_the_apps_own_shutdown(tmp_path: Path) -> None:
    """Under a real uvicorn: when the server's shutdown returns, every record queued
    before it is in the store (writes take 0.1 s each: without the flush most
    would still be queued)."""
    slow = SlowStore(0.1)
    recorder = Recorder(slow, durable=False, max_batch=1, spool_path=tmp_path / "spool")
    app = LifespanApp()
    server = InProcessServer(PixelASGIMiddleware(app, store=recorder))
    try:
        with httpx.Client(base_url=server.base) as client:
            for n in range(10):
                event = {"writeKey": "k1", "userId": f"u{n}", "event": "E"}
                got = client.get("/v1/pixel/track", params={"data": b64(event)})
                assert got.status_code == 200
        assert len(records(slow)) < 10, "still queued when the server is stopped"
    finally:
        server.stop()
    assert app.events == ["startup", "shutdown"]
    assert len(records(slow)) == 10
    recorder.close()


async def speak_lifespan(app: Any) -> list[str]:
    """Be the server's side of lifespan: startup, then shutdown; what came back."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    answers: list[str] = []
    await inbox.put({"type": "lifespan.startup"})

    async def send(message: Any) -> None:
        answers.append(message["type"])
        if message["type"] == "lifespan.startup.complete":
            await inbox.put({"type": "lifespan.shutdown"})

    try:
        await asyncio.wait_for(app({"type": "lifespan"}, inbox.get, send), 10)
    except ValueError:
        answers.append("raised")
    return answers


async def refuses_lifespan(scope: Any, receive: Any, send: Any) -> None:
    raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")


async def ignores_lifespan(scope: Any, receive: Any, send: Any) -> None:
    return


async def fails_startup(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})
    raise ValueError("no database")


@pytest.mark.parametrize(
    ("app", "answers", "flushed"),
    [
        pytest.param(
            refuses_lifespan,
            ["lifespan.startup.complete", "lifespan.shutdown.complete"],
            True,
            id="refuses",
        ),
        pytest.param(
            ignores_lifespan,
            ["lifespan.startup.complete", "lifespan.shutdown.complete"],
            True,
            id="ignores",
        ),
        pytest.param(fails_startup, ["lifespan.startup.failed", "raised"], False, id="fails"),
    ],
)
def test_an_app_without_lifespan_still_gets_a_flush(
    app: Any, answers: list[str], flushed: bool, store: Store
) -> None:
    slow = SlowStore(0.2)
    middleware = PixelASGIMiddleware(Recording(), store=slow, durable=False)
    middleware.app = app
    assert asgi_get(middleware, "/v1/pixel/track", params={"data": "e30"}).status_code == 200
    assert asyncio.run(speak_lifespan(middleware)) == answers
    assert len(records(slow)) == (1 if flushed else 0)
