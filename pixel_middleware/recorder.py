"""The one way records travel from request handlers to a store.

Handlers call :meth:`Recorder.record`; whoever writes next takes everything
queued since the last write (up to ``max_batch`` records) and hands it to the
store in one ``write()``: a group commit, so that many concurrent pixels share
the cost of one transaction. With ``durable=True`` the writer is a caller
itself (leader and followers): the first caller to find no write under way
writes the queue, and those arriving meanwhile wait for the next write, which
one of them leads. A lone request thus commits in its own thread, with no
hand-off to another thread and back (two GIL wake-ups that cost more than the
commit). A background thread writes what ``durable=False`` queues and replays
the spool; a write of either kind excludes the others, so order is kept.

Durability, with ``durable=True`` (the default): ``record()`` returns only
once the record is committed, to the store or, while the store fails, to the
spool on local disk. An answer sent after ``record()`` returned therefore means
the event survives the process being killed (``kill -9``); how it fares in a
power loss is the store's ``synchronous``/``fsync`` choice. With
``durable=False`` (fire and forget), ``record()`` returns once the record is
queued: a crash loses what is queued and not yet written (at most
``max_pending`` records, usually only the last few milliseconds' worth), while
a normal exit writes it (see "Exit" below).

Bounded memory: at most ``max_pending`` records wait in memory. When that many
are waiting, ``record()`` blocks until the writer catches up (backpressure);
records are never dropped.

Store failure: when ``store.write()`` raises, the batch goes to the spool
(:mod:`pixel_middleware.spool`, ``spool_path``), and so does every later record
while anything is spooled, which keeps them in order. Every
``retry_interval`` seconds the writer hands the spool's oldest records to the
store again, in batches, and removes them once the store took them. A crash in
the middle of that may hand some records to the store twice: at least once,
never lost. Spool files left by a process that died are adopted by the next
recorder that starts on the same spool directory.

Exit: an ``atexit`` hook flushes and closes every recorder still open.
:func:`install_signal_flush` makes SIGTERM do the same (a server's main
program calls it; the library never takes signal handlers by itself).

Usage::

    recorder = Recorder(open_store("sqlite:///pixels.sqlite3"))
    recorder.record(record)   # committed when it returns
    recorder.close()
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType

from pixel_middleware.core import PixelRecord
from pixel_middleware.spool import Spool
from pixel_middleware.stores import RecordError, Store

__all__ = ["DEFAULT_SPOOL_ROOT", "Recorder", "default_spool_path", "install_signal_flush"]

logger = logging.getLogger(__name__)

#: Where spools go unless ``spool_path`` says otherwise: one directory per
#: store URL under this one, relative to the working directory.
DEFAULT_SPOOL_ROOT = "pixel-spool"

# How long the exit hook and the SIGTERM handler wait for each recorder.
_EXIT_TIMEOUT = 10.0

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
    """Records that will be written together, and the event set once they are."""

    __slots__ = ("done", "records")

    def __init__(self) -> None:
        self.records: list[PixelRecord] = []
        self.done = threading.Event()


class Recorder:
    """Hands records to a store from one writer thread, in group commits.

    :param store: Where the records go; closed by :meth:`close`.
    :param durable: ``True``: :meth:`record` returns once the record is
        committed (to the store, or to the spool while the store fails).
        ``False``: it returns once the record is queued.
    :param max_batch: The most records in one ``store.write()``.
    :param max_pending: The most records waiting in memory; :meth:`record`
        blocks while that many wait.
    :param spool_path: The directory of the spool; by default
        ``./pixel-spool/<hash of the store URL>/`` (:func:`default_spool_path`).
        Recorders of one store in several processes share it (each process
        writes its own file).
    :param retry_interval: Seconds between attempts to hand spooled records
        back to a failing store.
    """

    store: Store

    def __init__(
        self,
        store: Store,
        *,
        durable: bool = True,
        max_batch: int = 500,
        max_pending: int = 10_000,
        spool_path: str | os.PathLike[str] | None = None,
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
        self.store = store
        self.durable = durable
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.retry_interval = float(retry_interval)
        if spool_path is None:
            spool_path = default_spool_path(_url(store))
        self.spool_path = Path(spool_path).absolute()
        self._spool = Spool(self.spool_path)
        self._close_started = False
        self._store_closed = False
        self._reset()
        _LIVE.add(self)
        with self._lock:
            # Started now, not at the first record, so that spool files left
            # by a process that died are handed on even if no pixel comes.
            self._start()

    def __repr__(self) -> str:
        return f"Recorder({self.store!r}, durable={self.durable})"

    @property
    def spooled(self) -> int:
        """The number of records waiting in the spool for the store to recover."""
        return len(self._spool)

    def record(self, record: PixelRecord) -> None:
        """Queue ``record`` for the store; with ``durable``, wait until it is committed.

        Never raises: a problem is logged. Blocks while ``max_pending``
        records wait. After :meth:`close`, the record is not kept and an error
        is logged.
        """
        try:
            with self._lock:
                while self._pending >= self.max_pending and not self._closed:
                    self._space.wait()
                if self._closed:
                    logger.error(
                        "recorder for %s is closed: record %s not kept",
                        _url(self.store),
                        _record_id(record),
                    )
                    return
                if self._thread is None:
                    self._start()  # the first record in a forked child
                batch = self._enqueue(record)
                if not self.durable:
                    return
            self._commit_as_leader(batch)
        except Exception:
            logger.exception("recording %s failed", _record_id(record))

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
            if self._closed or self._pending >= self.max_pending or self._thread is None:
                return False
            self._enqueue(record)
        return True

    def _enqueue(self, record: PixelRecord) -> _Batch:
        """Add ``record`` to the newest batch with room; call with the lock held.

        Fire and forget: the writer thread is woken. Durable: the caller leads
        (or follows) the commit itself.
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
            self._work.notify()
        return batch

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is committed (to the store or spool).

        ``True`` when they are; ``False`` when ``timeout`` seconds passed first.
        """
        with self._lock:
            if self._writer == threading.get_ident():
                return False  # called from within this thread's own write (a signal handler)
            last = self._batches[-1] if self._batches else self._inflight
        return True if last is None else last.done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the writer and close the store; idempotent.

        Waits up to ``timeout`` seconds (``None``: as long as it takes) for the
        queue to be written; if it is not, logs how many records are still
        waiting and leaves the store open for the writer, which goes on trying.
        """
        with self._lock:
            self._close_started = True
            self._closing = True
            self._work.notify()
            thread = self._thread
            if thread is None:
                self._closed = True
                self._space.notify_all()
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

    # --- the writer thread ---------------------------------------------------

    def _reset(self) -> None:
        """The in-memory state, fresh (at construction, and in a forked child)."""
        # Reentrant, for the SIGTERM handler's flush interrupting record().
        self._lock = threading.RLock()
        self._work = threading.Condition(self._lock)  # the writer waits for records
        self._space = threading.Condition(self._lock)  # record() waits for room
        self._written = threading.Condition(self._lock)  # a write ended
        self._writer: int | None = None  # the thread writing to the store or spool now
        self._batches: deque[_Batch] = deque()
        self._inflight: _Batch | None = None
        self._pending = 0  # records queued or being written
        self._closing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # What went through the spool since it was last empty, for the log.
        self._replayed = 0
        self._spooling_since = time.monotonic()

    def _start(self) -> None:
        """Start the writer; call with the lock held."""
        self._thread = threading.Thread(
            target=self._run, name=f"pixel-recorder {self.spool_path.name}", daemon=True
        )
        self._thread.start()

    def _claim(self) -> None:
        """Become the one thread writing; call with the lock held."""
        while self._writer is not None:
            self._written.wait()
        self._writer = threading.get_ident()

    def _release(self, batch: _Batch | None) -> None:
        """End a write begun by :meth:`_claim`; call with the lock held."""
        if batch is not None:
            self._pending -= len(batch.records)
            self._inflight = None
            self._space.notify(len(batch.records))
            batch.done.set()
        self._writer = None
        self._written.notify_all()

    def _commit_as_leader(self, batch: _Batch) -> None:
        """Return once ``batch`` is committed, writing the queue's head ourselves
        whenever no other thread is writing."""
        while True:
            with self._lock:
                while self._writer is not None and not batch.done.is_set():
                    self._written.wait()
                if batch.done.is_set():
                    return
                # Not written and nobody writing: it is still queued, and every
                # batch ahead of it goes first, which keeps the order.
                self._writer = threading.get_ident()
                head = self._batches.popleft()
                self._inflight = head
            try:
                self._commit(head.records)
            except Exception:
                logger.exception("recorder: %d records may be lost", len(head.records))
            except BaseException:
                # SystemExit or KeyboardInterrupt in this caller's thread: it
                # goes on up, and nobody may wait for a write that never ends.
                logger.critical("recorder: interrupted; %d records not kept", len(head.records))
                raise
            finally:
                with self._lock:
                    self._release(head)

    def _run(self) -> None:
        try:
            self._write_until_closed()
        finally:
            with self._lock:
                if not self._closed:
                    # Only a BaseException (SystemExit raised by a store, say)
                    # gets here: whatever waits would wait forever.
                    lost = sum(len(batch.records) for batch in self._batches)
                    logger.critical("recorder writer stopped: %d queued records not kept", lost)
                    self._closed = True
                    self._space.notify_all()
                waiting, self._batches = list(self._batches), deque()
                for batch in waiting:
                    batch.done.set()
                self._written.notify_all()

    def _write_until_closed(self) -> None:
        try:
            self._spool.adopt()
        except OSError as exc:
            logger.error("cannot adopt old spool files in %s: %s", self.spool_path, exc)
        next_retry = 0.0  # when to hand the spool to the store again
        gave_up_closing = False
        while True:
            with self._lock:
                while not self._batches and not self._closing:
                    if not self._spooled():
                        self._work.wait()
                        continue
                    delay = next_retry - time.monotonic()
                    if delay <= 0:
                        break
                    self._work.wait(delay)
                # Durable callers write too: wait until none is writing.
                self._claim()
                batch = self._batches.popleft() if self._batches else None
                self._inflight = batch
                if batch is None and self._closing and (gave_up_closing or not self._spooled()):
                    self._closed = True
                    self._space.notify_all()
                    self._release(None)
                    return
            try:
                if batch is not None:
                    try:
                        self._commit(batch.records)
                    except Exception:
                        # A bug, not a store failure (those are handled inside):
                        # say so loudly, but never leave record() waiting forever.
                        logger.exception("recorder: %d records may be lost", len(batch.records))
                # Closing tries the spool once at once instead of waiting (and
                # spinning) until the next retry is due.
                if self._spooled() and (self._closing or time.monotonic() >= next_retry):
                    try:
                        replayed = self._replay()
                    except Exception:
                        logger.exception("recorder: replaying the spool %s failed", self.spool_path)
                        replayed = False
                    if not replayed:
                        next_retry = time.monotonic() + self.retry_interval
                        gave_up_closing = self._closing
            finally:
                with self._lock:
                    self._release(batch)

    def _spooled(self) -> bool:
        return len(self._spool) > 0

    def _commit(self, records: Sequence[PixelRecord]) -> None:
        """Keep ``records`` in the store, else in the spool; returns once they are kept."""
        while True:
            failure: Exception | None = None
            if not self._spooled():
                try:
                    self.store.write(records)
                    return
                except RecordError:
                    records, failure = self._write_one_by_one(records)
                    if not records:
                        return
                except Exception as exc:
                    failure = exc
            try:
                self._append_to_spool(records)
            except OSError as exc:
                # Neither the store nor the disk: keep the batch in memory (new
                # records wait behind it, up to max_pending) and try both again.
                logger.error(
                    "cannot spool %d records to %s either (%s); trying again in %gs",
                    len(records),
                    self.spool_path,
                    exc,
                    self.retry_interval,
                )
                time.sleep(self.retry_interval)
                continue
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
                    # A durable caller may have spooled: the writer thread,
                    # which replays, must start counting to its next retry.
                    self._work.notify()
            return

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


def _close_all() -> None:
    for recorder in list(_LIVE):
        recorder.close(timeout=_EXIT_TIMEOUT)


def _flush_all() -> None:
    for recorder in list(_LIVE):
        recorder.flush(timeout=_EXIT_TIMEOUT)


def _after_fork_in_child() -> None:
    # Only the forking thread lives on in a child: the writer is gone, and its
    # queue belongs to the parent, which writes it. Start afresh; the writer
    # starts again at the child's first record.
    for recorder in list(_LIVE):
        recorder._reset()
        recorder._spool.forget_after_fork()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)


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
