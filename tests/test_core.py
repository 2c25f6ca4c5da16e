"""Tests for pixel_middleware.core: the shared case table, configuration, routes, limits."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from cases import (
    BODY_CASES,
    CASES,
    CORE_ONLY_CASES,
    NOT_PIXELS,
    PEER,
    Case,
    case_config,
    case_request,
    segment_data,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from vendor_cases import VENDOR_CASES

from pixel_middleware.core import (
    ALLOWED_METHODS,
    GIF,
    NOTES,
    RULES,
    Limits,
    PixelConfig,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    Route,
    decode_pixel,
    match_route,
    not_kept_answer,
    split_target,
)
from pixel_middleware.dialects import base

NOW = datetime(2026, 11, 23, 16, 20, 5, 123456, tzinfo=UTC)
NOW_TEXT = "2026-11-23T16:20:05.123Z"
DEFAULT = PixelConfig()
NO_CACHE = {
    "Cache-Control": "no-cache, no-store, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "0",
}


def decode(request: PixelRequest, config: PixelConfig = DEFAULT, **kwargs: Any) -> PixelOutcome:
    outcome = decode_pixel(request, config=config, now=kwargs.pop("now", NOW), **kwargs)
    assert outcome is not None
    return outcome


def get(target: bytes, config: PixelConfig = DEFAULT, **request: Any) -> PixelOutcome:
    path, query = split_target(target)
    return decode(PixelRequest("GET", path, query, **request), config)


def rules(record: PixelRecord | None) -> set[str]:
    assert record is not None
    return {problem["rule"] for problem in record["problems"]}


def notes(record: PixelRecord | None) -> set[str]:
    assert record is not None
    return {note["rule"] for note in record["notes"]}


def assert_plain_json(record: PixelRecord) -> None:
    """Storable anywhere: strict JSON, encodable as UTF-8, and back to the same data."""
    text = json.dumps(record, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert json.loads(text) == record


# --- the shared table -----------------------------------------------------------------


ALL_CASES = CASES + CORE_ONLY_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_case(case: Case) -> None:
    outcome = decode(case_request(case), case_config(case))
    assert outcome.status == case.expect_status
    headers = dict(outcome.headers)
    assert len(headers) == len(outcome.headers), "a header is repeated"
    assert NO_CACHE.items() <= headers.items()
    rejected = headers.get("X-Pixel-Rejected")
    assert (set(rejected.split(", ")) if rejected else set()) == case.expect_rules

    if case.method == "HEAD":
        assert outcome.body == b""
        assert outcome.record is None
        as_get = decode(dataclasses.replace(case_request(case), method="GET"), case_config(case))
        assert (outcome.status, outcome.headers) == (as_get.status, as_get.headers)
        return
    assert headers["Content-Length"] == str(len(outcome.body))
    if outcome.status == 405:
        assert headers["Allow"] == ALLOWED_METHODS
        assert headers["Content-Type"].startswith("text/plain")
        assert outcome.record is None
        assert case.expect_accepted is None
        return

    record = outcome.record
    assert record is not None
    assert record["accepted"] is case.expect_accepted
    assert record["accepted"] == (not record["problems"])
    assert rules(record) == case.expect_rules
    assert notes(record) == case.expect_notes
    assert record["receivedAt"] == NOW_TEXT
    assert record["request"]["method"] == "GET"
    sent = {name.lower(): value for name, value in case.headers.items()}
    for name, kept in (("user-agent", "userAgent"), ("referer", "referer")):
        value = sent.get(name)
        assert record["request"][kept] == (None if value is None else value[:1024]), name  # type: ignore[literal-required]
    assert_plain_json(record)
    if case.check is not None:
        case.check(record["event"])

    if outcome.status == 400:
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert outcome.body.decode("utf-8").splitlines() == list(
            dict.fromkeys(problem["message"] for problem in record["problems"])
        )
    elif headers["Content-Type"] == "image/gif":
        assert outcome.body == GIF
    else:
        assert (outcome.body, headers["Content-Type"]) == (b"OK", "text/plain; charset=utf-8")


def test_the_table_covers_every_rule_and_note() -> None:
    every = ALL_CASES + BODY_CASES + VENDOR_CASES
    assert set().union(*(case.expect_rules for case in every)) == set(RULES)
    assert set().union(*(case.expect_notes for case in every)) == set(NOTES)
    for dialect in ("segment", "rudderstack"):
        ids = [case.id for case in CASES if case.id.startswith(dialect)]
        assert len(ids) > 20, dialect


def test_docs_name_every_rule_and_note() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "dialects.md").read_text("utf-8")
    for name in (*RULES, *NOTES):
        assert f"| `{name}` |" in docs, name


def test_case_ids_are_unique() -> None:
    every = ALL_CASES + BODY_CASES
    assert len({case.id for case in every}) == len(every)


@pytest.mark.parametrize("case", BODY_CASES, ids=[case.id for case in BODY_CASES])
def test_body_case(case: Case) -> None:
    outcome = decode(case_request(case), case_config(case))
    assert outcome.status == case.expect_status
    headers = dict(outcome.headers)
    assert NO_CACHE.items() <= headers.items()
    assert headers["Content-Length"] == str(len(outcome.body))
    records = outcome.records
    assert [record["call"] for record in records] == list(case.expect_calls)
    assert outcome.record is records[0]
    problems = [p for record in records for p in record["problems"]]
    assert {p["rule"] for p in problems} == case.expect_rules
    assert {n["rule"] for record in records for n in record["notes"]} == case.expect_notes
    rejected = headers.get("X-Pixel-Rejected")
    assert (set(rejected.split(", ")) if rejected else set()) == case.expect_rules
    assert (
        all(
            record["accepted"] is case.expect_accepted
            for record in records
            if not record["problems"]
        )
        or not case.expect_accepted
    )
    assert any(not r["accepted"] for r in records) is (not case.expect_accepted)
    ids = {record["id"] for record in records}
    assert len(ids) == len(records)
    for record in records:
        assert record["receivedAt"] == NOW_TEXT
        assert record["request"]["method"] == "POST"
        assert record["accepted"] == (not record["problems"])
        assert_plain_json(record)
        if record["accepted"]:
            assert record["writeKey"] == "wk_2Xq9"
            assert record["event"] is not None
            assert record["event"]["type"] == record["call"]
            assert record["event"]["context"]["userAgent"] == case.headers["User-Agent"]
    if case.check is not None:
        case.check(records[0]["event"])
    # Nothing of the request is repeated in the answer: only fixed messages.
    assert b"wk_2Xq9" not in outcome.body
    dialect = case_config(case).dialects
    if "segment" in dialect and not case.target.startswith(b"/beacon/"):
        assert headers["Content-Type"] == "application/json"
        answer = json.loads(outcome.body)
        assert answer["success"] is (outcome.status == 200)
    elif outcome.status == 200:
        assert (outcome.body, headers["Content-Type"]) == (b"OK", "text/plain; charset=utf-8")
    else:
        assert outcome.body.decode().splitlines() == list(
            dict.fromkeys(p["message"] for p in problems)
        )


@pytest.mark.parametrize("target", NOT_PIXELS, ids=lambda target: target.decode())
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_not_a_pixel(target: bytes, method: str) -> None:
    path, query = split_target(target)
    assert match_route(path, DEFAULT) is None
    assert decode_pixel(PixelRequest(method, path, query), config=DEFAULT, now=NOW) is None


def test_segment_always_answers_the_gif() -> None:
    for case in CASES:
        if case.target.startswith(b"/v1/") and case.method == "GET":
            outcome = decode(case_request(case), case_config(case))
            assert (outcome.status, outcome.body) == (200, GIF), case.id


def test_record_shape() -> None:
    outcome = get(
        b"/v1/pixel/page?data=" + segment_data({"writeKey": "k", "userId": "u"}).encode(),
        peer="203.0.113.9",
        user_agent="UA/1",
        referer="https://mail.example/",
    )
    record = outcome.record
    assert record is not None
    assert list(record) == [
        "id",
        "receivedAt",
        "dialect",
        "call",
        "writeKey",
        "accepted",
        "problems",
        "notes",
        "event",
        "request",
    ]
    assert record["dialect"] == "segment"
    assert record["call"] == "page"
    assert record["writeKey"] == "k"
    assert record["request"] == {
        "method": "GET",
        "path": "/v1/pixel/page",
        "query": "data=" + segment_data({"writeKey": "k", "userId": "u"}),
        "ip": "203.0.113.9",
        "userAgent": "UA/1",
        "referer": "https://mail.example/",
    }
    assert record["event"] == {
        "userId": "u",
        "type": "page",
        "messageId": record["event"]["messageId"],  # type: ignore[index]
        "receivedAt": NOW_TEXT,
        "timestamp": NOW_TEXT,
        "context": {"ip": "203.0.113.9", "userAgent": "UA/1"},
    }


def test_write_key_kept_when_the_event_cannot_be_decoded() -> None:
    record = get(b"/v1/pixel/track?data=!!&writeKey=k").record
    assert record is not None
    assert (record["writeKey"], record["event"], rules(record)) == ("k", None, {"bad_base64"})


# --- ids and time ---------------------------------------------------------------------


def test_default_ids_are_uuid4() -> None:
    record = get(b"/pixel/v1/track?writeKey=k&anonymousId=a&event=E").record
    assert record is not None
    assert record["event"] is not None
    for text in (record["id"], record["event"]["messageId"]):
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
    assert record["id"] != record["event"]["messageId"]


def test_default_ids_are_unique_across_threads() -> None:
    # Ids come from one shared supply of random bytes, refilled as threads drain it.
    def draw() -> list[str]:
        return [base._uuid4() for _ in range(3_000)]

    with ThreadPoolExecutor(8) as pool:
        drawn = [text for batch in pool.map(lambda _: draw(), range(8)) for text in batch]
    assert len(set(drawn)) == len(drawn) == 24_000


def test_a_forked_child_makes_other_default_ids_than_its_parent() -> None:
    # As in a pre-forking server that decoded a pixel before forking: the
    # parent's unused random bytes must not become the child's ids too.
    script = """if True:
        import os, sys
        from pixel_middleware.dialects.base import _uuid4
        _uuid4()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, " ".join(_uuid4() for _ in range(5)).encode())
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        print(status, " ".join(_uuid4() for _ in range(5)), os.read(read, 4096).decode())
        """
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    status, *ids = done.stdout.split()
    assert status == "0"
    assert len(ids) == len(set(ids)) == 10, ids


@settings(max_examples=300)
@given(
    st.text(st.sampled_from("0123456789-+:.TZ tW"), max_size=40)
    | st.datetimes(timezones=st.just(None) | st.timezones()).map(lambda moment: moment.isoformat())
)
@example("0001-01-01T00:00:00+01:00")  # before year 1 in UTC: an overflow
@example("9999-12-31T23:59:59-01:00")  # after year 9999 in UTC
@example("2026-11-23T16:20:05.123Z")
def test_is_time_says_whether_a_time_parses(text: str) -> None:
    assert base._is_time(text) is (base._parse_time(text) is not None)
    # sentAt equal to originalTimestamp: nothing to correct, receivedAt if it is a time.
    event = {"originalTimestamp": text, "sentAt": text}
    expected = text if base._parse_time(text) is None else NOW_TEXT
    assert base._timestamp(event, NOW, NOW_TEXT) == expected


@settings(max_examples=300)
@given(st.datetimes(timezones=st.none() | st.timezones()))
@example(datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))  # before year 1 in UTC
def test_utc_naive_is_the_utc_time_without_its_zone(moment: datetime) -> None:
    try:
        expected = moment if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:
        with pytest.raises(OverflowError):
            base._utc_naive(moment)
        return
    naive = base._utc_naive(moment)
    assert naive.tzinfo is None
    assert naive == expected.replace(tzinfo=None)


def test_same_request_same_record_bar_ids() -> None:
    request = case_request(CASES[0])
    counter = itertools.count()
    first = decode(request, new_id=lambda: f"a{next(counter)}").record
    second = decode(request).record
    assert first is not None
    assert second is not None
    assert first["event"] is not None
    assert (first["id"], first["event"]["messageId"]) == ("a0", "a1")
    first["id"] = second["id"]
    first["event"]["messageId"] = second["event"]["messageId"]  # type: ignore[index]
    assert first == second


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "2026-01-02T03:04:05.678Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 999999), "2026-01-02T03:04:05.999Z"),  # naive: UTC
        (
            datetime(2026, 1, 2, 4, 4, 6, tzinfo=timezone(timedelta(hours=1))),
            "2026-01-02T03:04:06.000Z",
        ),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
    ],
    ids=["utc", "naive", "plus-one-hour", "year-one"],
)
def test_received_at(now: datetime, expected: str) -> None:
    path, query = split_target(b"/pixel/v1/track?writeKey=k&anonymousId=a&event=E")
    record = decode(PixelRequest("GET", path, query), now=now).record
    assert record is not None
    assert record["event"] is not None
    assert record["receivedAt"] == record["event"]["receivedAt"] == expected


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ({}, NOW_TEXT),
        ({"originalTimestamp": "2020-01-01T00:00:00Z"}, "2020-01-01T00:00:00Z"),
        (
            {"originalTimestamp": "2020-01-01T00:00:00Z", "sentAt": "2020-01-01T00:00:01.5Z"},
            "2026-11-23T16:20:03.623Z",
        ),
        (  # offsets and naive times (taken as UTC) mix
            {"originalTimestamp": "2020-01-01T01:00:00+01:00", "sentAt": "2020-01-01T00:00:02"},
            "2026-11-23T16:20:03.123Z",
        ),
        (
            {"originalTimestamp": "2020-01-01T00:00:00Z", "sentAt": "yesterday"},
            "2020-01-01T00:00:00Z",
        ),
        (  # the correction overflows: fall back to originalTimestamp
            {"originalTimestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"},
            "0001-01-01T00:00:00Z",
        ),
        ({"sentAt": "2020-01-01T00:00:00Z"}, NOW_TEXT),
        ({"originalTimestamp": 5}, NOW_TEXT),  # invalid_field, and no timestamp from it
    ],
    ids=["none", "original", "corrected", "offsets", "bad-sent", "overflow", "sent-only", "num"],
)
def test_timestamp(sent: dict[str, Any], expected: str) -> None:
    data = segment_data({"writeKey": "k", "userId": "u", "event": "E", **sent})
    record = get(f"/v1/pixel/track?data={data}".encode()).record
    assert record is not None
    assert record["event"] is not None
    assert record["event"]["timestamp"] == expected


# --- the client ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trusted", "forwarded", "expected"),
    [
        (0, "198.51.100.1", PEER),
        (1, "198.51.100.1", "198.51.100.1"),
        (1, "198.51.100.1, 203.0.113.5", "203.0.113.5"),
        (2, "198.51.100.1, 203.0.113.5", "198.51.100.1"),
        (3, "198.51.100.1, 203.0.113.5", PEER),
        (2, "198.51.100.1,, 203.0.113.5 ,", "198.51.100.1"),  # empty entries do not count
        (1, "", PEER),
        (1, None, PEER),
    ],
)
def test_client_ip(trusted: int, forwarded: str | None, expected: str) -> None:
    config = PixelConfig(trusted_proxies=trusted)
    record = get(
        b"/pixel/v1/track?writeKey=k&anonymousId=a&event=E",
        config,
        peer=PEER,
        forwarded_for=forwarded,
    ).record
    assert record is not None
    assert record["event"] is not None
    assert record["request"]["ip"] == record["event"]["context"]["ip"] == expected


def test_no_peer_no_ip() -> None:
    record = get(b"/pixel/v1/track?writeKey=k&anonymousId=a&event=E").record
    assert record is not None
    assert record["request"]["ip"] is None
    assert "context" not in record["event"]  # type: ignore[operator]


@pytest.mark.parametrize(
    ("wsgi_text", "shown"),
    [
        ("curl/8.5", "curl/8.5"),
        ("caf\xc3\xa9/1", "café/1"),  # UTF-8 bytes, read as latin-1 by WSGI
        ("caf\xe9/1", "caf\ufffd/1"),  # latin-1 bytes: not UTF-8
        ("ü€", "ü€"),  # already text (not WSGI-style): kept
        ("a\udce9b€", "a\ufffdb€"),  # a lone surrogate never reaches the record
    ],
    ids=["ascii", "utf8", "latin1", "text", "surrogate"],
)
def test_user_agent_text(wsgi_text: str, shown: str) -> None:
    record = get(b"/pixel/v1/track?writeKey=k&anonymousId=a&event=E", user_agent=wsgi_text).record
    assert record is not None
    assert record["request"]["userAgent"] == record["event"]["context"]["userAgent"] == shown  # type: ignore[index]
    assert_plain_json(record)


# --- answers ---------------------------------------------------------------------------


def test_rejection_text_never_echoes_input() -> None:
    hostile = "%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    config = PixelConfig(write_keys=frozenset({"k"}))
    outcome = get(
        f"/pixel/v1/track?writeKey={hostile}&anonymousId=&event=&properties={hostile}"
        f"&messageId={'m' * 200}".encode(),
        config,
    )
    assert outcome.status == 400
    headers = dict(outcome.headers)
    for text in (outcome.body.decode(), headers["X-Pixel-Rejected"]):
        assert "script" not in text
        assert "mmm" not in text
    assert rules(outcome.record) == {
        "unknown_write_key",
        "missing_identity",
        "missing_event",
        "invalid_field",
        "message_id_too_long",
    }


def test_header_lists_are_fresh() -> None:
    first = get(b"/v1/pixel/track?data=!")
    first.headers.append(("X-Mine", "1"))
    second = get(b"/v1/pixel/track?data=!")
    assert ("X-Mine", "1") not in second.headers


def test_notes_name_parameters_briefly() -> None:
    names = [f"p{i}" for i in range(12)] + ["x" * 100]
    query = "&".join(f"{name}=1" for name in names)
    record = get(f"/v1/pixel/track?data=e30&{query}".encode()).record
    assert record is not None
    (note,) = [note for note in record["notes"] if note["rule"] == "params_ignored"]
    assert note["message"].endswith('"p9" and 3 more')
    assert '"p0", "p1"' in note["message"]
    long_record = get(f"/v1/pixel/track?data=e30&{'y' * 100}=1".encode()).record
    assert long_record is not None
    (long_note,) = [note for note in long_record["notes"] if note["rule"] == "params_ignored"]
    assert long_note["message"].endswith('"' + "y" * 64 + '..."')


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prefix": "collect"}, "prefix must be '' or start with '/'"),
        ({"prefix": "/collect/"}, "not end with '/'"),
        ({"prefix": "/"}, "not end with '/'"),
        ({"prefix": None}, "prefix must be"),
        ({"dialects": frozenset()}, "non-empty subset"),
        ({"dialects": frozenset({"no_such_dialect"})}, "non-empty subset of"),
        ({"dialects": "segment"}, r"frozenset\(\{'segment'\}\), not a string"),
        ({"dialects": 5}, "set of names"),
        ({"write_keys": "abc"}, "not a string"),
        ({"write_keys": frozenset()}, "pass None to accept any key"),
        ({"write_keys": frozenset({""})}, "non-empty strings"),
        ({"write_keys": 5}, "set of strings or None"),
        ({"trusted_proxies": -1}, "trusted_proxies must be an integer >= 0"),
        ({"trusted_proxies": True}, "trusted_proxies"),
        ({"trusted_proxies": 1.0}, "trusted_proxies"),
        ({"limits": {"max_depth": 3}}, r"Limits\(\.\.\.\) instance"),
        ({"rudderstack_response": "ok"}, "'seed' .* or 'gif'"),
        ({"unknown_calls": "drop"}, "unknown_calls must be 'pass' .* or 'reject'"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_bad_config(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PixelConfig(**options)


@pytest.mark.parametrize("name", [field.name for field in dataclasses.fields(Limits)])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_bad_limits(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"Limits.{name} must be a positive integer"):
        Limits(**{name: value})


def test_config_normalises_collections() -> None:
    config = PixelConfig(dialects={"segment"}, write_keys=["a", "b"])  # type: ignore[arg-type]
    assert config.dialects == frozenset({"segment"})
    assert config.write_keys == frozenset({"a", "b"})
    assert config == PixelConfig(dialects=frozenset({"segment"}), write_keys=frozenset("ab"))
    assert hash(config) == hash(dataclasses.replace(config))
    assert "routes" not in repr(config)


def test_replace_recomputes_routes() -> None:
    config = dataclasses.replace(DEFAULT, prefix="/x")
    assert match_route("/x/v1/pixel/track", config) == Route("segment", "track")
    assert match_route("/v1/pixel/track", config) is None


# --- routes and targets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "config", "expected"),
    [
        ("/v1/pixel/track", DEFAULT, Route("segment", "track")),
        ("/v1/pixel/identify", DEFAULT, Route("segment", "identify")),
        ("/pixel/v1/page", DEFAULT, Route("rudderstack", "page")),
        ("/pixel/v1/page", PixelConfig(dialects=frozenset({"segment"})), None),
        ("/v1/pixel/page", PixelConfig(dialects=frozenset({"rudderstack"})), None),
        ("/p/pixel/v1/track", PixelConfig(prefix="/p"), Route("rudderstack", "track")),
        ("/pixel/v1/track", PixelConfig(prefix="/p"), None),
        ("/p/v1/pixel/alias", PixelConfig(prefix="/p"), Route("segment", "alias")),
        ("", DEFAULT, None),
    ],
)
def test_match_route(path: str, config: PixelConfig, expected: Route | None) -> None:
    assert match_route(path, config) == expected


def test_every_call_has_a_route() -> None:
    for dialect, root in (("segment", "/v1/pixel/"), ("rudderstack", "/pixel/v1/")):
        for call in ("page", "track"):
            assert match_route(root + call, DEFAULT) == Route(dialect, call)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/v1/pixel/track?data=abc", "/v1/pixel/track", b"data=abc"),
        (b"/v1/pixel/tr%61ck?x=%41", "/v1/pixel/track", b"x=%41"),
        (b"/a%2Fb", "/a/b", b""),
        (b"/a%zz%4", "/a%zz%4", b""),
        (b"/caf%C3%A9", "/caf\xc3\xa9", b""),  # bytes read as latin-1, as PATH_INFO
        (b"/caf\xc3\xa9", "/caf\xc3\xa9", b""),
        (b"/p?a?b", "/p", b"a?b"),
        (b"/p?", "/p", b""),
        (b"http://example.com:8080/v1/pixel/track?d=1", "/v1/pixel/track", b"d=1"),
        (b"https://example.com?d=1", "/", b"d=1"),
        (b"", "", b""),
        (b"*", "*", b""),
        # Found by mutation testing: an origin-form path holding "://" stays whole;
        # only the first "://" ends the scheme; and the scheme and "://" must end
        # within the first 16 bytes (13 letters and "://": absolute; 14: not).
        (b"/a://b/c", "/a://b/c", b""),
        (b"http://h/a://b/c://d", "/a://b/c://d", b""),
        (b"abcdefghijklm://h/p", "/p", b""),
        (b"http:///v1/pixel/track?d=1", "/v1/pixel/track", b"d=1"),  # no authority
        (b"abcdefghijklmn://h/p", "abcdefghijklmn://h/p", b""),
    ],
)
def test_split_target(target: bytes, path: str, query: bytes) -> None:
    assert split_target(target) == (path, query)


# --- limits: rejected, and fast -------------------------------------------------------


def _fast(target: bytes, config: PixelConfig = DEFAULT) -> PixelOutcome:
    start = time.perf_counter()
    outcome = get(target, config)
    assert time.perf_counter() - start < 1.0
    return outcome


BIG = PixelConfig(limits=Limits(max_query_bytes=10**7, max_event_bytes=10**7))


@pytest.mark.parametrize(
    ("target", "config", "rule"),
    [
        (b"/v1/pixel/track?data=" + b"A" * 10**7, DEFAULT, "too_large"),
        (b"/pixel/v1/page?" + b"&".join([b"a=1"] * 10_000), DEFAULT, "too_many_params"),
        (b"/pixel/v1/page?" + b"&" * 100_000 + b"a=1", DEFAULT, None),  # empty pieces skipped
        (b"/v1/pixel/track?data=" + b"%5B" * 100_000, BIG, "too_deep"),
        (b"/v1/pixel/track?data=" + b"%7B%22a%22%3A" * 100_000, BIG, "too_deep"),
        (
            b"/v1/pixel/track?data="
            + segment_data(
                {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}
            ).encode(),
            DEFAULT,
            "too_deep",
        ),
        (b"/v1/pixel/track?data=" + b"%5B" * 100_000, DEFAULT, "too_large"),
        (b"/pixel/v1/page?a." + b"b." * 100_000 + b"c=1", BIG, "too_deep"),
        (b"/pixel/v1/page?properties.items.1000000000=x", DEFAULT, "too_large"),
        (b"/pixel/v1/page?properties.items." + b"9" * 5000 + b"=x", DEFAULT, "too_large"),
        (b"/pixel/v1/page?" + b"&".join(b"a%d.1=x" % i for i in range(999)), DEFAULT, "too_large"),
        (b"/v1/pixel/track?data=" + b"1" * 20_000, DEFAULT, "bad_json"),  # not too many digits
        (b"/v1/pixel/track?data=%7B%22a%22%3A1e999%7D", DEFAULT, "bad_json"),  # no Infinity
    ],
    ids=[
        "10MB-query",
        "10k-params",
        "100k-ampersands",
        "100k-arrays",
        "100k-objects",
        "33-levels",
        "deep-but-too-large-first",
        "100k-segments",
        "index-1e9",
        "index-5000-digits",
        "many-arrays",
        "huge-int",
        "float-overflow",
    ],
)
def test_limits(target: bytes, config: PixelConfig, rule: str | None) -> None:
    outcome = _fast(target, config)
    record = outcome.record
    assert record is not None
    if rule is not None:
        assert rules(record) == {rule}
        assert record["event"] is None
    assert_plain_json(record)


# --- never raises ----------------------------------------------------------------------

query_bytes = st.one_of(
    st.binary(max_size=400),
    st.lists(
        st.tuples(
            st.text(alphabet='ab.0129%+=&_- "writeKeyanonymousIdtypedatanameevent', max_size=14),
            st.text(max_size=12),
        ),
        max_size=12,
    ).map(
        lambda pairs: "&".join(f"{key}={value}" for key, value in pairs).encode(
            "utf-8", "surrogatepass"
        )
    ),
    st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    ).map(lambda value: b"data=" + segment_data(value).encode()),
)
pixel_paths = st.sampled_from(
    [
        "/v1/pixel/track",
        "/v1/pixel/identify",
        "/v1/pixel/group",
        "/v1/pixel/alias",
        "/pixel/v1/page",
        "/pixel/v1/track",
    ]
)
any_text = st.text(max_size=40) | st.none()


@settings(max_examples=300, deadline=None)
@given(path=pixel_paths, query=query_bytes, peer=any_text, agent=any_text, forwarded=any_text)
@example(path="/pixel/v1/page", query=b"a.0=x&a.0.b=y&a=1", peer=None, agent=None, forwarded=None)
@example(
    path="/v1/pixel/page", query=b"data=%7B%22%5Cud800%22:1}", peer="", agent="", forwarded=","
)
def test_never_raises(
    path: str, query: bytes, peer: str | None, agent: str | None, forwarded: str | None
) -> None:
    for trusted in (0, 1):
        config = PixelConfig(trusted_proxies=trusted, rudderstack_response="seed")
        request = PixelRequest("GET", path, query, peer, agent, forwarded)
        outcome = decode(request, config)
        record = outcome.record
        assert record is not None
        assert record["accepted"] == (not record["problems"])
        assert set(RULES) >= rules(record)
        assert set(NOTES) >= notes(record)
        assert_plain_json(record)
        head = decode(dataclasses.replace(request, method="HEAD"), config)
        assert (head.status, head.headers, head.body, head.record) == (
            outcome.status,
            outcome.headers,
            b"",
            None,
        )


@settings(max_examples=200, deadline=None)
@given(
    method=st.text(max_size=10),
    path=st.text(max_size=30) | pixel_paths,
    query=st.binary(max_size=50),
)
def test_any_method_and_path(method: str, path: str, query: bytes) -> None:
    outcome = decode_pixel(PixelRequest(method, path, query), config=DEFAULT, now=NOW)
    if match_route(path, DEFAULT) is None:
        assert outcome is None
        return
    assert outcome is not None
    if method in ("GET", "HEAD"):
        assert outcome.status in (200, 400)
    else:
        assert (outcome.status, outcome.record) == (405, None)
        assert ("Allow", "GET, HEAD") in outcome.headers


@settings(max_examples=200, deadline=None)
@given(target=st.binary(max_size=60))
def test_split_target_never_raises(target: bytes) -> None:
    path, query = split_target(target)
    assert isinstance(path, str)
    assert query in target or query == b""
    path.encode("latin-1")


# --- every limit and fixed cap, exactly at it and one over ---------------------------

FIXED_ID = "00000000-0000-4000-8000-000000000000"


@dataclasses.dataclass(frozen=True)
class Boundary:
    """A request of size ``n`` for ``request(n)``; ``passed(record, n)``: the limit showed."""

    limit: int
    config: PixelConfig
    request: Any  # Callable[[int], PixelRequest]
    passed: Any  # Callable[[PixelRecord, int], bool]


def _query(path: str, query: bytes, **headers: Any) -> PixelRequest:
    return PixelRequest("GET", path, query, **headers)


def _padded_json(n: int) -> bytes:
    """A valid event's JSON text padded with trailing spaces to exactly ``n`` bytes."""
    text = json.dumps({"writeKey": "k", "userId": "u", "event": "E"}).encode()
    return text + b" " * (n - len(text))


