"""models the builder has never seen (issue 22): each model version's output
kinds and fidelity floor, and a device class's fixed input shapes

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Existing versions get no declared kinds (a build infers every output's
    # kind from the stored shapes) and no floor of their own; existing
    # classes fix no input shapes: what they had.
    op.add_column(
        "model_versions",
        sa.Column("output_specs", _JSON, server_default="[]", nullable=False),
    )
    op.add_column("model_versions", sa.Column("min_fidelity", sa.Float(), nullable=True))
    op.add_column(
        "device_classes",
        sa.Column("input_shapes", _JSON, server_default="{}", nullable=False),
    )


def downgrade() -> None:
    # Plain DROP COLUMN, not batch mode (see 0017).
    op.execute("ALTER TABLE device_classes DROP COLUMN input_shapes")
    op.execute("ALTER TABLE model_versions DROP COLUMN min_fidelity")
    op.execute("ALTER TABLE model_versions DROP COLUMN output_specs")
