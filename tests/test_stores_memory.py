"""The memory store: what sets it apart (the shared behaviour is in test_stores.py)."""

from __future__ import annotations

import pytest
from records import make_record

from pixel_middleware.stores import RecordError, StoreError, open_store
from pixel_middleware.stores.memory import MemoryStore


def test_each_open_is_a_new_empty_store() -> None:
    one = open_store("memory://")
    one.write([make_record()])
    assert open_store("MEMORY://").read() == []


def test_records_are_copied_in_and_out() -> None:
    store = MemoryStore()
    record = make_record()
    store.write([record])
    record["call"] = "changed after writing"
    [(_, kept)] = store.read()
    assert kept["call"] == "track"
    kept["call"] = "changed after reading"
    assert store.read()[0][1]["call"] == "track"


def test_after_close_reads_work_and_writes_fail() -> None:
    store = MemoryStore()
    store.write([make_record(id="kept")])
    store.close()
    assert [r["id"] for _, r in store.read()] == ["kept"]
    with pytest.raises(StoreError, match="closed"):
        store.write([make_record()])


def test_a_record_that_is_not_json_is_a_record_error() -> None:
    store = MemoryStore()
    with pytest.raises(RecordError, match="cannot be stored"):
        store.write([make_record(), make_record(event={"when": object()})])
    assert store.read() == [], "all or nothing"
