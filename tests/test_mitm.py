"""The mitmproxy addon, driven through mitmproxy's own test harness (taddons, tflow)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from silent_server import SilentServer

with warnings.catch_warnings():
    # mitmproxy 12.2 builds its filter grammar at import with pyparsing names that
    # pyparsing 3.3 deprecates: not ours, and not an error in this project.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy import contentviews, exceptions, http
    from mitmproxy import flow as mflow
    from mitmproxy.test import taddons, tflow

    from pixel_middleware import mitm
    from pixel_middleware.core import GIF
    from pixel_middleware.mitm import PixelCapture
    from pixel_middleware.stores import open_store

pytestmark = [
    pytest.mark.mitmproxy,
    # mitmproxy 12.2 parses flow filters with pyparsing names that pyparsing 3.3
    # deprecates (as at import, above).
    pytest.mark.filterwarnings("ignore::pyparsing.warnings.PyparsingDeprecationWarning"),
]


def segment_url(call: str, event: dict[str, Any], host: str = "api.segment.io") -> str:
    data = base64.b64encode(json.dumps(event).encode()).decode()
    return f"https://{host}/v1/pixel/{call}?data={data}"


TRACK = segment_url("track", {"writeKey": "wk_1", "event": "Email Opened", "userId": "u-1"})
RUDDER_PAGE = (
    "https://hosted.rudderlabs.com/pixel/v1/page?writeKey=wk_2&anonymousId=a-9&name=Pricing"
)
REJECTED = "https://hosted.rudderlabs.com/pixel/v1/track?anonymousId=a-9"  # no key, no event


def gif_response(status: int = 200) -> http.Response:
    return http.Response.make(status, GIF, {"Content-Type": "image/gif"})


@pytest.fixture
def addon() -> Iterator[PixelCapture]:
    addon = PixelCapture()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        addon.tctx = tctx  # type: ignore[attr-defined]
        yield addon
        addon.done()


def configure(addon: PixelCapture, **options: Any) -> None:
    addon.tctx.configure(addon, **options)  # type: ignore[attr-defined]


def exit_mitmproxy(addon: PixelCapture) -> None:
    """What mitmproxy does when it exits: the master should exit, then done()."""
    addon.tctx.master.should_exit.set()  # type: ignore[attr-defined]
    addon.done()


def stores_closed(timeout: float = 10) -> None:
    """Wait until every store the addon closes in the background is closed."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == "pixel-store-close":
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), "a store did not close"


def within(seconds: float, call: Any, *args: Any) -> float:
    """Run ``call`` in a thread; fail if it has not returned after ``seconds``."""
    thread = threading.Thread(target=call, args=args, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} still blocked after {seconds}s"
    return time.monotonic() - start


@pytest.fixture
def hung_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    """A Redis store that takes the connection and never answers (spool in tmp_path)."""
    monkeypatch.chdir(tmp_path)
    server = SilentServer()
    yield server
    server.close()  # the hung writes fail now, and their recorders can finish


