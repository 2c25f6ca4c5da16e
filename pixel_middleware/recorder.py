"""The one way records travel from request handlers to a store.

Handlers call :meth:`Recorder.record`; whoever writes next takes everything
queued since the last write (up to ``max_batch`` records) and hands it to the
store in one ``write()``: a group commit, so that many concurrent pixels share
the cost of one transaction. With ``durable=True`` the writers are the callers
themselves (leader and followers): the first caller to find no write under way
writes the queue's oldest batch, and those arriving meanwhile wait for the
next write, which one of them leads. A lone request thus commits in its own
thread, with no hand-off to another thread and back (two GIL wake-ups that
cost more than the commit). A background thread writes what ``durable=False``
queues, replays the spool, retries while the store and the spool both fail,
and writes what callers left behind (one that gave up waiting, or was
interrupted). Many threads may write, but only one at a time, so order is
kept.

Durability, with ``durable=True`` (the default): ``record()`` returns ``True``
only once the record is committed, to the store or, while the store fails, to
the spool on local disk. An answer sent after that therefore means the event
survives the process being killed (``kill -9``); how it fares in a power loss
is the store's ``synchronous``/``fsync`` choice. With ``durable=False`` (fire
and forget), ``record()`` returns ``True`` once the record is queued: a crash
loses what is queued and not yet written (at most ``max_pending`` records,
usually only the last few milliseconds' worth), while a normal exit writes it
(see "Exit" below).

Bounded waits: ``record()`` waits at most ``keep_timeout`` seconds (for room in
the queue, and with ``durable`` for the commit), then returns ``False``: the
record is not kept yet. When the store and the spool both fail (a full disk)
that answer comes at once. A record that was queued stays queued and is
written once the store or the disk recovers (at least once: a client that
sends the pixel again then has it twice, with the same ``messageId``). The one
wait it does not cut short is a store write the caller itself is making; the
stores bound those with their own timeouts.

Bounded memory: at most ``max_pending`` records wait in memory; records are
never dropped to make room.

Store failure: when ``store.write()`` raises, the batch goes to the spool
(:mod:`pixel_middleware.spool`, ``spool_path``, at most ``spool_max_bytes``),
and so does every later record while anything is spooled, which keeps them in
order. Every ``retry_interval`` seconds the background thread hands the
spool's oldest records to the store again, in batches, and removes them once
the store took them. A crash in the middle of that may hand some records to
the store twice: at least once, never lost. When the spool refuses too (full
disk, its cap), batches stay in memory and are tried again every
``retry_interval`` seconds.

Threads: none until needed. The background thread starts at the first
``durable=False`` record, the first time a durable caller needs it (a spooled
record to replay, a batch left behind), at :meth:`close` if anything waits,
and at construction when the spool directory holds files, so that the spool
files left by a process that died are handed on even if no pixel comes. It
holds its recorder only while records wait (queued or spooled): an idle
recorder that nobody references is freed, and its thread ends.

Exit: at interpreter exit every recorder still open is flushed and closed
(within ``EXIT_TIMEOUT`` seconds in all). :func:`install_signal_flush` makes
SIGTERM flush too (a server's main program calls it; the library never takes
signal handlers by itself).

Usage::

    recorder = Recorder(open_store("sqlite:///pixels.sqlite3"))
    kept = recorder.record(record)   # True: committed when it returns
    recorder.close()
"""

from __future__ import annotations

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
from pathlib import Path
from types import FrameType

from pixel_middleware import _process
from pixel_middleware.core import PixelRecord
from pixel_middleware.spool import DEFAULT_MAX_BYTES, Spool
from pixel_middleware.stores import RecordError, Store, store_identity

__all__ = [
    "DEFAULT_SPOOL_ROOT",
    "EXIT_TIMEOUT",
    "Recorder",
    "default_spool_path",
    "install_signal_flush",
]

logger = logging.getLogger(__name__)

#: Where spools go unless ``spool_path`` says otherwise: one directory per
#: store URL under this one, relative to the working directory.
DEFAULT_SPOOL_ROOT = "pixel-spool"

