"""Operator tokens: who may use the operator API, with which role, until
when. The secret is shown once at creation; only its SHA-256 is stored."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from edgefleet.controlplane.db.models import OperatorTokenRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import secrets
from edgefleet.controlplane.domain.roles import ADMIN, ROLES
from edgefleet.controlplane.domain.secrets import SecretKind
from edgefleet.controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from edgefleet.controlplane.services import audit

MAX_NAME = 200


@dataclass(frozen=True)
class OperatorTokenView:
    id: str
    name: str
    role: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


def _view(row: OperatorTokenRow) -> OperatorTokenView:
    return OperatorTokenView(
        row.id, row.name, row.role, row.created_at, row.expires_at, row.revoked_at,
        row.last_used_at,
    )  # fmt: skip


def _usable(row: OperatorTokenRow, now: dt.datetime) -> bool:
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


class OperatorTokenService:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self, actor: str, *, name: str, role: str, ttl: dt.timedelta | None
    ) -> tuple[OperatorTokenView, str]:
        """A new token and its secret (returned once, never stored)."""
        name = name.strip()
        if not name or len(name) > MAX_NAME:
            raise InvalidArgument(f"a token needs a name of 1 to {MAX_NAME} characters")
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        if ttl is not None and ttl <= dt.timedelta(0):
            raise InvalidArgument("token lifetime must be positive")
        token_id = secrets.new_id()
        secret = secrets.issue(SecretKind.OPERATOR, token_id)
        now = utcnow()
        row = OperatorTokenRow(
            id=token_id, name=name, secret_hash=secrets.hash_secret(secret), role=role,
            created_at=now, expires_at=now + ttl if ttl is not None else None,
        )  # fmt: skip
        with self._db.unit_of_work() as uow:
            uow.session.add(row)
            audit.record(
                uow, actor, "operator_token.create", f"operator_token:{token_id}", name=name,
                role=role, expires_at=row.expires_at.isoformat() if row.expires_at else None,
            )  # fmt: skip
            try:
                uow.commit()
            except IntegrityError:
                raise AlreadyExists(f"an operator token named {name!r} exists") from None
            return _view(row), secret

    def list_tokens(self) -> list[OperatorTokenView]:
        """Every token, newest first (revoked and expired ones too)."""
        with self._db.unit_of_work(readonly=True) as uow:
            rows = uow.session.scalars(
                select(OperatorTokenRow).order_by(OperatorTokenRow.created_at.desc())
            )
            return [_view(r) for r in rows]

    def revoke(self, actor: str, token_id: str) -> OperatorTokenView:
        """Revoke a token at once. The last usable admin token cannot be
        revoked: nobody could manage tokens again."""
        if not token_id:
            raise InvalidArgument("token id is required")
        now = utcnow()
        with self._db.unit_of_work() as uow:
            row = uow.session.get(OperatorTokenRow, token_id)
            if row is None:
                raise NotFound(f"no operator token with id {token_id!r}")
            if row.revoked_at is None:
                admins = [
                    r for r in uow.session.scalars(
                        select(OperatorTokenRow).where(OperatorTokenRow.role == ADMIN)
                    )
                    if _usable(r, now) and r.id != row.id
                ]  # fmt: skip
                if row.role == ADMIN and _usable(row, now) and not admins:
                    raise FailedPrecondition(
                        f"{row.name!r} is the last usable admin token; create another admin "
                        "token before revoking it"
                    )
                row.revoked_at = now
                audit.record(uow, actor, "operator_token.revoke", f"operator_token:{row.id}",
                             name=row.name)  # fmt: skip
                uow.commit()
            return _view(row)
