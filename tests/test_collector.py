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
from urllib.parse import quote, urlencode

import pytest
import requests
from collector_server import serving
from hypothesis import example, given, settings
from hypothesis import strategies as st
from records import make_record
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


def get(
    app: Any, path: str, method: str = "GET", *, peer: str = "127.0.0.1", **kw: Any
) -> TestResponse:
    """A request from ``peer`` (this machine unless said otherwise)."""
    return Client(LintMiddleware(app)).open(
        path, method=method, buffered=True, environ_base={"REMOTE_ADDR": peer}, **kw
    )


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


def test_a_mistyped_call_is_a_recorded_rejection_naming_the_closest(
    collector: PixelMiddleware,
) -> None:
    response = get(collector, "/pixel/v1/trak?writeKey=wk&anonymousId=a&event=E")
    assert response.status_code == 400  # as RudderStack answers a rejection
    assert response.headers["X-Pixel-Rejected"] == "unknown_call"
    (record,) = records(collector)
    assert (record["dialect"], record["call"], record["accepted"]) == (
        "rudderstack",
        "trak",
        False,
    )
    assert record["problems"][0]["message"].endswith("the closest is track.")


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
    assert feed(f"after={last}") == {
        "records": [],
        "last": last,
        "spooled": 0,
        "truncated": False,
        "omitted": 0,
    }


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


class LeakyStore(UnreadableStore):
    """A store whose read error holds its URL, password and write key included."""

    def read(self, **kw: Any) -> list[tuple[str, PixelRecord]]:
        raise StoreError(
            "fanout://redis://:hunter2-redis@cache:6379/0"
            " forward+https://api.segment.io?write_key=wk_live_secret: connection refused"
        )


def test_a_store_error_shown_or_logged_has_its_secrets_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(store=LeakyStore())
    try:
        with serving(app) as base:
            events = requests.get(base + "/events.json", timeout=5)
            # The page is static: it shows what the API answers.
            api = requests.get(base + "/api/events", timeout=5)
    finally:
        app.close()
    assert events.status_code == 503
    body = events.json()
    assert body["error"] == "could not read the store"
    assert body["detail"].startswith(
        "fanout://redis://:***@cache:6379/0 forward+https://api.segment.io?write_key=***"
    )
    assert body["detail"].endswith(" connection refused")
    assert api.status_code == 503
    for text in (events.text, api.text, caplog.text):
        assert "hunter2-redis" not in text
        assert "wk_live_secret" not in text
    assert "connection refused" in caplog.text


# --- bad parameters: a fixed 400, never a 500, never an echo ---------------------------

FIXED_ERRORS = {
    "limit": "limit must be a whole number from 1 to 1000",
    "accepted": "accepted must be true or false",
    "call": "call must be one of alias, group, identify, page, screen, track",
    "after": "after must be a position this store gave: the last of an earlier answer",
    "repeated": "each of limit, accepted, call and after may be given once",
}
PAGE_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


def assert_page_headers(headers: Any) -> None:
    for name, value in PAGE_SECURITY_HEADERS.items():
        assert headers.get(name) == value, name


def local_store_url(kind: str, directory: Path) -> str:
    return {
        "memory": "memory://",
        "sqlite": f"sqlite:///{directory}/pages.sqlite3",
        "jsonl": f"jsonl:///{directory}/pages.jsonl",
    }[kind]


