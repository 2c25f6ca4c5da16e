"""The Recorder: group commit, backpressure, the spool, exit handling.

Real stores (memory, SQLite files) and real processes; the only stand-in is
``FlakyStore``, a memory store whose writes can be made to fail or to wait.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from records import make_record
from signal_masks import blocked_signals

from pixel_middleware.core import PixelRecord
from pixel_middleware.recorder import (
    DEFAULT_SPOOL_ROOT,
    Recorder,
    default_spool_path,
    install_signal_flush,
)
from pixel_middleware.stores import StoreError, open_store
from pixel_middleware.stores.memory import MemoryStore
from pixel_middleware.stores.sqlite import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent

# The postgres_url fixture, for the journal's exact replay on PostgreSQL.
pytest_plugins = ["postgres_server"]


class FlakyStore:
    """A memory store whose writes fail while ``failing`` is set, wait while
    ``gate`` is clear, and take ``delay`` seconds each."""

    url = "memory://flaky"

    def __init__(self, *, delay: float = 0.0, error: type[Exception] = StoreError) -> None:
        self.inner = MemoryStore()
        self.delay = delay
        self.error = error
        self.failing = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.writes: list[int] = []  # the size of each successful write
        self.closed = False

    def write(self, records: Sequence[PixelRecord]) -> None:
        self.gate.wait()
        if self.failing.is_set():
            raise self.error("the store is down")
        time.sleep(self.delay)
        self.inner.write(records)
        self.writes.append(len(records))

    def read(self, **query: Any) -> list[tuple[str, PixelRecord]]:
        return self.inner.read(**query)

    def close(self) -> None:
        self.closed = True

    def ids(self) -> list[str]:
        return [record["id"] for _, record in self.inner.read()]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_recorder(spool_dir: Path) -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(store: Any, **options: Any) -> Recorder:
        options.setdefault("spool_path", spool_dir)
        options.setdefault("retry_interval", 0.05)
        recorder = Recorder(store, **options)
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        store = recorder.store
        if isinstance(store, FlakyStore):
            store.failing.clear()
            store.gate.set()
        recorder.close(timeout=5)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def run_child(code: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


# --- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"max_batch": 0}, "max_batch must be", id="max-batch-0"),
        pytest.param({"max_batch": 2.5}, "max_batch must be", id="max-batch-float"),
        pytest.param({"max_pending": 0}, "max_pending must be", id="max-pending-0"),
        pytest.param({"max_pending": True}, "max_pending must be", id="max-pending-bool"),
        pytest.param({"retry_interval": 0}, "retry_interval must be", id="retry-0"),
        pytest.param({"retry_interval": float("nan")}, "retry_interval must be", id="retry-nan"),
        pytest.param({"linger": -0.001}, "linger must be", id="linger-negative"),
        pytest.param({"linger": float("inf")}, "linger must be", id="linger-inf"),
        pytest.param({"linger": float("nan")}, "linger must be", id="linger-nan"),
        pytest.param({"linger": True}, "linger must be", id="linger-bool"),
    ],
)
def test_bad_options_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Recorder(MemoryStore(), **options)


def test_a_store_must_be_a_store() -> None:
    with pytest.raises(TypeError, match="store must be a Store"):
        Recorder("sqlite:///x.db")  # type: ignore[arg-type]


def test_default_spool_is_per_store_url_under_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    one = Recorder(SQLiteStore("one.sqlite3"))
    two = Recorder(SQLiteStore("two.sqlite3"))
    try:
        assert one.spool_path.parent == tmp_path / DEFAULT_SPOOL_ROOT
        assert one.spool_path != two.spool_path
        assert not one.spool_path.exists(), "created only when something is spooled"
    finally:
        one.close()
        two.close()


def test_default_spool_path_is_the_one_the_recorder_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("events.sqlite3")
    path = default_spool_path(store.url)
    assert not path.is_absolute(), "under whatever directory the recorder runs in"
    assert path.parent == Path(DEFAULT_SPOOL_ROOT)
    assert store.url not in str(path), "no path or password from the URL in the name"
    recorder = Recorder(store)
    try:
        assert recorder.spool_path == tmp_path / path
    finally:
        recorder.close()
    assert default_spool_path("sqlite:///other.sqlite3") != path


# --- committing ----------------------------------------------------------------


def test_a_durable_record_is_in_the_journal_when_record_returns(
    make_recorder: Callable[..., Recorder], tmp_path: Path, spool_dir: Path
) -> None:
    # The store's commit holds the writer thread, so only the journal can
    # have the records when record() returns.
    store = FlakyStore()
    store.gate.clear()
    recorder = make_recorder(store)
    for n in range(5):
        assert recorder.record(make_record(id=f"r{n}")) is True
        # Read from the files, as another process (or the next recorder) would.
        lines = b"".join(path.read_bytes() for path in spool_dir.glob("*.jsonl")).splitlines()
        assert [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(n + 1)]
    assert store.ids() == []
    store.gate.set()
    assert recorder.flush(timeout=5)
    assert store.ids() == [f"r{n}" for n in range(5)]


def test_a_durable_record_reaches_the_store_at_flush(
    make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    recorder = make_recorder(SQLiteStore(tmp_path / "events.sqlite3"))
    for n in range(5):
        recorder.record(make_record(id=f"r{n}"))
        assert recorder.flush(timeout=5)
        # Through another connection, as another process would see it.
        other = SQLiteStore(tmp_path / "events.sqlite3")
        assert [r["id"] for _, r in other.read()][-1] == f"r{n}"
        other.close()


@pytest.mark.parametrize("writer_delay", [0.0, 1.0], ids=["prompt", "slow-writer"])
def test_a_read_sees_what_another_live_process_answered(
    make_recorder: Callable[..., Recorder], tmp_path: Path, spool_dir: Path, writer_delay: float
) -> None:
    # A server's other worker answered a pixel (journaled, 200); its writer
    # stores it after `writer_delay`. A read here, right after, must see it.
    child = run_child(
        """
        import sys, time
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.sqlite import SQLiteStore

        class SlowStore(SQLiteStore):
            def write_journaled(self, *args, **kwargs):
                time.sleep(float(sys.argv[3]))
                super().write_journaled(*args, **kwargs)

        recorder = Recorder(SlowStore(sys.argv[1]), spool_path=sys.argv[2])
        assert recorder.record(make_record(id="other-worker"))
        print("answered", flush=True)
        sys.stdin.read()
        recorder.close()
        """,
        str(tmp_path / "events.sqlite3"),
        str(spool_dir),
        str(writer_delay),
        stdin=subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        store = SQLiteStore(tmp_path / "events.sqlite3")
        recorder = make_recorder(store)
        assert recorder.record(make_record(id="this-worker"))
        assert child.stdout.readline().strip() == "answered"
        assert sorted(record["id"] for _, record in store.read()) == [
            "other-worker",
            "this-worker",
        ]
    finally:
        child.stdin.close()
        child.wait(timeout=20)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()
    assert child.returncode == 0


def test_concurrent_records_share_commits(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore(delay=0.002)  # a commit that costs, like an fsync
    recorder = make_recorder(store, max_batch=64)
    threads, per_thread = 32, 40

    def work(n: int) -> None:
        for i in range(per_thread):
            recorder.record(make_record(id=f"t{n}-{i}"))

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert recorder.flush(timeout=10)  # journaled when record() returned; stored now
    total = threads * per_thread
    assert sum(store.writes) == total
    assert len(store.writes) < total / 5, f"{len(store.writes)} writes for {total} records"
    assert max(store.writes) <= 64
    ids = store.ids()
    assert sorted(ids) == sorted(f"t{n}-{i}" for n in range(threads) for i in range(per_thread))
    for n in range(threads):  # each thread's records in the order it recorded them
        assert [i for i in ids if i.startswith(f"t{n}-")] == [
            f"t{n}-{i}" for i in range(per_thread)
        ]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "fire-and-forget"])
def test_the_writer_lingers_then_stores_the_records_in_one_write(
    make_recorder: Callable[..., Recorder], spool_dir: Path, durable: bool
) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, linger=0.5, durable=durable)
    started = time.monotonic()
    for n in range(5):
        assert recorder.record(make_record(id=f"r{n}")) is True
    # In the journal at once (durable, or journaled by the caller), not in the store yet.
    wait_until(lambda: len(recorder._journal) == 5, timeout=2)
    time.sleep(0.2)
    assert store.writes == []
    wait_until(lambda: store.writes != [], timeout=5)
    assert time.monotonic() - started >= 0.5
    assert store.writes == [5]
    assert store.ids() == [f"r{n}" for n in range(5)]


def test_flush_cuts_the_linger_short(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, linger=30.0)
    for n in range(3):
        recorder.record(make_record(id=f"r{n}"))
    time.sleep(0.2)
    assert store.writes == []
    started = time.monotonic()
    assert recorder.flush(timeout=5)
    assert time.monotonic() - started < 5
    assert store.writes == [3]
    # The next records linger again.
    recorder.record(make_record(id="r3"))
    time.sleep(0.2)
    assert store.ids() == ["r0", "r1", "r2"]


def test_close_cuts_the_linger_short(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, linger=30.0)
    for n in range(3):
        recorder.record(make_record(id=f"r{n}"))
    started = time.monotonic()
    recorder.close(timeout=10)
    assert time.monotonic() - started < 10
    assert store.ids() == ["r0", "r1", "r2"]
    assert store.closed


def test_a_full_batch_is_stored_without_lingering(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, linger=30.0, max_batch=4, retry_interval=60)
    recorder.record(make_record(id="r0"))
    time.sleep(0.2)  # the writer lingers now, woken by no single record
    for n in range(1, 6):
        recorder.record(make_record(id=f"r{n}"))
    # Four make a batch: stored at once; the other two linger.
    wait_until(lambda: store.writes == [4], timeout=5)
    time.sleep(0.2)
    assert store.ids() == ["r0", "r1", "r2", "r3"]


def test_no_linger_stores_at_once(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, linger=0)
    recorder.record(make_record(id="r0"))
    wait_until(lambda: store.ids() == ["r0"], timeout=5)
    recorder.record(make_record(id="r1"))
    wait_until(lambda: store.ids() == ["r0", "r1"], timeout=5)
    assert store.writes == [1, 1]


def test_writes_are_at_most_max_batch(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    store.gate.clear()
    recorder = make_recorder(store, durable=False, max_batch=7)
    for n in range(50):
        recorder.record(make_record(id=f"r{n}"))
    store.gate.set()
    assert recorder.flush(timeout=5)
    assert store.ids() == [f"r{n}" for n in range(50)]
    assert max(store.writes) == 7


def test_fire_and_forget_returns_before_the_write(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    store.gate.clear()
    recorder = make_recorder(store, durable=False)
    recorder.record(make_record(id="queued"))
    assert store.ids() == []
    assert recorder.flush(timeout=0.05) is False
    store.gate.set()
    assert recorder.flush(timeout=5) is True
    assert store.ids() == ["queued"]


def test_flush_with_nothing_queued_is_true_at_once(make_recorder: Callable[..., Recorder]) -> None:
    recorder = make_recorder(MemoryStore())
    assert recorder.flush(timeout=0) is True


def test_close_writes_what_fire_and_forget_queued(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore(delay=0.001)
    recorder = make_recorder(store, durable=False, max_batch=10)
    for n in range(500):
        recorder.record(make_record(id=f"r{n}"))
    recorder.close()
    assert store.ids() == [f"r{n}" for n in range(500)]
    assert store.closed


def test_backpressure_blocks_record_and_drops_nothing(
    make_recorder: Callable[..., Recorder], unwritable_spool: Path
) -> None:
    store = FlakyStore()
    store.gate.clear()  # the store hangs: nothing gets written
    # And the journal cannot be written (records wait in memory only then).
    recorder = make_recorder(
        store,
        durable=False,
        max_pending=10,
        max_batch=4,
        keep_timeout=None,
        spool_path=unwritable_spool,
    )
    returned = 0

    def produce() -> None:
        nonlocal returned
        for n in range(100):
            recorder.record(make_record(id=f"r{n}"))
            returned += 1

    producer = threading.Thread(target=produce)
    producer.start()
    # The producer waiting for room is the event to wait for, not a guess at time.
    wait_until(lambda: len(recorder._changed._waiters) == 1)  # type: ignore[attr-defined]
    # Ten in memory (one group of them with the hanging store), the
    # eleventh record() waits for room.
    assert returned == 10
    assert recorder._queued_count == 10
    assert producer.is_alive()
    store.gate.set()
    producer.join(timeout=5)
    assert not producer.is_alive()
    assert recorder.flush(timeout=5)
    assert store.ids() == [f"r{n}" for n in range(100)]


# --- a failing store -------------------------------------------------------------


def test_a_failing_store_spools_then_replays_in_order(
    make_recorder: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store, max_batch=3)
    with caplog.at_level(logging.WARNING, logger="pixel_middleware.recorder"):
        for n in range(10):
            recorder.record(make_record(id=f"r{n}"))  # durable: returns once spooled
        assert recorder.spooled == 10
        assert store.ids() == []
        wait_until(lambda: "spooling, " in caplog.text)
        time.sleep(0.12)  # a few failed retries
        for n in range(10, 15):
            recorder.record(make_record(id=f"r{n}"))
        assert recorder.spooled == 15
        store.failing.clear()
        wait_until(lambda: recorder.spooled == 0)
        recorder.record(make_record(id="after"))
        assert recorder.flush(timeout=5)
    assert store.ids() == [f"r{n}" for n in range(15)] + ["after"]
    assert "took the 15 spooled records" in caplog.text
    assert recorder.spooled == 0
    recorder.close()
    assert list(recorder.spool_path.glob("*.jsonl")) == []


def test_any_exception_from_the_store_is_a_failure_to_spool_through(
    make_recorder: Callable[..., Recorder],
) -> None:
    store = FlakyStore(error=RuntimeError)
    store.failing.set()
    recorder = make_recorder(store)
    recorder.record(make_record(id="kept"))
    assert recorder.spooled == 1
    store.failing.clear()
    wait_until(lambda: store.ids() == ["kept"])


def test_a_locked_sqlite_database_spools_then_recovers(
    make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    path = tmp_path / "events.sqlite3"
    store = SQLiteStore(path, timeout=0.05)
    recorder = make_recorder(store)
    # Another process's long write transaction, as far as SQLite can tell.
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        for n in range(5):
            recorder.record(make_record(id=f"r{n}"))
        assert recorder.spooled == 5
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    wait_until(lambda: recorder.spooled == 0)
    assert [r["id"] for _, r in store.read()] == [f"r{n}" for n in range(5)]


def test_the_spool_outlives_the_recorder(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    down = FlakyStore()
    down.failing.set()
    first = make_recorder(down)
    for n in range(5):
        first.record(make_record(id=f"r{n}"))
    first.close(timeout=5)  # the store still fails: the records stay spooled
    assert first.spooled == 5
    assert len(list(spool_dir.glob("*.jsonl"))) == 1
    up = FlakyStore()
    make_recorder(up)
    wait_until(lambda: len(up.ids()) == 5)
    assert up.ids() == [f"r{n}" for n in range(5)]
    wait_until(lambda: list(spool_dir.glob("*.jsonl")) == [])


def test_close_with_a_failing_store_tries_the_spool_once_and_returns(
    make_recorder: Callable[..., Recorder],
) -> None:
    # Closing must not wait, let alone spin, until the next retry is due.
    down = FlakyStore()
    down.failing.set()
    recorder = make_recorder(down, retry_interval=30)
    recorder.record(make_record(id="r0"))
    wall, cpu = time.monotonic(), time.process_time()
    recorder.close(timeout=10)
    assert time.monotonic() - wall < 2
    assert time.process_time() - cpu < 1
    assert recorder.spooled == 1


def test_the_spool_of_a_killed_process_is_replayed(tmp_path: Path, spool_dir: Path) -> None:
    path = tmp_path / "events.sqlite3"
    SQLiteStore(path).close()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the store fails for the child
    child = run_child(
        """
        import sys, time
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.sqlite import SQLiteStore
        recorder = Recorder(SQLiteStore(sys.argv[1], timeout=0.01), spool_path=sys.argv[2])
        for n in range(30):
            recorder.record(make_record(id=f"child-{n}"))
            print(f"child-{n}", flush=True)
        print("done", flush=True)
        time.sleep(60)
        """,
        str(path),
        str(spool_dir),
    )
    try:
        assert child.stdout is not None
        printed = [child.stdout.readline().strip() for _ in range(31)]
        assert printed[-1] == "done", child.stderr.read() if child.stderr else ""
        child.kill()  # SIGKILL: no exit handler runs
        child.wait(timeout=5)
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    store = SQLiteStore(path)
    recorder = Recorder(store, spool_path=spool_dir)
    try:
        wait_until(lambda: len(store.read()) == 30)
        assert [r["id"] for _, r in store.read()] == printed[:-1]
    finally:
        recorder.close()
        child.stdout.close()
        child.stderr.close()


def test_a_record_no_store_can_keep_is_dropped_alone(
    make_recorder: Callable[..., Recorder], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SQLiteStore(tmp_path / "events.sqlite3")
    recorder = make_recorder(store, durable=False)
    bad = make_record(id="bad")
    del bad["call"]  # type: ignore[misc]
    with caplog.at_level(logging.ERROR, logger="pixel_middleware.recorder"):
        recorder.record(make_record(id="good-1"))
        recorder.record(bad)
        recorder.record(make_record(id="good-2"))
        assert recorder.flush(timeout=5)
    assert [r["id"] for _, r in store.read()] == ["good-1", "good-2"]
    assert recorder.spooled == 0
    assert "dropping a record no store can keep" in caplog.text


# --- closing and exiting ---------------------------------------------------------


def test_record_after_close_logs_and_returns(
    make_recorder: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    recorder = make_recorder(store)
    recorder.close()
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="pixel_middleware.recorder"):
        recorder.record(make_record(id="late"))
    assert time.monotonic() - started < 1
    assert "is closed: record late not kept" in caplog.text
    assert store.ids() == []


def test_close_is_idempotent_and_closes_the_store(make_recorder: Callable[..., Recorder]) -> None:
    store = FlakyStore()
    recorder = make_recorder(store)
    recorder.record(make_record())
    recorder.close()
    recorder.close()
    assert store.closed
    assert recorder.flush(timeout=0) is True


def test_exit_writes_fire_and_forget_records(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    child = run_child(
        """
        import sys
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.sqlite import SQLiteStore
        recorder = Recorder(SQLiteStore(sys.argv[1]), durable=False, spool_path=sys.argv[2])
        for n in range(2000):
            recorder.record(make_record(id=f"r{n}"))
        # No close(): the exit hook flushes.
        """,
        str(path),
        str(tmp_path / "spool"),
    )
    _, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    store = SQLiteStore(path)
    assert [r["id"] for _, r in store.read()] == [f"r{n}" for n in range(2000)]
    store.close()


SIGTERM_CHILD = """
import signal, sys, time
from records import make_record
from pixel_middleware.recorder import Recorder, install_signal_flush
from pixel_middleware.stores.sqlite import SQLiteStore

