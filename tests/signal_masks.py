"""The signals a thread blocks, read from Linux's /proc (tests only)."""

from __future__ import annotations

from pathlib import Path


def blocked_signals(pid: int | str, tid: int | str) -> set[int]:
    """The signal numbers thread ``tid`` of process ``pid`` blocks (its SigBlk mask)."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {number for number in range(1, 65) if mask >> (number - 1) & 1}
    raise AssertionError(f"no SigBlk for thread {tid} of process {pid}")


def threads(pid: int) -> list[str]:
    """The thread ids of process ``pid``."""
    return sorted(path.name for path in Path(f"/proc/{pid}/task").iterdir())
