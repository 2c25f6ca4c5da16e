"""FanoutStore: real children (SQLite, memory, Redis, forwarding) and one that fails on cue."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from records import make_record

from pixel_middleware.core import PixelRecord
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import RecordError, StoreError, StoreNotFoundError, open_store
from pixel_middleware.stores.fanout import FanoutStore
from pixel_middleware.stores.forward import ForwardStore
from pixel_middleware.stores.memory import MemoryStore
from pixel_middleware.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from batch_server import BatchServer
    from redis_server import RedisServer

# Fixtures from the helper modules; imported only through this, so pytest rewrites
# their asserts (a plain import first would make it warn, and warnings are errors).
pytest_plugins = ["batch_server", "redis_server"]


class Switchable(MemoryStore):
    """A memory store that fails while ``failing`` is set (or always with ``error``)."""

    def __init__(self, name: str, error: type[StoreError] = StoreError) -> None:
        super().__init__()
        self.url = f"switchable://{name}"
        self.failing = False
        self.error = error
        self.writes = 0

    def write(self, records: Sequence[PixelRecord]) -> None:
        self.writes += 1
        if self.failing:
            raise self.error(f"{self.url} is down")
        super().write(records)


def ids(store: MemoryStore | FanoutStore | SQLiteStore) -> list[str]:
    return [record["id"] for _, record in store.read()]


class TestURL:
    def test_children_in_order_from_the_url(self, tmp_path: Path) -> None:
        url = f"fanout://sqlite:///{tmp_path}/a.sqlite3  memory://\n jsonl:///{tmp_path}/b.jsonl"
        store = open_store(url)
        try:
            assert isinstance(store, FanoutStore)
            assert [type(s).__name__ for s in store.stores] == [
                "SQLiteStore",
                "MemoryStore",
                "JSONLStore",
            ]
            assert store.url == url
        finally:
            store.close()

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("fanout://", "names no stores"),
            ("fanout://   ", "names no stores"),
            ("fan://memory://", "starts with fanout://"),
            ("fanout://memory:// nosuch:///x", "unknown store URL scheme 'nosuch'"),
        ],
        ids=["empty", "blank", "scheme", "bad-child"],
    )
    def test_bad_urls(self, url: str, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            FanoutStore.from_url(url)

    def test_a_bad_child_closes_the_ones_already_open(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="unknown option"):
            FanoutStore.from_url(
                f"fanout://sqlite:///{tmp_path}/a.sqlite3 memory:// redis://h/0?x=1"
            )

    @pytest.mark.parametrize("max_tracked", [-1, 1.5, True], ids=str)
    def test_bad_max_tracked(self, max_tracked: object) -> None:
        with pytest.raises(ValueError, match="max_tracked"):
            FanoutStore([MemoryStore()], max_tracked=max_tracked)  # type: ignore[arg-type]

    def test_no_stores(self) -> None:
        with pytest.raises(ValueError, match="at least one store"):
            FanoutStore([])


class TestWrite:
    def test_every_store_gets_every_record(self, tmp_path: Path) -> None:
        sqlite, memory = SQLiteStore(tmp_path / "a.sqlite3"), MemoryStore()
        store = FanoutStore([sqlite, memory])
        records = [make_record(), make_record(accepted=False)]
        store.write(records)
        store.write([])
        assert ids(sqlite) == ids(memory) == [r["id"] for r in records]
        store.close()

    def test_a_failing_store_raises_and_the_others_keep_the_records_once(self) -> None:
        healthy, flaky = MemoryStore(), Switchable("flaky")
        store = FanoutStore([healthy, flaky])
        flaky.failing = True
        batch = [make_record() for _ in range(3)]
        for _ in range(3):  # the recorder trying again while the store is down
            with pytest.raises(StoreError, match=r"1 of 2 stores failed: switchable://flaky"):
                store.write(batch)
        flaky.failing = False
        store.write(batch)
        assert ids(healthy) == ids(flaky) == [r["id"] for r in batch]
        # Once every store has them, they are forgotten: nothing is skipped later.
        assert store._taken == [{}, {}]

    def test_record_errors_stay_record_errors(self) -> None:
        store = FanoutStore([MemoryStore(), Switchable("picky", RecordError)])
        store.stores[1].failing = True  # type: ignore[attr-defined]
        with pytest.raises(RecordError):
            store.write([make_record()])
        store.stores[1].failing = False  # type: ignore[attr-defined]

    def test_any_other_failure_is_a_store_error(self) -> None:
        picky, down = Switchable("picky", RecordError), Switchable("down")
        picky.failing = down.failing = True
        with pytest.raises(StoreError, match="2 of 2 stores failed") as info:
            FanoutStore([picky, down]).write([make_record()])
        assert not isinstance(info.value, RecordError)

    def test_memory_for_taken_records_is_bounded(self) -> None:
        healthy, flaky = MemoryStore(), Switchable("flaky")
        store = FanoutStore([healthy, flaky], max_tracked=2)
        flaky.failing = True
        batch = [make_record() for _ in range(3)]
        with pytest.raises(StoreError):
            store.write(batch)
        flaky.failing = False
        store.write(batch)
        # The oldest id was forgotten, so that record reached the healthy store twice.
        assert Counter(ids(healthy)) == {batch[0]["id"]: 2, batch[1]["id"]: 1, batch[2]["id"]: 1}

    def test_closed(self) -> None:
        memory = MemoryStore()
        store = FanoutStore([memory])
        store.close()
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.write([make_record()])
        with pytest.raises(StoreError, match="closed"):
            memory.write([make_record()])


class TestRead:
    def test_reads_the_first_readable_store(
        self, tmp_path: Path, batch_server: BatchServer
    ) -> None:
        forward = ForwardStore(f"forward+{batch_server.url}", outbox=tmp_path / "o.sqlite3")
        sqlite, memory = SQLiteStore(tmp_path / "a.sqlite3"), MemoryStore()
        store = FanoutStore([forward, sqlite, memory])
        records = [make_record(), make_record(call="page", accepted=False)]
        store.write(records)
        assert store.read() == sqlite.read()
        assert [r["id"] for _, r in store.read(accepted=False, limit=1)] == [records[1]["id"]]
        assert forward.flush(5)
        assert [e["messageId"] for _, e in batch_server.events] == [
            records[0]["event"]["messageId"]  # type: ignore[index]
        ]
        store.close()

    def test_nothing_readable(self, tmp_path: Path, batch_server: BatchServer) -> None:
        forward = ForwardStore(f"forward+{batch_server.url}", outbox=tmp_path / "o.sqlite3")
        store = FanoutStore([forward])
        with pytest.raises(StoreError, match="can be read"):
            store.read()
        store.close()


@pytest.mark.redis
def test_redis_outage_with_the_recorder_loses_nothing_and_repeats_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SQLite and a real Redis behind a real recorder; Redis dies and comes back."""
    sqlite = SQLiteStore(tmp_path / "events.sqlite3")
    redis = open_store(redis_server.url + "?timeout=0.5")
    recorder = Recorder(
        FanoutStore([sqlite, redis]), spool_path=tmp_path / "spool", retry_interval=0.05
    )
    records = [make_record() for _ in range(60)]
    for record in records[:20]:
        recorder.record(record)
    assert recorder.flush(timeout=10)  # journaled, and now in both stores
    redis_server.stop()
    for record in records[20:40]:
        recorder.record(record)  # durable: spooled while Redis is down
    assert recorder.spooled > 0
    redis_server.start()
    for record in records[40:]:
        recorder.record(record)
    deadline = time.monotonic() + 10
    while recorder.spooled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert recorder.spooled == 0
    recorder.close()

    expected = [r["id"] for r in records]
    assert ids(SQLiteStore(tmp_path / "events.sqlite3")) == expected
    # Redis lost its first 20 with the restart (no persistence in the test server);
    # everything from the outage on is there, once.
    again = open_store(redis_server.url)
    assert [r["id"] for _, r in again.read()] == expected[20:]
    again.close()


def test_reading_a_fanout_creates_no_child_file(tmp_path: Path) -> None:
    url = f"fanout://sqlite:///{tmp_path}/a.sqlite3 jsonl:///{tmp_path}/b.jsonl"
    with pytest.raises(StoreNotFoundError, match=r"a\.sqlite3"):
        open_store(url, create=False)
    assert list(tmp_path.iterdir()) == []
    open_store(url).close()  # a writer creates both
    store = open_store(url, create=False)
    assert store.read() == []
    store.close()
