"""Real servers on 127.0.0.1 and a free port, in a thread, for the tests.

- :class:`Collector`: ``PixelMiddleware`` over a 404 app with a memory store,
  for the tests that put mitmproxy in front of a collector;
- :func:`serving`: any WSGI app (such as ``create_app()``), served by werkzeug.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from pixel_middleware import PixelMiddleware, PixelRecord

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class QuietHandler(WSGIRequestHandler):
    """No access log: some targets are 70 kB long."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def not_found(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


class Collector:
    """A real collector on 127.0.0.1:<free port>: PixelMiddleware over a 404 app."""

    def __init__(self, *, tls: bool = False) -> None:
        self.middleware = PixelMiddleware(not_found, store="memory://")
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1",
            0,
            self.middleware,
            threaded=True,
            request_handler=QuietHandler,
            ssl_context="adhoc" if tls else None,
        )
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def records(self) -> list[PixelRecord]:
        assert self.middleware.store is not None
        return [record for _, record in self.middleware.store.read()]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.middleware.close()


@contextlib.contextmanager
def serving(app: WSGIApplication) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> while the block runs; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
