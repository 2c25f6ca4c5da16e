"""The spool: real files, real locks, real processes that die holding them."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from records import make_record

from pixel_middleware.spool import Spool, count_spooled
from pixel_middleware.stores import RecordError

ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def drain(spool: Spool, batch: int = 1000) -> list[str]:
    """Every record's id, oldest first, consuming them as a recorder would."""
    ids: list[str] = []
    while records := spool.peek(batch):
        ids += [record["id"] for record in records]
        spool.consume(len(records))
    return ids


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def test_append_peek_consume_keeps_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    records = [make_record(id=f"r{i}") for i in range(10)]
    spool.append(records[:4])
    spool.append(records[4:])
    assert len(spool) == 10
    assert spool.peek(3) == records[:3]
    assert spool.peek(3) == records[:3], "peek leaves records in place"
    spool.consume(2)
    assert len(spool) == 8
    assert [r["id"] for r in spool.peek(100)] == [f"r{i}" for i in range(2, 10)]
    spool.consume(8)
    assert len(spool) == 0
    assert spool.peek(10) == []
    spool.close()


def test_directory_and_file_appear_only_when_needed_and_go_when_drained(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory)
    assert spool.adopt() == 0
    assert not directory.exists()
    spool.append([make_record()])
    [file] = spool_files(directory)
    assert file.name.startswith(f"{os.getpid()}-")
    # It may hold what pixels said about people: nobody else may read it.
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    drain(spool)
    assert spool_files(directory) == []
    # A new file once records come again.
    spool.append([make_record(id="again")])
    assert drain(spool) == ["again"]
    spool.close()


def test_records_are_json_lines_on_disk_when_append_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    records = [make_record(), make_record(event={"text": "ünïcode ☃"})]
    spool.append(records)
    [file] = spool_files(tmp_path)
    lines = file.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == records
    spool.close()


def test_close_keeps_unconsumed_records_for_the_next_spool(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    first.append([make_record(id=f"a{i}") for i in range(5)])
    assert first.peek(2)
    first.consume(2)
    first.close()
    assert len(first) == 3, "still waiting for a store"
    second = Spool(tmp_path)
    assert second.adopt() == 3, "what the first handed on is not handed on again"
    assert drain(second) == [f"a{i}" for i in range(2, 5)]
    assert spool_files(tmp_path) == []
    second.close()


def test_close_removes_an_empty_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([make_record()])
    drain(spool)
    spool.close()
    assert spool_files(tmp_path) == []


def test_a_live_owners_file_is_not_adopted(tmp_path: Path) -> None:
    owner = Spool(tmp_path)
    owner.append([make_record()])
    other = Spool(tmp_path)
    assert other.adopt() == 0
    assert len(other) == 0
    owner.close()
    assert other.adopt() == 1
    other.close()


def test_adopted_records_come_before_the_adopters_own(tmp_path: Path) -> None:
    old = Spool(tmp_path)
    old.append([make_record(id="old-1"), make_record(id="old-2")])
    old.close()
    spool = Spool(tmp_path)
    spool.append([make_record(id="own-1")])
    assert spool.adopt() == 2
    assert len(spool) == 3
    assert drain(spool, batch=1) == ["old-1", "old-2", "own-1"]
    spool.close()


def test_the_file_of_a_killed_process_is_adopted(tmp_path: Path) -> None:
    # The child appends, then dies without closing anything (os._exit): the
    # kernel drops its lock and the file stays behind.
    child = run_child(
        """
        import os, sys
        from records import make_record
        from pixel_middleware.spool import Spool
        spool = Spool(sys.argv[1])
        spool.append([make_record(id=f"dead-{i}") for i in range(20)])
        os._exit(0)
        """,
        str(tmp_path),
    )
    assert child.returncode == 0, child.stderr
    assert len(spool_files(tmp_path)) == 1
    spool = Spool(tmp_path)
    assert spool.adopt() == 20
    assert drain(spool, batch=7) == [f"dead-{i}" for i in range(20)]
    assert spool_files(tmp_path) == []
    spool.close()


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    good = [make_record(id="whole-1"), make_record(id="whole-2")]
    (tmp_path / "999-dead.jsonl").write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in good) + b'{"id": "torn", "ca'
    )
    spool = Spool(tmp_path)
    assert spool.adopt() == 2
    assert drain(spool) == ["whole-1", "whole-2"]
    assert spool_files(tmp_path) == []
    spool.close()


def test_a_damaged_line_is_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [
        json.dumps(make_record(id="before")),
        "this is not json",
        "",
        json.dumps(make_record(id="after")),
    ]
    (tmp_path / "999-dead.jsonl").write_text("\n".join(lines) + "\n")
    spool = Spool(tmp_path)
    assert spool.adopt() == 3  # whole non-blank lines
    with caplog.at_level(logging.ERROR, logger="pixel_middleware.spool"):
        assert drain(spool) == ["before", "after"]
    assert "damaged line" in caplog.text
    assert len(spool) == 0
    spool.close()


def test_consume_more_than_peeked_is_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([make_record(), make_record()])
    spool.peek(1)
    with pytest.raises(ValueError, match=r"consume\(2\) after peeking 1"):
        spool.consume(2)
    spool.close()


