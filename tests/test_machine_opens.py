"""Machine opens: each kind told from real User-Agents, the boundaries of the Apple
heuristic, the note on a real pixel (never a rejection), and the counts by kind in
``events --machine`` and the collector's ``/api/counts`` (a real ``serve``)."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from cases import UA, segment_data
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_cli import Collector, run

from pixel_middleware import machine_opens
from pixel_middleware.core import GIF, PixelConfig, PixelRequest, decode_pixel
from pixel_middleware.machine_opens import MACHINE_KINDS, machine_kind_of, machine_open_kind
from pixel_middleware.record_filter import count_records

GMAIL = "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
YAHOO = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
HEADLESS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/124.0.0.0 Safari/537.36"
)
BING_PREVIEW = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "BingPreview/1.0b"
)
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
NOW = datetime(2026, 11, 23, 16, 20, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("user_agent", "referer", "kind"),
    [
        (GMAIL, None, "gmail_image_proxy"),
        (YAHOO, None, "yahoo_mail_proxy"),
        (BING_PREVIEW, None, "security_scanner"),
        ("Mozilla/5.0 Barracuda Sentinel", None, "security_scanner"),
        ("Proofpoint URL Defense", None, "security_scanner"),
        ("Mimecast-Scanner/1.0", None, "security_scanner"),
        (HEADLESS, None, "headless_browser"),
        (GOOGLEBOT, None, "bot"),
        ("Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)", None, "bot"),
        ("facebookexternalhit/1.1", None, "bot"),
        # Apple Mail Privacy Protection: exactly the bare UA, and no Referer.
        ("Mozilla/5.0", None, "apple_mail_privacy"),
        ("Mozilla/5.0", "", "apple_mail_privacy"),
        ("Mozilla/5.0", "https://mail.example/", None),
        ("Mozilla/5.0 ", None, "apple_mail_privacy"),
        ("Mozilla/5.01", None, None),
        ("Mozilla/5.0 (Macintosh)", None, None),
        # People, as far as anyone can tell.
        (UA, None, None),
        ("Thunderbird/115.0", None, None),
        ("", None, None),
        (None, None, None),
        ("Robotics Weekly Reader", None, None),  # "bot" inside a word, not ending it
    ],
)
def test_the_kind_of_machine(user_agent: str | None, referer: str | None, kind: str | None) -> None:
    assert machine_open_kind(user_agent, referer) == kind


def test_every_kind_is_named_in_the_docs() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "dialects.md").read_text("utf-8")
    for kind in MACHINE_KINDS:
        assert f"| `{kind}` |" in docs, kind


def _open(user_agent: str) -> PixelRequest:
    data = segment_data({"writeKey": "wk", "userId": "u1", "event": "Email Opened"})
    return PixelRequest("GET", "/v1/pixel/track", f"data={data}".encode(), user_agent=user_agent)


def test_a_machine_open_is_noted_never_rejected() -> None:
    outcome = decode_pixel(_open(GMAIL), config=PixelConfig(), now=NOW)
    assert outcome is not None
    assert (outcome.status, outcome.body) == (200, GIF)
    record = outcome.records[0]
    assert record["accepted"] is True
    assert record["notes"] == [
        {
            "rule": "machine_open",
            "message": 'Fetched by a machine, not a person: "gmail_image_proxy"',
        }
    ]
    assert machine_kind_of(record) == "gmail_image_proxy"
    person = decode_pixel(_open(UA), config=PixelConfig(), now=NOW)
    assert person is not None
    assert person.records[0]["notes"] == []
    assert machine_kind_of(person.records[0]) is None


def test_counts_by_machine() -> None:
    records = [
        decode_pixel(_open(ua), config=PixelConfig(), now=NOW).records[0]  # type: ignore[union-attr]
        for ua in (GMAIL, GMAIL, GOOGLEBOT, UA)
    ]
    assert count_records(records).by_machine == {"gmail_image_proxy": 2, "bot": 1}
    assert count_records(records).as_json()["byMachine"] == {"gmail_image_proxy": 2, "bot": 1}


def test_serve_counts_machine_opens_and_events_prints_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real collector: /api/counts has byMachine; `events --machine` a summary line."""
    collector = Collector(tmp_path)
    try:
        data = segment_data({"writeKey": "wk", "userId": "u1", "event": "Email Opened"})
        for user_agent in (GMAIL, "Mozilla/5.0", UA):
            answer = requests.get(
                f"{collector.url}v1/pixel/track?data={data}",
                headers={"User-Agent": user_agent},
                timeout=10,
            )
            assert answer.status_code == 200
        # serve's workers each journal what they answer: another worker's
        # counts see it once stored, which /api/wait waits for.
        waited = requests.get(f"{collector.url}api/wait?count=3&timeout=10", timeout=15)
        assert waited.status_code == 200, waited.text
        counts = requests.get(f"{collector.url}api/counts", timeout=10).json()
    finally:
        status, err = collector.stop(signal.SIGTERM)
    assert status == 0, err
    assert counts["byMachine"] == {"gmail_image_proxy": 1, "apple_mail_privacy": 1}
    status, out, _ = run(capsys, "events", "--store", collector.store_url, "--machine")
    assert status == 0
    assert out.splitlines()[-1] == (
        "machine opens: 2 of 3 (gmail_image_proxy 1, apple_mail_privacy 1)"
    )
    status, out, err = run(
        capsys, "events", "--store", collector.store_url, "--machine", "--format", "jsonl"
    )
    assert status == 0
    assert len(out.splitlines()) == 3
    assert "machine opens: 2 of 3" in err


