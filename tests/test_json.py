"""Tests for pixel_middleware._json: msgspec and the standard library give the same values."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware import _json, _segment_data
from pixel_middleware._segment_data import decode_data, json_scanner

# The standard library's scanner, passed explicitly: decode_data then takes no fast path.
STDLIB_SCAN = json_scanner(_segment_data._DECODER)

# Text with what differs between JSON libraries: astral characters, lone
# surrogates (which UTF-8 cannot carry), controls, quotes and backslashes.
TEXT = st.text(st.characters(codec=None), max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**200), max_value=2**200)  # past 64 bits: exact
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)


def exact(value: Any) -> str:
    """A spelling that tells 1 from 1.0 and -0.0 from 0.0, keys in order."""
    return json.dumps(value, allow_nan=False)


def stdlib_decode(data: bytes) -> Any:
    return decode_data(data, 100_000, 64, scan=STDLIB_SCAN)


def test_msgspec_does_the_work_when_installed() -> None:
    pytest.importorskip("msgspec")
    assert _json.HAVE_MSGSPEC
    assert _segment_data._FAST_LOADS is _json.fast_loads is not None


@settings(max_examples=300, deadline=None)
@given(VALUES)
@example({"big": 2**64, "bigger": -(2**199), "float": 1e308, "tiny": 5e-324, "neg0": -0.0})
@example({"lone": "\ud800", "pair": "\U0001f600", "nul": "\x00", "é": ["ü", {"\udc00": 1}]})
def test_both_paths_write_and_read_the_same_values(value: Any) -> None:
    written = _json.dumps(value)
    assert exact(_json.loads(written)) == exact(value)
    assert exact(json.loads(written)) == exact(value), "the standard library reads msgspec's text"
    assert exact(_json.loads(json.dumps(value))) == exact(value), "and the other way round"
    assert _json.dumps_bytes(value).decode() == written


@settings(max_examples=300, deadline=None)
@given(VALUES)
@example({"lone": "\ud800"})
@example([[[[[[[[1]]]]]]]])
def test_a_segment_data_value_decodes_the_same_on_both_paths(value: Any) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        raw = text.encode("utf-8", "surrogatepass")
        for data in (base64.b64encode(raw), raw):
            fast = decode_data(data, 100_000, 64)
            slow = stdlib_decode(data)
            assert (exact(fast[0]), fast[1:]) == (exact(slow[0]), slow[1:])


@pytest.mark.parametrize(
    "text",
    [
        '"\\ud800"',  # msgspec refuses a lone surrogate escape; json reads it
        '"\\udc00x"',
        "1e400",  # overflows: bad_json on both
        "NaN",
        "1" * 4300,  # the standard library's digit limit, and one over
        "1" * 4301,
        "[" * 3000 + "]" * 3000,  # too deep for both
        "[1]\f",  # not JSON whitespace
        "[1,]",
        '{"a":1,"a":2}',  # the last wins on both
        "",
    ],
)
def test_texts_where_the_libraries_differ_decode_the_same(text: str) -> None:
    data = base64.b64encode(text.encode())  # base64: raw JSON must start with { or [
    fast = decode_data(data, 100_000, 5000)
    slow = decode_data(data, 100_000, 5000, scan=STDLIB_SCAN)
    assert (exact(fast[0]), fast[1:]) == (exact(slow[0]), slow[1:])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [1, {"a": -float("inf")}]])
def test_nan_and_infinity_are_refused_on_both_paths(value: Any) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        _json.dumps(value)
    with pytest.raises(ValueError, match="not JSON compliant"):
        _json._stdlib_dumps(value)


# Values where the non-finite floats hide: NaN, the infinities, and tuples
# (which read back as lists, so the cheap check cannot settle them).
NON_FINITE_VALUES = st.recursive(
    SCALARS | st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(TEXT, children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.skipif(not _json.HAVE_MSGSPEC, reason="the msgspec path")
@settings(max_examples=500, deadline=None)
@given(NON_FINITE_VALUES)
@example({"a": None, "b": float("nan")})
@example([None, (1.0, -float("inf"))])
@example((None,))
def test_dumps_refuses_exactly_the_values_the_walk_finds_non_finite(value: Any) -> None:
    try:
        data = _json.dumps_bytes(value)
    except ValueError:
        assert _json._has_non_finite(value)
    else:
        assert not _json._has_non_finite(value)
        assert exact(json.loads(data)) == exact(json.loads(_json._stdlib_dumps(value)))


@pytest.mark.skipif(not _json.HAVE_MSGSPEC, reason="the msgspec path")
def test_a_null_in_a_record_costs_no_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    # Records often hold null (a userId not set): reading the text back
    # settles them without walking the value in Python.
    def walked(value: Any) -> bool:
        raise AssertionError("walked a value that reads back equal")

    monkeypatch.setattr(_json, "_has_non_finite", walked)
    record = {"userId": None, "event": {"properties": {"total": 42.5, "x": [None, 1]}}}
    assert json.loads(_json.dumps_bytes(record)) == record


@pytest.mark.skipif(not _json.HAVE_MSGSPEC, reason="the msgspec path")
@settings(max_examples=300, deadline=None)
@given(NON_FINITE_VALUES)
@example({"when": datetime.date(2026, 1, 2)})
@example({1: "int key"})
@example({"lone": "\ud800"})
def test_exact_bytes_is_msgspec_text_only_when_it_reads_back_equal(value: Any) -> None:
    data = _json.exact_bytes(value)
    if data is None:
        return
    assert _json.fast_loads is not None
    assert _json.fast_loads(data) == value
    assert json.loads(data) == json.loads(_json._stdlib_dumps(value))


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        {"a": [None, float("inf")]},
        (1, 2),
        {1: "x"},
        {"d": datetime.date(2026, 1, 2)},
        {"b": b"bytes"},
        {"lone": "\ud800"},
    ],
)
def test_exact_bytes_declines_what_does_not_read_back_equal(value: Any) -> None:
    assert _json.exact_bytes(value) is None


def test_a_value_that_is_not_json_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _json.dumps({"a": object()})


STDLIB_ONLY = """
import sys
sys.modules["msgspec"] = None  # an import of it now fails, as without the package
from pixel_middleware import _json
from tests.test_json import decoded_record
assert not _json.HAVE_MSGSPEC and _json.fast_loads is None
print(_json.dumps(decoded_record(sys.argv[1])))
"""


def decoded_record(target: str) -> Any:
    """The record of a pixel, less what changes from call to call."""
    from datetime import UTC, datetime

    from pixel_middleware.core import PixelConfig, PixelRequest, decode_pixel, split_target

    path, query = split_target(target.encode())
    outcome = decode_pixel(
        PixelRequest("GET", path, query),
        config=PixelConfig(),
        now=datetime(2026, 1, 2, tzinfo=UTC),
        new_id=lambda: "fixed",
    )
    assert outcome is not None
    assert outcome.record is not None
    return outcome.record


def test_the_core_works_with_the_standard_library_alone() -> None:
    event = {
        "event": "Bought",
        "userId": "u1",
        "properties": {"n": 2**70, "f": 0.1, "s": "é\U0001f600", "deep": [[{"x": None}]]},
    }
    data = base64.b64encode(json.dumps(event).encode()).decode()
    target = f"/v1/pixel/track?data={data}"
    child = subprocess.run(
        [sys.executable, "-c", STDLIB_ONLY, target], capture_output=True, text=True, check=True
    )
    record = decoded_record(target)
    assert exact(json.loads(child.stdout)) == exact(record)
    assert record["event"]["properties"]["n"] == 2**70
