"""The failure-report sender: recorded incidents -> merged, rate-limited
failure reports in the outbox (RFC 9991 §3 and §5 "rate limiting and
merging"; digest §7.1, §7.3).

The milter only records that a failure report is due (a
``failure_incidents`` row with a capped sample of the message).  A run of
``dmarcmilter report`` then, away from the mail path:

1. **Selects** pending incidents whose merge window has closed.  Windows are
   fixed slices of ``failure_reports.merge_minutes``: an incident arriving
   at epoch second *t* is in window ``t // (merge_minutes * 60)``, closed
   once that window's end has passed.  At most MAX_INCIDENTS_PER_RUN are
   read per run, oldest first; the rest wait for the next run (the last,
   partly read window is left whole for it, so it is merged in one piece).
2. **Merges**: one report per (policy domain, reported domain, source IP,
   failure kind, destination address, window), with ``Incidents: N`` and
   the sample of the group's earliest incident.  An incident due under two
   kinds, or with two ruf destinations, belongs to one group for each.
3. **Rate-limits**: a token bucket per destination domain
   (``destination_burst`` tokens, refilled at ``destination_per_hour``) and
   a global cap of ``max_per_hour`` failure reports made in the last hour.
   A group with no token, or over the cap, is *dropped*: no report, its
   incidents marked dropped, the counts logged once per run per destination
   domain.  Nothing is silently lost.
4. **Stores** each report (``reports`` row, kind ``failure``, content the
   compressed JSON of kind, incidents and sample) with its one delivery,
   and marks its incidents reported or dropped, in one transaction per
   batch of BATCH_INCIDENTS: a crash leaves the whole batch pending, so it
   is never made twice and never lost.

Two senders of a fleet are kept apart by the ``failure-reports`` lease, and
even without it the batch transaction cannot spend a token twice: it begins
by updating the global bucket row, which holds that row's lock (PostgreSQL,
MariaDB row lock; SQLite's write lock) until commit, so batches of two hosts
run one after the other, and every incident changes state only from
``pending`` (a batch finding one already handled is rolled back and retried
against fresh rows).

The outbox then verifies each destination with the ``ruf`` tag, honours the
suppression list and sends, with retries (:mod:`~dmarcmilter.report.outbox`);
:func:`failure_message` composes the mail from the stored report.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from ..config import Config
from ..history.models import FailureIncidentRow, RateBucketRow, ReportRow
from ..history.rows import incident_from_sample
from .destinations import Destination, parse_rua
from .failure import MAX_RUF_URIS, FailureKind
from .failure_mail import FailureIncident, FailureReportSettings, build_failure_report
from .failure_mail import failure_report_bytes as _report_bytes
from .outbox import StoredReport, queue_deliveries

log = logging.getLogger(__name__)

INCIDENTS = cast(Table, FailureIncidentRow.__table__)
BUCKETS = cast(Table, RateBucketRow.__table__)
REPORTS = cast(Table, ReportRow.__table__)

KIND = "failure"  # reports.kind
FORMAT = "arf"  # reports.format: RFC 5965/6591 feedback report
# Incidents read per run, oldest first; past it the rest wait for the next
# run (5 minutes with the shipped timer).  Bounds the run's memory (a few
# hundred bytes an incident: the sample is read for one incident a group).
MAX_INCIDENTS_PER_RUN = 100_000
# Incidents per transaction: a crash redoes at most this many; a smaller
# batch holds the global bucket lock for a shorter time.
BATCH_INCIDENTS = 2_000
# Destination domains named in one "dropped" log line; the rest are summed.
MAX_LOGGED_DOMAINS = 50
# The global bucket row: its lock serialises the batches of a fleet.  Not a
# domain name, so it cannot meet a destination's bucket.
GLOBAL_BUCKET = "*"
RATE_WINDOW = dt.timedelta(hours=1)

# failure_incidents.status
PENDING = "pending"
REPORTED = "reported"
DROPPED = "dropped"


@dataclass
class FailureStats:
    """What the failure phase of a run did."""

    failure_reports: int = 0  # reports made (and queued)
    failure_incidents: int = 0  # incidents merged into them (sum of Incidents)
    failure_dropped_reports: int = 0  # groups dropped by a rate limit
    failure_dropped_incidents: int = 0  # incidents of those groups
    failure_bad_samples: int = 0  # incidents set aside: sample unreadable
    failure_stale: int = 0  # incidents older than report.retry_hours, dropped
    failure_left: int = 0  # pending past MAX_INCIDENTS_PER_RUN: the next run's
    failure_unusable: int = 0  # incidents with no failure kind or no usable ruf: dropped


@dataclass(frozen=True, slots=True)
class Incident:
    """The columns of a pending incident the merging needs (not the sample)."""

    pk: int
    arrived_at: dt.datetime
    policy_domain: str
    reported_domain: str
    source_ip: str
    kinds: tuple[FailureKind, ...]
    ruf: str


GroupKey = tuple[
    str, str, str, FailureKind, str, int
]  # policy, reported, ip, kind, address, window


@dataclass
class Group:
    """Incidents that make one report."""

    key: GroupKey
    destination: Destination
    incidents: list[Incident] = field(default_factory=list)

    @property
    def window(self) -> int:
        return self.key[5]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def window_of(arrived_at: dt.datetime, merge_seconds: int) -> int:
    return int(_aware(arrived_at).timestamp()) // merge_seconds


def _kinds(text: str) -> tuple[FailureKind, ...]:
    known = {k.value: k for k in FailureKind}
    return tuple(known[k] for k in text.split(",") if k in known)


def group_incidents(incidents: Iterable[Incident], merge_seconds: int) -> list[Group]:
    """The report groups of ``incidents``, earliest window first; within a
    group, incidents in arrival order (the first gives the sample)."""
    groups: dict[GroupKey, Group] = {}
    parsed: dict[str, tuple[Destination, ...]] = {}
    for incident in sorted(incidents, key=lambda i: (_aware(i.arrived_at), i.pk)):
        if incident.ruf not in parsed:
            parsed[incident.ruf] = parse_rua(incident.ruf, MAX_RUF_URIS, "ruf")[0]
        window = window_of(incident.arrived_at, merge_seconds)
        for kind in incident.kinds:
            for destination in parsed[incident.ruf]:
                key: GroupKey = (
                    incident.policy_domain,
                    incident.reported_domain,
                    incident.source_ip,
                    kind,
                    destination.address.lower(),
                    window,
                )
                group = groups.get(key)
                if group is None:
                    group = groups[key] = Group(key, destination)
                group.incidents.append(incident)
    return sorted(groups.values(), key=lambda g: (g.window, g.incidents[0].pk, g.key[3].value))


def report_content(kind: FailureKind, incidents: int, sample: dict[str, Any]) -> bytes:
    """What a failure report row stores: compressed JSON."""
    data = {"kind": kind.value, "incidents": incidents, "sample": sample}
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode("utf-8"), 6)


def incident_of_report(content: bytes) -> FailureIncident:
    """The incident a stored failure report describes; ValueError if it
    cannot be read."""
    try:
        data = json.loads(zlib.decompress(content))
        return incident_from_sample(
            data["sample"], FailureKind(data["kind"]), int(data["incidents"])
        )
    except (zlib.error, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unreadable failure report content: {exc!r}") from None


def failure_settings(config: Config, submitter: str) -> FailureReportSettings:
    return FailureReportSettings(
        from_address=config.report.from_address,
        submitter=submitter,
        org_name=config.report.org_name,
        redact=config.failure_reports.redact,
        include_body=config.failure_reports.include_body,
    )


def failure_message(
    settings: FailureReportSettings, report: StoredReport, to_address: str, now: dt.datetime
) -> bytes:
    """The mail of a stored failure report to one address: the outbox's
    ``Compose`` for failure reports.  The Message-ID carries the delivery's
    random token when it has one."""
    return _report_bytes(
        build_failure_report(
            incident_of_report(report.content),
            to_address=to_address,
            report_id=report.report_id,
            date=now,
            settings=settings,
            message_token=report.message_token,
        )
    )


def _new_report_id() -> str:
    # Random, never derived from the data: a failure report is made once,
    # and a report_id is never reused (the column is unique besides).
    return "f" + secrets.token_hex(15)


class _Rollback(Exception):
    """A batch found an incident another sender handled first."""


@dataclass
class FailureSender:
    """One run of the failure sender."""

    config: Config
    engine: Engine
    clock: Callable[[], dt.datetime]
    host: str
    stats: FailureStats
    renew: Callable[[], None] | None = None
    max_incidents: int = MAX_INCIDENTS_PER_RUN
    batch_incidents: int = BATCH_INCIDENTS
    # Per destination domain: [reports, incidents] dropped by its bucket.
    _dropped: dict[str, list[int]] = field(default_factory=dict, init=False)
    _capped: list[int] = field(default_factory=lambda: [0, 0], init=False)
    _buckets: set[str] = field(default_factory=set, init=False)  # known to exist

    @property
    def merge_seconds(self) -> int:
        return self.config.failure_reports.merge_minutes * 60

    # -- selection -------------------------------------------------------------

    def closed_incidents(self) -> list[Incident]:
        """Pending incidents whose window has closed, oldest first, at most
        ``max_incidents``; a window cut by the bound is left whole for the
        next run (unless it alone is over the bound)."""
        now = self.clock()
        # Windows are aligned to the epoch: the current one began at
        # floor(now / merge) * merge; everything before it is closed.
        current = int(now.timestamp()) // self.merge_seconds * self.merge_seconds
        closed_before = dt.datetime.fromtimestamp(current, dt.UTC)
        table = INCIDENTS
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    table.c.id,
                    table.c.arrived_at,
                    table.c.policy_domain,
                    table.c.reported_domain,
                    table.c.source_ip,
                    table.c.kinds,
                    table.c.ruf,
                )
                .where(table.c.status == PENDING, table.c.arrived_at < closed_before)
                .order_by(table.c.arrived_at, table.c.id)
                .limit(self.max_incidents + 1)
            ).all()
        incidents = [
            Incident(
                r.id,
                _aware(r.arrived_at),
                r.policy_domain,
                r.reported_domain,
                r.source_ip,
                _kinds(r.kinds),
                r.ruf,
            )
            for r in rows
        ]
        if len(incidents) > self.max_incidents:
            incidents = incidents[: self.max_incidents]
            last = window_of(incidents[-1].arrived_at, self.merge_seconds)
            whole = [i for i in incidents if window_of(i.arrived_at, self.merge_seconds) != last]
            if whole:
                incidents = whole
            with self.engine.connect() as conn:
                pending = conn.execute(
                    select(func.count()).select_from(table).where(table.c.status == PENDING)
                ).scalar_one()
            self.stats.failure_left = int(pending) - len(incidents)
            log.warning(
                "failure reports: %d pending incidents, over the %d a run takes; "
                "the rest wait for the next run",
                pending,
                self.max_incidents,
            )
        return incidents

    # -- the run ---------------------------------------------------------------

    def run(self) -> None:
        self._ensure_buckets([GLOBAL_BUCKET])
        self._drop_stale()
        incidents = self.closed_incidents()
        groups = group_incidents(incidents, self.merge_seconds)
        grouped = {i.pk for g in groups for i in g.incidents}
        unusable = sum(1 for i in incidents if i.pk not in grouped)
        if unusable:
            # Marked dropped with their batch; the milter records only
            # incidents with a kind and a usable ruf, so this is unexpected.
            self.stats.failure_unusable += unusable
            log.warning("failure reports: %d incidents with no usable ruf dropped", unusable)
        for batch in self._batches(incidents, groups):
            if self.renew is not None:
                self.renew()
            self._make_batch(*batch)
        self._log_dropped()

    def _drop_stale(self) -> None:
        """Incidents older than report.retry_hours are past use (left
        pending while failure reports were off, say): dropped, counted."""
        limit = self.clock() - dt.timedelta(hours=self.config.report.retry_hours)
        table = INCIDENTS
        with self.engine.begin() as conn:
            stale = conn.execute(
                update(table)
                .where(table.c.status == PENDING, table.c.arrived_at < limit)
                .values(status=DROPPED, handled_at=self.clock())
            ).rowcount
        if stale:
            self.stats.failure_stale += stale
            log.warning(
                "failure reports: %d incidents older than %d hours dropped unsent",
                stale,
                self.config.report.retry_hours,
            )

    def _batches(
        self, incidents: list[Incident], groups: list[Group]
    ) -> Iterator[tuple[list[Incident], list[Group]]]:
        """Batches of whole groups and whole incidents: an incident's groups
        all share its (policy domain, reported domain, IP, window), so a
        batch is a run of those clusters, about batch_incidents large."""

        def cluster(i: Incident) -> tuple[str, str, str, int]:
            return (
                i.policy_domain,
                i.reported_domain,
                i.source_ip,
                window_of(i.arrived_at, self.merge_seconds),
            )

        by_cluster: dict[tuple[str, str, str, int], tuple[list[Incident], list[Group]]] = {}
        for incident in incidents:
            by_cluster.setdefault(cluster(incident), ([], []))[0].append(incident)
        for group in groups:
            by_cluster[cluster(group.incidents[0])][1].append(group)
        batch_i: list[Incident] = []
        batch_g: list[Group] = []
        for members, member_groups in by_cluster.values():
            batch_i.extend(members)
            batch_g.extend(member_groups)
            if len(batch_i) >= self.batch_incidents:
                yield batch_i, batch_g
                batch_i, batch_g = [], []
        if batch_i:
            yield batch_i, batch_g

    def _ensure_buckets(self, names: Iterable[str]) -> None:
        """Make the buckets of ``names`` that do not exist yet, full."""
        missing = sorted(set(names) - self._buckets)
        if not missing:
            return
        with self.engine.connect() as conn:
            for start in range(0, len(missing), 500):
                self._buckets.update(
                    conn.execute(
                        select(BUCKETS.c.name).where(
                            BUCKETS.c.name.in_(missing[start : start + 500])
                        )
                    ).scalars()
                )
        rows = [
            {
                "name": name,
                "tokens": float(self.config.failure_reports.destination_burst),
                "updated_at": self.clock(),
            }
            for name in missing
            if name not in self._buckets
        ]
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(BUCKETS), rows)
        except IntegrityError:
            # Another host made one of them just now: one at a time.
            for row in rows:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(insert(BUCKETS), [row])
                except IntegrityError:
                    pass
        self._buckets.update(str(row["name"]) for row in rows)

    def samples(self, pks: list[int]) -> dict[int, dict[str, Any] | None]:
        """The samples of ``pks``; None for one that cannot be read."""
        table = INCIDENTS
        out: dict[int, dict[str, Any] | None] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(pks), 500):
                chunk = pks[start : start + 500]
                for pk, text in conn.execute(
                    select(table.c.id, table.c.sample).where(table.c.id.in_(chunk))
                ):
                    try:
                        sample = json.loads(text)
                        incident_from_sample(sample, FailureKind.DMARC)
                    except (KeyError, TypeError, ValueError, AttributeError) as exc:
                        log.warning("failure incident %d: unreadable sample set aside: %r", pk, exc)
                        out[pk] = None
                    else:
                        out[pk] = sample
        return out

    def _make_batch(self, incidents: list[Incident], groups: list[Group]) -> None:
        # The earliest readable sample of each group; an unreadable one is
        # set aside (dropped) and the next incident speaks for the group.
        samples = self.samples(sorted({g.incidents[0].pk for g in groups}))
        bad: set[int] = {pk for pk, s in samples.items() if s is None}
        for group in groups:
            while group.incidents and samples.get(group.incidents[0].pk) is None:
                pk = group.incidents[0].pk
                bad.add(pk)
                group.incidents = [i for i in group.incidents if i.pk != pk]
                if group.incidents and group.incidents[0].pk not in samples:
                    samples.update(self.samples([group.incidents[0].pk]))
        for group in groups:
            group.incidents = [i for i in group.incidents if i.pk not in bad]
        for _attempt in range(3):
            try:
                self._store_batch(incidents, [g for g in groups if g.incidents], samples, bad)
                return
            except _Rollback:
                # Another sender handled some of these first: read again
                # which are still pending and try once more with those.
                incidents = self._still_pending(incidents)
                keep = {i.pk for i in incidents}
                for group in groups:
                    group.incidents = [i for i in group.incidents if i.pk in keep]
                    if group.incidents and group.incidents[0].pk not in samples:
                        samples.update(self.samples([group.incidents[0].pk]))
                bad &= keep
        log.warning("failure reports: a batch kept meeting another sender; left for the next run")

    def _still_pending(self, incidents: list[Incident]) -> list[Incident]:
        table = INCIDENTS
        pks = [i.pk for i in incidents]
        pending: set[int] = set()
        with self.engine.connect() as conn:
            for start in range(0, len(pks), 500):
                pending.update(
                    conn.execute(
                        select(table.c.id).where(
                            table.c.id.in_(pks[start : start + 500]), table.c.status == PENDING
                        )
                    ).scalars()
                )
        return [i for i in incidents if i.pk in pending]

    def _store_batch(
        self,
        incidents: list[Incident],
        groups: list[Group],
        samples: dict[int, dict[str, Any] | None],
        bad: set[int],
    ) -> None:
        fr = self.config.failure_reports
        now = self.clock()
        stats = FailureStats()
        dropped: dict[str, list[int]] = {}
        capped = [0, 0]
        reported: set[int] = set()
        made: list[Group] = []
        self._ensure_buckets(g.destination.host for g in groups)
        with self.engine.begin() as conn:
            # First statement: this row's lock serialises the batches of
            # every sender until commit, so the counts read next are final.
            conn.execute(
                update(BUCKETS).where(BUCKETS.c.name == GLOBAL_BUCKET).values(updated_at=now)
            )
            made_last_hour = int(
                conn.execute(
                    select(func.count())
                    .select_from(REPORTS)
                    .where(REPORTS.c.kind == KIND, REPORTS.c.created_at > now - RATE_WINDOW)
                ).scalar_one()
            )
            tokens = self._read_buckets(conn, sorted({g.destination.host for g in groups}), now)
            for group in groups:
                host = group.destination.host
                size = len(group.incidents)
                if made_last_hour >= fr.max_per_hour:
                    capped[0] += 1
                    capped[1] += size
                    stats.failure_dropped_reports += 1
                    stats.failure_dropped_incidents += size
                    continue
                if tokens[host] < 1.0:
                    counts = dropped.setdefault(host, [0, 0])
                    counts[0] += 1
                    counts[1] += size
                    stats.failure_dropped_reports += 1
                    stats.failure_dropped_incidents += size
                    continue
                tokens[host] -= 1.0
                made_last_hour += 1
                made.append(group)
                reported.update(i.pk for i in group.incidents)
                stats.failure_reports += 1
                stats.failure_incidents += size
            self._store_reports(conn, made, samples, now)
            for host, left in tokens.items():
                conn.execute(
                    update(BUCKETS)
                    .where(BUCKETS.c.name == host)
                    .values(tokens=left, updated_at=now)
                )
            handled = self._mark(conn, incidents, reported, now)
            if handled != len(incidents):
                raise _Rollback
        # Committed: only now does the run count it.
        for name in (
            "failure_reports",
            "failure_incidents",
            "failure_dropped_reports",
            "failure_dropped_incidents",
        ):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(stats, name))
        self.stats.failure_bad_samples += len(bad)
        for host, (n, m) in dropped.items():
            counts = self._dropped.setdefault(host, [0, 0])
            counts[0] += n
            counts[1] += m
        self._capped[0] += capped[0]
        self._capped[1] += capped[1]

    def _read_buckets(
        self, conn: Connection, hosts: list[str], now: dt.datetime
    ) -> dict[str, float]:
        """Each destination's tokens now: refilled since its last update at
        destination_per_hour, up to destination_burst."""
        fr = self.config.failure_reports
        rate = fr.destination_per_hour / 3600.0
        tokens: dict[str, float] = {}
        for start in range(0, len(hosts), 500):
            chunk = hosts[start : start + 500]
            for name, left, updated_at in conn.execute(
                select(BUCKETS.c.name, BUCKETS.c.tokens, BUCKETS.c.updated_at)
                .where(BUCKETS.c.name.in_(chunk))
                .with_for_update()
            ):
                elapsed = max(0.0, (now - _aware(updated_at)).total_seconds())
                tokens[name] = min(float(fr.destination_burst), float(left) + elapsed * rate)
        return tokens

    def _store_reports(
        self,
        conn: Connection,
        groups: list[Group],
        samples: dict[int, dict[str, Any] | None],
        now: dt.datetime,
    ) -> None:
        """Store the batch's reports (one statement) and queue each one's
        delivery."""
        if not groups:
            return
        rows = []
        for group in groups:
            first = group.incidents[0]
            sample = samples[first.pk]
            assert sample is not None  # groups speak with a readable sample
            begin = group.window * self.merge_seconds
            rows.append(
                {
                    "kind": KIND,
                    "sequence": 0,
                    "report_id": _new_report_id(),
                    "policy_domain": first.policy_domain,
                    "period_begin": begin,
                    "period_end": begin + self.merge_seconds - 1,
                    "format": FORMAT,
                    "filename": "",
                    "message_count": len(group.incidents),
                    "record_count": 1,
                    "content": report_content(group.key[3], len(group.incidents), sample),
                    "created_at": now,
                    "created_by": self.host,
                }
            )
        conn.execute(insert(REPORTS), rows)
        ids = [str(r["report_id"]) for r in rows]
        pk_of: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            pk_of.update(
                (report_id, pk)
                for pk, report_id in conn.execute(
                    select(REPORTS.c.id, REPORTS.c.report_id).where(
                        REPORTS.c.report_id.in_(ids[start : start + 500])
                    )
                )
            )
        for row, group in zip(rows, groups, strict=True):
            queue_deliveries(conn, pk_of[str(row["report_id"])], (group.destination,), now)

    def _mark(
        self, conn: Connection, incidents: list[Incident], reported: set[int], now: dt.datetime
    ) -> int:
        """Mark the batch's incidents reported or dropped, each only from
        pending; the number changed."""
        table = INCIDENTS
        changed = 0
        for status, pks in (
            (REPORTED, sorted(reported)),
            (DROPPED, sorted({i.pk for i in incidents} - reported)),
        ):
            for start in range(0, len(pks), 500):
                changed += conn.execute(
                    update(table)
                    .where(table.c.id.in_(pks[start : start + 500]), table.c.status == PENDING)
                    .values(status=status, handled_at=now)
                ).rowcount
        return changed

    def _log_dropped(self) -> None:
        if self._dropped:
            ranked = sorted(self._dropped.items(), key=lambda kv: (-kv[1][0], kv[0]))
            shown = ", ".join(
                f"{host} {n} reports ({m} incidents)"
                for host, (n, m) in ranked[:MAX_LOGGED_DOMAINS]
            )
            rest = ranked[MAX_LOGGED_DOMAINS:]
            if rest:
                shown += (
                    f", and {len(rest)} more domains {sum(n for _, (n, _) in rest)} reports "
                    f"({sum(m for _, (_, m) in rest)} incidents)"
                )
            log.warning("failure reports dropped by the per-destination rate limit: %s", shown)
        if self._capped[0]:
            log.warning(
                "failure reports dropped by the global cap of %d an hour: %d reports "
                "(%d incidents)",
                self.config.failure_reports.max_per_hour,
                self._capped[0],
                self._capped[1],
            )


__all__ = [
    "BATCH_INCIDENTS",
    "FORMAT",
    "GLOBAL_BUCKET",
    "KIND",
    "MAX_INCIDENTS_PER_RUN",
    "FailureSender",
    "FailureStats",
    "Group",
    "Incident",
    "failure_message",
    "failure_settings",
    "group_incidents",
    "incident_of_report",
    "report_content",
]
