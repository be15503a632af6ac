"""The history writer: the milter hands over each evaluated message with one
call that returns at once; a background thread stores them in batches.

Guarantees, in order of importance:

1. **Nothing is dropped.**  A row goes to the database or to the fsync'd
   spool (:mod:`dmarcmilter.history.spool`).  When the database is down or
   refuses a batch, the batch is spooled; when the in-memory queue is full,
   the caller spools the row itself.  On shutdown the queue is flushed.
2. **Exactly once.**  Every row gets an idempotency key when it is built;
   the spool is replayed in order and keys already stored are skipped, so a
   crash in the middle of a replay duplicates nothing.
3. **The mail path never waits.**  :meth:`HistoryWriter.enqueue` appends to
   a bounded deque, which takes well under a microsecond; building the row,
   the SQL and the fsync all happen on the writer thread.

The one window for loss is a hard kill (SIGKILL, power loss) while rows are
still in the in-memory queue: at most ``queue_size`` rows, usually the last
``flush_interval`` seconds.  Paying an fsync per message to close it would
cost more than the milter's whole evaluation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..errors import DatabaseError, SchemaError
from ..evaluation import Evaluation
from ..policy import Decision
from . import db
from .bulk import insert_rows
from .rows import LARGE_RECORD_CHARS, message_row
from .spool import Spool, SpoolError

log = logging.getLogger("dmarcmilter.history")

QUEUE_SIZE = 50_000
BATCH_SIZE = 1000
FLUSH_INTERVAL = 0.25  # seconds a row may wait for its batch to fill
RETRY_INITIAL = 0.5  # seconds before the first reconnection attempt
RETRY_MAX = 30.0

QueueItem = tuple[Evaluation, Decision] | dict[str, Any]


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters for metrics and logs; a snapshot, not live values."""

    queue_depth: int
    rows_written: int  # inserted into the database, directly or by replay
    rows_spooled: int  # appended to the spool
    rows_replayed: int  # inserted from the spool (also in rows_written)
    rows_rejected: int  # refused by the database as invalid, kept aside
    rows_lost: int  # could be neither stored nor spooled (disk and database down)
    write_errors: int  # failed database transactions
    spool_pending_bytes: int
    database_up: bool


