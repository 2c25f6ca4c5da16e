"""HAR files in and out: the pixels in a browser's or mitmproxy's HAR, and records as a HAR.

Reading (``decode --har``): every request of a HAR 1.2 file (Chrome's and
Firefox's DevTools exports, mitmproxy's ``hardump``, Charles, ...) whose path
is a pixel route is decoded by the core as the collector would decode it,
with the request's own time, User-Agent, Referer and X-Forwarded-For.
Everything read is capped: the file's size, the number of entries, each URL.

Writing (``events --format har``): one HAR entry per record, with the
request as the record kept it, the answer the collector gave (or, when the
record does not say, what the dialect answers for its verdict) and the
record's id, verdict and client address in a ``_pixel`` custom field, which
reading takes back, so that a HAR written here decodes to the same records.

Pure: no I/O here; the command line reads and writes the files.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from pixel_middleware.core import GIF, PixelConfig, PixelRecord, PixelRequest, decode_pixel
from pixel_middleware.core import split_target as _split_target

__all__ = [
    "MAX_HAR_BYTES",
    "MAX_HAR_ENTRIES",
    "HarError",
    "HarPixel",
    "HarReading",
    "read_har",
    "records_to_har",
    "request_target",
]

# A DevTools export of a long session with bodies can be large; a pixel
# debugging session is not. Past these the file is refused, not read in part.
MAX_HAR_BYTES: Final = 256 * 1024 * 1024
MAX_HAR_ENTRIES: Final = 100_000
# A request URL longer than this is not decoded (the core caps queries at 64 KiB).
MAX_URL_CHARS: Final = 1024 * 1024
# The longest id taken back from a ``_pixel`` field (ids we write are uuid4).
_MAX_ID_CHARS: Final = 100
# Headers the core reads, by their lower-case HAR name.
_USER_AGENT: Final = "user-agent"
_REFERER: Final = "referer"
_FORWARDED_FOR: Final = "x-forwarded-for"
_GIF_TYPE: Final = "image/gif"
_TEXT_TYPE: Final = "text/plain; charset=utf-8"
_STATUS_TEXT: Final = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed"}


class HarError(ValueError):
    """The file is not a HAR this module can read; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class HarPixel:
    """One pixel request of a HAR: where it is, what it asked and the record it makes."""

    index: int  # the entry's position in log.entries, from 0
    method: str
    url: str
    status: int | None  # the answer the HAR shows, if any
    record: PixelRecord


@dataclass(frozen=True, slots=True)
class HarReading:
    """What :func:`read_har` found: the pixels, and how many entries were not pixels."""

    pixels: list[HarPixel]
    skipped: int  # requests that are not pixel requests (other paths, other methods)
    malformed: int  # entries with no usable request (no method or URL)