def through(
    addon: PixelCapture,
    url: str,
    *,
    method: str = "GET",
    response: http.Response | None = None,
    error: str | None = None,
    headers: dict[str, str] | None = None,
    live: bool = True,
) -> http.HTTPFlow:
    """One flow through the addon's hooks, as mitmproxy calls them: request, then
    the collector's response (or ``error``) unless the addon answered locally."""
    flow = tflow.tflow(req=http.Request.make(method, url, headers=headers or {}), live=live)
    if not live and response is not None:
        flow.response = response  # a saved flow carries its answer
    addon.request(flow)
    if flow.response is None:
        if error is not None:
            flow.error = mflow.Error(error)
        else:
            flow.response = response if response is not None else gif_response()
    asyncio.run(addon.response(flow) if flow.error is None else addon.error(flow))
    return flow


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param(
            {"pixel_filter": "~d ("}, r"pixel_filter: .* is not a flow filter", id="filter"
        ),
        pytest.param(
            {"pixel_store": "ftp://x"},
            r"pixel_store: cannot open 'ftp://x' .*; give a store URL \(fanout://,"
            r" forward\+http://, forward\+https://, jsonl://, memory://, postgres://,"
            r" postgresql://, redis://, rediss://, sqlite://\), e\.g\. sqlite:///pixels\.sqlite3,"
            r" or nothing",
            id="store",
        ),
        pytest.param(
            {"pixel_store": "nonsense"},
            r"pixel_store: .*neither a store URL",
            id="store-no-scheme",
        ),
        pytest.param(
            {"pixel_dialects": ["segment", "amp"]},
            r"pixel_dialects: 'amp' is not accepted; give one or more of: segment, rudderstack",
            id="dialect",
        ),
        pytest.param({"pixel_dialects": []}, r"pixel_dialects: empty", id="no-dialect"),
        pytest.param(
            {"pixel_trusted_proxies": -1}, r"pixel_trusted_proxies: -1 .* 0 or more", id="proxies"
        ),
        pytest.param(
            {"pixel_prefix": "collect/"}, r"prefix must be '' or start with '/'", id="prefix"
        ),
        pytest.param({"pixel_write_keys": [""]}, r"write_keys must hold non-empty", id="empty-key"),
    ],
)
def test_bad_options_are_refused_with_what_is_accepted(
    addon: PixelCapture, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(exceptions.OptionsError, match=match):
        configure(addon, **options)
    # Rolled back: the addon still works as before.
    assert through(addon, TRACK).metadata["pixel"]["call"] == "track"


def test_rudderstack_response_choices_are_enforced(addon: PixelCapture) -> None:
    with pytest.raises(exceptions.OptionsError, match="seed"):
        configure(addon, pixel_rudderstack_response="png")


def test_rudderstack_response_help_says_which_answer_rudder_server_sends(
    addon: PixelCapture,
) -> None:
    # rudder-server answers the GIF (docs/dialects.md); "seed" is the document's.
    help_text = " ".join(addon.tctx.options._options["pixel_rudderstack_response"].help.split())  # type: ignore[attr-defined]
    seed, gif = help_text.split('"gif"', 1)
    assert "rudder-server" not in seed
    assert "rudder-server itself has sent" in gif


def test_loading_the_addon_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    addon = PixelCapture()
    with taddons.context(addon) as tctx:
        tctx.configure(addon)
        through(addon, TRACK)
        addon.done()
    assert list(tmp_path.iterdir()) == []


# -- recognition ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "dialect", "call"),
    [
        pytest.param(TRACK, "segment", "track", id="segment-track"),
        pytest.param(
            segment_url("page", {"writeKey": "k", "name": "Home", "anonymousId": "a"}, "x.test"),
            "segment",
            "page",
            id="segment-page-any-host",
        ),
        pytest.param(
            segment_url("identify", {"writeKey": "k", "userId": "u"}, "127.0.0.1:8000"),
            "segment",
            "identify",
            id="segment-identify",
        ),
        pytest.param(RUDDER_PAGE, "rudderstack", "page", id="rudderstack-page"),
        pytest.param(
            "http://collector.internal/pixel/v1/track?writeKey=k&anonymousId=a&event=Open",
            "rudderstack",
            "track",
            id="rudderstack-track-http",
        ),
    ],
)
def test_pixels_of_both_dialects_are_recognised_by_path(
    addon: PixelCapture, url: str, dialect: str, call: str
) -> None:
    flow = through(addon, url)
    record = flow.metadata["pixel"]
    assert (record["dialect"], record["call"], record["accepted"]) == (dialect, call, True)
    assert record["upstream"]["status"] == 200
    assert list(addon.records) == [record]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.com/", id="root"),
        pytest.param("https://api.segment.io/v1/batch", id="segment-batch"),
        pytest.param("https://api.segment.io/v1/pixel/purchase?data=e30", id="unknown-call"),
        pytest.param("https://api.segment.io/v1/pixel/track/?data=e30", id="trailing-slash"),
        pytest.param(
            "https://hosted.rudderlabs.com/pixel/v1/identify?writeKey=k", id="rs-identify"
        ),
        pytest.param("https://example.com/collect/v1/pixel/track?data=e30", id="other-prefix"),
    ],
)
def test_other_flows_are_untouched(addon: PixelCapture, url: str) -> None:
    flow = through(addon, url, response=http.Response.make(404))
    assert flow.metadata == {}
    assert (flow.comment, flow.marked) == ("", "")
    assert flow.response is not None
    assert flow.response.status_code == 404
    assert not addon.records


def test_prefix_option(addon: PixelCapture) -> None:
    configure(addon, pixel_prefix="/collect")
    assert through(addon, "https://example.com/collect/pixel/v1/page?writeKey=k&anonymousId=a")
    assert [r["call"] for r in addon.records] == ["page"]
    assert through(addon, TRACK).metadata == {}


def test_dialects_option(addon: PixelCapture) -> None:
    configure(addon, pixel_dialects=["rudderstack"])
    assert through(addon, TRACK).metadata == {}
    assert through(addon, RUDDER_PAGE).metadata["pixel"]["dialect"] == "rudderstack"


def test_filter_narrows_the_flows_looked_at(addon: PixelCapture) -> None:
    configure(addon, pixel_filter="~d api.segment.io")
    assert through(addon, RUDDER_PAGE).metadata == {}
    assert through(addon, TRACK).metadata["pixel"]["call"] == "track"
    configure(addon, pixel_filter=None)
    assert through(addon, RUDDER_PAGE).metadata["pixel"]["call"] == "page"


def test_write_keys_option(addon: PixelCapture) -> None:
    configure(addon, pixel_write_keys=["wk_2"])
    assert not through(addon, TRACK).metadata["pixel"]["accepted"]
    assert through(addon, RUDDER_PAGE).metadata["pixel"]["accepted"]


