"""lighter fallback artifacts: a class's fallback precision, a build's
fallback digest (or why it has none), an artifact's fallback digest, and
which artifact served in telemetry (a sample's variant and fallback
requests; a rollup's fallback requests)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Columns and indexes only: a new foreign key makes SQLite rebuild the table
# (batch mode), and dropping the old builds or artifacts table would cascade
# into artifacts and device assignments (foreign keys are on).


def upgrade() -> None:
    with op.batch_alter_table("device_classes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fallback", sa.String(length=8), server_default="", nullable=False)
        )
    with op.batch_alter_table("builds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("fallback_reason", sa.Text(), server_default="", nullable=False)
        )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback_digest", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_artifacts_fallback_digest"), ["fallback_digest"])
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("variant", sa.String(length=16), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("fallback_request_count", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("telemetry_rollups", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fallback_request_count", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later, PostgreSQL):
    # batch mode would rebuild the tables, with the cascades said above.
    op.drop_index(op.f("ix_artifacts_fallback_digest"), table_name="artifacts")
    for table, column in (
        ("telemetry_rollups", "fallback_request_count"),
        ("telemetry", "fallback_request_count"),
        ("telemetry", "variant"),
        ("artifacts", "fallback_digest"),
        ("builds", "fallback_reason"),
        ("builds", "fallback_digest"),
        ("device_classes", "fallback"),
    ):
        op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
