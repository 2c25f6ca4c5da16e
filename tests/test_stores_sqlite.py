"""The SQLite store: URLs, WAL, locking, and several real processes on one file.

The behaviour every store shares is in test_stores.py.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from records import make_record

from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import RecordError, StoreError, StoreNotFoundError, open_store
from pixel_middleware.stores.sqlite import SCHEMA_VERSION, SQLiteStore

ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        pytest.param("sqlite:///events.db", "{cwd}/events.db", {}, id="relative"),
        pytest.param("sqlite:///data/events.db", "{cwd}/data/events.db", {}, id="relative-dir"),
        pytest.param("sqlite:////{cwd}/abs.db", "{cwd}/abs.db", {}, id="absolute"),
        pytest.param(
            "sqlite:///e.db?timeout=0.5&synchronous=full",
            "{cwd}/e.db",
            {"timeout": 0.5, "synchronous": "full"},
            id="options",
        ),
        pytest.param("sqlite:///e.db?synchronous=FULL", "{cwd}/e.db", {}, id="option-any-case"),
    ],
)
def test_url_spellings(
    url: str, path: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    # "sqlite:////{cwd}" would give five slashes: the absolute path has its own.
    url = url.replace("////{cwd}", "///{cwd}").format(cwd=tmp_path)
    store = open_store(url)
    try:
        assert isinstance(store, SQLiteStore)
        assert store.path == path.format(cwd=tmp_path)
        assert Path(store.path).exists()
        for name, value in options.items():
            assert getattr(store, name) == value
    finally:
        store.close()


def test_a_relative_path_is_fixed_when_the_store_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("events.db")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    store.write([make_record()])
    store.close()
    assert not (tmp_path / "elsewhere" / "events.db").exists()


def test_a_missing_directory_fails_at_open(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open the SQLite database"):
        SQLiteStore(tmp_path / "no-such-dir" / "events.db")


def test_a_reader_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    SQLiteStore(path).close()
    reader = SQLiteStore(path, create=False)
    for name in os.listdir(tmp_path):
        (tmp_path / name).unlink()  # the database, and its -wal and -shm if any
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        reader.read()  # the connection is made again on first use
    reader.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"timeout": -1}, "timeout must be", id="negative-timeout"),
        pytest.param({"synchronous": "off"}, "synchronous must be", id="synchronous-off"),
    ],
)
def test_bad_options_fail_at_construction(
    options: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        SQLiteStore(tmp_path / "e.db", **options)


def test_wal_mode_schema_and_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    store.write([make_record()])
    with store._lock:
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = [row[1] for row in conn.execute("PRAGMA table_info(pixel_records)")]
        assert columns == [
            "seq",
            "id",
            "receivedAt",
            "accepted",
            "call",
            "messageId",
            "writeKey",
            "record",
        ]
    conn.close()


def test_full_synchronous_is_set_on_the_connection(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.db", synchronous="full")
    store.write([make_record()])
    with store._lock:
        assert store._connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()


def test_the_columns_beside_the_record_copy_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    record = make_record(call="page", accepted=False, writeKey=None)
    store.write([record, make_record(event=None)])
    store.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT id, receivedAt, accepted, call, messageId, writeKey FROM pixel_records"
        ).fetchall()
    conn.close()
    assert rows[0] == (
        record["id"],
        record["receivedAt"],
        0,
        "page",
        record["event"]["messageId"],  # type: ignore[index]
        None,
    )
    assert rows[1][4] is None  # no event, no messageId


@pytest.mark.parametrize(
    ("query", "index"),
    [
        pytest.param("accepted = 0 ORDER BY seq DESC", "pixel_records_accepted", id="rejected"),
        pytest.param("call = 'page' ORDER BY seq DESC", "pixel_records_call", id="call"),
        pytest.param("seq > 5 ORDER BY seq", "INTEGER PRIMARY KEY", id="follow"),
    ],
)
def test_the_queries_of_the_cli_use_an_index(tmp_path: Path, query: str, index: str) -> None:
    path = tmp_path / "events.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        plan = " ".join(
            row[3]
            for row in conn.execute(f"EXPLAIN QUERY PLAN SELECT * FROM pixel_records WHERE {query}")
        )
    conn.close()
    assert index in plan
    assert "TEMP B-TREE" not in plan  # no sort of the whole result


def test_a_record_missing_a_field_is_a_record_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.db")
    bad = make_record()
    del bad["receivedAt"]  # type: ignore[misc]
    with pytest.raises(RecordError, match="receivedAt"):
        store.write([make_record(), bad])
    assert store.read() == [], "all or nothing"
    store.close()


def test_a_write_waits_for_another_writer_instead_of_failing(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path, timeout=5)
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.2, lambda: blocker.execute("COMMIT")).start()
    started = time.monotonic()
    store.write([make_record(id="waited")])
    assert time.monotonic() - started >= 0.15
    assert [r["id"] for _, r in store.read()] == ["waited"]
    store.close()
    blocker.close()


def test_a_write_locked_out_past_the_timeout_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path, timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="database is locked") as caught:
            store.write([make_record()])
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        # Readers are not blocked by a writer in WAL mode.
        assert store.read() == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.write([make_record()])
    assert len(store.read()) == 1
    store.close()


def test_read_after_close_raises_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.db")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.read()


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer pixel-middleware"):
        SQLiteStore(path)


WRITER = """
import sys, threading
from records import make_record
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores.sqlite import SQLiteStore

name, path, spool = sys.argv[1:4]
recorder = Recorder(SQLiteStore(path), spool_path=spool)
sys.stdin.readline()  # all start together

def work(thread):
    for i in range(500):
        recorder.record(make_record(id=f"{name}-{thread}-{i}"))

threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
recorder.close()
print("spooled", recorder.spooled)
"""


def test_four_processes_writing_one_file_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    spool = tmp_path / "spool"
    writers = [run_child(WRITER, f"p{n}", str(path), str(spool)) for n in range(4)]
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert "database is locked" not in err
        assert out.strip() == "spooled 0"
    store = SQLiteStore(path)
    ids = [record["id"] for _, record in store.read()]
    store.close()
    expected = {f"p{n}-{t}-{i}" for n in range(4) for t in range(4) for i in range(500)}
    assert len(ids) == len(expected) == 8000
    assert set(ids) == expected


def wait_until_drained(recorder: Recorder) -> None:
    deadline = time.monotonic() + 10
    while recorder.spooled:
        assert time.monotonic() < deadline, f"{recorder.spooled} records still journaled"
        time.sleep(0.01)


def test_every_record_acknowledged_before_kill_9_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    child = run_child(
        """
        import sys
        from records import make_record
        from pixel_middleware.recorder import Recorder
        from pixel_middleware.stores.sqlite import SQLiteStore
        recorder = Recorder(SQLiteStore(sys.argv[1]), spool_path=sys.argv[2])
        n = 0
        while True:
            recorder.record(make_record(id=f"r{n}"))
            print(f"r{n}", flush=True)  # the answer a pixel would get now
            n += 1
        """,
        str(path),
        str(tmp_path / "spool"),
    )
    assert child.stdout is not None
    for _ in range(300):
        child.stdout.readline()
    child.kill()  # SIGKILL, mid-stream
    child.wait(timeout=5)
    rest, _ = child.communicate(timeout=5)
    acknowledged = [f"r{n}" for n in range(300)] + [line for line in rest.splitlines() if line]
    # Acknowledged means journaled: the next recorder on the journal hands on
    # what the killed one had not stored yet, and skips what it had.
    store = SQLiteStore(path)
    recorder = Recorder(store, spool_path=tmp_path / "spool")
    assert recorder.flush(timeout=10)
    wait_until_drained(recorder)
    kept = Counter(record["id"] for _, record in store.read())
    recorder.close()
    missing = [i for i in acknowledged if i not in kept]
    assert missing == []
    assert [i for i, count in kept.items() if count > 1] == [], "stored twice"


def test_a_store_inherited_across_fork_gets_its_own_connection(tmp_path: Path) -> None:
    child = run_child(
        """
        import os, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from records import make_record
        from pixel_middleware.stores.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1])
        store.write([make_record(id="parent")])  # the parent's connection is open
        parents = store._conn
        reading, writing = os.pipe()
        pid = os.fork()
        if pid == 0:
            # SQLite: never use a connection carried across fork. The child
            # must have dropped the parent's and open its own on first use.
            dropped = store._conn is None
            store.write([make_record(id="child")])
            own = store._conn is not None and store._conn is not parents
            os.write(writing, f"dropped={dropped} own={own}".encode())
            store.close()
            os._exit(0)
        os.close(writing)
        with os.fdopen(reading) as pipe:
            print(pipe.read())
        os.waitpid(pid, 0)
        print("parent keeps its own:", store._conn is parents)
        store.write([make_record(id="parent-again")])
        print([r["id"] for _, r in store.read()])
        """,
        str(tmp_path / "events.db"),
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.splitlines() == [
        "dropped=True own=True",
        "parent keeps its own: True",
        "['parent', 'child', 'parent-again']",
    ]


def test_writers_take_turns_on_the_lock_file_beside_the_database(tmp_path: Path) -> None:
    # Another process's writer holds the flock: a write waits for it, then goes on.
    store = SQLiteStore(tmp_path / "events.db")
    holder = os.open(tmp_path / "events.db-writer.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    writer = threading.Thread(target=store.write, args=([make_record(id="r0")],))
    writer.start()
    # Wait until the kernel lists the writer as blocked on this file's flock
    # (a "->" line of /proc/locks): proof that it waits there, however slow
    # the machine. A broken lock lets the write finish instead: caught at once.
    inode = os.fstat(holder).st_ino
    deadline = time.monotonic() + 30
    while not flock_waiters(inode):
        assert writer.is_alive(), "the write went through while another held the lock"
        assert time.monotonic() < deadline, "the writer never waited on the lock file"
        time.sleep(0.005)
    assert writer.is_alive()
    with sqlite3.connect(tmp_path / "events.db") as reader:
        assert reader.execute("SELECT count(*) FROM pixel_records").fetchone() == (0,)
    reader.close()
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    writer.join(timeout=5)
    assert [record["id"] for _, record in store.read()] == ["r0"]
    store.close()


def flock_waiters(inode: int) -> int:
    """How many flock() calls are blocked on the file with ``inode`` (Linux's /proc/locks)."""
    with open("/proc/locks") as locks:
        return sum(
            1
            for line in locks
            if "-> FLOCK" in line and line.split()[6].rsplit(":", 1)[-1] == str(inode)
        )


def test_a_store_opens_at_once_while_another_writer_holds_the_database(tmp_path: Path) -> None:
    # The start check writes to see that the file can be written; a database
    # another process is writing is writable, and a recorder must start during
    # an outage (and spool), not fail or wait out the busy timeout.
    path = tmp_path / "events.db"
    SQLiteStore(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        store = SQLiteStore(path, timeout=3)
        assert time.monotonic() - started < 2
        with pytest.raises(StoreError, match="locked"):
            store.write([make_record(id="r0")])
        holder.execute("ROLLBACK")
        store.write([make_record(id="r1")])
        assert [record["id"] for _, record in store.read()] == ["r1"]
        store.close()
    finally:
        holder.close()
