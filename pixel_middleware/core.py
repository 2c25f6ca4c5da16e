"""The decoding core: raw pixel request in, plain records and HTTP answer out.

Pure: no I/O and no clock (the caller passes ``now``), and nothing beyond the
standard library, so that the WSGI middleware and the mitmproxy addon (which may
run inside a mitmproxy that cannot import werkzeug) decode the same request into
the same record. The one source of randomness is the default ``new_id``, which
makes UUID4 record ids and messageIds from ``os.urandom``; pass your own
``new_id`` for fully deterministic records.

This module holds what is the same for every dialect: the configuration, route
matching and the dispatch to the dialect that owns a route. Each dialect (its
routes, decoding, checks and answer) is one module of
:mod:`pixel_middleware.dialects`; the record, limits, notes and enrichment they
share live in :mod:`pixel_middleware.dialects.base` and are re-exported here.

Specification: Segment's and RudderStack's Pixel API and HTTP API documents,
plus what the reference systems do beyond them (see docs/dialects.md, which
lists every rule and note id used here).

Usage::

    outcome = decode_pixel(
        PixelRequest("GET", "/v1/pixel/track", b"data=eyJ3cml0ZUtleSI6..."),
        config=PixelConfig(),
        now=datetime.now(timezone.utc),
    )
    if outcome is None:
        ...  # not a pixel route: hand the request to the application
    else:
        ...  # send outcome.status/headers/body; store outcome.records

Bad request data never raises here: it becomes a rejected record with problems.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import unquote_to_bytes

from pixel_middleware.dialects import DIALECTS as _REGISTRY
from pixel_middleware.dialects.base import (
    _405_BODY,
    _405_HEADERS,
    _NO_CACHE,
    ALLOWED_METHODS,
    GIF,
    NOTES,
    RULES,
    DialectName,
    Limits,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    Problem,
    RequestInfo,
    Route,
    _uuid4,
)

__all__ = [
    "ALLOWED_METHODS",
    "CALLS",
    "DEFAULT_DIALECTS",
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

#: A dialect's name (kept under this name for the front ends that import it).
Dialect = DialectName
#: The dialects' names, in the order their routes are matched.
DIALECTS: tuple[Dialect, ...] = tuple(_REGISTRY)
#: The dialects that answer unless told otherwise: third-party ones (GA4,
#: Meta, ...) are decoded where enabled, never answered in a vendor's name by default.
DEFAULT_DIALECTS: tuple[Dialect, ...] = ("segment", "rudderstack")
#: Each dialect's pixel calls (``/v1/pixel/<call>``).
CALLS: dict[Dialect, tuple[str, ...]] = {name: d.calls for name, d in _REGISTRY.items()}

# Custom routes: exact (host or None, path) -> (pixel route, body route or
# None); roots as (host or None, root, dialect), tried in order.
_CustomRoutes = tuple[
    dict[tuple[str | None, str], tuple[Route, Route | None]],
    tuple[tuple[str | None, str, str], ...],
]


# Third-party dialects' routes: exact path -> [(dialect, call, hosts or None)],
# and roots as (root, dialect, hosts or None).
_VendorRoutes = tuple[
    dict[str, list[tuple[str, str, frozenset[str] | None]]],
    tuple[tuple[str, str, frozenset[str] | None], ...],
]


@dataclass(frozen=True, kw_only=True, slots=True)
class PixelConfig:
    """How pixels are recognised, checked and answered.

    - ``prefix``: mount point of the pixel routes, ``""`` or like ``"/collect"``.
    - ``dialects``: which route families answer (``"segment"``, ``"rudderstack"``,
      the default; third-party ones such as ``"ga4"`` only when named).
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
    - ``custom_paths``: custom routes, ``{"/t.gif": "segment:track"}``: a path, or a
      host and path (``"px.example.com/t.gif"``), mapped to a dialect and call.
      A path ending in ``/`` maps a root: the call is the rest of the path
      (``{"/collect/": "segment"}`` makes ``/collect/track``). GET answers as
      the dialect's pixel, POST reads the body as its HTTP API (the call may be
      ``batch``). Custom routes are taken as written, without ``prefix``, and
      work whether or not their dialect is in ``dialects``.

    Invalid values raise ``ValueError`` here, at construction.
    """

    prefix: str = ""
    dialects: frozenset[Dialect] = frozenset(DEFAULT_DIALECTS)
    write_keys: frozenset[str] | None = None
    trusted_proxies: int = 0
    limits: Limits = field(default_factory=Limits)
    rudderstack_response: Literal["seed", "gif"] = "seed"
    unknown_calls: Literal["pass", "reject"] = "pass"
    custom_paths: Mapping[str, str] | None = None
    # Precomputed in __post_init__ so that match_route costs one startswith.
    _routes: dict[str, Route] = field(init=False, repr=False, compare=False, hash=False)
    _route_roots: tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)
    _root_dialects: tuple[tuple[str, Dialect], ...] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _body_routes: dict[str, Route] = field(init=False, repr=False, compare=False, hash=False)
    _custom: _CustomRoutes = field(init=False, repr=False, compare=False, hash=False)
    _vendor: _VendorRoutes = field(init=False, repr=False, compare=False, hash=False)

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
        body_routes: dict[str, Route] = {}
        roots: list[tuple[str, Dialect]] = []
        for name, dialect in _REGISTRY.items():
            if name in dialects:
                root = prefix + dialect.pixel_root
                roots.append((root, name))
                for call in dialect.calls:
                    routes[root + call] = Route(name, call)
                for path, call in dialect.body_routes.items():
                    # The first dialect enabled owns a path two dialects share.
                    body_routes.setdefault(prefix + path, Route(name, call, body=True))
        object.__setattr__(self, "_routes", routes)
        object.__setattr__(self, "_body_routes", body_routes)
        object.__setattr__(self, "_vendor", _vendor_routes(prefix, dialects))
        object.__setattr__(self, "_custom", _custom_routes(self.custom_paths))
        if self.custom_paths is not None:
            # Hashable, like the rest of the config, and a copy the caller cannot change.
            object.__setattr__(self, "custom_paths", _FrozenPaths(self.custom_paths))
        object.__setattr__(self, "_route_roots", tuple(root for root, _ in roots))
        object.__setattr__(self, "_root_dialects", tuple(roots))


def _vendor_routes(prefix: str, dialects: frozenset[Dialect]) -> _VendorRoutes:
    """The third-party dialects' paths: exact ones, then roots, each with its hosts."""
    exact: dict[str, list[tuple[str, str, frozenset[str] | None]]] = {}
    roots: list[tuple[str, str, frozenset[str] | None]] = []
    for name, dialect in _REGISTRY.items():
        if name not in dialects:
            continue
        for path, call in dialect.paths.items():
            # /batch is PostHog's on its hosts and Universal Analytics' on Google's.
            exact.setdefault(prefix + path, []).append((name, call, dialect.hosts.get(path)))
        for root in dialect.path_roots:
            roots.append((prefix + root, name, dialect.hosts.get(root)))
    return exact, tuple(roots)


