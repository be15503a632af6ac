"""The history journal: every history row, appended to a file before the
milter answers the message, until the database holds it.

The journal is a sequence of segment files in the state directory,
``history-journal.<generation>.jsonl``: one row dict (the exact shape of
:func:`dmarcmilter.history.rows.message_row`, or a message's failure
incident, :func:`~dmarcmilter.history.rows.failure_line`, or the hard
bounces of a report mail, :func:`~dmarcmilter.history.rows.bounces_line`)
per JSON line, followed by zero bytes up to the segment's preallocated size.  The milter copies each
row into the segment's shared memory mapping before its end-of-message
reply, so a process kill (SIGKILL, a crash) loses no row that got a reply:
the page cache keeps it.  The copy is a plain memory write: no system call,
and no release of the interpreter lock on the mail path.  The writer thread
msyncs the journal while rows wait in it for the database, so a power loss
costs at most the last flush interval.

Each segment's space is allocated when it is created (``posix_fallocate``),
so a full file system refuses a new segment, cleanly, instead of failing a
write into the mapping (which would kill the process with SIGBUS).  The
writer thread prepares the next segment before the current one is full, so
the mail path does not create files either.

Rows are never rewritten, and no offset is kept on disk:

* appends go to the newest segment; when it is full, a new one is started
  (``segment_bytes``, 8 MiB, or a quarter of the free space when the file
  system has less than four times that left, down to 64 KiB), and the full
  one is trimmed to its rows;
* a segment is deleted once every row in it is in the database;
* at start, every segment left by an earlier run is replayed whole, and rows
  whose idempotency key is already stored are skipped.

So the only state on disk is the rows themselves: there is no offset that
could go stale and make a restart skip rows that were never stored.  The
price is re-reading at most one segment of already-stored rows at start.

A row that cannot be appended (no segment could be created: a full or
read-only file system) is not journaled; the caller keeps it in memory
instead.  A line cut short by a crash in the middle of the copy is never
read back: a segment's rows end at its last newline before the zero bytes.

``history-rejected.jsonl`` keeps rows the database refused as invalid
(never connectivity problems), with the error, for an operator to inspect.

The directory is locked (``flock`` on ``history-journal.lock``) for the
lifetime of the writer: two processes sharing one state directory would
replay each other's rows.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..errors import DatabaseError

SEGMENT_PREFIX = "history-journal."
SEGMENT_SUFFIX = ".jsonl"
LOCK_FILE = "history-journal.lock"
REJECTED_FILE = "history-rejected.jsonl"
# What earlier versions left: a spool of rows the database had not taken,
# and a byte offset into it.  The spool is replayed whole (keys skip what is
# stored) and the offset is never trusted.
LEGACY_SPOOL = "history-spool.jsonl"
LEGACY_LEFTOVERS = ("history-spool.offset", "history-spool.offset.tmp", "history-spool.tmp")
LEGACY_REJECTED = "history-spool.rejected.jsonl"
# The size of a segment, allocated when it is made.  At start, at most about
# this much of already-stored rows is read again.  A row larger than this
# (none is: rows are capped far below) gets a segment of its own size.
SEGMENT_BYTES = 8 << 20
# With less than four segments' worth of free space, segments shrink to a
# quarter of it, down to this.
MIN_SEGMENT_BYTES = 64 << 10
# The writer thread prepares the next segment once the current one is this
# full.
PREPARE_AT = 0.75
# Read size when replaying; a longer line is still read whole.
READ_CHUNK = 1 << 20
# Generation 0 is the legacy spool; segments are numbered from 1.
_SEGMENT_NAME = re.compile(r"history-journal\.(0*[1-9]\d{0,17})\.jsonl")

log = logging.getLogger("dmarcmilter.history")


class JournalError(DatabaseError):
    """The journal directory cannot be opened, locked or written."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A place in the journal: a segment and a byte offset in it."""

    generation: int
    offset: int


@dataclass(slots=True)
class _Segment:
    generation: int
    path: Path
    size: int  # bytes of whole lines
    # For the segment being written: its mapping and allocated size.
    mapping: mmap.mmap | None = None
    capacity: int = 0

    def unmap(self, *, trim: bool) -> None:
        """Flush and drop the mapping; ``trim`` gives the unused, zeroed
        space back to the file system."""
        if self.mapping is None:
            return
        try:
            self.mapping.flush()
        except OSError as exc:
            log.error("cannot sync the history journal %s: %s", self.path, exc.strerror or exc)
        self.mapping.close()
        self.mapping = None
        if trim:
            try:
                os.truncate(self.path, self.size)
            except OSError as exc:
                log.error("cannot trim the history journal %s: %s", self.path, exc.strerror or exc)


