"""Query-string parsing for pixels: counts, order and duplicates kept, never raises.

``urllib.parse.parse_qsl`` is close, but it hides how many pieces there were
before doing the work, merges nothing we can count, and raises on some inputs
(``max_num_fields``). Pixels need the raw order (first value wins, later
duplicates are reported), a cheap bound on the number of parameters, the total
decoded size, and to know whether invalid UTF-8 was replaced.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import unquote_to_bytes

__all__ = ["ParsedQuery", "decode_component", "parse_query"]


class ParsedQuery(NamedTuple):
    """The parameters in query order, their decoded size, and whether UTF-8 was repaired."""

    params: list[tuple[str, str]]
    decoded_bytes: int
    replaced_utf8: bool


def decode_component(raw: bytes) -> bytes:
    """Form-decode one key or value: ``+`` to space, then ``%XX`` to bytes.

    Invalid escapes such as ``%zz`` are left as they are (like every WSGI server).
    """
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    return raw


def parse_query(query: bytes, max_params: int) -> ParsedQuery | None:
    """Split ``query`` on ``&`` into decoded (key, value) pairs, in order.

    Empty pieces are skipped; a piece without ``=`` is a key with the value
    ``""``. Returns ``None`` when there are more than ``max_params`` pieces
    (nothing is decoded then). Text is UTF-8 with invalid sequences replaced by
    U+FFFD, and ``replaced_utf8`` says whether that happened.
    """
    pieces = [piece for piece in query.split(b"&") if piece]
    if len(pieces) > max_params:
        return None
    params: list[tuple[str, str]] = []
    size = 0
    replaced = False
    for piece in pieces:
        raw_key, _, raw_value = piece.partition(b"=")
        key_bytes = decode_component(raw_key)
        value_bytes = decode_component(raw_value)
        size += len(key_bytes) + len(value_bytes)
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            key = key_bytes.decode("utf-8", "replace")
            replaced = True
        try:
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError:
            value = value_bytes.decode("utf-8", "replace")
            replaced = True
        params.append((key, value))
    return ParsedQuery(params, size, replaced)