def test_head_is_not_recorded(addon: PixelCapture) -> None:
    flow = through(addon, TRACK, method="HEAD")
    assert flow.metadata == {}
    assert not addon.records


def test_client_address_and_headers_reach_the_core(addon: PixelCapture) -> None:
    configure(addon, pixel_trusted_proxies=1)
    flow = through(
        addon, TRACK, headers={"User-Agent": "Mail/1.0", "X-Forwarded-For": "203.0.113.9"}
    )
    request = flow.metadata["pixel"]["request"]
    assert (request["ip"], request["userAgent"]) == ("203.0.113.9", "Mail/1.0")


def test_saved_flow_keeps_its_answer_and_time(addon: PixelCapture) -> None:
    """A flow read from a file (mitmdump -nr): not live, and the answer is the collector's."""
    configure(addon, pixel_answer=True)
    flow = tflow.tflow(req=http.Request.make("GET", TRACK), resp=gif_response(202), live=False)
    flow.request.timestamp_start = 1_700_000_000.25
    addon.request(flow)
    asyncio.run(addon.response(flow))
    record = flow.metadata["pixel"]
    assert record["upstream"]["status"] == 202
    assert record["receivedAt"] == "2023-11-14T22:13:20.250Z"


# -- what the person sees -------------------------------------------------------------


def test_accepted_pixel_gets_a_comment_and_no_mark(addon: PixelCapture) -> None:
    flow = through(addon, TRACK)
    assert flow.comment == 'segment track "Email Opened": accepted; upstream 200'
    assert flow.marked == ""
    record = flow.metadata["pixel"]
    assert record["upstream"]["contentType"] == "image/gif"
    assert record["upstream"]["ms"] >= 0
    json.dumps(record)  # plain data


def test_rejected_pixel_is_marked(addon: PixelCapture) -> None:
    flow = through(addon, REJECTED)
    assert flow.marked == mitm.MARK_REJECTED == ":no_entry:"
    assert flow.comment == (
        "rudderstack track: rejected: missing_write_key, missing_event; upstream 200"
    )
    assert {p["rule"] for p in flow.metadata["pixel"]["problems"]} == {
        "missing_write_key",
        "missing_event",
    }


def test_collector_refusal_is_marked(addon: PixelCapture) -> None:
    flow = through(addon, TRACK, response=http.Response.make(503))
    assert flow.marked == ":warning:"
    assert flow.metadata["pixel"]["upstream"]["status"] == 503


def test_marks_are_emoji_mitmproxy_accepts() -> None:
    from mitmproxy.utils import emoji

    assert mitm.MARK_REJECTED in emoji.emoji
    assert mitm.MARK_UPSTREAM_FAILED in emoji.emoji


def test_a_users_own_mark_is_kept(addon: PixelCapture) -> None:
    flow = tflow.tflow(req=http.Request.make("GET", REJECTED))
    flow.marked = ":star:"
    addon.request(flow)
    flow.response = gif_response()
    asyncio.run(addon.response(flow))
    assert flow.marked == ":star:"


@pytest.mark.parametrize(
    ("url", "first_answer", "fixed_url"),
    [
        pytest.param(
            REJECTED, gif_response(400), REJECTED + "&writeKey=k&event=Signed%20Up", id="fixed"
        ),
        pytest.param(TRACK, http.Response.make(503), TRACK, id="taken-the-second-time"),
    ],
)
def test_a_replayed_pixel_that_now_passes_loses_the_addons_mark(
    addon: PixelCapture, url: str, first_answer: http.Response, fixed_url: str
) -> None:
    flow = through(addon, url, response=first_answer)
    assert flow.marked in (mitm.MARK_REJECTED, mitm.MARK_UPSTREAM_FAILED)
    # Edited in the flow editor and replayed: mitmproxy clears the answer and
    # runs the hooks again on the same flow.
    flow.request.url = fixed_url
    flow.response = None
    addon.request(flow)
    flow.response = gif_response()
    asyncio.run(addon.response(flow))
    assert flow.marked == ""
    assert flow.comment.endswith(": accepted; upstream 200")


def test_failed_connection_is_recorded_with_the_error(addon: PixelCapture) -> None:
    flow = through(addon, TRACK, error="Connection refused")
    record = flow.metadata["pixel"]
    assert record["upstream"] == {"error": "Connection refused"}
    assert flow.marked == ":warning:"
    assert flow.comment.endswith("upstream failed")
    assert list(addon.records) == [record]


def test_pixels_in_flight_at_exit_are_recorded(addon: PixelCapture, tmp_path: Path) -> None:
    url = f"jsonl:///{tmp_path}/pixels.jsonl"
    configure(addon, pixel_store=url)
    flow = tflow.tflow(req=http.Request.make("GET", TRACK))
    addon.request(flow)  # the collector has not answered yet
    exit_mitmproxy(addon)
    (record,) = addon.records
    assert record["upstream"] == {"error": "mitmproxy stopped before the answer"}
    assert flow.marked == ":warning:"
    store = open_store(url)
    try:
        assert [r for _, r in store.read()] == [record]
    finally:
        store.close()


