"""Records built by hand, for tests that need a PixelRecord but not a decoder.

Usage::

    from records import make_record

    record = make_record(call="page", accepted=False)
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, cast

from pixel_middleware.core import PixelRecord

_counter = itertools.count()


def make_record(**overrides: Any) -> PixelRecord:
    """A valid accepted Segment ``track`` record with a fresh id; ``overrides`` replace fields.

    Each call gets a new ``id`` and ``messageId`` and a ``receivedAt`` one
    millisecond after the previous call's, so records sort as they were made.
    """
    n = next(_counter)
    message_id = str(uuid.uuid4())
    received_at = f"2024-05-01T12:{n // 60_000 % 60:02d}:{n // 1000 % 60:02d}.{n % 1000:03d}Z"
    record: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "receivedAt": received_at,
        "dialect": "segment",
        "call": "track",
        "writeKey": "test-write-key",
        "accepted": True,
        "problems": [],
        "notes": [],
        "event": {
            "type": "track",
            "event": "Order Completed",
            "userId": "user-1",
            "messageId": message_id,
            "properties": {"revenue": 42.5, "currency": "EUR"},
        },
        "request": {
            "method": "GET",
            "path": "/v1/pixel/track",
            "query": "data=...",
            "ip": "203.0.113.7",
            "userAgent": "pytest",
        },
    }
    if overrides.get("accepted") is False and "problems" not in overrides:
        record["problems"] = [{"rule": "writeKey", "message": "writeKey is missing"}]
    record.update(overrides)
    return cast(PixelRecord, record)
