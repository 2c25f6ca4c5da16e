"""RedisStore against a real redis-server."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError, StoreError
from pixel_middleware.stores.redis import RedisStore

if TYPE_CHECKING:
    from redis_server import RedisServer

# Fixtures from the helper module; imported only through this, so pytest rewrites
# its asserts (a plain import first would make it warn, and warnings are errors).
pytest_plugins = ["redis_server"]

pytestmark = pytest.mark.redis


def make_record(n: int, *, call: str = "track", accepted: bool = True) -> PixelRecord:
    return {
        "id": str(uuid.uuid4()),
        "receivedAt": "2024-05-01T12:00:00.000Z",
        "dialect": "segment",
        "call": call,
        "writeKey": "wk",
        "accepted": accepted,
        "problems": [] if accepted else [{"rule": "identity", "message": "no userId"}],
        "notes": [],
        "event": {"type": call, "messageId": f"m-{n}", "userId": "u", "properties": {"n": n}}
        if accepted
        else None,
        "request": {
            "method": "GET",
            "path": f"/v1/pixel/{call}",
            "query": f"n={n}",
            "ip": "127.0.0.1",
            "userAgent": "test",
        },
    }


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    # Generous: a loaded machine must not fail the tests that are not about timeouts.
    s = RedisStore(redis_server.url + "?timeout=5")
    yield s
    s.close()


def numbers(rows: list[tuple[str, PixelRecord]]) -> list[int]:
    return [int(record["request"]["query"][2:]) for _, record in rows]


class TestURL:
    @pytest.mark.parametrize(
        ("url", "stream", "maxlen", "timeout"),
        [
            ("redis://127.0.0.1:6379/0", "pixel-events", None, 2.0),
            ("redis://h/1?stream=s&maxlen=1000&timeout=0.5", "s", 1000, 0.5),
            ("rediss://h:6380/0?ssl_cert_reqs=none", "pixel-events", None, 2.0),
        ],
        ids=["defaults", "options", "tls-passthrough"],
    )
    def test_options(self, url: str, stream: str, maxlen: int | None, timeout: float) -> None:
        s = RedisStore(url)
        assert (s.stream, s.maxlen, s.timeout) == (stream, maxlen, timeout)
        assert s.url == url
        s.close()

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("sqlite:///x", "starts with redis://"),
            ("redis://h/0?streem=x", "unknown option 'streem'"),
            ("redis://h/0?maxlen=0", "maxlen= must be a positive number"),
            ("redis://h/0?timeout=soon", "timeout= must be a positive number"),
            ("redis://h/0?stream=", "stream= must name"),
        ],
        ids=["scheme", "unknown-option", "maxlen-zero", "timeout-nan", "empty-stream"],
    )
    def test_bad_urls_fail_at_construction(self, url: str, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            RedisStore(url)

    def test_password_stays_out_of_messages(self, redis_server: RedisServer) -> None:
        with redis_server.client() as client:
            client.config_set("requirepass", "right")
        try:
            s = RedisStore(redis_server.url.replace("redis://", "redis://:hunter2@"))
            with pytest.raises(StoreError) as info:
                s.write([make_record(1)])
            s.close()
        finally:
            with redis_server.client(password="right") as client:
                client.config_set("requirepass", "")
        assert "hunter2" not in str(info.value)
        assert s.url == redis_server.url.replace("redis://", "redis://:***@")


class TestWriteRead:
    def test_round_trip_in_order(self, store: RedisStore) -> None:
        records = [make_record(n) for n in range(5)]
        store.write(records[:2])
        store.write(records[2:])
        rows = store.read()
        assert [record for _, record in rows] == records
        positions = [position for position, _ in rows]
        assert positions == sorted(positions, key=lambda p: tuple(map(int, p.split("-"))))

    def test_entries_carry_fields_for_other_readers(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        record = make_record(1, call="page")
        store.write([record])
        with redis_server.client() as client:
            ((_, fields),) = client.xrange("pixel-events")
        assert fields[b"id"].decode() == record["id"]
        assert fields[b"call"] == b"page"
        assert fields[b"accepted"] == b"1"
        assert json.loads(fields[b"record"]) == record

    def test_empty_write_is_a_no_op(self, store: RedisStore) -> None:
        store.write([])
        assert store.read() == []

    def test_reading_a_missing_stream_gives_nothing(self, store: RedisStore) -> None:
        assert store.read(limit=10) == []

    @pytest.mark.parametrize(
        ("kwargs", "expected"),
        [
            ({}, list(range(12))),
            ({"accepted": True}, [0, 1, 3, 4, 6, 7, 9, 10]),
            ({"accepted": False}, [2, 5, 8, 11]),
            ({"call": "page"}, [0, 4, 8]),
            ({"call": "page", "accepted": True}, [0, 4]),
            ({"limit": 3}, [9, 10, 11]),
            ({"limit": 2, "accepted": False}, [8, 11]),
            ({"limit": 0}, []),
            ({"limit": 100}, list(range(12))),
        ],
        ids=[
            "all",
            "accepted",
            "rejected",
            "call",
            "call-and-accepted",
            "newest-3",
            "newest-2-rejected",
            "limit-0",
            "limit-over",
        ],
    )
    def test_filters(
        self, store: RedisStore, kwargs: dict[str, object], expected: list[int]
    ) -> None:
        store.write(
            [
                make_record(n, call="page" if n % 4 == 0 else "track", accepted=n % 3 != 2)
                for n in range(12)
            ]
        )
        assert numbers(store.read(**kwargs)) == expected  # type: ignore[arg-type]

    def test_filters_page_through_long_streams(self, store: RedisStore) -> None:
        # More entries than one XRANGE page, with the matches at both ends.
        store.write(
            [make_record(n, call="page" if n in (0, 1299) else "track") for n in range(1300)]
        )
        assert numbers(store.read(call="page")) == [0, 1299]
        assert numbers(store.read(call="page", limit=5)) == [0, 1299]
        assert len(store.read()) == 1300
        assert numbers(store.read(limit=600)) == list(range(700, 1300))

    def test_after_is_exclusive_and_follows(self, store: RedisStore) -> None:
        store.write([make_record(n) for n in range(3)])
        rows = store.read()
        assert numbers(store.read(after=rows[0][0])) == [1, 2]
        assert store.read(after=rows[-1][0]) == []
        store.write([make_record(3), make_record(4)])
        assert numbers(store.read(after=rows[-1][0])) == [3, 4]
        # Paging forward: the oldest after the position.
        assert numbers(store.read(after=rows[-1][0], limit=1)) == [3]

    def test_paging_forward_sees_every_record_across_xrange_pages(self, store: RedisStore) -> None:
        # Over two XRANGE pages (500 entries each), every other one a match.
        store.write([make_record(0)])
        ((start, _),) = store.read()
        store.write([make_record(n, accepted=n % 2 == 0) for n in range(1, 1201)])
        seen: list[int] = []
        after = start
        for _ in range(20):  # bounded: 600 matches are 6 pages, then an empty one
            page = store.read(after=after, limit=100, accepted=False)
            assert len(page) <= 100
            if not page:
                break
            seen += numbers(page)
            after = page[-1][0]
        assert seen == list(range(1, 1201, 2))
        assert numbers(store.read(after=start, limit=3)) == [1, 2, 3]
        assert numbers(store.read(after=start, limit=600, accepted=False)) == seen
        assert numbers(store.read(after=start, limit=599, accepted=False)) == seen[:599]
        # Without `after`, the newest.
        assert numbers(store.read(limit=2, accepted=False)) == [1197, 1199]

    @pytest.mark.parametrize(
        "after",
        ["x", "1-2-3", "-1", "", "\u0661-0", " 1-0", str(2**64), f"1-{2**64}", "9" * 5000],
        ids=["word", "three-parts", "negative", "empty", "arabic-digit", "space", "ms-2**64",
             "seq-2**64", "5000-digits"],
    )  # fmt: skip
    def test_after_must_be_a_stream_id(self, store: RedisStore, after: str) -> None:
        with pytest.raises(ValueError, match="not a position"):
            store.read(after=after)

    @pytest.mark.parametrize("limit", [None, 2])
    def test_the_largest_stream_id_is_a_position(
        self, store: RedisStore, limit: int | None
    ) -> None:
        store.write([make_record(1)])
        assert store.read(after=f"{2**64 - 1}-{2**64 - 2}", limit=limit) == []

    def test_negative_limit(self, store: RedisStore) -> None:
        with pytest.raises(ValueError, match="limit must be"):
            store.read(limit=-1)

    def test_lone_surrogates_survive(self, store: RedisStore) -> None:
        record = make_record(1)
        record["request"]["userAgent"] = "caf\udce9 ☕"
        store.write([record])
        assert [r for _, r in store.read()] == [record]

    def test_closed_store_refuses(self, store: RedisStore) -> None:
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.write([make_record(1)])
        with pytest.raises(StoreError, match="closed"):
            store.read()
        store.close()

    def test_foreign_entries_are_skipped(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        store.write([make_record(1)])
        with redis_server.client() as client:
            client.xadd("pixel-events", {"something": "else"})
        store.write([make_record(2)])
        assert numbers(store.read()) == [1, 2]

    def test_stream_option_and_maxlen(self, redis_server: RedisServer) -> None:
        s = RedisStore(redis_server.url + "?stream=other&maxlen=10")
        for n in range(50):
            s.write([make_record(n) for n in range(n * 10, n * 10 + 10)])
        rows = s.read()
        # Approximate trimming keeps at least maxlen entries, whole macro nodes at a time.
        assert 10 <= len(rows) < 500
        assert numbers(rows)[-1] == 499
        with redis_server.client() as client:
            assert client.exists("pixel-events") == 0
        s.close()


class TestOutage:
    def test_down_redis_fails_fast_and_recovers(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        store.write([make_record(0)])
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StoreError, match="could not append 1 records"):
            store.write([make_record(1)])
        with pytest.raises(StoreError, match="could not read"):
            store.read()
        assert time.monotonic() - started < 3
        redis_server.start()
        # The pooled connection died with the server; the store reconnects by itself.
        store.write([make_record(2)])
        assert numbers(store.read()) == [2]  # no persistence: the restart emptied it

    def test_hung_redis_fails_within_the_timeout(self, redis_server: RedisServer) -> None:
        # A stopped process still has its listening socket: connections are accepted
        # by the kernel and then nothing answers, like a wedged server.
        s = RedisStore(redis_server.url + "?timeout=0.3")
        s.write([make_record(0)])
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="could not append"):
                s.write([make_record(1)])
            # One try and one immediate retry, each bounded by the timeout.
            assert time.monotonic() - started < 1.5
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        # The outcome of the timed-out write is unknown (Redis may still run the
        # commands it had buffered): that is why the recorder's retry is at-least-once.
        assert numbers(s.read())[0] == 0
        s.close()

    def test_a_failed_write_keeps_nothing(
        self, store: RedisStore, redis_server: RedisServer
    ) -> None:
        # A record that cannot be encoded fails the whole batch before anything is sent.
        bad = make_record(2)
        bad["event"] = {"type": "track", "messageId": "m", "properties": {"x": object()}}
        with pytest.raises(RecordError, match="cannot be stored"):
            store.write([make_record(1), bad])
        assert store.read() == []
