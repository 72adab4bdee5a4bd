"""the memory a model adds to its agent, per telemetry sample (issue 21):
what rollout memory gates compare with a class's max_memory_mb, apart from
the agent's whole RSS (memory_mb); the rollups keep its maximum

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs: batch mode would rebuild telemetry (the largest
    # table) on SQLite. Rows stored before say 0: not measured.
    for table in ("telemetry", "telemetry_rollups"):
        op.add_column(
            table,
            sa.Column("model_memory_mb", sa.Float(), server_default="0", nullable=False),
        )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later, PostgreSQL),
    # not batch mode, for the reason above.
    for table in ("telemetry_rollups", "telemetry"):
        op.execute(f"ALTER TABLE {table} DROP COLUMN model_memory_mb")
