"""The JSONL store: URLs, torn lines, reading backwards, several real processes.

The behaviour every store shares is in test_stores.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from records import make_record

from pixel_middleware.stores import RecordError, StoreError, StoreNotFoundError, open_store
from pixel_middleware.stores.jsonl import JSONLStore

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
    ("url", "path", "fsync"),
    [
        pytest.param("jsonl:///events.jsonl", "{cwd}/events.jsonl", False, id="relative"),
        pytest.param("jsonl:///{cwd}/abs.jsonl", "{cwd}/abs.jsonl", False, id="absolute"),
        pytest.param("jsonl:///e.jsonl?fsync=true", "{cwd}/e.jsonl", True, id="fsync"),
        pytest.param("jsonl:///e.jsonl?fsync=0", "{cwd}/e.jsonl", False, id="no-fsync"),
    ],
)
def test_url_spellings(
    url: str, path: str, fsync: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "jsonl:///{cwd}" is four slashes, {cwd} being absolute: jsonl:////tmp/...
    monkeypatch.chdir(tmp_path)
    store = open_store(url.format(cwd=tmp_path))
    try:
        assert isinstance(store, JSONLStore)
        assert store.path == path.format(cwd=tmp_path)
        assert store.fsync is fsync
        store.write([make_record()])
        assert len(store.read()) == 1
    finally:
        store.close()


def test_a_missing_directory_fails_at_open(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        JSONLStore(tmp_path / "no-such-dir" / "events.jsonl")


def test_a_reader_never_creates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    JSONLStore(path).close()
    reader = JSONLStore(path, create=False)
    assert reader._fd is None  # not opened for appending: a reader may not be allowed to
    path.unlink()
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        reader.write([make_record()])
    reader.close()
    assert not path.exists()


def test_one_record_per_line_readable_by_any_json_tool(tmp_path: Path) -> None:
    store = JSONLStore(tmp_path / "events.jsonl")
    records = [make_record(), make_record(event={"name": "Café ☕"})]
    store.write(records)
    store.close()
    text = (tmp_path / "events.jsonl").read_text(encoding="utf-8")
    assert "Café ☕" in text  # kept readable, not \\u-escaped
    assert [json.loads(line) for line in text.splitlines()] == records


def test_positions_are_byte_offsets_of_line_starts(tmp_path: Path) -> None:
    store = JSONLStore(tmp_path / "events.jsonl")
    store.write([make_record(), make_record(), make_record()])
    data = (tmp_path / "events.jsonl").read_bytes()
    starts = [0, *[i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]]
    assert [position for position, _ in store.read()] == [str(s) for s in starts]
    # A position inside a line means "after that line".
    assert len(store.read(after=str(starts[1] + 3))) == 1
    store.close()


def test_a_torn_last_line_is_skipped_and_the_next_write_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    store = JSONLStore(path)
    store.write([make_record(id="before")])
    with path.open("ab") as file:  # a writer killed in the middle of its line
        file.write(b'{"id": "torn", "call": "tr')
    assert [r["id"] for _, r in store.read()] == ["before"]
    assert [r["id"] for _, r in store.read(limit=5)] == ["before"]
    with caplog.at_level(logging.WARNING, logger="pixel_middleware.stores.jsonl"):
        store.write([make_record(id="after")])
        assert [r["id"] for _, r in store.read()] == ["before", "after"]
        assert [r["id"] for _, r in store.read(limit=1)] == ["after"]
    assert "skipping the damaged line" in caplog.text
    store.close()


def test_lines_that_are_not_records_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    good = make_record(id="good")
    path.write_text("\n[1, 2]\nnot json\n" + json.dumps(good) + '\n{"id": "no call"}\n')
    store = JSONLStore(path)
    with caplog.at_level(logging.WARNING, logger="pixel_middleware.stores.jsonl"):
        assert [r for _, r in store.read()] == [good]
    assert caplog.text.count("damaged line") == 3
    store.close()


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"limit": 250}, id="limit"),
        pytest.param({"limit": 40, "accepted": False}, id="rejected-limit"),
        pytest.param({"limit": 3, "call": "page"}, id="rare-call-limit"),
        pytest.param({"limit": 100, "after": "50000"}, id="after-mid-file-pages-forward"),
        pytest.param({"limit": 1000}, id="limit-above-count"),
    ],
)
def test_reading_backwards_across_blocks_matches_reading_forwards(
    tmp_path: Path, query: dict[str, Any]
) -> None:
    store = JSONLStore(tmp_path / "events.jsonl")
    # ~1.2 kB lines: several 64 kB blocks, with lines across their edges.
    store.write(
        [
            make_record(
                accepted=n % 3 != 0,
                call="page" if n % 97 == 0 else "track",
                event={"pad": "x" * (1000 + n % 211)},
            )
            for n in range(400)
        ]
    )
    limit = query.pop("limit")
    everything = store.read(**query)
    # The newest `limit`; with `after`, paging forward, the oldest after it.
    expected = everything[:limit] if "after" in query else everything[-limit:]
    assert store.read(limit=limit, **query) == expected
    store.close()


def test_a_record_that_is_not_json_is_a_record_error(tmp_path: Path) -> None:
    store = JSONLStore(tmp_path / "events.jsonl")
    with pytest.raises(RecordError, match="cannot be stored as JSON"):
        store.write([make_record(), make_record(event={"when": object()})])
    assert store.read() == [], "all or nothing"
    store.close()


def test_reading_after_close_still_works(tmp_path: Path) -> None:
    store = JSONLStore(tmp_path / "events.jsonl")
    store.write([make_record()])
    store.close()
    assert len(store.read()) == 1


def test_a_failed_write_leaves_no_partial_batch(tmp_path: Path) -> None:
    # A real write failure: the kernel refuses past RLIMIT_FSIZE (EFBIG), as a
    # full disk would (ENOSPC).
    child = run_child(
        """
        import os, resource, signal, sys
        from records import make_record
        from pixel_middleware.stores import StoreError
        from pixel_middleware.stores.jsonl import JSONLStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = JSONLStore(sys.argv[1])
        store.write([make_record(id="kept")])
        size = os.path.getsize(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3000, size + 3000))
        try:
            store.write([make_record(event={"pad": "x" * 1000}) for _ in range(5)])
        except StoreError as exc:
            print("failed", type(exc.__cause__).__name__)
        print(os.path.getsize(sys.argv[1]) == size, [r["id"] for _, r in store.read()])
        """,
        str(tmp_path / "events.jsonl"),
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.splitlines() == ["failed OSError", "True ['kept']"]


APPENDER = """
import sys
from records import make_record
from pixel_middleware.stores.jsonl import JSONLStore

