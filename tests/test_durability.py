"""Proofs that an answered pixel is kept: real servers, real processes, real failures.

Each test runs a real multi-worker gunicorn serving a tiny app wrapped in
PixelMiddleware (durable, the default), puts it under load from a real HTTP client,
breaks something in the middle, and then checks that every pixel answered 200 made
it to its destination:

1. a worker is killed with SIGKILL mid-load (SQLite store);
2. Redis is killed and started again mid-load (Redis store, with the spool);
3. the forwarding endpoint keeps going down and failing (forwarding store).

Loopback only; bounded counts and timeouts. docs/durability.md says what they prove.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from pixel_middleware.stores.redis import RedisStore
from pixel_middleware.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from batch_server import BatchServer

# Fixtures from the helper modules; imported only through this, so pytest rewrites
# their asserts (a plain import first would make it warn, and warnings are errors).
pytest_plugins = ["batch_server", "redis_server"]

# Linux only: the proofs find gunicorn's workers through /proc.

APP = """\
import os

from pixel_middleware.middleware import PixelMiddleware


def site(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"site"]


app = PixelMiddleware(site, store=os.environ["DURABILITY_STORE"])
"""


class Gunicorn:
    """gunicorn with ``workers`` gthread workers serving APP from ``directory``."""

    def __init__(self, directory: Path, store: str, *, workers: int = 3) -> None:
        self.directory = directory
        # The test binds the socket (port 0: no race for a free port with other
        # programs) and gunicorn serves on it, inherited as a file descriptor.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "durability_app.py").write_text(APP)
        self.log = (directory / "gunicorn.log").open("wb")
        with listener:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "gunicorn",
                    "--chdir", str(directory),
                    "--workers", str(workers),
                    "--worker-class", "gthread",
                    "--threads", "8",
                    "--bind", f"fd://{listener.fileno()}",
                    "--graceful-timeout", "20",
                    "durability_app:app",
                ],
                cwd=directory,
                env={**os.environ, "DURABILITY_STORE": store},
                stdout=self.log,
                stderr=subprocess.STDOUT,
                pass_fds=[listener.fileno()],
            )  # fmt: skip

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(self.url + "/", timeout=1).text == "site":
                    return
            except requests.RequestException:  # not listening, or no worker yet
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not start: {self.output()}")
            time.sleep(0.05)

    def workers(self) -> list[int]:
        """The pids of the workers (children of the master), from /proc."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after it.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.process.pid:
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """A graceful stop (SIGTERM): workers finish their requests and flush."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.directory / "gunicorn.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Gunicorn]]:
    started: list[Gunicorn] = []

    def start(store: str) -> Gunicorn:
        server = Gunicorn(tmp_path, store)
        started.append(server)  # stopped after the test, even if it never served
        server.wait_until_serving()
        return server

    yield start
    for server in started:
        server.stop()


class Load:
    """``count`` pixels from ``threads`` clients, each with its own messageId.

    ``answered`` maps each messageId to the status it got (0: no answer at all).
    """

    def __init__(self, url: str, count: int, *, threads: int = 8) -> None:
        self.url = url
        self.ids = [f"durable-{n}-{uuid.uuid4()}" for n in range(count)]
        self.answered: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)
        self._local = threading.local()
        self._futures = [self._pool.submit(self._send, message_id) for message_id in self.ids]

    def _send(self, message_id: str) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        event = {"writeKey": "wk", "userId": "u", "event": "Opened", "messageId": message_id}
        data = base64.urlsafe_b64encode(json.dumps(event).encode()).decode().rstrip("=")
        try:
            # A new connection per pixel, as from many browsers: gunicorn spreads
            # them over its workers (kept-alive ones would stick to one worker).
            response = session.get(
                f"{self.url}/v1/pixel/track?data={data}",
                headers={"Connection": "close"},
                timeout=15,
            )
            status = response.status_code if response.content.startswith(b"GIF89a") else -1
        except Exception:
            # Not only RequestException: any other error left the pixel out of
            # `answered`, and wait_until() then waited out its whole deadline.
            status = 0
            session.close()
            self._local.session = None
        with self._lock:
            self.answered[message_id] = status

    def done(self) -> int:
        with self._lock:
            return len(self.answered)

    def wait_until(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < count:
            assert time.monotonic() < deadline, f"only {self.done()} of {count} answered"
            time.sleep(0.005)

    def finish(self) -> set[str]:
        """Wait for every pixel; the messageIds that were answered 200 (with the GIF)."""
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        ok = {message_id for message_id, status in self.answered.items() if status == 200}
        assert len(ok) > len(self.ids) // 2, Counter(self.answered.values())
        return ok


def test_kill_9_of_a_worker_loses_no_answered_pixel(
    serve: Callable[[str], Gunicorn], tmp_path: Path
) -> None:
    server = serve("sqlite:///events.sqlite3")
    load = Load(server.url, 1500, threads=16)
    # Four times, so that respawned workers are killed too; each kill cuts off the
    # pixels that worker had in flight, some before their commit, some after.
    for at in (200, 500, 800, 1100):
        load.wait_until(at)
        os.kill(server.workers()[0], signal.SIGKILL)
    ok = load.finish()
    server.stop()

    store = SQLiteStore(tmp_path / "events.sqlite3")
    kept = Counter(
        record["event"]["messageId"] for _, record in store.read() if record["event"] is not None
    )
    store.close()
    assert ok <= set(kept), f"{len(ok - set(kept))} answered pixels lost"


def test_kill_9_of_the_master_and_every_worker_then_a_restart_stores_each_pixel_once(
    serve: Callable[[str], Gunicorn], tmp_path: Path
) -> None:
    # The whole server dies at once, as in an out-of-memory kill or a container
    # stop with SIGKILL: no worker flushes anything. What was answered 200 is in
    # the workers' journals; the next server's workers adopt them, and SQLite's
    # journal positions make the replay exact.
    server = serve("sqlite:///events.sqlite3")
    load = Load(server.url, 1500, threads=16)
    load.wait_until(1000)
    workers = server.workers()
    os.kill(server.process.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    server.process.wait(10)
    ok = load.finish()
    spool = next((tmp_path / "pixel-spool").iterdir())
    assert list(spool.glob("*.jsonl")), "the dead workers left their journals"

    again = serve("sqlite:///events.sqlite3")
    deadline = time.monotonic() + 30
    while list(spool.glob("*.jsonl")):
        assert time.monotonic() < deadline, again.output()
        time.sleep(0.05)
    again.stop()

    store = SQLiteStore(tmp_path / "events.sqlite3")
    kept = Counter(
        record["event"]["messageId"] for _, record in store.read() if record["event"] is not None
    )
    store.close()
    assert ok <= set(kept), f"{len(ok - set(kept))} answered pixels lost"
    assert [message_id for message_id, count in kept.items() if count > 1] == [], "stored twice"


@pytest.mark.redis
def test_redis_outage_under_load_loses_no_answered_pixel(
    serve: Callable[[str], Gunicorn], tmp_path: Path
) -> None:
    import redis_server

    redis = redis_server.RedisServer(tmp_path / "redis", persistent=True)
    redis.directory.mkdir()
    redis.start()
    try:
        server = serve(redis.url + "?timeout=0.5")
        load = Load(server.url, 1500)
        load.wait_until(400)
        redis.stop()
        stopped_at = load.done()
        load.wait_until(900)
        answered_while_down = load.done() - stopped_at
        redis.start()
        ok = load.finish()
        assert answered_while_down > 300  # from the spools

        # The spools drain into Redis once it is back (a retry every second).
        store = RedisStore(redis.url)
        deadline = time.monotonic() + 20
        while True:
            rows = store.read()
            seen = {r["event"]["messageId"] for _, r in rows if r["event"] is not None}
            if ok <= seen or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        server.stop()
        rows = store.read()
        store.close()
    finally:
        redis.stop()

    records_by_message: defaultdict[str, set[str]] = defaultdict(set)
    for _, record in rows:
        assert record["event"] is not None
        records_by_message[record["event"]["messageId"]].add(record["id"])
    assert ok <= set(records_by_message), f"{len(ok - set(records_by_message))} lost"
    # Repeats, if any, are the same record written again (at-least-once), never a
    # second record for one pixel.
    assert all(len(ids) == 1 for ids in records_by_message.values())


def outbox_pending(directory: Path) -> int:
    """Events waiting in the workers' shared outbox, read as another process would."""
    with contextlib.closing(sqlite3.connect(directory / "outbox.sqlite3", timeout=10)) as db:
        ((count,),) = db.execute("SELECT count(*) FROM outbox").fetchall()
    return int(count)


