"""Bodies end to end: a real SDK to a real collector, and the middleware and the
addon giving the same records for every body case of tests/cases.py; custom routes
in the middleware, ``serve --route`` and the addon's ``pixel_routes``."""

from __future__ import annotations

import base64
import gzip
import json
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import requests
from cases import BODY_CASES
from collector_server import QuietHandler, not_found, serving
from test_cli import Collector, stored
from test_mitm_e2e import MAY_DIFFER, Mitmdump, differences, ok, options_for
from werkzeug.serving import make_server

from pixel_middleware import PixelMiddleware
from pixel_middleware.core import GIF


def send(port: int, method: str, target: bytes, headers: dict[str, str], body: bytes) -> int:
    """One raw HTTP/1.1 request with its body; the answer's status."""
    head = b"".join(
        f"{name}: {value}\r\n".encode("latin-1")
        for name, value in {
            "Host": "pixels.test",
            **headers,
            "Content-Length": str(len(body)),
            "Connection": "close",
        }.items()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\n" + head + b"\r\n" + body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_segment_sdk_sends_to_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """segment-analytics-python, pointed at `pixel-middleware serve`, gzip on: every
    call arrives as a record with the SDK's write key, checked and accepted."""
    from segment.analytics.client import Client

    collector = Collector(tmp_path)
    errors: list[Any] = []
    try:
        client = Client(
            "wk_sdk",
            host=collector.url.rstrip("/"),
            gzip=True,
            on_error=lambda error, batch: errors.append(error),
            max_retries=0,
        )
        client.identify("u1", {"plan": "pro"})
        client.track("u1", "Signed Up", {"source": "sdk"})
        client.page("u1", "Docs", "Home")
        client.flush()
        client.join()
    finally:
        status, err = collector.stop(signal.SIGTERM)
    assert (status, errors) == (0, []), err
    records = stored(collector.store_url, capsys)
    assert sorted(r["call"] for r in records) == ["identify", "page", "track"]
    for record in records:
        assert record["dialect"] == "segment"
        assert record["writeKey"] == "wk_sdk"
        assert record["accepted"], record["problems"]
        assert record["request"]["path"] == "/v1/batch"
        assert record["event"]["context"]["library"]["name"] == "analytics-python"
    (track,) = [r for r in records if r["call"] == "track"]
    assert track["event"]["properties"] == {"source": "sdk"}
    assert track["event"]["userId"] == "u1"


@pytest.mark.mitmproxy
def test_every_body_case_gives_the_same_records_in_the_middleware_and_the_addon(
    tmp_path: Path,
) -> None:
    """Each body case, sent byte for byte to PixelMiddleware on a real server and to a
    real mitmdump in reverse mode, gives the case's status and the same records."""
    upstream = make_server("127.0.0.1", 0, ok, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    groups: dict[str, list[Any]] = {}
    for case in BODY_CASES:
        groups.setdefault(repr(sorted(case.config.items())), []).append(case)
    compared = 0
    try:
        for i, cases in enumerate(groups.values()):
            config = dict(cases[0].config)
            proxy = Mitmdump(
                tmp_path / str(i),
                "--mode",
                f"reverse:http://127.0.0.1:{upstream.server_port}",
                *options_for(config),
            )
            middleware = PixelMiddleware(not_found, store="memory://", **config)
            try:
                with serving(middleware) as url:
                    port = int(url.rsplit(":", 1)[1])
                    for case in cases:
                        status = send(port, "POST", case.target, dict(case.headers), case.body)
                        assert status == case.expect_status, case.id
                        send(proxy.port, "POST", case.target, dict(case.headers), case.body)
            finally:
                proxy.proc.send_signal(signal.SIGTERM)
                proxy.stop()
            by_addon = proxy.records()
            by_middleware = [record for _, record in middleware.store.read(limit=100_000)]
            middleware.close()
            assert len(by_addon) == len(by_middleware) == sum(len(c.expect_calls) for c in cases)
            for ours, theirs in zip(by_addon, by_middleware, strict=True):
                ours.pop("upstream")
                assert [d for d in differences(ours, theirs) if d not in MAY_DIFFER] == []
                compared += 1
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert compared == sum(len(case.expect_calls) for case in BODY_CASES)


def test_middleware_never_reads_the_body_of_a_request_that_is_not_a_pixel() -> None:
    seen: list[bytes] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]

    middleware = PixelMiddleware(app, store="memory://")
    try:
        with serving(middleware) as url:
            for path in ("/v1/tracks", "/api/v1/track", "/v1/pixel/batch"):
                answer = requests.post(url + path, data=b'{"userId":"u"}', timeout=10)
                assert (answer.status_code, answer.content) == (200, b"app"), path
            # GET to an HTTP API path stays the application's too.
            assert requests.get(url + "/v1/batch", timeout=10).content == b"app"
    finally:
        middleware.close()
    assert seen == [b'{"userId":"u"}'] * 3 + [b""]


def test_middleware_body_over_the_cap_is_read_no_further() -> None:
    """Content-Length says 10 MB: at most max_body_bytes + 1 are read, the answer is 400."""
    middleware = PixelMiddleware(not_found, store="memory://")
    try:
        with serving(middleware) as url:
            body = json.dumps({"writeKey": "k", "userId": "u", "p": "x" * 600_000}).encode()
            answer = requests.post(url + "/v1/track", data=body, timeout=30)
        assert answer.status_code == 400
        assert answer.json() == {"success": False, "message": answer.json()["message"]}
        ((_, record),) = middleware.store.read()
        assert [p["rule"] for p in record["problems"]] == ["too_large"]
    finally:
        middleware.close()


# --- custom routes ----------------------------------------------------------------------


def _data(event: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(event).encode()).decode().rstrip("=")


def test_middleware_custom_routes() -> None:
    middleware = PixelMiddleware(
        not_found,
        store="memory://",
        routes={
            "/t.gif": "segment:track",
            "px.example.com/e": "rudderstack:page",
            "/collect/": "segment",
        },
    )
    try:
        with serving(middleware) as url:
            event = {"writeKey": "k", "userId": "u", "event": "Opened"}
            answer = requests.get(f"{url}/t.gif?data={_data(event)}", timeout=10)
            assert (answer.status_code, answer.content) == (200, GIF)
            answer = requests.post(f"{url}/t.gif", json=event, timeout=10)
            assert answer.json() == {"success": True}
            answer = requests.get(f"{url}/collect/identify?data={_data(event)}", timeout=10)
            assert answer.content == GIF
            # A host and path: only for that host (any port).
            query = "writeKey=k&anonymousId=a"
            other = requests.get(f"{url}/e?{query}", timeout=10)
            assert other.status_code == 404
            answer = requests.get(
                f"{url}/e?{query}", headers={"Host": "px.example.com:8080"}, timeout=10
            )
            assert (answer.status_code, answer.content) == (200, b"OK")
        calls = [(r["dialect"], r["call"]) for _, r in middleware.store.read()]
        assert sorted(calls) == sorted(
            [
                ("segment", "track"),
                ("segment", "track"),
                ("segment", "identify"),
                ("rudderstack", "page"),
            ]
        )
    finally:
        middleware.close()


@pytest.mark.parametrize(
    ("routes", "says"),
    [
        ({"/t.gif": "segment"}, "say the call"),
        ({"/t.gif": "nope:track"}, "is not a dialect"),
        ({"/t.gif": "rudderstack:view"}, "has no call 'view'"),
        ({"/collect/": "segment:track"}, "ends with '/'"),
        ({"t.gif": "segment:track"}, "must be a path"),
        ("/t.gif", "must map paths"),
    ],
)
def test_middleware_refuses_a_wrong_route_at_construction(routes: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        PixelMiddleware(not_found, store="memory://", routes=routes)


def test_serve_route_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    collector = Collector(tmp_path, "--route", "/t.gif=segment:track")
    try:
        event = {"writeKey": "k", "userId": "u", "event": "Opened"}
        answer = requests.get(f"{collector.url}t.gif?data={_data(event)}", timeout=10)
        assert (answer.status_code, answer.content) == (200, GIF)
    finally:
        status, err = collector.stop(signal.SIGTERM)
    assert status == 0, err
    (record,) = stored(collector.store_url, capsys)
    assert (record["call"], record["accepted"], record["request"]["path"]) == (
        "track",
        True,
        "/t.gif",
    )


def test_serve_refuses_a_wrong_route(capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli import run

    status, _, err = run(capsys, "serve", "--port", "0", "--route", "/t.gif")
    assert status == 2
    assert "--route: '/t.gif' is not PATH=DIALECT[:CALL]" in err


@pytest.mark.mitmproxy
def test_addon_pixel_routes(tmp_path: Path) -> None:
    upstream = make_server("127.0.0.1", 0, ok, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy = Mitmdump(
        tmp_path,
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.server_port}",
        "--set",
        "pixel_routes=/t.gif=segment:track",
    )
    try:
        event = {"writeKey": "k", "userId": "u", "event": "Opened"}
        assert send(proxy.port, "GET", f"/t.gif?data={_data(event)}".encode(), {}, b"") == 204
        # POST: the body is the HTTP API's one event for the mapped call.
        body = gzip.compress(json.dumps(event).encode())
        headers = {"Content-Encoding": "gzip"}
        assert send(proxy.port, "POST", b"/t.gif", headers, body) == 204
    finally:
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
    records = proxy.records()
    assert [(r["call"], r["accepted"], r["request"]["method"]) for r in records] == [
        ("track", True, "GET"),
        ("track", True, "POST"),
    ]


def test_a_post_the_dialect_declines_reaches_the_app_with_its_whole_body() -> None:
    """Snowplow's /i is its own only with its markers: a plain POST /i is the app's,
    and the app must get every byte, though the middleware read some to decide."""
    seen: list[bytes] = []

    def app(environ: Any, start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        first = stream.read(5)
        seen.append(first + stream.read(length - len(first)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]

    middleware = PixelMiddleware(app, store="memory://", dialects=("segment", "snowplow"))
    body = b"line one\n" + b"x" * 200_000
    try:
        with serving(middleware) as url:
            answer = requests.post(url + "/i", data=body, timeout=10)
        assert (answer.status_code, answer.content) == (200, b"app")
    finally:
        middleware.close()
    assert seen == [body]
    assert middleware.store.read() == []
