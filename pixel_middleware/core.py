"""The decoding core: raw pixel request in, plain record and HTTP answer out.

Pure: no I/O and no clock (the caller passes ``now``), and nothing beyond the
standard library, so that the WSGI middleware and the mitmproxy addon (which may
run inside a mitmproxy that cannot import werkzeug) decode the same request into
the same record. The one source of randomness is the default ``new_id``, which
makes UUID4 record ids and messageIds from ``os.urandom``; pass your own
``new_id`` for fully deterministic records.

Specification: Segment's and RudderStack's Pixel API documents, plus what the
reference systems do beyond them (see docs/dialects.md, which lists every rule
and note id used here).

Usage::

    outcome = decode_pixel(
        PixelRequest("GET", "/v1/pixel/track", b"data=eyJ3cml0ZUtleSI6..."),
        config=PixelConfig(),
        now=datetime.now(timezone.utc),
    )
    if outcome is None:
        ...  # not a pixel route: hand the request to the application
    else:
        ...  # send outcome.status/headers/body; store outcome.record if not None

Bad request data never raises here: it becomes a rejected record with problems.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, NotRequired, TypedDict
from urllib.parse import unquote_to_bytes

from pixel_middleware._dotpath import DotPathBuilder, SetResult
from pixel_middleware._query import (
    ParsedQuery,
    decode_component,
    decode_text,
    parse_pieces,
    split_query,
)
from pixel_middleware._segment_data import decode_data, repair_text

__all__ = [
    "ALLOWED_METHODS",
    "CALLS",
    "DIALECTS",
    "GIF",
    "NOTES",
    "RULES",
    "Limits",
    "PixelConfig",
    "PixelOutcome",
    "PixelRecord",
    "PixelRequest",
    "Problem",
    "RequestInfo",
    "Route",
    "decode_pixel",
    "default_answer",
    "match_route",
    "not_kept_answer",
    "split_target",
]

Dialect = Literal["segment", "rudderstack"]
DIALECTS: tuple[Dialect, ...] = ("segment", "rudderstack")
CALLS: dict[Dialect, tuple[str, ...]] = {
    "segment": ("identify", "group", "alias", "page", "screen", "track"),
    "rudderstack": ("page", "track"),
}
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
}

# Every note id, with its message. Notes explain what was repaired or ignored;
# they never reject. Some list the parameter names concerned.
NOTES: Final[dict[str, str]] = {
    "invalid_utf8": "Text that was not valid UTF-8 was replaced by U+FFFD",
    "raw_json": "data was raw JSON, not base64",
    "spaces_to_plus": "Spaces in data were turned back into '+' (form decoding had made them)",
    "padding_restored": "base64 padding was missing or wrong and was restored",
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
}

# At most this many names are listed in one note, each cut to this length.
_NOTE_NAMES = 10
_NOTE_NAME_CHARS = 64
_MAX_MESSAGE_ID = 100
# An unknown call's name (the path below the pixel root) is kept in the record
# cut to this length: it is request data, only there to show what was asked.
_MAX_CALL_CHARS = 64
_SEGMENT_ROOT = "/v1/pixel/"
_RUDDERSTACK_ROOT = "/pixel/v1/"


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
    dialect: Dialect
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
    - ``max_depth``: nesting of objects and arrays, the event itself being
      level 1; a dot path of n segments has depth n (``too_deep``).
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
    """

    max_query_bytes: int = 64 * 1024
    max_event_bytes: int = 32_000  # Segment's per-event limit
    max_depth: int = 32
    max_params: int = 1_000
    max_header_chars: int = 1_024

    def __post_init__(self) -> None:
        _positive("max_query_bytes", self.max_query_bytes)
        _positive("max_event_bytes", self.max_event_bytes)
        _positive("max_depth", self.max_depth)
        _positive("max_params", self.max_params)
        _positive("max_header_chars", self.max_header_chars)


