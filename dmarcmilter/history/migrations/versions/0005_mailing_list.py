"""Whether a message was list mail: messages.mailing_list.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: an instant change on PostgreSQL and MariaDB, and a
    # plain ADD COLUMN on SQLite, however many messages there are.  Rows
    # from before read as not list mail.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(
            sa.Column("mailing_list", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("mailing_list")
