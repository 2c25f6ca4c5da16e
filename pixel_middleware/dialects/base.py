"""What every dialect shares: the record, limits, notes, checks and enrichment.

A dialect (one module in this package, such as :mod:`.segment`) turns a request
on one of its routes into records and answers it. The pieces here make every
dialect's records the same shape, checked against the Segment Spec and enriched
as a server enriches them, with the same notes and the same limits.

Pure: no I/O and no clock (the caller passes ``now``), and nothing beyond the
standard library, so that the WSGI middleware and the mitmproxy addon (which may
run inside a mitmproxy that cannot import werkzeug) decode the same request into
the same record. :mod:`pixel_middleware.core` re-exports the public names.

Adding a dialect: see docs/dialects.md, "Adding a dialect".
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, NotRequired, TypedDict

from pixel_middleware import _json
from pixel_middleware._dotpath import DotPathBuilder, SetResult
from pixel_middleware._process import after_fork_in_child
from pixel_middleware._query import ParsedQuery, parse_pieces, split_query
from pixel_middleware._segment_data import repair_text
from pixel_middleware.machine_opens import machine_open_kind

if TYPE_CHECKING:
    from pixel_middleware.core import PixelConfig

#: A dialect's name, as records and ``PixelConfig.dialects`` spell it.
DialectName = str

ALLOWED_METHODS = "GET, HEAD"

# The 43-byte transparent 1x1 GIF89a both reference systems answer with.
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00"
    b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)

# Every rule id a problem can carry, with its fixed message. Messages never
# contain request data (the RudderStack 400 body is made of them).
RULES: Final[dict[str, str]] = {
    "missing_write_key": "No write key: send writeKey in the event or as a query parameter.",
    "unknown_write_key": "The write key is not one this collector accepts.",
    "missing_identity": "The event needs a userId or an anonymousId.",
    "missing_event": "A track call needs a non-empty event name.",
    "missing_group_id": "A group call needs a groupId.",
    "missing_user_id": "An alias call needs a userId.",
    "missing_previous_id": "An alias call needs a previousId.",
    "bad_base64": "data is neither JSON nor base64 (standard or URL-safe alphabet).",
    "bad_json": "data does not decode to UTF-8 JSON.",
    "not_an_object": "The event must be a JSON object.",
    "too_large": "The pixel is larger than this collector accepts.",
    "too_deep": "The event nests deeper than this collector accepts.",
    "too_many_params": "The query has more parameters than this collector accepts.",
    "message_id_too_long": "messageId is longer than 100 characters; a new one was generated.",
    "invalid_field": "A field has the wrong type.",
    # The message names the calls that exist (see _unknown_call_problem).
    "unknown_call": "There is no such pixel call.",
    # Bodies (Segment's HTTP Tracking API and RudderStack's): the request as a whole.
    "bad_gzip": "The body is not valid gzip data.",
    "unsupported_encoding": "The body's Content-Encoding is not gzip or identity.",
    "bad_batch": 'A batch must be a JSON object with a "batch" array of events.',
    "too_many_events": "The batch holds more events than this collector accepts.",
    "missing_vendor_field": "A field the vendor requires is missing.",
    "unknown_type": (
        "A batch event's type must be one of identify, group, alias, page, screen, track."
    ),
}

# Every note id, with its message. Notes explain what was repaired or ignored;
# they never reject. Some list the parameter names concerned.
NOTES: Final[dict[str, str]] = {
    "invalid_utf8": "Text that was not valid UTF-8 was replaced by U+FFFD",
    "raw_json": "data was raw JSON, not base64",
    "spaces_to_plus": "Spaces in data were turned back into '+' (form decoding had made them)",
    "padding_restored": "base64 padding was wrong and was restored",
    "unencoded_form": "No data parameter: the event was read from dot-notation parameters",
    "write_key_from_query": "The event has no writeKey; the writeKey query parameter was used",
    "write_key_query_ignored": (
        "The writeKey query parameter differs from the event's and was ignored"
    ),
    "params_ignored": "Parameters beside data and writeKey were ignored",
    "duplicate_param": "Repeated parameters: the first value was kept",
    "quotes_stripped": "One pair of double quotes around anonymousId was removed",
    "empty_key_dropped": "Parameters with an empty key or an empty path segment were dropped",
    "conflicting_param": "Parameters conflicting with an earlier parameter's path were ignored",
    "type_overridden": "The type sent was replaced by the route's call",
    "unknown_page_name": "An empty page name was replaced by 'Unknown Page'",
    "message_id_generated": "messageId was blank or not a string; a new one was generated",
    "received_at_overwritten": "The receivedAt sent was replaced by the time of receipt",
    "header_truncated": "Request headers longer than this collector keeps were cut",
    "unparsed_time": "A time that is not an ISO 8601 date and time was kept as sent",
    # Third-party dialects and machine opens (see docs/dialects.md).
    "machine_open": "Fetched by a machine, not a person",
}

# At most this many names are listed in one note, each cut to this length.
_NOTE_NAMES = 10
_NOTE_NAME_CHARS = 64
_MAX_MESSAGE_ID = 100
# An unknown call's name (the path below the pixel root) is kept in the record
# cut to this length: it is request data, only there to show what was asked.
_MAX_CALL_CHARS = 64


class Problem(TypedDict):
    rule: str
    message: str


class RequestInfo(TypedDict):
    method: str
    path: str
    query: str
    ip: str | None
    userAgent: str | None
    #: The Referer header (for a pixel, the page or email client that embedded
    #: it). Always set by the core; absent from records made before it existed.
    referer: NotRequired[str | None]


class PixelRecord(TypedDict):
    """One decoded pixel, the same shape in every store, the CLI and the addon."""

    id: str
    receivedAt: str
    dialect: DialectName
    call: str
    writeKey: str | None
    accepted: bool
    problems: list[Problem]
    notes: list[Problem]
    event: dict[str, Any] | None
    request: RequestInfo
    #: Added by the mitmproxy addon: what the real collector answered (status,
    #: content type, milliseconds), or that the addon answered it, or the error.
    upstream: NotRequired[dict[str, Any]]


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds on what one pixel may cost; past any of them it is rejected.

    - ``max_query_bytes``: a longer raw query is rejected unparsed (``too_large``).
    - ``max_event_bytes``: the decoded ``data`` JSON, or for dot-notation the
      summed decoded key and value bytes (``too_large``).
      The whole stored event, after enrichment (``context.userAgent``,
      ``context.ip``, ``messageId``, ...), serialised as the stores write it
      (compact JSON, non-ASCII as ``\\uXXXX`` escapes), is held to it too, so
      no stored event is ever larger.
    - ``max_depth``: nesting of objects and arrays, the event itself being
      level 1; a dot path of n segments has depth n (``too_deep``).
    - ``max_params``: query parameters (``too_many_params``), and also the
      total length of all arrays that dot-notation indexes may build
      (``too_large``), so no query can make us allocate a huge array.
    - ``max_header_chars``: each header the record keeps (``User-Agent``,
      ``Referer``, the ``X-Forwarded-For`` entry taken as the address) is cut
      to this many characters, with note ``header_truncated`` naming it.
    - ``max_body_bytes``: a request body (Segment's HTTP API, RudderStack's) as
      it arrives, compressed or not; a longer one is rejected unparsed
      (``too_large``). Front ends read at most one byte more than this.
    - ``max_decompressed_bytes``: a gzip body is inflated incrementally and
      rejected (``too_large``) as soon as it would exceed this, so a small zip
      bomb never costs more memory than this.
    - ``max_batch_events``: events in one batch (``too_many_events``).
    """

    max_query_bytes: int = 64 * 1024
    max_event_bytes: int = 32_000  # Segment's per-event limit
    max_depth: int = 32
    max_params: int = 1_000
    max_header_chars: int = 1_024
    max_body_bytes: int = 500 * 1024  # Segment's per-batch limit
    max_decompressed_bytes: int = 500 * 1024
    max_batch_events: int = 2_500

    def __post_init__(self) -> None:
        _positive("max_query_bytes", self.max_query_bytes)
        _positive("max_event_bytes", self.max_event_bytes)
        _positive("max_depth", self.max_depth)
        _positive("max_params", self.max_params)
        _positive("max_header_chars", self.max_header_chars)
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("max_decompressed_bytes", self.max_decompressed_bytes)
        _positive("max_batch_events", self.max_batch_events)


