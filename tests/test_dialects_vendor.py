"""Third-party dialects (GA4, Universal Analytics, Meta, Snowplow, Matomo, PostHog,
Jitsu): every case of tests/vendor_cases.py through the core, then byte for byte
through the middleware (dialect enabled) and a real mitmdump, which must agree;
routing by path and host; limits and no-raise properties for queries and bodies."""

from __future__ import annotations

import gzip
import json
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cases import Case, case_config, case_request, segment_data
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
FIXTURES = Path(__file__).parent / "fixtures"
THIRD_PARTY = tuple(d for d in DIALECTS if d not in DEFAULT_DIALECTS)
ALL = PixelConfig(dialects=frozenset(DIALECTS))


@pytest.mark.parametrize("case", VENDOR_CASES, ids=[case.id for case in VENDOR_CASES])
def test_vendor_case(case: Case) -> None:
    outcome = decode_pixel(case_request(case), config=case_config(case), now=NOW)
    if not case.expect_calls:  # declined: the application's request
        assert outcome is None
        return
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
        ("/e", "shop.example", "posthog"),  # routed; its claim then decides
        ("/e/", None, "posthog"),
        ("/i/v0/e/", None, "posthog"),
        ("/capture", None, "posthog"),
        ("/capture/", None, "posthog"),
        ("/batch/", None, "posthog"),
        ("/batch", "us.i.posthog.com", "posthog"),
        ("/batch", "www.google-analytics.com", "universal_analytics"),
        ("/e//", None, None),
        ("/i/v0/e/x", None, None),
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


_PH_KEYED = b'{"event": "x", "distinct_id": "u", "api_key": "phc_k"}'
_PH_UNKEYED = b'{"event": "x", "distinct_id": "u"}'
_POSTHOG_ONLY = PixelConfig(dialects=frozenset({"posthog"}))


def _posthog(
    method: str,
    path: str,
    query: bytes = b"",
    body: bytes = b"",
    host: str | None = "us.i.posthog.com",
    config: PixelConfig = _POSTHOG_ONLY,
) -> Any:
    request = PixelRequest(method, path, query, body=body, host=host)
    return decode_pixel(request, config=config, now=NOW)


@pytest.mark.parametrize(
    ("path", "host", "query", "body", "claimed"),
    [
        ("/e", "shop.example", b"", _PH_UNKEYED, False),
        ("/e", "shop.example", b"", _PH_KEYED, True),
        ("/e/", "shop.example", b"", b'{"event": "x", "token": "phc_k"}', True),
        ("/capture", "shop.example", b"", b'{"properties": {"token": "phc_k"}}', True),
        ("/e", "shop.example", b"", b'[{"event": "x"}, {"properties": {"token": "k"}}]', True),
        ("/batch", "shop.example", b"", b'{"api_key": "phc_k", "batch": []}', True),
        ("/batch", "shop.example", b"", b'{"batch": [{"event": "x"}]}', False),
        ("/e", "shop.example", b"", b'{"api_key": "  ", "token": 7}', False),  # not a key
        ("/e", "shop.example", b"", b"\x1f\x8b not gzip", False),
        ("/e", "shop.example", b"compression=gzip-js", _PH_KEYED, False),  # unreadable
        ("/e", "shop.example", b"data=" + segment_data({"token": "k"}).encode(), b"", True),
        ("/e", "shop.example", b"data=" + segment_data({"event": "x"}).encode(), b"", False),
        ("/capture", None, b"", b"", False),
        ("/e", "us.i.posthog.com", b"", _PH_UNKEYED, True),
        ("/e", "posthog.com:443", b"", _PH_UNKEYED, True),
        ("/e", "evilposthog.com", b"", _PH_UNKEYED, False),  # a suffix, not a subdomain
        ("/e", "us.i.posthog.com.example", b"", _PH_UNKEYED, False),
        ("/i/v0/e", "shop.example", b"", _PH_UNKEYED, True),  # names PostHog in its path
        ("/i/v0/e/", None, b"", b"", True),
    ],
)
def test_posthog_common_paths_are_its_only_on_its_hosts_or_with_a_project_key(
    path: str, host: str | None, query: bytes, body: bytes, claimed: bool
) -> None:
    method = "POST" if body else "GET"
    outcome = _posthog(method, path, query, body, host)
    assert (outcome is not None) == claimed
    if claimed:
        assert outcome.status == 200
        assert outcome.body == b'{"status":1}'
        assert all(r["dialect"] == "posthog" for r in outcome.records)


