"""The history writer: the milter hands over each evaluated message before
it answers it; a background thread stores the rows in batches.

Guarantees, in order of importance:

1. **No row that got a reply is lost to a process kill.**  :meth:`enqueue`
   builds the row and appends it to the journal
   (:mod:`dmarcmilter.history.journal`) with one ``write()`` before the milter
   replies; the database gets it from the in-memory queue.  When the
   database is down or the queue is full, the writer drops its in-memory
   copies and replays the journal instead, fsyncing it as it goes.
2. **Exactly once.**  Every row gets an idempotency key when it is built,
   and every replay skips keys already stored, so a crash in the middle of a
   replay, or a lost commit acknowledgement, duplicates nothing.
3. **The mail path never waits for the database.**  Only the row, its JSON
   line and one ``write()`` to the page cache happen there.
4. **A loss is counted exactly.**  A row is lost only when it can be neither
   appended to the journal (a full or read-only file system) nor stored in
   the database before it must leave memory; each is counted once and
   logged.

Failure incidents (RFC 9991 failure reports due) are the exception to the
first guarantee, by design: deciding and building one costs more than the
rest of the row, so the milter only hands the writer what it holds, and the
writer thread builds the incident at its next cycle and journals it as a
line of its own, after its message's line (then stored like any row, once
per message).  A process kill in between (a flush interval, 0.25 s) loses
those incidents, never their messages; at most MAX_PENDING_FAILURES wait,
and the rest are counted (``failures_lost``) and logged.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from ..errors import DatabaseError, SchemaError
from ..evaluation import Evaluation
from ..policy import Decision
from . import db
from .bulk import insert_rows
from .journal import SEGMENT_BYTES, Journal, JournalError, Position, encode_line
from .rows import (
    FailureMaterial,
    bounces_line,
    failure_candidate,
    failure_entry,
    failure_line,
    kept_material,
    message_row,
)

log = logging.getLogger("dmarcmilter.history")

QUEUE_SIZE = 50_000
BATCH_SIZE = 1000
FLUSH_INTERVAL = 0.25  # seconds a row may wait for its batch to fill
RETRY_INITIAL = 0.5  # seconds before the first reconnection attempt
RETRY_MAX = 30.0
# How often a journal that cannot be written is tried again (making a
# segment that fails is cheap), and how often rows kept only in memory or
# lost are reported while that lasts.
JOURNAL_RETRY = 1.0
TROUBLE_LOG_INTERVAL = 30.0
# Messages whose failure incident waits for the writer thread (each holds
# its evaluation, header fields and at most MAX_SAMPLE_BODY_BYTES of body).
# Past it an incident is not recorded (failures_lost, logged).
MAX_PENDING_FAILURES = 10_000
# ... and in bytes: the header fields and sample bodies they keep alive.  A
# message may carry up to milter.MAX_HEADER_BYTES of header fields, so the
# count alone would let a flood of huge headers pin gigabytes.  Past it an
# incident is not recorded (failures_lost, logged).
MAX_PENDING_FAILURE_BYTES = 64 * 1024 * 1024


class Queued(NamedTuple):
    row: dict[str, Any]
    # Where the row's line is in the journal: a segment and the offsets of
    # the line's start and end; generation -1 when it could not be appended
    # (the row then exists only here).
    generation: int
    offset: int
    end_offset: int

    @property
    def start(self) -> Position | None:
        return Position(self.generation, self.offset) if self.generation >= 0 else None

    @property
    def end(self) -> Position | None:
        return Position(self.generation, self.end_offset) if self.generation >= 0 else None


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters for metrics and logs; a snapshot, not live values."""

    queue_depth: int
    rows_written: int  # inserted into the database, directly or by replay
    rows_replayed: int  # inserted from the journal (also in rows_written)
    rows_unjournaled: int  # could not be appended to the journal; kept in memory
    rows_rejected: int  # refused by the database as invalid, kept aside
    rows_lost: int  # could be neither journaled nor stored in the database
    write_errors: int  # failed database transactions
    journal_bytes: int
    journal_writable: bool
    database_up: bool
    catching_up: bool  # rows wait in the journal for the database
    # Failure incidents that could not be built (their messages are recorded).
    failures_lost: int = 0


