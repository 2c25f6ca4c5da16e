"""Over HTTP: real multi-worker gunicorn, driven by wrk, every pixel a distinct event.

Three servers, all ``gunicorn -w 2 -k gthread --threads 4`` on 127.0.0.1, loaded in
interleaved rounds (:mod:`bench.rounds`):

- the no-op GIF app (:func:`bench.apps.noop_gif_app`): the limit;
- :class:`PixelMiddleware` with the durable SQLite store, in front of a Flask site;
- the hand-written Flask view (:func:`bench.apps.handwritten_app`), with the same
  journal mode and ``synchronous`` as the project's SQLite store.

Targets: the middleware at least 0.85x the limit and 2x the hand-written view in
requests/s (medians of the per-round ratios), and every 200 kept in the store
(:func:`bench.rounds.kept_row`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.apps import handwritten_message_ids
from bench.payloads import segment_template
from bench.processes import BenchError
from bench.results import Row, at_least, median_ratio
from bench.rounds import CONNECTIONS, ServerUnderLoad, kept_row, run_rounds, store_message_ids
from bench.settings import Settings

NAME = "http"
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
THREADS = 4
VS_LIMIT = at_least(0.85)
VS_HANDWRITTEN = at_least(2.0)
GUNICORN_READY = r"Listening at: http://127\.0\.0\.1:(\d+)"


def gunicorn_argv(app: str) -> list[str]:
    import gunicorn.config

    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind=127.0.0.1:0",
        f"--workers={WORKERS}",
        "--worker-class=gthread",
        f"--threads={THREADS}",
        "--graceful-timeout=30",
        "--log-level=info",
    ]
    if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
        # Several gunicorns at once would otherwise share one control socket path.
        argv.append("--no-control-socket")
    return [*argv, app]


def sqlite_synchronous(url: str) -> str:
    """The ``synchronous`` setting the store at ``url`` uses, for the baseline to copy."""
    from pixel_middleware.stores import open_store

    store = open_store(url)
    try:
        value = getattr(store, "synchronous", None)
    finally:
        store.close()
    if value is None:
        raise BenchError(f"{store!r} does not say its synchronous setting")
    return str(value).upper()


def run(settings: Settings) -> list[Row]:
    template = segment_template()
    handwritten_path = settings.workdir / "http-handwritten.sqlite3"
    store_url = f"sqlite:///{settings.workdir / 'http-middleware.sqlite3'}"

    def gunicorn(name: str, app: str, **env: str) -> ServerUnderLoad:
        env["PYTHONPATH"] = str(ROOT)
        return ServerUnderLoad(name, gunicorn_argv(app), GUNICORN_READY, env, cwd=settings.workdir)

    servers = {
        "limit": gunicorn("no-op GIF app", "bench.apps:noop_gif_app()"),
        "ours": gunicorn("PixelMiddleware", "bench.apps:middleware_app()", BENCH_STORE=store_url),
        "handwritten": gunicorn(
            "hand-written Flask view",
            "bench.apps:handwritten_app()",
            BENCH_SQLITE_PATH=str(handwritten_path),
            BENCH_SQLITE_SYNCHRONOUS=sqlite_synchronous(store_url),
        ),
    }
    seconds = settings.pick(6.0, 3.0, 1.0)
    rounds = settings.pick(5, 3, 1)
    run_rounds(
        servers,
        settings,
        template,
        seconds=seconds,
        warmup=settings.pick(2.0, 1.0, 0.5),
        rounds=rounds,
        bench=NAME,
    )
    ours, limit, hand = servers["ours"], servers["limit"], servers["handwritten"]
    vs_limit, limit_samples = median_ratio(ours.rates, limit.rates)
    vs_hand, hand_samples = median_ratio(ours.rates, hand.rates)
    driver = "python client" if settings.smoke else f"wrk -t1 -c{CONNECTIONS}, unpinned"
    setup = (
        f"gunicorn -w {WORKERS} -k gthread --threads {THREADS}; {driver}; {rounds}x{seconds:g}s;"
        f" wrk used {limit.client_share:.0%} / {ours.client_share:.0%} / {hand.client_share:.0%}"
        " of a CPU against no-op / middleware / hand-written"
    )
    return [
        Row(
            bench=NAME,
            name="PixelMiddleware (sqlite, durable) vs no-op GIF app",
            ours=statistics.median(ours.rates),
            baseline=statistics.median(limit.rates),
            unit="req/s",
            ratio=vs_limit,
            target=VS_LIMIT,
            baseline_name="no-op",
            note=setup,
            samples=limit_samples,
        ),
        Row(
            bench=NAME,
            name="PixelMiddleware (sqlite, durable) vs hand-written Flask view",
            ours=statistics.median(ours.rates),
            baseline=statistics.median(hand.rates),
            unit="req/s",
            ratio=vs_hand,
            target=VS_HANDWRITTEN,
            baseline_name="hand-written",
            samples=hand_samples,
        ),
        Row(
            bench=NAME,
            name="p99 latency, PixelMiddleware vs no-op GIF app",
            ours=ours.p99_ms,
            baseline=limit.p99_ms,
            unit="ms",
            ratio=ours.p99_ms / limit.p99_ms if limit.p99_ms else None,
            baseline_name="no-op",
        ),
        Row(
            bench=NAME,
            name="p99 latency, PixelMiddleware vs hand-written Flask view",
            ours=ours.p99_ms,
            baseline=hand.p99_ms,
            unit="ms",
            ratio=ours.p99_ms / hand.p99_ms if hand.p99_ms else None,
            baseline_name="hand-written",
        ),
        kept_row(NAME, ours, store_message_ids(store_url)),
        kept_row(NAME, hand, handwritten_message_ids(str(handwritten_path))),
    ]
