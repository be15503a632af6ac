"""Configuration: a TOML file loaded into frozen dataclasses.

Every default lives here, in the dataclass fields.  Unknown keys, wrong types
and out-of-range values are rejected with an error naming the file and the
key.  The configuration is passed explicitly to whatever needs it; there is
no global instance.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .authres.parse import authserv_id_key
from .errors import ConfigError

# The state directory of a system installation, used when it is writable.
SYSTEM_STATE_DIR = "/var/lib/dmarcmilter"
# Where an unprivileged run without a configuration keeps its state,
# relative to the working directory.
LOCAL_STATE_DIR = "state"
HISTORY_FILE = "history.sqlite3"
DATABASE_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb")
SYSLOG_FACILITIES = ("mail", "daemon", "user", *(f"local{i}" for i in range(8)))


def _opt(
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    return field(default=default, metadata={"choices": choices, "min": minimum, "max": maximum})


@dataclass(frozen=True)
class DNSConfig:
    # Empty: use the nameservers in /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    port: int = _opt(53, minimum=1, maximum=65535)
    # Seconds allowed for one query, and for all the queries of one message.
    timeout: float = _opt(2.0, minimum=0.05, maximum=60)
    budget: float = _opt(8.0, minimum=0.1, maximum=300)
    cache_entries: int = _opt(50_000, minimum=0, maximum=10_000_000)
    # Bytes of answers the cache may hold (resolver.answer_size counts them);
    # answers over 16 KiB are used but never cached.
    cache_bytes: int = _opt(33_554_432, minimum=0, maximum=4_294_967_296)


@dataclass(frozen=True)
class DMARCConfig:
    # "treewalk" is RFC 9989; "psl" is the RFC 7489 compatibility mode.
    discovery_method: str = _opt("treewalk", choices=("treewalk", "psl"))
    # Public Suffix List file for the psl method; empty uses the bundled list.
    psl_file: str = ""


@dataclass(frozen=True)
class SPFConfig:
    # Also evaluate the HELO identity (RFC 7208 §2.3) for Authentication-Results.
    check_helo: bool = True


@dataclass(frozen=True)
class DKIMConfig:
    # Signatures verified per message; the rest are permerror, to bound the work.
    max_signatures: int = _opt(20, minimum=1, maximum=1000)
    min_key_bits: int = _opt(1024, minimum=512, maximum=16384)


@dataclass(frozen=True)
class PolicyConfig:
    """Local policy: what a DMARC result does to a message (RFC 9989 §7-8)."""

    # A From field that does not yield exactly one Author Domain (RFC 9989
    # §4.2, §11.5): "evaluate" evaluates each domain a mail reader would
    # still show as the author and applies the strictest result (no such
    # domain: dmarc=permerror, delivered); "reject" refuses the message;
    # "accept" delivers it with dmarc=permerror.
    out_of_scope: str = _opt("evaluate", choices=("evaluate", "reject", "accept"))
    # What a p=quarantine failure (or a p=reject one treated as quarantine)
    # does: "header" adds quarantine_header for the MDA to file it as junk,
    # "hold" puts it in the MTA's hold queue, "reject" refuses it, "accept"
    # delivers it unmarked.
    quarantine_action: str = _opt("header", choices=("header", "hold", "reject", "accept"))
    quarantine_header: str = "X-Spam-Flag: YES"
    # RFC 9989 §8: a receiver MUST NOT reject solely because of p=reject, so
    # by default such failures are quarantined.  Real rejection, for every
    # domain or for the listed (author or policy) domains:
    enforce_reject: bool = False
    enforce_reject_domains: tuple[str, ...] = ()
    # {domain} is the author domain.
    reject_text: str = "Message rejected per DMARC policy for {domain}"
    # Mail with List-Id or List-Post that fails is quarantined, not rejected.
    mailing_list_downgrade: bool = True
    # ARC sealers (RFC 8617) whose validated results may vouch for a message
    # that fails DMARC after their forwarding (reason trusted_forwarder), if
    # no hop after theirs was sealed by an untrusted sealer.
    trusted_arc_sealers: tuple[str, ...] = ()
    # A DNS failure that leaves the result temperror: "accept" delivers with
    # dmarc=temperror, "tempfail" answers 451 so the sender retries.
    temperror_action: str = _opt("accept", choices=("accept", "tempfail"))
    tempfail_text: str = "DMARC policy for {domain} could not be checked; try again later"
    # Evaluate, record and add headers, but never reject, hold or mark:
    # a header says what would have happened.
    monitor: bool = False
    # A header section past the milter's bounds (MAX_HEADER_FIELDS fields or
    # MAX_HEADER_BYTES bytes) cannot be fully evaluated: "reject" (552 5.3.4)
    # or "tempfail" (452 4.3.4).  Never delivered on partial data; monitor
    # mode does not change this.
    oversized_header_action: str = _opt("reject", choices=("reject", "tempfail"))


@dataclass(frozen=True)
class ClientsConfig:
    """SMTP clients whose mail is not evaluated."""

    # SASL-authenticated clients (the MTA's {auth_authen} macro is set).
    skip_authenticated: bool = True
    # Networks (CIDR) of hosts whose mail is not evaluated: the host itself,
    # internal relays, webmail.
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class HeadersConfig:
    """Authentication-Results handling (RFC 8601 §5)."""

    # Other authserv-ids this mail system uses: incoming A-R fields claiming
    # them (or authserv_id) are forgeries and are removed.
    owned_authserv_ids: tuple[str, ...] = ()
    # Upstream hosts (an internal relay) whose A-R SPF and DKIM results are
    # used instead of checking again.  Their A-R fields are kept.
    trusted_authserv_ids: tuple[str, ...] = ()
    # Networks (CIDR) of the SMTP clients that may hand us those results:
    # a trusted A-R is used only on a connection from one of them.
    # Required when trusted_authserv_ids is set.
    trusted_upstream_networks: tuple[str, ...] = ()
    # Also add a Received-SPF field (RFC 7208 §9.1).
    received_spf: bool = False


@dataclass(frozen=True)
class MilterConfig:
    # inet:PORT@HOST, inet6:PORT@HOST or unix:PATH (also local:PATH).
    socket: str = "inet:8893@127.0.0.1"
    # Permissions of a unix socket, octal: the MTA's user must be able to
    # write to it.
    socket_mode: str = "0660"
    # Seconds the MTA may leave a connection idle before it is dropped.
    timeout: int = _opt(300, minimum=1, maximum=86400)
    # Body bytes kept per message for DKIM; a longer body is not kept in
    # memory past this, and its signatures give permerror.
    max_body_bytes: int = _opt(64 * 1024 * 1024, minimum=1024, maximum=1024**3)
    # What an internal error at end of message does (as Postfix's
    # milter_default_action): "tempfail" (451 4.3.0), "reject" (550 5.3.0)
    # or "accept" (delivered with only the forged fields removed).
    internal_error_action: str = _opt("tempfail", choices=("tempfail", "reject", "accept"))


@dataclass(frozen=True)
class LogConfig:
    # One line per message: "logfmt" (key=value) or "json".
    format: str = _opt("logfmt", choices=("logfmt", "json"))
    # "stderr" (journald under systemd) or "syslog" (/dev/log).
    target: str = _opt("stderr", choices=("stderr", "syslog"))
    syslog_facility: str = _opt("mail", choices=SYSLOG_FACILITIES)
    level: str = _opt("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class MetricsConfig:
    # host:port (or [v6]:port) of the HTTP listener serving /metrics
    # (Prometheus) and /health; empty: no listener.  It has no
    # authentication: keep it on loopback or a management network.
    listen: str = ""
    # Where `dmarcmilter report` writes its metrics (Prometheus text format)
    # after each run, for node_exporter's textfile collector and for the
    # daemon's /metrics; empty: report-metrics.prom in the state directory.
    report_file: str = ""


@dataclass(frozen=True)
class PathsConfig:
    # Empty: /var/lib/dmarcmilter when this process may write there, else
    # ./state, so a first unprivileged run works without configuration.
    state_dir: str = ""
    # What the milter does at start when the state directory cannot hold the
    # history journal (read-only, full, wrong owner): "continue" (mail flows;
    # rows go straight to the database and are lost if it fails too; logged
    # every 30 s until the directory is writable again) or "refuse" (the
    # milter does not start).
    unwritable_state_dir: str = _opt("continue", choices=("continue", "refuse"))


@dataclass(frozen=True)
class DatabaseConfig:
    # SQLAlchemy URL of the history store.  Empty: an SQLite file
    # history.sqlite3 in the state directory.
    url: str = ""


@dataclass(frozen=True)
class ReportConfig:
    """Aggregate reports (RFC 9990), sent by ``dmarcmilter report``."""

    # report_metadata/org_name: who sends the reports.  Required.
    org_name: str = ""
    # The From of report mail.  Required.  Make it DMARC-aligned: the MTA
    # must DKIM-sign mail from this domain.  The milter never records mail
    # from this address that carries our report Message-ID.
    from_address: str = ""
    # report_metadata/email, the contact address; empty: from_address.
    email: str = ""
    # The reporting host in the Subject, the filename and the Message-ID;
    # empty: the authserv-id.
    submitter: str = ""
    # report_metadata/extra_contact_info, e.g. a web page; empty: none.
    extra_contact_info: str = ""
    # "rfc9990", or "rfc7489" for consumers that need the old schema.
    format: str = _opt("rfc9990", choices=("rfc9990", "rfc7489"))
    # Report the recipient domain (identifiers/envelope_to): records are
    # then split by recipient domain, and reports grow.
    envelope_to: bool = False
    # rua URIs tried per report; later ones are ignored (RFC 9990 §3).
    max_uris: int = _opt(5, minimum=1, maximum=100)
    # Reports sent to one destination domain per hour; the rest wait for
    # the next run.
    rate_limit_per_hour: int = _opt(1000, minimum=1, maximum=1_000_000)
    # A report that cannot be delivered is retried, with growing delays,
    # for this many hours after it was generated, then given up.
    retry_hours: int = _opt(72, minimum=1, maximum=24 * 30)
    # "smtp" (the smarthost below) or "sendmail" (sendmail_path).
    transport: str = _opt("smtp", choices=("smtp", "sendmail"))
    smtp_host: str = "localhost"
    smtp_port: int = _opt(25, minimum=1, maximum=65535)
    # "opportunistic" uses STARTTLS when offered, "required" insists on
    # it, "off" never uses it.
    smtp_starttls: str = _opt("opportunistic", choices=("opportunistic", "required", "off"))
    # Verify the smarthost's certificate; off for a relay with a
    # self-signed one.
    smtp_verify_tls: bool = True
    # SMTP AUTH; empty username: none.  The password may instead be read
    # from smtp_password_file, kept out of this file.
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_password_file: str = ""
    smtp_timeout: float = _opt(30.0, minimum=1, maximum=600)
    sendmail_path: str = "/usr/sbin/sendmail"
    # Hard bounces of a report address (a delivery status notification
    # with Action: failed and a 5.x.x Status, or the smarthost's 5xx reply
    # to RCPT about the mailbox) after which it gets no more reports, for
    # suppress_days.
    # The count starts again after suppress_days without a hard bounce.
    suppress_after_bounces: int = _opt(3, minimum=1, maximum=1000)
    suppress_days: int = _opt(30, minimum=1, maximum=3650)
    # A policy domain with fewer messages than this in a period gets no
    # aggregate report for it; 1 reports every domain seen.
    min_messages: int = _opt(1, minimum=1, maximum=1_000_000)
    # Deliveries of a period's reports are spread over this many minutes
    # after the period ends (each report at its own fixed offset), rather
    # than sent in one burst; 0 sends them all at once.
    send_spread_minutes: int = _opt(120, minimum=0, maximum=24 * 60)


@dataclass(frozen=True)
class FailureReportsConfig:
    """Failure reports (RFC 9991), recorded by the milter and sent by
    ``dmarcmilter report``; from_address, submitter, org_name and the
    transport come from [report]."""

    # Off by default: failure reports carry parts of other people's mail.
    enabled: bool = False
    # Only these author domains (and names under them) are reported; empty:
    # every domain whose record asks for failure reports.
    domains: tuple[str, ...] = ()
    # Never these author domains (or names under them), even when listed in
    # domains.
    skip_domains: tuple[str, ...] = ()
    # RFC 6590: local-parts become opaque tokens, consistent within a report.
    redact: bool = True
    # The original's text parts too (redacted, defanged, attachments left
    # out); otherwise its header fields only.
    include_body: bool = False
    # Incidents of the same author domain, source IP, failure kind and
    # destination within this many minutes make one report (Incidents: N).
    merge_minutes: int = _opt(10, minimum=1, maximum=24 * 60)
    # A token bucket per destination domain: up to destination_burst reports
    # at once, refilled at destination_per_hour.  A report with no token is
    # dropped, counted and logged.
    destination_burst: int = _opt(5, minimum=1, maximum=10_000)
    destination_per_hour: int = _opt(10, minimum=1, maximum=100_000)
    # All failure reports made per hour; past it they are dropped, counted
    # and logged.
    max_per_hour: int = _opt(200, minimum=1, maximum=1_000_000)


@dataclass(frozen=True)
class Config:
    # The authserv-id of our Authentication-Results; empty: this host's name.
    authserv_id: str = ""
    dns: DNSConfig = field(default_factory=DNSConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    spf: SPFConfig = field(default_factory=SPFConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    failure_reports: FailureReportsConfig = field(default_factory=FailureReportsConfig)

    def effective_authserv_id(self) -> str:
        return self.authserv_id or socket.getfqdn()

    def effective_state_dir(self) -> Path:
        if self.paths.state_dir:
            return Path(self.paths.state_dir)
        system = Path(SYSTEM_STATE_DIR)
        if _writable_dir(system):
            return system
        return Path.cwd() / LOCAL_STATE_DIR

    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.effective_state_dir() / HISTORY_FILE}"


def _writable_dir(path: Path) -> bool:
    """Whether ``path`` is, or could be created as, a directory we can write."""
    if path.exists():
        return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def parse_database_url(url: str) -> URL:
    """``url`` parsed; ValueError unless it names a supported database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend not in DATABASE_BACKENDS:
        raise ValueError(
            f"unsupported database {backend!r}: use sqlite, postgresql, mysql or mariadb"
        )
    return parsed


