"""PostgreSQLStore against a real PostgreSQL server (a throwaway cluster)."""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pytest
import test_stores
from hypothesis import given, settings
from hypothesis import strategies as st
from records import make_record

from pixel_middleware.core import PixelRecord
from pixel_middleware.recorder import Recorder
from pixel_middleware.stores import (
    RecordError,
    StoreError,
    StoreNotFoundError,
    open_store,
    postgresql,
    redact_url,
    store_identity,
)
from pixel_middleware.stores.postgresql import PostgreSQLStore

if TYPE_CHECKING:
    from postgres_server import PostgresServer

# Fixtures from the helper module; imported only through this, so pytest rewrites
# its asserts (a plain import first would make it warn, and warnings are errors).
pytest_plugins = ["postgres_server"]

pytestmark = pytest.mark.postgresql


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgreSQLStore]:
    opened = PostgreSQLStore(postgres_url)
    yield opened
    opened.close()


# The shared Store contract (tests/test_stores.py), run here against this store:
# every contract test that takes the `store` fixture gets this module's.
for _name, _test in vars(test_stores).items():
    if _name.startswith("test_") and "store" in inspect.signature(_test).parameters:
        globals()[_name] = _test
del _name, _test


def ids(pairs: list[tuple[str, PixelRecord]]) -> list[str]:
    return [record["id"] for _, record in pairs]


def rows(server: PostgresServer, table: str, columns: str = "*") -> list[tuple[Any, ...]]:
    with server.connect() as conn:
        return conn.execute(f"SELECT {columns} FROM {table} ORDER BY position").fetchall()


def table_of(url: str) -> str:
    return url.rpartition("table=")[2]


# --- the contract tests that name their stores ---------------------------------


def test_read_answers_any_after_with_records_or_a_clear_error(store: PostgreSQLStore) -> None:
    store.write([make_record(id=f"r{i}") for i in range(3)])
    positions = [position for position, _ in store.read()]

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
            assert isinstance(store.read(after=after, limit=limit), list)

    check()


def test_records_outlive_the_store_object(postgres_url: str) -> None:
    first = open_store(postgres_url)
    first.write([make_record(id="kept")])
    first.close()
    second = open_store(postgres_url)
    try:
        assert ids(second.read()) == ["kept"]
    finally:
        second.close()


def test_a_reader_opens_a_store_that_exists(postgres_url: str) -> None:
    writer = open_store(postgres_url)
    records = [make_record(), make_record(accepted=False)]
    writer.write(records)
    writer.close()
    reader = open_store(postgres_url, create=False)
    try:
        assert [r for _, r in reader.read()] == records
    finally:
        reader.close()


def test_a_reader_of_a_missing_table_is_told_so_and_nothing_is_created(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    table = table_of(postgres_url)
    with pytest.raises(StoreNotFoundError, match=f"no store: there is no table {table} in"):
        open_store(postgres_url, create=False)
    with postgres_server.connect() as conn:
        assert conn.execute("SELECT to_regclass(%s)", [table]).fetchone() == (None,)


# --- URLs ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "PostgreSQL"])
def test_open_store_knows_both_schemes(postgres_server: PostgresServer, scheme: str) -> None:
    url = postgres_server.url(table="schemes").replace("postgresql", scheme, 1)
    opened = open_store(url)
    try:
        assert isinstance(opened, PostgreSQLStore)
        assert opened.url == url
        assert opened.table == "schemes"
    finally:
        opened.close()


def test_the_default_table_is_pixel_events(postgres_server: PostgresServer) -> None:
    opened = open_store(postgres_server.url())
    try:
        opened.write([make_record(id="default")])
    finally:
        opened.close()
    assert [r[0] for r in rows(postgres_server, "pixel_events", "id")][-1:] == ["default"]


def test_a_schema_qualified_table(postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS analytics")
    opened = open_store(postgres_server.url(table="analytics.pixels"))
    try:
        opened.write([make_record(id="in-schema")])
        assert ids(opened.read()) == ["in-schema"]
    finally:
        opened.close()
    assert rows(postgres_server, "analytics.pixels", "id") == [("in-schema",)]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("table=a;drop", "not a table name", id="table-punctuation"),
        pytest.param("table=a.b.c", "not a table name", id="table-three-parts"),
        pytest.param("table=", "not a table name", id="table-empty"),
        pytest.param("table=1abc", "not a table name", id="table-digit-first"),
        pytest.param("table=" + "a" * 49, "not a table name", id="table-49-chars"),
        pytest.param("bogus=1", "unknown option 'bogus'", id="unknown-option"),
        pytest.param("sslmode=require&stream=x", "unknown option 'stream'", id="redis-option"),
    ],
)
def test_bad_urls_are_refused_before_connecting(query: str, message: str) -> None:
    # Port 1: were it tried, the answer would be "connection refused", not this.
    with pytest.raises(ValueError, match=message) as refused:
        PostgreSQLStore(f"postgresql://u:pw-secret@127.0.0.1:1/db?{query}")
    assert "pw-secret" not in str(refused.value)


