"""Tests for pixel_middleware._dotpath: events from dot-notation parameters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pixel_middleware import _dotpath
from pixel_middleware._dotpath import DotPathBuilder, SetResult

SET = SetResult.SET
CONFLICT = SetResult.CONFLICT
EMPTY = SetResult.EMPTY_SEGMENT
DEEP = SetResult.TOO_DEEP
LARGE = SetResult.TOO_LARGE


def build(
    *params: tuple[str, str], max_depth: int = 4, max_slots: int = 10
) -> tuple[dict[str, Any], list[SetResult]]:
    root: dict[str, Any] = {}
    builder = DotPathBuilder(root, max_depth=max_depth, max_slots=max_slots)
    return root, [builder.set(key, value) for key, value in params]


@pytest.mark.parametrize(
    ("params", "root", "results"),
    [
        ([("a", "1")], {"a": "1"}, [SET]),
        ([("a.b.c", "1")], {"a": {"b": {"c": "1"}}}, [SET]),
        ([("a.b", "1"), ("a.c", "2")], {"a": {"b": "1", "c": "2"}}, [SET, SET]),
        ([("7", "x")], {"7": "x"}, [SET]),  # numeric at the top: a key
        ([("a.2", "x")], {"a": [None, None, "x"]}, [SET]),
        ([("a.2", "x"), ("a.0", "y")], {"a": ["y", None, "x"]}, [SET, SET]),
        ([("a.0.b", "x")], {"a": [{"b": "x"}]}, [SET]),
        ([("a.1.0", "x")], {"a": [None, ["x"]]}, [SET]),
        ([("a.b", "1"), ("a.2", "x")], {"a": {"b": "1", "2": "x"}}, [SET, SET]),
        ([("a.007", "x")], {"a": [None] * 7 + ["x"]}, [SET]),
        ([("a.٣", "x")], {"a": {"٣": "x"}}, [SET]),  # not ASCII digits: a key
        # conflicts: the first parameter to claim a path wins
        ([("a", "1"), ("a.b", "2")], {"a": "1"}, [SET, CONFLICT]),
        ([("a.b", "2"), ("a", "1")], {"a": {"b": "2"}}, [SET, CONFLICT]),
        ([("a.0", "1"), ("a.b", "2")], {"a": ["1"]}, [SET, CONFLICT]),
        ([("a.0", "1"), ("a.0.b", "2")], {"a": ["1"]}, [SET, CONFLICT]),
        ([("a.1", "1"), ("a.01", "2")], {"a": [None, "1"]}, [SET, CONFLICT]),
        ([("a", "1"), ("a", "2")], {"a": "1"}, [SET, CONFLICT]),
        ([("a.b.c", "1"), ("a.b", "2")], {"a": {"b": {"c": "1"}}}, [SET, CONFLICT]),
        # empty segments
        ([("", "1"), (".a", "1"), ("a.", "1"), ("a..b", "1")], {}, [EMPTY] * 4),
        # limits
        ([("a.b.c.d", "1"), ("a.b.c.d.e", "1")], {"a": {"b": {"c": {"d": "1"}}}}, [SET, DEEP]),
        ([("a.9", "1")], {"a": [None] * 9 + ["1"]}, [SET]),
        ([("a.10", "1")], {}, [LARGE]),
        ([("a.99999999999999999999", "1")], {}, [LARGE]),
        ([("a." + "0" * 5000 + "9", "1")], {"a": [None] * 9 + ["1"]}, [SET]),
        ([("a." + "9" * 5000, "1")], {}, [LARGE]),
        ([("a.5", "1"), ("b.4", "1")], {"a": [None] * 5 + ["1"]}, [SET, LARGE]),
        ([("a.4", "1"), ("a.9", "1")], {"a": [None] * 4 + ["1"] + [None] * 4 + ["1"]}, [SET, SET]),
    ],
)
def test_set(params: list[tuple[str, str]], root: dict[str, Any], results: list[SetResult]) -> None:
    assert build(*params) == (root, results)


def test_nothing_changes_on_failure() -> None:
    root, results = build(("a.0", "x"), ("a.1.b.9.c", "y"), max_depth=6, max_slots=10)
    assert results == [SET, LARGE]
    assert root == {"a": ["x"]}


keys = st.lists(st.sampled_from(["a", "b", "0", "1", "3", "", "00"]), min_size=1, max_size=6).map(
    ".".join
)


def _slots(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_slots(child) for child in value.values())
    if isinstance(value, list):
        return len(value) + sum(_slots(child) for child in value)
    return 0


def _get(root: Any, segments: list[str]) -> Any:
    for segment in segments:
        root = root[int(segment)] if isinstance(root, list) else root[segment]
    return root


@settings(max_examples=500)
@given(params=st.lists(st.tuples(keys, st.text(max_size=3)), max_size=12))
def test_properties(params: list[tuple[str, str]]) -> None:
    root: dict[str, Any] = {}
    builder = DotPathBuilder(root, max_depth=5, max_slots=8)
    for key, value in params:
        before = repr(root)
        result = builder.set(key, value)
        if result is SetResult.SET:
            assert _get(root, key.split(".")) == value
        else:
            assert repr(root) == before
        assert _slots(root) <= 8


# Found by mutation testing: the array slots each parameter uses, counted at
# the limit and one under it, and appending right after a list's last slot.
@pytest.mark.parametrize(
    ("keys", "max_slots", "results", "expected"),
    [
        # 3 + 4 slots for the two new arrays.
        (["a.2.3"], 7, ["SET"], {"a": [None, None, [None, None, None, "v"]]}),
        (["a.2.3"], 6, ["TOO_LARGE"], {}),
        # Filling a hole takes no slot.
        (["a.3", "a.1"], 4, ["SET", "SET"], {"a": [None, "v", None, "v"]}),
        # Growing a list by two takes two.
        (["a.0", "a.2"], 3, ["SET", "SET"], {"a": ["v", None, "v"]}),
        (["a.0", "a.2"], 2, ["SET", "TOO_LARGE"], {"a": ["v"]}),
        # The next slot right after the last.
        (["a.0", "a.1"], 2, ["SET", "SET"], {"a": ["v", "v"]}),
    ],
)
def test_array_slots_are_counted_exactly(
    keys: list[str], max_slots: int, results: list[str], expected: dict[str, Any]
) -> None:
    root: dict[str, Any] = {}
    builder = DotPathBuilder(root, max_depth=5, max_slots=max_slots)
    assert [builder.set(key, "v").name for key in keys] == results
    assert root == expected


@settings(max_examples=500)
@given(st.lists(st.text(st.sampled_from("0129a.\u0663\n "), min_size=1, max_size=4), max_size=5))
@example(["a", "12\n"])
@example(["7", "x"])
@example(["a", "\u0663"])  # an Arabic-Indic digit: isdigit(), but no index
def test_the_index_search_finds_exactly_the_numeric_segments(segments: list[str]) -> None:
    key = ".".join(segments)
    pieces = key.split(".")
    numeric = any(piece.isdigit() and piece.isascii() for piece in pieces[1:])
    if "" not in pieces:
        assert (_dotpath._INDEX_SEGMENT.search(key) is not None) is numeric
