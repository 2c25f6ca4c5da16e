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

.. warning::
   Decoded values come from whoever sent the pixel: the log line and the content
   view escape control characters and terminal escapes instead of printing them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from mitmproxy import command, contentviews, ctx, exceptions, flowfilter, http
from mitmproxy import types as mtypes
from mitmproxy.addonmanager import Loader
from mitmproxy.log import ALERT

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
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import StoreError, open_store

__all__ = ["KEEP_RECORDS", "PixelCapture", "PixelContentview"]

logger = logging.getLogger(__name__)

KEEP_RECORDS: Final = 10_000
"""How many of this session's records the addon keeps in memory for ``pixel.export``."""

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
        self.records: collections.deque[PixelRecord] = collections.deque(maxlen=KEEP_RECORDS)
        self._filter: flowfilter.TFilter | None = None
        self._recorder: Recorder | None = None
        # Records decoded in ``request`` whose outcome (response or error) is not
        # known yet, by flow id.
        self._pending: dict[str, tuple[http.HTTPFlow, PixelRecord]] = {}
        self._view = PixelContentview(self)

    # -- options ----------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "pixel_store",
            str,
            "",
            """
            Where to record every captured pixel, as a store URL:
            sqlite:///PATH, jsonl:///PATH or memory://. Empty (the default): keep
            records only in this session's memory (see the pixel.export command),
            so that merely loading the addon writes nothing to disk.
            """,
        )
        loader.add_option(
            "pixel_answer",
            bool,
            False,
            """
            Answer pixels locally with the dialect's own response (a GIF, or
            RudderStack's seed) instead of passing them on: no upstream connection
            is made. Off (the default): the real collector answers.
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
            (what rudder-server sends) or "gif".
            """,
            choices=_RUDDERSTACK_RESPONSES,
        )
        contentviews.add(self._view)

    def configure(self, updated: set[str]) -> None:
        # Build everything first, then swap: a rejected option leaves the addon
        # as it was (mitmproxy rolls the option back and calls configure again).
        config = self.config
        if updated & _CONFIG_OPTIONS:
            config = self._config_from_options()
        if "pixel_filter" in updated:
            self._filter = self._filter_from_options()
        self.config = config
        self.answer = bool(ctx.options.pixel_answer)
        if "pixel_store" in updated:
            self._switch_store(ctx.options.pixel_store)

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
                raise _options_error(
                    f"pixel_store: cannot open {url!r} ({e}); accepted: sqlite:///PATH,"
                    " jsonl:///PATH, memory://, or empty to keep records in memory only"
                ) from e
            # durable=False: records are queued and committed in batches by the
            # recorder's own thread, so a slow disk never stalls the proxy.
            recorder = Recorder(store, durable=False)
        old, self._recorder = self._recorder, recorder
        if old is not None:
            self._close_recorder(old)

    def _close_recorder(self, recorder: Recorder) -> None:
        recorder.flush()
        recorder.close()
        if recorder.spooled:
            logger.warning(
                "pixel: the store failed; %s record(s) were spooled for a later retry",
                recorder.spooled,
            )

    def done(self) -> None:
        # Pixels still waiting for the collector are recorded too: seen, not answered.
        pending, self._pending = self._pending, {}
        for flow, record in pending.values():
            record.setdefault("upstream", {"error": "mitmproxy stopped before the answer"})
            self._show(flow, record)
            if self._recorder is not None:
                self._recorder.record(record)  # no event loop now
        if self.records:
            logger.info("pixel: %s", self.summary())
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            self._close_recorder(recorder)

    # -- flows ------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        # Match on the path only: in reverse mode the Host header is rewritten,
        # and an ad tag may point at any collector host.
        path, query = split_target(flow.request.data.path)
        config = self.config
        if match_route(path, config) is None:
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
            logger.exception("pixel: decoding %s failed; passed on untouched", escape(path))
            return
        if outcome is None:
            return
        # A live flow with a response already was answered by an addon before us; a
        # flow read from a file carries the collector's answer.
        answered_locally = flow.live and flow.response is not None
        if self.answer and flow.live and flow.response is None:
            flow.response = http.Response.make(
                outcome.status,
                outcome.body,
                [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers],
            )
            answered_locally = True
        if outcome.record is None:  # HEAD and other methods are answered, not recorded
            return
        record = outcome.record.copy()
        if answered_locally:
            record["upstream"] = {"answeredLocally": True}
        self._pending[flow.id] = (flow, record)
        self._annotate(flow, record)

    async def response(self, flow: http.HTTPFlow) -> None:
        # It fires for flows answered locally too; only those we decoded are ours.
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        record = pending[1]
        if "upstream" not in record and flow.response is not None:
            resp = flow.response
            end = resp.timestamp_end or resp.timestamp_start
            record["upstream"] = {
                "status": resp.status_code,
                "contentType": resp.headers.get("content-type"),
                "ms": round((end - (flow.request.timestamp_end or end)) * 1000, 1),
            }
        await self._finish(flow, record)

    async def error(self, flow: http.HTTPFlow) -> None:
        pending = self._pending.pop(flow.id, None)
        if pending is None:
            return
        record = pending[1]
        if "upstream" not in record:
            record["upstream"] = {"error": flow.error.msg if flow.error else "unknown error"}
        await self._finish(flow, record)

    async def _finish(self, flow: http.HTTPFlow, record: PixelRecord) -> None:
        self._show(flow, record)
        recorder = self._recorder
        # The recorder only queues (durable=False): at once while there is
        # room; when its queue is full it would block, so that wait goes to a
        # thread, off mitmproxy's event loop (a thread hop for every pixel cost
        # a tenth of mitmdump's throughput).
        if recorder is not None and not recorder.offer(record):
            await asyncio.to_thread(recorder.record, record)

    def _show(self, flow: http.HTTPFlow, record: PixelRecord) -> None:
        """Annotate the flow, keep the record in memory and log its line."""
        self._annotate(flow, record)
        self.records.append(record)
        accepted = bool(record.get("accepted"))
        logger.log(
            logging.INFO if accepted and _upstream_ok(record) else logging.WARNING,
            log_line(record, flow.request.pretty_host),
            extra={"client": flow.client_conn.peername},
        )

    def _annotate(self, flow: http.HTTPFlow, record: PixelRecord) -> None:
        flow.metadata["pixel"] = record
        flow.comment = comment_line(record)
        if flow.marked and flow.marked not in (MARK_REJECTED, MARK_UPSTREAM_FAILED):
            return  # the user's own mark wins
        if not record.get("accepted"):
            flow.marked = MARK_REJECTED
        elif not _upstream_ok(record):
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

    @_command("pixel.summary")
    def summary(self) -> str:
        """Count this session's captured pixels by verdict, problem and upstream answer."""
        verdicts: collections.Counter[str] = collections.Counter()
        rules: collections.Counter[str] = collections.Counter()
        upstream: collections.Counter[str] = collections.Counter()
        for record in self.records:
            verdicts["accepted" if record.get("accepted") else "rejected"] += 1
            rules.update(p["rule"] for p in record.get("problems") or ())
            upstream[_upstream_text(record.get("upstream"), brief=True)] += 1
        parts = [
            f"{len(self.records)} pixel(s)",
            f"{verdicts['accepted']} accepted",
            f"{verdicts['rejected']} rejected",
        ]
        if rules:
            parts.append("problems: " + ", ".join(f"{r} {n}" for r, n in rules.most_common()))
        if upstream:
            parts.append("upstream: " + ", ".join(f"{u} {n}" for u, n in upstream.most_common()))
        return "; ".join(parts)


