"""Enrollment tokens and device enrollment."""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.models import DeviceRow, EnrollmentTokenRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import secrets
from edgefleet.controlplane.domain.secrets import SecretKind
from edgefleet.controlplane.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.certificates import CertificateService, DeviceCertificate
from edgefleet.controlplane.services.devices import (
    ACCEPTED,
    DECOMMISSIONED,
    PENDING,
    REJECTED,
    EventSink,
    class_candidates,
    classify_row,
    validate_labels,
)
from edgefleet.controlplane.services.events import FleetEvent

AUTO_ACCEPT, REQUIRE_APPROVAL = "auto-accept", "pending"
POLICIES = (AUTO_ACCEPT, REQUIRE_APPROVAL)
DEFAULT_TTL = dt.timedelta(hours=24)
# A refused re-enrollment is audited once per token, device and reason in
# this many seconds (per process): one that repeats (an agent retrying, or
# someone replaying a dead token in a loop) must not fill the audit log.
REFUSAL_AUDIT_EVERY_S = 60.0
_MAX_REMEMBERED_REFUSALS = 10_000
MAX_TTL = dt.timedelta(days=365)


@dataclass(frozen=True)
class ReenrollmentProof:
    """What a device re-enrolling its hardware id shows (EnrollRequest.proof)."""

    device_id: str = ""
    credential: str = ""
    certificate_pem: bytes = b""
    signature: bytes = b""


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
        # (token id, device id, reason) -> when that refusal was last audited.
        self._refusals_audited: dict[tuple[str, str, str], float] = {}

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
        proof: ReenrollmentProof | None = None,
    ) -> Enrolled:
        """Exchange a token for a device identity (docs/security.md,
        "Re-enrollment"). Every enrollment needs a valid token and uses it
        once. A new hardware id becomes a device in the state the token's
        policy says. A hardware id that is already a device gets that device
        back, with a new credential (the old one and every earlier
        certificate stop working, its sync stream is ended), only with
        `proof` that the caller is that device; without it the enrollment is
        refused and audited, and nothing changes. A decommissioned device
        enrolls afresh. With TLS, `csr` is required and a certificate is
        issued."""
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
        proof = proof or ReenrollmentProof()
        # Two agents with the same hardware id racing: the loser's insert hits
        # the unique constraint and retries as a re-enrollment (which then
        # needs the winner's proof, so a cloned disk image cannot share it).
        for _ in range(2):
            try:
                return self._enroll_once(
                    token, hardware_id, name, labels, hardware, runtime, csr, proof
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

    def _proof_refusal(self, device: DeviceRow, proof: ReenrollmentProof, csr: bytes) -> str | None:
        """Why `proof` does not show the caller is `device`, or None."""
        if not proof.device_id and not proof.credential:
            return "no proof that the caller is that device was given"
        if proof.device_id != device.id:
            return f"the proof names device {proof.device_id!r}"
        if not device.credential_hash or not secrets.matches(
            proof.credential, device.credential_hash
        ):
            return "the proof's credential is not the device's current one"
        if self._certificates is None:
            return None
        return self._certificates.possession_refusal(
            device, proof.certificate_pem, proof.signature, csr
        )

    def _use(self, session: Session, tok: EnrollmentTokenRow) -> None:
        """Count one use of the token, refused past its limit (atomically, so
        concurrent enrollments cannot overrun it)."""
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
                f"enrollment token {tok.name!r} is used up (its limit is {tok.max_uses} "
                f"enrollment{'s' if tok.max_uses != 1 else ''}); create a new token"
            )

    def _refuse(
        self, tok_id: str, tok_name: str, device_id: str, hardware_id: str, reason: str
    ) -> PermissionDenied:
        """Audit a refused re-enrollment (in its own transaction: the
        enrollment's was rolled back; once a minute for the same token,
        device and reason) and the error to raise."""
        key, now = (tok_id, device_id, reason), time.monotonic()
        if now - self._refusals_audited.get(key, -math.inf) >= REFUSAL_AUDIT_EVERY_S:
            if len(self._refusals_audited) >= _MAX_REMEMBERED_REFUSALS:
                self._refusals_audited.clear()
            self._refusals_audited[key] = now
            with self._db.unit_of_work() as uow:
                audit.record(
                    uow, f"token:{tok_id}", "device.reenroll.refused", f"device:{device_id}",
                    token=tok_name, hardware_id=hardware_id, reason=reason,
                )  # fmt: skip
                uow.commit()
        return PermissionDenied(
            f"hardware id {hardware_id!r} is already enrolled as device {device_id}, and "
            f"{reason}: enrolling it again needs the device's current credential"
            + (" and certificate key" if self._certificates is not None else "")
            + ". If the device lost its identity (a new disk, a wiped state directory), an "
            f"operator decommissions device {device_id} first "
            f"(edgefleet devices decommission {device_id}); it then enrolls afresh"
        )

    def _enroll_once(
        self,
        token: str,
        hardware_id: str,
        name: str,
        labels: dict[str, str],
        hardware: dict[str, Any],
        runtime: dict[str, Any],
        csr: bytes,
        proof: ReenrollmentProof,
    ) -> Enrolled:
        token_id = secrets.parse_id(SecretKind.ENROLLMENT, token)
        if token_id is None:
            raise Unauthenticated("invalid enrollment token")
        refused: tuple[str, str, str, str] | None = None
        with self._db.unit_of_work() as uow:
            session = uow.session
            tok = self._check_token(session.get(EnrollmentTokenRow, token_id), token)
            # Locked (PostgreSQL): two enrollments of one hardware id at once
            # take turns, and the second sees the first's new credential.
            device = session.scalar(
                select(DeviceRow).where(DeviceRow.hardware_id == hardware_id).with_for_update()
            )
            if device is not None and device.state == REJECTED:
                raise PermissionDenied(
                    f"device {device.id} (hardware id {hardware_id!r}) was rejected by an "
                    "operator and cannot enroll again"
                )
            reenrolled = device is not None and device.state in (ACCEPTED, PENDING)
            if device is not None and device.state == DECOMMISSIONED and proof.device_id:
                # Its own agent, still holding the retired identity: retired
                # means it gets no service. A reinstalled board (no identity
                # left) enrolls afresh below.
                raise PermissionDenied(
                    f"device {device.id} was decommissioned by an operator: its identity is "
                    "retired. To enroll this hardware again as a new installation, remove the "
                    "agent's state directory"
                )
            reason = (
                self._proof_refusal(device, proof, csr)
                if device is not None and reenrolled else None
            )  # fmt: skip
            if device is not None and reason is not None:
                refused = (tok.id, tok.name, device.id, reason)
            else:
                self._use(session, tok)
                admitted = ACCEPTED if tok.policy == AUTO_ACCEPT else PENDING
                if device is None:
                    device = DeviceRow(
                        id=secrets.new_id(),
                        hardware_id=hardware_id,
                        name=name,
                        state=admitted,
                        labels={**labels, **tok.labels},
                        enrollment_token_id=tok.id,
                        class_pinned=False,
                        desired_revision=1,
                        applied_revision=0,
                        update_status={},
                        state_reason="",
                    )
                    session.add(device)
                elif not reenrolled:
                    # Decommissioned, and a reinstalled board: a fresh start by
                    # the token; the labels operators set win over the
                    # token's and the agent's config.
                    device.state = admitted
                    device.enrollment_token_id = tok.id
                    device.labels = {**labels, **tok.labels, **device.labels}
                # The same device proven again keeps its labels exactly as
                # operators left them (a label they removed stays removed).
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
        if refused is not None:
            raise self._refuse(refused[0], refused[1], refused[2], hardware_id, refused[3])
        # desired_changed wakes the device's sync stream, which ends itself
        # when the credential it was opened with is no longer the device's.
        self._events.publish(
            FleetEvent("device.enrolled", (result.device_id,), desired_changed=True)
        )
        return result
