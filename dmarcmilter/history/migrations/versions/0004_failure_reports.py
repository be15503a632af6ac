"""Failure reports, late rows and bounce tracking: failure_incidents,
late_messages, rate_buckets, report_bounces; reports.kind and reports.sequence;
report_deliveries.message_token.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported from models.py, as in 0001.
ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
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
    # Constant defaults: an instant change on every database, however many
    # reports there are.
    with op.batch_alter_table("reports") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(SHORT), server_default="aggregate", nullable=False)
        )
        batch.add_column(sa.Column("sequence", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("report_deliveries") as batch:
        batch.add_column(sa.Column("message_token", sa.String(SHORT), nullable=True))
    op.create_table(
        "late_messages",
        sa.Column("message_pk", ID_TYPE, nullable=False),
        sa.Column("claim", sa.String(SHORT), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_pk"],
            ["messages.id"],
            name="fk_late_messages_message_pk_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_pk", name="pk_late_messages"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_late_messages_claim", "late_messages", ["claim"])
    op.create_table(
        "failure_incidents",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("message_pk", ID_TYPE, nullable=False),
        sa.Column("arrived_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("policy_domain", sa.String(DOMAIN), nullable=False),
        sa.Column("reported_domain", sa.String(DOMAIN), nullable=False),
        sa.Column("source_ip", sa.String(45), nullable=False),
        sa.Column("kinds", sa.String(SHORT), nullable=False),
        sa.Column("ruf", TEXT, nullable=False),
        sa.Column("sample", TEXT, nullable=False),
        sa.Column("status", sa.String(SHORT), nullable=False),
        sa.Column("handled_at", TIMESTAMP_TYPE, nullable=True),
        sa.ForeignKeyConstraint(
            ["message_pk"],
            ["messages.id"],
            name="fk_failure_incidents_message_pk_messages",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_failure_incidents"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_failure_incidents_message_pk", "failure_incidents", ["message_pk"])
    op.create_index(
        "ix_failure_incidents_status_arrived_at", "failure_incidents", ["status", "arrived_at"]
    )
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(DOMAIN), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", TIMESTAMP_TYPE, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_rate_buckets"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_table(
        "report_bounces",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("received_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("original_message_id", TEXT, nullable=False),
        sa.Column("address", TEXT, nullable=False),
        sa.Column("status", sa.String(SHORT), nullable=False),
        sa.Column("diagnostic", TEXT, nullable=False),
        sa.Column("reporting_mta", TEXT, nullable=False),
        sa.Column("processed_at", TIMESTAMP_TYPE, nullable=True),
        sa.Column("outcome", sa.String(SHORT), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_report_bounces"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_report_bounces_processed_at", "report_bounces", ["processed_at"])


def downgrade() -> None:
    op.drop_table("report_bounces")
    op.drop_table("rate_buckets")
    op.drop_table("failure_incidents")
    op.drop_table("late_messages")
    with op.batch_alter_table("report_deliveries") as batch:
        batch.drop_column("message_token")
    with op.batch_alter_table("reports") as batch:
        batch.drop_column("sequence")
        batch.drop_column("kind")
