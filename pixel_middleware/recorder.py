"""The one way records travel from request handlers to a store.

Every record is first appended to a local write-ahead journal
(:mod:`pixel_middleware.journal`, one per process, in ``spool_path``), then a
writer thread moves the journal's records into the store in batches (up to
``max_batch`` records in one ``store.write()``). One mechanism for every
case: the store up, slow, or down for hours.

Appending is a group commit: callers queue their record's JSON line, and the
first to find no append under way writes everything queued with one
``os.write()`` (and, with ``journal_fsync="group"``, one ``fsync``) while
those arriving meanwhile wait for the next group. One lock, one condition and
counters say whose record is in: no per-batch events.

Durability, with ``durable=True`` (the default): ``record()`` returns ``True``
once the record is in the journal. The kernel holds it from then on, so it
survives the process being killed (``kill -9``): a recorder started later on
the same ``spool_path`` adopts the dead process's segments and hands their
records to the store. SQLite and PostgreSQL stores commit the journal
position in the same transaction as the records, so that replay is exact (no
duplicates); other stores may receive the last batch before the crash twice
(at least once). ``journal_fsync="group"`` also survives a power loss. With
``durable=False`` (fire and forget), ``record()`` returns ``True`` once the
record is queued in memory: a crash loses what is queued and not yet
journaled (at most ``max_pending`` records), while a normal exit writes it
(see "Exit" below).

Bounded waits: ``record()`` waits at most ``keep_timeout`` seconds (for room in
the queue, and with ``durable`` for the append), then returns ``False``: the
record is not kept yet. When the journal cannot be written (a full disk, its
cap) the caller writes its group to the store itself; when that fails too the
answer is ``False`` at once. A record that was queued stays queued and is
kept once the store or the disk recovers (at least once: a client that sends
the pixel again then has it twice, with the same ``messageId``).

Bounded memory: at most ``max_pending`` records wait in memory to be
journaled; records are never dropped to make room. The writer keeps the
journaled records in memory too, to save reading them back, but at most two
batches (``2 * max_batch``, and no more than ``max_pending``): when the store
falls further behind, it reads them back from the journal.

Batches: the writer lets journaled records gather for ``linger`` seconds
(20 ms by default) before a store write, unless a batch is full, a
:meth:`~Recorder.flush` waits or the recorder closes: one commit then
carries every record of those milliseconds. Records are in the journal all
along; only the store sees them that much later.

Store failure: records simply stay in the journal (at most
``spool_max_bytes`` on disk) and every ``retry_interval`` seconds the writer
hands the oldest batch to the store again. One WARNING line says so when it
starts and one when the store took them all.

Threads: the writer thread starts at the first record, and at construction
when the journal directory holds segments, so that those left by a process
that died are handed on even if no pixel comes. It holds its recorder only
while records wait: an idle recorder that nobody references is freed, and its
thread ends.

Exit: at interpreter exit every recorder still open is flushed and closed
(within ``EXIT_TIMEOUT`` seconds in all). :func:`install_signal_flush` makes
SIGTERM flush too (a server's main program calls it; the library never takes
signal handlers by itself).

Usage::

    recorder = Recorder(open_store("sqlite:///pixels.sqlite3"))
    kept = recorder.record(record)   # True: in the journal when it returns
    recorder.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import Literal

from pixel_middleware import _process
from pixel_middleware.core import PixelRecord
from pixel_middleware.journal import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SEGMENT_BYTES,
    Entry,
    Journal,
    encode_entry,
)
from pixel_middleware.stores import RecordError, Store, store_identity

__all__ = [
    "DEFAULT_LINGER",
    "DEFAULT_SPOOL_ROOT",
    "EXIT_TIMEOUT",
    "Recorder",
    "default_spool_path",
    "install_signal_flush",
]

logger = logging.getLogger(__name__)

#: Where journals go unless ``spool_path`` says otherwise: one directory per
#: store URL under this one, relative to the working directory.
DEFAULT_SPOOL_ROOT = "pixel-spool"

#: Seconds the exit hook and the SIGTERM handler wait for all recorders together.
EXIT_TIMEOUT = 10.0

#: Seconds the writer lets journaled records gather before a store write
#: (``Recorder(linger=...)``). Under gunicorn's threads a commit for every
#: pixel or two cost a seventh of the requests per second that 20 ms of
#: gathering won back (docs/benchmarks.md, "The writer's linger").
DEFAULT_LINGER = 0.02

#: The most seconds a read through a durable recorder's store waits for the
#: records other live processes journaled (a server's other workers).
OTHER_PROCESSES_WAIT = 2.0

# Every recorder not closed yet, held weakly: the exit and fork hooks' list.
_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()

JournalFsync = Literal["none", "group"]

# A record waiting to be journaled: the record, its journal line, and whether
# the line is exactly the store's text for it (journal.encode_entry).
_Queued = tuple[PixelRecord, bytes, bool]


def default_spool_path(store_url: str) -> Path:
    """The journal directory a :class:`Recorder` uses for ``store_url`` by default.

    ``pixel-spool/<first 16 hex digits of the URL's SHA-256>``, relative to the
    working directory: one journal per store, and no file path or password
    from the URL in the directory's name. Read it with
    :func:`~pixel_middleware.journal.count_spooled` to see how many records wait.
    """
    return Path(DEFAULT_SPOOL_ROOT, hashlib.sha256(store_url.encode()).hexdigest()[:16])


class _WriterSlot:
    """What the writer thread holds: its recorder weakly, and strongly
    (``busy``) only while records wait, so that an idle recorder can be freed.
    ``wake`` is set when there is work (and when the recorder is freed)."""

    __slots__ = ("busy", "ref", "wake")

    def __init__(self, recorder: Recorder) -> None:
        wake = self.wake = threading.Event()
        self.ref = weakref.ref(recorder, lambda _: wake.set())
        self.busy: Recorder | None = recorder


class Recorder:
    """Journals records, then hands them to a store in batches (see the module).

    :param store: Where the records go; closed by :meth:`close`.
    :param durable: ``True``: :meth:`record` returns ``True`` once the record
        is in the journal (or, when the journal cannot be written, in the
        store). ``False``: once the record is queued in memory.
    :param max_batch: The most records in one ``store.write()``.
    :param max_pending: The most records waiting in memory to be journaled;
        :meth:`record` waits (up to ``keep_timeout``) while that many wait.
    :param keep_timeout: The most seconds :meth:`record` waits before it
        returns ``False`` (not kept yet); ``None`` waits as long as it takes.
    :param spool_path: The journal's directory; by default
        ``./pixel-spool/<hash of the store URL>/`` (:func:`default_spool_path`).
        Recorders of one store in several processes share it (each process
        writes its own segments).
    :param spool_max_bytes: The most bytes the journal's files may hold on
        disk (1 GiB by default; ``None``: no cap). Past it, the caller writes
        to the store itself.
    :param journal_fsync: ``"none"`` (the default): an append is in the page
        cache when :meth:`record` returns, which survives the process dying.
        ``"group"``: each group append is also fsync'd, which survives a power
        loss (one fsync per group of concurrent records).
    :param journal_segment_bytes: The journal segment size past which a new
        segment is started (64 MiB by default).
    :param retry_interval: Seconds between attempts to hand the journal to a
        failing store, or to keep records when the journal fails too.
    :param linger: Seconds the writer lets journaled records gather before it
        hands them to the store (0.02 by default; 0: at once), so that a busy
        server commits one batch every ``linger`` rather than one per pixel or
        two. Every record is in the journal meanwhile; :meth:`flush`,
        :meth:`close` and a full batch (``max_batch``) cut the wait short.
    """

    store: Store
    _refusing: bool  # a record was refused and none kept since

    def __init__(
        self,
        store: Store,
        *,
        durable: bool = True,
        max_batch: int = 500,
        max_pending: int = 10_000,
        keep_timeout: float | None = 5.0,
        spool_path: str | os.PathLike[str] | None = None,
        spool_max_bytes: int | None = DEFAULT_MAX_BYTES,
        journal_fsync: JournalFsync = "none",
        journal_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retry_interval: float = 1.0,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        if not callable(getattr(store, "write", None)):
            raise TypeError(f"Recorder: store must be a Store, got {type(store).__name__}")
        for name, value in (("max_batch", max_batch), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Recorder: {name} must be a whole number of 1 or more, got {value!r}"
                )
        if not retry_interval > 0:
            raise ValueError(
                f"Recorder: retry_interval must be more than 0 seconds, got {retry_interval!r}"
            )
        if isinstance(linger, bool) or not 0 <= linger < math.inf:
            raise ValueError(f"Recorder: linger must be 0 seconds or more, got {linger!r}")
        if keep_timeout is not None and (
            isinstance(keep_timeout, bool) or not 0 < keep_timeout < math.inf
        ):
            raise ValueError(
                f"Recorder: keep_timeout must be more than 0 seconds or None, got {keep_timeout!r}"
            )
        if journal_fsync not in ("none", "group"):
            raise ValueError(
                f"Recorder: journal_fsync must be 'none' or 'group', got {journal_fsync!r}"
            )
        self.store = store
        self.durable = durable
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.keep_timeout = None if keep_timeout is None else float(keep_timeout)
        self.retry_interval = float(retry_interval)
        self.linger = float(linger)
        self.journal_fsync = journal_fsync
        # The journaled records kept in memory for the writer: a couple of
        # batches. Further behind, reading them back from the journal (from
        # the page cache) costs little, and memory stays small.
        self._cache_cap = min(max_pending, 2 * max_batch)
        if spool_path is None:
            spool_path = default_spool_path(store_identity(store))
        self.spool_path = Path(spool_path).absolute()
        try:
            self._journal = Journal(
                self.spool_path,
                max_bytes=spool_max_bytes,
                segment_bytes=journal_segment_bytes,
                fsync=journal_fsync == "group",
            )
        except ValueError as exc:
            raise ValueError(f"Recorder: spool_max_bytes: {exc}") from None
        # A store lost with the process (memory://, volatile) gains nothing from
        # a journal: the group commit writes it directly.
        self._journaling = not getattr(store, "volatile", False)
        # Stores that commit the journal position with the records (exact replay).
        write_at = getattr(store, "write_journaled", None)
        positions = getattr(store, "journal_positions", None)
        self._write_at = write_at if callable(write_at) and callable(positions) else None
        self._positions = positions if self._write_at is not None else None
        # Stores that keep a journal line as the record's text (no second encode).
        self._takes_texts = bool(getattr(store, "takes_journal_texts", False))
        self._store_closed = False
        self._reset()
        if durable:
            _reads_wait_for(store, self)
        _register_process_hooks()
        _LIVE.add(self)
        if self._journaling and _has_spool_files(self.spool_path):
            # Left by a process that died: counted in `spooled` from now on,
            # and handed on even if no pixel comes.
            self._adopt_journal()
            with self._lock:
                self._wake_writer()

    def __repr__(self) -> str:
        return f"Recorder({self.store!r}, durable={self.durable})"

    @property
    def spooled(self) -> int:
        """The number of records in the journal that the store has not taken yet.

        Never waits for a write under way (it reads the journal's counter).
        """
        return len(self._journal)

    @property
    def stalled(self) -> bool:
        """Whether neither the journal nor the store took the last append (a full
        disk, a store that refuses writes): records wait in memory, and pixels
        not kept within ``keep_timeout`` are refused, until one takes them again.

        Never waits (one attribute read, which the GIL makes whole).
        """
        return self._stalled

    def record(self, record: PixelRecord) -> bool:
        """Queue ``record``; with ``durable``, wait until it is in the journal.

        ``True``: journaled (``durable``) or queued (fire and forget).
        ``False``: not kept within ``keep_timeout`` seconds, or the recorder is
        closed; a record that was queued is still kept when the store or the
        disk recovers. Never raises: a problem is logged.
        """
        try:
            try:
                line, exact = encode_entry(record) if self._journaling else (b"", False)
            except RecordError as exc:
                logger.error("dropping a record no store can keep (%s): %r", exc, record)
                return False
            lock = self._lock
            with lock:
                if self._queued_count >= self.max_pending and not self._closed:
                    deadline = _deadline(self.keep_timeout)
                    while self._queued_count >= self.max_pending and not self._closed:
                        wait = _left(deadline)
                        if wait is not None and wait <= 0:
                            self._refused(record, f"{self._queued_count} records already wait")
                            return False
                        self._changed.wait(wait)
                if self._closed:
                    logger.error(
                        "recorder for %s is closed: record %s not kept",
                        _url(self.store),
                        _record_id(record),
                    )
                    return False
                self._queue.append((record, line, exact))
                self._queued_count += 1
                self._queued += 1
                seq = self._queued
                if not self.durable:
                    # Journal it now if nobody is appending (one write, no
                    # waiting for anyone): the queue, and memory, stay small
                    # however far behind the store is.
                    if self._journaling and self._appender is None and not self._stalled:
                        self._append_queue(store_fallback=False)
                    else:
                        self._wake_writer()
                    return True
                return self._wait_journaled(seq, record)
        except Exception:
            logger.exception("recording %s failed", _record_id(record))
            return False

    def _wait_journaled(self, seq: int, record: PixelRecord) -> bool:
        """Until record ``seq`` is journaled, append the queue ourselves whenever no
        other thread is appending; ``False`` at the deadline or when it failed.
        Call with the lock held."""
        self._waiters += 1
        try:
            return self._wait_journaled_counted(seq, record)
        finally:
            self._waiters -= 1

    def _wait_journaled_counted(self, seq: int, record: PixelRecord) -> bool:
        deadline: float | None = None
        while self._journaled < seq:
            if self._closed:
                return False
            now = time.monotonic()
            retry_in = self._next_retry - now if self._stalled else 0.0
            if self._appender is None and retry_in <= 0:
                if not self._append_queue():
                    self._refused(record, "neither the journal nor the store takes it")
                    self._wake_writer()  # it retries the queue
                    return False
                continue
            if deadline is None:
                deadline = _deadline(self.keep_timeout)
            wait = _left(deadline, now)
            if wait is not None and wait <= 0:
                self._refused(record, "not journaled in time")
                self._wake_writer()
                return False
            if self._appender is None:
                wait = retry_in if wait is None else min(wait, retry_in)
            self._changed.wait(wait)
        return True

    def offer(self, record: PixelRecord) -> bool:
        """Queue ``record`` if that needs no waiting; ``False`` (nothing queued) otherwise.

        For callers that must not block, such as an event loop: with
        ``durable=False`` and room in the queue the record is queued at once;
        when the queue is full, or the recorder is durable (the caller would
        wait for the append), or closed, it returns ``False`` and the caller
        hands the record to :meth:`record` from a thread instead.
        """
        if self.durable:
            return False
        try:
            line, exact = encode_entry(record) if self._journaling else (b"", False)
        except RecordError:
            return False
        with self._lock:
            if self._closed or self._queued_count >= self.max_pending:
                return False
            self._queue.append((record, line, exact))
            self._queued_count += 1
            self._queued += 1
            self._wake_writer()
        return True

    def _refused(self, record: PixelRecord, why: str) -> None:
        """Log a record not kept: loudly the first time since one was kept."""
        if self._refusing:
            logger.debug("record %s not kept: %s", _record_id(record), why)
            return
        self._refusing = True
        logger.error(
            "recorder for %s: record %s not kept (%s; keep_timeout=%ss); records are"
            " refused like this until one is kept again",
            _url(self.store),
            _record_id(record),
            why,
            self.keep_timeout,
        )

    def _wait_for_other_processes(self) -> None:
        """Wait until the records other live processes journaled on this store
        so far are stored: a read in one worker of a server then sees every
        pixel another worker answered before it (read your writes across
        processes). Only a store that keeps journal positions can say; with
        others a read sees them a few milliseconds later. Waits at most
        ``OTHER_PROCESSES_WAIT`` seconds (a stuck process holds no one up long)."""
        positions = self._positions
        if positions is None or not self._journaling:
            return
        tails = self._journal.live_tails()
        deadline = time.monotonic() + OTHER_PROCESSES_WAIT
        pause = 0.001
        while tails:
            try:
                stored = positions(list(tails))
            except Exception:
                return  # the read that follows says what is wrong with the store
            tails = {
                name: size
                for name, size in tails.items()
                if stored.get(name, 0) < size and (self.spool_path / name).exists()
            }
            if not tails or time.monotonic() + pause > deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is in the store or given up on.

        ``True`` when they are; ``False`` when ``timeout`` seconds passed first.
        """
        deadline = _deadline(timeout)
        with self._lock:
            me = threading.get_ident()
            if me in (self._appender, self._store_writer):
                return False  # called from within this thread's own write (a signal handler)
            target = self._queued
            if self._flushed(target):
                return True
            self._flushing += 1  # the writer lingers no more
            try:
                self._wake_writer()
                while not self._flushed(target):
                    if self._closed and self._thread is None:
                        return self._done >= target
                    wait = _left(deadline)
                    if wait is not None and wait <= 0:
                        return False
                    self._changed.wait(wait)
                return True
            finally:
                self._flushing -= 1

    def _flushed(self, target: int) -> bool:
        # In the store, or, while the store fails, in the journal.
        return self._done >= target or (self._store_failing and self._journaled >= target)

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the writer thread and close the store; idempotent.

        Waits up to ``timeout`` seconds (``None``: as long as it takes). What
        waits in memory gets one more attempt at the journal (and the store);
        what neither takes then is given up (logged with the count). The
        journal's records get one more attempt at the store; those it does not
        take stay in the journal for the next recorder. If the time runs out
        first (a store write that hangs), it logs how many records are still
        waiting and leaves the store open for the thread, which goes on trying.
        """
        with self._lock:
            self._closing = True
            if self._queue or self._journal_waits() or self._thread is not None:
                self._wake_writer()
            else:
                self._closed = True
                self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.error(
                    "recorder for %s: %d records still not written after %ss of closing",
                    _url(self.store),
                    self._queued_count + len(self._journal),
                    timeout,
                )
                return
        with self._lock:
            if self._store_closed:
                return
            self._store_closed = True
        try:
            self.store.close()
        except Exception:
            logger.exception("closing the store %s failed", _url(self.store))
        self._journal.close()
        _LIVE.discard(self)

    # --- appending ---------------------------------------------------------------

    def _reset(self) -> None:
        """The in-memory state, fresh (at construction, and in a forked child)."""
        # Reentrant, for the SIGTERM handler's flush interrupting record().
        self._lock = threading.RLock()
        # Anything changed: room in the queue, an append or a store write ended.
        self._changed = threading.Condition(self._lock)
        # Records waiting to be journaled, with their JSON lines.
        self._queue: deque[_Queued] = deque()
        self._queued_count = 0  # in _queue, and in an append under way
        # Counters of this recorder's records: given to record(), in the
        # journal (or the store), and done (in the store, or given up on).
        self._queued = 0
        self._journaled = 0
        self._done = 0
        self._appender: int | None = None  # the thread appending now
        # Durable callers waiting for their record to be journaled: they
        # append themselves, so the writer thread leaves the queue to them.
        self._waiters = 0
        self._store_writer: int | None = None  # the writer thread, inside a store write
        # The journaled records the store has not taken, in memory, while they
        # are every journal record after _cache_from (else read back from disk).
        self._cache: deque[Entry] = deque()
        # Each cached record's journal line when it is the very text the store
        # would encode (journal.encode_entry), else None: one encode per pixel.
        self._cache_texts: deque[bytes | None] = deque()
        self._cache_from: tuple[str, int] | None = None
        self._cache_epoch = 0
        self._from_cache = True
        self._closing = False
        self._closed = False
        # Both the journal and the store failed the last append: nobody tries
        # again before _next_retry.
        self._stalled = False
        self._next_retry = 0.0
        self._store_failing = False
        self._next_store_try = 0.0
        self._refusing = False
        # When the lingering writer hands the journal to the store (None: it
        # is not lingering), and how many flush() calls wait meanwhile.
        self._store_at: float | None = None
        self._flushing = 0
        self._thread: threading.Thread | None = None
        self._slot: _WriterSlot | None = None
        # What went through the journal since the store failed, for the log.
        self._replayed = 0
        self._failing_since = time.monotonic()

    def _wake_writer(self) -> None:
        """Start or wake the writer thread, which holds this recorder from now
        until it runs out of work; call with the lock held."""
        if self._closed:
            return  # the thread died of a BaseException, or closing is over
        slot = self._slot
        if slot is None or self._thread is None:
            slot = self._slot = _WriterSlot(self)
            self._thread = threading.Thread(
                target=_writer_main,
                args=(slot,),
                name=f"pixel-recorder {self.spool_path.name}",
                daemon=True,
            )
            _process.start_thread(self._thread)
        slot.busy = self
        if not slot.wake.is_set():
            slot.wake.set()

    def _append_queue(self, *, store_fallback: bool = True) -> bool:
        """Journal the queue's oldest batch in one append (else, with
        ``store_fallback``, write it to the store); whether it was kept. Call
        with the lock held and no append under way; the lock is let go
        meanwhile. Without ``store_fallback`` (a fire-and-forget caller, which
        must not wait on the store) a refused batch goes back for the writer
        thread, with no more ado."""
        # At most a batch: one write of bounded size (a queue of 10,000 lines
        # joined at once fragments the heap, and RSS creeps up).
        queue = self._queue
        group = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
        self._appender = threading.get_ident()
        kept = False
        try:
            self._lock.release()
            try:
                kept = self._journal_or_store(group, store_fallback=store_fallback)
            finally:
                self._lock.acquire()
        except BaseException:
            # KeyboardInterrupt, SystemExit, gevent.Timeout in this caller's
            # thread: the group goes back to the head of the queue for another
            # caller or the writer thread. Nobody returns before their record is kept.
            logger.critical(
                "recorder: interrupted journaling %d records; another thread does it", len(group)
            )
            self._queue.extendleft(reversed(group))
            self._appender = None
            self._changed.notify_all()
            self._wake_writer()
            raise
        self._appender = None
        if kept:
            self._queued_count -= len(group)
            self._journaled += len(group)
            self._refusing = False
            if self._stalled:
                self._stalled = False
                logger.warning(
                    "recorder for %s: records are kept again; %d wait in memory",
                    _url(self.store),
                    self._queued_count,
                )
            if self._journaling and (
                self._store_at is None or len(self._journal) >= self.max_batch
            ):
                # It moves the journal to the store (a lingering writer wakes
                # by itself when its time is up or a batch is full: no
                # wake-up a pixel).
                self._wake_writer()
        elif not store_fallback:
            self._queue.extendleft(reversed(group))
            self._wake_writer()  # it tries the store too
        else:
            self._queue.extendleft(reversed(group))
            self._next_retry = time.monotonic() + self.retry_interval
            if not self._stalled:
                self._stalled = True
                logger.error(
                    "recorder for %s: neither the store nor the spool %s takes records;"
                    " %d wait in memory (at most %d), tried again every %gs; pixels that"
                    " cannot be kept within %ss are refused",
                    _url(self.store),
                    self.spool_path,
                    self._queued_count,
                    self.max_pending,
                    self.retry_interval,
                    self.keep_timeout,
                )
        self._changed.notify_all()
        return kept

    def _journal_or_store(self, group: list[_Queued], *, store_fallback: bool = True) -> bool:
        """Append ``group`` to the journal (the cache too), else write it to the
        store directly; whether either took it. Without the lock held."""
        if not self._journaling:
            return self._store_directly([record for record, _, _ in group])
        try:
            name, ends = self._journal.append_lines([line for _, line, _ in group])
        except OSError as exc:
            logger.debug("cannot journal %d records in %s: %s", len(group), self.spool_path, exc)
        else:
            with self._lock:
                cache = self._cache
                if len(cache) + len(group) > self._cache_cap:
                    # Far behind: let the writer read back from the journal
                    # rather than hold everything in memory.
                    cache.clear()
                    self._cache_texts.clear()
                    self._cache_from = (name, ends[-1])
                    self._cache_epoch += 1
                    self._from_cache = False
                else:
                    cache.extend(
                        (record, name, end) for (record, _, _), end in zip(group, ends, strict=True)
                    )
                    # The store may keep an exact line as the record's text.
                    self._cache_texts.extend(
                        line[:-1] if exact else None for _, line, exact in group
                    )
            return True
        # The journal refuses (a full disk, its cap): the caller writes the
        # store itself, out of the journal's order.
        if not store_fallback:
            return False
        return self._store_directly([record for record, _, _ in group])

    def _store_directly(self, records: list[PixelRecord]) -> bool:
        try:
            self._write_store(records, None)
        except Exception as exc:
            logger.debug("store %s fails too: %s", _url(self.store), exc)
            return False
        with self._lock:
            self._done += len(records)
        return True

    # --- the writer thread: from the journal to the store ------------------------

    def _write_step(self, slot: _WriterSlot) -> float | None:
        """The writer thread's one round: move what is due; then how long to
        wait for more (``inf``: until woken), or ``None`` to stop."""
        with self._lock:
            slot.wake.clear()
            closing = self._closing
            linger = self._linger_left(closing, time.monotonic())
        if self._journal.adoption_deferred and time.monotonic() >= self._next_store_try:
            self._adopt_journal()
        stored = self._store_step(closing) if linger == 0 else False
        with self._lock:
            now = time.monotonic()
            callers_append = self.durable and self._waiters > 0
            if (
                self._queue
                and self._appender is None
                and (
                    closing
                    or (self._stalled and now >= self._next_retry)
                    or (not self._stalled and not callers_append)
                )
            ):
                kept = self._append_queue()
                if not kept and closing:
                    self._give_up()
                return 0.0
            if stored:
                return 0.0
            if closing and self._appender is None and not self._queue:
                self._closed = True
                self._changed.notify_all()
                slot.busy = None
                return None
            waits: list[float] = []
            if self._queue:
                if self._stalled:
                    waits.append(self._next_retry - now)
                elif callers_append:
                    waits.append(self.retry_interval)  # woken when one gives up
                else:
                    waits.append(0.0)
            if self._journal.adoption_deferred and not closing:
                waits.append(max(self._next_store_try - now, self.retry_interval))
            if linger > 0:
                waits.append(linger)
            if self._journal_waits() or self._appender is not None:
                # An append under way wakes this thread when it ends.
                waits.append(
                    self._next_store_try - now if self._store_failing else self.retry_interval
                )
            if waits:
                return max(0.0, min(waits))
            slot.busy = None  # idle: let the recorder be freed
            return math.inf

    def _journal_waits(self) -> bool:
        return len(self._journal) > 0

    def _linger_left(self, closing: bool, now: float) -> float:
        """Seconds the writer still lets the journal gather records before its
        next store write; 0: write now. Call with the lock held."""
        if (
            self.linger <= 0
            or closing
            or self._flushing
            or self._store_failing  # retried on its own clock
            or len(self._journal) >= self.max_batch
            or not self._journal_waits()
        ):
            self._store_at = None
            return 0.0
        if self._store_at is None:
            self._store_at = now + self.linger
        left = self._store_at - now
        if left <= 0:
            self._store_at = None
            return 0.0
        return left

    def _store_step(self, closing: bool) -> bool:
        """Hand the journal's oldest batch to the store; whether it moved any."""
        if not self._journal_waits():
            return False
        if self._store_failing and not closing and time.monotonic() < self._next_store_try:
            return False
        with self._lock:
            epoch = self._cache_epoch
            entries: list[Entry] = []
            texts: list[bytes | None] | None = None
            if self._from_cache and self._cache:
                first = self._cache[0][1]
                entries = [e for e in islice(self._cache, self.max_batch) if e[1] == first]
                texts = list(islice(self._cache_texts, len(entries)))
        from_cache = bool(entries)
        if not entries and not self._from_cache:
            try:
                entries = self._journal.peek_entries(self.max_batch, self._cache_from)
            except OSError as exc:
                logger.error("cannot read the spool %s: %s", self.spool_path, exc)
                return self._store_failed(exc, closing)
            if not entries:
                with self._lock:
                    if epoch == self._cache_epoch:
                        self._from_cache = True  # caught up with the cache
                return True
        if not entries:
            return False
        records = [record for record, _, _ in entries]
        _, name, end = entries[-1]
        try:
            self._store_writer = threading.get_ident()
            try:
                self._write_store(records, (name, end), texts)
            finally:
                self._store_writer = None
        except Exception as exc:
            return self._store_failed(exc, closing)
        self._journal.consume_through(name, end, len(entries))
        mine = sum(1 for _, segment, _ in entries if segment.startswith(self._journal.prefix))
        with self._lock:
            if from_cache and epoch == self._cache_epoch:
                for _ in entries:
                    self._cache.popleft()
                    self._cache_texts.popleft()
                self._cache_from = (name, end)  # just before the cache's first record
            self._done += mine
            self._changed.notify_all()
        if self._store_failing:
            self._replayed += len(entries)
            if not self._journal_waits():
                self._store_failing = False
                logger.warning(
                    "spool drained: the store %s took the %d spooled records after %.1fs;"
                    " 0 waiting in %s",
                    _url(self.store),
                    self._replayed,
                    time.monotonic() - self._failing_since,
                    self.spool_path,
                )
        return True

    def _store_failed(self, failure: Exception, closing: bool) -> bool:
        self._next_store_try = time.monotonic() + self.retry_interval
        if not self._store_failing:
            with self._lock:
                self._store_failing = True  # flush() waits no longer
                self._changed.notify_all()
            self._replayed = 0
            self._failing_since = time.monotonic()
            logger.warning(
                "store %s failed (%s): spooling, %d records waiting in %s;"
                " trying the store again every %gs",
                _url(self.store),
                failure,
                len(self._journal),
                self.spool_path,
                self.retry_interval,
            )
        else:
            logger.debug("store %s still fails: %s", _url(self.store), failure)
        if closing:
            with self._lock:
                # The journal keeps them for the next recorder.
                self._done = self._queued - self._queued_count
                self._changed.notify_all()
        return False

    def _write_store(
        self,
        records: Sequence[PixelRecord],
        position: tuple[str, int] | None,
        texts: Sequence[bytes | None] | None = None,
    ) -> None:
        """Write ``records`` (with the journal ``position`` of the last, where the
        store keeps it); records no store can keep are dropped, loudly. Raises
        what the store raised otherwise."""
        try:
            self._store_write(records, position, texts)
            return
        except RecordError:
            pass
        for record in records:
            try:
                self._store_write([record], position)
            except RecordError as exc:
                logger.error("dropping a record no store can keep (%s): %r", exc, record)

    def _store_write(
        self,
        records: Sequence[PixelRecord],
        position: tuple[str, int] | None,
        texts: Sequence[bytes | None] | None = None,
    ) -> None:
        if position is not None and self._write_at is not None:
            if texts is not None and self._takes_texts:
                self._write_at(records, journal_position=position, texts=texts)
            else:
                self._write_at(records, journal_position=position)
        else:
            self.store.write(records)

    def _give_up(self) -> None:
        """Closing, and neither the journal nor the store takes what waits in
        memory: give up on it, loudly. Call with the lock held."""
        lost = len(self._queue)
        self._queue.clear()
        self._queued_count -= lost
        self._done += lost
        self._changed.notify_all()
        logger.critical(
            "recorder for %s closing: neither the store nor the spool %s takes records;"
            " %d records not kept",
            _url(self.store),
            self.spool_path,
            lost,
        )

    def _writer_died(self) -> None:
        """The writer thread dies of a BaseException (SystemExit raised by a
        store, say): whatever waits would wait forever."""
        with self._lock:
            if not self._closed:
                lost = len(self._queue)
                logger.critical("recorder writer stopped: %d queued records not journaled", lost)
                self._closed = True
            self._done = self._queued
            self._changed.notify_all()

    def _adopt_journal(self) -> None:
        try:
            adopted = self._journal.adopt(self._positions)
        except OSError as exc:
            logger.error("cannot adopt old spool files in %s: %s", self.spool_path, exc)
            return
        if self._journal.adoption_deferred:
            self._next_store_try = time.monotonic() + self.retry_interval
        if adopted:
            with self._lock:
                # Older than anything cached: read them and everything after
                # them back from disk, up to the journal's tail as it is now,
                # from where the cache starts again (no append under way, so
                # the cache and the tail agree).
                while self._appender is not None:
                    self._changed.wait()
                self._cache.clear()
                self._cache_texts.clear()
                self._cache_from = self._journal.tail()
                self._cache_epoch += 1
                self._from_cache = False