class SlowStore(SQLiteStore):
    def write(self, records):
        time.sleep(0.002)
        super().write(records)

if sys.argv[3] == "chain":
    def previous(signum, frame):
        print("previous handler", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
install_signal_flush()
install_signal_flush()  # twice: still one flush
recorder = Recorder(SlowStore(sys.argv[1]), durable=False, max_batch=5, spool_path=sys.argv[2])
for n in range(300):
    recorder.record(make_record(id=f"r{n}"))
print("ready", flush=True)
# Short sleeps, as a server's loop waits: Python runs a handler between
# bytecodes, and a SIGTERM that lands after the last check before the
# sleep's system call would wait out a long sleep (the test then timed out).
for _ in range(600):
    time.sleep(0.1)
"""


@pytest.mark.parametrize(
    ("mode", "status", "output"),
    [
        pytest.param("alone", 0, "ready\n", id="exits-0"),
        pytest.param("chain", 3, "ready\nprevious handler\n", id="chains-to-previous"),
    ],
)
def test_sigterm_flushes_then_exits(tmp_path: Path, mode: str, status: int, output: str) -> None:
    path = tmp_path / "events.sqlite3"
    child = run_child(SIGTERM_CHILD, str(path), str(tmp_path / "spool"), mode)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == status, err
    assert "ready\n" + out == output
    store = SQLiteStore(path)
    assert len(store.read()) == 300
    store.close()


def test_the_writer_thread_leaves_a_sigterm_to_the_main_thread(tmp_path: Path) -> None:
    # A SIGTERM the kernel gave the writer would run install_signal_flush's
    # handler only once the main thread ran Python again: a main thread in
    # time.sleep() (or a server's wait) never did, and the process hung.
    # Lingering, the writer is there to look at.
    store = SQLiteStore(tmp_path / "events.sqlite3")
    recorder = Recorder(store, spool_path=tmp_path / "spool", linger=30)
    try:
        recorder.record(make_record(id="r1"))
        thread = recorder._thread
        assert thread is not None
        assert thread.native_id is not None
        assert {signal.SIGTERM, signal.SIGINT} <= blocked_signals(os.getpid(), thread.native_id)
    finally:
        recorder.close()


def test_install_signal_flush_keeps_one_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    try:
        install_signal_flush([signal.SIGUSR1])
        installed = signal.getsignal(signal.SIGUSR1)
        install_signal_flush([signal.SIGUSR1])
        assert signal.getsignal(signal.SIGUSR1) is installed
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_forked_child_records_through_its_own_writer(tmp_path: Path) -> None:
    # As in a pre-forking server that made the recorder before forking.
    child = run_child(
        """
        import os, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1])
        recorder = Recorder(store, spool_path=sys.argv[2])
        recorder.record(make_record(id="parent-before"))
        pid = os.fork()
        if pid == 0:
            for n in range(10):
                recorder.record(make_record(id=f"child-{n}"))
            recorder.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        recorder.record(make_record(id="parent-after"))
        recorder.close()
        print(status, sorted(r["id"] for _, r in SQLiteStore(sys.argv[1]).read()))
        """,
        str(tmp_path / "events.sqlite3"),
        str(tmp_path / "spool"),
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    status, ids = out.split(" ", 1)
    assert status == "0"
    expected = sorted(["parent-before", "parent-after"] + [f"child-{n}" for n in range(10)])
    assert ids.strip() == repr(expected)


# The writer thread does die of it, as it should: pytest reports that.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_killed_by_its_store_leaves_nobody_waiting(
    make_recorder: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    # Fire and forget: the background thread writes, and a BaseException from
    # the store ends it. Whoever waits for it must be released.
    store = FlakyStore(error=SystemExit)  # not an Exception: ends the thread
    store.gate.clear()
    recorder = make_recorder(store, durable=False)
    with caplog.at_level(logging.ERROR, logger="pixel_middleware.recorder"):
        for n in range(3):
            recorder.record(make_record(id=f"r{n}"))
        wait_until(lambda: recorder._queued == 3)
        store.failing.set()
        store.gate.set()
        assert recorder.flush(timeout=5)
        recorder.record(make_record(id="later"))  # logged, not kept, no hang
    assert "writer stopped" in caplog.text
    assert "is closed: record later not kept" in caplog.text


def test_an_interrupted_appender_lets_no_follower_return_before_its_record_is_kept(
    make_recorder: Callable[..., Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    # r0 appends alone and is held inside the journal's append; r1 and r2
    # queue behind it. The second append (led by r1 or r2) is interrupted, as a
    # Ctrl-C or a gevent.Timeout would land in that thread: the appender
    # raises, and the other returns only once its record is journaled.
    store = FlakyStore()
    recorder = make_recorder(store)
    journal = recorder._journal
    append_lines = journal.append_lines
    gate = threading.Event()
    calls: list[int] = []

    def held_then_interrupted(lines: Sequence[bytes]) -> tuple[str, list[int]]:
        calls.append(len(lines))
        if len(calls) == 1:
            gate.wait()
        if len(calls) == 2:
            raise KeyboardInterrupt
        return append_lines(lines)

    journal.append_lines = held_then_interrupted  # type: ignore[method-assign]
    results: dict[str, object] = {}

    def record(record_id: str) -> None:
        try:
            results[record_id] = recorder.record(make_record(id=record_id))
        except BaseException as exc:
            results[record_id] = exc

    threads = {rid: threading.Thread(target=record, args=(rid,)) for rid in ("r0", "r1", "r2")}
    threads["r0"].start()
    wait_until(lambda: calls == [1])
    threads["r1"].start()
    threads["r2"].start()
    wait_until(lambda: len(recorder._queue) == 2)
    with caplog.at_level(logging.CRITICAL, logger="pixel_middleware.recorder"):
        gate.set()
        for thread in threads.values():
            thread.join(timeout=5)
            assert not thread.is_alive()
    interrupted = [rid for rid, result in results.items() if isinstance(result, KeyboardInterrupt)]
    returned = [rid for rid, result in results.items() if result is True]
    assert len(interrupted) == 1, results
    assert sorted(returned) == sorted({"r0", "r1", "r2"} - set(interrupted))
    assert calls == [1, 2, 2], "r1 and r2 share one group; it is appended again"
    # The interrupted caller's record was journaled too, by the one that
    # took the group over, and everything reaches the store in order.
    assert recorder.flush(timeout=5)
    assert store.ids()[0] == "r0"
    assert sorted(store.ids()) == ["r0", "r1", "r2"]
    assert "interrupted" in caplog.text


def test_offer_queues_only_when_that_needs_no_waiting(
    make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    slow = FlakyStore()
    slow.gate.clear()  # the writer is stuck in its first write
    # No journal either (a file holds its directory's name): records wait in
    # memory, else the writer would journal r0 before r2 comes, and make room.
    unwritable = tmp_path / "journal"
    unwritable.write_text("")
    recorder = make_recorder(slow, durable=False, max_pending=2, spool_path=unwritable)
    assert recorder.offer(make_record(id="r0"))
    assert recorder.offer(make_record(id="r1"))
    assert not recorder.offer(make_record(id="r2"))  # full: the caller must wait elsewhere
    slow.gate.set()
    assert recorder.flush(timeout=5)
    assert slow.ids() == ["r0", "r1"]
    durable = make_recorder(FlakyStore())
    assert not durable.offer(make_record(id="d0"))  # durable callers wait for the commit


# --- when nothing can keep a record (store and spool both fail) -------------------


@pytest.fixture
def unwritable_spool(tmp_path: Path) -> Path:
    """A spool directory that cannot be made, even by root: its parent is a file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "spool"


