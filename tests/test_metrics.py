"""/metrics and /health of the real daemon ([metrics] listen).

Messages go through ``dmarcmilter run`` over the milter protocol (DNS from
the loopback test server); the test then scrapes /metrics over HTTP and
parses it with prometheus_client's own parser, so what is asserted is what
Prometheus would store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmarcmilter.metrics import MAX_REPORT_FILE_BYTES
from tests.daemon import ROOT, MilterDaemon, daemons
from tests.dnsserver import TestDNSServer
from tests.milterclient import ALL_ACTIONS, SMFIF_CHGHDRS, EndOfMessage, MilterClient
from tests.signing import dkim_sign, dkim_zone, make_message

ZONE: dict[str, Any] = {
    "example.com": [("A", "192.0.2.80")],
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    "bounce.example.com": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "_dmarc.slow.example": "TIMEOUT",
    **dkim_zone("example.com", "s1"),
}
GOOD_IP, BAD_IP = "192.0.2.1", "203.0.113.66"
DEAD_PG = "postgresql+psycopg://postgres@127.0.0.1:9/none"
DASHBOARD = ROOT / "contrib" / "grafana-dashboard.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Start = Callable[..., MilterDaemon]


@pytest.fixture
def start(tmp_path: Path, dns_server: TestDNSServer) -> Iterator[Start]:
    dns_server.set_zone(ZONE)
    with daemons(tmp_path, dns_server.port, {"metrics": {"listen": "127.0.0.1:0"}}) as start_daemon:
        yield start_daemon


def address(daemon: MilterDaemon) -> str:
    (line,) = daemon.wait_log("metrics and health listening")
    return line["metrics_listen"]


def get(daemon: MilterDaemon, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{address(daemon)}{path}", timeout=10) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def scrape(daemon: MilterDaemon) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type."""
    status, body = get(daemon, "/metrics")
    assert status == 200
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def by_label(samples: Samples, name: str) -> dict[str, float]:
    """A one-label family's values, non-zero ones only."""
    out = {}
    for (sample, labels), value in samples.items():
        if sample == name and value:
            assert len(labels) == 1, labels
            out[labels[0][1]] = value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def send(
    daemon: MilterDaemon,
    message: bytes,
    ip: str | None = BAD_IP,
    sender: str = "x@elsewhere.example",
    actions: int = ALL_ACTIONS,
) -> EndOfMessage:
    client = MilterClient(daemon.socket)
    try:
        client.negotiate(actions)
        if ip is None:
            client.connect("localhost", "/run/local", family="L")
        else:
            client.connect("mx.sender.example", ip)
        client.helo("mx.sender.example")
        return client.send_message(
            message,
            sender=sender,
            recipients=["user@receiver.example"],
            macros_mail={"i": "4QID"},
            macros_eom={"i": "4QID"},
        )
    finally:
        client.quit()
        client.close()


def the_mix(daemon: MilterDaemon) -> None:
    signed = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    assert send(daemon, signed, GOOD_IP, sender="b@bounce.example.com").reply.kind == "continue"
    send(daemon, make_message(from_="mallory@example.com"))  # DMARC fail, p=reject
    send(daemon, make_message(from_="bob@example.com"), ip=None)  # local: skipped
    send(daemon, make_message(from_="carol@slow.example"))  # _dmarc times out
    send(daemon, make_message(from_="dave@nowhere.example"))  # no such domain
    daemon.wait_log("message", 5)


# -- the mail families ---------------------------------------------------------------