def test_pixel_answer_answers_locally(addon: PixelCapture) -> None:
    configure(addon, pixel_answer=True)
    flow = tflow.tflow(req=http.Request.make("GET", TRACK))
    addon.request(flow)
    assert flow.response is not None  # so mitmproxy opens no upstream connection
    assert (flow.response.status_code, flow.response.content) == (200, GIF)
    assert flow.response.headers["Content-Type"] == "image/gif"
    assert not addon.records  # recorded once the outcome is known: in response
    asyncio.run(addon.response(flow))
    assert flow.metadata["pixel"]["upstream"] == {"answeredLocally": True}
    asyncio.run(addon.response(flow))  # the hook firing again records nothing more
    assert len(addon.records) == 1


def test_pixel_answer_connects_lazily_while_it_is_on() -> None:
    """mitmproxy's eager strategy connects (and answers 502) before the request
    hook can answer the pixel; pixel_answer makes it lazy, and puts it back."""
    from mitmproxy.addons.proxyserver import Proxyserver

    addon = PixelCapture()
    with taddons.context(addon, Proxyserver()) as tctx:
        tctx.configure(addon)
        assert tctx.options.connection_strategy == "eager"
        tctx.configure(addon, pixel_answer=True)
        assert tctx.options.connection_strategy == "lazy"
        tctx.configure(addon, pixel_answer=False)
        assert tctx.options.connection_strategy == "eager"


@pytest.mark.parametrize(
    ("option", "status", "body"),
    [
        pytest.param("seed", 400, None, id="seed"),
        pytest.param("gif", 200, GIF, id="gif"),
    ],
)
def test_pixel_answer_speaks_the_dialect(
    addon: PixelCapture, option: str, status: int, body: bytes | None
) -> None:
    configure(addon, pixel_answer=True, pixel_rudderstack_response=option)
    flow = through(addon, REJECTED)
    assert flow.response is not None
    assert flow.response.status_code == status
    if body is not None:
        assert flow.response.content == body


def test_pixel_answer_answers_head_and_post_without_recording(addon: PixelCapture) -> None:
    configure(addon, pixel_answer=True)
    head = through(addon, TRACK, method="HEAD")
    post = through(addon, TRACK, method="POST")
    assert head.response is not None
    assert post.response is not None
    assert (head.response.status_code, post.response.status_code) == (200, 405)
    assert not addon.records


