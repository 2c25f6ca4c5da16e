"""Third-party dialects (GA4, Universal Analytics, Meta, Snowplow, Matomo, PostHog,
Jitsu): every case of tests/vendor_cases.py through the core, then byte for byte
through the middleware (dialect enabled) and a real mitmdump, which must agree;
routing by path and host; limits and no-raise properties for queries and bodies."""

from __future__ import annotations

import json
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cases import Case, case_config, case_request
from collector_server import QuietHandler, not_found, serving
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dialects_bodies import send
from test_mitm_e2e import MAY_DIFFER, Mitmdump, differences, ok
from vendor_cases import VENDOR_CASES
from werkzeug.serving import make_server

from pixel_middleware import PixelMiddleware
from pixel_middleware.core import (
    DEFAULT_DIALECTS,
    DIALECTS,
    GIF,
    Limits,
    PixelConfig,
    PixelRequest,
    decode_pixel,
    match_route,
)

GIF_BODY = GIF
NOW = datetime(2026, 11, 23, 16, 20, 5, 123456, tzinfo=UTC)
THIRD_PARTY = tuple(d for d in DIALECTS if d not in DEFAULT_DIALECTS)
ALL = PixelConfig(dialects=frozenset(DIALECTS))


@pytest.mark.parametrize("case", VENDOR_CASES, ids=[case.id for case in VENDOR_CASES])
def test_vendor_case(case: Case) -> None:
    outcome = decode_pixel(case_request(case), config=case_config(case), now=NOW)
    assert outcome is not None
    assert outcome.status == case.expect_status
    records = outcome.records
    assert [r["call"] for r in records] == list(case.expect_calls)
    assert {p["rule"] for r in records for p in r["problems"]} == case.expect_rules
    assert {n["rule"] for r in records for n in r["notes"]} == case.expect_notes
    headers = dict(outcome.headers)
    rejected = headers.get("X-Pixel-Rejected")
    assert (set(rejected.split(", ")) if rejected else set()) == case.expect_rules
    if outcome.status == 204:
        assert outcome.body == b""
        assert "Content-Length" not in headers
    else:
        assert headers["Content-Length"] == str(len(outcome.body))
    dialect = next(iter(case.config["dialects"]))
    for record in records:
        assert record["dialect"] == dialect
        assert record["accepted"] == (not record["problems"])
        json.dumps(record, allow_nan=False)
        event = record["event"]
        if event is None:  # the request could not be read at all: its rule says why
            assert len(records) == 1
            assert record["problems"]
            continue
        assert event["type"] == record["call"]
        assert event["context"]["vendor"]["name"] == dialect
        assert event["context"]["userAgent"] == case.headers["User-Agent"]
        json.dumps(record, allow_nan=False)
    if case.check is not None:
        case.check(records[0]["event"])
    # The answer is the vendor's fixed one: nothing of the request in it.
    assert outcome.body in (b"", GIF_BODY, b'{"status":1}', b"ok")


def test_third_party_dialects_answer_only_where_enabled() -> None:
    """Segment and RudderStack are the default: a GA4 hit is the application's."""
    assert PixelConfig().dialects == frozenset(DEFAULT_DIALECTS) == {"segment", "rudderstack"}
    for dialect in THIRD_PARTY:
        assert dialect not in PixelConfig().dialects
    hit = PixelRequest("GET", "/g/collect", b"v=2&tid=G-1&cid=1&en=x")
    assert decode_pixel(hit, config=PixelConfig(), now=NOW) is None
    assert decode_pixel(hit, config=PixelConfig(dialects=frozenset({"ga4"})), now=NOW)


@pytest.mark.parametrize(
    ("path", "host", "dialect"),
    [
        ("/collect", "www.google-analytics.com", "universal_analytics"),
        ("/collect", "region1.google-analytics.com", "universal_analytics"),
        ("/collect", "google-analytics.com:443", "universal_analytics"),
        ("/collect", "evilgoogle-analytics.com", None),  # a suffix, not a subdomain
        ("/collect", "shop.example", None),
        ("/collect", None, None),
        ("/r/collect", "www.google-analytics.com", "universal_analytics"),
        ("/g/collect", "shop.example", "ga4"),
        ("/g/collect/", "shop.example", None),
        ("/tr", "www.facebook.com", "meta"),
        ("/tr", "facebook.com", "meta"),
        ("/tr", "m.facebook.com.example", None),
        ("/tr", "shop.example", None),
        ("/matomo.php", "shop.example", "matomo"),
        ("/piwik.php", None, "matomo"),
        ("/api/px/track", None, "jitsu"),
        ("/api/px/", None, None),  # a root needs a type after it
        ("/api/v1/p.gif", "shop.example", "jitsu"),
    ],
)
def test_ambiguous_paths_need_the_vendor_host(
    path: str, host: str | None, dialect: str | None
) -> None:
    route = match_route(path, ALL, host=host)
    assert (route.dialect if route else None) == dialect


