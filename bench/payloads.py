"""Typical pixel payloads, and URL templates that give every request its own messageId.

The URLs come from the project's own encoder (:func:`pixel_middleware.encode.encode_pixel_url`),
so they are exactly what a sender using it would send. A :class:`UrlTemplate` is
that URL cut around the messageId's digits, so that wrk (in Lua) and the Python
client can make millions of distinct URLs by concatenation alone: for a Segment
pixel the digits sit inside base64, so the messageId is padded until they start on
a 3-byte boundary, where base64 of the whole equals the concatenation of the parts.
Every template is checked against the encoder on construction.
"""

from __future__ import annotations

import base64
import functools
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from bench.processes import BenchError

WRITE_KEY = "bench-write-key-2f9c1a"
DIGITS = 15  # 5 groups of 3: (run * 1000 + thread) * 10**9 + counter
_PLACEHOLDER = "".join(str((7 * i + 3) % 10) for i in range(DIGITS))
_BASE = "http://pixels.bench.invalid"


def segment_event(message_id: str) -> dict[str, Any]:
    """A typical analytics.js track call; its JSON (with the write key) is ~300 bytes."""
    return {
        "event": "Order Completed",
        "userId": "user-58213",
        "anonymousId": "8d1c2f4e-3b7a-4c59-9e0f-6a2b1d7c8e90",
        "messageId": message_id,
        "timestamp": "2026-11-23T16:20:00.000Z",
        "properties": {"orderId": "ord-20931", "total": 42.5, "currency": "EUR"},
        "context": {"page": {"path": "/checkout/done"}},
    }


def rudderstack_event(message_id: str) -> dict[str, Any]:
    """A typical AMP page view: about 25 query parameters once flattened."""
    return {
        "anonymousId": "amp-9Xc3kLq0Zr7VbN2mT5yW1A",
        "messageId": message_id,
        "name": "Winter boots",
        "category": "Catalogue",
        "properties": {
            "path": "/catalogue/winter-boots",
            "url": "https://shop.example/catalogue/winter-boots",
            "title": "Winter boots | Shop",
            "referrer": "https://www.google.com/",
            "search": "?utm_source=newsletter",
            "ampVersion": "2411071547000",
        },
        "context": {
            "library": {"name": "amp", "version": "1.0"},
            "locale": "en-GB",
            "timezone": "Europe/London",
            "screen": {"width": 390, "height": 844, "density": 3},
            "campaign": {"name": "winter", "source": "newsletter", "medium": "email"},
            "page": {"canonicalUrl": "https://shop.example/catalogue/winter-boots"},
        },
        "originalTimestamp": "2026-11-23T16:20:00.000Z",
        "sentAt": "2026-11-23T16:20:00.100Z",
    }


def message_id(n: int, pad: int = 0) -> str:
    return "bench-" + "x" * pad + f"{n:0{DIGITS}d}"


@dataclass(frozen=True)
class UrlTemplate:
    """``head + table[g1] + ... + table[gN] + tail``: the URL for messageId number n.

    ``head`` starts with the path (no scheme or host); ``groups`` 3-digit groups.
    """

    head: str
    table: tuple[str, ...]  # 1000 entries, for "000" .. "999"
    tail: str
    groups: int = DIGITS // 3

    def url(self, n: int) -> str:
        parts = []
        for _ in range(self.groups):
            n, g = divmod(n, 1000)
            parts.append(self.table[g])
        return self.head + "".join(reversed(parts)) + self.tail


def _encoder(dialect: str, call: str, prefix: str) -> Callable[[dict[str, Any]], str]:
    from pixel_middleware.encode import encode_pixel_url

    def encode(event: dict[str, Any]) -> str:
        url = encode_pixel_url(
            event,
            call=call,
            write_key=WRITE_KEY,
            dialect=dialect,  # type: ignore[arg-type]
            base_url=_BASE,
            prefix=prefix,
        )
        if not url.startswith(_BASE + "/"):
            raise BenchError(f"encode_pixel_url gave {url!r}, not under {_BASE!r}")
        return url[len(_BASE) :]

    return encode


