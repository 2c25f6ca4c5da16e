"""PixelMiddleware through werkzeug's test client, with LintMiddleware inside and out."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import Client, TestResponse

from pixel_middleware import GIF, Limits, PixelMiddleware, PixelRecord
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, StoreError, open_store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

NO_CACHE = "no-cache, no-store, must-revalidate"

# LintMiddleware does not know HEAD: an answer to HEAD carries the Content-Length
# the GET answer would have (RFC 9110 section 9.3.2) and no body, which it flags.
head_lint_ok = pytest.mark.filterwarnings(
    "ignore:Content-Length and the number of bytes:werkzeug.middleware.lint.WSGIWarning"
)


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


SEGMENT_OK = {"writeKey": "k1", "userId": "u1", "event": "Email Opened"}
SEGMENT_NO_ID = {"writeKey": "k1", "event": "Email Opened"}
RS_PAGE_OK = "writeKey=k1&anonymousId=a1&name=Home"
RS_PAGE_NO_ID = "writeKey=k1&name=Home"


# --- apps to wrap ---------------------------------------------------------------


def hello_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    body = f"hello {environ['REQUEST_METHOD']} {environ['PATH_INFO']}".encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-App", "yes"),
        ],
    )
    return [body]


def streaming_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])

    def chunks() -> Iterator[bytes]:
        yield b"chunk one\n"
        yield b""
        yield b"chunk two\n"

    return chunks()


def not_found_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


class ClosingBody:
    """A response body whose close() the server must call (PEP 3333)."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"part 1,"
        yield b"part 2"

    def close(self) -> None:
        self.closed = True


class ClosingApp:
    def __init__(self) -> None:
        self.bodies: list[ClosingBody] = []

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> ClosingBody:
        start_response("201 Created", [("Content-Type", "text/plain")])
        body = ClosingBody()
        self.bodies.append(body)
        return body


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[Store]:
    opened = open_store("memory://")
    yield opened
    opened.close()


def wrap(app: WSGIApplication, store: Store | Recorder, **options: Any) -> PixelMiddleware:
    return PixelMiddleware(LintMiddleware(app), store=store, **options)


def get(
    app: WSGIApplication, path: str, query: str | bytes = "", method: str = "GET", **kw: Any
) -> TestResponse:
    """One request through LintMiddleware; buffered, so the body is read and closed."""
    return Client(LintMiddleware(app)).open(
        path, method=method, query_string=query, buffered=True, **kw
    )


def records(store: Store) -> list[PixelRecord]:
    return [record for _, record in store.read()]


def rules(record: PixelRecord) -> list[str]:
    return [problem["rule"] for problem in record["problems"]]


# --- pass-through ------------------------------------------------------------------


PASS_THROUGH = [
    pytest.param(hello_app, "/", {}, id="root"),
    pytest.param(hello_app, "/v1/pixel", {}, id="segment-base-no-call"),
    pytest.param(hello_app, "/v1/pixel/", {}, id="segment-base-slash"),
    pytest.param(hello_app, "/v1/pixel/purchase", {}, id="segment-unknown-call"),
    pytest.param(hello_app, "/v1/pixel/track/more", {}, id="segment-deeper"),
    pytest.param(hello_app, "/v1/pixels/track", {}, id="segment-near-miss"),
    pytest.param(hello_app, "/pixel/v1/identify", {}, id="rudderstack-no-identify"),
    pytest.param(hello_app, "/pixel/v1/", {}, id="rudderstack-base"),
    pytest.param(hello_app, "/v1/pixel/track", {"prefix": "/collect"}, id="outside-prefix"),
    pytest.param(hello_app, "/collect/other", {"prefix": "/collect"}, id="under-prefix-other"),
    pytest.param(
        hello_app, "/pixel/v1/page", {"dialects": ("segment",)}, id="dialect-switched-off"
    ),
    pytest.param(streaming_app, "/stream", {}, id="streaming"),
    pytest.param(not_found_app, "/missing", {}, id="app-404"),
]


@pytest.mark.parametrize(("app", "path", "options"), PASS_THROUGH)
def test_other_requests_pass_through_byte_identical(
    app: WSGIApplication, path: str, options: dict[str, Any], store: Store
) -> None:
    for method in ("GET", "POST", "HEAD"):
        direct = get(app, path, "x=1", method)
        wrapped = get(wrap(app, store, **options), path, "x=1", method)
        assert wrapped.status == direct.status
        assert wrapped.headers.to_wsgi_list() == direct.headers.to_wsgi_list()
        assert wrapped.get_data() == direct.get_data()
    assert records(store) == []


def test_pass_through_calls_the_apps_close(store: Store) -> None:
    app = ClosingApp()
    response = get(wrap(app, store), "/anything")
    assert response.status_code == 201
    assert response.get_data() == b"part 1,part 2"
    assert [body.closed for body in app.bodies] == [True]


