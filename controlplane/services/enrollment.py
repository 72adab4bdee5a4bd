"""Enrollment tokens and device enrollment."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from controlplane.db.models import DeviceRow, EnrollmentTokenRow, utcnow
from controlplane.db.uow import Database
from controlplane.domain import secrets
from controlplane.domain.secrets import SecretKind
from controlplane.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from controlplane.services import audit
from controlplane.services.certificates import CertificateService, DeviceCertificate
from controlplane.services.devices import (
    ACCEPTED,
    PENDING,
    REJECTED,
    EventSink,
    class_candidates,
    classify_row,
    validate_labels,
)
from controlplane.services.events import FleetEvent

AUTO_ACCEPT, REQUIRE_APPROVAL = "auto-accept", "pending"
POLICIES = (AUTO_ACCEPT, REQUIRE_APPROVAL)
DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=365)


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    credential: str
    state: str
    reenrolled: bool
    certificate: DeviceCertificate | None = None


class EnrollmentService:
    def __init__(
        self, db: Database, events: EventSink, certificates: CertificateService | None = None
    ) -> None:
        self._db = db
        self._events = events
        # Set when the control plane serves TLS: every enrollment then needs
        # a CSR and gets a client certificate.
        self._certificates = certificates

    # ------------------------------------------------------------ tokens

    def create_token(
        self,
        actor: str,
        *,
        name: str,
        policy: str,
        labels: dict[str, str],
        max_uses: int,
        ttl: dt.timedelta | None,
    ) -> tuple[EnrollmentTokenRow, str]:
        """A new token and its secret (shown once)."""
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidArgument("token name is required (at most 200 characters)")
        if policy not in POLICIES:
            raise InvalidArgument(f"policy must be one of {', '.join(POLICIES)}")
        if max_uses < 0:
            raise InvalidArgument("max uses cannot be negative (0 means unlimited)")
        ttl = DEFAULT_TTL if ttl is None else ttl
        if ttl <= dt.timedelta(0) or ttl > MAX_TTL:
            raise InvalidArgument("token lifetime must be positive and at most 365 days")
        token_id = secrets.new_id()
        secret = secrets.issue(SecretKind.ENROLLMENT, token_id)
        row = EnrollmentTokenRow(
            id=token_id,
            name=name,
            secret_hash=secrets.hash_secret(secret),
            policy=policy,
            labels=validate_labels(labels),
            max_uses=max_uses,
            uses=0,
            expires_at=utcnow() + ttl,
            created_by=actor,
        )
        with self._db.unit_of_work() as uow:
            uow.session.add(row)
            audit.record(uow, actor, "token.create", f"token:{token_id}", name=name, policy=policy)
            uow.commit()
        return row, secret

    def list_tokens(self, *, include_revoked: bool) -> list[EnrollmentTokenRow]:
        stmt = select(EnrollmentTokenRow).order_by(EnrollmentTokenRow.created_at.desc())
        if not include_revoked:
            stmt = stmt.where(EnrollmentTokenRow.revoked_at.is_(None))
        with self._db.unit_of_work(readonly=True) as uow:
            return list(uow.session.scalars(stmt))

    def revoke_token(self, actor: str, token_id: str) -> EnrollmentTokenRow:
        with self._db.unit_of_work() as uow:
            row = uow.session.get(EnrollmentTokenRow, token_id)
            if row is None:
                raise NotFound(f"no enrollment token with id {token_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                audit.record(uow, actor, "token.revoke", f"token:{token_id}")
                uow.commit()
            return row

    # ------------------------------------------------------------ enroll

    def enroll(
        self,
        *,
        token: str,
        hardware_id: str,
        name: str,
        labels: dict[str, str],
        hardware: dict[str, Any],
        runtime: dict[str, Any],
        csr: bytes = b"",
    ) -> Enrolled:
        """Exchange a token for a device identity. Enrolling the same hardware
        id again returns the same device with a new credential (the old one
        stops working, and so do its earlier certificates) and does not use up
        the token. With TLS, `csr` is required and a certificate is issued."""
        hardware_id = hardware_id.strip()
        if not hardware_id or len(hardware_id) > 200:
            raise InvalidArgument("hardware_id is required (at most 200 characters)")
        if self._certificates is not None and not csr:
            raise InvalidArgument(
                "this control plane serves mutual TLS: enroll with a certificate signing "
                "request (csr) for a key made on the device"
            )
        labels = validate_labels(labels)
        name = (name.strip() or str(hardware.get("hostname") or "") or hardware_id)[:200]
        # Two agents with the same hardware id racing: the loser's insert hits
        # the unique constraint and retries as a re-enrollment.
        for _ in range(2):
            try:
                return self._enroll_once(
                    token, hardware_id, name, labels, hardware, runtime, csr
                )
            except IntegrityError:
                continue
        raise Unavailable(
            f"could not enroll hardware id {hardware_id!r} (concurrent enrollments); retry"
        )

    def _check_token(self, row: EnrollmentTokenRow | None, token: str) -> EnrollmentTokenRow:
        if row is None or not secrets.matches(token, row.secret_hash):
            raise Unauthenticated("invalid enrollment token")
        if row.revoked_at is not None:
            raise Unauthenticated(f"enrollment token {row.name!r} was revoked")
        if row.expires_at <= utcnow():
            raise Unauthenticated(
                f"enrollment token {row.name!r} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC; "
                "ask an operator for a new one"
            )
        return row

    def _enroll_once(
        self,
        token: str,
        hardware_id: str,
        name: str,
        labels: dict[str, str],
        hardware: dict[str, Any],
        runtime: dict[str, Any],
        csr: bytes,
    ) -> Enrolled:
        token_id = secrets.parse_id(SecretKind.ENROLLMENT, token)
        if token_id is None:
            raise Unauthenticated("invalid enrollment token")
        with self._db.unit_of_work() as uow:
            session = uow.session
            tok = self._check_token(session.get(EnrollmentTokenRow, token_id), token)
            device = session.scalar(select(DeviceRow).where(DeviceRow.hardware_id == hardware_id))
            reenrolled = device is not None
            if device is not None:
                if device.state == REJECTED:
                    raise PermissionDenied(
                        f"device {device.id} (hardware id {hardware_id!r}) was rejected by an "
                        "operator and cannot enroll again"
                    )
                if device.state not in (ACCEPTED, PENDING):  # decommissioned: a fresh start
                    device.state = ACCEPTED if tok.policy == AUTO_ACCEPT else PENDING
                # Operator edits win over what the agent's config says.
                device.labels = {**labels, **device.labels, **tok.labels}
            else:
                used = session.execute(
                    update(EnrollmentTokenRow)
                    .where(EnrollmentTokenRow.id == tok.id)
                    .where(
                        or_(
                            EnrollmentTokenRow.max_uses == 0,
                            EnrollmentTokenRow.uses < EnrollmentTokenRow.max_uses,
                        )
                    )
                    .values(uses=EnrollmentTokenRow.uses + 1)
                    .execution_options(synchronize_session=False)
                )
                if used.rowcount == 0:  # type: ignore[attr-defined]
                    raise ResourceExhausted(
                        f"enrollment token {tok.name!r} has been used {tok.max_uses} times, "
                        "its limit; create a new token"
                    )
                device = DeviceRow(
                    id=secrets.new_id(),
                    hardware_id=hardware_id,
                    name=name,
                    state=ACCEPTED if tok.policy == AUTO_ACCEPT else PENDING,
                    labels={**labels, **tok.labels},
                    enrollment_token_id=tok.id,
                    class_pinned=False,
                    desired_revision=1,
                    applied_revision=0,
                    update_status={},
                    state_reason="",
                )
                session.add(device)
            credential = secrets.issue(SecretKind.DEVICE, device.id)
            device.credential_hash = secrets.hash_secret(credential)
            # A bad CSR raises here and rolls everything back, the token's
            # use included.
            certificate = (
                self._certificates.issue_for(device, csr, keep_previous=False)
                if self._certificates is not None else None
            )  # fmt: skip
            device.hardware = hardware
            device.runtime = runtime
            device.last_seen_at = utcnow()
            classify_row(device, class_candidates(session))
            device.desired_revision += 1
            action = "device.reenroll" if reenrolled else "device.enroll"
            audit.record(
                uow,
                f"device:{device.id}",
                action,
                f"device:{device.id}",
                token=tok.name,
                hardware_id=hardware_id,
            )
            session.flush()
            uow.commit()
            result = Enrolled(device.id, credential, device.state, reenrolled, certificate)
        self._events.publish(
            FleetEvent("device.enrolled", (result.device_id,), desired_changed=True)
        )
        return result