class Journal:
    """The journal of one writer.

    Appends (:meth:`append`) must be serialised by the caller, which also
    orders its in-memory queue under the same lock; reading (:meth:`read`),
    :meth:`release` and :meth:`sync` belong to the writer thread.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.rejected_path = directory / REJECTED_FILE
        self._dirty = False
        self._spare: _Segment | None = None
        # Why the last append or segment failed, for the writer's log line.
        self.last_error = ""
        # Guards the segment list, which appends (rotation) and the writer
        # thread (release, read) both change.
        self._mutex = threading.Lock()
        self._lock_fd = _lock(directory)
        # Segments of earlier runs, oldest first; the legacy spool is older
        # than any of them.
        self._closed: list[_Segment] = []
        legacy = directory / LEGACY_SPOOL
        if legacy.exists():
            self._closed.append(_Segment(0, legacy, 0))
        try:
            entries = list(directory.iterdir())
        except OSError as exc:
            log.error("cannot list the history journal in %s: %s", directory, exc.strerror or exc)
            entries = []
        for path in entries:
            match = _SEGMENT_NAME.fullmatch(path.name)
            if match:
                self._closed.append(_Segment(int(match.group(1)), path, 0))
        self._closed.sort(key=lambda s: s.generation)
        for segment in self._closed:
            segment.size = _data_end(segment.path)
        self._closed = [s for s in self._closed if s.size > 0 or self._discard(s)]
        for name in LEGACY_LEFTOVERS:
            leftover = directory / name
            # Only when there is one: on a read-only file system even the
            # unlink of a missing file fails (EROFS), and the start must not.
            if os.path.lexists(leftover):
                try:
                    leftover.unlink()
                except OSError as exc:
                    log.error("cannot remove %s: %s", leftover, exc.strerror or exc)
        self._next_generation = (self._closed[-1].generation + 1) if self._closed else 1
        self._current: _Segment | None = None

    # -- state -------------------------------------------------------------------

    @property
    def backlog(self) -> Position | None:
        """Where the rows of earlier runs start, or None when there are none."""
        return Position(self._closed[0].generation, 0) if self._closed else None

    @property
    def writable(self) -> bool:
        return self._current is not None

    def end(self) -> Position:
        """Just past the last row appended."""
        if self._current is not None:
            return Position(self._current.generation, self._current.size)
        if self._closed:
            last = self._closed[-1]
            return Position(last.generation, last.size)
        return Position(0, 0)

    def size_bytes(self) -> int:
        total = sum(s.size for s in self._closed)
        return total + (self._current.size if self._current is not None else 0)

    def close(self) -> None:
        with self._mutex:
            current, self._current = self._current, None
            spare, self._spare = self._spare, None
        if current is not None:
            current.unmap(trim=True)
            if current.size == 0:
                # Nothing was appended: leave no empty file behind.
                self._discard(current)
            else:
                self._closed.append(current)
        if spare is not None:
            self._drop(spare)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # -- writing -----------------------------------------------------------------

    def open_segment(self, at_least: int = 0) -> None:
        """Start a new segment for appends; JournalError when the directory
        cannot take one (read-only, full, gone).  Callers serialise this
        with :meth:`append`."""
        with self._mutex:
            spare, self._spare = self._spare, None
        current = self._current
        if spare is not None and (
            at_least > spare.capacity
            or (current is not None and spare.generation < current.generation)
        ):
            # Too small for the row, or made before a newer segment was:
            # generations must grow in the order rows are appended.
            self._drop(spare)
            spare = None
        segment = spare if spare is not None else self._make_segment(at_least)
        with self._mutex:
            if self._current is not None:
                self._current.unmap(trim=True)
                self._closed.append(self._current)
            self._current = segment

    def prepare(self) -> None:
        """Make the next segment ahead of time (the writer thread calls this,
        without the append lock), so that appends rarely create a file
        themselves."""
        current = self._current
        if (
            current is None
            or self._spare is not None
            or current.size < current.capacity * PREPARE_AT
        ):
            return
        try:
            spare = self._make_segment(0)
        except JournalError as exc:
            self.last_error = str(exc)
            return
        with self._mutex:
            current = self._current
            if self._spare is None and (current is None or spare.generation > current.generation):
                self._spare = spare
                return
        self._drop(spare)

    def _drop(self, segment: _Segment) -> None:
        segment.unmap(trim=False)
        self._discard(segment)

    def append(self, data: bytes) -> tuple[int, int, int] | None:
        """Copy whole lines into the journal; return the segment's generation
        and the offsets where they start and end, or None when no segment
        can take them.  (Plain numbers: this runs on the mail path.)"""
        segment = self._current
        if segment is None:
            return None
        start = segment.size
        if start + len(data) > segment.capacity:
            try:
                self.open_segment(len(data))
            except JournalError as exc:
                self.last_error = str(exc)
                with self._mutex:
                    # Rows go to memory until the writer thread manages to
                    # open a segment again.
                    segment.unmap(trim=True)
                    self._closed.append(segment)
                    self._current = None
                return None
            segment = self._current
            assert segment is not None and segment.mapping is not None
            start = 0
        assert segment.mapping is not None
        end = start + len(data)
        segment.mapping[start:end] = data
        segment.size = end
        self._dirty = True
        return segment.generation, start, end

    def sync(self) -> None:
        """msync what was appended since the last call (the writer thread
        does, while rows wait in the journal for the database)."""
        segment = self._current
        if self._dirty and segment is not None and segment.mapping is not None:
            self._dirty = False
            try:
                segment.mapping.flush()
            except (OSError, ValueError) as exc:
                log.error("cannot sync the history journal %s: %s", segment.path, exc)

    def _capacity(self) -> int:
        """segment_bytes, or less on a file system with little room left: a
        quarter of what is free, so that a nearly full disk still journals
        as long as it can rather than refusing a whole segment at once."""
        try:
            stat = os.statvfs(self.directory)
        except OSError:
            return self.segment_bytes
        free = stat.f_bavail * stat.f_frsize
        return max(MIN_SEGMENT_BYTES, min(self.segment_bytes, free // 4))

    def _make_segment(self, at_least: int) -> _Segment:
        capacity = max(self._capacity(), at_least)
        with self._mutex:
            generation = self._next_generation
            self._next_generation += 1
        path = self.directory / f"{SEGMENT_PREFIX}{generation:012d}{SEGMENT_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            raise JournalError(
                f"cannot create the history journal {path}: {exc.strerror or exc}"
            ) from None
        try:
            try:
                os.posix_fallocate(fd, 0, capacity)
                # Populated now, in the writer thread: the mail path's
                # copies then take no page faults.
                mapping = mmap.mmap(
                    fd,
                    capacity,
                    mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                    mmap.PROT_READ | mmap.PROT_WRITE,
                )
            finally:
                os.close(fd)  # the mapping keeps the file
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise JournalError(
                f"cannot allocate {capacity} bytes for the history journal {path}: "
                f"{exc.strerror or exc}"
            ) from None
        _sync_directory(self.directory)
        return _Segment(generation, path, 0, mapping, capacity)

    def reject(self, row: dict[str, Any], error: str) -> None:
        """Keep a row the database refused as invalid, with the reason."""
        line = encode([{"error": error, "row": row}])
        try:
            with open(self.rejected_path, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise JournalError(
                f"cannot write {self.rejected_path}: {exc.strerror or exc}"
            ) from None

    # -- replaying ---------------------------------------------------------------

    def read(
        self, start: Position, end: Position, batch_size: int
    ) -> Iterator[tuple[list[dict[str, Any]], Position]]:
        """The rows from ``start`` up to ``end``, in order, ``batch_size`` at
        a time, each batch with the position just past its last line."""
        with self._mutex:
            segments = [*self._closed, *([self._current] if self._current else [])]
        batch: list[dict[str, Any]] = []
        position = start
        for segment in segments:
            if segment.generation < start.generation or segment.generation > end.generation:
                continue
            first = start.offset if segment.generation == start.generation else 0
            last = end.offset if segment.generation == end.generation else segment.size
            for row, after in self._rows(segment, first, last):
                position = Position(segment.generation, after)
                if row is not None:
                    batch.append(row)
                if len(batch) >= batch_size:
                    yield batch, position
                    batch = []
            position = Position(segment.generation, last)
        if batch or position != start:
            yield batch, position

    def release(self, stored: Position) -> None:
        """Every row before ``stored`` is in the database: delete the
        segments that hold nothing else."""
        with self._mutex:
            self._release(stored)

    def _release(self, stored: Position) -> None:
        keep = []
        for segment in self._closed:
            if segment.generation < stored.generation or (
                segment.generation == stored.generation and stored.offset >= segment.size
            ):
                self._discard(segment)
            else:
                keep.append(segment)
        self._closed = keep

    # -- internals ---------------------------------------------------------------

    def _rows(
        self, segment: _Segment, first: int, last: int
    ) -> Iterator[tuple[dict[str, Any] | None, int]]:
        try:
            with open(segment.path, "rb") as fh:
                yield from _lines(fh, segment.path, first, last, self._decode)
        except FileNotFoundError:
            log.error("history journal %s vanished before it was replayed", segment.path)

    def _decode(self, raw: bytes, path: Path, end: int) -> dict[str, Any] | None:
        try:
            row = json.loads(raw.decode("utf-8", "surrogateescape"))
            if not isinstance(row, dict) or "idempotency_key" not in row:
                raise ValueError("not a history row")
        except ValueError as exc:
            log.error(
                "history journal %s: unreadable line before byte %d set aside: %s", path, end, exc
            )
            try:
                self.reject({"raw": raw.decode("utf-8", "replace")}, f"unreadable line: {exc}")
            except JournalError as error:
                log.error("history: %s", error)
            return None
        return row

    def _discard(self, segment: _Segment) -> bool:
        try:
            segment.path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("cannot delete the replayed history journal %s: %s", segment.path, exc)
        return False


def _sync_directory(directory: Path) -> None:
    """Make a new segment's name survive a power loss."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock(directory: Path) -> int:
    """Lock the journal directory for this process; the descriptor holds
    the lock.  A directory that cannot be written is still locked when the
    lock file exists (its segments can be read), and otherwise not locked
    at all: nothing can be written there for another process to race on."""
    path = directory / LOCK_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            log.error("cannot lock the history journal in %s: %s", directory, exc.strerror or exc)
            return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise JournalError(
            f"the history journal in {directory} is locked by another dmarcmilter "
            "process; each running milter needs its own state directory"
        ) from None
    return fd