# Not frozen: a frozen dataclass sets each field through object.__setattr__,
# which made building a PixelRequest (and a PixelOutcome) cost more than a
# microsecond, on every pixel. Treat both as read-only all the same.
# PixelRequest stays hashable (unsafe_hash), as it was when frozen.
@dataclass(slots=True, unsafe_hash=True)
class PixelRequest:
    """What the core needs of an HTTP request (read-only by convention).

    - ``path``: as a WSGI server fills ``PATH_INFO`` (percent-decoded bytes read
      as latin-1); :func:`split_target` makes it from a raw request target.
    - ``query``: the raw query bytes, still percent-encoded.
    - ``peer``: the address of the TCP peer (``REMOTE_ADDR``).
    - ``user_agent``, ``forwarded_for``, ``referer``: header values as WSGI
      gives them (the raw bytes read as latin-1; several ``X-Forwarded-For``
      headers joined with ``","``). The record shows them decoded as UTF-8,
      each cut to ``Limits.max_header_chars``.
    - ``body``: the request body as received (POST routes only; front ends
      read at most ``Limits.max_body_bytes + 1`` bytes of it);
      ``content_encoding``, ``authorization``, ``host``: those headers.
    """

    method: str
    path: str
    query: bytes
    peer: str | None = None
    user_agent: str | None = None
    forwarded_for: str | None = None
    referer: str | None = None
    body: bytes = b""
    content_encoding: str | None = None
    authorization: str | None = None
    host: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """A dialect and its call; ``body`` for the HTTP API routes read from the body.

    ``call`` is ``"batch"`` for a batch route (each event names its own type).
    """

    dialect: DialectName
    call: str
    body: bool = False