def load_config(path: str | Path | None) -> Config:
    """Load ``path``, or the defaults when it is None."""
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return config_from_mapping(data, source)


def config_from_mapping(data: dict[str, Any], source: str = "<config>") -> Config:
    config: Config = _build(Config, data, source, "")
    for server in config.dns.nameservers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise ConfigError(
                f"{source}: dns.nameservers: {server!r} is not an IP address"
            ) from None
    if config.database.url:
        try:
            parse_database_url(config.database.url)
        except ValueError as exc:
            raise ConfigError(f"{source}: database.url: {exc}") from None
    checks: list[tuple[str, Any, Any]] = [
        ("milter.socket", config.milter.socket, parse_socket),
        ("milter.socket_mode", config.milter.socket_mode, _socket_mode),
        ("policy.quarantine_header", config.policy.quarantine_header, parse_header_line),
        ("policy.reject_text", config.policy.reject_text, _reply_text),
        ("policy.tempfail_text", config.policy.tempfail_text, _reply_text),
    ]
    checks += [("clients.trusted_networks", n, _network) for n in config.clients.trusted_networks]
    checks += [
        ("headers.trusted_upstream_networks", n, _network)
        for n in config.headers.trusted_upstream_networks
    ]
    domain_lists = {
        "policy.enforce_reject_domains": config.policy.enforce_reject_domains,
        "policy.trusted_arc_sealers": config.policy.trusted_arc_sealers,
        "headers.owned_authserv_ids": config.headers.owned_authserv_ids,
        "headers.trusted_authserv_ids": config.headers.trusted_authserv_ids,
        "failure_reports.domains": config.failure_reports.domains,
        "failure_reports.skip_domains": config.failure_reports.skip_domains,
    }
    checks += [(key, v, _name) for key, values in domain_lists.items() for v in values]
    for key, value, check in checks:
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    _check_report(config.report, source)
    _check_upstream_trust(config, source)
    return config


