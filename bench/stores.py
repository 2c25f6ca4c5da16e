"""Stores: records/s through a :class:`Recorder`, and memory over a million records.

Throughput, for SQLite, JSON Lines, Redis (a real ``redis-server`` started on a
free port, no persistence, in the run's temporary directory) and PostgreSQL (a
throwaway cluster from Debian's ``postgresql``, its default durable commits),
two ways, each in
interleaved rounds against the same store's ``write()`` called directly from one
thread with the batch size the Recorder can at best reach; no target, the ratio
shows what the Recorder itself costs:

- ``durable=False`` (the mitmproxy addon's mode), one thread recording as fast as
  it can, then ``flush()``; against ``write()`` in batches of 100.
- ``durable=True`` (the middleware's mode: ``record()`` returns once committed)
  from 8 threads at once, so at most 8 records share a commit; against
  ``write()`` in batches of 8.

Memory: a child process records one million records into SQLite and into JSON
Lines through a ``Recorder(durable=False)`` as fast as one thread can (so that the
recorder's bounded queue is full all along) and samples its RSS; RSS after 1M must
be within 10% of RSS after 100k. (The memory store keeps every record by design,
so it is left out.)
"""

from __future__ import annotations

import atexit
import glob
import itertools
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load import USER_AGENT
from bench.payloads import segment_template
from bench.processes import BenchError, Server, free_port, require, rss_bytes
from bench.results import Row, at_most, median_ratio
from bench.settings import Settings

NAME = "stores"
ROOT = Path(__file__).resolve().parent.parent
CALLERS = 8
BATCH = 100
RSS_TARGET = at_most(1.10)


def sample_record() -> dict[str, Any]:
    """One real record: a typical Segment pixel through the core."""
    from pixel_middleware.core import PixelConfig, PixelRequest, decode_pixel

    path, _, query = segment_template().url(0).partition("?")
    outcome = decode_pixel(
        PixelRequest("GET", path, query.encode(), "203.0.113.9", USER_AGENT),
        config=PixelConfig(),
        now=datetime(2026, 11, 23, 16, 20, tzinfo=UTC),
    )
    if outcome is None or outcome.record is None:
        raise BenchError(f"the core kept no record for {path}")
    return dict(outcome.record)


