"""``serve`` on granian: a Rust HTTP server, the collector in worker processes.

granian parses HTTP and holds connections in Rust; only whole requests reach
Python, in each worker's blocking threads. Measured side by side on 2 cores it
served about twice waitress's pixels per second and per CPU-second
(docs/benchmarks.md).

What the one-process ``serve`` promised, with several workers:

- Each worker builds its own collector from the same options: its own store
  connection and recorder. SQLite's writer lock serialises the writers of
  several processes, as under gunicorn.
- The per-pixel line is written whole, with one ``write()`` to the inherited
  standard output (:class:`WholeLines`), so lines of two workers never mix.
- At stop, every worker flushes its recorder (within the store's drain time),
  then adds its count to ``recorded``, shared with the main process, which
  prints the summary for all of them.
- A worker whose main process is gone (``kill -9``) stops as on SIGTERM,
  flushing what it answered, instead of serving on alone.
- A worker's stop signals (SIGTERM, SIGINT) are blocked in all its threads
  and taken by one of them (:func:`_watch_for_stop`), which hands them to
  granian's handler: a signal the kernel gave one of granian's threads would
  otherwise never be handled.

- The listening socket is bound, and listens, in the main process before any
  worker starts (:class:`SharedSocketServer`): once ``serve`` prints its start
  line, connections wait in the backlog rather than being refused, and
  ``--port 0`` has one port to name.

granian's main process calls :func:`load_app` (through ``target_loader``) in
each worker and runs the worker through :func:`run_worker`; both are module
functions so that they reach a worker started by ``spawn`` as well as ``fork``.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO, cast

from granian._granian import SocketHolder
from granian.server.mp import MPServer

from pixel_middleware._process import start_thread
from pixel_middleware.collector import create_app
from pixel_middleware.pixel_printer import PixelPrinter

__all__ = ["SharedSocketServer", "WholeLines", "WorkerPlan", "load_app", "run_worker"]

# How often a worker checks for a stop signal and that its main process is still there.
ORPHAN_CHECK_SECONDS = 0.1

# At stop, the most seconds a worker spends flushing its recorder: what the
# store has not taken by then stays in the journal for the next run.
WORKER_FLUSH_SECONDS = 10.0

# The most seconds the main process waits for a worker to stop before it kills
# it (granian's workers_kill_timeout): the flush above, and time to exit. A
# worker that never stops (a stuck store, or a stop signal lost as in
# _watch_for_stop) would otherwise hold `serve` forever; what it answered is in
# its journal, which the next run adopts.
WORKER_STOP_SECONDS = 15


@dataclass(frozen=True)
class WorkerPlan:
    """What each worker needs to build its collector: plain, picklable values."""

    app_options: dict[str, Any]  # create_app()'s keyword arguments, store URL included
    show_lines: bool  # a line per pixel (not --quiet)
    parent_pid: int  # the main process; when it is gone, the worker stops


class WholeLines(io.TextIOBase):
    """A text stream that hands each ``write()`` to the file descriptor at once, whole.

    A buffered ``sys.stdout`` flushes wherever its buffer fills, which can cut
    a line in two with another worker's line between the halves. The printer
    writes one line per call, so one ``os.write`` per call keeps lines whole
    (atomic on a pipe up to PIPE_BUF, 4096 bytes, longer than a pixel line).
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        return len(text)