def _kind_as_first_written(user_agent: str | None, referer: str | None) -> str | None:
    """machine_open_kind as it was before it was made faster: nested loops, one pattern."""
    if not user_agent:
        return None
    if user_agent.strip() == "Mozilla/5.0":
        return None if referer else "apple_mail_privacy"
    lowered = user_agent.lower()
    for kind, needles in machine_opens._SIGNATURES:
        for needle in needles:
            if needle in lowered:
                return kind
    return "bot" if machine_opens._BOT.search(lowered) else None


# Pieces of every signature, word boundaries, case and Unicode that lower-cases
# to ASCII (the Kelvin sign to "k").
_UA_PIECES = st.sampled_from(
    [
        "bot", "Bot", "BOT", "robot", "bots", "bot_", "bot-", "boté", "crawl", "crawler",
        "spider", "facebook", "externalhit", "facebooKexternalhit", "\u212a", "ggpht.com",
        "googleimageproxy", "YahooMailProxy", "Mimecast", "SafeLinks", "phantomjs",
        "HeadlessChrome", "Mozilla/5.0", " ", "/", ".", "1", "é", "\u0130",
    ]
)  # fmt: skip


@settings(max_examples=500)
@given(
    st.none() | st.lists(_UA_PIECES | st.text(max_size=4), max_size=8).map("".join),
    st.none() | st.just("") | st.just("https://mail.example/"),
)
@example("Mozilla/5.0 (compatible; Googlebot/2.1)", None)
@example("facebooKexternalhit/1.1", None)
def test_the_kind_is_the_same_as_first_written(user_agent: str | None, referer: str | None) -> None:
    # Seen for the first time, then again (remembered), then with other Referers.
    for each in (referer, referer, None, "https://mail.example/"):
        assert machine_open_kind(user_agent, each) == _kind_as_first_written(user_agent, each)


def test_the_user_agents_remembered_stay_few_and_short() -> None:
    seen = machine_opens._seen
    limit, longest = machine_opens._SEEN_MAX, machine_opens._SEEN_MAX_CHARS
    for n in range(3 * limit):
        assert machine_open_kind(f"Agent/{n}", None) is None
        assert len(seen) <= limit
    machine_open_kind("b" * (longest - 3) + "bot", None)  # exactly as long as kept
    assert seen["b" * (longest - 3) + "bot"] == "bot"
    assert machine_open_kind("b" * (longest - 2) + "bot", None) == "bot"  # one over
    assert "b" * (longest - 2) + "bot" not in seen