def test_a_flapping_forwarding_endpoint_gets_every_event(
    serve: Callable[[str], Gunicorn], batch_server: BatchServer, tmp_path: Path
) -> None:
    server = serve(
        f"forward+{batch_server.url}?outbox=outbox.sqlite3"
        "&timeout=2&backoff=0.01&backoff_max=1&poll=0.1"
    )
    load = Load(server.url, 1200)
    # While the pixels come in: 500s, a 429 with Retry-After, and two outages.
    batch_server.inject(500, times=3)
    batch_server.inject(429, retry_after=1)
    load.wait_until(300)
    batch_server.down()
    load.wait_until(600)
    # Proof the endpoint was down while pixels were answered: nothing listens on
    # its port, and what was answered meanwhile waits in the outbox.
    with pytest.raises(requests.ConnectionError):
        requests.post(batch_server.url + "/v1/batch", data=b"{}", timeout=2)
    assert outbox_pending(tmp_path) > 0
    batch_server.up()
    batch_server.inject(503, times=2)
    load.wait_until(900)
    batch_server.down()
    time.sleep(0.5)
    batch_server.up()
    ok = load.finish()

    deadline = time.monotonic() + 30
    while not ok <= set(batch_server.message_ids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    server.stop()
    arrived = batch_server.message_ids()
    assert ok <= set(arrived), (
        f"{len(ok - set(arrived))} events never arrived; outbox {outbox_pending(tmp_path)},"
        f" answers {Counter(r.status for r in batch_server.requests)}"
    )
    statuses = Counter(request.status for request in batch_server.requests)
    assert statuses[500] == 3
    assert statuses[429] == 1
    assert statuses[503] == 2


def test_serve_answers_503_when_nothing_can_keep_a_pixel_and_still_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    # A real collector whose store and spool both refuse writes, as on a full
    # disk: /dev/full answers ENOSPC to every write, even root's, and the spool
    # directory cannot be made because a file has its name.
    from pixel_middleware.recorder import default_spool_path

    store = "jsonl:////dev/full"
    spool = tmp_path / default_spool_path(store)
    spool.parent.mkdir()
    spool.write_text("")
    process = subprocess.Popen(
        [sys.executable, "-m", "pixel_middleware.cli", "serve", "--port", "0", "--store", store],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("Collecting pixels on http://127.0.0.1:"), line
        url = line.split()[3].rstrip(",")
        event = {"writeKey": "wk", "userId": "u", "event": "Opened"}
        data = base64.urlsafe_b64encode(json.dumps(event).encode()).decode()
        started = time.monotonic()
        segment = requests.get(f"{url}v1/pixel/track?data={data}", timeout=10)
        rudder = requests.get(
            f"{url}pixel/v1/track?writeKey=wk&anonymousId=a&event=Opened", timeout=10
        )
        assert time.monotonic() - started < 10, "an honest answer, not a hang"
        for response in (segment, rudder):
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "5"
            assert response.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
        assert segment.content.startswith(b"GIF89a"), "Segment: always the GIF"
        assert segment.headers["Content-Type"] == "image/gif"
        assert rudder.text.startswith("Service Unavailable")
        assert "Opened" not in rudder.text, "no answer repeats its input"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 5, "stopped within the drain time"
        assert process.returncode == 0, err
        assert "not kept" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
