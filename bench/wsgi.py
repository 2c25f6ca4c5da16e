"""In-process WSGI: the middleware called directly, no server, no sockets.

- A pixel through :class:`PixelMiddleware` (memory store; durable SQLite store)
  against :func:`bench.apps.noop_gif`, the same request answered with the GIF and
  nothing else.
- Pass-through: a non-pixel request to :func:`bench.apps.site_app` (a one-page
  Flask site) with and without the middleware in front. Target: at most 2%
  slower, i.e. a throughput ratio of at least 0.98.

Each call gets a fresh copy of a prebuilt environ (as a server would build one),
and the body is iterated and closed; both sides pay for that alike.
"""

from __future__ import annotations

import itertools
import statistics
from typing import TYPE_CHECKING, Any

from werkzeug.test import EnvironBuilder

from bench.apps import noop_gif, site_app
from bench.load import USER_AGENT
from bench.payloads import segment_template
from bench.processes import BenchError
from bench.results import Row, at_least, median_ratio
from bench.settings import Settings
from bench.timing import CPU, WALL, Case, Clock, interleave

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

NAME = "wsgi"
PASS_THROUGH_TARGET = at_least(0.98)


def environ_for(url: str) -> dict[str, Any]:
    path, _, query = url.partition("?")
    builder = EnvironBuilder(
        path=path,
        query_string=query,
        headers={"User-Agent": USER_AGENT, "Accept": "image/avif,image/webp,*/*"},
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def call(app: WSGIApplication, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    """One request: the status, the headers and the body."""
    seen: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append((status, list(headers)))

    body = app(dict(environ), start_response)  # type: ignore[arg-type]
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return *seen[-1], data


def _case(app: WSGIApplication, environs: list[dict[str, Any]], clock: Clock) -> Case:
    """Requests to ``app`` cycling through ``environs``.

    One app for every block: a fresh middleware per block would put its
    recorder thread's start-up into the figure.
    """

    def run(n: int) -> float:
        batch = list(itertools.islice(itertools.cycle(environs), n))
        start = clock()
        for environ in batch:
            body = app(dict(environ), _start_response)  # type: ignore[arg-type]
            for _ in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return clock() - start

    return run


def _row(
    settings: Settings,
    name: str,
    ours: Case,
    baseline: Case,
    *,
    baseline_name: str,
    target: Any = None,
    note: str = "",
    rounds: int,
) -> Row:
    cases = {"ours": ours, "baseline": baseline}
    per_op = interleave(
        cases,
        block_seconds=settings.pick(0.02, 0.02, 0.002),
        rounds=settings.pick(rounds, rounds // 2, 2),
    )
    ours_us = [t * 1e6 for t in per_op["ours"]]
    base_us = [t * 1e6 for t in per_op["baseline"]]
    # The ratio is one of throughputs (baseline time / our time): 1.0 is as fast as
    # the baseline, 0.98 is 2% slower.
    ratio, samples = median_ratio(base_us, ours_us)
    return Row(
        bench=NAME,
        name=name,
        ours=statistics.median(ours_us),
        baseline=statistics.median(base_us),
        unit="us/request",
        ratio=ratio,
        target=target,
        baseline_name=baseline_name,
        note=note,
        samples=samples,
    )


def _pass_through_rows(
    settings: Settings,
    site: WSGIApplication,
    in_front: WSGIApplication,
    pages: list[dict[str, Any]],
    noop_in_front: WSGIApplication,
) -> list[Row]:
    """The pass-through overhead, measured two ways in one interleaved run.

    Directly: the Flask site with and without the middleware in front. On a
    shared machine the per-round ratios of two ~40 us requests scatter by a few
    percent, so a 2% difference is near the noise floor of this way.

    By difference: the middleware's own pass-through cost is what it adds to any
    app (it does its check and calls the app), so it is measured in front of the
    no-op app, where it is a large part of the total and stands well clear of the
    noise, and set against the Flask site's median time from the direct run.
    """
    # Two interleaved runs, not one of four cases: a Flask request right after a
    # no-op one starts with colder caches, which would bias whichever case
    # follows the no-op app in the order.
    block = settings.pick(0.005, 0.005, 0.001)
    rounds = settings.pick(1001, 401, 2)
    flask = interleave(
        {"site": _case(site, pages, CPU), "in_front": _case(in_front, pages, CPU)},
        block_seconds=block,
        rounds=rounds,
    )
    noop = interleave(
        {"noop": _case(noop_gif, pages, CPU), "noop_in_front": _case(noop_in_front, pages, CPU)},
        block_seconds=block,
        rounds=rounds,
    )
    us = {key: [t * 1e6 for t in times] for key, times in {**flask, **noop}.items()}
    site_us = statistics.median(us["site"])
    direct, direct_samples = median_ratio(us["site"], us["in_front"])
    added = [m - n for m, n in zip(us["noop_in_front"], us["noop"], strict=True)]
    by_difference = [site_us / (site_us + a) for a in added]
    quartiles = statistics.quantiles(direct_samples, n=4)
    return [
        Row(
            bench=NAME,
            name="pass-through GET / (Flask page), overhead by difference",
            ours=site_us + statistics.median(added),
            baseline=site_us,
            unit="us/request",
            ratio=statistics.median(by_difference),
            target=PASS_THROUGH_TARGET,
            baseline_name="bare Flask app",
            note=(
                f"CPU time; the middleware adds {statistics.median(added):.2f} us"
                f" (measured in front of the no-op app: {statistics.median(us['noop']):.2f}"
                f" -> {statistics.median(us['noop_in_front']):.2f} us);"
                " ratio = bare / (bare + added)"
            ),
            samples=by_difference,
        ),
        Row(
            bench=NAME,
            name="pass-through GET / (Flask page), direct",
            ours=statistics.median(us["in_front"]),
            baseline=site_us,
            unit="us/request",
            ratio=direct,
            target=PASS_THROUGH_TARGET,
            baseline_name="bare Flask app",
            note=(
                "CPU time; ratio = bare time / time with the middleware in front;"
                f" per-round ratios' quartiles {quartiles[0]:.3f} / {quartiles[2]:.3f}"
                " (the noise floor of this way)"
            ),
            samples=direct_samples,
        ),
    ]


def run(settings: Settings) -> list[Row]:
    from pixel_middleware.middleware import PixelMiddleware

    template = segment_template()
    pixels = [environ_for(template.url(i)) for i in range(1000)]
    pages = [environ_for("/")]
    site = site_app().wsgi_app
    memory = PixelMiddleware(noop_gif, store="memory://", durable=True)
    sqlite = PixelMiddleware(
        noop_gif, store=f"sqlite:///{settings.workdir / 'wsgi.sqlite3'}", durable=True
    )
    in_front = PixelMiddleware(site, store="memory://", durable=True)
    noop_in_front = PixelMiddleware(noop_gif, store="memory://", durable=True)
    try:
        # Check the plumbing before timing it: the middleware answers the pixel,
        # the site answers the page through it, and the no-op app answers exactly
        # what the middleware does (a fair limit: the same bytes to send).
        for app, environ, want in [
            (memory, pixels[0], b"GIF89a"),
            (sqlite, pixels[0], b"GIF89a"),
            (in_front, pages[0], b"<!doctype html>"),
        ]:
            status, _, body = call(app, environ)
            if not (status.startswith("200") and body.startswith(want)):
                raise BenchError(f"{environ['PATH_INFO']}: {status} {body[:40]!r}")
        if call(noop_gif, pixels[1]) != call(memory, pixels[1]):
            raise BenchError(
                f"the no-op app answers {call(noop_gif, pixels[1])!r},"
                f" the middleware {call(memory, pixels[1])!r}"
            )
        return [
            _row(
                settings,
                "pixel via PixelMiddleware(memory://)",
                _case(memory, pixels, CPU),
                _case(noop_gif, pixels, CPU),
                baseline_name="no-op GIF app",
                note=(
                    "CPU time of every thread, one caller: the memory store's commit is"
                    " work, not a wait, so time other processes take does not count"
                ),
                rounds=31,
            ),
            _row(
                settings,
                "pixel via PixelMiddleware(sqlite, durable)",
                _case(sqlite, pixels, WALL),
                _case(noop_gif, pixels, WALL),
                baseline_name="no-op GIF app",
                note="wall time, one caller: every pixel waits for its own commit",
                rounds=31,
            ),
            *_pass_through_rows(settings, site, in_front, pages, noop_in_front),
        ]
    finally:
        for app in (memory, sqlite, in_front, noop_in_front):
            app.close()
