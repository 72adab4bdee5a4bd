"""Who is calling: operator tokens and device credentials."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from edgefleet.controlplane.db.models import DeviceRow, OperatorTokenRow, utcnow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import secrets
from edgefleet.controlplane.domain.roles import ADMIN
from edgefleet.controlplane.domain.secrets import SecretKind
from edgefleet.controlplane.errors import PermissionDenied, Unauthenticated
from edgefleet.controlplane.services.events import FleetEvent

log = logging.getLogger(__name__)

BOOTSTRAP_TOKEN_ID = "bootstrap"
# How stale an operator token's last-used time may get before it is written.
LAST_USED_EVERY = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class OperatorPrincipal:
    token_id: str
    name: str
    role: str

    @property
    def actor(self) -> str:
        return self.name


@dataclass(frozen=True)
class DevicePrincipal:
    device_id: str
    state: str
    # Serials of the client certificates the device may present (the current
    # one and the one it renewed from); empty before it has any.
    cert_serials: tuple[str, ...] = ()

    @property
    def actor(self) -> str:
        return f"device:{self.device_id}"


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("malformed authorization header: expected 'Bearer <token>'")
    return value.strip()


def authenticate_operator(db: Database, authorization: str | None) -> OperatorPrincipal:
    """The operator behind a bearer token. A device credential here is
    PERMISSION_DENIED (it is a valid identity, just not an operator)."""
    token = _bearer(authorization)
    if secrets.parse_id(SecretKind.DEVICE, token) is not None:
        authenticate_device(db, authorization)  # UNAUTHENTICATED if not even valid
        raise PermissionDenied("a device credential cannot call operator RPCs")
    token_id = secrets.parse_id(SecretKind.OPERATOR, token) or BOOTSTRAP_TOKEN_ID
    with db.unit_of_work(readonly=True) as uow:
        row = uow.session.get(OperatorTokenRow, token_id)
    if row is None or not secrets.matches(token, row.secret_hash):
        raise Unauthenticated("invalid operator token")
    now = utcnow()
    if row.revoked_at is not None:
        raise Unauthenticated(f"operator token {row.name!r} was revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthenticated(
            f"operator token {row.name!r} expired at {row.expires_at:%Y-%m-%d %H:%M} UTC"
        )
    if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
        # At most one write per token per interval: `operator-tokens ls`
        # shows which tokens are still in use.
        with db.unit_of_work() as uow:
            uow.session.execute(
                update(OperatorTokenRow).where(OperatorTokenRow.id == row.id)
                .values(last_used_at=now)
            )  # fmt: skip
            uow.commit()
    return OperatorPrincipal(token_id=row.id, name=row.name, role=row.role)


def authenticate_device(db: Database, authorization: str | None) -> DevicePrincipal:
    """The device behind a credential. Operator tokens are PERMISSION_DENIED
    here; rejected or decommissioned devices too."""
    token = _bearer(authorization)
    device_id = secrets.parse_id(SecretKind.DEVICE, token)
    if device_id is None:
        if secrets.parse_id(SecretKind.OPERATOR, token) is not None:
            raise PermissionDenied("an operator token cannot call device RPCs")
        raise Unauthenticated("invalid device credential")
    with db.unit_of_work(readonly=True) as uow:
        # The columns a decision needs, not the ORM row: loading the whole
        # device (its JSON hardware, runtime and labels decoded) for every
        # credential check was most of this function's cost at 10,000 devices.
        row = uow.session.execute(
            select(
                DeviceRow.id, DeviceRow.credential_hash, DeviceRow.state,
                DeviceRow.state_reason, DeviceRow.cert_serial, DeviceRow.cert_previous_serial,
            ).where(DeviceRow.id == device_id)
        ).one_or_none()  # fmt: skip
    if row is None or not secrets.matches(token, row.credential_hash):
        raise Unauthenticated("invalid device credential; enroll again")
    if row.state in ("rejected", "decommissioned"):
        reason = f": {row.state_reason}" if row.state_reason else ""
        raise PermissionDenied(f"device {row.id} is {row.state}{reason}")
    serials = tuple(s for s in (row.cert_serial, row.cert_previous_serial) if s)
    return DevicePrincipal(device_id=row.id, state=row.state, cert_serials=serials)


class DeviceCredentials:
    """Device credentials verified in the last `ttl_s`, so a device's RPCs
    after its first skip the database: 10,000 devices uploading telemetry
    every 30 s made the credential lookup the largest single cost of the
    control plane's idle work. The TTL must outlast the upload interval to
    help at all. An entry is dropped as soon as this replica hears the
    device changed (accepted, rejected, decommissioned, re-enrolled: all
    publish a desired-state change, from any replica over the event
    bridge); the TTL bounds how long a missed event (a replica cut off from
    the bridge) could let a refused device keep uploading telemetry. Its
    sync stream, the only way to get work, is ended on rejection anyway."""

    # Events that can change who a device is or whether it may call: those
    # that change its desired state, and a renewed certificate.
    _INVALIDATING = frozenset({"device.updated", "device.enrolled"})
    _ALWAYS_INVALIDATING = frozenset({"device.certified"})

    def __init__(
        self, db: Database, *, ttl_s: float = 300.0, max_entries: int = 200_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._db = db
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._hits: dict[str, tuple[DevicePrincipal, float]] = {}
        self._by_device: dict[str, str] = {}
        # When each device last changed: a lookup that started before a
        # change may have read the old row, so its answer is not kept.
        self._changed: dict[str, float] = {}

    def cached(self, authorization: str | None) -> DevicePrincipal | None:
        """The principal for a credential verified recently (loop-safe, no I/O)."""
        hit = self._hits.get(authorization or "")
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[0]

    def authenticate(self, authorization: str | None) -> DevicePrincipal:
        """authenticate_device, remembering a success (blocking: a worker thread)."""
        started = self._clock()
        principal = authenticate_device(self._db, authorization)
        if self._changed.get(principal.device_id, -math.inf) >= started:
            return principal  # changed while we read it: answer, but do not keep
        if len(self._hits) >= self._max:
            self._hits.clear()
            self._by_device.clear()
            self._changed.clear()
        assert authorization is not None  # authenticate_device refused None
        stale = self._by_device.get(principal.device_id)
        if stale is not None and stale != authorization:
            self._hits.pop(stale, None)
        self._hits[authorization] = (principal, self._clock() + self._ttl)
        self._by_device[principal.device_id] = authorization
        return principal

    def on_event(self, event: FleetEvent) -> None:
        """EventBus subscriber: forget devices that changed."""
        if event.kind not in self._ALWAYS_INVALIDATING and (
            event.kind not in self._INVALIDATING or not event.desired_changed
        ):
            return
        now = self._clock()
        for device_id in event.device_ids:
            self._changed[device_id] = now
            stale = self._by_device.pop(device_id, None)
            if stale is not None:
                self._hits.pop(stale, None)


def ensure_bootstrap_admin(db: Database, token_file: Path, configured: str | None) -> str | None:
    """Make sure an admin can get in on first start. With a configured token,
    (re)store its hash. Otherwise, when no operator token exists, create one
    and write it to `token_file` (ServerConfig.admin_token_file) with mode
    0600. Returns the token when one was written or configured."""
    if configured:
        with db.unit_of_work() as uow:
            row = uow.session.get(OperatorTokenRow, BOOTSTRAP_TOKEN_ID)
            if row is None:
                uow.session.add(
                    OperatorTokenRow(
                        id=BOOTSTRAP_TOKEN_ID,
                        name="bootstrap-admin",
                        secret_hash=secrets.hash_secret(configured),
                        role=ADMIN,
                    )
                )
            else:
                row.secret_hash = secrets.hash_secret(configured)
                row.revoked_at = None
            # Another replica may have stored it first.
            with contextlib.suppress(IntegrityError):
                uow.commit()
        return configured
    with db.unit_of_work() as uow:
        if uow.session.scalar(select(OperatorTokenRow.id).limit(1)) is not None:
            return None
        token_id = secrets.new_id()
        token = secrets.issue(SecretKind.OPERATOR, token_id)
        uow.session.add(
            OperatorTokenRow(
                id=token_id, name="admin", secret_hash=secrets.hash_secret(token), role=ADMIN
            )
        )
        try:
            uow.commit()
        except IntegrityError:
            return None
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("created the bootstrap admin token in %s (mode 0600)", token_file)
    return token
