"""The ASGI middleware: answers and records tracking pixels in front of any ASGI app.

The same options, records and answers as the WSGI
:class:`~pixel_middleware.middleware.PixelMiddleware` (both are thin adapters over
:class:`pixel_middleware._adapter.PixelEndpoint`), for FastAPI, Starlette, Django's
``asgi.py`` and any other ASGI 3 application. Stdlib only.

The event loop never waits on a store, nor on a long decode: a pixel is decoded
on the loop (pure and quick), a body above :data:`DECODE_ON_LOOP_BYTES` or a
compressed one in a worker thread; the records are handed to the recorder from
a worker thread, awaited (durable), or queued at once when that needs no
waiting (``durable=False``, see :meth:`~pixel_middleware.recorder.Recorder.offer`).
A request body is read (``http.request`` messages) only for a route that takes
one, and never more than the limits allow.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Literal

from pixel_middleware._adapter import (
    DEFAULT_LIMITS,
    REQUEST_HEADERS,
    PixelEndpoint,
    pixel_request,
)
from pixel_middleware.core import (
    DEFAULT_DIALECTS,
    Limits,
    PixelOutcome,
    PixelRecord,
    PixelRequest,
    Route,
)
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store

__all__ = ["DECODE_ON_LOOP_BYTES", "KEEP_THREADS", "SHUTDOWN_TIMEOUT", "PixelASGIMiddleware"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds the recorder is given, at lifespan shutdown, to write what is queued.
SHUTDOWN_TIMEOUT: Final = 10.0

#: The most pixels that wait for their records to be kept at once, each in a
#: thread of the middleware's own pool (so that a slow store never holds the
#: threads the app or the event loop's default executor need). More wait their
#: turn in the pool's queue; concurrent ones share a commit.
KEEP_THREADS: Final = 16

# The headers the core reads, as ASGI names them (lower-case bytes).
_READ_HEADERS: Final = {name.encode("ascii"): name for name in REQUEST_HEADERS}
#: The largest request body decoded on the event loop. Decoding a larger one
#: (up to ``Limits.max_body_bytes``, 500 KiB by default: milliseconds of JSON)
#: runs in a worker thread, so the loop keeps serving other requests meanwhile;
#: below it the hand-over to a thread would cost more than the decode.
DECODE_ON_LOOP_BYTES: Final = 16 * 1024

_SHUTDOWN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class PixelASGIMiddleware:
    """Answer and record Segment- and RudderStack-style tracking pixels, for ASGI apps.

    Takes the same options as :class:`~pixel_middleware.middleware.PixelMiddleware`
    and gives the same answers and records. HTTP requests to a pixel route (and
    POSTs to the HTTP API routes, ``/v1/batch`` and the like, whose body is
    read, at most ``limits.max_body_bytes + 1`` bytes of it) are answered here;
    every other request, every websocket and every lifespan message goes to
    ``app`` untouched, its body stream unread.

    :param app: The ASGI application to wrap.
    :param store: A store URL, a :class:`~.stores.Store` or a
        :class:`~.recorder.Recorder` you manage (``None``: ``PIXEL_STORE``, else
        ``sqlite:///pixel-events.sqlite3``).
    :param prefix, dialects, write_keys, trusted_proxies, limits,
        rudderstack_response, routes, debug_routes, unknown_calls: As for
        ``PixelMiddleware``.
    :param durable: ``True`` answers a pixel once its record is committed (the
        wait runs in a worker thread and is awaited); ``False`` queues it without
        a thread and answers at once.
    :param on_record: Called with each record once it was kept (as for
        ``PixelMiddleware``: not with one answered ``503``), on the event loop:
        keep it quick. Its exceptions are logged, never raised.

    .. code-block:: python

        # FastAPI or Starlette
        app.add_middleware(PixelASGIMiddleware, write_keys={"YOUR_WRITE_KEY"})

        # Django, in asgi.py
        application = PixelASGIMiddleware(get_asgi_application())

    Shutdown: at ``lifespan.shutdown`` the app's own shutdown runs first; when it
    reports back, the recorder this middleware made is flushed and closed (one
    passed in is flushed), within :data:`SHUTDOWN_TIMEOUT` seconds, in a thread,
    and then the app's message goes to the server. An app that does not speak
    lifespan (Django's raises for it; others just return) gets the lifespan
    messages all the same; then the middleware answers them itself, so that the
    flush still runs at shutdown. A server run without lifespan (``uvicorn
    --lifespan off``) sends none: the recorder then flushes at interpreter exit.
    """

    def __init__(
        self,
        app: ASGIApp,
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
                f"PixelASGIMiddleware: app must be an ASGI application (a callable), got"
                f" {type(app).__name__}"
            )
        self.app = app
        self._endpoint = endpoint = PixelEndpoint(
            owner="PixelASGIMiddleware",
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
        self.debug_routes = debug_routes
        self.config = endpoint.config
        self.recorder: Recorder = endpoint.recorder
        #: The store records go to (read it for what was recorded).
        self.store: Store = endpoint.store
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = _path(scope)
            method: str = scope["method"]
            headers = _headers(scope)
            endpoint = self._endpoint
            host = headers.get("host")
            twin = endpoint.debug_route(path, method=method, host=host)
            if twin is not None:
                mirrored, real_path = twin
                app_receive = await self._answer(
                    scope, receive, send, mirrored, real_path, headers, True
                )
            else:
                route = endpoint.route(path, method=method, host=host)
                if route is None:
                    await self.app(scope, receive, send)
                    return
                app_receive = await self._answer(scope, receive, send, route, path, headers, False)
            if app_receive is not None:
                await self.app(scope, app_receive, send)
            return
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        path: str,
        headers: Mapping[str, str | None],
        debug: bool,
    ) -> Receive | None:
        """Answer the pixel (or its debug twin) and return ``None``; or, when the app
        should have the request after all, the ``receive`` to hand it with."""
        endpoint = self._endpoint
        cap = endpoint.body_cap(route)
        taken: list[Message] = []  # the body's messages, read from ``receive``
        body = b""
        failure: Exception | None = None
        if cap is not None:
            try:
                body = await _read_body(receive, cap, taken)
            except Exception as exc:
                # The body could not be read: answered as a decoder failure is.
                failure = exc
        request = pixel_request(
            scope["method"], path, scope.get("query_string", b""), _peer(scope), headers, body=body
        )
        if _decodes_in_a_thread(body, request.content_encoding):
            outcome = await asyncio.to_thread(
                endpoint.decode, request, route, debug=debug, failure=failure
            )
        else:
            outcome = endpoint.decode(request, route, debug=debug, failure=failure)
        if outcome is None:
            # The core changed its mind about the route: the app gets the request,
            # with what was read of its body first.
            return _replaying(taken, receive) if taken else receive
        if debug:
            status, answer_headers, answer_body = endpoint.debug(outcome, request.method)
        else:
            outcome = await self._settle(outcome, route, request)
            status, answer_headers, answer_body = outcome.status, outcome.headers, outcome.body
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_encoded(header) for header in answer_headers],
            }
        )
        await send({"type": "http.response.body", "body": answer_body})
        return None

    async def _settle(
        self, outcome: PixelOutcome, route: Route, request: PixelRequest
    ) -> PixelOutcome:
        """Keep every record of ``outcome``; the answer to send (``503`` if any was not kept)."""
        if not outcome.records:
            return outcome
        kept = await self._keep(outcome.records)
        return self._endpoint.settle(outcome, route, request.method, kept=kept)

    async def _keep(self, records: Sequence[PixelRecord]) -> list[bool]:
        """Whether each record was kept, without blocking the event loop.

        Each is queued at once when that needs no waiting; the rest (all, when
        durable) are kept in order from one worker thread.
        """
        kept: list[bool] = []
        waiting: list[PixelRecord] = []
        for record in records:
            try:
                offered = self.recorder.offer(record)
            except Exception:
                # offer() is documented never to raise; the thread's record() says why.
                logger.exception("queueing pixel %s failed", record.get("id"))
                offered = False
            kept.append(offered)
            if not offered:
                waiting.append(record)
        if not waiting:
            return kept
        loop = asyncio.get_running_loop()
        kept_late = iter(
            await loop.run_in_executor(self._threads(), self._endpoint.keep_each, waiting)
        )
        return [offered or next(kept_late) for offered in kept]

    def _threads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(KEEP_THREADS, thread_name_prefix="pixel-asgi-keep")
            return self._pool

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan on to the app; flush once its shutdown is done."""
        taken: list[str] = []  # the message types the app received
        answered = False  # whether the app sent any lifespan message

        async def app_receive() -> Message:
            message = await receive()
            taken.append(message["type"])
            return message

        async def app_send(message: Message) -> None:
            nonlocal answered
            answered = True
            if message["type"] in _SHUTDOWN_DONE:
                await self._flush_at_shutdown()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception as exc:
            if answered:
                # The app speaks lifespan and failed in it: the server hears of it.
                if "lifespan.shutdown" in taken:
                    await self._flush_at_shutdown()
                raise
            logger.info(
                "the app does not support ASGI lifespan (%s); pixel-middleware answers"
                " lifespan itself so that it can flush its records at shutdown",
                type(exc).__name__,
            )
        else:
            if answered:
                return
            logger.info(
                "the app ignored ASGI lifespan; pixel-middleware answers it itself so that"
                " it can flush its records at shutdown"
            )
        await self._answer_lifespan(receive, send, taken)

    async def _answer_lifespan(self, receive: Receive, send: Send, taken: list[str]) -> None:
        """Speak lifespan for an app that does not: start at once, flush at shutdown.

        ``taken``: the messages the app received (and left unanswered) before it
        gave up on lifespan; they are answered first.
        """
        if "lifespan.startup" in taken:
            await send({"type": "lifespan.startup.complete"})
        if "lifespan.shutdown" in taken:
            await self._flush_at_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._flush_at_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_at_shutdown(self) -> None:
        try:
            await asyncio.to_thread(self._flush, SHUTDOWN_TIMEOUT)
        except Exception:
            logger.exception("flushing the pixel records at shutdown failed")

    def _flush(self, timeout: float) -> None:
        if self._endpoint.owns_recorder:
            self.close(timeout)
        elif not self.recorder.flush(timeout):
            logger.error(
                "pixel records still queued after %ss at shutdown; the recorder's owner closes it",
                timeout,
            )

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued, then close the recorder this middleware created
        (which closes its store, a :class:`~.stores.Store` passed in included).

        Waits at most ``timeout`` seconds (``None``: as long as the flush takes).
        A :class:`~.recorder.Recorder` passed in as ``store`` is left open. Lifespan
        shutdown calls it; call it yourself when the server sends no lifespan.
        """
        self._endpoint.close(timeout)
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            # Its threads end once the records they wait for are settled.
            pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"<PixelASGIMiddleware {self.app!r} prefix={self.config.prefix!r}>"


def _path(scope: Scope) -> str:
    """The path as a WSGI server fills ``PATH_INFO``: below the mount point, as latin-1.

    ASGI servers put ``root_path`` (uvicorn's ``--root-path``) in front of
    ``path``, where WSGI keeps it apart in ``SCRIPT_NAME``: it is cut off, so that
    routes and ``prefix`` mean the same under both. ``path`` is decoded as UTF-8;
    its bytes read as latin-1 are what the core expects.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        path = path[len(root) :]
    if path.isascii():
        return path  # the same text either way; no copies
    return path.encode("utf-8", "surrogateescape").decode("latin-1")


async def _read_body(receive: Receive, cap: int, taken: list[Message]) -> bytes:
    """At most ``cap`` bytes of the request body, from its ``http.request``
    messages; each message read is added to ``taken``.

    Stops at the last message (``more_body`` false), at ``http.disconnect`` (what
    came before is the body), or once ``cap`` bytes are in: the rest stays unread.
    """
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        message = await receive()
        taken.append(message)
        if message["type"] != "http.request":
            break
        chunk = bytes(message.get("body", b""))
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)[:cap]


def _decodes_in_a_thread(body: bytes, content_encoding: str | None) -> bool:
    """Whether decoding a request with ``body`` would hold the event loop too long:
    a body above :data:`DECODE_ON_LOOP_BYTES`, or any compressed one (a small gzip
    body may inflate to ``Limits.max_decompressed_bytes``)."""
    if not body:
        return False
    if len(body) > DECODE_ON_LOOP_BYTES:
        return True
    return content_encoding is not None and content_encoding.strip().lower() not in (
        "",
        "identity",
    )


# Answer headers as ASGI sends them (latin-1 bytes), by their text: the core's
# answers use a few dozen distinct headers, so each is encoded once. Bounded, for
# the headers that vary (a debug twin's Content-Length).
_ENCODED_HEADERS: dict[tuple[str, str], tuple[bytes, bytes]] = {}
_MAX_ENCODED_HEADERS: Final = 512


def _encoded(header: tuple[str, str]) -> tuple[bytes, bytes]:
    encoded = _ENCODED_HEADERS.get(header)
    if encoded is None:
        name, value = header
        encoded = (name.encode("latin-1"), value.encode("latin-1"))
        if len(_ENCODED_HEADERS) < _MAX_ENCODED_HEADERS:
            _ENCODED_HEADERS[header] = encoded
    return encoded


def _replaying(taken: Sequence[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives the messages already taken, then the rest of ``receive``'s."""
    pending = list(taken)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _headers(scope: Scope) -> dict[str, str | None]:
    """The headers the core reads, as WSGI text (latin-1); repeated ones joined by ","."""
    found: dict[str, str | None] = {}
    for name, value in scope.get("headers", ()):
        # ASGI servers send lower-case bytes: looked up as they are, with no copy;
        # anything else (upper case, a bytearray) is lowered first.
        if type(name) is bytes and name.islower():
            key = _READ_HEADERS.get(name)
        else:
            key = _READ_HEADERS.get(bytes(name).lower())
        if key is None:
            continue
        text = (value if type(value) is bytes else bytes(value)).decode("latin-1")
        earlier = found.get(key)
        found[key] = text if earlier is None else f"{earlier},{text}"
    return found
