"""Servers loaded in interleaved rounds, and the check of what they kept.

Every server under comparison runs at once (an idle one costs nothing) and gets
the same load in turn, the order reversed every other round, so that whatever
else the machine is doing falls on all of them alike.
"""

from __future__ import annotations

import http.client
import os
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import LoadResult, run_python_load, run_wrk
from bench.payloads import UrlTemplate
from bench.processes import BenchError, Server
from bench.results import Row
from bench.settings import Settings

CONNECTIONS = 16  # wrk connections: twice the 2 x 4 gunicorn threads
SMOKE_CONNECTIONS = 4


@dataclass
class ServerUnderLoad:
    name: str
    argv: list[str]
    ready: str  # regex capturing the port
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    port: int = 0  # for a server told its port (``ready`` then captures none)
    server: Server | None = None
    loads: list[LoadResult] = field(default_factory=list)  # measured rounds only
    sent: int = 0  # every request sent, warm-up included
    ok: int = 0
    server_cpu: list[float] = field(default_factory=list)  # per measured round, in seconds
    _last_cpu: float = 0.0

    def launch(self, workdir: Path, label: str) -> None:
        self.server = Server(
            self.argv,
            ready=self.ready,
            log=workdir / f"{label}.log",
            env=self.env,
            cwd=self.cwd,
            port=self.port,
        ).launch()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def load(
        self, settings: Settings, template: UrlTemplate, run_id: int, seconds: float
    ) -> LoadResult:
        assert self.server is not None
        cpu_before = session_cpu_seconds(self.server.pid)
        if settings.smoke:
            result = run_python_load(
                self.server.port,
                template,
                seconds=seconds,
                connections=SMOKE_CONNECTIONS,
                run_id=run_id,
            )
        else:
            result = run_wrk(
                self.server.port,
                template,
                seconds=seconds,
                connections=CONNECTIONS,
                threads=1,
                run_id=run_id,
                workdir=settings.workdir,
            )
        self._last_cpu = session_cpu_seconds(self.server.pid) - cpu_before
        self.sent += result.sent
        self.ok += result.ok
        if result.responses != result.ok or result.responses == 0:
            raise BenchError(
                f"{self.name}: {result.ok} of {result.responses} answers were 200"
                f" ({result.errors} errors):\n{self.server.tail()}"
            )
        return result

    @property
    def rates(self) -> list[float]:
        return [load.rate for load in self.loads]

    @property
    def pixels_per_cpu_second(self) -> list[float]:
        """Per measured round: answers per CPU-second the server's processes used."""
        return [
            load.responses / cpu
            for load, cpu in zip(self.loads, self.server_cpu, strict=True)
            if cpu
        ]

    @property
    def client_share(self) -> float:
        """The fraction of one CPU the load generator used while loading this server."""
        seconds = sum(load.seconds for load in self.loads)
        return sum(load.client_cpu for load in self.loads) / seconds

    @property
    def p99_ms(self) -> float:
        return statistics.median(load.p99_ms for load in self.loads)


def run_rounds(
    servers: Mapping[str, ServerUnderLoad],
    settings: Settings,
    template: UrlTemplate,
    *,
    seconds: float,
    warmup: float,
    rounds: int,
    bench: str,
) -> None:
    """Start every server, warm each up, load them in alternating order, stop them all.

    Stopping is a SIGTERM, so that stores flush before their records are counted.
    """
    run_id = 0
    try:
        for key, server in servers.items():
            server.launch(settings.workdir, f"{bench}-{key}")
        for server in servers.values():
            assert server.server is not None
            server.server.wait_ready()
            wait_answering(server.server.port, server.name)
        for server in servers.values():
            run_id += 1
            server.load(settings, template, run_id, warmup)
        names = list(servers)
        for r in range(rounds):
            for key in names if r % 2 == 0 else names[::-1]:
                run_id += 1
                server = servers[key]
                server.loads.append(server.load(settings, template, run_id, seconds))
                server.server_cpu.append(server._last_cpu)
    finally:
        for server in servers.values():
            server.stop()


def wait_answering(port: int, name: str, *, timeout: float = 60.0) -> None:
    """Wait until the server on ``port`` answers HTTP (any status, ``GET /``).

    gunicorn says "Listening" before its workers have loaded the app; on a busy
    machine that took longer than a quick run's warm-up, whose load then got no
    answer at all. ``/`` is no pixel route, so the probe leaves no record behind
    (the kept-vs-sent check counts only what the load sent).
    """
    deadline = time.monotonic() + timeout
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline:
                raise BenchError(f"{name} does not answer HTTP on port {port}: {exc}") from exc
            time.sleep(0.1)
        finally:
            conn.close()


def session_cpu_seconds(session: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a session.

    Servers start in a session of their own (:class:`bench.processes.Server`),
    so this counts a gunicorn master and its workers, or a lone ``serve``.
    """
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name (field 2) may hold spaces: split after its ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == session:  # field 6, the session id
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def kept_row(bench: str, server: ServerUnderLoad, message_ids: Sequence[str]) -> Row:
    """Whether a server kept every event it answered 200 for, once each."""
    counts = Counter(message_ids)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    kept = len(counts)
    return Row(
        bench=bench,
        name=f"{server.name}: records kept vs 200s",
        ours=len(message_ids),
        baseline=server.ok,
        unit="records",
        ratio=len(message_ids) / server.ok if server.ok else None,
        target="200s <= kept <= sent, no duplicates",
        baseline_name="200s",
        note=(
            f"sent {server.sent}, 200s {server.ok}, kept {kept} distinct,"
            f" {duplicates} duplicates (kept - 200s = {kept - server.ok}:"
            " answered while the load stopped)"
        ),
        check=server.ok <= kept <= server.sent and duplicates == 0,
    )


def store_message_ids(url: str) -> list[str]:
    """The messageIds of the accepted records in a store, in order."""
    from pixel_middleware.stores import open_store

    store = open_store(url)
    try:
        return [
            str((record["event"] or {}).get("messageId")) for _, record in store.read(accepted=True)
        ]
    finally:
        store.close()
