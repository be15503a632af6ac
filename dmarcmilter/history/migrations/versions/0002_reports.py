"""Aggregate reports: reports, report_deliveries, report_attempts, leases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported from models.py, as in 0001.
ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
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
        "reports",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("report_id", sa.String(SHORT * 2), nullable=False),
        sa.Column("policy_domain", sa.String(DOMAIN), nullable=False),
        sa.Column("period_begin", sa.BigInteger(), nullable=False),
        sa.Column("period_end", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(SHORT), nullable=False),
        sa.Column("filename", TEXT, nullable=False),
        sa.Column("message_count", sa.BigInteger(), nullable=False),
        sa.Column("record_count", sa.BigInteger(), nullable=False),
        sa.Column("content", BLOB, nullable=False),
        sa.Column("created_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("created_by", TEXT, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
        sa.UniqueConstraint("report_id", name="uq_reports_report_id"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(
        "ix_reports_policy_domain_period_begin", "reports", ["policy_domain", "period_begin"]
    )
    op.create_table(
        "report_deliveries",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("report_pk", ID_TYPE, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("uri", TEXT, nullable=False),
        sa.Column("address", TEXT, nullable=False),
        sa.Column("destination_domain", sa.String(DOMAIN), nullable=False),
        sa.Column("status", sa.String(SHORT), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("sent_at", TIMESTAMP_TYPE, nullable=True),
        sa.Column("detail", TEXT, nullable=False),
        sa.ForeignKeyConstraint(
            ["report_pk"],
            ["reports.id"],
            name="fk_report_deliveries_report_pk_reports",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_report_deliveries"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index(
        "uq_report_deliveries_report_pk_position",
        "report_deliveries",
        ["report_pk", "position"],
        unique=True,
    )
    op.create_index(
        "ix_report_deliveries_status_next_attempt_at",
        "report_deliveries",
        ["status", "next_attempt_at"],
    )
    op.create_index(
        "ix_report_deliveries_destination_domain_sent_at",
        "report_deliveries",
        ["destination_domain", "sent_at"],
    )
    op.create_table(
        "report_attempts",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("delivery_id", ID_TYPE, nullable=False),
        sa.Column("attempted_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("result", sa.String(SHORT), nullable=False),
        sa.Column("detail", TEXT, nullable=False),
        sa.Column("host", TEXT, nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["report_deliveries.id"],
            name="fk_report_attempts_delivery_id_report_deliveries",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_report_attempts"),
        **MYSQL_TABLE_OPTIONS,
    )
    op.create_index("ix_report_attempts_delivery_id", "report_attempts", ["delivery_id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(SHORT * 2), nullable=False),
        sa.Column("holder", sa.String(DOMAIN), nullable=False),
        sa.Column("expires_at", TIMESTAMP_TYPE, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; MySQL refuses to drop an index
    # that a foreign key still needs, so do not drop them one by one.
    for table in ("leases", "report_attempts", "report_deliveries", "reports"):
        op.drop_table(table)