def test_pixel_answer_builds_each_response_once_and_gives_each_flow_its_own(
    addon: PixelCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy type-checks every response it makes (most of a pixel's cost): the
    addon makes each distinct answer once and gives every flow a copy of its own."""
    made: list[int] = []
    make = http.Response.make

    def counting_make(*args: Any, **kwargs: Any) -> http.Response:
        made.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(http.Response, "make", counting_make)
    mitm._answer_template.cache_clear()
    configure(addon, pixel_answer=True)
    before = time.time()
    flows = [through(addon, TRACK) for _ in range(3)]
    after = time.time()
    assert len(made) == 1
    # Each the response Response.make gives, but made at its own time.
    for flow in flows:
        assert flow.response is not None
        assert flow.response.status_code == 200
        assert flow.response.reason == "OK"
        assert flow.response.http_version == "HTTP/1.1"
        assert flow.response.raw_content == GIF
        assert flow.response.headers["Content-Length"] == str(len(GIF))
        assert flow.response.headers["Content-Type"] == "image/gif"
        assert flow.response.trailers is None
        assert flow.response.timestamp_end is not None
        assert before <= flow.response.timestamp_start <= flow.response.timestamp_end <= after
    # Each flow's response is its own: an addon after us may change it.
    first, second, third = (flow.response for flow in flows)
    assert first is not None
    assert second is not None
    assert third is not None
    first.headers["X-Changed"] = "1"
    first.content = b"changed"
    assert "X-Changed" not in second.headers
    assert (second.raw_content, third.raw_content) == (GIF, GIF)
    assert through(addon, TRACK).response.raw_content == GIF  # type: ignore[union-attr]
    # Another answer is another response.
    rejected = through(addon, REJECTED)
    assert rejected.response is not None
    assert rejected.response.status_code == 400
    assert len(made) == 2


def test_pixel_answered_locally_gets_its_comment_once(
    addon: PixelCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its record is final when it is answered: the comment is not made again at response."""
    comments: list[str] = []
    comment_line = mitm.comment_line

    def counting_comment_line(record: Any) -> str:
        comments.append(comment := comment_line(record))
        return comment

    monkeypatch.setattr(mitm, "comment_line", counting_comment_line)
    configure(addon, pixel_answer=True)
    flow = through(addon, TRACK)
    assert comments == ['segment track "Email Opened": accepted; upstream answered locally']
    assert flow.comment == comments[0]
    # A pixel the collector answers is annotated again with its answer.
    configure(addon, pixel_answer=False)
    comments.clear()
    flow = through(addon, TRACK)
    assert comments == [
        'segment track "Email Opened": accepted',
        'segment track "Email Opened": accepted; upstream 200',
    ]
    assert flow.comment == comments[-1]


def test_log_line(addon: PixelCapture, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pixel_middleware.mitm")
    through(addon, TRACK)
    through(addon, REJECTED, error="Connection refused")
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            logging.INFO,
            'pixel segment track "Email Opened" userId=u-1 writeKey=wk_1 accepted'
            " upstream 200 in {} ms host=api.segment.io".format(addon.records[0]["upstream"]["ms"]),
        ),
        (
            logging.WARNING,
            "pixel rudderstack track anonymousId=a-9 REJECTED [missing_write_key,missing_event]"
            " upstream failed (Connection refused) host=hosted.rudderlabs.com",
        ),
    ]


def test_with_a_terminal_log_the_addon_writes_its_lines_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As in mitmdump (which has a terminal log and no event log): the lines are
    written to the terminal log's stream, not made log records."""
    from mitmproxy.addons import termlog

    out = io.StringIO()
    addon = PixelCapture()
    with taddons.context(addon) as tctx:
        term = termlog.TermLog(out=out)
        tctx.master.addons.add(term)
        tctx.configure(addon)
        try:
            caplog.set_level(logging.INFO, logger="pixel_middleware.mitm")
            through(addon, TRACK)
            through(addon, REJECTED, error="Connection refused")
            accepted, rejected = out.getvalue().splitlines()
            assert re.fullmatch(
                r"\[\d\d:\d\d:\d\d\.\d{3}\]\[127\.0\.0\.1:22\] pixel segment track"
                r' "Email Opened" userId=u-1 writeKey=wk_1 accepted upstream 200 in [\d.]+ ms'
                r" host=api\.segment\.io",
                accepted,
            )
            assert rejected.endswith(
                "REJECTED [missing_write_key,missing_event] upstream failed"
                " (Connection refused) host=hosted.rudderlabs.com"
            )
            assert caplog.records == []  # no log record: no add_log dispatch either
            # mitmproxy's verbosity for its terminal log: warn keeps the rejected pixel.
            tctx.configure(term, termlog_verbosity="warn")
            through(addon, TRACK)
            through(addon, REJECTED, error="Connection refused")
            assert len(out.getvalue().splitlines()) == 3
            assert "REJECTED" in out.getvalue().splitlines()[2]
            # And the level of the addon's logger, as for any log line.
            tctx.configure(term, termlog_verbosity="info")
            caplog.set_level(logging.ERROR, logger="pixel_middleware.mitm")
            through(addon, REJECTED, error="Connection refused")
            assert len(out.getvalue().splitlines()) == 3
        finally:
            term.uninstall()
            addon.done()


def test_log_option_silences_the_line(
    addon: PixelCapture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pixel_middleware.mitm")
    configure(addon, pixel_log=False)
    through(addon, TRACK)
    through(addon, REJECTED, error="Connection refused")
    assert caplog.records == []
    assert len(addon.records) == 2  # kept all the same
    configure(addon, pixel_log=True)
    through(addon, TRACK)
    assert [r.getMessage()[:19] for r in caplog.records] == ["pixel segment track"]


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param("\x1b[2J\x1b]0;pwned\x07", r"\x1b[2J\x1b]0;pwned\x07", id="ansi-and-osc"),
        pytest.param("a\r\nb", r"a\x0d\x0ab", id="newline"),
        pytest.param("\x9b31m", r"\x9b31m", id="c1-csi"),
        pytest.param("abc\u202edef", r"abc\u202edef", id="bidi-override"),
        pytest.param("x\\x1b", r"x\\x1b", id="literal-backslash"),
        pytest.param("Café ☕", "Café ☕", id="printable-unicode"),
    ],
)
def test_log_line_escapes_what_a_terminal_would_interpret(
    addon: PixelCapture, caplog: pytest.LogCaptureFixture, sent: str, shown: str
) -> None:
    caplog.set_level(logging.INFO, logger="pixel_middleware.mitm")
    url = segment_url("track", {"writeKey": "k", "event": sent, "userId": sent})
    flow = through(addon, url)
    (message,) = [r.getMessage() for r in caplog.records]
    assert f'"{shown}"' in message or f" {shown} " in message
    assert message.isprintable()
    assert flow.comment.isprintable()
    assert flow.metadata["pixel"]["event"]["event"] == sent  # the record keeps the data


# -- content view --------------------------------------------------------------------


