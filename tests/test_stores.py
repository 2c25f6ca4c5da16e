"""The Store contract, held to by every store, and open_store's choice of store by URL.

To hold a new store to the contract, add it to ``STORE_FACTORIES``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from records import make_record

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import (
    _SCHEMES,
    DEFAULT_STORE_URL,
    STORE_ENV_VAR,
    Store,
    StoreError,
    StoreNotFoundError,
    _Scheme,
    open_store,
    redact_url,
    store_identity,
    store_schemes,
)
from pixel_middleware.stores.jsonl import JSONLStore
from pixel_middleware.stores.memory import MemoryStore
from pixel_middleware.stores.sqlite import SQLiteStore

# Each opens a fresh, empty store in the given directory.
STORE_FACTORIES: dict[str, Callable[[Path], Store]] = {
    "memory": lambda _: open_store("memory://"),
    "sqlite": lambda tmp: open_store(f"sqlite:///{tmp}/events.sqlite3"),
    "jsonl": lambda tmp: open_store(f"jsonl:///{tmp}/events.jsonl"),
    # Reads from its first store, so it answers to the contract as that one does.
    "fanout": lambda tmp: open_store(f"fanout://sqlite:///{tmp}/fan.sqlite3 memory://"),
}
# Stores whose records outlive the store object: reopening the URL finds them.
PERSISTENT = ["sqlite", "jsonl"]


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = STORE_FACTORIES[request.param](tmp_path)
    yield opened
    opened.close()


def ids(pairs: list[tuple[str, PixelRecord]]) -> list[str]:
    return [record["id"] for _, record in pairs]


# --- open_store --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "store_type"),
    [
        pytest.param("memory://", MemoryStore, id="memory"),
        pytest.param("sqlite:///{tmp}/a.sqlite3", SQLiteStore, id="sqlite"),
        pytest.param("SQLite:///{tmp}/a.sqlite3", SQLiteStore, id="scheme-any-case"),
        pytest.param("jsonl:///{tmp}/a.jsonl", JSONLStore, id="jsonl"),
    ],
)
def test_open_store_picks_the_store_by_scheme(
    url: str, store_type: type[Store], tmp_path: Path
) -> None:
    url = url.format(tmp=tmp_path)
    opened = open_store(url)
    try:
        assert isinstance(opened, store_type)
        assert opened.url == url
    finally:
        opened.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("mysql://db/pixels", r"unknown store URL scheme 'mysql'", id="unknown"),
        pytest.param("pixels.txt", r"neither a store URL .* nor a file path", id="bare-path"),
        pytest.param("pixels?.jsonl", r"without '\?' or '#'", id="path-with-query"),
        pytest.param("sqlite:pixels.sqlite3", r"needs '//' after 'sqlite:'", id="no-slashes"),
        pytest.param("://x", r"has no scheme", id="empty-scheme"),
        pytest.param("memory://somewhere", r"just 'memory://'", id="memory-with-host"),
        pytest.param("sqlite://", r"names no file", id="sqlite-no-path"),
        pytest.param("sqlite:///", r"names no file", id="sqlite-empty-path"),
        pytest.param("sqlite://host/x.db", r"names no file", id="sqlite-with-host"),
        pytest.param("sqlite:///:memory:", r"use memory://", id="sqlite-in-memory"),
        pytest.param("sqlite:///x.db?journal=off", r"unknown option\(s\) journal", id="sqlite-opt"),
        pytest.param("sqlite:///x.db?synchronous=off", r"normal or full", id="sqlite-sync"),
        pytest.param("sqlite:///x.db?timeout=soon", r"number of seconds", id="sqlite-timeout"),
        pytest.param("jsonl:///x.jsonl?fsync=maybe", r"true or false", id="jsonl-fsync"),
        pytest.param("jsonl:///x.jsonl?fsync", r"not name=value", id="jsonl-bare-option"),
    ],
)
def test_open_store_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_unknown_scheme_error_lists_the_schemes() -> None:
    with pytest.raises(ValueError, match=r"expected one of .*jsonl://.*memory://.*sqlite://"):
        open_store("ftp://example.com/x")


def test_store_schemes_name_every_store() -> None:
    assert set(store_schemes()) == {
        "memory",
        "sqlite",
        "jsonl",
        "redis",
        "rediss",
        "forward+http",
        "forward+https",
        "fanout",
        "postgresql",
        "postgres",
    }


def test_a_store_url_can_name_other_store_urls(tmp_path: Path) -> None:
    # The fan-out opens its stores through open_store in turn.
    opened = open_store(f"fanout://memory:// jsonl:///{tmp_path}/events.jsonl")
    try:
        opened.write([make_record(id="both")])
        assert ids(opened.read()) == ["both"]
    finally:
        opened.close()
    assert (tmp_path / "events.jsonl").read_text().count("\n") == 1


def test_open_store_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(STORE_ENV_VAR, f"jsonl:///{tmp_path}/env.jsonl")
    opened = open_store()
    opened.close()
    assert isinstance(opened, JSONLStore)
    assert opened.path == str(tmp_path / "env.jsonl")


def test_open_store_defaults_to_sqlite_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(STORE_ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    opened = open_store()
    opened.close()
    assert opened.url == DEFAULT_STORE_URL
    assert isinstance(opened, SQLiteStore)
    assert opened.path == str(tmp_path / "pixel-events.sqlite3")


def test_sqlite_and_jsonl_stores_import_no_third_party_module() -> None:
    # The stdlib-only stores must work where only the standard library is.
    code = (
        "import sys\n"
        "from pixel_middleware.stores import open_store\n"
        "import pixel_middleware.stores.sqlite, pixel_middleware.stores.jsonl\n"
        "import pixel_middleware.stores.memory\n"
        "bad = sorted({'redis', 'urllib3', 'werkzeug', 'requests'} & set(sys.modules))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]"


# --- the contract ------------------------------------------------------------


def test_round_trip_keeps_records_whole_and_in_order(store: Store) -> None:
    records = [make_record(), make_record(call="page"), make_record(accepted=False)]
    store.write(records[:2])
    store.write(records[2:])
    read = store.read()
    assert [record for _, record in read] == records
    positions = [position for position, _ in read]
    assert len(set(positions)) == 3
    assert all(isinstance(position, str) for position in positions)


def test_empty_write_keeps_nothing(store: Store) -> None:
    store.write([])
    assert store.read() == []


def test_unicode_survives(store: Store) -> None:
    record = make_record(
        event={"type": "track", "event": "Café ☕ 注文 🎉", "properties": {"ключ": "\u2028"}},
        request={
            "method": "GET",
            "path": "/v1/pixel/track",
            # A lone surrogate: what a decoder keeps of invalid UTF-8 bytes.
            "query": "name=\udcff",
            "ip": None,
            "userAgent": "Mozilla/5.0 (ünïcode)",
        },
    )
    store.write([record])
    assert [r for _, r in store.read()] == [record]


FILTERS = [
    pytest.param({}, ["a1", "a2", "r1", "p1", "r2"], id="all"),
    pytest.param({"accepted": True}, ["a1", "a2", "p1"], id="accepted"),
    pytest.param({"accepted": False}, ["r1", "r2"], id="rejected"),
    pytest.param({"call": "page"}, ["p1", "r2"], id="call"),
    pytest.param({"call": "page", "accepted": False}, ["r2"], id="call-and-rejected"),
    pytest.param({"call": "screen"}, [], id="no-match"),
    pytest.param({"limit": 2}, ["p1", "r2"], id="limit-newest-first-oldest-out"),
    pytest.param({"limit": 0}, [], id="limit-0"),
    pytest.param({"limit": 50}, ["a1", "a2", "r1", "p1", "r2"], id="limit-above-count"),
    pytest.param({"accepted": True, "limit": 2}, ["a2", "p1"], id="accepted-limit"),
    pytest.param({"accepted": False, "limit": 1}, ["r2"], id="rejected-limit"),
]


@pytest.mark.parametrize(("query", "expected"), FILTERS)
def test_read_filters(store: Store, query: dict[str, object], expected: list[str]) -> None:
    records = [
        make_record(id="a1"),
        make_record(id="a2"),
        make_record(id="r1", accepted=False),
        make_record(id="p1", call="page"),
        make_record(id="r2", call="page", accepted=False),
    ]
    store.write(records)
    assert ids(store.read(**query)) == expected  # type: ignore[arg-type]


def test_after_returns_only_later_records(store: Store) -> None:
    first = [make_record(id=f"r{i}") for i in range(5)]
    store.write(first)
    positions = [position for position, _ in store.read()]
    assert ids(store.read(after=positions[1])) == ["r2", "r3", "r4"]
    assert store.read(after=positions[-1]) == []
    # As `events --follow` uses it: read what came since the last position seen.
    store.write([make_record(id="r5"), make_record(id="r6", accepted=False)])
    assert ids(store.read(after=positions[-1])) == ["r5", "r6"]
    assert ids(store.read(after=positions[-1], accepted=False)) == ["r6"]
    # Paging forward: the oldest `limit` after the position, not the newest.
    assert ids(store.read(after=positions[2], limit=2)) == ["r3", "r4"]


@pytest.mark.parametrize("accepted", [None, False])
def test_paging_forward_sees_every_record(store: Store, accepted: bool | None) -> None:
    # A client polling /events.json?after=X&limit=50 after a burst of 60 new
    # records: with the newest 50 it never saw r1..r10.
    store.write([make_record(id="r0", accepted=False)])
    ((start, _),) = store.read()
    store.write([make_record(id=f"r{i}", accepted=False) for i in range(1, 61)])
    seen: list[str] = []
    after = start
    for _ in range(10):  # bounded: 60 records are 2 pages, then an empty one
        page = store.read(after=after, limit=50, accepted=accepted)
        assert len(page) <= 50
        if not page:
            break
        seen += ids(page)
        after = page[-1][0]
    assert seen == [f"r{i}" for i in range(1, 61)]
    first = store.read(after=start, limit=50, accepted=accepted)
    assert ids(first) == [f"r{i}" for i in range(1, 51)]
    # Exactly at the boundary and one over it.
    assert ids(store.read(after=first[-1][0], limit=10, accepted=accepted)) == [
        f"r{i}" for i in range(51, 61)
    ]
    assert ids(store.read(after=first[-1][0], limit=9, accepted=accepted)) == [
        f"r{i}" for i in range(51, 60)
    ]
    # Without `after`, still the newest `limit`, oldest first.
    assert ids(store.read(limit=50, accepted=accepted)) == [f"r{i}" for i in range(11, 61)]


def test_positions_sort_in_store_order_as_numbers(store: Store) -> None:
    store.write([make_record() for _ in range(12)])
    positions = [position for position, _ in store.read()]
    assert [int(p) for p in positions] == sorted(int(p) for p in positions)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param({"after": "not-a-position"}, "not a position", id="after-garbage"),
        pytest.param({"after": "-5"}, "not a position", id="after-negative"),
        pytest.param({"limit": -1}, "limit must be", id="limit-negative"),
        # One past the largest position a store can give (SQLite's INTEGER, a
        # file offset), and far past it: /events.json?after=99999999999999999999
        # once answered 500 from an OverflowError.
        pytest.param({"after": str(2**63)}, "not a position", id="after-2**63"),
        pytest.param({"after": "9" * 20}, "not a position", id="after-20-digits"),
        pytest.param({"after": "9" * 5000}, "not a position", id="after-5000-digits"),
        # What int() takes but no store writes.
        pytest.param({"after": " 1"}, "not a position", id="after-space"),
        pytest.param({"after": "+1"}, "not a position", id="after-plus"),
        pytest.param({"after": "1_0"}, "not a position", id="after-underscore"),
        pytest.param({"after": "\u0661"}, "not a position", id="after-arabic-digit"),
        pytest.param({"after": ""}, "not a position", id="after-empty"),
    ],
)
def test_read_rejects_bad_arguments(store: Store, query: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.read(**query)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [None, 3])
def test_the_largest_position_is_read_as_one(store: Store, limit: int | None) -> None:
    store.write([make_record(id="r1")])
    assert store.read(after=str(2**63 - 1), limit=limit) == []
    assert ids(store.read(after="0" * 19, limit=limit)) in (["r1"], [])


def test_a_long_bad_position_is_not_repeated_whole(store: Store) -> None:
    with pytest.raises(ValueError, match="not a position") as refused:
        store.read(after="7" * 5000)
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize("name", sorted(STORE_FACTORIES))
def test_read_answers_any_after_with_records_or_a_clear_error(name: str, tmp_path: Path) -> None:
    opened = STORE_FACTORIES[name](tmp_path)
    opened.write([make_record(id=f"r{i}") for i in range(3)])
    positions = [position for position, _ in opened.read()]

    @settings(max_examples=150, deadline=None, database=None)
    @given(
        after=st.one_of(
            st.text(max_size=30),
            st.integers(min_value=-(2**70), max_value=2**70).map(str),
            st.sampled_from(positions),
        ),
        limit=st.sampled_from([None, 0, 2]),
    )
    def check(after: str, limit: int | None) -> None:
        with contextlib.suppress(ValueError, StoreError):
            assert isinstance(opened.read(after=after, limit=limit), list)

    try:
        check()
    finally:
        opened.close()


def test_write_after_close_raises_store_error(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.write([make_record()])
    store.close()  # idempotent


def test_concurrent_writers_lose_nothing(store: Store) -> None:
    def writer(n: int) -> None:
        for i in range(20):
            store.write([make_record(id=f"t{n}-{i}-{j}") for j in range(5)])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = ids(store.read())
    assert sorted(got) == sorted(
        f"t{n}-{i}-{j}" for n in range(8) for i in range(20) for j in range(5)
    )
    # Each batch stays together and in order.
    for n in range(8):
        mine = [i for i in got if i.startswith(f"t{n}-")]
        assert mine == [f"t{n}-{i}-{j}" for i in range(20) for j in range(5)]


@pytest.mark.parametrize("name", PERSISTENT)
def test_records_outlive_the_store_object(name: str, tmp_path: Path) -> None:
    first = STORE_FACTORIES[name](tmp_path)
    records = [make_record(), make_record(accepted=False)]
    first.write(records)
    positions = [position for position, _ in first.read()]
    first.close()
    second = STORE_FACTORIES[name](tmp_path)
    try:
        assert [r for _, r in second.read()] == records
        second.write([make_record(id="later")])
        assert ids(second.read(after=positions[-1])) == ["later"]
    finally:
        second.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite:///{tmp}/typo.sqlite3", id="sqlite"),
        pytest.param("jsonl:///{tmp}/typo.jsonl", id="jsonl"),
        pytest.param("sqlite:///{tmp}/no-such-dir/events.sqlite3", id="sqlite-no-dir"),
        pytest.param("jsonl:///{tmp}/no-such-dir/events.jsonl", id="jsonl-no-dir"),
    ],
)
def test_a_reader_does_not_create_a_missing_store(url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"no store at .*: the file does not exist"):
        open_store(url.format(tmp=tmp_path), create=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", PERSISTENT)
def test_a_reader_opens_a_store_that_exists(name: str, tmp_path: Path) -> None:
    writer = STORE_FACTORIES[name](tmp_path)
    records = [make_record(), make_record(accepted=False)]
    writer.write(records)
    writer.close()
    reader = open_store(writer.url, create=False)
    try:
        assert [r for _, r in reader.read()] == records
    finally:
        reader.close()


def test_stores_without_a_file_ignore_create() -> None:
    opened = open_store("memory://", create=False)
    try:
        assert opened.read() == []
    finally:
        opened.close()


def test_a_store_missing_from_this_version_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(_SCHEMES, "future", _Scheme("pixel_middleware.stores.future", "Future"))
    with pytest.raises(ValueError, match=r"future:// store is not part of this version"):
        open_store("future://x")


def test_a_store_missing_a_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "needs_more.py").write_text("import no_such_dependency_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_SCHEMES, "more", _Scheme("needs_more", "Store", extra="more"))
    with pytest.raises(
        ValueError,
        match=r"needs no_such_dependency_here \(pip install 'pixel-middleware\[more\]'\)",
    ):
        open_store("more://x")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(
            "redis://:s3cret@cache:6379/0?stream=s",
            "redis://:***@cache:6379/0?stream=s",
            id="redis-password",
        ),
        pytest.param(
            "rediss://user:p@ss@cache:6379/0", "rediss://user:***@cache:6379/0", id="at-in-password"
        ),
        pytest.param("redis://user@cache:6379/0", "redis://user@cache:6379/0", id="no-password"),
        pytest.param(
            "forward+https://api.segment.io?write_key=wk_live&timeout=5",
            "forward+https://api.segment.io?write_key=***&timeout=5",
            id="forward-write-key",
        ),
        pytest.param(
            "fanout://redis://:pw@h:1/0 forward+https://x?writeKey=k&token=t sqlite:///a.sqlite3",
            "fanout://redis://:***@h:1/0 forward+https://x?writeKey=***&token=*** sqlite:///a.sqlite3",
            id="fanout-each-child",
        ),
        pytest.param(
            "sqlite:///pixels.sqlite3?synchronous=full",
            "sqlite:///pixels.sqlite3?synchronous=full",
            id="nothing-secret",
        ),
        pytest.param("x://h?API-Key=1&password=2", "x://h?API-Key=***&password=***", id="names"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# --- secrets in store URLs ---------------------------------------------------

SECRET = "s3cr3t-Pw"
WRITE_KEY = "wk_live_Zz9"


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chain_text(exc: BaseException) -> str:
    """The exception's message and every message it was raised from."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 10:
        texts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


