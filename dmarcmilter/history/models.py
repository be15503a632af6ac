"""SQLAlchemy models of the history store.

One ``messages`` row per evaluated message, with its DKIM results and policy
override reasons in child tables.  The messages table also carries canonical
text summaries of those children (``dkim_summary``, ``reasons_summary``) so
that the aggregate-report query (RFC 9990: one record per source IP, result
and set of authentication results) can GROUP BY the messages table alone,
without joining and re-aggregating the children.

The migrations in ``migrations/versions`` are written to match these models
exactly; ``tests/test_history_schema.py`` compares them.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias);
# BIGINT there would need explicit ids, so use INTEGER on SQLite only.
ID_TYPE = BigInteger().with_variant(Integer, "sqlite")
# MySQL's DATETIME keeps whole seconds unless asked for more (and MySQL
# rounds the fraction, so 23:59:59.9999 would count in the next day's
# report): DATETIME(6) keeps microseconds, as the other databases do.  Like
# SQLite, it stores no offset; the values are UTC.
TIMESTAMP_TYPE = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Unbounded text: TEXT is on SQLite and PostgreSQL, but MySQL's TEXT holds
# 65,535 bytes, which a hostile header or HELO name can exceed; MEDIUMTEXT
# (16 MB) there.
TEXT_TYPE = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
# A compressed report: MySQL's BLOB stops at 64 KB.
BLOB_TYPE = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
# MySQL and MariaDB (options under both dialect names, for mysql:// and
# mariadb:// URLs): InnoDB for transactions and foreign keys, the full UTF-8
# (utf8mb4, not the 3-byte "utf8"), and a binary collation, so that values
# compare, GROUP BY and sort byte for byte as on SQLite and PostgreSQL rather
# than case-insensitively, as the server's default collation would.
MYSQL_TABLE_OPTIONS = {
    f"{dialect}_{option}": value
    for dialect in ("mysql", "mariadb")
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}

# Explicit constraint names keep migrations portable and reviewable: the
# same name on every database, so later migrations can drop them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Lengths bound only values dmarcmilter has validated: domain names that
# passed normalisation and enum values.  Whatever the SMTP client or a
# message header supplies as is (HELO, envelope domains, DKIM d= and s=,
# queue ids) is TEXT_TYPE, so that no hostile value can make an insert fail
# on PostgreSQL or MySQL, which enforce VARCHAR lengths (MySQL, TEXT's too).
DOMAIN_LENGTH = 255  # RFC 1035 §2.3.4: 253 characters, with room for a dot
SHORT = 32  # enum values: results, policies, dispositions


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MessageRow(Base):
    """One evaluated message: the envelope, the identifiers, the DMARC record
    as evaluated and every result an RFC 9990 report record needs."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    # Made when the row is built, before it is journaled, so replaying the
    # journal after a crash inserts nothing twice.
    idempotency_key: Mapped[str] = mapped_column(String(32), unique=True)
    arrived_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    queue_id: Mapped[str] = mapped_column(TEXT_TYPE)
    client_ip: Mapped[str] = mapped_column(String(45))  # longest IPv6 text form
    helo: Mapped[str] = mapped_column(TEXT_TYPE)
    # Empty string for the null reverse-path; NULL only when unknown.
    envelope_from_domain: Mapped[str | None] = mapped_column(TEXT_TYPE)
    # The first recipient's domain only: RFC 9990 envelope_to is a single
    # optional value, and the milter evaluates once per message, not once per
    # recipient, so one row per message keeps the counts right.
    envelope_to_domain: Mapped[str | None] = mapped_column(TEXT_TYPE)
    header_from_domain: Mapped[str | None] = mapped_column(String(DOMAIN_LENGTH))
    policy_domain: Mapped[str | None] = mapped_column(String(DOMAIN_LENGTH))
    org_domain: Mapped[str | None] = mapped_column(String(DOMAIN_LENGTH))

    # The DMARC record as evaluated (RFC 9990 policy_published); NULL when
    # no usable record was found.
    p: Mapped[str | None] = mapped_column(String(SHORT))
    sp: Mapped[str | None] = mapped_column(String(SHORT))
    np: Mapped[str | None] = mapped_column(String(SHORT))
    adkim: Mapped[str | None] = mapped_column(String(1))
    aspf: Mapped[str | None] = mapped_column(String(1))
    testing: Mapped[str | None] = mapped_column(String(1))  # t: "y" or "n"
    pct: Mapped[int | None] = mapped_column(SmallInteger)
    fo: Mapped[str | None] = mapped_column(String(SHORT))
    psd: Mapped[str | None] = mapped_column(String(1))
    discovery_method: Mapped[str | None] = mapped_column(String(SHORT))
    rua: Mapped[str | None] = mapped_column(TEXT_TYPE)  # comma-joined URIs
    ruf: Mapped[str | None] = mapped_column(TEXT_TYPE)
    record_errors: Mapped[str | None] = mapped_column(TEXT_TYPE)  # newline-joined

    dmarc_result: Mapped[str] = mapped_column(String(SHORT))
    policy_evaluated: Mapped[str | None] = mapped_column(String(SHORT))
    disposition: Mapped[str] = mapped_column(String(SHORT))
    dkim_aligned: Mapped[bool] = mapped_column(Boolean)
    spf_aligned: Mapped[bool] = mapped_column(Boolean)
    spf_domain: Mapped[str] = mapped_column(TEXT_TYPE)
    spf_scope: Mapped[str] = mapped_column(String(SHORT))
    spf_result: Mapped[str] = mapped_column(String(SHORT))
    arc_result: Mapped[str] = mapped_column(String(SHORT))
    # List-Id or List-Post present (RFC 2919, RFC 2369): what the policy
    # step's mailing-list downgrade looks at, kept for every message so the
    # impact view can tell list mail apart whatever the settings were.
    mailing_list: Mapped[bool] = mapped_column(Boolean, server_default=false())
    dkim_summary: Mapped[str] = mapped_column(TEXT_TYPE)
    reasons_summary: Mapped[str] = mapped_column(TEXT_TYPE)
    # A digest of every column that makes an RFC 9990 record (rows.py,
    # record_key): the report query groups by this one short value.
    record_key: Mapped[str] = mapped_column(String(32))

    dkim_results: Mapped[list[DKIMResultRow]] = relationship(
        back_populates="message",
        order_by="DKIMResultRow.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    override_reasons: Mapped[list[OverrideReasonRow]] = relationship(
        back_populates="message",
        order_by="OverrideReasonRow.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        # The report query: one policy domain over one period, grouped by
        # record_key, all read from the index without touching the table.
        Index(
            "ix_messages_policy_domain_arrived_at_record_key",
            "policy_domain",
            "arrived_at",
            "record_key",
        ),
        # Pruning and "what arrived in this period" for every domain.
        Index("ix_messages_arrived_at", "arrived_at"),
        MYSQL_TABLE_OPTIONS,
    )