def _check_upstream_trust(config: Config, source: str) -> None:
    headers = config.headers
    # Compared as stripping compares them: an id any reader could take for
    # ours is never trusted (it is removed on every message).
    owned = {authserv_id_key(i) for i in (*headers.owned_authserv_ids, config.authserv_id) if i}
    for trusted in headers.trusted_authserv_ids:
        if authserv_id_key(trusted) in owned:
            raise ConfigError(
                f"{source}: headers.trusted_authserv_ids: {trusted!r} is also "
                "an authserv-id of ours; results claiming our own id are always removed"
            )
    if headers.trusted_authserv_ids and not headers.trusted_upstream_networks:
        # Trusting an id alone trusts any sender who types it.  Refusing to
        # start says so, where silently ignoring the ids would not.
        raise ConfigError(
            f"{source}: headers.trusted_upstream_networks: required when "
            "headers.trusted_authserv_ids is set (the relays' client networks)"
        )


def _check_report(report: ReportConfig, source: str) -> None:
    checks: list[tuple[str, str, Any]] = [
        ("report.from_address", report.from_address, parse_mailbox),
        ("report.email", report.email, parse_mailbox),
        ("report.submitter", report.submitter, _domain_name),
        ("report.smtp_host", report.smtp_host, _host_name),
        ("report.org_name", report.org_name, _one_line),
        ("report.extra_contact_info", report.extra_contact_info, _one_line),
    ]
    for key, value, check in checks:
        if not value:
            continue
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    if report.smtp_password and report.smtp_password_file:
        raise ConfigError(
            f"{source}: report.smtp_password_file: set smtp_password or smtp_password_file, "
            "not both"
        )


