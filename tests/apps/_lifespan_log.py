"""Where the ASGI test sites note their own lifespan events, for the tests to read.

``LIFESPAN_LOG`` names a file; each event appends one line (``startup``,
``shutdown``), so a test sees that the app's own startup and shutdown ran with the
pixel middleware in front.
"""

from __future__ import annotations

import os


def note(event: str) -> None:
    path = os.environ.get("LIFESPAN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(event + "\n")
