"""rollout members a resume acknowledged (issue 21): out of their stage's
success denominator and error rate from then on; a rollout's members
revision, bumped when operators change members; when a fixed rate's next
device is due; rollout states up to 32 characters ("succeeded_with_failures")

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 17:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # SQLite does not enforce VARCHAR lengths, and widening there would
        # rebuild the table (batch mode), cascading into rollout_devices.
        op.alter_column(
            "rollouts", "state", type_=sa.String(length=32), existing_type=sa.String(length=20)
        )
    # A plain ADD COLUMN: batch mode would rebuild rollout_devices on SQLite.
    op.add_column(
        "rollout_devices",
        sa.Column("acknowledged", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "rollouts",
        sa.Column("members_revision", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("rollouts", sa.Column("paced_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE rollouts SET state = 'succeeded' WHERE state = 'succeeded_with_failures'"
        )
        op.alter_column(
            "rollouts", "state", type_=sa.String(length=20), existing_type=sa.String(length=32)
        )
    op.execute("ALTER TABLE rollouts DROP COLUMN paced_until")
    op.execute("ALTER TABLE rollouts DROP COLUMN members_revision")
    op.execute("ALTER TABLE rollout_devices DROP COLUMN acknowledged")