def test_pass_through_streams_lazily(store: Store) -> None:
    """The app's iterable is handed on, not read into memory first."""
    pulled: list[int] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for i in range(3):
            pulled.append(i)
            yield b"x"

    body = PixelMiddleware(app, store=store)({"PATH_INFO": "/s", "REQUEST_METHOD": "GET"}, noop)
    assert pulled == []
    assert b"".join(body) == b"xxx"
    assert pulled == [0, 1, 2]


def noop(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], object]:
    return lambda data: None


# --- pixels ------------------------------------------------------------------------

PIXELS = [
    # id, path, query, options, status, body, accepted
    pytest.param(
        "/v1/pixel/track", "data=" + b64(SEGMENT_OK), {}, 200, GIF, True, id="segment-track-ok"
    ),
    pytest.param(
        "/v1/pixel/track",
        "data=" + b64(SEGMENT_NO_ID),
        {},
        200,
        GIF,
        False,
        id="segment-no-identity-still-gif",
    ),
    pytest.param("/v1/pixel/page", "data=%%%", {}, 200, GIF, False, id="segment-garbage-data"),
    pytest.param("/v1/pixel/identify", "", {}, 200, GIF, False, id="segment-no-query"),
    pytest.param(
        "/v1/pixel/track",
        "data=" + b64(SEGMENT_OK),
        {"write_keys": {"other"}},
        200,
        GIF,
        False,
        id="segment-wrong-write-key",
    ),
    pytest.param(
        "/collect/v1/pixel/track",
        "data=" + b64(SEGMENT_OK),
        {"prefix": "/collect"},
        200,
        GIF,
        True,
        id="segment-under-prefix",
    ),
    pytest.param("/pixel/v1/page", RS_PAGE_OK, {}, 200, b"OK", True, id="rudderstack-page-ok"),
    pytest.param("/pixel/v1/page", RS_PAGE_NO_ID, {}, 400, None, False, id="rudderstack-no-id-400"),
    pytest.param(
        "/pixel/v1/page",
        RS_PAGE_OK,
        {"rudderstack_response": "gif"},
        200,
        GIF,
        True,
        id="rudderstack-gif-ok",
    ),
    pytest.param(
        "/pixel/v1/page",
        RS_PAGE_NO_ID,
        {"rudderstack_response": "gif"},
        200,
        GIF,
        False,
        id="rudderstack-gif-rejected",
    ),
]


@pytest.mark.parametrize(("path", "query", "options", "status", "body", "accepted"), PIXELS)
def test_pixels_are_answered_and_recorded(
    path: str,
    query: str,
    options: dict[str, Any],
    status: int,
    body: bytes | None,
    accepted: bool,
    store: Store,
) -> None:
    app = wrap(hello_app, store, **options)
    response = get(app, path, query)
    assert response.status_code == status
    if body is not None:
        assert response.get_data() == body
    assert response.headers["Cache-Control"] == NO_CACHE
    [record] = records(store)
    assert record["accepted"] is accepted
    assert record["request"]["path"] == path
    if accepted:
        assert record["problems"] == []
    else:
        assert rules(record), "a rejection says which rule it broke"
        assert all(p["message"] for p in record["problems"])


@head_lint_ok
@pytest.mark.parametrize(
    ("path", "query"),
    [
        pytest.param("/v1/pixel/track", "data=" + b64(SEGMENT_OK), id="segment"),
        pytest.param("/pixel/v1/track", RS_PAGE_OK + "&event=Opened", id="rudderstack"),
        pytest.param("/pixel/v1/page", RS_PAGE_NO_ID, id="rudderstack-rejected"),
    ],
)
def test_head_has_get_headers_no_body_and_is_not_recorded(
    path: str, query: str, store: Store
) -> None:
    app = wrap(hello_app, store)
    head = get(app, path, query, "HEAD")
    assert head.get_data() == b""
    assert records(store) == []
    got = get(app, path, query)
    assert head.status == got.status
    assert head.headers.to_wsgi_list() == got.headers.to_wsgi_list()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
@pytest.mark.parametrize("path", ["/v1/pixel/track", "/pixel/v1/page"])
def test_other_methods_get_405_with_allow(path: str, method: str, store: Store) -> None:
    response = get(wrap(hello_app, store), path, "data=e30", method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["Cache-Control"] == NO_CACHE
    assert records(store) == []


@head_lint_ok
def test_on_record_gets_each_record(store: Store) -> None:
    seen: list[PixelRecord] = []
    app = wrap(hello_app, store, on_record=seen.append)
    get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    get(app, "/pixel/v1/page", RS_PAGE_NO_ID)
    get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK), "HEAD")
    get(app, "/elsewhere")
    assert [(r["dialect"], r["accepted"]) for r in seen] == [
        ("segment", True),
        ("rudderstack", False),
    ]
    assert seen == records(store)


