"""The recorder's write-ahead journal: every record on local disk before it is kept.

A journal is a directory of segment files of JSON lines, one record per line.
Each process appends to its own segments, ``<pid>-<random>-<seq>.jsonl``,
holding an exclusive ``flock`` on each for as long as it lives. An append is
one ``os.write()`` of a group's lines to a file opened ``O_APPEND``: once it
returns, the lines are in the kernel's page cache, which survives the process
being killed (``kill -9``). With ``fsync=True`` each append is also fsync'd,
which survives a power loss; one fsync per group, not per record.

The newest segment is rotated (a new one started) once it would pass
``segment_bytes``; a segment is deleted once every record in it has been
handed on (consumed), except the one being appended to, which goes when it is
rotated away or at :meth:`Journal.close`. A segment whose lock can be taken
belongs to a process that is gone: a journal opened on the same directory
adopts it and hands its records on first. Where the store remembers how far
into each segment it got (:meth:`Journal.adopt`'s ``positions``), the
adopter skips what the store holds already: exactly once. Otherwise the whole
segment is handed on again: at least once, never lost.

Reading is peek-then-consume: :meth:`Journal.peek_entries` gives the oldest
records with their positions (segment name, end offset), and
:meth:`Journal.consume_through` drops them once the store has taken them.
:meth:`Journal.close` rewrites a partly consumed segment without its consumed
records, so the next process does not hand them on again.

Files are made under a ``.new`` name and renamed only once locked and
complete, so an adopter never mistakes a file being made for an orphan.

A journal has a size cap, ``max_bytes`` (1 GiB by default): the bytes of its
files on disk, adopted ones included. An append that would go over it raises
:class:`SpoolFullError` (an ``OSError``, as a full disk would) and logs one
ERROR line when the cap is first reached; space comes back as records are
handed on and segments removed.

A :class:`Journal` is thread-safe: the recorder's request threads (durable
callers append themselves) and its writer thread all use it, one operation at
a time under the journal's lock. ``len()`` reads a counter and never waits for
that lock, so it answers at once even while an append hangs on a dying disk.
:func:`count_spooled` counts the records of a journal directory from any
process, without taking or locking anything (``pixel-middleware events`` and
``serve`` use it to say how many wait).
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

from pixel_middleware import _json
from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import RecordError, StoreError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "Entry",
    "Journal",
    "SpoolFullError",
    "count_spooled",
    "encode_entry",
    "encode_line",
]

logger = logging.getLogger(__name__)

_BLOCK = 256 * 1024
# A half-made journal file older than this (seconds) and unlocked was left by a
# process that died making it.
_ABANDONED_AFTER = 60.0

#: The default cap on a journal's files on disk, in bytes: 1 GiB.
DEFAULT_MAX_BYTES = 1 << 30

#: The size past which the segment being appended to is rotated: 64 MiB.
DEFAULT_SEGMENT_BYTES = 64 << 20

#: A record read back, with where it ends: (record, segment name, end offset).
Entry = tuple[PixelRecord, str, int]

#: How a store tells an adopter how far into each segment it got: it is
#: given the segment names and answers {name: end offset} for those it knows.
Positions = Callable[[Sequence[str]], dict[str, int]]


class SpoolFullError(OSError):
    """The journal holds ``max_bytes`` already: nothing more is added until
    records are handed on. An ``OSError``, like the full disk it stands in for."""


class _Segment:
    """One file of the journal, locked by this process, read from ``offset``."""

    __slots__ = ("count", "fd", "offset", "path", "size")

    def __init__(self, path: Path, fd: int, count: int, size: int = 0, offset: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.offset = offset  # where the oldest record not yet consumed starts
        self.count = count  # records from `offset` on
        self.size = size  # bytes in the file, consumed ones included


class Journal:
    """Records on disk, oldest first, in the directory ``directory``.

    Usage::

        journal = Journal("pixel-spool/store")
        journal.adopt()                         # segments of processes that are gone
        name, ends = journal.append_lines(lines)  # on disk (page cache) when it returns
        entries = journal.peek_entries(500)
        store.write([record for record, _, _ in entries])
        _, name, end = entries[-1]
        journal.consume_through(name, end, len(entries))

    The directory is created on the first append (or adoption finds nothing).

    :param max_bytes: The most bytes its files may hold on disk (``None``: no
        cap); an append that would go over raises :class:`SpoolFullError`.
    :param segment_bytes: The size past which a new segment is started.
    :param fsync: Whether each append is fsync'd (power loss), once per call.
    :param keep_drained: Whether the segment being appended to stays when all
        its records are consumed (a journal: saves making a file per write)
        or is removed at once (the old spool's way).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = False,
        keep_drained: bool = True,
    ) -> None:
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise ValueError(
                f"max_bytes must be a whole number of 1 or more or None, got {max_bytes!r}"
            )
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int):
            raise ValueError(f"segment_bytes must be a whole number, got {segment_bytes!r}")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes must be 1 or more, got {segment_bytes!r}")
        self.directory = Path(directory).absolute()
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = bool(fsync)
        self.keep_drained = keep_drained
        self._lock = threading.Lock()  # one operation at a time
        self._new_prefix()
        # Adopted segments first (they are older), this process's own last.
        self._files: list[_Segment] = []
        self._own: _Segment | None = None
        self._peeked: list[int] = []  # end offsets of the records peek() returned
        # Records waiting (after close(): left on disk for the next journal).
        # Kept up to date by every operation, so that len() never takes the lock.
        self._count = 0
        self._full = False  # the cap was reached and said so in the log
        # The last adoption found dead segments but the store could not say
        # how far it got: adopt() again later.
        self.adoption_deferred = False

    def _new_prefix(self) -> None:
        # This process's segment names: <pid>-<random>-<seq>.jsonl.
        self.prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._seq = 0

    def __len__(self) -> int:
        """The number of records waiting (after :meth:`close`: left on disk).

        Never waits: it reads a counter, also while another thread's append or
        read is under way (it then counts what that operation has not finished).
        """
        return self._count

    @property
    def size(self) -> int:
        """The bytes of this journal's files on disk (what ``max_bytes`` caps)."""
        return sum(file.size for file in list(self._files))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, {len(self)} records)"

    def append(self, records: Sequence[PixelRecord]) -> None:
        """Add ``records`` after all others (see :meth:`append_lines`).

        Raises :class:`~pixel_middleware.stores.RecordError` (nothing added)
        for a record that cannot be written as JSON.
        """
        if records:
            self.append_lines([encode_line(record) for record in records])

    def append_lines(self, lines: Sequence[bytes]) -> tuple[str, list[int]]:
        """Add ``lines`` (each a record's :func:`encode_line`) after all others,
        in one write: the segment's name and each line's end offset in it.

        In the page cache when it returns (and on disk with ``fsync``). Raises
        ``OSError`` (nothing added) when the disk refuses or the cap is reached.
        """
        data = b"".join(lines)
        with self._lock:
            own = self._own
            if (
                own is not None
                and own.size > 0
                and (
                    own.size + len(data) > self.segment_bytes
                    or (own.count <= 0 and self._over_cap(len(data)))
                )
            ):
                # Rotate: a full segment, or a drained one whose bytes stand
                # between the cap and a new record.
                self._retire_own()
                own = None
            if self._over_cap(len(data)):
                if not self._full:
                    self._full = True
                    logger.error(
                        "spool %s is full (%d bytes, the cap is %d): records can no longer"
                        " be journaled until the store takes some",
                        self.directory,
                        self.size,
                        self.max_bytes,
                    )
                raise SpoolFullError(
                    f"the spool {self.directory} holds its cap of {self.max_bytes} bytes"
                )
            if own is None:
                own = self._create()
            size = own.size
            try:
                written = os.write(own.fd, data)
                if written < len(data):
                    view = memoryview(data)
                    while written < len(data):
                        written += os.write(own.fd, view[written:])
                if self.fsync:
                    os.fsync(own.fd)
            except OSError:
                # Whole records or none: the file is ours alone, so cut it back.
                with contextlib.suppress(OSError):
                    os.ftruncate(own.fd, size)
                raise
            own.size = size + len(data)
            own.count += len(lines)
            self._count += len(lines)
            self._full = False
            ends = []
            end = size
            for line in lines:
                end += len(line)
                ends.append(end)
            return own.path.name, ends

    def tail(self) -> tuple[str, int]:
        """Where the next append goes: (segment name, offset), the name of the
        next segment if there is none to append to yet."""
        with self._lock:
            own = self._own
            if own is None:
                return f"{self.prefix}{self._seq + 1}.jsonl", 0
            return own.path.name, own.size

    def _over_cap(self, more: int) -> bool:
        return self.max_bytes is not None and self.size + more > self.max_bytes

    def _retire_own(self) -> None:
        """Stop appending to the own segment; remove it if nothing in it waits."""
        own = self._own
        self._own = None
        if own is not None and own.count <= 0:
            self._remove(own)

    def peek(self, limit: int) -> list[PixelRecord]:
        """Up to ``limit`` of the oldest records, left in place until consumed."""
        return [record for record, _, _ in self.peek_entries(limit)]

    def peek_entries(self, limit: int, stop: tuple[str, int] | None = None) -> list[Entry]:
        """Up to ``limit`` of the oldest records of one segment, with their positions,
        left in place until consumed; none at or past ``stop`` (segment, offset)."""
        with self._lock:
            return self._peek(limit, stop)

    def _peek(self, limit: int, stop: tuple[str, int] | None) -> list[Entry]:
        self._peeked = []
        entries: list[Entry] = []
        while self._files:
            file = self._files[0]
            name = file.path.name
            until = stop[1] if stop is not None and stop[0] == name else None
            if until is not None and file.offset >= until:
                return []
            lines = _read_lines(file.fd, file.offset, limit, until)
            if not lines:
                if until is not None or (file is self._own and self.keep_drained):
                    return []  # caught up with what is appended
                self._remove(file)  # all consumed, or only a torn last line left
                continue
            for end, line in lines:
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a record")
                except ValueError:
                    if entries:
                        break  # dealt with at the next peek, once these are consumed
                    logger.error(
                        "spool %s: dropping a damaged line at byte %d", file.path, end - len(line)
                    )
                    file.offset = end
                    file.count -= 1
                    self._count -= 1
                    continue
                entries.append((cast(PixelRecord, record), name, end))
                self._peeked.append(end)
            if entries:
                break
        return entries

    def consume(self, count: int) -> None:
        """Drop the first ``count`` records the last :meth:`peek` returned."""
        with self._lock:
            if not 0 <= count <= len(self._peeked):
                raise ValueError(f"consume({count}) after peeking {len(self._peeked)} records")
            if count == 0:
                return
            file = self._files[0]
            end = self._peeked[count - 1]
            self._peeked = self._peeked[count:]
            self._consume(file, end, count)

    def consume_through(self, name: str, end: int, count: int) -> None:
        """Drop the ``count`` records of segment ``name`` that end at or before
        ``end`` (the oldest waiting): the store has taken them. Segments before
        it must be consumed already."""
        with self._lock:
            for file in self._files:
                if file.path.name == name:
                    break
            else:
                raise ValueError(f"consume_through: no segment {name!r}")
            if self._files[0] is not file:
                raise ValueError(f"consume_through: {name!r} is not the oldest segment")
            self._peeked = []
            self._consume(file, end, count)

    def _consume(self, file: _Segment, end: int, count: int) -> None:
        file.offset = end
        file.count -= count
        self._count -= count
        if file.count <= 0 and not (file is self._own and self.keep_drained):
            self._remove(file)

    def adopt(self, positions: Positions | None = None) -> int:
        """Take over the segments of processes that are gone; the number of records gained.

        ``positions``: where the store says it got to in those segments; the
        records up to there are skipped (and segments it holds whole, removed).
        """
        with self._lock:
            return self._adopt(positions)

    def _adopt(self, positions: Positions | None) -> int:
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
        claimed: list[_Segment] = []
        for path in sorted(found, key=_age):
            if path in mine:
                continue
            file = _claim(path)
            if file is not None:
                claimed.append(file)
        stored: dict[str, int] = {}
        if claimed and positions is not None:
            try:
                stored = positions([file.path.name for file in claimed])
            except Exception as exc:  # the store is down: replay whole, at least once
                logger.warning("spool: cannot ask the store how far it got (%s)", exc)
                # Adopt nothing yet: the segments stay for a later try, so that
                # a store that can say how far it got is not handed duplicates.
                for file in claimed:
                    os.close(file.fd)
                self.adoption_deferred = True
                return 0
        self.adoption_deferred = False
        gained = 0
        adopted: list[_Segment] = []
        for file in claimed:
            skip = stored.get(file.path.name, 0)
            if skip:
                file.offset = min(skip, file.size)
                file.count = _count_lines(file.fd, file.offset)
            if file.count == 0:
                _unlink_and_close(file)
                continue
            logger.warning("spool: adopted %d records left in %s", file.count, file.path)
            adopted.append(file)
            gained += file.count
        # Before this process's own segments, whose records are newer.
        at = 0
        while at < len(self._files) and not self._files[at].path.name.startswith(self.prefix):
            at += 1
        self._files[at:at] = adopted
        self._count += gained
        return gained

    def live_tails(self) -> dict[str, int]:
        """The size of each segment another live process appends to (by name).

        What a reader in one process waits for, so that a pixel another process
        answered is stored before the read: those bytes are records the other
        process has journaled. A segment whose owner is gone is left out (it
        waits for adoption, which no reader should wait for); so are this
        journal's own. Read-only, and never takes a file's lock.
        """
        try:
            with os.scandir(self.directory) as entries:
                names = [entry.name for entry in entries if entry.name.endswith(".jsonl")]
        except OSError:
            return {}
        mine = {file.path.name for file in list(self._files)}
        tails: dict[str, int] = {}
        for name in names:
            if name in mine or name.startswith(self.prefix) or not _owner_alive(name):
                continue
            try:
                size = os.stat(self.directory / name).st_size
            except OSError:
                continue  # used up and removed since the listing
            if size:
                tails[name] = size
        return tails

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
        # Leave no empty directory behind (one per store URL would pile up);
        # another process's files keep it.
        with contextlib.suppress(OSError):
            self.directory.rmdir()

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
        self._new_prefix()
        self._count = 0
        self._full = False
        self._files = []
        self._own = None
        self._peeked = []

    def _create(self) -> _Segment:
        # Private: a journal holds what the pixels said, IP addresses included.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = self._new_file()
        self._own = _Segment(path, fd, 0)
        self._files.append(self._own)
        return self._own

    def _new_file(self, *, source: int | None = None, offset: int = 0) -> tuple[int, Path]:
        """A new segment, locked, holding a copy of ``source`` from ``offset`` if given.

        It is made under a name adoption ignores and renamed once locked and
        complete: an adopter must never see a file that is still being made,
        which it could take for a dead process's and remove.
        """
        self._seq += 1
        name = f"{self.prefix}{self._seq}"
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

    def _drop_consumed(self, file: _Segment) -> None:
        """Copy the records ``file`` has not handed on yet to a file of their own
        (synced, with the old file's age), then remove ``file``, so that the
        next journal does not hand the store what it already took."""
        fd, _ = self._new_file(source=file.fd, offset=file.offset)
        os.close(fd)
        # The copy is whole before the original goes: a crash in between
        # leaves both, which hands some records on twice but loses none.
        file.path.unlink()
        _fsync_directory(self.directory)

    def _remove(self, file: _Segment) -> None:
        """Drop ``file`` (used up, or only a torn last line left); hold the lock."""
        self._count -= max(file.count, 0)
        self._files.remove(file)
        if file is self._own:
            self._own = None
        self._peeked = []
        _unlink_and_close(file)


