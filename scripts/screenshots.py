"""Screenshots of the collector's live page for the docs (docs/images/*.png).

Run from the repository root: ``.venv/bin/python scripts/screenshots.py``.
It serves a collector with a memory store on a free port, sends a few pixels
and photographs the page with Debian's chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.live_collector import LiveCollector  # noqa: E402
from tests.test_collector_page import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

IMAGES = ROOT / "docs" / "images"
SAMPLE = [
    (
        {"writeKey": "wk", "userId": "u-1042", "event": "Signed Up", "properties": {"plan": "pro"}},
        "track",
    ),
    ({"writeKey": "wk", "anonymousId": "a-77", "name": "Pricing"}, "page"),
    ({"writeKey": "wk", "event": "Email Opened", "properties": {"campaign": "spring"}}, "track"),
    ({"writeKey": "wk", "userId": "u-1042", "traits": {"email": "ada@example.com"}}, "identify"),
    (
        {
            "writeKey": "wk",
            "userId": "u-2001",
            "event": "Order Completed",
            "properties": {"total": 42.5},
        },
        "track",
    ),
]


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    collector = LiveCollector()
    try:
        for event, call in SAMPLE:
            collector.pixel(
                event,
                call=call,
                **{"User-Agent": "Mozilla/5.0 (docs)", "Referer": "https://shop.example/"},
            )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.goto(collector.url + "/")
            page.locator("#records tbody tr").nth(len(SAMPLE) - 1).wait_for()
            page.screenshot(path=str(IMAGES / "collector-live.png"))
            page.locator("#records tbody tr", has_text="Email Opened").click()
            page.locator("#detail").wait_for()
            page.screenshot(path=str(IMAGES / "collector-record.png"))
            page.goto(collector.url + "/?accepted=false")
            page.locator("#records tbody tr").first.wait_for()
            page.wait_for_timeout(300)
            page.screenshot(path=str(IMAGES / "collector-filtered.png"))
            browser.close()
    finally:
        collector.close()
    for name in ("collector-live.png", "collector-record.png", "collector-filtered.png"):
        print(IMAGES / name)


if __name__ == "__main__":
    main()
