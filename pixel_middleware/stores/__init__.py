"""Where records go: one small interface, chosen everywhere by a store URL.

``sqlite:///path`` (the default, ``./pixel-events.sqlite3``), ``jsonl:///path``,
``memory://``; later ``redis://``, forwarding and fan-out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pixel_middleware.core import PixelRecord

DEFAULT_STORE_URL = "sqlite:///pixel-events.sqlite3"
STORE_ENV_VAR = "PIXEL_STORE"


class StoreError(Exception):
    """A store could not write or read; the records given to it were not kept."""


class Store(Protocol):
    url: str

    def write(self, records: Sequence[PixelRecord]) -> None:
        """Keep ``records`` durably, in order, all or none; raise StoreError on failure."""

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        """Matching records after position ``after``, oldest first, each with its position.

        With ``limit``, only the newest ``limit`` of them (still oldest first).
        """

    def close(self) -> None: ...
