"""an index on devices.name (issue 23): every request may name a device by
its name (services/references.py), which without it scans the table

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 00:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_devices_name", "devices", ["name"])


def downgrade() -> None:
    op.drop_index("ix_devices_name", table_name="devices")
