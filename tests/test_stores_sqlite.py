"""The SQLite store: URLs, WAL, locking, and several real processes on one file.

The behaviour every store shares is in test_stores.py.
"""

from __future__ import annotations

import fcntl
import json
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
        assert columns == ["seq", "accepted", "call", "record"]
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
    store.write([record, make_record()])
    store.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT seq, accepted, call, record FROM pixel_records").fetchall()
    conn.close()
    assert rows[0][:3] == (1, 0, "page")
    assert rows[1][:3] == (2, 1, "track")
    assert json.loads(rows[0][3]) == record


# Every combination of filters read() takes, as (accepted, call, after, limit).
READ_FILTERS = [
    (accepted, call, after, limit)
    for accepted in (None, True, False)
    for call in (None, "identify")
    for after in (None, "5")
    for limit in (None, 50)
]


def query_plans(path: Path, **filters: Any) -> list[str]:
    """The plan of each query SQLiteStore.read(**filters) runs, as EXPLAIN QUERY PLAN says."""
    store = SQLiteStore(path, create=False)
    statements: list[str] = []
    with store._lock:
        store._connection().set_trace_callback(statements.append)
    store.read(**filters)
    store.close()
    selects = [sql for sql in statements if sql.startswith("SELECT seq, record")]
    assert selects
    plans = []
    with sqlite3.connect(path) as conn:
        for sql in selects:
            # The traced text has its parameters in place; plan it as it ran.
            plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            plans.append(" | ".join(row[3] for row in plan))
    conn.close()
    return plans


@pytest.mark.parametrize(
    ("accepted", "call", "after", "limit"),
    [pytest.param(*f, id="-".join(map(str, f))) for f in READ_FILTERS],
)
def test_every_read_filter_is_answered_by_an_index_in_position_order(
    tmp_path: Path, accepted: bool | None, call: str | None, after: str | None, limit: int | None
) -> None:
    """What stays fast at 10 million records (bench/sqlite_layout.py measures it there):
    no filter that read() takes makes SQLite scan the table or sort a result."""
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    store.write([make_record(call=c, accepted=a) for c in ("track", "identify") for a in (1, 0)])
    store.close()
    plans = query_plans(path, accepted=accepted, call=call, after=after, limit=limit)
    assert len(plans) == (2 if call is not None and accepted is None else 1)
    for plan in plans:
        assert "TEMP B-TREE" not in plan, plan  # read in position order, never sorted
        if call is not None:
            assert plan.startswith("SEARCH pixel_records USING INDEX pixel_records_call"), plan
            assert "(call=? AND accepted=?" in plan, plan
        elif accepted is not None:
            assert plan.startswith("SEARCH pixel_records USING INDEX pixel_records_accepted"), plan
        elif after is not None:
            assert plan == "SEARCH pixel_records USING INTEGER PRIMARY KEY (rowid>?)", plan
        else:
            # Everything, or the newest `limit` read backwards: the table in order.
            assert plan == "SCAN pixel_records", plan


def test_a_call_alone_reads_both_verdicts_in_position_order(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "events.db")
    verdicts = [True, False, False, True, True, False, True]
    store.write([make_record(id=f"t{i}", accepted=v) for i, v in enumerate(verdicts)])
    store.write([make_record(id="p", call="page")])
    tracks = [f"t{i}" for i in range(len(verdicts))]
    positions = [position for position, _ in store.read(call="track")]
    assert [r["id"] for _, r in store.read(call="track")] == tracks
    for limit in (1, 3, len(tracks) - 1, len(tracks), len(tracks) + 1):
        assert [r["id"] for _, r in store.read(call="track", limit=limit)] == tracks[-limit:]
        for start in (0, 2, len(tracks) - 1):
            got = store.read(call="track", after=positions[start], limit=limit)
            assert [r["id"] for _, r in got] == tracks[start + 1 :][:limit]
    store.close()