def secret_urls(tmp: Path) -> dict[str, str]:
    """A URL of each kind of store, with a password or a write key in it."""
    redis = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0?timeout=0.5"
    forward = (
        f"forward+http://127.0.0.1:{closed_port()}?write_key={WRITE_KEY}"
        f"&outbox={tmp}/outbox.sqlite3&drain=0&timeout=0.5"
    )
    return {
        # File stores hold no secret, but their URLs are shown all the same.
        "sqlite": f"sqlite:///{tmp}/a.sqlite3",
        "jsonl": f"jsonl:///{tmp}/a.jsonl",
        "memory": "memory://",
        "redis": redis,
        "forward": forward,
        "fanout": f"fanout://{redis} {forward}",
    }


@pytest.mark.parametrize("kind", ["sqlite", "jsonl", "memory", "redis", "forward", "fanout"])
def test_a_store_shows_no_secret_of_its_url(kind: str, tmp_path: Path) -> None:
    url = secret_urls(tmp_path)[kind]
    opened = open_store(url)
    try:
        assert opened.url == redact_url(url)
        for shown in (opened.url, repr(opened)):
            assert SECRET not in shown
            assert WRITE_KEY not in shown
        if kind in ("redis", "fanout"):
            assert ":***@" in opened.url
        if kind in ("forward", "fanout"):
            assert "write_key=***" in opened.url
        # The recorder's spool is named after what is secret too (see below).
        assert store_identity(opened) == url
        # A read that fails (Redis is down; a forwarding store keeps nothing)
        # says so without the secret.
        if kind in ("redis", "forward", "fanout"):
            with pytest.raises(StoreError) as failed:
                opened.read(after=None, limit=5)
            assert SECRET not in chain_text(failed.value)
            assert WRITE_KEY not in chain_text(failed.value)
        if kind in ("redis", "fanout"):
            with pytest.raises(StoreError) as failed:
                opened.write([make_record()])
            assert SECRET not in chain_text(failed.value)
            assert WRITE_KEY not in chain_text(failed.value)
    finally:
        opened.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite:///{tmp}/a.sqlite3?password={secret}", id="sqlite-option"),
        pytest.param("sqlite:///{tmp}/a.sqlite3?token={secret}&timeout=x", id="sqlite-bad-value"),
        pytest.param("jsonl:///{tmp}/a.jsonl?fsync=maybe&secret={secret}", id="jsonl-option"),
        pytest.param("memory://?token={secret}", id="memory"),
        pytest.param("redis://:{secret}@127.0.0.1:6379/0?bogus=1", id="redis-option"),
        pytest.param("redis://:{secret}@127.0.0.1:6379/0?maxlen=x", id="redis-bad-value"),
        pytest.param("redis://:{secret}@127.0.0.1:port/0", id="redis-bad-port"),
        pytest.param("forward+https://h?write_key={key}&bogus=1", id="forward-option"),
        pytest.param("forward+ftp://h?write_key={key}", id="forward-scheme"),
        pytest.param("forward+https://h?write_key={key}&timeout=soon", id="forward-bad-value"),
        pytest.param("mysql://u:{secret}@db/pixels", id="unknown-scheme"),
        pytest.param("fanout://redis://:{secret}@h/0?bogus=1 memory://", id="fanout-child"),
        pytest.param("fanout://memory:// nosuch://u:{secret}@h", id="fanout-unknown-child"),
        pytest.param(
            "fanout://memory:// forward+https://h?write_key={key}&retries=-1", id="fanout-forward"
        ),
    ],
)
def test_an_error_opening_a_store_shows_no_secret(url: str, tmp_path: Path) -> None:
    url = url.format(tmp=tmp_path, secret=SECRET, key=WRITE_KEY)
    with pytest.raises((ValueError, StoreError)) as refused:
        open_store(url)
    assert SECRET not in chain_text(refused.value)
    assert WRITE_KEY not in chain_text(refused.value)


