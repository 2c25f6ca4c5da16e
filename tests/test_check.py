"""``pixel-middleware check`` as CI runs it: the installed command in a subprocess,
against a real SQLite store file and against a real running ``pixel-middleware serve``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from pixel_middleware.check import CheckError, parse_expectation, parse_since
from pixel_middleware.stores import open_store
from tests.test_cli import CLI, Collector, make_record, segment


def check(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "check", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
        check=False,
    )


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/ci.sqlite3"
    store = open_store(url)
    opened = {"userId": "u1", "event": "Email Opened", "properties": {"plan": "free"}}
    store.write(
        [
            make_record(segment("track", opened)),
            make_record(segment("track", {**opened, "userId": "u2"})),
            make_record(segment("page", {"userId": "u1", "name": "Home"})),
            make_record(segment("track", {"event": "Email Opened\x1b[2J"})),  # rejected
        ]
    )
    store.close()
    return url


def test_every_expectation_holds_exits_0_with_one_line_each(store_url: str) -> None:
    done = check(
        "--store", store_url, "--expect", "Email Opened>=2", "--expect", "page == 1",
        "--expect", "Email Opened<3", "--expect", "track>1", "--expect", "event:Home<=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "✓ Email Opened >= 2: 2",
        "✓ page == 1: 1",
        "✓ Email Opened < 3: 2",
        "✓ track > 1: 2",
        "✓ Home <= 1: 1",
        f"5 expectation(s) held ({store_url})",
    ]


@pytest.mark.parametrize(
    ("expectation", "holds"),
    [
        pytest.param("Email Opened>=2", True, id="ge-at"),
        pytest.param("Email Opened>=3", False, id="ge-one-over"),
        pytest.param("Email Opened<=2", True, id="le-at"),
        pytest.param("Email Opened<=1", False, id="le-one-under"),
        pytest.param("Email Opened==2", True, id="eq"),
        pytest.param("Email Opened==3", False, id="eq-one-over"),
        pytest.param("Email Opened>1", True, id="gt"),
        pytest.param("Email Opened>2", False, id="gt-at"),
        pytest.param("Email Opened<3", True, id="lt"),
        pytest.param("Email Opened<2", False, id="lt-at"),
    ],
)
def test_each_operator_at_its_boundary(store_url: str, expectation: str, holds: bool) -> None:
    done = check("--store", store_url, "--expect", expectation)
    assert done.returncode == (0 if holds else 1), done.stdout + done.stderr


def test_a_failure_shows_the_nearest_records_escaped_and_writes_junit_and_json(
    store_url: str, tmp_path: Path
) -> None:
    junit, result = tmp_path / "check.xml", tmp_path / "check.json"
    done = check(
        "--store", store_url, "--expect", "Email Opened>=1", "--expect", "Email Opend>=1",
        "--expect", "page>=2", "--no-rejected", "--junit", str(junit), "--json", str(result),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "\x1b" not in out
    lines = out.splitlines()
    assert lines[0] == "✓ Email Opened >= 1: 2"
    assert lines[1] == "✗ Email Opend >= 1: 0"
    assert '    similar event names that arrived: "Email Opened", "Email Opened\\x1b[2J"' in lines
    assert "✗ page >= 2: 1" in lines
    assert "✗ no rejected pixels: 1" in lines
    assert "      [missing_identity] The event needs a userId or an anonymousId." in lines
    assert any('track "Email Opened\\x1b[2J"' in line for line in lines)
    assert lines[-1] == f"3 of 4 expectation(s) failed ({store_url})"

    assert stat.S_IMODE(junit.stat().st_mode) == 0o600
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("4", "3")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "Email Opened >= 1",
        "Email Opend >= 1",
        "page >= 2",
        "no rejected pixels",
    ]
    assert [c.find("failure") is not None for c in cases] == [False, True, True, True]

    answer = json.loads(result.read_text())
    assert answer["passed"] is False
    assert answer["failures"] == 3
    assert [e["count"] for e in answer["expectations"]] == [2, 0, 1, 1]


def test_filters_and_since_set_the_scope_and_misses_show_what_differed(store_url: str) -> None:
    done = check(
        "--store", store_url, "--expect", "Email Opened>=1", "--where", "properties.plan=pro"
    )
    assert done.returncode == 1
    assert '        properties.plan: expected "pro", got "free"' in done.stdout.splitlines()
    done = check("--store", store_url, "--expect", "Email Opened==1", "--user-id", "u2")
    assert done.returncode == 0, done.stdout
    done = check("--store", store_url, "--expect", "track==0", "--since", "0s")
    assert done.returncode == 0, done.stdout
    done = check("--store", store_url, "--expect", "track==2", "--since", "1h")
    assert done.returncode == 0, done.stdout
    done = check("--store", store_url, "--rejected", "--expect", "track==1")
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="nothing-to-check"),
        pytest.param(["--expect", "Email Opened"], id="no-operator"),
        pytest.param(["--expect", "page=>1"], id="bad-operator"),
        pytest.param(["--expect", "call:Email Opened>=1"], id="not-a-call"),
        pytest.param(["--expect", "page>=1", "--since", "yesterday"], id="bad-since"),
        pytest.param(["--expect", "page>=1", "--where", "plan"], id="bad-where"),
        pytest.param(["--expect", "page>=1", "--call", "trak"], id="bad-call"),
        pytest.param(["--expect", "page>=1", "--url", "ftp://x"], id="bad-url"),
    ],
)
def test_usage_errors_exit_2(store_url: str, argv: list[str]) -> None:
    extra = [] if "--url" in argv else ["--store", store_url]
    done = check(*extra, *argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("pixel-middleware check: error: ")


def test_a_store_that_does_not_exist_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    done = check("--store", f"sqlite:///{tmp_path}/typo.sqlite3", "--expect", "page>=1")
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_against_a_running_collector_through_its_api(tmp_path: Path) -> None:
    collector = Collector(tmp_path)
    try:
        base = collector.url.rstrip("/")
        for user in ("u1", "u2"):
            event = {"userId": user, "event": "Email Opened"}
            assert requests.get(base + segment("track", event), timeout=5).status_code == 200
        assert requests.get(base + "/v1/pixel/track?writeKey=k", timeout=5).status_code == 200
        done = check("--url", base, "--expect", "Email Opened==2", "--expect", "page>=1")
        assert done.returncode == 1, done.stderr
        assert done.stdout.splitlines()[:2] == ["✓ Email Opened == 2: 2", "✗ page >= 1: 0"]
        assert done.stdout.splitlines()[-1] == f"1 of 2 expectation(s) failed ({base})"
        done = check("--url", base, "--no-rejected", "--json", "-")
        assert done.returncode == 1
        answer: dict[str, Any] = json.loads(done.stdout)
        assert answer["expectations"][0]["count"] == 1
        assert any("[missing_identity]" in line for line in answer["expectations"][0]["details"])
        done = check("--url", base, "--expect", "Email Opened>=1", "--token", "s3cret-token")
        assert done.returncode == 0, "a token the collector does not need is harmless"
        assert "s3cret" not in done.stdout + done.stderr
        collector.stop(signal.SIGTERM)
    finally:
        collector.kill()
    done = check("--url", base, "--expect", "page>=1", env={"PIXEL_READ_TOKEN": "s3cret-token"})
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"pixel-middleware check: error: cannot reach the collector at {base}"
    )
    assert "s3cret" not in done.stderr


def test_expectations_and_durations_parse_exactly() -> None:
    assert parse_expectation("Email Opened >= 1").text == "Email Opened >= 1"
    assert parse_expectation("a>b>=2").name == "a>b"
    assert parse_expectation("event:page==1").kind == "event"
    assert parse_expectation("page==1").kind == "call"
    with pytest.raises(CheckError):
        parse_expectation("x" * 300 + ">=1")
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_since("10m", now=now) == (now - timedelta(minutes=10)).isoformat()
    assert parse_since("1.5h", now=now) == (now - timedelta(minutes=90)).isoformat()
    assert parse_since("2026-01-01T00:00:00Z") == "2026-01-01T00:00:00Z"
