"""The standalone collector: a pixel endpoint plus pages showing what arrived.

``create_app()`` returns a :class:`~pixel_middleware.middleware.PixelMiddleware`
around a small WSGI app that serves:

- ``/``: how to send a pixel, with a live example ``<img>`` pointing at this very
  server (opening the page fires a real pixel), how many records wait in the
  spool (a warning at the top while any do) and the latest records received;
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

Run it with ``pixel-middleware serve`` (waitress), or under any WSGI server::

    gunicorn 'pixel_middleware.collector:create_app()'   # PIXEL_STORE, PIXEL_READ_TOKEN

The example pixel carries the first configured write key (the key a real page
would embed in its own ``<img>`` tags), so do not configure a key here that you
treat as a secret.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import os
import re
import shlex
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pixel_middleware.core import CALLS, DIALECTS, Limits, PixelConfig, PixelRecord
from pixel_middleware.display import event_name, identity, terminal_text
from pixel_middleware.encode import encode_pixel_url, pixel_img_tag
from pixel_middleware.middleware import PixelMiddleware
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, StoreError, redact_url

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

# The pages show data sent by anyone: everything is escaped, and the policy
# forbids scripts and any other origin in case an escape is ever missed.
_PAGE_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    (
        "Content-Security-Policy",
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'none'",
    ),
    ("Referrer-Policy", "no-referrer"),
]

# What /events.json says about a bad parameter: fixed text that names the
# parameter and what would work, never the value sent (no answer repeats input).
_ALL_CALLS = sorted({call for calls in CALLS.values() for call in calls})
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
_MAX_DETAIL = 500

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
    dialects: Iterable[str] = DIALECTS,
    trusted_proxies: int = 0,
    limits: Limits = _DEFAULT_LIMITS,
    rudderstack_response: Literal["seed", "gif"] = "seed",
    durable: bool = True,
    on_record: Callable[[PixelRecord], None] | None = None,
    read_token: str | None = None,
    public_reads: bool = False,
) -> PixelMiddleware:
    """The collector WSGI app; options as for :class:`PixelMiddleware`, and:

    :param read_token: Lets a request from another machine read records (see
        the module docs); ``None`` reads ``PIXEL_READ_TOKEN``, else there is none
        and only this machine reads them. At least 16 characters.
    :param public_reads: ``True`` serves the pages that read records to anyone.

    ``store=None`` reads ``PIXEL_STORE``, else ``sqlite:///pixel-events.sqlite3``.
    Call ``.close()`` on the result at shutdown to flush what is queued.
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
    middleware = PixelMiddleware(
        _not_found,
        store=store,
        prefix=prefix,
        dialects=dialects,
        write_keys=write_keys,
        trusted_proxies=trusted_proxies,
        limits=limits,
        rudderstack_response=rudderstack_response,
        durable=durable,
        on_record=on_record,
    )
    recorder = middleware.recorder
    # Built from the checked config, so the example pixel matches what is accepted.
    pages = CollectorPages(
        store=middleware.store, config=middleware.config, spooled=lambda: recorder.spooled
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
    :param max_json_bytes: The most bytes one ``/events.json`` answer holds.
    """

    def __init__(
        self,
        *,
        store: Store,
        config: PixelConfig,
        spooled: Callable[[], int] | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
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

    # GET rules answer HEAD too (werkzeug drops the body); other methods get a
    # 405 with Allow, unknown paths a 404.
    _urls = Map(
        [
            Rule("/", endpoint="index", methods=["GET"]),
            Rule("/events.json", endpoint="events_json", methods=["GET"]),
        ]
    )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        response: Response
        try:
            endpoint, _ = self._urls.bind_to_environ(environ).match(method=request.method)
            if endpoint == "index":
                response = Response(self._index(environ), content_type="text/html; charset=utf-8")
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
            raise StoreError(_safe_detail(exc)) from None
        except (ValueError, OverflowError, TypeError) as exc:
            # Stores raise these for an `after` they cannot use (OverflowError:
            # a number too large for SQLite or a file offset).
            if filters.get("after") is not None:
                raise _BadPosition from None
            logger.error("reading the store failed: %s", _safe_detail(exc))
            raise StoreError("reading the store failed (see the server's log)") from None
        except Exception as exc:
            logger.error("reading the store failed: %s", _safe_detail(exc))
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

    def _index(self, environ: WSGIEnvironment) -> str:
        base_url = _base_url(environ)
        examples = []
        if "segment" in self.dialects:
            examples.append(
                (
                    "Segment",
                    encode_pixel_url(
                        {
                            "anonymousId": "collector-page-visitor",
                            "event": "Collector Page Viewed",
                            "properties": {"source": "the collector's index page"},
                        },
                        call="track",
                        write_key=self.example_write_key,
                        dialect="segment",
                        base_url=base_url,
                        prefix=self.prefix,
                    ),
                )
            )
        if "rudderstack" in self.dialects:
            examples.append(
                (
                    "RudderStack",
                    encode_pixel_url(
                        {"anonymousId": "collector-page-visitor", "name": "Collector"},
                        call="page",
                        write_key=self.example_write_key,
                        dialect="rudderstack",
                        base_url=base_url,
                        prefix=self.prefix,
                    ),
                )
            )
        try:
            rows = self._read(limit=PAGE_RECORDS)
            records_html = _records_table([record for _, record in reversed(rows)])
        except StoreError as exc:
            logger.warning("collector page could not read the store: %s", exc)
            records_html = f'<p class="error">Could not read the store: {_e(exc)}</p>'
        # Only the kind of store: its URL may hold a file path or a password.
        store_kind = str(getattr(self.store, "url", "")).partition("://")[0] or "configured"
        spooled = self.spooled()
        if spooled:
            # At the top: the store is failing (or was), and these are not in
            # the records listed below until it takes them.
            spool_html = (
                f'<p class="spooled"><strong>{spooled} record(s) wait in the spool</strong>'
                " on this server's disk: the store did not take them. They are kept"
                " and handed to the store, in order, as soon as it takes writes again;"
                " until then they are not among the latest records below.</p>"
            )
        else:
            spool_html = ""
        parts = [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            "<title>pixel-middleware collector</title>",
            f"<style>{_STYLE}</style></head><body>",
            "<h1>pixel-middleware collector</h1>",
            spool_html,
            f"<p>Pixels sent to this server are decoded, checked and kept in its"
            f" {_e(store_kind)} store.</p>",
            "<h2>Send a pixel</h2>",
            "<p>Put an image tag in a page or an email; the browser or mail client"
            " fetches it, and the event arrives here. This page carries one, so"
            " opening it sent a pixel:</p>",
        ]
        for name, url in examples:
            parts += [
                f"<h3>{_e(name)}</h3>",
                f"<pre>{_e(pixel_img_tag(url))}</pre>",
                "<p>or from a shell:</p>",
                f"<pre>{_e('curl -i ' + shlex.quote(url))}</pre>",
            ]
        # Only the first example is fired, so one page view makes one record.
        if examples:
            parts.append(f'<img src="{_e(examples[0][1])}" width="1" height="1" alt="">')
        parts += [
            "<p>Or build a URL with <code>pixel-middleware encode --write-key KEY"
            " --call track '{&quot;userId&quot;: &quot;u1&quot;, &quot;event&quot;:"
            " &quot;Email Opened&quot;}'</code>, and check one with"
            " <code>pixel-middleware decode URL</code>.</p>",
            f"<h2>Latest records</h2><p>Newest first, at most {PAGE_RECORDS}; reload to"
            ' refresh. As JSON: <a href="events.json">events.json</a>.'
            f" Waiting in the spool: {spooled}.</p>",
            records_html,
            "</body></html>",
        ]
        return "\n".join(parts)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}"
    "pre{background:#f4f4f4;padding:.5em;overflow-x:auto;white-space:pre-wrap;"
    "word-break:break-all}"
    "table{border-collapse:collapse;font-size:.9em}"
    "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}"
    ".rejected{background:#fee}.error{color:#a00}"
    ".spooled{background:#fff3cd;border:2px solid #c90;padding:.75em;font-size:1.1em}"
)


def _records_table(records: list[PixelRecord]) -> str:
    if not records:
        return "<p>No pixels received yet.</p>"
    rows = [
        "<table><thead><tr><th>time</th><th>dialect</th><th>call</th><th>verdict</th>"
        "<th>problems</th><th>event / name</th><th>identity</th></tr></thead><tbody>"
    ]
    for record in records:
        accepted = bool(record.get("accepted"))
        problems = "<br>".join(
            f"<b>{_e(p.get('rule', ''))}</b>: {_e(p.get('message', ''))}"
            for p in record.get("problems") or []
        )
        rows.append(
            f'<tr class="{"accepted" if accepted else "rejected"}">'
            f"<td>{_e(record.get('receivedAt', ''))}</td>"
            f"<td>{_e(record.get('dialect', ''))}</td>"
            f"<td>{_e(record.get('call', ''))}</td>"
            f"<td>{'accepted' if accepted else 'rejected'}</td>"
            f"<td>{problems}</td>"
            f"<td>{_e(event_name(record))}</td>"
            f"<td>{_e(identity(record))}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _base_url(environ: WSGIEnvironment) -> str:
    """This server's own URL as the browser reached it (PEP 3333 URL reconstruction)."""
    scheme: str = environ.get("wsgi.url_scheme", "http")
    host: str | None = environ.get("HTTP_HOST")
    # The Host header is the client's word: use it only if it looks like a host.
    if not host or not _HOST.fullmatch(host):
        host = environ.get("SERVER_NAME", "localhost")
        port = environ.get("SERVER_PORT", "")
        if port and (scheme, port) not in (("http", "80"), ("https", "443")):
            host = f"{host}:{port}"
    return f"{scheme}://{host}{environ.get('SCRIPT_NAME', '')}"


def _nothing() -> int:
    return 0


def _not_found(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    # Stands in until create_app() puts the collector's pages in place.
    response = Response("Not Found\n", status=404, content_type="text/plain; charset=utf-8")
    return response(environ, start_response)


class _BadPosition(Exception):
    """The store could not use the ``after`` it was given."""


def _safe_detail(exc: BaseException) -> str:
    """A store error's text fit to show or log: secrets masked, one line, capped."""
    return terminal_text(redact_url(str(exc)))[:_MAX_DETAIL]


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