@dataclass(slots=True)
class PixelOutcome:
    """The answer to send and the record to keep (``None``: keep nothing; read-only
    by convention).

    ``headers`` is a fresh list the caller may extend. ``records`` holds every
    record the request made: one for a pixel, one per event for a body (a batch
    makes several); ``record`` is the first of them, for front ends that only
    ever see pixels.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    record: PixelRecord | None
    records: list[PixelRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.records and self.record is not None:
            self.records = [self.record]


# Answers ------------------------------------------------------------------

# Pixels must be fetched again on every open to be counted: neither reference
# system sets these, we do (RFC 9111 section 5.2; Pragma/Expires for HTTP/1.0 caches).
_NO_CACHE: Final = (
    ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ("Pragma", "no-cache"),
    ("Expires", "0"),
)
_TEXT = "text/plain; charset=utf-8"
_GIF_HEADERS: Final = (
    *_NO_CACHE,
    ("Content-Type", "image/gif"),
    ("Content-Length", str(len(GIF))),
)
_OK_BODY = b"OK"
_OK_HEADERS: Final = (*_NO_CACHE, ("Content-Type", _TEXT), ("Content-Length", "2"))
_405_BODY = b"Method Not Allowed: pixels answer GET and HEAD only.\n"
_405_HEADERS: Final = (
    *_NO_CACHE,
    ("Allow", ALLOWED_METHODS),
    ("Content-Type", _TEXT),
    ("Content-Length", str(len(_405_BODY))),
)


# os.urandom is a system call, about a third of a pixel's id: one call makes
# this many ids, formatted all at once (slices of the whole batch, in C,
# instead of an f-string for each) and handed out one by one.
_IDS_PER_CALL: Final = 64
# RFC 9562 section 5.4: version nibble 4 (byte 6's high nibble), variant bits
# 10 (byte 8's two high bits); the other bits stay random.
_UUID_VERSION: Final = bytes((byte & 0x0F) | 0x40 for byte in range(256))
_UUID_VARIANT: Final = bytes((byte & 0x3F) | 0x80 for byte in range(256))
# Where each of the 32 hex digits goes in "8-4-4-4-12 " (37 characters).
_UUID_DIGITS: Final = tuple(
    (digit, digit + (digit >= 8) + (digit >= 12) + (digit >= 16) + (digit >= 20))
    for digit in range(32)
)
_random_ids: Iterator[str] = iter(())


def _more_random_ids() -> Iterator[str]:
    raw = bytearray(os.urandom(16 * _IDS_PER_CALL))
    raw[6::16] = raw[6::16].translate(_UUID_VERSION)
    raw[8::16] = raw[8::16].translate(_UUID_VARIANT)
    digits = raw.hex().encode()
    text = bytearray((b"-" * 36 + b" ") * _IDS_PER_CALL)
    for digit, at in _UUID_DIGITS:
        text[at::37] = digits[digit::32]
    return iter(text.decode().split())


def _forget_random_ids() -> None:
    # A forked child must not hand out the ids its parent will hand out too.
    global _random_ids
    _random_ids = iter(())


after_fork_in_child(_forget_random_ids)


def _uuid4() -> str:
    """``str(uuid.uuid4())``, a tenth of the time (the default ``new_id``)."""
    global _random_ids
    while True:
        # A list iterator's next() is atomic: no two threads get the same item.
        # Two threads that both find it empty each make their own.
        text = next(_random_ids, None)
        if text is not None:
            return text
        _random_ids = _more_random_ids()


# Helpers ------------------------------------------------------------------

_ABSENT: Final[Any] = object()


# Notes found so far: note id -> the parameter names concerned (a dict used as
# an ordered set). A plain dict, not an object: it is made for every pixel.
_Notes = dict[str, dict[str, None]]


def _note(notes: _Notes, note: str, name: str | None = None) -> None:
    names = notes.get(note)
    if names is None:
        names = notes[note] = {}
    if name is not None:
        names[name] = None


def _render_notes(notes: _Notes) -> list[Problem]:
    rendered: list[Problem] = []
    for note, names in notes.items():
        message = NOTES[note]
        if names:
            shown = [
                f'"{name[:_NOTE_NAME_CHARS]}{"..." if len(name) > _NOTE_NAME_CHARS else ""}"'
                for name in list(names)[:_NOTE_NAMES]
            ]
            message = f"{message}: {', '.join(shown)}"
            if len(names) > _NOTE_NAMES:
                message += f" and {len(names) - _NOTE_NAMES} more"
        rendered.append({"rule": note, "message": message})
    return rendered


def _problem(rule: str, message: str | None = None) -> Problem:
    return {"rule": rule, "message": RULES[rule] if message is None else message}


def _invalid_field(name: str, kind: str) -> Problem:
    return {"rule": "invalid_field", "message": f"{name} must be {kind}."}


def _utc_naive(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # moment.replace(tzinfo=None), in a fifth of the time (time() is naive).
    return datetime.combine(moment.date(), moment.time())


# The formatted second of the last time formatted: most pixels arrive within
# the same second as the previous one, and datetime.isoformat costs a
# microsecond. One tuple, replaced in one assignment, so threads cannot tear it.
_last_second: tuple[tuple[int, ...], str] = ((), "")


def _format_time(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC (a naive datetime is taken as UTC)."""
    global _last_second
    zone = moment.tzinfo
    if zone is not None and zone is not UTC:
        moment = moment.astimezone(UTC)
    # No datetime.replace here: it costs as much as isoformat.
    key = (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second)
    cached_key, text = _last_second
    if key != cached_key:
        text = "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}".format(*key)
        _last_second = (key, text)
    return f"{text}.{moment.microsecond // 1000:03d}Z"


