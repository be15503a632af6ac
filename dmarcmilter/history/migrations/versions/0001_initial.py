"""The initial history store: messages, dkim_results, override_reasons.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported from models.py: a migration must keep
# describing this revision after the models move on.
ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# MySQL and MariaDB: microseconds (DATETIME(6)), MEDIUMTEXT, InnoDB, utf8mb4
# and a binary collation; see models.py.
TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
TIMESTAMP_TYPE = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    f"{dialect}_{option}": value
    for dialect in ("mysql", "mariadb")
    for option, value in (("engine", "InnoDB"), ("charset", "utf8mb4"), ("collate", "utf8mb4_bin"))
}
DOMAIN = 255
SHORT = 32


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(32), nullable=False),
        sa.Column("arrived_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("queue_id", TEXT, nullable=False),
        sa.Column("client_ip", sa.String(45), nullable=False),
        sa.Column("helo", TEXT, nullable=False),
        sa.Column("envelope_from_domain", TEXT, nullable=True),
        sa.Column("envelope_to_domain", TEXT, nullable=True),
        sa.Column("header_from_domain", sa.String(DOMAIN), nullable=True),
        sa.Column("policy_domain", sa.String(DOMAIN), nullable=True),
        sa.Column("org_domain", sa.String(DOMAIN), nullable=True),
        sa.Column("p", sa.String(SHORT), nullable=True),
        sa.Column("sp", sa.String(SHORT), nullable=True),
        sa.Column("np", sa.String(SHORT), nullable=True),
        sa.Column("adkim", sa.String(1), nullable=True),
        sa.Column("aspf", sa.String(1), nullable=True),
        sa.Column("testing", sa.String(1), nullable=True),
        sa.Column("pct", sa.SmallInteger(), nullable=True),
        sa.Column("fo", sa.String(SHORT), nullable=True),
        sa.Column("psd", sa.String(1), nullable=True),
        sa.Column("discovery_method", sa.String(SHORT), nullable=True),
        sa.Column("rua", TEXT, nullable=True),
        sa.Column("ruf", TEXT, nullable=True),
        sa.Column("record_errors", TEXT, nullable=True),
        sa.Column("dmarc_result", sa.String(SHORT), nullable=False),
        sa.Column("policy_evaluated", sa.String(SHORT), nullable=True),
        sa.Column("disposition", sa.String(SHORT), nullable=False),
        sa.Column("dkim_aligned", sa.Boolean(), nullable=False),
        sa.Column("spf_aligned", sa.Boolean(), nullable=False),
        sa.Column("spf_domain", TEXT, nullable=False),
        sa.Column("spf_scope", sa.String(SHORT), nullable=False),
        sa.Column("spf_result", sa.String(SHORT), nullable=False),
        sa.Column("arc_result", sa.String(SHORT), nullable=False),
        sa.Column("dkim_summary", TEXT, nullable=False),
        sa.Column("reasons_summary", TEXT, nullable=False),
        sa.Column("record_key", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("idempotency_key", name="uq_messages_idempotency_key"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(
        "ix_messages_policy_domain_arrived_at_record_key",
        "messages",
        ["policy_domain", "arrived_at", "record_key"],
    )
    op.create_index("ix_messages_arrived_at", "messages", ["arrived_at"])
    op.create_table(
        "dkim_results",
        sa.Column("message_id", ID_TYPE, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("domain", TEXT, nullable=False),
        sa.Column("selector", TEXT, nullable=False),
        sa.Column("result", sa.String(SHORT), nullable=False),
        sa.Column("human_result", TEXT, nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name="fk_dkim_results_message_id_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", "position", name="pk_dkim_results"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_table(
        "override_reasons",
        sa.Column("message_id", ID_TYPE, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(SHORT), nullable=False),
        sa.Column("comment", TEXT, nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name="fk_override_reasons_message_id_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", "position", name="pk_override_reasons"),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("override_reasons")
    op.drop_table("dkim_results")
    op.drop_index("ix_messages_arrived_at", table_name="messages")
    op.drop_index("ix_messages_policy_domain_arrived_at_record_key", table_name="messages")
    op.drop_table("messages")
