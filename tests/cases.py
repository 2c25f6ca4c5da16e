"""The shared table of pixel requests and what each must give, for every front end.

``tests/test_core.py`` runs it through :func:`~pixel_middleware.core.decode_pixel`;
the WSGI middleware's and the mitmproxy addon's tests replay the same table
through their stacks and compare records. So it is self-contained: plain data,
stdlib only, no pytest.

Usage::

    from cases import CASES, NOT_PIXELS, case_config, case_request

    for case in CASES:
        outcome = decode_pixel(case_request(case), config=case_config(case), now=NOW)
        assert outcome.status == case.expect_status
        ...

``expect_rules`` are the rule ids of the record's problems, and also what the
``X-Pixel-Rejected`` header lists (HEAD included); ``expect_notes`` the note ids.
A case's ``target`` is the raw request target (``path?query``) as it goes on
the wire, raw bytes >= 0x80 included (as browsers send them); ``headers`` are
ASCII request headers; ``config`` holds keyword
arguments for ``PixelConfig`` (most cases use the defaults). ``expect_accepted``
is ``None`` when no record is made (HEAD, 405). ``check(event)`` makes further
assertions on the decoded event (``None`` when nothing could be decoded); it
depends neither on the peer address nor on the clock.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from pixel_middleware.core import PixelConfig, PixelRequest, split_target

__all__ = [
    "BODY_CASES",
    "CASES",
    "CORE_ONLY_CASES",
    "GOLDEN_RUDDERSTACK_PAGE_EVENT",
    "GOLDEN_RUDDERSTACK_TRACK_EVENT",
    "GOLDEN_SEGMENT_EVENT",
    "NOT_PIXELS",
    "PEER",
    "SEGMENT_SEED_DATA",
    "Case",
    "case_config",
    "case_request",
    "segment_data",
    "server_fields",
]

PEER = "192.0.2.10"  # the TCP peer test_core uses; other front ends have their own
WRITE_KEY = "wk_2Xq9"
UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Version/17.5 Safari/605.1.15"
)
_ISO_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")


@dataclass(frozen=True)
class Case:
    """One request and what decoding it must give."""

    id: str
    method: str
    target: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    expect_status: int = 200
    expect_accepted: bool | None = True
    expect_rules: frozenset[str] = frozenset()
    expect_notes: frozenset[str] = frozenset()
    check: Callable[[dict[str, Any] | None], None] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    #: The request body (POST routes), sent as it is.
    body: bytes = b""
    #: Body cases: the call of each record, in order (a batch makes several);
    #: ``expect_rules`` and ``expect_notes`` are then those of all records.
    expect_calls: tuple[str, ...] = ()


def case_config(case: Case) -> PixelConfig:
    return PixelConfig(**case.config)


def case_request(case: Case, peer: str | None = PEER) -> PixelRequest:
    """The request as a WSGI front end gives it to the core."""
    path, query = split_target(case.target)
    headers = {name.lower(): value for name, value in case.headers.items()}
    return PixelRequest(
        case.method,
        path,
        query,
        peer,
        headers.get("user-agent"),
        headers.get("x-forwarded-for"),
        headers.get("referer"),
        body=case.body,
        content_encoding=headers.get("content-encoding"),
        authorization=headers.get("authorization"),
        host=headers.get("host"),
    )


def segment_data(
    event: Any, *, urlsafe: bool = True, padded: bool = False, compact: bool = True
) -> str:
    """``event`` as a ``data=`` value: base64 of its JSON (not percent-encoded)."""
    text = json.dumps(event, separators=(",", ":") if compact else None, ensure_ascii=False)
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(text.encode("utf-8"))
    return (encoded if padded else encoded.rstrip(b"=")).decode("ascii")


def _seg(call: str, event: Any, query_tail: str = "", **kwargs: Any) -> bytes:
    return f"/v1/pixel/{call}?data={segment_data(event, **kwargs)}{query_tail}".encode("ascii")


def _ascii_quoted(text: str) -> bytes:
    """``text`` percent-encoded except for its non-ASCII characters, sent as raw UTF-8."""
    return b"".join(
        quote(char, safe="").encode() if char.isascii() else char.encode() for char in text
    )


def server_fields(event: dict[str, Any]) -> None:
    """What the server adds to every decoded event, whatever the client sent."""
    assert _ISO_MS_Z.match(event["receivedAt"]), event["receivedAt"]
    assert isinstance(event["messageId"], str)
    assert event["messageId"]
    assert isinstance(event["timestamp"], str)


def _without(event: dict[str, Any] | None, *names: str) -> dict[str, Any]:
    assert event is not None
    return {key: value for key, value in event.items() if key not in names}


def _context_without_ip(event: dict[str, Any]) -> dict[str, Any]:
    context = dict(event["context"])
    assert context.pop("ip")  # the peer, whichever front end
    return context


# --- golden cases -----------------------------------------------------------------

# Segment's Pixel API document: the example payload, base64 with the padding stripped.
SEGMENT_SEED_DATA = (
    "eyJ3cml0ZUtleSI6ICJZT1VSX1dSSVRFX0tFWSIsICJ1c2VySWQiOiAiMDI1cGlrYWNodTAyNSIsICJldmVudCI6"
    "ICJFbWFpbCBPcGVuZWQiLCAicHJvcGVydGllcyI6IHsgICAic3ViamVjdCI6ICJUaGUgRWxlY3RyaWMgRGFpbHki"
    "LCAgICJlbWFpbCI6ICJwZWVrQXRNZUBlbWFpbC5wb2tlIiB9fQ"
)
# What it decodes to (not the JSON the document prints above it), writeKey taken out.
GOLDEN_SEGMENT_EVENT = {
    "userId": "025pikachu025",
    "event": "Email Opened",
    "properties": {"subject": "The Electric Daily", "email": "peekAtMe@email.poke"},
}


def _check_golden_segment(event: dict[str, Any] | None) -> None:
    assert event is not None
    server_fields(event)
    assert _without(event, "type", "messageId", "receivedAt", "timestamp", "context") == (
        GOLDEN_SEGMENT_EVENT
    )
    assert event["type"] == "track"
    # No timestamps sent: timestamp is the time of receipt.
    assert event["timestamp"] == event["receivedAt"]
    assert _context_without_ip(event) == {"userAgent": UA}


# RudderStack's Pixel API document: the sample page call, placeholders filled in
# as AMP fills them (spaces as %20, URLs percent-encoded); the page name uses "+".
_RS_PAGE = (
    "/pixel/v1/page?writeKey=1uS9ZQ3lWk0cO8y5pNn2RrT7vXa"
    "&context.library.name=Rudderstack%20AMP%20SDK&context.library.version=1.0.0"
    "&context.platform=AMP&anonymousId=amp-JxT0bS5m4Q2e8nWc1Ld7Vg&context.locale=en-GB"
    "&context.userAgent=Mozilla%2F5.0%20(iPhone%3B%20CPU%20iPhone%20OS%2017_5%20like%20Mac%20OS%20X)"
    "&context.page.path=%2Fguides%2Fwinter-boots"
    "&context.page.url=https%3A%2F%2Fshop.example%2Fguides%2Fwinter-boots"
    "&context.page.referrer=https%3A%2F%2Fwww.google.com%2F"
    "&context.page.title=Winter%20boots%3A%20a%20guide"
    "&context.screen.width=390&context.screen.height=844"
    "&properties.path=%2Fguides%2Fwinter-boots"
    "&properties.url=https%3A%2F%2Fshop.example%2Fguides%2Fwinter-boots"
    "&properties.referrer=https%3A%2F%2Fwww.google.com%2F"
    "&properties.title=Winter%20boots%3A%20a%20guide"
    "&name=Winter+boots+guide"
).encode("ascii")
GOLDEN_RUDDERSTACK_PAGE_EVENT = {
    "channel": "web",
    "integrations": {"All": True},
    "context": {
        "library": {"name": "Rudderstack AMP SDK", "version": "1.0.0"},
        "platform": "AMP",
        "locale": "en-GB",
        "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X)",
        "page": {
            "path": "/guides/winter-boots",
            "url": "https://shop.example/guides/winter-boots",
            "referrer": "https://www.google.com/",
            "title": "Winter boots: a guide",
        },
        "screen": {"width": "390", "height": "844"},  # strings, as rudder-server keeps them
    },
    "anonymousId": "amp-JxT0bS5m4Q2e8nWc1Ld7Vg",
    "properties": {
        "path": "/guides/winter-boots",
        "url": "https://shop.example/guides/winter-boots",
        "referrer": "https://www.google.com/",
        "title": "Winter boots: a guide",
    },
    "name": "Winter boots guide",
    "type": "page",
}

_RS_TRACK = (
    "/pixel/v1/track?writeKey=1uS9ZQ3lWk0cO8y5pNn2RrT7vXa"
    "&context.library.name=Rudderstack+AMP+SDK&context.library.version=1.0.0"
    "&context.platform=AMP&anonymousId=amp-JxT0bS5m4Q2e8nWc1Ld7Vg&context.locale=de-DE"
    "&context.userAgent=Mozilla%2F5.0%20(Linux%3B%20Android%2014)"
    "&context.page.path=%2Fcheckout&context.page.url=https%3A%2F%2Fshop.example%2Fcheckout"
    "&context.page.referrer=&context.page.title=Kasse"
    "&context.screen.width=412&context.screen.height=915"
    "&event=Checkout%20Started&properties.key1=value1&properties.key2=value2"
).encode("ascii")
GOLDEN_RUDDERSTACK_TRACK_EVENT = {
    "channel": "web",
    "integrations": {"All": True},
    "context": {
        "library": {"name": "Rudderstack AMP SDK", "version": "1.0.0"},
        "platform": "AMP",
        "locale": "de-DE",
        "userAgent": "Mozilla/5.0 (Linux; Android 14)",
        "page": {
            "path": "/checkout",
            "url": "https://shop.example/checkout",
            "referrer": "",  # an empty value gives ""
            "title": "Kasse",
        },
        "screen": {"width": "412", "height": "915"},
    },
    "anonymousId": "amp-JxT0bS5m4Q2e8nWc1Ld7Vg",
    "event": "Checkout Started",
    "properties": {"key1": "value1", "key2": "value2"},
    "type": "track",
}


def _golden_rudderstack(expected: dict[str, Any]) -> Callable[[dict[str, Any] | None], None]:
    def check(event: dict[str, Any] | None) -> None:
        assert event is not None
        server_fields(event)
        # rudder-server sets both to its "now", so timestamp = receivedAt.
        assert event["originalTimestamp"] == event["sentAt"] == event["receivedAt"]
        assert event["timestamp"] == event["receivedAt"]
        got = _without(event, "originalTimestamp", "sentAt", "messageId", "receivedAt", "timestamp")
        got["context"] = _context_without_ip(event)
        assert got == expected
        assert list(event)[:4] == ["channel", "integrations", "originalTimestamp", "sentAt"]

    return check


# --- small checks -------------------------------------------------------------------


def _equals(path: str, expected: Any) -> Callable[[dict[str, Any] | None], None]:
    """A check that the value at dot ``path`` (list indexes as digits) is ``expected``."""

    def check(event: dict[str, Any] | None) -> None:
        assert event is not None
        node: Any = event
        for segment in path.split("."):
            node = node[int(segment)] if isinstance(node, list) else node[segment]
        assert node == expected, (path, node)

    return check


def _absent(*names: str) -> Callable[[dict[str, Any] | None], None]:
    def check(event: dict[str, Any] | None) -> None:
        assert event is not None
        for name in names:
            assert name not in event, name

    return check


def _all(*checks: Callable[[dict[str, Any] | None], None]) -> Callable[[Any], None]:
    def check(event: dict[str, Any] | None) -> None:
        for each in checks:
            each(event)

    return check


def _no_event(event: dict[str, Any] | None) -> None:
    assert event is None


def _that(description: str, predicate: Callable[[dict[str, Any]], bool]) -> Callable[[Any], None]:
    """A check that ``predicate(event)`` holds; ``description`` says what it checks."""

    def check(event: dict[str, Any] | None) -> None:
        assert event is not None, description
        assert predicate(event), f"{description}: {event}"

    return check


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_E = {"writeKey": WRITE_KEY, "userId": "u1", "event": "Email Opened"}
_H = {"User-Agent": UA}
_RS = f"/pixel/v1/track?writeKey={WRITE_KEY}&anonymousId=a1&event=Opened"
_RS_PAGE_MIN = f"/pixel/v1/page?writeKey={WRITE_KEY}&anonymousId=a1"


def _deep(levels: int) -> Any:
    event: Any = {"writeKey": WRITE_KEY, "userId": "u1", "event": "E"}
    node = event
    for _ in range(levels - 1):
        node["p"] = {}
        node = node["p"]
    return event


def _c(
    id: str,
    target: bytes | str,
    *,
    method: str = "GET",
    status: int = 200,
    accepted: bool | None = True,
    rules: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    check: Callable[[dict[str, Any] | None], None] | None = None,
    headers: Mapping[str, str] | None = None,
    **config: Any,
) -> Case:
    return Case(
        id=id,
        method=method,
        target=target.encode("ascii") if isinstance(target, str) else target,
        headers=_H if headers is None else headers,
        expect_status=status,
        expect_accepted=accepted,
        expect_rules=frozenset(rules),
        expect_notes=frozenset(notes),
        check=check,
        config=config,
    )


# A standard-alphabet payload whose base64 holds "+": sent raw, form decoding
# turns it into a space.
_PLUS_EVENT = {"writeKey": WRITE_KEY, "userId": "u1", "event": "E", "properties": {"s": ">>>"}}
_PLUS_DATA = segment_data(_PLUS_EVENT, urlsafe=False, padded=True, compact=False)
assert "+" in _PLUS_DATA

CASES: tuple[Case, ...] = (
    # --- Segment: golden and accepted -----------------------------------------------
    _c(
        "segment-golden-seed-example",
        f"/v1/pixel/track?data={SEGMENT_SEED_DATA}",
        # Segment's own example drops the padding: canonical, not worth a note.
        check=_check_golden_segment,
    ),
    _c(
        "segment-standard-padded",
        _seg("track", _E, urlsafe=False, padded=True),
        check=_equals("event", "Email Opened"),
    ),
    _c(
        "segment-padding-percent-encoded",
        _seg("track", _E, urlsafe=False, padded=True)
        .replace(b"=", b"%3D")
        .replace(b"data%3D", b"data="),
        check=_equals("userId", "u1"),
    ),
    _c(
        "segment-identify",
        _seg("identify", {"writeKey": WRITE_KEY, "anonymousId": "a1"}),
    ),
    _c("segment-page", _seg("page", {**_E, "name": "Home"}, padded=True)),
    _c("segment-screen", _seg("screen", {**_E, "name": "Home"}, padded=True)),
    _c(
        "segment-group",
        _seg("group", {**_E, "groupId": "g1"}, padded=True),
        check=_equals("type", "group"),
    ),
    _c(
        "segment-alias",
        _seg("alias", {"writeKey": WRITE_KEY, "userId": "u2", "previousId": "u1"}, padded=True),
    ),
    _c(
        "segment-user-id-number",
        _seg("identify", {"writeKey": WRITE_KEY, "userId": 0}, padded=True),
        check=_equals("userId", 0),
    ),
    _c(
        "segment-spaces-to-plus",
        f"/v1/pixel/track?data={_PLUS_DATA}",
        notes=("spaces_to_plus",),
        check=_equals("properties.s", ">>>"),
    ),
    _c(
        "segment-plus-percent-encoded",
        f"/v1/pixel/track?data={_PLUS_DATA.replace('+', '%2B')}",
        check=_equals("properties.s", ">>>"),
    ),
    _c(
        "segment-raw-json",
        "/v1/pixel/track?data=%7B%22writeKey%22%3A%22wk_2Xq9%22%2C%22userId%22%3A%22u1%22"
        "%2C%22event%22%3A%22Opened%22%7D",
        notes=("raw_json",),
        check=_equals("event", "Opened"),
    ),
    _c(
        "segment-unencoded-form",
        f"/v1/pixel/track?writeKey={WRITE_KEY}&userId=u1&event=Email+Opened"
        "&properties.subject=The%20Electric%20Daily&properties.items.1=b",
        notes=("unencoded_form",),
        check=_all(
            _equals("properties.subject", "The Electric Daily"),
            _equals("properties.items", [None, "b"]),
            _absent("channel", "integrations", "originalTimestamp", "sentAt"),
        ),
    ),
    _c(
        "segment-unencoded-keeps-quotes",
        f"/v1/pixel/page?writeKey={WRITE_KEY}&anonymousId=%22a1%22",
        notes=("unencoded_form",),
        check=_equals("anonymousId", '"a1"'),
    ),
    _c(
        "segment-write-key-from-query",
        _seg("track", {"userId": "u1", "event": "E"}, f"&writeKey={WRITE_KEY}", padded=True),
        notes=("write_key_from_query",),
        check=_absent("writeKey"),
    ),
    _c(
        "segment-write-key-query-ignored",
        _seg("track", _E, "&writeKey=other", padded=True),
        notes=("write_key_query_ignored",),
    ),
    _c(
        "segment-write-key-query-same",
        _seg("track", _E, f"&writeKey={WRITE_KEY}", padded=True),
    ),
    _c(
        "segment-params-ignored",
        _seg("track", _E, "&utm_source=mail&cb=123", padded=True),
        notes=("params_ignored",),
    ),
    _c(
        "segment-duplicate-data",
        _seg("track", _E, "&data=e30", padded=True),
        notes=("duplicate_param",),
        check=_equals("event", "Email Opened"),
    ),
    _c(
        "segment-type-overridden",
        _seg("track", {**_E, "type": "page"}, padded=True),
        notes=("type_overridden",),
        check=_equals("type", "track"),
    ),
    _c(
        "segment-message-id-kept",
        _seg("track", {**_E, "messageId": "m-1"}, padded=True),
        check=_equals("messageId", "m-1"),
    ),
    _c(
        "segment-message-id-generated",
        _seg("track", {**_E, "messageId": "  "}, padded=True),
        notes=("message_id_generated",),
        check=_that("a new messageId", lambda event: bool(event["messageId"].strip())),
    ),
    _c(
        "segment-received-at-overwritten",
        _seg("track", {**_E, "receivedAt": "2000-01-01T00:00:00.000Z"}, padded=True),
        notes=("received_at_overwritten",),
        check=_that("receivedAt is now", lambda event: event["receivedAt"] > "2000-01-02"),
    ),
    _c(
        "segment-timestamp-corrected",
        _seg(
            "track",
            {
                **_E,
                "originalTimestamp": "2024-05-01T11:59:50.000Z",
                "sentAt": "2024-05-01T12:00:00.000Z",
            },
            padded=True,
        ),
        # timestamp = receivedAt - (sentAt - originalTimestamp): the client's clock
        # was 10 s behind when it made the event.
        check=_that(
            "timestamp corrected",
            lambda event: (
                _time(event["receivedAt"]) - _time(event["timestamp"]) == timedelta(seconds=10)
            ),
        ),
    ),
    _c(
        "segment-timestamp-kept",
        _seg("track", {**_E, "timestamp": "2024-05-01T12:00:00Z"}, padded=True),
        check=_equals("timestamp", "2024-05-01T12:00:00Z"),
    ),
    _c(
        "segment-context-kept",
        _seg("track", {**_E, "context": {"ip": "0.0.0.0", "userAgent": "sent"}}, padded=True),
        check=_equals("context", {"ip": "0.0.0.0", "userAgent": "sent"}),
    ),
    _c(
        "segment-no-user-agent",
        _seg("track", _E, padded=True),
        headers={},
        check=_that("no userAgent", lambda event: "userAgent" not in event["context"]),
    ),
    _c(
        "segment-wrong-padding",
        _seg("track", _E, urlsafe=False, padded=False) + b"===",
        notes=("padding_restored",),
        check=_equals("event", "Email Opened"),
    ),
    _c(
        "segment-timestamp-not-a-date",
        _seg("track", {**_E, "timestamp": "not-a-date"}, padded=True),
        notes=("unparsed_time",),
        check=_equals("timestamp", "not-a-date"),
    ),
    # --- Segment: rejected (always 200 with the GIF) ----------------------------------
    _c(
        "segment-bad-base64",
        "/v1/pixel/track?data=eyJ!!!",
        accepted=False,
        rules=("bad_base64",),
        # Nothing was restored: the value could not be decoded at all.
        check=_no_event,
    ),
    _c(
        "segment-bad-base64-length",
        "/v1/pixel/track?data=eyJhI",
        accepted=False,
        rules=("bad_base64",),
        check=_no_event,
    ),
    _c(
        "segment-bad-json",
        "/v1/pixel/track?data=bm90IGpzb24=",
        accepted=False,
        rules=("bad_json",),
        check=_no_event,
    ),
    _c(
        "segment-bad-json-not-utf8",
        "/v1/pixel/track?data=__79",
        accepted=False,
        rules=("bad_json",),
        check=_no_event,
    ),
    _c(
        "segment-bad-json-nan",
        "/v1/pixel/track?data=%7B%22a%22%3ANaN%7D",
        accepted=False,
        rules=("bad_json",),
        notes=("raw_json",),
        check=_no_event,
    ),
    _c(
        "segment-empty-data",
        "/v1/pixel/track?data=",
        accepted=False,
        rules=("bad_json",),
        check=_no_event,
    ),
    _c(
        "segment-not-an-object",
        _seg("track", [_E], padded=True),
        accepted=False,
        rules=("not_an_object",),
        check=_no_event,
    ),
    _c(
        "segment-too-large",
        _seg("track", {**_E, "p": "x" * 33_000}, padded=True),
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    _c(
        "segment-too-deep",
        _seg("track", _deep(33), padded=True),
        accepted=False,
        rules=("too_deep",),
        check=_no_event,
    ),
    _c("segment-deep-at-limit", _seg("track", _deep(32), padded=True)),
    _c(
        "segment-missing-write-key",
        _seg("track", {"userId": "u1", "event": "E"}, padded=True),
        accepted=False,
        rules=("missing_write_key",),
    ),
    _c(
        "segment-unknown-write-key",
        _seg("track", _E, padded=True),
        accepted=False,
        rules=("unknown_write_key",),
        write_keys=frozenset({"another"}),
    ),
    _c(
        "segment-known-write-key", _seg("track", _E, padded=True), write_keys=frozenset({WRITE_KEY})
    ),
    _c(
        "segment-missing-identity",
        _seg("identify", {"writeKey": WRITE_KEY, "userId": " "}, padded=True),
        accepted=False,
        rules=("missing_identity",),
    ),
    _c(
        "segment-missing-event",
        _seg("track", {"writeKey": WRITE_KEY, "userId": "u1"}, padded=True),
        accepted=False,
        rules=("missing_event",),
    ),
    _c(
        "segment-missing-group-id",
        _seg("group", _E, padded=True),
        accepted=False,
        rules=("missing_group_id",),
    ),
    _c(
        "segment-alias-missing-both",
        _seg("alias", {"writeKey": WRITE_KEY, "anonymousId": "a"}, padded=True),
        accepted=False,
        rules=("missing_user_id", "missing_previous_id"),
    ),
    _c(
        "segment-message-id-too-long",
        _seg("track", {**_E, "messageId": "m" * 101}, padded=True),
        accepted=False,
        rules=("message_id_too_long",),
        check=_that("a new messageId", lambda event: len(event["messageId"]) <= 100),
    ),
    _c(
        "segment-invalid-fields",
        _seg(
            "track",
            {**_E, "properties": "x", "context": [1], "event": 5, "userId": True, "timestamp": 0},
            padded=True,
        ),
        accepted=False,
        rules=("invalid_field", "missing_identity"),
        check=_equals("context", [1]),  # never added to: not an object
    ),
    _c(
        "segment-write-key-not-a-string",
        _seg("track", {**_E, "writeKey": 5}, padded=True),
        accepted=False,
        rules=("invalid_field", "missing_write_key"),
    ),
    _c(
        "segment-lone-surrogate",
        "/v1/pixel/track?data=%7B%22writeKey%22%3A%22wk%22%2C%22userId%22%3A%22%5Cud800%22"
        "%2C%22event%22%3A%22E%22%7D",
        notes=("raw_json", "invalid_utf8"),
        check=_equals("userId", "\ufffd"),
    ),
    _c(
        "segment-unencoded-invalid-utf8",
        f"/v1/pixel/track?writeKey={WRITE_KEY}&userId=u%FF1&event=E",
        notes=("unencoded_form", "invalid_utf8"),
        check=_equals("userId", "u\ufffd1"),
    ),
    _c(
        "segment-too-large-query",
        "/v1/pixel/track?data=" + "A" * 70_000,
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    _c(
        "segment-too-many-params",
        "/v1/pixel/track?" + "&".join(["a=1"] * 1001),
        accepted=False,
        rules=("too_many_params",),
        check=_no_event,
    ),
    _c("segment-head", _seg("track", _E, padded=True), method="HEAD", accepted=None),
    _c(
        "segment-head-rejected",
        "/v1/pixel/track?data=!",
        method="HEAD",
        accepted=None,
        rules=("bad_base64",),
    ),
    _c("segment-post", "/v1/pixel/track", method="POST", status=405, accepted=None),
    _c("segment-options", "/v1/pixel/page", method="OPTIONS", status=405, accepted=None),
    # --- RudderStack: golden and accepted ---------------------------------------------
    _c(
        "rudderstack-golden-page",
        _RS_PAGE,
        check=_golden_rudderstack(GOLDEN_RUDDERSTACK_PAGE_EVENT),
    ),
    _c(
        "rudderstack-golden-track",
        _RS_TRACK,
        check=_golden_rudderstack(GOLDEN_RUDDERSTACK_TRACK_EVENT),
    ),
    _c("rudderstack-user-id-only", f"/pixel/v1/page?writeKey={WRITE_KEY}&userId=u1"),
    _c(
        "rudderstack-quotes-stripped",
        f"/pixel/v1/page?writeKey={WRITE_KEY}&anonymousId=%22a1%22",
        notes=("quotes_stripped",),
        check=_equals("anonymousId", "a1"),
    ),
    _c(
        "rudderstack-one-pair-of-quotes",
        f"/pixel/v1/page?writeKey={WRITE_KEY}&anonymousId=%22%22a%22%22",
        notes=("quotes_stripped",),
        check=_equals("anonymousId", '"a"'),
    ),
    _c(
        "rudderstack-duplicate-param",
        f"{_RS}&event=Second&writeKey=other",
        notes=("duplicate_param",),
        check=_equals("event", "Opened"),
    ),
    _c(
        "rudderstack-empty-keys-dropped",
        f"{_RS}&=x&properties..a=1&.b=2&c.=3",
        notes=("empty_key_dropped",),
        check=_absent("", "c"),
    ),
    _c(
        "rudderstack-array",
        f"{_RS}&properties.items.2=c&properties.items.0=a",
        check=_equals("properties.items", ["a", None, "c"]),
    ),
    _c(
        "rudderstack-array-of-objects",
        f"{_RS}&properties.items.1.sku=s1",
        check=_equals("properties.items", [None, {"sku": "s1"}]),
    ),
    _c("rudderstack-numeric-top-level-key", f"{_RS}&7=seven", check=_equals("7", "seven")),
    _c(
        "rudderstack-numeric-key-in-object",
        f"{_RS}&properties.a=1&properties.2=x",
        check=_equals("properties", {"a": "1", "2": "x"}),
    ),
    _c(
        "rudderstack-values-stay-strings",
        f"{_RS}&properties.n=1920&properties.b=true&x=",
        check=_all(_equals("properties", {"n": "1920", "b": "true"}), _equals("x", "")),
    ),
    _c(
        "rudderstack-conflict-container-over-scalar",
        f"{_RS}&properties.a=1&properties.a.b=2",
        notes=("conflicting_param",),
        check=_equals("properties", {"a": "1"}),
    ),
    _c(
        "rudderstack-conflict-scalar-over-container",
        f"{_RS}&properties.a.b=2&properties.a=1",
        notes=("conflicting_param",),
        check=_equals("properties", {"a": {"b": "2"}}),
    ),
    _c(
        "rudderstack-conflict-key-over-array",
        f"{_RS}&properties.items.0=a&properties.items.x=b",
        notes=("conflicting_param",),
        check=_equals("properties.items", ["a"]),
    ),
    _c(
        "rudderstack-conflict-same-index",
        f"{_RS}&p.a.1=x&p.a.01=y",
        notes=("conflicting_param",),
        check=_equals("p.a", [None, "x"]),
    ),
    _c(
        "rudderstack-conflict-makes-invalid-field",
        f"{_RS}&properties=x&properties.a=1",
        accepted=False,
        status=400,
        rules=("invalid_field",),
        notes=("conflicting_param",),
        check=_equals("properties", "x"),
    ),
    _c(
        "rudderstack-type-overridden",
        f"{_RS}&type=identify",
        notes=("type_overridden",),
        check=_equals("type", "track"),
    ),
    _c("rudderstack-type-same", f"{_RS}&type=track", check=_equals("type", "track")),
    _c(
        "rudderstack-unknown-page-name",
        f"{_RS_PAGE_MIN}&name=",
        notes=("unknown_page_name",),
        check=_equals("name", "Unknown Page"),
    ),
    _c("rudderstack-absent-page-name", _RS_PAGE_MIN, check=_absent("name")),
    _c(
        "rudderstack-server-defaults-overridden",
        f"{_RS}&channel=email&integrations.Braze=false&integrations.All=false",
        check=_all(
            _equals("channel", "email"), _equals("integrations", {"All": "false", "Braze": "false"})
        ),
    ),
    _c("rudderstack-message-id-kept", f"{_RS}&messageId=m-1", check=_equals("messageId", "m-1")),
    _c("rudderstack-message-id-blank", f"{_RS}&messageId=%20", notes=("message_id_generated",)),
    _c(
        "rudderstack-received-at-overwritten",
        f"{_RS}&receivedAt=x",
        notes=("received_at_overwritten",),
    ),
    _c(
        "rudderstack-user-agent-param-kept",
        f"{_RS}&context.userAgent=amp",
        check=_equals("context.userAgent", "amp"),
    ),
    _c(
        "rudderstack-invalid-utf8",
        f"{_RS}&properties.k%FF=v%FE",
        notes=("invalid_utf8",),
        check=_equals("properties", {"k\ufffd": "v\ufffd"}),
    ),
    _c(
        "rudderstack-gif-response",
        f"/pixel/v1/track?writeKey={WRITE_KEY}&anonymousId=a",
        accepted=False,
        rules=("missing_event",),
        rudderstack_response="gif",
    ),
    _c("rudderstack-gif-response-accepted", _RS, rudderstack_response="gif"),
    # --- RudderStack: rejected (400 with the messages) --------------------------------
    _c(
        "rudderstack-missing-write-key",
        "/pixel/v1/track?anonymousId=a1&event=E",
        status=400,
        accepted=False,
        rules=("missing_write_key",),
    ),
    _c(
        "rudderstack-blank-write-key",
        "/pixel/v1/track?writeKey=&anonymousId=a1&event=E",
        status=400,
        accepted=False,
        rules=("missing_write_key",),
    ),
    _c(
        "rudderstack-unknown-write-key",
        _RS,
        status=400,
        accepted=False,
        rules=("unknown_write_key",),
        write_keys=frozenset({"another"}),
    ),
    _c(
        "rudderstack-missing-identity",
        f"/pixel/v1/page?writeKey={WRITE_KEY}&anonymousId=%20&userId=",
        status=400,
        accepted=False,
        rules=("missing_identity",),
    ),
    _c(
        "rudderstack-empty-event",
        f"/pixel/v1/track?writeKey={WRITE_KEY}&anonymousId=a&event=",
        status=400,
        accepted=False,
        rules=("missing_event",),
    ),
    _c(
        "rudderstack-absent-event",
        f"/pixel/v1/track?writeKey={WRITE_KEY}&anonymousId=a",
        status=400,
        accepted=False,
        rules=("missing_event",),
    ),
    _c(
        "rudderstack-message-id-too-long",
        f"{_RS}&messageId={'m' * 101}",
        status=400,
        accepted=False,
        rules=("message_id_too_long",),
    ),
    _c(
        "rudderstack-too-deep",
        f"{_RS}&" + ".".join(["a"] * 33) + "=x",
        status=400,
        accepted=False,
        rules=("too_deep",),
        check=_no_event,
    ),
    _c("rudderstack-deep-at-limit", f"{_RS}&" + ".".join(["a"] * 32) + "=x"),
    _c(
        "rudderstack-huge-index",
        f"{_RS}&properties.items.1000000000=x",
        status=400,
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    _c(
        "rudderstack-index-at-limit",
        f"{_RS}&properties.items.999=x",
        check=_that("1000 slots", lambda event: len(event["properties"]["items"]) == 1000),
    ),
    _c(
        "rudderstack-arrays-past-budget",
        f"{_RS}&a.b.999=x&c.d.1=y",
        status=400,
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    _c(
        "rudderstack-too-large-event",
        f"{_RS}&p={'x' * 33_000}",
        status=400,
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    _c(
        "rudderstack-too-many-params",
        "/pixel/v1/page?" + "&".join(["a=1"] * 1001),
        status=400,
        accepted=False,
        rules=("too_many_params",),
        check=_no_event,
    ),
    _c("rudderstack-head", _RS, method="HEAD", accepted=None),
    _c(
        "rudderstack-head-rejected",
        "/pixel/v1/track",
        method="HEAD",
        status=400,
        accepted=None,
        rules=("missing_write_key", "missing_identity", "missing_event"),
    ),
    _c("rudderstack-post", "/pixel/v1/page", method="POST", status=405, accepted=None),
    # --- both: the client address ----------------------------------------------------
    _c(
        "xff-ignored-by-default",
        _RS,
        headers={**_H, "X-Forwarded-For": "198.51.100.1"},
        check=_that("the peer", lambda event: event["context"]["ip"] != "198.51.100.1"),
    ),
    _c(
        "xff-one-trusted-proxy",
        _RS,
        headers={**_H, "X-Forwarded-For": "198.51.100.1, 203.0.113.5"},
        check=_equals("context.ip", "203.0.113.5"),
        trusted_proxies=1,
    ),
    _c(
        "xff-two-trusted-proxies",
        _RS,
        headers={**_H, "X-Forwarded-For": "198.51.100.1, 203.0.113.5,203.0.113.6"},
        check=_equals("context.ip", "203.0.113.5"),
        trusted_proxies=2,
    ),
    _c(
        "xff-too-short-falls-back",
        _RS,
        headers={**_H, "X-Forwarded-For": "198.51.100.1"},
        check=_that("the peer", lambda event: event["context"]["ip"] != "198.51.100.1"),
        trusted_proxies=2,
    ),
    # --- raw bytes >= 0x80 in the query: UTF-8 as browsers send it, and not ----------
    # (a front end that read WSGI's latin-1 query text as UTF-8 would record "CafÃ©")
    _c(
        "segment-raw-utf8-unencoded",
        f"/v1/pixel/track?writeKey={WRITE_KEY}&userId=u1&event=Caf\u00e9+\u2615".encode(),
        notes=("unencoded_form",),
        check=_equals("event", "Caf\u00e9 \u2615"),
    ),
    _c(
        "segment-raw-utf8-json",
        b"/v1/pixel/track?data="
        + _ascii_quoted(
            '{"writeKey":"wk_2Xq9","userId":"\u00fc1","event":"Caf\u00e9",'
            '"properties":{"n":"\U0001f600"}}'
        ),
        notes=("raw_json",),
        check=_all(
            _equals("event", "Caf\u00e9"),
            _equals("userId", "\u00fc1"),
            _equals("properties.n", "\U0001f600"),
        ),
    ),
    _c(
        "segment-raw-invalid-utf8",
        b"/v1/pixel/track?writeKey=wk_2Xq9&userId=u1&event=Caf\xe9",
        notes=("unencoded_form", "invalid_utf8"),
        check=_equals("event", "Caf\ufffd"),
    ),
    _c(
        "rudderstack-raw-utf8",
        f"{_RS}&properties.name=Caf\u00e9&properties.\u00e9t\u00e9=\u2615".encode(),
        check=_equals("properties", {"name": "Caf\u00e9", "\u00e9t\u00e9": "\u2615"}),
    ),
    _c(
        "rudderstack-raw-invalid-utf8",
        _RS.encode() + b"&properties.name=Caf\xe9\xff",
        notes=("invalid_utf8",),
        check=_equals("properties.name", "Caf\ufffd\ufffd"),
    ),
    # --- headers the record keeps, and their cap ---------------------------------------
    _c(
        "segment-referer-kept",
        _seg("track", _E, padded=True),
        headers={**_H, "Referer": "https://mail.example/inbox?id=7"},
        check=_absent("referer", "referrer"),  # in record["request"], not in the event
    ),
    _c(
        "segment-long-user-agent-cut",
        _seg("track", _E, padded=True),
        headers={"User-Agent": "M" * 1024 + "ozilla", "Referer": "r" * 2000},
        notes=("header_truncated",),
        check=_equals("context.userAgent", "M" * 1024),
    ),
    _c(
        "rudderstack-user-agent-at-cap",
        _RS,
        headers={"User-Agent": "U" * 1024},
        check=_equals("context.userAgent", "U" * 1024),
    ),
    _c(
        "segment-too-large-once-enriched",
        # data decodes to 31,900 bytes (under max_event_bytes); the User-Agent,
        # address and ids the server adds take the stored event over 32,000.
        _seg(
            "track",
            {**_E, "p": "x" * (31_900 - len(json.dumps({**_E, "p": ""}, separators=(",", ":"))))},
            padded=True,
        ),
        headers={"User-Agent": "U" * 1024},
        accepted=False,
        rules=("too_large",),
        check=_no_event,
    ),
    # --- prefix and dialect selection ------------------------------------------------
    _c("prefixed-segment", b"/collect" + _seg("track", _E, padded=True), prefix="/collect"),
    _c("prefixed-rudderstack", "/collect" + _RS, prefix="/collect"),
)

# Cases for options that only the core has so far (the front ends' own
# options come later): tests/test_core.py runs them as it runs CASES.
CORE_ONLY_CASES: tuple[Case, ...] = (
    _c(
        "segment-unknown-call-rejected",
        _seg("trak", _E, padded=True),
        accepted=False,
        rules=("unknown_call",),
        check=_no_event,
        unknown_calls="reject",
    ),
    _c(
        "rudderstack-unknown-call-rejected",
        f"/pixel/v1/identify?writeKey={WRITE_KEY}&anonymousId=a1",
        status=400,
        accepted=False,
        rules=("unknown_call",),
        check=_no_event,
        unknown_calls="reject",
    ),
    _c(
        "rudderstack-unknown-call-gif",
        "/pixel/v1/pageview",
        accepted=False,
        rules=("unknown_call",),
        check=_no_event,
        unknown_calls="reject",
        rudderstack_response="gif",
    ),
    _c(
        "segment-unknown-call-head",
        "/v1/pixel/",
        method="HEAD",
        accepted=None,
        rules=("unknown_call",),
        unknown_calls="reject",
    ),
    _c(
        "segment-unknown-call-post",
        "/v1/pixel/trak",
        method="POST",
        status=405,
        accepted=None,
        unknown_calls="reject",
    ),
    _c("segment-known-call-with-reject", _seg("track", _E, padded=True), unknown_calls="reject"),
)

# Targets that are no pixel route (with the default config): the app answers them.
NOT_PIXELS: tuple[bytes, ...] = (
    b"/",
    b"/v1/pixel",
    b"/v1/pixel/",
    b"/v1/pixel/unknown?data=e30",
    b"/v1/pixel/track/",
    b"/v1/pixel/Track",
    b"/v1/pixel/track.gif",
    b"/pixel/v1/identify",
    b"/pixel/v1/screen",
    b"/V1/pixel/track",
    b"/collect/v1/pixel/track",
    b"/v1/batch/",
)


# --- bodies: Segment's HTTP Tracking API, RudderStack's HTTP API and beacon --------------


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode("ascii")


def _body(
    id: str,
    target: str,
    body: bytes,
    calls: tuple[str, ...],
    *,
    status: int = 200,
    accepted: bool = True,
    rules: tuple[str, ...] = (),
    notes: tuple[str, ...] = (),
    check: Callable[[dict[str, Any] | None], None] | None = None,
    headers: Mapping[str, str] | None = None,
    **config: Any,
) -> Case:
    return Case(
        id=id,
        method="POST",
        target=target.encode("ascii"),
        headers={"User-Agent": UA, "Content-Type": "application/json", **(headers or {})},
        expect_status=status,
        expect_accepted=accepted,
        expect_rules=frozenset(rules),
        expect_notes=frozenset(notes),
        check=check,
        config=config,
        body=body,
        expect_calls=calls,
    )


# The example of Segment's HTTP Tracking API document (track), with a write key.
_API_TRACK = {
    "userId": "019mr8mf4r",
    "event": "Item Purchased",
    "properties": {"name": "Leap to the Sky", "revenue": 14.99},
    "context": {"ip": "24.5.68.47"},
    "timestamp": "2012-12-02T00:30:12.984Z",
}
_BATCH = {
    "batch": [
        {"type": "identify", "userId": "u1", "traits": {"email": "a@example.com"}},
        # Its own sentAt is kept over the batch's, and noted: it is not a time.
        {"type": "track", "userId": "u1", "event": "Signed Up", "sentAt": "x"},
        {"type": "page", "anonymousId": "a1", "name": "Home"},
    ],
    "sentAt": "2024-05-01T12:00:10.000Z",
    "context": {"library": {"name": "analytics-python", "version": "2.3.2"}},
    "writeKey": WRITE_KEY,
}
_BEACON_BATCH = {
    "batch": [
        {"type": "page", "anonymousId": "a1", "name": "Home", "channel": "web"},
        {"type": "track", "anonymousId": "a1", "event": "Clicked"},
    ]
}

BODY_CASES: tuple[Case, ...] = (
    _body(
        "segment-api-track-golden",
        "/v1/track",
        _json({**_API_TRACK, "writeKey": WRITE_KEY}),
        ("track",),
        check=_all(
            _equals("properties.revenue", 14.99),
            _equals("context.ip", "24.5.68.47"),  # the event's own address wins
            _equals("timestamp", "2012-12-02T00:30:12.984Z"),
            _absent("writeKey"),
        ),
    ),
    _body(
        "segment-api-basic-auth",
        "/v1/identify",
        _json({"userId": "u1", "traits": {"plan": "pro"}}),
        ("identify",),
        headers={"Authorization": _basic(WRITE_KEY)},
        check=_equals("traits.plan", "pro"),
    ),
    _body(
        "segment-api-batch",
        "/v1/batch",
        _json(_BATCH),
        ("identify", "track", "page"),
        notes=("unparsed_time",),
        check=_all(
            _equals("sentAt", "2024-05-01T12:00:10.000Z"),
            _equals("context.library.name", "analytics-python"),
        ),
    ),
    _body(
        "segment-api-short-track-text-plain",
        "/v1/t",
        _json({"anonymousId": "a1", "event": "Clicked", "writeKey": WRITE_KEY}),
        ("track",),
        headers={"Content-Type": "text/plain"},
        check=_equals("type", "track"),
    ),
    _body(
        "segment-api-short-batch",
        "/v1/b",
        _json(_BATCH),
        ("identify", "track", "page"),
        notes=("unparsed_time",),
    ),
    _body(
        "segment-api-gzip",
        "/v1/batch",
        gzip.compress(_json(_BATCH)),
        ("identify", "track", "page"),
        notes=("unparsed_time",),
        headers={"Content-Encoding": "gzip"},
    ),
    _body(
        "segment-api-missing-write-key",
        "/v1/page",
        _json({"anonymousId": "a1"}),
        ("page",),
        accepted=False,
        rules=("missing_write_key",),
    ),
    _body(
        "segment-api-batch-unknown-type",
        "/v1/batch",
        _json({"writeKey": WRITE_KEY, "batch": [{"type": "pageview"}, {"type": "page"}]}),
        ("pageview", "page"),
        accepted=False,
        rules=("unknown_type", "missing_identity"),
        check=_no_event,
    ),
    _body(
        "segment-api-bad-json",
        "/v1/track",
        b'{"userId": "u1",',
        ("track",),
        status=400,
        accepted=False,
        rules=("bad_json",),
        check=_no_event,
    ),
    _body(
        "segment-api-array-body",
        "/v1/track",
        b"[]",
        ("track",),
        status=400,
        accepted=False,
        rules=("not_an_object",),
    ),
    _body(
        "segment-api-batch-not-a-list",
        "/v1/batch",
        _json({"batch": {"type": "track"}}),
        ("batch",),
        status=400,
        accepted=False,
        rules=("bad_batch",),
    ),
    _body(
        "segment-api-too-many-events",
        "/v1/batch",
        _json({"writeKey": WRITE_KEY, "batch": [{"type": "page", "userId": "u"}] * 2_501}),
        ("batch",),
        status=400,
        accepted=False,
        rules=("too_many_events",),
    ),
    _body(
        "segment-api-bad-gzip",
        "/v1/track",
        gzip.compress(_json({"userId": "u1"}))[:-6],
        ("track",),
        status=400,
        accepted=False,
        rules=("bad_gzip",),
        headers={"Content-Encoding": "gzip"},
    ),
    _body(
        "segment-api-gzip-bomb",
        # 600 KB of JSON whitespace in about 600 bytes: stopped at 500 KB.
        "/v1/track",
        gzip.compress(b"{" + b" " * 600_000 + b"}"),
        ("track",),
        status=400,
        accepted=False,
        rules=("too_large",),
        headers={"Content-Encoding": "gzip"},
    ),
    _body(
        "segment-api-brotli",
        "/v1/track",
        b"\x1b\x00",
        ("track",),
        status=400,
        accepted=False,
        rules=("unsupported_encoding",),
        headers={"Content-Encoding": "br"},
    ),
    _body(
        "segment-api-body-too-large",
        "/v1/track",
        _json({"writeKey": WRITE_KEY, "userId": "u", "p": "x" * 500 * 1024}),
        ("track",),
        status=400,
        accepted=False,
        rules=("too_large",),
    ),
    _body(
        "segment-api-event-over-32kb",
        "/v1/track",
        _json({"writeKey": WRITE_KEY, "userId": "u", "event": "E", "p": "x" * 32_000}),
        ("track",),
        status=400,
        accepted=False,
        rules=("too_large",),
    ),
    _body(
        "rudderstack-beacon-batch",
        f"/beacon/v1/batch?writeKey={WRITE_KEY}",
        _json(_BEACON_BATCH),
        ("page", "track"),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        check=_equals("channel", "web"),
    ),
    _body(
        "rudderstack-beacon-bad-json",
        f"/beacon/v1/batch?writeKey={WRITE_KEY}",
        b"batch",
        ("batch",),
        status=400,
        accepted=False,
        rules=("bad_json",),
    ),
    _body(
        "rudderstack-api-track",
        "/v1/track",
        _json({"anonymousId": "a1", "event": "Clicked"}),
        ("track",),
        headers={"Authorization": _basic(WRITE_KEY)},
        dialects=frozenset({"rudderstack"}),
    ),
)