def _is_time(text: str) -> bool:
    """``_parse_time(text) is not None``, without making the naive datetime
    (``datetime.replace`` costs more than the parsing)."""
    if len(text) > 64:
        return False
    try:
        moment = datetime.fromisoformat(text)
        zone = moment.tzinfo
        if zone is not None and zone is not UTC:
            moment.astimezone(UTC)  # may overflow, as in _utc_naive
    except (ValueError, OverflowError):
        return False
    return True


def _parse_time(text: str) -> datetime | None:
    if len(text) > 64:
        return None
    try:
        return _utc_naive(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        return None


def _header_text(value: str, max_chars: int) -> tuple[str, bool]:
    """A header value as the record shows it, and whether it was cut.

    WSGI's latin-1 text read as UTF-8 (invalid bytes replaced), at most
    ``max_chars`` characters. A UTF-8 character takes at most 4 bytes, so only
    the first ``4 * max_chars`` bytes are ever decoded, whatever the header's size.
    """
    cut = len(value) > 4 * max_chars
    if cut:
        value = value[: 4 * max_chars]
    if not value.isascii():
        try:
            value = value.encode("latin-1").decode("utf-8", "replace")
        except UnicodeEncodeError:
            # Not WSGI-style text: keep it, but never let a lone surrogate through.
            value = repair_text(value)
    if len(value) > max_chars:
        return value[:max_chars], True
    return value, cut


def _client_ip(request: PixelRequest, trusted: int) -> tuple[str | None, bool]:
    """The client address as WSGI-style text, and whether it came from X-Forwarded-For."""
    # werkzeug ProxyFix: with n trusted proxies the client is the n-th entry
    # from the right; fewer entries than that means the header is not to be
    # trusted and the peer is used. rudder-server takes the first entry, which
    # any client can forge: we deliberately differ.
    forwarded = request.forwarded_for
    if trusted and forwarded:
        entries = [entry.strip() for entry in forwarded.split(",")]
        entries = [entry for entry in entries if entry]
        if len(entries) >= trusted:
            return entries[-trusted], True
    return request.peer, False


def _present(value: Any) -> bool:
    """An identity value counts when it is a non-blank string or a number."""
    if isinstance(value, str):
        return bool(value) and not value.isspace()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and (not value or value.isspace()))


def _first_value(params: list[tuple[str, str]], name: str) -> str | None:
    for key, value in params:
        if key == name:
            return value
    return None


def _usable_key(value: str | None) -> str | None:
    return value if value and not value.isspace() else None


# Decoding -----------------------------------------------------------------


