"""signed assignment statements (with rollback) and signing-key rotations

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "signing_key_rotations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("previous_key_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["signing_keys.id"],
            name=op.f("fk_signing_key_rotations_key_id_signing_keys"),
        ),
        sa.ForeignKeyConstraint(
            ["previous_key_id"], ["signing_keys.id"],
            name=op.f("fk_signing_key_rotations_previous_key_id_signing_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_signing_key_rotations")),
    )  # fmt: skip
    with op.batch_alter_table("signing_key_rotations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_signing_key_rotations_key_id"), ["key_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_signing_key_rotations_previous_key_id"), ["previous_key_id"],
            unique=False,
        )  # fmt: skip
    with op.batch_alter_table("device_assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("statement", sa.LargeBinary(), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("statement_signature", sa.LargeBinary(), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("rollback", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_assignments", schema=None) as batch_op:
        batch_op.drop_column("key_id")
        batch_op.drop_column("rollback")
        batch_op.drop_column("statement_signature")
        batch_op.drop_column("statement")
    with op.batch_alter_table("signing_key_rotations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_signing_key_rotations_previous_key_id"))
        batch_op.drop_index(batch_op.f("ix_signing_key_rotations_key_id"))
    op.drop_table("signing_key_rotations")
