"""Build jobs: one per (model version, device class), persisted in SQL, claimed
with a lease so that exactly one replica runs each, re-run when the runner
died, deduplicated by what determines the result, and published together with
their signed artifact in one transaction."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, aliased

from edgefleet.controlplane.build.toolchain import find_tflite
from edgefleet.controlplane.build.types import (
    BuildResult,
    BuildTarget,
    Candidate,
    Evaluated,
    Golden,
    TensorRTSpec,
    is_noisy,
)
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    BlobRow,
    BuildRow,
    DeviceClassRow,
    ModelRow,
    ModelVersionRow,
    utcnow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import secrets, signing
from edgefleet.controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from edgefleet.controlplane.services import audit
from edgefleet.controlplane.services.blobs import BlobStore, sha256_file
from edgefleet.controlplane.services.classes import input_shapes_of
from edgefleet.controlplane.services.devices import EventSink
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.controlplane.services.keys import signing_key
from edgefleet.controlplane.services.registry import filter_by_model, require_version
from edgefleet.fidelity import OutputSpec
from edgefleet.fidelity_wire import spec_to_wire
from edgefleet.v1 import common_pb2 as c

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
CANCELLED = "cancelled"
BUILD_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
MAX_ATTEMPTS = 3
# Bump when the ladder or the verdict changes what a build produces, so old
# results are not reused for new logic.
# 2: each output judged by its kind's metric; noisy timing re-measured;
# TFLite keeps a dynamic batch.
LADDER_VERSION = "2"
MANIFEST_FORMAT = 1
RUNTIME_ENUM = {"onnxruntime": c.RUNTIME_ONNXRUNTIME, "tflite": c.RUNTIME_TFLITE,
                "tensorrt": c.RUNTIME_TENSORRT}  # fmt: skip
PRECISION_ENUM = {"fp32": c.QUANTIZATION_FP32, "fp16": c.QUANTIZATION_FP16,
                  "int8": c.QUANTIZATION_INT8}  # fmt: skip


def target_of(cls: DeviceClassRow, mv: ModelVersionRow | None = None) -> BuildTarget:
    """What a build of `mv` for `cls` must meet: the class's constraint
    profile, and the version's output kinds and fidelity floor."""
    return BuildTarget(
        class_name=cls.name,
        runtime=cls.runtime,
        quantization=cls.quantization,
        max_model_size_mb=cls.max_model_size_mb,
        latency_budget_p95_ms=cls.latency_budget_p95_ms,
        max_memory_mb=cls.max_memory_mb,
        min_accuracy_retention=cls.min_accuracy_retention,
        accelerator=cls.accelerator,
        threads=cls.threads,
        speed_factor=cls.speed_factor,
        microcontroller=cls.microcontroller,
        fallback=cls.fallback,
        outputs=tuple(OutputSpec.from_json(o) for o in (mv.output_specs if mv else ()) or ()),
        min_fidelity=mv.min_fidelity if mv else None,
        # Only a TFLite conversion fixes shapes: another runtime's builds
        # neither use them nor rebuild when they change.
        input_shapes=input_shapes_of(cls) if cls.runtime == "tflite" else (),
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def toolchain_versions(runtime: str, toolchains_dir: Path | None) -> dict[str, str]:
    """The tool versions a build's result depends on (part of the dedup key).
    A missing TFLite toolchain gives a different key than an installed one,
    so installing it lets a failed build run again instead of being reused."""
    versions = {p: _version(p) for p in ("onnx", "onnxruntime", "onnxconverter-common")}
    if runtime == "tflite":
        versions["ai-edge-litert"] = _version("ai-edge-litert")
        found = find_tflite(toolchains_dir)
        versions["toolchain"] = found.key if found else "missing"
    return versions


def dedup_key(model: ModelVersionRow, target: BuildTarget, versions: dict[str, str]) -> str:
    """Same model bytes, sample data, class profile and tools: same result.
    The class name is left out: two classes with one profile share a build."""
    # No fallback or input shapes asked: the key builds had before classes
    # could ask for them.
    profile = {
        k: v
        for k, v in target.to_json().items()
        if k != "class_name" and not (k in ("fallback", "input_shapes") and not v)
    }
    payload = {
        "model": model.model_digest,
        "samples": model.sample_data_digest,
        "profile": profile,
        "tools": versions,
        "ladder": LADDER_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def failed_on_noise(row: BuildRow) -> bool:
    """Whether a failed build failed because its host was busy: a candidate
    missed the latency budget on timing that stayed noisy after it was
    measured again (and would have passed otherwise). Such a result says
    more about the host than about the model, so asking again builds again
    instead of reusing it; a failure on size, fidelity or steady latency is
    reused as any result is."""
    if row.state != FAILED:
        return False
    for report in row.candidates or ():
        reasons = report.get("reasons") or []
        noisy = is_noisy(
            report.get("latency_cv") or 0.0,
            report.get("latency_p95_over_p50") or 0.0,
            report.get("latency_p50_ms") or 0.0,
        )
        if noisy and reasons and all(r.startswith("latency p95") for r in reasons):
            return True
    return False


@dataclass(frozen=True)
class ClaimedJob:
    build_id: str
    attempt: int
    model_digest: str
    sample_digest: str | None
    target: BuildTarget


class Lease(enum.Enum):
    """What a runner renewing its lease learns: the job is still its own,
    is no longer (drop the result), or its own and cancelled (stop it)."""

    OURS = "ours"
    LOST = "lost"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class BuildView:
    row: BuildRow
    model_name: str
    model_version: str
    artifact_size: int = 0
    fallback_size: int = 0


class BuildService:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        events: EventSink,
        *,
        toolchains_dir: Path | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._events = events
        self._toolchains_dir = toolchains_dir
        # Set by the runner so new jobs start without waiting for its poll,
        # and a cancelled job it runs stops without waiting for its next
        # lease renewal (a runner on another replica learns it from that).
        self.on_queued: Callable[[], None] = lambda: None
        self.on_cancel: Callable[[str], None] = lambda _build_id: None

    # ------------------------------------------------------------ requests

    def request(
        self, actor: str, model_name: str, version: str, class_name: str = "", force: bool = False
    ) -> list[BuildView]:
        """Builds of one model version for one class, or for every class."""
        with self._db.unit_of_work() as uow:
            mv = require_version(uow.session, model_name, version)
            if class_name:
                cls = uow.session.scalar(
                    select(DeviceClassRow).where(DeviceClassRow.name == class_name)
                )
                if cls is None:
                    raise NotFound(f"no device class named {class_name!r}")
                classes = [cls]
            else:
                classes = list(uow.session.scalars(select(DeviceClassRow)))
                if not classes:
                    raise InvalidArgument("there are no device classes to build for; create one")
            rows = [self._request_one(uow.session, mv, cls, force) for cls in classes]
            audit.record(
                uow, actor, "build.run", f"model:{model_name}@{version}",
                classes=[cls.name for cls in classes], force=force,
            )  # fmt: skip
            uow.commit()
            views = [BuildView(r, model_name, version) for r in rows]
        self._announce(views)
        return views

    def request_for_version(self, model_name: str, version: str) -> None:
        """After a push: build the new version for every class."""
        with self._db.unit_of_work() as uow:
            try:
                mv = require_version(uow.session, model_name, version)
            except NotFound:
                return
            for cls in uow.session.scalars(select(DeviceClassRow)):
                self._request_one(uow.session, mv, cls, force=False)
            uow.commit()
        self.on_queued()

    def request_for_class(self, class_name: str) -> None:
        """After a class was created or changed: build the newest version of
        every model for it (dedup makes an unchanged profile free)."""
        with self._db.unit_of_work() as uow:
            cls = uow.session.scalar(
                select(DeviceClassRow).where(DeviceClassRow.name == class_name)
            )
            if cls is None:
                return
            for model in uow.session.scalars(select(ModelRow)):
                mv = uow.session.scalar(
                    select(ModelVersionRow)
                    .where(ModelVersionRow.model_id == model.id)
                    .order_by(ModelVersionRow.version_sort.desc())
                    .limit(1)
                )
                if mv is not None:
                    self._request_one(uow.session, mv, cls, force=False)
            uow.commit()
        self.on_queued()

    def _request_one(
        self, session: Session, mv: ModelVersionRow, cls: DeviceClassRow, force: bool
    ) -> BuildRow:
        target = target_of(cls, mv)
        key = dedup_key(mv, target, toolchain_versions(target.runtime, self._toolchains_dir))
        same = list(
            session.scalars(
                select(BuildRow)
                .where(BuildRow.dedup_key == key)
                .order_by(BuildRow.created_at.desc())
            )
        )
        # The same bytes may be pushed as another version: that version still
        # needs its own build row (reusing the result), so match the version too.
        mine = next((b for b in same if b.class_id == cls.id and b.model_version_id == mv.id), None)
        # Only while it is still the class's newest build of the version:
        # assignments take the newest (deployments._class_artifact), so a
        # profile changed and changed back (a fallback turned off and on)
        # needs a new row reusing the old result, or devices get the other.
        # A cancelled one is not a result: asking again queues a new build.
        if (
            mine is not None
            and mine.state != CANCELLED
            and not failed_on_noise(mine)
            and mine.id == self._newest(session, mv, cls)
            and (not force or mine.state in (QUEUED, RUNNING))
        ):
            return mine  # this class already has (or is getting) this result
        row = BuildRow(
            id=secrets.new_id(),
            model_version_id=mv.id,
            class_id=cls.id,
            class_name=cls.name,
            target=target.to_json(),
            state=QUEUED,
            progress=0.0,
            log="",
            candidates=[],
            error="",
            dedup_key=key,
            attempts=0,
        )
        # A failure a busy build host caused is not a result to share.
        done = next(
            (b for b in same if b.state in (SUCCEEDED, FAILED) and not failed_on_noise(b)), None
        )
        if done is not None and not force:
            # Same inputs, same tools (another class with the same profile):
            # the same result, without rebuilding. The artifact bytes are
            # shared; each class gets its own signed manifest (_sign_twin).
            row.state = done.state
            row.progress = 1.0
            row.candidates = done.candidates
            row.artifact_digest = done.artifact_digest
            row.fallback_digest = done.fallback_digest
            row.fallback_reason = done.fallback_reason
            row.error = done.error
            row.log = f"reused the result of build {done.id} (identical inputs and tools)"
            row.reused_from = done.reused_from or done.id
            row.started_at = row.finished_at = utcnow()
        session.add(row)
        session.flush()
        if row.state == SUCCEEDED:
            _sign_twin(session, row)
        return row

    @staticmethod
    def _newest(session: Session, mv: ModelVersionRow, cls: DeviceClassRow) -> str | None:
        """The id of the class's newest build of `mv`, whatever its profile."""
        return session.scalar(
            select(BuildRow.id)
            .where(BuildRow.model_version_id == mv.id, BuildRow.class_id == cls.id)
            .order_by(BuildRow.created_at.desc())
            .limit(1)
        )

    # ------------------------------------------------------------ queries

    def _views(self, session: Session, rows: Iterable[BuildRow]) -> list[BuildView]:
        names: dict[str, tuple[str, str]] = {}
        out = []
        for row in rows:
            if row.model_version_id not in names:
                mv = session.get(ModelVersionRow, row.model_version_id)
                model = session.get(ModelRow, mv.model_id) if mv else None
                names[row.model_version_id] = (
                    model.name if model else "",
                    mv.version if mv else "",
                )
            out.append(
                BuildView(
                    row,
                    *names[row.model_version_id],
                    artifact_size=_blob_size(session, row.artifact_digest),
                    fallback_size=_blob_size(session, row.fallback_digest),
                )
            )
        return out

    def find(
        self, *, model_name: str = "", version: str = "", class_name: str = "", state: str = ""
    ) -> list[BuildView]:
        with self._db.unit_of_work(readonly=True) as uow:
            stmt = select(BuildRow).order_by(BuildRow.created_at.desc()).limit(500)
            stmt = filter_by_model(stmt, BuildRow.model_version_id, model_name, version)
            if class_name:
                stmt = stmt.where(BuildRow.class_name == class_name)
            if state:
                stmt = stmt.where(BuildRow.state == state)
            return self._views(uow.session, uow.session.scalars(stmt))

    def get(self, build_id: str) -> BuildView:
        with self._db.unit_of_work(readonly=True) as uow:
            row = uow.session.get(BuildRow, build_id) if build_id else None
            if row is None:
                raise NotFound(f"no build with id {build_id!r}")
            return self._views(uow.session, [row])[0]

    # ------------------------------------------------------------ cancel

    def cancel(self, actor: str, build_id: str) -> BuildView:
        """Cancel a build: a queued one (or one whose runner died) ends
        CANCELLED now; a running one is marked, and its runner (told at
        once through on_cancel on this replica, by its next lease renewal on
        another) stops it and ends it CANCELLED (`cancelled`). A finished
        build: FAILED_PRECONDITION."""
        now = utcnow()
        with self._db.unit_of_work() as uow:
            # Locked: a claim (FOR UPDATE SKIP LOCKED) cannot take it meanwhile.
            row = uow.session.get(BuildRow, build_id, with_for_update=True) if build_id else None
            if row is None:
                raise NotFound(f"no build with id {build_id!r}")
            view = self._views(uow.session, [row])[0]
            if row.state in FINISHED:
                by = f" by {row.cancelled_by}" if row.cancelled_by else ""
                raise FailedPrecondition(
                    f"build {row.id[:12]} ({view.model_name}@{view.model_version} for class "
                    f"{row.class_name}) already {row.state}{by}; only a queued or running build "
                    "can be cancelled"
                )
            if row.cancelled_by is not None:
                return view  # asked already; its runner is stopping it
            previous = row.state
            row.cancelled_by = actor
            expired = row.lease_expires_at is None or row.lease_expires_at < now
            if row.state == QUEUED or expired:
                _end_cancelled(row, now)
            audit.record(
                uow, actor, "build.cancel", f"model:{view.model_name}@{view.model_version}",
                build=row.id, class_name=row.class_name, state=previous,
            )  # fmt: skip
            uow.commit()
            view = self._views(uow.session, [row])[0]
        self._announce([view])
        if view.row.state == RUNNING:
            self.on_cancel(build_id)
        return view

    def cancelled(self, job: ClaimedJob, owner: str, log: str) -> None:
        """The runner stopped a job it was asked to cancel: CANCELLED."""
        with self._db.unit_of_work() as uow:
            row = uow.session.get(BuildRow, job.build_id)
            if row is None or row.lease_owner != owner or row.state != RUNNING:
                return
            row.log = log
            _end_cancelled(row, utcnow())
            uow.commit()
            view = self._views(uow.session, [row])[0]
        self._announce([view])

    # ------------------------------------------------------------ running

    def claim(self, owner: str, lease_s: float) -> ClaimedJob | None:
        """Take the oldest queued job, or one whose runner's lease expired
        (it crashed or its replica was killed). Exactly one replica wins."""
        while True:
            taken, answered = self._claim_one(owner, lease_s)
            if answered:
                self._announce(answered)
            if taken is not None or not answered:
                return taken

    def _claim_one(self, owner: str, lease_s: float) -> tuple[ClaimedJob | None, list[BuildView]]:
        """One claim attempt: the job taken, or none and the views of a queued
        job that a twin's newer result answered instead (then try again)."""
        now = utcnow()
        with self._db.unit_of_work() as uow:
            twin = aliased(BuildRow)
            # A job whose twin (same dedup key, another class) is being built
            # waits: the twin's result completes it when it finishes.
            twin_running = (
                select(twin.id)
                .where(twin.dedup_key == BuildRow.dedup_key, twin.id != BuildRow.id)
                .where(twin.state == RUNNING, twin.lease_expires_at >= now)
                .exists()
            )
            stmt = (
                select(BuildRow)
                .where(
                    or_(
                        (BuildRow.state == QUEUED) & ~twin_running,
                        (BuildRow.state == RUNNING) & (BuildRow.lease_expires_at < now),
                    )
                )
                .order_by(BuildRow.created_at)
                .limit(1)
            )
            if self._db.engine.dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True)
            row = uow.session.scalar(stmt)
            if row is None:
                return None, []
            if row.cancelled_by is not None:
                # Cancelled while running, and its runner died before it
                # could stop it: nothing is left to stop.
                _end_cancelled(row, now)
                uow.commit()
                return None, self._views(uow.session, [row])
            source = _result_since_queued(uow.session, row) if row.state == QUEUED else None
            if source is not None and not failed_on_noise(source):
                # Queued while its twin was being built, and committed too late
                # for the twin's finish to see it: take that result, not a
                # second build. Older results do not count (a forced rebuild).
                _take_result(uow.session, row, source)
                uow.commit()
                return None, self._views(uow.session, [row])
            if row.attempts >= MAX_ATTEMPTS:
                row.state = FAILED
                row.error = (
                    f"gave up after {row.attempts} attempts: the build was interrupted each "
                    "time (worker crash or control-plane restart); see the log"
                )
                row.finished_at = now
                row.lease_owner = None
                uow.commit()
                return None, []
            row.state = RUNNING
            row.attempts += 1
            row.lease_owner = owner
            row.lease_expires_at = now + dt.timedelta(seconds=lease_s)
            row.started_at = now
            row.progress = 0.0
            mv = uow.session.get_one(ModelVersionRow, row.model_version_id)
            job = ClaimedJob(
                row.id,
                row.attempts,
                mv.model_digest,
                mv.sample_data_digest,
                BuildTarget.from_json(row.target),
            )
            uow.commit()
        return job, []

    def renew(self, build_id: str, owner: str, lease_s: float, progress: float, log: str) -> Lease:
        """Extend the lease and record progress. LOST if the job is no
        longer ours (then the runner must drop its result); CANCELLED if an
        operator cancelled it (then the runner stops it, see `cancelled`)."""
        with self._db.unit_of_work() as uow:
            cancelled_by = uow.session.execute(
                update(BuildRow)
                .where(
                    BuildRow.id == build_id,
                    BuildRow.lease_owner == owner,
                    BuildRow.state == RUNNING,
                )
                .values(
                    lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s),
                    progress=progress,
                    log=log,
                )
                .returning(BuildRow.cancelled_by)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            uow.commit()
        if cancelled_by is None:
            return Lease.LOST
        return Lease.OURS if cancelled_by[0] is None else Lease.CANCELLED

    def local_inputs(self, job: ClaimedJob) -> tuple[Path, Path | None]:
        model = self._blobs.local_path(self._db, job.model_digest)
        samples = self._blobs.local_path(self._db, job.sample_digest) if job.sample_digest else None
        return model, samples

    def finish(self, job: ClaimedJob, owner: str, result: BuildResult, log: str) -> bool:
        """Publish a finished job: its candidates, and when one was chosen the
        artifact (and companion, and lighter fallback) blobs with a signed
        manifest, all in one transaction. False if the lease was lost
        (nothing is written)."""
        chosen = result.chosen
        with self._db.unit_of_work() as uow:
            row = uow.session.get(BuildRow, job.build_id)
            if row is None or row.lease_owner != owner or row.state != RUNNING:
                return False
            if row.cancelled_by is not None:
                # Finished before its runner could stop it: cancelled still,
                # as the operator was told.
                row.log = log
                _end_cancelled(row, utcnow())
                uow.commit()
                views = self._views(uow.session, [row])
                self._announce(views)
                return True
            row.candidates = [_candidate_report(e) for e in result.candidates]
            row.log = log
            row.progress = 1.0
            row.finished_at = utcnow()
            row.lease_owner = None
            row.fallback_reason = result.fallback_reason
            if chosen is None:
                row.state = FAILED
                row.error = "no candidate meets the class's constraints: " + "; ".join(
                    f"{e.candidate.name}: {', '.join(e.reasons) or e.error or 'failed'}"
                    for e in result.candidates
                )
            else:
                row.state = SUCCEEDED
                row.error = ""
                row.artifact_digest = self._publish(uow.session, row, chosen, result)
            twins = self._complete_twins(uow.session, row)
            uow.commit()
            views = self._views(uow.session, [row, *twins])
        self._announce(views)
        return True

    @staticmethod
    def _complete_twins(session: Session, row: BuildRow) -> list[BuildRow]:
        """Queued builds with the same dedup key (other classes, same
        profile) take this result instead of building it again; not a
        failure the host's load caused (failed_on_noise): they build."""
        if failed_on_noise(row):
            return []
        twins = list(
            session.scalars(
                select(BuildRow).where(
                    BuildRow.dedup_key == row.dedup_key,
                    BuildRow.state == QUEUED,
                    BuildRow.id != row.id,
                )
            )
        )
        for twin in twins:
            _take_result(session, twin, row)
        return twins

    def fail(self, job: ClaimedJob, owner: str, error: str, log: str) -> None:
        """A job whose worker raised: failed with the reason (not retried —
        the same inputs would fail the same way)."""
        with self._db.unit_of_work() as uow:
            row = uow.session.get(BuildRow, job.build_id)
            if row is None or row.lease_owner != owner:
                return
            if row.cancelled_by is not None:
                row.log = log
                _end_cancelled(row, utcnow())
                uow.commit()
                self._announce(self._views(uow.session, [row]))
                return
            row.state = FAILED
            row.error = error
            row.log = log
            row.finished_at = utcnow()
            row.lease_owner = None
            uow.commit()
            view = self._views(uow.session, [row])[0]
        self._announce([view])

    def _publish(
        self, session: Session, row: BuildRow, chosen: Evaluated, result: BuildResult
    ) -> str:
        """Stage the chosen artifact's blobs and its signed artifact row (with
        the fallback's manifest inside it, when there is one); its digest."""
        mv = session.get_one(ModelVersionRow, row.model_version_id)
        model = session.get_one(ModelRow, mv.model_id)
        candidate = chosen.candidate
        digest, size = self._add_blob(session, row, candidate)
        companion_digest = ""
        if candidate.companion is not None:
            companion_digest = sha256_file(candidate.companion)
            self._blobs.add(session, candidate.companion, companion_digest, "text/x-c")
        manifest = _manifest(row, model.name, mv, chosen, digest, size, companion_digest,
                             result.golden)  # fmt: skip
        fallback = result.fallback
        if fallback is not None:
            fallback_digest, fallback_size = self._add_blob(session, row, fallback.candidate)
            # Its own candidate, bytes, golden samples and memory; what it is
            # for (model, version, class, build, budgets) is the primary's.
            # Only the ONNX or TFLite file ships: a fallback's companion (a
            # TFLite Micro C source) stays on the build host.
            nested = _manifest(row, model.name, mv, fallback, fallback_digest, fallback_size, "",
                               result.fallback_golden)  # fmt: skip
            nested.created_at.CopyFrom(manifest.created_at)
            manifest.fallback_manifest = nested.SerializeToString(deterministic=True)
            row.fallback_digest = fallback_digest
        session.add(
            _signed_artifact(
                session,
                manifest,
                row,
                media_type=candidate.media_type,
                companion_digest=companion_digest or None,
                fallback_digest=row.fallback_digest,
                model_version_id=mv.id,
            )
        )
        return digest

    def _add_blob(self, session: Session, row: BuildRow, candidate: Candidate) -> tuple[str, int]:
        """Stage a candidate's file as a blob; its digest and size."""
        if candidate.path is None:
            raise RuntimeError(f"build {row.id} ships {candidate.name}, which was not built")
        digest = sha256_file(candidate.path)
        self._blobs.add(session, candidate.path, digest, candidate.media_type)
        return digest, candidate.path.stat().st_size

    def _announce(self, views: list[BuildView]) -> None:
        for view in views:
            self._events.publish(FleetEvent("build.updated", subject=view.row.id))
        if any(v.row.state == QUEUED for v in views):
            self.on_queued()


def _end_cancelled(row: BuildRow, now: dt.datetime) -> None:
    row.state = CANCELLED
    row.error = f"cancelled by {row.cancelled_by}"
    row.finished_at = now
    row.lease_owner = None


def _candidate_report(item: Evaluated) -> dict[str, Any]:
    """A candidate as the build row's report stores it (api.convert reads it
    back). Worker-local paths are left out: the workdir is gone after the
    build."""
    built, m = item.candidate, item.measurement
    return {
        "name": built.name,
        "runtime": built.runtime,
        "precision": built.precision,
        "media_type": built.media_type,
        "tensorrt_spec": built.tensorrt_spec.to_json() if built.tensorrt_spec else None,
        "min_runtime_versions": dict(built.min_runtime_versions),
        "size_bytes": m.size_bytes,
        "latency_p50_ms": m.latency_p50_ms,
        "latency_p95_ms": m.latency_p95_ms,
        "peak_memory_mb": m.peak_memory_mb,
        "max_abs_diff": m.max_abs_diff,
        "agreement": m.agreement,
        "accuracy": m.accuracy,
        "fidelity": [score.to_json() for score in m.fidelity],
        "latency_cv": m.latency_cv,
        "latency_p95_over_p50": m.latency_p95_over_p50,
        "latency_measurements": m.latency_measurements,
        "host_load": m.host_load,
        "passed": item.passed,
        "reasons": list(item.reasons),
        # The ladder's (what a TFLite conversion fixed), then the verdict's.
        "notes": [*built.notes, *item.notes],
        "chosen": item.chosen,
        "fallback": item.fallback,
        "error": item.error,
        "accepted_inputs": [t.to_json() for t in built.accepted_inputs],
    }


def _blob_size(session: Session, digest: str | None) -> int:
    blob = session.get(BlobRow, digest) if digest else None
    return blob.size_bytes if blob else 0


def _accepted_inputs(candidate: Candidate, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's input specs with the candidate's own shapes where it has
    them (the registry's order kept)."""
    own = {t.name: t.to_json() for t in candidate.accepted_inputs}
    return [own.get(spec["name"], spec) for spec in inputs]


def _tensor_spec(spec: dict[str, Any]) -> c.TensorSpec:
    return c.TensorSpec(name=spec["name"], dtype=spec["dtype"], shape=spec["shape"],
                        dim_names=spec["dim_names"])  # fmt: skip


def _tensor_data(name: str, array: np.ndarray) -> c.TensorData:
    array = np.ascontiguousarray(array)
    return c.TensorData(
        name=name,
        dtype=array.dtype.name,
        shape=list(array.shape),
        data=array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(),
    )


def _golden(golden: Golden | None) -> list[c.GoldenSample]:
    if golden is None:
        return []
    # Tensors by name, as the worker's golden file listed them before the
    # result carried the arrays: manifests stay byte-for-byte the same.
    return [
        c.GoldenSample(
            inputs=[_tensor_data(name, s.inputs[name]) for name in sorted(s.inputs)],
            expected_outputs=[_tensor_data(name, s.outputs[name]) for name in sorted(s.outputs)],
        )
        for s in golden.samples
    ]


def _result_since_queued(session: Session, row: BuildRow) -> BuildRow | None:
    """A finished build with `row`'s inputs and tools that ran itself (not a
    reuse) and finished after `row` was queued, if any."""
    return session.scalar(
        select(BuildRow)
        .where(
            BuildRow.dedup_key == row.dedup_key,
            BuildRow.id != row.id,
            BuildRow.state.in_((SUCCEEDED, FAILED)),
            BuildRow.reused_from.is_(None),
            BuildRow.finished_at >= row.created_at,
        )
        .order_by(BuildRow.finished_at.desc())
        .limit(1)
    )


def _take_result(session: Session, twin: BuildRow, source: BuildRow) -> None:
    """Complete the queued `twin` with `source`'s result (identical inputs
    and tools), with a manifest of its own when it succeeded."""
    twin.state = source.state
    twin.progress = 1.0
    twin.candidates = source.candidates
    twin.artifact_digest = source.artifact_digest
    twin.fallback_digest = source.fallback_digest
    twin.fallback_reason = source.fallback_reason
    twin.error = source.error
    twin.log = f"reused the result of build {source.id} (identical inputs and tools)"
    twin.reused_from = source.id
    twin.started_at = twin.finished_at = utcnow()
    if twin.state == SUCCEEDED:
        _sign_twin(session, twin)


def _sign_twin(session: Session, twin: BuildRow) -> None:
    """Publish the reused artifact for the twin's class, model or version: the
    source build's manifest with the twin's model name, version, class, build
    and budgets, signed again. Agents check that a manifest names their class
    and the model they were assigned, so twins cannot share the source's."""
    source = session.scalar(select(ArtifactRow).where(ArtifactRow.build_id == twin.reused_from))
    if source is None:
        raise RuntimeError(f"build {twin.reused_from} succeeded without an artifact")
    manifest = c.ArtifactManifest()
    manifest.ParseFromString(source.manifest)
    mv = session.get_one(ModelVersionRow, twin.model_version_id)
    model_name = session.get_one(ModelRow, mv.model_id).name
    created = utcnow()
    _retarget(manifest, twin, model_name, mv, created)
    if manifest.fallback_manifest:
        # Signed as part of the outer one, and what the agent serves when
        # hot: it must name the twin just the same (issue 18, finding 2).
        nested = c.ArtifactManifest.FromString(manifest.fallback_manifest)
        _retarget(nested, twin, model_name, mv, created)
        manifest.fallback_manifest = nested.SerializeToString(deterministic=True)
    session.add(
        _signed_artifact(
            session,
            manifest,
            twin,
            media_type=source.media_type,
            companion_digest=source.companion_digest,
            fallback_digest=source.fallback_digest,
            model_version_id=twin.model_version_id,
        )
    )


def _retarget(
    manifest: c.ArtifactManifest,
    build: BuildRow,
    model_name: str,
    mv: ModelVersionRow,
    created: dt.datetime,
) -> None:
    """Make `manifest` name what `build` publishes it for: model, version,
    class, build, time and the class's budgets. Every such field is the
    build's own: the source may be another model's version with the same
    bytes, and a device serves (and reports) a model under the name its
    manifest gives."""
    manifest.model_name = model_name
    manifest.model_version = mv.version
    manifest.class_name = build.class_name
    manifest.build_id = build.id
    manifest.created_at.FromDatetime(created)
    manifest.latency_budget_p95_ms = build.target.get("latency_budget_p95_ms") or 0.0
    manifest.max_memory_mb = build.target.get("max_memory_mb") or 0.0
    manifest.threads = int(build.target.get("threads") or 1)


def _signed_artifact(
    session: Session,
    manifest: c.ArtifactManifest,
    build: BuildRow,
    *,
    media_type: str,
    companion_digest: str | None,
    fallback_digest: str | None,
    model_version_id: str,
) -> ArtifactRow:
    """The artifact row of `build`, with `manifest` signed by the active key."""
    data = manifest.SerializeToString(deterministic=True)
    key = signing_key(session)
    return ArtifactRow(
        id=secrets.new_id(),
        digest=manifest.sha256,
        media_type=media_type,
        size_bytes=manifest.size_bytes,
        companion_digest=companion_digest,
        fallback_digest=fallback_digest,
        manifest=data,
        signature=signing.sign(key.private_key, data),
        key_id=key.key_id,
        build_id=build.id,
        model_version_id=model_version_id,
        class_name=build.class_name,
    )


def _manifest(
    row: BuildRow,
    model_name: str,
    mv: ModelVersionRow,
    shipped: Evaluated,
    digest: str,
    size: int,
    companion_digest: str,
    golden: Golden | None,
) -> c.ArtifactManifest:
    """The manifest of one shipped candidate (the chosen one, or the
    fallback) of `row`'s build."""
    candidate = shipped.candidate
    created = Timestamp()
    created.FromDatetime(utcnow())
    manifest = c.ArtifactManifest(
        format_version=MANIFEST_FORMAT,
        model_name=model_name,
        model_version=mv.version,
        class_name=row.class_name,
        runtime=RUNTIME_ENUM[candidate.runtime],
        precision=PRECISION_ENUM.get(candidate.precision, c.QUANTIZATION_UNSPECIFIED),
        candidate=candidate.name,
        sha256=digest,
        size_bytes=size,
        media_type=candidate.media_type,
        # A TFLite artifact takes the shapes it was converted with (a device
        # checks requests against them), not every shape the ONNX model takes.
        inputs=[_tensor_spec(s) for s in _accepted_inputs(candidate, mv.inputs)],
        outputs=[_tensor_spec(s) for s in mv.outputs],
        golden=_golden(golden),
        atol=golden.atol if golden else 0.0,
        rtol=golden.rtol if golden else 0.0,
        min_agreement=golden.min_agreement if golden else 0.0,
        min_runtime_versions=candidate.min_runtime_versions,
        build_id=row.id,
        created_at=created,
        companion_sha256=companion_digest,
        latency_budget_p95_ms=row.target.get("latency_budget_p95_ms") or 0.0,
        max_memory_mb=row.target.get("max_memory_mb") or 0.0,
        threads=int(row.target.get("threads") or 1),
        # What a device's memory budget adds up (services/deployments.py):
        # the candidate's peak as the build measured it.
        memory_mb=shipped.measurement.peak_memory_mb,
        output_specs=[spec_to_wire(spec) for spec in golden.outputs] if golden else [],
        min_fidelity=golden.min_fidelity if golden else 0.0,
    )
    if candidate.tensorrt_spec is not None:
        manifest.tensorrt.CopyFrom(_tensorrt_spec(candidate.tensorrt_spec))
    return manifest


def _tensorrt_spec(spec: TensorRTSpec) -> c.TensorRTBuildSpec:
    return c.TensorRTBuildSpec(
        precision=spec.precision,
        workspace_mb=spec.workspace_mb,
        profile=[
            c.TensorRTBuildSpec.ShapeRange(input=r.input, min=r.min, opt=r.opt, max=r.max)
            for r in spec.profile
        ],
    )