def _reads_wait_for(store: Store, recorder: Recorder) -> None:
    """Make ``store.read()`` and ``store.clear()`` flush ``recorder`` first.

    Read your writes, as durable recording always gave: a pixel answered 200
    is in the journal, maybe not yet in the store; whoever reads through the
    same store object (the API, a test) sees it all the same, and with a store
    that keeps journal positions also what other live processes journaled
    (:meth:`Recorder._wait_for_other_processes`). Processes that only read see
    what the writer threads have stored, a few milliseconds behind. Waits at
    most ``keep_timeout`` (plus ``OTHER_PROCESSES_WAIT``).
    """
    ref = weakref.ref(recorder)
    for name in ("read", "clear"):
        method = getattr(store, name, None)
        if not callable(method) or getattr(method, "_pixel_flushes", False):
            continue

        def flush_first(
            *args: object, _method: Callable[..., object] = method, **kwargs: object
        ) -> object:
            current = ref()
            # Not while stalled: nothing can be stored then, and every read
            # (each poll of the live page) would wait the whole keep_timeout.
            if current is not None and not current._closed and not current._stalled:
                current.flush(timeout=current.keep_timeout)
                current._wait_for_other_processes()
            return _method(*args, **kwargs)

        flush_first._pixel_flushes = True  # type: ignore[attr-defined]
        # A store with __slots__ keeps its methods: reads see what the writer stored.
        with contextlib.suppress(AttributeError):
            setattr(store, name, flush_first)