def _host_matches(host: str | None, hosts: frozenset[str] | None) -> bool:
    if hosts is None:
        return True
    name = _host_name(host)
    if name is None:
        return False
    if name in hosts:
        return True
    # ".posthog.com" matches us.i.posthog.com.
    return any(pattern[0] == "." and name.endswith(pattern) for pattern in hosts)


def _vendor_route(path: str, method: str, host: str | None, config: PixelConfig) -> Route | None:
    exact, roots = config._vendor
    found = exact.get(path)
    if found is not None:
        for name, call, hosts in found:
            if _host_matches(host, hosts):
                return Route(name, call, body=method == "POST")
        return None
    for root, name, hosts in roots:
        if path.startswith(root) and len(path) > len(root) and _host_matches(host, hosts):
            return Route(name, path[len(root) :], body=method == "POST")
    return None


class _FrozenPaths(dict[str, str]):
    """``custom_paths`` as the config keeps it: a dict that hashes by its items."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))


def _body_calls(dialect: str) -> set[str]:
    return set(_REGISTRY[dialect].body_routes.values())


def _custom_routes(routes: Mapping[str, str] | None) -> _CustomRoutes:
    """Check and index ``PixelConfig.custom_paths``; a ``ValueError`` says how to fix it."""
    exact: dict[tuple[str | None, str], tuple[Route, Route | None]] = {}
    roots: list[tuple[str | None, str, str]] = []
    if routes is None:
        return exact, ()
    if isinstance(routes, str) or not isinstance(routes, Mapping):
        raise ValueError(
            f"custom_paths must map paths to dialects, like {{'/t.gif': 'segment:track'}},"
            f" got {routes!r}"
        )
    names = ", ".join(_REGISTRY)
    for where, target in routes.items():
        if not isinstance(where, str) or not isinstance(target, str):
            raise ValueError(f"custom_paths: {where!r}: {target!r} must be strings")
        slash = where.find("/")
        if slash < 0 or " " in where or "?" in where:
            raise ValueError(
                f"custom_paths: {where!r} must be a path (/t.gif) or a host and path "
                f"(px.example.com/t.gif), without a query"
            )
        host = where[:slash].lower() or None
        path = where[slash:]
        dialect, _, call = target.partition(":")
        if dialect not in _REGISTRY:
            raise ValueError(f"custom_paths: {where!r}: {dialect!r} is not a dialect ({names})")
        pixel_calls = _REGISTRY[dialect].calls
        body_calls = _body_calls(dialect)
        if path.endswith("/"):
            if call:
                raise ValueError(
                    f"custom_paths: {where!r} ends with '/', so the call is the rest of the "
                    f"path; map it to {dialect!r} alone, or drop the '/'"
                )
            roots.append((host, path, dialect))
            continue
        if not call:
            raise ValueError(
                f"custom_paths: {where!r}: say the call ({dialect}:{pixel_calls[-1]}), or end "
                f"the path with '/' to take the call from the rest of the path"
            )
        if call not in pixel_calls and call not in body_calls:
            calls = ", ".join(sorted(set(pixel_calls) | body_calls))
            raise ValueError(f"custom_paths: {where!r}: {dialect} has no call {call!r} ({calls})")
        body = Route(dialect, call, body=True) if call in body_calls else None
        exact[(host, path)] = (Route(dialect, call), body)
    return exact, tuple(roots)


def _host_name(host: str | None) -> str | None:
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _custom_route(path: str, method: str, host: str | None, config: PixelConfig) -> Route | None:
    exact, roots = config._custom
    name = _host_name(host) if host else None
    for key in ((name, path), (None, path)) if name else ((None, path),):
        found = exact.get(key)
        if found is not None:
            pixel, body = found
            if method == "POST" and body is not None:
                return body
            return pixel
    for root_host, root, dialect in roots:
        if (root_host is None or root_host == name) and path.startswith(root):
            call = path[len(root) :]
            if method == "POST" and call in _body_calls(dialect):
                return Route(dialect, call, body=True)
            if call in _REGISTRY[dialect].calls:
                return Route(dialect, call)
    return None


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


def match_route(
    path: str, config: PixelConfig, *, method: str = "GET", host: str | None = None
) -> Route | None:
    """The route ``path`` names, or ``None``; cheap enough for every request.

    Exact match only: no trailing slash, case-sensitive, only enabled dialects
    (and the custom ``routes``, matched first, by ``host`` too where given).
    The HTTP API routes (``POST /v1/track``, ...) match only for ``POST``, so
    other requests to those paths stay the application's. With
    ``unknown_calls="reject"``, any other path under a pixel root is a route
    too, whose ``call`` is the rest of the path, not one of :data:`CALLS`:
    :func:`decode_pixel` rejects it.
    """
    if config._custom[0] or config._custom[1]:
        custom = _custom_route(path, method, host, config)
        if custom is not None:
            return custom
    if method == "POST":
        body_route = config._body_routes.get(path)
        if body_route is not None:
            return body_route
    if config._vendor[0] or config._vendor[1]:
        vendor = _vendor_route(path, method, host, config)
        if vendor is not None:
            return vendor
    if not path.startswith(config._route_roots):
        return None
    route = config._routes.get(path)
    if route is None and config.unknown_calls == "reject":
        for root, dialect in config._root_dialects:
            if path.startswith(root):
                return Route(dialect, path[len(root) :])
    return route


def decode_pixel(
    request: PixelRequest,
    *,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str] = _uuid4,
    route: Route | None = None,
) -> PixelOutcome | None:
    """Decode one request; ``None`` when its path is not a route.

    Pixel routes: GET gives the answer and the record. HEAD: the same status and
    headers with an empty body, and no record. Any other method: ``405`` with
    ``Allow: GET, HEAD`` and no record. HTTP API routes (POST): a record for
    each event of the body (``outcome.records``; ``outcome.record`` is the
    first). ``now`` is the time of receipt (a naive datetime is taken as UTC);
    ``new_id`` makes each record id (drawn first) and, when needed, the event's
    messageId. Never raises for any request data.

    ``route``: for a front end that matched the request already (it must know
    whether a request is a pixel), ``match_route(request.path, config,
    method=request.method, host=request.host)``, so that it is not matched twice.
    """
    method = request.method
    if route is None:
        route = match_route(request.path, config, method=method, host=request.host)
        if route is None:
            return None
    dialect = _REGISTRY[route.dialect]
    if (
        dialect.claims is not None
        and not dialect.claims(request, route, config.limits)
        and _custom_route(request.path, method, request.host, config) is None
    ):
        # A common path (/i, /e, /batch) without the vendor's markers: the app's.
        return None
    if route.body:
        records = dialect.decode(request, route, config, now, new_id)
        status, headers, body = dialect.answer(records, route, config)
        return PixelOutcome(status, headers, body, records[0] if records else None, records)
    if method != "GET" and method != "HEAD":
        return PixelOutcome(405, list(_405_HEADERS), _405_BODY, None)
    if method == "GET" and dialect.fast_pixel is not None:
        outcome = dialect.fast_pixel(request, route, config, now, new_id)
        if outcome is not None:
            return outcome
    records = dialect.decode(request, route, config, now, new_id)
    status, headers, body = dialect.answer(records, route, config)
    if method == "HEAD":
        return PixelOutcome(status, headers, b"", None)
    return PixelOutcome(status, headers, body, records[0], records)


def default_answer(route: Route, method: str, config: PixelConfig) -> PixelOutcome:
    """The dialect's answer to an accepted request (``405`` for other methods), no record.

    For front ends that must still answer when :func:`decode_pixel` itself
    failed: the same status, headers and body it gives, from one definition.
    """
    if not route.body and method != "GET" and method != "HEAD":
        return PixelOutcome(405, list(_405_HEADERS), _405_BODY, None)
    status, headers, body = _REGISTRY[route.dialect].accepted_answer(route, config)
    return PixelOutcome(status, headers, b"" if method == "HEAD" else body, None)


# The answer to a pixel whose record could not be kept anywhere (the store and
# the spool both failing): a 503 a client or load balancer can act on.
_RETRY_AFTER_SECONDS = "5"


def not_kept_answer(route: Route, method: str, config: PixelConfig) -> PixelOutcome:
    """``503`` with ``Retry-After`` for a request whose records could not be kept.

    Honest, so that a client or a load balancer can tell and retry, and still
    the dialect's body: Segment's pixel contract is "always the GIF" (a page
    showing the pixel keeps its layout), RudderStack's seed answer a short text.
    """
    content_type, body = _REGISTRY[route.dialect].not_kept(route, config)
    headers = [
        *_NO_CACHE,
        ("Retry-After", _RETRY_AFTER_SECONDS),
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
    ]
    return PixelOutcome(503, headers, b"" if method == "HEAD" else body, None)