def test_exploding_on_record_is_logged_not_raised(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(record: PixelRecord) -> None:
        raise RuntimeError("boom")

    response = get(
        wrap(hello_app, store, on_record=explode), "/v1/pixel/track", "data=" + b64(SEGMENT_OK)
    )
    assert (response.status_code, response.get_data()) == (200, GIF)
    assert len(records(store)) == 1
    assert "on_record callback failed" in caplog.text
    assert "boom" in caplog.text


class FailingStore:
    url = "failing://"

    def write(self, records: Any) -> None:
        raise StoreError("disk on fire")

    def read(self, **kw: Any) -> list[tuple[str, PixelRecord]]:
        raise StoreError("disk on fire")

    def close(self) -> None:
        pass


class ExplodingRecorder(Recorder):
    """A recorder breaking its promise never to raise."""

    def record(self, record: PixelRecord) -> None:
        raise RuntimeError("recorder bug")


def test_a_failing_store_still_gets_the_gif(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder(FailingStore(), spool_path=tmp_path / "spool", retry_interval=0.05)
    try:
        app = wrap(hello_app, recorder)
        response = get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
        assert (response.status_code, response.get_data()) == (200, GIF)
        response = get(app, "/pixel/v1/page", RS_PAGE_OK)
        assert (response.status_code, response.get_data()) == (200, b"OK")
        assert recorder.spooled == 2, "kept on local disk until the store recovers"
    finally:
        recorder.close()


def test_a_raising_recorder_still_gets_the_gif(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = ExplodingRecorder(store)
    try:
        response = get(wrap(hello_app, recorder), "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
        assert (response.status_code, response.get_data()) == (200, GIF)
        assert "recorder bug" in caplog.text
    finally:
        recorder.close()


@head_lint_ok
@pytest.mark.parametrize(
    ("path", "options", "body", "content_type"),
    [
        pytest.param("/v1/pixel/track", {}, GIF, "image/gif", id="segment-gif"),
        pytest.param("/pixel/v1/page", {}, b"OK", "text/plain; charset=utf-8", id="rudder-seed"),
        pytest.param(
            "/pixel/v1/page", {"rudderstack_response": "gif"}, GIF, "image/gif", id="rudder-gif"
        ),
    ],
)
def test_a_decoder_bug_gets_the_default_answer_and_a_record(
    path: str,
    options: dict[str, Any],
    body: bytes,
    content_type: str,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("core bug")

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    app = wrap(hello_app, store, **options)
    response = get(app, path, "anything=1")
    assert (response.status_code, response.get_data()) == (200, body)
    assert response.headers["Content-Type"] == content_type
    assert response.headers["Cache-Control"] == NO_CACHE
    assert get(app, path, "anything=1", "HEAD").get_data() == b""
    assert get(app, path, "", "POST").status_code == 405
    [record] = records(store)
    assert rules(record) == ["internal_error"]
    assert "ZeroDivisionError: core bug" in record["problems"][0]["message"]
    assert "decoding the pixel" in caplog.text


def test_a_route_matcher_bug_passes_the_request_on(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("matcher bug")

    monkeypatch.setattr("pixel_middleware._adapter.match_route", broken)
    response = get(wrap(hello_app, store), "/v1/pixel/track")
    assert response.get_data() == b"hello GET /v1/pixel/track"
    assert "matcher bug" in caplog.text


DEEP = {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}


@pytest.mark.parametrize(
    ("query", "rule"),
    [
        pytest.param(b"data=%FF%FE", "bad_base64", id="percent-invalid-utf8"),
        pytest.param(b"data=\xff\xfe", "bad_base64", id="raw-invalid-utf8"),
        pytest.param(b"data=" + b"A" * 70_000, "too_large", id="oversized"),
        pytest.param(b"&".join(b"p%d=1" % i for i in range(2000)), "too_many_params", id="params"),
        pytest.param(b"data=" + b64(DEEP).encode(), "too_deep", id="deep"),
        pytest.param(b"data=WzEsMl0", "not_an_object", id="json-array"),
    ],
)
def test_hostile_queries_become_recorded_rejections(query: bytes, rule: str, store: Store) -> None:
    # As a WSGI server hands raw query bytes over: latin-1 text (PEP 3333).
    raw = {"QUERY_STRING": query.decode("latin-1")}
    response = get(wrap(hello_app, store), "/v1/pixel/track", environ_overrides=raw)
    assert (response.status_code, response.get_data()) == (200, GIF)
    assert response.headers["X-Pixel-Rejected"] == rule
    [record] = records(store)
    assert record["accepted"] is False
    assert rules(record) == [rule]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        ["/v1/pixel/track", "/v1/pixel/page", "/pixel/v1/page", "/pixel/v1/track"]
    ),
    query=st.text(st.characters(max_codepoint=255), max_size=300),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    forwarded=st.none() | st.text(max_size=40),
)
def test_no_input_makes_a_pixel_raise_or_500(
    path: str, query: str, method: str, forwarded: str | None
) -> None:
    """Whatever the query (as a WSGI server hands it over, latin-1), a pixel is answered."""
    store = open_store("memory://")
    app = PixelMiddleware(hello_app, store=store, trusted_proxies=1)
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REMOTE_ADDR": "192.0.2.1",
    }
    if forwarded is not None:
        environ["HTTP_X_FORWARDED_FOR"] = forwarded
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        assert ("Cache-Control", NO_CACHE) in headers
        return lambda data: None

    body = b"".join(app(environ, start_response))
    [status] = statuses
    assert int(status[:3]) in (200, 400, 405)
    if method == "HEAD":
        assert body == b""
    app.close()


# --- client address ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "forwarded", "ip"),
    [
        pytest.param(0, None, "192.0.2.1", id="peer"),
        pytest.param(0, "203.0.113.9", "192.0.2.1", id="untrusted-header-ignored"),
        pytest.param(1, "203.0.113.9", "203.0.113.9", id="one-proxy"),
        pytest.param(1, "6.6.6.6, 203.0.113.9", "203.0.113.9", id="spoofed-first-entry-ignored"),
    ],
)
def test_recorded_ip_honours_trusted_proxies(
    trusted: int, forwarded: str | None, ip: str, store: Store
) -> None:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    app = wrap(hello_app, store, trusted_proxies=trusted)
    get(
        app,
        "/v1/pixel/track",
        "data=" + b64(SEGMENT_OK),
        headers=headers,
        environ_overrides={"REMOTE_ADDR": "192.0.2.1"},
    )
    [record] = records(store)
    assert record["request"]["ip"] == ip


def test_proxy_fix_outside_sets_the_recorded_ip(store: Store) -> None:
    app = ProxyFix(wrap(hello_app, store), x_for=1)
    get(
        app,
        "/v1/pixel/track",
        "data=" + b64(SEGMENT_OK),
        headers={"X-Forwarded-For": "203.0.113.9", "User-Agent": "MailClient/1.0"},
        environ_overrides={"REMOTE_ADDR": "10.0.0.1"},
    )
    [record] = records(store)
    assert record["request"]["ip"] == "203.0.113.9"
    assert record["request"]["userAgent"] == "MailClient/1.0"


# --- construction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"dialects": "segment"}, ValueError, "not a string", id="dialects-str"),
        pytest.param(
            {"dialects": ("segment", "no_such_dialect")}, ValueError, "subset of", id="unknown"
        ),
        pytest.param({"dialects": ()}, ValueError, "non-empty subset", id="dialects-empty"),
        pytest.param({"write_keys": "k1"}, ValueError, "not a string", id="write-keys-str"),
        pytest.param({"write_keys": []}, ValueError, "None to accept any", id="write-keys-empty"),
        pytest.param({"write_keys": [""]}, ValueError, "non-empty strings", id="write-keys-blank"),
        pytest.param({"trusted_proxies": "1"}, ValueError, "number of proxies", id="proxies-str"),
        pytest.param({"trusted_proxies": True}, ValueError, "integer >= 0", id="proxies-bool"),
        pytest.param({"trusted_proxies": -1}, ValueError, "integer >= 0", id="proxies-negative"),
        pytest.param({"limits": {"max_depth": 3}}, ValueError, r"Limits\(...\)", id="limits"),
        pytest.param({"rudderstack_response": "json"}, ValueError, "'seed'", id="rs-response"),
        pytest.param({"prefix": "collect"}, ValueError, "start with '/'", id="prefix-no-slash"),
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
        PixelMiddleware(hello_app, **options)


def test_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app must be a WSGI application"):
        PixelMiddleware("app", store="memory://")  # type: ignore[arg-type]


def test_config_and_recorder_are_exposed() -> None:
    app = PixelMiddleware(
        hello_app,
        store="memory://",
        prefix="/collect",
        dialects=["segment"],
        write_keys=["k1", "k2"],
        trusted_proxies=2,
        limits=Limits(max_depth=4),
    )
    assert app.config.prefix == "/collect"
    assert app.config.dialects == frozenset({"segment"})
    assert app.config.write_keys == frozenset({"k1", "k2"})
    assert app.config.trusted_proxies == 2
    assert app.config.limits.max_depth == 4
    assert isinstance(app.recorder, Recorder)
    assert app.store.url == "memory://"
    app.close()


def test_close_closes_only_what_it_opened(store: Store) -> None:
    recorder = Recorder(store)
    app = PixelMiddleware(hello_app, store=recorder)
    app.close()
    get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    assert len(records(store)) == 1, "the caller's recorder still works"
    recorder.close()

    owned = PixelMiddleware(hello_app, store="memory://")
    get(owned, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    owned_store = owned.store
    owned.close()
    assert len(records(owned_store)) == 1, "flushed before closing"


def test_default_store_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("PIXEL_STORE", f"jsonl:///{tmp_path}/events.jsonl")
    app = PixelMiddleware(hello_app)
    get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    app.close()
    assert (tmp_path / "events.jsonl").read_text().count("\n") == 1


def test_logs_go_to_the_module_logger(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pixel_middleware.middleware")

    def explode(record: PixelRecord) -> None:
        raise RuntimeError("boom")

    get(wrap(hello_app, store, on_record=explode), "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    assert [r.name for r in caplog.records] == ["pixel_middleware.middleware"]


# --- the shared case table and the GIF, through a real server (core hardening) --------


class Served:
    """PixelMiddleware over a 404 app, served by werkzeug on 127.0.0.1:<free port>.

    Raw bytes >= 0x80 in a request target: PEP 3333 servers (gunicorn) hand
    them to the app as latin-1 text; werkzeug's development server encodes them
    twice and waitress refuses them ("Bad URI"). Such targets, and those longer
    than werkzeug's server takes, are given to the middleware in-process with
    the environ a PEP 3333 server builds.
    """

    # http.server answers 414 past this request line length.
    MAX_LINE = 65536

    def __init__(self, **options: Any) -> None:
        from collector_server import QuietHandler
        from werkzeug.serving import make_server

        self.middleware = PixelMiddleware(not_found_app, store="memory://", **options)
        self.server = make_server(
            "127.0.0.1", 0, self.middleware, threaded=True, request_handler=QuietHandler
        )
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def send(
        self, method: str, target: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Send the target byte for byte (raw bytes >= 0x80 included); the answer."""
        head = b"".join(
            f"{name}: {value}\r\n".encode("latin-1")
            for name, value in {"Host": "pixels.test", **headers, "Connection": "close"}.items()
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
            conn.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\n" + head + b"\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        header_block, _, body = rest.partition(b"\r\n\r\n")
        parsed = dict(line.decode("latin-1").split(": ", 1) for line in header_block.split(b"\r\n"))
        return int(status_line.split(b" ")[1]), parsed, body

    def request(
        self, method: str, target: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Over the socket, or in-process for the targets the class docstring names."""
        if target.isascii() and len(target) + 20 < self.MAX_LINE:
            return self.send(method, target, headers)
        from pixel_middleware.core import split_target

        path, query = split_target(target)
        answer = Client(self.middleware).open(
            method=method,
            headers=headers,
            environ_overrides={"PATH_INFO": path, "QUERY_STRING": query.decode("latin-1")},
        )
        return answer.status_code, dict(answer.headers), answer.get_data()

    def records(self) -> list[PixelRecord]:
        return [record for _, record in self.middleware.store.read()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.middleware.close()


def test_every_shared_case_through_a_real_server() -> None:
    """Each request of tests/cases.py, sent byte for byte to a real server, gives the
    case's answer and record: raw UTF-8 in the query must read as UTF-8 (WSGI
    hands it over as latin-1 text), and every header the record keeps is capped."""
    from cases import CASES

    groups: dict[str, list[Any]] = {}
    for case in CASES:
        groups.setdefault(repr(sorted(case.config.items())), []).append(case)
    checked = 0
    for cases in groups.values():
        served = Served(**cases[0].config)
        try:
            for case in cases:
                before = len(served.records())
                status, headers, body = served.request(case.method, case.target, dict(case.headers))
                assert status == case.expect_status, case.id
                rejected = headers.get("X-Pixel-Rejected")
                assert (set(rejected.split(", ")) if rejected else set()) == case.expect_rules
                if case.expect_accepted is None:
                    assert len(served.records()) == before, case.id
                    continue
                record = served.records()[-1]
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
                if headers["Content-Type"] == "image/gif":
                    assert body == GIF
                checked += 1
        finally:
            served.close()
    assert checked == sum(case.expect_accepted is not None for case in CASES)


def test_the_gif_sent_over_http_is_a_transparent_pixel() -> None:
    from test_core import EXPECTED_GIF, assert_transparent_pixel

    served = Served()
    try:
        status, headers, body = served.send("GET", b"/v1/pixel/track?data=e30", {})
    finally:
        served.close()
    assert (status, headers["Content-Type"], headers["Content-Length"]) == (200, "image/gif", "43")
    assert body == EXPECTED_GIF
    assert_transparent_pixel(body)


def test_referer_is_recorded(store: Store) -> None:
    app = wrap(hello_app, store)
    get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK), headers={"Referer": "https://m.test/"})
    [record] = records(store)
    assert record["request"]["referer"] == "https://m.test/"
    assert "referer" not in json.dumps(record["event"])


def test_a_decoder_bug_record_copies_nothing_uncapped(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("echo " + "q" * 5000)

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    app = wrap(hello_app, store, limits=Limits(max_query_bytes=100, max_header_chars=16))
    query = "data=" + "A" * 500
    response = get(
        app, "/v1/pixel/track", query, headers={"User-Agent": "u" * 40, "Referer": "r" * 40}
    )
    assert (response.status_code, response.get_data()) == (200, GIF)
    [record] = records(store)
    assert record["request"]["query"] == query[:100]
    assert (record["request"]["userAgent"], record["request"]["referer"]) == ("u" * 16, "r" * 16)
    assert len(record["problems"][0]["message"]) < 300


# --- debug twins and mistyped calls (options) ------------------------------------------


def _debug_app(**options: Any) -> PixelMiddleware:
    def app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"the app's own " + environ["PATH_INFO"].encode()]

    return PixelMiddleware(app, store="memory://", **options)


def test_debug_routes_are_the_apps_unless_asked_for() -> None:
    middleware = _debug_app()
    try:
        answer = Client(middleware).get("/debug/v1/pixel/track?data=e30")
        assert answer.get_data() == b"the app's own /debug/v1/pixel/track"
    finally:
        middleware.close()


def test_debug_routes_answer_the_verdict_and_record_nothing() -> None:
    middleware = _debug_app(debug_routes=True, write_keys={"wk"})
    query = "writeKey=wk&anonymousId=a-1&event=Opened&properties.plan=pro"
    try:
        client = Client(middleware)
        answer = client.get(f"/debug/pixel/v1/track?{query}")
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "application/json"
        body = json.loads(answer.get_data())
        assert body["recorded"] is False
        assert (body["accepted"], body["status"], body["dialect"]) == (True, 200, "rudderstack")
        assert body["event"]["properties"] == {"plan": "pro"}
        bad = json.loads(client.get("/debug/pixel/v1/track?writeKey=nope").get_data())
        assert bad["accepted"] is False
        assert bad["status"] == 400
        assert "unknown_write_key" in [p["rule"] for p in bad["problems"]]
        head = client.head(f"/debug/pixel/v1/track?{query}")
        assert (head.status_code, head.get_data()) == (200, b"")
        post = client.post(f"/debug/pixel/v1/track?{query}")
        assert (post.status_code, post.headers["Allow"]) == (405, "GET, HEAD")
        # Not a pixel route below /debug: the app's.
        assert client.get("/debug/other").get_data() == b"the app's own /debug/other"
        assert middleware.store.read() == []
    finally:
        middleware.close()


@pytest.mark.parametrize(
    ("unknown_calls", "expected"),
    [
        pytest.param("pass", "app", id="pass-to-the-app"),
        pytest.param("reject", "rejected", id="reject"),
    ],
)
def test_unknown_calls(unknown_calls: str, expected: str) -> None:
    middleware = _debug_app(unknown_calls=unknown_calls)
    try:
        answer = Client(middleware).get("/v1/pixel/trak?data=e30")
        records = [record for _, record in middleware.store.read()]
        if expected == "app":
            assert answer.get_data() == b"the app's own /v1/pixel/trak"
            assert records == []
        else:
            assert answer.status_code == 200  # Segment answers the GIF whatever it decodes
            assert [p["rule"] for p in records[0]["problems"]] == ["unknown_call"]
            assert records[0]["problems"][0]["message"].endswith("the closest is track.")
    finally:
        middleware.close()


def test_a_bad_unknown_calls_or_debug_routes_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown_calls"):
        _debug_app(unknown_calls="ignore")
    with pytest.raises(TypeError, match="debug_routes must be True or False"):
        _debug_app(debug_routes="yes")


class FrozenClock(datetime):
    """The middleware's clock, stopped: the record's receivedAt is then known."""

    @classmethod
    def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
        return datetime(2026, 11, 23, 16, 20, 5, 987654, tzinfo=UTC)


def test_a_decoder_bug_record_is_exactly_what_the_request_allows(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by mutation testing: every field of the fallback record, each cut at
    # its cap, compared with values written out here (not computed by the code).
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("e" * 300)

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    monkeypatch.setattr("pixel_middleware._adapter.datetime", FrozenClock)
    app = wrap(hello_app, store, limits=Limits(max_query_bytes=10, max_header_chars=10))
    response = get(
        app,
        "/v1/pixel/track",
        "data=" + "A" * 20,
        headers={"User-Agent": "u" * 11, "Referer": "r" * 10},
        environ_base={"REMOTE_ADDR": "1" * 11},
    )
    assert (response.status_code, response.get_data()) == (200, GIF)
    [record] = records(store)
    assert uuid.UUID(record["id"]).version == 4
    assert str(uuid.UUID(record["id"])) == record["id"]
    assert {k: v for k, v in record.items() if k != "id"} == {
        "receivedAt": "2026-11-23T16:20:05.987Z",
        "dialect": "segment",
        "call": "track",
        "writeKey": None,
        "accepted": False,
        "problems": [
            {
                "rule": "internal_error",
                "message": "the decoder failed (ValueError: " + "e" * 188 + ");"
                " this is a bug in pixel-middleware, please report it",
            }
        ],
        "notes": [],
        "event": None,
        "request": {
            "method": "GET",
            "path": "/v1/pixel/",
            "query": "data=AAAAA",
            "ip": "1" * 10,
            "userAgent": "u" * 10,
            "referer": "r" * 10,
        },
    }


@head_lint_ok
def test_a_decoder_bug_answers_head_and_other_methods_as_the_core_does(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("core bug")

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    app = wrap(hello_app, store)
    head = get(app, "/v1/pixel/track", "data=x", "HEAD")
    assert (head.status_code, head.get_data()) == (200, b"")
    assert head.headers["Content-Length"] == "43"
    post = get(app, "/v1/pixel/track", "data=x", "POST")
    assert post.status_code == 405
    assert post.headers["Allow"] == "GET, HEAD"
    assert post.headers["Cache-Control"] == NO_CACHE
    assert records(store) == [], "only a GET is recorded"


# Found by mutation testing (./dev mutate): what the middleware logs, the WSGI
# keys it may not get, its clock's zone, and close()'s bound.


def test_a_raising_recorder_and_callback_are_logged_with_the_pixels_id(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[PixelRecord] = []

    def explode(record: PixelRecord) -> None:
        seen.append(record)
        raise RuntimeError("boom")

    recorder = ExplodingRecorder(store)
    try:
        app = wrap(hello_app, recorder, on_record=explode)
        assert get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK)).status_code == 200
    finally:
        recorder.close()
    [record] = seen
    messages = [r.getMessage() for r in caplog.records if r.name == "pixel_middleware.middleware"]
    assert messages == [
        f"recording pixel {record['id']} failed",
        f"on_record callback failed for pixel {record['id']}",
    ]


def test_a_request_without_query_string_is_a_pixel_with_an_empty_query(store: Store) -> None:
    # PEP 3333: QUERY_STRING "may be empty or absent".
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/pixel/v1/page").get_environ()
    del environ["QUERY_STRING"]
    statuses: list[str] = []
    body = b"".join(wrap(hello_app, store)(environ, lambda s, h, e=None: statuses.append(s)))
    # No writeKey or anonymousId: the core's 400, not the fallback's answer.
    assert statuses == ["400 Bad Request"], body
    [record] = records(store)
    assert record["request"]["query"] == ""
    assert "internal_error" not in rules(record)


def test_received_at_is_utc_whatever_the_local_time_zone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: no clock is that far off
    time.tzset()
    try:
        before = datetime.now(UTC).replace(microsecond=0)
        get(wrap(hello_app, store), "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
        after = datetime.now(UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    [record] = records(store)
    received = datetime.fromisoformat(record["receivedAt"].replace("Z", "+00:00"))
    assert before <= received <= after


class HungStore(FailingStore):
    """A store whose write waits until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def write(self, records: Any) -> None:
        self.release.wait(30)


def test_close_waits_at_most_its_timeout_for_a_hung_store(tmp_path: Any) -> None:
    store = HungStore()
    app = PixelMiddleware(hello_app, store=store, durable=False)  # type: ignore[arg-type]
    try:
        assert get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK)).status_code == 200
        started = time.monotonic()
        app.close(timeout=0.3)
        assert time.monotonic() - started < 5
    finally:
        store.release.set()
        app.recorder.close(timeout=10)


def test_by_default_no_proxy_is_trusted(store: Store) -> None:
    get(
        wrap(hello_app, store),
        "/v1/pixel/track",
        "data=" + b64(SEGMENT_OK),
        headers={"X-Forwarded-For": "203.0.113.9"},
        environ_base={"REMOTE_ADDR": "198.51.100.7"},
    )
    [record] = records(store)
    assert record["request"]["ip"] == "198.51.100.7"


@pytest.mark.parametrize("option", ["app", "on_record"])
def test_a_bad_app_or_callback_is_named_by_its_type(option: str, store: Store) -> None:
    options: dict[str, Any] = {"app": hello_app, "store": store, option: 42}
    with pytest.raises(TypeError, match=f"PixelMiddleware: {option} must be .* got int"):
        PixelMiddleware(**options)


def test_a_request_without_path_info_passes_on_quietly(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    # PEP 3333: PATH_INFO "may be empty" (an app at the server's root).
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/").get_environ()
    del environ["PATH_INFO"]
    body = b"".join(PixelMiddleware(root_app, store=store)(environ, _ignore))
    assert body == b"root"
    assert caplog.records == []


def _ignore(status: str, headers: Any, exc_info: Any = None) -> None:
    pass


def root_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"root"]


def test_a_decoder_bug_without_query_string_records_an_empty_query(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from werkzeug.test import EnvironBuilder

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("core bug")

    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", broken)
    environ = EnvironBuilder(path="/v1/pixel/track").get_environ()
    del environ["QUERY_STRING"]
    assert b"".join(wrap(hello_app, store)(environ, _ignore)) == GIF
    [record] = records(store)
    assert record["request"]["query"] == ""
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["decoding the pixel /v1/pixel/track failed; answering the default"]


def test_a_route_matcher_bug_is_logged_with_the_path(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("matcher bug")

    monkeypatch.setattr("pixel_middleware._adapter.match_route", broken)
    get(wrap(hello_app, store), "/v1/pixel/track")
    assert [r.getMessage() for r in caplog.records] == [
        "pixel route matching failed for '/v1/pixel/track'; passing it on"
    ]


def test_a_route_the_core_gives_up_on_goes_to_the_app(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pixel_middleware._adapter.decode_pixel", lambda *a, **k: None)
    response = get(wrap(hello_app, store), "/v1/pixel/track", "data=x")
    assert response.get_data() == b"hello GET /v1/pixel/track"


class RefusingRecorder(Recorder):
    """Keeps nothing, as when neither the store nor the spool takes a record."""

    def record(self, record: PixelRecord) -> bool:
        return False


@pytest.mark.parametrize(
    ("path", "query", "options", "body"),
    [
        ("/v1/pixel/track", "data=" + b64(SEGMENT_OK), {}, GIF),
        (
            "/pixel/v1/page",
            RS_PAGE_OK,
            {},
            b"Service Unavailable: the pixel could not be recorded; send it again later.\n",
        ),
        ("/pixel/v1/page", RS_PAGE_OK, {"rudderstack_response": "gif"}, GIF),
    ],
)
def test_a_pixel_nothing_kept_gets_the_503(
    path: str, query: str, options: dict[str, Any], body: bytes, store: Store
) -> None:
    recorder = RefusingRecorder(store)
    try:
        response = get(wrap(hello_app, recorder, **options), path, query)
    finally:
        recorder.close()
    assert (response.status_code, response.get_data()) == (503, body)
    assert response.headers["Retry-After"] == "5"
    assert response.headers["Cache-Control"] == NO_CACHE


def test_on_record_hears_nothing_of_a_pixel_not_kept(store: Store) -> None:
    seen: list[PixelRecord] = []
    recorder = RefusingRecorder(store)
    try:
        app = wrap(hello_app, recorder, on_record=seen.append)
        response = get(app, "/v1/pixel/track", "data=" + b64(SEGMENT_OK))
    finally:
        recorder.close()
    assert (response.status_code, response.get_data()) == (503, GIF)
    assert seen == []


class RefusingE1(Recorder):
    """Keeps every record but the one of event "E1", as a store failing for a moment."""

    def record(self, record: PixelRecord) -> bool:
        if record["event"] is not None and record["event"].get("event") == "E1":
            return False
        return super().record(record)


def test_on_record_hears_of_the_kept_records_of_a_batch_and_only_those(store: Store) -> None:
    seen: list[PixelRecord] = []
    recorder = RefusingE1(store)
    batch = [{"type": "track", "userId": "u", "event": f"E{i}"} for i in range(3)]
    try:
        app = wrap(hello_app, recorder, on_record=seen.append)
        response = Client(app).post("/v1/batch", json={"writeKey": "k1", "batch": batch})
    finally:
        recorder.close()
    assert (response.status_code, response.headers["Retry-After"]) == (503, "5")
    assert [r["event"]["event"] for r in seen] == ["E0", "E2"]
    assert seen == records(store)


def test_a_query_decoded_as_utf8_by_a_server_keeps_its_escaped_bytes(store: Store) -> None:
    # A server that broke PEP 3333 decoded the query as UTF-8, with
    # surrogateescape for the bytes that were not UTF-8 (here 0xFF).
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/pixel/v1/page").get_environ()
    environ["QUERY_STRING"] = "writeKey=k&anonymousId=a&name=\u20ac\udcff"
    b"".join(wrap(hello_app, store)(environ, _ignore))
    [record] = records(store)
    assert record["event"]["name"] == "\u20ac\ufffd"
    assert "internal_error" not in rules(record)


def test_the_core_decodes_the_route_the_middleware_matched(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The middleware matched the path to know it is a pixel: the core is handed
    # that route and does not match the path again.
    def no_second_match(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("matched twice")

    monkeypatch.setattr("pixel_middleware.core.match_route", no_second_match)
    app = wrap(hello_app, store)
    data = base64.b64encode(b'{"writeKey":"k","userId":"u","event":"Opened"}').decode()
    response = get(app, "/v1/pixel/track", f"data={data}")
    assert (response.status_code, response.get_data()) == (200, GIF)
    [record] = records(store)
    assert record["accepted"], record["problems"]
    assert get(app, "/").get_data() == b"hello GET /"
