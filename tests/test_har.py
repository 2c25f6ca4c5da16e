"""HAR files in and out, against HAR files a real Chromium and mitmproxy wrote.

The fixtures and how they were made: tests/fixtures/har/README.md. What each
pixel must decode to is written out here from the page that embedded them
(scripts/make_har_fixtures.py), not from the decoder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pixel_middleware import har
from pixel_middleware.core import (
    GIF,
    PixelConfig,
    PixelRecord,
    PixelRequest,
    decode_pixel,
    split_target,
)
from pixel_middleware.har import HarError, read_har, records_to_har

FIXTURES = Path(__file__).parent / "fixtures" / "har"

# (dialect, call, accepted, problem rules, what the HAR says the collector answered)
PAGE_PIXELS = [
    ("segment", "track", True, [], 200),
    ("rudderstack", "page", True, [], 200),
    ("rudderstack", "track", False, ["missing_event"], 400),
    ("segment", "identify", False, ["missing_identity"], 200),
]


def verdicts(path: Path) -> list[tuple[str, str, bool, list[str], int | None]]:
    reading = read_har(path.read_bytes())
    return [
        (
            p.record["dialect"],
            p.record["call"],
            p.record["accepted"],
            [problem["rule"] for problem in p.record["problems"]],
            p.status,
        )
        for p in reading.pixels
    ]


@pytest.mark.parametrize(("name", "others"), [("chromium.har", 1), ("mitmproxy.har", 3)])
def test_a_real_browsers_har_gives_each_pixel_of_the_page(name: str, others: int) -> None:
    reading = read_har((FIXTURES / name).read_bytes())
    assert verdicts(FIXTURES / name) == PAGE_PIXELS
    assert (reading.skipped, reading.malformed) == (others, 0)
    first = reading.pixels[0].record
    assert first["writeKey"] == "wk_fixture"
    assert first["event"]["event"] == "Email Opened"
    assert first["event"]["userId"] == "u-42"
    assert first["event"]["properties"] == {"subject": "Hi"}
    assert "HeadlessChrome/" in first["request"]["userAgent"]
    entries = json.loads((FIXTURES / name).read_text())["log"]["entries"]
    # Chrome's default referrer policy sends only the page's origin to another origin.
    page = next(e["request"]["url"] for e in entries if e["request"]["url"].endswith("email.html"))
    assert first["request"]["referer"] == page.removesuffix("email.html")
    started = entries[reading.pixels[0].index]["startedDateTime"]
    # The record's receivedAt is when the browser sent it, to the millisecond.
    expected = datetime.fromisoformat(started).astimezone(UTC)
    assert first["receivedAt"] == expected.strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{expected.microsecond // 1000:03d}Z"
    )


def test_firefoxs_har_with_offsets_padding_and_a_post() -> None:
    reading = read_har((FIXTURES / "firefox.har").read_bytes())
    assert verdicts(FIXTURES / "firefox.har") == [
        ("segment", "track", True, [], 200),
        ("rudderstack", "track", True, [], 200),
        ("rudderstack", "page", False, ["missing_write_key"], 400),
    ]
    # The page and the POST to a pixel route (answered 405, recorded nowhere).
    assert (reading.skipped, reading.malformed) == (2, 0)
    track = reading.pixels[0].record
    assert track["event"]["properties"] == {"total": 9.5}
    assert track["notes"] == []  # standard alphabet, padded: nothing to repair
    # 15:10:01.107+01:00 is 14:10:01.107 UTC.
    assert track["receivedAt"] == "2026-12-01T14:10:01.107Z"
    assert track["request"]["userAgent"].endswith("Firefox/128.0")
    assert reading.pixels[1].record["event"]["properties"] == {"items": "2"}


def har_of(*entries: Any) -> bytes:
    return json.dumps({"log": {"version": "1.2", "entries": list(entries)}}).encode()


def pixel_entry(url: str, **fields: Any) -> dict[str, Any]:
    return {
        "startedDateTime": "2026-01-02T03:04:05.678Z",
        "request": {"method": "GET", "url": url, "headers": []},
        **fields,
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON (line 1, column 1)"),
        (b"\xff\xfe{", "not UTF-8"),
        (b"[1, 2]", 'no "log"'),
        (b'{"log": {"entries": {}}}', 'no "log"'),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["empty", "binary", "a-list", "entries-not-a-list", "deep"],
)
def test_what_is_not_a_har_is_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(HarError, match="not a HAR file") as caught:
        read_har(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_entries_that_are_not_requests_are_counted_not_fatal() -> None:
    reading = read_har(
        har_of(
            1,
            {"request": "GET /"},
            {"request": {"method": "GET"}},
            {"request": {"method": "GET", "url": "http://h/" + "a" * har.MAX_URL_CHARS}},
            pixel_entry("http://h/v1/pixel/page?userId=u"),
            pixel_entry("http://h/other"),
            {**pixel_entry("http://h/v1/pixel/page?userId=u"), "startedDateTime": "yesterday"},
        )
    )
    assert (len(reading.pixels), reading.skipped, reading.malformed) == (2, 1, 4)
    assert reading.pixels[0].record["receivedAt"] == "2026-01-02T03:04:05.678Z"
    # A time that is not ISO 8601: the time of reading, as decode URL does.
    assert reading.pixels[1].record["receivedAt"][:4] == str(datetime.now(UTC).year)


def test_url_length_boundary() -> None:
    base = "http://h/v1/pixel/page?userId=u&x="
    at_limit = base + "a" * (har.MAX_URL_CHARS - len(base))
    assert len(read_har(har_of(pixel_entry(at_limit))).pixels) == 1
    assert read_har(har_of(pixel_entry(at_limit + "a"))).malformed == 1


def test_size_and_entry_limits_at_the_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    data = har_of(pixel_entry("http://h/v1/pixel/page?userId=u"))
    monkeypatch.setattr(har, "MAX_HAR_BYTES", len(data))
    assert len(read_har(data).pixels) == 1
    monkeypatch.setattr(har, "MAX_HAR_BYTES", len(data) - 1)
    with pytest.raises(HarError, match="over"):
        read_har(data)
    monkeypatch.setattr(har, "MAX_HAR_BYTES", 1 << 30)
    monkeypatch.setattr(har, "MAX_HAR_ENTRIES", 3)
    assert read_har(har_of({}, {}, {})).malformed == 3
    with pytest.raises(HarError, match="4 entries, over 3"):
        read_har(har_of({}, {}, {}, {}))


def test_headers_are_read_case_blind_and_repeated_ones_joined() -> None:
    entry = pixel_entry("http://h/v1/pixel/page?userId=u")
    entry["request"]["headers"] = [
        {"name": "user-agent", "value": "UA é"},
        {"name": "X-Forwarded-For", "value": "198.51.100.1"},
        {"name": "x-forwarded-for", "value": "203.0.113.9"},
        {"name": 3, "value": "x"},
        "junk",
    ]
    config = PixelConfig(trusted_proxies=2)
    record = read_har(har_of(entry), config=config).pixels[0].record
    assert record["request"]["userAgent"] == "UA é"
    assert record["request"]["ip"] == "198.51.100.1"


def decoded(url: str, *, ip: str = "192.0.2.1", ua: str | None = "UA/1") -> PixelRecord:
    path, query = split_target(url.encode())
    outcome = decode_pixel(
        PixelRequest("GET", path, query, ip, ua, None, "https://mail.example/"),
        config=PixelConfig(),
        now=datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC),
    )
    assert outcome is not None
    assert outcome.record is not None
    return outcome.record


def test_records_to_har_answers_as_the_collector_did() -> None:
    accepted_rudder = decoded("/pixel/v1/track?writeKey=k&anonymousId=a&event=E")
    rejected_rudder = decoded("/pixel/v1/track?writeKey=k&anonymousId=a")
    rejected_segment = decoded("/v1/pixel/track?writeKey=k&userId=u")
    upstream = decoded("/v1/pixel/track?writeKey=k&userId=u&event=E")
    upstream["upstream"] = {"status": 502, "contentType": "text/html", "ms": 31.5}
    document = records_to_har(
        [accepted_rudder, rejected_rudder, rejected_segment, upstream],
        base_url="https://px.example.com/",
    )
    entries = document["log"]["entries"]
    assert document["log"]["version"] == "1.2"
    assert [e["response"]["status"] for e in entries] == [200, 400, 200, 502]
    assert entries[0]["response"]["content"]["text"] == "OK"
    assert entries[1]["response"]["content"]["text"] == "A track call needs a non-empty event name."
    headers = {h["name"]: h["value"] for h in entries[2]["response"]["headers"]}
    assert headers["X-Pixel-Rejected"] == "missing_event"
    # The GIF as the real collector sent it to Chromium.
    chromium = json.loads((FIXTURES / "chromium.har").read_text())["log"]["entries"]
    sent = next(e for e in chromium if "/v1/pixel/identify" in e["request"]["url"])
    assert entries[2]["response"]["content"]["text"] == sent["response"]["content"]["text"]
    assert entries[2]["response"]["bodySize"] == len(GIF) == 43
    # What the upstream sent is not known: no body is made up for it.
    assert entries[3]["response"]["content"] == {"size": 0, "mimeType": "text/html", "text": ""}
    assert entries[3]["time"] == entries[3]["timings"]["wait"] == 31.5
    first = entries[0]
    assert first["request"]["url"] == (
        "https://px.example.com/pixel/v1/track?writeKey=k&anonymousId=a&event=E"
    )
    assert first["request"]["queryString"][2] == {"name": "event", "value": "E"}
    assert {"name": "Referer", "value": "https://mail.example/"} in first["request"]["headers"]
    assert first["startedDateTime"] == "2026-03-04T05:06:07.891Z"
    assert first["_pixel"]["id"] == accepted_rudder["id"]
    assert first["_pixel"]["ip"] == "192.0.2.1"


def test_a_written_har_reads_back_to_the_same_records() -> None:
    records = [
        decoded("/pixel/v1/page?writeKey=k&anonymousId=a&name=P&properties.n=1"),
        decoded("/v1/pixel/track?data=eyJ3cml0ZUtleSI6ImsiLCJ1c2VySWQiOiJ1In0", ua=None),
        decoded("/v1/pixel/group?writeKey=k&userId=u&groupId=g&traits.x=%E2%9C%93"),
    ]
    data = json.dumps(records_to_har(records)).encode()
    assert [p.record for p in read_har(data).pixels] == records
