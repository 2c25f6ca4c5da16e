"""Tests for pixel_middleware.dialects.segment: the fast path of a common pixel.

``_common_pixel`` makes the record of the usual Segment pixel (``data=`` alone,
base64 of a clean object) in one function, and hands everything else to the
general path. These tests prove it changes nothing: generated pixels of every
call, with valid and invalid fields, odd types and limits at their edges, give
the same outcome (status, headers, body, records) with the fast path as with
the general path alone.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware.core import (
    Limits,
    PixelConfig,
    PixelOutcome,
    PixelRequest,
    decode_pixel,
    match_route,
)
from pixel_middleware.dialects import segment

pytest.importorskip("msgspec")  # without it there is no fast path to compare

NOW = datetime(2026, 11, 23, 16, 20, 0, 123_000, tzinfo=UTC)
RECEIVED_AT = "2026-11-23T16:20:00.123Z"
CALLS = ("identify", "group", "alias", "page", "screen", "track")
UA = "Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0"


def ids(prefix: str = "id") -> Callable[[], str]:
    """Deterministic ids, so that two runs can be compared record for record."""
    counter: Iterator[int] = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"


def run(request: PixelRequest, config: PixelConfig, *, fast: bool) -> tuple[Any, ...]:
    """The whole outcome, and what the next id drawn would be (ids used up alike)."""
    new_id = ids()
    if fast:
        outcome = decode_pixel(request, config=config, now=NOW, new_id=new_id)
    else:
        with mock.patch.object(segment, "_FAST_LOADS", None):  # the general path alone
            outcome = decode_pixel(request, config=config, now=NOW, new_id=new_id)
    assert outcome is not None
    return outcome.status, outcome.headers, outcome.body, outcome.records, new_id()


def pixel(data: bytes, call: str = "track", *, method: str = "GET", **headers: Any) -> PixelRequest:
    return PixelRequest(
        method,
        f"/v1/pixel/{call}",
        data,
        headers.get("peer", "203.0.113.9"),
        headers.get("user_agent", UA),
        headers.get("forwarded_for"),
        headers.get("referer"),
    )


def b64(event: Any) -> bytes:
    return base64.b64encode(json.dumps(event).encode())


COMMON = {
    "writeKey": "wk",
    "event": "Order Completed",
    "userId": "u1",
    "properties": {"total": 42.5},
    "timestamp": "2026-11-23T16:19:59.000Z",
}


def test_a_common_pixel_takes_the_fast_path() -> None:
    request = pixel(b"data=" + b64(COMMON).rstrip(b"="))
    config = PixelConfig()
    route = match_route(request.path, config)
    assert route is not None
    outcome = segment._common_pixel(request, route, config, NOW, ids())
    assert outcome is not None
    assert run(request, config, fast=True) == run(request, config, fast=False)
    assert outcome.records[0]["accepted"]
    assert outcome.records[0]["event"] == {
        "event": "Order Completed",
        "userId": "u1",
        "properties": {"total": 42.5},
        "timestamp": "2026-11-23T16:19:59.000Z",
        "type": "track",
        "messageId": "id-1",
        "receivedAt": RECEIVED_AT,
        "context": {"ip": "203.0.113.9", "userAgent": UA},
    }


@pytest.mark.parametrize(
    "event",
    [
        {**COMMON, "writeKey": " "},
        {**COMMON, "userId": ""},
        {**COMMON, "event": "  "},
        {**COMMON, "type": "page"},
        {**COMMON, "receivedAt": RECEIVED_AT},
        {**COMMON, "messageId": "m" * 101},
        {**COMMON, "messageId": 7},
        {**COMMON, "timestamp": "yesterday"},
        {**COMMON, "properties": []},
        [COMMON],
    ],
    ids=[
        "blank-write-key",
        "blank-user-id",
        "blank-event",
        "type-overridden",
        "received-at-sent",
        "message-id-101",
        "message-id-number",
        "unparsed-time",
        "properties-not-object",
        "not-an-object",
    ],
)
def test_what_is_not_common_is_left_to_the_general_path(event: Any) -> None:
    request = pixel(b"data=" + b64(event))
    config = PixelConfig()
    route = match_route(request.path, config)
    assert route is not None
    assert segment._common_pixel(request, route, config, NOW, ids()) is None
    assert run(request, config, fast=True) == run(request, config, fast=False)


def test_an_event_too_large_only_with_its_ids_draws_the_same_ids() -> None:
    # The event fits until the generated messageId is in: the general path,
    # taking over, must use the ids already drawn, in the same order.
    event = {k: v for k, v in COMMON.items() if k != "timestamp"}
    for limit in range(150, 400):
        config = PixelConfig(limits=Limits(max_event_bytes=limit))
        request = pixel(b"data=" + b64(event), user_agent=None, peer=None)
        fast, general = run(request, config, fast=True), run(request, config, fast=False)
        assert fast == general, limit


# Generated pixels -----------------------------------------------------------------

_TIMES = st.sampled_from(
    [
        RECEIVED_AT,
        "2026-11-23T16:19:59.000Z",
        "2026-11-23T16:19:58+02:00",
        "2026-11-23",
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00+01:00",
        "not a time",
        "",
    ]
)
_VALID_TIMES = st.sampled_from(
    [RECEIVED_AT, "2026-11-23T16:19:59.000Z", "2026-11-23T16:19:58+02:00", "2026-11-23"]
)
_TEXT = st.one_of(
    st.sampled_from(["", " ", "\t", "x", "Order Completed", "é", "\ud800"]),
    st.text(max_size=12),
)
_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.just([]),
    st.just({}),
    st.just([1, {"a": None}]),
)
_VALUE = st.one_of(_TEXT, _ODD)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "writeKey": st.one_of(st.sampled_from(["wk", "other"]), _VALUE),
    "userId": _VALUE,
    "anonymousId": _VALUE,
    "event": _VALUE,
    "name": _VALUE,
    "groupId": _VALUE,
    "previousId": _VALUE,
    "type": st.one_of(st.sampled_from(CALLS), _VALUE),
    "messageId": st.one_of(st.sampled_from(["m-1", "m" * 100, "m" * 101, " ", ""]), _VALUE),
    "receivedAt": _VALUE,
    "timestamp": st.one_of(_TIMES, _VALUE),
    "originalTimestamp": st.one_of(_TIMES, _VALUE),
    "sentAt": st.one_of(_TIMES, _VALUE),
    "properties": st.one_of(
        st.dictionaries(st.text(max_size=4), _VALUE, max_size=3),
        st.recursive(st.just({}), lambda inner: st.dictionaries(st.just("k"), inner, max_size=1)),
        _VALUE,
    ),
    "traits": st.one_of(st.dictionaries(st.text(max_size=4), _VALUE, max_size=3), _VALUE),
    "context": st.one_of(
        st.fixed_dictionaries({}, optional={"ip": _VALUE, "userAgent": _VALUE, "page": _VALUE}),
        _VALUE,
    ),
    "integrations": st.one_of(st.just({"All": True}), _VALUE),
    "extra": _VALUE,
}
# What each call needs to be accepted.
_REQUIRED = {
    "track": {"event": "Opened"},
    "group": {"groupId": "g1"},
    "alias": {"userId": "u1", "previousId": "p1"},
}
# Valid fields beyond those: the common shape.
_VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "userId": st.sampled_from(["u1", "42"]),
    "anonymousId": st.one_of(st.just("a-1"), st.integers(0, 9), st.floats(0, 1)),
    "name": st.just("Home"),
    "messageId": st.sampled_from(["m-1", "m" * 100]),
    "timestamp": _VALID_TIMES,
    "originalTimestamp": _VALID_TIMES,
    "sentAt": _VALID_TIMES,
    "properties": st.dictionaries(st.text(max_size=4), _VALUE, max_size=3),
    "traits": st.none(),
    "context": st.fixed_dictionaries(
        {}, optional={"ip": st.just("198.51.100.1"), "userAgent": st.just("SDK")}
    ),
}


_DROP: Any = object()
_NEAR_MISSES = [
    ("writeKey", "other"),
    ("writeKey", " "),
    ("writeKey", ""),
    ("writeKey", 5),
    ("writeKey", _DROP),
    ("userId", " "),
    ("userId", _DROP),
    ("userId", True),
    ("anonymousId", ""),
    ("event", "\t"),
    ("event", None),
    ("groupId", ""),
    ("previousId", " "),
    ("name", 3),
    ("messageId", "m" * 101),
    ("messageId", ""),
    ("messageId", " "),
    ("messageId", 7),
    ("messageId", None),
    ("type", "screen"),
    ("type", None),
    ("receivedAt", RECEIVED_AT),
    ("timestamp", "not a time"),
    ("originalTimestamp", "2026-13-01T00:00:00Z"),
    ("sentAt", ""),
    ("properties", {"lone": "\ud800"}),
    ("properties", {"fine": "\u00e9\U0001f600"}),
    ("properties", []),
    ("context", None),
    ("context", "ctx"),
    ("integrations", {"All": False}),
]


@st.composite
def _events(draw: st.DrawFn, call: str) -> Any:
    """Mostly the common shape for ``call``, often with one or two odd fields."""
    kind = draw(st.sampled_from(["common"] * 3 + ["near-miss"] * 3 + ["odd", "not-an-object"]))
    if kind == "not-an-object":
        return draw(_ODD)
    event: dict[str, Any] = {"writeKey": "wk", "userId": "u1", **_REQUIRED.get(call, {})}
    for name in draw(st.lists(st.sampled_from(sorted(_VALID_FIELDS)), max_size=5, unique=True)):
        event[name] = draw(_VALID_FIELDS[name])
    if draw(st.booleans()):
        event["type"] = call  # the route's call: nothing to note
    if kind == "near-miss":
        # One field just outside the common shape: each way out of the fast path.
        name, value = draw(st.sampled_from(_NEAR_MISSES))
        if value is _DROP:
            event.pop(name, None)
        else:
            event[name] = value
    if kind == "odd":
        for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), min_size=1, max_size=2)):
            event[name] = draw(_FIELDS[name])
    if draw(st.booleans()):
        # The sender's order of fields is kept: shuffle it.
        names = draw(st.permutations(list(event)))
        event = {name: event[name] for name in names}
    return event


def _encodings(text: bytes) -> st.SearchStrategy[bytes]:
    standard = base64.b64encode(text)
    url_safe = base64.urlsafe_b64encode(text)
    return st.sampled_from(
        [
            standard,
            standard.rstrip(b"="),
            url_safe.rstrip(b"="),
            standard.rstrip(b"=") + b"===",
            quote(standard, safe="").encode(),
            standard.replace(b"+", b"%20"),
            standard + b"\r\n",
            b" " + standard,
            text,
            standard[:-1],
            b"e" + standard,
            b"e" + standard[1:-2] + b"*=",
        ]
    )


@st.composite
def _pixels(draw: st.DrawFn) -> tuple[PixelRequest, PixelConfig]:
    call = draw(st.sampled_from(CALLS))
    event = draw(_events(call))
    # A lone surrogate: a \\u escape, or (ensure_ascii off) bytes that are not UTF-8.
    text = json.dumps(event, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    canonical = base64.b64encode(text)
    data = draw(
        st.one_of(
            st.sampled_from([canonical.rstrip(b"="), canonical, quote(canonical).encode()]),
            _encodings(text),
        )
    )
    query = b"data=" + data
    suffix = draw(st.sampled_from([b""] * 8 + [b"&writeKey=q", b"&x=1", b"&data=e30", b"&"]))
    query += suffix
    if draw(st.booleans()):
        query = query.replace(b"+", b"%2B").replace(b"/", b"%2F")
    depth = text.count(b"{") + text.count(b"[")
    # Each limit: the default, or at the pixel's edge (the enriched event is
    # larger than the text sent: up to a few hundred bytes).
    limits = Limits(
        max_event_bytes=draw(
            st.one_of(
                st.just(32_000),
                st.just(32_000),
                st.integers(max(1, len(text) - 3), len(text) + 400),
            )
        ),
        max_depth=draw(st.one_of(st.just(32), st.integers(max(1, depth - 1), depth + 1))),
        max_query_bytes=draw(
            st.one_of(
                st.just(65_536),
                st.just(65_536),
                st.integers(max(1, len(query) - 1), len(query) + 1),
            )
        ),
        max_header_chars=draw(st.sampled_from([4, 1024, 1024])),
    )
    config = PixelConfig(limits=limits, write_keys=draw(st.sampled_from([None, frozenset({"wk"})])))
    request = pixel(
        query,
        call,
        method=draw(st.sampled_from(["GET", "GET", "HEAD"])),
        peer=draw(st.sampled_from(["203.0.113.9", None])),
        user_agent=draw(st.sampled_from([UA, None, "", "Googlebot/2.1", "é" * 5])),
        referer=draw(st.sampled_from([None, "https://example.com/"])),
    )
    return request, config


@settings(max_examples=600, deadline=None)
@given(_pixels())
@example((pixel(b"data=" + b64(COMMON)), PixelConfig()))
def test_the_fast_path_gives_the_general_paths_outcome(
    generated: tuple[PixelRequest, PixelConfig],
) -> None:
    request, config = generated
    assert run(request, config, fast=True) == run(request, config, fast=False)


def test_without_msgspec_every_pixel_takes_the_general_path() -> None:
    request = pixel(b"data=" + b64(COMMON))
    config = PixelConfig()
    route = match_route(request.path, config)
    assert route is not None
    with mock.patch.object(segment, "_FAST_LOADS", None):
        assert segment._common_pixel(request, route, config, NOW, ids()) is None
        outcome: PixelOutcome | None = decode_pixel(request, config=config, now=NOW)
    assert outcome is not None
    assert outcome.record is not None
    assert outcome.record["accepted"]


# The size bound ---------------------------------------------------------------------

_NUMBER = st.from_regex(
    r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,3})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)
_STRING = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8).map(
    lambda text: json.dumps(text, ensure_ascii=False)
)
_ESCAPED = st.text(max_size=8).map(json.dumps)  # \uXXXX escapes, surrogates too
_TOKEN = st.one_of(_NUMBER, _STRING, _ESCAPED, st.sampled_from(["true", "null", '"\x7f"']))
_SENT_TEXTS = st.recursive(
    _TOKEN,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + " , ".join(items) + "]"),
        st.lists(st.tuples(st.one_of(_STRING, _ESCAPED), inner), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(_SENT_TEXTS)
@example('{"n":1e15,"m":9E15,"d":"\x7f\x7f"}')
@example('{"s":"\\ud83d\\ude00","e":"é😀"}')
def test_a_text_sent_bounds_its_stored_size(sent: str) -> None:
    """What the fast path assumes instead of serialising: a JSON text, decoded
    and stored again, is at most _SENT_FACTOR / 2 times as long (the factor is
    doubled for a timestamp copied from the text)."""
    raw = sent.encode("utf-8")
    try:
        value = segment._FAST_LOADS(raw)
    except ValueError:
        return  # not JSON msgspec reads: never on the fast path
    stored = len(json.dumps(value, separators=(",", ":")))
    assert stored * 2 <= segment._SENT_FACTOR * len(raw)


@pytest.mark.parametrize("user_agent", [None, "a" * 1000, "é" * 300, "\U0001f600" * 200])
def test_the_stored_event_is_held_to_max_event_bytes_at_the_boundary(
    user_agent: str | None,
) -> None:
    # What the server adds (the User-Agent most) counts: a small text sent with
    # a long header is near the limit only once enriched.
    sent = {"writeKey": "wk", "userId": "u1", "event": "Opened"}
    request = pixel(b"data=" + b64(sent), user_agent=user_agent)
    unlimited = run(request, PixelConfig(), fast=True)
    [record] = unlimited[3]
    size = len(json.dumps(record["event"], separators=(",", ":")))
    for limit in (size - 1, size, size + 1):
        config = PixelConfig(limits=Limits(max_event_bytes=limit))
        fast = run(request, config, fast=True)
        assert fast == run(request, config, fast=False), limit
        [record] = fast[3]
        assert record["accepted"] is (limit >= size), limit


def test_ids_drawn_before_the_general_path_took_over_are_used_even_when_empty() -> None:
    # A new_id of the caller's may return any string, "" too.
    drawn = iter(["", "second", "third"])
    replay = segment._Replay(["", "x"], lambda: next(drawn))
    assert [replay(), replay(), replay()] == ["", "x", ""]