def _url(store: Store) -> str:
    return str(getattr(store, "url", type(store).__name__))


def _record_id(record: object) -> object:
    return record.get("id") if isinstance(record, dict) else record


# --- process exit --------------------------------------------------------------


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None, now: float | None = None) -> float | None:
    """Seconds until ``deadline`` (``None``: no deadline)."""
    return None if deadline is None else deadline - (time.monotonic() if now is None else now)


def _has_spool_files(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(entry.name.endswith(".jsonl") for entry in entries)
    except OSError:
        return False


def _writer_main(slot: _WriterSlot) -> None:
    """The background thread: holds the recorder only while it has work."""
    recorder = slot.busy
    if recorder is None:
        return
    if recorder._journaling:
        recorder._adopt_journal()
    while True:
        try:
            wait = recorder._write_step(slot)
        except BaseException:
            recorder._writer_died()
            raise
        del recorder
        if wait is None:
            return
        if wait > 0:
            slot.wake.wait(None if wait == math.inf else wait)
        # No other local may hold the recorder across the wait above.
        recorder = slot.busy or slot.ref()
        if recorder is None:
            return  # freed while idle: nothing was waiting


def _close_all() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    for recorder in list(_LIVE):
        recorder.close(timeout=max(0.0, deadline - time.monotonic()))


def _flush_all() -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    for recorder in list(_LIVE):
        recorder.flush(timeout=max(0.0, deadline - time.monotonic()))


def _after_fork_in_child() -> None:
    # Only the forking thread lives on in a child: the writer thread is
    # gone, and its queue belongs to the parent, which writes it. Start afresh;
    # a thread starts again when the child needs one.
    for recorder in list(_LIVE):
        recorder._reset()
        recorder._journal.forget_after_fork()


def _register_process_hooks() -> None:
    _process.at_exit(_close_all)
    _process.after_fork_in_child(_after_fork_in_child)


def install_signal_flush(signals: Iterable[int] = (signal.SIGTERM,)) -> None:
    """Make ``signals`` (SIGTERM by default) flush every recorder, then exit cleanly.

    If a handler was installed before, it is called after the flush instead of
    exiting, so that a server's own graceful shutdown still runs. Otherwise the
    process exits with status 0 through ``SystemExit``, so ``finally`` blocks
    and exit hooks run (closing the recorders). Call it from the main thread,
    as :func:`signal.signal` requires; calling it again changes nothing.
    """
    for signum in signals:
        previous = signal.getsignal(signum)
        if getattr(previous, "_pixel_flush", False):
            continue
        signal.signal(signum, _flush_handler(previous))


def _flush_handler(previous: object) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        _flush_all()
        if callable(previous):
            previous(signum, frame)
            return
        raise SystemExit(0)

    handler._pixel_flush = True  # type: ignore[attr-defined]
    return handler
