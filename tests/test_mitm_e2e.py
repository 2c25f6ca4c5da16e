"""The addon in real mitmdump processes, driven by a real HTTP client.

One mitmdump per mode (regular proxy, reverse proxy, ``pixel_answer``, collector
down), each in front of a real collector: a werkzeug server running
``PixelMiddleware``, so every pixel is decoded twice, by the collector and by the
addon, and the two records can be compared.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from collector_server import Collector, QuietHandler, not_found
from silent_server import SilentServer
from werkzeug.serving import make_server

from pixel_middleware import GIF, PixelMiddleware, PixelRecord

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

pytestmark = pytest.mark.mitmproxy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addons" / "pixel_capture.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
CLI = Path(sys.executable).with_name("pixel-middleware")

LISTENING = re.compile(r"listening at 127\.0\.0\.1:(\d+)\.")


def b64(event: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(event).encode()).decode()


TRACK = "/v1/pixel/track?data=" + b64(
    {"writeKey": "wk_1", "event": "Email Opened", "userId": "u-1", "properties": {"n": 1}}
)
RS_PAGE = "/pixel/v1/page?writeKey=wk_2&anonymousId=a-9&name=Pricing"
RS_REJECTED = "/pixel/v1/track?anonymousId=a-9"  # no write key, no event: 400 (seed)
NASTY = "/v1/pixel/track?data=" + b64({"writeKey": "k", "event": "\x1b[2Jgone", "userId": "u"})


# -- the collector and mitmdump ---------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    yield server
    server.close()


def dead_port() -> int:
    """A port on which nothing listens (bound, then closed, without listening)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Mitmdump:
    """A real ``mitmdump -s addons/pixel_capture.py`` on a free port."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        store: bool = True,
        wait: bool = True,
        script: Path = SCRIPT,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # Four slashes: an absolute path (SQLAlchemy's convention).
        self.store_url = f"sqlite:///{workdir}/pixels.sqlite3" if store else ""
        cmd = [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "-p",
            "0",
            "--flow-detail",
            "0",
            "--set",
            f"confdir={workdir}/conf",
            "-s",
            str(script),
            *(["--set", f"pixel_store={self.store_url}"] if store else []),
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
        self.proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="backslashreplace",
        )
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until it listens (several can start at once: start, then wait)."""
        self.port = self._wait_listening()
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self) -> int:
        while True:
            try:
                line = self._lines.get(timeout=30)
            except queue.Empty:
                self.proc.kill()
                pytest.fail("mitmdump did not start listening:\n" + "\n".join(self.lines))
            if line is None:
                pytest.fail("mitmdump exited:\n" + "\n".join(self.lines))
            if match := LISTENING.search(line):
                return int(match.group(1))

    @property
    def ca_cert(self) -> Path:
        return self.workdir / "conf" / "mitmproxy-ca-cert.pem"

    def stop(self) -> str:
        """SIGTERM (the addon's done() flushes the store), then the whole output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("mitmdump did not stop on SIGTERM:\n" + "\n".join(self.lines))
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        """The stored records, read back as a user would after mitmdump stopped."""
        return read_store(self.store_url)

    def pixel_lines(self) -> list[str]:
        return [line for line in self.lines if "pixel " in line and "] pixel" in line]


def read_store(url: str) -> list[dict[str, Any]]:
    """A store's records, oldest first, as a user reads them: with the CLI."""
    out = subprocess.run(
        [str(CLI), "events", "--store", url, "--format", "jsonl", "--limit", "1000000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def via(proxy: Mitmdump, **kwargs: Any) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy or CA settings from the environment
    session.proxies = {"http": proxy.url, "https": proxy.url}
    for key, value in kwargs.items():
        setattr(session, key, value)
    return session


# Generated per request, by the collector and by the addon separately.
GENERATED = ("id", "receivedAt")
GENERATED_EVENT = ("messageId", "receivedAt", "timestamp", "originalTimestamp", "sentAt")


def without_generated(record: dict[str, Any] | PixelRecord) -> dict[str, Any]:
    record = json.loads(json.dumps(record))
    for key in (*GENERATED, "upstream"):
        record.pop(key, None)
    for key in GENERATED_EVENT:
        (record.get("event") or {}).pop(key, None)
    return record


# -- regular proxy ------------------------------------------------------------------


def test_regular_proxy_records_pixels_and_changes_nothing(
    collector: Collector, tmp_path: Path
) -> None:
    proxy = Mitmdump(tmp_path)
    try:
        with via(proxy) as client:
            answers = {
                target: client.get(collector.url + target, headers={"User-Agent": "Mail/1.0"})
                for target in (TRACK, RS_PAGE, RS_REJECTED, "/not-a-pixel?x=1", NASTY)
            }
    finally:
        output = proxy.stop()
    # The client got what the collector answered, untouched.
    assert (answers[TRACK].status_code, answers[TRACK].content) == (200, GIF)
    assert (answers[RS_PAGE].status_code, answers[RS_PAGE].content) == (200, b"OK")
    assert answers[RS_REJECTED].status_code == 400
    assert (answers["/not-a-pixel?x=1"].status_code, answers["/not-a-pixel?x=1"].text) == (
        404,
        "not found",
    )

    records = proxy.records()
    assert [(r["call"], r["accepted"]) for r in records] == [
        ("track", True),
        ("page", True),
        ("track", False),
        ("track", True),
    ]
    # The collector received the same requests and decoded them the same way.
    collected = collector.records()[-4:]
    assert [without_generated(r) for r in records] == [without_generated(r) for r in collected]
    assert [r["upstream"]["status"] for r in records] == [200, 200, 400, 200]
    assert records[0]["upstream"]["contentType"] == "image/gif"
    assert all(r["upstream"]["ms"] >= 0 for r in records)
    assert records[0]["request"]["userAgent"] == "Mail/1.0"

    # One readable line per pixel; the sender's terminal escapes shown, not obeyed.
    lines = proxy.pixel_lines()
    assert len(lines) == 4, output
    assert re.search(
        r'pixel segment track "Email Opened" userId=u-1 writeKey=wk_1 accepted'
        r" upstream 200 in [\d.]+ ms host=127\.0\.0\.1$",
        lines[0],
    )
    assert "REJECTED [missing_write_key,missing_event] upstream 400" in lines[2]
    assert r'pixel segment track "\x1b[2Jgone" userId=u' in lines[3]
    assert "\x1b" not in output
    assert "pixel: 4 pixel(s); 3 accepted; 1 rejected" in output  # at exit


def test_https_pixel_through_mitmproxys_ca(tmp_path: Path) -> None:
    """The doc's HTTPS path: the client trusts mitmproxy's CA, the proxy the collector."""
    collector = Collector(tls=True)
    proxy = Mitmdump(tmp_path, "--set", "ssl_insecure=true")  # the collector's cert is adhoc
    try:
        with via(proxy, verify=str(proxy.ca_cert)) as client:
            answer = client.get(collector.url + TRACK)
    finally:
        proxy.stop()
        collector.close()
    assert (answer.status_code, answer.content) == (200, GIF)
    (record,) = proxy.records()
    assert (record["call"], record["upstream"]["status"]) == ("track", 200)
    assert without_generated(record) == without_generated(collector.records()[0])


# -- reverse proxy --------------------------------------------------------------------


def test_reverse_proxy_matches_on_the_path(collector: Collector, tmp_path: Path) -> None:
    saved = tmp_path / "flows.mitm"
    proxy = Mitmdump(tmp_path / "live", "--mode", f"reverse:{collector.url}", "-w", str(saved))
    try:
        with requests.Session() as client:
            client.trust_env = False
            pixel = client.get(proxy.url + RS_PAGE, headers={"Host": "pixels.example"})
            other = client.get(proxy.url + "/v1/pixel/track/")  # not a route: trailing slash
    finally:
        proxy.stop()
    assert (pixel.status_code, pixel.content) == (200, b"OK")
    assert other.status_code == 404
    (record,) = proxy.records()
    assert (record["dialect"], record["call"]) == ("rudderstack", "page")
    assert record["upstream"]["status"] == 200
    assert without_generated(record) == without_generated(collector.records()[-1])

    # The saved flows, read back later (mitmdump -nr), give the same record, with
    # the time the request was received.
    replay = tmp_path / "replay"
    result = subprocess.run(
        [
            str(MITMDUMP),
            "-nr",
            str(saved),
            "--flow-detail",
            "0",
            "--set",
            f"confdir={replay}/conf",
            "-s",
            str(SCRIPT),
            "--set",
            f"pixel_store=jsonl:///{replay}/pixels.jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (again,) = read_store(f"jsonl:///{replay}/pixels.jsonl")
    assert again["receivedAt"] == record["receivedAt"]
    assert again["upstream"]["status"] == 200
    assert without_generated(again) == without_generated(record)


# -- answering locally, and the collector down ------------------------------------------


def test_pixel_answer_makes_no_upstream_connection(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{dead_port()}"
    proxy = Mitmdump(tmp_path, "--set", "pixel_answer=true")
    try:
        with via(proxy) as client:
            pixel = client.get(nowhere + TRACK)
            rejected = client.get(nowhere + RS_REJECTED)
            other = client.get(nowhere + "/not-a-pixel")
    finally:
        proxy.stop()
    assert (pixel.status_code, pixel.content) == (200, GIF)
    assert pixel.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    assert rejected.status_code == 400  # RudderStack's "seed" answer
    assert other.status_code == 502  # not a pixel: passed on, and nothing listens
    records = proxy.records()
    assert [r["upstream"] for r in records] == [{"answeredLocally": True}] * 2
    assert [r["accepted"] for r in records] == [True, False]


def test_pixel_answer_over_https_needs_no_reachable_collector(tmp_path: Path) -> None:
    """With mitmproxy's default (eager) connection strategy a CONNECT to a server
    that cannot be reached is answered 502 before any request is seen; the addon
    makes pixel_answer connect lazily, so the pixel inside the tunnel is answered."""
    nowhere = f"https://127.0.0.1:{dead_port()}"
    proxy = Mitmdump(tmp_path, "--set", "pixel_answer=true")
    try:
        with via(proxy, verify=str(proxy.ca_cert)) as client:
            pixel = client.get(nowhere + TRACK, timeout=30)
            rudder = client.get(nowhere + RS_PAGE, timeout=30)
            other = client.get(nowhere + "/not-a-pixel", timeout=30)
    finally:
        proxy.stop()
    assert (pixel.status_code, pixel.content) == (200, GIF)
    assert (rudder.status_code, rudder.content) == (200, b"OK")
    # Not a pixel: passed on, and the server's absence is told to the request.
    assert other.status_code == 502
    assert [r["upstream"] for r in proxy.records()] == [{"answeredLocally": True}] * 2
    assert any("pixel_answer sets connection_strategy=lazy" in line for line in proxy.lines)


def test_collector_down_is_recorded_with_the_error(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{dead_port()}"
    proxy = Mitmdump(tmp_path, "--mode", f"reverse:{nowhere}", "--set", "connection_strategy=lazy")
    try:
        with requests.Session() as client:
            client.trust_env = False
            answer = client.get(proxy.url + TRACK)
    finally:
        proxy.stop()
    assert answer.status_code == 502
    (record,) = proxy.records()
    assert record["accepted"] is True
    assert set(record["upstream"]) == {"error"}
    assert "connect call failed" in record["upstream"]["error"].lower()
    assert "upstream failed (" in proxy.pixel_lines()[0]


def test_without_a_store_nothing_is_written(tmp_path: Path) -> None:
    proxy = Mitmdump(tmp_path, "--set", "pixel_answer=true", store=False)
    try:
        with via(proxy) as client:
            assert client.get(f"http://127.0.0.1:{dead_port()}{TRACK}").status_code == 200
    finally:
        proxy.stop()
    assert len(proxy.pixel_lines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


# -- the log line and the history ------------------------------------------------------


def user_pixel(n: int) -> str:
    return "/v1/pixel/track?data=" + b64(
        {"writeKey": "wk_1", "event": "Email Opened", "userId": f"u-{n}"}
    )


def wait_until_listening(proxy: Mitmdump, port: int) -> None:
    """For a mitmdump that does not log where it listens: connect until it answers."""
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proxy.proc.poll() is not None or time.monotonic() > deadline:
                proxy.stop()
                pytest.fail("mitmdump did not start listening:\n" + "\n".join(proxy.lines))
            time.sleep(0.05)
    proxy.port = port
    proxy.url = f"http://127.0.0.1:{port}"


def send_pixels(proxy: Mitmdump, targets: Iterable[str]) -> None:
    """GET each target in turn through the proxy (pixel_answer answers them)."""
    nowhere = f"http://127.0.0.1:{dead_port()}"
    with via(proxy) as client:
        for target in targets:
            assert client.get(nowhere + target).status_code in (200, 400)


# A second script in the same mitmdump, counting the pixel lines that reach
# mitmproxy's legacy add_log event (every log record is dispatched to every addon).
ADD_LOG_COUNTER = """
seen = 0

def add_log(entry):
    global seen
    seen += "] pixel segment" in entry.msg or "] pixel rudderstack" in entry.msg

def done():
    print(f"add_log saw {seen} pixel line(s)", flush=True)
"""


def test_pixel_lines_are_written_in_order_with_mitmdumps_own(tmp_path: Path) -> None:
    counter = tmp_path / "add_log_counter.py"
    counter.parent.mkdir(parents=True, exist_ok=True)
    counter.write_text(ADD_LOG_COUNTER)
    # flow-detail 1: mitmdump prints its own line for every flow.
    proxy = Mitmdump(
        tmp_path,
        "--flow-detail",
        "1",
        "--set",
        "pixel_answer=true",
        "-s",
        str(counter),
        store=False,
    )
    try:
        send_pixels(proxy, [*(user_pixel(n) for n in range(20)), NASTY, RS_REJECTED])
    finally:
        output = proxy.stop()
    pixel_lines = proxy.pixel_lines()
    # Each pixel's line, in the order sent, just before mitmdump's line for its flow.
    kinds = [
        "pixel" if line in pixel_lines else "flow"
        for line in proxy.lines
        if line in pixel_lines or re.match(r"127\.0\.0\.1:\d+: GET http://", line)
    ]
    assert kinds == ["pixel", "flow"] * 22, output
    assert [f"userId=u-{n} " in line for n, line in enumerate(pixel_lines[:20])] == [True] * 20
    assert re.fullmatch(
        r"\[\d\d:\d\d:\d\d\.\d{3}\]\[127\.0\.0\.1:\d+\] pixel segment track"
        r' "Email Opened" userId=u-0 writeKey=wk_1 accepted upstream answered locally'
        r" host=127\.0\.0\.1",
        pixel_lines[0],
    )
    # The sender's terminal escape is shown, not obeyed.
    assert r'pixel segment track "\x1b[2Jgone" userId=u' in pixel_lines[20]
    assert "\x1b" not in output
    assert "REJECTED [missing_write_key,missing_event]" in pixel_lines[21]
    # Written by the addon itself: none went through mitmproxy's log dispatch.
    assert "add_log saw 0 pixel line(s)" in output


def test_pixel_lines_can_be_silenced(tmp_path: Path) -> None:
    proxies = {
        "off": Mitmdump(
            tmp_path / "off", "--set", "pixel_answer=true", "--set", "pixel_log=false", store=False
        ),
        # It does not say where it listens (an info line): on a port of our choosing.
        "warn": Mitmdump(
            tmp_path / "warn",
            "--set",
            "pixel_answer=true",
            "--set",
            "termlog_verbosity=warn",
            "-p",
            str(port := dead_port()),
            store=False,
            wait=False,
        ),
    }
    wait_until_listening(proxies["warn"], port)
    outputs = {}
    for name, proxy in proxies.items():
        try:
            send_pixels(proxy, [TRACK, RS_REJECTED])
        finally:
            outputs[name] = proxy.stop()
    # pixel_log=false: no line, the records are kept all the same.
    assert proxies["off"].pixel_lines() == [], outputs["off"]
    assert "pixel: 2 pixel(s); 1 accepted; 1 rejected" in outputs["off"]
    # termlog_verbosity=warn: the rejected pixel's line only.
    (line,) = proxies["warn"].pixel_lines()
    assert "pixel rudderstack track anonymousId=a-9 REJECTED" in line


def test_history_keeps_the_last_100_pixels_by_default(tmp_path: Path) -> None:
    # The first pixel is rejected: whether the summary still counts it tells
    # whether it is still in memory.
    cases = {
        "at": (100, ()),
        "over": (101, ()),
        "one": (2, ("--set", "pixel_history=1")),
    }
    proxies = {
        name: Mitmdump(
            tmp_path / name, "--set", "pixel_answer=true", *options, store=False, wait=False
        )
        for name, (_, options) in cases.items()
    }
    outputs = {}
    for name, proxy in proxies.items():
        proxy.ready()
        try:
            send_pixels(proxy, [RS_REJECTED, *(user_pixel(n) for n in range(cases[name][0] - 1))])
        finally:
            outputs[name] = proxy.stop()
    assert "pixel: 100 pixel(s); 99 accepted; 1 rejected" in outputs["at"]
    assert (
        "pixel: 101 pixel(s), the last 100 counted (pixel_history); 100 accepted; 0 rejected"
        in outputs["over"]
    )
    assert (
        "pixel: 2 pixel(s), the last 1 counted (pixel_history); 1 accepted; 0 rejected"
        in outputs["one"]
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        pytest.param("pixel_filter=~d (", "pixel_filter: '~d (' is not a flow filter", id="filter"),
        pytest.param(
            "pixel_store=ftp://x",
            "pixel_store: cannot open 'ftp://x' (unknown store URL scheme 'ftp' in 'ftp://x';"
            " expected one of fanout://, forward+http://, forward+https://, jsonl://,"
            " memory://, postgres://, postgresql://, redis://, rediss://, sqlite://); give a"
            " store URL (fanout://, forward+http://, forward+https://, jsonl://, memory://,"
            " postgres://, postgresql://, redis://, rediss://, sqlite://), e.g."
            " sqlite:///pixels.sqlite3, or nothing to keep records in memory only",
            id="store",
        ),
        pytest.param(
            "pixel_store=redis://:s3cret@127.0.0.1:1/0?nonsense=1",
            "pixel_store: cannot open 'redis://:***@127.0.0.1:1/0?nonsense=1'",
            id="store-password",
        ),
        pytest.param("pixel_dialects=amp", "pixel_dialects: 'amp' is not accepted", id="dialect"),
        pytest.param(
            "pixel_trusted_proxies=-1",
            "pixel_trusted_proxies: -1 is not accepted; give the number of trusted proxies,"
            " 0 or more",
            id="proxies",
        ),
    ],
)
def test_bad_option_stops_mitmdump_with_the_reason(
    tmp_path: Path, option: str, message: str
) -> None:
    result = subprocess.run(
        [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "-p",
            "0",
            "--set",
            f"confdir={tmp_path}/conf",
            "-s",
            str(SCRIPT),
            "--set",
            option,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    # One line that says it, not mitmproxy's traceback of the addon.
    name = option.split("=", 1)[0]
    (line,) = [line for line in output.splitlines() if f"{name}:" in line]
    assert line.startswith("["), output  # mitmproxy's time: a log line of its own
    assert "] " + message in line, output
    assert "Traceback" not in output
    assert "s3cret" not in output


# -- parity with the middleware -----------------------------------------------------

# What may differ between two decodings of the same request: the record's id and
# time, and what the server generates from its clock or at random.
MAY_DIFFER = {
    ("id",),
    ("receivedAt",),
    *(("event", key) for key in GENERATED_EVENT),
}


def differences(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            diff
            for key in sorted(a.keys() | b.keys())
            for diff in differences(a.get(key, KeyError), b.get(key, KeyError), (*path, key))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, (*path, str(i)))
        ]
    return [] if a == b else [path]


def options_for(config: dict[str, Any]) -> list[str]:
    """A case's PixelConfig keywords as the addon's mitmproxy options."""
    args: list[str] = []
    for key, value in sorted(config.items()):
        values = sorted(value) if isinstance(value, (set, frozenset)) else [value]
        args += [arg for v in values for arg in ("--set", f"pixel_{key}={v}")]
    return args


def send_raw(port: int, method: str, target: bytes, headers: dict[str, str]) -> int:
    """Send the request target byte for byte (no client library re-encodes it)."""
    head = b"".join(
        f"{name}: {value}\r\n".encode("latin-1")
        for name, value in {"Host": "pixels.test", **headers, "Connection": "close"}.items()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(method.encode() + b" " + target + b" HTTP/1.1\r\n" + head + b"\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def ok(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("204 No Content", [])
    return []


def test_every_case_gives_the_middlewares_record(tmp_path: Path) -> None:
    """Each request of the shared case table, through a real mitmdump in reverse mode
    and through PixelMiddleware (werkzeug's test client, as a WSGI server calls
    it), gives the same record bar ids and time. One mitmdump per configuration in
    the table, started together."""
    from cases import CASES, NOT_PIXELS
    from werkzeug.test import Client

    from pixel_middleware.core import split_target

    upstream = make_server("127.0.0.1", 0, ok, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    groups: dict[str, list[Any]] = {}
    for case in CASES:
        groups.setdefault(repr(sorted(case.config.items())), []).append(case)
    proxies = {
        key: Mitmdump(
            tmp_path / str(i),
            "--mode",
            f"reverse:http://127.0.0.1:{upstream.server_port}",
            *options_for(dict(cases[0].config)),
            wait=False,
        )
        for i, (key, cases) in enumerate(groups.items())
    }
    try:
        for proxy in proxies.values():
            proxy.ready()
        statuses = {}
        for key, cases in groups.items():
            for case in cases:
                statuses[case.id] = send_raw(
                    proxies[key].port, case.method, case.target, dict(case.headers)
                )
            if key == repr([]):
                for target in NOT_PIXELS:
                    assert send_raw(proxies[key].port, "GET", target, {}) == 204, target
    finally:
        for proxy in proxies.values():
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
        for proxy in proxies.values():
            proxy.stop()
        upstream.shutdown()
        upstream.server_close()

    mismatches = []
    compared = 0
    for key, cases in groups.items():
        by_addon = iter(proxies[key].records())
        middleware = PixelMiddleware(not_found, store="memory://", **cases[0].config)
        try:
            for case in cases:
                path, query = split_target(case.target)
                answer = Client(middleware).open(
                    method=case.method,
                    headers=dict(case.headers),
                    environ_overrides={
                        "PATH_INFO": path,
                        "QUERY_STRING": query.decode("latin-1"),
                        "REMOTE_ADDR": "127.0.0.1",
                    },
                )
                assert answer.status_code == case.expect_status, case.id
                if case.expect_accepted is None:
                    assert statuses[case.id] == 204, case.id  # passed on, unrecorded
                    continue  # no record, from either
                assert middleware.store is not None
                ((_, expected),) = middleware.store.read(limit=1)
                record = next(by_addon)
                # The client got the collector's answer (204; 414 from werkzeug's
                # server for the 70 kB query), and the record says which.
                assert record.pop("upstream")["status"] == statuses[case.id], case.id
                diff = [d for d in differences(record, expected) if d not in MAY_DIFFER]
                if diff:
                    mismatches.append((case.id, diff))
                compared += 1
            assert next(by_addon, None) is None  # nothing more: NOT_PIXELS gave none
        finally:
            middleware.close()
    assert not mismatches
    assert compared == sum(case.expect_accepted is not None for case in CASES)


# -- a store that hangs ----------------------------------------------------------------


def test_a_hung_store_does_not_freeze_the_proxy_when_the_script_reloads(
    collector: Collector, tmp_path: Path
) -> None:
    """mitmproxy reloads a script when its file changes, calling the old addon's
    done() on the event loop of a proxy that goes on: the store, which never
    answers, is closed in a thread and the proxy keeps passing requests."""
    script = tmp_path / "pixel_capture.py"
    script.write_text(SCRIPT.read_text())
    hung = SilentServer()
    proxy = Mitmdump(
        tmp_path,
        "--set",
        f"pixel_store={hung.redis_url()}",
        store=False,
        script=script,
    )
    try:
        with via(proxy) as client:
            assert client.get(collector.url + TRACK, timeout=30).status_code == 200
            wait_until(lambda: hung.connections > 0)  # the writer waits for Redis
            loads = sum("Loading script" in line for line in proxy.lines)
            os.utime(script, (time.time() + 5, time.time() + 5))
            wait_until(lambda: sum("Loading script" in line for line in proxy.lines) > loads)
            # The old addon's done() ran; the proxy still answers, at once.
            answer = client.get(collector.url + "/not-a-pixel", timeout=5)
            assert answer.status_code == 404
            assert client.get(collector.url + RS_PAGE, timeout=5).status_code == 200
    finally:
        proxy.proc.kill()  # the exit is the next test's
        proxy.stop()
        hung.close()


def test_exit_waits_a_bounded_time_for_a_hung_store(collector: Collector, tmp_path: Path) -> None:
    hung = SilentServer()
    proxy = Mitmdump(tmp_path, "--set", f"pixel_store={hung.redis_url()}", store=False)
    try:
        with via(proxy) as client:
            assert client.get(collector.url + TRACK, timeout=30).status_code == 200
            wait_until(lambda: hung.connections > 0)
            assert client.get(collector.url + RS_PAGE, timeout=30).status_code == 200
        start = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(timeout=60)
        elapsed = time.monotonic() - start
        output = proxy.stop()
    finally:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
        hung.close()
    # done() waits STORE_CLOSE_TIMEOUT (5 s); the recorder's own exit hook then
    # gives its writer up to 10 s more before the process ends.
    assert elapsed < 5 + 10 + 5, output
    assert "records still not written after 5.0s of closing" in output
    assert "pixel: 2 pixel(s); 2 accepted" in output


def wait_until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
