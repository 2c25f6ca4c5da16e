"""ASGI: PixelASGIMiddleware under uvicorn, against a no-op ASGI app on the same server.

Two ``uvicorn --factory`` servers (one worker each, uvicorn's defaults) on
127.0.0.1, loaded in interleaved rounds (:mod:`bench.rounds`) by wrk:

- the no-op GIF app (:func:`bench.asgi_apps.noop_gif_app`): the limit;
- :class:`PixelASGIMiddleware` with the durable SQLite store in front of it: each
  pixel is decoded on the event loop and its commit awaited in a worker thread.

Shown for scale (no target): a single uvicorn worker runs Python on one core,
so this row says what the decode and the durable commit cost against answering
nothing. Every 200 must be kept in the store (:func:`bench.rounds.kept_row`).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from bench.payloads import segment_template
from bench.results import Row, median_ratio
from bench.rounds import CONNECTIONS, ServerUnderLoad, kept_row, run_rounds, store_message_ids
from bench.settings import Settings

NAME = "asgi"
ROOT = Path(__file__).resolve().parent.parent
UVICORN_READY = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"


def uvicorn_argv(factory: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host=127.0.0.1",
        "--port=0",
        "--no-access-log",
        "--log-level=info",
    ]


def run(settings: Settings) -> list[Row]:
    template = segment_template()
    store_url = f"sqlite:///{settings.workdir / 'asgi-middleware.sqlite3'}"

    def uvicorn(name: str, factory: str, **env: str) -> ServerUnderLoad:
        env["PYTHONPATH"] = str(ROOT)
        return ServerUnderLoad(
            name, uvicorn_argv(factory), UVICORN_READY, env, cwd=settings.workdir
        )

    servers = {
        "limit": uvicorn("no-op ASGI GIF app", "bench.asgi_apps:noop_gif_app"),
        "ours": uvicorn(
            "PixelASGIMiddleware", "bench.asgi_apps:middleware_app", BENCH_STORE=store_url
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
    ours, limit = servers["ours"], servers["limit"]
    vs_limit, samples = median_ratio(ours.rates, limit.rates)
    driver = "python client" if settings.smoke else f"wrk -t1 -c{CONNECTIONS}, unpinned"
    setup = (
        f"uvicorn, 1 worker; {driver}; {rounds}x{seconds:g}s; wrk used"
        f" {limit.client_share:.0%} / {ours.client_share:.0%} of a CPU against no-op / middleware"
    )
    return [
        Row(
            bench=NAME,
            name="PixelASGIMiddleware (sqlite, durable) vs no-op ASGI GIF app",
            ours=statistics.median(ours.rates),
            baseline=statistics.median(limit.rates),
            unit="req/s",
            ratio=vs_limit,
            baseline_name="no-op",
            note=setup,
            samples=samples,
        ),
        Row(
            bench=NAME,
            name="p99 latency, PixelASGIMiddleware vs no-op ASGI GIF app",
            ours=ours.p99_ms,
            baseline=limit.p99_ms,
            unit="ms",
            ratio=ours.p99_ms / limit.p99_ms if limit.p99_ms else None,
            baseline_name="no-op",
        ),
        kept_row(NAME, ours, store_message_ids(store_url)),
    ]
