"""The pixel-middleware command: in-process for the quick cases, real processes for serve."""

from __future__ import annotations

import concurrent.futures
import contextlib
import html
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import requests
from signal_masks import blocked_signals, threads

from pixel_middleware import GIF, PixelConfig, PixelRecord, PixelRequest, decode_pixel
from pixel_middleware.cli import main
from pixel_middleware.core import split_target
from pixel_middleware.encode import encode_pixel_url
from pixel_middleware.journal import count_spooled
from pixel_middleware.recorder import Recorder, default_spool_path
from pixel_middleware.stores import StoreError, open_store, store_identity

SCRIPT = Path(sys.executable).with_name("pixel-middleware")
# The installed console script when there is one, as a user runs it.
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "pixel_middleware.cli"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    try:
        status = main(list(argv))
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def make_record(url: str) -> PixelRecord:
    path, query = split_target(url.encode())
    outcome = decode_pixel(
        PixelRequest("GET", path, query, "192.0.2.1"), config=PixelConfig(), now=datetime.now(UTC)
    )
    assert outcome is not None
    assert outcome.record is not None
    return outcome.record


def segment(call: str, event: dict[str, Any], key: str = "k1") -> str:
    return encode_pixel_url(event, call=call, write_key=key, base_url="")


# --- help and usage errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["events"], ["check"], ["decode"], ["encode"]], ids=str
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *command, "--help")
    assert status == 0
    assert out.startswith("usage: pixel-middleware")
    assert err == ""


def test_serve_help_names_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "serve", "--help")
    assert "granian" in out
    assert "waitress" in out
    assert "--port" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "required: COMMAND", id="no-command"),
        pytest.param(["launch"], "invalid choice: 'launch'", id="unknown-command"),
        pytest.param(["serve", "--port", "http"], "'http' is not a number", id="port-text"),
        pytest.param(["serve", "--port", "70000"], "0 to 65535", id="port-range"),
        pytest.param(["serve", "--threads", "0"], "1 or more", id="threads"),
        pytest.param(["serve", "--store", "mysql://x"], "unknown store URL scheme", id="scheme"),
        pytest.param(["serve", "--prefix", "collect"], "start with '/'", id="prefix"),
        pytest.param(["serve", "--write-key", ""], "write", id="empty-write-key"),
        pytest.param(["serve", "--read-token", "short-secret"], "16 to 256", id="read-token"),
        pytest.param(
            ["serve", "--read-token", "x" * 20, "--public-reads"], "not allowed with", id="both"
        ),
        pytest.param(["serve", "--connection-limit", "0"], "1 to 100000", id="connections-0"),
        pytest.param(
            ["serve", "--connection-limit", "100001"], "1 to 100000", id="connections-over"
        ),
        pytest.param(["serve", "--channel-timeout", "0"], "from 1 to 3600", id="timeout-0"),
        pytest.param(["serve", "--channel-timeout", "1.5"], "not a number", id="timeout-float"),
        pytest.param(["serve", "--cleanup-interval", "3601"], "from 1 to 3600", id="cleanup"),
        pytest.param(["serve", "--rudderstack-response", "json"], "invalid choice", id="rs"),
        pytest.param(["events", "--accepted", "--rejected"], "not allowed with", id="verdicts"),
        pytest.param(["events", "--limit", "0"], "1 or more", id="limit"),
        pytest.param(["events", "--format", "csv"], "invalid choice: 'csv'", id="format"),
        pytest.param(["decode"], "one of the arguments URL --har is required", id="decode-no-url"),
        pytest.param(
            ["decode", "/v1/pixel/track", "--trusted-proxies", "-1"], "0 or more", id="tp"
        ),
        pytest.param(["encode", "--call", "track"], "--write-key", id="encode-no-key"),
        pytest.param(["encode", "--write-key", "k", "--call", "buy"], "must be one of", id="call"),
        pytest.param(
            ["encode", "--write-key", "k", "--call", "identify", "--dialect", "rudderstack"],
            "must be one of page, track",
            id="rudderstack-call",
        ),
        pytest.param(
            ["encode", "--write-key", "k", "--call", "track", "{x"], "not valid JSON", id="json"
        ),
        pytest.param(
            ["encode", "--write-key", "k", "--call", "track", "[1]"], "JSON object", id="array"
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where the default store would be created
    monkeypatch.delenv("PIXEL_STORE", raising=False)
    monkeypatch.delenv("PIXEL_READ_TOKEN", raising=False)
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("pixel-middleware")
    assert message in err
    assert "short-secret" not in err
    # Every option is checked before the store is opened: nothing is created.
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "store",
    [
        pytest.param("sqlite:///missing/dir/events.sqlite3", id="sqlite"),
        pytest.param("jsonl:///missing/dir/events.jsonl", id="jsonl"),
    ],
)
def test_serve_with_a_store_it_cannot_open_says_so_on_one_line_and_exits_1(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "serve", "--port", "0", "--store", store)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("pixel-middleware serve: error: cannot open the store: ")
    assert str(tmp_path / "missing" / "dir") in err
    assert "--help" not in err
    assert list(tmp_path.iterdir()) == []


# --- decode ------------------------------------------------------------------------------

TRACK = {"userId": "u1", "event": "Email Opened", "properties": {"subject": "Hi"}}