@dataclass(frozen=True, kw_only=True, slots=True)
class PixelConfig:
    """How pixels are recognised, checked and answered.

    - ``prefix``: mount point of the pixel routes, ``""`` or like ``"/collect"``.
    - ``dialects``: which route families answer (``"segment"``, ``"rudderstack"``).
    - ``write_keys``: when set, any other write key is rejected (``unknown_write_key``).
    - ``trusted_proxies``: how many proxies in front of us append to
      ``X-Forwarded-For`` (werkzeug ProxyFix semantics). ``0`` (the default)
      ignores the header: a client can write anything into it.
    - ``limits``: see :class:`Limits`.
    - ``rudderstack_response``: ``"seed"`` answers RudderStack pixels ``200 OK``
      or ``400`` with the problems (the published document); ``"gif"`` always
      answers 200 with the GIF (what rudder-server does since 2021).
    - ``unknown_calls``: what a path under a pixel root with no such call
      (``/v1/pixel/trak``) is. ``"pass"`` (the default): not a pixel, the
      application may own it. ``"reject"``: a rejected pixel, rule
      ``unknown_call``, whose message lists the calls and names the closest.

    Invalid values raise ``ValueError`` here, at construction.
    """

    prefix: str = ""
    dialects: frozenset[Dialect] = frozenset(DIALECTS)
    write_keys: frozenset[str] | None = None
    trusted_proxies: int = 0
    limits: Limits = field(default_factory=Limits)
    rudderstack_response: Literal["seed", "gif"] = "seed"
    unknown_calls: Literal["pass", "reject"] = "pass"
    # Precomputed in __post_init__ so that match_route costs one startswith.
    _routes: dict[str, Route] = field(init=False, repr=False, compare=False, hash=False)
    _route_roots: tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)
    _root_dialects: tuple[tuple[str, Dialect], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        prefix = self.prefix
        if not isinstance(prefix, str) or (prefix and (prefix[0] != "/" or prefix[-1] == "/")):
            raise ValueError(
                f"prefix must be '' or start with '/' and not end with '/' "
                f"(like '/collect'), got {prefix!r}"
            )
        dialects: Any = self.dialects
        if isinstance(dialects, str):
            raise ValueError(
                f"dialects must be a set of dialect names such as "
                f"frozenset({{{dialects!r}}}), not a string"
            )
        try:
            dialects = frozenset(dialects)
        except TypeError:
            raise ValueError(
                f"dialects must be a set of names from {DIALECTS}, got {dialects!r}"
            ) from None
        unknown = dialects - set(DIALECTS)
        if unknown or not dialects:
            raise ValueError(
                f"dialects must be a non-empty subset of {DIALECTS}, "
                f"got {sorted(map(str, dialects))}"
            )
        object.__setattr__(self, "dialects", dialects)
        write_keys: Any = self.write_keys
        if write_keys is not None:
            if isinstance(write_keys, str):
                raise ValueError(
                    f"write_keys must be a set of keys such as frozenset({{{write_keys!r}}}), "
                    f"not a string (or None to accept any key)"
                )
            try:
                write_keys = frozenset(write_keys)
            except TypeError:
                raise ValueError(
                    f"write_keys must be a set of strings or None, got {write_keys!r}"
                ) from None
            if not write_keys or not all(isinstance(key, str) and key for key in write_keys):
                raise ValueError(
                    "write_keys must hold non-empty strings; pass None to accept any key"
                )
            object.__setattr__(self, "write_keys", write_keys)
        trusted = self.trusted_proxies
        if not isinstance(trusted, int) or isinstance(trusted, bool) or trusted < 0:
            raise ValueError(
                f"trusted_proxies must be an integer >= 0 (the number of proxies in front "
                f"of this app that set X-Forwarded-For), got {trusted!r}"
            )
        if not isinstance(self.limits, Limits):
            raise ValueError(f"limits must be a Limits(...) instance, got {self.limits!r}")
        if self.rudderstack_response not in ("seed", "gif"):
            raise ValueError(
                f"rudderstack_response must be 'seed' (200 OK / 400 text) or 'gif' "
                f"(always the GIF), got {self.rudderstack_response!r}"
            )
        if self.unknown_calls not in ("pass", "reject"):
            raise ValueError(
                f"unknown_calls must be 'pass' (leave such paths to the application) or "
                f"'reject' (record them as rejected pixels), got {self.unknown_calls!r}"
            )
        routes: dict[str, Route] = {}
        roots: list[tuple[str, Dialect]] = []
        for dialect in DIALECTS:
            if dialect in dialects:
                root = prefix + (_SEGMENT_ROOT if dialect == "segment" else _RUDDERSTACK_ROOT)
                roots.append((root, dialect))
                for call in CALLS[dialect]:
                    routes[root + call] = Route(dialect, call)
        object.__setattr__(self, "_routes", routes)
        object.__setattr__(self, "_route_roots", tuple(root for root, _ in roots))
        object.__setattr__(self, "_root_dialects", tuple(roots))


@dataclass(frozen=True, slots=True)
class PixelRequest:
    """What the core needs of an HTTP request.

    - ``path``: as a WSGI server fills ``PATH_INFO`` (percent-decoded bytes read
      as latin-1); :func:`split_target` makes it from a raw request target.
    - ``query``: the raw query bytes, still percent-encoded.
    - ``peer``: the address of the TCP peer (``REMOTE_ADDR``).
    - ``user_agent``, ``forwarded_for``, ``referer``: header values as WSGI
      gives them (the raw bytes read as latin-1; several ``X-Forwarded-For``
      headers joined with ``","``). The record shows them decoded as UTF-8,
      each cut to ``Limits.max_header_chars``.
    """

    method: str
    path: str
    query: bytes
    peer: str | None = None
    user_agent: str | None = None
    forwarded_for: str | None = None
    referer: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    dialect: Dialect
    call: str


@dataclass(frozen=True, slots=True)
class PixelOutcome:
    """The answer to send and the record to keep (``None``: keep nothing).

    ``headers`` is a fresh list the caller may extend.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    record: PixelRecord | None


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


# The variant nibble of a version 4 UUID, from any random hex digit: 10xx.
_UUID_VARIANT: Final = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _uuid4() -> str:
    """``str(uuid.uuid4())`` in two thirds of the time (the default ``new_id``)."""
    text = os.urandom(16).hex()
    # RFC 9562 section 5.4: version nibble 4, variant bits 10.
    return (
        f"{text[:8]}-{text[8:12]}-4{text[13:16]}-{_UUID_VARIANT[text[16]]}{text[17:20]}-{text[20:]}"
    )


def split_target(target: bytes) -> tuple[str, bytes]:
    """Split a raw request target into (path as a WSGI server gives it, raw query).

    The path is percent-decoded to bytes (invalid escapes kept as they are) and
    read as latin-1, exactly as WSGI servers fill ``PATH_INFO``; the query stays
    raw. An absolute-form target (``http://host/path?q``, as sent to proxies)
    loses its scheme and authority first. Never raises.
    """
    path, _, query = target.partition(b"?")
    if path[:1] != b"/" and b"://" in path[:16]:
        # absolute-form (RFC 9112 section 3.2.2): keep only the path.
        rest = path.split(b"://", 1)[1]
        slash = rest.find(b"/")
        path = rest[slash:] if slash >= 0 else b"/"
    if 37 in path:  # "%" (an int needle: see _query._PERCENT)
        path = unquote_to_bytes(path)
    return path.decode("latin-1"), query


def match_route(path: str, config: PixelConfig) -> Route | None:
    """The pixel route ``path`` names, or ``None``; cheap enough for every request.

    Exact match only: no trailing slash, case-sensitive, only enabled dialects.
    With ``unknown_calls="reject"``, any other path under a pixel root is a
    route too, whose ``call`` is the rest of the path, not one of
    :data:`CALLS`: :func:`decode_pixel` rejects it.
    """
    if not path.startswith(config._route_roots):
        return None
    route = config._routes.get(path)
    if route is None and config.unknown_calls == "reject":
        for root, dialect in config._root_dialects:
            if path.startswith(root):
                return Route(dialect, path[len(root) :])
    return route


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
    return moment.replace(tzinfo=None)


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


def _rudderstack_event(
    parsed: ParsedQuery,
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
    received_at: str,
) -> tuple[dict[str, Any] | None, str | None]:
    built, write_key = _dot_form_event(parsed, call, limits, notes, problems, strip_quotes=True)
    if built is None:
        return None, write_key
    # rudder-server starts from {"channel": "web", "integrations": {"All": true}}
    # plus both timestamps, then sets the parameters over it: parameters win.
    integrations = built.pop("integrations", _ABSENT)
    if integrations is _ABSENT:
        integrations = {"All": True}
    elif isinstance(integrations, dict):
        integrations = {"All": True, **integrations}
    event: dict[str, Any] = {
        "channel": built.pop("channel", "web"),
        "integrations": integrations,
        "originalTimestamp": built.pop("originalTimestamp", received_at),
        "sentAt": built.pop("sentAt", received_at),
    }
    event.update(built)
    if call == "page" and event.get("name") == "":
        event["name"] = "Unknown Page"
        _note(notes, "unknown_page_name")
    return event, write_key


def _segment_event(
    pieces: list[bytes],
    call: str,
    limits: Limits,
    notes: _Notes,
    problems: list[Problem],
) -> tuple[dict[str, Any] | None, str | None]:
    data: bytes | None = None
    query_key: str | None = None
    seen_key = False
    ignored: list[str] = []
    for piece in pieces:
        raw_key, _, raw_value = piece.partition(b"=")
        # data= stays bytes: base64 never needs to be text.
        if raw_key == b"data":
            if data is None:
                data = decode_component(raw_value)
            else:
                _note(notes, "duplicate_param", "data")
            continue
        key, replaced = decode_text(decode_component(raw_key))
        if replaced:
            _note(notes, "invalid_utf8")
        if key == "data":  # spelled with escapes, like d%61ta
            if data is None:
                data = decode_component(raw_value)
            else:
                _note(notes, "duplicate_param", "data")
        elif key == "writeKey":
            if seen_key:
                _note(notes, "duplicate_param", key)
            else:
                seen_key = True
                query_key, replaced = decode_text(decode_component(raw_value))
                if replaced:
                    _note(notes, "invalid_utf8")
        else:
            ignored.append(key)
    if data is None:
        # Segment's unencoded form (documented since 2025): dot-notation fields.
        _note(notes, "unencoded_form")
        parsed = parse_pieces(pieces)
        if parsed[2]:
            _note(notes, "invalid_utf8")
        return _dot_form_event(parsed, call, limits, notes, problems, strip_quotes=False)
    for name in ignored:
        _note(notes, "params_ignored", name)
    query_key = _usable_key(query_key)
    event, rule, data_notes = decode_data(data, limits.max_event_bytes, limits.max_depth)
    for note in data_notes:
        _note(notes, note)
    if rule is not None:
        problems.append(_problem(rule))
        return None, query_key
    if not isinstance(event, dict):
        problems.append(_problem("not_an_object"))
        return None, query_key
    event_key = event.pop("writeKey", None)
    if event_key is not None and not isinstance(event_key, str):
        problems.append(_invalid_field("writeKey", "a string"))
        event_key = None
    event_key = _usable_key(event_key)
    if event_key is None:
        if query_key is not None:
            _note(notes, "write_key_from_query")
        return event, query_key
    if query_key is not None and query_key != event_key:
        _note(notes, "write_key_query_ignored")
    return event, event_key


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


def _timestamp(event: dict[str, Any], now: datetime, received_at: str) -> str:
    # Segment: timestamp = receivedAt - (sentAt - originalTimestamp), which
    # corrects the client's clock by the difference it reported itself.
    original = event.get("originalTimestamp")
    if not isinstance(original, str):
        return received_at
    sent = event.get("sentAt")
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


def _unknown_call_problem(dialect: Dialect, call: str) -> Problem:
    calls = CALLS[dialect]
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


def _decode_record(
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
) -> PixelRecord:
    record_id = new_id()
    received_at = _format_time(now)
    limits = config.limits
    query = request.query
    notes: _Notes = {}
    problems: list[Problem] = []
    ip, user_agent, referer = _request_headers(request, config, notes)
    event: dict[str, Any] | None = None
    write_key: str | None = None
    path = request.path
    call = route.call
    if call not in CALLS[route.dialect]:
        # Only with unknown_calls="reject": match_route made this route. The
        # name is request data, kept (cut) only to show what was asked for.
        if len(call) > _MAX_CALL_CHARS:
            path = path[: len(path) - len(call) + _MAX_CALL_CHARS]
            call = call[:_MAX_CALL_CHARS]
        problems.append(_unknown_call_problem(route.dialect, call))
    elif len(query) > limits.max_query_bytes:
        problems.append(_problem("too_large"))
    else:
        pieces = split_query(query, limits.max_params)
        if pieces is None:
            problems.append(_problem("too_many_params"))
        elif route.dialect == "segment":
            event, write_key = _segment_event(pieces, route.call, limits, notes, problems)
        else:
            parsed = parse_pieces(pieces)
            if parsed[2]:
                _note(notes, "invalid_utf8")
            event, write_key = _rudderstack_event(
                parsed, route.call, limits, notes, problems, received_at
            )
    if event is not None:
        if write_key is None:
            problems.append(_problem("missing_write_key"))
        elif config.write_keys is not None and write_key not in config.write_keys:
            problems.append(_problem("unknown_write_key"))
        _validate(event, route.call, problems)
        _enrich(event, route.call, now, received_at, ip, user_agent, new_id, notes, problems)
        if _stored_size(event) > limits.max_event_bytes:
            # What was added (the User-Agent, the address, ids) counts too: no
            # stored event may be larger than the limit.
            problems.append(_problem("too_large"))
            event = None
    return {
        "id": record_id,
        "receivedAt": received_at,
        "dialect": route.dialect,
        "call": call,
        "writeKey": write_key,
        "accepted": not problems,
        "problems": problems,
        "notes": _render_notes(notes) if notes else [],
        "event": event,
        "request": {
            "method": request.method,
            "path": path,
            "query": (
                query if len(query) <= limits.max_query_bytes else query[: limits.max_query_bytes]
            ).decode("utf-8", "backslashreplace"),
            "ip": ip,
            "userAgent": user_agent,
            "referer": referer,
        },
    }


def _answer(
    record: PixelRecord, route: Route, config: PixelConfig
) -> tuple[int, list[tuple[str, str]], bytes]:
    problems = record["problems"]
    seed_text = route.dialect == "rudderstack" and config.rudderstack_response == "seed"
    if not problems:
        if seed_text:
            return 200, list(_OK_HEADERS), _OK_BODY
        return 200, list(_GIF_HEADERS), GIF
    # Like Jitsu's X-Jitsu-Error, but only rule ids: never request data.
    rejected = ("X-Pixel-Rejected", ", ".join(dict.fromkeys(p["rule"] for p in problems)))
    if seed_text:
        body = "\n".join(dict.fromkeys(p["message"] for p in problems)).encode("utf-8")
        headers = [
            *_NO_CACHE,
            ("Content-Type", _TEXT),
            ("Content-Length", str(len(body))),
            rejected,
        ]
        return 400, headers, body
    return 200, [*_GIF_HEADERS, rejected], GIF


def decode_pixel(
    request: PixelRequest,
    *,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str] = _uuid4,
) -> PixelOutcome | None:
    """Decode one request; ``None`` when its path is not a pixel route.

    GET: the answer and the record. HEAD: the same status and headers with an
    empty body, and no record. Any other method: ``405`` with ``Allow: GET,
    HEAD`` and no record. ``now`` is the time of receipt (a naive datetime is
    taken as UTC); ``new_id`` makes the record id (drawn first) and, when
    needed, the event's messageId. Never raises for any request data.
    """
    route = match_route(request.path, config)
    if route is None:
        return None
    method = request.method
    if method != "GET" and method != "HEAD":
        return PixelOutcome(405, list(_405_HEADERS), _405_BODY, None)
    record = _decode_record(request, route, config, now, new_id)
    status, headers, body = _answer(record, route, config)
    if method == "HEAD":
        return PixelOutcome(status, headers, b"", None)
    return PixelOutcome(status, headers, body, record)


def default_answer(route: Route, method: str, config: PixelConfig) -> PixelOutcome:
    """The dialect's answer to an accepted pixel (``405`` for other methods), no record.

    For front ends that must still answer when :func:`decode_pixel` itself
    failed: the same status, headers and body it gives, from one definition.
    """
    if method != "GET" and method != "HEAD":
        return PixelOutcome(405, list(_405_HEADERS), _405_BODY, None)
    if route.dialect == "rudderstack" and config.rudderstack_response == "seed":
        headers, body = list(_OK_HEADERS), _OK_BODY
    else:
        headers, body = list(_GIF_HEADERS), GIF
    return PixelOutcome(200, headers, b"" if method == "HEAD" else body, None)


# The answer to a pixel whose record could not be kept anywhere (the store and
# the spool both failing): a 503 a client or load balancer can act on.
_RETRY_AFTER_SECONDS = "5"
_NOT_KEPT_BODY = b"Service Unavailable: the pixel could not be recorded; send it again later.\n"


def not_kept_answer(route: Route, method: str, config: PixelConfig) -> PixelOutcome:
    """``503`` with ``Retry-After`` for a pixel whose record could not be kept.

    Honest, so that a client or a load balancer can tell and retry, and still
    the dialect's body: Segment's contract is "always the GIF" (a page showing
    the pixel keeps its layout), RudderStack's seed answer a short text.
    """
    if route.dialect == "rudderstack" and config.rudderstack_response == "seed":
        body, content_type = _NOT_KEPT_BODY, _TEXT
    else:
        body, content_type = GIF, "image/gif"
    headers = [
        *_NO_CACHE,
        ("Retry-After", _RETRY_AFTER_SECONDS),
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
    ]
    return PixelOutcome(503, headers, b"" if method == "HEAD" else body, None)