def _check(template: UrlTemplate, encode: Callable[[int], str]) -> UrlTemplate:
    rng = random.Random(7)
    for n in [0, 10**DIGITS - 1, *(rng.randrange(10**DIGITS) for _ in range(20))]:
        if template.url(n) != encode(n):
            raise BenchError(
                f"URL template disagrees with encode_pixel_url for n={n}:\n"
                f"  {template.url(n)}\n  {encode(n)}"
            )
    return template


def rudderstack_template(call: str = "page", prefix: str = "") -> UrlTemplate:
    encode = _encoder("rudderstack", call, prefix)
    url = encode(rudderstack_event(message_id(0).replace("0" * DIGITS, _PLACEHOLDER)))
    head, found, tail = url.partition(_PLACEHOLDER)
    if not found or _PLACEHOLDER in tail:
        raise BenchError(f"messageId not found once in {url!r}")
    table = tuple(f"{g:03d}" for g in range(1000))
    template = UrlTemplate(head, table, tail)
    return _check(template, lambda n: encode(rudderstack_event(message_id(n))))


def _b64_text(chunk: bytes, *, last: bool, urlsafe: bool, strip: bool, quoted: bool) -> str:
    out = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(chunk).decode()
    if last and strip:
        out = out.rstrip("=")
    return quote(out, safe="") if quoted else out


def _b64_codec(raw: bytes, value: str) -> Callable[..., str]:
    """The base64 flavour (alphabet, padding, percent-encoding) that made ``value``."""
    for urlsafe, strip, quoted in itertools.product((True, False), repeat=3):
        codec = functools.partial(_b64_text, urlsafe=urlsafe, strip=strip, quoted=quoted)
        if codec(raw, last=True) == value:
            return codec
    raise BenchError(f"cannot tell how {value[:40]!r}... is base64-encoded")


def segment_template(call: str = "track", prefix: str = "") -> UrlTemplate:
    encode = _encoder("segment", call, prefix)
    for pad in range(3):
        url = encode(segment_event(message_id(0, pad).replace("0" * DIGITS, _PLACEHOLDER)))
        path, _, query = url.partition("?")
        params = query.split("&")
        data_at = next(i for i, p in enumerate(params) if p.startswith("data="))
        value = params[data_at].removeprefix("data=")
        text = unquote(value).replace("-", "+").replace("_", "/")
        raw = base64.b64decode(text + "=" * (-len(text) % 4))
        at = raw.find(_PLACEHOLDER.encode())
        if at < 0:
            raise BenchError(f"messageId not found in the data of {url!r}")
        if at % 3:
            continue  # base64 maps 3 bytes to 4 characters: the digits must start a group
        codec = _b64_codec(raw, value)
        before = "&".join([*params[:data_at], "data="])
        after = "&".join(params[data_at + 1 :])
        head = f"{path}?{before}{codec(raw[:at], last=False)}"
        tail = codec(raw[at + DIGITS :], last=True) + ("&" + after if after else "")
        table = tuple(codec(f"{g:03d}".encode(), last=False) for g in range(1000))
        return _check(
            UrlTemplate(head, table, tail),
            functools.partial(_segment_url, encode, pad),
        )
    raise BenchError("no messageId padding aligns the digits in the Segment data")


def _segment_url(encode: Callable[[dict[str, Any]], str], pad: int, n: int) -> str:
    return encode(segment_event(message_id(n, pad)))


def data_bytes(template: UrlTemplate) -> int:
    """Bytes of the Segment ``data`` parameter in one of the template's URLs."""
    query = template.url(0).partition("?")[2]
    return len(next(p for p in query.split("&") if p.startswith("data=")))