def test_a_value_json_cannot_carry_is_spooled_as_text(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([make_record(id="odd", event={"when": object()})])
    [record] = spool.peek(1)
    assert isinstance(record["event"], dict)
    assert record["event"]["when"].startswith("<object object")
    spool.close()


def test_a_record_that_is_no_json_at_all_raises_record_error(tmp_path: Path) -> None:
    loop: dict[str, object] = {}
    loop["self"] = loop
    spool = Spool(tmp_path)
    with pytest.raises(RecordError, match="cannot be spooled"):
        spool.append([make_record(), make_record(event=loop)])
    assert len(spool) == 0
    spool.close()


def test_a_failed_append_leaves_no_partial_records(tmp_path: Path) -> None:
    # A real write failure: a file size limit (RLIMIT_FSIZE) makes the kernel
    # refuse the write with EFBIG, as a full disk would with ENOSPC.
    child = run_child(
        """
        import os, resource, signal, sys
        from records import make_record
        from pixel_middleware.spool import Spool
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        spool = Spool(sys.argv[1])
        spool.append([make_record(id="kept")])
        [path] = [os.path.join(sys.argv[1], n) for n in os.listdir(sys.argv[1])]
        size = os.path.getsize(path)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 3000, size + 3000))
        try:
            spool.append([make_record(id=f"big-{i}", event={"pad": "x" * 1000}) for i in range(5)])
        except OSError as exc:
            print("failed", exc.errno)
        print("size", os.path.getsize(path) == size, "count", len(spool))
        print("ids", [r["id"] for r in spool.peek(10)])
        """,
        str(tmp_path),
    )
    assert child.returncode == 0, child.stderr
    out = child.stdout.splitlines()
    assert out[0].startswith("failed")
    assert out[1] == "size True count 1"
    assert out[2] == "ids ['kept']"


def test_a_file_left_half_made_is_removed_once_clearly_abandoned(tmp_path: Path) -> None:
    stale, fresh = tmp_path / "1-dead.new", tmp_path / "2-busy.new"
    stale.write_text("{}\n")
    fresh.write_text("{}\n")
    os.utime(stale, (0, 0))
    spool = Spool(tmp_path)
    assert spool.adopt() == 0, "never adopted: it may be incomplete"
    assert not stale.exists()
    assert fresh.exists(), "perhaps being made right now"
    spool.close()


# --- count_spooled ---------------------------------------------------------------------


def test_count_of_a_spool_that_never_was_is_zero(tmp_path: Path) -> None:
    assert count_spooled(tmp_path / "no-such-spool") == 0


def test_count_adds_up_every_file_and_skips_what_is_not_a_record_yet(tmp_path: Path) -> None:
    gone = Spool(tmp_path)
    gone.append([make_record(id=f"gone-{i}") for i in range(3)])
    gone.close()  # a file left for adoption
    live = Spool(tmp_path)
    live.append([make_record(id=f"live-{i}") for i in range(2)])
    (tmp_path / "999-dead.jsonl").write_bytes(
        json.dumps(make_record()).encode() + b"\n\n" + b'{"id": "torn", "ca'
    )
    (tmp_path / "5-busy.new").write_text(json.dumps(make_record()) + "\n")
    assert count_spooled(tmp_path) == 3 + 2 + 1
    live.close()


def test_counting_takes_nothing_from_anyone(tmp_path: Path) -> None:
    owner = Spool(tmp_path)
    owner.append([make_record(id="owned")])
    left = Spool(tmp_path)
    left.append([make_record(id="left")])
    left.close()
    before = {path.name: path.read_bytes() for path in spool_files(tmp_path)}
    assert count_spooled(tmp_path) == 2
    assert {path.name: path.read_bytes() for path in spool_files(tmp_path)} == before
    # Nothing locked or adopted: the left file can still be adopted, and the
    # owner's file still cannot.
    adopter = Spool(tmp_path)
    assert adopter.adopt() == 1
    assert drain(adopter) == ["left"]
    adopter.close()
    owner.append([make_record(id="more")])
    assert drain(owner) == ["owned", "more"]
    owner.close()
    assert count_spooled(tmp_path) == 0


def test_threads_append_at_once_and_every_record_is_kept_once_in_each_threads_order(
    tmp_path: Path,
) -> None:
    # Durable request threads append to the spool themselves, while the
    # recorder's thread reads and consumes it (issue 13): one operation at a time.
    spool = Spool(tmp_path / "spool")
    threads = [
        threading.Thread(
            target=lambda t=t: [spool.append([make_record(id=f"t{t}-{n}")]) for n in range(50)]
        )
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    consumed: list[str] = []
    deadline = time.monotonic() + 30
    while any(thread.is_alive() for thread in threads) or len(spool):
        assert time.monotonic() < deadline, f"{len(spool)} records never came out"
        batch = spool.peek(7)
        spool.consume(len(batch))
        consumed.extend(record["id"] for record in batch)
    for thread in threads:
        thread.join(5)
    assert sorted(consumed) == sorted(f"t{t}-{n}" for t in range(8) for n in range(50))
    for t in range(8):
        mine = [int(i.split("-")[1]) for i in consumed if i.startswith(f"t{t}-")]
        assert mine == list(range(50))
    assert len(spool) == 0
    spool.close()


def test_len_answers_while_another_thread_holds_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append([make_record(id="r0")])
    answers: list[int] = []
    with spool._lock:  # as during an append that hangs on a slow disk
        reader = threading.Thread(target=lambda: answers.append(len(spool)))
        reader.start()
        reader.join(5)
        assert answers == [1], "len() waited for the spool's lock"
    spool.close()