@pytest.mark.parametrize(
    ("url", "options", "status", "first_line"),
    [
        pytest.param(
            "https://px.example.com" + segment("track", TRACK),
            [],
            0,
            "accepted: segment track (writeKey k1)",
            id="full-url-accepted",
        ),
        pytest.param(segment("track", TRACK), [], 0, "accepted: segment track", id="path-only"),
        pytest.param(
            segment("track", TRACK),
            ["--write-key", "other"],
            1,
            "rejected: segment track (writeKey k1)",
            id="unknown-key",
        ),
        pytest.param(
            segment("track", {"userId": "u1"}), [], 1, "rejected: segment track", id="no-event"
        ),
        pytest.param(
            "/collect" + segment("page", {"anonymousId": "a"}),
            ["--prefix", "/collect"],
            0,
            "accepted: segment page",
            id="prefix",
        ),
        pytest.param(
            "/pixel/v1/page?writeKey=k&anonymousId=a&name=Home",
            [],
            0,
            "accepted: rudderstack page (writeKey k)",
            id="rudderstack",
        ),
    ],
)
def test_decode_exit_status_says_the_verdict(
    url: str, options: list[str], status: int, first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "decode", url, *options)
    assert code == status
    assert out.splitlines()[0].startswith(first_line)


def test_decode_rejection_lists_problems(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "decode", "/v1/pixel/track?data=" + "e30")
    assert "problem: [missing_write_key]" in out
    assert "problem: [missing_identity]" in out


@pytest.mark.parametrize(
    ("url", "closest"),
    [
        pytest.param("/v1/pixel/trak", "track", id="segment-typo"),
        pytest.param("/pixel/v1/identify", None, id="rudderstack-has-no-identify-pixel"),
        pytest.param("/v1/pixel/track/", "track", id="trailing-slash"),
    ],
)
def test_decode_of_a_mistyped_call_says_which_calls_exist(
    url: str, closest: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "decode", url)
    assert status == 1
    problem = out.splitlines()[1]
    assert problem.startswith("  problem: [unknown_call] There is no such pixel call:")
    assert problem.endswith(f"the closest is {closest}." if closest else "are page, track.")


@pytest.mark.parametrize("url", ["http://example.com/", "/v2/pixel/track", "/pixel/v2/page"])
def test_decode_of_a_non_pixel_url_exits_2(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "decode", url)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "not a pixel route" in err


def test_decode_json_is_the_record(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys,
        "decode",
        "/v1/pixel/track" + segment("track", TRACK).partition("track")[2],
        "--json",
        "--trusted-proxies",
        "1",
        "--peer",
        "10.0.0.1",
        "--forwarded-for",
        "6.6.6.6, 203.0.113.7",
    )
    assert status == 0
    record = json.loads(out)
    assert record["accepted"] is True
    assert record["event"]["properties"] == {"subject": "Hi"}
    assert record["request"]["ip"] == "203.0.113.7"
    assert record["event"]["context"]["ip"] == "203.0.113.7"


def test_decode_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    url = segment("track", {"userId": "u\x1b[2J", "event": "E\u202egnp.exe"})
    _, out, _ = run(capsys, "decode", url)
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "u\\u001b[2J" in out  # JSON's own escape
    assert "E\\u202egnp.exe" in out


