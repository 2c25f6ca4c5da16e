"""The WSGI middleware: answers and records tracking pixels in front of any app.

A thin adapter over :mod:`pixel_middleware.core`: it reads the few environ keys
the core needs, lets the core decode the pixel, hands the record to a
:class:`~pixel_middleware.recorder.Recorder` and sends the core's answer. Every
other request goes to the wrapped application untouched.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

from pixel_middleware.core import (
    DEFAULT_DIALECTS,
    Limits,
    PixelConfig,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    Route,
    decode_pixel,
    default_answer,
    match_route,
    not_kept_answer,
)
from pixel_middleware.debug_twin import DEBUG_ROOT, debug_answer
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, open_store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PixelMiddleware"]

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = Limits()
_DEBUG_PREFIX = DEBUG_ROOT + "/"

# "200 OK", "405 Method Not Allowed", ...: built once, not per request.
_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

# How much of an exception's text (and of an unknown call's name) the fallback
# record keeps: an exception may quote request data.
_MAX_FAILURE_CHARS = 200


class PixelMiddleware:
    """Answer and record Segment- and RudderStack-style tracking pixels.

    Requests to a pixel route (``/v1/pixel/<call>`` for Segment,
    ``/pixel/v1/page`` and ``/pixel/v1/track`` for RudderStack, under
    ``prefix``) and POSTs to their HTTP APIs (``/v1/track``, ``/v1/batch``,
    ``/beacon/v1/batch``, ...; every event of the body) are decoded, checked
    and recorded, and answered as the reference systems answer them; every
    other request is passed to ``app`` untouched, its body unread.
    A pixel never gets a 500: bad input becomes a recorded, explained
    rejection, and even a failing store or a bug in the decoder still gets the
    dialect's normal answer (the GIF for Segment). Only a pixel that cannot be
    kept at all (the store and the spool both fail) gets ``503`` with
    ``Retry-After``, and still the dialect's body.

    :param app: The WSGI application to wrap.
    :param store: Where records go: a store URL (``sqlite:///path``,
        ``jsonl:///path``, ``memory://``), an open :class:`~.stores.Store`, or a
        :class:`~.recorder.Recorder` you manage yourself. ``None`` reads the
        ``PIXEL_STORE`` environment variable, else ``sqlite:///pixel-events.sqlite3``.
    :param prefix: Path prefix the pixel routes live under, e.g. ``"/collect"``.
    :param dialects: Which dialects to answer: ``"segment"``, ``"rudderstack"``.
    :param write_keys: Accepted write keys; ``None`` accepts any key. Pixels
        with another key are still answered and recorded, as rejected.
    :param trusted_proxies: How many proxies in front of the app append to
        ``X-Forwarded-For``; ``0`` takes the client address from ``REMOTE_ADDR``.
    :param limits: Bounds on what one pixel may cost (query size, depth, ...).
    :param rudderstack_response: ``"seed"`` answers RudderStack pixels as its
        Pixel API document says (``200 OK`` / ``400``); ``"gif"`` answers the
        GIF for everything, as rudder-server does.
    :param routes: Custom routes, a path (or ``"host/path"``) to
        ``"dialect:call"``, e.g. ``{"/t.gif": "segment:track"}``; a path ending
        in ``/`` to ``"dialect"`` takes the call from the rest of the path. See
        docs/dialects.md, "Custom routes".
    :param durable: ``True`` (the default) answers a pixel only once its record
        is committed; ``False`` queues it and answers at once (faster; a crash
        loses what is queued). Ignored when ``store`` is a Recorder.
    :param on_record: Called with each record after it is handed to the store,
        in the request's thread. Its exceptions are logged, never raised.
    :param debug_routes: ``True`` also answers ``/debug<pixel route>`` (e.g.
        ``/debug/v1/pixel/track?data=...``) with the pixel's verdict as JSON,
        recording nothing (:mod:`~pixel_middleware.debug_twin`). Off by
        default: those paths belong to the app unless asked for.
    :param unknown_calls: ``"pass"`` (the default) hands a path under a pixel
        root with an unknown call (``/v1/pixel/trak``) to the app, which may own
        it; ``"reject"`` records it as an ``unknown_call`` rejection naming the
        closest call, as the collector does.

    .. code-block:: python

        # Flask: wrap the WSGI callable, not the app object (the Flask CLI
        # needs app to stay a Flask).
        from pixel_middleware import PixelMiddleware
        app.wsgi_app = PixelMiddleware(app.wsgi_app, write_keys={"YOUR_WRITE_KEY"})

        # Django, in wsgi.py:
        from django.core.wsgi import get_wsgi_application
        from pixel_middleware import PixelMiddleware
        application = PixelMiddleware(get_wsgi_application(), store="sqlite:///pixels.db")

    .. warning::

        ``X-Forwarded-For`` is sent by the client and can say anything. Set
        ``trusted_proxies`` to the exact number of proxies in front of the app
        that append to it, or leave it at ``0``: trusting one more than there
        are lets any client choose the IP address that is recorded. If
        ``werkzeug.middleware.proxy_fix.ProxyFix`` already rewrites
        ``REMOTE_ADDR``, put it *outside* this middleware
        (``ProxyFix(PixelMiddleware(app), x_for=1)``) and leave
        ``trusted_proxies`` at ``0``, so the proxies are not counted twice.

    Call :meth:`close` at shutdown to flush what is queued (the recorder also
    flushes at interpreter exit). Records go through a
    :class:`~.recorder.Recorder`: concurrent pixels share one commit, and while
    the store fails they wait in a spool on local disk (``./pixel-spool/``).
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        store: str | Store | Recorder | None = None,
        prefix: str = "",
        dialects: Iterable[str] = DEFAULT_DIALECTS,
        write_keys: Iterable[str] | None = None,
        trusted_proxies: int = 0,
        limits: Limits = _DEFAULT_LIMITS,
        rudderstack_response: Literal["seed", "gif"] = "seed",
        routes: Mapping[str, str] | None = None,
        durable: bool = True,
        on_record: Callable[[PixelRecord], None] | None = None,
        debug_routes: bool = False,
        unknown_calls: Literal["pass", "reject"] = "pass",
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"PixelMiddleware: app must be a WSGI application (a callable), got"
                f" {type(app).__name__}; with Flask, wrap app.wsgi_app"
            )
        if on_record is not None and not callable(on_record):
            raise TypeError(
                f"PixelMiddleware: on_record must be a callable taking a record, got"
                f" {type(on_record).__name__}"
            )
        if not isinstance(debug_routes, bool):
            raise TypeError(
                f"PixelMiddleware: debug_routes must be True or False, got {debug_routes!r}"
            )
        self.app = app
        self.on_record = on_record
        self.debug_routes = debug_routes
        self.config = _build_config(
            prefix=prefix,
            dialects=dialects,
            write_keys=write_keys,
            trusted_proxies=trusted_proxies,
            limits=limits,
            rudderstack_response=rudderstack_response,
            unknown_calls=unknown_calls,
            routes=routes,
        )
        self.recorder: Recorder
        #: The store records go to (read it for what was recorded).
        self.store: Store
        if isinstance(store, Recorder):
            self.recorder = store
            self.store = store.store
            self._owns_recorder = False
        else:
            if store is None or isinstance(store, str):
                # Opened here, so that a wrong URL fails at construction.
                store = open_store(store)
            elif not (
                callable(getattr(store, "write", None)) and callable(getattr(store, "read", None))
            ):
                raise TypeError(
                    f"PixelMiddleware: store must be a store URL such as"
                    f" 'sqlite:///pixel-events.sqlite3', a Store or a Recorder;"
                    f" got {type(store).__name__}"
                )
            self.store = store
            self.recorder = Recorder(store, durable=durable)
            self._owns_recorder = True

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if self.debug_routes and path.startswith(_DEBUG_PREFIX):
            return self._answer_debug(environ, start_response, path[len(DEBUG_ROOT) :])
        try:
            route = match_route(
                path,
                self.config,
                method=environ.get("REQUEST_METHOD", "GET"),
                host=environ.get("HTTP_HOST"),
            )
        except Exception:
            # Not knowing whether the path is ours, leave it to the app.
            logger.exception("pixel route matching failed for %r; passing it on", path)
            route = None
        if route is None:
            return self.app(environ, start_response)
        return self._answer_pixel(environ, start_response, route, path)

    def _answer_pixel(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        route: Route,
        path: str,
    ) -> Iterable[bytes]:
        method: str = environ.get("REQUEST_METHOD", "GET")
        now = datetime.now(UTC)
        outcome: PixelOutcome | None
        try:
            request = pixel_request_from_environ(
                environ, path, body_limits=self.config.limits if route.body else None
            )
            outcome = decode_pixel(request, config=self.config, now=now)
        except Exception as exc:
            logger.exception("decoding the pixel %s failed; answering the default", path)
            outcome = self._fallback_outcome(environ, route, method, path, now, exc)
        if outcome is None:
            # The core changed its mind about the route: the app may know the path.
            return self.app(environ, start_response)

        # Every record is handed on, even after one could not be kept.
        kept = [self._keep(record) for record in outcome.records]
        if not all(kept):
            outcome = not_kept_answer(route, method, self.config)
        start_response(_status_line(outcome.status), outcome.headers)
        return [outcome.body]

    def _answer_debug(
        self, environ: WSGIEnvironment, start_response: StartResponse, path: str
    ) -> Iterable[bytes]:
        """A debug twin (``/debug<pixel route>``): the verdict as JSON, nothing recorded."""
        method: str = environ.get("REQUEST_METHOD", "GET")
        now = datetime.now(UTC)
        outcome: PixelOutcome | None
        try:
            route = match_route(path, self.config, method=method, host=environ.get("HTTP_HOST"))
            if route is None:
                return self.app(environ, start_response)
            try:
                request = pixel_request_from_environ(
                    environ, path, body_limits=self.config.limits if route.body else None
                )
                outcome = decode_pixel(request, config=self.config, now=now)
            except Exception as exc:
                logger.exception("decoding the debug pixel %s failed", path)
                outcome = self._fallback_outcome(environ, route, method, path, now, exc)
        except Exception:
            logger.exception("debug route matching failed for %r; passing it on", path)
            return self.app(environ, start_response)
        if outcome is None:
            return self.app(environ, start_response)
        status, headers, body = debug_answer(outcome)
        start_response(_status_line(status), headers)
        return [b"" if method == "HEAD" else body]

    def _keep(self, record: PixelRecord) -> bool:
        """Hand ``record`` to the recorder; whether it was kept."""
        try:
            kept = self.recorder.record(record)
        except Exception:
            # Recorder.record() is documented never to raise; a pixel still must not
            # 500. Whether it was kept is unknown: the bug is logged, the answer normal.
            logger.exception("recording pixel %s failed", record.get("id"))
            kept = True
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:
                logger.exception("on_record callback failed for pixel %s", record.get("id"))
        return kept

    def _fallback_outcome(
        self,
        environ: WSGIEnvironment,
        route: Route,
        method: str,
        path: str,
        now: datetime,
        exc: Exception,
    ) -> PixelOutcome:
        """The dialect's normal answer, and a record saying why, when decoding crashed.

        Everything copied from the request is cut as the core cuts it, so that
        not even this record can grow with the request.
        """
        outcome = default_answer(route, method, self.config)
        if method != "GET" and not route.body:
            return outcome
        limits = self.config.limits
        # WSGI text is latin-1 (one character per byte): cutting it cuts bytes.
        query: str = environ.get("QUERY_STRING", "")[: limits.max_query_bytes]
        failure = f"{type(exc).__name__}: {exc}"[:_MAX_FAILURE_CHARS]
        record: PixelRecord = {
            "id": str(uuid.uuid4()),
            "receivedAt": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "dialect": route.dialect,
            "call": route.call[:_MAX_FAILURE_CHARS],
            "writeKey": None,
            "accepted": False,
            "problems": [
                {
                    "rule": "internal_error",
                    "message": f"the decoder failed ({failure});"
                    " this is a bug in pixel-middleware, please report it",
                }
            ],
            "notes": [],
            "event": None,
            "request": {
                "method": method,
                "path": path[: limits.max_header_chars],
                "query": query,
                "ip": _capped(environ.get("REMOTE_ADDR"), limits.max_header_chars),
                "userAgent": _capped(environ.get("HTTP_USER_AGENT"), limits.max_header_chars),
                "referer": _capped(environ.get("HTTP_REFERER"), limits.max_header_chars),
            },
        }
        return PixelOutcome(outcome.status, outcome.headers, outcome.body, record)

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued, then close the recorder this middleware created
        (which closes its store, a :class:`~.stores.Store` passed in included).

        Waits at most ``timeout`` seconds (``None``: as long as the flush takes;
        see :meth:`.Recorder.close`). A :class:`~.recorder.Recorder` passed in
        as ``store`` is left open: its owner closes it. Without a call to
        ``close()``, the recorder's exit hook flushes at interpreter exit.
        """
        if self._owns_recorder:
            self.recorder.close(timeout)

    def __repr__(self) -> str:
        return f"<PixelMiddleware {self.app!r} prefix={self.config.prefix!r}>"


def _build_config(
    *,
    prefix: str,
    dialects: Iterable[str],
    write_keys: Iterable[str] | None,
    trusted_proxies: int,
    limits: Limits,
    rudderstack_response: str,
    unknown_calls: str,
    routes: Mapping[str, str] | None,
) -> PixelConfig:
    """The core's config; PixelConfig checks every value and says how to fix it."""
    try:
        return PixelConfig(
            prefix=prefix,
            dialects=_as_set(dialects),
            write_keys=None if write_keys is None else _as_set(write_keys),
            trusted_proxies=trusted_proxies,
            limits=limits,
            rudderstack_response=rudderstack_response,  # type: ignore[arg-type]
            unknown_calls=unknown_calls,  # type: ignore[arg-type]
            custom_paths=routes,
        )
    except ValueError as exc:
        raise ValueError(f"PixelMiddleware: {exc}") from exc


