"""One line on the terminal for each pixel ``serve`` records, never slowing a request.

The collector's ``on_record`` hook runs in the request's thread. Writing to a
terminal (or a pipe nobody reads) can block, so the hook only queues the record
and a daemon thread formats and writes the lines
(:func:`~pixel_middleware.display.pixel_line`). The queue is bounded: when the
terminal falls behind by :data:`QUEUE_LINES` lines, further lines are dropped
and counted, and the count is printed once the terminal catches up.

Usage::

    printer = PixelPrinter(sys.stdout)
    app = create_app(on_record=printer)
    ...
    printer.close()   # prints what is queued, then stops
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any, Final, TextIO

from pixel_middleware.display import pixel_line

__all__ = ["QUEUE_LINES", "PixelPrinter"]

#: The most lines waiting for the terminal; past it, lines are dropped and counted.
QUEUE_LINES: Final = 10_000

_STOP: Final[Any] = object()


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
        self._queue: queue.Queue[Any] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self.seen = 0
        self.dropped = 0
        self._unreported = 0
        self._thread = threading.Thread(target=self._run, name="pixel-printer", daemon=True)
        self._thread.start()

    def __call__(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            self.seen += 1
        if not self.show:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._unreported += 1

    def close(self, timeout: float = 5.0) -> None:
        """Print what is queued (for at most ``timeout`` seconds), then stop the thread."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._report_dropped()
                return
            try:
                self._report_dropped()
                self.out.write(pixel_line(item) + "\n")
                if self._queue.empty():
                    self.out.flush()
            except (OSError, ValueError):
                # The terminal went away (a closed pipe): nothing more to show.
                return

    def _report_dropped(self) -> None:
        with self._lock:
            missed, self._unreported = self._unreported, 0
        if missed:
            self.out.write(f"... {missed} pixel line(s) not shown: the terminal was too slow\n")
