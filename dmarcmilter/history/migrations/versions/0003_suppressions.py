"""The suppression list of report destinations: suppressions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
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
TARGET = 254
SHORT = 32


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", ID_TYPE, autoincrement=True, nullable=False),
        sa.Column("target", sa.String(TARGET), nullable=False),
        sa.Column("reason", TEXT, nullable=False),
        sa.Column("source", sa.String(SHORT), nullable=False),
        sa.Column("created_at", TIMESTAMP_TYPE, nullable=False),
        sa.Column("suppressed_at", TIMESTAMP_TYPE, nullable=True),
        sa.Column("expires_at", TIMESTAMP_TYPE, nullable=True),
        sa.Column("bounces", sa.Integer(), nullable=False),
        sa.Column("last_bounce_at", TIMESTAMP_TYPE, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_suppressions"),
        sa.UniqueConstraint("target", name="uq_suppressions_target"),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("suppressions")
