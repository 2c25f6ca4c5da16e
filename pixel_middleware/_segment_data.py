"""Decoding Segment's ``data=`` parameter: base64 (either alphabet) or raw JSON.

Segment documents ``data`` as "base64-encoded JSON, URL safe", recommends
``btoa`` (standard alphabet, padded), and prints examples with the padding
stripped; raw JSON is the other reading of "the base64 encoding is optional".
So: raw JSON when the value starts with ``{`` or ``[``, else base64 in the
standard or URL-safe alphabet, padding optional.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Callable
from typing import Any

from pixel_middleware import _json

__all__ = [
    "DataResult",
    "decode_data",
    "exceeds_depth",
    "json_scanner",
    "repair_surrogates",
    "repair_text",
]

# Byte values: ``45 in data`` is a memchr, ``b"-" in data`` ten times slower
# (CPython first tries the needle as an int and swallows the TypeError).
_SPACE = ord(" ")
_MINUS = ord("-")
_UNDERSCORE = ord("_")
# bytes.translate is a C table lookup; str.translate looks each character up in a dict.
_URL_SAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
# Only a JSON text with a ``\uD800``-``\uDFFF`` escape can hold a lone surrogate,
# which no UTF-8 store could write; texts without one skip the repair walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB-Fa-f]")
# Whitespace around the value is a copy-and-paste accident, except that a
# trailing space is a ``+`` that form decoding turned into a space: base64 can
# end in ``+``, but never starts with one for a JSON text (``{`` encodes to
# ``e``, ``[`` to ``W``, whitespace to ``C``/``I``/``D``/``J``).
_TRAILING_WHITESPACE = b"\t\n\r\f\v"


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError("number out of range")
    return number


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder, built once: json.loads(**kw) would build one per call. NaN,
# Infinity and overflowing floats are refused so every record stays valid JSON.
_DECODER = json.JSONDecoder(parse_float=_finite_float, parse_constant=_reject_constant)
Scanner = Callable[[str, int], tuple[Any, int]]


def json_scanner(decoder: json.JSONDecoder) -> Scanner:
    """The fastest way to read one JSON value at an index with ``decoder``.

    ``scan_once`` (CPython's scanner, C when available) is not documented: it
    skips ``raw_decode``'s wrapper but raises ``StopIteration`` where no value
    starts. Without it, the documented ``raw_decode`` does the same work and
    raises ``JSONDecodeError`` (a ``ValueError``) instead; ``decode_data``
    treats both alike.
    """
    scan: Scanner | None = getattr(decoder, "scan_once", None)
    return decoder.raw_decode if scan is None else scan


_SCAN_ONCE = json_scanner(_DECODER)
# msgspec reads a whole text at once (the same values: tests/test_json.py),
# when installed; the scanner above reads what it refuses.
_FAST_LOADS = _json.fast_loads
_NOTHING: Any = object()
_JSON_WHITESPACE = " \t\n\r"


# (the decoded JSON value, or None when the rule id says why not; note ids).
# A plain tuple: this runs for every Segment pixel.
DataResult = tuple[Any, str | None, list[str]]


def exceeds_depth(value: Any, max_depth: int) -> bool:
    """Whether containers nest deeper than ``max_depth`` (the outermost is depth 1).

    Iterative, so that no input can exhaust the interpreter's stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def repair_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by one U+FFFD (``text`` itself if none)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # UTF-16 pairs what can be paired and reports each lone half once.
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def repair_surrogates(value: Any) -> bool:
    """Replace lone surrogates in every string of ``value`` (in place) by U+FFFD.

    Returns whether anything was replaced. ``value`` must be a dict or list.
    """
    changed = False
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            items = list(node.items())
            node.clear()
            for key, child in items:
                fixed_key = repair_text(key)
                changed = changed or fixed_key is not key
                if isinstance(child, str):
                    fixed = repair_text(child)
                    changed = changed or fixed is not child
                    child = fixed
                elif isinstance(child, (dict, list)):
                    stack.append(child)
                node[fixed_key] = child
        else:
            for index, child in enumerate(node):
                if isinstance(child, str):
                    fixed = repair_text(child)
                    if fixed is not child:
                        node[index] = fixed
                        changed = True
                elif isinstance(child, (dict, list)):
                    stack.append(child)
    return changed


def decode_data(
    value: bytes, max_event_bytes: int, max_depth: int, *, scan: Scanner | None = None
) -> DataResult:
    """Decode a ``data=`` value (form-decoded bytes) into a JSON value.

    Fatal outcomes, as rule ids: ``bad_base64``, ``too_large``, ``bad_json``,
    ``too_deep``. Notes: ``raw_json``, ``spaces_to_plus``, ``padding_restored``,
    ``invalid_utf8`` (raw JSON that was not UTF-8, or lone surrogate escapes,
    replaced by U+FFFD). ``scan`` replaces the JSON scanner (for tests of the
    fallback, see :func:`json_scanner`).
    """
    notes: list[str] = []
    encoded = value.lstrip()
    if encoded[:1] in (b"{", b"["):
        notes.append("raw_json")
        if len(encoded) > max_event_bytes:
            return None, "too_large", notes
        try:
            text = encoded.decode("utf-8")
        except UnicodeDecodeError:
            # Raw JSON comes through the query like any parameter: replaced, noted.
            text = encoded.decode("utf-8", "replace")
            notes.append("invalid_utf8")
    else:
        encoded = encoded.rstrip(_TRAILING_WHITESPACE)
        if _SPACE in encoded:
            encoded = encoded.replace(b" ", b"+")
            notes.append("spaces_to_plus")
        if _MINUS in encoded or _UNDERSCORE in encoded:
            encoded = encoded.translate(_URL_SAFE_TO_STANDARD)
        unpadded = encoded.rstrip(b"=")
        remainder = len(unpadded) % 4
        if remainder == 1:
            return None, "bad_base64", notes
        # Check the size before decoding so that nothing huge is ever decoded.
        if len(unpadded) // 4 * 3 + max(0, remainder - 1) > max_event_bytes:
            return None, "too_large", notes
        padded = unpadded + b"=" * (4 - remainder) if remainder else unpadded
        try:
            raw = binascii.a2b_base64(padded, strict_mode=True)
        except binascii.Error:  # a character outside the alphabet, or misplaced padding
            return None, "bad_base64", notes
        # Unpadded base64 is what Segment's own examples and our encoder send:
        # only padding that was there and wrong is worth a note.
        if unpadded != encoded and len(padded) != len(encoded):
            notes.append("padding_restored")
        if scan is None and _FAST_LOADS is not None:
            # msgspec reads the bytes themselves, checking their UTF-8 (which a
            # JSON text only has inside strings), so no str is made of them.
            # What it refuses goes the way of raw JSON below.
            try:
                value_read = _FAST_LOADS(raw)
            except (ValueError, RecursionError):
                pass
            else:
                return _checked(value_read, raw, None, max_depth, notes)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_json", notes
    if text[:1] in _JSON_WHITESPACE:
        text = text.strip(_JSON_WHITESPACE)
    decoded: Any = _NOTHING
    if scan is None and _FAST_LOADS is not None:
        try:
            decoded = _FAST_LOADS(text)
        except (ValueError, RecursionError):
            # msgspec refuses what the standard library reads (a lone surrogate
            # escape) or refuses too: the standard library's answer decides.
            decoded = _NOTHING
    if decoded is _NOTHING:
        try:
            # What JSONDecoder.decode does, minus two regex matches: the scanner
            # at 0, then only JSON whitespace may follow.
            decoded, end = (_SCAN_ONCE if scan is None else scan)(text, 0)
        except RecursionError:
            return None, "too_deep", notes
        except (StopIteration, ValueError):  # no JSON; NaN/Infinity; ints past the digit limit
            return None, "bad_json", notes
        if end != len(text) and text[end:].strip(_JSON_WHITESPACE):
            return None, "bad_json", notes
    return _checked(decoded, None, text, max_depth, notes)


def _checked(
    decoded: Any, raw: bytes | None, text: str | None, max_depth: int, notes: list[str]
) -> DataResult:
    """The depth limit and the surrogate repair, given the JSON text as ``raw``
    UTF-8 or as ``text``: they only count and look for ASCII, the same in both."""
    if isinstance(decoded, (dict, list)):
        # Cheap pre-checks: fewer openers than the limit cannot nest past it,
        # and only a \u escape can be a lone surrogate. (On bytes, a memchr.)
        if raw is not None:
            openers = raw.count(b"{") + raw.count(b"[")
            escaped = b"\\u" in raw
        else:
            assert text is not None
            openers = text.count("{") + text.count("[")
            escaped = "\\u" in text
        if openers > max_depth and exceeds_depth(decoded, max_depth):
            return None, "too_deep", notes
        if escaped:
            if text is None:
                assert raw is not None
                text = raw.decode("utf-8")  # msgspec read it: valid UTF-8
            if _SURROGATE_ESCAPE.search(text) and repair_surrogates(decoded):
                notes.append("invalid_utf8")
    return decoded, None, notes