def _base64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


_TRACK_RS = "/pixel/v1/track"
_RS_MIN = b"writeKey=k&anonymousId=a&event=E"


def _stored_event_of_size(n: int) -> PixelRequest:
    # Enriched with a fixed id and time: the stored size grows one byte per "x".
    empty = _stored_size(b"")
    return _query("/v1/pixel/track", b"data=" + _base64(_event_json("x" * (n - empty))))


def _event_json(pad: str) -> bytes:
    return json.dumps({"writeKey": "k", "userId": "u", "event": "E", "p": pad}).encode()


def _stored_size(pad: bytes) -> int:
    record = decode(
        _query("/v1/pixel/track", b"data=" + _base64(_event_json(pad.decode()))),
        new_id=lambda: FIXED_ID,
    ).record
    assert record is not None
    assert record["event"] is not None
    return len(json.dumps(record["event"], separators=(",", ":")))


def _rules_have(rule: str) -> Any:
    return lambda record, n: rule in rules(record)


def _noted(note: str) -> Any:
    return lambda record, n: note in notes(record)


def _message(note: str) -> Any:
    def message(record: PixelRecord) -> str:
        """The note's message, or "" without that note."""
        texts = [each["message"] for each in record["notes"] if each["rule"] == note]
        assert len(texts) <= 1
        return texts[0] if texts else ""

    return message


