"""housekeeping (issue 22): a model version's yank (when, by whom, why) and
when it was first assigned (only a never-deployed version may be deleted);
who cancelled a build

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VERSION_COLUMNS = ("yanked_at", "yanked_by", "yank_reason", "first_assigned_at")


def upgrade() -> None:
    # Plain ADD COLUMNs: batch mode would rebuild model_versions on SQLite,
    # and dropping the old table would cascade into builds and rollouts.
    op.add_column("model_versions", sa.Column("yanked_at", sa.DateTime(timezone=True)))
    op.add_column(
        "model_versions",
        sa.Column("yanked_by", sa.String(200), server_default="", nullable=False),
    )
    op.add_column(
        "model_versions", sa.Column("yank_reason", sa.Text(), server_default="", nullable=False)
    )
    op.add_column("model_versions", sa.Column("first_assigned_at", sa.DateTime(timezone=True)))
    op.add_column("builds", sa.Column("cancelled_by", sa.String(200)))
    # Versions deployed before this revision: the earliest of their current
    # assignments, and of the update states devices reported for them (an
    # assignment since replaced or removed leaves those behind).
    op.execute(
        """
        UPDATE model_versions SET first_assigned_at = (
            SELECT MIN(at) FROM (
                SELECT a.assigned_at AS at FROM device_assignments a
                WHERE a.model_version_id = model_versions.id
                UNION ALL
                SELECT e.at AS at FROM deployment_events e
                JOIN models m ON m.name = e.model_name
                WHERE m.id = model_versions.model_id AND e.model_version = model_versions.version
            ) AS deployed
        )
        """
    )


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later, PostgreSQL),
    # not batch mode, for the reason above.
    op.execute("ALTER TABLE builds DROP COLUMN cancelled_by")
    for column in reversed(_VERSION_COLUMNS):
        op.execute(f"ALTER TABLE model_versions DROP COLUMN {column}")
