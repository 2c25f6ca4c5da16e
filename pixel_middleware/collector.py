"""The standalone collector: a pixel endpoint plus pages showing what arrived.

``create_app()`` returns a :class:`~pixel_middleware.middleware.PixelMiddleware`
around a small WSGI app that serves:

- ``/``: the live debugger page (``static/index.html`` with its script and
  style sheet under ``/static/``): records appear as they arrive, filtered
  by what the page's URL says, each opened to its decoded event, problems and
  request; a button sends a test pixel;
- ``/api/...`` and ``/debug/<pixel route>``: the JSON API the page reads, also
  for tests and scripts (:mod:`pixel_middleware.api`, ``docs/api.md``);
- ``/events.json``: the latest records as JSON, oldest first, as
  ``{"records": [...], "last": position, "spooled": N, "truncated": bool,
  "omitted": N}`` (``?limit=``, ``?accepted=true|false``, ``?call=``, and
  ``?after=<last>`` to poll for new ones); ``spooled`` counts the records
  waiting in the spool for the store. An answer is at most
  :data:`MAX_JSON_BYTES` (4 MiB): when the records asked for do not fit, it
  holds the oldest that do, says ``"truncated": true``, and ``last`` is the
  position of the last one included, so ``?after=<last>`` goes on from there.
  A record too large for an answer on its own is left out and counted in
  ``omitted`` (``pixel-middleware events --format jsonl`` shows it);
- 404 for anything else. A bad parameter gets a 400 with a fixed message that
  names the parameter, never its value.

Reading records is not public. Pixels are answered for anyone, but every other
path (the pages above and whatever else the pages app serves) shows what
people sent (IP addresses, User-Agents, user ids, write keys), so it is served
only:

- to this machine: a peer address in ``127.0.0.0/8`` or ``::1``, on a request
  that no proxy forwarded (no ``Forwarded``, ``X-Forwarded-For`` or
  ``X-Real-IP`` header: behind a proxy on the same machine every client would
  otherwise look local). ``trusted_proxies`` plays no part here;
- to a request carrying the read token (``read_token=``, else the
  ``PIXEL_READ_TOKEN`` environment variable) as ``Authorization: Bearer TOKEN``
  or ``?token=TOKEN``;
- to anyone, with ``public_reads=True``.

Anyone else gets a 403 saying how to get access.

Run it with ``pixel-middleware serve`` (granian), or under any WSGI server::

    gunicorn 'pixel_middleware.collector:create_app()'   # PIXEL_STORE, PIXEL_READ_TOKEN

The test pixel (``/api/status``) carries the first configured write key (the
key a real page would embed in its own ``<img>`` tags), so do not configure a
key here that you treat as a secret.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pixel_middleware.api import CollectorAPI, RecordSignal
from pixel_middleware.core import (
    CALLS,
    DEFAULT_DIALECTS,
    DIALECTS,
    Limits,
    PixelConfig,
    PixelRecord,
)
from pixel_middleware.middleware import PixelMiddleware
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, StoreError, redacted_error

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "MAX_JSON_BYTES",
    "READ_TOKEN_ENV_VAR",
    "CollectorPages",
    "ReadAccess",
    "check_read_token",
    "create_app",
]

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = Limits()
EXAMPLE_WRITE_KEY = "demo-write-key"
PAGE_RECORDS = 50
MAX_JSON_RECORDS = 1000
#: The most bytes one ``/events.json`` answer holds: a count of records alone
#: does not bound it, since a record may be large.
MAX_JSON_BYTES = 4 * 1024 * 1024
READ_TOKEN_ENV_VAR = "PIXEL_READ_TOKEN"
# Long enough not to be guessed, short enough to cap what a header costs.
MIN_READ_TOKEN_LENGTH = 16
MAX_READ_TOKEN_LENGTH = 256

# The pages show data sent by anyone: the page's script inserts it as text
# only, and the policy allows nothing but this server's own files (no inline
# script or style, no eval, no other origin) in case that is ever missed.
_PAGE_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
]
# The page's own files (package data), by the path they are served at.
_STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/collector.js": ("collector.js", "text/javascript; charset=utf-8"),
    "/static/collector.css": ("collector.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}

# What /events.json says about a bad parameter: fixed text that names the
# parameter and what would work, never the value sent (no answer repeats input).
_ALL_CALLS = sorted({call for dialect in DEFAULT_DIALECTS for call in CALLS[dialect]})
_BAD_PARAMETER = {
    "limit": f"limit must be a whole number from 1 to {MAX_JSON_RECORDS}",
    "accepted": "accepted must be true or false",
    "call": f"call must be one of {', '.join(_ALL_CALLS)}",
    "after": "after must be a position this store gave: the last of an earlier answer",
}
_REPEATED = "each of limit, accepted, call and after may be given once"
_LIMIT = re.compile(r"[0-9]{1,4}")
# Every store's positions fit this (numbers, Redis stream ids); anything else
# is refused before a store sees it.
_POSITION = re.compile(r"[0-9A-Za-z.:\-]{1,64}")
_STORE_DOWN = "could not read the store"

_REFUSED = (
    "Forbidden: the collector's pages show what people sent (IP addresses, user ids,"
    " write keys), so they are served only to this machine. From elsewhere, send the"
    " read token set with `pixel-middleware serve --read-token` or the"
    f" {READ_TOKEN_ENV_VAR} environment variable, as 'Authorization: Bearer TOKEN'"
    " or ?token=TOKEN. Pixels are answered for everyone.\n"
)
# Headers a proxy adds: a loopback peer that sent one is a proxy on this
# machine passing on someone else's request.
_PROXY_HEADERS = ("HTTP_FORWARDED", "HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP")


def create_app(
    *,
    store: str | Store | Recorder | None = None,
    write_keys: Iterable[str] | None = None,
    prefix: str = "",
    dialects: Iterable[str] = DEFAULT_DIALECTS,
    trusted_proxies: int = 0,
    limits: Limits = _DEFAULT_LIMITS,
    rudderstack_response: Literal["seed", "gif"] = "seed",
    routes: Mapping[str, str] | None = None,
    durable: bool = True,
    on_record: Callable[[PixelRecord], None] | None = None,
    read_token: str | None = None,
    public_reads: bool = False,
    allow_reset: bool = False,
) -> PixelMiddleware:
    """The collector WSGI app; options as for :class:`PixelMiddleware`, and:

    :param read_token: Lets a request from another machine read records (see
        the module docs); ``None`` reads ``PIXEL_READ_TOKEN``, else there is none
        and only this machine reads them. At least 16 characters.
    :param public_reads: ``True`` serves the pages that read records to anyone.

    ``store=None`` reads ``PIXEL_STORE``, else ``sqlite:///pixel-events.sqlite3``.
    ``allow_reset``: ``POST /api/reset`` may clear a store other than
    ``memory://`` (which it always may). Call ``.close()`` on the result at
    shutdown to flush what is queued.
    """
    # Checked before the store is opened: a bad option creates nothing.
    if read_token is None and not public_reads:
        read_token = os.environ.get(READ_TOKEN_ENV_VAR) or None
    if read_token is not None:
        check_read_token(read_token)
    if not isinstance(public_reads, bool):
        raise TypeError(f"public_reads must be True or False, got {type(public_reads).__name__}")
    if public_reads and read_token is not None:
        raise ValueError("public_reads=True serves records to anyone: a read token adds nothing")
    if not isinstance(allow_reset, bool):
        raise TypeError(f"create_app: allow_reset must be True or False, got {allow_reset!r}")
    if on_record is not None and not callable(on_record):
        raise TypeError(
            f"create_app: on_record must be a callable taking a record,"
            f" got {type(on_record).__name__}"
        )
    # Wakes the API's waiting requests (live page, /api/wait) on each record.
    signal = RecordSignal()

    def notify_then_call(record: PixelRecord) -> None:
        signal.notify()
        if on_record is not None:
            on_record(record)

    middleware = PixelMiddleware(
        _not_found,
        store=store,
        prefix=prefix,
        dialects=dialects,
        write_keys=write_keys,
        trusted_proxies=trusted_proxies,
        limits=limits,
        rudderstack_response=rudderstack_response,
        routes=routes,
        durable=durable,
        on_record=notify_then_call,
        # The collector owns its pixel roots: a mistyped call is a recorded
        # rejection naming the closest one, and every route has a debug twin.
        debug_routes=True,
        unknown_calls="reject",
    )
    recorder = middleware.recorder
    # Built from the checked config, so the test pixel matches what is accepted.
    pages = CollectorPages(
        store=middleware.store,
        config=middleware.config,
        spooled=lambda: recorder.spooled,
        stalled=lambda: recorder.stalled,
        signal=signal,
        allow_reset=allow_reset,
    )
    # Around the whole pages app, not route by route: every path it serves
    # (and any it serves later) reads records.
    middleware.app = ReadAccess(pages, token=read_token, public=public_reads)
    return middleware


def check_read_token(token: object) -> None:
    """Raise ``ValueError`` (``TypeError``) unless ``token`` can be a read token.

    16 to 256 printable ASCII characters without spaces, so that it travels in
    a header and a query unchanged. The message never holds the token.
    """
    if not isinstance(token, str):
        raise TypeError(f"the read token must be a string, got {type(token).__name__}")
    if not (
        MIN_READ_TOKEN_LENGTH <= len(token) <= MAX_READ_TOKEN_LENGTH
        and token.isascii()
        and token.isprintable()
        and " " not in token
    ):
        raise ValueError(
            f"the read token must be {MIN_READ_TOKEN_LENGTH} to {MAX_READ_TOKEN_LENGTH}"
            " printable ASCII characters without spaces; make one with"
            " python3 -c 'import secrets; print(secrets.token_urlsafe())'"
        )


class ReadAccess:
    """Serves ``app`` (pages that read records) only to who may read records.

    This machine (a loopback peer on a request no proxy forwarded), a request
    with the read token, or anyone when ``public`` is set; every other request
    gets a 403 with a fixed text saying how to get access.

    :param app: The WSGI app to guard.
    :param token: The read token, or ``None`` for none.
    :param public: Serve ``app`` to anyone.
    """

    def __init__(self, app: WSGIApplication, *, token: str | None, public: bool = False) -> None:
        if token is not None:
            check_read_token(token)
        self.app = app
        self.public = public
        self._token = token.encode("ascii") if token is not None else None

    def __repr__(self) -> str:
        # Never the token.
        return f"ReadAccess(public={self.public}, token={'set' if self._token else 'none'})"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.public or _is_local(environ) or self._has_token(environ):
            return self.app(environ, start_response)
        response = Response(
            _REFUSED, status=403, content_type="text/plain; charset=utf-8", headers=_PAGE_HEADERS
        )
        return response(environ, start_response)

    def _has_token(self, environ: WSGIEnvironment) -> bool:
        if self._token is None:
            return False
        offered: list[str] = []
        scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        if scheme.lower() == "bearer":
            offered.append(value.strip())
        offered += Request(environ).args.getlist("token")
        # Compare every candidate (bounded in length) in constant time.
        matched = False
        for candidate in offered:
            if len(candidate) <= MAX_READ_TOKEN_LENGTH:
                matched |= hmac.compare_digest(
                    candidate.encode("utf-8", "surrogateescape"), self._token
                )
        return matched


def _is_local(environ: WSGIEnvironment) -> bool:
    """Whether the peer is this machine and no proxy passed the request on."""
    if any(environ.get(name) for name in _PROXY_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(str(environ.get("REMOTE_ADDR", "")).partition("%")[0])
    except ValueError:
        return False  # a Unix socket or no address: not known to be this machine
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class CollectorPages:
    """The collector's own pages (``/`` and ``/events.json``); pixels never reach it.

    It serves whoever reaches it: :func:`create_app` puts it behind
    :class:`ReadAccess`.

    :param store: Where the records shown are read from.
    :param config: The pixel middleware's config: the example pixel uses its
        prefix, dialects and first write key (sorted), so that it is accepted.
    :param spooled: Returns how many records wait in the spool for the store
        (``Recorder.spooled``: this process's spool, with the files it adopted
        from processes that are gone); ``None``: nothing is spooled.
    :param stalled: Returns whether records cannot be kept now, neither by the
        store nor by the spool (``Recorder.stalled``); ``None``: never.
    :param max_json_bytes: The most bytes one ``/events.json`` answer holds.
    """

    def __init__(
        self,
        *,
        store: Store,
        config: PixelConfig,
        spooled: Callable[[], int] | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
        signal: RecordSignal | None = None,
        allow_reset: bool = False,
        stalled: Callable[[], bool] | None = None,
    ) -> None:
        if isinstance(max_json_bytes, bool) or not isinstance(max_json_bytes, int):
            raise TypeError("max_json_bytes must be a whole number of bytes")
        if max_json_bytes < 1024:
            raise ValueError("max_json_bytes must be 1024 or more")
        self.store = store
        self.spooled = spooled if spooled is not None else _nothing
        self.max_json_bytes = max_json_bytes
        self.prefix = config.prefix
        self.dialects = tuple(d for d in DIALECTS if d in config.dialects)
        keys = sorted(config.write_keys or ())
        self.example_write_key = keys[0] if keys else EXAMPLE_WRITE_KEY
        self.api = CollectorAPI(
            store=store,
            config=config,
            spooled=self.spooled,
            stalled=stalled if stalled is not None else (lambda: False),
            signal=signal if signal is not None else RecordSignal(),
            allow_reset=allow_reset,
            example_write_key=self.example_write_key,
        )

    # GET rules answer HEAD too (werkzeug drops the body); other methods get a
    # 405 with Allow, unknown paths a 404.
    _urls = Map(
        [
            Rule("/", endpoint="static", methods=["GET"]),
            Rule("/static/collector.js", endpoint="static", methods=["GET"]),
            Rule("/static/collector.css", endpoint="static", methods=["GET"]),
            Rule("/static/favicon.svg", endpoint="static", methods=["GET"]),
            Rule("/events.json", endpoint="events_json", methods=["GET"]),
        ]
    )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if self.api.handles(request.path):
            return self.api(environ, start_response)
        response: Response
        try:
            endpoint, _ = self._urls.bind_to_environ(environ).match(method=request.method)
            if endpoint == "static":
                name, content_type = _STATIC_FILES[request.path]
                response = Response(_static_file(name), content_type=content_type)
            else:
                status, body = self._events_json(request.args)
                response = Response(body, status=status, content_type="application/json")
        except HTTPException as exc:
            response = Response(
                f"{exc.name}\n",
                status=exc.code or 500,
                content_type="text/plain; charset=utf-8",
                headers=[("Allow", ", ".join(sorted(exc.valid_methods)))]
                if isinstance(exc, MethodNotAllowed) and exc.valid_methods
                else None,
            )
        response.headers.extend(_PAGE_HEADERS)
        return response(environ, start_response)

    def _read(self, *, limit: int, **filters: Any) -> list[tuple[str, PixelRecord]]:
        """The store's records; its failures as a StoreError safe to show.

        A position the store does not understand raises :class:`_BadPosition`;
        anything else a store raises becomes a StoreError whose text has every
        password and secret parameter masked, so no page shows or logs one.
        """
        try:
            return self.store.read(limit=limit, **filters)
        except StoreError as exc:
            raise StoreError(redacted_error(exc)) from None
        except (ValueError, OverflowError, TypeError) as exc:
            # Stores raise these for an `after` they cannot use (OverflowError:
            # a number too large for SQLite or a file offset).
            if filters.get("after") is not None:
                raise _BadPosition from None
            logger.error("reading the store failed: %s", redacted_error(exc))
            raise StoreError("reading the store failed (see the server's log)") from None
        except Exception as exc:
            logger.error("reading the store failed: %s", redacted_error(exc))
            raise StoreError("reading the store failed (see the server's log)") from None

    def _events_json(self, args: MultiDict[str, str]) -> tuple[int, bytes]:
        # An empty value is the same as leaving the parameter out.
        given: dict[str, str] = {}
        for name in ("limit", "accepted", "call", "after"):
            values = [value for value in args.getlist(name) if value != ""]
            if len(values) > 1:
                return _json_error(_REPEATED)
            if values:
                given[name] = values[0]
        limit = PAGE_RECORDS
        if "limit" in given:
            if not _LIMIT.fullmatch(given["limit"]):
                return _json_error(_BAD_PARAMETER["limit"])
            limit = int(given["limit"])
            if not 1 <= limit <= MAX_JSON_RECORDS:
                return _json_error(_BAD_PARAMETER["limit"])
        accepted: bool | None = None
        if "accepted" in given:
            if given["accepted"] not in ("true", "false"):
                return _json_error(_BAD_PARAMETER["accepted"])
            accepted = given["accepted"] == "true"
        call = given.get("call")
        if call is not None and call not in _ALL_CALLS:
            return _json_error(_BAD_PARAMETER["call"])
        after = given.get("after")
        if after is not None and not _POSITION.fullmatch(after):
            return _json_error(_BAD_PARAMETER["after"])
        try:
            rows = self._read(limit=limit, accepted=accepted, call=call, after=after)
        except _BadPosition:
            return _json_error(_BAD_PARAMETER["after"])
        except StoreError as exc:
            logger.warning("/events.json could not read the store: %s", exc)
            return 503, _json({"error": _STORE_DOWN, "detail": str(exc)})
        return 200, self._records_answer(rows, after=after)

    def _records_answer(self, rows: list[tuple[str, PixelRecord]], *, after: str | None) -> bytes:
        """The JSON answer for ``rows``, oldest first, in at most ``max_json_bytes``.

        Records go in oldest first while the whole answer still fits; the first
        that does not ends it (``truncated``), and ``last`` is the position of
        the last one taken, so that ``?after=<last>`` goes on from there. A
        record too large for an answer of its own is passed over and counted
        in ``omitted``: otherwise a reader could never get past it.
        """
        spooled = self.spooled()
        parts: list[bytes] = []
        size = 0  # of the parts with the commas between them
        last = after
        omitted = 0
        truncated = False
        for index, (position, record) in enumerate(rows):
            part = _json(record)
            grown = size + len(part) + (1 if parts else 0)
            more = index + 1 < len(rows)
            if self._answer_size(grown, position, spooled, more, omitted) <= self.max_json_bytes:
                parts.append(part)
                size = grown
            elif not parts and self._answer_size(0, position, spooled, more, omitted + 1) <= (
                self.max_json_bytes
            ):
                omitted += 1
            else:
                truncated = True
                break
            last = position
        return _envelope(b",".join(parts), last, spooled, truncated, omitted)

    def _answer_size(
        self, records_size: int, last: str | None, spooled: int, truncated: bool, omitted: int
    ) -> int:
        return records_size + len(_envelope(b"", last, spooled, truncated, omitted))


def _static_file(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return (resources.files("pixel_middleware") / "static" / name).read_bytes()


def _nothing() -> int:
    return 0


def _not_found(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    # Stands in until create_app() puts the collector's pages in place.
    response = Response("Not Found\n", status=404, content_type="text/plain; charset=utf-8")
    return response(environ, start_response)


class _BadPosition(Exception):
    """The store could not use the ``after`` it was given."""


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _envelope(
    records: bytes, last: str | None, spooled: int, truncated: bool, omitted: int
) -> bytes:
    """The /events.json answer around ``records`` (the records' JSON, comma-separated)."""
    rest = _json({"last": last, "spooled": spooled, "truncated": truncated, "omitted": omitted})
    return b'{"records":[' + records + b"]," + rest[1:]


def _json_error(message: str) -> tuple[int, bytes]:
    return 400, _json({"error": message})