def _as_set(values: Iterable[str]) -> Any:
    # Lists and tuples are welcome here; a bare string (an easy slip for
    # dialects="segment") is left as it is for PixelConfig to refuse.
    if isinstance(values, str) or not isinstance(values, Iterable):
        return values
    return frozenset(values)


def _read_body(environ: WSGIEnvironment, limits: Limits) -> bytes:
    """At most ``max_body_bytes + 1`` bytes of a POST body (one more says "too large").

    Bounded by ``Content-Length``; without one, read only from a server that
    says the input ends (``wsgi.input_terminated``), else nothing.
    """
    cap = limits.max_body_bytes + 1
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length_text = environ.get("CONTENT_LENGTH") or ""
    if length_text.strip().isdigit():
        wanted = min(int(length_text), cap)
    elif environ.get("wsgi.input_terminated"):
        wanted = cap
    else:
        return b""
    chunks: list[bytes] = []
    while wanted > 0:
        chunk = stream.read(min(wanted, 64 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


def _capped(value: str | None, max_chars: int) -> str | None:
    return None if value is None else value[:max_chars]


def pixel_request_from_environ(
    environ: WSGIEnvironment, path: str, *, body_limits: Limits | None = None
) -> PixelRequest:
    """What the core is given of a WSGI request for the pixel route ``path``.

    ``body_limits``: the route takes a body (the HTTP API's POST routes), read
    up to these limits; ``None`` reads none (never for a request that is not a
    pixel: the app gets its body untouched).
    """
    return PixelRequest(
        environ.get("REQUEST_METHOD", "GET"),
        path,
        _query_bytes(environ.get("QUERY_STRING", "")),
        environ.get("REMOTE_ADDR"),
        environ.get("HTTP_USER_AGENT"),
        environ.get("HTTP_X_FORWARDED_FOR"),
        environ.get("HTTP_REFERER"),
        body=b"" if body_limits is None else _read_body(environ, body_limits),
        content_encoding=environ.get("HTTP_CONTENT_ENCODING"),
        authorization=environ.get("HTTP_AUTHORIZATION"),
        host=environ.get("HTTP_HOST"),
    )


def _query_bytes(query: str) -> bytes:
    # PEP 3333: environ strings carry the raw bytes as latin-1. Feeding the core
    # the bytes (not werkzeug's parsed args, which raise on non-UTF-8) makes the
    # middleware and the mitmproxy addon decode the same request the same way.
    try:
        return query.encode("latin-1")
    except UnicodeEncodeError:
        # A server that broke PEP 3333 and decoded as UTF-8 already.
        return query.encode("utf-8", "surrogateescape")


def _status_line(status: int) -> str:
    try:
        return _STATUS_LINES[status]
    except KeyError:
        return f"{status} Unknown"
