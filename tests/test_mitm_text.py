"""pixel_middleware.mitm_text: the addon's log line, flow comment and content view text.

Pure functions of a record, so these tests need no mitmproxy: records are made
by the core from real requests, or written out by hand where a test needs a
value the core would never give.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pixel_middleware.core import PixelConfig, PixelRecord, PixelRequest, decode_pixel
from pixel_middleware.mitm_text import (
    COMMENT_WIDTH,
    VIEW_WIDTH,
    comment_line,
    log_line,
    view_text,
)

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def decoded(target: bytes) -> PixelRecord:
    """The core's record for a GET of ``target`` (path and raw query)."""
    path, _, query = target.partition(b"?")
    outcome = decode_pixel(
        PixelRequest(method="GET", path=path.decode(), query=query, peer="127.0.0.1"),
        config=PixelConfig(),
        now=NOW,
    )
    assert outcome is not None
    assert outcome.record is not None
    return outcome.record


def segment(event: dict[str, Any], extra: bytes = b"") -> PixelRecord:
    data = base64.b64encode(json.dumps(event).encode())
    return decoded(b"/v1/pixel/track?data=" + data + extra)


def made(**fields: Any) -> dict[str, Any]:
    """A record written by hand: the fields a test sets, over an accepted track."""
    return {
        "dialect": "segment",
        "call": "track",
        "writeKey": "k",
        "accepted": True,
        "problems": [],
        "notes": [],
        "event": {"type": "track"},
        **fields,
    }


# -- log line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param(
            {"writeKey": "wk", "event": "Email Opened", "userId": "u-1"},
            'pixel segment track "Email Opened" userId=u-1 writeKey=wk accepted'
            " upstream 200 in 3.1 ms host=api.segment.io",
            id="user",
        ),
        pytest.param(
            {"writeKey": "wk", "event": "Open", "anonymousId": "a-1"},
            'pixel segment track "Open" anonymousId=a-1 writeKey=wk accepted'
            " upstream 200 in 3.1 ms host=api.segment.io",
            id="anonymous",
        ),
        pytest.param(
            # As the collector's pages show it: the userId, which names the person.
            {"writeKey": "wk", "event": "Open", "userId": "u-1", "anonymousId": "a-1"},
            'pixel segment track "Open" userId=u-1 writeKey=wk accepted'
            " upstream 200 in 3.1 ms host=api.segment.io",
            id="both-shows-the-user",
        ),
        pytest.param(
            # A userId that reads like identity()'s own "anon:" mark stays a userId.
            {"writeKey": "wk", "event": "Open", "userId": "anon:x"},
            'pixel segment track "Open" userId=anon:x writeKey=wk accepted'
            " upstream 200 in 3.1 ms host=api.segment.io",
            id="user-named-anon",
        ),
    ],
)
def test_log_line_format(event: dict[str, Any], expected: str) -> None:
    record = segment(event)
    record["upstream"] = {"status": 200, "contentType": "image/gif", "ms": 3.1}
    assert log_line(record, "api.segment.io") == expected


def test_log_line_shows_a_missing_status_as_a_dash() -> None:
    line = log_line(made(upstream={"status": None, "ms": None}), "h")
    assert "upstream - in - ms" in line
    assert "None" not in line


# -- flow comment ---------------------------------------------------------------------

# "segment track: rejected: " + rule + "; upstream 200"
_FIXED = len("segment track: rejected: ") + len("; upstream 200")


@pytest.mark.parametrize(
    ("rule_chars", "expected_length", "cut"),
    [
        pytest.param(COMMENT_WIDTH - _FIXED - 1, COMMENT_WIDTH - 1, False, id="one-under"),
        pytest.param(COMMENT_WIDTH - _FIXED, COMMENT_WIDTH, False, id="at-the-width"),
        pytest.param(COMMENT_WIDTH - _FIXED + 1, COMMENT_WIDTH, True, id="one-over"),
        pytest.param(500, COMMENT_WIDTH, True, id="far-over"),
    ],
)
def test_comment_is_cut_to_the_width_keeping_the_upstream_answer(
    rule_chars: int, expected_length: int, cut: bool
) -> None:
    rule = "r" * rule_chars
    record = made(accepted=False, problems=[{"rule": rule, "message": "m"}])
    record["upstream"] = {"status": 200, "ms": 1.0}
    comment = comment_line(record)
    assert len(comment) == expected_length
    assert comment.endswith("; upstream 200")
    if cut:
        assert comment == (
            "segment track: rejected: " + rule[: COMMENT_WIDTH - _FIXED - 1] + "…; upstream 200"
        )
    else:
        assert comment == f"segment track: rejected: {rule}; upstream 200"


