"""The ``dmarcmilter`` command: one entry point, several subcommands.

``run`` is the milter daemon; ``check`` shows what a receiver discovers for a
domain; ``evaluate`` runs the whole evaluation of one stored message.  All
three are thin drivers of the same core.  ``db upgrade|status|prune`` manage
the history store; ``report`` turns it into aggregate reports;
``suppress add|remove|list`` manages the report destinations that get none;
``impact`` shows what stricter enforcement settings would have done.  Bad input
ends with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .authres.render import render
from .config import Config, load_config, parse_database_url
from .discovery import Discoverer, DiscoveryMethod, DiscoveryStatus, load_psl
from .domains import DomainError, normalize_domain
from .errors import DatabaseError, DmarcMilterError, InputError
from .evaluation import Envelope, evaluate, resolver_from_config
from .export import evaluation_dict, query_log, record_dict
from .message import Message
from .policy import LocalContext, decide, recorded, skip_reason
from .resolver import DNSSession, Resolver, parse_hostport

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dmarcmilter", description="DMARC (RFC 9989) milter and tools")
    parser.add_argument("--version", action="version", version=f"dmarcmilter {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.add_argument("--dns", metavar="HOST:PORT", help="nameserver to query (IP[:PORT])")
        p.add_argument(
            "--method",
            choices=[m.value for m in DiscoveryMethod],
            help="policy discovery: treewalk (RFC 9989, default) or psl (RFC 7489)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON object")

    check = sub.add_parser("check", help="show the DMARC policy discovered for a domain")
    check.add_argument("domain", metavar="DOMAIN")
    common(check)

    ev = sub.add_parser("evaluate", help="evaluate one stored message")
    ev.add_argument("file", metavar="FILE.eml", help="the message, or - for standard input")
    ev.add_argument("--client-ip", required=True, metavar="IP")
    ev.add_argument("--helo", required=True, metavar="NAME")
    ev.add_argument("--mail-from", required=True, metavar="ADDR", help="use '' or '<>' for null")
    ev.add_argument("--rcpt-to", action="append", default=[], metavar="ADDR")
    ev.add_argument("--authserv-id", metavar="ID", help="authserv-id for Authentication-Results")
    ev.add_argument(
        "--auth",
        metavar="USER",
        default="",
        help="the client authenticated with SASL as USER (clients.skip_authenticated)",
    )
    common(ev)

    run = sub.add_parser(
        "run", help="run the milter daemon in the foreground (SIGTERM stops, SIGHUP reloads)"
    )
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")

    report = sub.add_parser(
        "report",
        help="generate and send aggregate reports (default: the last complete UTC day) "
        "and failure reports",
    )
    report.add_argument("--config", metavar="FILE", help="TOML configuration file")
    when = report.add_mutually_exclusive_group()
    when.add_argument("--date", metavar="YYYY-MM-DD", help="report on this UTC day")
    when.add_argument("--since", metavar="TIME", help="period start, ISO 8601 (UTC if no offset)")
    report.add_argument("--until", metavar="TIME", help="period end (exclusive), with --since")
    report.add_argument("--domain", metavar="DOMAIN", help="only this policy domain")
    report.add_argument(
        "--dry-run",
        metavar="DIR",
        help="write the .xml.gz reports and .eml messages into DIR; send and store nothing",
    )
    report.add_argument(
        "--format",
        choices=["rfc9990", "rfc7489"],
        help="report schema (default: report.format, rfc9990)",
    )
    report.add_argument(
        "--kind",
        choices=["aggregate", "failure"],
        help="only aggregate reports, or only failure reports (default: both)",
    )
    report.add_argument("--verbose", action="store_true", help="print a summary when done")

    db = sub.add_parser("db", help="manage the history database")
    db_sub = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)

    def db_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.add_argument("--url", metavar="URL", help="database URL (overrides database.url)")

    db_common(db_sub.add_parser("upgrade", help="migrate the database to the newest schema"))
    db_common(
        db_sub.add_parser(
            "status", help="show the schema revision (exit 1 when an upgrade is needed)"
        )
    )
    prune = db_sub.add_parser("prune", help="delete messages older than a given age")
    prune.add_argument(
        "--older-than", required=True, metavar="AGE", help="age such as 30d, 12h or 8w"
    )
    db_common(prune)

    impact = sub.add_parser(
        "impact", help="what stricter policy settings would have done, from the history"
    )
    db_common(impact)
    impact.add_argument("--since", metavar="TIME", help="window start (ISO 8601, UTC if no offset)")
    impact.add_argument("--until", metavar="TIME", help="window end (default: now)")
    impact.add_argument("--days", type=int, metavar="N", help="window: the last N days (default 7)")
    impact.add_argument("--top", type=int, metavar="N", help="domains shown by volume (default 20)")
    impact.add_argument("--domain", metavar="DOMAIN", help="show this policy domain only")
    impact.add_argument(
        "--sources", type=int, metavar="N", help="failing sources per domain (default 10)"
    )
    output = impact.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object")
    output.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")

    suppress = sub.add_parser(
        "suppress", help="manage the suppression list: destinations that get no reports"
    )
    sup_sub = suppress.add_subparsers(dest="suppress_command", required=True, parser_class=_Parser)
    add = sup_sub.add_parser("add", help="suppress an address, or a domain and all under it")
    add.add_argument("target", metavar="ADDRESS_OR_DOMAIN")
    add.add_argument("--reason", required=True, metavar="TEXT", help="why, shown by list")
    add.add_argument(
        "--expires",
        default="never",
        metavar="AGE",
        help="lift it after 30d, 12h, 8w...; or never (the default)",
    )
    db_common(add)
    remove = sup_sub.add_parser(
        "remove", help="lift a suppression and forget its bounces (exit 1 when not listed)"
    )
    remove.add_argument("target", metavar="ADDRESS_OR_DOMAIN")
    db_common(remove)
    listing = sup_sub.add_parser("list", help="show the list, bounce counts included")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    db_common(listing)
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    if args.dns:
        try:
            host, port = parse_hostport(args.dns)
        except ValueError as exc:
            raise InputError(f"--dns: {exc}") from None
        config = dataclasses.replace(
            config, dns=dataclasses.replace(config.dns, nameservers=(host,), port=port)
        )
    if args.method:
        config = dataclasses.replace(
            config, dmarc=dataclasses.replace(config.dmarc, discovery_method=args.method)
        )
    if getattr(args, "authserv_id", None):
        config = dataclasses.replace(config, authserv_id=args.authserv_id)
    return config


def _resolver(config: Config) -> Resolver:
    resolver = resolver_from_config(config)
    # A dead nameserver would otherwise show up as temperror on every check;
    # for a command-line run that is a usage problem, so say it plainly.
    probe = resolver.lookup(".", "SOA", config.dns.timeout)
    if probe.status.is_failure:
        servers = ", ".join(config.dns.nameservers) or "the system resolver"
        raise InputError(
            f"DNS server {servers} port {config.dns.port} is unreachable "
            f"({probe.status.value}{': ' + probe.detail if probe.detail else ''})"
        )
    return resolver


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        domain = normalize_domain(args.domain)
    except DomainError as exc:
        raise InputError(str(exc)) from None
    method = DiscoveryMethod(config.dmarc.discovery_method)
    psl = load_psl(config.dmarc.psl_file or None) if method is DiscoveryMethod.PSL else None
    session = _resolver(config).session()
    discoverer = Discoverer(session, method, psl)
    found = discoverer.discover_policy(domain)
    od = found.organizational_domain
    if od is None and found.status is not DiscoveryStatus.TEMPERROR:
        od = discoverer.organizational_domain(domain).domain
    record = found.record
    applied = found.requested_policy
    if applied is not None and record is not None and record.testing:
        applied = applied.lowered()
    data: dict[str, Any] = {
        "domain": domain,
        "discovery_method": method.value,
        "status": found.status.value,
        "detail": found.detail,
        "policy_domain": found.policy_domain,
        "org_domain": od,
        "from_psd": found.from_psd,
        "author_domain_exists": found.author_domain_exists,
        "policy_tag": found.policy_tag,
        "requested_policy": found.requested_policy.value if found.requested_policy else None,
        "policy": applied.value if applied else None,
        "record": record_dict(record),
        "queries": query_log(session.log),
    }
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=False))
        return EXIT_OK
    _print_check(data)
    return EXIT_OK


def _print_check(data: dict[str, Any]) -> None:
    print(f"Domain:              {data['domain']}")
    print(f"Discovery method:    {data['discovery_method']}")
    print("DNS queries:")
    for q in data["queries"]:
        answers = "; ".join(str(a) for a in q["answers"]) if q["answers"] else ""
        cached = " (cached)" if q["cached"] else ""
        print(
            f"  {q['name']} {q['type']}: {q['status']}{cached}"
            + (f"  {answers}" if answers else "")
        )
    print(
        f"Result:              {data['status']}"
        + (f" ({data['detail']})" if data["detail"] else "")
    )
    record = data["record"]
    if record:
        print(f"Record:              {record['raw']}")
        print(f"Record status:       {record['status']}")
        for problem in record["problems"]:
            print(f"  problem: {problem}")
        print(f"Reporting (rua):     {', '.join(record['rua']) or '-'}")
    print(f"Policy domain:       {data['policy_domain'] or '-'}")
    print(f"Organizational dom.: {data['org_domain'] or '-'}")
    if data["from_psd"]:
        print("Record source:       public suffix domain (psd=y)")
    if data["policy_tag"]:
        print(f"Policy tag used:     {data['policy_tag']} = {data['requested_policy']}")
    print(f"Policy that applies: {data['policy'] or '-'}")


def _read_message(path: str) -> Message:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_MESSAGE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise InputError(f"{path}: message larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        return Message.from_bytes(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = _config(args)
    message = _read_message(args.file)
    envelope = Envelope.create(args.client_ip, args.helo, args.mail_from, args.rcpt_to)
    # The same local policy as the milter: some clients are not evaluated.
    skip = skip_reason(LocalContext(envelope.client_ip, args.auth), config)
    if skip is not None:
        if args.json:
            print(json.dumps({"skipped": skip}, indent=2))
        else:
            print(f"Not evaluated: {skip} (forged Authentication-Results are still removed)")
        return EXIT_OK
    resolver = _resolver(config)
    session: DNSSession = resolver.session()
    evaluation = evaluate(envelope, message, session, config)
    decision = decide(evaluation, config.policy)
    header = render(evaluation, config.effective_authserv_id())
    if args.json:
        print(json.dumps(evaluation_dict(evaluation, decision, header), indent=2))
        return EXIT_OK
    print(f"Authentication-Results: {header}")
    dmarc = evaluation.dmarc
    print(f"DMARC result:  {dmarc.result.value}" + (f" ({dmarc.reason})" if dmarc.reason else ""))
    print(f"Policy:        {dmarc.policy.value if dmarc.policy else '-'}")
    print(f"Disposition:   {decision.disposition.value}")
    print(f"Action:        {decision.action.value}")
    for r in decision.reasons:
        print(f"Reason:        {r.reason.value}" + (f" ({r.comment})" if r.comment else ""))
    if decision.reply:
        print(f"SMTP reply:    {decision.reply}")
    if not recorded(message.headers, config):
        print("Recorded:      no (our own aggregate report)")
    return EXIT_OK


_AGE = re.compile(r"([0-9]{1,6})([hdw])")
_AGE_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str, option: str = "--older-than") -> dt.timedelta:
    """``30d``, ``12h`` or ``8w`` as a timedelta; InputError otherwise."""
    match = _AGE.fullmatch(text.strip())
    if not match or int(match.group(1)) == 0:
        raise InputError(
            f"{option}: expected a positive number of hours, days or weeks "
            f"such as 12h, 30d or 8w, got {text!r}"
        )
    return dt.timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


def _database_url(args: argparse.Namespace) -> str:
    if args.url:
        try:
            parse_database_url(args.url)
        except ValueError as exc:
            raise InputError(f"--url: {exc}") from None
        return str(args.url)
    return load_config(args.config).database_url()


def cmd_db(args: argparse.Namespace) -> int:
    # Imported here: the other commands should not pay for Alembic.
    from .history import db

    age = parse_age(args.older_than) if args.db_command == "prune" else None
    url = _database_url(args)
    if args.db_command == "upgrade":
        before, head = db.schema_status(url)
        db.upgrade(url)
        if before == head:
            print(f"{db.shown(url)}: schema already at {head}")
        else:
            print(f"{db.shown(url)}: schema upgraded from {before or 'empty'} to {head}")
        return EXIT_OK
    if args.db_command == "status":
        current, head = db.schema_status(url)
        print(f"Database:        {db.shown(url)}")
        print(f"Schema revision: {current or '- (empty database)'}")
        print(f"Newest revision: {head}")
        if current != head:
            print("Run `dmarcmilter db upgrade`.")
            return EXIT_ERROR
        return EXIT_OK
    assert age is not None
    deleted = db.prune(url, age)
    print(f"{db.shown(url)}: deleted {deleted} message(s) older than {args.older_than}")
    reports = db.prune_reports(url, age)
    if reports:
        print(f"{db.shown(url)}: deleted {reports} stored report(s) older than {args.older_than}")
    return EXIT_OK


def cmd_impact(args: argparse.Namespace) -> int:
    from . import impact
    from .history import db

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if args.days is not None and (args.since or args.until):
        raise InputError("--days cannot be combined with --since or --until")
    explicit = _since_until(args, now)
    if explicit is not None:
        since, until = explicit
    else:
        days = impact.DEFAULT_DAYS if args.days is None else args.days
        if not 1 <= days <= 3660:
            raise InputError(f"--days: expected 1 to 3660, got {days}")
        since, until = now - dt.timedelta(days=days), now
    top = impact.DEFAULT_TOP if args.top is None else args.top
    if not 1 <= top <= impact.MAX_TOP:
        raise InputError(f"--top: expected 1 to {impact.MAX_TOP}, got {top}")
    sources = impact.DEFAULT_SOURCES if args.sources is None else args.sources
    if not 0 <= sources <= impact.MAX_SOURCES:
        raise InputError(f"--sources: expected 0 to {impact.MAX_SOURCES}, got {sources}")
    domain = None
    if args.domain is not None:
        try:
            domain = normalize_domain(args.domain)
        except DomainError as exc:
            raise InputError(f"--domain: {exc}") from None
    url = _database_url(args)
    policy = load_config(args.config).policy
    db.check_schema(url)
    engine = db.make_engine(url)
    try:
        view = impact.compute(
            engine,
            policy,
            impact.Window(since, until),
            top=top,
            domain=domain,
            sources=sources,
        )
    finally:
        engine.dispose()
    if args.html:
        page = impact.to_html(view)
        try:
            with open(args.html, "w", encoding="utf-8") as out:
                out.write(page)
        except OSError as exc:
            raise InputError(f"--html: cannot write {args.html}: {exc.strerror}") from None
        return EXIT_OK
    if args.json:
        print(impact.to_json(view))
        return EXIT_OK
    for line in impact.to_table(view):
        print(line)
    return EXIT_OK


def cmd_suppress(args: argparse.Namespace) -> int:
    from .history import db
    from .report import suppression

    expires: dt.timedelta | None = None
    if args.suppress_command == "add":
        if args.expires.strip() != "never":
            expires = parse_age(args.expires, "--expires")
        reason = suppression.clean_reason(args.reason)
        if not reason:
            raise InputError("--reason: must not be empty")
    if args.suppress_command in ("add", "remove"):
        target = suppression.normalize_target(args.target)
    url = _database_url(args)
    db.check_schema(url)
    engine = db.make_engine(url)
    try:
        if args.suppress_command == "add":
            entry = suppression.add(engine, target, reason, expires=expires)
            what = entry.target + (" (and every name under it)" if entry.is_domain else "")
            if entry.expires_at is None:
                print(f"suppressed {what} for ever")
            else:
                print(f"suppressed {what} until {_utc_text(entry.expires_at)} ({args.expires})")
            return EXIT_OK
        if args.suppress_command == "remove":
            if suppression.remove(engine, target):
                print(f"removed {target}")
                return EXIT_OK
            print(f"{target} is not on the suppression list")
            return EXIT_ERROR
        listed = suppression.entries(engine)
    finally:
        engine.dispose()
    now = dt.datetime.now(dt.UTC)
    if args.json:
        print(json.dumps([_suppression_dict(e, now) for e in listed], indent=2))
        return EXIT_OK
    if not listed:
        print("The suppression list is empty.")
        return EXIT_OK
    rows = [
        (
            e.target,
            e.state(now),
            e.source.value,
            str(e.bounces),
            "-"
            if e.suppressed_at is None
            else "never"
            if e.expires_at is None
            else _utc_text(e.expires_at),
            e.reason,
        )
        for e in listed
    ]
    header = ("TARGET", "STATE", "SOURCE", "BOUNCES", "EXPIRES", "REASON")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


def _utc_text(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _suppression_dict(entry: Any, now: dt.datetime) -> dict[str, Any]:
    def when(value: dt.datetime | None) -> str | None:
        return value.astimezone(dt.UTC).isoformat() if value is not None else None

    return {
        "target": entry.target,
        "kind": "domain" if entry.is_domain else "address",
        "state": entry.state(now),
        "source": entry.source.value,
        "reason": entry.reason,
        "created_at": when(entry.created_at),
        "suppressed_at": when(entry.suppressed_at),
        "expires_at": when(entry.expires_at),
        "bounces": entry.bounces,
        "last_bounce_at": when(entry.last_bounce_at),
    }


def _report_time(text: str, option: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"{option}: expected an ISO 8601 time such as 2026-11-30T00:00:00Z, got {text!r}"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    if value.microsecond:
        raise InputError(f"{option}: use whole seconds, got {text!r}")
    return value.astimezone(dt.UTC)


def _since_until(
    args: argparse.Namespace, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime] | None:
    """``--since`` and ``--until`` (default: now) as UTC times, or None when
    ``--since`` is not given; InputError for a bad or empty span."""
    if args.until and not args.since:
        raise InputError("--until needs --since")
    if not args.since:
        return None
    since = _report_time(args.since, "--since")
    until = _report_time(args.until, "--until") if args.until else now
    if until <= since:
        raise InputError(f"--until {until.isoformat()} is not after --since")
    return since, until


def _report_period(args: argparse.Namespace, now: dt.datetime) -> Any:
    from .report.period import Period

    explicit = _since_until(args, now)
    if explicit is not None:
        since, until = explicit
        if until > now:
            raise InputError(
                f"--until {until.isoformat()} is in the future: a report covers a finished period"
            )
        return Period(since, until)
    if args.date:
        try:
            day = dt.date.fromisoformat(args.date.strip())
        except ValueError:
            raise InputError(f"--date: expected YYYY-MM-DD, got {args.date!r}") from None
        period = Period.day(day)
        if period.end > now:
            raise InputError(f"--date {day}: the day is not over yet (UTC)")
        return period
    return Period.last_complete_day(now)


class _ProgressBar:
    """A one-line bar on a terminal: domains done of all."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __call__(self, done: int, total: int, domain: str) -> None:
        width = 30
        filled = width * done // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        label = domain[:40]
        self.stream.write(f"\r[{bar}] {done}/{total} {label:<40}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .history import db
    from .report.aggregate import ReportSettings
    from .report.job import ReportJob, RunStats, dry_run
    from .report.run_metrics import RunOutcome, record_run, report_metrics_path

    config = load_config(args.config)
    if args.format:
        config = dataclasses.replace(
            config, report=dataclasses.replace(config.report, format=args.format)
        )
    ReportSettings.from_config(config, args.config or "the default configuration")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    period = _report_period(args, now)
    domain = None
    if args.domain:
        try:
            domain = normalize_domain(args.domain)
        except DomainError as exc:
            raise InputError(f"--domain: {exc}") from None
    kinds = (args.kind,) if args.kind else ("aggregate", "failure")
    progress = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    url = config.database_url()
    # A real run's metrics are written whatever its end (success, or its
    # database or relay failing); the dry run writes none.
    started = time.monotonic()
    engine: Engine | None = None
    job: ReportJob | None = None
    success = False
    database_down = False
    try:
        try:
            db.check_schema(url)
            engine = db.make_engine(url)
            if args.dry_run:
                stats = dry_run(
                    config,
                    engine,
                    period,
                    Path(args.dry_run),
                    domain=domain,
                    progress=progress,
                    kinds=kinds,
                )
            else:
                job = ReportJob(config, engine, progress=progress)
                stats = job.run(period, domain, kinds)
                success = True
        except DatabaseError:
            database_down = True
            raise
        finally:
            if not args.dry_run:
                record_run(
                    report_metrics_path(config),
                    RunOutcome(
                        kinds=kinds,
                        stats=job.stats if job is not None else RunStats(),
                        success=success,
                        finished=dt.datetime.now(dt.UTC),
                        duration=time.monotonic() - started,
                    ),
                    None if database_down else engine,
                )
            if engine is not None:
                engine.dispose()
    except InputError:
        raise
    except DmarcMilterError as exc:
        print(f"dmarcmilter report: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.verbose or progress is not None:
        span = f"{period.begin.isoformat()} to {period.end.isoformat()}"
        if stats.lease_holder:
            print(f"{span}: {stats.lease_holder} is running the reports; nothing done here")
        elif args.dry_run:
            print(
                f"{span}: {stats.reports_generated} report(s) for {stats.domains} domain(s) "
                f"and {stats.failure_reports} failure report(s) ({stats.failure_incidents} "
                f"incident(s)) written to {args.dry_run}"
            )
        else:
            waiting = " (the period is not over for long enough: waiting)"
            print(
                f"{span}: {stats.domains} domain(s), {stats.reports_generated} report(s) "
                f"generated ({stats.domains_already_done} domain(s) already done, "
                f"{stats.domains_below_minimum} below report.min_messages)"
                f"{waiting if stats.period_not_over else ''}, "
                f"{stats.supplementary_reports} supplementary for late rows; "
                f"{stats.sent} sent, {stats.retry_later} to retry, {stats.failed} failed, "
                f"{stats.refused} not authorized, {stats.rate_limited} held by the rate limit, "
                f"{stats.suppressed} suppressed; bounces: {stats.bounces_counted} counted, "
                f"{stats.bounces_unknown} unknown, {stats.bounces_mismatch} mismatched, "
                f"{stats.bounces_duplicate} duplicate"
                f"{' (more wait for the next run)' if stats.bounces_left else ''}; "
                + _failure_summary(stats)
            )
    return EXIT_OK


def _failure_summary(stats: Any) -> str:
    if stats.failure_disabled:
        return "failure reports off (failure_reports.enabled = false)"
    if stats.failure_lease_holder:
        return f"failure reports: {stats.failure_lease_holder} is running them"
    return (
        f"{stats.failure_reports} failure report(s) made of {stats.failure_incidents} "
        f"incident(s), {stats.failure_dropped_reports} dropped by the rate limits "
        f"({stats.failure_dropped_incidents} incident(s)), {stats.failure_bad_samples} "
        "unreadable"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run

    return run(args.config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "check": cmd_check,
        "evaluate": cmd_evaluate,
        "db": cmd_db,
        "run": cmd_run,
        "report": cmd_report,
        "suppress": cmd_suppress,
        "impact": cmd_impact,
    }
    try:
        return handlers[args.command](args)
    except (InputError, DmarcMilterError) as exc:
        command = args.command
        if command == "db":
            command = f"db {args.db_command}"
        elif command == "suppress":
            command = f"suppress {args.suppress_command}"
        print(f"dmarcmilter {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