def test_a_record_nothing_can_keep_gets_a_prompt_false_then_is_kept_on_recovery(
    make_recorder: Callable[..., Recorder],
    unwritable_spool: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store, spool_path=unwritable_spool, keep_timeout=0.5)
    with caplog.at_level(logging.ERROR, logger="pixel_middleware.recorder"):
        started = time.monotonic()
        # The leader tried the store and the spool once: it knows at once.
        assert recorder.record(make_record(id="r0")) is False
        assert time.monotonic() - started < 0.4
        # The next caller waits for the next retry, which it may make itself.
        started = time.monotonic()
        assert recorder.record(make_record(id="r1")) is False
        assert time.monotonic() - started < 0.5 + 0.5
    assert "neither the store nor the spool" in caplog.text
    assert caplog.text.count("neither the store nor the spool") == 1, "said once, not per retry"
    assert store.ids() == []
    # Still in memory, and written once the store is back: at least once.
    store.failing.clear()
    wait_until(lambda: store.ids() == ["r0", "r1"])
    assert recorder.record(make_record(id="r2")) is True
    assert store.ids() == ["r0", "r1", "r2"]


def test_close_stops_at_once_when_nothing_can_keep_a_record(
    make_recorder: Callable[..., Recorder],
    unwritable_spool: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store, spool_path=unwritable_spool, durable=False, retry_interval=30)
    for n in range(5):
        assert recorder.record(make_record(id=f"r{n}")) is True  # queued
    started = time.monotonic()
    with caplog.at_level(logging.CRITICAL, logger="pixel_middleware.recorder"):
        recorder.close()  # no timeout: still it ends
    assert time.monotonic() - started < 2
    assert "5 records not kept" in caplog.text
    assert store.closed
    assert recorder.record(make_record(id="late")) is False


