"""Tests for pixel_middleware.display: what people are shown of a record."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pixel_middleware.display import event_name, identity, terminal_json, terminal_text


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param({"event": "Email Opened", "name": "x"}, "Email Opened", id="track-event"),
        pytest.param({"name": "Pricing"}, "Pricing", id="page-name"),
        pytest.param({"groupId": "g-1"}, "g-1", id="group"),
        pytest.param({"previousId": "old"}, "old", id="alias"),
        pytest.param({"event": "", "name": 42}, "42", id="number-as-json"),
        pytest.param({}, "", id="none"),
        pytest.param(None, "", id="no-event"),
    ],
)
def test_event_name(event: Any, expected: str) -> None:
    assert event_name({"event": event}) == expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        pytest.param({"userId": "u-1", "anonymousId": "a-1"}, "u-1", id="user-first"),
        pytest.param({"userId": "", "anonymousId": "a-1"}, "anon:a-1", id="anonymous"),
        pytest.param({"userId": 7}, "7", id="number"),
        pytest.param({}, "", id="none"),
    ],
)
def test_identity(event: dict[str, Any], expected: str) -> None:
    assert identity({"event": event}) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("plain text é", "plain text é", id="printable-unchanged"),
        pytest.param("a\x1b[31mb", "a\\x1b[31mb", id="terminal-escape"),
        pytest.param("line\nfake", "line\\x0afake", id="newline"),
        pytest.param("\u202eevil", "\\u202eevil", id="bidi-override"),
        pytest.param("a\\x1b", "a\\\\x1b", id="backslash-doubled"),
        pytest.param("\U000e0001", "\\U000e0001", id="astral-format-char"),
    ],
)
def test_terminal_text(text: str, expected: str) -> None:
    assert terminal_text(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"name": "a\x1b[2Jb\u2028c"}, id="controls"),
        pytest.param({"k\nfake": "\U000e0001"}, id="astral-and-newline-in-key"),
        pytest.param({"plain": "é ü"}, id="printable"),
    ],
)
def test_terminal_json_stays_json_on_its_own_lines(value: dict[str, str]) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    shown = terminal_json(text)
    assert json.loads(shown) == value
    assert shown.count("\n") == text.count("\n")
    assert shown.replace("\n", "").isprintable()
