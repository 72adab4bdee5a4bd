"""Published artifacts: listing them for operators, and deciding which a
device may download."""

from __future__ import annotations

import logging
import re

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.models import ArtifactRow, BuildRow, DeviceRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edgefleet.controlplane.services.blobs import BlobFile, BlobStore, valid_digest
from edgefleet.controlplane.services.builds import SUCCEEDED
from edgefleet.controlplane.services.devices import ACCEPTED
from edgefleet.controlplane.services.references import LOOKUP_LIMIT, SHOWN_CANDIDATES, starts_with
from edgefleet.controlplane.services.registry import filter_by_model

# What `artifacts show` takes for a digest: the 12 characters tables show,
# or any lowercase-hex prefix of at least 6.
_HEX_PREFIX = re.compile(r"[0-9a-f]{6,63}")

log = logging.getLogger(__name__)


class ArtifactService:
    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self._db = db
        self._blobs = blobs

    def find(
        self, *, model_name: str = "", version: str = "", class_name: str = ""
    ) -> list[ArtifactRow]:
        stmt = select(ArtifactRow).order_by(ArtifactRow.created_at.desc())
        stmt = filter_by_model(stmt, ArtifactRow.model_version_id, model_name, version)
        if class_name:
            stmt = stmt.where(ArtifactRow.class_name == class_name)
        with self._db.unit_of_work(readonly=True) as uow:
            return list(uow.session.scalars(stmt))

    def get(self, digest: str) -> ArtifactRow:
        """The newest artifact with these bytes (several classes may ship
        the same bytes, each with its own manifest); for the digest of a
        lighter fallback, the newest artifact that ships it (the fallback's
        manifest is inside that one's)."""
        with self._db.unit_of_work(readonly=True) as uow:
            row = None
            if not valid_digest(digest) and _HEX_PREFIX.fullmatch(digest):
                digest = self._full_digest(uow.session, digest)
            if valid_digest(digest):
                for column in (ArtifactRow.digest, ArtifactRow.fallback_digest):
                    row = uow.session.scalar(
                        select(ArtifactRow)
                        .where(column == digest)
                        .order_by(ArtifactRow.created_at.desc())
                        .limit(1)
                    )
                    if row is not None:
                        break
            if row is None:
                raise NotFound(f"no artifact with digest {digest!r}")
            return row

    @staticmethod
    def _full_digest(session: Session, prefix: str) -> str:
        """The one artifact (or fallback) digest starting with `prefix`, as
        tables show them short; the prefix itself when none does (NOT_FOUND
        follows); INVALID_ARGUMENT naming a few when several do. Asked of
        the database, so every artifact counts, not one listed page."""
        found: set[str] = set()
        for column in (ArtifactRow.digest, ArtifactRow.fallback_digest):
            found.update(
                session.scalars(
                    select(column).where(starts_with(column, prefix)).distinct().limit(LOOKUP_LIMIT)
                )
            )
        if len(found) > 1:
            shown = ", ".join(sorted(d[:16] for d in found)[:SHOWN_CANDIDATES])
            raise InvalidArgument(
                f"digest prefix {prefix!r} names several artifacts ({shown}"
                f"{', …' if len(found) > SHOWN_CANDIDATES else ''}); give more of it"
            )
        return found.pop() if found else prefix

    def open_for_device(self, device_id: str, digest: str) -> BlobFile:
        """A blob the device may download, open and verified against its
        digest (BlobStore.open): the artifact, its companion or its lighter
        fallback, of a successful build for the device's class. Rollouts
        (issue 5) add explicit assignments. The caller closes it."""
        if not valid_digest(digest):
            raise InvalidArgument("digest must be 64 lowercase hex characters (sha256)")
        with self._db.unit_of_work(readonly=True) as uow:
            device = uow.session.get_one(DeviceRow, device_id)
            if device.state != ACCEPTED:
                raise FailedPrecondition(
                    f"device {device_id} is {device.state}; only accepted devices receive work"
                )
            known = uow.session.scalar(
                select(ArtifactRow.id)
                .where(
                    or_(
                        ArtifactRow.digest == digest,
                        ArtifactRow.companion_digest == digest,
                        ArtifactRow.fallback_digest == digest,
                    )
                )
                .limit(1)
            )
            if known is None:
                raise NotFound(f"no artifact with digest {digest}")
            # The same bytes may be one class's artifact and another's
            # fallback (or companion): the device may have them when any
            # build for its own class ships them, in any of those roles.
            with_companion = select(ArtifactRow.digest).where(
                ArtifactRow.companion_digest == digest
            )
            allowed = uow.session.scalar(
                select(BuildRow.id)
                .where(BuildRow.state == SUCCEEDED, BuildRow.class_id == device.class_id)
                .where(
                    or_(
                        BuildRow.artifact_digest == digest,
                        BuildRow.fallback_digest == digest,
                        BuildRow.artifact_digest.in_(with_companion),
                    )
                )
                .limit(1)
            )
            if device.class_id is None or allowed is None:
                raise PermissionDenied(
                    f"artifact {digest[:12]} is not built for this device's class; a device may "
                    "download only artifacts built for its own class"
                )
        try:
            return self._blobs.open(self._db, digest)
        except DataLoss as exc:
            # The operator's account (paths, mirrors tried) is for the server
            # log; a device learns what happened and that it is not its fault.
            log.error("artifact %s asked for by device %s: %s", digest, device_id, exc)
            raise DataLoss(
                f"the control plane's stored copy of artifact {digest} is damaged or missing "
                "and is not served; its operator must push the model version again or run its "
                "build again (the server log says more); the update can be retried after that"
            ) from None
