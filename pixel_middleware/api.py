"""The collector's JSON API (``/api/...``).

Mounted by :func:`pixel_middleware.collector.create_app`; documented with curl
examples in ``docs/api.md``. Every answer is JSON, bounded in size
(:data:`MAX_ANSWER_BYTES`), and never a 500: a parameter that is not valid
gets a 400 with a fixed message that does not repeat what was sent.

- ``GET /api/status``: the store's kind and redacted URL, the spool, what the
  page needs to send a test pixel;
- ``GET /api/events``: records by filter (:mod:`pixel_middleware.record_filter`),
  by position (``after``) or time (``since``), newest or oldest first, with
  ``wait=`` to long-poll for new ones;
- ``GET /api/counts``: how many match, by verdict, call, event name and rule;
- ``POST /api/reset``: clears the store (the memory store, or when allowed);
- ``GET /api/wait``: returns once ``count`` matching records exist, or says
  what did arrive and what nearly matched;

The debug twins of the pixel routes (``/debug/<pixel route>``) are answered by
the pixel middleware itself (:mod:`pixel_middleware.debug_twin`), in front of
this API.

Stores filter only on ``accepted``, ``call`` and position; the other filters
run here, over the store read in pages from its newest end (at most
:data:`MAX_SCAN` records per answer, which says whether it saw them all).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Request, Response

from pixel_middleware.core import (
    DIALECTS,
    PixelConfig,
    PixelRecord,
)
from pixel_middleware.encode import encode_pixel_url
from pixel_middleware.record_filter import (
    FILTER_PARAMS,
    FilterError,
    RecordFilter,
    count_records,
    is_filter_param,
    parse_filter,
    received_at,
)
from pixel_middleware.stores import Store, StoreError, redact_url, redacted_error

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_ANSWER_BYTES",
    "MAX_LIMIT",
    "MAX_SCAN",
    "MAX_WAIT_SECONDS",
    "CollectorAPI",
    "RecordSignal",
]

logger = logging.getLogger(__name__)

#: Records in one answer of /api/events unless ``limit`` says otherwise.
DEFAULT_LIMIT: Final = 100
#: The most records one answer lists.
MAX_LIMIT: Final = 1000
#: The most bytes one answer holds; past it, records are left out (``truncated``).
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
#: The most records one answer reads from the store to filter and count.
MAX_SCAN: Final = 100_000
#: The longest ``timeout`` of /api/wait and ``wait`` of /api/events, in seconds.
MAX_WAIT_SECONDS: Final = 60.0
#: The most requests waiting at once: each holds one of the server's threads.
MAX_WAITERS: Final = 4
#: The most query parameters one request may carry.
MAX_PARAMS: Final = 60
#: Records shown as near misses by /api/wait.
NEAREST: Final = 10

# How far back in time past `since` a scan goes on: records are kept in the
# order they were committed, which may differ from receivedAt by a little.
_SINCE_MARGIN: Final = timedelta(seconds=60)
# The fallback re-check of a wait, for records written by another process.
_RECHECK_SECONDS: Final = 0.5
_FIRST_PAGE: Final = 500

_JSON_HEADERS: Final = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
]

_PAGING = ("after", "limit", "order", "wait")
_ROUTE_PARAMS: Final[dict[str, tuple[str, ...]]] = {
    "/api/status": (),
    "/api/events": _PAGING,
    "/api/counts": ("after",),
    "/api/reset": (),
    "/api/wait": ("after", "count", "timeout"),
}
_ROUTE_METHODS: Final[dict[str, tuple[str, ...]]] = {
    "/api/reset": ("POST",),
}


class RecordSignal:
    """Wakes the requests waiting for new records; :meth:`notify` on each record.

    The collector calls it from the middleware's ``on_record`` hook, after
    the record was handed to the store.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Changes each time records arrive."""
        with self._condition:
            return self._generation

    def notify(self, record: object = None) -> None:
        del record
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def wait(self, generation: int, timeout: float) -> None:
        """Return once records arrived since ``generation`` was read, or after ``timeout``."""
        with self._condition:
            if self._generation == generation:
                self._condition.wait(max(0.0, timeout))


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class _Selection:
    """What a scan of the store found."""

    #: Matching records with their positions, oldest first.
    matching: list[tuple[str, PixelRecord]]
    #: Every record read (matching or not), oldest first.
    scanned: list[tuple[str, PixelRecord]]
    #: Whether every record that could match was read.
    complete: bool


class CollectorAPI:
    """The JSON API: a WSGI app for ``/api/...`` paths.

    :param store: The records' store.
    :param config: The pixel routes' config (the test pixel is built for it).
    :param spooled: Returns how many records wait in the spool.
    :param stalled: Returns whether records cannot be kept now: neither the
        store nor the spool takes writes (``Recorder.stalled``).
    :param signal: Notified on each new record; waits wake on it.
    :param allow_reset: Whether ``POST /api/reset`` may clear a store that
        is not ``memory://``.
    """

    def __init__(
        self,
        *,
        store: Store,
        config: PixelConfig,
        spooled: Callable[[], int],
        signal: RecordSignal,
        allow_reset: bool = False,
        example_write_key: str = "demo-write-key",
        stalled: Callable[[], bool] = lambda: False,
    ) -> None:
        if not isinstance(allow_reset, bool):
            raise TypeError(f"allow_reset must be True or False, got {allow_reset!r}")
        self.store = store
        self.config = config
        self.spooled = spooled
        self.stalled = stalled
        self.signal = signal
        self.allow_reset = allow_reset
        self.example_write_key = example_write_key
        self._waiters = threading.BoundedSemaphore(MAX_WAITERS)

    def handles(self, path: str) -> bool:
        """Whether ``path`` is one of this API's (``/api/...``)."""
        return path.startswith("/api/")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            status, value, headers = self._route(request)
        except _BadRequest as exc:
            status, value, headers = exc.status, {"error": exc.message}, []
        except StoreError as exc:
            # The store's message may hold a path or a host: it goes to the log
            # only, with passwords and secret parameters masked.
            logger.warning("the collector API could not read the store: %s", redacted_error(exc))
            status, value, headers = 503, {"error": "the store could not be read"}, []
        except Exception as exc:
            # No traceback: a store's exception text may carry its URL's secrets.
            logger.error(
                "the collector API failed: %s: %s", type(exc).__name__, redacted_error(exc)
            )
            status, value, headers = 500, {"error": "internal error"}, []
        body = _json(value)
        response = Response(body, status=status, content_type="application/json")
        response.headers.extend(_JSON_HEADERS)
        response.headers.extend(headers)
        return response(environ, start_response)

    # Routing ------------------------------------------------------------

    def _route(self, request: Request) -> tuple[int, Any, list[tuple[str, str]]]:
        path = request.path
        if path not in _ROUTE_PARAMS:
            raise _BadRequest(
                f"no such API path; the API has {', '.join(sorted(_ROUTE_PARAMS))}", 404
            )
        methods = _ROUTE_METHODS.get(path, ("GET", "HEAD"))
        if request.method not in methods:
            return (
                405,
                {"error": f"this path answers {' and '.join(methods)}"},
                [("Allow", ", ".join(methods))],
            )
        args = request.args
        _check_names(path, args)
        if path == "/api/status":
            return 200, self._status(), []
        if path == "/api/reset":
            return self._reset(request)
        flt = _filter(args)
        if path == "/api/events":
            return 200, self._events(flt, args), []
        if path == "/api/counts":
            return 200, self._counts(flt, args), []
        return self._wait(flt, args)

    # /api/status ----------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        url = str(getattr(self.store, "url", ""))
        test_pixels = []
        for dialect, call, event in (
            (
                "segment",
                "track",
                {
                    "anonymousId": "collector-test-pixel",
                    "event": "Test Pixel Sent",
                    "properties": {"source": "the collector page's test button"},
                },
            ),
            ("rudderstack", "page", {"anonymousId": "collector-test-pixel", "name": "Test"}),
        ):
            if dialect in self.config.dialects:
                path = encode_pixel_url(
                    event,
                    call=call,
                    write_key=self.example_write_key,
                    dialect=dialect,
                    base_url="",
                    prefix=self.config.prefix,
                )
                test_pixels.append({"dialect": dialect, "call": call, "path": path})
        return {
            "store": url.partition("://")[0] or "custom",
            "storeUrl": redact_url(url),
            "spooled": self.spooled(),
            "stalled": self.stalled(),
            "canReset": self._reset_refusal() is None,
            "prefix": self.config.prefix,
            "dialects": [d for d in DIALECTS if d in self.config.dialects],
            "testPixels": test_pixels,
            "limits": {
                "maxLimit": MAX_LIMIT,
                "maxScan": MAX_SCAN,
                "maxAnswerBytes": MAX_ANSWER_BYTES,
                "maxWaitSeconds": MAX_WAIT_SECONDS,
            },
        }

    # /api/events ----------------------------------------------------------

    def _events(self, flt: RecordFilter, args: MultiDict[str, str]) -> dict[str, Any]:
        after = _single(args, "after")
        limit = _whole(args, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        order = _single(args, "order")
        if order is None:
            order = "asc" if after is not None else "desc"
        elif order not in ("asc", "desc"):
            raise _BadRequest("order must be asc or desc")
        wait = _seconds(args, "wait")
        deadline = time.monotonic() + wait
        # A long poll also ends when records can no longer be kept, or can again,
        # so that the page's warning changes with no new record.
        stalled = self.stalled()
        while True:
            generation = self.signal.generation
            selection = self._select(flt, after=after, want=limit, oldest=order == "asc")
            if selection.matching or wait <= 0 or time.monotonic() >= deadline:
                break
            if self.stalled() != stalled:
                break
            if not self._wait_for_records(generation, deadline):
                break
        matching = selection.matching
        more = len(matching) > limit
        chosen = matching[:limit] if order == "asc" else matching[-limit:][::-1]
        records, truncated = _fit([record for _, record in chosen])
        if order == "asc" and (more or truncated):
            # More match after these: continue right after the last one listed.
            next_position = chosen[len(records) - 1][0] if records else after
        else:
            next_position = selection.scanned[-1][0] if selection.scanned else after
        return {
            "records": records,
            "next": next_position,
            "truncated": truncated,
            "more": more or truncated,
            "complete": selection.complete,
            "spooled": self.spooled(),
            "stalled": self.stalled(),
        }

    def _wait_for_records(self, generation: int, deadline: float) -> bool:
        """Wait for new records until ``deadline``; ``False``: no one may wait now."""
        if not self._waiters.acquire(blocking=False):
            return False
        try:
            remaining = deadline - time.monotonic()
            self.signal.wait(generation, min(remaining, _RECHECK_SECONDS))
        finally:
            self._waiters.release()
        return True

    def _select(
        self, flt: RecordFilter, *, after: str | None, want: int, oldest: bool
    ) -> _Selection:
        """The records matching ``flt`` after ``after``: at least ``want`` + 1 if there are.

        ``oldest`` after a position: pages read forward from it (see
        :meth:`_select_forward`). ``oldest`` from the start: everything is read
        (a store reads only its newest records by count). Otherwise pages of
        growing size are read from the newest end until enough match, the store
        has no more, or ``since`` is passed.
        """
        if oldest and after is not None:
            return self._select_forward(flt, after=after, want=want)
        page = max(_FIRST_PAGE, 2 * want)
        store_args = flt.store_arguments()
        while True:
            limit = None if oldest and page > _FIRST_PAGE * 4 else min(page, MAX_SCAN)
            rows = self._read(store_args, after=after, limit=limit)
            exhausted = limit is None or len(rows) < limit
            matching = [(position, record) for position, record in rows if flt.matches(record)]
            if exhausted or (not oldest and len(matching) > want):
                return _Selection(matching, rows, True)
            if not oldest and _before(rows, flt.since):
                return _Selection(matching, rows, True)
            if not oldest and limit == MAX_SCAN:
                return _Selection(matching, rows, False)
            page *= 4

    def _select_forward(self, flt: RecordFilter, *, after: str, want: int) -> _Selection:
        """The oldest records matching ``flt`` after ``after``, read forward in pages.

        Stops at ``want`` + 1 matches, at the store's end, or after
        :data:`MAX_SCAN` records (then incomplete: ``next`` goes on from the last
        one read). It once read everything after ``after`` before choosing the
        first matches: millions of records for a position far back in a large
        store.
        """
        page = max(_FIRST_PAGE, 2 * want)
        store_args = flt.store_arguments()
        matching: list[tuple[str, PixelRecord]] = []
        scanned: list[tuple[str, PixelRecord]] = []
        cursor = after
        while True:
            limit = min(page, MAX_SCAN - len(scanned))
            rows = self._read(store_args, after=cursor, limit=limit)
            scanned.extend(rows)
            matching.extend(row for row in rows if flt.matches(row[1]))
            if len(rows) < limit or len(matching) > want:
                return _Selection(matching, scanned, True)
            if len(scanned) >= MAX_SCAN:
                return _Selection(matching, scanned, False)
            cursor = rows[-1][0]
            page *= 4

    def _read(
        self, store_args: dict[str, Any], *, after: str | None, limit: int | None
    ) -> list[tuple[str, PixelRecord]]:
        try:
            return self.store.read(after=after, limit=limit, **store_args)
        except StoreError:
            raise
        except ValueError:
            # The store's message repeats the position: say it in our words.
            raise _BadRequest("after is not a position of this store") from None

    # /api/counts ----------------------------------------------------------

    def _counts(self, flt: RecordFilter, args: MultiDict[str, str]) -> dict[str, Any]:
        after = _single(args, "after")
        rows = self._read(flt.store_arguments(), after=after, limit=MAX_SCAN + 1)
        complete = len(rows) <= MAX_SCAN
        rows = rows[-MAX_SCAN:]
        counts = count_records(record for _, record in rows if flt.matches(record))
        return {**counts.as_json(), "complete": complete}

    # /api/reset -----------------------------------------------------------

    def _reset_refusal(self) -> tuple[int, str] | None:
        kind = str(getattr(self.store, "url", "")).partition("://")[0]
        if not callable(getattr(self.store, "clear", None)):
            return 501, f"the {kind or 'configured'} store cannot be cleared from here"
        if kind != "memory" and not self.allow_reset:
            return 403, (
                "resetting is off for this store: start the collector with --allow-reset"
                " (create_app(allow_reset=True)) to allow it; the memory store always allows it"
            )
        return None

    def _reset(self, request: Request) -> tuple[int, Any, list[tuple[str, str]]]:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            # A page of another site may POST here; only this collector's own may reset.
            return 403, {"error": "a reset from another origin is refused"}, []
        refusal = self._reset_refusal()
        if refusal is not None:
            return refusal[0], {"error": refusal[1]}, []
        clear: Callable[[], None] = self.store.clear  # type: ignore[attr-defined]
        clear()
        self.signal.notify()
        return 200, {"reset": True, "spooled": self.spooled()}, []

    # /api/wait ------------------------------------------------------------

    def _wait(
        self, flt: RecordFilter, args: MultiDict[str, str]
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        after = _single(args, "after")
        count = _whole(args, "count", 1, 1, MAX_LIMIT)
        timeout = _seconds(args, "timeout", default=10.0)
        if not self._waiters.acquire(blocking=False):
            return (
                503,
                {"error": f"{MAX_WAITERS} requests are waiting already; try again shortly"},
                [("Retry-After", "1")],
            )
        started = time.monotonic()
        deadline = started + timeout
        try:
            while True:
                generation = self.signal.generation
                selection = self._select(flt, after=after, want=count, oldest=after is not None)
                found = selection.matching
                if len(found) >= count:
                    records, truncated = _fit([record for _, record in found[:count]])
                    return (
                        200,
                        {
                            "records": records,
                            "count": len(records),
                            "truncated": truncated,
                            "seconds": round(time.monotonic() - started, 3),
                        },
                        [],
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.signal.wait(generation, min(remaining, _RECHECK_SECONDS))
        finally:
            self._waiters.release()
        return 408, self._timed_out(flt, selection, count, timeout), []

    def _timed_out(
        self, flt: RecordFilter, selection: _Selection, count: int, timeout: float
    ) -> dict[str, Any]:
        found = [record for _, record in selection.matching]
        nearest: list[dict[str, Any]] = []
        rejected: list[dict[str, Any]] = []
        for _, record in reversed(selection.scanned):
            failed = flt.mismatches(record)
            if len(failed) == 1 and len(nearest) < NEAREST:
                nearest.append({"failed": failed[0], "record": record})
            if not record.get("accepted") and failed and len(rejected) < NEAREST:
                rejected.append({"problems": record.get("problems") or [], "record": record})
        arrived, truncated = _fit(found)
        value: dict[str, Any] = {
            "error": f"timed out after {timeout:g} s: {len(found)} of {count} matching"
            " record(s) arrived",
            "count": len(found),
            "records": arrived,
            "nearest": nearest,
            "rejected": rejected,
        }
        # Bound the whole answer, the near misses included.
        while len(_json(value)) > MAX_ANSWER_BYTES and (value["rejected"] or value["nearest"]):
            (value["rejected"] or value["nearest"]).pop()
            truncated = True
        value["truncated"] = truncated
        return value


# Parameters ---------------------------------------------------------------


def _check_names(path: str, args: MultiDict[str, str]) -> None:
    names = list(args.keys())
    if len(args) > MAX_PARAMS or sum(len(args.getlist(n)) for n in names) > MAX_PARAMS:
        raise _BadRequest(f"at most {MAX_PARAMS} query parameters are taken")
    own = _ROUTE_PARAMS[path]
    takes_filters = path in ("/api/events", "/api/counts", "/api/wait")
    for name in names:
        if name in own:
            if len(args.getlist(name)) > 1:
                raise _BadRequest(f"{name} is taken once")
        elif not (takes_filters and is_filter_param(name)):
            known = [*own, *FILTER_PARAMS] if takes_filters else list(own)
            if takes_filters:
                known.append("and event paths such as properties.plan")
            raise _BadRequest(
                f"unknown query parameter; {path} takes "
                + (", ".join(known) if known else "no parameters")
            )


def _filter(args: MultiDict[str, str]) -> RecordFilter:
    try:
        return parse_filter(args.to_dict(flat=False))
    except FilterError as exc:
        raise _BadRequest(str(exc)) from None


def _single(args: MultiDict[str, str], name: str) -> str | None:
    return args.get(name)


def _whole(args: MultiDict[str, str], name: str, default: int, low: int, high: int) -> int:
    text = args.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and low <= int(text) <= high):
        raise _BadRequest(f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _seconds(args: MultiDict[str, str], name: str, default: float = 0.0) -> float:
    text = args.get(name)
    if text is None:
        return default
    try:
        seconds = float(text) if len(text) <= 20 and text.isascii() else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_WAIT_SECONDS:  # NaN fails too
        raise _BadRequest(f"{name} must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}")
    return seconds


def _before(rows: Sequence[tuple[str, PixelRecord]], since: datetime | None) -> bool:
    """Whether the oldest row read is well before ``since`` (older ones cannot match)."""
    if since is None or not rows:
        return False
    oldest = received_at(rows[0][1])
    return oldest is not None and oldest < since - _SINCE_MARGIN


def _fit(records: list[PixelRecord]) -> tuple[list[PixelRecord], bool]:
    """As many of ``records`` (from the first) as fit in an answer; whether any were left out."""
    budget = MAX_ANSWER_BYTES - 64 * 1024  # room for the rest of the answer
    kept: list[PixelRecord] = []
    for record in records:
        budget -= len(_json(record)) + 1
        if budget < 0:
            return kept, True
        kept.append(record)
    return kept, False


def _json(value: object) -> bytes:
    # ASCII only, so that no sender's text can change how the answer is read.
    return json.dumps(value, ensure_ascii=True).encode("ascii")
