"""``dmarcmilter run``: the long-running milter process.

Start-up: load and check the configuration, set up logging, prepare the
history database (an empty one is created; one at an older schema makes the
daemon refuse to start, an unreachable one does not), start the history
writer, open the milter socket, and serve.

Signals.  libmilter blocks SIGTERM, SIGHUP and SIGINT in the thread that runs
its main loop and every thread it starts, and waits for them in a thread of
its own, which treats SIGHUP like SIGTERM.  So libmilter runs in a secondary
thread, and the Python main thread, which leaves those signals unblocked,
receives them (the kernel hands a process signal to the main thread first):

* SIGTERM, SIGINT: stop accepting connections (a unix socket is removed; a
  TCP listener keeps serving until the end), let the messages in progress
  finish (up to ``SHUTDOWN_GRACE`` seconds), flush the history, exit 0.
  libmilter's own stop (smfi_stop) is not used: it cuts the connections in
  progress short;
* SIGHUP: reload the configuration.  A configuration with an error is
  refused with a log line and the running one stays in force; settings that
  only a restart can change (the socket, the database, the state directory)
  are reported and left as they are.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from queue import SimpleQueue
from types import FrameType
from typing import Any

import Milter

from . import __version__
from .config import Config, SocketSpec, load_config, parse_socket
from .errors import ConfigError, DatabaseError, DmarcMilterError, SchemaError
from .history import db
from .history.writer import HistoryWriter
from .logline import json_line, logfmt
from .metrics import HealthSources, Metrics, MetricsListener, parse_listen, report_file_path
from .milter import ACTION_FLAGS, MilterState, Runtime, milter_factory, register_callbacks

log = logging.getLogger("dmarcmilter")

MILTER_NAME = "dmarcmilter"
# Seconds a stop waits for the messages in progress.
SHUTDOWN_GRACE = 30.0
STOP_SETTLE = 0.2
SYSLOG_SOCKET = "/dev/log"
# Settings read once at start-up.
RESTART_ONLY = (
    "milter.socket",
    "milter.socket_mode",
    "paths.state_dir",
    "database.url",
    "metrics.listen",
)


class StartupError(DmarcMilterError):
    """The daemon cannot start; the message says why and what to do."""


# -- logging ---------------------------------------------------------------------


class LineFormatter(logging.Formatter):
    """Every log line as logfmt or JSON.  A per-message record carries its
    fields in ``record.fields``; other records become level + msg."""

    def __init__(self, fmt: str, timestamps: bool) -> None:
        super().__init__()
        self.json = fmt == "json"
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if self.timestamps:
            fields["ts"] = (
                dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            ).replace("+00:00", "Z")
        fields["level"] = record.levelname.lower()
        fields["msg"] = record.getMessage()
        fields.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["error"] = record.exc_text
        return json_line(fields) if self.json else logfmt(fields)


def configure_logging(config: Config) -> None:
    settings = config.log
    handler: logging.Handler
    if settings.target == "syslog":
        facility = logging.handlers.SysLogHandler.facility_names[settings.syslog_facility]
        try:
            # SysLogHandler ignores a socket it cannot reach and then drops
            # every line: try it here, so a missing syslog is an error.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(SYSLOG_SOCKET)
            handler = logging.handlers.SysLogHandler(SYSLOG_SOCKET, facility=facility)
        except OSError as exc:
            raise StartupError(
                f"log.target: cannot log to syslog at {SYSLOG_SOCKET}: {exc.strerror or exc}"
            ) from None
        handler.ident = "dmarcmilter: "
        handler.setFormatter(LineFormatter(settings.format, timestamps=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(settings.format, timestamps=True))
    # The milter's threads only queue their lines; one thread writes them.
    # A thread writing under the handler's lock would otherwise hold up
    # every other message's end-of-message behind a slow stderr or syslog.
    queue: SimpleQueue[logging.LogRecord] = SimpleQueue()
    listener = logging.handlers.QueueListener(queue, handler)
    listener.start()
    root = logging.getLogger("dmarcmilter")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(_QueueHandler(queue))
    root.setLevel(settings.level.upper())
    root.propagate = False
    stop_logging()
    _listeners.append(listener)


_listeners: list[logging.handlers.QueueListener] = []


def stop_logging() -> None:
    """Write what is queued and stop the writing thread."""
    while _listeners:
        listener = _listeners.pop()
        listener.stop()
        for handler in listener.handlers:
            handler.close()


class _QueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Only what cannot wait: the message with its arguments, and the
        # traceback text.  The line itself is formatted by the writer.
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


# -- start-up --------------------------------------------------------------------


def prepare_database(url: str) -> None:
    """Create the schema in an empty database; refuse one that is behind.
    An unreachable database is left to the writer: rows wait in its journal."""
    try:
        current, head = db.schema_status(url)
    except DatabaseError as exc:
        log.warning("history database unreachable at start: %s; rows wait in the journal", exc)
        return
    if current is None:
        log.info("creating the history schema in an empty database")
        db.upgrade(url)
    elif current != head:
        raise SchemaError(
            f"history database schema is at {current}, this dmarcmilter needs {head}: "
            "run `dmarcmilter db upgrade`"
        )


def check_socket(spec: SocketSpec) -> None:
    """Say plainly why the socket cannot be opened, before libmilter says
    only that it failed."""
    if spec.family == "unix":
        directory = Path(spec.address).parent
        if not directory.is_dir():
            raise StartupError(f"milter.socket: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StartupError(f"milter.socket: cannot create a socket in {directory}")
        return
    family = socket.AF_INET if spec.family == "inet" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((spec.address, spec.port))
        except OSError as exc:
            raise StartupError(
                f"milter.socket: cannot listen on {spec.address} port {spec.port}: "
                f"{exc.strerror or exc}"
            ) from None


class Daemon:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self.spec = parse_socket(self.config.milter.socket)
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.wake = threading.Event()
        self.state: MilterState | None = None
        self.writer: HistoryWriter | None = None
        self.metrics: Metrics | None = None
        self.listener: MetricsListener | None = None

    def run(self) -> int:
        configure_logging(self.config)
        try:
            self._run()
        finally:
            stop_logging()
        return 0

    def _run(self) -> None:
        check_socket(self.spec)
        state_dir = self.config.effective_state_dir()
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"paths.state_dir: cannot create {state_dir}: {exc.strerror or exc}"
            ) from None
        url = self.config.database_url()
        prepare_database(url)
        self.writer = HistoryWriter(
            url, state_dir, unwritable_journal=self.config.paths.unwritable_state_dir
        )
        self.writer.start()
        self.state = MilterState(Runtime.build(self.config), self.writer)
        try:
            self._prepare_metrics()
            thread = self._start_milter()
            self._start_listener(thread)
            log.info(
                "dmarcmilter %s listening on %s",
                __version__,
                self.spec.libmilter,
                extra={"fields": {"state_dir": str(state_dir), "database": db.shown(url)}},
            )
            self._serve(thread)
        finally:
            self._finish()

    def _prepare_metrics(self) -> None:
        """With [metrics] listen set: the registry, counted from now on, and
        the listener's socket (bound here, so a port in use stops the start)."""
        listen = self.config.metrics.listen
        if not listen:
            return
        assert self.state is not None
        metrics = Metrics(report_file_path(self.config))
        metrics.state.writer = self.writer
        state = self.state
        metrics.state.resolver = lambda: state.runtime.resolver
        metrics.state.in_progress = lambda: state.active
        try:
            self.listener = MetricsListener(metrics, listen)
        except (ValueError, OSError) as exc:
            raise StartupError(str(exc.strerror if isinstance(exc, OSError) else exc)) from None
        self.metrics = metrics
        state.metrics = metrics

    def _start_listener(self, thread: threading.Thread) -> None:
        if self.listener is None:
            return
        self.listener.health = HealthSources(thread.is_alive, self.spec, self.writer)
        self.listener.start()
        log.info(
            "metrics and health listening",
            extra={"fields": {"metrics_listen": self.listener.bound}},
        )

    def _start_milter(self) -> threading.Thread:
        assert self.state is not None
        Milter.factory = milter_factory(self.state)
        Milter.set_flags(ACTION_FLAGS)
        # An exception escaping a callback (pymilter raises one itself when a
        # HELO name is not UTF-8, before our callback runs) must not change
        # what happens to the message.
        Milter.set_exception_policy(Milter.CONTINUE)
        milter = Milter.milter
        register_callbacks(milter)
        milter.setconn(self.spec.libmilter)
        milter.settimeout(self.config.milter.timeout)
        milter.register(
            MILTER_NAME,
            data=lambda ctx: ctx.getpriv().data(),
            unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
            negotiate=Milter.negotiate_callback,
        )
        try:
            milter.opensocket(True)  # True: replace a stale unix socket
        except Milter.error as exc:
            raise StartupError(f"milter.socket: cannot open {self.spec.libmilter}: {exc}") from None
        if self.spec.family == "unix":
            os.chmod(self.spec.address, int(self.config.milter.socket_mode, 8))
        thread = threading.Thread(target=self._milter_main, name="libmilter", daemon=True)
        thread.start()
        return thread

    def _milter_main(self) -> None:
        try:
            Milter.milter.main()
        except Exception:
            log.exception("the milter loop failed")
        finally:
            # However libmilter ended, the main thread must notice.
            self.stop_requested.set()
            self.wake.set()

    def _serve(self, thread: threading.Thread) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        while not self.stop_requested.is_set():
            self.wake.wait(1.0)
            self.wake.clear()
            if self.reload_requested.is_set() and not self.stop_requested.is_set():
                self.reload_requested.clear()
                self.reload()
        assert self.state is not None
        self.state.stopping = True
        # Commands already sent by the MTA but not yet read (MAIL FROM needs
        # no reply, so the MTA does not wait for it) start their transaction
        # a moment later: let them, so they count as in progress.
        time.sleep(STOP_SETTLE)
        ticket = self.state.admit_no_more()
        if self.spec.family == "unix":
            # No new connections: the MTA finds no socket and applies its
            # milter_default_action.  (libmilter's own stop would also cut
            # the connections in progress short.)
            with contextlib.suppress(OSError):
                os.unlink(self.spec.address)
            log.info("stopping: no new connections; waiting for messages in progress")
        else:
            log.info("stopping: waiting for messages in progress")
        if not self.state.wait_for(ticket, SHUTDOWN_GRACE):
            log.warning("stopping with messages still in progress after %.0f s", SHUTDOWN_GRACE)
        # libmilter is not asked to stop: smfi_stop waits up to 5 s for its
        # listener's select() and then cuts any connection still open.  The
        # process exits instead, which closes the listener at once; a
        # connection opened after the stop began gets the MTA's
        # milter_default_action, as for a milter that is down.
        del thread

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()
        self.wake.set()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        # The work happens in the main loop, not in the signal handler.
        self.reload_requested.set()
        self.wake.set()

    def reload(self) -> bool:
        """Load the configuration file again; True when it took effect."""
        done = self._reload()
        if self.metrics is not None:
            self.metrics.reloaded(done)
        return done

    def _reload(self) -> bool:
        assert self.state is not None
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            return False
        for key in RESTART_ONLY:
            if _setting(new, key) != _setting(self.config, key):
                log.warning("%s changed: it takes effect at the next restart", key)
        try:
            if new.metrics.listen:
                parse_listen(new.metrics.listen)
            runtime = Runtime.build(new, self.state.runtime)
            # Logging goes first: a syslog socket that cannot be opened
            # refuses the whole file, before anything changed.
            configure_logging(new)
        except (ValueError, DmarcMilterError) as exc:
            log.error("configuration not reloaded, the running one stays: %s", exc)
            return False
        self.config = new
        self.state.runtime = runtime
        if self.metrics is not None:
            self.metrics.report.path = report_file_path(new)
        log.info("configuration reloaded from %s", self.config_path or "the defaults")
        return True

    def _finish(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self.writer is not None:
            if not self.writer.close():
                log.error("history writer did not finish; its rows wait in the journal")
            stats = self.writer.stats()
            log.info(
                "stopped",
                extra={
                    "fields": {
                        "rows_written": stats.rows_written,
                        "rows_replayed": stats.rows_replayed,
                        "rows_unjournaled": stats.rows_unjournaled,
                        "rows_lost": stats.rows_lost,
                        "journal_bytes": stats.journal_bytes,
                    }
                },
            )
        if self.spec.family == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.spec.address)


def _setting(config: Config, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def run(config_path: str | None) -> int:
    """The ``run`` command; raises DmarcMilterError for a clean exit 2."""
    return Daemon(config_path).run()