def _dot_form_event(
    parsed: ParsedQuery,
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
    *,
    strip_quotes: bool,
) -> tuple[dict[str, Any] | None, str | None]:
    """Build an event from dot-notation parameters (RudderStack, Segment unencoded)."""
    params, decoded_bytes, _ = parsed
    if decoded_bytes > limits.max_event_bytes:
        problems.append(_problem("too_large"))
        return None, _usable_key(_first_value(params, "writeKey"))
    root: dict[str, Any] = {}
    builder = DotPathBuilder(root, max_depth=limits.max_depth, max_slots=limits.max_params)
    seen: set[str] = set()
    write_key: str | None = None
    for key, value in params:
        if key in seen:
            _note(notes, "duplicate_param", key)
            continue
        seen.add(key)
        if key == "writeKey":
            write_key = value
            continue
        if key == "type":
            # rudder-server sets type from the route after the parameters.
            if value != call:
                _note(notes, "type_overridden")
            continue
        if (
            strip_quotes
            and key == "anonymousId"
            and len(value) >= 2
            and value[0] == '"'
            and value[-1] == '"'
        ):
            # AMP sends its cookie JSON-quoted; rudder-server strips ^"(.*)"$.
            value = value[1:-1]
            _note(notes, "quotes_stripped")
        if key and "." not in key:
            # builder.set's first case, without the call: a top-level key.
            if key in root:
                _note(notes, "conflicting_param", key)
            else:
                root[key] = value
            continue
        result = builder.set(key, value)
        if result is SetResult.SET:
            continue
        if result is SetResult.EMPTY_SEGMENT:
            _note(notes, "empty_key_dropped", key)
        elif result is SetResult.CONFLICT:
            _note(notes, "conflicting_param", key)
        elif result is SetResult.TOO_DEEP:
            problems.append(_problem("too_deep"))
            return None, _usable_key(write_key)
        else:
            problems.append(_problem("too_large"))
            return None, _usable_key(write_key)
    return root, _usable_key(write_key)


# Validation and enrichment --------------------------------------------------

# The spec fields whose type we check, with the exact types allowed (JSON and
# dot-notation only ever make these, never subclasses) and how to say it.
# JSON null counts as absent: libraries serialise unset fields that way.
_FieldKind = tuple[frozenset[type], str]
_OBJECT: Final[_FieldKind] = (frozenset((dict, type(None))), "an object")
_STRING: Final[_FieldKind] = (frozenset((str, type(None))), "a string")
_IDENTITY: Final[_FieldKind] = (frozenset((str, int, float, type(None))), "a string or a number")
_FIELD_KINDS: Final[dict[str, _FieldKind]] = {
    "properties": _OBJECT,
    "traits": _OBJECT,
    "context": _OBJECT,
    "integrations": _OBJECT,
    "event": _STRING,
    "name": _STRING,
    "groupId": _STRING,
    "previousId": _STRING,
    "timestamp": _STRING,
    "originalTimestamp": _STRING,
    "sentAt": _STRING,
    "userId": _IDENTITY,
    "anonymousId": _IDENTITY,
}


def _validate(event: dict[str, Any], call: str, problems: list[Problem]) -> None:
    # One pass over the event's fields, in its order (so problems come in a
    # deterministic order), usually fewer than _FIELD_KINDS.
    for name, value in event.items():
        kind = _FIELD_KINDS.get(name)
        if kind is not None and type(value) not in kind[0]:
            problems.append(_invalid_field(name, kind[1]))
    if call == "alias":
        if not _present(event.get("userId")):
            problems.append(_problem("missing_user_id"))
        if _blank(event.get("previousId")):
            problems.append(_problem("missing_previous_id"))
        return
    if not (_present(event.get("userId")) or _present(event.get("anonymousId"))):
        problems.append(_problem("missing_identity"))
    if call == "track" and _blank(event.get("event")):
        problems.append(_problem("missing_event"))
    elif call == "group" and _blank(event.get("groupId")):
        problems.append(_problem("missing_group_id"))


# The times a sender may set: each should be an ISO 8601 date and time.
_SENT_TIMES: Final = ("timestamp", "originalTimestamp", "sentAt")


def _timestamp(event: dict[str, Any], now: datetime, received_at: str) -> str:
    # Segment: timestamp = receivedAt - (sentAt - originalTimestamp), which
    # corrects the client's clock by the difference it reported itself.
    original = event.get("originalTimestamp")
    if not isinstance(original, str):
        return received_at
    sent = event.get("sentAt")
    if sent == original:
        # No difference to correct by (RudderStack sets both to receivedAt):
        # receivedAt itself, when the time is one.
        return received_at if original == received_at or _is_time(original) else original
    if isinstance(sent, str):
        sent_time = _parse_time(sent)
        original_time = _parse_time(original)
        if sent_time is not None and original_time is not None:
            try:
                return _format_time(_utc_naive(now) - (sent_time - original_time))
            except OverflowError:
                pass
    return original


