"""The serve command's per-pixel printer: a slow terminal never slows a request."""

from __future__ import annotations

import io
import threading
import time

import pytest

from pixel_middleware.pixel_printer import CHUNK_BYTES, PixelPrinter
from tests.test_cli import make_record, segment


class StuckTerminal(io.StringIO):
    """A terminal nobody reads: each write waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_stuck_terminal_does_not_block_the_caller_and_drops_are_counted() -> None:
    terminal = StuckTerminal()
    printer = PixelPrinter(terminal, capacity=2)
    record = make_record(segment("track", {"userId": "u1", "event": "Opened\x1b[2J"}))
    started = time.monotonic()
    for _ in range(6):
        printer(record)
    assert time.monotonic() - started < 0.5, "each call only queues"
    assert printer.seen == 6
    assert 3 <= printer.dropped <= 4  # the printer's thread may hold one line already
    terminal.release.set()
    printer.close()
    lines = terminal.getvalue().splitlines()
    assert lines.count('pixel segment track "Opened\\x1b[2J" userId=u1 writeKey=k1 accepted') == (
        6 - printer.dropped
    )
    assert f"... {printer.dropped} pixel line(s) not shown: the terminal was too slow" in lines


def test_quiet_only_counts() -> None:
    terminal = io.StringIO()
    printer = PixelPrinter(terminal, show=False)
    printer(make_record(segment("page", {"userId": "u1", "name": "Home"})))
    printer.close()
    assert (printer.seen, terminal.getvalue()) == (1, "")


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5])
def test_capacity_is_checked_at_construction(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity must be a whole number >= 1"):
        PixelPrinter(io.StringIO(), capacity=capacity)  # type: ignore[arg-type]


class CountingTerminal(io.StringIO):
    """Remembers each write, as a pipe sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_a_burst_of_pixels_is_written_in_few_whole_line_writes() -> None:
    # One write() a line cost a system call and a thread wake-up per pixel.
    terminal = CountingTerminal()
    printer = PixelPrinter(terminal)
    for n in range(300):
        printer(make_record(segment("track", {"userId": f"u{n}", "event": "Opened"})))
    printer.close()
    lines = terminal.getvalue().splitlines()
    assert lines == [
        f'pixel segment track "Opened" userId=u{n} writeKey=k1 accepted' for n in range(300)
    ]
    assert len(terminal.writes) <= 300 // 20  # ~60 bytes a line, 4096 a write
    for text in terminal.writes:
        assert text.endswith("\n")  # whole lines only
        assert len(text.encode()) <= CHUNK_BYTES