def test_spooled_never_waits_for_a_write_under_way(
    make_recorder: Callable[..., Recorder],
) -> None:
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store)
    recorder.record(make_record(id="r0"))
    answers: list[int] = []
    # An operation of the spool under way in another thread (a hung fsync, say).
    with recorder._journal._lock:
        reader = threading.Thread(target=lambda: answers.append(recorder.spooled))
        reader.start()
        reader.join(timeout=2)
        assert not reader.is_alive()
    assert answers == [1]


def test_the_spool_cap_refuses_records_with_one_loud_line(
    make_recorder: Callable[..., Recorder], spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line = len(json.dumps(make_record(id="r0"), separators=(",", ":")).encode()) + 1
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store, spool_max_bytes=2 * line, keep_timeout=0.2)
    with caplog.at_level(logging.ERROR):
        assert recorder.record(make_record(id="r0")) is True
        assert recorder.record(make_record(id="r1")) is True  # exactly the cap
        assert recorder.record(make_record(id="r2")) is False  # one over
        assert recorder.record(make_record(id="r3")) is False
    assert recorder.spooled == 2
    assert sum(path.stat().st_size for path in spool_dir.glob("*.jsonl")) == 2 * line
    assert caplog.text.count("is full") == 1
    store.failing.clear()
    # Each kept once. r2 and r3 go through the journal once the writer has made
    # room, or straight to the store when the journal is still full (out of the
    # journal's order, as documented): either may come first.
    wait_until(lambda: sorted(store.ids()) == ["r0", "r1", "r2", "r3"])
    ids = store.ids()
    assert ids.index("r0") < ids.index("r1"), "the journal's records in its order"