@pytest.mark.parametrize(
    ("query", "snowplow"),
    [
        (b"e=pv&tv=js-3.0.0&p=web", True),
        (b"tv=js-3.0.0&e=", True),  # the markers' names are enough; the checks say the rest
        (b"e=pv&p=web", False),  # no tv=
        (b"tv=js-3.0.0", False),  # no e=
        (b"q=shoes&page=2", False),  # a site's own /i
        (b"", False),
        (b"ee=pv&tvv=1", False),  # names that merely start like the markers
    ],
)
def test_snowplow_i_is_snowplows_only_with_its_markers(query: bytes, snowplow: bool) -> None:
    config = PixelConfig(dialects=frozenset({"snowplow"}))
    for method in ("GET", "HEAD", "PUT"):
        outcome = decode_pixel(PixelRequest(method, "/i", query), config=config, now=NOW)
        assert (outcome is not None) == snowplow, (method, query)


def test_a_custom_route_makes_i_snowplows_without_the_markers() -> None:
    config = PixelConfig(
        dialects=frozenset({"snowplow"}), custom_paths={"collector.example.com/i": "snowplow:i"}
    )
    on_host = PixelRequest("GET", "/i", b"aid=a", host="collector.example.com")
    outcome = decode_pixel(on_host, config=config, now=NOW)
    assert outcome is not None
    assert outcome.record is not None
    assert outcome.record["dialect"] == "snowplow"
    assert {p["message"] for p in outcome.record["problems"]} == {
        "The snowplow hit needs e.",
        "The snowplow hit needs tv.",
        "The snowplow hit needs p.",
    }
    elsewhere = PixelRequest("GET", "/i", b"aid=a", host="shop.example")
    assert decode_pixel(elsewhere, config=config, now=NOW) is None


@pytest.mark.parametrize(
    ("body", "rule", "records"),
    [
        (b'{"data": []}', "not_an_object", 1),  # no event at all
        (b'{"data": [{"e": "pv"}, 7]}', "not_an_object", 1),
        (b'{"schema": "x"}', "bad_batch", 1),
        (b"[]", "bad_batch", 1),
        (
            b'{"data": [{"e": "pv", "tv": "t", "p": "web"}, {"e": "pv", "tv": "t", "p": "web"}]}',
            None,
            2,
        ),
        (b'{"data": [{"e": "pv"}, {"e": "pv"}, {"e": "pv"}]}', "too_many_events", 1),
    ],
)
def test_snowplow_tp2_bodies_that_cannot_be_read(
    body: bytes, rule: str | None, records: int
) -> None:
    config = PixelConfig(dialects=frozenset({"snowplow"}), limits=Limits(max_batch_events=2))
    outcome = decode_pixel(
        PixelRequest("POST", "/com.snowplowanalytics.snowplow/tp2", b"", body=body),
        config=config,
        now=NOW,
    )
    assert outcome is not None
    assert outcome.status == 200
    assert outcome.body == b"ok"
    assert len(outcome.records) == records
    found = {p["rule"] for r in outcome.records for p in r["problems"]}
    assert found == ({rule} if rule else set())


def test_prefix_applies_to_third_party_paths() -> None:
    config = PixelConfig(prefix="/px", dialects=frozenset({"ga4"}))
    assert match_route("/px/g/collect", config) is not None
    assert match_route("/g/collect", config) is None


def test_other_methods_are_405_and_head_no_record() -> None:
    config = PixelConfig(dialects=frozenset({"ga4"}))
    put = decode_pixel(PixelRequest("PUT", "/g/collect", b""), config=config, now=NOW)
    assert put is not None
    assert put.status == 405
    assert put.record is None
    head = decode_pixel(PixelRequest("HEAD", "/g/collect", b"v=2"), config=config, now=NOW)
    assert head is not None
    assert head.status == 204
    assert head.records == []
    assert head.body == b""


