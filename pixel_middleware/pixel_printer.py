"""One line on the terminal for each pixel ``serve`` records, never slowing a request.

The collector's ``on_record`` hook runs in the request's thread. Writing to a
terminal (or a pipe nobody reads) can block, so the hook only appends the
record to a list and a daemon thread formats and writes the lines
(:func:`~pixel_middleware.display.pixel_line`). The thread takes every record
waiting at once, and writes their lines in as few ``write()`` calls as keep
each line whole (at most :data:`CHUNK_BYTES` a call, which a pipe writes
atomically), then waits :data:`LINGER` seconds for more: a request wakes it
at most once a linger, instead of once a pixel. At most :data:`QUEUE_LINES`
lines wait (those being written included): past that, further lines are
dropped and counted, and the count is printed once the terminal catches up.

Usage::

    printer = PixelPrinter(sys.stdout)
    app = create_app(on_record=printer)
    ...
    printer.close()   # prints what is queued, then stops
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, TextIO

from pixel_middleware._process import start_thread
from pixel_middleware.display import pixel_line

__all__ = ["CHUNK_BYTES", "LINGER", "QUEUE_LINES", "PixelPrinter"]

#: The most lines waiting for the terminal; past it, lines are dropped and counted.
QUEUE_LINES: Final = 10_000

#: The most bytes in one write: a pipe writes up to PIPE_BUF (4096 on Linux)
#: atomically, so the lines of several workers sharing it never mix.
CHUNK_BYTES: Final = 4096

#: Seconds the printer waits for more lines after writing, so that a burst of
#: pixels is written in a few calls, and requests wake it rarely.
LINGER: Final = 0.02


class PixelPrinter:
    """Call it with each record (the ``on_record`` hook); it prints from its own thread.

    :param out: Where the lines go.
    :param capacity: The most lines waiting; more are dropped and counted.
    :param show: ``False`` (``serve --quiet``): only count the records.
    """

    def __init__(self, out: TextIO, *, capacity: int = QUEUE_LINES, show: bool = True) -> None:
        if not isinstance(show, bool):
            raise TypeError(f"PixelPrinter: show must be True or False, got {show!r}")
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(
                f"PixelPrinter: capacity must be a whole number >= 1, got {capacity!r}"
            )
        self.out = out
        self.show = show
        self.capacity = capacity
        self._pending: deque[Mapping[str, Any]] = deque()
        self._held = 0  # lines taken by the printer's thread and not written yet
        self._wake = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self.seen = 0
        self.dropped = 0
        self._unreported = 0
        self._thread = threading.Thread(target=self._run, name="pixel-printer", daemon=True)
        start_thread(self._thread)

    def __call__(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            self.seen += 1
            if not self.show:
                return
            if len(self._pending) + self._held >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                return
            self._pending.append(record)
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Print what is queued (for at most ``timeout`` seconds), then stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            stopping = self._stopping
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
                self._held = len(batch)
            try:
                self._report_dropped()
                if batch:
                    self._write_lines(batch)
                    self.out.flush()
            except (OSError, ValueError):
                # The terminal went away (a closed pipe): nothing more to show.
                return
            finally:
                with self._lock:
                    self._held = 0
            if stopping:
                with self._lock:
                    more = bool(self._pending)
                if more:
                    self._wake.set()  # what came while stopping
                    continue
                try:
                    self._report_dropped()
                    self.out.flush()
                except (OSError, ValueError):
                    pass
                return
            time.sleep(LINGER)

    def _write_lines(self, records: list[Mapping[str, Any]]) -> None:
        chunk: list[str] = []
        size = 0
        for record in records:
            line = pixel_line(record) + "\n"
            if chunk and size + len(line) > CHUNK_BYTES:
                self.out.write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            # Bytes, as the pipe counts them (terminal_text leaves mostly ASCII).
            size += len(line) if line.isascii() else len(line.encode("utf-8", "backslashreplace"))
        if chunk:
            self.out.write("".join(chunk))

    def _report_dropped(self) -> None:
        with self._lock:
            missed, self._unreported = self._unreported, 0
        if missed:
            self.out.write(f"... {missed} pixel line(s) not shown: the terminal was too slow\n")
