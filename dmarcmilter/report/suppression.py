"""The suppression list: report destinations that get no more reports.

Sending reports to whatever a DMARC record names can cost the reporter its
reputation: a dead mailbox bounces every day, and a spammer's ``rua`` makes
us mail a spam domain.  An entry here stops aggregate and failure reports
alike.  It is an address (``local@domain``) or a domain, which covers the
domain and every name under it, so that an abusive destination cannot
escape its entry by moving to a new subdomain.  An entry is added by hand
(``dmarcmilter suppress add``) or after ``report.suppress_after_bounces``
hard bounces of an address: a delivery status notification (RFC 3464) with
``Action: failed`` and a 5.x.x Status, or the smarthost's 5xx reply to RCPT
about the mailbox (:attr:`.delivery.DeliveryResult.recipient_refused`).

[impl choice] Addresses are compared case-insensitively, local part
included: RFC 5321 §2.4 lets a server distinguish case in local parts, but
suppressing ``Dmarc@`` along with ``dmarc@`` only ever sends fewer reports.

Nothing here caches: every question reads the table, so an entry added or
removed by one host of a fleet counts on the next report of any host.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, case, delete, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..config import Config
from ..domains import DomainError, normalize_domain
from ..errors import DatabaseError, InputError
from ..history.models import SUPPRESSION_TARGET_LENGTH, SuppressionRow
from .mail import normalize_address

# Characters of a reason kept; a bounce's diagnostic text is the sending
# server's (or a forger's) to choose, so a longer one is cut.
MAX_REASON_CHARS = 500
# Names looked up for one address: the address, its domain and each parent.
# A domain name has at most 127 labels; past this many the farthest
# ancestors are not looked up (no real name comes near).
MAX_LOOKUP_NAMES = 130

TABLE = cast(Table, SuppressionRow.__table__)


class SuppressionSource(enum.Enum):
    MANUAL = "manual"  # dmarcmilter suppress add
    BOUNCE = "bounce"  # hard bounces reported by delivery status notifications
    SMARTHOST = "smarthost"  # 5xx replies of the smarthost to our report mail


@dataclass(frozen=True, slots=True)
class BounceRule:
    """When hard bounces suppress an address, and for how long."""

    # Hard bounces that suppress an address.  The count starts again when
    # no hard bounce came for ``period``.
    threshold: int = 3
    period: dt.timedelta = dt.timedelta(days=30)

    @classmethod
    def from_config(cls, config: Config) -> BounceRule:
        return cls(
            threshold=config.report.suppress_after_bounces,
            period=dt.timedelta(days=config.report.suppress_days),
        )


@dataclass(frozen=True, slots=True)
class Suppression:
    """One row of the list, as the commands and the report sender see it."""

    target: str
    reason: str
    source: SuppressionSource
    created_at: dt.datetime
    suppressed_at: dt.datetime | None  # None: bounces counted, not suppressed
    expires_at: dt.datetime | None  # None (when suppressed): never
    bounces: int
    last_bounce_at: dt.datetime | None

    @property
    def is_domain(self) -> bool:
        return "@" not in self.target

    def active(self, now: dt.datetime) -> bool:
        """Whether the entry suppresses its target at ``now``."""
        if self.suppressed_at is None:
            return False
        return self.expires_at is None or self.expires_at > now

    def state(self, now: dt.datetime) -> str:
        """``suppressed``, ``expired`` or ``counting`` (bounces only)."""
        if self.suppressed_at is None:
            return "counting"
        return "suppressed" if self.active(now) else "expired"


def normalize_target(text: str) -> str:
    """An address or a domain as stored: lower case, the domain an A-label.
    InputError for anything else."""
    value = text.strip()
    if "@" in value:
        try:
            target = normalize_address(value).lower()
        except ValueError as exc:
            raise InputError(str(exc)) from None
    else:
        try:
            target = normalize_domain(value)
        except DomainError as exc:
            raise InputError(f"not an address or a domain: {exc}") from None
        if "." not in target:
            # A top-level domain would suppress a whole TLD: say so by hand
            # with a real domain, not by a typo.
            raise InputError(f"not an address or a domain below a top-level domain: {text!r}")
    if len(target) > SUPPRESSION_TARGET_LENGTH:
        raise InputError(f"longer than {SUPPRESSION_TARGET_LENGTH} characters: {text!r}")
    return target


def clean_reason(text: str) -> str:
    """One line of at most MAX_REASON_CHARS: control characters become
    spaces (a reason is printed in a table and in logs)."""
    line = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    line = " ".join(line.split())
    if len(line) > MAX_REASON_CHARS:
        line = line[: MAX_REASON_CHARS - 3] + "..."
    return line


def lookup_names(address: str) -> list[str]:
    """The targets that could suppress ``address``: itself (lower case) and
    its domain with every parent domain, nearest first.  Never raises: an
    address that does not normalize is looked up as written, lower case."""
    value = address.strip().lower()
    local, at, domain = value.rpartition("@")
    with contextlib.suppress(DomainError):
        domain = normalize_domain(domain)
    labels = domain.split(".")
    names = [f"{local}@{domain}"] if at else []
    names += [".".join(labels[i:]) for i in range(len(labels))]
    # Only what a stored target can be: printable ASCII of the column's
    # length.  Anything else matches nothing, and PostgreSQL would refuse
    # a NUL as a query parameter.
    usable = [
        name
        for name in names
        if name.isascii() and name.isprintable() and 0 < len(name) <= SUPPRESSION_TARGET_LENGTH
    ]
    return usable[:MAX_LOOKUP_NAMES]


def _now(now: dt.datetime | None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite and MySQL hand back the stored UTC wall-clock time, naive.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


def _entry(row: Any) -> Suppression:
    """A row of the table (a Core row) as a Suppression."""
    created = _aware(row.created_at)
    assert created is not None
    return Suppression(
        target=str(row.target),
        reason=str(row.reason),
        source=SuppressionSource(row.source),
        created_at=created,
        suppressed_at=_aware(row.suppressed_at),
        expires_at=_aware(row.expires_at),
        bounces=int(row.bounces),
        last_bounce_at=_aware(row.last_bounce_at),
    )


def _get(conn: Connection, target: str) -> Suppression | None:
    row = conn.execute(select(TABLE).where(TABLE.c.target == target)).first()
    return _entry(row) if row is not None else None


def _database_error(action: str, exc: SQLAlchemyError) -> DatabaseError:
    orig = getattr(exc, "orig", None)
    detail = str(orig if orig is not None else exc).splitlines()[0]
    return DatabaseError(f"cannot {action} the suppression list: {detail}")


def _ensure_row(engine: Engine, target: str, source: SuppressionSource, now: dt.datetime) -> None:
    """Insert an empty row for ``target`` unless there is one: its own
    transaction, since a lost race (the unique key) aborts it on PostgreSQL."""
    try:
        with engine.begin() as conn:
            if _get(conn, target) is not None:
                return
            conn.execute(
                insert(TABLE).values(
                    target=target,
                    reason="",
                    source=source.value,
                    created_at=now,
                    suppressed_at=None,
                    expires_at=None,
                    bounces=0,
                    last_bounce_at=None,
                )
            )
    except IntegrityError:
        pass  # another process inserted it first: the row is there


def add(
    engine: Engine,
    target: str,
    reason: str,
    *,
    expires: dt.timedelta | None,
    source: SuppressionSource = SuppressionSource.MANUAL,
    now: dt.datetime | None = None,
) -> Suppression:
    """Suppress ``target`` (an address or a domain) from now, until
    ``expires`` from now or, with None, for ever.  An existing entry is
    replaced; its bounce count is kept.  InputError for a bad target."""
    normalized = normalize_target(target)
    when = _now(now)
    try:
        _ensure_row(engine, normalized, source, when)
        with engine.begin() as conn:
            conn.execute(
                update(TABLE)
                .where(TABLE.c.target == normalized)
                .values(
                    reason=clean_reason(reason),
                    source=source.value,
                    suppressed_at=when,
                    expires_at=when + expires if expires is not None else None,
                )
            )
            entry = _get(conn, normalized)
    except SQLAlchemyError as exc:
        raise _database_error("update", exc) from None
    assert entry is not None
    return entry


def remove(engine: Engine, target: str) -> bool:
    """Delete the entry of ``target``, bounce count included; whether there
    was one."""
    normalized = normalize_target(target)
    try:
        with engine.begin() as conn:
            deleted = conn.execute(delete(TABLE).where(TABLE.c.target == normalized)).rowcount
    except SQLAlchemyError as exc:
        raise _database_error("update", exc) from None
    return bool(deleted)


def entries(engine: Engine) -> list[Suppression]:
    """Every row, suppressed, expired or only counting bounces, by target."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(TABLE).order_by(TABLE.c.target)).all()
    except SQLAlchemyError as exc:
        raise _database_error("read", exc) from None
    return [_entry(row) for row in rows]


