"""The ``pixel-middleware`` command: run the collector, read records, build and check URLs.

    pixel-middleware serve [--port 8000] [--store URL]   # the collector, on granian
    pixel-middleware events [--follow]                   # what arrived, oldest first
    pixel-middleware encode --write-key KEY --call track '{"userId": "u1", "event": "E"}'
    pixel-middleware decode URL                          # the record a URL would produce
    pixel-middleware check --expect 'Email Opened>=1'    # for CI: exit 0 when all hold

Every command has ``--help``. Usage errors exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from pixel_middleware.collector import READ_TOKEN_ENV_VAR
from pixel_middleware.core import DEFAULT_DIALECTS, DIALECTS, PixelConfig, PixelRecord, PixelRequest
from pixel_middleware.core import decode_pixel as _decode_pixel
from pixel_middleware.core import split_target as _split_target
from pixel_middleware.display import event_name, identity, terminal_json, terminal_text
from pixel_middleware.har import request_target
from pixel_middleware.recorder import default_spool_path
from pixel_middleware.spool import count_spooled
from pixel_middleware.stores import (
    DEFAULT_STORE_URL,
    STORE_ENV_VAR,
    Store,
    StoreError,
    StoreNotFoundError,
    open_store,
    redact_url,
    redacted_error,
    store_identity,
    store_schemes,
)

__all__ = ["main"]

PROG = "pixel-middleware"
# What `serve` gives its server: enough connections that a few hundred slow
# clients (slowloris) leave room for real pixels, and idle ones closed soon.
DEFAULT_CONNECTION_LIMIT = 1000
# granian worker processes: on 2 cores, 2 served the most pixels per second
# (docs/benchmarks.md); one worker serves a little more per CPU-second.
DEFAULT_WORKERS = 2
MAX_WORKERS = 64
MAX_CONNECTION_LIMIT = 100_000
DEFAULT_CHANNEL_TIMEOUT = 10
DEFAULT_CLEANUP_INTERVAL = 2
# Open files `serve` needs besides its connections (store, spool, logs, threads).
_FILE_RESERVE = 64
STORE_HELP = (
    f"store URL, e.g. sqlite:///PATH or jsonl:///PATH (schemes: {', '.join(store_schemes())});"
    f" default ${STORE_ENV_VAR}, else {DEFAULT_STORE_URL}"
)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (the full usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.command
    try:
        # Each command gets its own parser, so its errors name it ("... encode: error").
        return command(args, args.parser)
    except BrokenPipeError:
        # `pixel-middleware events | head`: the reader left; that is not an error.
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Segment- and RudderStack-style tracking pixels: a collector, and"
        " tools to read what it recorded and to build and check pixel URLs.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the collector",
        description="Run the collector on granian (a Rust HTTP server; the collector runs"
        " in --workers processes, each with --threads threads whose concurrent pixels"
        " share one durable commit), or on waitress (--server waitress: pure Python,"
        " one process). It answers pixels at"
        " /v1/pixel/<call> (Segment) and /pixel/v1/page|track (RudderStack), shows how"
        " to send one and what arrived at /, and the latest records at /events.json."
        " Those pages are served to this machine only, unless a read token is set"
        " (then also to requests that carry it) or --public-reads is given."
        " Ctrl-C or SIGTERM stops it with every record flushed.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (%(default)s)")
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        metavar="PORT",
        help="port (%(default)s); 0 picks a free one",
    )
    _add_config_options(serve)
    serve.add_argument(
        "--server",
        choices=("granian", "waitress"),
        default="granian",
        help="the HTTP server (%(default)s): granian serves about twice the pixels per"
        " CPU-second; waitress is pure Python, in one process",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="granian worker processes (%(default)s); one for a memory:// store,"
        " which a process cannot share",
    )
    serve.add_argument(
        "--threads",
        type=_positive_int,
        default=8,
        metavar="N",
        help="threads per worker (%(default)s); pixels arriving together share one commit",
    )
    serve.add_argument(
        "--rudderstack-response",
        choices=("seed", "gif"),
        default="seed",
        help="answer RudderStack pixels as its Pixel API document says (seed: 200 OK"
        " or 400) or as rudder-server does (gif: the GIF for everything); default %(default)s",
    )
    serve.add_argument(
        "--dialect",
        action="append",
        dest="dialects",
        choices=DIALECTS,
        metavar="DIALECT",
        help=f"answer this dialect (repeatable; default {' and '.join(DEFAULT_DIALECTS)});"
        f" any of {', '.join(DIALECTS)}",
    )
    serve.add_argument(
        "--route",
        action="append",
        default=[],
        dest="routes",
        metavar="PATH=DIALECT[:CALL]",
        help="a custom route, e.g. /t.gif=segment:track or px.example.com/t.gif=segment:track;"
        " a PATH ending in / takes the call from the rest of the path (repeatable)",
    )
    serve.add_argument(
        "--fire-and-forget",
        action="store_true",
        help="answer before the record is committed (faster; a crash loses what is queued)",
    )
    access = serve.add_mutually_exclusive_group()
    access.add_argument(
        "--read-token",
        metavar="TOKEN",
        help=f"let requests from other machines read records (/, /events.json) when they"
        f" send 'Authorization: Bearer TOKEN' or ?token=TOKEN; 16 to 256 characters."
        f" Default ${READ_TOKEN_ENV_VAR}, which is better: a command line is visible to"
        f" every user of the machine",
    )
    access.add_argument(
        "--public-reads",
        action="store_true",
        help="serve the pages that read records to anyone, with no token",
    )
    serve.add_argument(
        "--connection-limit",
        type=_connection_limit,
        default=DEFAULT_CONNECTION_LIMIT,
        metavar="N",
        help="connections open at once (%(default)s; granian: shared among the workers);"
        " beyond it new ones wait in the listen backlog. High, so that slow clients"
        " cannot take every one",
    )
    serve.add_argument(
        "--channel-timeout",
        type=_seconds,
        default=DEFAULT_CHANNEL_TIMEOUT,
        metavar="SECONDS",
        help="granian: close a connection that has not sent a request's headers within"
        " this many seconds; waitress: close one after this many seconds with no bytes"
        " sent or received (%(default)s)",
    )
    serve.add_argument(
        "--cleanup-interval",
        type=_seconds,
        default=DEFAULT_CLEANUP_INTERVAL,
        metavar="SECONDS",
        help="waitress: how often idle connections are looked for and closed (%(default)s)",
    )
    serve.add_argument(
        "--allow-reset",
        action="store_true",
        help="let POST /api/reset clear the store (always allowed on memory://)",
    )
    serve.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="do not print a line for each pixel",
    )
    serve.set_defaults(command=_serve, parser=serve)

    events = sub.add_parser(
        "events",
        help="print the records a store holds",
        description="Print the newest records of a store, oldest first. Values are"
        " shown with control characters escaped. A store that does not exist is an"
        " error (exit 1): reading never creates one.",
    )
    events.add_argument("--store", metavar="URL", help=STORE_HELP)
    verdict = events.add_mutually_exclusive_group()
    verdict.add_argument(
        "--accepted", dest="accepted", action="store_true", default=None, help="only accepted"
    )
    verdict.add_argument("--rejected", dest="accepted", action="store_false", help="only rejected")
    events.add_argument("--call", help="only this call (track, page, identify, ...)")
    _add_filter_options(events)
    events.add_argument(
        "--limit",
        type=_positive_int,
        default=20,
        metavar="N",
        help="how many of the newest (%(default)s)",
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new records until Ctrl-C"
    )
    events.add_argument(
        "--interval",
        type=_positive_float,
        default=0.5,
        metavar="SECONDS",
        help="seconds between polls with --follow (%(default)s)",
    )
    events.add_argument(
        "--format",
        choices=("table", "jsonl", "har"),
        default="table",
        help="aligned columns, one JSON record per line, or a HAR 1.2 file that DevTools"
        " and mitmproxy open (default %(default)s)",
    )
    events.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        metavar="URL",
        help="with --format har: the scheme and host the pixels were sent to (%(default)s);"
        " records keep the path and query only",
    )
    events.add_argument(
        "--machine",
        action="store_true",
        help="after the records, a summary line: how many were machine opens, by kind"
        " (mail proxies, scanners, bots; see docs/dialects.md)",
    )
    events.set_defaults(command=_events, parser=events)

    check = sub.add_parser(
        "check",
        help="check that the expected pixels arrived (for CI)",
        description="Count the records of a store or a running collector and check"
        " expectations such as 'Email Opened>=1' (an event name) or 'page>=2' (a call;"
        " 'event:NAME' or 'call:NAME' when a name could be both; operators >=, <=, ==,"
        " >, <). Expectations count accepted records that match the filters, unless"
        " --accepted/--rejected says otherwise. Exit status: 0 every expectation holds,"
        " 1 one failed, 2 a usage error or nothing could be read.",
    )
    source = check.add_mutually_exclusive_group()
    source.add_argument("--store", metavar="URL", help=STORE_HELP)
    source.add_argument(
        "--url",
        metavar="URL",
        help="a running collector to ask through its JSON API, e.g. http://127.0.0.1:8000",
    )
    check.add_argument(
        "--token",
        metavar="TOKEN",
        help="the collector's read token (default $PIXEL_READ_TOKEN), sent as a Bearer token",
    )
    check.add_argument(
        "--expect",
        dest="expectations",
        action="append",
        default=[],
        metavar="EXPECTATION",
        help="NAME OP COUNT, e.g. 'Email Opened>=1' or 'page==2' (repeatable)",
    )
    check.add_argument(
        "--no-rejected", action="store_true", help="fail if any record in scope was rejected"
    )
    check_verdict = check.add_mutually_exclusive_group()
    check_verdict.add_argument(
        "--accepted", dest="accepted", action="store_true", default=None, help="count accepted"
    )
    check_verdict.add_argument(
        "--rejected", dest="accepted", action="store_false", help="count rejected instead"
    )
    check.add_argument("--call", help="only this call (track, page, identify, ...)")
    _add_filter_options(check)
    check.add_argument("--junit", metavar="PATH", help="also write JUnit XML here")
    check.add_argument(
        "--json",
        dest="json_path",
        metavar="PATH",
        help="also write the result as JSON (- : stdout)",
    )
    check.set_defaults(command=_check, parser=check)

    decode = sub.add_parser(
        "decode",
        help="show the record a pixel URL (or each pixel in a HAR file) would produce",
        description="Decode a pixel URL as the collector would, without recording it;"
        " with --har, every pixel request in a HAR file (Chrome's or Firefox's DevTools"
        " export, mitmproxy's hardump, events --format har), other requests counted and"
        " passed over. Exit status: 0 accepted (every one), 1 rejected (any), 2 not a"
        " pixel route (no pixel in the file, or not a HAR file).",
    )
    target = decode.add_mutually_exclusive_group(required=True)
    target.add_argument("url", metavar="URL", nargs="?", help="full URL or path?query")
    target.add_argument("--har", metavar="FILE", help="a HAR file (- : stdin) instead of one URL")
    decode.add_argument(
        "--json",
        action="store_true",
        help="print the record as JSON (with --har: a JSON list of the records)",
    )
    decode.add_argument(
        "--write-key",
        dest="write_keys",
        action="append",
        metavar="KEY",
        help="accepted write key (repeatable; default: any)",
    )
    decode.add_argument("--prefix", default="", help="path prefix of the pixel routes")
    decode.add_argument(
        "--trusted-proxies",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="proxies trusted to append to X-Forwarded-For (%(default)s)",
    )
    decode.add_argument("--peer", metavar="ADDR", help="client address to assume")
    decode.add_argument(
        "--forwarded-for", metavar="VALUE", help="X-Forwarded-For header value to assume"
    )
    decode.set_defaults(command=_decode, parser=decode)

    encode = sub.add_parser(
        "encode",
        help="build a pixel URL from an event",
        description="Build a pixel URL (or an <img> tag) from an event given as JSON,"
        ' e.g. \'{"userId": "u1", "event": "Email Opened"}\'. The fields are sent'
        " as given: supply the identity (userId or anonymousId) and what the call needs.",
    )
    encode.add_argument(
        "event",
        metavar="JSON",
        nargs="?",
        default="{}",
        help="event object, or - for stdin (default {})",
    )
    encode.add_argument("--write-key", required=True, metavar="KEY", help="the source's write key")
    encode.add_argument("--call", required=True, help="track, page, identify, group, alias, screen")
    encode.add_argument(
        "--dialect",
        choices=DEFAULT_DIALECTS,
        default="segment",
        help="URL style (default %(default)s)",
    )
    encode.add_argument(
        "--base-url", metavar="URL", help="collector URL, e.g. https://px.example.com"
    )
    encode.add_argument("--prefix", default="", help="path prefix of the pixel routes")
    encode.add_argument("--html", action="store_true", help="print an <img> tag instead of the URL")
    encode.add_argument(
        "--allow-rejected",
        action="store_true",
        help="print a URL the collector would reject (to test rejections); without it,"
        " such a URL is refused with the reasons (exit 1)",
    )
    encode.set_defaults(command=_encode, parser=encode)
    return parser


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="URL", help=STORE_HELP)
    parser.add_argument(
        "--write-key",
        dest="write_keys",
        action="append",
        metavar="KEY",
        help="accept only this write key (repeatable; default: any key)",
    )
    parser.add_argument(
        "--prefix", default="", help="path prefix of the pixel routes, e.g. /collect"
    )
    parser.add_argument(
        "--trusted-proxies",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="how many proxies in front append to X-Forwarded-For (%(default)s: use the"
        " peer address; more than there are lets clients choose their recorded IP)",
    )


def _add_filter_options(parser: argparse.ArgumentParser) -> None:
    """The collector API's filters (``record_filter``), as options."""
    parser.add_argument("--event", action="append", metavar="NAME", help="only this event name")
    parser.add_argument("--dialect", action="append", choices=DIALECTS, help="only this dialect")
    parser.add_argument(
        "--user-id", dest="user_ids", action="append", metavar="ID", help="only this userId"
    )
    parser.add_argument(
        "--anonymous-id",
        dest="anonymous_ids",
        action="append",
        metavar="ID",
        help="only this anonymousId",
    )
    parser.add_argument(
        "--text", dest="texts", action="append", metavar="TEXT", help="only records holding TEXT"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only records received since: a duration back (90s, 10m, 2h, 1d) or an ISO time",
    )
    parser.add_argument(
        "--where",
        action="append",
        metavar="NAME=VALUE",
        help="any API filter, e.g. properties.plan=pro, writeKey=KEY (repeatable)",
    )


