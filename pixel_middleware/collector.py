"""The standalone collector: a pixel endpoint plus a page showing what arrived.

``create_app()`` returns a :class:`~pixel_middleware.middleware.PixelMiddleware`
around a small WSGI app that serves:

- ``/``: the live debugger page (``static/index.html`` with its script and
  style sheet under ``/static/``): records appear as they arrive, filtered
  by what the page's URL says, each opened to its decoded event, problems and
  request; a button sends a test pixel;
- ``/api/...`` and ``/debug/<pixel route>``: the JSON API the page reads, also
  for tests and scripts (:mod:`pixel_middleware.api`, ``docs/api.md``);
- ``/events.json``: the latest records as JSON, oldest first, as
  ``{"records": [...], "last": position, "spooled": N}`` (``?limit=``,
  ``?accepted=true|false``, ``?call=``, and ``?after=<last>`` to poll for new
  ones); ``spooled`` counts the records waiting in the spool for the store;
- 404 for anything else.

Run it with ``pixel-middleware serve`` (waitress), or under any WSGI server::

    gunicorn 'pixel_middleware.collector:create_app()'   # store from PIXEL_STORE

The test pixel (``/api/status``) carries the first configured write key (the
key a real page would embed in its own ``<img>`` tags), so do not configure a
key here that you treat as a secret.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from pixel_middleware.api import CollectorAPI, RecordSignal
from pixel_middleware.core import DIALECTS, Limits, PixelConfig, PixelRecord
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
    allow_reset: bool = False,
) -> PixelMiddleware:
    """The collector WSGI app; options as for :class:`PixelMiddleware`.

    ``store=None`` reads ``PIXEL_STORE``, else ``sqlite:///pixel-events.sqlite3``.
    ``allow_reset``: ``POST /api/reset`` may clear a store other than
    ``memory://`` (which it always may). Call ``.close()`` on the result at
    shutdown to flush what is queued.
    """
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
        durable=durable,
        on_record=notify_then_call,
    )
    recorder = middleware.recorder
    # Built from the checked config, so the test pixel matches what is accepted.
    middleware.app = CollectorPages(
        store=middleware.store,
        config=middleware.config,
        spooled=lambda: recorder.spooled,
        signal=signal,
        allow_reset=allow_reset,
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
        self,
        *,
        store: Store,
        config: PixelConfig,
        spooled: Callable[[], int] | None = None,
        signal: RecordSignal | None = None,
        allow_reset: bool = False,
    ) -> None:
        self.store = store
        self.spooled = spooled if spooled is not None else _nothing
        self.prefix = config.prefix
        self.dialects = tuple(d for d in DIALECTS if d in config.dialects)
        keys = sorted(config.write_keys or ())
        self.example_write_key = keys[0] if keys else EXAMPLE_WRITE_KEY
        self.api = CollectorAPI(
            store=store,
            config=config,
            spooled=self.spooled,
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


def _static_file(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return (resources.files("pixel_middleware") / "static" / name).read_bytes()


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