name, path = sys.argv[1:3]
store = JSONLStore(path)
sys.stdin.readline()  # all start together
for batch in range(100):
    # Batches far above PIPE_BUF (4 kB), where unlocked appends could interleave.
    store.write(
        [make_record(id=f"{name}-{batch}-{i}", event={"pad": "x" * 3000}) for i in range(5)]
    )
store.close()
"""


def test_four_processes_appending_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writers = [run_child(APPENDER, f"p{n}", str(path)) for n in range(4)]
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    for writer in writers:
        _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
    lines = path.read_bytes().splitlines()
    ids = [json.loads(line)["id"] for line in lines]  # every line whole
    assert len(ids) == 4 * 100 * 5
    # Each batch's records are adjacent and in order.
    for start in range(0, len(ids), 5):
        name, batch, first = ids[start].rsplit("-", 2)
        assert first == "0"
        assert ids[start : start + 5] == [f"{name}-{batch}-{i}" for i in range(5)]


def test_a_store_inherited_across_fork_appends_safely(tmp_path: Path) -> None:
    child = run_child(
        """
        import os, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        from records import make_record
        from pixel_middleware.stores.jsonl import JSONLStore
        store = JSONLStore(sys.argv[1])
        store.write([make_record(id="parent")])
        pid = os.fork()
        if pid == 0:
            store.write([make_record(id="child")])
            store.close()
            os._exit(0)
        os.waitpid(pid, 0)
        store.write([make_record(id="parent-again")])
        print([r["id"] for _, r in store.read()])
        """,
        str(tmp_path / "events.jsonl"),
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.strip() == "['parent', 'child', 'parent-again']"
