"""A real ``redis-server`` for the tests: a free loopback port, a temporary directory.

``RedisServer`` starts one without persistence (``--save "" --appendonly no``; with
``persistent=True`` an append-only file synced on every write), waits until it
answers PING, and can stop and start it again on the same port, so that a test can
take Redis away under a store and bring it back.

The ``redis_server`` fixture (one server per test module, emptied before each test)
is registered by ``pytest_plugins = ["redis_server"]`` in a test module; tests that
use it fail when ``redis-server`` is not installed (``./dev test`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self, directory: Path, port: int | None = None, *, persistent: bool = False
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        # persistent: an append-only file synced on every write, so that what Redis
        # acknowledged survives stop() (a kill -9) and is there again after start().
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, password: str | None = None) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=password, socket_timeout=5)

    def start(self) -> None:
        """Start the server; the first time, on another port if this one was taken."""
        for _ in range(5):
            try:
                self._start()
                break
            except RuntimeError:
                if self.started_once:
                    raise
                self.port = free_port()
        self.started_once = True

    def _start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                raise RuntimeError(f"redis-server exited with {code} (port {self.port} taken?)")
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server outright: an outage, not a tidy shutdown."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def redis_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (./dev test installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_server_module: RedisServer) -> RedisServer:
    """A running Redis with no keys; started again if a previous test stopped it."""
    if redis_server_module.process is None:
        redis_server_module.start()
    with redis_server_module.client() as client:
        client.flushall()
    return redis_server_module
