"""The pytest plugin, used as users do: pytester runs their test files in a new pytest.

The plugin is found through the installed package's ``pytest11`` entry point
(never named with ``-p``), and the email test renders a real Flask page in
Debian's Chromium, whose ``<img>`` pixel reaches the fixture's real collector.
"""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from pixel_middleware.pytest_plugin import PixelRecords, filter_params

pytest_plugins = ["pytester"]

# What the user's own test files run with: warnings are errors there too.
STRICT = ("-W", "error", "-p", "no:cacheprovider")


def test_the_plugin_is_found_through_its_entry_point_and_starts_nothing_unused(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_unused="""
        import socket, threading

        def test_nothing_is_started():
            names = [t.name for t in threading.enumerate()]
            assert "pixel-collector" not in names, names
        """
    )
    result = pytester.runpytest_subprocess(*STRICT, "--fixtures")
    result.stdout.fnmatch_lines(["*pixel_collector*", "*pixel_records*"])
    result = pytester.runpytest_subprocess(*STRICT)
    result.assert_outcomes(passed=1)


EMAIL_TESTS = '''
import threading

import pytest
from flask import Flask, render_template_string
from playwright.sync_api import sync_playwright
from werkzeug.serving import make_server

from pixel_middleware import PixelMiddleware

EMAIL = """<!doctype html><html><body><p>Welcome, {{ name }}!</p>
<img src="{{ pixel }}" width="1" height="1" alt=""></body></html>"""


def email_app(collector):
    app = Flask("email")

    @app.route("/email/<user>")
    def email(user):
        event = {"userId": user, "event": "Email Opened", "properties": {"campaign": "welcome"}}
        if user == "anonymous":
            del event["userId"]  # a template bug: no identity, so rejected
        return render_template_string(EMAIL, name=user, pixel=collector.pixel_url(event))

    return app


@pytest.fixture
def open_email(pixel_collector):
    server = make_server("127.0.0.1", 0, email_app(pixel_collector), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()

        def open_email(user):
            page.goto(f"http://127.0.0.1:{server.server_port}/email/{user}")
            page.wait_for_load_state("load")

        yield open_email
        browser.close()
    server.shutdown()
    server.server_close()


def test_opened(pixel_collector, open_email):
    open_email("u-42")
    [record] = pixel_collector.wait_for(event="Email Opened", userId="u-42")
    assert record["event"]["properties"] == {"campaign": "welcome"}
    assert record["request"]["userAgent"].find("Chrome") >= 0
    pixel_collector.assert_received(count=1, call="track", properties__campaign="welcome")
    pixel_collector.assert_received(properties={"campaign": "welcome"}, accepted=True)


def test_cleared_between_tests(pixel_collector):
    assert pixel_collector.events() == []


def test_wrong_campaign(pixel_collector, open_email):
    open_email("u-42")
    pixel_collector.wait_for(event="Email Opened", timeout=0.5, properties__campaign="winter")


def test_rejected_pixel(pixel_collector, open_email):
    open_email("anonymous")
    pixel_collector.wait_for(event="Email Opened", timeout=0.5)


def test_count_one_over(pixel_collector, open_email):
    open_email("u-1")
    open_email("u-2")
    pixel_collector.assert_received(count=2, event="Email Opened")
    pixel_collector.assert_received(count=3, event="Email Opened")


def test_own_app(pixel_records):
    app = Flask("shop")
    app.wsgi_app = PixelMiddleware(app.wsgi_app, store=pixel_records.store)
    client = app.test_client()
    assert client.get("/v1/pixel/page?writeKey=k&anonymousId=a-1&name=Pricing").status_code == 200
    pixel_records.assert_received(call="page", anonymousId="a-1", event="Pricing")
    pixel_records.assert_received(event="Checkout")
'''


@pytest.mark.browser
def test_an_email_opened_in_chromium_is_asserted_and_misses_are_explained(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_email=EMAIL_TESTS)
    result = pytester.runpytest_subprocess(*STRICT, "-rf", timeout=240)
    result.assert_outcomes(passed=2, failed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_wrong_campaign*",
            "E * expected at least 1 pixel(s) matching event='Email Opened',"
            " properties.campaign='winter', accepted='true' within 0.5 s; 0 matched, of 1 received",
            "E * nearest pixels (what differed):",
            'E * pixel segment track "Email Opened" userId=u-42 writeKey=test-write-key accepted*',
            'E * properties.campaign: expected "winter", got "welcome"',
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_rejected_pixel*",
            "E * 0 matched, of 1 received",
            'E * pixel segment track "Email Opened" writeKey=test-write-key'
            " REJECTED [[]missing_identity]*",
            "E * accepted: expected true, got false",
            "E * problem [[]missing_identity] The event needs a userId or an anonymousId.",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_count_one_over*",
            "E * expected exactly 3 pixel(s) matching event='Email Opened', accepted='true';"
            " 2 matched, of 2*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_own_app*",
            "E * expected at least 1 pixel(s) matching event='Checkout', accepted='true';"
            " 0 matched, of 1*",
            'E * event: expected "Checkout", got "Pricing"',
        ]
    )


@pytest.mark.parametrize(
    ("filters", "params"),
    [
        pytest.param({"properties__plan": "pro"}, {"properties.plan": ["pro"]}, id="dunder"),
        pytest.param(
            {"context": {"page": {"url": "https://x"}}},
            {"context.page.url": ["https://x"]},
            id="nested-dict",
        ),
        pytest.param({"accepted": False}, {"accepted": ["false"]}, id="bool"),
        pytest.param({"properties__n": 3}, {"properties.n": ["3"]}, id="number"),
        pytest.param({"properties__gone": None}, {"properties.gone": ["null"]}, id="null"),
        pytest.param({"userId": ("u1", "u2")}, {"userId": ["u1", "u2"]}, id="any-of"),
        pytest.param(
            {"since": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},
            {"since": ["2026-01-02T03:04:05+00:00"]},
            id="since",
        ),
    ],
)
def test_keyword_filters_become_the_apis_parameters(
    filters: dict[str, object], params: dict[str, list[str]]
) -> None:
    assert filter_params(filters) == params


def test_bad_filters_are_refused_before_anything_is_read() -> None:
    with pytest.raises(TypeError, match=r"the filter properties\.x takes text"):
        filter_params({"properties__x": object()})
    with pytest.raises(ValueError, match="call must be one of"):
        filter_params({"call": "trak"})
    with pytest.raises(ValueError, match="count must be a whole number >= 0"):
        PixelRecords().assert_received(count=-1)


def test_a_message_never_carries_a_senders_terminal_escapes() -> None:
    records = PixelRecords()
    from tests.test_cli import make_record, segment

    records.store.write(
        [make_record(segment("track", {"userId": "u\x1b[2J", "event": "E\u202eX"}))]
    )
    with pytest.raises(AssertionError) as failure:
        records.assert_received(event="EX")
    message = str(failure.value)
    assert "\x1b" not in message
    assert "\u202e" not in message
    assert textwrap.dedent('event: expected "EX", got "E\\u202eX"') in message
