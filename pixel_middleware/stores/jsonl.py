"""``jsonl:///path``: one JSON record per line, appended to a plain file.

Easy to read with ``tail -f``, ``grep`` and ``jq``, and safe for several
processes appending to one file: the file is opened with ``O_APPEND`` and each
:meth:`JSONLStore.write` is one ``write(2)`` of whole lines, made under an
exclusive ``flock`` so that batches never interleave.

URL: ``jsonl:///relative/path`` or ``jsonl:////absolute/path`` (SQLAlchemy's
spelling, as for ``sqlite:``), with the option ``?fsync=true``.

Durability: once :meth:`~JSONLStore.write` returns, its lines are in the
operating system's page cache, which survives the writing process being killed
(``kill -9``) but not a power loss; ``fsync=true`` syncs the file on every write
and survives that too, at a cost per write. A process killed in the middle of a
write may leave part of that batch, and a torn last line: readers skip a line
that does not end in a newline, and the next writer starts on a fresh line.

Positions are byte offsets of the lines' starts, as decimal strings.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import BinaryIO, cast

from pixel_middleware.core import PixelRecord
from pixel_middleware.stores import (
    RecordError,
    StoreError,
    StoreNotFoundError,
    _check_limit,
    _create_private,
    _file_url_parts,
    _parse_position,
    _unknown_options,
    _unwritable,
    redact_url,
)

__all__ = ["JSONLStore"]

logger = logging.getLogger(__name__)

_BLOCK = 64 * 1024
_LIVE_STORES: weakref.WeakSet[JSONLStore] = weakref.WeakSet()


class JSONLStore:
    """Records as JSON lines appended to one file; thread- and process-safe.

    Usage::

        store = JSONLStore("events.jsonl")  # or open_store("jsonl:///events.jsonl")
        store.write(records)
        newest = store.read(accepted=False, limit=20)

    :param path: The file; created when missing (its directory must exist).
    :param fsync: Sync the file to disk on every write, so that written records
        survive a power loss too (the default survives a crash of the process).
    :param create: ``False`` for readers: a missing file raises
        :class:`~pixel_middleware.stores.StoreNotFoundError` instead of being
        created, and the file is not opened for appending until a write.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = False, create: bool = True
    ) -> None:
        raw = os.fspath(path)
        if not raw:
            raise ValueError("JSONLStore: the path is empty")
        self.path = os.path.abspath(raw)
        self.url = "jsonl:///" + raw
        self.spool_key = self.url
        self.fsync = fsync
        self.create = create
        self._lock = threading.Lock()
        self._closed = False
        self._fd: int | None = None
        self._fd_pid = 0
        if create:
            self._open()  # now, so that a wrong path fails here
        else:
            # A reader may not be allowed to append (another user's file), so
            # only look: is there a file to read?
            try:
                os.stat(self.path)
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise _not_found(self.path) from exc
            except OSError as exc:
                raise StoreError(f"cannot open {self.path}: {exc}") from exc
        _LIVE_STORES.add(self)

    @classmethod
    def from_url(cls, url: str, *, create: bool = True) -> JSONLStore:
        """The store for ``jsonl:///relative/path`` or ``jsonl:////absolute/path``."""
        path, options = _file_url_parts(url, "jsonl")
        fsync = options.pop("fsync", "false").lower()
        if options:
            raise _unknown_options(url, options, ["fsync"])
        if fsync not in ("true", "false", "1", "0"):
            raise ValueError(f"fsync must be true or false in {redact_url(url)!r}")
        store = cls(path, fsync=fsync in ("true", "1"), create=create)
        store.url = redact_url(url)
        store.spool_key = url
        return store

    def write(self, records: Sequence[PixelRecord]) -> None:
        if not records:
            return
        data = b"".join(_line(record) for record in records)
        with self._lock:
            if self._closed:
                raise StoreError(f"the store for {self.path} is closed")
            try:
                _write_batch(self._open(), data, fsync=self.fsync)
            except OSError as exc:
                raise StoreError(
                    f"appending {len(records)} records to {self.path} failed: {exc}"
                ) from exc

    def read(
        self,
        *,
        accepted: bool | None = None,
        call: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[tuple[str, PixelRecord]]:
        _check_limit(limit)
        start = 0 if after is None else _parse_position(after)
        try:
            with open(self.path, "rb") as file:
                if after is not None and start >= os.fstat(file.fileno()).st_size:
                    # Past the end (a position from a longer file, or one made
                    # up): nothing after it yet. Seeking that far can fail.
                    return []
                if after is not None:
                    # Everything that starts after `after`: skip to the end of
                    # the line that holds it.
                    file.seek(start)
                    start += len(file.readline())
                # Paging forward (after=) takes the oldest `limit`; the newest
                # `limit` without it are found reading the file backwards.
                newest = limit is not None and after is None
                lines = _lines_backwards(file, start) if newest else _lines_forwards(file, start)
                found: list[tuple[str, PixelRecord]] = []
                for offset, record in self._records(lines):
                    if (accepted is None or record["accepted"] is accepted) and (
                        call is None or record["call"] == call
                    ):
                        if limit is not None and len(found) >= limit:
                            break
                        found.append((str(offset), record))
        except OSError as exc:
            raise StoreError(f"reading {self.path} failed: {exc}") from exc
        if newest:
            found.reverse()
        return found

    def close(self) -> None:
        """Close the file; idempotent. Reading still works, writing fails."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
        _LIVE_STORES.discard(self)

    def __repr__(self) -> str:
        return f"JSONLStore({self.url!r})"

    def _open(self) -> int:
        """This process's descriptor for appending; call with the lock held.

        A child process opens its own: flock() locks belong to an open file
        description, so one inherited across fork would not keep the parent's
        and the children's batches apart.
        """
        pid = os.getpid()
        if self._fd is not None and self._fd_pid == pid:
            return self._fd
        if self._fd is not None:
            os.close(self._fd)  # the child's copy; the parent's stays open
            self._fd = None
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            if self.create:
                _create_private(self.path)  # 0600 whatever the umask
            self._fd = os.open(self.path, flags)
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and not self.create:
                raise _not_found(self.path) from exc  # removed since it was opened
            if isinstance(exc, PermissionError) and os.path.exists(self.path):
                # Opened for appending is the writable check: a file that is
                # there but may not be written would send every record to the spool.
                raise _unwritable(self.path, exc) from exc
            raise StoreError(f"cannot open {self.path} for appending: {exc}") from exc
        self._fd_pid = pid
        return self._fd

    def _records(self, lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, PixelRecord]]:
        for offset, line in lines:
            if not line.endswith(b"\n"):
                continue  # the last line, torn or still being written
            if line.isspace():
                continue  # the fresh start written after a torn line
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "accepted" not in record or "call" not in record:
                    raise ValueError("not a record")
            except ValueError:
                logger.warning("%s: skipping the damaged line at byte %d", self.path, offset)
                continue
            yield offset, cast(PixelRecord, record)

    def clear(self) -> None:
        """Empty the file (the collector's ``POST /api/reset``), under the writers' flock.

        Positions are byte offsets, so they start over at 0: a reader holding
        an older position should take a fresh one.
        """
        with self._lock:
            if self._closed:
                raise StoreError(f"the store for {self.path} is closed")
            try:
                fd = self._open()
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    os.ftruncate(fd, 0)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError as exc:
                raise StoreError(f"clearing {self.path} failed: {exc}") from exc


def _line(record: PixelRecord) -> bytes:
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise RecordError(f"a record cannot be stored as JSON: {exc}") from exc
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate, which UTF-8 cannot carry: JSON's \\u escape can.
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _write_batch(fd: int, data: bytes, *, fsync: bool) -> None:
    """Append ``data`` (whole lines) to ``fd``: all of it, or (on error) none of it."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A writer was killed mid-line: end its torn line, so that it does
            # not swallow our first record.
            data = b"\n" + data
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                # One call in all but extreme cases (a full disk, a signal).
                written += os.write(fd, view[written:])
            if fsync:
                os.fsync(fd)
        except OSError:
            if written:
                # Under the lock nobody appended after us: take back our part.
                os.ftruncate(fd, size)
            raise
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _lines_forwards(file: BinaryIO, start: int) -> Iterator[tuple[int, bytes]]:
    file.seek(start)
    offset = start
    for line in file:
        yield offset, line
        offset += len(line)


def _lines_backwards(file: BinaryIO, start: int) -> Iterator[tuple[int, bytes]]:
    """The lines from ``start`` (a line's start) to the end, newest first."""
    position = file.seek(0, os.SEEK_END)
    pending = b""  # the start of the file's tail not yet split into lines
    while position > start:
        size = min(_BLOCK, position - start)
        position -= size
        file.seek(position)
        pending = file.read(size) + pending
        # Split off whole lines from the end: each begins after a newline that
        # is not the last byte of `pending`.
        end = len(pending)
        cut = pending.rfind(b"\n", 0, end - 1)
        while cut >= 0:
            yield position + cut + 1, pending[cut + 1 : end]
            end = cut + 1
            cut = pending.rfind(b"\n", 0, end - 1)
        pending = pending[:end]
    if pending:
        yield start, pending


def _not_found(path: str) -> StoreNotFoundError:
    return StoreNotFoundError(f"no store at {path}: the file does not exist")


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork would stay held forever in the
    # child. (The descriptor is replaced on the child's first write.)
    for store in list(_LIVE_STORES):
        store._lock = threading.Lock()


from pixel_middleware._process import after_fork_in_child  # noqa: E402 - one hook for all

after_fork_in_child(_after_fork_in_child)