def test_stores_differing_only_in_a_secret_have_different_identities(tmp_path: Path) -> None:
    # The recorder names its default spool after store_identity(): one spool
    # per store, and never the records of one write key replayed under another.
    urls = secret_urls(tmp_path)
    other = {
        kind: url.replace(SECRET, "other").replace(WRITE_KEY, "other") for kind, url in urls.items()
    }
    for kind in ("redis", "forward", "fanout"):
        first, second = open_store(urls[kind]), open_store(other[kind])
        try:
            assert first.url == second.url, "shown alike"
            assert store_identity(first) != store_identity(second)
        finally:
            first.close()
            second.close()
    # A fan-out made of open stores, and a forwarding store given its key as an
    # argument, are told apart the same way.
    from pixel_middleware.stores.fanout import FanoutStore
    from pixel_middleware.stores.forward import ForwardStore

    base = f"forward+http://127.0.0.1:{closed_port()}?drain=0"
    keyed = [ForwardStore(base, write_key=key, outbox=tmp_path / "o.sqlite3") for key in ("a", "b")]
    fanouts = [FanoutStore([store]) for store in keyed]
    try:
        assert keyed[0].url == keyed[1].url
        assert store_identity(keyed[0]) != store_identity(keyed[1])
        assert store_identity(fanouts[0]) != store_identity(fanouts[1])
    finally:
        for fanout in fanouts:
            fanout.close()


