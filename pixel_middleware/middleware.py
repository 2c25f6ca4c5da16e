"""The WSGI middleware: answers and records tracking pixels in front of any app.

A thin adapter over :mod:`pixel_middleware.core`: it reads the few environ keys
the core needs, lets the core decode the pixel, hands the record to a
:class:`~pixel_middleware.recorder.Recorder` and sends the core's answer. Every
other request goes to the wrapped application untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Literal

from pixel_middleware._adapter import DEFAULT_LIMITS, PixelEndpoint, pixel_request
from pixel_middleware.core import DIALECTS, Limits, PixelRecord, Route
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
    ``prefix``) are decoded, checked and recorded, and answered as the reference
    systems answer them; every other request is passed to ``app`` untouched.
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
    :param durable: ``True`` (the default) answers a pixel only once its record
        is committed; ``False`` queues it and answers at once (faster; a crash
        loses what is queued). Ignored when ``store`` is a Recorder.
    :param on_record: Called with each record after it is handed to the store,
        in the request's thread. Its exceptions are logged, never raised.

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
        dialects: Iterable[str] = DIALECTS,
        write_keys: Iterable[str] | None = None,
        trusted_proxies: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        rudderstack_response: Literal["seed", "gif"] = "seed",
        durable: bool = True,
        on_record: Callable[[PixelRecord], None] | None = None,
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
            durable=durable,
            on_record=on_record,
        )
        self.on_record = on_record
        self.config = endpoint.config
        self.recorder: Recorder = endpoint.recorder
        #: The store records go to (read it for what was recorded).
        self.store: Store = endpoint.store

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        route = self._endpoint.route(path)
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
        request = pixel_request(
            environ.get("REQUEST_METHOD", "GET"),
            path,
            _query_bytes(environ.get("QUERY_STRING", "")),
            environ.get("REMOTE_ADDR"),
            {
                "user-agent": environ.get("HTTP_USER_AGENT"),
                "x-forwarded-for": environ.get("HTTP_X_FORWARDED_FOR"),
                "referer": environ.get("HTTP_REFERER"),
            },
        )
        outcome = self._endpoint.answer(request, route)
        if outcome is None:
            # The core changed its mind about the route: the app may know the path.
            return self.app(environ, start_response)
        start_response(_status_line(outcome.status), outcome.headers)
        return [outcome.body]

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