@pytest.fixture(scope="module", params=["memory", "sqlite", "jsonl"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A collector with a few records, on a real server, for each local store."""
    directory = tmp_path_factory.mktemp(request.param)
    app = create_app(store=local_store_url(request.param, directory))
    app.store.write(
        [make_record(), make_record(call="page", accepted=False), make_record(userId="é")]
    )
    try:
        with serving(app) as base:
            yield base
    finally:
        app.close()


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
@pytest.mark.parametrize("after", ["99999999999999999999", "9223372036854775808"])
def test_a_position_too_large_for_the_store_is_400_not_500(
    kind: str, after: str, tmp_path: Path
) -> None:
    app = create_app(store=local_store_url(kind, tmp_path))
    app.store.write([make_record()])
    try:
        with serving(app) as base:
            response = requests.get(f"{base}/events.json?after={after}", timeout=5)
            # SQLite's largest position: just past every record.
            largest = requests.get(f"{base}/events.json?after=9223372036854775807", timeout=5)
    finally:
        app.close()
    assert response.status_code == 400
    assert response.json() == {"error": FIXED_ERRORS["after"]}
    assert after not in response.text
    assert_page_headers(response.headers)
    if kind == "sqlite":
        assert largest.status_code == 200
        assert largest.json()["records"] == []


@pytest.mark.parametrize(
    ("query", "error"),
    [
        pytest.param("after=<script>alert(1)</script>", "after", id="after-script"),
        pytest.param("after=1%0A2", "after", id="after-newline"),
        pytest.param("limit=<script>alert(1)</script>", "limit", id="limit-script"),
        pytest.param("limit=%D9%A3", "limit", id="limit-arabic-digit"),
        pytest.param("limit=+5", "limit", id="limit-plus"),
        pytest.param("accepted=<script>alert(1)</script>", "accepted", id="accepted-script"),
        pytest.param("call=<script>alert(1)</script>", "call", id="call-script"),
        pytest.param("call=Track", "call", id="call-case"),
        pytest.param("limit=1&limit=2", "repeated", id="repeated-limit"),
        pytest.param("after=0&after=1", "repeated", id="repeated-after"),
    ],
)
def test_a_bad_parameter_gets_a_fixed_message_that_does_not_repeat_it(
    query: str, error: str, served: str
) -> None:
    response = requests.get(f"{served}/events.json?{query}", timeout=5)
    assert response.status_code == 400
    assert response.json() == {"error": FIXED_ERRORS[error]}
    assert "script" not in response.text
    assert_page_headers(response.headers)


class PositionsSeen(MemoryStore):
    """A memory store that takes any text as a position and notes what it was given.

    The stores refuse positions that are not theirs; this one lets the
    collector's own bound on ``after`` be seen at its edge.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str | None] = []

    def read(self, **filters: Any) -> list[tuple[str, PixelRecord]]:
        self.seen.append(filters.get("after"))
        return []


@pytest.mark.parametrize(
    ("after", "status"),
    [
        pytest.param("A" * 64, 200, id="64-chars"),
        pytest.param("A" * 65, 400, id="65-chars"),
        pytest.param("1700000000000-0", 200, id="redis-stream-id"),
        pytest.param("1 2", 400, id="space"),
    ],
)
def test_the_collector_bounds_after_before_any_store_sees_it(after: str, status: int) -> None:
    store = PositionsSeen()
    app = create_app(store=store)
    try:
        response = get(app, "/events.json", query_string={"after": after})
    finally:
        app.close()
    assert response.status_code == status, response.get_data(as_text=True)
    assert store.seen == ([after] if status == 200 else [])


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("limit=1", 200, id="limit-1"),
        pytest.param("limit=1000", 200, id="limit-1000"),
        pytest.param("limit=0", 400, id="limit-0"),
        pytest.param("limit=1001", 400, id="limit-1001"),
        pytest.param("limit=", 200, id="limit-empty-is-default"),
        pytest.param("call=alias", 200, id="call-known"),
        pytest.param("accepted=false&call=page", 200, id="both"),
    ],
)
def test_parameter_bounds(query: str, status: int, collector: PixelMiddleware) -> None:
    response = get(collector, "/events.json", query_string=query)
    assert response.status_code == status, response.get_data(as_text=True)


class AnyPositionStore(MemoryStore):
    """Takes any ``after`` (and reads from the start): the bound tested is the collector's."""

    def read(self, *, after: str | None = None, **options: Any) -> list[tuple[str, PixelRecord]]:
        return super().read(**options)


@pytest.mark.parametrize(("size", "status"), [(63, 200), (64, 200), (65, 400)])
def test_after_is_capped_at_64_characters_before_any_store_sees_it(size: int, status: int) -> None:
    # The memory store itself refuses positions past 19 digits since it checks
    # them, so a store that takes anything shows where the collector's own cap is.
    app = create_app(store=AnyPositionStore())
    try:
        response = get(app, "/events.json", query_string="after=" + "1" * size)
        assert response.status_code == status, response.get_data(as_text=True)
    finally:
        app.close()


