"""The debug twins of the pixel routes: a pixel's verdict as JSON, nothing recorded.

Like GA4's ``/debug/mp/collect``: ``/debug/v1/pixel/track?data=...`` takes the
same request as ``/v1/pixel/track`` and answers what the real route would make
of it (verdict, problems, notes, the decoded event and the status the real
route answers), so a developer can check a pixel URL before sending it for
real. The collector serves them always; :class:`~.middleware.PixelMiddleware`
and :class:`~.asgi.PixelASGIMiddleware` with ``debug_routes=True``.

Pure: a :class:`~.core.PixelOutcome` in, the answer out.
"""

from __future__ import annotations

import json
from typing import Final

from pixel_middleware.core import ALLOWED_METHODS, PixelOutcome

__all__ = ["DEBUG_ROOT", "debug_answer"]

#: The path every debug twin starts with, before the pixel route it mirrors.
DEBUG_ROOT: Final = "/debug"

_HEADERS: Final = (
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)


def debug_answer(outcome: PixelOutcome) -> tuple[int, list[tuple[str, str]], bytes]:
    """The twin's answer to ``outcome``: status, headers and JSON body.

    ``200`` with the verdict for a decoded pixel; ``405`` (with ``Allow``) for a
    method pixels do not take; for HEAD, the real answer's status and no record.
    """
    headers = list(_HEADERS)
    if outcome.record is None:
        if outcome.status == 405:
            headers.append(("Allow", ALLOWED_METHODS))
            return 405, headers, _json({"error": "pixels answer GET and HEAD only"})
        return outcome.status, headers, _json({"recorded": False})
    record = outcome.record
    return (
        200,
        headers,
        _json(
            {
                "recorded": False,
                "accepted": record["accepted"],
                "status": outcome.status,
                "dialect": record["dialect"],
                "call": record["call"],
                "problems": record["problems"],
                "notes": record["notes"],
                "event": record["event"],
            }
        ),
    )


def _json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")