def count_spooled(
    directory: str | os.PathLike[str],
    *,
    stored: Callable[[Sequence[str]], Mapping[str, int]] | None = None,
) -> int:
    """How many records the spool files in ``directory`` hold; 0 if it does not exist.

    Read-only: nobody's file is locked, adopted or changed, so it may be called
    while recorders use the spool. The files of processes that are gone are
    counted exactly (what the next recorder will hand on). A live recorder's
    file may still hold records it already handed to the store: it drops them
    when the segment is used up or rotated, or when it closes. ``stored`` (a
    store's ``journal_positions``, for the stores that keep them) says how far
    into each segment the store holds the records, and those are not counted;
    without it they count (a journal's live segment holds up to
    ``segment_bytes``). Files still being made are not counted. Raises
    ``OSError`` when the directory cannot be read.
    """
    try:
        with os.scandir(directory) as entries:
            paths = [Path(entry.path) for entry in entries if entry.name.endswith(".jsonl")]
    except FileNotFoundError:
        return 0
    offsets: Mapping[str, int] = {}
    if stored is not None and paths:
        # A store that cannot say leaves every record counted: more, never fewer.
        with contextlib.suppress(StoreError):
            offsets = stored([path.name for path in paths])
    count = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # used up, or adopted and rewritten, since the listing
        try:
            count += _count_lines(fd, offsets.get(path.name, 0))
        finally:
            os.close(fd)
    return count