def test_a_known_mix_gives_exact_counts(start: Start, dns_server: TestDNSServer) -> None:
    daemon = start()
    dns_server.clear_log()
    the_mix(daemon)
    s, types = scrape(daemon)
    assert value(s, "dmarcmilter_messages_evaluated_total") == 4
    assert by_label(s, "dmarcmilter_messages_skipped_total") == {"local": 1}
    assert by_label(s, "dmarcmilter_dmarc_results_total") == {
        "pass": 1,
        "fail": 1,
        "temperror": 1,
        "none": 1,
    }
    assert by_label(s, "dmarcmilter_dmarc_policy_total") == {"reject": 2, "absent": 2}
    # The failing message under p=reject: quarantined, since enforce_reject
    # is off by default (the local-policy override says so).
    assert by_label(s, "dmarcmilter_dispositions_total") == {
        "pass": 1,
        "quarantine": 1,
        "none": 2,
    }
    assert by_label(s, "dmarcmilter_policy_overrides_total") == {"local_policy": 1}
    assert by_label(s, "dmarcmilter_milter_actions_total") == {
        "accept": 4,
        "quarantine_header": 1,
    }
    assert by_label(s, "dmarcmilter_spf_results_total") == {"pass": 1, "none": 3}
    assert by_label(s, "dmarcmilter_dkim_results_total") == {"pass": 1, "none": 3}
    assert value(s, "dmarcmilter_internal_errors_total") == 0
    assert value(s, "dmarcmilter_evaluation_seconds_count") == 4
    # End-of-message: the skipped one too.
    assert value(s, "dmarcmilter_eom_seconds_count") == 5
    assert value(s, "dmarcmilter_eom_seconds_bucket", le="+Inf") == 5
    # DNS: what the nameserver was asked, by outcome; the timeout is the
    # _dmarc.slow.example query (the message's budget was not spent).
    dns = by_label(s, "dmarcmilter_dns_queries_total")
    assert dns["timeout"] == 1
    assert dns["nxdomain"] >= 1
    assert dns["noerror"] >= 3
    assert sum(dns.values()) == len(dns_server.queries)
    assert value(s, "dmarcmilter_dns_query_seconds_count") == sum(dns.values())
    misses = value(s, "dmarcmilter_dns_cache_misses_total")
    assert misses == sum(dns.values())
    assert value(s, "dmarcmilter_dns_budget_exhausted_total") == 0
    # The same pass again: every answer it needs is cached now.
    hits = value(s, "dmarcmilter_dns_cache_hits_total")
    signed = dkim_sign(make_message(from_="alice@example.com"), "example.com", "s1")
    send(daemon, signed, GOOD_IP, sender="b@bounce.example.com")
    daemon.wait_log("message", 6)
    s2, _ = scrape(daemon)
    assert value(s2, "dmarcmilter_dns_cache_misses_total") == misses
    assert value(s2, "dmarcmilter_dns_cache_hits_total") > hits
    assert value(s2, "dmarcmilter_dns_cache_entries") > 0
    # Types as Prometheus sees them.
    assert types["dmarcmilter_messages_evaluated"] == "counter"
    assert types["dmarcmilter_evaluation_seconds"] == "histogram"
    assert types["dmarcmilter_history_queue_depth"] == "gauge"
    # Build info and the standard collectors.
    (version,) = [v for (n, lab), v in s.items() if n == "dmarcmilter_build_info"]
    assert version == 1
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "python_info", **_python_info(s)) == 1
    assert ("python_gc_collections_total", (("generation", "0"),)) in s


def test_a_spent_dns_budget_is_counted_once_per_message(start: Start) -> None:
    """The author's policy query times out (0.5 s) and eats the budget
    (0.52 s): every later lookup of the message is refused without being
    sent, and the message counts once."""
    daemon = start({"dns": {"budget": 0.52}})
    send(daemon, make_message(from_="carol@slow.example"))
    daemon.wait_log("message", 1)
    s, _ = scrape(daemon)
    assert by_label(s, "dmarcmilter_dns_queries_total") == {"timeout": 1}
    assert value(s, "dmarcmilter_dns_budget_exhausted_total") == 1
    # The refused lookups were cache misses too, but no query.
    assert value(s, "dmarcmilter_dns_cache_misses_total") > 1
    assert value(s, "dmarcmilter_dns_query_seconds_count") == 1
    assert by_label(s, "dmarcmilter_dmarc_results_total") == {"temperror": 1}


def test_an_internal_error_is_counted_with_its_action(start: Start) -> None:
    """A forged Authentication-Results field that the MTA does not let us
    remove: an internal error, answered with internal_error_action."""
    daemon = start()
    forged = ("Authentication-Results", "mx.receiver.example; dmarc=pass")
    eom = send(
        daemon,
        make_message(from_="ceo@example.com", extra_headers=[forged]),
        actions=ALL_ACTIONS & ~SMFIF_CHGHDRS,
    )
    assert (eom.reply.kind, eom.reply.code) == ("replycode", "451")
    daemon.wait_log("message", 1)
    s, _ = scrape(daemon)
    assert value(s, "dmarcmilter_internal_errors_total") == 1
    assert by_label(s, "dmarcmilter_milter_actions_total") == {"tempfail": 1}
    assert value(s, "dmarcmilter_messages_evaluated_total") == 0
    assert value(s, "dmarcmilter_eom_seconds_count") == 1


