"""Query-string parsing for pixels: counts, order and duplicates kept, never raises.

``urllib.parse.parse_qsl`` is close, but it hides how many pieces there were
before doing the work, merges nothing we can count, and raises on some inputs
(``max_num_fields``). Pixels need the raw order (first value wins, later
duplicates are reported), a cheap bound on the number of parameters, the total
decoded size, and to know whether invalid UTF-8 was replaced.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = [
    "ParsedQuery",
    "decode_component",
    "decode_text",
    "parse_pieces",
    "parse_query",
    "percent_decode",
    "split_query",
]


# Byte values, not one-byte strings: ``37 in data`` is a memchr, while
# ``b"%" in data`` first tries to read the needle as an int, and raising and
# swallowing that TypeError costs ten times the search (CPython 3.11-3.13).
_PERCENT = ord("%")
_PLUS = ord("+")
_EQUALS = ord("=")

# (the parameters in query order, their decoded size in bytes, whether
# invalid UTF-8 was replaced). A plain tuple: a NamedTuple costs a third of
# a microsecond to build, on every pixel.
ParsedQuery = tuple[list[tuple[str, str]], int, bool]


def _escape_percent_decode(raw: bytes) -> bytes:
    # %XX -> \\xXX (after doubling every backslash, so no other escape exists)
    # and let the C escape decoder do the work: ten times faster than
    # unquote_to_bytes. An invalid or cut-off escape (%zz, a final %4) makes it
    # raise; unquote_to_bytes then keeps such escapes as they are, like every
    # WSGI server. The tests check both agree on arbitrary bytes.
    try:
        decoded: bytes = _escape_decode(raw.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:
        return unquote_to_bytes(raw)
    return decoded


# codecs.escape_decode is CPython's (undocumented, present since Python 2);
# without it, fall back to the documented, slower function.
_escape_decode: Any = getattr(codecs, "escape_decode", None)
percent_decode: Callable[[bytes], bytes] = (
    unquote_to_bytes if _escape_decode is None else _escape_percent_decode
)


def decode_component(raw: bytes) -> bytes:
    """Form-decode one key or value: ``+`` to space, then ``%XX`` to bytes.

    Invalid escapes such as ``%zz`` are left as they are (like every WSGI server).
    """
    if _PLUS in raw:
        raw = raw.replace(b"+", b" ")
    if _PERCENT in raw:
        raw = percent_decode(raw)
    return raw


def split_query(query: bytes, max_params: int) -> list[bytes] | None:
    """The non-empty ``&``-separated pieces of ``query``, or ``None`` past ``max_params``."""
    pieces = query.split(b"&")
    if b"" in pieces:
        pieces = [piece for piece in pieces if piece]
    if len(pieces) > max_params:
        return None
    return pieces


def decode_text(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text of ``raw``, invalid sequences replaced; and whether any were."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


def parse_query(query: bytes, max_params: int) -> ParsedQuery | None:
    """Split ``query`` on ``&`` into decoded (key, value) pairs, in order.

    Empty pieces are skipped; a piece without ``=`` is a key with the value
    ``""``. Returns ``None`` when there are more than ``max_params`` pieces
    (nothing is decoded then). Text is UTF-8 with invalid sequences replaced by
    U+FFFD, and the third item says whether that happened.
    """
    pieces = split_query(query, max_params)
    if pieces is None:
        return None
    return parse_pieces(pieces)


def parse_pieces(pieces: list[bytes]) -> ParsedQuery:
    """:func:`parse_query` for pieces already split by :func:`split_query`."""
    params: list[tuple[str, str]] = []
    size = 0
    replaced = False
    if len(pieces) > 1:
        joined = b"&".join(pieces)
        if _PERCENT in joined and b"%26" not in joined:
            # No escape makes an "&" (nearly always): every key and value,
            # joined by "&", is percent-decoded and read as UTF-8 at once and
            # split again: C calls instead of Python calls for each parameter.
            # An escape never spans an "&" (hex has none) and a UTF-8 sequence
            # never holds one, so each part decodes as it would alone.
            whole = b"&".join(
                [
                    piece.replace(b"=", b"&", 1) if _EQUALS in piece else piece + b"&"
                    for piece in pieces
                ]
            )
            if _PLUS in whole:
                whole = whole.replace(b"+", b" ")
            decoded = percent_decode(whole)
            size = len(decoded) - (2 * len(pieces) - 1)  # the "&"s are not data
            try:
                texts = decoded.decode("utf-8").split("&")
            except UnicodeDecodeError:
                texts = decoded.decode("utf-8", "replace").split("&")
                replaced = True
            return list(zip(texts[::2], texts[1::2], strict=True)), size, replaced
    # Runs for every parameter of every pixel: one decode for a piece
    # without escapes ("=" is ASCII, so splitting the text equals splitting
    # the bytes), decode_component inlined for the others.
    for piece in pieces:
        if _PLUS in piece:
            piece = piece.replace(b"+", b" ")
        if _PERCENT not in piece:
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                text = piece.decode("utf-8", "replace")
                replaced = True
            key, equals, value = text.partition("=")
            size += len(piece) - len(equals)
            params.append((key, value))
            continue
        raw_key, _, raw_value = piece.partition(b"=")
        if _PERCENT in raw_key:
            raw_key = percent_decode(raw_key)
        if _PERCENT in raw_value:
            raw_value = percent_decode(raw_value)
        size += len(raw_key) + len(raw_value)
        try:
            params.append((raw_key.decode("utf-8"), raw_value.decode("utf-8")))
        except UnicodeDecodeError:
            params.append(
                (raw_key.decode("utf-8", "replace"), raw_value.decode("utf-8", "replace"))
            )
            replaced = True
    return params, size, replaced
