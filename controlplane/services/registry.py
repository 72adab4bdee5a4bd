"""The model registry: receive a pushed model version, check it, store it
content-addressed, record it. A push either lands whole or leaves nothing."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.controlplane.build.samples import DEFAULT_DYNAMIC_DIM
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    BlobRow,
    BuildRow,
    DeviceAssignmentRow,
    DeviceClassRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
    RolloutDeviceRow,
    RolloutRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import onnx_inspect, secrets, semver
from edgefleet.controlplane.domain.input_shapes import push_warnings
from edgefleet.controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.blobs import BlobStore, unreferenced
from edgefleet.controlplane.services.classes import input_shapes_of
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.fidelity import OutputSpec, state_pairs

MODEL, SAMPLE_DATA, LABELS = "model", "sample_data", "labels"
PARTS = (MODEL, SAMPLE_DATA, LABELS)
MEDIA_TYPES = {
    MODEL: "application/onnx",
    SAMPLE_DATA: "application/x-npz",
    LABELS: "text/plain; charset=utf-8",
}
# Sample data pushed as a plain .npy (a model with one input) is stored as such.
NPY_MEDIA_TYPE = "application/x-npy"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class PartDecl:
    part: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PushHeader:
    model_name: str
    version: str
    description: str
    parts: tuple[PartDecl, ...]
    # Output kinds the pusher declares (the rest are inferred at commit).
    outputs: tuple[OutputSpec, ...] = ()
    # The version's own fidelity floor, (0, 1]; None: the classes'.
    min_fidelity: float | None = None


@dataclass
class _Spooled:
    decl: PartDecl
    path: Path
    fh: IO[bytes]
    hasher: Any = field(default_factory=hashlib.sha256)
    received: int = 0


class Upload:
    """Spools one push's parts to temp files, checking sizes and digests as
    bytes arrive. Always call close() (it removes whatever is left)."""

    def __init__(self, tmp_root: Path, header: PushHeader, max_bytes: int) -> None:
        total = sum(d.size for d in header.parts)
        if total > max_bytes:
            raise ResourceExhausted(
                f"upload of {total / 1e6:.1f} MB exceeds the server's limit of "
                f"{max_bytes / 1e6:.1f} MB (server option --max-upload-mb)"
            )
        self.header = header
        self._dir = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root))
        self._parts: dict[str, _Spooled] = {}
        for decl in header.parts:
            path = self._dir / decl.part
            self._parts[decl.part] = _Spooled(decl, path, open(path, "wb"))  # noqa: SIM115

    def write(self, part: str, data: bytes) -> None:
        spooled = self._parts.get(part)
        if spooled is None:
            raise InvalidArgument(f"chunk for part {part!r} that the header did not declare")
        spooled.received += len(data)
        if spooled.received > spooled.decl.size:
            raise InvalidArgument(
                f"part {part!r} is larger than the {spooled.decl.size} bytes the header declared"
            )
        spooled.hasher.update(data)
        spooled.fh.write(data)

    def finish(self) -> dict[str, Path]:
        """Check every part arrived whole; returns the spooled files."""
        for part, spooled in self._parts.items():
            spooled.fh.close()
            if spooled.received != spooled.decl.size:
                raise InvalidArgument(
                    f"upload truncated: part {part!r} got {spooled.received} of "
                    f"{spooled.decl.size} declared bytes; nothing was stored"
                )
            if spooled.hasher.hexdigest() != spooled.decl.sha256:
                raise InvalidArgument(
                    f"part {part!r} does not match its declared sha256; the upload was corrupted"
                )
        return {part: s.path for part, s in self._parts.items()}

    def close(self) -> None:
        for spooled in self._parts.values():
            spooled.fh.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def find_version(session: Session, name: str, version: str) -> ModelVersionRow | None:
    """The row of `name@version`, if pushed."""
    return session.scalar(
        select(ModelVersionRow)
        .join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
        .where(ModelRow.name == name, ModelVersionRow.version == version)
    )


def require_version(session: Session, name: str, version: str) -> ModelVersionRow:
    row = find_version(session, name, version)
    if row is None:
        raise NotFound(f"no model version {name}@{version}")
    return row


def require_assignable(session: Session, name: str, version: str) -> ModelVersionRow:
    """The row of `name@version` for a new assignment or rollout: a yanked
    version is refused (FAILED_PRECONDITION with the yank's reason)."""
    row = require_version(session, name, version)
    if row.yanked_at is not None:
        ref = f"{name}@{version}"
        raise FailedPrecondition(
            f"{ref} is yanked ({row.yank_reason}; by {row.yanked_by} at "
            f"{row.yanked_at:%Y-%m-%d %H:%M} UTC): it takes no new assignments or rollouts; "
            f"`edgefleet models unyank {ref}` allows them again"
        )
    return row


def mark_assigned(session: Session, mv: ModelVersionRow, at: dt.datetime) -> None:
    """Record `mv`'s first assignment (a deployed version cannot be
    deleted). Only the first write changes the row."""
    if mv.first_assigned_at is not None:
        return
    session.execute(
        update(ModelVersionRow)
        .where(ModelVersionRow.id == mv.id, ModelVersionRow.first_assigned_at.is_(None))
        .values(first_assigned_at=at)
        .execution_options(synchronize_session=False)
    )


def filter_by_model(
    stmt: Select[Any], version_id: Any, model_name: str, version: str
) -> Select[Any]:
    """Narrow a query over rows that point at a model version (`version_id`
    is their model_version_id column) to a model, and optionally a version."""
    if not model_name:
        return stmt
    stmt = stmt.join(ModelVersionRow, ModelVersionRow.id == version_id)
    stmt = stmt.join(ModelRow, ModelRow.id == ModelVersionRow.model_id)
    stmt = stmt.where(ModelRow.name == model_name)
    return stmt.where(ModelVersionRow.version == version) if version else stmt


@dataclass(frozen=True)
class Deleted:
    """What deleting a model version removed."""

    builds: int
    artifacts: int
    blobs: int
    bytes_freed: int


# Names listed in a refusal before "and N more".
_NAMED = 5


def _some(names: Sequence[str]) -> str:
    more = f" and {len(names) - _NAMED} more" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more


@dataclass(frozen=True)
class ModelSummary:
    row: ModelRow
    latest_version: str
    version_count: int
    yanked_count: int = 0


class RegistryService:
    def __init__(
        self, db: Database, blobs: BlobStore, events: EventSink, max_upload_bytes: int
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._events = events
        self.max_upload_bytes = max_upload_bytes

    # ------------------------------------------------------------ push

    def begin(self, header: PushHeader) -> Upload:
        """Check the header before any bytes are accepted, so a duplicate or
        oversized push fails fast."""
        if not _NAME.match(header.model_name):
            raise InvalidArgument(
                f"model name {header.model_name!r} is invalid: lowercase letters, digits, "
                "'.', '_' and '-', at most 100 characters"
            )
        semver.validate(header.version)
        seen: set[str] = set()
        for decl in header.parts:
            if decl.part not in PARTS:
                raise InvalidArgument(f"unknown part {decl.part!r}")
            if decl.part in seen:
                raise InvalidArgument(f"part {decl.part!r} declared twice")
            if not _SHA.match(decl.sha256):
                raise InvalidArgument(f"part {decl.part!r}: sha256 must be 64 lowercase hex digits")
            if decl.size <= 0:
                raise InvalidArgument(f"part {decl.part!r} is empty")
            seen.add(decl.part)
        if MODEL not in seen:
            raise InvalidArgument("the push declares no model part")
        floor = header.min_fidelity
        if floor is not None and not (math.isfinite(floor) and 0.0 < floor <= 1.0):
            raise InvalidArgument(
                f"min fidelity {floor!r} is not in (0, 1]: it is the share of the original "
                "model's quality each output must keep, e.g. 0.98"
            )
        self._check_new(header.model_name, header.version)
        return Upload(self._blobs.tmp, header, self.max_upload_bytes)

    def _check_new(self, name: str, version: str) -> None:
        with self._db.unit_of_work(readonly=True) as uow:
            if find_version(uow.session, name, version) is not None:
                raise AlreadyExists(
                    f"{name}@{version} already exists; versions are immutable, push a new version"
                )

    def commit(self, actor: str, upload: Upload) -> ModelVersionRow:
        """Validate the spooled files and publish them. On any failure nothing
        new stays behind: no rows, no blobs."""
        files = upload.finish()
        header = upload.header
        info = onnx_inspect.inspect_model(files[MODEL])
        specs = onnx_inspect.output_specs(info, header.outputs)
        sample = None
        if SAMPLE_DATA in files:
            sample = onnx_inspect.inspect_sample_data(
                files[SAMPLE_DATA],
                info,
                state=state_pairs(specs),
                classes=onnx_inspect.label_classes(info, specs),
            )
        labels_count = onnx_inspect.count_labels(files[LABELS]) if LABELS in files else 0
        digests = {d.part: d.sha256 for d in header.parts}
        sizes = {d.part: d.size for d in header.parts}
        try:
            with self._db.unit_of_work() as uow:
                session = uow.session
                for part, path in files.items():
                    npy = part == SAMPLE_DATA and sample is not None and sample.is_npy
                    media_type = NPY_MEDIA_TYPE if npy else MEDIA_TYPES[part]
                    self._blobs.add(session, path, digests[part], media_type)
                model = session.scalar(select(ModelRow).where(ModelRow.name == header.model_name))
                if model is None:
                    model = ModelRow(
                        id=secrets.new_id(), name=header.model_name, description=header.description
                    )
                    session.add(model)
                    session.flush()
                row = ModelVersionRow(
                    id=secrets.new_id(),
                    model_id=model.id,
                    version=header.version,
                    version_sort=semver.sort_key(header.version),
                    description=header.description,
                    model_digest=digests[MODEL],
                    size_bytes=sizes[MODEL],
                    inputs=[t.to_json() for t in info.inputs],
                    outputs=[t.to_json() for t in info.outputs],
                    opset=info.opset,
                    producer=info.producer,
                    sample_data_digest=digests.get(SAMPLE_DATA),
                    sample_size_bytes=sizes.get(SAMPLE_DATA, 0),
                    sample_count=sample.num_samples if sample else 0,
                    sample_has_labels=sample.has_labels if sample else False,
                    labels_digest=digests.get(LABELS),
                    labels_count=labels_count,
                    created_by=actor,
                    output_specs=[spec.to_json() for spec in specs],
                    min_fidelity=header.min_fidelity,
                )
                session.add(row)
                audit.record(
                    uow,
                    actor,
                    "model.push",
                    f"model:{header.model_name}@{header.version}",
                    sha256=digests[MODEL],
                    outputs=[spec.describe() for spec in specs],
                    **({"min_fidelity": header.min_fidelity} if header.min_fidelity else {}),
                )
                session.flush()
                uow.commit()
        except IntegrityError as exc:
            raise AlreadyExists(
                f"{header.model_name}@{header.version} already exists (pushed concurrently)"
            ) from exc
        self._events.publish(
            FleetEvent("model.pushed", subject=f"{header.model_name}@{header.version}")
        )
        return row

    def shape_warnings(self, row: ModelVersionRow) -> list[str]:
        """What the TFLite classes' builds will fix in a version's dynamic
        input dimensions, or where a class's input shapes do not fit it
        (PushModel's warnings)."""
        with self._db.unit_of_work(readonly=True) as uow:
            classes = list(
                uow.session.scalars(
                    select(DeviceClassRow)
                    .where(DeviceClassRow.runtime == "tflite")
                    .order_by(DeviceClassRow.name)
                )
            )
            return push_warnings(
                [(t["name"], t["shape"]) for t in row.inputs],
                [(c.name, input_shapes_of(c)) for c in classes],
                has_samples=row.sample_data_digest is not None,
                generated_dim=DEFAULT_DYNAMIC_DIM,
            )

    # ------------------------------------------------------------ queries

    def list_models(self) -> list[ModelSummary]:
        with self._db.unit_of_work(readonly=True) as uow:
            models = list(uow.session.scalars(select(ModelRow).order_by(ModelRow.name)))
            return [self._summary(uow.session, m) for m in models]

    def _summary(self, session: Session, model: ModelRow) -> ModelSummary:
        count = session.scalar(select(func.count()).where(ModelVersionRow.model_id == model.id))
        yanked = session.scalar(
            select(func.count()).where(
                ModelVersionRow.model_id == model.id, ModelVersionRow.yanked_at.is_not(None)
            )
        )
        latest = session.scalar(
            select(ModelVersionRow.version)
            .where(ModelVersionRow.model_id == model.id)
            .order_by(ModelVersionRow.version_sort.desc())
            .limit(1)
        )
        return ModelSummary(model, latest or "", int(count or 0), int(yanked or 0))

    def get_model(self, name: str) -> tuple[ModelSummary, list[ModelVersionRow]]:
        with self._db.unit_of_work(readonly=True) as uow:
            model = uow.session.scalar(select(ModelRow).where(ModelRow.name == name))
            if model is None:
                raise NotFound(f"no model named {name!r}")
            versions = list(
                uow.session.scalars(
                    select(ModelVersionRow)
                    .where(ModelVersionRow.model_id == model.id)
                    .order_by(ModelVersionRow.version_sort.desc())
                )
            )
            return self._summary(uow.session, model), versions

    def get_version(self, name: str, version: str) -> ModelVersionRow:
        with self._db.unit_of_work(readonly=True) as uow:
            return require_version(uow.session, name, version)

    # ------------------------------------------------------------ housekeeping

    def yank(self, actor: str, name: str, version: str, reason: str) -> ModelVersionRow:
        """Refuse new assignments and rollouts of `name@version` from now on;
        devices running it keep it (their desired state does not change)."""
        if not reason.strip():
            raise InvalidArgument(
                "say why the version is yanked (--reason): it is shown to whoever tries to "
                "assign it or roll it out"
            )
        with self._db.unit_of_work() as uow:
            row = require_version(uow.session, name, version)
            if row.yanked_at is None:
                row.yanked_at = utcnow()
                row.yanked_by = actor
            row.yank_reason = reason.strip()
            audit.record(uow, actor, "model.yank", f"model:{name}@{version}", reason=reason)
            uow.commit()
        self._events.publish(FleetEvent("model.updated", subject=f"{name}@{version}"))
        return row

    def unyank(self, actor: str, name: str, version: str, reason: str = "") -> ModelVersionRow:
        """Allow assignments and rollouts of `name@version` again."""
        with self._db.unit_of_work() as uow:
            row = require_version(uow.session, name, version)
            if row.yanked_at is None:
                raise FailedPrecondition(f"{name}@{version} is not yanked")
            was = row.yank_reason
            row.yanked_at = None
            row.yanked_by = ""
            row.yank_reason = ""
            audit.record(
                uow, actor, "model.unyank", f"model:{name}@{version}", reason=reason, was=was
            )
            uow.commit()
        self._events.publish(FleetEvent("model.updated", subject=f"{name}@{version}"))
        return row

    def delete_version(self, actor: str, name: str, version: str, reason: str = "") -> Deleted:
        """Delete a version that was never deployed, with its builds, their
        artifacts and the blobs nothing else refers to, in one transaction
        (their files are removed from the blob store after it commits). A deployed one is
        refused (FAILED_PRECONDITION saying where), to be yanked instead:
        devices, rollouts and the history name it."""
        ref = f"{name}@{version}"
        began = time.time()
        with self._db.unit_of_work() as uow:
            session = uow.session
            found = require_version(session, name, version)
            # Locked: an assignment of it (which marks it) waits, then sees
            # it gone, rather than being deleted with it by the cascade.
            mv = session.get_one(ModelVersionRow, found.id, with_for_update=True)
            self._check_deletable(session, mv, ref)
            build_ids = list(
                session.scalars(select(BuildRow.id).where(BuildRow.model_version_id == mv.id))
            )
            artifacts = list(
                session.scalars(
                    select(ArtifactRow).where(
                        or_(
                            ArtifactRow.model_version_id == mv.id,
                            ArtifactRow.build_id.in_(build_ids),
                        )
                    )
                )
            )
            digests = {mv.model_digest, mv.sample_data_digest, mv.labels_digest}
            for build in session.scalars(select(BuildRow).where(BuildRow.id.in_(build_ids))):
                digests |= {build.artifact_digest, build.fallback_digest}
            for artifact in artifacts:
                digests |= {artifact.digest, artifact.companion_digest, artifact.fallback_digest}
            _adopt_reuses(session, build_ids)
            artifact_ids = [a.id for a in artifacts]
            session.execute(delete(ArtifactRow).where(ArtifactRow.id.in_(artifact_ids)))
            session.execute(delete(BuildRow).where(BuildRow.id.in_(build_ids)))
            session.execute(delete(ModelVersionRow).where(ModelVersionRow.id == mv.id))
            freed = unreferenced(session, {d for d in digests if d})
            size = sum(session.scalars(select(BlobRow.size_bytes).where(BlobRow.digest.in_(freed))))
            session.execute(delete(BlobRow).where(BlobRow.digest.in_(freed)))
            audit.record(
                uow, actor, "model.delete", f"model:{ref}", reason=reason, builds=len(build_ids),
                artifacts=len(artifacts), blobs=len(freed), bytes=size,
            )  # fmt: skip
            uow.commit()
        self._blobs.discard(freed, since=began)
        self._events.publish(FleetEvent("model.deleted", subject=ref))
        return Deleted(len(build_ids), len(artifacts), len(freed), int(size))

    @staticmethod
    def _check_deletable(session: Session, mv: ModelVersionRow, ref: str) -> None:
        running = list(
            session.scalars(
                select(BuildRow.id).where(
                    # builds.RUNNING (builds imports this module)
                    BuildRow.model_version_id == mv.id,
                    BuildRow.state == "running",
                )
            )
        )
        if running:
            ids = _some([i[:12] for i in running])
            raise FailedPrecondition(
                f"{ref} has running builds ({ids}); cancel them first "
                "(`edgefleet builds cancel ID`)"
            )
        where = []
        devices = list(
            session.scalars(
                select(DeviceRow.name)
                .join(DeviceAssignmentRow, DeviceAssignmentRow.device_id == DeviceRow.id)
                .where(DeviceAssignmentRow.model_version_id == mv.id)
                .order_by(DeviceRow.name)
            )
        )
        if devices:
            where.append(f"assigned to {len(devices)} device(s): {_some(devices)}")
        rollouts = list(
            session.scalars(
                select(RolloutRow.id)
                .where(RolloutRow.model_version_id == mv.id)
                .order_by(RolloutRow.created_at)
            )
        )
        if rollouts:
            where.append(f"in rollout(s) {_some([r[:12] for r in rollouts])}")
        reverts = list(
            session.scalars(
                select(RolloutDeviceRow.rollout_id)
                .where(RolloutDeviceRow.previous_model_version_id == mv.id)
                .distinct()
            )
        )
        if reverts:
            where.append(f"what rollout(s) {_some([r[:12] for r in reverts])} revert to")
        if not where and mv.first_assigned_at is not None:
            where.append(f"assigned since {mv.first_assigned_at:%Y-%m-%d %H:%M} UTC")
        if where:
            raise FailedPrecondition(
                f"{ref} has been deployed ({'; '.join(where)}): only a version never deployed "
                f"can be deleted; yank it instead (`edgefleet models yank {ref} --reason ...`)"
            )


def _adopt_reuses(session: Session, build_ids: Sequence[str]) -> None:
    """Builds of other versions that reused a result of `build_ids` (about
    to be deleted) take their oldest copy as the source instead: a later
    twin re-signs the source's manifest (services/builds.py)."""
    reusers = list(
        session.scalars(
            select(BuildRow)
            .where(BuildRow.reused_from.in_(build_ids), BuildRow.id.not_in(build_ids))
            .order_by(BuildRow.created_at)
        )
    )
    sources: dict[str, BuildRow] = {}
    for build in reusers:
        gone = build.reused_from
        assert gone is not None
        source = sources.setdefault(gone, build)
        build.reused_from = None if build is source else source.id