def read_har(data: bytes, *, config: PixelConfig | None = None) -> HarReading:
    """Decode every pixel request of the HAR file ``data``.

    Raises :class:`HarError` when ``data`` is too large, not JSON, or not a HAR
    (no ``log.entries`` list). An entry that is not a request is counted as
    malformed and passed over; one that is not a pixel request, as skipped.
    """
    if len(data) > MAX_HAR_BYTES:
        raise HarError(f"the file is over {MAX_HAR_BYTES // (1024 * 1024)} MiB: not read")
    try:
        document = json.loads(data)
    except RecursionError:
        raise HarError("not a HAR file: its JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise HarError("not a HAR file: not UTF-8 text") from None
    except ValueError as exc:
        where = ""
        if isinstance(exc, json.JSONDecodeError):
            where = f" (line {exc.lineno}, column {exc.colno})"
        raise HarError(f"not a HAR file: not valid JSON{where}") from None
    log = document.get("log") if isinstance(document, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise HarError('not a HAR file: it has no "log": {"entries": [...]}')
    if len(entries) > MAX_HAR_ENTRIES:
        raise HarError(f"the file has {len(entries)} entries, over {MAX_HAR_ENTRIES}: not read")
    config = config if config is not None else PixelConfig()
    pixels: list[HarPixel] = []
    skipped = malformed = 0
    for index, entry in enumerate(entries):
        request = _entry_request(entry)
        if request is None:
            malformed += 1
            continue
        pixel = _decode_entry(index, entry, request, config)
        if pixel is None:
            skipped += 1
        else:
            pixels.append(pixel)
    return HarReading(pixels, skipped, malformed)


def _entry_request(entry: object) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    request = entry.get("request")
    if not isinstance(request, dict):
        return None
    method, url = request.get("method"), request.get("url")
    if not (isinstance(method, str) and isinstance(url, str)) or len(url) > MAX_URL_CHARS:
        return None
    return request


def _decode_entry(
    index: int, entry: dict[str, Any], request: dict[str, Any], config: PixelConfig
) -> HarPixel | None:
    method: str = request["method"].upper()
    url: str = request["url"]
    headers = _headers(request.get("headers"))
    path, query = _split_target(request_target(url))
    ours = entry.get("_pixel")
    ours = ours if isinstance(ours, dict) else {}
    record_id, message_id = ours.get("id"), ours.get("messageId")
    peer = ours.get("ip")
    outcome = decode_pixel(
        PixelRequest(
            method,
            path,
            query,
            peer=peer if isinstance(peer, str) and len(peer) <= 64 else None,
            user_agent=headers.get(_USER_AGENT),
            forwarded_for=headers.get(_FORWARDED_FOR),
            referer=headers.get(_REFERER),
            # The host tells vendors apart where a path alone does not (/collect).
            host=urlsplit(url).hostname,
        ),
        config=config,
        now=_started(entry.get("startedDateTime")),
        new_id=_ids(
            record_id if isinstance(record_id, str) else None,
            message_id if isinstance(message_id, str) else None,
        ),
    )
    if outcome is None or outcome.record is None:
        return None
    response = entry.get("response")
    status = response.get("status") if isinstance(response, dict) else None
    # Browsers write 0 (or -1) for a request that got no answer.
    shown_status = status if type(status) is int and 100 <= status <= 999 else None
    return HarPixel(index, method, url, shown_status, outcome.record)


def _headers(value: object) -> dict[str, str]:
    """The request's headers by lower-case name; repeated ones joined with "," (as WSGI does)."""
    found: dict[str, str] = {}
    for header in value if isinstance(value, list) else ():
        if not isinstance(header, dict):
            continue
        name, text = header.get("name"), header.get("value")
        if isinstance(name, str) and isinstance(text, str):
            key = name.lower()
            found[key] = f"{found[key]},{text}" if key in found else text
    # The core reads headers as WSGI gives them: the raw bytes read as latin-1.
    return {
        key: text.encode("utf-8", "surrogateescape").decode("latin-1")
        for key, text in found.items()
    }


def request_target(url: str) -> bytes:
    """The request target (path and query) of a full URL (or of a path?query), as raw bytes."""
    raw = url.strip().encode("utf-8", "surrogateescape")
    scheme, sep, rest = raw.partition(b"://")
    if sep and scheme.isalpha():
        for i, byte in enumerate(rest):
            if byte in b"/?#":
                rest = rest[i:]
                break
        else:
            rest = b"/"
        raw = rest if rest.startswith(b"/") else b"/" + rest
    return raw.partition(b"#")[0]


def _started(value: object) -> datetime:
    """The entry's ``startedDateTime`` (ISO 8601), else now."""
    if isinstance(value, str) and len(value) <= 64:
        try:
            started = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return started if started.tzinfo is not None else started.replace(tzinfo=UTC)
    return datetime.now(UTC)


def _ids(record_id: str | None, message_id: str | None) -> Callable[[], str]:
    """What ``decode_pixel`` draws ids from: the record's id first, then the messageId
    it makes when the event has none. Ids taken back from a ``_pixel`` field (those
    of the records the HAR was written from) when they are plausible, else uuid4s.
    """

    def generate() -> Iterator[str]:
        for given in (record_id, message_id):
            if given and len(given) <= _MAX_ID_CHARS and given.isprintable():
                yield given
            else:
                yield str(uuid.uuid4())
        while True:
            yield str(uuid.uuid4())

    ids = generate()
    return lambda: next(ids)


# --- writing -----------------------------------------------------------------


def records_to_har(
    records: Iterable[PixelRecord],
    *,
    base_url: str = "http://127.0.0.1:8000",
    creator_version: str = "0",
) -> dict[str, Any]:
    """A HAR 1.2 document with one entry per record, oldest first (as given).

    ``base_url`` is the scheme and host the requests went to (records keep the
    path and query, not the host).
    """
    base = base_url.rstrip("/")
    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "pixel-middleware", "version": creator_version},
            "pages": [],
            "entries": [_entry(record, base) for record in records],
        }
    }