class DKIMResultRow(Base):
    """One DKIM signature verification of a message, in report order."""

    __tablename__ = "dkim_results"
    __table_args__ = MYSQL_TABLE_OPTIONS

    message_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(TEXT_TYPE)
    selector: Mapped[str] = mapped_column(TEXT_TYPE)
    result: Mapped[str] = mapped_column(String(SHORT))
    human_result: Mapped[str] = mapped_column(TEXT_TYPE)

    message: Mapped[MessageRow] = relationship(back_populates="dkim_results")


class OverrideReasonRow(Base):
    """One policy override reason (RFC 9990 PolicyOverrideReason)."""

    __tablename__ = "override_reasons"
    __table_args__ = MYSQL_TABLE_OPTIONS

    message_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(SHORT))
    comment: Mapped[str] = mapped_column(TEXT_TYPE)

    message: Mapped[MessageRow] = relationship(back_populates="override_reasons")


class ReportRow(Base):
    """One aggregate report generated (RFC 9990): kept so that a later run
    never generates it twice, and a retry resends the very same bytes."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    # "aggregate" (RFC 9990) or "failure" (RFC 9991): what ``content`` holds
    # and which tag (rua or ruf) authorizes its destinations.
    kind: Mapped[str] = mapped_column(String(SHORT), server_default="aggregate")
    # 0 for the first report of a policy domain's period; n for the n-th
    # supplementary report, which covers only rows that reached the
    # database after the ones before it were made.
    sequence: Mapped[int] = mapped_column(Integer, server_default="0")
    # Alphanumeric and stable for one policy domain, period, policy
    # configuration and format; also the filename's unique-id.
    report_id: Mapped[str] = mapped_column(String(SHORT * 2), unique=True)
    policy_domain: Mapped[str] = mapped_column(String(DOMAIN_LENGTH))
    period_begin: Mapped[int] = mapped_column(BigInteger)  # epoch seconds, UTC
    period_end: Mapped[int] = mapped_column(BigInteger)  # the last second of the period
    format: Mapped[str] = mapped_column(String(SHORT))
    filename: Mapped[str] = mapped_column(TEXT_TYPE)
    message_count: Mapped[int] = mapped_column(BigInteger)
    record_count: Mapped[int] = mapped_column(BigInteger)
    # The gzip-compressed XML, exactly as attached.
    content: Mapped[bytes] = mapped_column(BLOB_TYPE)
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    created_by: Mapped[str] = mapped_column(TEXT_TYPE)  # the host that generated it

    deliveries: Mapped[list[ReportDeliveryRow]] = relationship(
        back_populates="report", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        # "Is this domain's period done?": one index lookup per domain.
        Index("ix_reports_policy_domain_period_begin", "policy_domain", "period_begin"),
        MYSQL_TABLE_OPTIONS,
    )


class ReportDeliveryRow(Base):
    """One destination (rua URI) of a report, and where its delivery stands."""

    __tablename__ = "report_deliveries"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    report_pk: Mapped[int] = mapped_column(ID_TYPE, ForeignKey("reports.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # its place in the rua tag
    uri: Mapped[str] = mapped_column(TEXT_TYPE)  # as published
    # The mailbox sent to (an authorized override replaces the published
    # one); its domain is what the rate limit counts.
    address: Mapped[str] = mapped_column(TEXT_TYPE)
    destination_domain: Mapped[str] = mapped_column(String(DOMAIN_LENGTH))
    # pending (to verify and send), sent, refused (not authorized: never
    # sent), failed (permanent failure, or given up after retries),
    # suppressed (the destination is on the suppression list: never sent).
    status: Mapped[str] = mapped_column(String(SHORT))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    sent_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE)
    detail: Mapped[str] = mapped_column(TEXT_TYPE)
    # Random, part of the report mail's Message-ID: a delivery status
    # notification names it, and only someone who saw the report mail can,
    # so a forged bounce cannot suppress a destination.  NULL for
    # deliveries queued before it existed.
    message_token: Mapped[str | None] = mapped_column(String(SHORT))

    report: Mapped[ReportRow] = relationship(back_populates="deliveries")
    attempts_made: Mapped[list[ReportAttemptRow]] = relationship(
        back_populates="delivery", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        Index("uq_report_deliveries_report_pk_position", "report_pk", "position", unique=True),
        Index("ix_report_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_report_deliveries_destination_domain_sent_at", "destination_domain", "sent_at"),
        MYSQL_TABLE_OPTIONS,
    )


class ReportAttemptRow(Base):
    """Every delivery attempt, with what the server, sendmail or DNS said."""

    __tablename__ = "report_attempts"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("report_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    # sent, tempfail, permfail, deferred (DNS), refused (not authorized),
    # suppressed (on the suppression list), bounced (a counted hard bounce)
    result: Mapped[str] = mapped_column(String(SHORT))
    detail: Mapped[str] = mapped_column(TEXT_TYPE)
    host: Mapped[str] = mapped_column(TEXT_TYPE)  # the host that tried

    delivery: Mapped[ReportDeliveryRow] = relationship(back_populates="attempts_made")

    __table_args__ = (MYSQL_TABLE_OPTIONS,)


class LeaseRow(Base):
    """A named lease: the one host of a fleet that may run a job (the
    report run) until ``expires_at``, renewed while it works."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(SHORT * 2), primary_key=True)
    holder: Mapped[str] = mapped_column(String(DOMAIN_LENGTH))
    expires_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)

    __table_args__ = (MYSQL_TABLE_OPTIONS,)


