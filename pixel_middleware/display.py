"""How records are shown to people: one place for names, identities and safe text.

The command line, the collector's pages and the mitmproxy addon all show what
any sender wrote, so they share these helpers instead of each keeping its own:

- :func:`event_name` and :func:`identity` pick what a person scans for first;
- :func:`terminal_text` makes one line safe to print: a raw ESC, a
  right-to-left override or a newline from a sender must not reach a terminal
  or fake a line of output;
- :func:`terminal_json` does the same for JSON text printed over several lines,
  keeping it valid JSON;
- :func:`pixel_line` is the one-line summary of a pixel that ``serve`` prints
  and the mitmproxy addon's log line starts with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "cut",
    "event_name",
    "identity",
    "pixel_line",
    "rule_ids",
    "short_value",
    "terminal_json",
    "terminal_text",
]

# What names an event, by call: track's event, page/screen's name, then what
# group and alias calls are about.
_NAME_FIELDS = ("event", "name", "groupId", "previousId")
_IDENTITY_FIELDS = (("userId", ""), ("anonymousId", "anon:"))


def event_name(record: Mapping[str, Any]) -> str:
    """The track event's name, the page/screen name, or the group/alias subject; ``""``."""
    event = record.get("event") or {}
    for key in _NAME_FIELDS:
        value = event.get(key)
        if value not in (None, ""):
            return value if isinstance(value, str) else json.dumps(value)
    return ""


def identity(record: Mapping[str, Any]) -> str:
    """``userId`` if set, else ``anonymousId`` (marked ``anon:``); ``""`` for neither."""
    event = record.get("event") or {}
    for key, label in _IDENTITY_FIELDS:
        value = event.get(key)
        if value not in (None, ""):
            return label + (value if isinstance(value, str) else json.dumps(value))
    return ""


def pixel_line(record: Mapping[str, Any]) -> str:
    """One escaped line for a pixel: dialect, call, name, identity, write key, verdict.

    ``pixel segment track "Email Opened" userId=u-42 writeKey=KEY accepted``, or
    ``... REJECTED [missing_event]`` with the rules broken, and ``notes [...]``.
    Every value is cut and escaped, so a sender cannot make it span lines.
    """
    dialect, call = (terminal_text(str(record.get(key))) for key in ("dialect", "call"))
    parts = [f"pixel {dialect} {call}"]
    if name := event_name(record):
        parts.append(short_value(name, quote=True))
    event = record.get("event") or {}
    for key in ("userId", "anonymousId"):
        if event.get(key) not in (None, ""):
            parts.append(f"{key}={short_value(event[key])}")
            break
    if record.get("writeKey"):
        parts.append(f"writeKey={short_value(record['writeKey'], 24)}")
    if record.get("accepted"):
        parts.append("accepted")
    else:
        parts.append(f"REJECTED [{rule_ids(record.get('problems'))}]")
    if record.get("notes"):
        parts.append(f"notes [{rule_ids(record.get('notes'))}]")
    return " ".join(parts)


def short_value(value: object, limit: int = 60, *, quote: bool = False) -> str:
    """``value`` cut to ``limit`` characters, escaped, quoted when it has spaces."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = terminal_text(cut(text, limit))
    if quote or not text or any(c in text for c in ' "=,[]()'):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def rule_ids(items: object, sep: str = ",") -> str:
    """The escaped rule ids of a record's ``problems`` or ``notes``, joined by ``sep``."""
    rules = [
        terminal_text(str(item.get("rule", "")))
        for item in (items if isinstance(items, list) else ())
        if isinstance(item, dict)
    ]
    return sep.join(rules)


def cut(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters long, ending in ``…`` when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def terminal_text(text: str) -> str:
    """``text`` safe to print on one line: every non-printable character escaped.

    Control characters (newlines included), terminal escapes, bidirectional
    overrides and line separators become ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``; a backslash is doubled, so that an escape in the output can
    never be mistaken for text the sender wrote.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if ch == "\\" else ch if ch.isprintable() else _python_escape(ch) for ch in text
    )


def terminal_json(text: str) -> str:
    """JSON text (as ``json.dumps(..., indent=2)`` writes it) safe to print over lines.

    Newlines stay, as the layout; any other non-printable character becomes
    JSON's own ``\\uNNNN`` escape (a surrogate pair above U+FFFF), so the
    result is still valid JSON and decodes to the same value.
    """
    if text.replace("\n", "").isprintable():
        return text
    return "".join(ch if ch == "\n" or ch.isprintable() else _json_escape(ch) for ch in text)


def _python_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