#: Seconds the exit hook and the SIGTERM handler wait for all recorders together.
EXIT_TIMEOUT = 10.0

# Every recorder not closed yet, held weakly: the exit and fork hooks' list.
_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()


def default_spool_path(store_url: str) -> Path:
    """The spool directory a :class:`Recorder` uses for ``store_url`` by default.

    ``pixel-spool/<first 16 hex digits of the URL's SHA-256>``, relative to the
    working directory: one spool per store, and no file path or password from
    the URL in the directory's name. Read it with
    :func:`~pixel_middleware.spool.count_spooled` to see how many records wait.
    """
    return Path(DEFAULT_SPOOL_ROOT, hashlib.sha256(store_url.encode()).hexdigest()[:16])


class _Batch:
    """Records that will be written together; ``done`` is set once they are
    written or given up on, and ``kept`` says which."""

    __slots__ = ("done", "kept", "records")

    def __init__(self) -> None:
        self.records: list[PixelRecord] = []
        self.done = threading.Event()
        self.kept = False


class _WriterSlot:
    """What the background thread holds: its recorder weakly, and strongly
    (``busy``) only while records wait, so that an idle recorder can be freed.
    ``wake`` is set when there is work (and when the recorder is freed)."""

    __slots__ = ("busy", "ref", "wake")

    def __init__(self, recorder: Recorder) -> None:
        wake = self.wake = threading.Event()
        self.ref = weakref.ref(recorder, lambda _: wake.set())
        self.busy: Recorder | None = recorder


