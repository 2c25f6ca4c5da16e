"""Shared checks: every test closes the recorders it opened, no thread outlives its module.

A Recorder's background thread (named ``pixel-recorder ...``) is started only when
needed, and a test that forgets ``close()`` would leave it running into the next
tests. The autouse fixtures close what a test left open and fail a module that
still has a recorder thread running when it ends.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
from hypothesis import settings

from pixel_middleware import recorder as recorder_module

THREAD_PREFIX = "pixel-recorder"

# No per-example deadline: on a shared, loaded machine (and under mutmut's
# instrumentation) one slow example says nothing about the code, and Hypothesis
# then fails the test as flaky. pytest-timeout still bounds every test.
settings.register_profile("pixel", deadline=None)
# ./dev mutate: the same examples for every mutant, and no example database, so
# that a mutant is killed or not whatever ran before it.
settings.register_profile("mutate", deadline=None, derandomize=True, database=None)
settings.load_profile(os.environ.get("PIXEL_HYPOTHESIS_PROFILE", "pixel"))
# ./dev mutate runs the property tests once per surviving mutant (about 2,000
# runs): at most this many examples each there, or the run takes hours on a
# shared machine. The examples written out with @example always run.
MUTATE_MAX_EXAMPLES = 30


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if settings.default.derandomize is not True or settings.default.database is not None:
        return  # not the mutate profile
    for item in items:
        test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
        # Hypothesis keeps a test's @settings here; it allows no second @settings.
        chosen = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(chosen, settings) and chosen.max_examples > MUTATE_MAX_EXAMPLES:
            test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
                chosen, max_examples=MUTATE_MAX_EXAMPLES
            )


def recorder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


@pytest.fixture(autouse=True)
def _close_the_recorders_a_test_opened() -> Iterator[None]:
    before = weakref.WeakSet(recorder_module._LIVE)
    yield
    for recorder in list(recorder_module._LIVE):
        if recorder not in before:
            recorder.close(timeout=5)


@pytest.fixture(autouse=True, scope="module")
def _no_recorder_thread_outlives_its_module() -> Iterator[None]:
    yield
    # close() joins the thread; one whose recorder was freed ends on its own, at once.
    deadline = time.monotonic() + 5
    while recorder_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    left = recorder_threads()
    assert not left, f"recorder threads still running after the module: {left}"


@pytest.fixture
def count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """Call it to list, from then on, the descriptor of every ``os.fsync`` (which still syncs)."""

    def start() -> list[int]:
        synced: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting_fsync)
        return synced

    return start