# --- encode ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "call", "event"),
    [
        pytest.param("segment", "track", TRACK, id="segment-track"),
        pytest.param(
            "segment", "identify", {"userId": "u", "traits": {"plan": "pro"}}, id="identify"
        ),
        pytest.param("segment", "alias", {"userId": "u", "previousId": "p"}, id="alias"),
        pytest.param(
            "rudderstack", "track", {"anonymousId": "a", "event": "Opened"}, id="rs-track"
        ),
        pytest.param(
            "rudderstack",
            "page",
            {"anonymousId": "a", "name": "Home", "context": {"page": {"path": "/"}}},
            id="rs-page",
        ),
    ],
)
def test_encode_then_decode_round_trips(
    dialect: str, call: str, event: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    status, url, _ = run(
        capsys,
        "encode",
        "--write-key",
        "k1",
        "--call",
        call,
        "--dialect",
        dialect,
        json.dumps(event),
    )
    assert status == 0
    assert url.startswith("http://127.0.0.1:8000/")
    status, out, _ = run(capsys, "decode", url.strip(), "--json", "--write-key", "k1")
    assert status == 0, out
    record = json.loads(out)
    assert (record["dialect"], record["call"], record["writeKey"]) == (dialect, call, "k1")
    for key, value in event.items():
        assert record["event"][key] == value


@pytest.mark.parametrize(
    ("call", "event", "rule"),
    [
        pytest.param("track", '{"userId": "u1"}', "missing_event", id="track-without-event"),
        pytest.param("identify", '{"traits": {}}', "missing_identity", id="no-identity"),
    ],
)
def test_encode_refuses_a_url_that_would_be_rejected(
    call: str, event: str, rule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "encode", "--write-key", "k", "--call", call, event)
    assert status == 1
    assert out == ""
    assert f"the URL would be rejected: [{rule}]" in err
    assert "--allow-rejected" in err
    status, out, _ = run(
        capsys, "encode", "--write-key", "k", "--call", call, "--allow-rejected", event
    )
    assert status == 0
    assert make_record(out.strip())["problems"][0]["rule"] == rule


def test_decode_of_our_own_encode_output_has_no_notes(capsys: pytest.CaptureFixture[str]) -> None:
    event = '{"userId": "u-42", "event": "Email Opened", "properties": {"subject": "Hi"}}'
    status, url, _ = run(capsys, "encode", "--write-key", "k", "--call", "track", event)
    assert status == 0
    assert "=" not in url.strip().partition("data=")[2], "unpadded, as Segment's examples"
    status, out, _ = run(capsys, "decode", url.strip())
    assert status == 0
    assert "note:" not in out


def test_encode_html_and_base_url(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(
        capsys,
        "encode",
        "--write-key",
        "k1",
        "--call",
        "page",
        "--base-url",
        "https://px.example.com",
        "--prefix",
        "/collect",
        "--html",
        '{"anonymousId": "a"}',
    )
    assert status == 0
    src = re.search(r'<img src="([^"]+)"', out)
    assert src
    assert html.unescape(src.group(1)).startswith("https://px.example.com/collect/v1/pixel/page?")


def test_encode_reads_stdin_and_pipes_into_decode(tmp_path: Path) -> None:
    event = '{"userId": "u1", "event": "Piped"}'
    encoded = subprocess.run(
        [*CLI, "encode", "--write-key", "k1", "--call", "track", "-"],
        input=event,
        capture_output=True,
        text=True,
        check=True,
    )
    decoded = subprocess.run(
        [*CLI, "decode", encoded.stdout.strip(), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert decoded.returncode == 0, decoded.stderr
    assert json.loads(decoded.stdout)["event"]["event"] == "Piped"


# --- events ------------------------------------------------------------------------------


@pytest.fixture
def filled_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/events.sqlite3"
    store = open_store(url)
    store.write(
        [
            make_record(segment("track", {"userId": "u1", "event": "First"})),
            make_record(segment("page", {"anonymousId": "a2", "name": "Home"})),
            make_record(segment("track", {"event": "No identity"})),
            make_record("/pixel/v1/track?writeKey=k&anonymousId=a4&event=Fourth"),
            make_record(segment("track", {"userId": "u5", "event": "Evil\x1b[31m\u202eName"})),
        ]
    )
    store.close()
    return url


def test_events_table_is_aligned_oldest_first(
    filled_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "events", "--store", filled_store)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "time",
        "dialect",
        "call",
        "verdict",
        "rules",
        "event/name",
        "identity",
        "first",
        "problem",
    ]
    assert len(lines) == 6
    assert "First" in lines[1]
    assert "u1" in lines[1]
    assert "Fourth" in lines[4]
    assert "rudderstack" in lines[4]
    assert "missing_identity" in lines[3]
    assert "rejected" in lines[3]
    # Columns start where the header's do.
    for title in ("dialect", "verdict", "event/name"):
        column = lines[0].index(title)
        assert all(line[column - 2 : column] == "  " for line in lines[1:])


def test_events_escape_control_characters(
    filled_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(capsys, "events", "--store", filled_store, "--limit", "1")
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "Evil\\x1b[31m\\u202eName" in out


def test_an_escape_cannot_be_faked_with_a_backslash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A sender who writes a backslash and "x1b" must not look like one who sent ESC.
    url = f"sqlite:///{tmp_path}/fake.sqlite3"
    store = open_store(url)
    store.write(
        [
            make_record(segment("track", {"userId": "u", "event": "real\x1b"})),
            make_record(segment("track", {"userId": "u", "event": "fake\\x1b"})),
        ]
    )
    store.close()
    _, out, _ = run(capsys, "events", "--store", url)
    assert "real\\x1b" in out
    assert "fake\\\\x1b" in out


@pytest.mark.parametrize(
    ("options", "names"),
    [
        pytest.param(
            [], ["First", "Home", "No identity", "Fourth", "Evil\x1b[31m\u202eName"], id="all"
        ),
        pytest.param(["--limit", "2"], ["Fourth", "Evil\x1b[31m\u202eName"], id="limit-newest"),
        pytest.param(["--rejected"], ["No identity"], id="rejected"),
        pytest.param(["--accepted", "--call", "page"], ["Home"], id="accepted-page"),
        pytest.param(
            ["--call", "track", "--limit", "1"], ["Evil\x1b[31m\u202eName"], id="call-limit"
        ),
        pytest.param(["--call", "alias"], [], id="none"),
    ],
)
def test_events_jsonl_filters(
    options: list[str], names: list[str], filled_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "events", "--store", filled_store, "--format", "jsonl", *options)
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event"].get("event") or r["event"].get("name") for r in records] == names
    assert out.isascii()


def test_events_on_an_empty_store_prints_the_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.jsonl").touch()
    status, out, _ = run(capsys, "events", "--store", f"jsonl:///{tmp_path}/empty.jsonl")
    assert status == 0
    assert out.split() == [
        "time",
        "dialect",
        "call",
        "verdict",
        "rules",
        "event/name",
        "identity",
        "first",
        "problem",
    ]


@pytest.mark.parametrize(
    "store",
    [
        pytest.param(["--store", "jsonl:///typo.jsonl"], id="jsonl"),
        pytest.param(["--store", "sqlite:///typo.sqlite3"], id="sqlite"),
        pytest.param([], id="default"),
    ],
)
def test_events_on_a_store_that_does_not_exist_says_so_and_creates_nothing(
    store: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIXEL_STORE", raising=False)
    status, out, err = run(capsys, "events", *store)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1
    assert re.fullmatch(
        r"pixel-middleware events: error: no store at \S+: the file does not exist .*\n", err
    )
    assert list(tmp_path.iterdir()) == []


class StoreDown:
    """A store that refuses every write, under the URL of a real one."""

    def __init__(self, url: str) -> None:
        self.url = url

    def write(self, records: Any) -> None:
        raise StoreError("down")

    def read(self, **kw: Any) -> list[tuple[str, PixelRecord]]:
        raise StoreError("down")

    def close(self) -> None:
        pass


def test_events_mentions_records_waiting_in_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the recorder's default spool is under the working directory
    url = "sqlite:///events.sqlite3"
    real = open_store(url)
    recorder = Recorder(StoreDown(real.url), retry_interval=0.05)
    for name in ("One", "Two"):
        recorder.record(make_record(segment("track", {"userId": "u", "event": name})))
    recorder.close()  # the store is still down: the records stay in the spool
    real.close()
    status, out, err = run(capsys, "events", "--store", url, "--format", "jsonl")
    assert status == 0
    assert out == ""
    assert "2 more record(s) wait in the spool" in err


class LineReader:
    """Lines of a child's stream, read by a thread so that waiting can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)

    def next(self, timeout: float = 10) -> str:
        return self.lines.get(timeout=timeout)


def test_events_follow_prints_records_written_after_it_started(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/follow.sqlite3"
    store = open_store(url)
    store.write([make_record(segment("track", {"userId": "u", "event": "Before"}))])
    follow = subprocess.Popen(
        [*CLI, "events", "--store", url, "--follow", "--format", "jsonl", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        lines = LineReader(follow.stdout)
        assert json.loads(lines.next())["event"]["event"] == "Before"
        store.write([make_record(segment("track", {"userId": "u", "event": "After"}))])
        assert json.loads(lines.next())["event"]["event"] == "After"
        store.write([make_record(segment("page", {"userId": "u", "name": "Later"}))])
        assert json.loads(lines.next())["event"]["name"] == "Later"
        follow.send_signal(signal.SIGINT)
        assert follow.wait(timeout=10) == 0
    finally:
        store.close()
        if follow.poll() is None:
            follow.kill()
            follow.wait()
        for stream in (follow.stdout, follow.stderr):
            if stream:
                stream.close()


# --- serve -------------------------------------------------------------------------------


class Collector:
    """A real `pixel-middleware serve --port 0` process."""

    def __init__(self, tmp_path: Path, *options: str, argv: list[str] | None = None) -> None:
        self.store_url = f"sqlite:///{tmp_path}/serve.sqlite3"
        self.process = subprocess.Popen(
            argv or [*CLI, "serve", "--port", "0", "--store", self.store_url, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        assert self.process.stdout is not None
        self.stdout = LineReader(self.process.stdout)
        try:
            self.banner = self.stdout.next(timeout=20)
        except BaseException:
            self.kill()  # a test that fails here must not leave a server running
            raise
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", self.banner)
        assert found, self.banner
        assert int(found.group(1)) != 0
        self.url = found.group(0)
        if argv is None and "--store" not in options:
            # Where the file store is, as an absolute path.
            assert f" at {tmp_path}/serve.sqlite3)" in self.banner, self.banner

    @classmethod
    def command(cls, tmp_path: Path, argv: list[str]) -> Collector:
        """A collector started by ``argv`` (which must run `serve --port 0`)."""
        return cls(tmp_path, argv=argv)

    def stop(self, signum: int) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # Fail this test only: a server left running would fail whichever
            # test the garbage collector met it in (an unclosed-process warning).
            self.process.kill()
            self.process.wait(timeout=10)
            for stream in (self.process.stdout, self.process.stderr):
                if stream:
                    stream.close()
            raise
        assert self.process.stderr is not None
        err = self.process.stderr.read() if not self.process.stderr.closed else ""
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()
        return status, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.stop(signal.SIGKILL)


def stored(store_url: str, capsys: pytest.CaptureFixture[str]) -> list[PixelRecord]:
    status, out, _ = run(
        capsys, "events", "--store", store_url, "--format", "jsonl", "--limit", "1000"
    )
    assert status == 0
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("server", ["granian", "waitress"])
def test_serve_answers_pixels_and_flushes_on_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: str
) -> None:
    collector = Collector(tmp_path, "--server", server)
    try:
        assert collector.store_url in collector.banner
        page = requests.get(collector.url, timeout=5)
        assert page.status_code == 200
        # The live page's test pixel, as its button sends it.
        status = requests.get(collector.url + "api/status", timeout=5).json()
        pixel = requests.get(collector.url.rstrip("/") + status["testPixels"][0]["path"], timeout=5)
        assert (pixel.status_code, pixel.content) == (200, GIF)

        def send(i: int) -> int:
            event = {"userId": f"u{i}", "event": "Concurrent"}
            return requests.get(
                collector.url.rstrip("/") + segment("track", event), timeout=10
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(send, range(24))) == {200}
        assert requests.get(collector.url + "v1/pixel/track", timeout=5).headers["X-Pixel-Rejected"]
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    records = stored(collector.store_url, capsys)
    assert len(records) == 26
    # Two workers store on their own schedules (each lingers before a
    # write), so positions across workers need not follow arrival: check
    # what was kept, not where.
    named = [r["event"].get("event") for r in records if r["event"] is not None]
    assert named.count("Test Pixel Sent") == 1
    assert named.count("Concurrent") == 24
    rejected = [r for r in records if r["accepted"] is False]
    assert len(rejected) == 1
    assert rejected[0]["request"]["path"] == "/v1/pixel/track"
    assert rejected[0]["problems"]
    assert all(r["accepted"] is True for r in records if r is not rejected[0])


def test_serve_fire_and_forget_flushes_on_ctrl_c(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collector = Collector(tmp_path, "--fire-and-forget", "--write-key", "k1", "--threads", "2")
    try:
        for i in range(10):
            url = collector.url.rstrip("/") + segment(
                "track", {"userId": f"u{i}", "event": "Quick"}
            )
            assert requests.get(url, timeout=5).content == GIF
        status, err = collector.stop(signal.SIGINT)
    finally:
        collector.kill()
    assert status == 0, err
    assert [r["accepted"] for r in stored(collector.store_url, capsys)] == [True] * 10


def test_serve_says_how_many_records_an_earlier_run_left_in_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where the collector below runs, and its default spool
    url = f"sqlite:///{tmp_path}/serve.sqlite3"  # the Collector's store
    recorder = Recorder(StoreDown(url), retry_interval=0.05)
    for name in ("One", "Two", "Three"):
        recorder.record(make_record(segment("track", {"userId": "u", "event": name})))
    recorder.close()  # the store was down: an earlier run left three records behind

    collector = Collector(tmp_path)
    try:
        line = collector.stdout.next()
        assert re.fullmatch(
            r"3 record\(s\) left in the spool pixel-spool/\w+/ by an earlier run.*\n", line
        )
        deadline = time.monotonic() + 10
        while (feed := requests.get(collector.url + "events.json", timeout=5).json())["spooled"]:
            assert time.monotonic() < deadline, "the spool did not drain"
            time.sleep(0.05)
        assert [r["event"]["event"] for r in feed["records"]] == ["One", "Two", "Three"]
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err

    # Nothing left: a later run says nothing about the spool.
    again = Collector(tmp_path)
    try:
        with pytest.raises(queue.Empty):
            again.stdout.next(timeout=1)
        again.stop(signal.SIGTERM)
    finally:
        again.kill()


@pytest.mark.parametrize("quiet", [False, True], ids=["lines", "quiet"])
def test_serve_prints_one_escaped_line_per_pixel_and_what_it_recorded(
    tmp_path: Path, quiet: bool
) -> None:
    collector = Collector(tmp_path, *(["--quiet"] if quiet else []))
    try:
        base = collector.url.rstrip("/")
        event = {"userId": "u1", "event": "Opened\x1b[2J\nfake line"}
        assert requests.get(base + segment("track", event), timeout=5).status_code == 200
        assert requests.get(base + "/v1/pixel/track?writeKey=k", timeout=5).status_code == 200
        collector.process.send_signal(signal.SIGTERM)
        status = collector.process.wait(timeout=20)
        rest = []
        with contextlib.suppress(queue.Empty):
            while True:
                rest.append(collector.stdout.next(timeout=2).rstrip("\n"))
    finally:
        collector.kill()
        for stream in (collector.process.stdout, collector.process.stderr):
            if stream:
                stream.close()
    assert status == 0
    expected = [
        'pixel segment track "Opened\\x1b[2J\\x0afake line" userId=u1 writeKey=k1 accepted',
        "pixel segment track writeKey=k REJECTED [missing_identity,missing_event]"
        " notes [unencoded_form]",
    ]
    assert rest == [*([] if quiet else expected), "Stopped: 2 pixel record(s) recorded in this run"]


def test_serve_refuses_a_port_in_use(tmp_path: Path) -> None:
    first = Collector(tmp_path)
    try:
        port = first.url.rsplit(":", 1)[1].strip("/")
        second = subprocess.run(
            [*CLI, "serve", "--port", port, "--store", f"sqlite:///{tmp_path}/other.sqlite3"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert second.returncode == 1
        assert "cannot listen" in second.stderr
    finally:
        first.stop(signal.SIGTERM)
        first.kill()


def test_serve_shows_the_store_with_its_secrets_masked_and_its_files_absolute(
    tmp_path: Path,
) -> None:
    # Nothing listens on port 1: neither store is reached before a pixel arrives.
    fanout = (
        "fanout://sqlite:///local.sqlite3 redis://:hunter2-redis@127.0.0.1:1/0"
        f" forward+http://127.0.0.1:1?write_key=wk_live_secret&outbox={tmp_path}/outbox.sqlite3"
        "&drain=0.1"
    )
    collector = Collector(tmp_path, "--store", fanout)
    try:
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    banner = collector.banner
    assert "(store: fanout://sqlite:///local.sqlite3 redis://:***@127.0.0.1:1/0" in banner
    assert "?write_key=***&outbox=" in banner
    # Every file the stores keep, the forwarding outbox included, as absolute paths.
    assert f" at {tmp_path}/local.sqlite3, {tmp_path}/outbox.sqlite3); Ctrl-C to stop" in banner
    # Said at start, not at the first pixel: Redis does not answer.
    assert "warning: redis://127.0.0.1:1/0: Redis does not answer" in err
    assert "starting anyway: pixels wait in the spool" in err
    for text in (banner, err):
        assert "hunter2-redis" not in text
        assert "wk_live_secret" not in text


def test_serve_keeps_the_read_token_out_of_its_output_and_its_pages(tmp_path: Path) -> None:
    token = "serve-read-token-0123456789"
    collector = Collector(tmp_path, "--read-token", token)
    try:
        base = collector.url
        # From this machine, through a proxy: only with the token.
        proxied = {"X-Forwarded-For": "198.51.100.7"}
        refused = requests.get(base + "events.json", headers=proxied, timeout=5)
        wrong = requests.get(base + "events.json?token=" + token[:-1], headers=proxied, timeout=5)
        allowed = requests.get(base + "events.json?token=" + token, headers=proxied, timeout=5)
        page = requests.get(base, params={"token": token}, headers=proxied, timeout=5)
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    assert (refused.status_code, wrong.status_code, allowed.status_code) == (403, 403, 200)
    assert page.status_code == 200
    for text in (collector.banner, err, refused.text, wrong.text, allowed.text, page.text):
        assert token not in text


def test_serve_raises_its_open_file_limit_to_hold_its_connections(tmp_path: Path) -> None:
    # A shell that lowers the soft limit, as a service manager might leave it.
    command = " ".join(
        [*map(shlex.quote, CLI), "serve", "--port", "0", "--store", f"sqlite:///{tmp_path}/f.db"]
    )
    collector = Collector.command(tmp_path, ["sh", "-c", f"ulimit -S -n 256 && exec {command}"])
    try:
        limits = Path(f"/proc/{collector.process.pid}/limits").read_text()
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    [soft] = re.findall(r"Max open files\s+(\d+)", limits)
    # The default --connection-limit, the threads and the reserve for the store's files.
    assert int(soft) >= 1000 + 8 + 64


def test_slow_clients_do_not_keep_pixels_from_being_answered(tmp_path: Path) -> None:
    """Slowloris: 300 connections sending a byte now and then, and real pixels meanwhile."""
    collector = Collector(tmp_path)
    host, port = "127.0.0.1", int(collector.url.rsplit(":", 1)[1].strip("/"))
    slow: list[socket.socket] = []
    answered: list[float] = []
    try:
        for _ in range(300):
            sock = socket.create_connection((host, port), timeout=5)
            sock.sendall(b"GET /v1/pixel/track?data=")
            slow.append(sock)
        started = time.monotonic()
        n = 0
        # About 8 s: each slow client sends a byte every ~2 s, and a real pixel
        # goes out every ~0.5 s; each must be answered within 3 s.
        while time.monotonic() - started < 8:
            for sock in slow[n % 4 :: 4]:
                sock.sendall(b"A")
            url = collector.url.rstrip("/") + segment("track", {"userId": f"u{n}", "event": "E"})
            sent = time.monotonic()
            response = requests.get(url, timeout=3)
            assert (response.status_code, response.content) == (200, GIF)
            answered.append(time.monotonic() - sent)
            n += 1
            time.sleep(0.5)
        assert collector.process.poll() is None
    finally:
        for sock in slow:
            sock.close()
        collector.stop(signal.SIGTERM)
        collector.kill()
    assert len(answered) >= 6
    assert max(answered) < 3


def _port(collector: Collector) -> int:
    return int(collector.url.rsplit(":", 1)[1].strip("/"))


def _hold(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that sent half a request line, and nothing more."""
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /pixel/v1/track?writeKey=k")
        held.append(sock)
    time.sleep(0.3)  # accepted by the server, or waiting in its backlog
    return held


@pytest.mark.parametrize("held", [1, 2], ids=["under-the-limit", "at-the-limit"])
def test_serve_connection_limit_keeps_further_connections_waiting(
    tmp_path: Path, held: int
) -> None:
    collector = Collector(tmp_path, "--workers", "1", "--connection-limit", "2", "--quiet")
    url = collector.url + "pixel/v1/track?writeKey=k&anonymousId=a&event=E"
    sockets = _hold(_port(collector), held)
    try:
        if held < 2:
            assert requests.get(url, timeout=1.5).status_code == 200
        else:
            # Its connection waits in the backlog until one of the two closes.
            with pytest.raises(requests.exceptions.ReadTimeout):
                requests.get(url, timeout=1.5)
            sockets.pop().close()
            assert requests.get(url, timeout=5).status_code == 200
    finally:
        for sock in sockets:
            sock.close()
        status, err = collector.stop(signal.SIGTERM)
    assert status == 0, err


def test_serve_channel_timeout_closes_a_connection_that_never_sends_its_headers(
    tmp_path: Path,
) -> None:
    collector = Collector(
        tmp_path, "--workers", "1", "--connection-limit", "1", "--channel-timeout", "1", "--quiet"
    )
    url = collector.url + "pixel/v1/track?writeKey=k&anonymousId=a&event=E"
    [slow] = _hold(_port(collector), 1)
    try:
        started = time.monotonic()
        # Waits for the only connection's place, freed when its headers are 1 s late.
        assert requests.get(url, timeout=10).status_code == 200
        assert 0.5 < time.monotonic() - started < 5
        slow.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert b"GIF" not in slow.recv(1024)  # closed, or a 408: never a pixel's answer
    finally:
        slow.close()
        status, err = collector.stop(signal.SIGTERM)
    assert status == 0, err


def test_serve_workers_print_whole_lines_and_one_summary(tmp_path: Path) -> None:
    collector = Collector(tmp_path, "--workers", "2", "--threads", "4")
    base = collector.url.rstrip("/")

    def send(i: int) -> int:
        event = {"userId": f"u{i}", "event": f"Opened {i}"}
        return requests.get(base + segment("track", event), timeout=30).status_code

    try:
        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(send, range(300))) == {200}
        collector.process.send_signal(signal.SIGTERM)
        status = collector.process.wait(timeout=30)
        lines = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(collector.stdout.next(timeout=2).rstrip("\n"))
    finally:
        collector.kill()
    assert status == 0
    assert lines[-1] == "Stopped: 300 pixel record(s) recorded in this run"
    # Whole lines only: two workers writing through buffers would cut some in two.
    pixel = re.compile(r'pixel segment track "Opened (\d+)" userId=u\1 writeKey=k1 accepted')
    assert [line for line in lines[:-1] if not pixel.fullmatch(line)] == []
    assert len(lines) == 301


def _running(pid: int) -> bool:
    """Whether a process is there and not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def test_serve_stops_on_a_sigterm_sent_while_its_workers_start(tmp_path: Path) -> None:
    # The start line comes before the workers run: a service manager's stop at
    # that moment must still stop every worker, not leave serve waiting on one.
    for attempt in range(3):
        collector = Collector(tmp_path, "--workers", "2", "--quiet")
        try:
            status, err = collector.stop(signal.SIGTERM)
        finally:
            collector.kill()
        assert status == 0, (attempt, err)


def test_serve_workers_take_their_stop_signals_in_one_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stop signal the kernel gave one of granian's threads ran no handler
    # while the worker's main thread waited inside granian: the worker served
    # on until serve killed it. Every thread of a worker blocks both signals;
    # its watcher thread takes them (sigwait) and hands them to granian.
    collector = Collector(tmp_path, "--workers", "2")
    try:
        for n in range(8):  # the recorder's writer and the printer start
            url = collector.url + f"pixel/v1/track?writeKey=k&anonymousId=a&event=E{n}"
            assert requests.get(url, timeout=10).status_code == 200
        workers = _children(collector.process.pid)
        assert len(workers) == 2
        for worker in workers:
            names = threads(worker)
            assert len(names) > 3  # granian's, the writer, the printer, the watcher
            for tid in names:
                blocked = blocked_signals(worker, tid)
                assert {signal.SIGTERM, signal.SIGINT} <= blocked, (worker, tid)
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    assert len(stored(collector.store_url, capsys)) == 8


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


@pytest.mark.parametrize("victims", ["main-process", "every-process"])
def test_kill_9_of_serve_under_load_loses_no_answered_pixel(tmp_path: Path, victims: str) -> None:
    store_url = f"sqlite:///{tmp_path}/serve.sqlite3"
    process = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--store", store_url, "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    assert process.stdout is not None
    stop = threading.Event()
    try:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", process.stdout.readline())
        assert found
        base = found.group(0).rstrip("/")
        answered: list[str] = []

        def load(thread: int) -> None:
            with requests.Session() as session:
                for n in range(100_000):
                    if stop.is_set():
                        return
                    event = {"userId": "u", "event": "E", "messageId": f"m-{thread}-{n}"}
                    try:
                        response = session.get(base + segment("track", event), timeout=5)
                    except requests.RequestException:
                        continue  # not answered: the server is gone
                    if response.status_code == 200:
                        answered.append(event["messageId"])

        with ThreadPoolExecutor(8) as pool:
            loads = [pool.submit(load, t) for t in range(8)]
            deadline = time.monotonic() + 10
            while len(answered) < 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            workers = _children(process.pid)
            assert len(workers) == 2
            if victims == "every-process":
                os.killpg(process.pid, signal.SIGKILL)
            else:
                os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            # Orphaned workers stop on their own, flushing what they answered.
            deadline = time.monotonic() + 15
            while any(_running(worker) for worker in workers):
                assert time.monotonic() < deadline, "a worker outlived its main process"
                time.sleep(0.05)
            stop.set()
            for future in loads:
                future.result()
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        process.stdout.close()
    assert len(answered) >= 200
    # An answered pixel is in a worker's journal, maybe not yet in the store: a
    # killed worker's journal is replayed by the next recorder on the store, as
    # the next `serve` would (started in the same directory, so the same journal).
    replaying = open_store(store_url)
    journal = tmp_path / default_spool_path(store_identity(replaying))
    Recorder(replaying, spool_path=journal).close()  # closes the store too
    assert count_spooled(journal) == 0
    store = open_store(store_url)
    try:
        kept = [str(record["event"]["messageId"]) for _, record in store.read(accepted=True)]
    finally:
        store.close()
    assert len(kept) == len(set(kept)), "no duplicates"
    assert set(answered) <= set(kept)


def test_serve_records_the_forwarded_address_with_trusted_proxies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collector = Collector(tmp_path, "--trusted-proxies", "1")
    try:
        url = collector.url.rstrip("/") + segment("track", {"userId": "u", "event": "Proxied"})
        response = requests.get(url, headers={"X-Forwarded-For": "203.0.113.50"}, timeout=5)
        assert response.status_code == 200
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    assert status == 0, err
    [record] = stored(collector.store_url, capsys)
    assert record["request"]["ip"] == "203.0.113.50"


def test_serve_stops_when_a_worker_does_not_and_keeps_what_it_answered(tmp_path: Path) -> None:
    # A worker that never answers its stop (here: stopped by SIGSTOP) is killed
    # by the main process after WORKER_STOP_SECONDS; serve exits, and a pixel
    # that worker answered waits in its journal for the next run.
    collector = Collector(tmp_path, "--quiet", "--workers", "2")
    workers: list[int] = []
    try:
        for n in range(4):
            url = collector.url + f"pixel/v1/track?writeKey=k&anonymousId=a&event=E{n}"
            assert requests.get(url, timeout=10).status_code == 200
        workers = _children(collector.process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGSTOP)
        started = time.monotonic()
        status, err = collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
        for worker in workers:  # none should be left; a failed test leaves none either
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    assert status == 0, err
    assert time.monotonic() - started >= 10, "the stuck worker was waited for, then killed"
    replaying = open_store(collector.store_url)
    Recorder(replaying, spool_path=tmp_path / default_spool_path(store_identity(replaying))).close()
    store = open_store(collector.store_url)
    try:
        names = sorted(str(record["event"]["event"]) for _, record in store.read())
    finally:
        store.close()
    assert names == ["E0", "E1", "E2", "E3"]


@pytest.mark.parametrize(
    ("options", "status"),
    [
        pytest.param([], 403, id="refused-by-default"),
        pytest.param(["--allow-reset"], 200, id="allowed"),
    ],
)
def test_serve_allow_reset_lets_the_api_clear_a_sqlite_store(
    tmp_path: Path, options: list[str], status: int
) -> None:
    collector = Collector(tmp_path, "--quiet", *options)
    try:
        pixel = requests.get(
            collector.url + "pixel/v1/track?writeKey=k&anonymousId=a&event=E", timeout=10
        )
        assert pixel.status_code == 200
        before = requests.get(collector.url + "api/counts", timeout=10).json()
        assert before["total"] == 1
        answer = requests.post(collector.url + "api/reset", timeout=10)
        assert answer.status_code == status, answer.text
        after = requests.get(collector.url + "api/counts", timeout=10).json()
        assert after["total"] == (0 if status == 200 else 1)
    finally:
        collector.stop(signal.SIGTERM)


# --- decode --har and events --format har --------------------------------------------------

HAR_FIXTURES = Path(__file__).parent / "fixtures" / "har"


def test_decode_har_prints_a_block_per_pixel_and_exits_1_when_any_was_rejected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, err = run(capsys, "decode", "--har", str(HAR_FIXTURES / "chromium.har"))
    assert (status, err) == (1, "")
    blocks = out.split("\n\n")
    assert [block.split("\n")[1] for block in blocks[:4]] == [
        "accepted: segment track (writeKey wk_fixture)",
        "accepted: rudderstack page (writeKey wk_fixture)",
        "rejected: rudderstack track (writeKey wk_fixture)",
        "rejected: segment identify (writeKey wk_fixture)",
    ]
    assert blocks[0].startswith("entry 2: GET http://127.0.0.1:")
    assert out.endswith("4 pixel(s): 2 accepted, 2 rejected; 1 other request(s) passed over\n")


def test_decode_har_json_is_a_list_of_the_records(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "decode", "--json", "--har", str(HAR_FIXTURES / "mitmproxy.har"))
    records = json.loads(out)
    assert status == 1
    assert [(r["call"], r["accepted"]) for r in records] == [
        ("track", True),
        ("page", True),
        ("track", False),
        ("identify", False),
    ]
    assert "3 other request(s) passed over" in err


def test_decode_har_exit_0_when_every_pixel_was_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = json.loads((HAR_FIXTURES / "chromium.har").read_text())
    document["log"]["entries"] = document["log"]["entries"][:3]  # the page and 2 accepted
    path = tmp_path / "accepted.har"
    path.write_text(json.dumps(document))
    status, out, _ = run(capsys, "decode", "--har", str(path))
    assert status == 0
    assert out.endswith("2 pixel(s): 2 accepted, 0 rejected; 1 other request(s) passed over\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"<html>\x1b[31m", "not a HAR file: not valid JSON (line 1, column 1)"),
        (
            b'{"log": {"entries": [{"request": {"method": "GET", "url": "http://h/"}}, 7]}}',
            "holds no pixel request (1 other request(s) passed over,"
            " 1 entry(ies) with no usable request)",
        ),
    ],
    ids=["not-json", "no-pixel"],
)
def test_decode_har_exit_2_with_one_line_for_no_pixel_or_not_a_har(
    content: bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "x.har"
    path.write_bytes(content)
    done = subprocess.run(
        [*CLI, "decode", "--har", str(path)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"pixel-middleware decode: {path}: {message}\n"


def test_decode_har_of_a_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "decode", "--har", "/nonexistent/x.har")
    assert (status, out) == (2, "")
    assert (
        err
        == "pixel-middleware decode: cannot read /nonexistent/x.har: No such file or directory\n"
    )


def test_decode_har_escapes_what_the_file_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = {"request": {"method": "GET", "url": "http://h/v1/pixel/page?userId=\x1b[2J"}}
    path = tmp_path / "x.har"
    path.write_text(json.dumps({"log": {"entries": [entry]}}))
    status, out, _ = run(capsys, "decode", "--har", str(path))
    assert status == 1  # no writeKey
    assert "\x1b" not in out
    assert "entry 1: GET http://h/v1/pixel/page?userId=\\x1b[2J" in out


def test_decode_takes_a_url_or_har_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "decode", "/v1/pixel/page", "--har", "x.har")
    assert status == 2
    assert "not allowed with argument" in err


@pytest.mark.mitmproxy
def test_events_har_opens_in_mitmproxy_and_decodes_back_to_the_same_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mitmproxy.io.har import request_to_flow

    store_url = f"sqlite:///{tmp_path}/s.sqlite3"
    records = [
        make_record("/v1/pixel/track?" + segment("track", {"userId": "u", "event": "Opened"})[17:]),
        make_record("/pixel/v1/track?writeKey=k&anonymousId=a"),
        make_record("/pixel/v1/page?writeKey=k&anonymousId=a&name=P&properties.x=%E2%9C%93"),
    ]
    store = open_store(store_url)
    store.write(records)
    store.close()
    status, out, _ = run(
        capsys, "events", "--store", store_url, "--format", "har", "--base-url", "https://px.test"
    )
    assert status == 0
    path = tmp_path / "events.har"
    path.write_text(out)
    entries = json.loads(out)["log"]["entries"]
    flows = [request_to_flow(entry) for entry in entries]
    assert [f.request.pretty_url for f in flows] == [
        "https://px.test" + r["request"]["path"] + "?" + r["request"]["query"] for r in records
    ]
    assert [f.response.status_code for f in flows if f.response] == [200, 400, 200]
    # mitmdump itself reads the file (and would exit non-zero on a bad one).
    mitmdump = Path(sys.executable).with_name("mitmdump")
    done = subprocess.run(
        [str(mitmdump), "-n", "-q", "-r", str(path)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, "")
    status, out, _ = run(capsys, "decode", "--json", "--har", str(path))
    assert status == 1
    assert json.loads(out) == records


def test_events_har_cannot_follow_and_checks_its_base_url(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run(capsys, "events", "--format", "har", "--follow")
    assert status == 2
    assert "cannot --follow" in err
    status, _, err = run(capsys, "events", "--format", "har", "--base-url", "ftp://x")
    assert status == 2
    assert "--base-url must be" in err


def test_serve_does_not_log_waitress_queue_depth(tmp_path: Path) -> None:
    # Eight pixels at once on one thread: every one but the first waits in
    # waitress's queue, which it would log as a warning each time.
    collector = Collector(tmp_path, "--server", "waitress", "--quiet", "--threads", "1")
    try:
        url = collector.url + "pixel/v1/track?writeKey=k&anonymousId=a&event=E"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: requests.get(url, timeout=30).status_code, range(8)))
        assert statuses == [200] * 8
    finally:
        status, err = collector.stop(signal.SIGTERM)
    assert status == 0
    assert "Task queue depth" not in err


@pytest.mark.parametrize(
    ("url", "status", "first_line"),
    [
        pytest.param(
            "https://www.google-analytics.com/g/collect?v=2&tid=G-ABC123&cid=555.666&en=page_view",
            0,
            "accepted: ga4 page (writeKey G-ABC123)",
            id="ga4",
        ),
        pytest.param(
            "https://www.facebook.com/tr?id=123&ev=PageView",
            0,
            "accepted: meta page (writeKey 123)",
            id="meta-on-its-host",
        ),
        pytest.param(
            "https://www.google-analytics.com/g/collect?v=2&cid=555.666&en=page_view",
            1,
            "rejected: ga4 page (no writeKey)",
            id="ga4-without-tid",
        ),
    ],
)
def test_decode_reads_every_dialect(
    url: str, status: int, first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "decode", url)
    assert code == status
    assert out.splitlines()[0] == first_line


def test_decode_of_a_vendor_path_on_another_host_is_not_a_pixel(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # /tr is Meta's only on Meta's hosts: elsewhere it is someone's own path.
    code, out, err = run(capsys, "decode", "https://example.com/tr?id=123&ev=PageView")
    assert (code, out) == (2, "")
    assert "not a pixel route: /tr" in err
