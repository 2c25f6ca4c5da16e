"""Process-wide hooks, installed once, and only when something needs them.

Two things in the library concern the whole process: recorders flush at
interpreter exit, and objects holding locks, threads or descriptors start
afresh in a forked child (only the forking thread lives on there, and a lock
another thread held stays held forever). Modules hand their callbacks to
:func:`at_exit` and :func:`after_fork_in_child` instead of installing their own
``atexit`` and ``os.register_at_fork`` hooks at import: this module installs
each hook at most once, at the first registration, and runs the callbacks in
one known order.

Callbacks are module-level functions that look up their own (weakly held)
objects; registering one twice changes nothing. This module imports nothing
from the package, so any layer may use it.

Signals too: the threads the library starts (:func:`start_thread`) block the
signals a process is asked to stop with, so the kernel hands those to the main
thread (see :func:`start_thread`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable

__all__ = ["after_fork_in_child", "at_exit", "start_thread"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_exit_callbacks: list[Callable[[], None]] = []
_fork_callbacks: list[Callable[[], None]] = []
_installed: set[str] = set()


def at_exit(callback: Callable[[], None]) -> None:
    """Call ``callback`` at interpreter exit; the last registered runs first, as with atexit."""
    with _lock:
        if callback not in _exit_callbacks:
            _exit_callbacks.append(callback)
        if "exit" not in _installed:
            _installed.add("exit")
            atexit.register(_run_exit_callbacks)


def after_fork_in_child(callback: Callable[[], None]) -> None:
    """Call ``callback`` in a forked child, right after the fork, in registration order."""
    with _lock:
        if callback not in _fork_callbacks:
            _fork_callbacks.append(callback)
        if "fork" not in _installed:
            _installed.add("fork")
            os.register_at_fork(after_in_child=_run_fork_callbacks)


def _run_exit_callbacks() -> None:
    with _lock:
        callbacks = list(reversed(_exit_callbacks))
    for callback in callbacks:
        try:
            callback()
        except Exception:
            # One failing hook must not keep the others (other recorders'
            # flushes) from running.
            logger.exception("exit hook %r failed", callback)


def _run_fork_callbacks() -> None:
    global _lock
    # Another thread may have held the lock at the fork: in the child nobody
    # would ever release it.
    _lock = threading.Lock()
    for callback in list(_fork_callbacks):
        callback()


# Signals a thread of ours never takes: everything asynchronous. The faults
# (which the kernel sends to the faulting thread whatever its mask), SIGABRT
# (abort() unblocks it) and what cannot be blocked stay as they are.
_BLOCKED_IN_OUR_THREADS = signal.valid_signals() - {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
    signal.SIGTRAP,
    signal.SIGSYS,
}


def start_thread(thread: threading.Thread) -> None:
    """Start ``thread`` with the asynchronous signals (SIGTERM, SIGINT, ...) blocked in it.

    The kernel delivers a signal sent to the process to any thread that does
    not block it, and Python runs its handler only in the main thread, at its
    next bytecode: a SIGTERM that lands in a background thread while the main
    thread waits in a system call (``time.sleep``, a server's accept loop,
    granian's wait for its stop) is not handled until that call returns, which
    may be never. Blocked here, it goes to the main thread, whose wait it
    interrupts. The thread inherits the mask from this one at its creation, so
    no signal can reach it before it is in place.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: signals go to the main thread
        thread.start()
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_IN_OUR_THREADS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
