"""What the mitmproxy addon shows of a record: its log line, flow comment and view.

Pure functions of a record (plain data in, text out), kept apart from the addon
(:mod:`pixel_middleware.mitm`) so that the text can be read and tested without
mitmproxy. Names and identities come from :mod:`pixel_middleware.display`, as
on the collector's pages and in the CLI.

.. warning::
   Every value shown comes from whoever sent the pixel: each is escaped with
   :func:`~pixel_middleware.display.terminal_text` (one line) or
   :func:`~pixel_middleware.display.terminal_json` (the event block), so that
   a terminal escape is shown, never obeyed, and no value can start a line of
   its own.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from typing import Any, Final

from pixel_middleware.display import (
    cut,
    event_name,
    pixel_line,
    rule_ids,
    short_value,
    terminal_json,
    terminal_text,
)

__all__ = [
    "COMMENT_WIDTH",
    "VIEW_WIDTH",
    "comment_line",
    "log_line",
    "upstream_ok",
    "upstream_text",
    "view_text",
]

COMMENT_WIDTH: Final = 80
"""The longest flow comment, so that it can be read in mitmweb's Comment column."""

VIEW_WIDTH: Final = 100
"""The width the ``pixel`` content view wraps its lines at."""

# How much of the event's name a flow comment keeps, so that the verdict after
# it (what ``~comment rejected`` finds) still fits in COMMENT_WIDTH.
_COMMENT_NAME_CHARS: Final = 24
# Continuation lines of the view are indented deeper than any line of its own
# layout (items are indented two spaces), so a wrapped value never passes for
# a heading or an item.
_CONTINUATION: Final = "    "
_MISSING: Final = "-"


def _or_missing(value: object) -> str:
    return _MISSING if value is None else terminal_text(str(value))


def upstream_ok(record: Mapping[str, Any]) -> bool:
    """Whether the collector took the pixel (or nothing says it did not)."""
    upstream = record.get("upstream") or {}
    if "error" in upstream:
        return False
    status = upstream.get("status")
    return status is None or 200 <= status < 400


def upstream_text(upstream: Mapping[str, Any] | None, *, brief: bool = False) -> str:
    """What the collector answered: ``200 in 3.1 ms``, ``failed (…)``; brief: ``200``."""
    if not upstream:
        return "pending"
    if upstream.get("answeredLocally"):
        return "answered locally"
    if "error" in upstream:
        return "failed" if brief else f"failed ({terminal_text(str(upstream['error'])[:80])})"
    if brief:
        return _or_missing(upstream.get("status"))
    return f"{_or_missing(upstream.get('status'))} in {_or_missing(upstream.get('ms'))} ms"


def log_line(record: Mapping[str, Any], host: str) -> str:
    """One line per pixel: ``serve``'s line (:func:`~pixel_middleware.display.pixel_line`),
    then what the collector upstream answered and the host it went to."""
    upstream = upstream_text(record.get("upstream"))
    return f"{pixel_line(record)} upstream {upstream} host={short_value(host)}"


def comment_line(record: Mapping[str, Any]) -> str:
    """The flow's comment: at most :data:`COMMENT_WIDTH` characters, cut with ``…``."""
    head = f"{terminal_text(record['dialect'])} {terminal_text(record['call'])}"
    if name := event_name(record):
        head += f" {short_value(name, _COMMENT_NAME_CHARS, quote=True)}"
    verdict = (
        "accepted"
        if record.get("accepted")
        else f"rejected: {rule_ids(record.get('problems'), ', ')}"
    )
    # The upstream answer is short and always kept; a long list of rules is cut.
    tail = ""
    if record.get("upstream"):
        tail = f"; upstream {upstream_text(record['upstream'], brief=True)}"
    return cut(f"{head}: {verdict}", COMMENT_WIDTH - len(tail)) + tail


def view_text(record: Mapping[str, Any], *, edited: bool = False) -> str:
    """The ``pixel`` content view: verdict, write key, upstream, problems, notes, event.

    Lines longer than :data:`VIEW_WIDTH` are wrapped, continuing indented by
    four spaces; a missing value is shown as ``-``. ``edited``: the request was
    changed in a flow editor since it passed, so nothing was sent for it.
    """
    verdict = "accepted" if record.get("accepted") else "REJECTED"
    lines = [
        f"{_or_missing(record.get('dialect'))} {_or_missing(record.get('call'))}: {verdict}",
        f"writeKey: {_or_missing(record.get('writeKey'))}",
    ]
    if edited:
        lines.append("upstream: not sent (edited since it passed)")
    elif upstream := record.get("upstream"):
        lines.append(f"upstream: {upstream_text(upstream)}")
    for title in ("problems", "notes"):
        items = record.get(title) or []
        lines.append(f"{title}:" + ("" if items else " none"))
        lines.extend(
            f"  - {_or_missing(p.get('rule'))}: {_or_missing(p.get('message'))}" for p in items
        )
    lines.append("event:")
    # json.dumps writes a newline inside a string as "\n", so only its own
    # layout breaks lines; terminal_json escapes the rest and keeps it JSON.
    event = json.dumps(record.get("event"), indent=2, ensure_ascii=False)
    lines.extend(terminal_json(event).split("\n"))
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def _wrap(line: str) -> list[str]:
    if len(line) <= VIEW_WIDTH:
        return [line]
    indent = line[: len(line) - len(line.lstrip(" "))]
    return textwrap.wrap(
        line,
        VIEW_WIDTH,
        subsequent_indent=indent + _CONTINUATION,
        break_long_words=True,
        break_on_hyphens=False,
        # Only escaped text gets here: no tab or newline is left to replace.
        replace_whitespace=False,
    )
