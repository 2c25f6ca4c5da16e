"""Tests for pixel_middleware._query: splitting and form-decoding query strings."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware import _query
from pixel_middleware._query import (
    decode_component,
    decode_text,
    parse_pieces,
    parse_query,
    percent_decode,
    split_query,
)

# Bytes rich in what percent-decoding cares about.
escapy = st.one_of(
    st.binary(max_size=60),
    st.lists(
        st.sampled_from(
            [b"%", b"%4", b"%41", b"%e2", b"%E2%82%AC", b"%zz", b"%%", b"\\", b"\\x41", b"x", b"+"]
        ),
        max_size=12,
    ).map(b"".join),
)


@settings(max_examples=500)
@given(raw=escapy)
@example(raw=b"\\N{BULLET}%41")
@example(raw=b"%\\")
def test_percent_decode_equals_unquote_to_bytes(raw: bytes) -> None:
    expected = unquote_to_bytes(raw)
    assert percent_decode(raw) == expected
    assert _query._escape_percent_decode(raw) == expected


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        (b"", b""),
        (b"a+b", b"a b"),
        (b"a%2Bb", b"a+b"),
        (b"%41%42", b"AB"),
        (b"%zz%4", b"%zz%4"),  # invalid escapes stay, as in every WSGI server
        (b"%E2%82%AC", "€".encode()),
        (b"%ff", b"\xff"),
    ],
)
def test_decode_component(raw: bytes, decoded: bytes) -> None:
    assert decode_component(raw) == decoded


@pytest.mark.parametrize(
    ("query", "limit", "pieces"),
    [
        (b"", 5, []),
        (b"a=1&b=2", 2, [b"a=1", b"b=2"]),
        (b"a=1&b=2", 1, None),
        (b"&&a&&", 1, [b"a"]),  # empty pieces do not count
        (b"a;b=1", 5, [b"a;b=1"]),  # only & separates
    ],
)
def test_split_query(query: bytes, limit: int, pieces: list[bytes] | None) -> None:
    assert split_query(query, limit) == pieces


@pytest.mark.parametrize(
    ("query", "params", "size", "replaced"),
    [
        (b"a=1&b=&c&=d", [("a", "1"), ("b", ""), ("c", ""), ("", "d")], 5, False),
        (b"k=a=b", [("k", "a=b")], 4, False),
        (b"k%3D=%26", [("k=", "&")], 3, False),
        (b"a+b=c+d", [("a b", "c d")], 6, False),
        (b"n=%FFx", [("n", "\ufffdx")], 3, True),
        (b"%FF=1", [("\ufffd", "1")], 2, True),
        (b"n=\xc3\xa9", [("n", "é")], 3, False),  # raw UTF-8 bytes in the query
        (b"d=1&d=2", [("d", "1"), ("d", "2")], 4, False),  # order and repeats kept
    ],
)
def test_parse_query(
    query: bytes, params: list[tuple[str, str]], size: int, replaced: bool
) -> None:
    assert parse_query(query, 100) == (params, size, replaced)


def test_parse_query_counts_before_decoding() -> None:
    assert parse_query(b"&".join([b"a=%41"] * 11), 10) is None


def _oracle(query: bytes) -> list[tuple[str, str]]:
    pairs = []
    for piece in query.split(b"&"):
        if piece:
            key, _, value = piece.partition(b"=")
            pairs.append(
                tuple(
                    unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8", "replace")
                    for part in (key, value)
                )
            )
    return pairs  # type: ignore[return-value]


@settings(max_examples=500)
@given(query=st.lists(escapy | st.sampled_from([b"=", b"&", b"a"]), max_size=8).map(b"".join))
def test_parse_query_matches_the_obvious_implementation(query: bytes) -> None:
    parsed = parse_query(query, 10_000)
    assert parsed is not None
    params, size, replaced = parsed
    assert params == _oracle(query)
    assert replaced == any("\ufffd" in key + value for key, value in params) or (
        # U+FFFD sent as valid UTF-8 is not a replacement
        "\ufffd".encode() in unquote_to_bytes(query.replace(b"+", b" "))
    )
    assert size == sum(
        len(unquote_to_bytes(part.replace(b"+", b" ")))
        for piece in query.split(b"&")
        if piece
        for part in piece.partition(b"=")[::2]
    )


def test_decode_text() -> None:
    assert decode_text(b"caf\xc3\xa9") == ("café", False)
    assert decode_text(b"caf\xe9") == ("caf\ufffd", True)


@settings(max_examples=500)
@given(
    query=st.lists(
        escapy
        | st.sampled_from(
            [b"=", b"&", b"a", b"%26", b"%3D", b"%3d", b"%2", b"6", b"%C3", b"%A9", b"\xff", b"+"]
        ),
        max_size=10,
    ).map(b"".join)
)
@example(query=b"a=%2&6=b")  # an escape cut by "&" stays as it is
@example(query=b"k%C3=%A9&x=%41")  # invalid UTF-8 at the end of a key
@example(query=b"a%3Db=c&d=e%3Df")  # an escaped "=" stays in its key or value
@example(query=b"a%3Db=c&d=%26")  # an escaped "&": each piece decoded alone
def test_parse_query_decoding_the_whole_query_at_once_matches_the_oracle(query: bytes) -> None:
    parsed = parse_query(query, 10_000)
    assert parsed is not None
    params, size, _ = parsed
    assert params == _oracle(query)
    assert size == sum(
        len(unquote_to_bytes(part.replace(b"+", b" ")))
        for piece in query.split(b"&")
        if piece
        for part in piece.partition(b"=")[::2]
    )
    # The same as each piece parsed alone (a single piece is decoded by parts).
    alone = [parse_pieces([piece]) for piece in query.split(b"&") if piece]
    assert parsed == (
        [pair for each in alone for pair in each[0]],
        sum(each[1] for each in alone),
        any(each[2] for each in alone),
    )