_NAMES = st.one_of(
    st.sampled_from(["limit", "accepted", "call", "after", "token", "", "limit[]"]),
    st.text(max_size=10),
)
_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.sampled_from(["", "true", "false", "track", "0", "1", "-1", "1e3", "\u0663", "null"]),
)


@settings(max_examples=60, deadline=None)
@example(path="/events.json", params=[("after", "99999999999999999999")])
@example(path="/events.json", params=[("limit", "9" * 5000)])
@given(
    path=st.sampled_from(["/", "/events.json"]),
    params=st.lists(st.tuples(_NAMES, _VALUES), max_size=6),
)
def test_no_request_to_the_pages_answers_500(
    served: str, path: str, params: list[tuple[str, str]]
) -> None:
    query = urlencode(params, quote_via=quote)
    response = requests.get(f"{served}{path}?{query}", timeout=10)
    assert response.status_code in (200, 400), (query, response.text)
    assert_page_headers(response.headers)
    if response.status_code == 400:
        assert response.json()["error"] in FIXED_ERRORS.values()


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


# --- /events.json is bounded in bytes ----------------------------------------------------

MAX_JSON_BYTES = 4 * 1024 * 1024  # documented in the README and the collector's docstring


def padded(size: int) -> PixelRecord:
    """A record whose JSON is ``size`` bytes longer than with no padding."""
    return make_record(properties={"pad": "x" * size})


def fetch(base: str, query: str = "") -> tuple[int, dict[str, Any]]:
    response = requests.get(f"{base}/events.json?{query}", timeout=30)
    assert response.status_code == 200, response.text
    return len(response.content), response.json()


def test_events_json_stops_at_its_byte_budget_and_pages_on_from_there() -> None:
    app = create_app(store="memory://")
    written = [padded(300_000) for _ in range(40)]  # 12 MB in all
    app.store.write(written)
    try:
        with serving(app) as base:
            size, first = fetch(base, "limit=100")
            assert size <= MAX_JSON_BYTES
            assert first["truncated"] is True
            # The oldest that fit, and `last` is the last of them.
            assert len(first["records"]) == MAX_JSON_BYTES // 300_000
            assert [r["id"] for r in first["records"]] == [
                r["id"] for r in written[: len(first["records"])]
            ]
            seen = first["records"]
            last = first["last"]
            for _ in range(10):
                size, page = fetch(base, f"limit=100&after={last}")
                assert size <= MAX_JSON_BYTES
                seen += page["records"]
                last = page["last"]
                if not page["truncated"]:
                    break
    finally:
        app.close()
    assert [r["id"] for r in seen] == [r["id"] for r in written]
    assert page["omitted"] == 0


