"""The write-ahead journal: segments, rotation, positions, adoption, fsync.

Real files and real processes (a child killed with SIGKILL leaves its
segments behind). The older spool behaviour, which :class:`Spool` keeps, is
proved in test_spool.py.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from records import make_record

from pixel_middleware import _json
from pixel_middleware import journal as journal_module
from pixel_middleware.journal import Journal, count_spooled, encode_line

ROOT = Path(__file__).resolve().parent.parent


def line(record_id: str) -> bytes:
    return encode_line(make_record(id=record_id))


def segments(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("*.jsonl"))


def drain(journal: Journal, batch: int = 1000) -> list[str]:
    ids: list[str] = []
    while entries := journal.peek_entries(batch):
        ids += [record["id"] for record, _, _ in entries]
        _, name, end = entries[-1]
        journal.consume_through(name, end, len(entries))
    return ids


def kill_child_after_appending(directory: Path, count: int) -> list[bytes]:
    """A child appends ``count`` records one by one, then is killed (SIGKILL);
    the lines it wrote."""
    code = textwrap.dedent(
        """
        import sys, time
        from records import make_record
        from pixel_middleware.journal import Journal, encode_line
        journal = Journal(sys.argv[1])
        for n in range(int(sys.argv[2])):
            journal.append_lines([encode_line(make_record(id=f"dead-{n}"))])
        print("appended", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(directory), str(count)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "appended"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    (path,) = directory.glob("*.jsonl")
    return path.read_bytes().splitlines(keepends=True)


def test_a_segment_is_named_for_its_process_and_holds_each_append_at_once(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    name, ends = journal.append_lines([line("r0"), line("r1")])
    assert re.fullmatch(rf"{os.getpid()}-[0-9a-f]{{8}}-1\.jsonl", name)
    assert segments(tmp_path) == [name]
    data = (tmp_path / name).read_bytes()
    assert ends == [len(line("r0")), len(data)]
    assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o600)
    journal.close()


def test_segments_rotate_past_their_size_and_go_once_stored(tmp_path: Path) -> None:
    size = len(line("r0"))
    journal = Journal(tmp_path, segment_bytes=3 * size)
    names = [journal.append_lines([line(f"r{n}")])[0] for n in range(7)]
    # Exactly at the size stays; one line over starts the next segment.
    assert names == [names[0]] * 3 + [names[3]] * 3 + [names[6]]
    assert len(set(names)) == 3
    assert [name.rsplit("-", 1)[1] for name in names[::3]] == ["1.jsonl", "2.jsonl", "3.jsonl"]
    assert segments(tmp_path) == sorted(set(names))
    assert drain(journal, batch=2) == [f"r{n}" for n in range(7)]
    # The full segments are gone; the one appended to stays (no file made per write).
    assert segments(tmp_path) == [names[6]]
    assert len(journal) == 0
    journal.close()
    assert segments(tmp_path) == []


def test_a_drained_segment_gives_way_when_the_cap_is_reached(tmp_path: Path) -> None:
    size = len(line("r0"))
    journal = Journal(tmp_path, max_bytes=2 * size)
    first, _ = journal.append_lines([line("r0"), line("r1")])
    assert drain(journal) == ["r0", "r1"]
    # Its bytes still count, but nothing in it waits: a new segment takes the record.
    second, _ = journal.append_lines([line("r2")])
    assert second != first
    assert segments(tmp_path) == [second]
    journal.close()


def test_adoption_starts_where_the_store_says_it_got_to(tmp_path: Path) -> None:
    lines = kill_child_after_appending(tmp_path, 5)
    (path,) = tmp_path.glob("*.jsonl")
    stored_up_to = sum(len(text) for text in lines[:3])  # the store holds dead-0..2
    asked: list[Sequence[str]] = []

    def positions(names: Sequence[str]) -> dict[str, int]:
        asked.append(list(names))
        return {path.name: stored_up_to}

    journal = Journal(tmp_path)
    assert journal.adopt(positions) == 2
    assert asked == [[path.name]]
    assert drain(journal) == ["dead-3", "dead-4"]
    assert segments(tmp_path) == []
    journal.close()


def test_adoption_without_positions_hands_on_the_whole_segment(tmp_path: Path) -> None:
    kill_child_after_appending(tmp_path, 5)
    journal = Journal(tmp_path)
    assert journal.adopt() == 5
    assert drain(journal) == [f"dead-{n}" for n in range(5)]
    journal.close()


def test_a_segment_the_store_holds_whole_is_removed_at_adoption(tmp_path: Path) -> None:
    lines = kill_child_after_appending(tmp_path, 3)
    (path,) = tmp_path.glob("*.jsonl")
    journal = Journal(tmp_path)
    assert journal.adopt(lambda names: {path.name: len(b"".join(lines))}) == 0
    assert segments(tmp_path) == []
    journal.close()


def test_live_tails_are_the_sizes_of_other_live_processes_segments(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from records import make_record
        from pixel_middleware.journal import Journal, encode_line
        journal = Journal(sys.argv[1])
        print(*journal.append_lines([encode_line(make_record(id="live"))]), flush=True)
        sys.stdin.read()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        name, end = child.stdout.readline().split()
        kill_child_after_appending(tmp_path / "dead", 2)
        (dead,) = (tmp_path / "dead").glob("*.jsonl")
        os.replace(dead, tmp_path / dead.name)  # a gone process's segment beside it
        journal = Journal(tmp_path)
        journal.append_lines([line("mine")])
        # The live child's segment, at its size; not ours, not the dead one's.
        assert end.strip("[]") == str((tmp_path / name).stat().st_size)
        assert journal.live_tails() == {name: (tmp_path / name).stat().st_size}
        assert len(segments(tmp_path)) == 3
        journal.close()
    finally:
        child.stdin.close()
        child.stdout.close()
        child.wait(timeout=10)
    assert Journal(tmp_path / "missing").live_tails() == {}


def test_adoption_waits_while_the_store_cannot_say_how_far_it_got(tmp_path: Path) -> None:
    kill_child_after_appending(tmp_path, 2)

    def down(names: Sequence[str]) -> dict[str, int]:
        raise ConnectionError("the store is down")

    journal = Journal(tmp_path)
    assert journal.adopt(down) == 0, "replaying blind would duplicate what the store has"
    assert count_spooled(tmp_path) == 2
    assert journal.adopt(lambda names: {}) == 2
    journal.close()


def test_peek_stops_at_the_position_given(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    name, ends = journal.append_lines([line(f"r{n}") for n in range(4)])
    entries = journal.peek_entries(10, stop=(name, ends[1]))
    assert [(record["id"], segment, end) for record, segment, end in entries] == [
        ("r0", name, ends[0]),
        ("r1", name, ends[1]),
    ]
    journal.consume_through(name, ends[1], 2)
    assert journal.peek_entries(10, stop=(name, ends[1])) == []
    assert [record["id"] for record, _, _ in journal.peek_entries(10)] == ["r2", "r3"]
    journal.close()


@pytest.mark.parametrize(("fsync", "syncs"), [(True, 2), (False, 0)])
def test_fsync_is_once_per_append_when_asked(
    tmp_path: Path, count_fsyncs: Callable[[], list[int]], fsync: bool, syncs: int
) -> None:
    journal = Journal(tmp_path, fsync=fsync)
    journal.append_lines([line("warm-up")])  # the segment (and its directory sync) exists
    synced = count_fsyncs()
    journal.append_lines([line(f"a{n}") for n in range(10)])  # one group: one sync
    journal.append_lines([line("b")])
    assert len(synced) == syncs
    journal.close()


def test_bad_options_fail_at_construction(tmp_path: Path) -> None:
    for options in ({"segment_bytes": 0}, {"segment_bytes": True}, {"max_bytes": 0}):
        with pytest.raises(ValueError, match=r"segment_bytes|max_bytes"):
            Journal(tmp_path, **options)  # type: ignore[arg-type]


@pytest.mark.skipif(not _json.HAVE_MSGSPEC, reason="the msgspec path")
def test_a_plain_record_is_journaled_without_json_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    # json.dumps costs twice msgspec's encode and read-back on a pixel's record.
    def slow_path(*args: object, **kwargs: object) -> str:
        raise AssertionError("json.dumps for a record msgspec writes exactly")

    record = make_record(id="plain")
    record["event"] = {"userId": None, "name": "é", "big": 2**70, "total": 42.5}
    monkeypatch.setattr(journal_module.json, "dumps", slow_path)
    line = encode_line(record)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == record


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (float("nan"), b'"v":NaN'),  # as the standard library always wrote it
        (datetime.date(2026, 1, 2), b'"v":"2026-01-02"'),  # default=str
        ("\ud800", b'"v":"\\ud800"'),  # a lone surrogate, escaped
    ],
)
def test_what_msgspec_would_change_is_journaled_as_before(value: object, text: bytes) -> None:
    record = make_record(id="odd")
    record["v"] = value
    assert text in encode_line(record)


def test_a_count_leaves_out_what_the_store_holds_of_a_live_segment(tmp_path: Path) -> None:
    # `events` and `serve` say how many records wait for the store; a live
    # recorder's segment still holds records it stored, which are not waiting.
    from pixel_middleware.recorder import Recorder
    from pixel_middleware.stores.sqlite import SQLiteStore

    directory = tmp_path / "journal"
    recorder = Recorder(SQLiteStore(tmp_path / "p.sqlite3"), spool_path=directory)
    reader = SQLiteStore(tmp_path / "p.sqlite3")
    try:
        for _ in range(3):
            assert recorder.record(make_record())
        assert recorder.flush(timeout=10)
        assert len(reader.read()) == 3
        assert count_spooled(directory) == 3  # the live segment, as written
        assert count_spooled(directory, stored=reader.journal_positions) == 0

        def cannot_say(segments: Sequence[str]) -> dict[str, int]:
            raise journal_module.StoreError("down")

        assert count_spooled(directory, stored=cannot_say) == 3  # more, never fewer
    finally:
        recorder.close()
        reader.close()