class Recorder:
    """Hands records to a store in group commits (see the module documentation).

    :param store: Where the records go; closed by :meth:`close`.
    :param durable: ``True``: :meth:`record` returns ``True`` once the record
        is committed (to the store, or to the spool while the store fails).
        ``False``: once the record is queued.
    :param max_batch: The most records in one ``store.write()``.
    :param max_pending: The most records waiting in memory; :meth:`record`
        waits (up to ``keep_timeout``) while that many wait.
    :param keep_timeout: The most seconds :meth:`record` waits before it
        returns ``False`` (not kept yet); ``None`` waits as long as it takes.
    :param spool_path: The directory of the spool; by default
        ``./pixel-spool/<hash of the store URL>/`` (:func:`default_spool_path`).
        Recorders of one store in several processes share it (each process
        writes its own file).
    :param spool_max_bytes: The most bytes the spool's files may hold on disk
        (1 GiB by default; ``None``: no cap). Past it, records wait in memory.
    :param retry_interval: Seconds between attempts to hand spooled records
        back to a failing store, or to keep records when the spool fails too.
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
        retry_interval: float = 1.0,
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
        if keep_timeout is not None and (
            isinstance(keep_timeout, bool) or not 0 < keep_timeout < math.inf
        ):
            raise ValueError(
                f"Recorder: keep_timeout must be more than 0 seconds or None, got {keep_timeout!r}"
            )
        self.store = store
        self.durable = durable
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.keep_timeout = None if keep_timeout is None else float(keep_timeout)
        self.retry_interval = float(retry_interval)
        if spool_path is None:
            spool_path = default_spool_path(store_identity(store))
        self.spool_path = Path(spool_path).absolute()
        try:
            self._spool = Spool(self.spool_path, max_bytes=spool_max_bytes)
        except ValueError as exc:
            raise ValueError(f"Recorder: spool_max_bytes: {exc}") from None
        self._store_closed = False
        self._reset()
        _register_process_hooks()
        _LIVE.add(self)
        if _has_spool_files(self.spool_path):
            with self._lock:
                # Left by a process that died: hand them on even if no pixel comes.
                self._wake_writer()

    def __repr__(self) -> str:
        return f"Recorder({self.store!r}, durable={self.durable})"

    @property
    def spooled(self) -> int:
        """The number of records waiting in the spool for the store to recover.

        Never waits for a write under way (it reads the spool's counter).
        """
        return len(self._spool)

    @property
    def stalled(self) -> bool:
        """Whether neither the store nor the spool took the last write (a full
        disk, a store that refuses writes): records wait in memory, and pixels
        not kept within ``keep_timeout`` are refused, until one takes them again.

        Never waits (one attribute read, which the GIL makes whole).
        """
        return self._stalled

    def record(self, record: PixelRecord) -> bool:
        """Queue ``record`` for the store; with ``durable``, wait until it is committed.

        ``True``: committed (``durable``) or queued (fire and forget).
        ``False``: not kept within ``keep_timeout`` seconds, or the recorder is
        closed; a record that was queued is still written when the store or
        the disk recovers. Never raises: a problem is logged.
        """
        try:
            deadline = None if self.keep_timeout is None else time.monotonic() + self.keep_timeout
            with self._lock:
                while self._pending >= self.max_pending and not self._closed:
                    wait = _left(deadline)
                    if wait is not None and wait <= 0:
                        self._refused(record, f"{self._pending} records already wait")
                        return False
                    self._space.wait(wait)
                if self._closed:
                    logger.error(
                        "recorder for %s is closed: record %s not kept",
                        _url(self.store),
                        _record_id(record),
                    )
                    return False
                batch = self._enqueue(record)
                if not self.durable:
                    return True
            if self._commit_as_leader(batch, deadline):
                return True
            with self._lock:
                self._refused(record, "not committed: the store and spool fail, or it was slow")
            return False
        except Exception:
            logger.exception("recording %s failed", _record_id(record))
            return False

    def offer(self, record: PixelRecord) -> bool:
        """Queue ``record`` if that needs no waiting; ``False`` (nothing queued) otherwise.

        For callers that must not block, such as an event loop: with
        ``durable=False`` and room in the queue the record is queued at once;
        when the queue is full, or the recorder is durable (the caller would
        wait for the commit), or closed, it returns ``False`` and the caller
        hands the record to :meth:`record` from a thread instead.
        """
        if self.durable:
            return False
        with self._lock:
            if self._closed or self._pending >= self.max_pending:
                return False
            self._enqueue(record)
        return True

    def _enqueue(self, record: PixelRecord) -> _Batch:
        """Add ``record`` to the newest batch with room; call with the lock held.

        Fire and forget: the background thread is woken. Durable: the caller
        leads (or follows) the commit itself.
        """
        batches = self._batches
        if batches and len(batches[-1].records) < self.max_batch:
            batch = batches[-1]
        else:
            batch = _Batch()
            batches.append(batch)
        batch.records.append(record)
        self._pending += 1
        if not self.durable:
            self._wake_writer()
        return batch

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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is written or given up on.

        ``True`` when they are; ``False`` when ``timeout`` seconds passed first.
        """
        with self._lock:
            if self._writer == threading.get_ident():
                return False  # called from within this thread's own write (a signal handler)
            last = self._batches[-1] if self._batches else self._inflight
            if last is not None:
                self._wake_writer()  # a batch a caller left behind has no other writer
        return True if last is None else last.done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the background thread and close the store; idempotent.

        Waits up to ``timeout`` seconds (``None``: as long as it takes) for the
        queue to be written. Each waiting batch gets one more attempt, at once;
        what neither the store nor the spool takes then is given up (logged
        with the count). If the time runs out first (a store write that hangs),
        it logs how many records are still waiting and leaves the store open
        for the thread, which goes on trying.
        """
        with self._lock:
            self._closing = True
            if self._batches or self._spooled() or self._thread is not None:
                self._wake_writer()
            else:
                self._closed = True
                self._space.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.error(
                    "recorder for %s: %d records still not written after %ss of closing",
                    _url(self.store),
                    self._pending,
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
        self._spool.close()
        _LIVE.discard(self)

    # --- writing ---------------------------------------------------------------

    def _reset(self) -> None:
        """The in-memory state, fresh (at construction, and in a forked child)."""
        # Reentrant, for the SIGTERM handler's flush interrupting record().
        self._lock = threading.RLock()
        self._space = threading.Condition(self._lock)  # record() waits for room
        self._written = threading.Condition(self._lock)  # a write ended
        self._writer: int | None = None  # the thread writing to the store or spool now
        self._batches: deque[_Batch] = deque()
        self._inflight: _Batch | None = None
        self._pending = 0  # records queued or being written
        self._closing = False
        self._closed = False
        self._gave_up_closing = False
        # Both the store and the spool failed the last write: nobody writes
        # again before _next_retry, which is also when the spool is replayed.
        self._stalled = False
        self._next_retry = 0.0
        self._refusing = False
        self._thread: threading.Thread | None = None
        self._slot: _WriterSlot | None = None
        # What went through the spool since it was last empty, for the log.
        self._replayed = 0
        self._spooling_since = time.monotonic()

    def _wake_writer(self) -> None:
        """Start or wake the background thread, which holds this recorder from now
        until it runs out of work; call with the lock held."""
        if self._closed:
            return  # the thread died of a BaseException, or closing is over
        if self._slot is None or self._thread is None:
            self._slot = _WriterSlot(self)
            self._thread = threading.Thread(
                target=_writer_main,
                args=(self._slot,),
                name=f"pixel-recorder {self.spool_path.name}",
                daemon=True,
            )
            self._thread.start()
        self._slot.busy = self
        self._slot.wake.set()

    def _claim(self) -> None:
        """Become the one thread writing; call with the lock held."""
        while self._writer is not None:
            self._written.wait()
        self._writer = threading.get_ident()

    def _finish(self, batch: _Batch | None, rest: list[PixelRecord] | None) -> None:
        """End a write; call with the lock held.

        ``rest``: the records of ``batch`` neither the store nor the spool took
        (``[]``: all kept; ``None``: given up on, by a bug or while closing).
        Untaken records go back to the head of the queue, and until
        ``_next_retry`` nobody tries again.
        """
        if batch is not None:
            self._inflight = None
            taken = len(batch.records) - (len(rest) if rest else 0)
            if rest:
                self._pending -= taken
                batch.records = rest
                self._batches.appendleft(batch)
                self._next_retry = time.monotonic() + self.retry_interval
                self._wake_writer()
            else:
                self._pending -= len(batch.records)
                batch.kept = rest is not None
                batch.done.set()
                if batch.kept:
                    self._refusing = False
                    if self._stalled:
                        logger.warning(
                            "recorder for %s: records are kept again; %d wait in memory",
                            _url(self.store),
                            self._pending,
                        )
            self._space.notify(max(taken, 1))
            self._stalled_now(bool(rest))
        self._writer = None
        self._written.notify_all()

    def _stalled_now(self, stalled: bool) -> None:
        if stalled and not self._stalled:
            logger.error(
                "recorder for %s: neither the store nor the spool %s takes records;"
                " %d wait in memory (at most %d), tried again every %gs; pixels that"
                " cannot be kept within %ss are refused",
                _url(self.store),
                self.spool_path,
                self._pending,
                self.max_pending,
                self.retry_interval,
                self.keep_timeout,
            )
        self._stalled = stalled

    def _commit_as_leader(self, batch: _Batch, deadline: float | None) -> bool:
        """Wait until ``batch`` is kept, writing the queue's head ourselves whenever
        no other thread is writing; ``False`` at ``deadline`` or when given up."""
        while True:
            with self._lock:
                while not batch.done.is_set():
                    now = time.monotonic()
                    retry_in = self._next_retry - now if self._stalled else 0.0
                    if self._writer is None and retry_in <= 0:
                        break  # our turn to write
                    wait = _left(deadline, now)
                    if wait is not None and wait <= 0:
                        # Left queued: the background thread writes it.
                        self._wake_writer()
                        return False
                    if self._writer is None:
                        wait = retry_in if wait is None else min(wait, retry_in)
                    self._written.wait(wait)
                if batch.done.is_set():
                    return batch.kept
                # Not written and nobody writing: it is still queued, and every
                # batch ahead of it goes first, which keeps the order.
                self._writer = threading.get_ident()
                head = self._batches.popleft()
                self._inflight = head
            rest: list[PixelRecord] | None
            try:
                rest = self._commit(head.records)
            except Exception:
                logger.exception("recorder: %d records may be lost", len(head.records))
                rest = None
            except BaseException:
                # KeyboardInterrupt, SystemExit, gevent.Timeout in this caller's
                # thread: it goes on up, and the batch goes back to the head of
                # the queue for another caller or the background thread to
                # write. Nobody returns before their own record is kept.
                logger.critical(
                    "recorder: interrupted writing %d records; another thread writes them",
                    len(head.records),
                )
                with self._lock:
                    self._inflight = None
                    self._batches.appendleft(head)
                    self._writer = None
                    self._written.notify_all()
                    self._wake_writer()
                raise
            with self._lock:
                self._finish(head, rest)
            if rest:
                # Neither the store nor the spool took the head of the queue,
                # which is or is ahead of ours: say so at once. The background
                # thread keeps trying it.
                return False

    def _write_step(self, slot: _WriterSlot) -> float | None:
        """The background thread's one round: write what is due; then how long to
        wait for more (``inf``: until woken), or ``None`` to stop."""
        with self._lock:
            slot.wake.clear()
            now = time.monotonic()
            closing = self._closing
            retry_due = now >= self._next_retry
            if not closing:
                if self._batches:
                    due = not self._stalled or retry_due
                else:
                    due = self._spooled() and retry_due
                if not due:
                    if self._batches or self._spooled():
                        return self._next_retry - now
                    slot.busy = None  # idle: let the recorder be freed
                    return math.inf
            self._claim()
            batch = self._batches.popleft() if self._batches else None
            self._inflight = batch
            if batch is None and closing and (self._gave_up_closing or not self._spooled()):
                self._closed = True
                self._space.notify_all()
                self._finish(None, None)
                slot.busy = None
                return None
        rest: list[PixelRecord] | None = []
        try:
            # The spool first: its records are older than any batch, and a full
            # spool takes the batch only once the store took some of it.
            # Closing tries it once at once instead of waiting (and spinning)
            # until the next retry is due.
            if self._spooled() and (closing or time.monotonic() >= self._next_retry):
                try:
                    replayed = self._replay()
                except Exception:
                    logger.exception("recorder: replaying the spool %s failed", self.spool_path)
                    replayed = False
                if not replayed:
                    with self._lock:
                        self._next_retry = time.monotonic() + self.retry_interval
                        self._gave_up_closing = closing
            if batch is not None:
                try:
                    rest = self._commit(batch.records)
                except Exception:
                    # A bug, not a store failure (those are handled inside):
                    # say so loudly, but never leave record() waiting forever.
                    logger.exception("recorder: %d records may be lost", len(batch.records))
                    rest = None
                if rest and closing:
                    self._give_up(batch, rest)
                    rest = None
        finally:
            with self._lock:
                self._finish(batch, rest)
        return 0.0

    def _give_up(self, batch: _Batch, rest: list[PixelRecord]) -> None:
        """Closing, and neither the store nor the spool takes ``rest``: give up on
        it and on everything queued behind it, loudly."""
        with self._lock:
            waiting, self._batches = list(self._batches), deque()
            lost = len(rest) + sum(len(other.records) for other in waiting)
            for other in waiting:
                self._pending -= len(other.records)
                other.done.set()
            self._gave_up_closing = True
        logger.critical(
            "recorder for %s closing: neither the store nor the spool %s takes records;"
            " %d records not kept",
            _url(self.store),
            self.spool_path,
            lost,
        )

    def _writer_died(self) -> None:
        """The background thread dies of a BaseException (SystemExit raised by a
        store, say): whatever waits would wait forever."""
        with self._lock:
            if not self._closed:
                lost = sum(len(batch.records) for batch in self._batches)
                logger.critical("recorder writer stopped: %d queued records not kept", lost)
                self._closed = True
                self._space.notify_all()
            waiting, self._batches = list(self._batches), deque()
            for batch in waiting:
                batch.done.set()
            if self._writer == threading.get_ident():
                self._writer = None
            self._written.notify_all()

    def _adopt_spool(self) -> None:
        try:
            if self._spool.adopt():
                with self._lock:
                    self._spooling_since = time.monotonic()
        except OSError as exc:
            logger.error("cannot adopt old spool files in %s: %s", self.spool_path, exc)

    def _spooled(self) -> bool:
        return len(self._spool) > 0

    def _commit(self, records: Sequence[PixelRecord]) -> list[PixelRecord]:
        """Keep ``records`` in the store, else in the spool; the ones neither took."""
        failure: Exception | None = None
        if not self._spooled():
            try:
                self.store.write(records)
                return []
            except RecordError:
                records, failure = self._write_one_by_one(records)
                if not records:
                    return []
            except Exception as exc:
                failure = exc
        try:
            self._append_to_spool(records)
        except OSError as exc:
            logger.debug("cannot spool %d records to %s: %s", len(records), self.spool_path, exc)
            return list(records)
        if failure is not None:
            self._replayed = 0
            self._spooling_since = time.monotonic()
            logger.warning(
                "store %s failed (%s): spooling, %d records waiting in %s;"
                " trying the store again every %gs",
                _url(self.store),
                failure,
                len(self._spool),
                self.spool_path,
                self.retry_interval,
            )
            with self._lock:
                # The background thread, which replays, must start counting to
                # its next retry.
                self._next_retry = time.monotonic() + self.retry_interval
                self._wake_writer()
        return []

    def _append_to_spool(self, records: Sequence[PixelRecord]) -> None:
        try:
            self._spool.append(records)
        except RecordError:
            for record in records:
                try:
                    self._spool.append([record])
                except RecordError as exc:
                    logger.error("dropping a record no store can keep (%s): %r", exc, record)

    def _write_one_by_one(
        self, records: Sequence[PixelRecord]
    ) -> tuple[list[PixelRecord], Exception | None]:
        """After a RecordError, write each record alone, dropping those no store can
        keep; returns the records from the first other failure on, and that failure."""
        for index, record in enumerate(records):
            try:
                self.store.write([record])
            except RecordError as exc:
                logger.error("dropping a record no store can keep (%s): %r", exc, record)
            except Exception as exc:
                return list(records[index:]), exc
        return [], None

    def _replay(self) -> bool:
        """Hand the spool's oldest batch to the store; False if the store still fails."""
        try:
            records = self._spool.peek(self.max_batch)
        except OSError as exc:
            logger.error("cannot read the spool %s: %s", self.spool_path, exc)
            return False
        if not records:
            return True
        try:
            self.store.write(records)
        except RecordError:
            rest, _ = self._write_one_by_one(records)
            self._spool.consume(len(records) - len(rest))
            if rest:
                return False
        except Exception as exc:
            logger.debug("store %s still fails: %s", _url(self.store), exc)
            return False
        else:
            self._spool.consume(len(records))
        self._replayed += len(records)
        if not self._spooled():
            logger.warning(
                "spool drained: the store %s took the %d spooled records after %.1fs;"
                " 0 waiting in %s",
                _url(self.store),
                self._replayed,
                time.monotonic() - self._spooling_since,
                self.spool_path,
            )
        return True


def _url(store: Store) -> str:
    return str(getattr(store, "url", type(store).__name__))


def _record_id(record: object) -> object:
    return record.get("id") if isinstance(record, dict) else record


# --- process exit --------------------------------------------------------------


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
    recorder._adopt_spool()
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
    # Only the forking thread lives on in a child: the background thread is
    # gone, and its queue belongs to the parent, which writes it. Start afresh;
    # a thread starts again when the child needs one.
    for recorder in list(_LIVE):
        recorder._reset()
        recorder._spool.forget_after_fork()


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
