"""The benchmark harness, run for real with tiny counts so that it never rots.

Each benchmark runs as ``./dev bench`` would run it (``python -m bench --smoke
--only NAME``, a real process starting real gunicorn, mitmdump and redis-server
processes), with the Python HTTP client in place of wrk. The figures of a smoke run
mean nothing; what is checked is that every row comes out and that every record
check holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.load import wrk_script
from bench.payloads import DIGITS, rudderstack_template, segment_template
from bench.results import Row, at_least, median_ratio, render_table

ROOT = Path(__file__).resolve().parent.parent


def run_bench(name: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", name, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        pytest.param("core", 3, id="core"),
        pytest.param("wsgi", 4, id="wsgi"),
        pytest.param("http", 10, id="http"),
        pytest.param("asgi", 3, id="asgi"),
        pytest.param("mitm", 4, id="mitm", marks=pytest.mark.mitmproxy),
        pytest.param("stores", 10, id="stores", marks=[pytest.mark.redis, pytest.mark.postgresql]),
    ],
)
def test_smoke_run(name: str, rows: int, tmp_path: Path) -> None:
    data = run_bench(name, tmp_path)
    assert data["meta"]["failed"] == []
    assert data["meta"]["benchmarks"] == [name]
    assert len(data["rows"]) == rows, [row["name"] for row in data["rows"]]
    for row in data["rows"]:
        assert row["bench"] == name
        assert row["ours"] is not None, row
        assert row["ours"] > 0, row
        if row["target"] is not None and "kept" in row["target"]:
            # Record checks hold whatever the load: every 200 was kept, once.
            assert row["met"] is True, row


@pytest.mark.parametrize(
    "make", [segment_template, rudderstack_template], ids=["segment", "rudderstack"]
)
def test_template_urls_are_distinct_events(make: Any) -> None:
    from datetime import UTC, datetime

    from pixel_middleware.core import PixelConfig, PixelRequest, decode_pixel

    template = make()
    seen = set()
    for n in [0, 1, 999, 1000, 10**9 + 7, 10**DIGITS - 1]:
        path, _, query = template.url(n).partition("?")
        outcome = decode_pixel(
            PixelRequest("GET", path, query.encode()),
            config=PixelConfig(),
            now=datetime(2026, 1, 1, tzinfo=UTC),
        )
        assert outcome is not None
        assert outcome.record is not None
        assert outcome.record["accepted"], outcome.record["problems"]
        event = outcome.record["event"]
        assert event is not None
        assert event["messageId"].endswith(f"{n:0{DIGITS}d}")
        seen.add(event["messageId"])
    assert len(seen) == 6


def test_the_no_op_apps_answer_a_pixel_as_the_middleware_does(tmp_path: Path) -> None:
    """The limit is fair: the no-op apps send the middleware's status, headers and body."""
    import asyncio

    import httpx

    from bench.apps import noop_gif
    from bench.asgi_apps import noop_gif as noop_gif_asgi
    from bench.wsgi import call, environ_for
    from pixel_middleware import PixelASGIMiddleware, PixelMiddleware

    url = segment_template().url(7)
    middleware = PixelMiddleware(noop_gif, store="memory://")
    try:
        ours = call(middleware, environ_for(url))
    finally:
        middleware.close()
    assert ours[0] == "200 OK"
    assert ours[2].startswith(b"GIF89a")
    assert call(noop_gif, environ_for(url)) == ours

    async def both() -> list[tuple[int, list[tuple[str, str]], bytes]]:
        answers = []
        for app in (PixelASGIMiddleware(noop_gif_asgi, store="memory://"), noop_gif_asgi):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.get(url)
            answers.append((answer.status_code, answer.headers.multi_items(), answer.content))
            if isinstance(app, PixelASGIMiddleware):
                app.close()
        return answers

    asgi_ours, asgi_noop = asyncio.run(both())
    assert asgi_noop == asgi_ours


def test_rounds_wait_until_the_server_answers_not_only_listens() -> None:
    """As gunicorn: the socket listens at once, the app answers only once loaded."""
    import http.server
    import threading
    import time

    from bench.processes import BenchError
    from bench.rounds import wait_answering

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)  # listening already
    loaded = threading.Event()

    def serve_once_loaded() -> None:
        time.sleep(0.5)  # the workers load the app
        loaded.set()
        server.handle_request()

    thread = threading.Thread(target=serve_once_loaded)
    thread.start()
    try:
        wait_answering(server.server_address[1], "slow starter", timeout=10)
        assert loaded.is_set()
    finally:
        thread.join()
        server.server_close()
    with pytest.raises(BenchError, match="does not answer HTTP"):
        wait_answering(server.server_address[1], "gone", timeout=0.3)


def test_wrk_script_counts_what_it_sends() -> None:
    script = wrk_script(segment_template(), run_id=3)
    for hook in ("function setup(", "function request(", "function response(", "function done("):
        assert hook in script
    assert "local run_id = 3" in script
    assert script.count('"') % 2 == 0


@pytest.mark.parametrize(
    ("ours", "baseline", "ratio", "met"),
    [
        pytest.param([2.0, 4.0, 3.0], [2.0, 2.0, 2.0], 1.5, True, id="faster"),
        pytest.param([1.0, 1.0, 9.0], [2.0, 2.0, 2.0], 0.5, True, id="median-not-mean"),
        pytest.param([1.0, 1.0, 1.0], [4.0, 4.0, 4.0], 0.25, False, id="slower"),
    ],
)
def test_ratio_is_median_of_rounds(
    ours: list[float], baseline: list[float], ratio: float, met: bool
) -> None:
    got, samples = median_ratio(ours, baseline)
    assert got == pytest.approx(ratio)
    assert len(samples) == len(ours)
    row = Row("x", "y", 1.0, 1.0, "req/s", got, target=at_least(0.5))
    assert row.met is met
    assert ("NOT MET" in render_table([row])) is not met
