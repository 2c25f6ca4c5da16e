"""The recorder's spool: records kept on local disk while the store fails.

A spool is a directory of files of JSON lines, one record per line. Each
process appends to its own file, ``<pid>-<random>.jsonl``, which it holds an
exclusive ``flock`` on for as long as it lives; every append is fsync'd before
it returns, since a spooled record has been promised to survive. A file whose
lock can be taken belongs to a process that is gone: a spool opened on the
same directory adopts it and hands its records on first.

Reading is peek-then-consume: :meth:`Spool.peek` gives the oldest records,
and :meth:`Spool.consume` drops them once the store has taken them. A file is
removed when all its records are consumed, and :meth:`Spool.close` rewrites a
partly consumed one without its consumed records. A process that dies in
between (without closing) leaves the file whole, and the records it had
already handed on go to the store again: at least once, never lost.

Files are made under a ``.new`` name and renamed only once locked and
complete, so an adopter never mistakes a file being made for an orphan.

A spool has a size cap, ``max_bytes`` (1 GiB by default): the bytes of its
files on disk, adopted ones included. An append that would go over it raises
:class:`SpoolFullError` (an ``OSError``, as a full disk would) and logs one
ERROR line when the cap is first reached; space comes back as records are
handed on and files removed.

A :class:`Spool` is thread-safe: the recorder's request threads (durable
callers write themselves) and its background thread all use it, one
operation at a time under the spool's lock. ``len()`` reads a counter and
never waits for that lock, so it answers at once even while an append hangs
on a dying disk. :func:`count_spooled` counts the records of a spool directory
from any process, without taking or locking anything (``pixel-middleware
events`` and ``serve`` use it to say how many wait).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "SpoolFullError", "count_spooled"]

logger = logging.getLogger(__name__)

_BLOCK = 256 * 1024
# A half-made spool file older than this (seconds) and unlocked was left by a
# process that died making it.
_ABANDONED_AFTER = 60.0

#: The default cap on a spool's files on disk, in bytes: 1 GiB.
DEFAULT_MAX_BYTES = 1 << 30


class SpoolFullError(OSError):
    """The spool holds ``max_bytes`` already: nothing more is added until records
    are handed on. An ``OSError``, like the full disk it stands in for."""


class _SpoolFile:
    """One file of the spool, locked by this process, read from ``offset``."""

    __slots__ = ("count", "fd", "offset", "path", "size")

    def __init__(self, path: Path, fd: int, count: int, size: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.offset = 0  # where the oldest record not yet consumed starts
        self.count = count  # records from `offset` on
        self.size = size  # bytes in the file, consumed ones included


class Spool:
    """Records waiting on disk, oldest first, in the directory ``directory``.

    Usage::

        spool = Spool("pixel-spool/store")
        spool.adopt()                 # files left by processes that are gone
        spool.append(records)         # durable when it returns
        batch = spool.peek(500)
        store.write(batch)
        spool.consume(len(batch))

    The directory is created on the first append (or adoption finds nothing).

    :param max_bytes: The most bytes its files may hold on disk (``None``: no
        cap); an append that would go over raises :class:`SpoolFullError`.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, max_bytes: int | None = DEFAULT_MAX_BYTES
    ) -> None:
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ValueError(
                f"Spool: max_bytes must be a whole number of 1 or more or None, got {max_bytes!r}"
            )
        self.directory = Path(directory).absolute()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # one operation at a time
        # Adopted files first (they are older), this process's own file last.
        self._files: list[_SpoolFile] = []
        self._own: _SpoolFile | None = None
        self._peeked: list[int] = []  # end offsets of the records peek() returned
        # Records waiting (after close(): left on disk for the next spool). Kept
        # up to date by every operation, so that len() never takes the lock.
        self._count = 0
        self._full = False  # the cap was reached and said so in the log

    def __len__(self) -> int:
        """The number of records waiting (after :meth:`close`: left on disk).

        Never waits: it reads a counter, also while another thread's append or
        read is under way (it then counts what that operation has not finished).
        """
        return self._count

    @property
    def size(self) -> int:
        """The bytes of this spool's files on disk (what ``max_bytes`` caps)."""
        return sum(file.size for file in list(self._files))

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r}, {len(self)} records)"

    def append(self, records: Sequence[PixelRecord]) -> None:
        """Add ``records`` after all others; on disk and synced when it returns.

        Raises ``OSError`` (nothing added) when the disk refuses, and
        :class:`~pixel_middleware.stores.RecordError` (nothing added) for a
        record that cannot be written as JSON.
        """
        if not records:
            return
        data = b"".join(_line(record) for record in records)
        with self._lock:
            if self.max_bytes is not None and self.size + len(data) > self.max_bytes:
                if not self._full:
                    self._full = True
                    logger.error(
                        "spool %s is full (%d bytes, the cap is %d): records that fail to"
                        " reach the store can no longer be spooled until it takes some",
                        self.directory,
                        self.size,
                        self.max_bytes,
                    )
                raise SpoolFullError(
                    f"the spool {self.directory} holds its cap of {self.max_bytes} bytes"
                )
            own = self._own if self._own is not None else self._create()
            size = os.fstat(own.fd).st_size
            written = 0
            try:
                view = memoryview(data)
                while written < len(data):
                    written += os.write(own.fd, view[written:])
                os.fsync(own.fd)
            except OSError:
                # Whole records or none: the file is ours alone, so cut it back.
                with contextlib.suppress(OSError):
                    os.ftruncate(own.fd, size)
                raise
            own.size = size + len(data)
            own.count += len(records)
            self._count += len(records)
            self._full = False

    def peek(self, limit: int) -> list[PixelRecord]:
        """Up to ``limit`` of the oldest records, left in place until consumed."""
        with self._lock:
            return self._peek(limit)

    def _peek(self, limit: int) -> list[PixelRecord]:
        self._peeked = []
        records: list[PixelRecord] = []
        while self._files:
            file = self._files[0]
            lines = _read_lines(file.fd, file.offset, limit)
            if not lines:
                self._remove(file)  # all consumed, or only a torn last line left
                continue
            for end, line in lines:
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a record")
                except ValueError:
                    if records:
                        break  # dealt with at the next peek, once these are consumed
                    logger.error(
                        "spool %s: dropping a damaged line at byte %d", file.path, end - len(line)
                    )
                    file.offset = end
                    file.count -= 1
                    self._count -= 1
                    continue
                records.append(cast(PixelRecord, record))
                self._peeked.append(end)
            if records:
                break
        return records

    def consume(self, count: int) -> None:
        """Drop the first ``count`` records the last :meth:`peek` returned."""
        with self._lock:
            if not 0 <= count <= len(self._peeked):
                raise ValueError(f"consume({count}) after peeking {len(self._peeked)} records")
            if count == 0:
                return
            file = self._files[0]
            file.offset = self._peeked[count - 1]
            file.count -= count
            self._count -= count
            self._peeked = self._peeked[count:]
            if file.count <= 0:
                self._remove(file)

    def adopt(self) -> int:
        """Take over the files of processes that are gone; the number of records gained."""
        with self._lock:
            return self._adopt()

    def _adopt(self) -> int:
        try:
            with os.scandir(self.directory) as entries:
                names = [Path(entry.path) for entry in entries]
        except FileNotFoundError:
            return 0
        found = [path for path in names if path.suffix == ".jsonl"]
        for path in names:
            if path.suffix == ".new":
                _remove_if_abandoned(path)
        mine = {file.path for file in self._files}
        gained = 0
        adopted: list[_SpoolFile] = []
        for path in sorted(found, key=_age):
            if path in mine:
                continue
            file = _claim(path)
            if file is None:
                continue
            if file.count == 0:
                _unlink_and_close(file)
                continue
            logger.warning("spool: adopted %d records left in %s", file.count, path)
            adopted.append(file)
            gained += file.count
        # Before this process's own file, whose records are newer.
        at = len(self._files) - (1 if self._own is not None else 0)
        self._files[at:at] = adopted
        self._count += gained
        return gained

    def close(self) -> None:
        """Let go of the files: empty ones are removed, others wait for adoption."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        for file in self._files:
            if file.count <= 0:
                _unlink_and_close(file)
                continue
            if file.offset > 0:
                try:
                    self._drop_consumed(file)
                except OSError as exc:
                    # Harmless: the consumed records go to the store again.
                    logger.warning("spool %s: cannot drop consumed records: %s", file.path, exc)
            os.close(file.fd)
        self._files = []
        self._own = None
        self._peeked = []

    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's files without touching them."""
        # Another thread of the parent may have held the lock at the fork.
        self._lock = threading.Lock()
        for file in self._files:
            # Closing the child's copy of the descriptor leaves the parent's
            # lock in place (it is released only when every copy is closed),
            # and keeps the file adoptable once the parent is gone.
            with contextlib.suppress(OSError):
                os.close(file.fd)
        self._count = 0
        self._full = False
        self._files = []
        self._own = None
        self._peeked = []

    def _create(self) -> _SpoolFile:
        # Private: a spool holds what the pixels said, IP addresses included.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = self._new_file()
        self._own = _SpoolFile(path, fd, 0)
        self._files.append(self._own)
        return self._own

    def _new_file(self, *, source: int | None = None, offset: int = 0) -> tuple[int, Path]:
        """A new spool file, locked, holding a copy of ``source`` from ``offset`` if given.

        It is made under a name adoption ignores and renamed once locked and
        complete: an adopter must never see a file that is still being made,
        which it could take for a dead process's and remove.
        """
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        temporary = self.directory / f"{name}.new"
        path = self.directory / f"{name}.jsonl"
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if source is not None:
                _copy_from(source, offset, fd)
            os.rename(temporary, path)
            _fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        return fd, path

    def _drop_consumed(self, file: _SpoolFile) -> None:
        """Copy the records ``file`` has not handed on yet to a file of their own
        (synced, with the old file's age), then remove ``file``, so that the
        next spool does not hand the store what it already took."""
        fd, _ = self._new_file(source=file.fd, offset=file.offset)
        os.close(fd)
        # The copy is whole before the original goes: a crash in between
        # leaves both, which hands some records on twice but loses none.
        file.path.unlink()
        _fsync_directory(self.directory)

    def _remove(self, file: _SpoolFile) -> None:
        """Drop ``file`` (used up, or only a torn last line left); hold the lock."""
        self._count -= max(file.count, 0)
        self._files.remove(file)
        if file is self._own:
            self._own = None
        self._peeked = []
        _unlink_and_close(file)


