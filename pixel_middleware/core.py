"""The decoding core: raw pixel request in, plain record and HTTP answer out.

Pure: no I/O, no clock, no randomness of its own (the caller passes ``now`` and
may pass ``new_id``), and nothing beyond the standard library, so that the WSGI
middleware and the mitmproxy addon (which may run inside a mitmproxy that cannot
import werkzeug) decode the same request into the same record.

Specification: Segment's and RudderStack's Pixel API documents, plus what the
reference systems do beyond them (see docs/dialects.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

__all__ = [
    "ALLOWED_METHODS",
    "CALLS",
    "DIALECTS",
    "GIF",
    "Limits",
    "PixelConfig",
    "PixelOutcome",
    "PixelRecord",
    "PixelRequest",
    "Route",
    "decode_pixel",
    "match_route",
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


class Problem(TypedDict):
    rule: str
    message: str


class RequestInfo(TypedDict):
    method: str
    path: str
    query: str
    ip: str | None
    userAgent: str | None


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Bounds on what one pixel may cost; past any of them it is rejected."""

    max_query_bytes: int = 64 * 1024
    max_event_bytes: int = 32_000  # Segment's per-event limit
    max_depth: int = 32
    max_params: int = 1_000


@dataclass(frozen=True, kw_only=True, slots=True)
class PixelConfig:
    """How pixels are recognised, checked and answered.

    Invalid values raise ``ValueError`` here, at construction.
    """

    prefix: str = ""
    dialects: frozenset[Dialect] = frozenset(DIALECTS)
    write_keys: frozenset[str] | None = None
    trusted_proxies: int = 0
    limits: Limits = field(default_factory=Limits)
    rudderstack_response: Literal["seed", "gif"] = "seed"


@dataclass(frozen=True, slots=True)
class PixelRequest:
    """What the core needs of an HTTP request; ``query`` is the raw query bytes."""

    method: str
    path: str
    query: bytes
    peer: str | None = None
    user_agent: str | None = None
    forwarded_for: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    dialect: Dialect
    call: str


@dataclass(frozen=True, slots=True)
class PixelOutcome:
    """The answer to send and the record to keep (``None``: keep nothing)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    record: PixelRecord | None


def split_target(target: bytes) -> tuple[str, bytes]:
    """Split a raw request target into (path as a WSGI server gives it, raw query)."""
    raise NotImplementedError


def match_route(path: str, config: PixelConfig) -> Route | None:
    """The pixel route ``path`` names, or ``None``; cheap enough for every request."""
    raise NotImplementedError


def decode_pixel(
    request: PixelRequest,
    *,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> PixelOutcome | None:
    """Decode one request; ``None`` when its path is not a pixel route."""
    raise NotImplementedError