def _python_info(samples: Samples) -> dict[str, str]:
    ((_, labels),) = [k for k in samples if k[0] == "python_info"]
    return dict(labels)


def test_history_families_read_the_writer(start: Start) -> None:
    daemon = start()
    the_mix(daemon)
    deadline = 50
    for _ in range(deadline):
        s, _ = scrape(daemon)
        if value(s, "dmarcmilter_history_rows_written_total") == 4:
            break
        daemon.wait_log("never", timeout=0.1)
    assert value(s, "dmarcmilter_history_rows_written_total") == 4
    assert value(s, "dmarcmilter_history_rows_replayed_total") == 0
    assert value(s, "dmarcmilter_history_rows_lost_total") == 0
    assert value(s, "dmarcmilter_history_write_errors_total") == 0
    assert value(s, "dmarcmilter_history_queue_depth") == 0
    assert value(s, "dmarcmilter_history_database_up") == 1
    assert value(s, "dmarcmilter_history_writer_alive") == 1
    assert value(s, "dmarcmilter_history_journal_bytes") > 0


def test_database_down_spools_and_health_says_so(start: Start) -> None:
    daemon = start({"database": {"url": DEAD_PG}})
    the_mix(daemon)
    for _ in range(50):
        s, _ = scrape(daemon)
        if value(s, "dmarcmilter_history_write_errors_total") >= 1:
            break
        daemon.wait_log("never", timeout=0.1)
    assert value(s, "dmarcmilter_history_database_up") == 0
    assert value(s, "dmarcmilter_history_rows_written_total") == 0
    assert value(s, "dmarcmilter_history_rows_lost_total") == 0
    assert value(s, "dmarcmilter_history_catching_up") == 1
    journal = value(s, "dmarcmilter_history_journal_bytes")
    assert journal > 0
    # Mail still flows: healthy for an orchestrator, and the body says why
    # it is degraded.
    status, body = get(daemon, "/health")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "degraded"
    assert health["database_reachable"] is False
    assert health["database"] == "down: rows are spooling to the journal"
    assert health["journal_bytes"] >= journal
    assert health["milter_socket_served"] is True


# -- bounded labels ------------------------------------------------------------------


def test_labels_stay_bounded_under_many_author_domains(
    start: Start, dns_server: TestDNSServer
) -> None:
    """1,000 distinct author domains (and client addresses) add no label
    set: every label value comes from an enum of ours."""
    daemon = start()
    send(daemon, make_message(from_="a@first.example"))
    daemon.wait_log("message", 1)
    before, _ = scrape(daemon)
    client = MilterClient(daemon.socket)
    client.negotiate()
    client.connect("mx.sender.example", BAD_IP)
    client.helo("mx.sender.example")
    for i in range(1000):
        client.send_message(
            make_message(from_=f"u{i}@d{i}.author{i}.example"),
            sender=f"s@d{i}.envelope.example",
            recipients=["user@receiver.example"],
        )
    client.quit()
    client.close()
    daemon.wait_log("message", 1001, timeout=120)
    after, _ = scrape(daemon)
    assert value(after, "dmarcmilter_messages_evaluated_total") == 1001
    label_sets = {k for k in after if k[1] and not k[0].startswith(("python_", "process_"))}
    assert label_sets == {
        k for k in before if k[1] and not k[0].startswith(("python_", "process_"))
    }
    assert len(label_sets) < 200
    for _name, labels in label_sets:
        for _key, text in labels:
            assert "example" not in text and "203.0.113" not in text


# -- reloads ---------------------------------------------------------------------------


def test_reload_counters(start: Start) -> None:
    daemon = start()
    daemon.reload({"metrics": {"listen": "127.0.0.1:0"}, "log": {"level": "info"}})
    before = len(daemon.log_lines("configuration not reloaded, the running one stays: "))
    daemon.config_path.write_text("[nonsense\n")
    daemon.signal(signal.SIGHUP)
    for _ in range(100):
        errors = [
            line
            for line in daemon.log_lines()
            if line.get("msg", "").startswith("configuration not reloaded")
        ]
        if len(errors) > before:
            break
        daemon.wait_log("never", timeout=0.05)
    s, _ = scrape(daemon)
    assert by_label(s, "dmarcmilter_config_reloads_total") == {"success": 1, "failure": 1}


# -- the report job's file -------------------------------------------------------------