def test_a_position_is_never_given_again_after_a_clear(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SQLiteStore(path)
    store.write([make_record(id=f"r{i}") for i in range(3)])
    last = store.read()[-1][0]
    store.clear()
    store.clear()  # twice: the floor stays
    other = SQLiteStore(path)  # another writer, as another process would be
    other.write([make_record(id="after-reset")])
    assert store.read(after=last) == other.read()
    assert [position for position, _ in other.read()] == [str(int(last) + 1)]
    store.clear()
    store.write([make_record(id="again")])
    assert [position for position, _ in store.read()] == [str(int(last) + 2)]
    other.close()
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM pixel_records_cleared").fetchone() == (1,)
    conn.close()


# Schema 1, verbatim from pixel_middleware/stores/sqlite.py before schema 2, and
# how it inserted a record: a file as that version wrote it.
SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS pixel_records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    receivedAt TEXT NOT NULL,
    accepted   INTEGER NOT NULL,
    call       TEXT NOT NULL,
    messageId  TEXT,
    writeKey   TEXT,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pixel_records_accepted ON pixel_records (accepted, seq);
CREATE INDEX IF NOT EXISTS pixel_records_call ON pixel_records (call, seq);
"""
INSERT_1 = (
    "INSERT INTO pixel_records (id, receivedAt, accepted, call, messageId, writeKey, record)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def write_schema_1(path: Path, records: list[Any], *, cleared: int = 0) -> None:
    """A schema 1 file holding ``records``, written after ``cleared`` were written and cleared."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA_1)
    conn.execute("PRAGMA user_version = 1")
    if cleared:
        write_schema_1_rows(conn, [make_record() for _ in range(cleared)])
        conn.execute("DELETE FROM pixel_records")  # what clear() did
    write_schema_1_rows(conn, records)
    conn.close()
    os.chmod(path, 0o600)


def write_schema_1_rows(conn: sqlite3.Connection, records: list[Any]) -> None:
    conn.executemany(
        INSERT_1,
        [
            (
                r["id"],
                r["receivedAt"],
                1 if r["accepted"] else 0,
                r["call"],
                r["event"]["messageId"],
                r["writeKey"],
                json.dumps(r),
            )
            for r in records
        ],
    )


def test_a_schema_1_file_is_read_and_written_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    old = [
        make_record(id=f"old{i}", accepted=i % 3 != 0, call=("track", "page")[i % 2])
        for i in range(7)
    ]
    write_schema_1(path, old)
    reader = SQLiteStore(path, create=False)
    store = SQLiteStore(path)
    for opened in (reader, store):
        assert opened.read() == [(str(i + 1), r) for i, r in enumerate(old)]
        assert opened.read(call="page", accepted=True, limit=1) == [("6", old[5])]
        expected = [(str(i + 1), r) for i, r in enumerate(old) if r["call"] == "track"]
        assert opened.read(call="track") == expected
        assert opened.read(call="track", limit=2) == expected[-2:]
        assert opened.read(call="track", after="1", limit=2) == expected[1:3]
    new = make_record(id="new", call="page", accepted=False)
    store.write([new])
    assert reader.read(after="7") == [("8", new)]
    store.clear()
    store.write([make_record(id="after-clear")])
    assert [(p, r["id"]) for p, r in reader.read()] == [("9", "after-clear")]
    reader.close()
    store.close()
    with sqlite3.connect(path) as conn:
        # Left as schema 1, so that the version before keeps working with it.
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        row = conn.execute(
            "SELECT id, receivedAt, accepted, call, messageId, writeKey, record FROM pixel_records"
        ).fetchone()
        record = json.loads(row[6])
        assert row[:6] == (
            "after-clear",
            record["receivedAt"],
            1,
            "track",
            record["event"]["messageId"],
            "test-write-key",
        )
        write_schema_1_rows(conn, [make_record(id="by-the-version-before")])
    conn.close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_cleared_schema_1_file_gives_no_position_twice(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    write_schema_1(path, [], cleared=4)  # positions 1 to 4 were given, then cleared
    store = SQLiteStore(path)
    store.write([make_record(id="new")])
    assert [(p, r["id"]) for p, r in store.read()] == [("5", "new")]
    store.close()


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


def test_write_journaled_keeps_the_texts_it_is_given(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "pixels.sqlite3")
    records = [make_record(id=f"text-{n}") for n in range(3)]
    texts: list[bytes | None] = [json.dumps(r, separators=(",", ":")).encode() for r in records]
    texts[1] = None  # encoded by the store
    try:
        store.write_journaled(records, journal_position=("seg-1.jsonl", 30), texts=texts)
        assert [record for _, record in store.read()] == records
        assert store.journal_positions(["seg-1.jsonl"]) == {"seg-1.jsonl": 30}
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "pixels.sqlite3")
    stored = [row[0] for row in conn.execute("SELECT record FROM pixel_records ORDER BY seq")]
    conn.close()
    assert stored[0] == texts[0].decode()  # type: ignore[union-attr]
    assert stored[2] == texts[2].decode()  # type: ignore[union-attr]