def encode_line(record: PixelRecord) -> bytes:
    """``record`` as one line of the journal; RecordError if it is no JSON at all."""
    return encode_entry(record)[0]


def encode_entry(record: PixelRecord) -> tuple[bytes, bool]:
    """``record``'s journal line, and whether the line (without its newline) is
    exactly the text :func:`pixel_middleware._json.dumps` gives for ``record``,
    so that a store may keep it instead of encoding the record again."""
    # msgspec's text when it reads back as the very record (several times
    # cheaper than json.dumps, and the usual case: a decoded pixel is plain
    # JSON); anything else (NaN, a datetime, a lone surrogate) takes the
    # standard library's way below, exactly as before.
    fast = _json.exact_bytes(record)
    if fast is not None:
        return fast + b"\n", True
    try:
        # default=str: a journal must take whatever the store could not; the
        # store then sees the value as text instead of choking on it forever.
        line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise RecordError(f"a record cannot be spooled as JSON: {exc}") from exc
    return line, False


def _owner_alive(name: str) -> bool:
    """Whether the process whose pid starts the segment ``name`` still runs."""
    pid, _, _ = name.partition("-")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive, not ours to signal
    return True


def _claim(path: Path) -> _Segment | None:
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
    return _Segment(path, fd, count, size)


