"""The addon in mitmproxy's two interactive front ends, used as a person uses them.

- ``mitmweb``: a real process, driven through the REST API its browser app calls
  (log in with the password, list flows, show a content view, run a command, edit
  and replay a flow).
- ``mitmproxy``, the console UI: a real process in a pseudo-terminal, read through
  a terminal emulator (pyte) so that the test sees the screen a person sees, and
  driven by keystrokes.

Both sit in front of a real collector (``PixelMiddleware`` in a werkzeug server),
which answers a good pixel 200 and a bad one 400.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pyte
import pytest
import requests
from collector_server import Collector

if TYPE_CHECKING:
    pass

pytestmark = pytest.mark.mitmproxy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addons" / "pixel_capture.py"
BIN = Path(sys.executable).parent
PASSWORD = "pixel-test-password"

GOOD = (
    "/v1/pixel/track?data="
    + base64.b64encode(
        json.dumps({"writeKey": "wk_1", "event": "Email Opened", "userId": "u-1"}).encode()
    ).decode()
)
BAD = "/pixel/v1/track?anonymousId=a-9"  # no write key, no event: rejected
GOOD_COMMENT = 'segment track "Email Opened": accepted; upstream 200'
BAD_COMMENT = "rudderstack track: rejected: missing_write_key, missing_event; upstream 400"


# -- the collector --------------------------------------------------------------------


@pytest.fixture(scope="module")
def collector() -> Iterator[str]:
    """A real collector on 127.0.0.1:<free port>; yields its URL."""
    server = Collector()
    yield server.url
    server.close()


def send_pixels(proxy_port: int, collector: str) -> None:
    """The good pixel, then the bad one, through the proxy, as a browser sends them."""
    with requests.Session() as client:
        client.trust_env = False  # no proxy settings from the environment
        client.proxies = {"http": f"http://127.0.0.1:{proxy_port}"}
        assert client.get(collector + GOOD).status_code == 200
        assert client.get(collector + BAD).status_code == 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], failure: Callable[[], str], timeout: float = 15) -> T:
    """Poll ``probe`` until it returns something; past ``timeout``, fail with ``failure()``."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        if time.monotonic() > deadline:
            pytest.fail(failure())
        time.sleep(0.05)
    return found


# -- mitmweb --------------------------------------------------------------------------

PROXY_LISTENING = re.compile(r"HTTP\(S\) proxy listening at 127\.0\.0\.1:(\d+)\.")
WEB_LISTENING = re.compile(r"Web server listening at http://127\.0\.0\.1:(\d+)/")


