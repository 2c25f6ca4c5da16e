"""Several stores at once: every record goes to each of them.

Usage::

    store = FanoutStore.from_url(
        "fanout://sqlite:///pixel-events.sqlite3 forward+https://api.segment.io"
    )
    # or, from stores already open:
    store = FanoutStore([open_store("sqlite:///pixel-events.sqlite3"), forward_store])

The URL is ``fanout://`` followed by the stores' own URLs, separated by spaces (a
space is never part of a URL, while a comma may be), so in an environment variable::

    PIXEL_STORE="fanout://sqlite:///pixel-events.sqlite3 redis://10.0.0.5:6379/0"

``write()`` writes the records to each store in turn. If any store fails, it raises
``StoreError`` naming the stores that failed, and the recorder hands the same
records over again later. So that a store that keeps failing does not make the
others keep the same records many times over, the fan-out remembers which record
ids each store already took and, when the records come again, gives each store only
those it does not have yet. It forgets them once a write reaches every store.
What it remembers lives in memory, at most ``max_tracked`` ids per store (the
oldest are forgotten first), so a restart in the middle of an outage, or an outage
longer than ``max_tracked`` records, can still hand a store some records twice:
at-least-once, like every retry. Readers can drop repeats by record ``id``.

``read()`` reads from the first store that can be read (a forwarding store cannot)
and only from it: positions from one store mean nothing to another, so it never
falls back to a second store when the first fails. Put the store you want to read
first. ``stores`` gives the stores themselves (say, to ask a forwarding store how
many events are pending).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import (
    RecordError,
    Store,
    StoreError,
    open_store,
    redact_url,
    store_identity,
)

__all__ = ["DEFAULT_MAX_TRACKED", "FanoutStore"]

SCHEME = "fanout://"

#: Record ids remembered per store while another store fails (about 100 bytes each).
DEFAULT_MAX_TRACKED = 100_000


class FanoutStore:
    """Writes every record to each of ``stores``; reads from the first readable one.

    :param stores: The stores, in order; closed by :meth:`close`.
    :param max_tracked: The most record ids remembered per store while another
        store fails (see the module documentation).
    """

    def __init__(self, stores: Sequence[Store], *, max_tracked: int = DEFAULT_MAX_TRACKED) -> None:
        if not stores:
            raise ValueError("a fan-out needs at least one store")
        if isinstance(max_tracked, bool) or not isinstance(max_tracked, int) or max_tracked < 0:
            raise ValueError(
                f"max_tracked must be a whole number of 0 or more, not {max_tracked!r}"
            )
        self.stores: tuple[Store, ...] = tuple(stores)
        self.url = SCHEME + " ".join(_url(store) for store in self.stores)
        # What tells this fan-out apart, secrets included (see Store): never shown.
        self.spool_key = SCHEME + " ".join(store_identity(store) for store in self.stores)
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self._closed = False
        # Per store: ids of records it took while another store failed. A dict
        # keeps insertion order, so the oldest is forgotten first.
        self._taken: list[dict[str, None]] = [{} for _ in self.stores]

    @classmethod
    def from_url(cls, url: str, *, create: bool = True) -> FanoutStore:
        """The fan-out for ``fanout://URL URL ...``; each URL opened with ``open_store``.

        ``create=False`` (a reader) is passed on, so that reading creates no
        child's file either.
        """
        if not url.lower().startswith(SCHEME):
            raise ValueError(f"a fan-out URL starts with {SCHEME}, not {redact_url(url)!r}")
        urls = url[len(SCHEME) :].split()
        if not urls:
            raise ValueError(
                f"{redact_url(url)!r} names no stores: write {SCHEME}URL URL ..., "
                "e.g. fanout://sqlite:///pixel-events.sqlite3 forward+https://api.segment.io"
            )
        stores: list[Store] = []
        try:
            for child in urls:
                stores.append(open_store(child, create=create))
        except BaseException:
            for store in stores:
                store.close()
            raise
        fanout = cls(stores)
        fanout.url = redact_url(url)
        fanout.spool_key = url
        return fanout

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Write ``records`` to every store; raise StoreError if any of them failed."""
        if not records:
            return
        with self._lock:
            if self._closed:
                raise StoreError("the fan-out store is closed")
            ids = [_id(record) for record in records]
            failures: list[tuple[Store, Exception]] = []
            took: list[tuple[int, list[str | None]]] = []
            for index, store in enumerate(self.stores):
                taken = self._taken[index]
                todo = [r for r, i in zip(records, ids, strict=True) if i is None or i not in taken]
                if not todo:
                    continue
                try:
                    store.write(todo)
                except Exception as exc:
                    failures.append((store, exc))
                else:
                    took.append((index, [_id(record) for record in todo]))

            if not failures:
                # Every store has these records now: nothing left to remember.
                for taken in self._taken:
                    if taken:
                        for i in ids:
                            if i is not None:
                                taken.pop(i, None)
                return

            for index, written in took:
                taken = self._taken[index]
                taken.update((i, None) for i in written if i is not None)
                while len(taken) > self.max_tracked:
                    del taken[next(iter(taken))]

        detail = "; ".join(f"{_url(store)}: {exc}" for store, exc in failures)
        message = f"{len(failures)} of {len(self.stores)} stores failed: {detail}"
        kind = RecordError if all(isinstance(e, RecordError) for _, e in failures) else StoreError
        raise kind(message) from failures[0][1]

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        """``read()`` of the first store that can be read."""
        for store in self.stores:
            if getattr(store, "readable", True):
                return store.read(accepted=accepted, call=call, after=after, limit=limit)
        raise StoreError(f"none of the stores in {self.url} can be read")

    def close(self) -> None:
        """Close every store, even when one fails to close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        first: BaseException | None = None
        for store in self.stores:
            try:
                store.close()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise StoreError(f"closing {self.url}: {first}") from first

    def __repr__(self) -> str:
        return f"FanoutStore({self.url!r})"


def _id(record: PixelRecord) -> str | None:
    value = record.get("id") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _url(store: Store) -> str:
    """The store's URL as it may be shown (a store of one's own may keep secrets there)."""
    return redact_url(str(getattr(store, "url", type(store).__name__)))