class HistoryWriter:
    """One writer per process; see the module docstring."""

    def __init__(
        self,
        url: str,
        state_dir: Path,
        *,
        queue_size: int = QUEUE_SIZE,
        batch_size: int = BATCH_SIZE,
        flush_interval: float = FLUSH_INTERVAL,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.url = url
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._queue: collections.deque[QueueItem] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self._spool = Spool(state_dir)
        self._engine: Engine | None = None
        self._down = False
        self._retry_at = 0.0
        self._retry_delay = retry_initial
        self._counts = dict.fromkeys(
            ("written", "spooled", "replayed", "rejected", "errors", "lost"), 0
        )
        self._counts_lock = threading.Lock()

    @property
    def spool_path(self) -> Path:
        return self._spool.path

    # -- life cycle ----------------------------------------------------------------

    def start(self, *, check_schema: bool = True) -> None:
        """Open the database and start the thread.

        An unreachable database is not an error: rows are spooled until it is
        back.  A reachable database at the wrong schema is (SchemaError), so a
        daemon refuses to start rather than spool forever.
        """
        try:
            self._engine = db.make_engine(self.url)
            if check_schema:
                try:
                    db.check_schema(self.url)
                except SchemaError:
                    raise
                except DatabaseError as exc:
                    log.warning(
                        "history database unreachable at start (%s); spooling to %s",
                        exc,
                        self._spool.path,
                    )
                    self._mark_down()
        except DatabaseError:
            if self._engine is not None:
                self._engine.dispose()
            self._spool.close()
            raise
        if self._spool.pending:
            log.info(
                "history spool %s holds %d bytes from an earlier run; replaying",
                self._spool.path,
                self._spool.pending_bytes,
            )
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> bool:
        """Flush the queue (to the database, or the spool) and stop; False
        when the thread did not finish in time (its rows are then spooled)."""
        self._stopping = True
        self._wake.set()
        finished = True
        if self._thread is not None:
            self._thread.join(timeout)
            finished = not self._thread.is_alive()
            if not finished:
                log.error("history writer did not finish within %s s; spooling the queue", timeout)
        # Rows the thread did not get to (it is stuck on the database, or
        # died): spool them here.  The spool's lock keeps appends whole.
        while self._queue:
            self._spool_items(self._drain(self.batch_size))
        if finished:
            self._spool.close()
            if self._engine is not None:
                self._engine.dispose()
        return finished

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the queue is empty and the spool replayed (for tests,
        benchmarks and maintenance); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._spool.pending or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    # -- the mail path ---------------------------------------------------------------

    def enqueue(self, evaluation: Evaluation, decision: Decision) -> None:
        """Hand over one evaluated message.  Never blocks on the database,
        never raises."""
        record = evaluation.dmarc.record
        if record is not None and len(record.raw) > LARGE_RECORD_CHARS:
            # Queued as its capped row, built now: a queue of evaluations
            # would hold each attacker's DMARC record whole, up to 64 KB
            # apiece and queue_size of them while the database is slow.
            for row in self._rows([(evaluation, decision)]):
                self._put(row)
            return
        self._put((evaluation, decision))

    def enqueue_row(self, row: dict[str, Any]) -> None:
        """Hand over a row already built by :func:`rows.message_row`."""
        self._put(row)

    def _put(self, item: QueueItem) -> None:
        queue = self._queue
        if len(queue) < self.queue_size:
            queue.append(item)
            # Event.set takes a lock: skip it while a wake-up is pending.
            if len(queue) >= self.batch_size and not self._wake.is_set():
                self._wake.set()
            return
        # The writer is behind by a whole queue: spool in this thread rather
        # than drop the row or let the queue grow without bound.  The fsync
        # is left to the writer thread, woken here to do it.
        self._spool_items([item], sync=False)
        self._wake.set()

    # -- counters ----------------------------------------------------------------------

    def stats(self) -> WriterStats:
        with self._counts_lock:
            c = dict(self._counts)
        return WriterStats(
            queue_depth=len(self._queue),
            rows_written=c["written"],
            rows_spooled=c["spooled"],
            rows_replayed=c["replayed"],
            rows_rejected=c["rejected"],
            rows_lost=c["lost"],
            write_errors=c["errors"],
            spool_pending_bytes=self._spool.pending_bytes,
            database_up=not self._down,
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    # -- the writer thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            stopping = self._stopping
            self._busy = True
            try:
                self._cycle(stopping)
            except Exception:
                # A bug or a full disk must not end history for the life of
                # the process: log it and go on; unwritten rows stay queued.
                log.exception("history writer failed; retrying")
                if not stopping:
                    time.sleep(1.0)
            finally:
                self._busy = False
                with self._idle:
                    self._idle.notify_all()
            if stopping:
                return

    def _cycle(self, stopping: bool) -> None:
        self._spool.sync()  # rows callers spooled on overflow
        if (
            (self._spool.pending or self._down)
            and not stopping  # a long replay must not delay shutdown
            and time.monotonic() >= self._retry_at
        ):
            self._replay()
        # Bounded, so that under a steady stream the loop still comes back
        # to the reconnection check above.
        for _ in range(self.queue_size // self.batch_size + 1):
            if not self._queue:
                break
            items = self._drain(self.batch_size)
            if self._down or self._spool.pending:
                # Keep the order: new rows go behind the spooled ones.
                self._spool_items(items)
                continue
            rows = self._rows(items)
            if not self._write(rows, fresh=True):
                self._spool_rows(rows)

    def _drain(self, n: int) -> list[QueueItem]:
        queue = self._queue
        out: list[QueueItem] = []
        while queue and len(out) < n:
            out.append(queue.popleft())
        return out

    def _rows(self, items: Iterable[QueueItem]) -> list[dict[str, Any]]:
        rows = []
        for item in items:
            if isinstance(item, dict):
                rows.append(item)
                continue
            try:
                rows.append(message_row(*item))
            except Exception:
                self._count("lost")
                log.exception(
                    "history: cannot build the row of message %s; it is lost",
                    item[0].envelope.queue_id or "(no queue id)",
                )
        return rows

    def _spool_items(self, items: list[QueueItem], *, sync: bool = True) -> None:
        self._spool_rows(self._rows(items), sync=sync)

    def _spool_rows(self, rows: list[dict[str, Any]], *, sync: bool = True) -> None:
        try:
            self._spool.append(rows, sync=sync)
        except SpoolError as exc:
            # Database and disk both failing: nothing is left to keep them.
            self._count("lost", len(rows))
            log.error("history: %d rows lost: %s", len(rows), exc)
            return
        self._count("spooled", len(rows))

    def _write(self, rows: list[dict[str, Any]], *, fresh: bool) -> bool:
        """Insert one batch in one transaction; True when it is stored (rows
        the database refuses as invalid are set aside, not retried).  On a
        database failure, mark it down and return False."""
        assert self._engine is not None
        try:
            with self._engine.begin() as conn:
                inserted, rejected = insert_rows(conn, rows, skip_existing=not fresh)
        except ValueError:
            # A row the driver cannot even send (MalformedRow, or text it
            # cannot encode): find it one row at a time.
            return self._write_one_by_one(rows)
        except SQLAlchemyError as exc:
            self._count("errors")
            if not _is_data_error(exc):
                self._mark_down(exc)
                return False
            # Some row is refused; find it one row at a time so the rest
            # still get in.
            return self._write_one_by_one(rows)
        self._count("written", inserted)
        self._set_aside(rejected)
        self._mark_up()
        return True

    def _write_one_by_one(self, rows: list[dict[str, Any]]) -> bool:
        assert self._engine is not None
        for row in rows:
            try:
                with self._engine.begin() as conn:
                    inserted, rejected = insert_rows(conn, [row], skip_existing=True)
            except ValueError as exc:
                self._set_aside([(row, f"unusable row: {exc}")])
                continue
            except SQLAlchemyError as exc:
                if not _is_data_error(exc):
                    self._count("errors")
                    self._mark_down(exc)
                    # Rows stored so far are skipped by key when retried.
                    return False
                self._set_aside([(row, db.short_error(exc))])
                continue
            self._count("written", inserted)
            self._set_aside(rejected)
        self._mark_up()
        return True

    def _set_aside(self, rejected: list[tuple[dict[str, Any], str]]) -> None:
        for row, error in rejected:
            log.error(
                "history row %s refused by the database, kept in %s: %s",
                row.get("idempotency_key"),
                self._spool.rejected_path,
                error,
            )
            try:
                self._spool.reject(row, error)
            except SpoolError as exc:
                log.error("history: %s", exc)
                self._count("lost")
                continue
            self._count("rejected")

    def _replay(self) -> None:
        """Insert the spool's rows in order, one batch per transaction.  New
        rows arriving meanwhile are appended behind them."""
        replayed = 0
        for rows, end in self._spool.batches(self.batch_size):
            before = self._counts["written"]
            if not self._write(rows, fresh=False):
                if replayed:
                    log.info("history replay paused after %d rows", replayed)
                return
            self._spool.commit(end)
            n = self._counts["written"] - before
            replayed += n
            self._count("replayed", n)
            if len(self._queue) >= self.batch_size:
                self._spool_items(self._drain(len(self._queue)))
        if self._spool.reset_if_drained() and replayed:
            log.info("history spool replayed: %d rows stored", replayed)
        if self._down and not self._spool.pending:
            self._probe()

    def _probe(self) -> None:
        assert self._engine is not None
        try:
            with self._engine.connect() as conn:
                conn.execute(select(1))
        except SQLAlchemyError as exc:
            self._mark_down(exc)
            return
        self._mark_up()

    def _mark_down(self, exc: BaseException | None = None) -> None:
        if not self._down:
            detail = db.short_error(exc) if isinstance(exc, SQLAlchemyError) else str(exc or "")
            log.error("history database unavailable (%s); spooling to %s", detail, self._spool.path)
            self._retry_delay = self.retry_initial
        else:
            self._retry_delay = min(self._retry_delay * 2, self.retry_max)
        self._down = True
        self._retry_at = time.monotonic() + self._retry_delay

    def _mark_up(self) -> None:
        if self._down:
            log.info("history database available again")
        self._down = False
        self._retry_delay = self.retry_initial
        self._retry_at = 0.0


def _is_data_error(exc: SQLAlchemyError) -> bool:
    """Whether the database refused the data (retrying cannot help) rather
    than being unreachable or failing (retrying later can)."""
    if not isinstance(exc, DBAPIError) or exc.connection_invalidated:
        return False
    dbapi = type(exc.orig).__name__ if exc.orig is not None else ""
    return dbapi in ("IntegrityError", "DataError") or type(exc).__name__ in (
        "IntegrityError",
        "DataError",
    )