def records(start: int, count: int, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``count`` distinct records made on the fly (nothing retained by the generator)."""
    event = base["event"]
    for n in range(start, start + count):
        yield {**base, "id": f"bench-{n:012d}", "event": {**event, "messageId": f"bench-{n:015d}"}}


def through_recorder(recorder: Any, source: Iterator[dict[str, Any]], callers: int) -> float:
    """Seconds for ``callers`` threads to record everything ``source`` yields.

    The records are made as they are taken, so that the benchmark itself holds no
    more than a few of them at a time (it would otherwise swamp the RSS figures).
    """
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                record = next(source, None)
            if record is None:
                return
            recorder.record(record)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def direct(store: Any, source: Iterator[dict[str, Any]], size: int) -> float:
    """Seconds to write everything ``source`` yields in batches of ``size``."""
    start = time.perf_counter()
    while batch := list(itertools.islice(source, size)):
        store.write(batch)
    return time.perf_counter() - start


def redis_server(workdir: Path) -> Server:
    port = free_port()
    return Server(
        [
            require("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        ready=r"Ready to accept connections",
        log=workdir / "redis.log",
        port=port,
    )


def postgres_server(workdir: Path) -> Server:
    """A throwaway PostgreSQL cluster on a free port (Debian's ``postgresql`` package).

    Its directory is made outside ``workdir`` (which may be private to root),
    since the cluster must belong to the ``postgres`` user when we are root
    (``initdb`` refuses root); removed when the benchmark process exits.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        raise BenchError("initdb not found: ./dev bench installs it (apt-get install postgresql)")
    bin_dir = Path(initdb).parent
    directory = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    as_owner: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        # setpriv execs the program itself, so that a stop signal reaches it.
        as_owner = [
            "setpriv",
            f"--reuid={owner.pw_uid}",
            f"--regid={owner.pw_gid}",
            "--clear-groups",
        ]
    data = directory / "data"
    subprocess.run(
        [*as_owner, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
         "--locale=C", "-A", "trust", "--no-sync"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    port = free_port()
    # The server's defaults otherwise (fsync and synchronous_commit on): the
    # numbers are those of a durable commit, as with the other stores.
    return Server(
        [*as_owner, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port),
         "-k", str(directory), "-c", "listen_addresses=127.0.0.1"],
        ready=r"database system is ready to accept connections",
        log=workdir / "postgres.log",
        port=port,
    )  # fmt: skip


def _throughput_row(
    settings: Settings,
    label: str,
    url: str,
    base: dict[str, Any],
    *,
    durable: bool,
    callers: int,
    batch: int,
) -> Row:
    from pixel_middleware.recorder import Recorder
    from pixel_middleware.stores import open_store

    count = settings.pick(15_000, 8_000, 200)
    rounds = settings.pick(5, 3, 1)
    store = open_store(url)
    recorder = Recorder(open_store(url), durable=durable)
    ours: list[float] = []
    baseline: list[float] = []
    n = 0
    try:
        through_recorder(recorder, records(n, count // 10, base), callers)  # warm up
        recorder.flush()
        n += count
        for r in range(rounds):
            pair = ["ours", "baseline"]
            for which in pair if r % 2 == 0 else pair[::-1]:
                source = records(n, count, base)
                n += count
                if which == "ours":
                    start = time.perf_counter()
                    through_recorder(recorder, source, callers)
                    recorder.flush()  # durable=False: count only what is written
                    ours.append(count / (time.perf_counter() - start))
                else:
                    baseline.append(count / direct(store, source, batch))
    finally:
        recorder.close()
        store.close()
    ratio, samples = median_ratio(ours, baseline)
    who = f"{callers} threads" if callers > 1 else "1 thread"
    return Row(
        bench=NAME,
        name=f"{label} via Recorder(durable={durable}), {who}",
        ours=statistics.median(ours),
        baseline=statistics.median(baseline),
        unit="records/s",
        ratio=ratio,
        baseline_name=f"write() x{batch}",
        samples=samples,
    )


def rss_child(url: str, total: int, every: int) -> None:
    """In a child process: record ``total`` records, print RSS (bytes) every ``every``."""
    from pixel_middleware.recorder import Recorder
    from pixel_middleware.stores import open_store

    base = sample_record()
    recorder = Recorder(open_store(url), durable=False)
    pid = os.getpid()
    done = 0
    samples = []
    while done < total:
        step = min(every, total - done)
        through_recorder(recorder, records(done, step, base), 1)
        done += step
        samples.append([done, rss_bytes(pid)])
    recorder.close()
    print(json.dumps(samples))


def _rss_row(settings: Settings, label: str, url: str) -> Row:
    total = settings.pick(1_000_000, 300_000, 2_000)
    every = total // 10
    code = (
        "import sys; from bench.stores import rss_child; "
        "rss_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, url, str(total), str(every)],
        capture_output=True,
        text=True,
        cwd=settings.workdir,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    if proc.returncode != 0:
        raise BenchError(f"RSS child for {url} failed:\n{proc.stderr[-3000:]}")
    samples = json.loads(proc.stdout.strip().splitlines()[-1])
    first, last = samples[0][1], samples[-1][1]
    mb = 1024 * 1024
    return Row(
        bench=NAME,
        name=f"{label} RSS after {total:,} records vs after {every:,}",
        ours=last / mb,
        baseline=first / mb,
        unit="MB",
        ratio=last / first,
        target=RSS_TARGET,
        baseline_name=f"at {every:,}",
        note="RSS (MB) every {:,}: {}".format(every, " ".join(f"{s[1] / mb:.0f}" for s in samples)),
    )


def run(settings: Settings) -> list[Row]:
    base = sample_record()
    work = settings.workdir
    rows = []
    with redis_server(work) as redis, postgres_server(work) as postgres:
        stores = [
            ("SQLite", f"sqlite:///{work / 'tp.sqlite3'}"),
            ("JSON Lines", f"jsonl:///{work / 'tp.jsonl'}"),
            ("Redis", f"redis://127.0.0.1:{redis.port}/0?stream=bench"),
            ("PostgreSQL", f"postgresql://postgres@127.0.0.1:{postgres.port}/postgres?table=bench"),
        ]
        for label, url in stores:
            rows.append(
                _throughput_row(settings, label, url, base, durable=False, callers=1, batch=BATCH)
            )
            rows.append(
                _throughput_row(
                    settings, label, url, base, durable=True, callers=CALLERS, batch=CALLERS
                )
            )
    rows.append(_rss_row(settings, "SQLite", f"sqlite:///{work / 'rss.sqlite3'}"))
    rows.append(_rss_row(settings, "JSON Lines", f"jsonl:///{work / 'rss.jsonl'}"))
    return rows