class Mitmweb:
    """A real ``mitmweb -s addons/pixel_capture.py``: proxy on a free port, web UI on
    another, a known password, no browser."""

    def __init__(self, workdir: Path) -> None:
        self.session: requests.Session | None = None
        # mitmweb prints the web port it was given, not the one bound (0 stays 0):
        # pick a free one, and pick again in the rare case it was taken meanwhile.
        for _ in range(3):
            web_port = free_port()
            self.proc = subprocess.Popen(
                [
                    str(BIN / "mitmweb"),
                    "--no-web-open-browser",
                    "--web-host",
                    "127.0.0.1",
                    "--web-port",
                    str(web_port),
                    "--listen-host",
                    "127.0.0.1",
                    "-p",
                    "0",
                    "--set",
                    f"web_password={PASSWORD}",
                    "--set",
                    f"confdir={workdir}/conf",
                    "-s",
                    str(SCRIPT),
                ],
                cwd=workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"},
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
            ports = self._wait_listening()
            if ports is not None:
                self.proxy_port, web_port = ports
                self.base = f"http://127.0.0.1:{web_port}"
                return
            self.stop()
        pytest.fail("mitmweb could not listen:\n" + self.output)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._lines.put(line)
        self._lines.put(None)

    def _wait_listening(self) -> tuple[int, int] | None:
        proxy = web = 0
        deadline = time.monotonic() + 30
        while not (proxy and web):
            try:
                line = self._lines.get(timeout=max(0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail("mitmweb did not start listening:\n" + self.output)
            if line is None:
                if "Web server failed to listen" in self.output:
                    return None
                pytest.fail("mitmweb exited:\n" + self.output)
            if match := PROXY_LISTENING.search(line):
                proxy = int(match.group(1))
            if match := WEB_LISTENING.search(line):
                web = int(match.group(1))
        return proxy, web

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def log_in(self) -> requests.Session:
        """Log in as the browser app does: the login form, then the password.

        The form sets mitmweb's XSRF cookie; the app sends it back in an
        ``X-XSRFToken`` header with every request that changes something.
        """
        session = self.session = requests.Session()
        session.trust_env = False
        form = session.get(self.base + "/")
        assert form.status_code == 403
        assert 'name="token"' in form.text
        xsrf = session.cookies["_mitmproxy_xsrf"]
        answer = session.post(self.base + "/", data={"token": PASSWORD, "_xsrf": xsrf})
        assert answer.status_code == 200, answer.text
        session.headers["X-XSRFToken"] = xsrf
        return session

    def stop(self) -> str:
        """SIGTERM (the addon's done() logs the summary), then the whole output."""
        if self.session is not None:
            self.session.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("mitmweb did not stop on SIGTERM:\n" + self.output)
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.output


def test_mitmweb_shows_marks_comments_the_pixel_view_and_runs_the_commands(
    collector: str, tmp_path: Path
) -> None:
    web = Mitmweb(tmp_path)
    try:
        send_pixels(web.proxy_port, collector)
        ui = web.log_in()

        def api(method: str, path: str, **kwargs: Any) -> Any:
            answer = ui.request(method, web.base + path, **kwargs)
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
            return answer.json() if answer.content else None

        def flows() -> dict[str, dict[str, Any]]:
            return {flow["request"]["path"]: flow for flow in api("GET", "/flows")}

        # The flow list: the bad pixel marked, both with the addon's comment (the
        # client has both answers, so both comments already name the answer).
        listed = flows()
        good, bad = listed[GOOD], listed[BAD]
        assert (good["marked"], good["comment"]) == ("", GOOD_COMMENT)
        assert (bad["marked"], bad["comment"]) == ("⛔", BAD_COMMENT)

        # The content views: "pixel" is offered, and chosen by "Auto", the default.
        assert "pixel" in api("GET", "/state")["contentViews"]
        shown = api("GET", f"/flows/{bad['id']}/request/content/Auto.json")
        assert shown["view_name"] == "pixel"
        assert shown == api("GET", f"/flows/{bad['id']}/request/content/pixel.json")
        head, event_json = shown["text"].split("\nevent:\n", 1)
        assert head.splitlines() == [
            "rudderstack track: REJECTED",
            "writeKey: -",
            head.splitlines()[2],
            "problems:",
            "  - missing_write_key: No write key: send writeKey in the event or as a"
            " query parameter.",
            "  - missing_event: A track call needs a non-empty event name.",
            "notes: none",
        ]
        assert re.fullmatch(r"upstream: 400 in [\d.]+ ms", head.splitlines()[2])
        assert json.loads(event_json)["anonymousId"] == "a-9"
        text = api("GET", f"/flows/{good['id']}/request/content/pixel.json")["text"]
        assert text.startswith("segment track: accepted\nwriteKey: wk_1\n")
        event = json.loads(text.split("\nevent:\n", 1)[1])
        assert (event["event"], event["userId"]) == ("Email Opened", "u-1")

        # The commands, through the command bar's route.
        assert "pixel.export" in api("GET", "/commands")
        export = tmp_path / "exported.jsonl"
        assert api("POST", "/commands/pixel.export", json={"arguments": [str(export)]}) == {
            "value": None
        }
        records = [json.loads(line) for line in export.read_text().splitlines()]
        assert [(r["call"], r["accepted"], r["upstream"]["status"]) for r in records] == [
            ("track", True, 200),
            ("track", False, 400),
        ]
        assert records[0]["event"]["event"] == "Email Opened"
        assert api("POST", "/commands/pixel.summary", json={"arguments": []}) == {
            "value": "2 pixel(s); 1 accepted; 1 rejected;"
            " problems: missing_write_key 1, missing_event 1; upstream: 200 1, 400 1"
        }

        # mitmweb's event log has each pixel's line: the UIs get log records (in
        # mitmdump the addon writes its lines itself).
        events = [event["message"] for event in api("GET", "/events")]
        assert len([m for m in events if '] pixel segment track "Email Opened"' in m]) == 1
        assert len([m for m in events if "] pixel rudderstack track" in m]) == 1

        # Fix the bad pixel in the flow editor: the view decodes the edited request.
        fixed = BAD + "&writeKey=wk_2&event=Signed%20Up"
        api("PUT", f"/flows/{bad['id']}", json={"request": {"path": fixed}})
        text = api("GET", f"/flows/{bad['id']}/request/content/Auto.json")["text"]
        assert text.startswith("rudderstack track: accepted\nwriteKey: wk_2\n")
        assert "upstream: not sent (edited since it passed)\n" in text
        # Replay it: the collector takes it, and the flow's mark goes.
        api("POST", f"/flows/{bad['id']}/replay")

        def replayed_flow() -> dict[str, Any] | None:
            flow = flows()[fixed]
            return flow if flow["comment"].endswith("upstream 200") else None

        replayed = wait_until(replayed_flow, lambda: f"no new comment: {flows()[fixed]}")
        assert replayed["comment"] == 'rudderstack track "Signed Up": accepted; upstream 200'
        assert replayed["marked"] == ""
    finally:
        output = web.stop()
    assert "pixel: 3 pixel(s); 2 accepted; 1 rejected" in output  # logged at exit


# -- mitmproxy, the console UI ---------------------------------------------------------

ROWS, COLUMNS = 40, 160
BOUND = re.compile(r"\[127\.0\.0\.1:([1-9]\d*)\]")


class Console:
    """A real ``mitmproxy -s addons/pixel_capture.py`` in a pseudo-terminal."""

    def __init__(self, workdir: Path) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.ByteStream(self.screen)
        self._lock = threading.Lock()
        self._fd, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(
            [
                str(BIN / "mitmproxy"),
                "--listen-host",
                "127.0.0.1",
                "-p",
                "0",
                "--set",
                f"confdir={workdir}/conf",
                "-s",
                str(SCRIPT),
            ],
            cwd=workdir,
            env={**os.environ, "TERM": "xterm", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
        )
        os.close(terminal)
        # Always drain the terminal: a full pty would block mitmproxy's event loop.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:  # EIO: the process has gone
                return
            if not data:
                return
            with self._lock:
                self._stream.feed(data)

    @property
    def text(self) -> str:
        """The screen as a person sees it now."""
        with self._lock:
            return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, what: str | re.Pattern[str], timeout: float = 15) -> str:
        """Wait until the screen shows ``what``; return the screen."""

        def probe() -> str | None:
            text = self.text
            found = what in text if isinstance(what, str) else what.search(text)
            return text if found else None

        return wait_until(probe, lambda: f"the screen never showed {what!r}:\n{self.text}", timeout)

    def press(self, keys: str) -> None:
        os.write(self._fd, keys.encode())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(timeout=10)
        os.close(self._fd)
        return code


def test_console_shows_the_pixel_view_and_runs_the_commands(collector: str, tmp_path: Path) -> None:
    console = Console(tmp_path)
    try:
        screen = console.wait_for(BOUND)  # the status bar names the proxy's address
        match = BOUND.search(screen)
        assert match is not None
        send_pixels(int(match.group(1)), collector)

        # The flow list: both pixels, the bad one marked.
        screen = console.wait_for("/pixel/v1/track?anonymousId=a-9")
        assert "/v1/pixel/track?data=" in screen
        (bad_line,) = [line for line in screen.splitlines() if BAD in line]
        assert bad_line.endswith("⛔")

        # The command prompt: export, then the summary.
        export = tmp_path / "exported.jsonl"
        console.press(f":pixel.export {export}\r")
        console.wait_for(f"pixel: exported 2 record(s) to {export}")  # the status bar
        records = [json.loads(line) for line in export.read_text().splitlines()]
        assert [(r["call"], r["accepted"]) for r in records] == [("track", True), ("track", False)]
        console.press(":pixel.summary\r")
        console.wait_for("2 pixel(s); 1 accepted; 1 rejected")
        console.press("q")  # close the summary

        # Open the first flow: its request is shown in the pixel view, decoded.
        console.press("\r")
        screen = console.wait_for("segment track: accepted")
        assert re.search(r"^pixel +\[m:auto\]$", screen, re.MULTILINE)
        assert '"event": "Email Opened",' in screen
        assert '"userId": "u-1",' in screen
        # The next flow: the rejected pixel, its problems, and its comment in Detail.
        console.press(" ")
        screen = console.wait_for("rudderstack track: REJECTED")
        assert "  - missing_write_key: No write key" in screen
        assert '"anonymousId": "a-9",' in screen
        console.press("\t\t")  # Request, Response, Detail
        console.wait_for(f"Comment: {BAD_COMMENT}")

        # Back to the list, and quit as a person does.
        console.press("q")
        console.wait_for(re.compile(r"\AFlows$", re.MULTILINE))  # the list's title
        console.press("q")
        console.wait_for("Quit (yes,no)?")
        console.press("y")
        assert console.proc.wait(timeout=30) == 0
    finally:
        console.stop()