def test_content_view_is_chosen_for_pixel_requests(addon: PixelCapture) -> None:
    flow = through(addon, REJECTED)
    result = contentviews.prettify_message(flow.request, flow)
    assert result.view_name == "pixel"
    assert result.text.startswith("rudderstack track: REJECTED\n")
    assert "  - missing_write_key: " in result.text
    assert "upstream: 200 in" in result.text
    event = json.loads(result.text.split("\nevent:\n", 1)[1])
    assert event == flow.metadata["pixel"]["event"]


def test_content_view_priority(addon: PixelCapture) -> None:
    view = contentviews.registry["pixel"]
    pixel = through(addon, TRACK)
    other = through(addon, "https://example.com/?a=1")
    for flow, message, expected in [
        (pixel, pixel.request, True),
        (pixel, pixel.response, False),
        (other, other.request, False),
    ]:
        assert message is not None
        metadata = contentviews.Metadata(flow=flow, http_message=message)
        priority = view.render_priority(message.content or b"", metadata)
        assert (priority > 0.3) is expected, (flow.request.url, message)


def test_content_view_decodes_flows_the_addon_did_not_record(addon: PixelCapture) -> None:
    configure(addon, pixel_filter="~d nowhere.test")
    flow = through(addon, "https://x.test/pixel/v1/page?writeKey=k&anonymousId=a&name=Docs")
    assert flow.metadata == {}
    result = contentviews.prettify_message(flow.request, flow, view_name="pixel")
    assert result.text.startswith("rudderstack page: accepted\n")
    assert '"name": "Docs"' in result.text


def test_content_view_decodes_a_request_edited_after_it_passed(addon: PixelCapture) -> None:
    flow = through(addon, REJECTED, response=gif_response(400))
    # What the UIs' flow editors do: change the request in place.
    flow.request.url = REJECTED + "&writeKey=wk_3&event=Signed%20Up"
    text = contentviews.prettify_message(flow.request, flow).text
    assert text.startswith(
        "rudderstack track: accepted\nwriteKey: wk_3\nupstream: not sent (edited since it passed)\n"
    )
    assert '"event": "Signed Up",' in text
    flow.request.headers["User-Agent"] = "Edited/1.0"  # the event's context shows it
    assert '"userAgent": "Edited/1.0"' in contentviews.prettify_message(flow.request, flow).text
    # Reverted, it is the record made when it passed, with the collector's answer.
    del flow.request.headers["User-Agent"]
    flow.request.url = REJECTED
    text = contentviews.prettify_message(flow.request, flow).text
    assert text.startswith("rudderstack track: REJECTED\nwriteKey: -\nupstream: 400 in ")
    assert flow.metadata["pixel"]["event"]["messageId"] in text


def test_content_view_escapes_control_characters(addon: PixelCapture) -> None:
    flow = through(addon, segment_url("track", {"writeKey": "k", "event": "a\x1bb\x9bc\u202ed"}))
    text = contentviews.prettify_message(flow.request, flow).text
    assert r'"event": "a\u001bb\u009bc\u202ed"' in text
    assert text.replace("\n", "").isprintable()


def test_content_view_refuses_other_requests(addon: PixelCapture) -> None:
    flow = through(addon, "https://example.com/?a=1")
    result = contentviews.prettify_message(flow.request, flow, view_name="pixel")
    assert result.syntax_highlight == "error"
    assert "not a pixel request" in result.text


# -- commands and records ---------------------------------------------------------------


def test_export_command_writes_json_lines(addon: PixelCapture, tmp_path: Path) -> None:
    through(addon, TRACK)
    through(addon, REJECTED)
    target = tmp_path / "pixels.jsonl"
    addon.tctx.master.commands.execute(f"pixel.export {target}")  # type: ignore[attr-defined]
    lines = target.read_text().splitlines()
    assert [json.loads(line) for line in lines] == list(addon.records)
    assert [json.loads(line)["call"] for line in lines] == ["track", "track"]


def test_export_says_where_it_wrote_in_the_status_bar(
    addon: PixelCapture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mitmproxy.log import ALERT

    caplog.set_level(logging.INFO, logger="pixel_middleware.mitm")
    monkeypatch.chdir(tmp_path)
    through(addon, TRACK)
    caplog.clear()
    addon.tctx.master.commands.execute("pixel.export out.jsonl")  # type: ignore[attr-defined]
    # ALERT: the console shows it in its status bar; a relative path is resolved.
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (ALERT, f"pixel: exported 1 record(s) to {tmp_path / 'out.jsonl'}")
    ]


def test_export_to_an_unwritable_place_is_a_command_error(
    addon: PixelCapture, tmp_path: Path
) -> None:
    with pytest.raises(exceptions.CommandError, match="cannot write"):
        addon.tctx.master.commands.execute(f"pixel.export {tmp_path}")  # type: ignore[attr-defined]


