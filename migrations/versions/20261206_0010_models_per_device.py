"""several models per device: device_assignments keyed by (device, model),
per-model update statuses, the agent's sync protocol

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 09:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Lightweight tables for the data conversion (the ORM models change later).
_devices = sa.table("devices", sa.column("id", sa.String()), sa.column("update_status", sa.JSON()))


def _convert_statuses(keyed: bool) -> None:
    """Rewrite devices.update_status: a single status -> {model_name: status}
    (keyed=True), or back to the most recently updated single one."""
    bind = op.get_bind()
    rows = bind.execute(sa.select(_devices.c.id, _devices.c.update_status)).all()
    for device_id, status in rows:
        new = _keyed(status) if keyed else _single(status)
        if new != status:
            bind.execute(
                _devices.update().where(_devices.c.id == device_id).values(update_status=new)
            )


def _keyed(status: Any) -> dict[str, Any]:
    if not isinstance(status, dict) or not status:
        return {}
    # A single status names its model; one without a name (never reported
    # one) has nothing to key by and is dropped.
    name = status.get("model_name")
    return {name: status} if isinstance(name, str) and name else {}


def _single(statuses: Any) -> dict[str, Any]:
    if not isinstance(statuses, dict) or not statuses:
        return {}
    kept = [s for s in statuses.values() if isinstance(s, dict)]
    if not kept:
        return {}
    return max(kept, key=lambda s: str(s.get("updated_at", "")))


def upgrade() -> None:
    with op.batch_alter_table("device_classes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device_memory_mb", sa.Float(), nullable=True))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("agent_protocol", sa.Integer(), server_default="0", nullable=False)
        )
    _convert_statuses(keyed=True)
    # model_id: nullable first, filled from the assigned version's model,
    # then part of the primary key.
    with op.batch_alter_table("device_assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_id", sa.String(length=32), nullable=True))
    op.execute(
        "UPDATE device_assignments SET model_id = (SELECT model_versions.model_id FROM"
        " model_versions WHERE model_versions.id = device_assignments.model_version_id)"
    )
    with op.batch_alter_table("device_assignments", schema=None) as batch_op:
        batch_op.alter_column("model_id", existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_constraint("pk_device_assignments", type_="primary")
        batch_op.create_primary_key("pk_device_assignments", ["device_id", "model_id"])
        batch_op.create_foreign_key(
            batch_op.f("fk_device_assignments_model_id_models"), "models", ["model_id"], ["id"],
            ondelete="CASCADE",
        )  # fmt: skip


def downgrade() -> None:
    # One row per device again: keep each device's highest-sequence assignment.
    op.execute(
        "DELETE FROM device_assignments WHERE sequence < (SELECT MAX(o.sequence) FROM"
        " device_assignments AS o WHERE o.device_id = device_assignments.device_id)"
    )
    with op.batch_alter_table("device_assignments", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_device_assignments_model_id_models"), type_="foreignkey"
        )
        batch_op.drop_constraint("pk_device_assignments", type_="primary")
        batch_op.create_primary_key("pk_device_assignments", ["device_id"])
        batch_op.drop_column("model_id")
    _convert_statuses(keyed=False)
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("agent_protocol")
    with op.batch_alter_table("device_classes", schema=None) as batch_op:
        batch_op.drop_column("device_memory_mb")