def test_posthog_decompressed_payloads_are_held_to_max_decompressed_bytes() -> None:
    vectors = json.loads((FIXTURES / "lz64_vectors.json").read_text("utf-8"))["vectors"]
    pageview = next(v for v in vectors if v["text"].startswith('{"event":"$pageview"'))
    text_bytes = len(pageview["text"].encode("utf-8"))
    lz64 = b"data=" + quote(pageview["compressed"], safe="").encode()
    event = json.dumps({"api_key": "k", "event": "x", "distinct_id": "u"}).encode()
    gzipped = gzip.compress(event, mtime=0)
    for query, body, size in (
        (b"compression=lz64", lz64, text_bytes),
        (b"compression=gzip-js", gzipped, len(event)),
    ):
        for cap, rules in ((size, []), (size - 1, ["too_large"])):
            config = PixelConfig(
                dialects=frozenset({"posthog"}), limits=Limits(max_decompressed_bytes=cap)
            )
            outcome = _posthog("POST", "/e/", query, body, config=config)
            assert outcome is not None
            found = [p["rule"] for r in outcome.records for p in r["problems"]]
            assert found == rules, (query, cap)


def test_posthog_batches_are_held_to_max_batch_events() -> None:
    config = PixelConfig(dialects=frozenset({"posthog"}), limits=Limits(max_batch_events=2))
    for count, rules, records in ((2, [], 2), (3, ["too_many_events"], 1)):
        batch = [{"event": f"e{i}", "distinct_id": "u"} for i in range(count)]
        for payload in ({"api_key": "k", "batch": batch}, [{**e, "token": "k"} for e in batch]):
            outcome = _posthog("POST", "/batch", body=json.dumps(payload).encode(), config=config)
            assert outcome is not None
            assert [p["rule"] for r in outcome.records for p in r["problems"]] == rules
            assert len(outcome.records) == records


@pytest.mark.parametrize(
    ("query", "body", "rule"),
    [
        (b"compression=lz64", b"data=%21%21%21", "bad_base64"),  # outside the alphabet
        (b"compression=lz64", b"data=AAAA", "bad_base64"),  # lz-string gives null
        (b"", b"data=%21%21%21", "bad_base64"),
        (b"", b'{"api_key": "k", "batch": 5}', "bad_batch"),
        (b"", b"7", "bad_base64"),  # neither JSON, a form, nor base64
        (b"", b"Nw==", "not_an_object"),  # base64 of 7
        (b"", b'[{"event": "x"}, 7]', "not_an_object"),
        (b"", b"[]", "not_an_object"),  # no event at all
        (b"compression=gzip-js", _PH_KEYED, "bad_gzip"),
    ],
)
def test_posthog_payloads_that_cannot_be_read(query: bytes, body: bytes, rule: str) -> None:
    outcome = _posthog("POST", "/e/", query, body)
    assert outcome is not None
    assert (outcome.status, outcome.body) == (200, b'{"status":1}')
    assert [(r["event"], [p["rule"] for p in r["problems"]]) for r in outcome.records] == [
        (None, [rule])
    ]
    assert dict(outcome.headers)["X-Pixel-Rejected"] == rule


def _ph_event(event: dict[str, Any]) -> dict[str, Any]:
    outcome = _posthog("POST", "/e", body=json.dumps({"api_key": "k", **event}).encode())
    assert outcome is not None
    record = outcome.records[0]
    assert record["problems"] == []
    assert record["writeKey"] == "k"
    assert record["event"]["type"] == record["call"]
    result: dict[str, Any] = record["event"]
    return result


def test_posthog_distinct_id_is_the_anonymous_id_while_it_is_the_devices() -> None:
    device = {"$device_id": "dev-1", "$anon_distinct_id": "anon-1"}
    before = _ph_event({"event": "x", "distinct_id": "dev-1", "properties": device})
    assert (before.get("userId"), before["anonymousId"]) == (None, "dev-1")
    anon = _ph_event({"event": "x", "distinct_id": "anon-1", "properties": device})
    assert (anon.get("userId"), anon["anonymousId"]) == (None, "anon-1")
    after = _ph_event({"event": "x", "distinct_id": "u-1", "properties": device})
    assert (after["userId"], after["anonymousId"]) == ("u-1", "anon-1")
    bare = _ph_event({"event": "x", "distinct_id": 42})  # a number is read as its text
    assert (bare["userId"], bare.get("anonymousId")) == ("42", None)


