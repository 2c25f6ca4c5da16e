"""A real PostgreSQL server for the tests: a throwaway cluster on a free loopback port.

``PostgresServer`` runs ``initdb`` in a new temporary directory and ``postgres``
on a free port on 127.0.0.1, its Unix socket in that directory too, and can stop
(``pg_ctl stop -m fast``) and start it again, so that a test can take the
database away under a store and bring it back.

The programs come from Debian's ``postgresql`` package, which puts them in
``/usr/lib/postgresql/<version>/bin`` (not on PATH); ``./dev test`` installs it.
Tests that use the fixtures fail, not skip, when it is missing.

``initdb`` refuses to run as root, and the tests run as root: the cluster then
belongs to the ``postgres`` system user (which the package creates) and its
programs run as that user (``runuser``). Loopback connections are trusted,
except for the role ``PASSWORD_USER``, which must give ``PASSWORD``.

Register the fixtures with ``pytest_plugins = ["postgres_server"]``:
``postgres_server`` (one cluster for the whole session) and ``postgres_url``
(a URL naming a table no other test uses, in the server as it is running).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

__all__ = ["PASSWORD", "PASSWORD_USER", "PostgresServer", "find_bin_dir"]

# A role that must log in with a password (scram-sha-256), for the tests that
# show a password never appears in what a store says.
PASSWORD_USER = "pixel_pw"
PASSWORD = "s3cr3t-Pg-pw"
# Seconds a start or a stop may take before the test fails.
_WAIT = 30


def find_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: Debian's newest version, else PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: (
            int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One throwaway cluster; :meth:`remove` stops it and deletes its directory."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        # Not under pytest's own temporary directory: that one is private to
        # root (0700), and the cluster's owner must be able to reach its files.
        self.directory = Path(tempfile.mkdtemp(prefix="pixel-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self._as_owner: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.directory, owner.pw_uid, owner.pw_gid)
            self._as_owner = ["runuser", "-u", "postgres", "--"]
        self.running = False
        self._initdb()

    def url(self, *, user: str = "postgres", database: str = "postgres", table: str = "") -> str:
        query = f"?table={table}" if table else ""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}{query}"

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        """A superuser connection, autocommit, for a test to look and to set up."""
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        )

    def start(self) -> None:
        """Start the server and wait until it takes connections (``pg_ctl -w``)."""
        assert not self.running, "already running"
        self._pg_ctl("start", "-l", str(self.log))
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: sessions are ended, committed work is on disk."""
        if self.running:
            self._pg_ctl("stop", "-m", "fast")
            self.running = False

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [*self._as_owner, *argv], capture_output=True, text=True, timeout=_WAIT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"{self.log_tail()}"
            )

    def _pg_ctl(self, action: str, *options: str) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"), action, "-D", str(self.data), "-w", "-t", str(_WAIT),
            *options,
        )  # fmt: skip

    def _initdb(self) -> None:
        # --no-sync, and fsync=off below: nothing here is about power loss, and
        # a stop (-m fast) writes a checkpoint, so what was committed survives
        # the restarts the tests make. Trust on loopback, so that the tests need
        # no password, but for the one role that must give one.
        self._run(
            str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres",
            "-E", "UTF8", "--locale=C", "--no-sync", "-A", "trust",
        )  # fmt: skip
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "max_connections": "100",
            "shared_buffers": "16MB",
            "log_min_messages": "warning",
        }
        conf = "".join(f"{name} = {value}\n" for name, value in settings.items())
        hba = (
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        # Written as the owner would: the files are the cluster owner's.
        with open(self.data / "postgresql.conf", "a") as file:
            file.write(conf)
        (self.data / "pg_hba.conf").write_text(hba)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running cluster for the session, with the password role; removed at the end."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin/initdb"
            " (./dev test installs Debian's postgresql package)"
        )
    server = PostgresServer(bin_dir)
    try:
        server.start()
        with server.connect() as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a table no other test uses; the server started again if a test stopped it."""
    if not postgres_server.running:
        postgres_server.start()
    return postgres_server.url(table=f"t_{uuid.uuid4().hex[:16]}")