def _lines(
    fh: BinaryIO,
    path: Path,
    first: int,
    last: int,
    decode: Callable[[bytes, Path, int], dict[str, Any] | None],
) -> Iterator[tuple[dict[str, Any] | None, int]]:
    fh.seek(first)
    consumed = first
    buffer = b""
    while consumed + len(buffer) < last:
        chunk = fh.read(min(READ_CHUNK, last - consumed - len(buffer)))
        if not chunk:
            break
        buffer += chunk
        lines = buffer.split(b"\n")
        buffer = lines.pop()
        for raw in lines:
            consumed += len(raw) + 1
            yield decode(raw, path, consumed), consumed


def encode_line(row: dict[str, Any]) -> bytes:
    """The journal line of one row."""
    try:
        return orjson.dumps(row) + b"\n"
    except TypeError:  # orjson.JSONEncodeError included
        # Text that is not valid Unicode (lone surrogates, which rows are
        # built without) keeps its bytes; the database refuses such a row
        # later, with a reason, as any row it cannot take.
        line = json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n"
        return line.encode("utf-8", "surrogateescape")


def encode(rows: list[dict[str, Any]]) -> bytes:
    """The journal lines of ``rows``."""
    return b"".join(encode_line(row) for row in rows)


def _data_end(path: Path) -> int:
    """Where a segment's whole lines end: at the last newline before the
    first zero byte (the unused, preallocated space) or the end of the file.
    A last line cut short by a crash (no caller was answered for it) is
    left out."""
    end = stop = offset = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                zero = chunk.find(b"\0")
                part = chunk if zero < 0 else chunk[:zero]
                newline = part.rfind(b"\n")
                if newline >= 0:
                    end = offset + newline + 1
                stop = offset + len(part)
                if zero >= 0:
                    break
                offset += len(chunk)
    except OSError as exc:
        log.error("cannot read the history journal %s: %s", path, exc.strerror or exc)
    if stop > end:
        log.warning("history journal %s: %d bytes of a torn last line left out", path, stop - end)
    return end
