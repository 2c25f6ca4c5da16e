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
from typing import Any, NamedTuple

__all__ = ["DataResult", "decode_data", "exceeds_depth", "repair_surrogates"]

_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
# Only a JSON text with a ``\uD800``-``\uDFFF`` escape can hold a lone surrogate,
# which no UTF-8 store could write; texts without one skip the repair walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB-Fa-f]")
# Whitespace around the value is a copy-and-paste accident, except that a
# trailing space is a ``+`` that form decoding turned into a space: base64 can
# end in ``+``, but never starts with one for a JSON text (``{`` encodes to
# ``e``, ``[`` to ``W``, whitespace to ``C``/``I``/``D``/``J``).
_TRAILING_WHITESPACE = "\t\n\r\f\v"


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


class DataResult(NamedTuple):
    """The decoded JSON value (``None`` when ``rule`` says why not) and the notes."""

    value: Any
    rule: str | None
    notes: tuple[str, ...]


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


def _repair_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
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
                fixed_key = _repair_text(key)
                changed = changed or fixed_key is not key
                if isinstance(child, str):
                    fixed = _repair_text(child)
                    changed = changed or fixed is not child
                    child = fixed
                elif isinstance(child, (dict, list)):
                    stack.append(child)
                node[fixed_key] = child
        else:
            for index, child in enumerate(node):
                if isinstance(child, str):
                    fixed = _repair_text(child)
                    if fixed is not child:
                        node[index] = fixed
                        changed = True
                elif isinstance(child, (dict, list)):
                    stack.append(child)
    return changed


def decode_data(value: str, *, max_event_bytes: int, max_depth: int) -> DataResult:
    """Decode a ``data=`` value (already form-decoded) into a JSON value.

    Fatal outcomes, as rule ids: ``bad_base64``, ``too_large``, ``bad_json``,
    ``too_deep``. Notes: ``raw_json``, ``spaces_to_plus``, ``padding_restored``,
    ``invalid_utf8`` (lone surrogate escapes replaced).
    """
    notes: list[str] = []
    text = value.lstrip()
    if text[:1] in ("{", "["):
        notes.append("raw_json")
        # A str of n characters is at most 4n bytes of UTF-8: measure only when needed.
        if len(text) * 4 > max_event_bytes and len(text.encode("utf-8")) > max_event_bytes:
            return DataResult(None, "too_large", tuple(notes))
    else:
        text = text.rstrip(_TRAILING_WHITESPACE)
        if " " in text:
            text = text.replace(" ", "+")
            notes.append("spaces_to_plus")
        if "-" in text or "_" in text:
            text = text.translate(_URL_SAFE_TO_STANDARD)
        unpadded = text.rstrip("=")
        remainder = len(unpadded) % 4
        if remainder == 1:
            return DataResult(None, "bad_base64", tuple(notes))
        # Check the size before decoding so that nothing huge is ever decoded.
        if len(unpadded) // 4 * 3 + max(0, remainder - 1) > max_event_bytes:
            return DataResult(None, "too_large", tuple(notes))
        padded = unpadded + "=" * (-len(unpadded) % 4)
        if padded != text:
            notes.append("padding_restored")
        try:
            raw = binascii.a2b_base64(padded, strict_mode=True)
        except ValueError:  # binascii.Error, or a non-ASCII str
            return DataResult(None, "bad_base64", tuple(notes))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return DataResult(None, "bad_json", tuple(notes))
    try:
        decoded = _DECODER.decode(text)
    except RecursionError:
        return DataResult(None, "too_deep", tuple(notes))
    except ValueError:  # JSONDecodeError, NaN/Infinity, ints past the digit limit
        return DataResult(None, "bad_json", tuple(notes))
    if isinstance(decoded, (dict, list)):
        # Cheap pre-check: fewer openers than the limit cannot nest past it.
        if text.count("{") + text.count("[") > max_depth and exceeds_depth(decoded, max_depth):
            return DataResult(None, "too_deep", tuple(notes))
        if "\\u" in text and _SURROGATE_ESCAPE.search(text) and repair_surrogates(decoded):
            notes.append("invalid_utf8")
    return DataResult(decoded, None, tuple(notes))