def test_a_table_name_of_48_characters_is_taken(postgres_server: PostgresServer) -> None:
    name = "a" * 48
    opened = open_store(postgres_server.url(table=name))
    try:
        opened.write([make_record(id="long")])
        assert ids(opened.read()) == ["long"]
    finally:
        opened.close()


def test_a_bad_port_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"port .* is not a number"):
        PostgreSQLStore("postgresql://u:pw@127.0.0.1:port/db")


# --- the table -------------------------------------------------------------------


def test_columns_hold_what_one_filters_on(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    record = make_record(id="cols", writeKey="wk-1")
    record["event"] = {
        "type": "track",
        "event": "Signed Up",
        "userId": "u-7",
        "anonymousId": "a-9",
        "messageId": "m-1",
    }
    rejected = make_record(id="bad", accepted=False, call="page", event=None, writeKey=None)
    rejected["dialect"] = "rudderstack"
    store.write([record, rejected])
    found = rows(
        postgres_server,
        store.table,
        "id, received_at, accepted, call, dialect, event_name, write_key, user_id,"
        " anonymous_id, record->'event'->>'userId', record_json",
    )
    assert found == [
        (
            "cols",
            record["receivedAt"],
            True,
            "track",
            "segment",
            "Signed Up",
            "wk-1",
            "u-7",
            "a-9",
            "u-7",
            None,
        ),
        (
            "bad",
            rejected["receivedAt"],
            False,
            "page",
            "rudderstack",
            None,
            None,
            None,
            None,
            None,
            None,
        ),
    ]


def test_only_what_read_queries_is_indexed(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    with postgres_server.connect() as conn:
        found = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s ORDER BY indexname",
            [store.table],
        ).fetchall()
    defs = sorted(row[0].split(" USING btree ")[1] for row in found)
    assert defs == ['("position")', '(accepted, "position")', '(call, "position")']


@pytest.mark.parametrize(
    ("value", "jsonb_would"),
    [
        pytest.param("nul \x00 in it", "refuse", id="nul"),
        pytest.param("lone \udcff surrogate", "refuse", id="lone-surrogate"),
        pytest.param(1e20, "write 100000000000000000000", id="float-exponent"),
        pytest.param(-0.0, "write 0.0", id="minus-zero"),
        pytest.param(1.5e-7, "write 0.00000015", id="small-float"),
    ],
)
def test_what_jsonb_cannot_hold_is_kept_exactly(
    store: PostgreSQLStore, postgres_server: PostgresServer, value: object, jsonb_would: str
) -> None:
    record = make_record(id="odd")
    record["event"] = {"type": "track", "event": "E", "userId": value, "properties": {"v": value}}
    store.write([record])
    ((_position, got),) = store.read()
    assert got == record
    assert json.dumps(got) == json.dumps(record)  # types and signs too, not just ==
    (kept,) = rows(postgres_server, store.table, "record_json, record->'properties'")
    assert kept[0] is not None
    assert json.loads(kept[0]) == json.loads(json.dumps(record))


def test_an_ordinary_record_is_kept_once_as_jsonb(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    # Ids with a digit, "e" and a digit in them (as uuids have) are no float.
    record = make_record(
        id="1e5-0e12-4e-7",
        event={
            "type": "track",
            "event": "Café ☕ 🎉",
            "messageId": "6e40",
            "properties": {"n": 1.5},
        },
    )
    store.write([record])
    assert [r for _, r in store.read()] == [record]
    assert rows(postgres_server, store.table, "record_json, record->'event'->>'event'") == [
        (None, "Café ☕ 🎉")
    ]


def test_read_gives_the_fields_in_their_usual_order(store: PostgreSQLStore) -> None:
    record = make_record()
    store.write([record])
    ((_, got),) = store.read()
    assert list(got) == list(record)


def test_a_record_that_is_not_json_is_a_record_error(store: PostgreSQLStore) -> None:
    with pytest.raises(RecordError):
        store.write([make_record(event={"type": "track", "v": float("nan")})])
    with pytest.raises(RecordError):
        store.write([{"id": "no-fields"}])  # type: ignore[list-item]
    assert store.read() == []


def test_a_failing_batch_keeps_none_of_its_records(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    with postgres_server.connect() as conn:
        conn.execute(f"ALTER TABLE {store.table} ADD CONSTRAINT no_x CHECK (id <> 'x')")
    with pytest.raises(StoreError, match="could not write 3 records to table"):
        store.write([make_record(id="a"), make_record(id="x"), make_record(id="b")])
    assert store.read() == []
    store.write([make_record(id="a")])
    assert ids(store.read()) == ["a"]


# --- opening: what a user may do --------------------------------------------------


@pytest.fixture
def limited_role(postgres_server: PostgresServer) -> Iterator[str]:
    """A login role with no right to create tables in public (PostgreSQL 15's default)."""
    with postgres_server.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS pixel_limited")
        conn.execute("CREATE ROLE pixel_limited LOGIN")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    yield "pixel_limited"
    with postgres_server.connect() as conn:
        conn.execute("DROP OWNED BY pixel_limited")
        conn.execute("DROP ROLE pixel_limited")


def test_a_user_who_cannot_create_the_table_is_told_at_open(
    postgres_server: PostgresServer, postgres_url: str, limited_role: str
) -> None:
    table = table_of(postgres_url)
    url = postgres_server.url(user=limited_role, table=table)
    with pytest.raises(StoreError) as refused:
        open_store(url)
    message = str(refused.value)
    assert f"table {table} in database postgres on 127.0.0.1:{postgres_server.port}" in message
    assert f"as user {limited_role}" in message
    assert "cannot be created (permission denied for schema public" in message
    assert "GRANT CREATE ON SCHEMA" in message


def test_a_user_who_cannot_insert_is_told_at_open_and_may_still_read(
    postgres_server: PostgresServer, postgres_url: str, limited_role: str
) -> None:
    table = table_of(postgres_url)
    owner = open_store(postgres_url)
    owner.write([make_record(id="kept")])
    owner.close()
    with postgres_server.connect() as conn:
        conn.execute(f"GRANT SELECT ON {table} TO {limited_role}")
    url = postgres_server.url(user=limited_role, table=table)
    with pytest.raises(StoreError) as refused:
        open_store(url)
    message = str(refused.value)
    assert f"table {table} in database postgres on 127.0.0.1:{postgres_server.port}" in message
    assert "cannot be written (permission denied for table" in message
    assert "GRANT INSERT" in message
    reader = open_store(url, create=False)
    try:
        assert ids(reader.read()) == ["kept"]
    finally:
        reader.close()
    # Granted, the check passes and the user writes.
    with postgres_server.connect() as conn:
        conn.execute(f"GRANT INSERT ON {table} TO {limited_role}")
    writer = open_store(url)
    try:
        writer.write([make_record(id="by-limited")])
        assert ids(writer.read()) == ["kept", "by-limited"]
    finally:
        writer.close()


def test_the_check_at_open_leaves_no_row(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    assert rows(postgres_server, store.table) == []


def test_a_database_that_does_not_exist_is_a_clear_error(postgres_server: PostgresServer) -> None:
    with pytest.raises(
        StoreError,
        match=r'cannot connect to table pixel_events in database nosuch.*"nosuch" does not exist',
    ):
        open_store(postgres_server.url(database="nosuch"))


# --- secrets -----------------------------------------------------------------------


def closed_port() -> int:
    return test_stores.closed_port()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        pytest.param(
            "postgresql://pixel_pw:{pw}@127.0.0.1:{port}/postgres", "", id="wrong-password"
        ),
        pytest.param(
            "postgresql://pixel_pw:{pw}@127.0.0.1:{closed}/postgres", "", id="server-down"
        ),
        pytest.param(
            "postgresql://pixel_pw@127.0.0.1:{closed}/postgres?password={pw}",
            "",
            id="password-param",
        ),
        pytest.param("postgresql://pixel_pw:{pw}@127.0.0.1:{port}/nosuch", "", id="no-database"),
        # libpq repeats a badly percent-encoded password in its error.
        pytest.param(
            "postgresql://pixel_pw:{pw}@127.0.0.1:{port}/postgres",
            "Bad%zz%41Pa55",
            id="bad-percent-encoding",
        ),
    ],
)
def test_errors_never_contain_the_password(
    postgres_server: PostgresServer, url: str, secret: str
) -> None:
    secret = secret or "Wr0ng-Pa55word"
    url = url.format(pw=secret, port=postgres_server.port, closed=closed_port())
    with pytest.raises(StoreError) as refused:
        open_store(url)
    shown = test_stores.chain_text(refused.value)
    for part in {secret, unquote(secret), "Pa55"}:
        assert part not in shown
    assert "table pixel_events in database" in str(refused.value)


def test_the_url_shown_has_the_password_masked(postgres_server: PostgresServer) -> None:
    from postgres_server import PASSWORD, PASSWORD_USER

    url = f"postgresql://{PASSWORD_USER}:{PASSWORD}@127.0.0.1:{postgres_server.port}/postgres?table=pw_table"
    with postgres_server.connect() as conn:
        conn.execute(f"GRANT CREATE ON SCHEMA public TO {PASSWORD_USER}")
    opened = open_store(url)
    try:
        assert (
            opened.url
            == f"postgresql://{PASSWORD_USER}:***@127.0.0.1:{postgres_server.port}/postgres?table=pw_table"
        )
        assert opened.url == redact_url(url)
        assert PASSWORD not in repr(opened)
        assert store_identity(opened) == url
        opened.write([make_record(id="with-password")])
        assert ids(opened.read()) == ["with-password"]
        # The server goes away: the errors still carry no password.
        postgres_server.stop()
        with pytest.raises(StoreError) as failed:
            opened.write([make_record()])
        assert PASSWORD not in test_stores.chain_text(failed.value)
        with pytest.raises(StoreError) as failed:
            opened.read()
        assert PASSWORD not in test_stores.chain_text(failed.value)
    finally:
        opened.close()
        if not postgres_server.running:
            postgres_server.start()


# --- connections -------------------------------------------------------------------


def test_a_forked_child_uses_a_connection_of_its_own(store: PostgreSQLStore) -> None:
    store.write([make_record(id="parent-1")])
    store.read()
    parent_writer, parent_reader = store._writer, store._reader
    assert parent_writer is not None
    assert parent_reader is not None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running any cleanup
        try:
            store.write([make_record(id="child")])
            seen = ids(store.read())
            report = {
                "writer_differs": store._writer is not parent_writer,
                "reader_differs": store._reader is not parent_reader,
                "seen": seen,
            }
            os.write(write_end, json.dumps(report).encode())
            # What the end of a child that exits normally does to what it
            # inherited: collect it, closing each connection object.
            postgresql._ABANDONED.clear()
            gc.collect()
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    assert report == {"writer_differs": True, "reader_differs": True, "seen": ["parent-1", "child"]}
    # The parent's own connections were left alone, and still work.
    store.write([make_record(id="parent-2")])
    assert store._writer is parent_writer
    assert ids(store.read()) == ["parent-1", "child", "parent-2"]
    assert store._reader is parent_reader


def test_close_closes_both_connections(store: PostgreSQLStore) -> None:
    store.write([make_record()])
    store.read()
    writer, reader = store._writer, store._reader
    assert writer is not None
    assert reader is not None
    store.close()
    assert writer.closed
    assert reader.closed
    with pytest.raises(StoreError, match="closed"):
        store.read()


def test_a_reader_holds_one_connection(postgres_url: str) -> None:
    open_store(postgres_url).close()
    reader = PostgreSQLStore(postgres_url, create=False)
    try:
        assert reader._writer is None
        assert reader.read() == []
        assert reader._writer is None
    finally:
        reader.close()


def test_a_restarted_server_is_written_to_again(
    store: PostgreSQLStore, postgres_server: PostgresServer
) -> None:
    store.write([make_record(id="before")])
    postgres_server.stop()
    with pytest.raises(StoreError, match=r"could not write 1 records to table|cannot connect"):
        store.write([make_record(id="lost")])
    postgres_server.start()
    store.write([make_record(id="after")])
    assert ids(store.read()) == ["before", "after"]


def test_a_database_restart_under_load_loses_nothing(
    postgres_server: PostgresServer,
    postgres_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Several threads record through a durable Recorder (record() returns once
    # the record is committed to the table or to the spool) while the server
    # is stopped and started again. Every record must be in the table after.
    store = PostgreSQLStore(postgres_url + "&connect_timeout=2")
    recorder = Recorder(store, spool_path=tmp_path / "spool", retry_interval=0.2)
    returned: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 20  # a bound, should the server never come back

    def work(n: int) -> None:
        for i in range(300):
            if time.monotonic() > stop_at:
                return
            record = make_record(id=f"w{n}-{i}")
            recorder.record(record)
            with lock:
                returned.append(record["id"])
            time.sleep(0.002)

    caplog.set_level(logging.ERROR)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(returned) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        postgres_server.stop()
        stopped_with = len(returned)
        deadline = time.monotonic() + 10
        while len(returned) < stopped_with + 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        spooled_during_outage = recorder.spooled
        postgres_server.start()
    finally:
        for thread in threads:
            thread.join(timeout=30)
    assert spooled_during_outage > 0, "the outage was not felt"
    assert len(returned) == 1200
    # The spool drains into the table once the server is back.
    deadline = time.monotonic() + 20
    while recorder.spooled and time.monotonic() < deadline:
        time.sleep(0.1)
    recorder.close(timeout=20)
    assert [
        r for r in caplog.records if r.levelno >= logging.ERROR and "not kept" in r.getMessage()
    ] == []
    reader = open_store(postgres_url, create=False)
    try:
        kept = ids(reader.read())
    finally:
        reader.close()
    assert set(returned) <= set(kept), f"{len(set(returned) - set(kept))} records lost"
    # A repeat, if any, is the same record written again (at-least-once).
    assert len(set(kept)) == 1200
