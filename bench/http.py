"""Over HTTP: real servers, driven by wrk, every pixel a distinct event.

Five servers on 127.0.0.1, loaded in interleaved rounds (:mod:`bench.rounds`).
Under ``gunicorn -w 2 -k gthread --threads 4 --worker-connections 8``:

- the no-op GIF app (:func:`bench.apps.noop_gif_app`): the limit;
- :class:`PixelMiddleware` with the durable SQLite store, in front of a Flask site;
- the hand-written Flask view (:func:`bench.apps.handwritten_app`), with the same
  journal mode and ``synchronous`` as the project's SQLite store.

And as a user gets them from the package:

- ``pixel-middleware serve`` as shipped (granian, its default workers and
  threads), durable SQLite store;
- the hand-written view on serve's own server: granian's WSGI interface with
  serve's worker and thread counts.

``--worker-connections 8`` (wrk's 16 connections over 2 workers) keeps the
kernel from handing most connections to one worker in some rounds, which made
the no-op limit bimodal (per-round ratios 0.23 to 1.06 in one run).

Targets: the middleware at least 0.85x the limit and 2.5x the hand-written view;
``serve`` at least 2x the gunicorn no-op app and 5x the hand-written view on its
server, in requests/s (medians of the per-round ratios); every 200 kept in the
store (:func:`bench.rounds.kept_row`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.apps import handwritten_message_ids
from bench.payloads import segment_template
from bench.processes import BenchError, free_port
from bench.results import Row, at_least, median_ratio
from bench.rounds import CONNECTIONS, ServerUnderLoad, kept_row, run_rounds, store_message_ids
from bench.settings import Settings
from pixel_middleware.cli import DEFAULT_WORKERS

NAME = "http"
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
THREADS = 4
VS_LIMIT = at_least(0.85)
VS_HANDWRITTEN = at_least(2.5)
SERVE_VS_NOOP = at_least(2.0)
SERVE_VS_HANDWRITTEN = at_least(5.0)
GUNICORN_READY = r"Listening at: http://127\.0\.0\.1:(\d+)"
SERVE_READY = r"Collecting pixels on http://127\.0\.0\.1:(\d+)/"
SERVE_WORKERS = DEFAULT_WORKERS  # serve's default --workers
SERVE_THREADS = 8  # serve's default --threads
# granian says nothing of its port before it is bound: the last worker's start.
GRANIAN_READY = rf"Started worker-{SERVE_WORKERS}"


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
        f"--worker-connections={CONNECTIONS // WORKERS}",
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

    serve_path = settings.workdir / "http-serve.sqlite3"
    serve_hand_path = settings.workdir / "http-serve-handwritten.sqlite3"
    bin_dir = Path(sys.executable).parent
    granian_port = free_port()
    servers = {
        "limit": gunicorn("no-op GIF app", "bench.apps:noop_gif_app()"),
        "ours": gunicorn("PixelMiddleware", "bench.apps:middleware_app()", BENCH_STORE=store_url),
        "handwritten": gunicorn(
            "hand-written Flask view",
            "bench.apps:handwritten_app()",
            BENCH_SQLITE_PATH=str(handwritten_path),
            BENCH_SQLITE_SYNCHRONOUS=sqlite_synchronous(store_url),
        ),
        "serve": ServerUnderLoad(
            "pixel-middleware serve",
            [
                str(bin_dir / "pixel-middleware"),
                "serve",
                "--port=0",
                f"--store=sqlite:///{serve_path}",
                "--quiet",
            ],
            SERVE_READY,
            {"PYTHONPATH": str(ROOT)},
            cwd=settings.workdir,
        ),
        "serve_handwritten": ServerUnderLoad(
            "hand-written Flask view on granian",
            [
                sys.executable,
                "-m",
                "granian",
                "--interface=wsgi",
                "--factory",
                f"--workers={SERVE_WORKERS}",
                f"--blocking-threads={SERVE_THREADS}",
                "--host=127.0.0.1",
                f"--port={granian_port}",
                "bench.apps:handwritten_app",
            ],
            GRANIAN_READY,
            {
                "PYTHONPATH": str(ROOT),
                "BENCH_SQLITE_PATH": str(serve_hand_path),
                "BENCH_SQLITE_SYNCHRONOUS": sqlite_synchronous(store_url),
            },
            cwd=settings.workdir,
            port=granian_port,
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
    serve, serve_hand = servers["serve"], servers["serve_handwritten"]
    serve_vs_noop, serve_noop_samples = median_ratio(serve.rates, limit.rates)
    serve_vs_hand, serve_hand_samples = median_ratio(serve.rates, serve_hand.rates)
    serve_per_cpu = serve.pixels_per_cpu_second
    ours_per_cpu = ours.pixels_per_cpu_second
    per_cpu_ratio, per_cpu_samples = median_ratio(serve_per_cpu, ours_per_cpu)
    driver = "python client" if settings.smoke else f"wrk -t1 -c{CONNECTIONS}, unpinned"
    setup = (
        f"gunicorn -w {WORKERS} -k gthread --threads {THREADS}"
        f" --worker-connections {CONNECTIONS // WORKERS}; {driver}; {rounds}x{seconds:g}s;"
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
        Row(
            bench=NAME,
            name="pixel-middleware serve (sqlite, durable) vs gunicorn gthread no-op app",
            ours=statistics.median(serve.rates),
            baseline=statistics.median(limit.rates),
            unit="req/s",
            ratio=serve_vs_noop,
            target=SERVE_VS_NOOP,
            baseline_name="no-op",
            note=f"serve as shipped: granian, {SERVE_WORKERS} workers x {SERVE_THREADS} threads",
            samples=serve_noop_samples,
        ),
        Row(
            bench=NAME,
            name="pixel-middleware serve vs hand-written Flask view on granian",
            ours=statistics.median(serve.rates),
            baseline=statistics.median(serve_hand.rates),
            unit="req/s",
            ratio=serve_vs_hand,
            target=SERVE_VS_HANDWRITTEN,
            baseline_name="hand-written",
            note=f"granian --workers {SERVE_WORKERS} --blocking-threads {SERVE_THREADS}:"
            " serve's own server",
            samples=serve_hand_samples,
        ),
        Row(
            bench=NAME,
            name="pixels per server CPU-second: serve vs PixelMiddleware on gunicorn",
            ours=statistics.median(serve_per_cpu) if serve_per_cpu else None,
            baseline=statistics.median(ours_per_cpu) if ours_per_cpu else None,
            unit="px/CPU-s",
            ratio=per_cpu_ratio if serve_per_cpu and ours_per_cpu else None,
            baseline_name="gunicorn",
            note="answers / CPU seconds of every process of the server's session in the round",
            samples=per_cpu_samples,
        ),
        kept_row(NAME, ours, store_message_ids(store_url)),
        kept_row(NAME, hand, handwritten_message_ids(str(handwritten_path))),
        kept_row(NAME, serve, store_message_ids(f"sqlite:///{serve_path}")),
    ]
