"""Third-party dialects' cases: each vendor's documented example, and its checks.

Run by ``tests/test_dialects_vendor.py`` through the core, and byte for byte
through the middleware (with the dialect enabled) and a real mitmdump, which
must give the same records. Plain data, like ``tests/cases.py``; the source of
each example is the vendor's document cited in docs/dialects.md.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cases import UA, Case, segment_data

__all__ = ["VENDOR_CASES", "equals", "vendor_case"]

GA = "www.google-analytics.com"
FB = "www.facebook.com"
SNOWPLOW_COLLECTOR = "collector.example.com"
POSTHOG = "us.i.posthog.com"


def equals(expected: dict[str, Any]) -> Callable[[dict[str, Any] | None], None]:
    """The event holds these (dotted path -> value) and they are what was mapped."""

    def check(event: dict[str, Any] | None) -> None:
        assert event is not None
        for path, value in expected.items():
            found: Any = event
            for part in path.split("."):
                if value is KeyError:
                    found = found.get(part, KeyError) if isinstance(found, dict) else KeyError
                else:
                    found = found[part]
            assert found == value, (path, found, value)

    return check


def vendor_case(
    id: str,
    dialect: str,
    target: bytes,
    host: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    status: int = 200,
    calls: tuple[str, ...] = (),
    rules: frozenset[str] = frozenset(),
    notes: frozenset[str] = frozenset(),
    check: Callable[[dict[str, Any] | None], None] | None = None,
) -> Case:
    return Case(
        id=id,
        method=method,
        target=target,
        headers={"Host": host, "User-Agent": UA, **(headers or {})},
        expect_status=status,
        expect_accepted=not rules,
        expect_rules=rules,
        expect_notes=notes,
        check=check,
        config={"dialects": frozenset({dialect})},
        body=body,
        expect_calls=calls,
    )


# Snowplow's tracker protocol document's self-describing examples: a link click
# and the web_page entity (docs.snowplow.io, "Snowplow Tracker Protocol").
_SNOWPLOW_LINK_CLICK = {
    "schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
    "data": {
        "schema": "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1",
        "data": {
            "targetUrl": "http://www.example.com",
            "elementClasses": ["foreground"],
            "elementId": "exampleLink",
        },
    },
}
_SNOWPLOW_CONTEXTS = {
    "schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-0",
    "data": [
        {
            "schema": "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0",
            "data": {"id": "a86c42e5-b831-45c8-b706-e214c26b4b3d"},
        }
    ],
}
_SNOWPLOW_TP2 = json.dumps(
    {
        "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
        "data": [
            {
                "e": "pv",
                "url": "http://www.example.com/",
                "page": "Example",
                "tv": "js-3.0.0",
                "p": "web",
                "aid": "demo-app",
                "duid": "5e2c1a1f-2d8e-4a3a-9b0e-1c7f3d0c9a11",
                "eid": "d5f48e8e-8b6d-4a4b-8d1c-0c2b0a8f7e31",
                "dtm": "1711034567890",
                "stm": "1711034567990",
            },
            {
                "e": "ue",
                "ue_px": segment_data(_SNOWPLOW_LINK_CLICK),
                "tv": "js-3.0.0",
                "p": "web",
                "aid": "demo-app",
                "uid": "jon.doe@email.com",
                "duid": "5e2c1a1f-2d8e-4a3a-9b0e-1c7f3d0c9a11",
            },
        ],
    }
).encode()

# PostHog: the capture API's documented bodies (posthog.com/docs/api/capture),
# with its placeholders filled in, and posthog-js's request formats
# (github.com/PostHog/posthog-js, src/request.ts: gzip-js, base64, lz64).
_POSTHOG_SINGLE = {
    "api_key": "phc_example_project_key",
    "event": "user signed up",
    "distinct_id": "user-1234",
    "properties": {"plan": "pro", "$current_url": "https://example.com/signup"},
    "timestamp": "2024-03-21T15:22:47.890Z",
    "uuid": "018f3c2a-7b1e-7c3d-9f00-000000000001",
}
_POSTHOG_BATCH = {
    "api_key": "phc_example_project_key",
    "historical_migration": False,
    "batch": [
        {
            "event": "file uploaded",
            "properties": {"distinct_id": "user-1234", "file_size": 1024},
            "timestamp": "2024-03-21T15:22:47.890Z",
        },
        {
            "event": "$identify",
            "distinct_id": "user-1234",
            "properties": {"$anon_distinct_id": "anon-5678"},
            "$set": {"email": "max@example.com", "name": "Max"},
        },
        {
            "event": "$create_alias",
            "properties": {"distinct_id": "user-1234", "alias": "max@example.com"},
        },
    ],
}
_POSTHOG_DEVICE = "018f3c2a-7b1e-7c3d-9f00-1a2b3c4d5e6f"
# What posthog-js sends: a list of events, the key as properties.token.
_POSTHOG_JS_EVENTS = [
    {
        "event": "$pageview",
        "properties": {
            "$current_url": "https://example.com/pricing",
            "$title": "Pricing",
            "$referrer": "https://www.google.com/",
            "$device_id": _POSTHOG_DEVICE,
            "distinct_id": _POSTHOG_DEVICE,
            "token": "phc_example_project_key",
        },
        "timestamp": "2024-03-21T15:22:47.890Z",
        "uuid": "018f3c2a-7b1e-7c3d-9f00-000000000002",
    },
    {
        "event": "$groupidentify",
        "properties": {
            "distinct_id": "user-1234",
            "$group_type": "company",
            "$group_key": "acme",
            "$group_set": {"name": "Acme Inc."},
            "token": "phc_example_project_key",
        },
    },
]
# posthog-js's lz64 payload of a $pageview: made by lz-string's compressToBase64
# (tests/fixtures/lz64_vectors.json, scripts/make_lz64_vectors.py).
_LZ64_PAGEVIEW = next(
    vector["compressed"]
    for vector in json.loads(
        (Path(__file__).parent / "fixtures" / "lz64_vectors.json").read_text("utf-8")
    )["vectors"]
    if vector["text"].startswith('{"event":"$pageview"')
)
_POSTHOG_JS_QUERY = b"ip=1&_=1711034567990&ver=1.160.0"

_GA4_PAGE_VIEW = (
    b"/g/collect?v=2&tid=G-XXXXXXXXXX&gtm=45je3a1&_p=1711034567890&cid=1234567890.1711034567"
    b"&ul=en-us&sr=1920x1080&_s=1&sid=1711034567&sct=1&seg=0"
    b"&dl=https%3A%2F%2Fexample.com%2Fpricing&dr=https%3A%2F%2Fwww.google.com%2F"
    b"&dt=Pricing&en=page_view&up.plan=pro"
)

VENDOR_CASES: tuple[Case, ...] = (
    # GA4: gtag.js's page_view (developers.google.com/analytics/devguides/collection/ga4).
    vendor_case(
        "ga4-page-view",
        "ga4",
        _GA4_PAGE_VIEW,
        GA,
        status=204,
        calls=("page",),
        check=equals(
            {
                "type": "page",
                "name": "Pricing",
                "anonymousId": "1234567890.1711034567",
                "properties.url": "https://example.com/pricing",
                "context.page.referrer": "https://www.google.com/",
                "context.traits.plan": "pro",
                "context.vendor.fields.sid": "1711034567",
                "context.vendor.fields._p": "1711034567890",
            }
        ),
    ),
    # GA4 on a first-party host (server-side tagging): the path alone decides.
    vendor_case(
        "ga4-purchase-first-party-host",
        "ga4",
        b"/g/collect?v=2&tid=G-XXXXXXXXXX&cid=555.1&uid=u-42&en=purchase"
        b"&ep.currency=USD&epn.value=30.03&ep.transaction_id=T_12345",
        "sgtm.example.com",
        status=204,
        calls=("track",),
        check=equals(
            {
                "event": "purchase",
                "userId": "u-42",
                "properties": {"currency": "USD", "value": 30.03, "transaction_id": "T_12345"},
            }
        ),
    ),
    # gtag.js batches: the URL's query is shared, each body line is one hit.
    vendor_case(
        "ga4-post-two-hits",
        "ga4",
        b"/g/collect?v=2&tid=G-XXXXXXXXXX&cid=555.1&dl=https%3A%2F%2Fexample.com%2F",
        GA,
        method="POST",
        body=b"en=page_view&dt=Home\r\nen=scroll&epn.percent_scrolled=90\r\n",
        status=204,
        calls=("page", "track"),
        check=equals({"name": "Home", "context.page.url": "https://example.com/"}),
    ),
    vendor_case(
        "ga4-missing-cid",
        "ga4",
        b"/g/collect?v=2&tid=G-XXXXXXXXXX&en=page_view",
        GA,
        status=204,
        calls=("page",),
        rules=frozenset({"missing_vendor_field"}),
    ),
    # Universal Analytics: the Measurement Protocol guide's two examples
    # (developers.google.com/analytics/devguides/collection/protocol/v1/devguide).
    vendor_case(
        "universal-analytics-pageview",
        "universal_analytics",
        b"/collect?v=1&tid=UA-XXXXX-Y&cid=555&t=pageview&dh=mydemo.com&dp=%2Fhome&dt=homepage",
        GA,
        calls=("page",),
        check=equals(
            {
                "name": "homepage",
                "anonymousId": "555",
                "properties.path": "/home",
                "context.vendor.fields.dh": "mydemo.com",
            }
        ),
    ),
    vendor_case(
        "universal-analytics-event",
        "universal_analytics",
        b"/collect?v=1&tid=UA-XXXXX-Y&cid=555&t=event&ec=video&ea=play&el=holiday&ev=300",
        "region1.google-analytics.com",
        calls=("track",),
        check=equals(
            {
                "event": "play",
                "properties": {"category": "video", "label": "holiday", "value": 300},
            }
        ),
    ),
    vendor_case(
        "universal-analytics-post-missing-v-and-t",
        "universal_analytics",
        b"/collect",
        GA,
        method="POST",
        body=b"tid=UA-XXXXX-Y&cid=555&ea=play",
        calls=("track",),
        rules=frozenset({"missing_vendor_field"}),
    ),
    # Meta: the image pixel's documented forms
    # (developers.facebook.com/docs/meta-pixel/advanced).
    vendor_case(
        "meta-page-view",
        "meta",
        b"/tr?id=1234567890&ev=PageView&noscript=1",
        FB,
        calls=("page",),
        check=equals({"type": "page", "context.vendor.fields.noscript": "1"}),
    ),
    vendor_case(
        "meta-purchase-custom-data",
        "meta",
        b"/tr?id=1234567890&ev=Purchase&cd[currency]=USD&cd[value]=0.00"
        b"&dl=https%3A%2F%2Fshop.example%2Fthanks&rl=https%3A%2F%2Fshop.example%2Fcart"
        b"&ud[em]=309a0a5c3e211326ae75ca18196d301a9bdbd1a882a4d2569511033da23f0abd"
        b"&fbp=fb.1.1596403881668.1116446470",
        "facebook.com",
        calls=("track",),
        check=equals(
            {
                "event": "Purchase",
                "anonymousId": "fb.1.1596403881668.1116446470",
                "properties": {"currency": "USD", "value": 0.0},
                "context.page.referrer": "https://shop.example/cart",
                "context.traits.em": (
                    "309a0a5c3e211326ae75ca18196d301a9bdbd1a882a4d2569511033da23f0abd"
                ),
            }
        ),
    ),
    # Gmail fetches every image of a message through its proxy (a machine open).
    vendor_case(
        "meta-page-view-through-gmail-image-proxy",
        "meta",
        b"/tr?id=1234567890&ev=PageView&noscript=1",
        FB,
        headers={
            "User-Agent": (
                "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0"
                " (via ggpht.com GoogleImageProxy)"
            )
        },
        calls=("page",),
        notes=frozenset({"machine_open"}),
    ),
    vendor_case(
        "meta-missing-event",
        "meta",
        b"/tr?id=1234567890&id=99",
        FB,
        calls=("track",),
        rules=frozenset({"missing_vendor_field"}),
        notes=frozenset({"duplicate_param"}),
    ),
    # Snowplow: the tracker protocol document's page view, structured event and
    # self-describing link click (docs.snowplow.io, "Snowplow Tracker Protocol").
    vendor_case(
        "snowplow-page-view-with-contexts",
        "snowplow",
        b"/i?e=pv&url=http%3A%2F%2Fwww.example.com%2F&page=Example%20page"
        b"&refr=http%3A%2F%2Fwww.google.com%2F&tv=js-3.0.0&p=web&aid=angry-birds"
        b"&duid=aeb1691c5a0ee5a6&uid=aeb1691c5a0ee5a6&sid=9a3b1c5f-8e2d-4f6a-b7c8-d9e0f1a2b3c4"
        b"&cx=" + segment_data(_SNOWPLOW_CONTEXTS).encode(),
        SNOWPLOW_COLLECTOR,
        calls=("page",),
        check=equals(
            {
                "type": "page",
                "name": "Example page",
                "userId": "aeb1691c5a0ee5a6",
                "anonymousId": "aeb1691c5a0ee5a6",
                "properties.url": "http://www.example.com/",
                "context.page.referrer": "http://www.google.com/",
                "context.vendor.fields.sid": "9a3b1c5f-8e2d-4f6a-b7c8-d9e0f1a2b3c4",
                "context.vendor.contexts": _SNOWPLOW_CONTEXTS["data"],
            }
        ),
    ),
    vendor_case(
        "snowplow-structured-event",
        "snowplow",
        b"/i?e=se&se_ca=Mixes&se_ac=Play&se_la=MRC%2Ffabric-0503-mix&se_va=0.0"
        b"&tv=js-3.0.0&p=web&aid=angry-birds&duid=aeb1691c5a0ee5a6",
        SNOWPLOW_COLLECTOR,
        calls=("track",),
        check=equals(
            {
                "event": "Play",
                "anonymousId": "aeb1691c5a0ee5a6",
                "userId": KeyError,
                "properties": {"category": "Mixes", "label": "MRC/fabric-0503-mix", "value": 0.0},
            }
        ),
    ),
    vendor_case(
        "snowplow-self-describing-plain-ue-pr",
        "snowplow",
        b"/i?e=ue&tv=js-3.0.0&p=web&ue_pr="
        + quote(json.dumps(_SNOWPLOW_LINK_CLICK, separators=(",", ":")), safe="").encode(),
        SNOWPLOW_COLLECTOR,
        calls=("track",),
        check=equals(
            {
                "event": "link_click",
                "properties.targetUrl": "http://www.example.com",
                "properties.elementClasses": ["foreground"],
            }
        ),
    ),
    # The JavaScript tracker's POST: two events, the second base64url ue_px.
    vendor_case(
        "snowplow-tp2-post-two-events",
        "snowplow",
        b"/com.snowplowanalytics.snowplow/tp2",
        SNOWPLOW_COLLECTOR,
        method="POST",
        body=_SNOWPLOW_TP2,
        headers={"Content-Type": "application/json; charset=UTF-8"},
        calls=("page", "track"),
        check=equals(
            {
                "name": "Example",
                "messageId": "d5f48e8e-8b6d-4a4b-8d1c-0c2b0a8f7e31",
                "originalTimestamp": "2024-03-21T15:22:47.890Z",
                "sentAt": "2024-03-21T15:22:47.990Z",
            }
        ),
    ),
    vendor_case(
        "snowplow-tp2-missing-platform",
        "snowplow",
        b"/com.snowplowanalytics.snowplow/tp2",
        SNOWPLOW_COLLECTOR,
        method="POST",
        body=b'{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",'
        b'"data":[{"e":"pv","tv":"py-1.0.0","url":"http://www.example.com/"}]}',
        calls=("page",),
        rules=frozenset({"missing_vendor_field"}),
    ),
    # Matomo: the Tracking HTTP API reference's page view and event
    # (developer.matomo.org/api-reference/tracking-api).
    vendor_case(
        "matomo-page-view",
        "matomo",
        b"/matomo.php?idsite=1&rec=1&action_name=Products%20%2F%20Shoes"
        b"&url=https%3A%2F%2Fexample.org%2Fshoes&_id=6c0a3d2ab0b1c4e3&uid=user%40example.org"
        b"&cvar=%7B%221%22%3A%5B%22gender%22%2C%22female%22%5D%7D",
        "analytics.example.org",
        calls=("page",),
        check=equals(
            {
                "name": "Products / Shoes",
                "userId": "user@example.org",
                "anonymousId": "6c0a3d2ab0b1c4e3",
                "properties.customVariables": {"gender": "female"},
                "context.page.url": "https://example.org/shoes",
            }
        ),
    ),
    vendor_case(
        "matomo-event-post-on-piwik-php",
        "matomo",
        b"/piwik.php",
        "analytics.example.org",
        method="POST",
        body=b"idsite=3&rec=1&e_c=Videos&e_a=Play&e_n=Intro&e_v=12.5&_id=6c0a3d2ab0b1c4e3",
        calls=("track",),
        check=equals(
            {
                "event": "Play",
                "properties": {"category": "Videos", "name": "Intro", "value": 12.5},
            }
        ),
    ),
    vendor_case(
        "matomo-without-rec",
        "matomo",
        b"/matomo.php?idsite=1&action_name=Home",
        "analytics.example.org",
        calls=("page",),
        rules=frozenset({"missing_vendor_field"}),
    ),
    # Jitsu: the pixel's documented form, a Segment event in base64 data=
    # (docs.jitsu.com/sending-data/pixel), and Jitsu Classic's p.gif.
    vendor_case(
        "jitsu-px-track",
        "jitsu",
        b"/api/px/track?data="
        + segment_data(
            {
                "writeKey": "js.key",
                "anonymousId": "a1",
                "event": "Email Opened",
                "properties": {"campaign": "nov"},
            }
        ).encode(),
        "data.example.com",
        calls=("track",),
        check=equals({"event": "Email Opened", "properties": {"campaign": "nov"}}),
    ),
    vendor_case(
        "jitsu-classic-p-gif",
        "jitsu",
        b"/api/v1/p.gif?data="
        + segment_data(
            {
                "api_key": "js.classic",
                "event_type": "pageview",
                "user": {"anonymous_id": "anon-7"},
                "url": "https://example.com/",
                "page_title": "Home",
            },
            urlsafe=False,
            padded=True,
        ).encode(),
        "t.jitsu.com",
        calls=("page",),
        check=equals({"name": "Home", "anonymousId": "anon-7"}),
    ),
    vendor_case(
        "posthog-single-event",
        "posthog",
        b"/i/v0/e/",
        POSTHOG,
        method="POST",
        body=json.dumps(_POSTHOG_SINGLE).encode(),
        headers={"Content-Type": "application/json"},
        calls=("track",),
        check=equals(
            {
                "event": "user signed up",
                "userId": "user-1234",
                "anonymousId": KeyError,
                "messageId": "018f3c2a-7b1e-7c3d-9f00-000000000001",
                "originalTimestamp": "2024-03-21T15:22:47.890Z",
                "properties.plan": "pro",
                "context.page.url": "https://example.com/signup",
                "context.vendor.fields.api_key": "phc_example_project_key",
            }
        ),
    ),
    vendor_case(
        "posthog-batch-track-identify-alias",
        "posthog",
        b"/batch/",
        POSTHOG,
        method="POST",
        body=json.dumps(_POSTHOG_BATCH).encode(),
        headers={"Content-Type": "application/json"},
        calls=("track", "identify", "alias"),
        check=equals(
            {
                "event": "file uploaded",
                "userId": "user-1234",
                "properties.file_size": 1024,
                "context.vendor.fields.historical_migration": False,
            }
        ),
    ),
    # posthog-js's image fallback on a first-party proxy: base64 JSON in data=,
    # claimed by its key (properties.token).
    vendor_case(
        "posthog-pageview-data-base64-first-party",
        "posthog",
        b"/e/?data="
        + segment_data(_POSTHOG_JS_EVENTS[0], urlsafe=False, padded=True).encode()
        + b"&"
        + _POSTHOG_JS_QUERY,
        "ph.example.com",
        calls=("page",),
        check=equals(
            {
                "type": "page",
                "name": "Pricing",
                "anonymousId": _POSTHOG_DEVICE,
                "userId": KeyError,
                "properties.url": "https://example.com/pricing",
                "context.page": {
                    "url": "https://example.com/pricing",
                    "title": "Pricing",
                    "referrer": "https://www.google.com/",
                },
            }
        ),
    ),
    vendor_case(
        "posthog-js-gzip-js-list",
        "posthog",
        b"/e/?compression=gzip-js&" + _POSTHOG_JS_QUERY,
        POSTHOG,
        method="POST",
        body=gzip.compress(json.dumps(_POSTHOG_JS_EVENTS).encode(), mtime=0),
        headers={"Content-Type": "text/plain"},
        calls=("page", "group"),
        check=equals({"name": "Pricing", "messageId": "018f3c2a-7b1e-7c3d-9f00-000000000002"}),
    ),
    vendor_case(
        "posthog-js-lz64-form",
        "posthog",
        b"/e/?compression=lz64&" + _POSTHOG_JS_QUERY,
        "eu.i.posthog.com",
        method="POST",
        body=b"data=" + quote(_LZ64_PAGEVIEW, safe="").encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        calls=("page",),
        check=equals(
            {
                "name": "Pricing",
                "anonymousId": _POSTHOG_DEVICE,
                "context.page.url": "https://example.com/pricing",
            }
        ),
    ),
    vendor_case(
        "posthog-missing-api-key",
        "posthog",
        b"/capture/",
        POSTHOG,
        method="POST",
        body=b'{"event": "user signed up", "distinct_id": "user-1234"}',
        headers={"Content-Type": "application/json"},
        calls=("track",),
        rules=frozenset({"missing_vendor_field"}),
    ),
    # /e is a common path: on a host of its own, without a project key, the
    # request stays the application's (a 404 here), its body whole.
    vendor_case(
        "posthog-declines-e-without-a-key",
        "posthog",
        b"/e",
        "shop.example",
        method="POST",
        body=b'{"event": "user signed up", "distinct_id": "user-1234"}',
        headers={"Content-Type": "application/json"},
        status=404,
    ),
    vendor_case(
        "jitsu-bad-base64",
        "jitsu",
        b"/api/px/page?data=%21%21%21",
        "data.example.com",
        calls=("page",),
        rules=frozenset({"bad_base64"}),
    ),
)
