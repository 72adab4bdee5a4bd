"""The model registry: receive a pushed model version, check it, store it
content-addressed, record it. A push either lands whole or leaves nothing."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.models import ModelRow, ModelVersionRow
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import onnx_inspect, secrets, semver
from edgefleet.controlplane.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent

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
class ModelSummary:
    row: ModelRow
    latest_version: str
    version_count: int


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
        sample = None
        if SAMPLE_DATA in files:
            sample = onnx_inspect.inspect_sample_data(files[SAMPLE_DATA], info)
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
                )
                session.add(row)
                audit.record(
                    uow,
                    actor,
                    "model.push",
                    f"model:{header.model_name}@{header.version}",
                    sha256=digests[MODEL],
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

    # ------------------------------------------------------------ queries

    def list_models(self) -> list[ModelSummary]:
        with self._db.unit_of_work(readonly=True) as uow:
            models = list(uow.session.scalars(select(ModelRow).order_by(ModelRow.name)))
            return [self._summary(uow.session, m) for m in models]

    def _summary(self, session: Session, model: ModelRow) -> ModelSummary:
        count = session.scalar(select(func.count()).where(ModelVersionRow.model_id == model.id))
        latest = session.scalar(
            select(ModelVersionRow.version)
            .where(ModelVersionRow.model_id == model.id)
            .order_by(ModelVersionRow.version_sort.desc())
            .limit(1)
        )
        return ModelSummary(model, latest or "", int(count or 0))

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
