"""Filters over records: parsing query parameters, matching, explaining misses, counting."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pixel_middleware.record_filter import (
    MAX_PATH_CHARS,
    MAX_VALUE_CHARS,
    MAX_VALUES,
    FilterError,
    RecordFilter,
    count_records,
    parse_filter,
)


def record(
    *,
    accepted: bool = True,
    call: str = "track",
    dialect: str = "segment",
    event: dict[str, Any] | None = None,
    received: str = "2025-01-31T12:00:00.000Z",
    rules: tuple[str, ...] = (),
    write_key: str | None = "wk",
) -> dict[str, Any]:
    return {
        "id": "r",
        "receivedAt": received,
        "dialect": dialect,
        "call": call,
        "writeKey": write_key,
        "accepted": accepted,
        "problems": [{"rule": rule, "message": f"broke {rule}"} for rule in rules],
        "notes": [],
        "event": event,
        "request": {"method": "GET", "path": "/", "query": "", "ip": None, "userAgent": None},
    }


SIGNUP = record(
    event={"userId": "u1", "event": "Signed Up", "properties": {"plan": "pro", "seats": 3}}
)


def parse(**params: str | list[str]) -> RecordFilter:
    return parse_filter({k: v if isinstance(v, list) else [v] for k, v in params.items()})


def test_an_empty_filter_keeps_everything() -> None:
    flt = parse_filter({})
    assert flt.is_empty()
    assert flt.matches(SIGNUP)
    assert flt.matches(record(event=None, accepted=False))
    assert flt.store_arguments() == {"accepted": None, "call": None}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"accepted": "true"}, True),
        ({"accepted": "false"}, False),
        ({"dialect": "segment"}, True),
        ({"dialect": "rudderstack"}, False),
        ({"call": "track"}, True),
        ({"call": ["page", "track"]}, True),
        ({"call": "page"}, False),
        ({"event": "Signed Up"}, True),
        ({"event": "signed up"}, False),
        ({"writeKey": "wk"}, True),
        ({"writeKey": "other"}, False),
        ({"userId": "u1"}, True),
        ({"userId": "u"}, False),
        ({"anonymousId": "u1"}, False),
        ({"q": "SIGNED"}, True),
        ({"q": "nowhere"}, False),
        ({"properties.plan": "pro"}, True),
        ({"properties.plan": "free"}, False),
        ({"properties.seats": "3"}, True),
        ({"properties.missing": "pro"}, False),
        ({"properties.plan.deeper": "pro"}, False),
        ({"since": "2025-01-31T12:00:00Z"}, True),
        ({"since": "2025-01-31T12:00:00.001Z"}, False),
        ({"since": "2025-01-31T13:00:00+01:00"}, True),
    ],
)
def test_each_filter(params: dict[str, Any], expected: bool) -> None:
    assert parse(**params).matches(SIGNUP) is expected


def test_paths_reach_array_items_and_compare_json_text() -> None:
    rec = record(
        event={"userId": 7, "products": [{"sku": "A1"}, {"sku": "B2"}], "vip": True, "n": None}
    )
    assert parse(**{"products.1.sku": "B2"}).matches(rec)
    assert not parse(**{"products.2.sku": "B2"}).matches(rec)
    assert parse(userId="7").matches(rec), "a numeric id compares as its JSON text"
    assert parse(**{"event.vip": "true"}).matches(record(event={"event": {"vip": True}}))
    assert not parse(**{"products.0": "A1"}).matches(rec), "objects match no text"


def test_every_name_given_must_match_and_any_value_of_one_name() -> None:
    flt = parse(call=["page", "track"], userId=["u9", "u1"], accepted="true")
    assert flt.matches(SIGNUP)
    assert not flt.matches({**SIGNUP, "accepted": False})
    assert flt.store_arguments() == {"accepted": True, "call": None}
    assert parse(call="track").store_arguments() == {"accepted": None, "call": "track"}
    assert parse(accepted=["true", "false"]).accepted is None


def test_mismatches_name_every_failed_filter_in_a_fixed_order() -> None:
    flt = parse(call="page", userId="u2", **{"properties.plan": "free"})
    assert flt.mismatches(SIGNUP) == ["call", "userId", "properties.plan"]
    assert flt.mismatches(SIGNUP, stop_at_first=True) == ["call"]
    assert parse(call="track").mismatches(SIGNUP) == []


def test_a_record_without_an_event_fails_event_filters_but_not_the_others() -> None:
    rejected = record(event=None, accepted=False, rules=("bad_json",))
    assert parse(accepted="false", call="track").matches(rejected)
    assert not parse(userId="u1").matches(rejected)
    assert not parse(**{"properties.plan": "pro"}).matches(rejected)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"accepted": "yes"}, "accepted must be true or false"),
        ({"dialect": "<b>ga4</b>"}, "dialect must be one of segment, rudderstack"),
        ({"call": "<b>x</b>"}, "call must be one of"),
        ({"since": "<b>yesterday</b>"}, "since must be an ISO 8601 time"),
        ({"since": ["2025-01-01", "2025-01-02"]}, "since is taken once"),
        ({"a..b": "1"}, "an event path filter must be names joined by dots"),
        ({".<b>x</b>": "1"}, "an event path filter must be names joined by dots"),
    ],
)
def test_bad_values_get_a_fixed_message_without_the_value(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(FilterError) as caught:
        parse(**params)
    assert str(caught.value).startswith(message)
    assert "<b>" not in str(caught.value)


def test_value_and_path_lengths_at_the_bound_and_one_over() -> None:
    parse(event="x" * MAX_VALUE_CHARS)
    with pytest.raises(FilterError, match=f"at most {MAX_VALUE_CHARS} characters"):
        parse(event="x" * (MAX_VALUE_CHARS + 1))
    path = "p." + "x" * (MAX_PATH_CHARS - 2)
    assert len(path) == MAX_PATH_CHARS
    parse(**{path: "1"})
    with pytest.raises(FilterError, match="an event path filter"):
        parse(**{path + "x": "1"})


def test_the_number_of_values_at_the_bound_and_one_over() -> None:
    parse(userId=[f"u{n}" for n in range(MAX_VALUES)])
    with pytest.raises(FilterError, match=f"at most {MAX_VALUES} filter values"):
        parse(userId=[f"u{n}" for n in range(MAX_VALUES + 1)])


def test_names_that_are_not_filters_are_left_to_the_caller() -> None:
    assert parse(limit="5", order="asc").is_empty()


def test_since_without_a_zone_is_utc() -> None:
    assert parse(since="2025-01-31T12:00:00").since == datetime(2025, 1, 31, 12, tzinfo=UTC)


def test_counts() -> None:
    records = [
        SIGNUP,
        SIGNUP,
        record(call="page", event={"anonymousId": "a", "name": "Home"}),
        record(accepted=False, event={"event": "X"}, rules=("missing_identity",)),
        record(accepted=False, event=None, rules=("bad_json", "missing_write_key")),
    ]
    counts = count_records(records)
    assert counts.as_json() == {
        "total": 5,
        "accepted": 3,
        "rejected": 2,
        "byCall": {"track": 4, "page": 1},
        "byEvent": {"Signed Up": 2, "Home": 1, "X": 1, "": 1},
        "byRule": {"missing_identity": 1, "bad_json": 1, "missing_write_key": 1},
        "byMachine": {},
    }
    assert count_records([]).as_json()["total"] == 0