def test_store_identity_of_a_store_of_ones_own() -> None:
    class Plain:
        url = "custom://x"

    assert store_identity(Plain()) == "custom://x"
    assert store_identity(object()) == "object"


# --- private files, and files that cannot be written ------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=oct)
def test_store_files_are_created_private(mask: int, tmp_path: Path) -> None:
    from pixel_middleware.stores.forward import ForwardStore

    with umask(mask):
        sqlite = open_store(f"sqlite:///{tmp_path}/events.sqlite3")
        jsonl = open_store(f"jsonl:///{tmp_path}/events.jsonl")
        forward = ForwardStore(
            f"forward+http://127.0.0.1:{closed_port()}?drain=0&poll=0.05",
            outbox=tmp_path / "outbox.sqlite3",
        )
        try:
            for opened in (sqlite, jsonl, forward):
                opened.write([make_record()])
            # The sender takes its lock file at once; wait for it, bounded.
            for _ in range(200):
                if (tmp_path / "outbox.sqlite3.lock").exists():
                    break
                time.sleep(0.01)
            # While open: the WAL files exist.
            names = sorted(path.name for path in tmp_path.iterdir())
            assert names == [
                "events.jsonl",
                "events.sqlite3",
                "events.sqlite3-shm",
                "events.sqlite3-wal",
                "events.sqlite3-writer.lock",
                "outbox.sqlite3",
                "outbox.sqlite3-shm",
                "outbox.sqlite3-wal",
                "outbox.sqlite3.lock",
            ]
            assert {name: oct(mode(tmp_path / name)) for name in names} == {
                name: oct(0o600) for name in names
            }
        finally:
            for opened in (sqlite, jsonl, forward):
                opened.close()