def pixel_request(
    request: http.Request,
    peername: tuple[Any, ...] | None,
    path: str,
    query: bytes,
) -> PixelRequest:
    """The core's view of a mitmproxy request, built as the middleware builds it."""
    return PixelRequest(
        method=request.method,
        path=path,
        query=query,
        peer=str(peername[0]) if peername else None,
        user_agent=_header(request, b"user-agent"),
        forwarded_for=_header(request, b"x-forwarded-for"),
        referer=_header(request, b"referer"),
    )


def _header(request: http.Request, name: bytes) -> str | None:
    # As a WSGI server gives it: the raw bytes read as latin-1, repeated headers
    # joined with ",", so that both front ends hand the core the same text.
    values = [value for key, value in request.headers.fields if key.lower() == name]
    return b",".join(values).decode("latin-1") if values else None


# -- display ----------------------------------------------------------------------


def escape(text: str) -> str:
    """``text`` safe to show on a terminal: non-printable characters escaped.

    Control characters, terminal escapes (ESC, CSI), bidirectional overrides and
    line separators become ``\\xNN``/``\\uNNNN``; backslashes are doubled so that
    an escape in the output is never ambiguous with literal text.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
    return "".join(out)


def _shown(value: object, limit: int = 60, *, quote: bool = False) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    text = escape(text)
    if quote or not text or any(c in text for c in ' "=,[]()'):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _event_name(record: Mapping[str, Any]) -> str | None:
    event = record.get("event") or {}
    for key in ("event", "name", "groupId", "previousId"):
        value = event.get(key)
        if value not in (None, ""):
            return _shown(value, quote=True)
    return None


def _identity(record: Mapping[str, Any]) -> list[str]:
    event = record.get("event") or {}
    return [
        f"{key}={_shown(event[key])}"
        for key in ("userId", "anonymousId")
        if event.get(key) not in (None, "")
    ]


def _upstream_ok(record: Mapping[str, Any]) -> bool:
    upstream = record.get("upstream") or {}
    if "error" in upstream:
        return False
    status = upstream.get("status")
    return status is None or 200 <= status < 400


def _upstream_text(upstream: dict[str, Any] | None, *, brief: bool = False) -> str:
    if not upstream:
        return "pending"
    if upstream.get("answeredLocally"):
        return "answered locally"
    if "error" in upstream:
        return "failed" if brief else f"failed ({escape(str(upstream['error'])[:80])})"
    if brief:
        return str(upstream.get("status"))
    return f"{upstream.get('status')} in {upstream.get('ms')} ms"


def _rules(problems: list[dict[str, str]] | None, sep: str = ",") -> str:
    return sep.join(escape(p["rule"]) for p in problems or ())


def log_line(record: Mapping[str, Any], host: str) -> str:
    """One line per pixel: call, name, identity, verdict, problems, upstream answer."""
    parts = [f"pixel {escape(record['dialect'])} {escape(record['call'])}"]
    if name := _event_name(record):
        parts.append(name)
    parts.extend(_identity(record))
    if record.get("writeKey"):
        parts.append(f"writeKey={_shown(record['writeKey'], 24)}")
    if record.get("accepted"):
        parts.append("accepted")
    else:
        parts.append(f"REJECTED [{_rules(record.get('problems'))}]")
    if record.get("notes"):
        parts.append(f"notes [{_rules(record.get('notes'))}]")
    parts.append(f"upstream {_upstream_text(record.get('upstream'))}")
    parts.append(f"host={_shown(host)}")
    return " ".join(parts)


def comment_line(record: Mapping[str, Any]) -> str:
    """The short summary shown as the flow's comment."""
    head = f"{escape(record['dialect'])} {escape(record['call'])}"
    if name := _event_name(record):
        head += f" {name}"
    verdict = (
        "accepted"
        if record.get("accepted")
        else f"rejected: {_rules(record.get('problems'), ', ')}"
    )
    text = f"{head}: {verdict}"
    if record.get("upstream"):
        text += f"; upstream {_upstream_text(record['upstream'], brief=True)}"
    return text


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
        lines = [
            f"{record['dialect']} {record['call']}: "
            + ("accepted" if record["accepted"] else "REJECTED"),
            f"writeKey: {record['writeKey']}",
        ]
        if edited:
            lines.append("upstream: not sent (edited since it passed)")
        elif upstream := record.get("upstream"):
            lines.append(f"upstream: {_upstream_text(upstream)}")
        for title in ("problems", "notes"):
            items = record.get(title) or []
            lines.append(f"{title}:" + ("" if items else " none"))
            lines.extend(f"  - {p['rule']}: {p['message']}" for p in items)
        lines.append("event:")
        lines.append(json.dumps(record["event"], indent=2, ensure_ascii=False))
        return _escape_lines("\n".join(lines))

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


def _escape_lines(text: str) -> str:
    # As in ``escape``, but newlines stay and escapes use JSON's \\uNNNN form, so
    # the event block stays valid JSON.
    if text.replace("\n", "").isprintable():
        return text
    return "".join(
        ch
        if ch == "\n" or ch.isprintable()
        else f"\\u{ord(ch):04x}"
        if ord(ch) < 0x10000
        else f"\\U{ord(ch):08x}"
        for ch in text
    )
