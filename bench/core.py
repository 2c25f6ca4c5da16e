"""Core decode: pixels/s of :func:`decode_pixel` against the bare minimum of the work.

The bare minimum, given the same raw query bytes:

- Segment: find ``data=``, percent-decode it, ``base64.b64decode``, ``json.loads``.
- RudderStack: ``urllib.parse.parse_qsl`` of the query, into a dict.
- GA4 (``/g/collect``, a third-party dialect): the same ``parse_qsl`` into a dict.

``decode_pixel`` does all that and also checks the limits, the write key and the
event, and builds the record (id, receivedAt, request info) and the answer.
"""

from __future__ import annotations

import base64
import itertools
import json
import statistics
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from bench.load import USER_AGENT
from bench.payloads import UrlTemplate, rudderstack_template, segment_template
from bench.processes import BenchError
from bench.results import Row, at_least, median_ratio
from bench.settings import Settings
from bench.timing import CPU, Case, interleave

NAME = "core"
# The performance issue's targets: Segment against base64 + json.loads,
# RudderStack against parse_qsl.
SEGMENT_TARGET = at_least(0.7)
RUDDERSTACK_TARGET = at_least(0.9)
# GA4 against parse_qsl as well. Its record holds the hit twice (the mapped
# Spec event and every field as sent in context.vendor), so it does more work
# per parameter than RudderStack's; see bench/README.md for the ratio.
GA4_TARGET = at_least(0.5)

# gtag.js's page_view as Google's documents show it: 20 parameters, ~430 bytes.
_GA4_QUERY = (
    "v=2&tid=G-XXXXXXXXXX&gtm=45je3a1&_p=1711034567890&cid={cid}.1711034567&ul=en-us"
    "&sr=1920x1080&_s=1&sid=1711034567&sct=1&seg=0&dl=https%3A%2F%2Fexample.com%2Fpricing"
    "&dr=https%3A%2F%2Fwww.google.com%2F&dt=Pricing&en=page_view&ep.plan=pro"
    "&epn.value=30.03&up.tier=gold&_et=1200&tfd=1450&_ee=1"
)


class _Ga4Template:
    """GA4 page views, each with its own client id (as UrlTemplate's ``url(i)``)."""

    def url(self, i: int) -> str:
        return "/g/collect?" + _GA4_QUERY.format(cid=1_000_000_000 + i)


def bare_segment(query: bytes) -> Any:
    for part in query.split(b"&"):
        if part.startswith(b"data="):
            data = unquote_to_bytes(part[5:])
            return json.loads(base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4)))
    return None


def bare_rudderstack(query: bytes) -> Any:
    return dict(parse_qsl(query.decode()))


def _loop(requests: list[Any], op: Callable[[Any], object]) -> Case:
    def run(n: int) -> float:
        batch = list(itertools.islice(itertools.cycle(requests), n))
        start = CPU()
        for item in batch:
            op(item)
        return CPU() - start

    return run


def run(settings: Settings) -> list[Row]:
    from pixel_middleware.core import PixelConfig, PixelRequest, decode_pixel

    segment_config = PixelConfig()
    ga4_config = PixelConfig(dialects=frozenset({"ga4"}))
    now = datetime(2026, 11, 23, 16, 20, tzinfo=UTC)
    rows = []
    payloads: list[tuple[str, UrlTemplate | _Ga4Template, Callable[[bytes], Any], Any, str]] = [
        (
            "Segment track, data= JSON ~300 B",
            segment_template(),
            bare_segment,
            segment_config,
            "base64+json.loads",
        ),
        (
            "RudderStack AMP page, ~25 params",
            rudderstack_template(),
            bare_rudderstack,
            segment_config,
            "parse_qsl",
        ),
        (
            "GA4 /g/collect page_view, 20 params",
            _Ga4Template(),
            bare_rudderstack,
            ga4_config,
            "parse_qsl",
        ),
    ]
    targets = [SEGMENT_TARGET, RUDDERSTACK_TARGET, GA4_TARGET]
    for (label, template, bare, config, baseline_name), target in zip(
        payloads, targets, strict=True
    ):
        urls = [template.url(i) for i in range(1000)]
        requests = []
        for url in urls:
            path, _, query = url.partition("?")
            requests.append(PixelRequest("GET", path, query.encode(), "203.0.113.9", USER_AGENT))
        outcome = decode_pixel(requests[7], config=config, now=now)
        if outcome is None or outcome.record is None or not outcome.record["accepted"]:
            raise BenchError(f"{label}: the core did not accept {urls[7]}: {outcome}")
        if bare(requests[7].query) is None:
            raise BenchError(f"{label}: the baseline found nothing in {urls[7]}")
        params = urls[0].partition("?")[2].count("&") + 1

        def ours(req: Any, config: Any = config) -> object:
            return decode_pixel(req, config=config, now=now)

        def baseline(req: Any, bare: Callable[[bytes], Any] = bare) -> object:
            return bare(req.query)

        cases = {"ours": _loop(requests, ours), "bare": _loop(requests, baseline)}
        per_op = interleave(
            cases,
            block_seconds=settings.pick(0.02, 0.02, 0.002),
            rounds=settings.pick(101, 41, 2),
        )
        rates = {k: [1 / t for t in v] for k, v in per_op.items()}
        ratio, samples = median_ratio(rates["ours"], rates["bare"])
        rows.append(
            Row(
                bench=NAME,
                name=f"decode_pixel, {label}",
                ours=statistics.median(rates["ours"]),
                baseline=statistics.median(rates["bare"]),
                unit="pixels/s",
                ratio=ratio,
                target=target,
                baseline_name=baseline_name,
                note=f"{len(urls[0])} B URL, {params} params" if settings.mode != "smoke" else "",
                samples=samples,
            )
        )
    return rows
