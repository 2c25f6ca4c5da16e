"""The live collector page in a real browser: Debian's chromium driven by Playwright.

A real collector (memory store) on a free port; pixels are sent from here
while the page is open, as a person debugging would see them arrive.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live_collector import LiveCollector, stalled_collector

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# We run as root in CI containers; no network beyond the collector.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Rows must appear within a second of the pixel; allow for a loaded machine.
LIVE_SECONDS = 5_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (./dev test does)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def live() -> Iterator[LiveCollector]:
    collector = LiveCollector()
    yield collector
    collector.close()


class Watched:
    """A page with every console error, page error and dialog it produced."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def page(browser: Any) -> Iterator[Watched]:
    context = browser.new_context()
    watched = Watched(context.new_page())
    yield watched
    context.close()


def rows(page: Any) -> Any:
    return page.locator("#records tbody tr")


def test_records_appear_live_and_pause_holds_them(live: LiveCollector, page: Watched) -> None:
    live.pixel({"writeKey": "wk", "userId": "u1", "event": "Before Open"})
    page.page.goto(live.url + "/")
    sync_api.expect(rows(page.page)).to_have_count(1)
    assert live.app.store.read()[-1][1]["event"]["event"] == "Before Open", "no pixel on open"
    assert len(live.app.store.read()) == 1

    started = time.monotonic()
    live.pixel({"writeKey": "wk", "userId": "u2", "event": "Arrived Live"})
    sync_api.expect(rows(page.page).first).to_contain_text("Arrived Live", timeout=LIVE_SECONDS)
    assert time.monotonic() - started < LIVE_SECONDS / 1000
    sync_api.expect(page.page.locator("#count-total")).to_have_text("2")

    page.page.click("#pause")
    sync_api.expect(page.page.locator("#live-state")).to_have_text("paused")
    live.pixel({"writeKey": "wk", "userId": "u3", "event": "While Paused"})
    page.page.wait_for_timeout(1500)
    sync_api.expect(rows(page.page)).to_have_count(2)
    page.page.click("#pause")
    sync_api.expect(rows(page.page).first).to_contain_text("While Paused", timeout=LIVE_SECONDS)
    assert page.errors == []


def test_filters_live_in_the_url_and_survive_a_reload(live: LiveCollector, page: Watched) -> None:
    live.pixel({"writeKey": "wk", "userId": "u1", "event": "Signed Up"}, call="track")
    live.pixel({"writeKey": "wk", "anonymousId": "a1", "name": "Home"}, call="page")
    live.pixel({"writeKey": "wk", "event": "No Identity"})
    page.page.goto(live.url + "/")
    sync_api.expect(rows(page.page)).to_have_count(3)

    page.page.select_option("select[name=accepted]", "false")
    sync_api.expect(rows(page.page)).to_have_count(1)
    sync_api.expect(rows(page.page).first).to_contain_text("missing_identity")
    sync_api.expect(page.page.locator("#count-rejected")).to_have_text("1")
    assert page.page.url.endswith("/?accepted=false")

    page.page.select_option("select[name=accepted]", "")
    page.page.fill("input[name=userId]", "u1")
    sync_api.expect(rows(page.page)).to_have_count(1)
    sync_api.expect(rows(page.page).first).to_contain_text("Signed Up")
    assert page.page.url.endswith("/?userId=u1")

    page.page.reload()
    sync_api.expect(page.page.locator("input[name=userId]")).to_have_value("u1")
    sync_api.expect(rows(page.page)).to_have_count(1)
    # A new record that does not match stays out; one that does comes in.
    live.pixel({"writeKey": "wk", "userId": "u2", "event": "Other"})
    live.pixel({"writeKey": "wk", "userId": "u1", "event": "Again"})
    sync_api.expect(rows(page.page).first).to_contain_text("Again", timeout=LIVE_SECONDS)
    sync_api.expect(rows(page.page)).to_have_count(2)

    # A shared link with an event-path filter.
    live.pixel({"writeKey": "wk", "userId": "u9", "event": "Paid", "properties": {"plan": "pro"}})
    page.page.goto(live.url + "/?properties.plan=pro")
    sync_api.expect(rows(page.page)).to_have_count(1)
    sync_api.expect(page.page.locator("#extra-filters")).to_contain_text("properties.plan = pro")
    assert page.errors == []


