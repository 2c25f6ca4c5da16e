"""JSON in and out: msgspec when it is installed, the standard library otherwise.

A record's JSON is made once per pixel (the store's copy) and read once per
record shown, so its cost is on the hot path: msgspec encodes a record several
times as fast as :func:`json.dumps` and keeps integers of any size exact
(orjson would turn those past 64 bits into floats). The core must still import
with the standard library alone (the mitmproxy addon's checkout fallback), so
every caller goes through this module and never imports msgspec itself.

Both paths give the same values (``tests/test_json.py`` proves it over
generated values): wherever msgspec refuses a text that :mod:`json` reads (a
lone surrogate escape, an overflowing float, nesting past msgspec's limit),
:func:`loads` takes the standard library's answer, or its error. Only the texts
differ: msgspec writes non-ASCII characters as UTF-8 where :func:`json.dumps`
writes ``\\uXXXX`` escapes.

NaN and the infinities are not JSON: :func:`dumps` refuses them in both paths
(``ValueError``) rather than writing ``NaN`` (the standard library) or ``null``
(msgspec), neither of which reads back as the same value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "HAVE_MSGSPEC",
    "dumps",
    "dumps_bytes",
    "exact_bytes",
    "fast_encode",
    "fast_loads",
    "loads",
]

msgspec: ModuleType | None
try:
    import msgspec
except ImportError:  # the standard library alone: the addon's checkout fallback
    msgspec = None

#: Whether msgspec does the work (``False``: the standard library does).
HAVE_MSGSPEC = msgspec is not None


def _stdlib_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _stdlib_dumps_bytes(value: Any) -> bytes:
    return _stdlib_dumps(value).encode()


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return False


#: msgspec's decoder (``ValueError`` or ``RecursionError`` for what it refuses),
#: or ``None`` without msgspec; :func:`loads` is the safe way to call it.
fast_loads: Callable[[str | bytes], Any] | None
#: msgspec's encoder, raw: compact UTF-8 JSON, NaN written as ``null``, and
#: ``TypeError``, ``ValueError`` or ``RecursionError`` for what it refuses; or
#: ``None`` without msgspec. :func:`dumps_bytes` is the safe way to call it;
#: this is for measuring a value cheaply (the core's stored-size bound).
fast_encode: Callable[[Any], bytes] | None

if msgspec is not None:
    _encode: Callable[[Any], bytes] = msgspec.json.Encoder().encode
    fast_encode = _encode
    fast_loads = msgspec.json.Decoder().decode
    _decode = fast_loads

    def dumps_bytes(value: Any) -> bytes:
        """Compact UTF-8 JSON of ``value``: ``ValueError`` for NaN or an infinity,
        ``TypeError`` for a value that is not JSON."""
        try:
            data = _encode(value)
        except (UnicodeEncodeError, TypeError):
            # A lone surrogate (UTF-8 cannot carry it; a \u escape can) or a
            # key msgspec refuses (None, True): the standard library's text,
            # or its error.
            return _stdlib_dumps_bytes(value)
        # msgspec writes NaN and the infinities as null: look for them only
        # when there is a null, and then first by reading the text back (in
        # C, several times cheaper than walking the value in Python): a NaN
        # or an infinity reads back as None, which equals no float, so a text
        # that reads back equal to the value holds none. Only when it differs
        # (a NaN, or a tuple read back as a list) does the walk decide.
        if b"null" in data and not _reads_back_equal(data, value) and _has_non_finite(value):
            raise ValueError("Out of range float values are not JSON compliant")
        return data

    def exact_bytes(value: Any) -> bytes | None:
        """msgspec's compact UTF-8 JSON of ``value`` when it reads back as a value
        equal to ``value`` (so it holds no NaN, infinity, tuple, non-text key or
        type JSON does not have); ``None`` otherwise, for the caller to take
        the standard library's way."""
        try:
            data = _encode(value)
        except (UnicodeEncodeError, TypeError, ValueError, RecursionError):
            return None
        return data if _reads_back_equal(data, value) else None

    def _reads_back_equal(data: bytes, value: Any) -> bool:
        try:
            return bool(_decode(data) == value)
        except (ValueError, RecursionError):
            return False

    def dumps(value: Any) -> str:
        """Compact JSON text of ``value`` (see :func:`dumps_bytes`)."""
        return dumps_bytes(value).decode()

    def loads(text: str | bytes) -> Any:
        """The value of one JSON text; ``ValueError`` when it is not JSON."""
        try:
            return _decode(text)
        except (ValueError, RecursionError):
            # What msgspec refuses, the standard library may read (a lone
            # surrogate escape): its answer, or its error.
            return json.loads(text)

else:
    fast_encode = None
    fast_loads = None
    dumps = _stdlib_dumps
    dumps_bytes = _stdlib_dumps_bytes

    def exact_bytes(value: Any) -> bytes | None:
        """Without msgspec: always ``None`` (the caller takes the standard library's way)."""
        return None

    def loads(text: str | bytes) -> Any:
        """The value of one JSON text; ``ValueError`` when it is not JSON."""
        return json.loads(text)