def _entry(record: PixelRecord, base: str) -> dict[str, Any]:
    request = record.get("request")
    request = request if isinstance(request, Mapping) else {}
    path = str(request.get("path") or "/")
    query = str(request.get("query") or "")
    url = base + path + (f"?{query}" if query else "")
    headers = [{"name": "Host", "value": base.partition("://")[2] or base}]
    for name, key in (("User-Agent", "userAgent"), ("Referer", "referer")):
        value = request.get(key)
        if isinstance(value, str) and value:
            headers.append({"name": name, "value": value})
    status, content_type, body, wait = _answer(record)
    event = record.get("event")
    event = event if isinstance(event, Mapping) else {}
    rejected = [str(p.get("rule")) for p in record.get("problems") or [] if isinstance(p, dict)]
    response_headers = [
        {"name": "Cache-Control", "value": "no-cache, no-store, must-revalidate"},
        {"name": "Content-Type", "value": content_type},
        {"name": "Content-Length", "value": str(len(body))},
    ]
    if rejected:
        response_headers.append(
            {"name": "X-Pixel-Rejected", "value": ", ".join(dict.fromkeys(rejected))}
        )
    content: dict[str, Any] = {"size": len(body), "mimeType": content_type}
    if content_type == _GIF_TYPE:
        content.update(text=base64.b64encode(body).decode("ascii"), encoding="base64")
    else:
        content["text"] = body.decode("utf-8", "replace")
    return {
        "startedDateTime": str(record.get("receivedAt") or ""),
        "time": wait,
        "request": {
            "method": str(request.get("method") or "GET"),
            "url": url,
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": headers,
            "queryString": _query_string(query),
            "headersSize": -1,
            "bodySize": 0,
        },
        "response": {
            "status": status,
            "statusText": _STATUS_TEXT.get(status, ""),
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": response_headers,
            "content": content,
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": len(body),
        },
        "cache": {},
        "timings": {"blocked": -1, "dns": -1, "connect": -1, "send": 0, "wait": wait, "receive": 0},
        "_pixel": {
            "id": record.get("id"),
            "accepted": bool(record.get("accepted")),
            "dialect": record.get("dialect"),
            "call": record.get("call"),
            "ip": request.get("ip"),
            "messageId": event.get("messageId"),
        },
    }


def _answer(record: PixelRecord) -> tuple[int, str, bytes, float]:
    """(status, content type, body, milliseconds): what the pixel was answered.

    The status an upstream collector gave, when the record kept it (records
    captured by the mitmproxy addon); else what the dialect answers for the
    record's verdict: Segment always 200 and the GIF, RudderStack 200 ``OK``
    or 400 with the problems (its Pixel API document's answer, the default).
    """
    upstream = record.get("upstream")
    upstream = upstream if isinstance(upstream, Mapping) else {}
    ms = upstream.get("ms")
    wait = float(ms) if isinstance(ms, int | float) and not isinstance(ms, bool) else 0.0
    accepted = bool(record.get("accepted"))
    if record.get("dialect") == "rudderstack":
        problems = [p for p in record.get("problems") or [] if isinstance(p, dict)]
        if accepted:
            status, content_type, body = 200, _TEXT_TYPE, b"OK"
        else:
            messages = dict.fromkeys(str(p.get("message", "")) for p in problems)
            status, content_type, body = 400, _TEXT_TYPE, "\n".join(messages).encode("utf-8")
    else:
        status, content_type, body = 200, _GIF_TYPE, GIF
    given = upstream.get("status")
    if type(given) is int and 100 <= given <= 999:
        status = given
        kind = upstream.get("contentType")
        if isinstance(kind, str) and kind.split(";")[0].strip() != content_type.split(";")[0]:
            # The upstream answered with something else: say what, not a body we never saw.
            content_type, body = kind, b""
    return status, content_type, body, wait


def _query_string(query: str) -> list[dict[str, str]]:
    """HAR's ``queryString``: each parameter, percent-decoded (as browsers write it)."""
    from urllib.parse import unquote_plus

    pairs = []
    for piece in query.split("&") if query else ():
        name, _, value = piece.partition("=")
        pairs.append(
            {
                "name": unquote_plus(name, errors="replace"),
                "value": unquote_plus(value, errors="replace"),
            }
        )
    return pairs