def test_bad_keep_timeout_and_spool_cap_fail_at_construction() -> None:
    for options in ({"keep_timeout": 0}, {"keep_timeout": float("inf")}, {"spool_max_bytes": 0}):
        with pytest.raises(ValueError, match=r"keep_timeout|spool_max_bytes"):
            Recorder(MemoryStore(), **options)


# --- threads and process-wide state ---------------------------------------------------


def recorder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pixel-recorder")]


def test_no_thread_until_one_is_needed(
    make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    durable = make_recorder(SQLiteStore(tmp_path / "events.sqlite3"))
    assert recorder_threads() == []
    assert durable.record(make_record(id="d0"))
    assert len(recorder_threads()) == 1, "it moves the journal to the store"
    durable.close()
    assert recorder_threads() == []
    fire_and_forget = make_recorder(MemoryStore(), durable=False, spool_path=tmp_path / "o")
    assert recorder_threads() == []
    fire_and_forget.record(make_record(id="f0"))
    assert len(recorder_threads()) == 1


def test_spool_files_left_at_construction_start_the_thread(
    make_recorder: Callable[..., Recorder], spool_dir: Path
) -> None:
    down = FlakyStore()
    down.failing.set()
    first = make_recorder(down)
    first.record(make_record(id="left"))
    first.close(timeout=5)
    assert list(spool_dir.glob("*.jsonl"))
    up = FlakyStore()
    make_recorder(up)  # no record: the files alone start the thread
    wait_until(lambda: up.ids() == ["left"])


def test_an_idle_recorder_nobody_holds_is_freed_and_its_thread_ends(
    make_recorder: Callable[..., Recorder],
) -> None:
    store = MemoryStore()
    recorder = Recorder(store, durable=False, spool_path=make_recorder(MemoryStore()).spool_path)
    recorder.record(make_record(id="r0"))
    flushed = recorder.flush(timeout=5)  # not in an assert: its temporaries would hold it
    thread = recorder._thread
    assert flushed
    assert thread is not None
    ref = weakref.ref(recorder)
    del recorder
    # The thread lets go once its round ends; until then it holds the recorder.
    wait_until(lambda: gc.collect() >= 0 and ref() is None)
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert [r["id"] for _, r in store.read()] == ["r0"]


def test_importing_the_package_installs_no_process_hook() -> None:
    child = run_child(
        """
        import atexit, os
        hooks = []
        register = atexit.register
        register_at_fork = os.register_at_fork
        def spy_exit(callback, *args, **kwargs):
            hooks.append(("exit", callback.__module__))
            return register(callback, *args, **kwargs)
        def spy_fork(**kwargs):
            hooks.extend(("fork", f.__module__) for f in kwargs.values())
            return register_at_fork(**kwargs)
        atexit.register, os.register_at_fork = spy_exit, spy_fork
        import pixel_middleware, pixel_middleware.recorder, pixel_middleware.middleware
        import pixel_middleware.stores.sqlite, pixel_middleware.stores.jsonl
        import pixel_middleware.stores.forward, pixel_middleware.stores.postgresql
        print(sorted(set(h for h in hooks if h[1].startswith("pixel_middleware"))))
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.memory import MemoryStore
        Recorder(MemoryStore()).close()
        Recorder(MemoryStore()).close()
        print(sorted(h for h in hooks if h[1].startswith("pixel_middleware")))
        """
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    at_import, with_recorders = out.splitlines()
    # The stores' fork callbacks go into one registry, whose hook is installed
    # once, at the first registration; the exit hook only once a recorder exists.
    assert at_import == "[('fork', 'pixel_middleware._process')]"
    assert with_recorders == (
        "[('exit', 'pixel_middleware._process'), ('fork', 'pixel_middleware._process')]"
    )


def test_stores_differing_only_in_a_secret_get_spools_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their URLs look the same once masked; sharing a spool would hand one
    # write key's records to the other's store.
    monkeypatch.chdir(tmp_path)
    urls = [
        f"forward+http://127.0.0.1:1?write_key={key}&outbox={tmp_path}/outbox.sqlite3"
        for key in ("wk_one", "wk_two")
    ]
    stores = [open_store(url) for url in urls]
    recorders = [Recorder(store) for store in stores]
    try:
        assert stores[0].url == stores[1].url, "the same once the write key is masked"
        assert recorders[0].spool_path != recorders[1].spool_path
        for recorder, key in zip(recorders, ("wk_one", "wk_two"), strict=True):
            assert key not in str(recorder.spool_path)
    finally:
        for recorder in recorders:
            recorder.close()


# --- the journal -------------------------------------------------------------------


def kill_a_recording_child(store_url: str, spool_dir: Path, stored: int, journaled: int) -> None:
    """A child records ``stored`` records and waits until its writer stored them,
    records ``journaled`` more (answered, not stored yet: the store is held),
    and is killed with SIGKILL."""
    child = run_child(
        """
        import sys, threading
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores import open_store
        url, spool, stored, journaled = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
        store = open_store(url)
        recorder = Recorder(store, spool_path=spool, max_batch=7)
        for n in range(stored):
            assert recorder.record(make_record(id=f"r{n}"))
        assert recorder.flush(timeout=20)
        held = threading.Event()
        def hold(*args, **kwargs):
            held.wait()
        recorder._store_write = hold  # every later store write hangs
        for n in range(stored, stored + journaled):
            assert recorder.record(make_record(id=f"r{n}"))
        print("recorded", flush=True)
        held.wait()
        """,
        store_url,
        str(spool_dir),
        str(stored),
        str(journaled),
    )
    assert child.stdout is not None
    assert child.stderr is not None
    with child.stdout, child.stderr:
        assert child.stdout.readline().strip() == "recorded", child.stderr.read()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)


def replayed_ids(store_url: str, spool_dir: Path) -> list[str]:
    """The ids in the store once a new recorder adopted the dead child's journal."""
    store = open_store(store_url)
    recorder = Recorder(store, spool_path=spool_dir, retry_interval=0.05)
    try:
        wait_until(lambda: recorder.spooled == 0 and not list(spool_dir.glob("*.jsonl")), 20)
        return [record["id"] for _, record in store.read()]
    finally:
        recorder.close()


def test_replaying_a_killed_process_journal_on_sqlite_is_exact(
    tmp_path: Path, spool_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path}/events.sqlite3"
    kill_a_recording_child(url, spool_dir, stored=40, journaled=9)
    # The dead segment holds all 49; the store says how far it got: no duplicates.
    assert replayed_ids(url, spool_dir) == [f"r{n}" for n in range(49)]


def test_replaying_a_killed_process_journal_on_jsonl_is_at_least_once(
    tmp_path: Path, spool_dir: Path
) -> None:
    url = f"jsonl:///{tmp_path}/events.jsonl"
    kill_a_recording_child(url, spool_dir, stored=40, journaled=9)
    ids = replayed_ids(url, spool_dir)
    assert set(ids) == {f"r{n}" for n in range(49)}
    assert ids[-9:] == [f"r{n}" for n in range(40, 49)]


@pytest.mark.postgresql
def test_replaying_a_killed_process_journal_on_postgresql_is_exact(
    postgres_url: str, spool_dir: Path
) -> None:
    kill_a_recording_child(postgres_url, spool_dir, stored=40, journaled=9)
    assert replayed_ids(postgres_url, spool_dir) == [f"r{n}" for n in range(49)]


def test_a_store_far_behind_is_fed_from_the_journal_with_bounded_memory(
    make_recorder: Callable[..., Recorder],
) -> None:
    store = FlakyStore()
    store.gate.clear()  # the store hangs: the journal takes everything
    recorder = make_recorder(store, max_pending=5, max_batch=3)
    biggest = 0
    for n in range(40):
        assert recorder.record(make_record(id=f"r{n}")) is True
        biggest = max(biggest, len(recorder._cache))
    assert recorder.spooled == 40
    assert biggest <= 5, "at most max_pending journaled records held in memory"
    store.gate.set()
    assert recorder.flush(timeout=10)
    assert store.ids() == [f"r{n}" for n in range(40)]
    assert max(store.writes) <= 3


@pytest.mark.parametrize(("mode", "per_group"), [("group", 1), ("none", 0)])
def test_journal_fsync_group_syncs_each_group_once(
    make_recorder: Callable[..., Recorder],
    count_fsyncs: Callable[[], list[int]],
    mode: str,
    per_group: int,
) -> None:
    store = FlakyStore()
    recorder = make_recorder(store, journal_fsync=mode)
    assert recorder.record(make_record(id="warm-up"))  # the segment exists
    assert recorder.flush(timeout=5)
    synced = count_fsyncs()
    for n in range(3):
        assert recorder.record(make_record(id=f"r{n}"))
    assert len(synced) == 3 * per_group
    with pytest.raises(ValueError, match="journal_fsync must be"):
        Recorder(MemoryStore(), journal_fsync="always")  # type: ignore[arg-type]


def test_a_journaled_record_is_encoded_once_on_its_way_to_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The journal line is the store's text already: encoding it again cost
    # a second JSON encode per pixel in the writer thread.
    from pixel_middleware.stores import sqlite as sqlite_module

    encoded: list[object] = []
    real_dumps = sqlite_module._json.dumps

    def counting_dumps(value: Any) -> str:
        encoded.append(value)
        return real_dumps(value)

    monkeypatch.setattr(sqlite_module._json, "dumps", counting_dumps)
    store = open_store(f"sqlite:///{tmp_path / 'pixels.sqlite3'}")
    recorder = Recorder(store, spool_path=tmp_path / "journal")
    records = [make_record(id=f"once-{n}") for n in range(5)]
    records[0]["event"]["userId"] = None  # a null, as many pixels hold
    records[1]["event"]["name"] = "café ☕"
    try:
        for record in records:
            assert recorder.record(record)
        assert recorder.flush(timeout=10)
        assert [record for _, record in store.read()] == records  # exactly, in order
    finally:
        recorder.close()
    assert encoded == []


def test_reads_do_not_wait_for_a_stalled_recorder(
    make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    # Reads through a durable recorder's store wait for it to store what it
    # has (read your writes), but not while nothing can be kept: each poll of
    # the live page would then wait the whole keep_timeout for nothing.
    unwritable = tmp_path / "journal"
    unwritable.write_text("")  # a file where the journal's directory would go
    store = FlakyStore()
    store.failing.set()
    recorder = make_recorder(store, spool_path=unwritable, keep_timeout=20)
    assert recorder.record(make_record()) is False
    assert recorder.stalled
    started = time.monotonic()
    assert store.read() == []
    assert time.monotonic() - started < 10  # not the keep_timeout of 20 s
