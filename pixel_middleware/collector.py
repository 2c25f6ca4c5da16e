"""The standalone collector: a pixel endpoint plus a page showing what arrived.

``create_app()`` returns a :class:`~pixel_middleware.middleware.PixelMiddleware`
around a small WSGI app that serves:

- ``/``: how to send a pixel, with a live example ``<img>`` pointing at this very
  server (opening the page fires a real pixel), how many records wait in the
  spool (a warning at the top while any do) and the latest records received;
- ``/events.json``: the latest records as JSON, oldest first, as
  ``{"records": [...], "last": position, "spooled": N}`` (``?limit=``,
  ``?accepted=true|false``, ``?call=``, and ``?after=<last>`` to poll for new
  ones); ``spooled`` counts the records waiting in the spool for the store;
- 404 for anything else.

Run it with ``pixel-middleware serve`` (waitress), or under any WSGI server::

    gunicorn 'pixel_middleware.collector:create_app()'   # store from PIXEL_STORE

The example pixel carries the first configured write key (the key a real page
would embed in its own ``<img>`` tags), so do not configure a key here that you
treat as a secret.
"""

from __future__ import annotations

import html
import json
import logging
import re
import shlex
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pixel_middleware.core import DIALECTS, Limits, PixelConfig, PixelRecord
from pixel_middleware.encode import encode_pixel_url, pixel_img_tag
from pixel_middleware.middleware import PixelMiddleware
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, StoreError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["CollectorPages", "create_app"]

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = Limits()
EXAMPLE_WRITE_KEY = "demo-write-key"
PAGE_RECORDS = 50
MAX_JSON_RECORDS = 1000

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
) -> PixelMiddleware:
    """The collector WSGI app; options as for :class:`PixelMiddleware`.

    ``store=None`` reads ``PIXEL_STORE``, else ``sqlite:///pixel-events.sqlite3``.
    Call ``.close()`` on the result at shutdown to flush what is queued.
    """
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
    middleware.app = CollectorPages(
        store=middleware.store, config=middleware.config, spooled=lambda: recorder.spooled
    )
    return middleware


class CollectorPages:
    """The collector's own pages (``/`` and ``/events.json``); pixels never reach it.

    :param store: Where the records shown are read from.
    :param config: The pixel middleware's config: the example pixel uses its
        prefix, dialects and first write key (sorted), so that it is accepted.
    :param spooled: Returns how many records wait in the spool for the store
        (``Recorder.spooled``: this process's spool, with the files it adopted
        from processes that are gone); ``None``: nothing is spooled.
    """

    def __init__(
        self, *, store: Store, config: PixelConfig, spooled: Callable[[], int] | None = None
    ) -> None:
        self.store = store
        self.spooled = spooled if spooled is not None else _nothing
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
        return self.store.read(limit=limit, **filters)

    def _events_json(self, args: MultiDict[str, str]) -> tuple[int, bytes]:
        try:
            limit = int(args.get("limit") or PAGE_RECORDS)
            if not 1 <= limit <= MAX_JSON_RECORDS:
                raise ValueError
        except ValueError:
            return _json_error(f"limit must be a whole number from 1 to {MAX_JSON_RECORDS}")
        accepted_text = args.get("accepted")
        accepted: bool | None = None
        if accepted_text is not None:
            if accepted_text not in ("true", "false"):
                return _json_error("accepted must be true or false")
            accepted = accepted_text == "true"
        try:
            rows = self._read(
                limit=limit, accepted=accepted, call=args.get("call"), after=args.get("after")
            )
        except ValueError as exc:  # an `after` that is not a position of this store
            return _json_error(str(exc))
        except StoreError as exc:
            return 503, _json({"error": f"could not read the store: {exc}"})
        return 200, _json(
            {
                "records": [record for _, record in rows],
                "last": rows[-1][0] if rows else args.get("after"),
                "spooled": self.spooled(),
            }
        )

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


def event_name(record: PixelRecord) -> str:
    """The track event's name or the page/screen name, if the record has one."""
    event = record.get("event") or {}
    for key in ("event", "name"):
        value = event.get(key)
        if value not in (None, ""):
            return value if isinstance(value, str) else json.dumps(value)
    return ""


def identity(record: PixelRecord) -> str:
    """``userId`` if set, else ``anonymousId`` (marked ``anon:``)."""
    event = record.get("event") or {}
    for key, label in (("userId", ""), ("anonymousId", "anon:")):
        value = event.get(key)
        if value not in (None, ""):
            return label + (value if isinstance(value, str) else json.dumps(value))
    return ""


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


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode("ascii")


def _json_error(message: str) -> tuple[int, bytes]:
    return 400, _json({"error": message})
