"""Tests for pixel_middleware.encode: pixel URLs that decode back to the event."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware.core import PixelConfig, PixelRequest, decode_pixel, split_target
from pixel_middleware.encode import encode_pixel_url, pixel_img_tag

NOW = datetime(2026, 11, 23, 16, 20, tzinfo=UTC)
# What the server adds to every event; removed from a decoded event unless sent.
SERVER_FIELDS = (
    "type",
    "messageId",
    "receivedAt",
    "timestamp",
    "channel",
    "integrations",
    "originalTimestamp",
    "sentAt",
)


def decode_url(url: str, config: PixelConfig | None = None) -> tuple[dict[str, Any], Any]:
    parts = urlsplit(url)
    path, query = split_target(f"{parts.path}?{parts.query}".encode("ascii"))
    outcome = decode_pixel(
        PixelRequest("GET", path, query), config=config or PixelConfig(), now=NOW
    )
    assert outcome is not None
    assert outcome.record is not None
    assert outcome.record["event"] is not None
    return outcome.record["event"], outcome.record


def sent_back(event: dict[str, Any], decoded: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value for key, value in decoded.items() if key in event or key not in SERVER_FIELDS
    }


# --- examples ---------------------------------------------------------------------------


def test_segment_example() -> None:
    event = {
        "userId": "user_123",
        "event": "Email Opened",
        "properties": {"subject": "The Electric Daily", "email": "jane.kim@example.com"},
    }
    url = encode_pixel_url(event, call="track", write_key="YOUR_WRITE_KEY")
    assert url.startswith("http://127.0.0.1:8000/v1/pixel/track?data=eyJ3cml0ZUtleSI6")
    data = url.partition("data=")[2]
    assert "=" not in data
    assert "+" not in data
    assert "/" not in data
    decoded, record = decode_url(url)
    assert sent_back(event, decoded) == event
    assert record["writeKey"] == "YOUR_WRITE_KEY"
    assert record["accepted"]


def test_rudderstack_example() -> None:
    event = {
        "anonymousId": "a1",
        "event": "Checkout Started",
        "context": {"page": {"url": "https://shop.example/?q=a b&c=d"}},
        "properties": {"items": [{"sku": "s1", "qty": 2}], "paid": True, "total": 9.5},
    }
    url = encode_pixel_url(
        event,
        call="track",
        write_key="k",
        dialect="rudderstack",
        base_url="https://collect.example/",
        prefix="/p",
    )
    assert url == (
        "https://collect.example/p/pixel/v1/track?writeKey=k&anonymousId=a1"
        "&event=Checkout%20Started"
        "&context.page.url=https%3A%2F%2Fshop.example%2F%3Fq%3Da%20b%26c%3Dd"
        "&properties.items.0.sku=s1&properties.items.0.qty=2&properties.paid=true"
        "&properties.total=9.5"
    )
    decoded, record = decode_url(url, PixelConfig(prefix="/p"))
    assert record["accepted"]
    assert sent_back(event, decoded) == {
        **event,
        "properties": {"items": [{"sku": "s1", "qty": "2"}], "paid": "true", "total": "9.5"},
    }


def test_rudderstack_keeps_quotes_and_gaps() -> None:
    event = {"anonymousId": '"a"', "event": "E", "properties": {"l": [None, "x"]}}
    url = encode_pixel_url(event, call="track", write_key="k", dialect="rudderstack")
    decoded, record = decode_url(url)
    assert sent_back(event, decoded) == event
    assert [note["rule"] for note in record["notes"]] == ["quotes_stripped"]


def test_type_and_write_key_may_repeat_the_arguments() -> None:
    url = encode_pixel_url({"type": "page", "writeKey": "k"}, call="page", write_key="k")
    assert url == encode_pixel_url({}, call="page", write_key="k")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dialect": "snowplow"}, "dialect must be one of segment, rudderstack"),
        ({"call": "batch"}, "call for segment must be one of identify"),
        ({"call": "identify", "dialect": "rudderstack"}, "call for rudderstack must be one of"),
        ({"write_key": ""}, "write_key must be a non-empty string"),
        ({"prefix": "p"}, "prefix must be"),
        ({"prefix": "/p/"}, "prefix must be"),
        ({"event": ["not", "a", "mapping"]}, "event must be a mapping"),
        ({"event": {"writeKey": "other"}}, "different from write_key"),
        ({"event": {"type": "page"}}, "the route sets 'track'"),
        ({"event": {"a": math.nan}}, "Out of range float"),
        ({"event": {"a": {1, 2}}}, "not JSON-serialisable"),
        ({"event": {"a": "\ud800"}}, "not valid Unicode"),
    ],
)
def test_segment_errors(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {"event": {"userId": "u"}, "call": "track", "write_key": "k"}
    options.update(kwargs)
    event = options.pop("event")
    with pytest.raises(ValueError, match=match):
        encode_pixel_url(event, **options)


@pytest.mark.parametrize(
    ("event", "match"),
    [
        ({"a.b": "x"}, r"cannot be empty or contain '\.'"),
        ({"": "x"}, "cannot be empty"),
        ({"p": {"2": "x"}}, "numeric key below the top level"),
        ({"p": {}}, "empty object"),
        ({"p": []}, "empty array"),
        ({"p": ["x", None]}, "ending in null"),
        ({"p": None}, "cannot express null"),
        ({"p": math.inf}, "cannot express inf"),
        ({"p": b"x"}, "strings, numbers and booleans"),
        ({"p": {1: "x"}}, "keys must be strings"),
        ({"p": "\udc80"}, "not valid Unicode"),
    ],
)
def test_rudderstack_errors(event: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_pixel_url(event, call="track", write_key="k", dialect="rudderstack")


def test_rudderstack_numeric_top_level_key_is_fine() -> None:
    url = encode_pixel_url({"7": "x"}, call="page", write_key="k", dialect="rudderstack")
    assert url.endswith("?writeKey=k&7=x")


def test_img_tag() -> None:
    assert pixel_img_tag('http://x/?a=1&b="2"<') == (
        '<img src="http://x/?a=1&amp;b=&quot;2&quot;&lt;" width="1" height="1" alt=""'
        ' style="display:none">'
    )


# --- round trips ------------------------------------------------------------------------

RESERVED = {"writeKey", "type", "messageId", "receivedAt", "integrations", "context"}
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=15,
)
segment_events = st.dictionaries(
    st.text(max_size=8).filter(lambda key: key not in RESERVED), json_values, max_size=6
)


@settings(max_examples=300, deadline=None)
@given(event=segment_events, call=st.sampled_from(["identify", "track", "alias", "page"]))
@example(event={"timestamp": "2020-01-01T00:00:00Z", "": {"": [None]}}, call="track")
def test_segment_round_trip(event: dict[str, Any], call: str) -> None:
    url = encode_pixel_url(event, call=call, write_key="k")
    decoded, record = decode_url(url)
    assert record["writeKey"] == "k"
    assert sent_back(event, decoded) == event


# RudderStack: string leaves, keys without dots, nested keys not numeric, and
# arrays that neither are empty nor end in null.
rs_keys = st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=6)
rs_nested_keys = rs_keys.filter(lambda key: not (key.isdigit() and key.isascii()))


def _rs_value(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.dictionaries(rs_nested_keys, children, min_size=1, max_size=3) | st.lists(
        st.none() | children, min_size=1, max_size=3
    ).filter(lambda items: items[-1] is not None)


rs_values = st.recursive(st.text(max_size=8), _rs_value, max_leaves=12)
rudderstack_events = st.dictionaries(
    rs_keys.filter(lambda key: key not in RESERVED), rs_values, max_size=6
)


@settings(max_examples=300, deadline=None)
@given(event=rudderstack_events)
@example(event={"anonymousId": '"'})
@example(event={"anonymousId": '""'})
@example(event={"sentAt": "x", "channel": "email", "7": "seven"})
def test_rudderstack_round_trip(event: dict[str, Any]) -> None:
    url = encode_pixel_url(event, call="track", write_key="k", dialect="rudderstack")
    decoded, record = decode_url(url)
    assert record["writeKey"] == "k"
    assert sent_back(event, decoded) == event
    # The encoder sends times as given; one that is not a time is noted.
    not_times = {
        key
        for key in ("timestamp", "originalTimestamp", "sentAt")
        if isinstance(event.get(key), str) and not _is_iso_time(event[key])
    }
    allowed = {"quotes_stripped"} | ({"unparsed_time"} if not_times else set())
    assert {note["rule"] for note in record["notes"]} <= allowed


def _is_iso_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return len(text) <= 64
