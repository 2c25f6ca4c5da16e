"""A real local HTTP Tracking API (``POST /v1/batch``) for the forwarding tests.

It checks what Segment's documentation promises to check (docs/dialects.md): a JSON
body of at most 500 KB holding ``batch``, a list of at most 2,500 events of at most
32 KB each, every one with a ``type``; the write key as the HTTP Basic user (empty
password) or as ``writeKey`` in the body. It answers 200 and keeps every event, or
400 with the reason. ``valid_keys`` makes it answer 401 to other keys, as a
RudderStack data plane does.

Switches for the failure tests: ``inject(status, times=, retry_after=, key=, body=)``
queues answers to give before looking at the request (500s, 429 with
``Retry-After``, 400/401), to any request or only to those of one write key, and
``down()``/``up()`` stop listening and listen again on the same port, which
stays bound meanwhile (connections are refused, and no other socket takes it).

The ``batch_server`` fixture gives a fresh running server per test; register it with
``pytest_plugins = ["batch_server"]`` in a test module.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MAX_BODY_BYTES = 500_000
MAX_EVENTS = 2_500
MAX_EVENT_BYTES = 32_000


@dataclass
class Request:
    """One request as the server saw it, answered or not."""

    at: float
    status: int
    auth_key: str | None
    body_key: str | None
    events: list[dict[str, Any]]
    body_bytes: int
    sent_at: str | None


@dataclass
class BatchServer:
    valid_keys: frozenset[str] | None = None
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._injected: list[tuple[int, int | None, str | None, str]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._reserved: socket.socket | None = None  # the port, held while down
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        assert self._httpd is None, "already up"
        reserved, self._reserved = self._reserved, None
        if reserved is None:
            self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        else:
            # Listen on the socket down() kept bound: binding the port again
            # would race any other socket for it.
            self._httpd = ThreadingHTTPServer(
                ("127.0.0.1", self.port), _handler(self), bind_and_activate=False
            )
            self._httpd.socket.close()
            self._httpd.socket = reserved
            self._httpd.server_activate()
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def down(self) -> None:
        """Stop listening: connections are refused until ``up()``."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(5)
        self._httpd = self._thread = None
        # Keep the port: a bound socket that does not listen refuses connections
        # (down, as wanted), and no other socket can take the port meanwhile.
        # Closing it left the port free for the whole outage: an outgoing
        # connection from this machine could get it as its ephemeral port, and
        # up() then failed with EADDRINUSE (shown by binding a client socket to
        # the port while down; not seen in 27 stress runs, which found another race).
        self._reserved = socket.socket()
        self._reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._reserved.bind(("127.0.0.1", self.port))

    def close(self) -> None:
        """Stop, and let the port go."""
        self.down()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def inject(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: int | None = None,
        key: str | None = None,
        body: str = "injected",
    ) -> None:
        """Answer the next ``times`` requests with ``status`` and ``body``, whatever
        they hold; with ``key``, the next ``times`` requests sent under that write key."""
        with self._lock:
            self._injected.extend([(status, retry_after, key, body)] * times)

    # -- what arrived -------------------------------------------------------------

    def message_ids(self) -> Counter[str]:
        """How many times each messageId was accepted."""
        with self._lock:
            return Counter(event["messageId"] for _, event in self.events)

    def wait_for(self, count: int, timeout: float = 10) -> bool:
        """Wait until ``count`` events (repeats included) were accepted."""
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the contract -------------------------------------------------------------

    def _answer(self, auth: str | None, body: bytes) -> tuple[int, dict[str, str], str, Request]:
        now = time.monotonic()
        request = Request(now, 0, _basic_user(auth), None, [], len(body), None)
        sender = request.auth_key or _body_key(body)
        with self._lock:
            # The first injected answer meant for any request, or for this key.
            index = next(
                (i for i, (_, _, key, _) in enumerate(self._injected) if key in (None, sender)),
                None,
            )
            answer = self._injected.pop(index) if index is not None else None
        if answer is not None:
            status, retry_after, _, text = answer
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, headers, text, request
        if len(body) > MAX_BODY_BYTES:
            return 400, {}, f"body is {len(body)} bytes, over {MAX_BODY_BYTES}", request
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {}, "invalid JSON", request
        if not isinstance(data, dict) or not isinstance(data.get("batch"), list):
            return 400, {}, "no batch", request
        request.body_key = data.get("writeKey")
        request.sent_at = data.get("sentAt")
        batch: list[Any] = data["batch"]
        if len(batch) > MAX_EVENTS:
            return 400, {}, f"{len(batch)} events, over {MAX_EVENTS}", request
        for event in batch:
            if not isinstance(event, dict) or "type" not in event:
                return 400, {}, "an event without a type", request
            text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
            size = len(text.encode(errors="surrogatepass"))
            if size > MAX_EVENT_BYTES:
                return 400, {}, f"an event of {size} bytes, over {MAX_EVENT_BYTES}", request
        key = request.auth_key or request.body_key
        if not key:
            return 400, {}, "no write key", request
        if self.valid_keys is not None and key not in self.valid_keys:
            return 401, {}, "Invalid write key", request
        request.events = batch
        with self._lock:
            self.events.extend((key, event) for event in batch)
        return 200, {}, "OK", request


def _body_key(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    key = data.get("writeKey") if isinstance(data, dict) else None
    return key if isinstance(key, str) else None


def _basic_user(header: str | None) -> str | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, _password = base64.b64decode(header[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user


def _handler(server: BatchServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so down() leaves no kept-alive
        # connection behind that would go on answering.
        protocol_version = "HTTP/1.0"

        def do_POST(self) -> None:
            if self.path != "/v1/batch":
                self._reply(404, {}, "not found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            status, headers, text, request = server._answer(self.headers["Authorization"], body)
            request.status = status
            with server._lock:
                server.requests.append(request)
            self._reply(status, headers, text)

        def _reply(self, status: int, headers: dict[str, str], text: str) -> None:
            payload = text.encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def batch_server() -> Iterator[BatchServer]:
    server = BatchServer()
    server.up()
    yield server
    server.close()
