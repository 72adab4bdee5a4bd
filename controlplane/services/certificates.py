"""Device certificates for mutual TLS: the shared certificate authority, the
replica's own server certificate, and issuing and renewing device client
certificates from CSRs. Which certificate a device may present is kept on its
row (current and previous serial), so re-enrolling revokes older ones."""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.models import CertificateAuthorityRow, DeviceRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import pki, secrets
from edgefleet.controlplane.errors import InvalidArgument, NotFound, PermissionDenied
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent

DEFAULT_DEVICE_LIFETIME = dt.timedelta(days=30)
# Refused: shorter than a renewal round trip could be trusted to fit in.
MIN_DEVICE_LIFETIME = dt.timedelta(seconds=10)
REFUSED_STATES = ("rejected", "decommissioned")


@dataclass(frozen=True)
class DeviceCertificate:
    certificate_pem: bytes
    ca_certificate_pem: bytes
    not_after: dt.datetime


def _oldest(session: Session) -> CertificateAuthorityRow | None:
    # Replicas starting together may each create one; all use the oldest.
    return session.scalar(
        select(CertificateAuthorityRow)
        .order_by(CertificateAuthorityRow.created_at, CertificateAuthorityRow.id)
        .limit(1)
    )


def ensure_authority(db: Database) -> pki.Authority:
    """The fleet's CA, created on the first start with TLS."""
    with db.unit_of_work() as uow:
        row = _oldest(uow.session)
        if row is None:
            made = pki.new_authority("EdgeFleet device CA", utcnow())
            uow.session.add(CertificateAuthorityRow(
                id=secrets.new_id(), certificate_pem=made.certificate_pem,
                private_key_pem=made.private_key_pem,
            ))  # fmt: skip
            uow.commit()
            row = _oldest(uow.session)
        assert row is not None
        return pki.Authority(row.certificate_pem, row.private_key_pem)


def server_names(extra: tuple[str, ...], listen_host: str) -> list[str]:
    """What the replica's certificate must name: what it was told, its host
    name, and loopback (agents and the CLI on the same machine)."""
    names = [*extra]
    if listen_host not in ("", "0.0.0.0", "::", "[::]"):
        names.append(listen_host.strip("[]"))
    names += [socket.gethostname(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(names))


class CertificateService:
    """Issues and renews device client certificates."""

    def __init__(
        self, db: Database, events: EventSink, authority: pki.Authority,
        lifetime: dt.timedelta = DEFAULT_DEVICE_LIFETIME,
    ) -> None:  # fmt: skip
        if lifetime < MIN_DEVICE_LIFETIME:
            raise ValueError(f"device certificates must live at least {MIN_DEVICE_LIFETIME}")
        self._db = db
        self._events = events
        self._authority = authority
        self._lifetime = lifetime

    @property
    def ca_certificate_pem(self) -> bytes:
        return self._authority.certificate_pem

    def issue_for(
        self, device: DeviceRow, csr_pem: bytes, *, keep_previous: bool
    ) -> DeviceCertificate:
        """Issue a certificate for `device` (inside the caller's transaction)
        and record its serial. `keep_previous` keeps the current one valid
        (a renewal); otherwise every earlier certificate is revoked."""
        try:
            issued = pki.issue_device_certificate(
                self._authority, csr_pem, device.id, utcnow(), self._lifetime
            )
        except pki.CertificateError as exc:
            raise InvalidArgument(f"cannot issue a device certificate: {exc}") from None
        device.cert_previous_serial = device.cert_serial if keep_previous else None
        device.cert_serial = issued.serial
        device.cert_not_after = issued.not_after
        return DeviceCertificate(issued.certificate_pem, self.ca_certificate_pem, issued.not_after)

    def possession_refusal(
        self, device: DeviceRow, certificate_pem: bytes, signature: bytes, csr_pem: bytes
    ) -> str | None:
        """Why a re-enrollment of `device` does not prove its key, or None:
        `certificate_pem` must be this CA's, name the device and be its
        current or previous certificate (expired or not), and `signature`
        must be its key's over the new CSR (pki.reenrollment_message)."""
        if device.cert_serial is None:
            return None  # enrolled without TLS: it has no key to prove
        message = pki.reenrollment_message(device.id, csr_pem)
        try:
            info = pki.verify_possession(self._authority, certificate_pem, signature, message)
        except pki.CertificateError as exc:
            return f"the proof of the device's key does not hold: {exc}"
        if info.device_id != device.id:
            return f"the proof's certificate is device {info.device_id}'s"
        if info.serial not in (device.cert_serial, device.cert_previous_serial):
            return f"the proof's certificate {info.serial} is not the device's current one"
        return None

    def renew(self, device_id: str, csr_pem: bytes) -> DeviceCertificate:
        """A new certificate for an enrolled device, from a CSR over a new key."""
        with self._db.unit_of_work() as uow:
            device = uow.session.get(DeviceRow, device_id, with_for_update=True)
            if device is None:
                raise NotFound(f"no device with id {device_id!r}")
            if device.state in REFUSED_STATES:
                raise PermissionDenied(f"device {device_id} is {device.state}; no certificate")
            issued = self.issue_for(device, csr_pem, keep_previous=True)
            audit.record(uow, f"device:{device_id}", "device.certificate.renew",
                         f"device:{device_id}", serial=device.cert_serial)  # fmt: skip
            uow.commit()
        # Every replica's credential cache must learn the new serial.
        self._events.publish(FleetEvent("device.certified", (device_id,)))
        return issued
