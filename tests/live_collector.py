"""A real collector (``create_app``) served by werkzeug on 127.0.0.1 and a free port.

For the API's and the live page's tests: threaded, so that a long poll and a
pixel are answered at the same time, as under `serve`.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from pixel_middleware import PixelMiddleware, PixelRecord
from pixel_middleware.collector import create_app
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import StoreError
from pixel_middleware.stores.memory import MemoryStore


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def segment_query(event: dict[str, Any]) -> str:
    return "data=" + base64.urlsafe_b64encode(json.dumps(event).encode()).decode().rstrip("=")


class LiveCollector:
    """``create_app(**options)`` on ``self.url``; ``close()`` stops it."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("store", "memory://")
        self.app: PixelMiddleware = create_app(**options)
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self.app, threaded=True, request_handler=QuietHandler
        )
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def pixel(self, event: dict[str, Any], call: str = "track", **headers: str) -> int:
        """Send a Segment pixel as a browser would; the answer's status."""
        response = requests.get(
            f"{self.url}/v1/pixel/{call}?{segment_query(event)}", headers=headers, timeout=10
        )
        return response.status_code

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.close()


class RefusingStore(MemoryStore):
    """A store that reads but refuses every write, as on a full disk."""

    def write(self, records: Sequence[PixelRecord]) -> None:
        raise StoreError("no space left on device")


def stalled_collector(directory: Path) -> LiveCollector:
    """A collector that can keep nothing: its store refuses writes, and its spool
    directory cannot be made because a file holds its name."""
    spool = directory / "spool"
    spool.write_text("")
    return LiveCollector(store=Recorder(RefusingStore(), spool_path=spool, keep_timeout=2))