REPORT_FILE = """\
# HELP dmarcmilter_report_last_success_timestamp_seconds When the last run succeeded
# TYPE dmarcmilter_report_last_success_timestamp_seconds gauge
dmarcmilter_report_last_success_timestamp_seconds 1.7649e+09
# HELP dmarcmilter_report_reports_generated_total Reports generated
# TYPE dmarcmilter_report_reports_generated_total counter
dmarcmilter_report_reports_generated_total{kind="aggregate"} 7
dmarcmilter_report_reports_generated_total{kind="failure"} 2
# HELP dmarcmilter_report_deliveries_total Deliveries by result
# TYPE dmarcmilter_report_deliveries_total counter
dmarcmilter_report_deliveries_total{kind="aggregate",result="sent"} 6
dmarcmilter_report_deliveries_total{kind="aggregate",result="temporary_failure"} 1
# HELP dmarcmilter_report_retries_pending Deliveries waiting for a retry
# TYPE dmarcmilter_report_retries_pending gauge
dmarcmilter_report_retries_pending{kind="aggregate"} 1
# HELP dmarcmilter_report_suppressed_destinations Destinations suppressed
# TYPE dmarcmilter_report_suppressed_destinations gauge
dmarcmilter_report_suppressed_destinations 3
# HELP dmarcmilter_report_failure_reports_dropped_total Failure reports dropped
# TYPE dmarcmilter_report_failure_reports_dropped_total counter
dmarcmilter_report_failure_reports_dropped_total 4
# HELP other_family Not ours: not served
# TYPE other_family gauge
other_family 1
"""