def test_summary_and_clear_commands(addon: PixelCapture) -> None:
    commands = addon.tctx.master.commands  # type: ignore[attr-defined]
    through(addon, TRACK)
    through(addon, REJECTED, error="Connection refused")
    assert commands.execute("pixel.summary") == (
        "2 pixel(s); 1 accepted; 1 rejected; problems: missing_write_key 1, missing_event 1;"
        " upstream: 200 1, failed 1"
    )
    commands.execute("pixel.clear")
    assert not addon.records
    assert commands.execute("pixel.summary") == "0 pixel(s); 0 accepted; 0 rejected"


def user_pixel(n: int) -> str:
    return segment_url("track", {"writeKey": "wk_1", "event": "Email Opened", "userId": f"u-{n}"})


def exported_users(addon: PixelCapture, path: Path) -> list[str]:
    addon.tctx.master.commands.execute(f"pixel.export {path}")  # type: ignore[attr-defined]
    return [json.loads(line)["event"]["userId"] for line in path.read_text().splitlines()]


def test_history_keeps_100_records_by_default(addon: PixelCapture, tmp_path: Path) -> None:
    assert addon.records.maxlen == mitm.HISTORY == 100
    for n in range(100):
        through(addon, user_pixel(n))
    assert exported_users(addon, tmp_path / "at.jsonl") == [f"u-{n}" for n in range(100)]
    through(addon, user_pixel(100))  # one over: the oldest goes
    assert exported_users(addon, tmp_path / "over.jsonl") == [f"u-{n}" for n in range(1, 101)]


def test_history_option_bounds_the_records_in_memory(addon: PixelCapture, tmp_path: Path) -> None:
    configure(addon, pixel_history=3)
    for n in range(3):
        through(addon, user_pixel(n))
    assert exported_users(addon, tmp_path / "at.jsonl") == ["u-0", "u-1", "u-2"]
    through(addon, user_pixel(3))
    assert exported_users(addon, tmp_path / "over.jsonl") == ["u-1", "u-2", "u-3"]
    # The summary says how many were seen and how many it counts.
    assert addon.summary() == (
        "4 pixel(s), the last 3 counted (pixel_history); 3 accepted; 0 rejected; upstream: 200 3"
    )
    configure(addon, pixel_history=2)  # shrinking keeps the newest
    assert exported_users(addon, tmp_path / "shrunk.jsonl") == ["u-2", "u-3"]
    configure(addon, pixel_history=0)
    through(addon, user_pixel(4))
    assert not addon.records
    assert (
        addon.summary() == "5 pixel(s), the last 0 counted (pixel_history); 0 accepted; 0 rejected"
    )
    addon.clear()
    assert addon.summary() == "0 pixel(s); 0 accepted; 0 rejected"


def test_history_option_refuses_a_negative_size(addon: PixelCapture) -> None:
    through(addon, TRACK)
    with pytest.raises(exceptions.OptionsError, match=r"pixel_history: -1 .* 0 or more"):
        configure(addon, pixel_history=-1)
    assert addon.records.maxlen == 100
    assert len(addon.records) == 1