# An address (RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its
# angle brackets) or a domain name, both checked before they are stored.
SUPPRESSION_TARGET_LENGTH = 254


class SuppressionRow(Base):
    """A report destination that gets no more reports: an address, or a
    domain with everything under it.  Also the hard-bounce count of an
    address that is not suppressed yet (``suppressed_at`` NULL)."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    # "local@domain" or "domain", lower-case, the domain an A-label.
    target: Mapped[str] = mapped_column(String(SUPPRESSION_TARGET_LENGTH), unique=True)
    reason: Mapped[str] = mapped_column(TEXT_TYPE)
    # How the suppression came: manual, bounce (a DSN), smarthost (a 5xx
    # reply to our report mail).
    source: Mapped[str] = mapped_column(String(SHORT))
    created_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    # NULL: not suppressed, only hard bounces counted so far.
    suppressed_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE)
    # NULL (when suppressed): never expires.
    expires_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE)
    bounces: Mapped[int] = mapped_column(Integer)
    last_bounce_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE)

    __table_args__ = (MYSQL_TABLE_OPTIONS,)


class LateMessageRow(Base):
    """A message row written after the end of the day it arrived in (a
    host's journal replayed after an outage): the day's report may be made
    already, so such rows are reported by claim, each exactly once.

    The writer inserts it in the same transaction as its message, so a late
    message is never visible without its mark.
    """

    __tablename__ = "late_messages"

    message_pk: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    # The report run that took it; NULL while no report has.
    claim: Mapped[str | None] = mapped_column(String(SHORT), index=True)

    __table_args__ = (MYSQL_TABLE_OPTIONS,)


class FailureIncidentRow(Base):
    """A message for which the policy record asked for failure reports
    (RFC 9991): recorded by the milter with the message's row, turned into
    (merged) reports by the report job."""

    __tablename__ = "failure_incidents"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    message_pk: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    arrived_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    # The domain whose record carried the ruf, and the author domain.
    policy_domain: Mapped[str] = mapped_column(String(DOMAIN_LENGTH))
    reported_domain: Mapped[str] = mapped_column(String(DOMAIN_LENGTH))
    source_ip: Mapped[str] = mapped_column(String(45))
    # The failure kinds due, comma-joined in the order dmarc, dkim, spf.
    kinds: Mapped[str] = mapped_column(String(SHORT))
    ruf: Mapped[str] = mapped_column(TEXT_TYPE)  # usable ruf URIs, comma-joined
    # What a report shows of the message (capped header fields, envelope,
    # Authentication-Results, failed identifiers), as JSON.
    sample: Mapped[str] = mapped_column(TEXT_TYPE)
    # pending, reported, dropped (rate limit, refused or given up).
    status: Mapped[str] = mapped_column(String(SHORT))
    handled_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE)

    __table_args__ = (
        Index("ix_failure_incidents_status_arrived_at", "status", "arrived_at"),
        MYSQL_TABLE_OPTIONS,
    )


class RateBucketRow(Base):
    """A token bucket of the failure-report rate limit, one per destination
    domain: ``tokens`` as of ``updated_at``, refilled at the configured rate
    up to the burst."""

    __tablename__ = "rate_buckets"

    name: Mapped[str] = mapped_column(String(DOMAIN_LENGTH), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)

    __table_args__ = (MYSQL_TABLE_OPTIONS,)


class ReportBounceRow(Base):
    """A hard bounce named in a delivery status notification (RFC 3464)
    that reached the report address; the report job checks that it names
    one of our report mails and that destination before it counts."""

    __tablename__ = "report_bounces"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    received_at: Mapped[dt.datetime] = mapped_column(TIMESTAMP_TYPE)
    original_message_id: Mapped[str] = mapped_column(TEXT_TYPE)
    address: Mapped[str] = mapped_column(TEXT_TYPE)
    status: Mapped[str] = mapped_column(String(SHORT))
    diagnostic: Mapped[str] = mapped_column(TEXT_TYPE)
    reporting_mta: Mapped[str] = mapped_column(TEXT_TYPE)
    # NULL until the report job has looked at it; then what it decided
    # (counted, unknown, mismatch).
    processed_at: Mapped[dt.datetime | None] = mapped_column(TIMESTAMP_TYPE, index=True)
    outcome: Mapped[str | None] = mapped_column(String(SHORT))

    __table_args__ = (MYSQL_TABLE_OPTIONS,)
