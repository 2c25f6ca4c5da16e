"""Building an event from dot-notation query parameters (``context.page.url=...``).

This is how rudder-server's gateway turns a pixel's query into an event (it calls
``sjson.SetBytes(body, key, value)`` per key), and how Segment's unencoded pixel
form is read. rudder-server's outcome for conflicting keys depends on Go's map
order; ours is deterministic: parameters apply in query order and **the first
parameter to claim a path wins** (see docs/dialects.md, "Conflicts").
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

__all__ = ["DotPathBuilder", "SetResult"]

_MISSING: Any = object()
# A segment after the first made only of ASCII digits (str.isdigit() and
# str.isascii()): the only kind that can make an array.
_INDEX_SEGMENT = re.compile(r"\.[0-9]+(?:\.|\Z)")


class SetResult(Enum):
    """What happened to one parameter."""

    SET = "set"
    EMPTY_SEGMENT = "empty_segment"  # the key is empty or has an empty segment (``a..b``)
    CONFLICT = "conflict"  # an earlier parameter already claimed the path
    TOO_DEEP = "too_deep"  # more segments than ``max_depth``
    TOO_LARGE = "too_large"  # an array index or the arrays' total size is past the limit


class DotPathBuilder:
    """Sets string values into ``root`` by dot path, with bounded cost.

    - Segments are separated by ``.``; every value stays a string.
    - A purely numeric (ASCII digits) segment below the top level makes its
      parent an array padded with ``None`` (``items.2=x`` gives
      ``[None, None, "x"]``); at the top level it is an ordinary key. Walking
      into an existing object, a numeric segment is an ordinary key too (as
      sjson does).
    - ``max_slots`` bounds the total length of all arrays together, so that no
      query can make us allocate more than that many list slots.
    """

    __slots__ = ("_index_digits", "max_depth", "max_index", "root", "slots_left")

    def __init__(self, root: dict[str, Any], *, max_depth: int, max_slots: int) -> None:
        self.root = root
        self.max_depth = max_depth
        # An index must be < max_slots; longer digit strings are too large
        # without converting them (int() of a huge digit string is slow and,
        # past 4300 digits, raises).
        self.max_index = max_slots - 1
        self._index_digits = len(str(self.max_index))
        self.slots_left = max_slots

    def set(self, key: str, value: str) -> SetResult:
        """Set ``value`` at the dot path ``key``; nothing changes unless the result is SET."""
        if "." not in key:
            # The common case: a top-level key.
            if not key:
                return SetResult.EMPTY_SEGMENT
            if key in self.root:
                return SetResult.CONFLICT
            self.root[key] = value
            return SetResult.SET
        segments = key.split(".")
        if "" in segments:
            return SetResult.EMPTY_SEGMENT
        count = len(segments)
        if count > self.max_depth:
            return SetResult.TOO_DEEP
        if _INDEX_SEGMENT.search(key) is None:
            # No segment past the first is a number (nearly always): one C
            # search instead of a test of each segment.
            return self._set_in_objects(segments, value)
        indexes: list[int | None] | None = None
        for position in range(1, count):
            segment = segments[position]
            if segment.isdigit() and segment.isascii():
                digits = segment.lstrip("0")  # "007" is index 7
                if len(digits) > self._index_digits:
                    return SetResult.TOO_LARGE
                index = int(digits or "0")
                if index > self.max_index:
                    return SetResult.TOO_LARGE
                if indexes is None:
                    indexes = [None] * count
                indexes[position] = index
        if indexes is None:
            return self._set_in_objects(segments, value)
        node: dict[str, Any] | list[Any] = self.root
        last = len(segments) - 1
        for position, segment in enumerate(segments):
            child: Any
            if isinstance(node, dict):
                child = node.get(segment)
                if segment not in node:
                    return self._create(node, segment, segments, indexes, position, value)
            else:
                slot = indexes[position]
                if slot is None:
                    return SetResult.CONFLICT  # an object key where an array stands
                child = node[slot] if slot < len(node) else None
                if child is None:  # a padding slot (or past the end) is free
                    return self._create(node, slot, segments, indexes, position, value)
            if position == last or not isinstance(child, (dict, list)):
                # A scalar where a container stands, or the reverse.
                return SetResult.CONFLICT
            node = child
        return SetResult.CONFLICT  # pragma: no cover - the loop always returns

    def _set_in_objects(self, segments: list[str], value: str) -> SetResult:
        """``set`` for a path without numeric segments (the common case): objects only."""
        node = self.root
        last = len(segments) - 1
        for position in range(last):
            segment = segments[position]
            child = node.get(segment, _MISSING)
            if child is _MISSING:
                built: Any = value
                for depth in range(last, position, -1):
                    built = {segments[depth]: built}
                node[segment] = built
                return SetResult.SET
            if type(child) is not dict:
                # A scalar stands where a container is needed, or an array
                # where an object key is.
                return SetResult.CONFLICT
            node = child
        if segments[last] in node:
            return SetResult.CONFLICT
        node[segments[last]] = value
        return SetResult.SET

    def _create(
        self,
        node: dict[str, Any] | list[Any],
        slot: str | int,
        segments: list[str],
        indexes: list[int | None],
        position: int,
        value: str,
    ) -> SetResult:
        # Count the list slots this needs before changing anything.
        needed = 0
        for index in indexes[position + 1 :]:
            if index is not None:
                needed += index + 1
        if isinstance(node, list):
            assert isinstance(slot, int)
            needed += max(0, slot + 1 - len(node))
        if needed > self.slots_left:
            return SetResult.TOO_LARGE
        self.slots_left -= needed

        built: Any = value
        for depth in range(len(segments) - 1, position, -1):
            index = indexes[depth]
            if index is None:
                built = {segments[depth]: built}
            else:
                array: list[Any] = [None] * (index + 1)
                array[index] = built
                built = array
        if isinstance(node, list):
            assert isinstance(slot, int)
            if slot >= len(node):
                node.extend([None] * (slot + 1 - len(node)))
            node[slot] = built
        else:
            assert isinstance(slot, str)
            node[slot] = built
        return SetResult.SET
