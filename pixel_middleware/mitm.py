"""The mitmproxy addon: decode, check and record tracking pixels in transit.

Load it with the script beside the package (``addons/pixel_capture.py``)::

    mitmdump -s addons/pixel_capture.py
    mitmdump -s addons/pixel_capture.py --set pixel_store=sqlite:///pixels.sqlite3

Every request whose path is a pixel route (Segment's ``/v1/pixel/<call>`` or
RudderStack's ``/pixel/v1/<call>``, on any host, in regular and reverse proxy
mode) is decoded by :mod:`pixel_middleware.core`, exactly as the WSGI middleware
would decode it, and the record is completed with what the real collector
answered. The addon never decodes anything itself and never changes the request.

This is the only module of the package that imports mitmproxy.

What the addon shows of a record (its log line, the flow's comment, the
``pixel`` content view's text) is made by :mod:`pixel_middleware.mitm_text`,
which needs no mitmproxy; this module is the adapter.

.. warning::
   Decoded values come from whoever sent the pixel: the log line and the content
   view escape control characters and terminal escapes instead of printing them.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import json
import logging
import os
import threading
import time
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from mitmproxy import command, contentviews, ctx, exceptions, flowfilter, http
from mitmproxy import log as mlog
from mitmproxy import types as mtypes
from mitmproxy.addonmanager import Loader
from mitmproxy.addons.termlog import TermLog, TermLogHandler
from mitmproxy.contrib import click as miniclick
from mitmproxy.log import ALERT
from mitmproxy.net.http import url as murl
from mitmproxy.utils import human

from pixel_middleware._process import start_thread
from pixel_middleware.core import (
    DIALECTS,
    Dialect,
    PixelConfig,
    PixelRecord,
    PixelRequest,
    decode_pixel,
    match_route,
    split_target,
)
from pixel_middleware.display import terminal_text
from pixel_middleware.mitm_text import comment_line, log_line, upstream_ok, upstream_text, view_text
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import StoreError, open_store, redact_url, store_schemes

__all__ = [
    "HISTORY",
    "STORE_CLOSE_TIMEOUT",
    "STORE_LINGER",
    "PixelCapture",
    "PixelContentview",
    "TermLine",
]

logger = logging.getLogger(__name__)

HISTORY: Final = 100
"""How many of this session's records the addon keeps in memory by default (the
``pixel_history`` option): what ``pixel.export`` writes and ``pixel.summary`` counts.
A store (``pixel_store``) keeps every record."""

STORE_CLOSE_TIMEOUT: Final = 5.0
"""Seconds a store is given to write what is queued when it is closed: when
``pixel_store`` changes, and when mitmproxy exits (which waits that long at most)."""

STORE_LINGER: Final = 0.2
"""Seconds the store's writer lets records gather before each commit. A debugging
proxy can show a record in its store a fifth of a second late; each commit then
carries about 80 records instead of 8, and the writer thread, which takes the GIL
from mitmproxy's event loop, costs a third of the CPU a flow (docs/benchmarks.md,
"The addon with a store"). Records are journaled as before: a kill -9 loses no more."""

# What a rejected pixel, and an accepted one the collector did not take, look like
# in mitmproxy's flow list (emoji names, as ``flow.mark`` accepts them).
MARK_REJECTED: Final = ":no_entry:"
MARK_UPSTREAM_FAILED: Final = ":warning:"

# The options this addon declares; a change to any of them rebuilds the config.
_CONFIG_OPTIONS: Final = frozenset(
    {
        "pixel_prefix",
        "pixel_dialects",
        "pixel_write_keys",
        "pixel_trusted_proxies",
        "pixel_rudderstack_response",
        "pixel_routes",
    }
)
_RUDDERSTACK_RESPONSES: Final = ("seed", "gif")
# mitmproxy's option type for an unset-able string; typed ``type`` for its loader.
_OPTIONAL_STR: Final = typing.cast(type, str | None)

_F = typing.TypeVar("_F", bound=Callable[..., Any])


def _command(name: str) -> Callable[[_F], _F]:
    """mitmproxy's ``command.command``, typed: it keeps the method's signature."""
    return typing.cast(Callable[[_F], _F], command.command(name))


def _options_error(message: str) -> exceptions.OptionsError:
    return exceptions.OptionsError(message)  # type: ignore[no-untyped-call]


class PixelCapture:
    """Decode, check and record every tracking pixel that passes through mitmproxy.

    The addon takes no constructor arguments; it is configured with mitmproxy
    options (``--set pixel_store=...``), declared in :meth:`load`.
    """

    def __init__(self) -> None:
        self.config = PixelConfig()
        self.answer = False
        self.records: collections.deque[PixelRecord] = collections.deque(maxlen=HISTORY)
        # How many pixels this session has seen since the last pixel.clear,
        # counting those that have left the history.
        self.seen = 0
        # Whether to log a line per pixel (pixel_log), and where: mitmdump's
        # terminal directly, or None for the logging module (see _log_pixel).
        self.log_lines = True
        self._term_line: TermLine | None = None
        self._term_line_found = False
        self._filter: flowfilter.TFilter | None = None
        self._recorder: Recorder | None = None
        # Records decoded in ``request`` whose outcome (response or error) is not
        # known yet, by flow id.
        # A batch body makes several records, all for the one flow.
        self._pending: dict[str, tuple[http.HTTPFlow, list[PixelRecord]]] = {}
        self._view = PixelContentview(self)
        # Whether mitmproxy has configured the addon once (loaded it).
        self._loaded = False
        # The connection_strategy that pixel_answer replaced with "lazy", to put
        # back when pixel_answer is turned off.
        self._strategy_replaced: str | None = None

    # -- options ----------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "pixel_store",
            str,
            "",
            """
            Where to record every captured pixel, as a store URL
            (sqlite:///PATH, jsonl:///PATH, memory://, redis://HOST, ...; see
            pixel-middleware's docs). Empty (the default): keep
            records only in this session's memory (see the pixel.export command),
            so that merely loading the addon writes nothing to disk.
            """,
        )
        loader.add_option(
            "pixel_answer",
            bool,
            False,
            """
            Answer pixels locally with the dialect's own response (the GIF, or
            RudderStack's 200 OK / 400) instead of passing them on: no upstream
            connection is made, for HTTPS too (this sets connection_strategy to
            lazy while it is on). Off (the default): the real collector answers.
            """,
        )
        loader.add_option(
            "pixel_filter",
            _OPTIONAL_STR,
            None,
            """
            Only look at requests matching this flow filter (e.g. "~d
            api.segment.io"); it is evaluated on the request. Unset: every request
            whose path is a pixel route.
            """,
        )
        loader.add_option(
            "pixel_prefix",
            str,
            "",
            """
            Path prefix in front of the pixel routes (e.g. "/collect" for
            /collect/v1/pixel/track), as given to the middleware. Empty: none.
            """,
        )
        loader.add_option(
            "pixel_dialects",
            Sequence[str],
            list(DIALECTS),
            f"Which dialects to recognise: any of {', '.join(DIALECTS)}.",
        )
        loader.add_option(
            "pixel_write_keys",
            Sequence[str],
            [],
            """
            Write keys to accept; a pixel with any other key is recorded as
            rejected. Empty (the default): every key is accepted.
            """,
        )
        loader.add_option(
            "pixel_trusted_proxies",
            int,
            0,
            """
            How many proxies in front of the collector append to X-Forwarded-For
            and are trusted to name the client's address. 0 (the default): use the
            address of the connection.
            """,
        )
        loader.add_option(
            "pixel_rudderstack_response",
            str,
            "seed",
            """
            What a RudderStack pixel is answered with under pixel_answer: "seed"
            (200 OK, or 400 with the problems, as RudderStack's pixel document
            says) or "gif" (the GIF, always 200: what rudder-server itself has
            sent since 2021).
            """,
            choices=_RUDDERSTACK_RESPONSES,
        )
        loader.add_option(
            "pixel_routes",
            Sequence[str],
            [],
            """
            Custom routes, each PATH=DIALECT[:CALL] or HOST/PATH=DIALECT[:CALL]
            (e.g. /t.gif=segment:track); a PATH ending in / maps a root whose
            rest is the call (/collect/=segment).
            """,
        )
        loader.add_option(
            "pixel_log",
            bool,
            True,
            """
            Log one line per pixel: to mitmdump's output (written by the addon
            itself, at mitmproxy's termlog_verbosity: "warn" keeps only the
            rejected pixels and those the collector did not take), or to the event
            log of mitmproxy and mitmweb. Off: no line; records are still kept
            (pixel_history, pixel_store).
            """,
        )
        loader.add_option(
            "pixel_history",
            int,
            HISTORY,
            """
            How many of this session's records to keep in memory, the oldest
            going first: what pixel.export writes and pixel.summary counts. The flows
            keep their own record (the pixel content view, ~meta filters), and
            pixel_store keeps every record.
            """,
        )
        contentviews.add(self._view)

    def configure(self, updated: set[str]) -> None:
        try:
            self._apply_options(updated)
        except exceptions.OptionsError as e:
            if self._loaded:
                raise  # a change at run time: mitmproxy rolls it back and says why
            # mitmproxy logs an error raised while it loads a script with the
            # whole traceback, which buries the one line that matters. Say that
            # line; an error logged at startup still stops mitmdump (exit 1).
            logger.error("%s", e)
        finally:
            self._loaded = True

    def _apply_options(self, updated: set[str]) -> None:
        # Build everything first, then swap: a rejected option leaves the addon
        # as it was (mitmproxy rolls the option back and calls configure again).
        config = self.config
        if updated & _CONFIG_OPTIONS:
            config = self._config_from_options()
        if "pixel_filter" in updated:
            self._filter = self._filter_from_options()
        history = self.records.maxlen
        if "pixel_history" in updated:
            history = ctx.options.pixel_history
            if history < 0:
                raise _options_error(
                    f"pixel_history: {history} is not accepted; give how many records"
                    " to keep in memory, 0 or more"
                )
        self.config = config
        if history != self.records.maxlen:
            # The newest records stay.
            self.records = collections.deque(self.records, maxlen=history)
        self.log_lines = bool(ctx.options.pixel_log)
        self.answer = bool(ctx.options.pixel_answer)
        if "pixel_store" in updated:
            self._switch_store(ctx.options.pixel_store)
        if "pixel_answer" in updated:
            self._connect_lazily_while_answering()

    def _connect_lazily_while_answering(self) -> None:
        """Set mitmproxy's ``connection_strategy`` to ``lazy`` while pixel_answer is on.

        With ``eager`` (mitmproxy's default) the proxy connects to the server
        before it answers a CONNECT, and answers ``502`` when it cannot: an HTTPS
        pixel to a collector that cannot be reached never reaches the ``request``
        hook that would answer it, and even a reachable collector is connected
        to, which pixel_answer promises not to do. ``lazy`` connects only when a
        request is passed on. For other flows, an unreachable server is then
        reported by a ``502`` to the request instead of to the CONNECT.
        """
        if "connection_strategy" not in ctx.options:
            return  # no proxy server here (mitmproxy's test harness)
        if self.answer and ctx.options.connection_strategy != "lazy":
            self._strategy_replaced = ctx.options.connection_strategy
            ctx.options.connection_strategy = "lazy"
            logger.info(
                "pixel: pixel_answer sets connection_strategy=lazy, so that pixels are"
                " answered without connecting to their server; other flows connect when"
                " their first request is passed on"
            )
        elif not self.answer and self._strategy_replaced is not None:
            strategy, self._strategy_replaced = self._strategy_replaced, None
            ctx.options.connection_strategy = strategy

    def _config_from_options(self) -> PixelConfig:
        opts = ctx.options
        dialects = tuple(opts.pixel_dialects)
        unknown = [d for d in dialects if d not in DIALECTS]
        if unknown or not dialects:
            raise _options_error(
                f"pixel_dialects: {', '.join(map(repr, unknown)) or 'empty'} is not accepted;"
                f" give one or more of: {', '.join(DIALECTS)}"
            )
        if opts.pixel_trusted_proxies < 0:
            raise _options_error(
                f"pixel_trusted_proxies: {opts.pixel_trusted_proxies} is not accepted;"
                " give the number of trusted proxies, 0 or more"
            )
        try:
            return PixelConfig(
                prefix=opts.pixel_prefix,
                dialects=frozenset(typing.cast(tuple[Dialect, ...], dialects)),
                write_keys=frozenset(opts.pixel_write_keys) if opts.pixel_write_keys else None,
                trusted_proxies=opts.pixel_trusted_proxies,
                rudderstack_response=opts.pixel_rudderstack_response,
                custom_paths=_routes_option(opts.pixel_routes),
            )
        except ValueError as e:
            raise _options_error(f"pixel options: {e}") from e

    def _filter_from_options(self) -> flowfilter.TFilter | None:
        spec = ctx.options.pixel_filter
        if not spec:
            return None
        try:
            return flowfilter.parse(spec)
        except ValueError as e:
            raise _options_error(
                f"pixel_filter: {spec!r} is not a flow filter ({e}); see"
                " mitmproxy's filter expressions, e.g. '~d api.segment.io'"
            ) from e

    def _switch_store(self, url: str) -> None:
        recorder = None
        if url:
            try:
                store = open_store(url)
            except (ValueError, StoreError, OSError) as e:
                shown = redact_url(url)
                # The store's own message may quote the URL, password and all.
                reason = str(e).replace(url, shown)
                schemes = ", ".join(f"{scheme}://" for scheme in store_schemes())
                raise _options_error(
                    f"pixel_store: cannot open {shown!r} ({reason}); give a store URL"
                    f" ({schemes}), e.g. sqlite:///pixels.sqlite3, or nothing to keep"
                    " records in memory only"
                ) from e
            # durable=False: records are queued and committed in batches by the
            # recorder's own thread, so a slow disk never stalls the proxy.
            recorder = Recorder(store, durable=False, linger=STORE_LINGER)
        old, self._recorder = self._recorder, recorder
        if old is not None:
            _close_in_background(old)

    def done(self) -> None:
        # Pixels still waiting for the collector are recorded too: seen, not answered.
        pending, self._pending = self._pending, {}
        not_queued = 0
        for flow, records in pending.values():
            for record in records:
                record.setdefault("upstream", {"error": "mitmproxy stopped before the answer"})
                self._show(flow, record)
                # offer(), not record(): a full queue would wait for the store.
                if self._recorder is not None and not self._recorder.offer(record):
                    not_queued += 1
        if not_queued:
            logger.error("pixel: %d record(s) not written: the store is not keeping up", not_queued)
        if self.records:
            logger.info("pixel: %s", self.summary())
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            closing = _close_in_background(recorder)
            # done() also runs when the script is reloaded, on the event loop of
            # a proxy that goes on: wait for the store only when mitmproxy exits,
            # and then a bounded time (the recorder logs what it did not write).
            if ctx.master.should_exit.is_set():
                closing.join(STORE_CLOSE_TIMEOUT + 1)
        if self._strategy_replaced is not None and not ctx.master.should_exit.is_set():
            # Unloaded from a proxy that goes on: its connection_strategy back.
            strategy, self._strategy_replaced = self._strategy_replaced, None
            ctx.options.connection_strategy = strategy

    # -- flows ------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        # Match on the path only: in reverse mode the Host header is rewritten,
        # and an ad tag may point at any collector host.
        path, query = split_target(flow.request.data.path)
        config = self.config
        if (
            match_route(path, config, method=flow.request.method, host=flow.request.host_header)
            is None
        ):
            return
        if self._filter is not None and not self._filter(flow):
            return
        try:
            outcome = decode_pixel(
                pixel_request(flow.request, flow.client_conn.peername, path, query),
                config=config,
                # When the proxy received it: the same for a saved flow read back later.
                now=datetime.fromtimestamp(flow.request.timestamp_start, UTC),
            )
        except Exception:
            # The core handles bad input itself; this is a bug, and the proxy
            # must still pass the request on untouched.
            logger.exception("pixel: decoding %s failed; passed on untouched", terminal_text(path))
            return
        if outcome is None:
            return
        # A live flow with a response already was answered by an addon before us; a
        # flow read from a file carries the collector's answer.
        answered_locally = flow.live and flow.response is not None
        if self.answer and flow.live and flow.response is None:
            flow.response = _answer(outcome.status, outcome.body, tuple(outcome.headers))
            answered_locally = True
        if not outcome.records:  # HEAD and other methods are answered, not recorded
            return
        records = [record.copy() for record in outcome.records]
        for record in records:
            if answered_locally:
                record["upstream"] = {"answeredLocally": True}
            self._annotate(flow, record)
        self._pending[flow.id] = (flow, records)

    async def response(self, flow: http.HTTPFlow) -> None:
        # It fires for flows answered locally too; only those we decoded are ours.
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        for record in pending[1]:
            # A pixel answered locally was annotated with its final record in
            # ``request``: its comment is not made twice.
            annotated = "upstream" in record
            if not annotated and flow.response is not None:
                resp = flow.response
                end = resp.timestamp_end or resp.timestamp_start
                record["upstream"] = {
                    "status": resp.status_code,
                    "contentType": resp.headers.get("content-type"),
                    "ms": round((end - (flow.request.timestamp_end or end)) * 1000, 1),
                }
            await self._finish(flow, record, annotated=annotated)

    async def error(self, flow: http.HTTPFlow) -> None:
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        for record in pending[1]:
            if "upstream" not in record:
                record["upstream"] = {"error": flow.error.msg if flow.error else "unknown error"}
            await self._finish(flow, record)

    async def _finish(
        self, flow: http.HTTPFlow, record: PixelRecord, *, annotated: bool = False
    ) -> None:
        self._show(flow, record, annotated=annotated)
        recorder = self._recorder
        # The recorder only queues (durable=False): at once while there is
        # room; when its queue is full it would block, so that wait goes to a
        # thread, off mitmproxy's event loop (a thread hop for every pixel cost
        # a tenth of mitmdump's throughput).
        if recorder is not None and not recorder.offer(record):
            await asyncio.to_thread(recorder.record, record)

    def _show(self, flow: http.HTTPFlow, record: PixelRecord, *, annotated: bool = False) -> None:
        """Annotate the flow (unless ``annotated`` already with this very record),
        keep the record in memory and log its line."""
        if not annotated:
            self._annotate(flow, record)
        self.records.append(record)
        self.seen += 1
        if self.log_lines:
            self._log_pixel(flow, record)

    def _log_pixel(self, flow: http.HTTPFlow, record: PixelRecord) -> None:
        level = logging.INFO if record.get("accepted") and upstream_ok(record) else logging.WARNING
        if not logger.isEnabledFor(level):
            return  # the logging level of this module, as for any log line
        line = log_line(record, _pretty_host(flow.request))
        peername = flow.client_conn.peername
        if not self._term_line_found:
            self._term_line_found = True
            self._term_line = TermLine.for_mitmdump()
        term_line = self._term_line
        if term_line is not None:
            try:
                term_line.write(level, line, peername)
                return
            except OSError:
                # Nowhere to print: the logging module's handler says so as it
                # does for every other line (mitmdump exits).
                self._term_line = None
        logger.log(level, line, extra={"client": peername})

    def _annotate(self, flow: http.HTTPFlow, record: PixelRecord) -> None:
        flow.metadata["pixel"] = record
        flow.comment = comment_line(record)
        if flow.marked and flow.marked not in (MARK_REJECTED, MARK_UPSTREAM_FAILED):
            return  # the user's own mark wins
        if not record.get("accepted"):
            flow.marked = MARK_REJECTED
        elif not upstream_ok(record):
            flow.marked = MARK_UPSTREAM_FAILED
        else:
            # Our own mark from an earlier pass goes: a pixel fixed in the flow
            # editor and replayed must not stay marked as rejected.
            flow.marked = ""

    # -- commands ---------------------------------------------------------------

    @_command("pixel.export")
    def export(self, path: mtypes.Path) -> None:
        """Write this session's captured pixel records to a file, as JSON Lines."""
        try:
            with open(path, "w", encoding="utf-8") as f:
                for record in self.records:
                    f.write(json.dumps(record, ensure_ascii=True, separators=(",", ":")))
                    f.write("\n")
        except OSError as e:
            raise exceptions.CommandError(f"pixel.export: cannot write {path}: {e}") from e
        # ALERT, mitmproxy's level for "show the user even outside the event log":
        # the console puts it in its status bar, else the command says nothing.
        # The absolute path, as a relative one is relative to mitmproxy's directory.
        logger.log(
            ALERT,
            "pixel: exported %d record(s) to %s",
            len(self.records),
            os.path.abspath(path),
        )

    @_command("pixel.clear")
    def clear(self) -> None:
        """Forget this session's captured pixel records (the store keeps its own)."""
        self.records.clear()
        self.seen = 0

    @_command("pixel.summary")
    def summary(self) -> str:
        """Count this session's captured pixels by verdict, problem and upstream answer."""
        verdicts: collections.Counter[str] = collections.Counter()
        rules: collections.Counter[str] = collections.Counter()
        upstream: collections.Counter[str] = collections.Counter()
        for record in self.records:
            verdicts["accepted" if record.get("accepted") else "rejected"] += 1
            rules.update(p["rule"] for p in record.get("problems") or ())
            upstream[upstream_text(record.get("upstream"), brief=True)] += 1
        counted = f"{len(self.records)} pixel(s)"
        if self.seen > len(self.records):
            counted = f"{self.seen} pixel(s), the last {len(self.records)} counted (pixel_history)"
        parts = [
            counted,
            f"{verdicts['accepted']} accepted",
            f"{verdicts['rejected']} rejected",
        ]
        if rules:
            parts.append("problems: " + ", ".join(f"{r} {n}" for r, n in rules.most_common()))
        if upstream:
            parts.append("upstream: " + ", ".join(f"{u} {n}" for u, n in upstream.most_common()))
        return "; ".join(parts)


class TermLine:
    """Writes the pixel lines to mitmdump's output itself, as its log would.

    A line through the logging module cost mitmdump about a tenth of its
    throughput: a ``LogRecord``, formatting it twice, and mitmproxy 12 handing
    every record to every addon as a legacy ``add_log`` event (a wake-up of the
    event loop and a call into each addon). This writes the very same text
    (``[time][client] message``, coloured as mitmproxy colours it) with one
    ``write`` of the whole line to the stream mitmproxy's terminal log prints
    to, at once, so that the line stays in order with mitmproxy's own output;
    and it keeps to the verbosity mitmproxy gives that log
    (``termlog_verbosity``, ``--quiet``).
    """

    def __init__(self, handler: TermLogHandler) -> None:
        self._handler = handler
        self._file = handler.file
        self._colorize = handler.has_vt_codes
        formatter = mlog.MitmFormatter(self._colorize)
        self._with_client = formatter.with_client
        self._without_client = formatter.without_client
        # The time prefix changes once a second; its text is made once a second.
        self._second = -1
        self._clock = ""

    @classmethod
    def for_mitmdump(cls) -> TermLine | None:
        """A writer for mitmdump's terminal log, or None where lines must be log records.

        mitmproxy's and mitmweb's event logs show log records only; mitmproxy's
        own test harness has no terminal log.
        """
        addons = ctx.master.addons
        if addons.get("eventstore") is not None:  # type: ignore[no-untyped-call]
            return None
        termlog = addons.get("termlog")  # type: ignore[no-untyped-call]
        return cls(termlog.logger) if isinstance(termlog, TermLog) else None

    def write(self, level: int, message: str, client: tuple[Any, ...] | None) -> None:
        """Write ``message`` (escaped already) as a log line of ``level``, now.

        Raises OSError when the output is gone.
        """
        if level < self._handler.level:
            return
        now = time.time_ns()
        second, nanoseconds = divmod(now, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._clock = time.strftime("%H:%M:%S", time.localtime(second))
        stamp = f"{self._clock}.{nanoseconds // 1_000_000:03d}"
        if self._colorize:
            message = miniclick.style(message, fg=mlog.LOG_COLORS.get(level))
        if client:
            line = self._with_client % (stamp, _client_text(client), message)
        else:
            line = self._without_client % (stamp, message)
        self._file.write(line + "\n")


@functools.lru_cache(maxsize=1024)
def _client_text(client: tuple[Any, ...]) -> str:
    # A client sends many pixels over one connection: its address is formatted
    # (an ipaddress parse) once per connection, not once per pixel.
    return human.format_address(client)


# The longest Host header whose parse is cached: a host name and a port. The
# header is the sender's: a longer one is parsed each time, never kept.
_CACHED_AUTHORITY_CHARS: Final = 262


def _pretty_host(request: http.Request) -> str:
    """``request.pretty_host``, with the Host header parsed once per distinct header."""
    authority = request.host_header
    if not authority:
        return request.host
    if len(authority) > _CACHED_AUTHORITY_CHARS:
        return _parse_authority_host(authority)
    return _authority_host(authority)


def _parse_authority_host(authority: str) -> str:
    return murl.parse_authority(authority, check=False)[0]


_authority_host = functools.lru_cache(maxsize=1024)(_parse_authority_host)


def _close_in_background(recorder: Recorder) -> threading.Thread:
    """Flush and close ``recorder`` in a thread of its own, never on the event loop.

    A store that hangs (a Redis server that accepts and never answers, a network
    disk) would otherwise freeze every connection of the proxy.
    """
    thread = threading.Thread(
        target=_close_recorder, args=(recorder,), name="pixel-store-close", daemon=True
    )
    start_thread(thread)
    return thread


def _close_recorder(recorder: Recorder) -> None:
    # After STORE_CLOSE_TIMEOUT, close() logs how many records were not written
    # and leaves its writer trying until the process exits.
    recorder.close(timeout=STORE_CLOSE_TIMEOUT)
    if recorder.spooled:
        logger.warning(
            "pixel: the store failed; %s record(s) were spooled for a later retry",
            recorder.spooled,
        )


def pixel_request(
    request: http.Request,
    peername: tuple[Any, ...] | None,
    path: str,
    query: bytes,
) -> PixelRequest:
    """The core's view of a mitmproxy request, built as the middleware builds it."""
    headers = _wanted_headers(request.headers.fields)
    return PixelRequest(
        method=request.method,
        path=path,
        query=query,
        peer=str(peername[0]) if peername else None,
        user_agent=headers.get(b"user-agent"),
        forwarded_for=headers.get(b"x-forwarded-for"),
        referer=headers.get(b"referer"),
        # The body as it went on the wire (still gzip when it was): the core
        # inflates it under its own cap, as for the middleware.
        body=(request.raw_content or b"") if request.method == "POST" else b"",
        content_encoding=headers.get(b"content-encoding"),
        authorization=headers.get(b"authorization"),
        host=headers.get(b"host"),
    )


def _routes_option(entries: Sequence[str]) -> dict[str, str] | None:
    """``pixel_routes`` (``PATH=DIALECT[:CALL]`` each) as ``PixelConfig.custom_paths``."""
    routes: dict[str, str] = {}
    for entry in entries:
        where, equals, target = entry.rpartition("=")
        if not equals or not where:
            raise ValueError(
                f"custom_paths: {entry!r} is not PATH=DIALECT[:CALL], e.g. /t.gif=segment:track"
            )
        routes[where] = target
    return routes or None


# The request headers the core reads (lower case, as HTTP/2 sends them).
_WANTED_HEADERS: Final = frozenset(
    {
        b"user-agent",
        b"x-forwarded-for",
        b"referer",
        b"content-encoding",
        b"authorization",
        b"host",
    }
)


def _wanted_headers(fields: Sequence[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The headers the core reads, in one pass over the request's headers.

    As a WSGI server gives them: the raw bytes read as latin-1, repeated headers
    joined with ",", so that both front ends hand the core the same text.
    """
    found: dict[bytes, list[bytes]] = {}
    for key, value in fields:
        name = key.lower()
        if name in _WANTED_HEADERS:
            found.setdefault(name, []).append(value)
    return {name: b",".join(values).decode("latin-1") for name, values in found.items()}


@functools.lru_cache(maxsize=32)
def _answer_template(
    status: int, body: bytes, headers: tuple[tuple[str, str], ...]
) -> http.Response:
    # The core answers almost every pixel with one of a few responses (the GIF,
    # RudderStack's "OK"), each made once. The key is what the core chose to
    # answer, never the request: a few small responses at most.
    return http.Response.make(
        status, body, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    )


def _answer(status: int, body: bytes, headers: tuple[tuple[str, str], ...]) -> http.Response:
    """The response for a pixel answered locally: a copy of its template, made now.

    ``Response.make`` type-checks every field of the response it builds, which
    cost 60 to 80 us a pixel, more than the addon's decoding and line together;
    a copy of the template's fields (its headers copied too, as an addon after
    us may change them) is the same response for a seventh of that.
    """
    template = _answer_template(status, body, headers).data
    data = copy.copy(template)
    data.headers = template.headers.copy()
    data.timestamp_start = data.timestamp_end = time.time()
    response = http.Response.__new__(http.Response)
    response.data = data
    return response


# -- content view -------------------------------------------------------------------


class PixelContentview(contentviews.Contentview):
    """The ``pixel`` content view: a pixel request decoded, with its problems and notes.

    It shows the record the addon made for the flow; for a flow the addon has not
    seen (read from a file, or skipped by ``pixel_filter``), and for a request
    edited in the UI since it passed, it asks the core to decode the request as it
    is now, with the addon's current options.
    """

    # Above the built-in "Query" view (0.3 for an empty body with a query), so
    # that a pixel request is shown decoded without choosing the view by hand.
    PRIORITY: Final = 0.9

    def __init__(self, addon: PixelCapture) -> None:
        self._addon = addon

    @property
    def name(self) -> str:
        return "pixel"

    @property
    def syntax_highlight(self) -> contentviews.SyntaxHighlight:
        return "yaml"  # JSON is YAML: the decoded event is highlighted

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        request = metadata.http_message
        if not isinstance(request, http.Request) or request.method != "GET":
            return 0
        path, _ = split_target(request.data.path)
        return self.PRIORITY if match_route(path, self._addon.config) is not None else 0

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        record, edited = self._record(metadata)
        return view_text(record, edited=edited)

    def _record(self, metadata: contentviews.Metadata) -> tuple[dict[str, Any], bool]:
        """The record to show, and whether the request was edited since it passed."""
        request = metadata.http_message
        if not isinstance(request, http.Request):
            raise ValueError("not an HTTP request")
        flow = metadata.flow
        path, query = split_target(request.data.path)
        peer = flow.client_conn.peername if isinstance(flow, http.HTTPFlow) else None
        # Decoded afresh every time (a few microseconds, for a person's eyes): the
        # UIs' flow editors change the request in place, after the addon saw it.
        outcome = decode_pixel(
            pixel_request(request, peer, path, query),
            config=self._addon.config,
            now=datetime.fromtimestamp(request.timestamp_start, UTC),
        )
        if outcome is None or outcome.record is None:
            raise ValueError("not a pixel request")
        current = dict(outcome.record)
        seen = None
        if isinstance(flow, http.HTTPFlow) and flow.request is request:
            seen = flow.metadata.get("pixel")
        if not isinstance(seen, dict) or "call" not in seen:
            return current, False
        # The record made when it passed, with the collector's answer, while the
        # request is still the one it was made from.
        if seen.get("request") == current["request"]:
            return seen, False
        return current, True
