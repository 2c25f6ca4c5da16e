"""The process-wide hooks: here, the signal mask of the threads the library starts."""

from __future__ import annotations

import os
import signal
import threading

from signal_masks import blocked_signals

from pixel_middleware._process import start_thread

# Numbers from signal(7) on Linux x86-64, not the module's constants.
SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE = 1, 2, 3, 4, 5, 6, 7, 8
SIGUSR1, SIGSEGV, SIGUSR2, SIGALRM, SIGTERM, SIGCHLD, SIGSYS = 10, 11, 12, 14, 15, 17, 31


def test_a_started_thread_blocks_the_asynchronous_signals_and_its_starter_keeps_its_mask() -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    running = threading.Event()
    release = threading.Event()
    native: list[int] = []

    def body() -> None:
        native.append(threading.get_native_id())
        running.set()
        release.wait(30)

    thread = threading.Thread(target=body, daemon=True)
    start_thread(thread)
    try:
        assert running.wait(30)
        blocked = blocked_signals(os.getpid(), native[0])
    finally:
        release.set()
        thread.join(30)
    # What a process is stopped or poked with goes to a thread that handles it.
    assert {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGCHLD} <= blocked
    # A fault is the faulting thread's own, and abort() must still work there.
    assert not {SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS} & blocked
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert SIGTERM not in blocked_signals(os.getpid(), threading.get_native_id())
