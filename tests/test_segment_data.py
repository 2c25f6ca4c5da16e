"""Tests for pixel_middleware._segment_data: Segment's data= parameter."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware import _segment_data
from pixel_middleware._segment_data import (
    decode_data,
    exceeds_depth,
    repair_surrogates,
    repair_text,
)

EVENT = {"userId": "u1", "event": "Opened", "n": [1, 2.5, None, True], "s": ">>>"}
TEXT = json.dumps(EVENT).encode()
STANDARD = base64.b64encode(TEXT)
URL_SAFE = base64.urlsafe_b64encode(TEXT)


def decode(value: bytes, max_event_bytes: int = 1000, max_depth: int = 4) -> Any:
    return decode_data(value, max_event_bytes, max_depth)


@pytest.mark.parametrize(
    ("value", "notes"),
    [
        (STANDARD, []),
        (STANDARD.rstrip(b"="), []),  # unpadded is canonical: no note
        (URL_SAFE, []),
        (URL_SAFE.rstrip(b"="), []),
        (STANDARD.rstrip(b"=") + b"===", ["padding_restored"]),  # too much padding: fixed
        (b"  \t" + STANDARD + b"\r\n", []),
        (STANDARD.replace(b"+", b" "), ["spaces_to_plus"]),
        (TEXT, ["raw_json"]),
        (b" \n" + TEXT + b" \n", ["raw_json"]),
        (base64.b64encode(b" \n" + TEXT + b"\t"), []),
    ],
    ids=[
        "standard",
        "standard-unpadded",
        "url-safe",
        "url-safe-unpadded",
        "too-much-padding",
        "whitespace-around",
        "spaces",
        "raw-json",
        "raw-json-whitespace",
        "json-whitespace-inside",
    ],
)
def test_decodes(value: bytes, notes: list[str]) -> None:
    assert decode(value) == (EVENT, None, notes)


def test_spaces_need_plus_signs() -> None:
    assert b"+" in STANDARD
    # A trailing space is a "+" too: base64 can end in one. (A leading one
    # cannot start a JSON text, so leading spaces are stripped as whitespace.)
    assert base64.b64encode(b"\x00\x00>") == b"AAA+"
    assert decode(b"AAA ") == (None, "bad_json", ["spaces_to_plus"])
    assert decode(b"AAA \n")[1:] == ("bad_json", ["spaces_to_plus"])


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (b"", "bad_json"),
        (b"eyJ!", "bad_base64"),
        (b"eyJhI", "bad_base64"),  # length 1 mod 4
        (b"e=yJ", "bad_base64"),
        ("eyJé".encode(), "bad_base64"),
        (base64.b64encode(b"\xff\xfe{}"), "bad_json"),
        (base64.b64encode(b'{"a": 1} x'), "bad_json"),
        (base64.b64encode(b'{"a": NaN}'), "bad_json"),
        (base64.b64encode(b'{"a": -Infinity}'), "bad_json"),
        (base64.b64encode(b'{"a": 1e400}'), "bad_json"),
        (b"[" * 5 + b"]" * 5, "too_deep"),
        (b'{"a": {"b": {"c": {"d": {}}}}}', "too_deep"),
        (b"[" * 100_000, "too_large"),
        (base64.b64encode(b"[" * 100_000), "too_large"),
        (b"{" + b" " * 2000 + b"}", "too_large"),
        (b"{\xff}", "bad_json"),  # raw JSON, replaced, then not JSON
    ],
)
def test_rejects(value: bytes, rule: str) -> None:
    decoded, got_rule, _ = decode(value)
    assert (decoded, got_rule) == (None, rule)


def test_recursion_error_is_too_deep() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    assert decode(deep, max_event_bytes=10**6, max_depth=10**6)[1] == "too_deep"


def test_size_is_checked_before_decoding() -> None:
    exactly = base64.b64encode(b"[" + b" " * 997 + b"]")  # 999 bytes
    assert decode(exactly)[1] is None
    assert decode(base64.b64encode(b"[" + b" " * 999 + b"]"))[1] == "too_large"


def test_lone_surrogates_are_replaced() -> None:
    decoded, rule, notes = decode(b'{"\\udc00k": ["\\ud800", "\\ud83d\\ude00", "\\\\ud800"]}')
    assert rule is None
    assert decoded == {"\ufffdk": ["\ufffd", "😀", "\\ud800"]}
    assert notes == ["raw_json", "invalid_utf8"]
    decoded, _, notes = decode(b'["\\\\ud800"]')
    assert notes == ["raw_json"]


def test_invalid_utf8_raw_json_is_replaced() -> None:
    assert decode(b'{"a": "\xff"}') == ({"a": "\ufffd"}, None, ["raw_json", "invalid_utf8"])


@pytest.mark.parametrize(
    ("value", "limit", "deeper"),
    [
        ({}, 1, False),
        ({"a": {}}, 1, True),
        ({"a": [1, {"b": []}]}, 3, True),
        ({"a": [1, {"b": []}]}, 4, False),
        ([[[[]]]], 4, False),
    ],
)
def test_exceeds_depth(value: Any, limit: int, deeper: bool) -> None:
    assert exceeds_depth(value, limit) is deeper


def test_repair() -> None:
    assert repair_text("ok") == "ok"
    assert repair_text("a\ud800b\udfff") == "a\ufffdb\ufffd"
    value: Any = {"a\udc80": ["x", "\ud800", {"k": "\udfff"}], "ok": 1}
    assert repair_surrogates(value) is True
    assert value == {"a\ufffd": ["x", "\ufffd", {"k": "\ufffd"}], "ok": 1}
    assert list(value) == ["a\ufffd", "ok"]
    assert repair_surrogates(value) is False


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    value=json_values,
    urlsafe=st.booleans(),
    padded=st.booleans(),
    compact=st.booleans(),
)
def test_any_json_round_trips(value: Any, urlsafe: bool, padded: bool, compact: bool) -> None:
    text = json.dumps(value, separators=(",", ":") if compact else None).encode()
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(text)
    if not padded:
        encoded = encoded.rstrip(b"=")
    decoded, rule, _ = decode_data(encoded, 10**6, 100)
    assert rule is None
    assert decoded == value


@settings(max_examples=300)
@given(value=st.binary(max_size=200))
def test_never_raises(value: bytes) -> None:
    decoded, rule, notes = decode(value)
    assert (decoded is None) == (rule is not None) or decoded is None
    json.dumps(decoded, allow_nan=False, ensure_ascii=False).encode("utf-8")
    assert set(notes) <= {"raw_json", "spaces_to_plus", "padding_restored", "invalid_utf8"}


# --- the JSON scanner: CPython's undocumented scan_once, or the documented fallback ---

FALLBACK = _segment_data._DECODER.raw_decode


def test_scanner_uses_scan_once_when_present() -> None:
    assert _segment_data._SCAN_ONCE is _segment_data._DECODER.scan_once  # type: ignore[attr-defined]


def test_scanner_falls_back_to_raw_decode() -> None:
    decoder = json.JSONDecoder()
    del decoder.scan_once  # type: ignore[attr-defined]
    scan = _segment_data.json_scanner(decoder)
    assert scan == decoder.raw_decode


def test_scanner_takes_scan_once_of_the_decoder_it_is_given() -> None:
    # Found by mutation testing: comparing with another decoder's raw_decode
    # passed whatever json_scanner returned for this one.
    decoder = json.JSONDecoder()
    assert _segment_data.json_scanner(decoder) == decoder.scan_once  # type: ignore[attr-defined]
    assert _segment_data.json_scanner(decoder) != decoder.raw_decode


SCANNED = [
    b'{"a": 1}',
    b'[1, 2.5, null, true, false, "x"]',
    b'  {"a": {"b": [1, {"c": 2}]}}  ',
    b"",
    b"   ",
    b"nul",
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": -Infinity}',
    b'{"a": 1e999}',
    b'{"a": ' + b"1" * 5000 + b"}",
    b'{"a": "\\ud800"}',
    b'{"a": "\\u00e9\\ud83d\\ude00"}',
    b"[" * 3000 + b"]" * 3000,
    b'{"a": 1,}',
    b'"just a string"',
    b"42",
]


@pytest.mark.parametrize("raw", SCANNED, ids=lambda raw: raw[:20].decode())
@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_fallback_scanner_gives_the_same_results(raw: bytes, encoding: str) -> None:
    value = raw if encoding == "raw" else base64.b64encode(raw)
    for limits in ((100_000, 4), (100_000, 5000)):
        assert decode_data(value, *limits, scan=FALLBACK) == decode_data(value, *limits)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet='{}[]",:0123456789.eE+- \\untrlfasNIy\ud800', max_size=40)
    | st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=10,
    ).map(json.dumps)
)
def test_fallback_scanner_agrees_on_any_text(text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    assert decode_data(raw, 10_000, 8, scan=FALLBACK) == decode_data(raw, 10_000, 8)


@settings(max_examples=400, deadline=None)
@given(
    raw=st.text(alphabet='{}[]",:0123456789.eE+- \\untrlfasNIy\ud800\xe9', max_size=40).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    )
    | st.binary(max_size=40).map(lambda junk: b'{"a": "' + junk + b'"}')
    | st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    prefix=st.sampled_from([b"", b" ", b"\xef\xbb\xbf", b"\n\t"]),
)
@example(raw=b'{"k\xff": 1}', prefix=b"")  # invalid UTF-8 in a key
@example(raw=b'{"a": "\\ud800", "b": ' + b"[" * 9 + b"]" * 9 + b"}", prefix=b"")
def test_base64_read_from_bytes_agrees_with_the_fallback_scanner(raw: bytes, prefix: bytes) -> None:
    # The fast path hands the decoded bytes to msgspec; the fallback reads their text.
    value = base64.urlsafe_b64encode(prefix + raw).rstrip(b"=")
    assert decode_data(value, 10_000, 8, scan=FALLBACK) == decode_data(value, 10_000, 8)