def test_report_file_is_reexported(start: Start) -> None:
    daemon = start()
    path = daemon.state_dir / "report-metrics.prom"
    s, _ = scrape(daemon)
    # No file yet: the job never ran; no error.
    assert not [k for k in s if k[0].startswith("dmarcmilter_report_") and "file" not in k[0]]
    assert by_label(s, "dmarcmilter_report_file_errors_total") == {}
    path.write_text(REPORT_FILE)
    s, types = scrape(daemon)
    assert value(s, "dmarcmilter_report_last_success_timestamp_seconds") == 1.7649e09
    assert value(s, "dmarcmilter_report_reports_generated_total", kind="aggregate") == 7
    assert value(s, "dmarcmilter_report_reports_generated_total", kind="failure") == 2
    assert value(s, "dmarcmilter_report_deliveries_total", kind="aggregate", result="sent") == 6
    assert value(s, "dmarcmilter_report_retries_pending", kind="aggregate") == 1
    assert value(s, "dmarcmilter_report_suppressed_destinations") == 3
    assert value(s, "dmarcmilter_report_failure_reports_dropped_total") == 4
    assert types["dmarcmilter_report_deliveries"] == "counter"
    assert not [k for k in s if k[0].startswith("other_family")]
    # A file that does not parse, then one over the bound: ignored, counted.
    path.write_text('dmarcmilter_report_x{kind="a" 1\n')
    s, _ = scrape(daemon)
    assert not [k for k in s if k[0] == "dmarcmilter_report_suppressed_destinations"]
    assert by_label(s, "dmarcmilter_report_file_errors_total") == {"parse_error": 1}
    path.write_text(REPORT_FILE + "# padding\n" * (MAX_REPORT_FILE_BYTES // 10))
    s, _ = scrape(daemon)
    assert not [k for k in s if k[0] == "dmarcmilter_report_suppressed_destinations"]
    assert by_label(s, "dmarcmilter_report_file_errors_total") == {
        "parse_error": 1,
        "too_large": 1,
    }
    # A FIFO must not hang the scrape.
    path.unlink()
    os.mkfifo(path)
    s, _ = scrape(daemon)
    assert by_label(s, "dmarcmilter_report_file_errors_total")["unreadable"] == 1


def test_report_file_setting_is_used_and_reloaded(start: Start, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.prom"
    elsewhere.write_text(REPORT_FILE)
    daemon = start({"metrics": {"report_file": str(elsewhere)}})
    s, _ = scrape(daemon)
    assert value(s, "dmarcmilter_report_suppressed_destinations") == 3
    other = tmp_path / "other.prom"
    other.write_text(REPORT_FILE.replace("destinations 3", "destinations 5"))
    daemon.reload({"metrics": {"listen": "127.0.0.1:0", "report_file": str(other)}})
    s, _ = scrape(daemon)
    assert value(s, "dmarcmilter_report_suppressed_destinations") == 5


# -- the listener and /health ----------------------------------------------------------


def test_health_is_200_when_serving_and_503_without_the_socket(start: Start) -> None:
    daemon = start()
    status, body = get(daemon, "/health")
    assert status == 200
    health = json.loads(body)
    assert health == {
        "status": "ok",
        "milter_thread_alive": True,
        "milter_socket_served": True,
        "writer_alive": True,
        "database_reachable": True,
        "database": "up",
        "journal_bytes": health["journal_bytes"],
        "journal_writable": True,
    }
    # The health check's own connections leave the milter working.
    the_mix(daemon)
    # The MTA can no longer reach the milter: its socket is gone.
    os.unlink(daemon.socket)
    status, body = get(daemon, "/health")
    assert status == 503
    health = json.loads(body)
    assert (health["status"], health["milter_socket_served"]) == ("unavailable", False)
    # A path that exists but is no socket anyone listens on: still 503.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(daemon.socket)
    assert get(daemon, "/health")[0] == 503


def test_only_two_paths_are_served(start: Start) -> None:
    daemon = start()
    assert get(daemon, "/")[0] == 404
    assert get(daemon, "/metrics/../etc/passwd")[0] == 404
    request = urllib.request.Request(f"http://{address(daemon)}/metrics", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    with refused.value as error:
        assert error.code == 501


def test_no_listener_when_unset(tmp_path: Path, dns_server: TestDNSServer) -> None:
    daemon = MilterDaemon(tmp_path, dns_server.port).start()
    try:
        assert not daemon.log_lines("metrics and health listening")
    finally:
        assert daemon.stop() == 0


def test_a_bad_listen_address_stops_the_start(tmp_path: Path, dns_server: TestDNSServer) -> None:
    daemon = MilterDaemon(tmp_path, dns_server.port, {"metrics": {"listen": "localhost:99999"}})
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 2
    daemon.stop()
    assert "metrics.listen" in daemon.log_text()


# -- the dashboard ---------------------------------------------------------------------


def test_dashboard_queries_only_metrics_a_scrape_has(start: Start) -> None:
    daemon = start()
    (daemon.state_dir / "report-metrics.prom").write_text(REPORT_FILE)
    the_mix(daemon)
    s, _ = scrape(daemon)
    names = {name for name, _labels in s}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        for word in _identifiers(expr):
            if word.startswith(("dmarcmilter_", "process_", "python_")):
                used.add(word)
    assert used, exprs
    assert used <= names, used - names
    # Every area the dashboard is for is there.
    for needed in (
        "dmarcmilter_dmarc_results_total",
        "dmarcmilter_evaluation_seconds_bucket",
        "dmarcmilter_eom_seconds_bucket",
        "dmarcmilter_dns_queries_total",
        "dmarcmilter_history_queue_depth",
        "dmarcmilter_history_journal_bytes",
        "dmarcmilter_report_last_success_timestamp_seconds",
        "dmarcmilter_report_deliveries_total",
    ):
        assert needed in used, needed


def _identifiers(expr: str) -> list[str]:
    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)


def test_health_is_503_when_the_milter_thread_has_ended(tmp_path: Path) -> None:
    """The socket still accepts (the kernel queues connections) but no
    thread of libmilter will ever answer them."""
    from dmarcmilter.config import parse_socket
    from dmarcmilter.metrics import HealthSources, health

    path = tmp_path / "milter.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(8)
        ended = threading.Thread(target=lambda: None)
        ended.start()
        ended.join()
        running = threading.Event()
        alive = threading.Thread(target=running.wait)
        alive.start()
        try:
            spec = parse_socket(f"unix:{path}")
            assert health(HealthSources(alive.is_alive, spec, None))[0] == 200
            status, body = health(HealthSources(ended.is_alive, spec, None))
        finally:
            running.set()
            alive.join()
    assert status == 503
    assert (body["status"], body["milter_thread_alive"]) == ("unavailable", False)


def test_a_fault_in_counting_never_reaches_the_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Counting runs after the verdict: a fault in it is logged once and
    swallowed, so it can never turn into the internal-error action."""
    from dmarcmilter.metrics import Metrics

    metrics = Metrics(tmp_path / "report-metrics.prom")
    metrics._dmarc = {}  # every result is now missing: a KeyError on use
    broken: Any = SimpleNamespace(
        dmarc=SimpleNamespace(result=SimpleNamespace(value="fail"), policy=None)
    )
    for _ in range(3):
        metrics.evaluated(broken, broken, broken, broken, 0.001, 0.002)
    assert caplog.text.count("metrics: cannot count a message") == 1
    assert metrics.faults == 3
