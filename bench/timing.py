"""Side-by-side timing of in-process callables.

Each case runs in blocks of operations; the blocks of all cases alternate (in
forward then reverse order, so that neither always runs first) for many rounds,
and the figures compared are medians over rounds. Blocks are short (tens of
milliseconds) so that a burst of other work on a shared machine lands in one
block of one round, which the median drops.

Cases time themselves with the clock they choose: :data:`CPU` (the process's CPU
time: time the scheduler gave to other processes does not count, which is what
makes a 2% difference measurable on a busy machine) or :data:`WALL` (when the
work waits on purpose, e.g. for another thread's commit).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping

# A case: run the operation n times, return the seconds it took by its clock.
Case = Callable[[int], float]
Clock = Callable[[], float]

CPU: Clock = time.process_time
WALL: Clock = time.perf_counter


def calibrate(case: Case, *, block_seconds: float, start: int = 4) -> int:
    """The number of operations that takes about ``block_seconds``."""
    n = start
    while True:
        took = case(n)
        if took >= block_seconds / 4 or n >= 1 << 24:
            return max(1, int(n * block_seconds / max(took, 1e-9)))
        n *= 4


def interleave(
    cases: Mapping[str, Case], *, block_seconds: float, rounds: int
) -> dict[str, list[float]]:
    """Seconds per operation for each case, one figure per round, rounds interleaved.

    Each case gets its own block size (so that a slow case does not make the
    fast one's blocks long, or the other way round).
    """
    names = list(cases)
    sizes = {name: calibrate(cases[name], block_seconds=block_seconds) for name in names}
    per_op: dict[str, list[float]] = {name: [] for name in names}
    # What exists now is left out of every later collection, so that a collection
    # between rounds costs little and the same for every case.
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            gc.collect()
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                per_op[name].append(cases[name](sizes[name]) / sizes[name])
    finally:
        gc.unfreeze()
    return per_op
