"""Machine opens: tell, from the request alone, that a machine fetched a pixel.

An email open pixel is often fetched by a machine: the mail provider's image
proxy (Gmail, Yahoo), Apple Mail Privacy Protection (which fetches every image
of every message on delivery), a security gateway that follows every link and
image (Barracuda, Proofpoint, Mimecast, Microsoft Defender), a headless browser
or a crawler. Such a pixel is still recorded and answered: it only carries the
note ``machine_open`` naming the kind, so that counts can leave it out.

Pure and cheap: substring tests on the User-Agent (already decoded and capped
by the core) and whether a Referer was sent. docs/dialects.md, "Machine opens",
gives the sources and says honestly what these heuristics cannot tell.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["MACHINE_KINDS", "machine_kind_of", "machine_open_kind"]

#: Every kind :func:`machine_open_kind` names, in the order they are tested.
MACHINE_KINDS: Final = (
    "gmail_image_proxy",
    "yahoo_mail_proxy",
    "security_scanner",
    "headless_browser",
    "bot",
    "apple_mail_privacy",
)

# (kind, lower-case User-Agent substrings). The first kind with a match wins:
# the proxies and scanners name themselves; Gmail's UA also says "Firefox/11.0".
_SIGNATURES: Final = (
    ("gmail_image_proxy", ("googleimageproxy", "ggpht.com")),
    ("yahoo_mail_proxy", ("yahoomailproxy",)),
    (
        "security_scanner",
        ("barracuda", "proofpoint", "mimecast", "bingpreview", "safelinks", "symantec"),
    ),
    ("headless_browser", ("headlesschrome", "phantomjs")),
)
# Crawlers name themselves "...bot", "...crawler" or "...spider" (Googlebot,
# bingbot, Slackbot, AhrefsBot); the link unfurlers of chat apps too.
# "bot" at a word's end is enough to search for: a leading "[a-z]*" matched the
# same strings but made the search quadratic in a long run of letters (2.5 ms
# for a 1 KB User-Agent, which any sender can send).
_BOT = re.compile(r"bot\b|crawler|spider|facebookexternalhit", re.ASCII)
# The signatures one by one, in their order: one flat loop per pixel.
_NEEDLES: Final = tuple((needle, kind) for kind, needles in _SIGNATURES for needle in needles)
# _BOT searched for in parts: its plain words as substrings (a fast C search),
# and "bot\b" only where "bot" occurs. The one regular expression tried every
# alternative at every position of the User-Agent, for the same matches.
_BOT_WORDS: Final = ("crawler", "spider", "facebookexternalhit")
_BOT_END = re.compile(r"bot\b", re.ASCII)
# Apple Mail Privacy Protection fetches with this bare User-Agent and no Referer
# (no version, no platform, unlike every browser and mail client).
_APPLE_MPP_USER_AGENT = "Mozilla/5.0"


# Pixels come from few distinct User-Agents (browsers, a handful of mail
# proxies): the kinds of those seen last, at most this many, forgotten all at
# once when full. Only short ones, so the memory stays small whatever is sent.
_SEEN_MAX: Final = 1_024
_SEEN_MAX_CHARS: Final = 256
_seen: dict[str, str | None] = {}
_UNSEEN: Final[Any] = object()
# What _user_agent_kind says of Apple Mail Privacy Protection's bare
# User-Agent: the Referer decides.
_APPLE: Final = "apple_mail_privacy_or_not"


def machine_open_kind(user_agent: str | None, referer: str | None) -> str | None:
    """The kind of machine that fetched the pixel, or ``None`` (a person, as far as we know)."""
    if not user_agent:
        return None
    kind = _seen.get(user_agent, _UNSEEN)
    if kind is _UNSEEN:
        kind = _user_agent_kind(user_agent)
        if len(user_agent) <= _SEEN_MAX_CHARS:
            if len(_seen) >= _SEEN_MAX:
                _seen.clear()
            _seen[user_agent] = kind
    if kind == _APPLE:
        return None if referer else "apple_mail_privacy"
    return kind  # type: ignore[no-any-return]


def _user_agent_kind(user_agent: str) -> str | None:
    if user_agent.strip() == _APPLE_MPP_USER_AGENT:
        return _APPLE
    lowered = user_agent.lower()
    for needle, kind in _NEEDLES:
        if needle in lowered:
            return kind
    # Whether _BOT.search(lowered) matches.
    if "bot" in lowered and _BOT_END.search(lowered):
        return "bot"
    for word in _BOT_WORDS:
        if word in lowered:
            return "bot"
    return None


def machine_kind_of(record: Mapping[str, Any]) -> str | None:
    """The kind a record's ``machine_open`` note names, or ``None``."""
    for note in record.get("notes") or ():
        if isinstance(note, Mapping) and note.get("rule") == "machine_open":
            message = str(note.get("message", ""))
            # The note's message ends with the kind, quoted: ...: "gmail_image_proxy"
            kind = message.rpartition(": ")[2].strip('"')
            return kind if kind in MACHINE_KINDS else "unknown"
    return None