def test_records_go_to_the_store(addon: PixelCapture, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/pixels.sqlite3"
    configure(addon, pixel_store=url)
    through(addon, TRACK)
    through(addon, REJECTED, error="Connection refused")
    exit_mitmproxy(addon)  # flushes and closes
    store = open_store(url)
    try:
        stored = [record for _, record in store.read()]
    finally:
        store.close()
    assert stored == list(addon.records)
    assert stored[1]["upstream"] == {"error": "Connection refused"}


def test_the_store_writer_lingers_a_fifth_of_a_second(addon: PixelCapture, tmp_path: Path) -> None:
    # Commits of about 80 records, not 8: the writer thread takes the GIL from
    # the event loop a tenth as often (docs/benchmarks.md).
    configure(addon, pixel_store=f"sqlite:///{tmp_path}/pixels.sqlite3")
    recorder = addon._recorder
    assert recorder is not None
    assert (recorder.linger, recorder.durable) == (0.2, False)
    exit_mitmproxy(addon)


def test_switching_store_flushes_the_old_one(addon: PixelCapture, tmp_path: Path) -> None:
    first, second = (f"jsonl:///{tmp_path}/{n}.jsonl" for n in ("a", "b"))
    configure(addon, pixel_store=first)
    through(addon, TRACK)
    configure(addon, pixel_store=second)
    through(addon, RUDDER_PAGE)
    configure(addon, pixel_store="")
    stores_closed()
    assert [json.loads(x)["call"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == [
        "track"
    ]
    assert [json.loads(x)["call"] for x in (tmp_path / "b.jsonl").read_text().splitlines()] == [
        "page"
    ]


def test_a_core_failure_leaves_the_flow_alone(
    addon: PixelCapture, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(mitm, "decode_pixel", broken)
    flow = through(addon, TRACK)
    assert flow.metadata == {}
    assert flow.response is not None
    assert flow.response.status_code == 200
    assert "decoding /v1/pixel/track failed" in caplog.text


# -- a store that hangs -------------------------------------------------------------------


def test_switching_away_from_a_hung_store_does_not_wait_for_it(
    addon: PixelCapture, hung_store: SilentServer, tmp_path: Path
) -> None:
    """configure() runs on mitmproxy's event loop: the old store is closed in a
    thread, so a store that never answers cannot freeze the proxy."""
    configure(addon, pixel_store=hung_store.redis_url())
    through(addon, TRACK)  # queued; the writer now waits for Redis
    wait_for(lambda: hung_store.connections > 0)
    next_url = f"jsonl:///{tmp_path}/next.jsonl"
    within(2, lambda: configure(addon, pixel_store=next_url))
    through(addon, RUDDER_PAGE)
    exit_mitmproxy(addon)
    assert [json.loads(x)["call"] for x in (tmp_path / "next.jsonl").read_text().splitlines()] == [
        "page"
    ]


def test_exit_waits_a_bounded_time_for_a_hung_store_and_says_what_was_lost(
    addon: PixelCapture,
    hung_store: SilentServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(mitm, "STORE_CLOSE_TIMEOUT", 0.5, raising=False)
    configure(addon, pixel_store=hung_store.redis_url())
    through(addon, TRACK)  # in the writer's hands, waiting for Redis
    wait_for(lambda: hung_store.connections > 0)
    through(addon, RUDDER_PAGE)  # queued behind it
    elapsed = within(5, exit_mitmproxy, addon)
    assert 0.5 <= elapsed < 3
    assert "2 records still not written after 0.5s of closing" in caplog.text


def test_done_without_exiting_does_not_wait_for_a_hung_store(
    addon: PixelCapture, hung_store: SilentServer
) -> None:
    """done() also runs when mitmproxy reloads the script, and the proxy goes on."""
    configure(addon, pixel_store=hung_store.redis_url())
    through(addon, TRACK)
    wait_for(lambda: hung_store.connections > 0)
    assert within(2, addon.done) < 1


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- filtering the flow list to pixels ----------------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mitmproxy.md"
# The filters docs/mitmproxy.md gives for "pixels only", as a user types them.
PIXELS_DECODED = '~meta "^pixel: "'
PIXEL_ROUTES = (
    '~m GET & ~u "^[a-z]+://[^/]+/'
    '(v1/pixel/(identify|group|alias|page|screen|track)|pixel/v1/(page|track))($|[?])"'
)


def test_the_documented_pixel_filters_are_the_tested_ones() -> None:
    docs = DOCS.read_text()
    assert f"`{PIXELS_DECODED}`" in docs
    assert f"`{PIXEL_ROUTES}`" in docs


@pytest.mark.parametrize("spec", [PIXELS_DECODED, PIXEL_ROUTES], ids=["decoded", "routes"])
def test_pixel_filters_match_pixels_and_nothing_else(addon: PixelCapture, spec: str) -> None:
    from mitmproxy import flowfilter

    match = flowfilter.parse(spec)
    pixels = {
        "accepted": through(addon, TRACK),
        "rejected": through(addon, REJECTED),
        "collector-refused": through(addon, RUDDER_PAGE, response=gif_response(500)),
        "connection-failed": through(addon, TRACK, error="Connection refused"),
        "plain-http-with-port": through(
            addon, "http://127.0.0.1:8000/pixel/v1/track?writeKey=k&anonymousId=a&event=E"
        ),
        "every-segment-call": through(
            addon, segment_url("identify", {"writeKey": "k", "userId": "u"})
        ),
    }
    others = {
        "other-site": through(addon, "https://example.com/?a=1"),
        "trailing-slash": through(addon, "https://api.segment.io/v1/pixel/track/?data=e30="),
        "unknown-call": through(addon, "https://api.segment.io/v1/pixel/batch?data=e30="),
        "route-in-the-query": through(addon, "https://x.test/r?to=/v1/pixel/track?data=e30="),
        "route-under-a-path": through(addon, "https://x.test/a/v1/pixel/track?data=e30="),
        "head": through(addon, TRACK, method="HEAD"),
        "post": through(addon, TRACK, method="POST"),
    }
    assert [name for name, flow in pixels.items() if not match(flow)] == []
    assert [name for name, flow in others.items() if match(flow)] == []


@pytest.mark.parametrize(
    "host",
    [
        "api.segment.io",
        "api.segment.io:8443",
        "[::1]:8080",
        "xn--bcher-kva.example",
        "a" * 262,  # at the cap: cached
        "a" * 263,  # one over: parsed, not kept
    ],
)
def test_the_lines_host_is_mitmproxys_pretty_host_and_long_ones_are_not_kept(host: str) -> None:
    request = http.Request.make("GET", "http://127.0.0.1/v1/pixel/track")
    request.headers["Host"] = host
    assert request.host_header == host
    mitm._authority_host.cache_clear()
    assert mitm._pretty_host(request) == request.pretty_host
    assert mitm._authority_host.cache_info().currsize == (1 if len(host) <= 262 else 0)
