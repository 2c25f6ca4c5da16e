"""Filters over records, read from query parameters: which records a person asks for.

One definition shared by everything that selects records by what they hold:
the collector's JSON API and live page, and later ``events``, ``check`` and the
pytest plugin. Pure: no I/O, no clock.

Usage::

    flt = parse_filter({"accepted": ["false"], "call": ["track"], "properties.plan": ["pro"]})
    store_rows = store.read(**flt.store_arguments())   # what the store filters itself
    wanted = [record for _, record in store_rows if flt.matches(record)]
    summary = count_records(wanted)

The parameters (each may be repeated: a record matches when it matches any of
the values given for one name, and every name given):

- ``accepted``: ``true`` or ``false`` (the verdict);
- ``dialect``: ``segment`` or ``rudderstack``;
- ``call``: ``identify``, ``group``, ``alias``, ``page``, ``screen``, ``track``;
- ``event``: the event's name as people are shown it (the track event, the
  page or screen name, the group or alias subject), exactly;
- ``writeKey``, ``userId``, ``anonymousId``: exactly (numbers as their JSON text);
- ``q``: free text, found anywhere in the record (without regard to case);
- ``since``: records received at or after this ISO 8601 time (UTC unless it
  says otherwise);
- any name holding a dot is a path into the event: ``properties.plan=pro``,
  ``context.page.url=...``, ``products.0.sku=A1`` (array items by index).
  Strings compare exactly; numbers, ``true``, ``false`` and ``null`` compare
  as their JSON text.

Bad values raise :class:`FilterError` with a fixed message that names the
parameter and never repeats the value.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pixel_middleware.core import CALLS, DEFAULT_DIALECTS, DIALECTS
from pixel_middleware.display import event_name
from pixel_middleware.machine_opens import machine_kind_of

__all__ = [
    "FILTER_PARAMS",
    "MAX_PATH_CHARS",
    "MAX_VALUES",
    "MAX_VALUE_CHARS",
    "FilterError",
    "RecordCounts",
    "RecordFilter",
    "count_records",
    "is_filter_param",
    "parse_filter",
    "received_at",
]

#: The filter parameters with fixed names (dotted names are event paths besides).
FILTER_PARAMS: Final = (
    "accepted",
    "dialect",
    "call",
    "event",
    "writeKey",
    "userId",
    "anonymousId",
    "q",
    "since",
)
#: The longest value a filter takes, in characters.
MAX_VALUE_CHARS: Final = 1000
#: The longest event path (``properties.plan``), in characters.
MAX_PATH_CHARS: Final = 200
#: The most values one filter takes, all names together.
MAX_VALUES: Final = 50

# Third-party records take their call from the Spec types these already name.
_ALL_CALLS: Final = tuple(dict.fromkeys(call for d in DEFAULT_DIALECTS for call in CALLS[d]))
_IDENTITY_FIELDS: Final = {"writeKey": None, "userId": "userId", "anonymousId": "anonymousId"}


class FilterError(ValueError):
    """A filter parameter is not valid; the message is fixed and never holds the value."""


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records to keep; an empty filter keeps every record.

    Each field holds the values given for one parameter (a record must match
    one of them); an empty tuple does not filter.
    """

    accepted: bool | None = None
    dialects: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    write_keys: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    anonymous_ids: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    since: datetime | None = None
    #: (path segments, the values asked for), one per dotted parameter name.
    fields: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = field(default=())

    def store_arguments(self) -> dict[str, Any]:
        """What ``Store.read()`` can filter itself: ``accepted``, and ``call`` if only one."""
        return {
            "accepted": self.accepted,
            "call": self.calls[0] if len(self.calls) == 1 else None,
        }

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` passes every filter."""
        return not self.mismatches(record, stop_at_first=True)

    def mismatches(self, record: Mapping[str, Any], *, stop_at_first: bool = False) -> list[str]:
        """The names of the filters ``record`` fails (``[]``: it matches).

        Used to explain near misses: a record failing one filter only is
        the one a person most likely meant.
        """
        failed: list[str] = []
        for name, passes in self._checks(record):
            if not passes():
                failed.append(name)
                if stop_at_first:
                    break
        return failed

    def _checks(self, record: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
        event = record.get("event")
        event = event if isinstance(event, dict) else {}
        if self.accepted is not None:
            yield "accepted", lambda: bool(record.get("accepted")) is self.accepted
        if self.dialects:
            yield "dialect", lambda: record.get("dialect") in self.dialects
        if self.calls:
            yield "call", lambda: record.get("call") in self.calls
        if self.since is not None:
            yield "since", lambda: _received_at_or_after(record, self.since)
        if self.events:
            yield "event", lambda: event_name(record) in self.events
        if self.write_keys:
            yield "writeKey", lambda: _as_text(record.get("writeKey")) in self.write_keys
        if self.user_ids:
            yield "userId", lambda: _as_text(event.get("userId")) in self.user_ids
        if self.anonymous_ids:
            yield "anonymousId", lambda: _as_text(event.get("anonymousId")) in self.anonymous_ids
        for path, values in self.fields:
            yield (
                ".".join(path),
                lambda path=path, values=values: _as_text(_lookup(event, path)) in values,
            )
        if self.texts:
            yield "q", lambda: _contains_any(record, self.texts)

    def is_empty(self) -> bool:
        return self == _EMPTY


_EMPTY: Final = RecordFilter()


@dataclass(frozen=True, slots=True)
class RecordCounts:
    """How many records there are, in total and by what people ask about."""

    total: int = 0
    accepted: int = 0
    rejected: int = 0
    by_call: dict[str, int] = field(default_factory=dict)
    by_event: dict[str, int] = field(default_factory=dict)
    #: Problems by rule id: each rejected record counts once per rule it broke.
    by_rule: dict[str, int] = field(default_factory=dict)
    #: Records noted ``machine_open``, by the kind of machine (docs/dialects.md).
    by_machine: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "byCall": self.by_call,
            "byEvent": self.by_event,
            "byRule": self.by_rule,
            "byMachine": self.by_machine,
        }


def count_records(records: Iterable[Mapping[str, Any]]) -> RecordCounts:
    """Count ``records``: the totals, by call, by event name (``""``: none) and by rule."""
    total = accepted = 0
    by_call: Counter[str] = Counter()
    by_event: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    by_machine: Counter[str] = Counter()
    for record in records:
        total += 1
        machine = machine_kind_of(record)
        if machine is not None:
            by_machine[machine] += 1
        if record.get("accepted"):
            accepted += 1
        by_call[str(record.get("call"))] += 1
        by_event[event_name(record)] += 1
        rules = {
            str(problem.get("rule"))
            for problem in record.get("problems") or ()
            if isinstance(problem, dict)
        }
        by_rule.update(rules)
    return RecordCounts(
        total=total,
        accepted=accepted,
        rejected=total - accepted,
        by_call=dict(by_call.most_common()),
        by_event=dict(by_event.most_common()),
        by_rule=dict(by_rule.most_common()),
        by_machine=dict(by_machine.most_common()),
    )


def is_filter_param(name: str) -> bool:
    """Whether ``name`` is a filter parameter (a fixed name, or a dotted event path)."""
    return name in FILTER_PARAMS or "." in name


def parse_filter(params: Mapping[str, Sequence[str]]) -> RecordFilter:
    """The filter the parameters ask for; names that are not filters are ignored.

    ``params`` maps each name to its values, in order (``werkzeug``'s
    ``MultiDict.to_dict(flat=False)``, ``urllib.parse.parse_qs``). Raises
    :class:`FilterError` for a value or a path that is not valid.
    """
    given = {name: list(values) for name, values in params.items() if is_filter_param(name)}
    if sum(len(values) for values in given.values()) > MAX_VALUES:
        raise FilterError(f"at most {MAX_VALUES} filter values are taken at once")
    for name, found in given.items():
        for value in found:
            if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
                raise FilterError(
                    f"{_shown_name(name)} must be text of at most {MAX_VALUE_CHARS} characters"
                )

    def values(name: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(given.get(name, ())))

    return RecordFilter(
        accepted=_parse_accepted(values("accepted")),
        dialects=_one_of("dialect", values("dialect"), DIALECTS),
        calls=_one_of("call", values("call"), _ALL_CALLS),
        events=values("event"),
        write_keys=values("writeKey"),
        user_ids=values("userId"),
        anonymous_ids=values("anonymousId"),
        texts=tuple(text.casefold() for text in values("q") if text),
        since=_parse_since(values("since")),
        fields=tuple(
            (_parse_path(name), tuple(dict.fromkeys(found)))
            for name, found in given.items()
            if name not in FILTER_PARAMS
        ),
    )


def _shown_name(name: str) -> str:
    # A dotted name is chosen by the caller: never echo it back.
    return name if name in FILTER_PARAMS else "an event path filter"


def _parse_accepted(values: tuple[str, ...]) -> bool | None:
    if not values:
        return None
    if any(value not in ("true", "false") for value in values):
        raise FilterError("accepted must be true or false")
    if len(values) > 1:
        return None  # both: every record
    return values[0] == "true"


def _one_of(name: str, values: tuple[str, ...], allowed: Sequence[str]) -> tuple[str, ...]:
    if any(value not in allowed for value in values):
        raise FilterError(f"{name} must be one of {', '.join(allowed)}")
    return values


def _parse_since(values: tuple[str, ...]) -> datetime | None:
    if not values:
        return None
    if len(values) > 1:
        raise FilterError("since is taken once")
    text = values[0]
    try:
        moment = datetime.fromisoformat(text) if len(text) <= 64 else None
    except ValueError:
        moment = None
    if moment is None:
        raise FilterError("since must be an ISO 8601 time, such as 2025-01-31T12:00:00Z")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _parse_path(name: str) -> tuple[str, ...]:
    segments = tuple(name.split("."))
    if len(name) > MAX_PATH_CHARS or not all(segments):
        raise FilterError(
            f"an event path filter must be names joined by dots (like properties.plan),"
            f" at most {MAX_PATH_CHARS} characters"
        )
    return segments


def _lookup(value: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` (object keys, or array indexes), or a sentinel if absent."""
    for segment in path:
        if isinstance(value, dict):
            if segment not in value:
                return _MISSING
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return _MISSING
    return value


_MISSING: Final[Any] = object()


def _as_text(value: Any) -> str | None:
    """How a value is compared with a filter's text: strings as they are, else JSON."""
    if value is _MISSING:
        return None
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return None  # objects and arrays match no text


def _contains_any(record: Mapping[str, Any], texts: tuple[str, ...]) -> bool:
    haystack = json.dumps(record, ensure_ascii=False).casefold()
    return any(text in haystack for text in texts)


def _received_at_or_after(record: Mapping[str, Any], since: datetime | None) -> bool:
    received = received_at(record)
    return since is None or (received is not None and received >= since)


def received_at(record: Mapping[str, Any]) -> datetime | None:
    """When the record was received, as an aware UTC time; ``None`` if unreadable."""
    text = record.get("receivedAt")
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
