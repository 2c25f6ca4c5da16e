"""Remake the Chromium and mitmproxy HAR fixtures of tests/fixtures/har/.

    .venv/bin/python scripts/make_har_fixtures.py

A real collector (``pixel-middleware serve``, memory store) and a small page
server run on free ports of 127.0.0.1. The page embeds four pixels (two
accepted, two rejected, both dialects). Then:

- ``chromium.har``: Debian's chromium (``/usr/bin/chromium``), driven by
  Playwright, loads the page in a context with ``record_har_path=``: Chrome's
  own HAR writer.
- ``mitmproxy.har``: the same chromium loads the page through a real
  ``mitmdump -s addons/pixel_capture.py --set hardump=PATH`` (mitmproxy 12's
  own HAR writer); ``--proxy-bypass-list=<-loopback>`` makes chromium send
  loopback requests through the proxy at all.

``firefox.har`` is written by hand (see tests/fixtures/har/README.md).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "har"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WRITE_KEY = "wk_fixture"
# The pixels the page embeds, and the verdict each must get (the tests check both).
PIXELS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "segment",
        "track",
        {"userId": "u-42", "event": "Email Opened", "properties": {"subject": "Hi"}},
    ),
    ("rudderstack", "page", {"anonymousId": "a-1", "name": "Pricing"}),
    ("rudderstack", "track", {"anonymousId": "a-1"}),  # rejected: no event
    ("segment", "identify", {"traits": {"plan": "pro"}}),  # rejected: no identity
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout} s")


def page_html(collector: str) -> str:
    sys.path.insert(0, str(ROOT))
    from pixel_middleware.encode import encode_pixel_url, pixel_img_tag

    tags = [
        pixel_img_tag(
            encode_pixel_url(event, call=call, write_key=WRITE_KEY, dialect=d, base_url=collector)
        )
        for d, call, event in PIXELS
    ]
    body = "\n".join(tags)
    return f"<!doctype html><html><head><title>pixels</title></head><body>\n{body}\n</body></html>"


def serve_page(html: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = html.encode() if self.path == "/email.html" else b"not found"
            self.send_response(200 if self.path == "/email.html" else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/email.html"


def load(page_url: str, har_path: Path | None, extra_args: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args]
        )
        options: dict[str, Any] = {}
        if har_path is not None:
            options["record_har_path"] = str(har_path)
        context = browser.new_context(**options)
        page = context.new_page()
        page.goto(page_url, wait_until="load")
        page.wait_for_timeout(500)
        context.close()  # writes the HAR
        browser.close()


def main() -> int:
    if shutil.which(CHROMIUM) is None:
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install chromium")
    bin_dir = Path(sys.executable).parent
    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    collector = subprocess.Popen(
        [bin_dir / "pixel-middleware", "serve", "--port", str(port), "--store", "memory://"],
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        server, page_url = serve_page(page_html(f"http://127.0.0.1:{port}"))
        try:
            load(page_url, OUT / "chromium.har", [])
            proxy_port = free_port()
            with tempfile.TemporaryDirectory() as tmp:
                har = Path(tmp) / "mitmproxy.har"
                mitmdump = subprocess.Popen(
                    [
                        bin_dir / "mitmdump",
                        "-q",
                        "--listen-host",
                        "127.0.0.1",
                        "-p",
                        str(proxy_port),
                        "-s",
                        ROOT / "addons" / "pixel_capture.py",
                        "--set",
                        "pixel_store=memory://",
                        "--set",
                        f"hardump={har}",
                    ],
                    cwd=tmp,
                )
                try:
                    wait_for_port(proxy_port)
                    load(
                        page_url,
                        None,
                        [
                            f"--proxy-server=http://127.0.0.1:{proxy_port}",
                            "--proxy-bypass-list=<-loopback>",
                        ],
                    )
                finally:
                    mitmdump.send_signal(signal.SIGINT)  # hardump writes the file on exit
                    mitmdump.wait(timeout=30)
                shutil.copyfile(har, OUT / "mitmproxy.har")
        finally:
            server.shutdown()
    finally:
        collector.send_signal(signal.SIGINT)
        collector.wait(timeout=30)
    for name in ("chromium.har", "mitmproxy.har"):
        entries = json.loads((OUT / name).read_text())["log"]["entries"]
        os.chmod(OUT / name, 0o644)
        print(f"{name}: {len(entries)} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
