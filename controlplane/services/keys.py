"""The control plane's manifest-signing keys, shared by every replica."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from controlplane.db.models import SigningKeyRow
from controlplane.db.uow import Database
from controlplane.domain import signing


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    public_key: bytes
    private_key: bytes


def _active(session: Session) -> SigningKeyRow | None:
    # Replicas that start together may each create a key; all of them then
    # sign with the oldest, so the choice is the same everywhere.
    return session.scalar(
        select(SigningKeyRow)
        .where(SigningKeyRow.retired_at.is_(None))
        .order_by(SigningKeyRow.created_at, SigningKeyRow.id)
        .limit(1)
    )


def ensure_signing_key(db: Database) -> SigningKey:
    """The active key, generated on first start."""
    with db.unit_of_work() as uow:
        row = _active(uow.session)
        if row is None:
            kid, private, public = signing.generate()
            uow.session.add(SigningKeyRow(id=kid, public_key=public, private_key=private))
            uow.commit()
            row = _active(uow.session)
        assert row is not None
        return SigningKey(row.id, row.public_key, row.private_key)


def active_key(session: Session) -> SigningKey:
    row = _active(session)
    if row is None:
        raise RuntimeError("no signing key; the server creates one on start")
    return SigningKey(row.id, row.public_key, row.private_key)


def public_keys(db: Database) -> list[SigningKeyRow]:
    """Keys agents should trust (not retired), oldest first."""
    with db.unit_of_work(readonly=True) as uow:
        return list(
            uow.session.scalars(
                select(SigningKeyRow)
                .where(SigningKeyRow.retired_at.is_(None))
                .order_by(SigningKeyRow.created_at, SigningKeyRow.id)
            )
        )
