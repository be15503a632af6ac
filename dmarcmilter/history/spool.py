"""The history spool: an append-only JSON-lines file for rows the database
could not take yet.

When the database is unreachable or refuses a batch, the writer appends the
batch here and fsyncs it, and replays the file in order once the database is
back.  Every row carries its idempotency key, so a replay interrupted by a
crash inserts nothing twice: the next replay skips the keys already stored.

Layout, all in the state directory:

* ``history-spool.jsonl``: one row dict (the exact shape of
  :func:`dmarcmilter.history.rows.message_row`) per line.
* ``history-spool.offset``: how far the replay has committed, in bytes.  Only
  a hint to avoid re-reading committed lines after a restart; correctness
  comes from the keys.
* ``history-spool.rejected.jsonl``: rows the database refused as invalid
  (never connectivity problems), kept with the error for an operator to
  inspect, so one bad row cannot block the spool forever.

The file is locked (``flock``) for the lifetime of the writer: two processes
sharing one state directory would otherwise replay each other's rows.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DatabaseError

SPOOL_FILE = "history-spool.jsonl"
OFFSET_FILE = "history-spool.offset"
REJECTED_FILE = "history-spool.rejected.jsonl"
# Read size when replaying; a line longer than this is still read whole.
READ_CHUNK = 1 << 20

log = logging.getLogger("dmarcmilter.history")


class SpoolError(DatabaseError):
    """The spool file cannot be opened, locked or written."""


class Spool:
    """The spool of one writer.  ``append`` may be called from any thread;
    replaying (``batches``, ``commit``, ``reset_if_drained``) from one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / SPOOL_FILE
        self.offset_path = directory / OFFSET_FILE
        self.rejected_path = directory / REJECTED_FILE
        self._lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise SpoolError(
                f"the spool {self.path} is locked by another dmarcmilter process; "
                "each running milter needs its own state directory"
            ) from None
        self._trim_torn_tail()
        self._size = os.fstat(self._fd).st_size
        self._offset = min(self._read_offset(), self._size)

    # -- state -------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Whether rows wait to be replayed."""
        return self._size > self._offset

    @property
    def pending_bytes(self) -> int:
        return self._size - self._offset

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # releases the flock
                self._fd = -1

    # -- writing -----------------------------------------------------------------

    def append(self, rows: list[dict[str, Any]], *, sync: bool = True) -> None:
        """Append rows, one JSON line each, in one write; fsync unless told
        not to (the caller then calls :meth:`sync` soon)."""
        if not rows:
            return
        data = "".join(_line(row) for row in rows).encode("utf-8", "surrogateescape")
        with self._lock:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                if sync:
                    os.fsync(self._fd)
            except OSError as exc:
                raise SpoolError(
                    f"cannot write the spool {self.path}: {exc.strerror or exc}"
                ) from None
            self._size += len(data)

    def sync(self) -> None:
        with self._lock:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise SpoolError(
                    f"cannot sync the spool {self.path}: {exc.strerror or exc}"
                ) from None

    def reject(self, row: dict[str, Any], error: str) -> None:
        """Keep a row the database refused as invalid, with the reason."""
        line = _line({"error": error, "row": row}).encode("utf-8", "surrogateescape")
        try:
            with open(self.rejected_path, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise SpoolError(f"cannot write {self.rejected_path}: {exc.strerror or exc}") from None

    # -- replaying ---------------------------------------------------------------

    def batches(self, batch_size: int) -> Iterator[tuple[list[dict[str, Any]], int]]:
        """The pending rows in file order, ``batch_size`` at a time, each
        batch with the offset just past its last line (for :meth:`commit`).
        Lines appended while iterating are included."""
        offset = self._offset
        batch: list[dict[str, Any]] = []
        buffer = b""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            consumed = offset
            while True:
                chunk = fh.read(READ_CHUNK)
                if not chunk:
                    break
                buffer += chunk
                lines = buffer.split(b"\n")
                buffer = lines.pop()  # an incomplete last line waits for more
                for raw in lines:
                    consumed += len(raw) + 1
                    row = self._decode(raw, consumed)
                    if row is not None:
                        batch.append(row)
                    if len(batch) >= batch_size:
                        yield batch, consumed
                        batch = []
        if batch:
            yield batch, consumed
        elif consumed > self._offset:
            # Only undecodable lines were left: move past them.
            self.commit(consumed)

    def commit(self, offset: int) -> None:
        """Record that everything before ``offset`` is in the database."""
        self._offset = offset
        tmp = self.offset_path.with_suffix(".tmp")
        try:
            tmp.write_text(str(offset))
            os.replace(tmp, self.offset_path)
        except OSError as exc:
            # Only a hint: the keys prevent duplicates without it.
            log.warning("cannot record the spool offset in %s: %s", self.offset_path, exc)

    def reset_if_drained(self) -> bool:
        """Empty the file when everything in it is replayed; True if empty."""
        with self._lock:
            if self._size > self._offset:
                return False
            if self._size == 0:
                return True
            # The offset goes first: a crash between the two steps leaves a
            # full file and offset 0, which replays harmlessly (keys).
            self.commit(0)
            try:
                os.ftruncate(self._fd, 0)
            except OSError as exc:
                raise SpoolError(
                    f"cannot truncate the spool {self.path}: {exc.strerror or exc}"
                ) from None
            self._size = 0
            return True

    # -- internals ---------------------------------------------------------------

    def _decode(self, raw: bytes, end: int) -> dict[str, Any] | None:
        try:
            row = json.loads(raw.decode("utf-8", "surrogateescape"))
            if not isinstance(row, dict) or "idempotency_key" not in row:
                raise ValueError("not a history row")
        except ValueError as exc:
            log.error("spool %s: unreadable line before byte %d set aside: %s", self.path, end, exc)
            self.reject({"raw": raw.decode("utf-8", "replace")}, f"unreadable spool line: {exc}")
            return None
        return row

    def _read_offset(self) -> int:
        try:
            return max(0, int(self.offset_path.read_text().strip() or 0))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable spool offset %s: %s", self.offset_path, exc)
            return 0

    def _trim_torn_tail(self) -> None:
        """Drop a last line cut short by a crash in the middle of a write;
        it was never fsynced, so no caller was told it was safe."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as fh:
            start = max(0, size - READ_CHUNK)
            fh.seek(start)
            tail = fh.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = start + cut + 1 if cut >= 0 else (0 if start == 0 else size)
        if keep == size:  # a single line longer than READ_CHUNK: leave it
            return
        log.warning("spool %s: dropping %d bytes of a torn last line", self.path, size - keep)
        os.ftruncate(self._fd, keep)


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n"