def _enrich(
    event: dict[str, Any],
    call: str,
    now: datetime,
    received_at: str,
    ip: str | None,
    user_agent: str | None,
    new_id: Callable[[], str],
    notes: _Notes,
    problems: list[Problem],
) -> None:
    """Add what the server adds: type, messageId, receivedAt, timestamp, context."""
    sent_type = event.get("type", _ABSENT)
    if sent_type is not _ABSENT and sent_type != call:
        _note(notes, "type_overridden")
    event["type"] = call
    message_id = event.get("messageId", _ABSENT)
    if not (
        type(message_id) is str
        and message_id
        and len(message_id) <= _MAX_MESSAGE_ID
        and not message_id.isspace()
    ):
        if isinstance(message_id, str) and len(message_id) > _MAX_MESSAGE_ID:
            problems.append(_problem("message_id_too_long"))
        elif message_id is not _ABSENT:
            _note(notes, "message_id_generated")
        event["messageId"] = new_id()
    if "receivedAt" in event:
        _note(notes, "received_at_overwritten")
    _stamp(event, now, received_at, ip, user_agent)


def _stamp(
    event: dict[str, Any],
    now: datetime,
    received_at: str,
    ip: str | None,
    user_agent: str | None,
) -> None:
    """The end of :func:`_enrich` (and of Segment's fast path): receivedAt, a
    timestamp when none was sent, and the client's IP address and user agent
    in a context that does not say them."""
    event["receivedAt"] = received_at
    if "timestamp" not in event:
        event["timestamp"] = _timestamp(event, now, received_at)
    context = event.get("context", _ABSENT)
    if context is _ABSENT and (ip is not None or user_agent):
        context = event["context"] = {}
    if isinstance(context, dict):
        if ip is not None and "ip" not in context:
            context["ip"] = ip
        if user_agent and "userAgent" not in context:
            context["userAgent"] = user_agent


def _request_headers(
    request: PixelRequest, config: PixelConfig, notes: _Notes
) -> tuple[str | None, str | None, str | None]:
    """(ip, user agent, referer) as the record keeps them: decoded and capped."""
    max_chars = config.limits.max_header_chars
    ip, forwarded = _client_ip(request, config.trusted_proxies)
    user_agent = request.user_agent
    referer = request.referer
    # Nearly always: short ASCII headers, kept as they are (what _header_text
    # gives them), without the general loop.
    if (
        (ip is None or (len(ip) <= max_chars and ip.isascii()))
        and (user_agent is None or (len(user_agent) <= max_chars and user_agent.isascii()))
        and (referer is None or (len(referer) <= max_chars and referer.isascii()))
    ):
        return ip, user_agent, referer
    kept: list[str | None] = []
    for name, value in (
        ("X-Forwarded-For" if forwarded else "peer", ip),
        ("User-Agent", request.user_agent),
        ("Referer", request.referer),
    ):
        if value is not None:
            value, cut = _header_text(value, max_chars)
            if cut:
                _note(notes, "header_truncated", name)
        kept.append(value)
    return kept[0], kept[1], kept[2]


def _unknown_call_problem(calls: tuple[str, ...], call: str) -> Problem:
    # Only our own call names appear in the message, never what was sent.
    closest = difflib.get_close_matches(call, calls, n=1)
    hint = f"; the closest is {closest[0]}" if closest else ""
    return _problem(
        "unknown_call", f"There is no such pixel call: the calls are {', '.join(calls)}{hint}."
    )


def _stored_size(event: dict[str, Any]) -> int:
    # As the stores write it: compact JSON, non-ASCII as \uXXXX escapes. That
    # is never shorter than the UTF-8 of the same JSON, so it bounds both forms.
    return len(json.dumps(event, separators=(",", ":")))


# msgspec's compact UTF-8 JSON of an event (when msgspec is installed) is at
# most this many times shorter than _stored_size's text, token by token: the
# same structure, keys, integers, true/false/null; a character of a string
# takes at least 1 byte there and at most 6 characters here (\u007f, \u00e9;
# an astral character 4 bytes there, 12 here); a float the same digits, and at
# most 18 characters here ("1000000000000000.0") unless it has 12 or more
# digits. tests/test_core.py checks the bound over generated events.
_STORED_SIZE_FACTOR: Final = 6
_fast_encode = _json.fast_encode


def _larger_than(event: dict[str, Any], max_bytes: int) -> bool:
    """``_stored_size(event) > max_bytes``, cheaply: msgspec's length bounds the
    size, and only an event that may be near the limit is serialised exactly."""
    if _fast_encode is not None:
        try:
            bound = len(_fast_encode(event)) * _STORED_SIZE_FACTOR
        except (TypeError, ValueError, RecursionError):
            pass  # what msgspec refuses (a lone surrogate): the exact size decides
        else:
            if bound <= max_bytes:
                return False
    return _stored_size(event) > max_bytes


# Records ----------------------------------------------------------------------