def test_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.touch(mode=0o640)
    path.chmod(0o640)
    open_store(f"jsonl:///{path}").close()
    assert mode(path) == 0o640


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """``path`` made unwritable in a way that holds for root too: immutable (chattr +i).

    The tests run as root, for whom mode 0444 stops nothing; a non-root user
    gets mode 0444, which stops them.
    """
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        try:
            assert (
                "i"
                in subprocess.run(
                    ["lsattr", "-d", str(path)], check=True, capture_output=True, text=True
                ).stdout.split()[0]
            )
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
    else:
        old = mode(path)
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(old)


@pytest.mark.parametrize("kind", ["sqlite", "jsonl"])
def test_a_store_that_cannot_be_written_fails_at_open(kind: str, tmp_path: Path) -> None:
    url = f"{kind}:///{tmp_path}/events.{kind}"
    first = open_store(url)
    first.write([make_record(id="kept")])
    first.close()
    path = tmp_path / f"events.{kind}"
    with unwritable(path):
        with pytest.raises(StoreError) as refused:
            open_store(url)
        message = str(refused.value)
        assert f"{path} cannot be written" in message
        assert "chattr -i" in message  # how to fix it
        # A reader may still read it.
        reader = open_store(url, create=False)
        try:
            assert ids(reader.read()) == ["kept"]
        finally:
            reader.close()


