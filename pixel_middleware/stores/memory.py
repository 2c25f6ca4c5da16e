"""``memory://``: records kept in this process only, for tests and trials.

Each :func:`~pixel_middleware.stores.open_store` of ``memory://`` is a new,
empty store; nothing survives the process. Positions are the records' indexes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import (
    RecordError,
    StoreError,
    _check_limit,
    _parse_position,
    redact_url,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Keeps records in a list; thread-safe.

    Usage::

        store = MemoryStore()
        store.write([record])
        [(position, kept)] = store.read()
    """

    url = "memory://"
    spool_key = "memory://"
    # Lost with the process anyway: a Recorder writes it directly, with no
    # write-ahead journal (which would only add a disk write to each pixel).
    volatile = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (accepted, call, the record as JSON): kept as text, so that a caller
        # changing a record afterwards does not change what was kept, and so
        # that what a memory store takes and gives back is what a store on
        # disk would (a record that is not JSON fails here too).
        self._records: list[tuple[bool, str, str]] = []
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        if url.lower() != "memory://":
            raise ValueError(f"a memory store URL is just 'memory://', got {redact_url(url)!r}")
        return cls()

    def write(self, records: Sequence[PixelRecord]) -> None:
        try:
            kept = [
                (bool(record["accepted"]), record["call"], json.dumps(record)) for record in records
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"a record cannot be stored: {exc!r}") from exc
        with self._lock:
            if self._closed:
                raise StoreError("the memory store is closed")
            self._records.extend(kept)

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        start = 0 if after is None else _parse_position(after) + 1
        _check_limit(limit)
        with self._lock:
            found = [
                (index, text)
                for index, (is_accepted, its_call, text) in enumerate(self._records[start:], start)
                if (accepted is None or is_accepted is accepted)
                and (call is None or its_call == call)
            ]
        if limit is not None and limit < len(found):
            # Paging forward takes the oldest `limit` after `after`; without
            # it, the newest `limit`.
            found = found[:limit] if after is not None else found[len(found) - limit :]
        return [(str(index), json.loads(text)) for index, text in found]

    def close(self) -> None:
        """Refuse further writes; what was kept stays readable."""
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} records)"

    def clear(self) -> None:
        """Forget every record (the collector's ``POST /api/reset``).

        Positions start over at 0: a reader holding an older position reads
        from the start again.
        """
        with self._lock:
            self._records.clear()
