"""The collector's JSON API and debug twins, against a real collector on a free port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.middleware.lint import LintMiddleware
from werkzeug.test import Client

from pixel_middleware import PixelRecord, api
from pixel_middleware.api import MAX_LIMIT, MAX_WAITERS, _fit, _json
from pixel_middleware.collector import create_app
from pixel_middleware.stores.memory import MemoryStore
from pixel_middleware.stores.sqlite import SQLiteStore
from tests.live_collector import LiveCollector, segment_query, stalled_collector
from tests.records import make_record


@pytest.fixture
def live() -> Iterator[LiveCollector]:
    collector = LiveCollector()
    yield collector
    collector.close()


def signup(n: int, **extra: Any) -> dict[str, Any]:
    return {"writeKey": "wk", "userId": f"u{n}", "event": "Signed Up", **extra}


def names(answer: dict[str, Any]) -> list[str]:
    return [r["event"]["userId"] for r in answer["records"]]


# /api/status ---------------------------------------------------------------


class SecretStore(MemoryStore):
    """A store whose URL holds a password, and that cannot be cleared."""

    url = "redis://:s3cret-pass@cache.internal:6379/0?token=t0ken"
    clear = None  # type: ignore[assignment]


def test_status_shows_the_store_kind_and_its_url_redacted() -> None:
    collector = LiveCollector(store=SecretStore())
    try:
        answer = collector.get("/api/status")
        assert answer.status_code == 200
        status = answer.json()
        assert status["store"] == "redis"
        assert status["storeUrl"] == "redis://:***@cache.internal:6379/0?token=***"
        assert "s3cret" not in answer.text
        assert "t0ken" not in answer.text
        assert status["spooled"] == 0
        assert status["canReset"] is False
        reset = requests.post(collector.url + "/api/reset", timeout=5)
        assert reset.status_code == 501
        assert reset.json()["error"] == "the redis store cannot be cleared from here"
    finally:
        collector.close()


def test_status_and_events_say_when_records_cannot_be_kept(tmp_path: Path) -> None:
    # Issue 8.6: when neither the store nor the spool takes a record, pixels get
    # an honest 503, and the pages keep answering and say what is wrong.
    collector = stalled_collector(tmp_path)
    try:
        assert collector.get("/api/status").json()["stalled"] is False
        # A long poll that began before: it ends on the news, with no record.
        polled: list[requests.Response] = []
        poll = threading.Thread(
            target=lambda: polled.append(collector.get("/api/events?after=0&wait=20"))
        )
        poll.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert collector.pixel(signup(1)) == 503
        assert time.monotonic() - started < 2, "refused at once, not after keep_timeout"
        poll.join(10)
        assert not poll.is_alive(), "the long poll did not end when records could not be kept"
        assert time.monotonic() - started < 10
        ((events,),) = (polled,)
        assert (events.status_code, events.json()["stalled"]) == (200, True)
        assert events.json()["records"] == []
        status = collector.get("/api/status")
        assert (status.status_code, status.json()["stalled"]) == (200, True)
        assert collector.get("/").status_code == 200
        assert collector.get("/events.json").status_code == 200
    finally:
        collector.close()


@pytest.mark.parametrize(
    ("options", "path_start", "key"),
    [
        pytest.param({}, "/v1/pixel/track?", "demo-write-key", id="default"),
        pytest.param({"prefix": "/collect"}, "/collect/v1/pixel/track?", None, id="prefix"),
        pytest.param({"write_keys": ["site-b", "site-a"]}, "/v1/pixel/track?", "site-a", id="key"),
    ],
)
def test_the_test_pixels_are_accepted_as_configured(
    options: dict[str, Any], path_start: str, key: str | None
) -> None:
    collector = LiveCollector(**options)
    try:
        pixels = collector.get("/api/status", headers={"Host": "evil.example"}).json()["testPixels"]
        assert [(p["dialect"], p["call"]) for p in pixels] == [
            ("segment", "track"),
            ("rudderstack", "page"),
        ]
        assert pixels[0]["path"].startswith(path_start), "a path: no Host is reflected"
        for pixel in pixels:
            assert collector.get(pixel["path"]).status_code == 200
        stored = [r for _, r in collector.app.store.read()]
        assert [r["accepted"] for r in stored] == [True, True], stored
        if key:
            assert {r["writeKey"] for r in stored} == {key}
    finally:
        collector.close()


# /api/events ---------------------------------------------------------------


def test_events_newest_first_by_default_and_filtered(live: LiveCollector) -> None:
    for n in range(5):
        live.pixel(signup(n, properties={"plan": "pro" if n % 2 else "free"}))
    live.pixel({"writeKey": "wk", "event": "No Identity"})
    everything = live.get("/api/events").json()
    assert len(everything["records"]) == 6
    assert everything["records"][0]["accepted"] is False, "newest first"
    assert everything["complete"] is True
    assert names(live.get("/api/events?accepted=true&limit=2").json()) == ["u4", "u3"]
    assert names(live.get("/api/events?properties.plan=pro").json()) == ["u3", "u1"]
    assert names(live.get("/api/events?userId=u2&userId=u0&order=asc").json()) == ["u0", "u2"]
    assert live.get("/api/events?q=no+identity").json()["records"][0]["accepted"] is False
    assert live.get("/api/events?event=Nope").json()["records"] == []


@pytest.mark.parametrize("matching_every", [1, 3])
def test_paging_forward_with_after_returns_the_oldest_and_skips_nothing(
    live: LiveCollector, matching_every: int
) -> None:
    for n in range(25):
        live.pixel(signup(n, properties={"k": "yes" if n % matching_every == 0 else "no"}))
    expected = [f"u{n}" for n in range(25) if n % matching_every == 0]
    seen: list[str] = []
    after: str | None = None
    for _ in range(30):
        query = "/api/events?limit=4&properties.k=yes" + (
            f"&after={after}" if after else "&order=asc"
        )
        answer = live.get(query).json()
        seen += names(answer)
        after = answer["next"]
        if not answer["more"]:
            break
    assert seen == expected
    # Nothing new: the position stays, and nothing is listed again.
    again = live.get(f"/api/events?after={after}&properties.k=yes").json()
    assert (again["records"], again["next"]) == ([], after)
    live.pixel(signup(99, properties={"k": "yes"}))
    assert names(live.get(f"/api/events?after={after}&properties.k=yes").json()) == ["u99"]


class CountingSQLiteStore(SQLiteStore):
    """A real SQLite store that counts the records its reads return."""

    rows_read = 0

    def read(self, **filters: Any) -> list[tuple[str, PixelRecord]]:
        rows = super().read(**filters)
        self.rows_read += len(rows)
        return rows


def test_paging_forward_reads_from_the_position_not_to_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CountingSQLiteStore(tmp_path / "events.db")
    store.write([make_record(id=f"r{n}") for n in range(3000)])
    positions = [position for position, _ in store.read()]
    client = Client(create_app(store=store, public_reads=True))
    store.rows_read = 0
    answer = client.get(f"/api/events?after={positions[9]}&limit=5").json
    assert [r["id"] for r in answer["records"]] == [f"r{n}" for n in range(10, 15)]
    assert (answer["next"], answer["more"], answer["complete"]) == (positions[14], True, True)
    assert store.rows_read <= api._FIRST_PAGE  # not the 2,990 records after it
    # No match: at most MAX_SCAN records are read, then it says where it stopped.
    monkeypatch.setattr(api, "MAX_SCAN", 1000)
    for start, read, complete in ((2000, 999, True), (1998, 1000, False)):
        store.rows_read = 0
        answer = client.get(f"/api/events?after={positions[start]}&userId=nobody").json
        assert (answer["records"], answer["complete"]) == ([], complete)
        assert answer["next"] == positions[start + read]
        assert store.rows_read == read
    store.close()


def test_since_keeps_the_records_received_at_or_after_it(live: LiveCollector) -> None:
    live.pixel(signup(1))
    first = live.get("/api/events").json()["records"][0]["receivedAt"]
    time.sleep(0.01)
    live.pixel(signup(2))
    assert names(live.get(f"/api/events?since={first}").json()) == ["u2", "u1"]
    later = live.get("/api/events?userId=u2").json()["records"][0]["receivedAt"]
    assert names(live.get(f"/api/events?since={later}").json()) == ["u2"]


def test_long_poll_answers_when_a_record_arrives(
    live: LiveCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No re-check by time: only the new record's notification can wake the poll.
    monkeypatch.setattr(api, "_RECHECK_SECONDS", 30.0)
    live.pixel(signup(6))
    last = live.get("/api/events").json()["next"]
    threading.Timer(0.3, live.pixel, args=(signup(7),)).start()
    started = time.monotonic()
    answer = live.get(f"/api/events?after={last}&wait=10").json()
    assert names(answer) == ["u7"]
    assert time.monotonic() - started < 5


def test_an_answer_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[PixelRecord] = [
        {"id": str(n), "padding": "x" * 100}  # type: ignore[typeddict-item]
        for n in range(3)
    ]
    two = sum(len(_json(r)) + 1 for r in records[:2])
    monkeypatch.setattr(api, "MAX_ANSWER_BYTES", 64 * 1024 + two)
    assert _fit(records) == (records[:2], True)
    monkeypatch.setattr(api, "MAX_ANSWER_BYTES", 64 * 1024 + two - 1)
    assert _fit(records) == (records[:1], True)
    monkeypatch.setattr(api, "MAX_ANSWER_BYTES", 64 * 1024 + two + len(_json(records[2])) + 1)
    assert _fit(records) == (records, False)


def test_a_truncated_page_continues_after_its_last_record(
    live: LiveCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        live.pixel(signup(n, properties={"pad": "x" * 2000}))
    size = len(_json(live.get("/api/events?limit=1").json()["records"][0]))
    monkeypatch.setattr(api, "MAX_ANSWER_BYTES", 64 * 1024 + 2 * (size + 1))
    page = live.get("/api/events?order=asc").json()
    assert (names(page), page["truncated"], page["more"]) == (["u0", "u1"], True, True)
    rest = live.get(f"/api/events?after={page['next']}").json()
    assert (names(rest), rest["truncated"]) == (["u2"], False)


# /api/counts ---------------------------------------------------------------


def test_counts_follow_the_filters(live: LiveCollector) -> None:
    for n in range(3):
        live.pixel(signup(n))
    live.pixel({"writeKey": "wk", "anonymousId": "a", "name": "Home"}, call="page")
    live.pixel({"writeKey": "wk", "event": "No Identity"})
    counts = live.get("/api/counts").json()
    assert counts == {
        "total": 5,
        "accepted": 4,
        "rejected": 1,
        "byCall": {"track": 4, "page": 1},
        "byEvent": {"Signed Up": 3, "Home": 1, "No Identity": 1},
        "byRule": {"missing_identity": 1},
        "byMachine": {},  # the test client's User-Agent names no machine
        "complete": True,
    }
    assert live.get("/api/counts?call=page").json()["total"] == 1
    assert live.get("/api/counts?accepted=false").json()["byRule"] == {"missing_identity": 1}


# /api/reset ----------------------------------------------------------------


def test_reset_clears_the_memory_store(live: LiveCollector) -> None:
    live.pixel(signup(1))
    assert live.get("/api/reset").status_code == 405
    answer = requests.post(live.url + "/api/reset", timeout=5)
    assert (answer.status_code, answer.json()) == (200, {"reset": True, "spooled": 0})
    assert live.get("/api/counts").json()["total"] == 0
    live.pixel(signup(2))
    assert names(live.get("/api/events").json()) == ["u2"]


def test_reset_refuses_another_origin(live: LiveCollector) -> None:
    live.pixel(signup(1))
    answer = requests.post(
        live.url + "/api/reset", headers={"Origin": "https://evil.example"}, timeout=5
    )
    assert answer.status_code == 403
    assert live.get("/api/counts").json()["total"] == 1
    own = requests.post(live.url + "/api/reset", headers={"Origin": live.url}, timeout=5)
    assert own.status_code == 200


@pytest.mark.parametrize("scheme", ["sqlite", "jsonl"])
def test_reset_of_a_file_store_needs_allow_reset(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}:///{tmp_path}/records.{scheme}"
    refused = LiveCollector(store=url)
    try:
        refused.pixel(signup(1))
        answer = requests.post(refused.url + "/api/reset", timeout=5)
        assert answer.status_code == 403
        assert "--allow-reset" in answer.json()["error"]
        assert refused.get("/api/status").json()["canReset"] is False
        assert refused.get("/api/counts").json()["total"] == 1
    finally:
        refused.close()
    allowed = LiveCollector(store=url, allow_reset=True)
    try:
        assert allowed.get("/api/counts").json()["total"] == 1
        assert requests.post(allowed.url + "/api/reset", timeout=5).status_code == 200
        assert allowed.get("/api/counts").json()["total"] == 0
        allowed.pixel(signup(2))
        assert names(allowed.get("/api/events").json()) == ["u2"]
    finally:
        allowed.close()


def test_allow_reset_is_checked_at_construction() -> None:
    with pytest.raises(TypeError, match="allow_reset must be True or False"):
        create_app(store="memory://", allow_reset="yes")  # type: ignore[arg-type]


# /api/wait -----------------------------------------------------------------


def test_wait_returns_as_soon_as_enough_records_match(
    live: LiveCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "_RECHECK_SECONDS", 30.0)  # woken by the records, not by time
    live.pixel(signup(1))
    assert live.get("/api/wait?count=1&userId=u1&timeout=60").status_code == 200

    def later() -> None:
        time.sleep(0.3)
        live.pixel(signup(2))
        live.pixel(signup(3))

    threading.Thread(target=later).start()
    started = time.monotonic()
    answer = live.get("/api/wait?count=3&event=Signed+Up&timeout=20")
    assert answer.status_code == 200
    assert time.monotonic() - started < 10
    assert answer.json()["count"] == 3


def test_wait_times_out_with_what_arrived_and_the_near_misses(live: LiveCollector) -> None:
    live.pixel(signup(1, properties={"plan": "pro"}))
    live.pixel(signup(2, properties={"plan": "free"}))
    live.pixel({"writeKey": "wk", "event": "Signed Up"})  # rejected: no identity
    started = time.monotonic()
    answer = live.get("/api/wait?count=2&event=Signed+Up&properties.plan=pro&timeout=0.3")
    assert time.monotonic() - started >= 0.3
    assert answer.status_code == 408
    body = answer.json()
    assert body["error"] == "timed out after 0.3 s: 1 of 2 matching record(s) arrived"
    assert names(body) == ["u1"]
    # Newest first: each fails one filter only.
    assert [(n["failed"], n["record"]["event"].get("userId")) for n in body["nearest"]] == [
        ("properties.plan", None),
        ("properties.plan", "u2"),
    ]
    [rejected] = body["rejected"]
    assert rejected["problems"] == [
        {"rule": "missing_identity", "message": "The event needs a userId or an anonymousId."}
    ]


def test_waits_beyond_the_cap_are_refused_not_queued(live: LiveCollector) -> None:
    held: list[int] = []

    def hold() -> None:
        held.append(live.get("/api/wait?userId=nobody&timeout=1.5").status_code)

    threads = [threading.Thread(target=hold) for _ in range(MAX_WAITERS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # every holder is waiting by now (each answers only after 1.5 s)
    refused = live.get("/api/wait?userId=nobody&timeout=0.1")
    for thread in threads:
        thread.join()
    assert held == [408] * MAX_WAITERS
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert live.get("/api/wait?userId=nobody&timeout=0").status_code == 408, "free again"


# Debug twins ---------------------------------------------------------------


def test_debug_twins_decode_without_recording(live: LiveCollector) -> None:
    query = segment_query(signup(1))
    answer = live.get(f"/debug/v1/pixel/track?{query}")
    assert answer.status_code == 200
    body = answer.json()
    assert (body["recorded"], body["accepted"], body["status"]) == (False, True, 200)
    assert body["event"]["userId"] == "u1"
    rejected = live.get("/debug/pixel/v1/track?writeKey=wk&event=E").json()
    assert rejected["accepted"] is False
    assert rejected["status"] == 400
    assert [p["rule"] for p in rejected["problems"]] == ["missing_identity"]
    # The collector owns its pixel roots: a mistyped call is a verdict too.
    mistyped = live.get(f"/debug/v1/pixel/trak?{query}").json()
    assert (mistyped["accepted"], mistyped["call"]) == (False, "trak")
    assert [p["rule"] for p in mistyped["problems"]] == ["unknown_call"]
    assert "track" in mistyped["problems"][0]["message"]
    assert live.get("/debug/nowhere/track").status_code == 404
    post = requests.post(f"{live.url}/debug/v1/pixel/track?{query}", timeout=5)
    assert (post.status_code, post.headers["Allow"]) == (405, "GET, HEAD")
    assert live.app.store.read() == []


# Bad parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/events?limit=0", 400, f"limit must be a whole number from 1 to {MAX_LIMIT}"),
        (f"/api/events?limit={MAX_LIMIT + 1}", 400, "limit must be a whole number"),
        ("/api/events?limit=%3Cb%3E", 400, "limit must be a whole number"),
        ("/api/events?order=%3Cb%3E", 400, "order must be asc or desc"),
        ("/api/events?after=%3Cb%3E", 400, "after is not a position of this store"),
        ("/api/events?wait=60.001", 400, "wait must be a number of seconds from 0 to 60"),
        ("/api/events?wait=nan", 400, "wait must be a number of seconds"),
        ("/api/wait?timeout=60.001", 400, "timeout must be a number of seconds from 0 to 60"),
        ("/api/wait?count=0", 400, "count must be a whole number from 1 to 1000"),
        ("/api/events?limit=1&limit=2", 400, "limit is taken once"),
        ("/api/events?call=%3Cb%3E", 400, "call must be one of"),
        ("/api/events?%3Cb%3E=1", 400, "unknown query parameter; /api/events takes after,"),
        ("/api/status?%3Cb%3E=1", 400, "unknown query parameter; /api/status takes no"),
        ("/api/%3Cb%3E", 404, "no such API path"),
    ],
)
def test_bad_parameters_get_a_fixed_message(
    live: LiveCollector, path: str, status: int, message: str
) -> None:
    answer = live.get(path)
    assert answer.status_code == status
    assert answer.json()["error"].startswith(message)
    assert "<b>" not in answer.text


def test_the_limits_at_their_bounds(live: LiveCollector) -> None:
    live.pixel(signup(1))
    for path in (
        "/api/events?limit=1",
        f"/api/events?limit={MAX_LIMIT}",
        "/api/events?wait=0",
        "/api/wait?count=1&timeout=60",
        f"/api/wait?count={MAX_LIMIT}&timeout=0",
    ):
        assert live.get(path).status_code in (200, 408), path
    assert live.get("/api/events?" + "&".join(f"userId=u{n}" for n in range(50))).ok
    too_many = live.get("/api/events?" + "&".join(f"userId=u{n}" for n in range(61)))
    assert too_many.json()["error"] == "at most 60 query parameters are taken"


# Never a 500 ---------------------------------------------------------------

_NAMES = [
    "accepted", "dialect", "call", "event", "writeKey", "userId", "anonymousId", "q", "since",
    "after", "limit", "order", "count", "properties.plan", "a..b", "x", "",
]  # fmt: skip
_ROUTES = ["/api/events", "/api/counts", "/api/wait", "/api/status", "/api/reset", "/api/x"]


def _slow(name: str, value: str) -> bool:
    """Whether a wait would really wait (the property test must stay quick)."""
    return name in ("wait", "timeout")


_VALUES = st.sampled_from(
    ["", "0", "1", "-1", "1001", "true", "false", "asc", "track", "x", "2025-01-31T12:00:00Z"]
) | st.text(max_size=12)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    route=st.sampled_from(_ROUTES),
    method=st.sampled_from(["GET", "GET", "GET", "POST", "DELETE"]),
    params=st.lists(st.tuples(st.sampled_from(_NAMES), _VALUES), max_size=4)
    | st.lists(st.tuples(st.text(max_size=8), _VALUES), max_size=4),
    raw=st.binary(max_size=20),
)
def test_no_api_request_gets_a_500(
    route: str, method: str, params: list[tuple[str, str]], raw: bytes
) -> None:
    client = Client(LintMiddleware(_APP))
    # /api/wait must not really wait: its timeout is 0 (other routes take no timeout).
    quick = [("timeout", "0")] if route == "/api/wait" else []
    query = [(k, v) for k, v in params if not _slow(k, v)] + quick
    answer = client.open(route, method=method, query_string=query, buffered=True)
    assert answer.status_code < 500 or answer.status_code == 503, answer.get_data()
    json.loads(answer.get_data())
    # A raw, possibly non-UTF-8 query string too.
    environ_query = raw.decode("latin-1")
    if route == "/api/wait":
        environ_query += "&timeout=0"
    answer = client.open(route, query_string=environ_query, buffered=True)
    assert answer.status_code < 500, answer.get_data()


_APP = create_app(store="memory://", public_reads=True)
_APP.store.write(
    [
        {
            "id": "1",
            "receivedAt": "2025-01-31T12:00:00.000Z",
            "dialect": "segment",
            "call": "track",
            "writeKey": "wk",
            "accepted": True,
            "problems": [],
            "notes": [],
            "event": {"userId": "u1", "event": "E", "properties": {"plan": "pro"}},
            "request": {"method": "GET", "path": "/", "query": "", "ip": None, "userAgent": None},
        }
    ]
)