def test_a_forwarding_outbox_that_cannot_be_written_fails_at_open(tmp_path: Path) -> None:
    from pixel_middleware.stores.forward import ForwardStore

    outbox = tmp_path / "outbox.sqlite3"
    url = f"forward+http://127.0.0.1:{closed_port()}?drain=0"
    ForwardStore(url, outbox=outbox).close()
    with unwritable(outbox), pytest.raises(StoreError, match=f"{outbox} cannot be written"):
        ForwardStore(url, outbox=outbox)


@pytest.mark.parametrize(
    ("name", "store_type"),
    [
        ("events.sqlite3", SQLiteStore),
        ("events.sqlite", SQLiteStore),
        ("events.DB", SQLiteStore),
        ("events.jsonl", JSONLStore),
    ],
)
def test_a_plain_file_path_is_a_store_chosen_by_its_suffix(
    name: str, store_type: type[Store], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for text in (f"./{name}", str(tmp_path / name)):
        opened = open_store(text)
        try:
            assert isinstance(opened, store_type)
            # Made absolute: what is shown is where the file is.
            scheme = "jsonl" if store_type is JSONLStore else "sqlite"
            assert opened.url == f"{scheme}:///{tmp_path}/{name}"
            assert opened.path == str(tmp_path / name)
        finally:
            opened.close()
    # Both spellings named the one file (a SQLite store keeps -wal, -shm, -writer.lock by it).
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(name + "-")] == [name]


