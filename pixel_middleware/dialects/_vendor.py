"""What the third-party dialects (GA4, Meta, Snowplow, ...) share.

A third-party hit is decoded into a Segment Spec event: its ``type`` (the
record's ``call``), ``event`` or ``name``, ``userId`` / ``anonymousId``,
``context.page`` (url, title, referrer), ``properties`` and, for user
properties, ``context.traits``. The vendor's own fields, as sent, are kept
whole under ``context.vendor`` (``{"name": <dialect>, "fields": {...}}``), so
nothing is lost by the mapping. The record's ``writeKey`` is the vendor's
property or site id (GA's ``tid``, Meta's pixel ``id``, Matomo's ``idsite``,
...): it names the source as a write key does. ``PixelConfig.write_keys`` does
not apply to these ids.

Each vendor's required fields are checked (``missing_vendor_field``, the
message naming the field); the Segment Spec's own checks (an identity, an
event name) are not, since a vendor's hit may lawfully lack them.

Answers: what the vendor answers a good hit (a GIF, ``204``, a small JSON),
with ``X-Pixel-Rejected`` listing the rule ids of a rejected one: vendors
do not answer errors to a beacon either.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pixel_middleware._query import parse_query
from pixel_middleware._segment_data import decode_data
from pixel_middleware.dialects._http_api import _inflate
from pixel_middleware.dialects.base import (
    _NO_CACHE,
    GIF,
    Answer,
    Dialect,
    Limits,
    PixelRecord,
    PixelRequest,
    Problem,
    Route,
    _enrich,
    _larger_than,
    _note,
    _Notes,
    _problem,
    fixed_answer,
    make_record,
    rejected_header,
    request_facts,
)

if TYPE_CHECKING:
    from pixel_middleware.core import PixelConfig

__all__ = [
    "Hit",
    "HitError",
    "Params",
    "decode_base64_json",
    "first_values",
    "number",
    "parse_json_text",
    "read_body",
    "split_lines",
    "vendor_dialect",
]

#: A hit's parameters: the first value of each name, in query order.
Params = dict[str, str]


class HitError(Exception):
    """The request cannot be read at all: its rule id (fatal, ``event: null``)."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


@dataclass(slots=True)
class Hit:
    """One vendor hit mapped to the Segment Spec, before enrichment."""

    call: str
    write_key: str | None
    event: dict[str, Any]
    #: The vendor's required fields this hit lacks (our own names, never request data).
    missing: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def first_values(pairs: Iterable[tuple[str, str]], notes: _Notes) -> Params:
    """The first value of each parameter (later ones noted ``duplicate_param``)."""
    params: Params = {}
    for key, value in pairs:
        if key in params:
            _note(notes, "duplicate_param", key)
        else:
            params[key] = value
    return params


def query_params(query: bytes, limits: Limits, notes: _Notes) -> Params:
    """The query's parameters, held to the query limits."""
    if len(query) > limits.max_query_bytes:
        raise HitError("too_large")
    parsed = parse_query(query, limits.max_params)
    if parsed is None:
        raise HitError("too_many_params")
    pairs, size, replaced = parsed
    if replaced:
        _note(notes, "invalid_utf8")
    if size > limits.max_event_bytes:
        raise HitError("too_large")
    return first_values(pairs, notes)