def test_an_answer_of_exactly_the_byte_budget_is_whole_and_one_byte_more_is_not() -> None:
    def answer(pad: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        app = create_app(store="memory://")
        app.store.write([make_record(), padded(pad)])
        try:
            with serving(app) as base:
                size, first = fetch(base)
                _, rest = fetch(base, f"after={first['last']}")
        finally:
            app.close()
        return size, first, rest

    small, whole, _ = answer(0)
    assert whole["truncated"] is False
    # Each byte of padding is one byte of answer: fill the budget exactly.
    exact = MAX_JSON_BYTES - small
    size, whole, _ = answer(exact)
    assert size == MAX_JSON_BYTES
    assert (len(whole["records"]), whole["truncated"]) == (2, False)

    size, cut, rest = answer(exact + 1)
    assert size < MAX_JSON_BYTES
    assert (len(cut["records"]), cut["truncated"]) == (1, True)
    assert cut["last"] == "0"  # the first record's position: the next page starts after it
    assert [len(r["properties"]["pad"]) for r in rest["records"]] == [exact + 1]
    assert rest["truncated"] is False


def test_a_record_too_large_for_any_answer_is_counted_and_passed_over() -> None:
    app = create_app(store="memory://")
    after_it = make_record()
    app.store.write([padded(MAX_JSON_BYTES), after_it])
    try:
        with serving(app) as base:
            size, page = fetch(base)
    finally:
        app.close()
    assert size < MAX_JSON_BYTES
    assert [r["id"] for r in page["records"]] == [after_it["id"]]
    assert (page["omitted"], page["truncated"], page["last"]) == (1, False, "1")


# --- reading records is not public -------------------------------------------------------

TOKEN = "read-token-0123456789abcdef"
PUBLIC_PEER = "203.0.113.9"
REFUSED_START = "Forbidden: the collector's pages show what people sent"


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[PixelMiddleware]:
    monkeypatch.delenv("PIXEL_READ_TOKEN", raising=False)
    app = create_app(store="memory://", read_token=TOKEN)
    yield app
    app.close()


def assert_refused(response: TestResponse) -> None:
    assert response.status_code == 403
    text = response.get_data(as_text=True)
    assert text.startswith(REFUSED_START)
    assert "Authorization: Bearer TOKEN" in text
    assert TOKEN not in text
    assert_page_headers(response.headers)


# Every path that is not a pixel: the pages of today and those being added.
PAGE_PATHS = ["/", "/events.json", "/events.json?limit=5", "/api/records", "/static/app.js", "/x"]


# LintMiddleware does not know that a HEAD answer keeps GET's Content-Length.
@pytest.mark.filterwarnings(
    "ignore:Content-Length and the number of bytes:werkzeug.middleware.lint.WSGIWarning"
)
@pytest.mark.parametrize("path", PAGE_PATHS)
def test_pages_refuse_another_machine_without_the_token(
    path: str, guarded: PixelMiddleware
) -> None:
    assert_refused(get(guarded, path, peer=PUBLIC_PEER))
    head = get(guarded, path, "HEAD", peer=PUBLIC_PEER)
    assert (head.status_code, head.get_data()) == (403, b"")
    assert_page_headers(head.headers)


def test_pixels_stay_public(guarded: PixelMiddleware) -> None:
    event = {"writeKey": "k", "userId": "u", "event": "Opened"}
    pixel = get(guarded, "/v1/pixel/track", peer=PUBLIC_PEER, query_string="data=" + b64(event))
    assert (pixel.status_code, pixel.get_data()) == (200, GIF)
    [record] = records(guarded)
    assert record["request"]["ip"] == PUBLIC_PEER


@pytest.mark.parametrize(
    ("headers", "query", "allowed"),
    [
        pytest.param({"Authorization": f"Bearer {TOKEN}"}, "", True, id="bearer"),
        pytest.param({"Authorization": f"bearer  {TOKEN} "}, "", True, id="bearer-spacing"),
        pytest.param({}, f"token={TOKEN}", True, id="query"),
        pytest.param({}, f"token=wrong&token={TOKEN}", True, id="second-query-value"),
        pytest.param({"Authorization": f"Bearer {TOKEN[:-1]}"}, "", False, id="one-short"),
        pytest.param({"Authorization": f"Bearer {TOKEN}x"}, "", False, id="one-long"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, "", False, id="basic"),
        pytest.param({"Authorization": TOKEN}, "", False, id="no-scheme"),
        pytest.param({}, f"token={TOKEN.upper()}", False, id="case"),
        pytest.param({}, "token=", False, id="empty"),
        pytest.param({}, "token=%C3%A9" * 3, False, id="unicode"),
    ],
)
def test_the_read_token_opens_the_pages_to_another_machine(
    headers: dict[str, str], query: str, allowed: bool, guarded: PixelMiddleware
) -> None:
    for path in ("/", "/events.json"):
        response = get(guarded, path, peer=PUBLIC_PEER, headers=headers, query_string=query)
        if allowed:
            assert response.status_code == 200
            assert TOKEN not in response.get_data(as_text=True)
        else:
            assert_refused(response)


@pytest.mark.parametrize(
    ("peer", "headers", "allowed"),
    [
        pytest.param("127.0.0.1", {}, True, id="127.0.0.1"),
        pytest.param("127.255.255.254", {}, True, id="top-of-127/8"),
        pytest.param("::1", {}, True, id="ipv6-loopback"),
        pytest.param("::ffff:127.0.0.1", {}, True, id="ipv4-mapped-loopback"),
        pytest.param("128.0.0.0", {}, False, id="just-above-127/8"),
        pytest.param("126.255.255.255", {}, False, id="just-below-127/8"),
        pytest.param("::2", {}, False, id="ipv6-not-loopback"),
        pytest.param("10.0.0.1", {}, False, id="private-network"),
        pytest.param("", {}, False, id="no-address"),
        pytest.param("localhost", {}, False, id="a-name"),
        pytest.param("127.0.0.1", {"X-Forwarded-For": "127.0.0.1"}, False, id="proxied-xff"),
        pytest.param("127.0.0.1", {"Forwarded": "for=127.0.0.1"}, False, id="proxied-forwarded"),
        pytest.param("127.0.0.1", {"X-Real-IP": "127.0.0.1"}, False, id="proxied-x-real-ip"),
        pytest.param(PUBLIC_PEER, {"X-Forwarded-For": "127.0.0.1"}, False, id="claims-local"),
    ],
)
def test_only_this_machine_reads_records_without_a_token(
    peer: str, headers: dict[str, str], allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIXEL_READ_TOKEN", raising=False)
    # trusted_proxies decides the recorded IP, never who reads the records.
    app = create_app(store="memory://", trusted_proxies=1)
    try:
        response = get(app, "/events.json", peer=peer, headers=headers)
    finally:
        app.close()
    if allowed:
        assert response.status_code == 200
    else:
        assert_refused(response)


def test_the_read_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXEL_READ_TOKEN", TOKEN)
    app = create_app(store="memory://")
    try:
        assert_refused(get(app, "/", peer=PUBLIC_PEER))
        with_token = get(app, "/", peer=PUBLIC_PEER, headers={"Authorization": f"Bearer {TOKEN}"})
        assert with_token.status_code == 200
    finally:
        app.close()


def test_public_reads_opens_the_pages_to_anyone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXEL_READ_TOKEN", TOKEN)  # an explicit opt-out wins over it
    app = create_app(store="memory://", public_reads=True)
    try:
        assert get(app, "/events.json", peer=PUBLIC_PEER).status_code == 200
    finally:
        app.close()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"read_token": "x" * 15}, ValueError, "16 to 256", id="15-chars"),
        pytest.param({"read_token": "x" * 257}, ValueError, "16 to 256", id="257-chars"),
        pytest.param({"read_token": "with space 12345"}, ValueError, "without spaces", id="space"),
        pytest.param({"read_token": "é" * 16}, ValueError, "ASCII", id="not-ascii"),
        pytest.param({"read_token": 1234567890123456}, TypeError, "a string", id="not-str"),
        pytest.param(
            {"read_token": TOKEN, "public_reads": True}, ValueError, "adds nothing", id="both"
        ),
        pytest.param({"public_reads": "yes"}, TypeError, "True or False", id="public-not-bool"),
    ],
)
def test_read_access_options_are_checked_before_the_store_is_opened(
    options: dict[str, Any], error: type[Exception], message: str, tmp_path: Path
) -> None:
    store = tmp_path / "never.sqlite3"
    with pytest.raises(error, match=message) as raised:
        create_app(store=f"sqlite:///{store}", **options)
    token = options.get("read_token")
    if isinstance(token, str):
        assert token not in str(raised.value)
    assert not store.exists()


@pytest.mark.parametrize("size", [16, 256])
def test_read_tokens_of_the_boundary_lengths_work(size: int) -> None:
    token = "t" * size
    app = create_app(store="memory://", read_token=token)
    try:
        response = get(app, "/", peer=PUBLIC_PEER, query_string=f"token={token}")
        assert response.status_code == 200
        assert "ReadAccess(public=False, token=set)" in repr(app)
        assert token not in repr(app)
    finally:
        app.close()


def test_a_real_server_serves_its_own_machine_and_refuses_proxied_requests(
    guarded: PixelMiddleware,
) -> None:
    with serving(guarded) as base:
        local = requests.get(base + "/events.json", timeout=5)
        proxied = requests.get(
            base + "/events.json", headers={"X-Forwarded-For": "198.51.100.7"}, timeout=5
        )
        proxied_with_token = requests.get(
            base + "/events.json",
            headers={"X-Forwarded-For": "198.51.100.7", "Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
    assert local.status_code == 200
    assert proxied.status_code == 403
    assert proxied.text.startswith(REFUSED_START)
    assert proxied_with_token.status_code == 200