class HistoryWriter:
    """One writer per process; see the module docstring.

    ``unwritable_journal`` is what :meth:`start` does when the state
    directory cannot take the journal: "continue" (rows go straight to the
    database, and are lost if it fails too) or "refuse" (JournalError).
    """

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
        segment_bytes: int = SEGMENT_BYTES,
        unwritable_journal: str = "continue",
    ) -> None:
        self.url = url
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.unwritable_journal = unwritable_journal
        # Orders journal appends and the queue, so that the queue holds the
        # journal's rows in the journal's order.
        self._lock = threading.Lock()
        self._queue: collections.deque[Queued] = collections.deque()
        # False while rows wait in the journal from _catchup_from on; the
        # queue then holds only rows the journal could not take.
        self._live = True
        self._catchup_from: Position | None = None
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._stopping = False
        # Set by close(): the journal is closed, no row can be kept any more.
        self._closed = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self._journal = Journal(state_dir, segment_bytes=segment_bytes)
        self._journal_retry_at = 0.0
        self._reported = (0, 0)  # (unjournaled, lost) at the last report
        self._report_at = 0.0
        self._engine: Engine | None = None
        self._down = False
        self._retry_at = 0.0
        self._retry_delay = retry_initial
        self._counts = dict.fromkeys(
            ("written", "replayed", "unjournaled", "rejected", "errors", "lost", "failures_lost"),
            0,
        )
        self._counts_lock = threading.Lock()
        # Messages whose failure incident the writer thread has to build:
        # (row, evaluation, decision, material).  deque.append and popleft
        # are atomic: the milter threads append, the writer thread takes.
        self._failures: collections.deque[
            tuple[dict[str, Any], Evaluation, Decision, FailureMaterial]
        ] = collections.deque()
        self._failures_reported = 0
        # What the waiting incidents hold (FailureMaterial.held_bytes); only
        # ever changed under _counts_lock.
        self._failures_bytes = 0

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (for /health and metrics)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def journal_directory(self) -> Path:
        return self._journal.directory

    # -- life cycle ----------------------------------------------------------------

    def start(self, *, check_schema: bool = True) -> None:
        """Open the journal and the database and start the thread.

        An unreachable database is not an error: rows wait in the journal
        until it is back.  A reachable database at the wrong schema is
        (SchemaError), so a daemon refuses to start rather than journal
        forever.
        """
        try:
            try:
                self._journal.open_segment()
            except JournalError as exc:
                if self.unwritable_journal == "refuse":
                    raise
                log.error(
                    "%s; history rows go straight to the database and are lost if it "
                    'fails too (paths.unwritable_state_dir = "continue")',
                    exc,
                )
                self._journal_retry_at = time.monotonic() + JOURNAL_RETRY
            self._engine = db.make_engine(self.url)
            if check_schema:
                try:
                    db.check_schema(self.url)
                except SchemaError:
                    raise
                except DatabaseError as exc:
                    self._mark_down(exc)
        except DatabaseError:
            if self._engine is not None:
                self._engine.dispose()
            self._journal.close()
            raise
        backlog = self._journal.backlog
        if backlog is not None:
            log.info(
                "history journal in %s holds %d bytes from an earlier run; replaying",
                self._journal.directory,
                self._journal.size_bytes(),
            )
            self._live = False
            self._catchup_from = backlog
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> bool:
        """Store the queue (or leave it in the journal) and stop; False when
        the thread did not finish in time."""
        self._stopping = True
        self._wake.set()
        finished = True
        if self._thread is not None:
            self._thread.join(timeout)
            finished = not self._thread.is_alive()
            if not finished:
                log.error("history writer did not finish within %s s", timeout)
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
            self._closed = True
        lost = sum(1 for item in left if item.start is None)
        if self._failures:
            # The thread did not finish: these incidents were never built.
            self._count("failures_lost", len(self._failures))
            self._failures.clear()
            self._failures_bytes = 0
        if lost:
            # Neither in the journal nor in the database: nothing keeps them.
            self._count("lost", lost)
        self._report_at = 0.0
        self._report_trouble()
        if finished:
            self._journal.close()
            if self._engine is not None:
                self._engine.dispose()
        return finished

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every row is in the database (for tests, benchmarks and
        maintenance); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._failures or not self._live or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    # -- the mail path ---------------------------------------------------------------

    def enqueue(
        self,
        evaluation: Evaluation,
        decision: Decision,
        failure: FailureMaterial | None = None,
    ) -> None:
        """Hand over one evaluated message, before it is answered.  Never
        blocks on the database, never raises.

        ``failure`` (given when failure reports are on) is what the milter
        holds for a failure report.  When the message's record has a ruf
        (:func:`rows.failure_candidate`), it waits, with the evaluation,
        for the writer thread, which decides whether a report is due and
        builds the incident (:func:`rows.failure_entry`) off the mail path;
        the incident's own journal line follows the message's.
        """
        try:
            row = message_row(evaluation, decision)
        except Exception:
            self._count("lost")
            log.exception(
                "history: cannot build the row of message %s; it is lost",
                evaluation.envelope.queue_id or "(no queue id)",
            )
            return
        self.enqueue_row(row)
        if failure is not None and not self._closed and failure_candidate(evaluation):
            material = kept_material(failure)
            size = material.held_bytes
            with self._counts_lock:
                room = (
                    len(self._failures) < MAX_PENDING_FAILURES
                    and self._failures_bytes + size <= MAX_PENDING_FAILURE_BYTES
                )
                if room:
                    self._failures_bytes += size
                    self._failures.append((row, evaluation, decision, material))
            if not room:
                self._count("failures_lost")

    def enqueue_bounces(self, bounces: list[dict[str, Any]]) -> None:
        """Hand over the hard bounces (:func:`rows.bounce_row`) a delivery
        status notification to the report address names, before the milter
        answers it; journaled like a row, stored once.  Never raises."""
        if bounces:
            self.enqueue_row(bounces_line(bounces))

    def enqueue_row(self, row: dict[str, Any]) -> None:
        """Hand over a row already built by :func:`rows.message_row`."""
        data = encode_line(row)
        lost = behind = False
        with self._lock:
            closed = self._closed
            span = None if closed else self._journal.append(data)
            queue = self._queue
            if closed:
                # A transaction that ended after the daemon closed its
                # history (the milter answers until the process exits).
                lost = True
            elif span is None:
                # Only in memory: kept until the database takes it.
                if len(queue) < self.queue_size:
                    queue.append(Queued(row, -1, 0, 0))
                else:
                    lost = True
            elif self._live:
                if len(queue) < self.queue_size:
                    queue.append(Queued(row, *span))
                else:
                    # The writer is a whole queue behind: it reads the
                    # journal from the oldest queued row instead.
                    first = next(
                        (item.start for item in queue if item.start),
                        Position(span[0], span[1]),
                    )
                    self._enter_catchup(first)
                    behind = True
            wake = len(queue) >= self.batch_size
        if closed:
            self._count("lost")
            log.error(
                "history: row %s lost: it came after the history writer was closed",
                row.get("idempotency_key"),
            )
            return
        if span is None:
            self._count("unjournaled")
        if lost:
            self._count("lost")
        if behind:
            log.info(
                "history writer %d rows behind the milter; reading them back from the journal",
                self.queue_size,
            )
        # Event.set takes a lock: skip it while a wake-up is pending.
        if wake and not self._wake.is_set():
            self._wake.set()

    def _enter_catchup(self, start: Position) -> None:
        """Called with the lock held: from ``start`` on, rows are read from
        the journal; the queue keeps only rows the journal does not have."""
        if self._catchup_from is None or start < self._catchup_from:
            self._catchup_from = start
        self._live = False
        kept = [item for item in self._queue if item.start is None]
        self._queue.clear()
        self._queue.extend(kept)

    # -- counters ----------------------------------------------------------------------

    def stats(self) -> WriterStats:
        with self._counts_lock:
            c = dict(self._counts)
        return WriterStats(
            queue_depth=len(self._queue),
            rows_written=c["written"],
            rows_replayed=c["replayed"],
            rows_unjournaled=c["unjournaled"],
            rows_rejected=c["rejected"],
            rows_lost=c["lost"],
            write_errors=c["errors"],
            journal_bytes=self._journal.size_bytes(),
            journal_writable=self._journal.writable,
            database_up=not self._down,
            catching_up=not self._live,
            failures_lost=c["failures_lost"],
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

    def _record_failures(self) -> None:
        """Build the failure incidents waiting for the writer thread and
        hand each over as a line of its own, after its message's line."""
        pending = self._failures
        while pending:
            row, evaluation, decision, material = pending.popleft()
            with self._counts_lock:
                self._failures_bytes -= material.held_bytes
            try:
                entry = failure_entry(evaluation, decision, material)
                if entry is not None:
                    self.enqueue_row(failure_line(row, entry))
            except Exception:
                self._count("failures_lost")
                log.exception(
                    "history: cannot build the failure incident of message %s; "
                    "the message is recorded without it",
                    evaluation.envelope.queue_id or "(no queue id)",
                )

    def _cycle(self, stopping: bool) -> None:
        self._record_failures()
        self._report_trouble()
        now = time.monotonic()
        if not self._journal.writable and now >= self._journal_retry_at:
            self._reopen_journal()
        self._journal.prepare()
        if not self._live:
            # Rows wait in the journal for the database: make them survive
            # a power loss too.
            self._journal.sync()
            if not stopping and now >= self._retry_at:  # a long replay must not delay shutdown
                self._catch_up()
        # Bounded, so that under a steady stream the loop still comes back
        # to the checks above.
        for _ in range(self.queue_size // self.batch_size + 1):
            if self._down and time.monotonic() < self._retry_at:
                self._leave_to_journal()
                return
            with self._lock:
                items = self._drain(self.batch_size)
            if not items:
                return
            try:
                stored = self._write([item.row for item in items], fresh=True)
            except BaseException:
                # A bug must not take the batch with it: the journaled rows
                # are read back from the journal, the others requeued.
                self._put_back(items)
                raise
            if not stored:
                self._put_back(items)
                return
            ends = [item.end for item in items if item.end is not None]
            if ends and self._live:
                self._journal.release(ends[-1])

    def _drain(self, n: int) -> list[Queued]:
        queue = self._queue
        out: list[Queued] = []
        while queue and len(out) < n:
            out.append(queue.popleft())
        return out

    def _leave_to_journal(self) -> None:
        """The database is down: journaled rows wait in the journal, not in
        memory."""
        with self._lock:
            first = next((item.start for item in self._queue if item.start), None)
            if first is not None:
                self._enter_catchup(first)

    def _report_trouble(self) -> None:
        """Log rows kept only in memory and rows lost since the last report,
        at most every TROUBLE_LOG_INTERVAL seconds (a full disk must not flood the
        log with a line per message); the counters are exact."""
        now = time.monotonic()
        if now < self._report_at:
            return
        with self._counts_lock:
            unjournaled, lost = self._counts["unjournaled"], self._counts["lost"]
            failures_lost = self._counts["failures_lost"]
        if failures_lost > self._failures_reported:
            log.error(
                "history: %d failure incidents not recorded (%d in all since start): "
                "more than %d (or %d MiB) waited for the writer thread, or they could "
                "not be built",
                failures_lost - self._failures_reported,
                failures_lost,
                MAX_PENDING_FAILURES,
                MAX_PENDING_FAILURE_BYTES // (1024 * 1024),
            )
            self._failures_reported = failures_lost
            self._report_at = now + TROUBLE_LOG_INTERVAL
        new_unjournaled = unjournaled - self._reported[0]
        new_lost = lost - self._reported[1]
        if not new_unjournaled and not new_lost:
            return
        self._reported = (unjournaled, lost)
        self._report_at = now + TROUBLE_LOG_INTERVAL
        if new_unjournaled:
            log.error(
                "history: %d rows could not be journaled (%s); they wait in memory "
                "for the database (%d in all since start)",
                new_unjournaled,
                self._journal.last_error or "the journal is not writable",
                unjournaled,
            )
        if new_lost:
            log.error(
                "history: %d rows lost: neither journaled nor stored (%d in all since start)",
                new_lost,
                lost,
            )

    def _put_back(self, items: list[Queued]) -> None:
        """A batch the database did not take: its journaled rows are read
        from the journal later; rows only in memory go back to the front of
        the queue (as far as there is room; the rest are lost, counted)."""
        with self._lock:
            first = next((item.start for item in items if item.start), None)
            if first is not None:
                self._enter_catchup(first)
            memory = [item for item in items if item.start is None]
            room = max(0, self.queue_size - len(self._queue))
            self._queue.extendleft(reversed(memory[:room]))
            lost = len(memory) - min(len(memory), room)
        if lost:
            self._count("lost", lost)

    def _catch_up(self) -> None:
        """Store the rows waiting in the journal, then go back to the queue.

        The rows appended while the first pass ran (the tail) were not
        queued: the switch back to the queue is made under the lock, and
        the tail is read from the journal right after it, before any queued
        row.  So every row is stored by exactly one of the two paths.
        """
        with self._lock:
            start, end = self._catchup_from, self._journal.end()
        if start is None:
            return
        backlog = self._replay(start, end)
        if backlog is None:
            return
        with self._lock:
            start, end = self._catchup_from, self._journal.end()
            self._live = True
            self._catchup_from = None
        tail = self._replay(start, end) if start is not None else 0
        if tail is None:
            return
        if backlog + tail:
            log.info("history journal replayed: %d rows stored", backlog + tail)
        if self._down:
            self._probe()

    def _replay(self, start: Position, end: Position) -> int | None:
        """Store the journal's rows from ``start`` to ``end``; the number of
        rows stored, or None when the database failed (the writer is then
        catching up again from the first row not stored)."""
        stored = 0
        for rows, after in self._journal.read(start, end, self.batch_size):
            if rows:
                before = self._counts["written"]
                try:
                    written = self._write(rows, fresh=False)
                except BaseException:
                    with self._lock:
                        self._enter_catchup(start)
                    raise
                if not written:
                    with self._lock:
                        self._enter_catchup(start)
                    return None
                n = self._counts["written"] - before
                stored += n
                self._count("replayed", n)
            start = after
            with self._lock:
                if self._catchup_from is not None and not self._live:
                    self._catchup_from = max(self._catchup_from, after)
            self._journal.release(after)
            if self._stopping:
                with self._lock:
                    self._enter_catchup(after)
                return None
        return stored

    def _reopen_journal(self) -> None:
        with self._lock:
            try:
                self._journal.open_segment()
            except JournalError as exc:
                self._journal_retry_at = time.monotonic() + JOURNAL_RETRY
                self._journal.last_error = str(exc)
                return
        log.info("history journal writable again in %s", self._journal.directory)

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
                self._journal.rejected_path,
                error,
            )
            try:
                self._journal.reject(row, error)
            except JournalError as exc:
                log.error("history: %s", exc)
                self._count("lost")
                continue
            self._count("rejected")

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
            log.error(
                "history database unavailable (%s); rows wait in the journal in %s",
                detail or "no detail",
                self._journal.directory,
            )
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