def parse_mailbox(text: str) -> str:
    """A bare ``local@domain`` address, as given; ValueError unless it is one."""
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"expected an address such as dmarc-reports@example.com, got {text!r}")
    if not all(33 <= ord(c) <= 126 and c not in '<>()[]\\,;:"' for c in local):
        raise ValueError(f"{text!r} has characters that cannot appear in a bare address")
    _domain_name(domain)
    return text


def _domain_name(text: str) -> None:
    name = text.rstrip(".")
    labels = name.split(".")
    if (
        not name
        or len(name) > 253
        or not all(
            0 < len(label) <= 63
            and label[0] != "-"
            and label[-1] != "-"
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
            for label in labels
        )
    ):
        raise ValueError(f"{text!r} is not a domain name (use the A-label form for IDNs)")


def _host_name(text: str) -> None:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        _domain_name(text)


def _one_line(text: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("must be one line without control characters")


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """Where the milter listens, as libmilter spells it."""

    family: str  # "inet", "inet6" or "unix"
    address: str  # host or path
    port: int = 0

    @property
    def libmilter(self) -> str:
        if self.family == "unix":
            return f"unix:{self.address}"
        return f"{self.family}:{self.port}@{self.address}"


def parse_socket(spec: str) -> SocketSpec:
    """``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:PATH`` or
    ``local:PATH``; ValueError with what is wrong."""
    family, colon, rest = spec.partition(":")
    family = family.lower()
    if not colon or not rest:
        raise ValueError(f"expected inet:PORT@HOST, inet6:PORT@HOST or unix:PATH, got {spec!r}")
    if family in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"a unix socket needs an absolute path, got {rest!r}")
        return SocketSpec("unix", rest)
    if family not in ("inet", "inet6"):
        raise ValueError(f"unknown socket type {family!r}: use inet, inet6 or unix")
    port_text, _, host = rest.partition("@")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, got {port_text!r}")
    host = host or ("0.0.0.0" if family == "inet" else "::")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"the host must be an IP address, got {host!r}") from None
    if (address.version == 6) != (family == "inet6"):
        raise ValueError(
            f"{family} needs an IPv{4 if family == 'inet' else 6} address, got {host!r}"
        )
    return SocketSpec(family, str(address), int(port_text))


