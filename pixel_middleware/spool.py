"""The outage spool of earlier versions, now the recorder's write-ahead journal.

:class:`Spool` is a :class:`~pixel_middleware.journal.Journal` that behaves as
the spool did: every append fsync'd, and a segment removed as soon as all its
records are handed on. The recorder uses the journal itself; these names stay
for code that imported them.
"""

from __future__ import annotations

import os

from pixel_middleware.journal import DEFAULT_MAX_BYTES, Journal, SpoolFullError, count_spooled

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "SpoolFullError", "count_spooled"]


class Spool(Journal):
    """Records waiting on disk, oldest first; every append synced (see the module)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, max_bytes: int | None = DEFAULT_MAX_BYTES
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, fsync=True, keep_drained=False)