def test_a_record_opens_with_its_event_problems_and_request(
    live: LiveCollector, page: Watched
) -> None:
    live.pixel(
        {"writeKey": "wk", "event": "No Identity", "properties": {"plan": "pro"}},
        **{"User-Agent": "PixelTester/1.0", "Referer": "https://shop.example/cart"},
    )
    page.page.goto(live.url + "/")
    rows(page.page).first.click()
    detail = page.page.locator("#detail")
    sync_api.expect(detail).to_be_visible()
    sync_api.expect(page.page.locator("#detail-verdict")).to_have_text("rejected")
    sync_api.expect(page.page.locator("#detail-problems")).to_contain_text(
        "missing_identity: The event needs a userId or an anonymousId."
    )
    request = page.page.locator("#detail-request")
    sync_api.expect(request).to_contain_text("PixelTester/1.0")
    sync_api.expect(request).to_contain_text("/v1/pixel/track")
    [(_, stored)] = live.app.store.read()
    if "referer" in stored["request"]:  # the core records it (docs/dialects.md)
        sync_api.expect(request).to_contain_text("https://shop.example/cart")
    event_text = page.page.locator("#detail-event").text_content()
    assert '"plan": "pro"' in (event_text or "")
    curl = page.page.locator("#detail-curl").text_content() or ""
    assert curl.startswith("curl -i -A 'PixelTester/1.0' ")
    assert f"'{live.url}/v1/pixel/track?data=" in curl
    assert page.errors == []


def test_the_test_pixel_button_sends_one_that_shows_up(live: LiveCollector, page: Watched) -> None:
    page.page.goto(live.url + "/")
    sync_api.expect(page.page.locator("#empty")).to_be_visible()
    page.page.click("#test-pixel")
    sync_api.expect(rows(page.page).first).to_contain_text("Test Pixel Sent", timeout=LIVE_SECONDS)
    sync_api.expect(rows(page.page).first).to_contain_text("accepted")
    [(_, stored)] = live.app.store.read()
    assert stored["accepted"] is True
    assert page.errors == []


def test_what_a_sender_wrote_is_shown_as_text_and_runs_nothing(
    live: LiveCollector, page: Watched
) -> None:
    hostile = {
        "writeKey": "<b>wk</b>",
        "userId": "<img src=x onerror=window.__pwned=1>",
        "event": "<script>window.__pwned=2</script>",
        "properties": {"html": "<svg onload=alert(3)>", "quote": "'\"</pre>"},
    }
    live.pixel(hostile, **{"User-Agent": "<img src=x onerror=alert(4)>"})
    page.page.goto(live.url + "/")
    first = rows(page.page).first
    sync_api.expect(first).to_contain_text("<script>window.__pwned=2</script>")
    sync_api.expect(first).to_contain_text("<img src=x onerror=window.__pwned=1>")
    first.click()
    sync_api.expect(page.page.locator("#detail-event")).to_contain_text("<svg onload=alert(3)>")
    sync_api.expect(page.page.locator("#detail-request")).to_contain_text(
        "<img src=x onerror=alert(4)>"
    )
    page.page.wait_for_timeout(300)
    assert page.page.evaluate("window.__pwned") is None
    assert page.page.locator("#records script, #records img, #detail img, #detail svg").count() == 0
    assert page.dialogs == []
    assert page.errors == []


def test_the_spool_warning_and_the_store_come_from_the_api(
    live: LiveCollector, page: Watched
) -> None:
    live.app.app.app.spooled = lambda: 3  # type: ignore[attr-defined]
    live.app.app.app.api.spooled = lambda: 3  # type: ignore[attr-defined]
    page.page.goto(live.url + "/")
    warning = page.page.locator("#spool-warning")
    sync_api.expect(warning).to_be_visible()
    sync_api.expect(warning).to_contain_text("3 record(s) wait in the spool")
    sync_api.expect(page.page.locator("#store-line")).to_contain_text("Store: memory (memory://)")
    assert page.errors == []


def test_the_page_says_when_records_cannot_be_kept(tmp_path: Path, page: Watched) -> None:
    # A real collector whose store and spool both refuse writes: the page goes
    # on working and its warning says why pixels are not recorded.
    collector = stalled_collector(tmp_path)
    try:
        page.page.goto(collector.url + "/")
        warning = page.page.locator("#spool-warning")
        sync_api.expect(page.page.locator("#store-line")).to_contain_text("Store: memory")
        assert warning.is_hidden()
        assert collector.pixel({"writeKey": "wk", "userId": "u", "event": "Lost"}) == 503
        # The live poll's next answer brings the news, with no reload.
        sync_api.expect(warning).to_be_visible(timeout=LIVE_SECONDS * 3)
        sync_api.expect(warning).to_contain_text("Records cannot be kept now")
        sync_api.expect(warning).to_contain_text("answered 503")
        assert page.errors == []
    finally:
        collector.close()