def test_posthog_special_events_map_to_their_segment_calls() -> None:
    identify = _ph_event({"event": "$identify", "distinct_id": "u", "$set": {"plan": "pro"}})
    assert (identify["type"], identify["traits"]) == ("identify", {"plan": "pro"})
    in_props = _ph_event(
        {"event": "$identify", "distinct_id": "u", "properties": {"$set": {"a": 1}}}
    )
    assert in_props["traits"] == {"a": 1}
    group = _ph_event(
        {
            "event": "$groupidentify",
            "distinct_id": "u",
            "properties": {"$group_type": "company", "$group_key": "acme", "$group_set": {"n": 1}},
        }
    )
    assert (group["type"], group["groupId"], group["traits"]) == ("group", "acme", {"n": 1})
    alias = _ph_event(
        {"event": "$create_alias", "distinct_id": "old", "properties": {"alias": "new"}}
    )
    assert (alias["type"], alias["userId"], alias["previousId"]) == ("alias", "new", "old")
    screen = _ph_event(
        {"event": "$screen", "distinct_id": "u", "properties": {"$screen_name": "Home"}}
    )
    assert (screen["type"], screen["name"]) == ("screen", "Home")
    page = _ph_event(
        {"event": "$pageview", "distinct_id": "u", "properties": {"$current_url": "https://a/"}}
    )
    assert (page["type"], page["name"], page["context"]["page"]) == (
        "page",
        "https://a/",
        {"url": "https://a/"},
    )
    track = _ph_event({"event": "$autocapture", "distinct_id": "u"})
    assert (track["type"], track["event"]) == ("track", "$autocapture")


def test_posthog_requires_its_key_event_and_distinct_id() -> None:
    outcome = _posthog("POST", "/capture", body=b"{}")
    assert outcome is not None
    assert {p["message"] for p in outcome.records[0]["problems"]} == {
        "The posthog hit needs api_key.",
        "The posthog hit needs event.",
        "The posthog hit needs distinct_id.",
    }


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
        ("/e/", "us.i.posthog.com"),
        ("/i/v0/e/", None),
        ("/batch", "eu.i.posthog.com"),
        ("/capture", "app.posthog.com"),
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
    compression=st.sampled_from([b"", b"compression=gzip-js&", b"compression=lz64&"]),
)
def test_nothing_raises_and_limits_hold(
    where: tuple[str, str | None],
    method: str,
    query: bytes,
    body: bytes,
    gzip: bool,
    compression: bytes,
) -> None:
    path, host = where
    query = compression + query  # PostHog's payload formats; others ignore it
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


def _read_all(environ: Any) -> bytes:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return bytes(environ["wsgi.input"].read(length)) if length else b""


@pytest.mark.mitmproxy
def test_every_vendor_case_gives_the_same_records_in_the_middleware_and_the_addon(
    tmp_path: Path,
) -> None:
    """Each case, byte for byte, to PixelMiddleware (its dialect enabled) on a real
    server and to a real mitmdump keeping the Host header: the same records."""
    # What reached the application behind each front end: a request a dialect
    # declines must arrive there with its body whole, and no other may.
    upstream_bodies: list[tuple[str, bytes]] = []

    def upstream_app(environ: Any, start_response: Any) -> Any:
        upstream_bodies.append((environ["PATH_INFO"], _read_all(environ)))
        return ok(environ, start_response)

    upstream = make_server(
        "127.0.0.1", 0, upstream_app, threaded=True, request_handler=QuietHandler
    )
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
            app_bodies: list[bytes] = []

            def app(environ: Any, start_response: Any, seen: list[bytes] = app_bodies) -> Any:
                seen.append(_read_all(environ))
                return not_found(environ, start_response)

            middleware = PixelMiddleware(app, store="memory://", **case.config)
            with serving(middleware) as url:
                port = int(url.rsplit(":", 1)[1])
                status = send(port, case.method, case.target, dict(case.headers), case.body)
                assert status == case.expect_status, case.id
            theirs = [record for _, record in middleware.store.read(limit=1000)]
            middleware.close()
            assert len(theirs) == len(case.expect_calls), case.id
            assert app_bodies == ([] if case.expect_calls else [case.body]), case.id
            upstream_bodies.clear()
            send(proxy.port, case.method, case.target, dict(case.headers), case.body)
            # The addon only watches: every request goes on upstream, whole.
            assert [body for _, body in upstream_bodies] == [case.body], case.id
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
