"""What every web-server adapter (WSGI, ASGI) shares, written once.

An adapter reads its server's request (a WSGI environ, an ASGI scope) into a
:class:`~pixel_middleware.core.PixelRequest` with :func:`pixel_request`, and
hands it to a :class:`PixelEndpoint`, which holds the options, the core's
config and the recorder, and decides the answer: the core's, the default one
when the core fails (with a record saying why), or ``503`` when the record
could not be kept. The adapter only sends that answer the way its server
wants it, and chooses how to wait for the recorder (the WSGI middleware in the
request's thread, the ASGI one off the event loop).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

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
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import Store, open_store

__all__ = ["DEFAULT_LIMITS", "PixelEndpoint", "pixel_request"]

DEFAULT_LIMITS = Limits()

# How much of an exception's text (and of an unknown call's name) the fallback
# record keeps: an exception may quote request data.
_MAX_FAILURE_CHARS = 200


def pixel_request(
    method: str, path: str, query: bytes, peer: str | None, headers: Mapping[str, str | None]
) -> PixelRequest:
    """The core's view of a request.

    ``path`` as a WSGI server fills ``PATH_INFO`` (percent-decoded bytes read
    as latin-1), ``query`` the raw query bytes, ``headers`` the few the record
    keeps, by lower-case name, as latin-1 text (several ``X-Forwarded-For``
    headers joined with ``","``).
    """
    return PixelRequest(
        method,
        path,
        query,
        peer,
        headers.get("user-agent"),
        headers.get("x-forwarded-for"),
        headers.get("referer"),
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
        durable: bool,
        on_record: Callable[[PixelRecord], None] | None,
    ) -> None:
        if on_record is not None and not callable(on_record):
            raise TypeError(
                f"{owner}: on_record must be a callable taking a record, got"
                f" {type(on_record).__name__}"
            )
        self.logger = logger
        self.on_record = on_record
        self.config = _build_config(
            owner,
            prefix=prefix,
            dialects=dialects,
            write_keys=write_keys,
            trusted_proxies=trusted_proxies,
            limits=limits,
            rudderstack_response=rudderstack_response,
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

    def route(self, path: str) -> Route | None:
        """The pixel route ``path`` names; ``None`` (the app's) when it names none."""
        try:
            return match_route(path, self.config)
        except Exception:
            # Not knowing whether the path is ours, leave it to the app.
            self.logger.exception("pixel route matching failed for %r; passing it on", path)
            return None

    def decode(self, request: PixelRequest, route: Route) -> PixelOutcome | None:
        """The core's answer and record; ``None`` when the app should have the request.

        Never raises: when the core fails, the dialect's normal answer and a
        record saying why (``internal_error``).
        """
        now = datetime.now(UTC)
        try:
            return decode_pixel(request, config=self.config, now=now)
        except Exception as exc:
            self.logger.exception(
                "decoding the pixel %s failed; answering the default", request.path
            )
            return self._fallback_outcome(request, route, now, exc)

    def keep(self, record: PixelRecord) -> bool:
        """Hand ``record`` to the recorder, waiting as it does; whether it was kept."""
        try:
            return self.recorder.record(record)
        except Exception:
            # Recorder.record() is documented never to raise; a pixel still must not
            # 500. Whether it was kept is unknown: the bug is logged, the answer normal.
            self.logger.exception("recording pixel %s failed", record.get("id"))
            return True

    def settle(
        self, outcome: PixelOutcome, route: Route, method: str, *, kept: bool
    ) -> PixelOutcome:
        """Tell ``on_record``; the answer to send once the record was (or was not) kept."""
        record = outcome.record
        if record is not None and self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:
                self.logger.exception("on_record callback failed for pixel %s", record.get("id"))
        if record is not None and not kept:
            return not_kept_answer(route, method, self.config)
        return outcome

    def answer(self, request: PixelRequest, route: Route) -> PixelOutcome | None:
        """Decode, keep (waiting in this thread) and settle: the whole of a pixel."""
        outcome = self.decode(request, route)
        if outcome is None or outcome.record is None:
            return outcome
        return self.settle(outcome, route, request.method, kept=self.keep(outcome.record))

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
        if method != "GET":
            return outcome
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
