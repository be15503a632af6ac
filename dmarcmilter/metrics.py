"""Prometheus metrics and the health endpoint ([metrics] listen).

One registry of our own (not prometheus_client's global one), every metric
family, and a small HTTP listener serving ``GET /metrics`` (the Prometheus
text format) and ``GET /health`` (JSON, for an orchestrator).

Cost on the mail path.  The milter calls the sink once per message, at the
end of end-of-message, with the facts its log line already holds (the
evaluation, the decision, the message's DNS query log); the label
children are looked up once, at start, so a message costs a few counter
increments and histogram observations, each under prometheus_client's own
small lock.  With no listener configured the sink is :data:`NO_METRICS`,
whose methods do nothing.  The history writer's counters, the DNS cache size
and the report job's file are read when Prometheus scrapes, never on the
mail path.

Bounded labels: every label value comes from an enum of ours (a result, a
disposition, a skip reason, a DNS outcome); none takes a domain name, an
address, a selector or any other text a sender chooses.  The report job's
file is re-exported as it is, but only its ``dmarcmilter_report_*`` families,
from a file of at most :data:`MAX_REPORT_FILE_BYTES` (the job writes it; a
larger one or one that does not parse is ignored and counted).

No authentication: the listener is meant for loopback or a management
network, like node_exporter.  What it serves are counts (no domain, address
or message content), and it accepts only GET on two paths, each request
bounded in time and in number (:data:`MAX_REQUESTS`, :data:`REQUEST_TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import ipaddress
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from . import __version__
from .dmarc import DMARCResultCode, OverrideReason
from .policy import Action, Disposition, QuarantineMethod
from .record import Policy
from .resolver import DNSStatus
from .results import DKIMResultCode, SPFResultCode

if TYPE_CHECKING:
    from .config import Config, SocketSpec
    from .evaluation import Evaluation
    from .history.writer import HistoryWriter
    from .policy import Decision
    from .resolver import DNSSession, Resolver

log = logging.getLogger("dmarcmilter")

# The report job's metrics file: larger than this, it is not read (the job
# writes a few kilobytes); only its dmarcmilter_report_* families are served.
MAX_REPORT_FILE_BYTES = 1024 * 1024
REPORT_PREFIX = "dmarcmilter_report_"
REPORT_FILE_NAME = "report-metrics.prom"
# HTTP requests served at once; one more is answered 503 at once.  Seconds a
# client may take to send its request (a slow client holds one slot).
MAX_REQUESTS = 4
REQUEST_TIMEOUT = 5.0
# Seconds /health waits to connect to the milter socket.
HEALTH_CONNECT_TIMEOUT = 1.0

SKIP_REASONS = (
    "authenticated",
    "local",
    "trusted_network",
    "no_client_address",
    "stopping",
)
# The milter's answer, with the way a quarantine was carried out.
MILTER_ACTIONS = ("accept", "quarantine_header", "quarantine_hold", "reject", "tempfail")
# Evaluation is fast unless DNS is slow; DNS waits are bounded by the
# per-message budget ([dns] budget, 8 s by default).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
DNS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4)


class Sink:
    """What the milter and the daemon tell the metrics; this base does nothing
    (no listener configured), so the mail path pays one call per message."""

    def evaluated(
        self,
        evaluation: Evaluation,
        decision: Decision,
        verdict: Action,
        dns: DNSSession,
        evaluation_seconds: float,
        eom_seconds: float,
    ) -> None:
        pass

    def skipped(self, reason: str, action: str, eom_seconds: float) -> None:
        pass

    def internal_error(self, action: str, eom_seconds: float) -> None:
        pass

    def aborted(self) -> None:
        pass

    def reloaded(self, success: bool) -> None:
        pass


NO_METRICS = Sink()


_F = TypeVar("_F", bound=Callable[..., None])


def _never_raises(method: _F) -> _F:
    """Counting runs on the mail path after the verdict is made: a fault in
    it must not turn into the internal-error action for the message.  The
    first fault of a Metrics is logged with its traceback, later ones are
    only counted (``faults``), so a fault that repeats cannot flood the log."""

    @functools.wraps(method)
    def guarded(self: Metrics, *args: Any, **kwargs: Any) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.faults += 1
            if self.faults == 1:
                log.exception("metrics: cannot count a message; the message is not affected")

    return guarded  # type: ignore[return-value]


def _children(family: Any, values: Iterable[str]) -> dict[str, Any]:
    return {v: family.labels(v) for v in values}


def _counts(
    registry: CollectorRegistry, name: str, text: str, label: str, values: Iterable[str]
) -> dict[str, Any]:
    """A counter with one label, its children made up front for ``values``
    (the only values it takes: a fixed set, never text from a message)."""
    return _children(Counter(name, text, [label], registry=registry), values)


class Metrics(Sink):
    """The registry and every family; see the module docstring."""

    def __init__(self, report_file: Path) -> None:
        # Faults while counting (see _never_raises); counted, not raised.
        self.faults = 0
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge("dmarcmilter_build_info", "The running version", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self._evaluated = Counter(
            "dmarcmilter_messages_evaluated", "Messages evaluated", registry=r
        )
        self._skipped = _counts(
            r,
            "dmarcmilter_messages_skipped",
            "Messages not evaluated, by why",
            "reason",
            SKIP_REASONS,
        )
        self._internal_errors = Counter(
            "dmarcmilter_internal_errors",
            "Messages answered with [milter] internal_error_action after an internal error",
            registry=r,
        )
        self._aborted = Counter(
            "dmarcmilter_messages_aborted",
            "Transactions the MTA abandoned during end-of-message (not recorded)",
            registry=r,
        )
        self._actions = _counts(
            r,
            "dmarcmilter_milter_actions",
            "The milter's answer to every message at end-of-message",
            "action",
            MILTER_ACTIONS,
        )
        self._dmarc = _counts(
            r,
            "dmarcmilter_dmarc_results",
            "DMARC results of evaluated messages",
            "result",
            (c.value for c in DMARCResultCode),
        )
        self._policy = _counts(
            r,
            "dmarcmilter_dmarc_policy",
            "The DMARC policy that applied (absent: no policy record)",
            "policy",
            [*(p.value for p in Policy), "absent"],
        )
        self._disposition = _counts(
            r,
            "dmarcmilter_dispositions",
            "Dispositions of evaluated messages",
            "disposition",
            (d.value for d in Disposition),
        )
        self._monitored = _counts(
            r,
            "dmarcmilter_monitor_would",
            "Monitor mode: what enforcement would have done instead",
            "action",
            (a.value for a in Action),
        )
        self._overrides = _counts(
            r,
            "dmarcmilter_policy_overrides",
            "Local policy overrides applied (RFC 9990 PolicyOverrideType)",
            "reason",
            (o.value for o in OverrideReason),
        )
        self._spf = _counts(
            r,
            "dmarcmilter_spf_results",
            "SPF results (MAIL FROM identity)",
            "result",
            (c.value for c in SPFResultCode),
        )
        self._dkim = _counts(
            r,
            "dmarcmilter_dkim_results",
            "DKIM: the best result among a message's signatures (none: unsigned)",
            "result",
            (c.value for c in DKIMResultCode),
        )
        self._evaluation_seconds = Histogram(
            "dmarcmilter_evaluation_seconds",
            "Time to evaluate a message (SPF, DKIM, ARC, DMARC with their DNS)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._eom_seconds = Histogram(
            "dmarcmilter_eom_seconds",
            "Time of the whole end-of-message handling, evaluated or not",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._dns = _counts(
            r,
            "dmarcmilter_dns_queries",
            "DNS queries sent to the nameservers, by outcome",
            "outcome",
            (s.value for s in DNSStatus),
        )
        self._cache_hits = Counter(
            "dmarcmilter_dns_cache_hits", "DNS lookups answered from the cache", registry=r
        )
        self._cache_misses = Counter(
            "dmarcmilter_dns_cache_misses", "DNS lookups not in the cache", registry=r
        )
        self._dns_seconds = Histogram(
            "dmarcmilter_dns_query_seconds",
            "Time of a DNS query sent to the nameservers",
            buckets=DNS_BUCKETS,
            registry=r,
        )
        self._budget = Counter(
            "dmarcmilter_dns_budget_exhausted",
            "Messages that asked a DNS query after their DNS budget ([dns] budget) was spent",
            registry=r,
        )
        self._reloads = _counts(
            r,
            "dmarcmilter_config_reloads",
            "Configuration reloads (SIGHUP) by outcome",
            "outcome",
            ("success", "failure"),
        )
        self.report = ReportFileCollector(report_file)
        r.register(self.report)
        self.state = StateCollector()
        r.register(self.state)

    # -- the mail path ----------------------------------------------------------------

    @_never_raises
    def evaluated(
        self,
        evaluation: Evaluation,
        decision: Decision,
        verdict: Action,
        dns: DNSSession,
        evaluation_seconds: float,
        eom_seconds: float,
    ) -> None:
        self._evaluated.inc()
        dmarc = evaluation.dmarc
        self._dmarc[dmarc.result.value].inc()
        self._policy[dmarc.policy.value if dmarc.policy else "absent"].inc()
        self._disposition[decision.disposition.value].inc()
        if decision.monitored is not None:
            self._monitored[decision.monitored.value].inc()
        for override in decision.reasons:
            self._overrides[override.reason.value].inc()
        self._spf[evaluation.spf.mfrom.result.value].inc()
        self._dkim[_best_dkim(evaluation)].inc()
        self._action(verdict, decision.quarantine)
        self._evaluation_seconds.observe(evaluation_seconds)
        self._eom_seconds.observe(eom_seconds)
        hits = misses = 0
        spent = False
        for entry in dns.log:
            if entry.cached:
                hits += 1
                continue
            misses += 1
            if entry.budget_spent:
                spent = True
                continue
            self._dns[entry.status.value].inc()
            self._dns_seconds.observe(entry.elapsed_ms / 1000.0)
        if hits:
            self._cache_hits.inc(hits)
        if misses:
            self._cache_misses.inc(misses)
        if spent:
            self._budget.inc()

    def _action(self, verdict: Action, quarantine: QuarantineMethod | None) -> None:
        if verdict is Action.QUARANTINE:
            hold = quarantine is QuarantineMethod.HOLD
            self._actions["quarantine_hold" if hold else "quarantine_header"].inc()
        else:
            self._actions[verdict.value].inc()

    @_never_raises
    def skipped(self, reason: str, action: str, eom_seconds: float) -> None:
        counter = self._skipped.get(reason)
        if counter is not None:
            counter.inc()
        self._actions.get(action, self._actions["tempfail"]).inc()
        self._eom_seconds.observe(eom_seconds)

    @_never_raises
    def internal_error(self, action: str, eom_seconds: float) -> None:
        self._internal_errors.inc()
        self._actions.get(action, self._actions["tempfail"]).inc()
        self._eom_seconds.observe(eom_seconds)

    @_never_raises
    def aborted(self) -> None:
        self._aborted.inc()

    @_never_raises
    def reloaded(self, success: bool) -> None:
        self._reloads["success" if success else "failure"].inc()

    # -- exposition -------------------------------------------------------------------

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_DKIM_ORDER = {
    code.value: rank
    for rank, code in enumerate(
        (
            DKIMResultCode.PASS,
            DKIMResultCode.FAIL,
            DKIMResultCode.POLICY,
            DKIMResultCode.NEUTRAL,
            DKIMResultCode.TEMPERROR,
            DKIMResultCode.PERMERROR,
            DKIMResultCode.NONE,
        )
    )
}


def _best_dkim(evaluation: Evaluation) -> str:
    """One DKIM result per message, so a message with many signatures
    counts once: pass if any signature passed, else the most telling
    of the others (a fail before an error), none when unsigned."""
    best = "none"
    for signature in evaluation.dkim.signatures:
        value = signature.result.value
        if _DKIM_ORDER[value] < _DKIM_ORDER[best]:
            best = value
            if value == "pass":
                break
    return best


# -- collectors read at scrape time -----------------------------------------------------


class StateCollector:
    """The history writer's counters and the DNS cache, read when scraped."""

    def __init__(self) -> None:
        self.writer: HistoryWriter | None = None
        self.resolver: Callable[[], Resolver] | None = None
        self.in_progress: Callable[[], int] | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.in_progress is not None:
            yield GaugeMetricFamily(
                "dmarcmilter_messages_in_progress",
                "Transactions begun and not yet ended",
                value=self.in_progress(),
            )
        if self.resolver is not None:
            entries, size = self.resolver().cache_size
            yield GaugeMetricFamily(
                "dmarcmilter_dns_cache_entries", "Answers in the DNS cache", value=entries
            )
            yield GaugeMetricFamily(
                "dmarcmilter_dns_cache_bytes",
                "Bytes charged for the answers in the DNS cache",
                value=size,
            )
        writer = self.writer
        if writer is None:
            return
        s = writer.stats()
        gauges = (
            ("queue_depth", "Rows waiting in memory for the database", s.queue_depth),
            ("journal_bytes", "Size of the history journal (the spool) in bytes", s.journal_bytes),
            ("journal_writable", "1 when the journal can be appended to", s.journal_writable),
            ("database_up", "1 when the history database is reachable", s.database_up),
            (
                "catching_up",
                "1 while rows wait in the journal (spooled) for the database",
                s.catching_up,
            ),
            ("writer_alive", "1 while the history writer thread runs", writer.alive),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(f"dmarcmilter_history_{name}", text, value=float(value))
        counters = (
            ("rows_written", "Rows stored in the database, directly or by replay", s.rows_written),
            (
                "rows_replayed",
                "Rows stored from the journal (also in rows_written)",
                s.rows_replayed,
            ),
            (
                "rows_unjournaled",
                "Rows that could not be journaled, kept in memory",
                s.rows_unjournaled,
            ),
            ("rows_rejected", "Rows the database refused as invalid, kept aside", s.rows_rejected),
            ("rows_lost", "Rows neither journaled nor stored", s.rows_lost),
            ("write_errors", "Failed database transactions", s.write_errors),
            ("failures_lost", "Failure-report incidents that could not be built", s.failures_lost),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(f"dmarcmilter_history_{name}", text, value=value)


class ReportFileCollector:
    """The report job's metrics file, re-exported at scrape time.

    The job exits after each run, so its figures live in a file (the
    textfile-collector format, which node_exporter can read as well); this
    serves the same figures from the daemon's /metrics, so one scrape sees
    the whole pipeline.  Only ``dmarcmilter_report_*`` families are served;
    a file that is not a regular file, larger than MAX_REPORT_FILE_BYTES, or
    that does not parse is ignored and counted by reason.  No file yet (the
    job never ran) is no error.
    """

    REASONS = ("too_large", "unreadable", "parse_error")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._errors = dict.fromkeys(self.REASONS, 0)
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families = self._read()
        errors = CounterMetricFamily(
            "dmarcmilter_report_file_errors",
            "Scrapes that ignored the report job's metrics file, by why",
            labels=["reason"],
        )
        with self._lock:
            for reason, count in self._errors.items():
                errors.add_metric([reason], count)
        yield errors
        yield from families

    def _read(self) -> list[Metric]:
        text = self._text()
        if text is None:
            return []
        try:
            families = [
                f
                for f in text_string_to_metric_families(text)
                if f.name.startswith(REPORT_PREFIX) and f.name != "dmarcmilter_report_file_errors"
            ]
        except Exception:  # the parser raises ValueError and others on bad input
            self._error("parse_error")
            return []
        return families

    def _text(self) -> str | None:
        try:
            # O_NONBLOCK: a FIFO put at the path must not hang the scrape.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            self._error("unreadable")
            return None
        with open(fd, "rb", closefd=True) as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                self._error("unreadable")
                return None
            if info.st_size > MAX_REPORT_FILE_BYTES:
                self._error("too_large")
                return None
            data = f.read(MAX_REPORT_FILE_BYTES + 1)
        if len(data) > MAX_REPORT_FILE_BYTES:
            self._error("too_large")
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self._error("parse_error")
            return None

    def _error(self, reason: str) -> None:
        with self._lock:
            self._errors[reason] += 1


def report_file_path(config: Config) -> Path:
    """[metrics] report_file, or report-metrics.prom in the state directory."""
    if config.metrics.report_file:
        return Path(config.metrics.report_file)
    return config.effective_state_dir() / REPORT_FILE_NAME


# -- health -------------------------------------------------------------------------


@dataclass
class HealthSources:
    """What /health looks at; set by the daemon."""

    milter_thread: Callable[[], bool]
    socket: SocketSpec
    writer: HistoryWriter | None


def socket_served(spec: SocketSpec, timeout: float = HEALTH_CONNECT_TIMEOUT) -> bool:
    """Whether a connection to the milter socket is accepted (the MTA's
    view).  The connection is closed at once; libmilter drops it."""
    if spec.family == "unix":
        family, address = socket.AF_UNIX, spec.address
        target: Any = address
    else:
        family = socket.AF_INET if spec.family == "inet" else socket.AF_INET6
        host = spec.address
        # A wildcard listener is reached on loopback.
        if host in ("", "0.0.0.0", "*"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        target = (host, spec.port)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            probe.connect(target)
    except OSError:
        return False
    return True


def health(sources: HealthSources) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the JSON body of /health.

    503 when the milter cannot take mail: its thread has ended, or its
    socket does not accept a connection.  A database that is down is not a
    503: mail still flows and its rows wait in the journal, as the body says.
    """
    thread = sources.milter_thread()
    served = thread and socket_served(sources.socket)
    body: dict[str, Any] = {
        "status": "ok",
        "milter_thread_alive": thread,
        "milter_socket_served": served,
    }
    writer = sources.writer
    if writer is not None:
        s = writer.stats()
        body["writer_alive"] = writer.alive
        body["database_reachable"] = s.database_up
        if not s.database_up:
            body["database"] = "down: rows are spooling to the journal"
        elif s.catching_up:
            body["database"] = "up: replaying rows spooled in the journal"
        else:
            body["database"] = "up"
        body["journal_bytes"] = s.journal_bytes
        body["journal_writable"] = s.journal_writable
        if not writer.alive or not s.journal_writable or not s.database_up:
            body["status"] = "degraded"
    if not (thread and served):
        body["status"] = "unavailable"
        return 503, body
    return 200, body


# -- the listener ---------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` ([metrics] listen), host an IP address;
    ValueError names the key."""
    text = listen.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"metrics.listen: expected [address]:port, got {listen!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"metrics.listen: expected host:port or [v6]:port, got {listen!r}")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"metrics.listen: expected an IP address and a port, got {listen!r}"
        ) from None
    # Port 0: any free port (the log line names it).
    if not 0 <= port < 65536:
        raise ValueError(f"metrics.listen: port out of range in {listen!r}")
    return host, port


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], listener: MetricsListener) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.listener = listener
        self.slots = threading.BoundedSemaphore(MAX_REQUESTS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded: past MAX_REQUESTS at once, refuse here in the accepting
        # thread rather than start another thread.
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "dmarcmilter"
    sys_version = ""

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        listener = self.server.listener
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, listener.metrics.exposition())
        elif path == "/health" and listener.health is not None:
            status, body = health(listener.health)
            self._send(status, "application/json", json.dumps(body).encode() + b"\n")
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the mail log.
        pass


class MetricsListener:
    """The HTTP listener in a thread of its own."""

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self.metrics = metrics
        self.health: HealthSources | None = None
        self.address = parse_listen(listen)
        try:
            self._server = _Server(self.address, self)
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="metrics-http",
            daemon=True,
        )

    @property
    def bound(self) -> str:
        """host:port (or [v6]:port) as bound, port 0 resolved."""
        host, port = self.address[0], int(self._server.server_address[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