def test_comment_width_fits_mitmwebs_column() -> None:
    assert 60 <= COMMENT_WIDTH <= 80


def test_comment_cuts_a_long_event_name_before_the_verdict() -> None:
    record = segment({"writeKey": "wk", "event": "N" * 300, "userId": "u"})
    record["upstream"] = {"status": 200, "ms": 1.0}
    assert comment_line(record) == f'segment track "{"N" * 23}…": accepted; upstream 200'


def test_comment_of_a_real_rejection_keeps_its_rules_and_answer() -> None:
    record = decoded(b"/pixel/v1/track?anonymousId=a-9")
    record["upstream"] = {"status": 400, "ms": 1.0}
    assert comment_line(record) == (
        "rudderstack track: rejected: missing_write_key, missing_event; upstream 400"
    )


# -- content view ---------------------------------------------------------------------


def test_view_layout() -> None:
    record = segment({"writeKey": "wk", "event": "Open", "userId": "u"}, b"&x=1")
    record["upstream"] = {"status": 200, "ms": 1.5}
    text = view_text(record)
    head, event = text.split("\nevent:\n")
    assert head == (
        "segment track: accepted\n"
        "writeKey: wk\n"
        "upstream: 200 in 1.5 ms\n"
        "problems: none\n"
        "notes:\n"
        '  - params_ignored: Parameters beside data and writeKey were ignored: "x"'
    )
    assert json.loads(event) == record["event"]


def test_view_shows_missing_values_as_a_dash() -> None:
    record = decoded(b"/pixel/v1/track?anonymousId=a-9")  # no write key
    record["upstream"] = {"status": None, "ms": None}
    lines = view_text(record).splitlines()
    assert lines[1:3] == ["writeKey: -", "upstream: - in - ms"]
    assert "None" not in "\n".join(lines[:3])


def test_a_parameter_name_cannot_make_a_line_of_its_own() -> None:
    """A note names the parameters it is about, as sent: a newline in a name is
    shown escaped inside the note's line, never as a new line of the view."""
    record = segment({"writeKey": "wk", "event": "Open"}, b"&a%0AFAKE%20LINE=1")
    text = view_text(record)
    (note,) = [line for line in text.splitlines() if "params_ignored" in line]
    assert note == (
        r'  - params_ignored: Parameters beside data and writeKey were ignored: "a\x0aFAKE LINE"'
    )
    assert not any(line.startswith("FAKE") for line in text.splitlines())
    assert text.replace("\n", "").isprintable()


@pytest.mark.parametrize(
    ("chars", "lines"),
    [
        pytest.param(VIEW_WIDTH - 1, 1, id="one-under"),
        pytest.param(VIEW_WIDTH, 1, id="at-the-width"),
        pytest.param(VIEW_WIDTH + 1, 2, id="one-over"),
    ],
)
def test_view_wraps_lines_longer_than_its_width(chars: int, lines: int) -> None:
    prefix = "writeKey: "
    key = "k" * (chars - len(prefix))
    shown = view_text(made(writeKey=key)).splitlines()
    wrapped = shown[1 : 1 + lines]
    assert wrapped[0].startswith("writeKey:")
    assert "".join(wrapped).replace(" ", "") == f"writeKey:{key}"
    assert shown[1 + lines].startswith("problems:")
    assert all(len(line) <= VIEW_WIDTH for line in shown)


def test_view_wraps_long_event_values_indented_under_their_line() -> None:
    url = "https://example.com/" + "p" * 250
    record = segment({"writeKey": "wk", "event": "Open", "properties": {"url": url}})
    lines = view_text(record).splitlines()
    assert all(len(line) <= VIEW_WIDTH for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith('    "url": '))
    # Continuations are indented deeper than the line they continue.
    assert lines[start + 1].startswith(" " * 8 + "p")
    assert lines[start + 2].startswith(" " * 8 + "p")
    joined = lines[start] + "".join(line.strip() for line in lines[start + 1 : start + 3])
    assert joined == f'    "url": "{url}"'