def test_a_body_of_more_lines_than_max_batch_events_is_refused() -> None:
    config = PixelConfig(dialects=frozenset({"ga4"}), limits=Limits(max_batch_events=2))
    for lines, rule in ((2, None), (3, "too_many_events")):
        body = b"\n".join(b"en=e%d&tid=G-1&cid=1" % i for i in range(lines))
        outcome = decode_pixel(
            PixelRequest("POST", "/g/collect", b"v=2", body=body), config=config, now=NOW
        )
        assert outcome is not None
        rules = [p["rule"] for r in outcome.records for p in r["problems"]]
        assert rules == ([rule] if rule else []), lines
        assert len(outcome.records) == (lines if rule is None else 1)


def test_a_body_one_byte_over_max_body_bytes_is_refused_unread() -> None:
    config = PixelConfig(dialects=frozenset({"ga4"}), limits=Limits(max_body_bytes=40))
    line = b"en=page_view&tid=G-1&cid=1"
    for body, rule in ((line.ljust(40, b"&"), None), (line.ljust(41, b"&"), "too_large")):
        outcome = decode_pixel(
            PixelRequest("POST", "/g/collect", b"", body=body), config=config, now=NOW
        )
        assert outcome is not None
        assert [p["rule"] for p in outcome.records[0]["problems"]] == ([rule] if rule else [])


_PATHS = st.sampled_from(
    [
        ("/g/collect", "www.google-analytics.com"),
        ("/collect", "www.google-analytics.com"),
        ("/tr", "www.facebook.com"),
        ("/matomo.php", None),
        ("/api/px/track", None),
        ("/api/v1/p.gif", None),
        ("/com.snowplowanalytics.snowplow/tp2", None),
    ]
)
_SMALL = Limits(max_query_bytes=300, max_event_bytes=400, max_params=12, max_body_bytes=500)


@settings(max_examples=300, deadline=None)
@given(
    where=_PATHS,
    method=st.sampled_from(["GET", "POST"]),
    query=st.binary(max_size=400),
    body=st.binary(max_size=600),
    gzip=st.booleans(),
)
def test_nothing_raises_and_limits_hold(
    where: tuple[str, str | None], method: str, query: bytes, body: bytes, gzip: bool
) -> None:
    path, host = where
    config = PixelConfig(dialects=frozenset(THIRD_PARTY), limits=_SMALL)
    request = PixelRequest(
        method,
        path,
        query,
        body=body if method == "POST" else b"",
        host=host,
        content_encoding="gzip" if gzip else None,
    )
    outcome = decode_pixel(request, config=config, now=NOW)
    assert outcome is not None
    for record in outcome.records:
        json.dumps(record, allow_nan=False)
        if record["event"] is not None:
            size = len(json.dumps(record["event"], separators=(",", ":")))
            assert size <= _SMALL.max_event_bytes
        assert len(record["request"]["query"]) <= 4 * _SMALL.max_query_bytes
    assert len(outcome.records) <= Limits().max_batch_events


@pytest.mark.mitmproxy
def test_every_vendor_case_gives_the_same_records_in_the_middleware_and_the_addon(
    tmp_path: Path,
) -> None:
    """Each case, byte for byte, to PixelMiddleware (its dialect enabled) on a real
    server and to a real mitmdump keeping the Host header: the same records."""
    upstream = make_server("127.0.0.1", 0, ok, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    proxy = Mitmdump(
        tmp_path / "mitm",
        "--mode",
        f"reverse:http://127.0.0.1:{upstream.server_port}",
        "--set",
        "keep_host_header=true",
        # The addon decodes every dialect by default.
    )
    compared = 0
    case_records: list[tuple[str, list[Any]]] = []
    try:
        for case in VENDOR_CASES:
            middleware = PixelMiddleware(not_found, store="memory://", **case.config)
            with serving(middleware) as url:
                port = int(url.rsplit(":", 1)[1])
                status = send(port, case.method, case.target, dict(case.headers), case.body)
                assert status == case.expect_status, case.id
            theirs = [record for _, record in middleware.store.read(limit=1000)]
            middleware.close()
            assert len(theirs) == len(case.expect_calls), case.id
            send(proxy.port, case.method, case.target, dict(case.headers), case.body)
            case_records.append((case.id, theirs))
    finally:
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
    by_addon = proxy.records()
    assert len(by_addon) == sum(len(c.expect_calls) for c in VENDOR_CASES)
    for case_id, theirs in case_records:
        for record in theirs:
            ours = by_addon.pop(0)
            ours.pop("upstream")
            diffs = [d for d in differences(ours, record) if d not in MAY_DIFFER]
            assert diffs == [], case_id
            compared += 1
    assert compared == sum(len(case.expect_calls) for case in VENDOR_CASES)