class SharedSocketServer(MPServer):
    """granian's process server, with one socket bound and listening in the main process.

    On Linux granian binds a socket (SO_REUSEPORT) in each worker as it
    starts, so a client that connects between ``serve``'s start line and the
    workers' start is refused, and a second ``serve`` on the same port would
    share it silently. The workers inherit this one instead (granian's way on
    other systems).
    """

    bound: tuple[str, int] = ("", 0)

    def _init_shared_socket(self) -> None:
        family = socket.AF_INET6 if ":" in self.bind_addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            # As waitress does: a restart may bind while old connections linger
            # in TIME_WAIT. Not SO_REUSEPORT (granian's own): a second serve on
            # the same port must fail, not share it.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.bind_addr, self.bind_port))
            listener.listen(self.backlog)
        except OSError:
            listener.close()
            raise
        listener.set_inheritable(True)
        self._ssp = None
        self._sso = listener
        # SocketHolder(fd, is_uds, backlog): granian's own on Windows; its stub omits it.
        holder = SocketHolder(os.dup(listener.fileno()), False, self.backlog)  # type: ignore[call-arg]
        self._shd: Any = holder
        self._sfd = self._shd.get_fd()
        address = listener.getsockname()
        self.bound = (str(address[0]), int(address[1]))

    def _spawn_workers(self, spawn_target: Any, target_loader: Any) -> None:
        # Workers start with both stop signals blocked, and keep them blocked
        # in every thread: their watcher thread takes them (_watch_for_stop).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super()._spawn_workers(spawn_target, target_loader)  # type: ignore[no-untyped-call]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})

# The collector this worker runs, closed when its server stops.
_running: list[tuple[Any, PixelPrinter, Any]] = []


def load_app(plan: WorkerPlan, recorded: Any) -> Callable[..., Any]:
    """Build this worker's collector (granian's ``target_loader``, called in the worker).

    ``recorded`` is a shared ``multiprocessing.Value`` counting the run's records.
    """
    # io.TextIOBase is a text stream, though typeshed does not call it a TextIO.
    printer = PixelPrinter(cast(TextIO, WholeLines(1)), show=plan.show_lines)
    try:
        app = create_app(on_record=printer, **plan.app_options)
    except BaseException:
        printer.close()
        raise
    _running.append((app, printer, recorded))
    # granian sets its own handlers when it starts serving; until then these
    # mark that it has not (they never run: the signals are blocked).
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _before_granian)
    watcher = threading.Thread(
        target=_watch_for_stop, args=(plan.parent_pid,), name="stop-watch", daemon=True
    )
    start_thread(watcher)
    return app


def run_worker(*args: Any, **kwargs: Any) -> None:
    """granian's WSGI worker, then this worker's flush once it has stopped serving.

    granian returns from its worker once its server has stopped and answered
    the requests in flight; only then is the recorder closed.
    """
    try:
        MPServer._spawn_wsgi_worker(*args, **kwargs)
    finally:
        while _running:
            app, printer, recorded = _running.pop()
            try:
                app.close(WORKER_FLUSH_SECONDS)
            finally:
                printer.close()
                with recorded.get_lock():
                    recorded.value += printer.seen


def _before_granian(signum: int, frame: object) -> None:
    """The stop signals' handler until granian sets its own; never called."""


def _watch_for_stop(parent_pid: int) -> None:
    """Hand a stop signal, or the main process's death, to granian's handler.

    The kernel gives a signal sent to this process to any thread that does
    not block it, and Python runs the handler only in the main thread, once it
    runs Python again; a worker's main thread waits inside granian until the
    server stops, so a SIGTERM that landed in one of granian's threads was
    never handled, and the worker never stopped (the main process killed it
    after WORKER_STOP_SECONDS). Blocked in every thread, the signal stays
    pending until this thread takes it.
    """
    stop: int | None = None
    while True:
        if stop is None:
            pending = signal.sigpending() & _STOP_SIGNALS
            if pending:
                stop = signal.sigwait(pending)
            elif os.getppid() != parent_pid:
                # A worker's parent changes only when the main process died:
                # stop as on SIGTERM, which flushes what was answered.
                stop = signal.SIGTERM
        if stop is not None:
            handler = signal.getsignal(stop)
            if callable(handler) and handler is not _before_granian:
                # granian's sets its server's stop event; once only (a second
                # set() with the server gone would wait forever).
                handler(stop, None)
                return
        time.sleep(ORPHAN_CHECK_SECONDS)