def count_spooled(directory: str | os.PathLike[str]) -> int:
    """How many records the spool files in ``directory`` hold; 0 if it does not exist.

    Read-only: nobody's file is locked, adopted or changed, so it may be called
    while recorders use the spool. The files of processes that are gone are
    counted exactly (what the next recorder will hand on). A live recorder's
    file may still hold records it already handed to the store: it drops them
    when the file is used up or when it closes, and until then they count.
    Files still being made are not counted. Raises ``OSError`` when the
    directory cannot be read.
    """
    try:
        with os.scandir(directory) as entries:
            paths = [Path(entry.path) for entry in entries if entry.name.endswith(".jsonl")]
    except FileNotFoundError:
        return 0
    count = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # used up, or adopted and rewritten, since the listing
        try:
            count += _count_lines(fd)
        finally:
            os.close(fd)
    return count


def _line(record: PixelRecord) -> bytes:
    try:
        # default=str: a spool must take whatever the store could not; the
        # store then sees the value as text instead of choking on it forever.
        return json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise RecordError(f"a record cannot be spooled as JSON: {exc}") from exc


def _claim(path: Path) -> _SpoolFile | None:
    """Lock and count the file at ``path`` if its owner is gone, else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None  # removed meanwhile, or not ours to touch
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The lock may have come after another adopter finished with the file
        # and removed it: only a file still under its name is live.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(path)
        count = _count_lines(fd)
        size = os.fstat(fd).st_size
    except OSError:
        os.close(fd)
        return None
    return _SpoolFile(path, fd, count, size)


def _count_lines(fd: int) -> int:
    """Whole, non-blank lines: records (a torn last line has no newline)."""
    count = 0
    offset = 0
    tail = b""
    while chunk := os.pread(fd, _BLOCK, offset):
        offset += len(chunk)
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        count += sum(1 for line in lines if line.strip())
    return count


def _read_lines(fd: int, offset: int, limit: int) -> list[tuple[int, bytes]]:
    """Up to ``limit`` whole non-blank lines from ``offset``: (end offset, line)."""
    found: list[tuple[int, bytes]] = []
    buffer = b""
    start = offset  # the file offset of buffer[0]
    read_at = offset
    while len(found) < limit:
        chunk = os.pread(fd, _BLOCK, read_at)
        if not chunk:
            break
        read_at += len(chunk)
        buffer = buffer + chunk
        at = 0
        while len(found) < limit:
            newline = buffer.find(b"\n", at)
            if newline < 0:
                break
            line = buffer[at : newline + 1]
            at = newline + 1
            if line.strip():
                found.append((start + at, line))
        buffer = buffer[at:]
        start += at
    return found


def _age(path: Path) -> tuple[float, str]:
    """Sort key: oldest first (files gone meanwhile last; _claim skips them)."""
    try:
        return (path.stat().st_mtime, path.name)
    except OSError:
        return (float("inf"), path.name)


def _unlink_and_close(file: _SpoolFile) -> None:
    # Unlinked while still locked, so that an adopter waiting for the lock
    # finds the name gone (see _claim) instead of replaying the records again.
    with contextlib.suppress(OSError):
        file.path.unlink()
    os.close(file.fd)


def _remove_if_abandoned(path: Path) -> None:
    """Remove a file left half made by a process that died making it."""
    try:
        if time.time() - path.stat().st_mtime < _ABANDONED_AFTER:
            return  # perhaps being made right now
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_from(source: int, offset: int, target: int) -> None:
    """Copy ``source`` from ``offset`` on to ``target``, synced, with its age."""
    while chunk := os.pread(source, _BLOCK, offset):
        view = memoryview(chunk)
        while view:
            view = view[os.write(target, view) :]
        offset += len(chunk)
    os.fsync(target)
    mtime = os.fstat(source).st_mtime_ns
    os.utime(target, ns=(mtime, mtime))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
