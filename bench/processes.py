"""Starting, watching and stopping the real servers the benchmarks drive."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType


class BenchError(Exception):
    """A benchmark could not run (a server did not start, a tool is missing)."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BenchError(f"{tool} not found: ./dev bench installs it, or apt-get install {tool}")
    return path


class Server:
    """A server process whose log is read until ``ready`` matches; a context manager.

    ``ready`` captures the listening port as its group 1, unless the port was given
    (``port``) and the pattern has no group. The log goes to a file
    (a full pipe would stall the server) and its tail is shown when anything fails.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: str,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 30.0,
        port: int = 0,
    ) -> None:
        self.argv = list(argv)
        self.ready = re.compile(ready)
        self.log_path = log
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port
        self._deadline = 0.0

    def start(self) -> Server:
        """Launch the process and wait until it is ready."""
        return self.launch().wait_ready()

    def launch(self) -> Server:
        """Launch the process without waiting (start several, then wait for each)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self._deadline = time.monotonic() + self.timeout
        return self

    def wait_ready(self) -> Server:
        assert self.proc is not None, "launch() first"
        deadline = self._deadline
        while time.monotonic() < deadline:
            match = self.ready.search(self.log_text())
            if match:
                if match.groups():
                    self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.argv[0]} did not start:\n{self.tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a graceful stop: stores flush), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise BenchError(f"{self.argv[0]} ignored SIGTERM:\n{self.tail()}") from None
        return self.proc.returncode

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
