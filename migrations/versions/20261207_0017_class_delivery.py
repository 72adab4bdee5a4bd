"""delivery per device class (issue 24): the class's own artifact mirrors and
its download rate cap

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 06:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs (see downgrade) with server defaults: existing classes get no mirrors
    # and no cap, which is what they had.
    op.add_column(
        "device_classes",
        sa.Column(
            "artifact_mirrors",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            server_default="[]",
            nullable=False,
        ),
    )
    op.add_column(
        "device_classes",
        sa.Column("max_download_rate", sa.BigInteger(), server_default="0", nullable=False),
    )


def downgrade() -> None:
    # Plain DROP COLUMN, not batch mode: rebuilding device_classes on SQLite
    # would drop the old table, and its devices' class_id with it.
    op.execute("ALTER TABLE device_classes DROP COLUMN max_download_rate")
    op.execute("ALTER TABLE device_classes DROP COLUMN artifact_mirrors")
