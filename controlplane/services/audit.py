"""The audit log: who did what, when. Written in the same transaction as the
change it records, so the log never claims a change that was rolled back."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from edgefleet.controlplane.db.models import AuditRow
from edgefleet.controlplane.db.uow import Database, UnitOfWork


def record(uow: UnitOfWork, actor: str, action: str, target: str, **details: Any) -> None:
    uow.session.add(AuditRow(actor=actor, action=action, target=target, details=details))


MAX_ID = 2**63 - 1


def list_entries(
    db: Database, *, before_id: int = 0, limit: int = 100, action: str = "", target: str = ""
) -> list[AuditRow]:
    """Newest first."""
    limit = max(1, min(limit or 100, 1000))
    stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
    # Ids are signed 64-bit; the wire's before_id is uint64. One past every
    # id means no bound (as a bound, the database refuses it).
    if 0 < before_id <= MAX_ID:
        stmt = stmt.where(AuditRow.id < before_id)
    if action:
        stmt = stmt.where(AuditRow.action == action)
    if target:
        stmt = stmt.where(AuditRow.target == target)
    with db.unit_of_work(readonly=True) as uow:
        return list(uow.session.scalars(stmt))
