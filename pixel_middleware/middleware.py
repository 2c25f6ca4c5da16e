"""The WSGI middleware: answers and records tracking pixels in front of any app.

A thin adapter over :mod:`pixel_middleware.core`: it reads the few environ keys
the core needs, lets the core decode the pixel, hands the record to a
:class:`~pixel_middleware.recorder.Recorder` and sends the core's answer. Every
other request goes to the wrapped application untouched.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal

from pixel_middleware._adapter import DEFAULT_LIMITS, PixelEndpoint
from pixel_middleware.core import DEFAULT_DIALECTS, Limits, PixelRecord, PixelRequest, Route
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["PixelMiddleware"]

logger = logging.getLogger(__name__)

# "200 OK", "405 Method Not Allowed", ...: built once, not per request.
_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


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
    kept at all (the journal and the store both fail) gets ``503`` with
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
    :param on_record: Called with each record once the store kept it (or, with
        ``durable=False``, queued it), in the request's thread; not with a
        record that was not kept (its pixel is answered ``503``, and the copy
        the client sends again is passed on once kept). Its exceptions are
        logged, never raised.
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
    :class:`~.recorder.Recorder`: each durable pixel is appended to a
    write-ahead journal on local disk (``./pixel-spool/``) before it is
    answered, and a writer thread commits them to the store in batches; while
    the store fails they wait in the journal.
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
        limits: Limits = DEFAULT_LIMITS,
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
        self.app = app
        # Options, recorder and answers: shared with the ASGI middleware.
        self._endpoint = endpoint = PixelEndpoint(
            owner="PixelMiddleware",
            logger=logger,
            store=store,
            prefix=prefix,
            dialects=dialects,
            write_keys=write_keys,
            trusted_proxies=trusted_proxies,
            limits=limits,
            rudderstack_response=rudderstack_response,
            routes=routes,
            durable=durable,
            on_record=on_record,
            debug_routes=debug_routes,
            unknown_calls=unknown_calls,
        )
        self.on_record = on_record
        self.debug_routes = debug_routes
        self.config = endpoint.config
        self.recorder: Recorder = endpoint.recorder
        #: The store records go to (read it for what was recorded).
        self.store: Store = endpoint.store

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        method: str = environ.get("REQUEST_METHOD", "GET")
        host: str | None = environ.get("HTTP_HOST")
        endpoint = self._endpoint
        if endpoint.debug_routes:
            twin = endpoint.debug_route(path, method=method, host=host)
            if twin is not None:
                return self._answer_debug(environ, start_response, *twin)
        route = endpoint.route(path, method=method, host=host)
        if route is None:
            return self.app(environ, start_response)
        return self._answer_pixel(environ, start_response, route, path, method, host)

    def _answer_pixel(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        route: Route,
        path: str,
        method: str,
        host: str | None,
    ) -> Iterable[bytes]:
        endpoint = self._endpoint
        failure: Exception | None = None
        body = b""
        if route.body:
            try:
                body = _read_body(environ, endpoint.config.limits.max_body_bytes + 1)
            except Exception as exc:
                # The body could not be read: answered as a decoder failure is.
                failure = exc
        request = _pixel_request(environ, method, path, host, body)
        outcome = endpoint.answer(request, route, failure=failure)
        if outcome is None:
            # The core changed its mind about the route: the app may know the
            # path, and gets the body whole, the bytes read here first.
            _give_back_body(environ, body)
            return self.app(environ, start_response)
        status = outcome.status
        start_response(_STATUS_LINES.get(status) or _status_line(status), outcome.headers)
        return [outcome.body]

    def _answer_debug(
        self, environ: WSGIEnvironment, start_response: StartResponse, route: Route, path: str
    ) -> Iterable[bytes]:
        """A debug twin (``/debug<pixel route>``): the verdict as JSON, nothing recorded."""
        endpoint = self._endpoint
        failure: Exception | None = None
        try:
            request = pixel_request_from_environ(
                environ, path, body_limits=endpoint.body_limits(route)
            )
        except Exception as exc:
            request, failure = pixel_request_from_environ(environ, path), exc
        outcome = endpoint.decode(request, route, debug=True, failure=failure)
        if outcome is None:
            _give_back_body(environ, request.body)
            return self.app(environ, start_response)
        status, headers, body = endpoint.debug(outcome, request.method)
        start_response(_status_line(status), headers)
        return [body]

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued, then close the recorder this middleware created
        (which closes its store, a :class:`~.stores.Store` passed in included).

        Waits at most ``timeout`` seconds (``None``: as long as the flush takes;
        see :meth:`.Recorder.close`). A :class:`~.recorder.Recorder` passed in
        as ``store`` is left open: its owner closes it. Without a call to
        ``close()``, the recorder's exit hook flushes at interpreter exit.
        """
        self._endpoint.close(timeout)

    def __repr__(self) -> str:
        return f"<PixelMiddleware {self.app!r} prefix={self.config.prefix!r}>"


def _read_body(environ: WSGIEnvironment, cap: int) -> bytes:
    """At most ``cap`` bytes of the request body.

    Bounded by ``Content-Length``; without one, read only from a server that
    says the input ends (``wsgi.input_terminated``), else nothing.
    """
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


def pixel_request_from_environ(
    environ: WSGIEnvironment, path: str, *, body_limits: Limits | None = None
) -> PixelRequest:
    """What the core is given of a WSGI request for the pixel route ``path``.

    ``body_limits``: the route takes a body (the HTTP API's POST routes), read
    up to these limits (``max_body_bytes + 1`` bytes: one more says "too
    large"); ``None`` reads none (never for a request that is not a pixel: the
    app gets its body untouched).
    """
    return _pixel_request(
        environ,
        environ.get("REQUEST_METHOD", "GET"),
        path,
        environ.get("HTTP_HOST"),
        b"" if body_limits is None else _read_body(environ, body_limits.max_body_bytes + 1),
    )


def _pixel_request(
    environ: WSGIEnvironment, method: str, path: str, host: str | None, body: bytes
) -> PixelRequest:
    """:func:`~pixel_middleware._adapter.pixel_request` for WSGI, the headers read
    straight from ``environ`` (no mapping of them built per pixel): the fields
    as :func:`~pixel_middleware._adapter.pixel_request` passes them."""
    get = environ.get
    return PixelRequest(
        method,
        path,
        _query_bytes(get("QUERY_STRING", "")),
        get("REMOTE_ADDR"),
        get("HTTP_USER_AGENT"),
        get("HTTP_X_FORWARDED_FOR"),
        get("HTTP_REFERER"),
        body=body,
        content_encoding=get("HTTP_CONTENT_ENCODING"),
        authorization=get("HTTP_AUTHORIZATION"),
        host=host,
    )


class _ReplayedInput:
    """``wsgi.input`` for the app after the middleware read part of the body:
    the bytes already read, then the rest of the original stream."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = io.BytesIO(head)
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            rest: bytes = self._rest.read() if self._rest is not None else b""
            return self._head.read() + rest
        data = self._head.read(size)
        if len(data) < size and self._rest is not None:
            more: bytes = self._rest.read(size - len(data))
            data += more
        return data

    def readline(self, size: int = -1) -> bytes:
        line = self._head.readline(size)
        if line.endswith(b"\n") or self._rest is None or (0 <= size <= len(line)):
            return line
        more: bytes = self._rest.readline(-1 if size < 0 else size - len(line))
        return line + more

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def _give_back_body(environ: WSGIEnvironment, read: bytes) -> None:
    if read:
        environ["wsgi.input"] = _ReplayedInput(read, environ.get("wsgi.input"))


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