def _filter_params(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> dict[str, list[str]]:
    """The API's filter parameters that the options ask for; bad ones are usage errors."""
    from pixel_middleware.check import CheckError, parse_since
    from pixel_middleware.record_filter import FilterError, is_filter_param, parse_filter

    params: dict[str, list[str]] = {}
    if args.accepted is not None:
        params["accepted"] = ["true" if args.accepted else "false"]
    for name, values in (
        ("call", [args.call] if args.call else []),
        ("event", args.event),
        ("dialect", args.dialect),
        ("userId", args.user_ids),
        ("anonymousId", args.anonymous_ids),
        ("q", args.texts),
    ):
        if values:
            params.setdefault(name, []).extend(values)
    for item in args.where or ():
        name, sep, value = item.partition("=")
        if not sep or not is_filter_param(name) or name == "since":
            parser.error(
                "--where takes NAME=VALUE with an API filter name (event, userId, writeKey,"
                " ...) or an event path such as properties.plan"
            )
        params.setdefault(name, []).append(value)
    if args.since:
        try:
            params["since"] = [parse_since(args.since)]
        except CheckError as exc:
            parser.error(str(exc))
    try:
        parse_filter(params)
    except FilterError as exc:
        parser.error(str(exc))
    return params


# --- serve -------------------------------------------------------------------


def _route_options(entries: list[str]) -> dict[str, str] | None:
    """``--route PATH=DIALECT[:CALL]`` options as ``PixelConfig.custom_paths``."""
    routes: dict[str, str] = {}
    for entry in entries:
        where, equals, target = entry.rpartition("=")
        if not equals or not where:
            raise ValueError(
                f"--route: {entry!r} is not PATH=DIALECT[:CALL], e.g. /t.gif=segment:track"
            )
        routes[where] = target
    return routes or None


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import logging

    from waitress.server import MultiSocketServer, create_server

    from pixel_middleware.collector import check_read_token, create_app

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # waitress warns "Task queue depth is N" whenever a request waits for a free
    # thread, which durable commits make an ordinary moment, not a fault: a line
    # per busy moment would drown the per-pixel lines. Its errors still show.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # Every option is checked before the store is opened: a mistake on the
    # command line must not leave an empty store file behind.
    try:
        routes = _route_options(args.routes)
        PixelConfig(
            prefix=args.prefix,
            write_keys=frozenset(args.write_keys) if args.write_keys else None,
            trusted_proxies=args.trusted_proxies,
            rudderstack_response=args.rudderstack_response,
            custom_paths=routes,
            dialects=frozenset(args.dialects or DEFAULT_DIALECTS),
        )
        read_token = args.read_token
        if read_token is None and not args.public_reads:
            read_token = os.environ.get(READ_TOKEN_ENV_VAR) or None
        if read_token is not None:
            check_read_token(read_token)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        store = open_store(args.store)
    except ValueError as exc:  # the URL itself: a usage error
        parser.error(redact_url(str(exc)))
    except StoreError as exc:  # the store is there but cannot be used: not a usage error
        return _fail(parser, f"cannot open the store: {redact_url(str(exc))}")
    _warn_if_unreachable(store)
    # Counted before the recorder starts handing them on: what an earlier run left.
    spool = default_spool_path(store_identity(store))
    try:
        left = count_spooled(spool, stored=getattr(store, "journal_positions", None))
    except OSError:
        left = 0
    from pixel_middleware.pixel_printer import PixelPrinter

    app_options: dict[str, Any] = {
        "write_keys": args.write_keys,
        "prefix": args.prefix,
        "trusted_proxies": args.trusted_proxies,
        "rudderstack_response": args.rudderstack_response,
        "routes": routes,
        "dialects": tuple(dict.fromkeys(args.dialects or DEFAULT_DIALECTS)),
        "durable": not args.fire_and_forget,
        "read_token": read_token,
        "public_reads": args.public_reads,
        "allow_reset": args.allow_reset,
    }
    # Counts the records of this run; prints a line for each unless --quiet.
    printer = PixelPrinter(sys.stdout, show=not args.quiet)
    try:
        app = create_app(store=store, on_record=printer, **app_options)
    except (ValueError, TypeError, StoreError, OSError) as exc:
        store.close()
        printer.close()
        return _fail(parser, redact_url(str(exc)))
    if args.server == "granian":
        # This process only checked that the collector can be built: each
        # worker builds its own (a store connection must not cross a fork).
        description = _describe_store(app.store)
        workers = 1 if _process_local(app.store) else args.workers
        app.close()
        printer.close()
        return _serve_on_granian(
            args,
            parser,
            app_options,
            description=description,
            workers=workers,
            left=left,
            spool=spool,
        )
    connection_limit = _fit_file_limit(args.connection_limit, args.threads)

    # waitress leaves its loop (and stops its threads) on SystemExit or
    # KeyboardInterrupt; make SIGTERM one of them so that a service stop is as
    # clean as Ctrl-C. Once stopping, further SIGTERMs are ignored until every
    # record is flushed.
    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        try:
            server = create_server(
                app,
                host=args.host,
                port=args.port,
                threads=args.threads,
                ident=PROG,
                connection_limit=connection_limit,
                channel_timeout=args.channel_timeout,
                cleanup_interval=args.cleanup_interval,
                # poll(), not select(): select cannot watch a descriptor past 1023.
                asyncore_use_poll=True,
                # Pass X-Forwarded-For and the like on: the app decides whom to
                # trust (--trusted-proxies for the recorded IP), and a request
                # that carries them is a proxied one, not this machine's.
                clear_untrusted_proxy_headers=False,
            )
        except OSError as exc:
            parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {exc}\n")
        if isinstance(server, MultiSocketServer):  # a host name with several addresses
            listening = list(server.effective_listen)
        else:
            # The address actually bound (the port chosen for --port 0); waitress
            # sets it on TCP servers, its type stubs do not declare it.
            tcp: Any = server
            listening = [(tcp.effective_host, tcp.effective_port)]
        urls = ", ".join(_url(host, port) for host, port in listening)
        print(
            f"Collecting pixels on {urls} (store: {_describe_store(app.store)}); Ctrl-C to stop",
            flush=True,
        )
        if not (args.public_reads or read_token or all(_loopback(h) for h, _ in listening)):
            print(
                f"Records (/, /events.json) are shown to this machine only; set"
                f" {READ_TOKEN_ENV_VAR} to read them from elsewhere",
                file=sys.stderr,
                flush=True,
            )
        if left:
            print(
                f"{left} record(s) left in the spool {spool}/ by an earlier run: they go to"
                " the store first, then new pixels",
                flush=True,
            )
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with contextlib.suppress(OSError):
                server.close()  # the listening socket; waitress stopped its threads
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        app.close()
        printer.close()
        _print_run_summary(printer.seen, spool)
        signal.signal(signal.SIGTERM, previous)
    return 0


def _serve_on_granian(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    app_options: dict[str, Any],
    *,
    description: str,
    workers: int,
    left: int,
    spool: Path,
) -> int:
    """Run the collector in granian's worker processes (``serve``'s default server)."""
    import ipaddress
    import multiprocessing
    import socket
    from functools import partial

    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    from pixel_middleware import _serve_granian

    host = args.host
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:  # a name: granian binds addresses, so the first one it resolves to
        try:
            host = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {exc}\n")
    connection_limit = _fit_file_limit(args.connection_limit, args.threads * workers)
    # Shared with the workers: each adds the records it recorded when it stops.
    recorded = multiprocessing.Value("q", 0)
    plan = _serve_granian.WorkerPlan(
        app_options={"store": args.store, **app_options},
        show_lines=not args.quiet,
        parent_pid=os.getpid(),
    )
    server = _serve_granian.SharedSocketServer(
        PROG,
        address=host,
        port=args.port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=args.threads,
        # backpressure: the requests a worker takes at once; granian accepts no
        # more connections past it, so this is the connection limit.
        backpressure=max(1, connection_limit // workers),
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=args.channel_timeout * 1000),
        # Only granian's errors, on stderr: stdout carries the pixel lines.
        log_level=LogLevels.error,
        log_dictconfig=_GRANIAN_LOGGING,
        workers_kill_timeout=_serve_granian.WORKER_STOP_SECONDS,
    )

    def started() -> None:  # the socket listens; the workers start next
        listening = _url(*server.bound)
        print(
            f"Collecting pixels on {listening} (store: {description}); Ctrl-C to stop", flush=True
        )
        if not (args.public_reads or app_options["read_token"] or _loopback(host)):
            print(
                f"Records (/, /events.json) are shown to this machine only; set"
                f" {READ_TOKEN_ENV_VAR} to read them from elsewhere",
                file=sys.stderr,
                flush=True,
            )
        if left:
            print(
                f"{left} record(s) left in the spool {spool}/ by an earlier run: they go to"
                " the store first, then new pixels",
                flush=True,
            )

    server.on_startup(started)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        # granian stops on SIGINT or SIGTERM: it sends SIGTERM to each worker,
        # which answers what is in flight, flushes its recorder, then exits.
        server.serve(
            spawn_target=_serve_granian.run_worker,
            target_loader=partial(_serve_granian.load_app, plan, recorded),
            wrap_loader=False,
        )
    except OSError as exc:
        parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {exc}\n")
    except SystemExit as exc:  # a worker died (its error is on stderr)
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _print_run_summary(int(recorded.value), spool)
    return status


# granian's log on stderr (its default is stdout), in the format of serve's own.
_GRANIAN_LOGGING: dict[str, Any] = {
    "formatters": {
        "generic": {"()": "logging.Formatter", "fmt": "%(levelname)s %(name)s: %(message)s"},
        "access": {"()": "logging.Formatter", "fmt": "%(message)s"},
    },
    "handlers": {
        "console": {
            "formatter": "generic",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
        },
        "access": {
            "formatter": "access",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
        },
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
}


def _process_local(store: object) -> bool:
    """Whether a store lives in this process only (memory://): one worker must hold it."""
    children = [store, *getattr(store, "stores", ())]
    return any(str(getattr(child, "url", "")).startswith("memory:") for child in children)


def _print_run_summary(recorded: int, spool: Path) -> None:
    """What the run did, once every record is flushed: how many, and any left spooled."""
    try:
        left = count_spooled(spool)
    except OSError:
        left = 0
    line = f"Stopped: {recorded} pixel record(s) recorded in this run"
    if left:
        line += f"; {left} record(s) left in the spool {spool}/ for the next run"
    print(line, flush=True)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    """Say what went wrong on one line (not a usage error: no --help hint); status 1."""
    print(f"{parser.prog}: error: {terminal_text(message)}", file=sys.stderr)
    return 1


def _describe_store(store: Store) -> str:
    """The store's URL with its secrets masked, and where its files are."""
    text = redact_url(str(store.url))
    files = _store_files(store)
    if files:
        text += " at " + ", ".join(files)
    return terminal_text(text)


def _store_files(store: object) -> list[str]:
    # SQLite and JSON Lines stores have a path, a forwarding store its outbox
    # (in the working directory unless ?outbox= says otherwise); a fan-out has
    # stores.
    for name in ("path", "outbox"):
        path = getattr(store, name, None)
        if isinstance(path, str | os.PathLike):
            return [os.path.abspath(path)]
    return [file for child in getattr(store, "stores", ()) for file in _store_files(child)]


def _warn_if_unreachable(store: object) -> None:
    """Say at start, not at the first pixel, that a network store does not answer.

    ``serve`` starts all the same: pixels are spooled on this disk and handed
    on once the store answers (docs/durability.md).
    """
    for child in [store, *getattr(store, "stores", ())]:
        ping = getattr(child, "ping", None)
        if not callable(ping):
            continue
        try:
            ping()
        except StoreError as exc:
            print(
                f"warning: {redacted_error(exc)}; starting anyway: pixels"
                " wait in the spool on this disk until the store answers",
                file=sys.stderr,
                flush=True,
            )


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _fit_file_limit(connection_limit: int, threads: int) -> int:
    """``connection_limit``, after raising the open-file limit to make room for it.

    Each connection is a file descriptor. When the hard limit leaves too little
    room, the connection limit is lowered to fit (with a warning): waitress then
    stops accepting cleanly instead of failing on every accept.
    """
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return connection_limit
    # The store, the spool, the log and each thread's files.
    needed = connection_limit + threads + _FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(1, soft - threads - _FILE_RESERVE)
        print(
            f"{PROG} serve: the open-file limit ({soft}) leaves room for {fitted} connections,"
            f" not --connection-limit {connection_limit}; raise it with ulimit -n",
            file=sys.stderr,
            flush=True,
        )
        return fitted
    return connection_limit


# --- events ------------------------------------------------------------------

_COLUMNS = (
    "time",
    "dialect",
    "call",
    "verdict",
    "rules",
    "event/name",
    "identity",
    "first problem",
)
# How many of a store's newest records `events` reads to filter them here.
_EVENTS_SCAN = 100_000
# The longest first-problem message a table row shows.
_PROBLEM_CHARS = 100


def _events(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pixel_middleware.record_filter import RecordFilter, parse_filter

    params = _filter_params(args, parser)
    if args.format == "har" and args.follow:
        parser.error("--format har writes one document: it cannot --follow")
    if args.format == "har":
        _check_base_url(args.base_url, parser)
    try:
        # Reading never creates a store: a typo in the path is an error, not an
        # empty store left behind.
        store = open_store(args.store, create=False)
    except StoreNotFoundError as exc:
        print(f"{parser.prog}: error: {exc} (check --store or ${STORE_ENV_VAR})", file=sys.stderr)
        return 1
    except (ValueError, StoreError) as exc:
        parser.error(str(exc))
    out = sys.stdout
    flt = parse_filter(params)
    filters = flt.store_arguments()
    # The store filters on the verdict and one call itself; any other filter
    # runs here, over the store's newest records.
    filtered_here = flt != RecordFilter(accepted=flt.accepted, calls=flt.calls[:1])
    try:
        if filtered_here:
            rows = store.read(limit=_EVENTS_SCAN, **filters)
            last = rows[-1][0] if rows else None
            rows = [row for row in rows if flt.matches(row[1])][-args.limit :]
        else:
            rows = store.read(limit=args.limit, **filters)
            last = rows[-1][0] if rows else None
        _print_spool_size(store)
        if args.format == "har":
            _print_har(out, [r for _, r in rows], args.base_url)
            return 0
        widths = _print_records(out, [r for _, r in rows], args.format, header=True)
        if args.machine:
            # Beside JSON lines, on stderr: stdout stays one record a line.
            summary_out = sys.stderr if args.format == "jsonl" else out
            print(_machine_line([r for _, r in rows]), file=summary_out)
        if not args.follow:
            return 0
        while True:
            time.sleep(args.interval)
            rows = store.read(after=last, **filters)
            if rows:
                last = rows[-1][0]
                shown = [r for _, r in rows if flt.matches(r)]
                widths = _print_records(
                    out, shown, args.format, header=widths is None, widths=widths
                )
    except KeyboardInterrupt:
        return 0
    except StoreError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _machine_line(records: list[PixelRecord]) -> str:
    """``machine opens: 2 of 5 (gmail_image_proxy 1, bot 1)``: the kinds in fixed words."""
    from pixel_middleware.record_filter import count_records

    by_machine = count_records(records).by_machine
    kinds = ", ".join(f"{kind} {count}" for kind, count in by_machine.items())
    line = f"machine opens: {sum(by_machine.values())} of {len(records)}"
    return f"{line} ({kinds})" if kinds else line


def _print_spool_size(store: Store) -> None:
    """Say so when records wait in the spool a collector run here keeps for this store.

    Read-only: the files are counted, not adopted (a Recorder would hand them
    to the store). The directory is the Recorder's default for the store URL.
    """
    directory = default_spool_path(store_identity(store))
    try:
        count = count_spooled(directory, stored=getattr(store, "journal_positions", None))
    except OSError:
        return
    if count:
        print(
            f"{count} more record(s) wait in the spool {directory}/ for the store to take"
            " them; the next collector run here hands them on",
            file=sys.stderr,
        )


def _print_har(out: TextIO, records: list[PixelRecord], base_url: str) -> None:
    from importlib.metadata import PackageNotFoundError, version

    from pixel_middleware.har import records_to_har

    try:
        creator_version = version("pixel-middleware")
    except PackageNotFoundError:  # run from a checkout that is not installed
        creator_version = "0"
    har = records_to_har(records, base_url=base_url, creator_version=creator_version)
    # ensure_ascii: no raw control or bidi characters reach the terminal.
    out.write(json.dumps(har, indent=2, ensure_ascii=True) + "\n")
    out.flush()


def _check_base_url(url: str, parser: argparse.ArgumentParser) -> None:
    scheme, sep, host = url.partition("://")
    if (
        scheme not in ("http", "https")
        or not sep
        or not host
        or any(c in host for c in "?#")
        or not host.isprintable()
        or " " in host
    ):
        parser.error("--base-url must be http://HOST[:PORT] or https://HOST[:PORT]")


def _print_records(
    out: TextIO,
    records: list[PixelRecord],
    format: str,
    *,
    header: bool,
    widths: list[int] | None = None,
) -> list[int] | None:
    """Print ``records``; for tables, returns the column widths used (kept while following)."""
    if format == "jsonl":
        for record in records:
            # ensure_ascii: no raw control or bidi characters reach the terminal.
            out.write(json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n")
        out.flush()
        return None
    if not records and not header:
        return widths
    rows = [_table_row(record) for record in records]
    if widths is None:
        widths = [
            max([len(title), *(len(row[i]) for row in rows)]) for i, title in enumerate(_COLUMNS)
        ]
    lines = [_COLUMNS] if header else []
    for row in [*lines, *rows]:
        out.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    out.flush()
    return widths


def _table_row(record: PixelRecord) -> tuple[str, ...]:
    problems = [p for p in record.get("problems") or [] if isinstance(p, dict)]
    rules = ",".join(str(p.get("rule", "")) for p in problems) or "-"
    first = str(problems[0].get("message", "")) if problems else "-"
    if len(first) > _PROBLEM_CHARS:
        first = first[: _PROBLEM_CHARS - 1] + "…"
    return tuple(
        terminal_text(value)
        for value in (
            str(record.get("receivedAt", "")),
            str(record.get("dialect", "")),
            str(record.get("call", "")),
            "accepted" if record.get("accepted") else "rejected",
            rules,
            event_name(record) or "-",
            identity(record) or "-",
            first,
        )
    )


# --- check -------------------------------------------------------------------


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pixel_middleware.check import (
        ApiSource,
        CheckError,
        RecordSource,
        StoreSource,
        parse_expectation,
        run_check,
        write_private,
    )

    params = _filter_params(args, parser)
    try:
        expectations = [parse_expectation(text) for text in args.expectations]
    except CheckError as exc:
        parser.error(str(exc))
    if not expectations and not args.no_rejected:
        parser.error("nothing to check: give at least one --expect or --no-rejected")
    token = args.token if args.token is not None else os.environ.get(READ_TOKEN_ENV_VAR)
    try:
        source: RecordSource = (
            ApiSource(args.url, token=token) if args.url else StoreSource(args.store)
        )
        result = run_check(
            source, expectations=expectations, no_rejected=args.no_rejected, filters=params
        )
    except CheckError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    encoding = (getattr(sys.stdout, "encoding", None) or "ascii").lower()
    ascii_only = "utf" not in encoding
    if args.json_path != "-":
        for line in result.lines(ascii_only=ascii_only):
            print(line)
    try:
        if args.junit:
            write_private(args.junit, result.junit_xml())
        if args.json_path:
            text = json.dumps(result.as_json(), indent=2, ensure_ascii=True) + "\n"
            if args.json_path == "-":
                sys.stdout.write(text)
            else:
                write_private(args.json_path, text.encode("ascii"))
    except OSError as exc:
        print(f"{parser.prog}: error: cannot write the report: {exc.strerror}", file=sys.stderr)
        return 2
    return 0 if result.passed else 1


# --- decode ------------------------------------------------------------------


def _decode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = PixelConfig(
            # As the collector does: a mistyped call says which calls exist.
            unknown_calls="reject",
            # Every dialect this package reads, as the addon decodes them in
            # transit: decode answers "what is this beacon?".
            dialects=frozenset(DIALECTS),
            prefix=args.prefix,
            write_keys=frozenset(args.write_keys) if args.write_keys else None,
            trusted_proxies=args.trusted_proxies,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.har is not None:
        return _decode_har(args, parser, config)
    path, query = _split_target(request_target(args.url))
    # The host tells vendors apart where a path alone does not (/collect, /tr).
    host = urlsplit(args.url.strip()).hostname if "://" in args.url else None
    outcome = _decode_pixel(
        PixelRequest("GET", path, query, args.peer, None, args.forwarded_for, host=host),
        config=config,
        now=datetime.now(UTC),
    )
    if outcome is None or outcome.record is None:
        routes = (
            "/v1/pixel/<call> (Segment), /pixel/v1/page|track (RudderStack), or a route of"
            f" another dialect ({', '.join(d for d in DIALECTS if d not in DEFAULT_DIALECTS)};"
            " docs/dialects.md)"
        )
        where = f" under {args.prefix!r}" if args.prefix else ""
        print(
            f"{parser.prog}: not a pixel route: {terminal_text(path)} (expected {routes}{where})",
            file=sys.stderr,
        )
        return 2
    record = outcome.record
    if args.json:
        print(json.dumps(record, indent=2, ensure_ascii=True))
    else:
        print(_summary(record))
    return 0 if record["accepted"] else 1


def _decode_har(
    args: argparse.Namespace, parser: argparse.ArgumentParser, config: PixelConfig
) -> int:
    """``decode --har FILE``: each pixel's verdict (or all the records as a JSON list)."""
    from pixel_middleware.har import MAX_HAR_BYTES, HarError, read_har

    try:
        if args.har == "-":
            data = sys.stdin.buffer.read(MAX_HAR_BYTES + 1)
        else:
            with open(args.har, "rb") as file:
                data = file.read(MAX_HAR_BYTES + 1)
    except OSError as exc:
        print(
            f"{parser.prog}: cannot read {terminal_text(args.har)}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    try:
        reading = read_har(data, config=config)
    except HarError as exc:
        print(f"{parser.prog}: {terminal_text(args.har)}: {exc}", file=sys.stderr)
        return 2
    pixels = reading.pixels
    rejected = sum(1 for pixel in pixels if not pixel.record["accepted"])
    others = f"{reading.skipped} other request(s) passed over"
    if reading.malformed:
        others += f", {reading.malformed} entry(ies) with no usable request"
    tally = (
        f"{len(pixels)} pixel(s): {len(pixels) - rejected} accepted, {rejected} rejected; {others}"
    )
    if not pixels:
        print(
            f"{parser.prog}: {terminal_text(args.har)}: holds no pixel request ({others})",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps([pixel.record for pixel in pixels], indent=2, ensure_ascii=True))
        print(tally, file=sys.stderr)
    else:
        for pixel in pixels:
            status = f" -> {pixel.status}" if pixel.status is not None else ""
            shown = pixel.url if len(pixel.url) <= _URL_CHARS else pixel.url[: _URL_CHARS - 1] + "…"
            print(terminal_text(f"entry {pixel.index + 1}: {pixel.method} {shown}{status}"))
            print(_summary(pixel.record))
            print()
        print(tally)
    return 1 if rejected else 0


# The longest request URL a `decode --har` block heads with.
_URL_CHARS = 200


def _summary(record: PixelRecord) -> str:
    verdict = "accepted" if record["accepted"] else "rejected"
    lines = [
        f"{verdict}: {record['dialect']} {record['call']}"
        + (f" (writeKey {record['writeKey']})" if record.get("writeKey") else " (no writeKey)")
    ]
    for label, items in (("problem", record.get("problems")), ("note", record.get("notes"))):
        for item in items or []:
            lines.append(f"  {label}: [{item.get('rule', '')}] {item.get('message', '')}")
    # What the sender wrote is escaped line by line; the event's JSON keeps its
    # layout, with JSON's own escapes (so it stays valid JSON).
    text = "\n".join(terminal_text(line) for line in lines)
    if record.get("event") is not None:
        text += "\nevent:\n" + terminal_json(
            json.dumps(record["event"], indent=2, ensure_ascii=False)
        )
    return text


# --- encode ------------------------------------------------------------------


def _encode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pixel_middleware.encode import encode_pixel_url, pixel_img_tag

    text = sys.stdin.read() if args.event == "-" else args.event
    try:
        event = json.loads(text)
    except ValueError as exc:
        parser.error(f"JSON: the event is not valid JSON ({exc})")
    if not isinstance(event, dict):
        parser.error(f"JSON: the event must be a JSON object, got {type(event).__name__}")
    options: dict[str, Any] = {"prefix": args.prefix}
    if args.base_url is not None:
        options["base_url"] = args.base_url
    try:
        url = encode_pixel_url(
            event, call=args.call, write_key=args.write_key, dialect=args.dialect, **options
        )
    except ValueError as exc:
        parser.error(str(exc))
    # The URL is checked by the same core that will decode it: one that would be
    # rejected is not handed out silently.
    path, query = _split_target(request_target(url))
    outcome = _decode_pixel(
        PixelRequest("GET", path, query),
        config=PixelConfig(prefix=args.prefix),
        now=datetime.now(UTC),
    )
    record = outcome.record if outcome is not None else None
    if record is not None and not record["accepted"] and not args.allow_rejected:
        for problem in record["problems"]:
            print(
                f"{parser.prog}: the URL would be rejected: [{problem['rule']}]"
                f" {terminal_text(problem['message'])}",
                file=sys.stderr,
            )
        print(
            f"{parser.prog}: add the missing fields, or --allow-rejected to print it anyway",
            file=sys.stderr,
        )
        return 1
    print(pixel_img_tag(url) if args.html else url)
    return 0


# --- argument types and helpers ------------------------------------------------


def _number(text: str, kind: Callable[[str], Any], low: float, high: float, rule: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return int(_number(text, int, 0, float("inf"), "0 or more"))


def _positive_int(text: str) -> int:
    return int(_number(text, int, 1, float("inf"), "1 or more"))


def _positive_float(text: str) -> float:
    return float(_number(text, float, 1e-3, 3600, "from 0.001 to 3600"))


def _port(text: str) -> int:
    return int(_number(text, int, 0, 65535, "0 to 65535"))


def _connection_limit(text: str) -> int:
    return int(_number(text, int, 1, MAX_CONNECTION_LIMIT, f"1 to {MAX_CONNECTION_LIMIT}"))


def _workers(text: str) -> int:
    return int(_number(text, int, 1, MAX_WORKERS, f"1 to {MAX_WORKERS}"))


def _seconds(text: str) -> int:
    # waitress counts these in whole seconds.
    return int(_number(text, int, 1, 3600, "a whole number of seconds from 1 to 3600"))


def _silence_stdout() -> None:
    # Python flushes stdout at exit; point it at /dev/null so that flush is quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
