"""The SQLite store's layout: what a commit costs, and how fast reads are at 10 million records.

Run by hand, not by ``./dev bench`` (the large file takes minutes and gigabytes)::

    .venv/bin/python -m bench.sqlite_layout commits             # schema 1 against 2
    .venv/bin/python -m bench.sqlite_layout reads --records 10000000 --dir /var/tmp/pixels

``commits``: two files side by side in one process, one with the layout of schema
1 (the record beside copies of id, receivedAt, messageId and writeKey, seq
AUTOINCREMENT; its SQL is kept here verbatim) and one made by today's
:class:`~pixel_middleware.stores.sqlite.SQLiteStore`, each filled with 50,000
records first. Batches of 1, 8 and 100 records are committed to each in turn
(``BEGIN IMMEDIATE``, ``executemany``, ``COMMIT``, WAL, ``synchronous=NORMAL``),
in interleaved rounds whose order alternates; the figure is the median of the
per-round ratios of the process's CPU time per commit (which counts the write(2)
of the WAL and leaves out time the scheduler gives to other processes). The rows
are built before the clock starts: the record's JSON is the same for both.

``reads``: makes a file of ``--records`` records with today's schema (through
``executemany``, ``synchronous=OFF`` for the build only), then times
``SQLiteStore.read()`` for each filter it takes, the collector API's
``/api/events`` and ``/api/counts`` (``CollectorAPI`` called in process), and the
``pixel-middleware events`` command (a real subprocess, Python's start
included): the median of 5 runs each, after one warming run. Calls and verdicts
are spread as a site might see them: 2% rejected; 70% track, 25% page, 4%
identify, and 1% group, alias and screen.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.stores import records, sample_record

ROOT = Path(__file__).resolve().parent.parent

# Schema 1, as pixel_middleware/stores/sqlite.py had it.
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
PREFILL = 50_000


def row_1(record: dict[str, Any]) -> tuple[Any, ...]:
    from pixel_middleware import _json

    event = record["event"]
    message_id = event.get("messageId") if isinstance(event, dict) else None
    return (
        record["id"],
        record["receivedAt"],
        1 if record["accepted"] else 0,
        record["call"],
        message_id if isinstance(message_id, str) else None,
        record["writeKey"],
        _json.dumps(record),
    )


def spread(n: int) -> tuple[bool, str]:
    """The verdict and call of record ``n``: 2% rejected; 70/25/4/1% track/page/identify/other."""
    accepted = n % 50 != 7
    slot = (n * 2654435761 >> 16) % 100  # independent of n % 50
    if slot < 70:
        call = "track"
    elif slot < 95:
        call = "page"
    elif slot < 99:
        call = "identify"
    else:
        call = ("group", "alias", "screen")[n % 3]
    return accepted, call


def varied(start: int, count: int, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for n, record in enumerate(records(start, count, base), start):
        accepted, call = spread(n)
        yield {**record, "accepted": accepted, "call": call}


def commits(rounds: int) -> None:
    from pixel_middleware.stores import sqlite

    base = sample_record()
    workdir = Path(tempfile.mkdtemp(prefix="sqlite-layout-"))
    old = sqlite3.connect(workdir / "schema1.db", isolation_level=None)
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("PRAGMA synchronous = NORMAL")
    old.executescript(SCHEMA_1)
    sqlite.SQLiteStore(workdir / "schema2.db").close()
    new = sqlite3.connect(workdir / "schema2.db", isolation_level=None)
    new.execute("PRAGMA synchronous = NORMAL")

    def commit_1(rows: list[tuple[Any, ...]]) -> None:
        old.execute("BEGIN IMMEDIATE")
        old.executemany(INSERT_1, rows)
        old.execute("COMMIT")

    def commit_2(rows: list[tuple[Any, ...]]) -> None:
        # What SQLiteStore.write() runs, without its locks.
        new.execute("BEGIN IMMEDIATE")
        newest = new.execute(sqlite._NEWEST).fetchone()[0]
        new.executemany(sqlite._INSERT, [(seq, *row) for seq, row in enumerate(rows, newest + 1)])
        new.execute("COMMIT")

    layouts: dict[str, tuple[Callable[[Any], None], Callable[[Any], tuple[Any, ...]]]] = {
        "schema 1": (commit_1, row_1),
        "schema 2": (commit_2, sqlite._row),
    }
    made = 0

    def batch_rows(row: Callable[[Any], tuple[Any, ...]], size: int) -> list[tuple[Any, ...]]:
        nonlocal made
        rows = [row(record) for record in varied(made, size, base)]
        made += size
        return rows

    for commit, row in layouts.values():
        commit(batch_rows(row, PREFILL))
    print(f"CPU time per commit, {rounds} interleaved rounds, {PREFILL:,} records in each first")
    for size in (1, 8, 100):
        count = max(20, 2000 // size)
        times: dict[str, list[float]] = {name: [] for name in layouts}
        for n in range(rounds):
            order = list(layouts) if n % 2 == 0 else list(reversed(layouts))
            for name in order:
                commit, row = layouts[name]
                batches = [batch_rows(row, size) for _ in range(count)]
                start = time.process_time()
                for rows in batches:
                    commit(rows)
                times[name].append((time.process_time() - start) / count)
        ratios = [a / b for a, b in zip(times["schema 1"], times["schema 2"], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"batch {size:3}: schema 1 {statistics.median(times['schema 1']) * 1e6:7.1f} us,"
            f" schema 2 {statistics.median(times['schema 2']) * 1e6:7.1f} us a commit;"
            f" schema 2 is {statistics.median(ratios):.2f}x cheaper"
            f" (quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})"
        )
    old.close()
    new.close()


def build(path: Path, count: int) -> None:
    """A file of ``count`` records with today's schema, as fast as SQLite takes them."""
    from pixel_middleware import _json
    from pixel_middleware.stores.sqlite import SQLiteStore

    SQLiteStore(path).close()
    base = sample_record()
    text = _json.dumps({**base, "id": "ID", "event": {**base["event"], "messageId": "MID"}})
    head, _, rest = text.partition('"ID"')
    middle, _, tail = rest.partition('"MID"')
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    started = time.monotonic()
    chunk = 200_000
    for first in range(0, count, chunk):
        rows = []
        for n in range(first, min(count, first + chunk)):
            accepted, call = spread(n)
            record = f'{head}"bench-{n:012d}"{middle}"bench-{n:015d}"{tail}'
            if not accepted:
                record = record.replace('"accepted":true', '"accepted":false', 1)
            record = record.replace('"call":"track"', f'"call":"{call}"', 1)
            rows.append((n + 1, int(accepted), call, record))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO pixel_records (seq, accepted, call, record) VALUES (?, ?, ?, ?)", rows
        )
        conn.execute("COMMIT")
        print(f"  {first + len(rows):,} records, {time.monotonic() - started:.0f} s", flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def timed(action: Callable[[], object], runs: int = 5) -> tuple[float, object]:
    result = action()  # warms the page cache
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def reads(count: int, directory: Path) -> None:
    from werkzeug.test import Client

    from pixel_middleware.api import CollectorAPI, RecordSignal
    from pixel_middleware.core import PixelConfig
    from pixel_middleware.stores.sqlite import SQLiteStore

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"events-{count}.sqlite3"
    if not path.exists():
        print(f"making {path} with {count:,} records")
        build(path, count)
    size = path.stat().st_size
    print(f"{path}: {count:,} records, {size / 1e9:.1f} GB")
    store = SQLiteStore(path, create=False)
    middle = str(count // 2)
    store_reads: list[tuple[str, dict[str, Any]]] = [
        ("read(limit=50)", {"limit": 50}),
        ("read(accepted=False, limit=50)", {"accepted": False, "limit": 50}),
        (
            "read(call='track', after=middle, limit=50)",
            {"call": "track", "after": middle, "limit": 50},
        ),
        ("read(call='alias', limit=50)", {"call": "alias", "limit": 50}),
        (
            "read(accepted=False, call='identify', limit=50)",
            {"accepted": False, "call": "identify", "limit": 50},
        ),
        ("read(after=newest-10) (events --follow)", {"after": str(count - 10)}),
    ]
    for name, arguments in store_reads:
        seconds, result = timed(lambda arguments=arguments: store.read(**arguments))
        print(f"{name:55} {seconds * 1e3:9.2f} ms  ({len(result)} records)")  # type: ignore[arg-type]
    api = CollectorAPI(store=store, config=PixelConfig(), spooled=lambda: 0, signal=RecordSignal())
    client = Client(api)
    for query in (
        "/api/events?limit=50",
        "/api/events?accepted=false&limit=50",
        f"/api/events?call=track&after={middle}&limit=50",
        "/api/events?accepted=false&call=identify&limit=50",
        "/api/events?call=group&call=alias&limit=50",
        "/api/events?event=Order%20Completed&limit=50",
        "/api/events?userId=nobody&limit=50",
        "/api/counts",
        "/api/counts?accepted=false",
        "/api/counts?call=alias",
    ):
        seconds, response = timed(lambda query=query: client.get(query), runs=3)
        answer = json.loads(response.get_data())  # type: ignore[attr-defined]
        shown = {k: answer[k] for k in ("complete", "total") if k in answer}
        found = len(answer.get("records", ()))
        print(f"{query:55} {seconds * 1e3:9.2f} ms  ({found} records, {shown})")
    store.close()
    command = [
        sys.executable,
        "-m",
        "pixel_middleware.cli",
        "events",
        "--store",
        f"sqlite:///{path}",
    ]
    for extra in (["--limit", "50"], ["--rejected", "--call", "identify", "--limit", "50"]):
        seconds, _ = timed(
            lambda extra=extra: subprocess.run(
                [*command, *extra], capture_output=True, check=True, cwd=ROOT, env=os.environ
            ),
            runs=3,
        )
        print(f"{'pixel-middleware events ' + ' '.join(extra):55} {seconds * 1e3:9.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_layout", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commits_parser = commands.add_parser("commits", help="schema 1 against 2, per commit")
    commits_parser.add_argument("--rounds", type=int, default=15)
    reads_parser = commands.add_parser("reads", help="reads from a large file")
    reads_parser.add_argument("--records", type=int, default=10_000_000)
    reads_parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "commits":
        commits(args.rounds)
    else:
        reads(args.records, args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