def read_body(request: PixelRequest, limits: Limits, *, gzip: bool = False) -> bytes:
    """The body, inflated when ``Content-Encoding: gzip`` (or ``gzip``), under the caps."""
    body = request.body
    if len(body) > limits.max_body_bytes:
        raise HitError("too_large")
    encoding = (request.content_encoding or "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise HitError("unsupported_encoding")
    if gzip or encoding in ("gzip", "x-gzip"):
        inflated = _inflate(body, limits.max_decompressed_bytes)
        if inflated is None:
            raise HitError("bad_gzip")
        if not inflated:
            raise HitError("too_large")
        body = inflated
    return body


def split_lines(text: bytes, limits: Limits) -> list[bytes]:
    """Non-empty lines of a body of one hit a line, at most ``max_batch_events``."""
    lines = [line.strip() for line in text.split(b"\n")]
    lines = [line for line in lines if line]
    if len(lines) > limits.max_batch_events:
        raise HitError("too_many_events")
    return lines


def parse_json_text(data: bytes | str, limits: Limits, notes: _Notes) -> Any:
    """JSON through the core's decoder: same refusals, depth check, repairs."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    # +2 levels: a vendor's payload wraps its events ({"batch": [...]}).
    value, rule, data_notes = decode_data(
        raw.strip() or b"null", limits.max_decompressed_bytes, limits.max_depth + 2
    )
    for note in data_notes:
        if note != "raw_json":
            _note(notes, note)
    if rule is not None:
        raise HitError(rule)
    return value


def decode_base64_json(text: str, limits: Limits, notes: _Notes) -> Any:
    """Base64 (standard or URL-safe alphabet, padding optional) JSON."""
    cleaned = text.strip().replace(" ", "+")
    if len(cleaned) > 2 * limits.max_decompressed_bytes:
        raise HitError("too_large")
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise HitError("bad_base64") from None
    return parse_json_text(raw, limits, notes)


def number(text: str) -> int | float | str:
    """A numeric parameter as a number (``"12"`` -> 12, ``"1.5"`` -> 1.5), else as sent."""
    try:
        if text.lstrip("-").isdigit() and len(text) <= 18:
            return int(text)
        value = float(text)
    except ValueError:
        return text
    if value != value or value in (float("inf"), float("-inf")):
        return text
    return value


def page_context(url: str | None, title: str | None, referrer: str | None) -> dict[str, Any]:
    page = {"url": url, "title": title, "referrer": referrer}
    return {key: value for key, value in page.items() if value}


#: How a dialect reads a request: (request, route, params of the query, limits,
#: notes) -> its hits. Raises :class:`HitError` when nothing can be read.
HitReader = Callable[[PixelRequest, Route, Limits, _Notes], list[Hit]]


def _records(
    reader: HitReader,
    request: PixelRequest,
    route: Route,
    config: PixelConfig,
    now: datetime,
    new_id: Callable[[], str],
) -> list[PixelRecord]:
    facts = request_facts(request, config, now)
    limits = config.limits
    notes = facts.notes
    query = request.query

    def record(
        call: str,
        write_key: str | None,
        event: dict[str, Any] | None,
        problems: list[Problem],
        record_notes: _Notes,
    ) -> PixelRecord:
        return make_record(
            record_id=new_id(),
            facts=facts,
            dialect=route.dialect,
            call=call,
            write_key=write_key,
            event=event,
            problems=problems,
            notes=record_notes,
            method=request.method,
            path=request.path,
            query=query,
            max_query_bytes=limits.max_query_bytes,
        )

    try:
        hits = reader(request, route, limits, notes)
    except HitError as error:
        return [record(route.call, None, None, [_problem(error.rule)], notes)]
    except RecursionError:  # defensive: every reader is iterative
        return [record(route.call, None, None, [_problem("too_deep")], notes)]
    if not hits:
        return [record(route.call, None, None, [_problem("not_an_object")], notes)]
    records: list[PixelRecord] = []
    for hit in hits:
        hit_notes = {note: dict(names) for note, names in notes.items()}
        problems = list(hit.problems)
        for name in hit.missing:
            problems.append(
                _problem("missing_vendor_field", f"The {route.dialect} hit needs {name}.")
            )
        event: dict[str, Any] | None = hit.event
        assert event is not None
        _enrich(
            event,
            hit.call,
            now,
            facts.received_at,
            facts.ip,
            facts.user_agent,
            new_id,
            hit_notes,
            problems,
        )
        if _larger_than(event, limits.max_event_bytes):
            problems.append(_problem("too_large"))
            event = None
        records.append(record(hit.call, hit.write_key, event, problems, hit_notes))
    return records


def vendor_event(
    *,
    dialect: str,
    fields: dict[str, Any],
    user_id: str | None = None,
    anonymous_id: str | None = None,
    event_name: str | None = None,
    page_name: str | None = None,
    page: dict[str, Any] | None = None,
    properties: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Segment Spec event: only what the hit carried, the vendor's fields in context."""
    event: dict[str, Any] = {}
    if user_id:
        event["userId"] = user_id
    if anonymous_id:
        event["anonymousId"] = anonymous_id
    if event_name is not None:
        event["event"] = event_name
    if page_name is not None:
        event["name"] = page_name
    event["properties"] = properties or {}
    context: dict[str, Any] = {}
    if page:
        context["page"] = page
    if traits:
        context["traits"] = traits
    context["vendor"] = {"name": dialect, "fields": fields}
    event["context"] = context
    return event


def vendor_dialect(
    *,
    name: str,
    paths: dict[str, str],
    reader: HitReader,
    path_roots: tuple[str, ...] = (),
    hosts: dict[str, frozenset[str]] | None = None,
    get_answer: tuple[int, str, bytes] = (200, "image/gif", GIF),
    post_answer: tuple[int, str, bytes] = (200, "image/gif", GIF),
    claims: Callable[[PixelRequest, Route, Limits], bool] | None = None,
) -> Dialect:
    """A third-party :class:`Dialect`: its routes, its reader, the vendor's answers."""

    def decode(
        request: PixelRequest,
        route: Route,
        config: PixelConfig,
        now: datetime,
        new_id: Callable[[], str],
    ) -> list[PixelRecord]:
        return _records(reader, request, route, config, now, new_id)

    def accepted(route: Route, config: PixelConfig) -> Answer:
        status, content_type, body = post_answer if route.body else get_answer
        if status == 204:
            # RFC 9110 section 8.6: no Content-Length on a 204.
            return 204, [*_NO_CACHE], b""
        return fixed_answer(status, content_type, body)

    def answer(records: list[PixelRecord], route: Route, config: PixelConfig) -> Answer:
        status, headers, body = accepted(route, config)
        rejected = rejected_header(records)
        if rejected is not None:
            headers.append(rejected)
        return status, headers, body

    def not_kept(route: Route, config: PixelConfig) -> tuple[str, bytes]:
        _, content_type, body = post_answer if route.body else get_answer
        return content_type, body

    calls = tuple(dict.fromkeys(paths.values()))
    return Dialect(
        name=name,
        # Never a prefix of any path: the third-party routes are matched by paths.
        pixel_root="\x00" + name + "/",
        calls=calls,
        body_routes={},
        decode=decode,
        answer=answer,
        accepted_answer=accepted,
        not_kept=not_kept,
        paths=paths,
        path_roots=path_roots,
        hosts=hosts or {},
        claims=claims,
    )


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