@dataclass(slots=True)
class RequestFacts:
    """What every record of one request shares, read once per request."""

    received_at: str
    ip: str | None
    user_agent: str | None
    referer: str | None
    #: Notes about the request itself (``header_truncated``), copied into each record.
    notes: _Notes


def request_facts(request: PixelRequest, config: PixelConfig, now: datetime) -> RequestFacts:
    notes: _Notes = {}
    ip, user_agent, referer = _request_headers(request, config, notes)
    machine = machine_open_kind(user_agent, referer)
    if machine is not None:
        _note(notes, "machine_open", machine)
    return RequestFacts(_format_time(now), ip, user_agent, referer, notes)


def check_event(
    event: dict[str, Any],
    call: str,
    write_key: str | None,
    facts: RequestFacts,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
    notes: _Notes,
    problems: list[Problem],
) -> dict[str, Any] | None:
    """Check ``event`` against the Spec and the write keys, then enrich it.

    ``None`` when the enriched event is larger than ``max_event_bytes``.
    """
    if write_key is None:
        problems.append(_problem("missing_write_key"))
    elif config.write_keys is not None and write_key not in config.write_keys:
        problems.append(_problem("unknown_write_key"))
    _validate(event, call, problems)
    _enrich(
        event,
        call,
        now,
        facts.received_at,
        facts.ip,
        facts.user_agent,
        new_id,
        notes,
        problems,
    )
    if _larger_than(event, config.limits.max_event_bytes):
        # What was added (the User-Agent, the address, ids) counts too: no
        # stored event may be larger than the limit.
        problems.append(_problem("too_large"))
        return None
    return event


def make_record(
    *,
    record_id: str,
    facts: RequestFacts,
    dialect: DialectName,
    call: str,
    write_key: str | None,
    event: dict[str, Any] | None,
    problems: list[Problem],
    notes: _Notes,
    method: str,
    path: str,
    query: bytes,
    max_query_bytes: int,
) -> PixelRecord:
    if event is not None:
        # On the event as stored (a dialect may have set these times itself):
        # a time that is not one is kept as sent, the sender's word, but said.
        for key in _SENT_TIMES:
            value = event.get(key)
            # The times this server set (receivedAt's) need no parsing.
            if isinstance(value, str) and value != facts.received_at and not _is_time(value):
                _note(notes, "unparsed_time", key)
    return {
        "id": record_id,
        "receivedAt": facts.received_at,
        "dialect": dialect,
        "call": call,
        "writeKey": write_key,
        "accepted": not problems,
        "problems": problems,
        "notes": _render_notes(notes) if notes else [],
        "event": event,
        "request": {
            "method": method,
            "path": path,
            "query": (query if len(query) <= max_query_bytes else query[:max_query_bytes]).decode(
                "utf-8", "backslashreplace"
            ),
            "ip": facts.ip,
            "userAgent": facts.user_agent,
            "referer": facts.referer,
        },
    }


#: How a pixel dialect reads its query: (pieces, call, limits, notes, problems,
#: received_at) -> (event or None, write key or None).
QueryDecoder = Callable[
    [list[bytes], str, Limits, _Notes, list[Problem], str],
    tuple[dict[str, Any] | None, str | None],
]


def query_record(
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
    *,
    calls: tuple[str, ...],
    event_from_query: QueryDecoder,
) -> PixelRecord:
    """The record of a GET pixel: the frame every query dialect shares."""
    record_id = new_id()
    facts = request_facts(request, config, now)
    limits = config.limits
    query = request.query
    notes = facts.notes
    problems: list[Problem] = []
    event: dict[str, Any] | None = None
    write_key: str | None = None
    path = request.path
    call = route.call
    if call not in calls:
        # Only with unknown_calls="reject": match_route made this route. The
        # name is request data, kept (cut) only to show what was asked for.
        if len(call) > _MAX_CALL_CHARS:
            path = path[: len(path) - len(call) + _MAX_CALL_CHARS]
            call = call[:_MAX_CALL_CHARS]
        problems.append(_unknown_call_problem(calls, call))
    elif len(query) > limits.max_query_bytes:
        problems.append(_problem("too_large"))
    else:
        pieces = split_query(query, limits.max_params)
        if pieces is None:
            problems.append(_problem("too_many_params"))
        else:
            event, write_key = event_from_query(
                pieces, call, limits, notes, problems, facts.received_at
            )
    if event is not None:
        event = check_event(event, call, write_key, facts, config, now, new_id, notes, problems)
    return make_record(
        record_id=record_id,
        facts=facts,
        dialect=route.dialect,
        call=call,
        write_key=write_key,
        event=event,
        problems=problems,
        notes=notes,
        method=request.method,
        path=path,
        query=query,
        max_query_bytes=limits.max_query_bytes,
    )