def is_suppressed(
    engine: Engine, address: str, *, now: dt.datetime | None = None
) -> Suppression | None:
    """The entry that suppresses ``address`` at ``now`` (its own, or its
    domain's or a parent domain's, unexpired), or None.  An address entry
    wins over a domain entry, a nearer domain over a farther one."""
    return suppressed_by(engine, [address], now=now).get(address)


def suppressed_by(
    engine: Engine, addresses: Sequence[str], *, now: dt.datetime | None = None
) -> dict[str, Suppression]:
    """:func:`is_suppressed` for several addresses in one query: each
    suppressed address mapped to the entry that suppresses it."""
    when = _now(now)
    names = {address: lookup_names(address) for address in addresses}
    wanted = sorted({name for found in names.values() for name in found})
    if not wanted:
        return {}
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(TABLE).where(TABLE.c.target.in_(wanted), TABLE.c.suppressed_at.is_not(None))
            ).all()
    except SQLAlchemyError as exc:
        raise _database_error("read", exc) from None
    active = {e.target: e for e in map(_entry, rows) if e.active(when)}
    found: dict[str, Suppression] = {}
    for address, candidates in names.items():
        for name in candidates:
            if name in active:
                found[address] = active[name]
                break
    return found


def record_hard_bounce(
    engine: Engine,
    address: str,
    reason: str,
    rule: BounceRule,
    *,
    source: SuppressionSource = SuppressionSource.BOUNCE,
    now: dt.datetime | None = None,
) -> Suppression:
    """Count one hard bounce of ``address``; at ``rule.threshold`` bounces
    the address is suppressed for ``rule.period``.  An entry that already
    suppresses it (a manual one, say) is left as it is, apart from the
    count.  Safe against concurrent calls: the count is one UPDATE."""
    target = normalize_target(address)
    if "@" not in target:
        raise InputError(f"a bounce names an address, not a domain: {address!r}")
    when = _now(now)
    stale = when - rule.period
    try:
        _ensure_row(engine, target, source, when)
        with engine.begin() as conn:
            this = TABLE.c.target == target
            conn.execute(
                update(TABLE)
                .where(this)
                .values(
                    bounces=case(
                        (
                            or_(TABLE.c.last_bounce_at.is_(None), TABLE.c.last_bounce_at < stale),
                            1,
                        ),
                        else_=TABLE.c.bounces + 1,
                    ),
                    last_bounce_at=when,
                )
            )
            not_active = or_(
                TABLE.c.suppressed_at.is_(None),
                (TABLE.c.expires_at.is_not(None) & (TABLE.c.expires_at <= when)),
            )
            conn.execute(
                update(TABLE)
                .where(this, TABLE.c.bounces >= rule.threshold, not_active)
                .values(
                    source=source.value,
                    reason=clean_reason(reason),
                    suppressed_at=when,
                    expires_at=when + rule.period,
                )
            )
            entry = _get(conn, target)
    except SQLAlchemyError as exc:
        raise _database_error("update", exc) from None
    assert entry is not None
    return entry