def _count_lines(fd: int, offset: int = 0) -> int:
    """Whole, non-blank lines from ``offset``: records (a torn last line has no newline)."""
    count = 0
    tail = b""
    while chunk := os.pread(fd, _BLOCK, offset):
        offset += len(chunk)
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        count += sum(1 for line in lines if line.strip())
    return count


def _read_lines(
    fd: int, offset: int, limit: int, until: int | None = None
) -> list[tuple[int, bytes]]:
    """Up to ``limit`` whole non-blank lines from ``offset`` (and before ``until``):
    (end offset, line)."""
    found: list[tuple[int, bytes]] = []
    buffer = b""
    start = offset  # the file offset of buffer[0]
    read_at = offset
    while len(found) < limit:
        size = _BLOCK if until is None else min(_BLOCK, until - read_at)
        chunk = os.pread(fd, size, read_at) if size > 0 else b""
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


def _age(path: Path) -> tuple[float, str, int]:
    """Sort key: oldest first, a process's segments in their order (files gone
    meanwhile last; _claim skips them)."""
    prefix, _, seq = path.stem.rpartition("-")
    number = int(seq) if seq.isdigit() else 0
    try:
        return (path.stat().st_mtime, prefix, number)
    except OSError:
        return (float("inf"), prefix, number)


def _unlink_and_close(file: _Segment) -> None:
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