def parsed_query(pieces: list[bytes], notes: _Notes) -> ParsedQuery:
    """``pieces`` decoded to text pairs, noting replaced invalid UTF-8."""
    parsed = parse_pieces(pieces)
    if parsed[2]:
        _note(notes, "invalid_utf8")
    return parsed


# Answers shared by the dialects -----------------------------------------------

#: (status, headers, body) as a dialect answers.
Answer = tuple[int, list[tuple[str, str]], bytes]


def rejected_header(records: list[PixelRecord]) -> tuple[str, str] | None:
    """``X-Pixel-Rejected`` with every rule id of ``records`` (never request data)."""
    for record in records:
        if record["problems"]:
            break
    else:
        return None  # nearly always: no generator and no dict to make
    rules = dict.fromkeys(p["rule"] for record in records for p in record["problems"])
    # Like Jitsu's X-Jitsu-Error, but only rule ids: never request data.
    return ("X-Pixel-Rejected", ", ".join(rules)) if rules else None


def gif_answer(records: list[PixelRecord]) -> Answer:
    rejected = rejected_header(records)
    if rejected is None:
        return 200, list(_GIF_HEADERS), GIF
    return 200, [*_GIF_HEADERS, rejected], GIF


def text_answer(records: list[PixelRecord], status_if_rejected: int = 400) -> Answer:
    """``200 OK``, or the problems' fixed messages, one a line."""
    rejected = rejected_header(records)
    if rejected is None:
        return 200, list(_OK_HEADERS), _OK_BODY
    messages = dict.fromkeys(p["message"] for record in records for p in record["problems"])
    body = "\n".join(messages).encode("utf-8")
    headers = [*_NO_CACHE, ("Content-Type", _TEXT), ("Content-Length", str(len(body))), rejected]
    return status_if_rejected, headers, body


def fixed_answer(status: int, content_type: str, body: bytes) -> Answer:
    headers = [*_NO_CACHE, ("Content-Type", content_type), ("Content-Length", str(len(body)))]
    return status, headers, body


# The interface ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """One dialect: its routes, how it decodes a request, and how it answers.

    - ``name``: as records and ``PixelConfig.dialects`` spell it.
    - ``pixel_root``: the GET pixel routes are ``prefix + pixel_root + call``.
    - ``calls``: the pixel calls (``/v1/pixel/<call>``).
    - ``body_routes``: POST routes read from the body, ``path -> call``
      (``"batch"``: each event names its type), below the prefix.
    - ``decode(request, route, config, now, new_id)``: every record the request
      makes (a pixel makes one), never raising for request data.
    - ``answer(records, route, config)``: (status, headers, body) for them.
    - ``accepted_answer(route, config)``: the answer to an accepted request, for
      a front end that must answer when decoding itself failed.
    - ``not_kept(route, config)``: (content type, body) of the ``503`` for a
      request whose records could not be kept.
    """

    name: DialectName
    pixel_root: str
    calls: tuple[str, ...]
    body_routes: Mapping[str, str]
    decode: Callable[
        [PixelRequest, Route, PixelConfig, datetime, Callable[[], str]], list[PixelRecord]
    ]
    answer: Callable[[list[PixelRecord], Route, PixelConfig], Answer]
    accepted_answer: Callable[[Route, PixelConfig], Answer]
    not_kept: Callable[[Route, PixelConfig], tuple[str, bytes]]
    #: Third-party dialects (GA4, Meta, ...), routed by path and, where the
    #: path alone is ambiguous, by host: exact paths below the prefix -> the
    #: route's call, matched for GET and HEAD (a pixel) and POST (a body).
    paths: Mapping[str, str] = field(default_factory=dict)
    #: Paths whose call is the rest of the path (``/api/px/<type>``).
    path_roots: tuple[str, ...] = ()
    #: Paths (of ``paths`` or ``path_roots``) that match only on these hosts;
    #: a host starting with ``.`` matches its subdomains.
    hosts: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: For paths too common to own outright (Snowplow's ``/i``, PostHog's
    #: ``/e``): whether this request, on a route of ``paths``, is really this
    #: dialect's (its query or body carries the vendor's markers, or it came to
    #: the vendor's host). ``False``: :func:`~pixel_middleware.core.decode_pixel`
    #: returns ``None`` and the application keeps the request. A custom route
    #: the user mapped to the dialect is never asked. Never raises.
    claims: Callable[[PixelRequest, Route, Limits], bool] | None = None
    #: A fast path for the GET pixels of the dialect's commonest shape: the
    #: whole outcome, exactly what ``decode`` and ``answer`` give, or ``None``
    #: (before drawing any id) to leave the request to them.
    fast_pixel: (
        Callable[
            [PixelRequest, Route, PixelConfig, datetime, Callable[[], str]], PixelOutcome | None
        ]
        | None
    ) = None
