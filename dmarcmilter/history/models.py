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
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias);
# BIGINT there would need explicit ids, so use INTEGER on SQLite only.
ID_TYPE = BigInteger().with_variant(Integer, "sqlite")

# Explicit constraint names keep migrations portable and reviewable: the
# same name on SQLite and PostgreSQL, so later migrations can drop them.
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
# queue ids) is Text, so that no hostile value can make an insert fail on
# PostgreSQL, which enforces VARCHAR lengths.
DOMAIN_LENGTH = 255  # RFC 1035 §2.3.4: 253 characters, with room for a dot
SHORT = 32  # enum values: results, policies, dispositions


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MessageRow(Base):
    """One evaluated message: the envelope, the identifiers, the DMARC record
    as evaluated and every result an RFC 9990 report record needs."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(ID_TYPE, primary_key=True, autoincrement=True)
    # Made by the writer when the row is first spooled, so replaying a spool
    # file after a crash inserts nothing twice.
    idempotency_key: Mapped[str] = mapped_column(String(32), unique=True)
    arrived_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    queue_id: Mapped[str] = mapped_column(Text)
    client_ip: Mapped[str] = mapped_column(String(45))  # longest IPv6 text form
    helo: Mapped[str] = mapped_column(Text)
    # Empty string for the null reverse-path; NULL only when unknown.
    envelope_from_domain: Mapped[str | None] = mapped_column(Text)
    # The first recipient's domain only: RFC 9990 envelope_to is a single
    # optional value, and the milter evaluates once per message, not once per
    # recipient, so one row per message keeps the counts right.
    envelope_to_domain: Mapped[str | None] = mapped_column(Text)
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
    rua: Mapped[str | None] = mapped_column(Text)  # comma-joined URIs
    ruf: Mapped[str | None] = mapped_column(Text)
    record_errors: Mapped[str | None] = mapped_column(Text)  # newline-joined

    dmarc_result: Mapped[str] = mapped_column(String(SHORT))
    policy_evaluated: Mapped[str | None] = mapped_column(String(SHORT))
    disposition: Mapped[str] = mapped_column(String(SHORT))
    dkim_aligned: Mapped[bool] = mapped_column(Boolean)
    spf_aligned: Mapped[bool] = mapped_column(Boolean)
    spf_domain: Mapped[str] = mapped_column(Text)
    spf_scope: Mapped[str] = mapped_column(String(SHORT))
    spf_result: Mapped[str] = mapped_column(String(SHORT))
    arc_result: Mapped[str] = mapped_column(String(SHORT))
    dkim_summary: Mapped[str] = mapped_column(Text)
    reasons_summary: Mapped[str] = mapped_column(Text)

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
        # The report query: one policy domain over one period.
        Index("ix_messages_policy_domain_arrived_at", "policy_domain", "arrived_at"),
        # Pruning and "what arrived in this period" for every domain.
        Index("ix_messages_arrived_at", "arrived_at"),
    )


class DKIMResultRow(Base):
    """One DKIM signature verification of a message, in report order."""

    __tablename__ = "dkim_results"

    message_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    domain: Mapped[str] = mapped_column(Text)
    selector: Mapped[str] = mapped_column(Text)
    result: Mapped[str] = mapped_column(String(SHORT))
    human_result: Mapped[str] = mapped_column(Text)

    message: Mapped[MessageRow] = relationship(back_populates="dkim_results")


class OverrideReasonRow(Base):
    """One policy override reason (RFC 9990 PolicyOverrideReason)."""

    __tablename__ = "override_reasons"

    message_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(SHORT))
    comment: Mapped[str] = mapped_column(Text)

    message: Mapped[MessageRow] = relationship(back_populates="override_reasons")