def parse_header_line(text: str) -> tuple[str, str]:
    """``Name: value`` as (name, value); ValueError unless it is one valid
    header field (RFC 5322 §2.2) on one line."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name or not value:
        raise ValueError(f"expected 'Name: value', got {text!r}")
    if not all(33 <= ord(c) <= 126 and c != ":" for c in name):
        raise ValueError(f"{name!r} is not a valid header field name")
    if not all(32 <= ord(c) <= 126 or c == "\t" for c in value):
        raise ValueError("the value must be printable ASCII on one line")
    return name, value


def _socket_mode(text: str) -> None:
    if not (len(text) in (3, 4) and all(c in "01234567" for c in text)):
        raise ValueError(f"expected an octal mode such as 0660, got {text!r}")


def _reply_text(text: str) -> None:
    # Sent as an SMTP reply: printable ASCII.  libmilter drops a reply
    # containing a single "%", and prints "%%" doubled, so "%" is refused.
    if not text or not all(32 <= ord(c) <= 126 for c in text) or "%" in text:
        raise ValueError("must be printable ASCII on one line, without '%'")
    try:
        text.format(domain="example.com")
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"the only placeholder allowed is {{domain}}: {text!r}") from None


def _network(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a network in CIDR notation") from None


def _name(text: str) -> None:
    if not text or not all(33 <= ord(c) <= 126 for c in text):
        raise ValueError(f"{text!r} is not a domain name or authserv-id")


def _build(cls: type[Any], data: dict[str, Any], source: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' in {where}")
    values: dict[str, Any] = {}
    for name, fld in fields.items():
        if name not in data:
            continue
        key = prefix + name
        hint = hints[name]
        raw = data[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: {key}: expected a table [{key}]")
            values[name] = _build(typing.cast(type[Any], hint), raw, source, key + ".")
            continue
        values[name] = _convert(raw, hint, fld, source, key)
    return cls(**values)


def _convert(raw: Any, hint: Any, fld: dataclasses.Field[Any], source: str, key: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {expected}, got {raw!r}")

    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise bad("a list of strings")
        return tuple(raw)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such option yet
        raise ConfigError(f"{source}: {key}: unsupported option type")
    if hint is bool:
        if not isinstance(raw, bool):
            raise bad("true or false")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise bad("an integer")
        value: Any = raw
    elif hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise bad("a number")
        value = float(raw)
    elif hint is str:
        if not isinstance(raw, str):
            raise bad("a string")
        value = raw
    else:  # pragma: no cover - guards against adding an unsupported field type
        raise ConfigError(f"{source}: {key}: unsupported option type")
    meta = fld.metadata
    choices = meta.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(
            f"{source}: {key}: must be one of {', '.join(repr(c) for c in choices)}, got {raw!r}"
        )
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{source}: {key}: must be at least {lo}, got {raw!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{source}: {key}: must be at most {hi}, got {raw!r}")
    return value
