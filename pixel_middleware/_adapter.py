"""What every web-server adapter (WSGI, ASGI) shares, written once.

An adapter asks a :class:`PixelEndpoint` which route a request names
(:meth:`~PixelEndpoint.route`, or :meth:`~PixelEndpoint.debug_route` for a
debug twin), reads the request into a :class:`~pixel_middleware.core.PixelRequest`
with :func:`pixel_request` (its body only when the route takes one, at most
:meth:`~PixelEndpoint.body_cap` bytes), and hands it back to the endpoint, which
holds the options, the core's config and the recorder, and decides the answer:
the core's, the default one when the core fails (with a record saying why),
``503`` when a record could not be kept, or a debug twin's JSON. The adapter
only reads and sends the way its server wants, and chooses how to wait for the
recorder (the WSGI middleware in the request's thread, the ASGI one off the
event loop).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pixel_middleware.core import (
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

__all__ = ["DEFAULT_LIMITS", "REQUEST_HEADERS", "PixelEndpoint", "pixel_request"]

DEFAULT_LIMITS = Limits()

#: The request headers the core reads (lower-case): the record keeps the first
#: three; the HTTP API routes read the body's encoding, the write key from
#: Basic auth, and the host custom routes may name.
REQUEST_HEADERS: Final = (
    "user-agent",
    "x-forwarded-for",
    "referer",
    "content-encoding",
    "authorization",
    "host",
)

_DEBUG_PREFIX: Final = DEBUG_ROOT + "/"

# How much of an exception's text (and of an unknown call's name) the fallback
# record keeps: an exception may quote request data.
_MAX_FAILURE_CHARS = 200


def pixel_request(
    method: str,
    path: str,
    query: bytes,
    peer: str | None,
    headers: Mapping[str, str | None],
    *,
    body: bytes = b"",
) -> PixelRequest:
    """The core's view of a request.

    ``path`` as a WSGI server fills ``PATH_INFO`` (percent-decoded bytes read
    as latin-1), ``query`` the raw query bytes, ``headers`` those of
    :data:`REQUEST_HEADERS` the request has, by lower-case name, as latin-1 text
    (several ``X-Forwarded-For`` headers joined with ``","``). ``body``: what
    was read of the body, for a route that takes one (else none).
    """
    return PixelRequest(
        method,
        path,
        query,
        peer,
        headers.get("user-agent"),
        headers.get("x-forwarded-for"),
        headers.get("referer"),
        body=body,
        content_encoding=headers.get("content-encoding"),
        authorization=headers.get("authorization"),
        host=headers.get("host"),
    )


class PixelEndpoint:
    """The options, config and recorder of one middleware, and how it answers a pixel.

    ``owner`` names the middleware in error messages; its log lines go to
    ``logger`` (the adapter's own module logger).
    """

    def __init__(
        self,
        *,
        owner: str,
        logger: logging.Logger,
        store: str | Store | Recorder | None,
        prefix: str,
        dialects: Iterable[str],
        write_keys: Iterable[str] | None,
        trusted_proxies: int,
        limits: Limits,
        rudderstack_response: Literal["seed", "gif"],
        routes: Mapping[str, str] | None,
        durable: bool,
        on_record: Callable[[PixelRecord], None] | None,
        debug_routes: bool,
        unknown_calls: Literal["pass", "reject"],
    ) -> None:
        if on_record is not None and not callable(on_record):
            raise TypeError(
                f"{owner}: on_record must be a callable taking a record, got"
                f" {type(on_record).__name__}"
            )
        if not isinstance(debug_routes, bool):
            raise TypeError(f"{owner}: debug_routes must be True or False, got {debug_routes!r}")
        self.logger = logger
        self.on_record = on_record
        self.debug_routes = debug_routes
        self.config = _build_config(
            owner,
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
        self.store: Store
        if isinstance(store, Recorder):
            self.recorder = store
            self.store = store.store
            self.owns_recorder = False
        else:
            if store is None or isinstance(store, str):
                # Opened here, so that a wrong URL fails at construction.
                store = open_store(store)
            elif not (
                callable(getattr(store, "write", None)) and callable(getattr(store, "read", None))
            ):
                raise TypeError(
                    f"{owner}: store must be a store URL such as"
                    f" 'sqlite:///pixel-events.sqlite3', a Store or a Recorder;"
                    f" got {type(store).__name__}"
                )
            self.store = store
            self.recorder = Recorder(store, durable=durable)
            self.owns_recorder = True

    def route(self, path: str, *, method: str, host: str | None) -> Route | None:
        """The pixel route ``path`` names; ``None`` (the app's) when it names none.

        ``method`` and ``host`` matter: the HTTP API routes are POST only, and a
        custom route may name a host.
        """
        try:
            return match_route(path, self.config, method=method, host=host)
        except Exception:
            # Not knowing whether the path is ours, leave it to the app.
            self.logger.exception("pixel route matching failed for %r; passing it on", path)
            return None

    def debug_route(self, path: str, *, method: str, host: str | None) -> tuple[Route, str] | None:
        """The route a debug twin's ``path`` (``/debug<pixel route>``) mirrors, and that
        route's path; ``None`` (the app's) without ``debug_routes`` or a route."""
        if not self.debug_routes or not path.startswith(_DEBUG_PREFIX):
            return None
        real_path = path[len(DEBUG_ROOT) :]
        route = self.route(real_path, method=method, host=host)
        return None if route is None else (route, real_path)

    def body_limits(self, route: Route) -> Limits | None:
        """The limits to read ``route``'s body to; ``None``: it takes none, read none."""
        return self.config.limits if route.body else None

    def body_cap(self, route: Route) -> int | None:
        """How many body bytes to read for ``route``: one more than a body may have
        (so the core can say "too large"); ``None``: the route takes no body, read none."""
        return self.config.limits.max_body_bytes + 1 if route.body else None

    def decode(
        self,
        request: PixelRequest,
        route: Route,
        *,
        debug: bool = False,
        failure: Exception | None = None,
    ) -> PixelOutcome | None:
        """The core's answer and records; ``None`` when the app should have the request.

        Never raises: when the core fails, the dialect's normal answer and a
        record saying why (``internal_error``). ``failure``: reading the request
        failed already (``request`` is then what could be read without the
        body): that answer at once, the record naming ``failure``.
        """
        now = datetime.now(UTC)
        if failure is None:
            try:
                # The route this front end matched for the request already.
                return decode_pixel(request, config=self.config, now=now, route=route)
            except Exception as exc:
                failure = exc
        self.logger.error(
            "decoding the %s %s failed; answering the default",
            "debug pixel" if debug else "pixel",
            request.path,
            exc_info=failure,
        )
        return self._fallback_outcome(request, route, now, failure)

    def debug(self, outcome: PixelOutcome, method: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """A debug twin's answer to ``outcome``: the verdict as JSON, nothing recorded."""
        status, headers, body = debug_answer(outcome)
        return status, headers, b"" if method == "HEAD" else body

    def keep(self, record: PixelRecord) -> bool:
        """Hand ``record`` to the recorder, waiting as it does; whether it was kept."""
        try:
            return self.recorder.record(record)
        except Exception:
            # Recorder.record() is documented never to raise; a pixel still must not
            # 500. Whether it was kept is unknown: the bug is logged, the answer normal.
            self.logger.exception("recording pixel %s failed", record.get("id"))
            return True

    def keep_each(self, records: Sequence[PixelRecord]) -> list[bool]:
        """Hand every record to the recorder, in order, even after one could not be
        kept (each that can be, is); whether each was kept."""
        return [self.keep(record) for record in records]

    def settle(
        self, outcome: PixelOutcome, route: Route, method: str, *, kept: Sequence[bool]
    ) -> PixelOutcome:
        """Tell ``on_record`` of each record that was kept (``kept``: whether each of
        ``outcome.records`` was); the answer to send: ``503`` if any was not.

        A record that was not kept is not passed on: its pixel is answered ``503``
        so that the client sends it again, and ``on_record`` hears of that copy
        once it is kept. A callback counting or forwarding records so hears of a
        pixel once, when its answer says it was kept.
        """
        on_record = self.on_record
        if on_record is not None:
            for record, was_kept in zip(outcome.records, kept, strict=True):
                if not was_kept:
                    continue
                try:
                    on_record(record)
                except Exception:
                    self.logger.exception(
                        "on_record callback failed for pixel %s", record.get("id")
                    )
        if outcome.records and not all(kept):
            return not_kept_answer(route, method, self.config)
        return outcome

    def answer(
        self, request: PixelRequest, route: Route, *, failure: Exception | None = None
    ) -> PixelOutcome | None:
        """Decode, keep (waiting in this thread) and settle: the whole of a request
        (``failure`` as for :meth:`decode`)."""
        outcome = self.decode(request, route, failure=failure)
        if outcome is None:
            return None
        records = outcome.records
        if not records:
            return outcome
        # One record (every pixel): no list comprehension, no callback loop.
        kept = [self.keep(records[0])] if len(records) == 1 else self.keep_each(records)
        if self.on_record is None and all(kept):
            return outcome
        return self.settle(outcome, route, request.method, kept=kept)

    def close(self, timeout: float | None = None) -> None:
        """Close the recorder if this endpoint made it (see the adapters' ``close``)."""
        if self.owns_recorder:
            self.recorder.close(timeout)

    def _fallback_outcome(
        self, request: PixelRequest, route: Route, now: datetime, exc: Exception
    ) -> PixelOutcome:
        """The dialect's normal answer, and a record saying why, when decoding crashed.

        Everything copied from the request is cut as the core cuts it, so that
        not even this record can grow with the request.
        """
        method = request.method
        outcome = default_answer(route, method, self.config)
        if method != "GET" and not route.body:
            return outcome  # HEAD and other methods make no record
        limits = self.config.limits
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
                "path": request.path[: limits.max_header_chars],
                # As the core shows a query: its bytes read as UTF-8, cut first.
                "query": request.query[: limits.max_query_bytes].decode(
                    "utf-8", "backslashreplace"
                ),
                "ip": _capped(request.peer, limits.max_header_chars),
                "userAgent": _capped(request.user_agent, limits.max_header_chars),
                "referer": _capped(request.referer, limits.max_header_chars),
            },
        }
        return PixelOutcome(outcome.status, outcome.headers, outcome.body, record)


def _build_config(
    owner: str,
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
        raise ValueError(f"{owner}: {exc}") from exc


def _as_set(values: Iterable[str]) -> Any:
    # Lists and tuples are welcome here; a bare string (an easy slip for
    # dialects="segment") is left as it is for PixelConfig to refuse.
    if isinstance(values, str) or not isinstance(values, Iterable):
        return values
    return frozenset(values)


def _capped(value: str | None, max_chars: int) -> str | None:
    return None if value is None else value[:max_chars]