def test_the_sqlite_colon_form_explains_the_three_slashes() -> None:
    with pytest.raises(ValueError, match="needs '//'") as caught:
        open_store("sqlite:pixels.sqlite3")
    assert str(caught.value) == (
        "store URL 'sqlite:pixels.sqlite3' needs '//' after 'sqlite:': sqlite:///pixels.sqlite3"
        " is pixels.sqlite3 relative to the working directory, sqlite:////abs/path one from"
        " the root (or give the file path alone)"
    )


@pytest.mark.parametrize("form", ["url", "path"])
@pytest.mark.parametrize("suffix", ["sqlite3", "jsonl"])
def test_a_missing_parent_directory_is_named(form: str, suffix: str, tmp_path: Path) -> None:
    scheme = "sqlite" if suffix == "sqlite3" else "jsonl"
    missing = tmp_path / "no" / "such"
    target = missing / f"p.{suffix}"
    text = f"{scheme}:///{target}" if form == "url" else str(target)
    with pytest.raises(StoreError) as caught:
        open_store(text)
    assert str(caught.value) == (
        f"the directory {missing} does not exist, so the store file p.{suffix} cannot be"
        f" created there: create it (mkdir -p {missing}) or choose another path"
    )
    assert not (tmp_path / "no").exists()
    # One level up exists: the boundary where it works.
    missing.mkdir(parents=True)
    open_store(text).close()
    assert target.exists()


def test_a_reader_of_a_store_in_a_missing_directory_is_told_it_does_not_exist(
    tmp_path: Path,
) -> None:
    with pytest.raises(StoreNotFoundError):
        open_store(str(tmp_path / "no" / "p.sqlite3"), create=False)