_IGNORED = _message("params_ignored")


def _message_id_replaced(record: PixelRecord, sent: str) -> bool:
    """Whether the messageId sent was replaced; exactly then it is a problem."""
    assert record["event"] is not None
    replaced: bool = record["event"]["messageId"] != sent
    assert replaced is ("message_id_too_long" in rules(record))
    return replaced


def _names_listed(message: str, n: int) -> bool:
    """Whether the note says it left names out; it always shows the first ten."""
    assert message.count('"x') == min(n, 10), message
    return message.endswith(f" and {n - 10} more")


SMALL = 200

BOUNDARIES = {
    "max_query_bytes": Boundary(
        SMALL,
        PixelConfig(limits=Limits(max_query_bytes=SMALL)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&p=" + b"x" * (n - len(_RS_MIN) - 3)),
        _rules_have("too_large"),
    ),
    "max_event_bytes-base64": Boundary(
        SMALL,
        PixelConfig(limits=Limits(max_event_bytes=SMALL)),
        lambda n: _query("/v1/pixel/track", b"data=" + _base64(_padded_json(n))),
        _rules_have("too_large"),
    ),
    "max_event_bytes-raw-json": Boundary(
        SMALL,
        PixelConfig(limits=Limits(max_event_bytes=SMALL)),
        lambda n: _query("/v1/pixel/track", b"data=" + _padded_json(n).replace(b" ", b"%20")),
        _rules_have("too_large"),
    ),
    "max_event_bytes-dot-form": Boundary(
        # writeKey counts (key and value bytes) but is not in the event
        SMALL,
        PixelConfig(limits=Limits(max_event_bytes=SMALL)),
        lambda n: _query("/v1/pixel/track", b"anonymousId=a&event=E&writeKey=" + b"k" * (n - 26)),
        _rules_have("too_large"),
    ),
    "max_event_bytes-stored-event": Boundary(
        1_000,
        PixelConfig(limits=Limits(max_event_bytes=1_000)),
        _stored_event_of_size,
        _rules_have("too_large"),
    ),
    "max_depth-json": Boundary(
        5,
        PixelConfig(limits=Limits(max_depth=5)),
        lambda n: _query(
            "/v1/pixel/track",
            b"data="
            + _base64(
                json.dumps(
                    {
                        "writeKey": "k",
                        "userId": "u",
                        "event": "E",
                        "p": json.loads("[" * (n - 1) + "]" * (n - 1)),
                    }
                ).encode()
            ),
        ),
        _rules_have("too_deep"),
    ),
    "max_depth-dot-path": Boundary(
        5,
        PixelConfig(limits=Limits(max_depth=5)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&" + b".".join([b"a"] * n) + b"=x"),
        _rules_have("too_deep"),
    ),
    "max_params-count": Boundary(
        10,
        PixelConfig(limits=Limits(max_params=10)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"".join(b"&p%d=x" % i for i in range(n - 3))),
        _rules_have("too_many_params"),
    ),
    "max_params-array-index": Boundary(
        10,
        PixelConfig(limits=Limits(max_params=10)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&p.a.%d=x" % (n - 1)),
        _rules_have("too_large"),
    ),
    "max_params-index-leading-zeros": Boundary(
        10,
        PixelConfig(limits=Limits(max_params=10)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&p.a.000%d=x" % (n - 1)),
        _rules_have("too_large"),
    ),
    "max_params-all-arrays": Boundary(
        10,
        PixelConfig(limits=Limits(max_params=10)),
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&p.a.3=x&p.b.%d=y" % (n - 5)),
        _rules_have("too_large"),
    ),
    "max_header_chars-user-agent": Boundary(
        16,
        PixelConfig(limits=Limits(max_header_chars=16)),
        lambda n: _query(_TRACK_RS, _RS_MIN, user_agent="u" * n),
        lambda record, n: (
            "header_truncated" in notes(record) and record["request"]["userAgent"] == "u" * 16
        ),
    ),
    "max_header_chars-user-agent-4-byte-utf8": Boundary(
        # 4 bytes a character: exactly the bytes decoded, then one byte more
        16,
        PixelConfig(limits=Limits(max_header_chars=16)),
        lambda n: _query(
            _TRACK_RS, _RS_MIN, user_agent="\U0001f600".encode().decode("latin-1") * n
        ),
        lambda record, n: (
            "header_truncated" in notes(record)
            and record["request"]["userAgent"] == "\U0001f600" * 16
        ),
    ),
    "max_header_chars-referer": Boundary(
        16,
        PixelConfig(limits=Limits(max_header_chars=16)),
        lambda n: _query(_TRACK_RS, _RS_MIN, referer="r" * n),
        lambda record, n: (
            "Referer" in _message("header_truncated")(record)
            and record["request"]["referer"] == "r" * 16
        ),
    ),
    "max_header_chars-x-forwarded-for": Boundary(
        16,
        PixelConfig(trusted_proxies=1, limits=Limits(max_header_chars=16)),
        lambda n: _query(
            _TRACK_RS, _RS_MIN, peer=PEER, forwarded_for="1." * (n // 2) + "1" * (n % 2)
        ),
        lambda record, n: (
            "X-Forwarded-For" in _message("header_truncated")(record)
            and len(record["request"]["ip"]) == 16
        ),
    ),
    "note-names-listed": Boundary(
        10,
        DEFAULT,
        lambda n: _query(
            "/v1/pixel/track",
            b"data=" + _base64(_padded_json(50)) + b"".join(b"&x%d=1" % i for i in range(n)),
        ),
        lambda record, n: _names_listed(_IGNORED(record), n),
    ),
    "note-name-chars": Boundary(
        64,
        DEFAULT,
        lambda n: _query("/v1/pixel/track", b"data=" + _base64(_padded_json(50)) + b"&" + b"n" * n),
        lambda record, n: _IGNORED(record).endswith('..."'),
    ),
    "message-id-chars": Boundary(
        100,
        DEFAULT,
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&messageId=" + b"m" * n),
        lambda record, n: _message_id_replaced(record, "m" * n),
    ),
    "message-id-chars-blank": Boundary(
        # blank and too long: the length decides which problem it is
        100,
        DEFAULT,
        lambda n: _query(_TRACK_RS, _RS_MIN + b"&messageId=" + b"%20" * n),
        lambda record, n: (
            ("message_id_too_long" in rules(record))
            is ("message_id_generated" not in notes(record))
            is True
        ),
    ),
    "unknown-call-chars": Boundary(
        64,
        PixelConfig(unknown_calls="reject"),
        lambda n: _query("/v1/pixel/" + "c" * n, b""),
        lambda record, n: (
            (record["call"], record["request"]["path"]) == ("c" * 64, "/v1/pixel/" + "c" * 64)
            and n > 64
        ),
    ),
    "timestamp-chars-parsed": Boundary(
        # originalTimestamp longer than 64 characters is not parsed: timestamp
        # then keeps it as sent instead of correcting it by sentAt.
        64,
        DEFAULT,
        lambda n: _query(
            _TRACK_RS,
            _RS_MIN
            + b"&sentAt=2024-05-01T12:00:10Z&originalTimestamp=2024-05-01T12:00:00."
            + b"0" * (n - 26)
            + b"%2B00:00",
        ),
        lambda record, n: record["event"]["timestamp"].startswith("2024-05-01T12:00:00.000"),
    ),
}


# --- bodies (Segment's HTTP API, RudderStack's): each limit at, below and one over -----


def _post(path: str, body: bytes, **headers: Any) -> PixelRequest:
    return PixelRequest("POST", path, b"", body=body, **headers)


def _batch_of(n: int) -> bytes:
    event = {"type": "track", "userId": "u", "event": "E"}
    return json.dumps({"writeKey": "k", "batch": [event] * n}).encode()


BOUNDARIES.update(
    {
        "max_body_bytes": Boundary(
            SMALL,
            PixelConfig(limits=Limits(max_body_bytes=SMALL)),
            lambda n: _post("/v1/track", _padded_json(n)),
            _rules_have("too_large"),
        ),
        "max_body_bytes-gzip": Boundary(
            # The cap is on the body as it arrives, compressed.
            SMALL,
            PixelConfig(limits=Limits(max_body_bytes=SMALL)),
            lambda n: _post(
                "/v1/track",
                _gzip_of_size(n),
                content_encoding="gzip",
            ),
            _rules_have("too_large"),
        ),
        "max_decompressed_bytes": Boundary(
            SMALL,
            PixelConfig(limits=Limits(max_decompressed_bytes=SMALL)),
            lambda n: _post("/v1/track", gzip.compress(_padded_json(n)), content_encoding="gzip"),
            _rules_have("too_large"),
        ),
        "max_batch_events": Boundary(
            5,
            PixelConfig(limits=Limits(max_batch_events=5)),
            lambda n: _post("/v1/batch", _batch_of(n)),
            _rules_have("too_many_events"),
        ),
    }
)


def _gzip_of_size(n: int) -> bytes:
    """A gzip member of exactly ``n`` bytes holding a valid event (stored, not deflated)."""
    for pad in range(n):
        data = gzip.compress(_padded_json(60 + pad), compresslevel=0)
        if len(data) == n:
            return data
    raise AssertionError(n)


@pytest.mark.parametrize("name", list(BOUNDARIES))
def test_limit_boundaries(name: str) -> None:
    boundary = BOUNDARIES[name]
    for n, over in (
        (boundary.limit - 1, False),
        (boundary.limit, False),
        (boundary.limit + 1, True),
    ):
        outcome = decode(boundary.request(n), boundary.config, new_id=lambda: FIXED_ID)
        record = outcome.record
        assert record is not None
        assert boundary.passed(record, n) is over, (name, n, record["problems"], record["notes"])
        assert_plain_json(record)


def test_boundaries_cover_every_limit() -> None:
    named = {name.split("-")[0] for name in BOUNDARIES}
    assert {field.name for field in dataclasses.fields(Limits)} <= named


def test_stored_event_size_counts_non_ascii_as_escapes() -> None:
    # 300 x "é": 600 bytes of UTF-8, 1800 as the stores' \u00e9 escapes.
    config = PixelConfig(limits=Limits(max_event_bytes=1_000))
    data = json.dumps(
        {"writeKey": "k", "userId": "u", "event": "E", "p": "\u00e9" * 100}, ensure_ascii=False
    )
    fits = decode(_query("/v1/pixel/track", b"data=" + _base64(data.encode())), config)
    assert fits.record is not None
    assert fits.record["accepted"]
    data = data.replace("\u00e9" * 100, "\u00e9" * 300)
    assert len(data.encode()) < 1_000
    over = decode(_query("/v1/pixel/track", b"data=" + _base64(data.encode())), config)
    assert over.record is not None
    assert (rules(over.record), over.record["event"]) == ({"too_large"}, None)


# --- the stored size: a cheap bound, the exact size only near the limit ----------------

# What makes the stores' text (compact, ASCII-only) longer than msgspec's UTF-8:
# DEL and non-ASCII written as escapes, controls, astral characters; and floats,
# which the two write differently (1e+16 and 1e16; 1e-05 and 0.00001).
_SIZE_TEXT = st.text(
    st.characters(codec="utf-8") | st.sampled_from('\x7f\x00\x1f\u2028\u00e9\U0001f600"\\'),
    max_size=30,
)
_SIZE_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _SIZE_TEXT
    | st.text(st.characters(codec=None), max_size=5),  # lone surrogates: msgspec refuses them
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(_SIZE_TEXT, children, max_size=5)
    ),
    max_leaves=30,
)


def _stores_text_size(event: dict[str, Any]) -> int:
    """The stored event's size as the limit defines it, computed here independently."""
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=True))


@settings(max_examples=500)
@given(st.dictionaries(_SIZE_TEXT, _SIZE_VALUES, max_size=6))
@example({"f": 1e15, "g": 1e16, "h": 1e-5, "t": 5e-324, "n": -1.2345678901234567e-300})
@example({"del": "\x7f" * 40, "astral": "\U0001f600" * 5, "nul": "\x00", "big": 2**200})
def test_the_stored_size_bound_is_an_upper_bound(event: dict[str, Any]) -> None:
    msgspec = pytest.importorskip("msgspec")
    exact = _stores_text_size(event)
    limits = {exact - 1, exact, exact + 1}
    try:
        fast = len(msgspec.json.encode(event))
    except (TypeError, ValueError):
        pass  # msgspec refuses it (a lone surrogate): only the exact size can decide
    else:
        bound = base._STORED_SIZE_FACTOR * fast
        assert exact <= bound
        limits |= {bound - 1, bound, bound + 1}
    for limit in sorted(limit for limit in limits if limit > 0):
        assert base._larger_than(event, limit) is (exact > limit), limit


def test_the_stored_size_bound_at_its_edges() -> None:
    pytest.importorskip("msgspec")
    # DEL is 1 byte in msgspec's text and 6 characters (\u007f) in the stores':
    # the widest gap there is, so the bound is closest to the exact size here.
    event = {"k": "\x7f" * 500}
    exact = _stores_text_size(event)  # 8 + 6 * 500
    assert exact == 3_008
    bound = base._STORED_SIZE_FACTOR * (8 + 500)
    expected = {
        exact - 1: True,
        exact: False,
        exact + 1: False,
        bound - 1: False,
        bound: False,
        bound + 1: False,
    }
    assert {limit: base._larger_than(event, limit) for limit in expected} == expected


def test_the_exact_stored_size_is_computed_only_near_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("msgspec")
    request = _query("/v1/pixel/track", b"data=" + _base64(_event_json("x" * 100)))
    stored = decode(request, new_id=lambda: FIXED_ID).record
    assert stored is not None
    assert stored["event"] is not None
    fast = len(json.dumps(stored["event"], separators=(",", ":"), ensure_ascii=False))
    bound = base._STORED_SIZE_FACTOR * fast  # msgspec writes the same text for ASCII
    exact_sizes: list[int] = []

    def counted(event: dict[str, Any]) -> int:
        exact_sizes.append(_stores_text_size(event))
        return exact_sizes[-1]

    monkeypatch.setattr(base, "_stored_size", counted)
    for limit, exact_computed in ((bound, False), (bound - 1, True), (32_000, False)):
        exact_sizes.clear()
        config = PixelConfig(limits=Limits(max_event_bytes=limit))
        record = decode(request, config, new_id=lambda: FIXED_ID).record
        assert record == stored, limit
        assert exact_sizes == ([fast] if exact_computed else []), limit


_SIZE_USER_AGENTS = st.sampled_from(
    [None, "Mozilla/5.0", "curl/8", "\x7f" * 30, "Bot \xc3\xa9\xf0\x9f\x98\x80", "x" * 1_500]
)


@st.composite
def _varied_pixels(draw: st.DrawFn) -> tuple[PixelRequest, PixelConfig]:
    """Pixels of every dialect and limits near their stored sizes, so both paths decide."""
    kind = draw(st.sampled_from(["segment", "segment-raw", "rudderstack", "ga4"]))
    limit = draw(st.integers(min_value=50, max_value=4_000))
    headers = {"peer": PEER, "user_agent": draw(_SIZE_USER_AGENTS)}
    if kind.startswith("segment"):
        event = draw(st.dictionaries(_SIZE_TEXT, _SIZE_VALUES, max_size=6))
        event.update(draw(st.fixed_dictionaries({}, optional={"writeKey": _SIZE_TEXT})))
        event.update(draw(st.fixed_dictionaries({}, optional={"userId": _SIZE_VALUES})))
        text = json.dumps(event, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        data = (
            text.replace(b"%", b"%25").replace(b"&", b"%26")
            if kind == "segment-raw"
            else _base64(text)
        )
        call = draw(st.sampled_from(["track", "page", "identify"]))
        return _query(f"/v1/pixel/{call}", b"data=" + data, **headers), PixelConfig(
            limits=Limits(max_event_bytes=limit)
        )
    params = draw(st.dictionaries(_SIZE_TEXT, _SIZE_TEXT, max_size=8))
    query = urlencode(params).encode()
    if kind == "rudderstack":
        path, dialects = "/pixel/v1/track", frozenset({"rudderstack"})
        query += b"&writeKey=k&anonymousId=a&event=E"
    else:
        path, dialects = "/g/collect", frozenset({"ga4"})
        query += b"&v=2&tid=G-X&cid=1.2&en=page_view"
    config = PixelConfig(dialects=dialects, limits=Limits(max_event_bytes=limit))
    return _query(path, query, **headers), config


@settings(max_examples=400)
@given(_varied_pixels())
def test_the_cheap_bound_and_the_exact_size_make_the_same_records(
    pixel: tuple[PixelRequest, PixelConfig],
) -> None:
    request, config = pixel
    fast = decode(request, config, new_id=lambda: FIXED_ID)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "_fast_encode", None)  # the exact size alone, as before
        exact = decode(request, config, new_id=lambda: FIXED_ID)
    assert fast == exact


# --- the GIF, checked against bytes written out here and parsed independently ---------

# The 43 bytes, written out: header, logical screen, global colour table, graphic
# control extension, image descriptor, LZW image data, trailer.
EXPECTED_GIF = bytes.fromhex(
    "474946383961"  # "GIF89a"
    "0100"
    "0100"
    "80"
    "00"
    "00"  # 1x1; global colour table of 2 entries; bg 0; aspect 0
    "000000"
    "000000"  # the two colours (black, black)
    "21f9"
    "04"
    "01"
    "0000"
    "00"
    "00"  # GCE: transparency flag, delay 0, transparent index 0
    "2c"
    "0000"
    "0000"
    "0100"
    "0100"
    "00"  # image at 0,0, 1x1, no local colour table
    "02"
    "02"
    "4401"
    "00"  # LZW minimum code size 2, one 2-byte block, end of blocks
    "3b"  # trailer
)


def _lzw_decode(data: bytes, minimum_code_size: int) -> list[int]:
    """GIF's variable-width LZW (codes packed least significant bit first)."""
    clear, end = 1 << minimum_code_size, (1 << minimum_code_size) + 1
    bits = int.from_bytes(data, "little")
    position, width = 0, minimum_code_size + 1
    table: list[list[int]] = []
    previous: list[int] | None = None
    pixels: list[int] = []
    while position + width <= len(data) * 8:
        code = (bits >> position) & ((1 << width) - 1)
        position += width
        if code == clear:
            table = [[index] for index in range(clear)] + [[], []]
            width, previous = minimum_code_size + 1, None
            continue
        if code == end:
            return pixels
        if code < len(table):
            entry = table[code]
        else:
            assert previous is not None
            assert code == len(table), "a code past the table"
            entry = previous + previous[:1]
        pixels += entry
        if previous is not None:
            table.append(previous + entry[:1])
            if len(table) == 1 << width and width < 12:
                width += 1
        previous = entry
    raise AssertionError("no end-of-information code")


def parse_gif(gif: bytes) -> dict[str, Any]:
    """What a browser draws from ``gif``: size, colours, transparency, pixel indexes."""
    assert gif[:6] == b"GIF89a"
    width, height, packed = (
        int.from_bytes(gif[6:8], "little"),
        int.from_bytes(gif[8:10], "little"),
        gif[10],
    )
    at = 13
    colours: list[bytes] = []
    if packed & 0x80:
        count = 2 << (packed & 0x07)
        colours = [gif[at + 3 * i : at + 3 * i + 3] for i in range(count)]
        at += 3 * count
    transparent: int | None = None
    image: dict[str, Any] = {}
    while gif[at] != 0x3B:
        if gif[at] == 0x21:  # an extension
            label, size = gif[at + 1], gif[at + 2]
            if label == 0xF9:
                assert size == 4
                if gif[at + 3] & 0x01:
                    transparent = gif[at + 6]
            at += 3 + size
            assert gif[at] == 0, "extension blocks end with a 0-length block"
            at += 1
        else:
            assert gif[at] == 0x2C, f"unexpected block {gif[at]:#x}"
            left, top, w, h = (
                int.from_bytes(gif[at + i : at + i + 2], "little") for i in (1, 3, 5, 7)
            )
            assert gif[at + 9] & 0x80 == 0, "no local colour table"
            minimum = gif[at + 10]
            at += 11
            data = b""
            while gif[at]:
                data += gif[at + 1 : at + 1 + gif[at]]
                at += 1 + gif[at]
            at += 1
            image = {"box": (left, top, w, h), "pixels": _lzw_decode(data, minimum)}
    assert at == len(gif) - 1, "nothing after the trailer"
    return {"size": (width, height), "colours": colours, "transparent": transparent, **image}


def assert_transparent_pixel(gif: bytes) -> None:
    parsed = parse_gif(gif)
    assert parsed["size"] == (1, 1)
    assert parsed["box"] == (0, 0, 1, 1)
    assert parsed["transparent"] == 0
    assert len(parsed["colours"]) == 2
    assert parsed["pixels"] == [parsed["transparent"]]


def test_gif_is_the_43_bytes_of_a_transparent_pixel() -> None:
    assert len(EXPECTED_GIF) == 43
    assert_transparent_pixel(EXPECTED_GIF)
    assert GIF == EXPECTED_GIF
    outcome = get(b"/v1/pixel/track?data=e30")
    assert outcome.body == EXPECTED_GIF


@pytest.mark.parametrize(
    ("offset", "value", "what"),
    [
        (22, 0x00, "transparency flag cleared"),
        (25, 0x01, "transparent index 1"),
        (39, 0x45, "an LZW bit changed"),
        (8, 0x02, "height 2"),
        (42, 0x00, "no trailer"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_gif_parser_catches_a_broken_pixel(offset: int, value: int, what: str) -> None:
    broken = bytearray(EXPECTED_GIF)
    assert broken[offset] != value, what
    broken[offset] = value
    with pytest.raises((AssertionError, IndexError)):
        assert_transparent_pixel(bytes(broken))


# Found by mutation testing: the 503 for a pixel nothing could keep was only
# checked through real servers, which ./dev mutate does not run.
NOT_KEPT_TEXT = b"Service Unavailable: the pixel could not be recorded; send it again later.\n"


@pytest.mark.parametrize(
    ("dialect", "response", "body", "content_type"),
    [
        ("segment", "seed", EXPECTED_GIF, "image/gif"),
        ("segment", "gif", EXPECTED_GIF, "image/gif"),
        ("rudderstack", "gif", EXPECTED_GIF, "image/gif"),
        ("rudderstack", "seed", NOT_KEPT_TEXT, "text/plain; charset=utf-8"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_not_kept_answer_is_an_honest_503_in_the_dialects_body(
    dialect: str, response: str, body: bytes, content_type: str, method: str
) -> None:
    config = PixelConfig(rudderstack_response=response)  # type: ignore[arg-type]
    outcome = not_kept_answer(Route(dialect, "track"), method, config)  # type: ignore[arg-type]
    assert outcome.status == 503
    assert outcome.record is None
    assert outcome.headers == [
        ("Cache-Control", "no-cache, no-store, must-revalidate"),
        ("Pragma", "no-cache"),
        ("Expires", "0"),
        ("Retry-After", "5"),
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
    ]
    assert outcome.body == (b"" if method == "HEAD" else body)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "/v1/pixel/trak",
            "There is no such pixel call: the calls are identify, group, alias, page,"
            " screen, track; the closest is track.",
        ),
        (
            "/v1/pixel/indentify",
            "There is no such pixel call: the calls are identify, group, alias, page,"
            " screen, track; the closest is identify.",
        ),
        (
            "/v1/pixel/zzzzzz",
            "There is no such pixel call: the calls are identify, group, alias, page,"
            " screen, track.",
        ),
        (
            "/pixel/v1/pag",
            "There is no such pixel call: the calls are page, track; the closest is page.",
        ),
        ("/pixel/v1/qqqq", "There is no such pixel call: the calls are page, track."),
    ],
)
def test_an_unknown_call_is_named_with_the_closest_known_one(path: str, message: str) -> None:
    record = decode(_query(path, b"writeKey=k"), PixelConfig(unknown_calls="reject")).record
    assert record is not None
    assert {"rule": "unknown_call", "message": message} in record["problems"]


@pytest.mark.parametrize(
    ("query", "key"),
    [
        (b"anonymousId=a&writeKey=k2&event=" + b"E" * 200, "k2"),
        (b"writeKey=k1&writeKey=k2&event=" + b"E" * 200, "k1"),
        (b"event=" + b"E" * 200, None),
    ],
)
def test_a_dot_form_event_too_large_keeps_its_first_write_key(
    query: bytes, key: str | None
) -> None:
    # Found by mutation testing: the write key of an event refused as too large
    # was never checked (the record names whose pixel was refused).
    config = PixelConfig(limits=Limits(max_event_bytes=100))
    record = decode(_query(_TRACK_RS, query), config).record
    assert record is not None
    assert "too_large" in rules(record)
    assert record["writeKey"] == key


def test_clock_skew_is_corrected_in_utc_whatever_the_local_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Found by mutation testing: in local time, a skew spanning a daylight
    # saving change (New York, 2024-03-10 07:00 UTC) is off by an hour.
    import time as time_module

    monkeypatch.setenv("TZ", "America/New_York")
    time_module.tzset()
    try:
        query = (
            _RS_MIN + b"&originalTimestamp=2024-03-10T07:00:00%2B01:00"
            b"&sentAt=2024-03-10T09:00:00%2B01:00"
        )
        now = datetime(2024, 3, 10, 8, 0, 5, tzinfo=UTC)
        record = decode(_query(_TRACK_RS, query), now=now).record
    finally:
        monkeypatch.undo()
        time_module.tzset()
    assert record is not None
    # Sent two hours after it happened, received five seconds after it was sent.
    assert record["event"]["timestamp"] == "2024-03-10T06:00:05.000Z"


@pytest.mark.parametrize(
    ("query", "integrations"),
    [
        (b"", {"All": True}),
        (b"&integrations.Mixpanel=false", {"All": True, "Mixpanel": "false"}),
        (b"&integrations.All=no&integrations.Amplitude=1", {"All": "no", "Amplitude": "1"}),
    ],
)
def test_rudderstack_integrations_start_from_all_true_and_parameters_win(
    query: bytes, integrations: dict[str, Any]
) -> None:
    # Found by mutation testing: no case held integrations of its own. Values
    # stay text: the dot form carries no types.
    record = decode(_query(_TRACK_RS, _RS_MIN + query)).record
    assert record is not None
    assert record["event"]["integrations"] == integrations


def test_a_note_without_names_has_its_plain_message() -> None:
    record = decode(_query("/pixel/v1/page", b"writeKey=k&anonymousId=a&name=")).record
    assert record is not None
    assert record["event"]["name"] == "Unknown Page"
    assert {
        "rule": "unknown_page_name",
        "message": "An empty page name was replaced by 'Unknown Page'",
    } in record["notes"]


def _b64(event: dict[str, Any]) -> bytes:
    return base64.b64encode(json.dumps(event).encode())


_ONE = {"userId": "u", "event": "One"}
_TWO = {"userId": "u", "event": "Two"}
_DUPLICATE = "Repeated parameters: the first value was kept: "
_FROM_QUERY = (
    "write_key_from_query",
    "The event has no writeKey; the writeKey query parameter was used",
)
_BAD_UTF8 = ("invalid_utf8", "Text that was not valid UTF-8 was replaced by U+FFFD")
_NO_KEY = ("missing_write_key", "No write key: send writeKey in the event or as a query parameter.")


@pytest.mark.parametrize(
    ("query", "write_key", "notes_shown", "problems_shown"),
    [
        pytest.param(
            b"data=" + _b64(_ONE) + b"&data=" + _b64(_TWO),
            None,
            [("duplicate_param", _DUPLICATE + '"data"')],
            [_NO_KEY],
            id="data-twice",
        ),
        pytest.param(b"d%61ta=" + _b64(_ONE), None, [], [_NO_KEY], id="data-spelled-with-escapes"),
        pytest.param(
            b"data=" + _b64(_ONE) + b"&d%61ta=" + _b64(_TWO),
            None,
            [("duplicate_param", _DUPLICATE + '"data"')],
            [_NO_KEY],
            id="data-then-escaped-data",
        ),
        pytest.param(
            b"writeKey=k1&writeKey=k2&data=" + _b64(_ONE),
            "k1",
            [("duplicate_param", _DUPLICATE + '"writeKey"'), _FROM_QUERY],
            [],
            id="write-key-twice",
        ),
        pytest.param(
            b"writeKey=q&data=" + _b64({**_ONE, "writeKey": "e"}),
            "e",
            [
                (
                    "write_key_query_ignored",
                    "The writeKey query parameter differs from the event's and was ignored",
                )
            ],
            [],
            id="event-key-wins",
        ),
        pytest.param(
            b"writeKey=q&data=" + _b64({**_ONE, "writeKey": 5}),
            "q",
            [_FROM_QUERY],
            [("invalid_field", "writeKey must be a string.")],
            id="event-key-not-a-string",
        ),
        pytest.param(
            b"%ff=1&data=" + _b64({**_ONE, "writeKey": "e"}),
            "e",
            [
                _BAD_UTF8,
                ("params_ignored", 'Parameters beside data and writeKey were ignored: "\ufffd"'),
            ],
            [],
            id="bad-utf8-in-a-name",
        ),
        pytest.param(
            b"writeKey=k%ff&data=" + _b64(_ONE),
            "k\ufffd",
            [_BAD_UTF8, _FROM_QUERY],
            [],
            id="bad-utf8-key",
        ),
    ],
)
def test_segment_query_parameters_beside_data(
    query: bytes,
    write_key: str | None,
    notes_shown: list[tuple[str, str]],
    problems_shown: list[tuple[str, str]],
) -> None:
    # Found by mutation testing: the shared table reached none of these branches.
    record = decode(_query("/v1/pixel/track", query)).record
    assert record is not None
    assert record["event"] is not None
    assert record["event"]["event"] == "One"
    assert record["writeKey"] == write_key
    assert [(n["rule"], n["message"]) for n in record["notes"]] == notes_shown
    assert [(p["rule"], p["message"]) for p in record["problems"]] == problems_shown


# --- Segment's and RudderStack's HTTP API bodies: nothing raises, limits hold -----------

_BODY_LIMITS = Limits(
    max_event_bytes=400, max_body_bytes=2_000, max_decompressed_bytes=3_000, max_batch_events=5
)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
_EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["track", "page", "identify", "nope"]),
        "userId": st.text(max_size=10),
        "anonymousId": st.text(max_size=10),
        "event": st.text(max_size=10),
        "writeKey": st.text(max_size=10),
        "properties": _JSON_VALUES,
        "sentAt": st.text(max_size=30),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    path=st.sampled_from(
        ["/v1/track", "/v1/batch", "/v1/b", "/v1/t", "/v1/identify", "/beacon/v1/batch"]
    ),
    payload=st.one_of(
        _EVENTS.map(lambda e: json.dumps(e).encode()),
        st.lists(_EVENTS, max_size=8).map(lambda b: json.dumps({"batch": b}).encode()),
        st.binary(max_size=2_500),
    ),
    gzipped=st.booleans(),
    dialects=st.sampled_from([("segment",), ("rudderstack",), ("segment", "rudderstack")]),
)
def test_http_api_bodies_never_raise_and_keep_every_limit(
    path: str, payload: bytes, gzipped: bool, dialects: tuple[str, ...]
) -> None:
    config = PixelConfig(dialects=frozenset(dialects), limits=_BODY_LIMITS)
    body = gzip.compress(payload) if gzipped else payload
    request = PixelRequest(
        "POST",
        path,
        b"writeKey=k",
        body=body,
        content_encoding="gzip" if gzipped else None,
        authorization="Basic " + base64.b64encode(b"k:").decode(),
    )
    route = match_route(path, config, method="POST")
    outcome = decode_pixel(request, config=config, now=NOW)
    if route is None:
        assert outcome is None
        return
    assert outcome is not None
    # An empty batch has nothing to record; a batch over the cap is one rejection.
    assert len(outcome.records) <= _BODY_LIMITS.max_batch_events
    for record in outcome.records:
        json.dumps(record, allow_nan=False)
        if record["event"] is not None:
            stored = json.dumps(record["event"], separators=(",", ":"), ensure_ascii=True)
            assert len(stored) <= _BODY_LIMITS.max_event_bytes


# --- a route handed over by the front end ---------------------------------------------


def _counted_ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"id-{next(counter)}"


def test_a_route_handed_over_is_not_matched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # The adapters match every request to know whether it is a pixel; the core
    # takes the route they found instead of matching the path a second time.
    request = PixelRequest(
        "GET", "/v1/pixel/track", b"data=" + base64.b64encode(b'{"writeKey":"k","userId":"u"}')
    )
    route = match_route(request.path, DEFAULT, method="GET")
    assert route == Route("segment", "track")
    expected = decode(request, new_id=_counted_ids())

    def no_second_match(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("matched twice")

    monkeypatch.setattr("pixel_middleware.core.match_route", no_second_match)
    handed = decode(request, route=route, new_id=_counted_ids())
    assert handed == expected
