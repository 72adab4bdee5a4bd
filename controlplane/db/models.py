"""SQLAlchemy 2.0 models. The schema is created only by the Alembic migrations
in migrations/; tests check that the two agree."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSONType}


class OperatorTokenRow(Base):
    __tablename__ = "operator_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]


class EnrollmentTokenRow(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[str] = mapped_column(String(64))
    policy: Mapped[str] = mapped_column(String(16))
    labels: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    max_uses: Mapped[int] = mapped_column(Integer, default=0)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    created_by: Mapped[str] = mapped_column(String(200))


class DeviceClassRow(Base):
    __tablename__ = "device_classes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    max_model_size_mb: Mapped[float | None] = mapped_column(Float)
    latency_budget_p95_ms: Mapped[float | None] = mapped_column(Float)
    max_memory_mb: Mapped[float | None] = mapped_column(Float)
    runtime: Mapped[str] = mapped_column(String(16))
    quantization: Mapped[str] = mapped_column(String(8))
    accelerator: Mapped[str] = mapped_column(String(32), default="")
    min_accuracy_retention: Mapped[float | None] = mapped_column(Float)
    threads: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    speed_factor: Mapped[float] = mapped_column(Float, default=1.0, server_default="1.0")
    microcontroller: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Budget for the sum of the models' measured memory on one device (0010).
    device_memory_mb: Mapped[float | None] = mapped_column(Float)
    # Precision of the lighter fallback artifact builds add ("": none; 0011).
    fallback: Mapped[str] = mapped_column(String(8), default="", server_default="")
    match_rules: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # Delivery (0017, domain/delivery.py): the class's own mirrors, in order,
    # and its download rate cap in bytes/s (0: none).
    artifact_mirrors: Mapped[list[str]] = mapped_column(JSONType, default=list, server_default="[]")
    max_download_rate: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Input name -> the static shape TFLite builds fix its dynamic
    # dimensions to (0018, a build constraint).
    input_shapes: Mapped[dict[str, list[int]]] = mapped_column(
        JSONType, default=dict, server_default="{}"
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hardware_id: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    labels: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    hardware: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    runtime: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    class_id: Mapped[str | None] = mapped_column(
        ForeignKey("device_classes.id", ondelete="SET NULL"), index=True
    )
    class_pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    credential_hash: Mapped[str] = mapped_column(String(64))
    enrollment_token_id: Mapped[str | None] = mapped_column(
        ForeignKey("enrollment_tokens.id", ondelete="SET NULL")
    )
    enrolled_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[dt.datetime | None]
    # Bumped whenever anything in the device's desired state changes; agents
    # apply only newer revisions.
    desired_revision: Mapped[int] = mapped_column(BigInteger, default=1)
    applied_revision: Mapped[int] = mapped_column(BigInteger, default=0)
    # Per model: model name -> the agent's last UpdateStatus for it, as a
    # dict (convert.update_status_to_dict; migration 0010 keyed the single
    # status of before by its model name).
    update_status: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # The sync protocol its agent last said hello with (Hello.protocol); 0
    # until it connects. Below 2 it holds one model (services/deployments.py).
    agent_protocol: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    # The last assignment sequence handed out; assignments count up from 1.
    assignment_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The client certificate issued at enrollment or the last renewal, and
    # the one before it (still valid while the agent switches channels). A
    # certificate with any other serial is refused even if it has not expired:
    # re-enrolling revokes every earlier certificate of the device.
    cert_serial: Mapped[str | None] = mapped_column(String(40))
    cert_previous_serial: Mapped[str | None] = mapped_column(String(40))
    cert_not_after: Mapped[dt.datetime | None]


class BlobRow(Base):
    """A content-addressed file in the blob store, by sha256. Its bytes live
    in the blob store's directory (services/blobstore.py), not in SQL (0016);
    the file is there before the transaction inserting this row commits."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    # Sort key for semver ordering (zero-padded major.minor.patch + prerelease).
    version_sort: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    model_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    inputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    outputs: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    opset: Mapped[int] = mapped_column(Integer)
    producer: Mapped[str] = mapped_column(String(200), default="")
    sample_data_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"))
    sample_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sample_count: Mapped[int] = mapped_column(Integer, default=0)
    sample_has_labels: Mapped[bool] = mapped_column(Boolean, default=False)
    labels_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"))
    labels_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200))
    # Yanked (0015): assignments and rollouts of it are refused; what is
    # deployed stays. Null yanked_at: not yanked.
    yanked_at: Mapped[dt.datetime | None]
    yanked_by: Mapped[str] = mapped_column(String(200), default="", server_default="")
    yank_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Set by its first assignment to a device (0015): assignments are
    # replaced and removed, so the current ones cannot tell whether a
    # version was ever deployed, and only a never-deployed one may be deleted.
    first_assigned_at: Mapped[dt.datetime | None]
    # Every output's kind (edgefleet.fidelity.OutputSpec.to_json), declared
    # at push or inferred (0018), and the version's own fidelity floor
    # (null: the class's).
    output_specs: Mapped[list[dict[str, Any]]] = mapped_column(
        JSONType, default=list, server_default="[]"
    )
    min_fidelity: Mapped[float | None] = mapped_column(Float)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str] = mapped_column(String(200), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)


class CertificateAuthorityRow(Base):
    """The CA that issues device client certificates and the replicas' server
    certificates. In SQL, like the signing keys, so every replica is the same
    authority."""

    __tablename__ = "certificate_authorities"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    certificate_pem: Mapped[bytes] = mapped_column(LargeBinary)
    private_key_pem: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SigningKeyRow(Base):
    """The control plane's ed25519 manifest-signing keys. Stored in SQL so all
    replicas sign with the same key: database access implies key access."""

    __tablename__ = "signing_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    private_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    retired_at: Mapped[dt.datetime | None]


class SigningKeyRotationRow(Base):
    """One signing-key rotation: the serialized KeyRotationStatement naming the
    new key, signed by the key it replaces. Agents walk the chain (oldest
    first) from whatever key they trust to the current one."""

    __tablename__ = "signing_key_rotations"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    previous_key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"), index=True)
    statement: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    rotated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    rotated_by: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, default="")


class BuildRow(Base):
    __tablename__ = "builds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    class_id: Mapped[str | None] = mapped_column(
        ForeignKey("device_classes.id", ondelete="SET NULL"), index=True
    )
    # Kept when the class is deleted; the build's target profile as built.
    class_name: Mapped[str] = mapped_column(String(100))
    target: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # queued | running | succeeded | failed | cancelled
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    log: Mapped[str] = mapped_column(Text, default="")
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    artifact_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"))
    # The lighter fallback artifact (0011): its digest, or why the class
    # asked for one and there is none. No foreign key, unlike the artifact's:
    # adding one makes SQLite rebuild the table, and dropping the old table
    # would cascade into artifacts and assignments. The blob is written in
    # the same transaction as this row (services/builds.py).
    fallback_digest: Mapped[str | None] = mapped_column(String(64))
    fallback_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    error: Mapped[str] = mapped_column(Text, default="")
    # sha256 of model bytes + target profile + toolchain versions.
    dedup_key: Mapped[str] = mapped_column(String(64), index=True)
    reused_from: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Who cancelled it (0015); while it is still running, its runner has
    # yet to stop it.
    cancelled_by: Mapped[str | None] = mapped_column(String(200))
    # Which replica runs it, until when; an expired lease means the runner died.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    # One row per build: identical bytes can ship to classes with different
    # runtimes (an fp16 ONNX for onnxruntime and for TensorRT), and each
    # needs its own signed manifest.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    media_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # A file shipped beside the artifact (the TFLite Micro C source).
    companion_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), index=True)
    # The lighter fallback artifact shipped with it (0011); its manifest is
    # inside this one's (ArtifactManifest.fallback_manifest). No foreign key,
    # as for builds.fallback_digest.
    fallback_digest: Mapped[str | None] = mapped_column(String(64), index=True)
    # The serialized ArtifactManifest exactly as signed, and its signature.
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(ForeignKey("signing_keys.id"))
    build_id: Mapped[str] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"), unique=True)
    model_version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    class_name: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TelemetryRow(Base):
    """One agent telemetry sample: one interval of one model version on one
    device. Unique on (device_id, seq): agents resend what was not acked
    (services/telemetry.py skips seqs at or below the device's highest).
    `at_ms` is integer epoch milliseconds (UTC) so that time bucketing is the
    same integer arithmetic on SQLite and PostgreSQL, and the index is compact."""

    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        Index("ix_telemetry_at_ms", "at_ms"),
        Index("ix_telemetry_device_id_at_ms", "device_id", "at_ms"),
        Index("ix_telemetry_model_at_ms", "model_name", "model_version", "at_ms"),
        Index("ix_telemetry_class_name_at_ms", "class_name", "at_ms"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(64))
    # The device's class when the sample arrived (classes change; history does not).
    class_name: Mapped[str] = mapped_column(String(100))
    request_count: Mapped[int] = mapped_column(BigInteger)
    error_count: Mapped[int] = mapped_column(BigInteger)
    timeout_count: Mapped[int] = mapped_column(BigInteger)
    dropped_samples: Mapped[int] = mapped_column(BigInteger)
    latency_p50_ms: Mapped[float] = mapped_column(Float)
    latency_p95_ms: Mapped[float] = mapped_column(Float)
    latency_p99_ms: Mapped[float] = mapped_column(Float)
    latency_max_ms: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[float] = mapped_column(Float)
    cpu_percent: Mapped[float] = mapped_column(Float)
    # System-wide figures and the power/thermal policy's state (migration
    # 0005); server defaults fill the rows stored before.
    system_memory_percent: Mapped[float] = mapped_column(Float, server_default="0")
    temperature_c: Mapped[float | None] = mapped_column(Float)
    battery_percent: Mapped[float | None] = mapped_column(Float)
    power_mode: Mapped[str] = mapped_column(String(32), server_default="")
    concurrency_limit: Mapped[int] = mapped_column(Integer, server_default="0")
    shadow_version: Mapped[str] = mapped_column(String(64), server_default="")
    shadow_requests: Mapped[int] = mapped_column(BigInteger, server_default="0")
    shadow_agreement: Mapped[float] = mapped_column(Float, server_default="0")
    shadow_max_diff: Mapped[float] = mapped_column(Float, server_default="0")
    shadow_latency_p95_ms: Mapped[float] = mapped_column(Float, server_default="0")
    # Which artifact of the version served at the end of the interval
    # ("primary", "fallback"; "": the agent did not say) and how many of
    # request_count the lighter fallback served (0011).
    variant: Mapped[str] = mapped_column(String(16), server_default="")
    fallback_request_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The memory the model adds to the agent (MB), measured at load as the
    # build host measures a candidate: what rollout memory gates compare
    # with the class's max_memory_mb (memory_mb is the agent's whole RSS);
    # 0: not measured (0013).
    model_memory_mb: Mapped[float] = mapped_column(Float, server_default="0")


class DeviceAssignmentRow(Base):
    """A model artifact a device should run now: at most one per (device,
    model). Replaced (never edited) by a new assignment of that model with
    the device's next sequence; the device's other models are untouched."""

    __tablename__ = "device_assignments"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    # The model (of model_version_id), part of the key: one row per model.
    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    # Monotonic per device over all its models (devices.assignment_seq);
    # agents refuse one at or below the highest they verified for the model.
    sequence: Mapped[int] = mapped_column(BigInteger)
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"))
    model_version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    # Set when a rollout made the assignment (issue 5).
    rollout_id: Mapped[str | None] = mapped_column(String(32), index=True)
    # Load beside the active model and compare; do not activate.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    assigned_by: Mapped[str] = mapped_column(String(200))
    assigned_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # The signed AssignmentStatement agents act on (services/statements.py),
    # stored so every replica pushes the same bytes; signed again with the
    # new key on a rotation. Empty for assignments made before 0009.
    statement: Mapped[bytes] = mapped_column(LargeBinary, default=b"", server_default="")
    statement_signature: Mapped[bytes] = mapped_column(LargeBinary, default=b"", server_default="")
    # Going back to an older version than the device had (also in the statement).
    rollback: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The key that signed the statement: part of the push path's cache keys,
    # so a rotation on another replica cannot leave a stale signature cached.
    key_id: Mapped[str | None] = mapped_column(String(32))


class DeploymentEventRow(Base):
    """One update state a device's agent reported for an assignment: the
    per-device deployment history."""

    __tablename__ = "deployment_events"
    __table_args__ = (Index("ix_deployment_events_device_id_id", "device_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(BigInteger)
    rollout_id: Mapped[str | None] = mapped_column(String(32), index=True)
    model_name: Mapped[str] = mapped_column(String(100))
    model_version: Mapped[str] = mapped_column(String(64))
    artifact_digest: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class TelemetryRollupRow(Base):
    """Telemetry older than the raw retention: one row per hour, device, model
    version and class. The rollup job moves raw rows here (aggregate, then
    delete, in one transaction), so each sample counts in exactly one table.

    Sums are exact. Percentiles cannot be merged exactly: latency_pXX_ms is the
    request-weighted mean of the samples' percentiles (an estimate of the
    hour's percentile), and max_latency_pXX_ms the largest sample percentile,
    which is what queries aggregate (the same MAX as over raw rows, so a query
    gives the same answer before and after a roll-up). latency_max_ms is the
    max of the maxima (exact)."""

    __tablename__ = "telemetry_rollups"
    __table_args__ = (
        Index("ix_telemetry_rollups_hour_ms", "hour_ms"),
        Index("ix_telemetry_rollups_model_hour_ms", "model_name", "model_version", "hour_ms"),
        Index("ix_telemetry_rollups_class_name_hour_ms", "class_name", "hour_ms"),
    )

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    # Start of the hour, integer epoch milliseconds (UTC), like telemetry.at_ms.
    hour_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    class_name: Mapped[str] = mapped_column(String(100), primary_key=True)
    sample_count: Mapped[int] = mapped_column(BigInteger)
    request_count: Mapped[int] = mapped_column(BigInteger)
    error_count: Mapped[int] = mapped_column(BigInteger)
    timeout_count: Mapped[int] = mapped_column(BigInteger)
    dropped_samples: Mapped[int] = mapped_column(BigInteger)
    latency_p50_ms: Mapped[float] = mapped_column(Float)
    latency_p95_ms: Mapped[float] = mapped_column(Float)
    latency_p99_ms: Mapped[float] = mapped_column(Float)
    max_latency_p50_ms: Mapped[float] = mapped_column(Float)
    max_latency_p95_ms: Mapped[float] = mapped_column(Float)
    max_latency_p99_ms: Mapped[float] = mapped_column(Float)
    latency_max_ms: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[float] = mapped_column(Float)  # max
    cpu_percent: Mapped[float] = mapped_column(Float)  # mean over the samples
    system_memory_percent: Mapped[float] = mapped_column(Float)  # max
    temperature_c: Mapped[float | None] = mapped_column(Float)  # max
    battery_percent: Mapped[float | None] = mapped_column(Float)  # min
    # Samples taken while the power/thermal policy limited inference, and the
    # tightest concurrency limit it set (None: never limited).
    limited_samples: Mapped[int] = mapped_column(BigInteger)
    min_concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    # Requests the lighter fallback artifact served (0011; a sum, like
    # request_count). Which artifact served at each sample's end is not kept.
    fallback_request_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    model_memory_mb: Mapped[float] = mapped_column(Float, server_default="0")  # max (0013)


class TelemetryWatermarkRow(Base):
    """Per device, the highest telemetry seq rolled up (its raw row deleted):
    raw rows alone no longer show it, yet the agent must still be acked past
    it and a late resend of it must not be stored twice."""

    __tablename__ = "telemetry_watermarks"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    max_seq: Mapped[int] = mapped_column(BigInteger)


class RolloutRow(Base):
    """A staged rollout of one model version to a cohort. The orchestrator
    drives it from this row alone (no in-memory state), so any replica can
    take over: it holds a lease while it does."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    # The RolloutSpec, as plain JSON (rollouts.py reads and writes it).
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # draft | scheduled | running | waiting_approval | paused | succeeded | aborted
    # domain.rollout_states.RolloutState's values ("succeeded_with_failures":
    # 23 characters). Still 20 on SQLite, which does not enforce lengths and
    # could widen it only by rebuilding the table (migration 0012).
    state: Mapped[str] = mapped_column(String(32).with_variant(String(20), "sqlite"), index=True)
    current_stage: Mapped[int] = mapped_column(Integer, default=0)
    # Per stage: started_at, bake_started_at, finished_at, acknowledged counts,
    # verdict and reason.
    stages: Mapped[list[dict[str, Any]]] = mapped_column(JSONType, default=list)
    # The cohort's devices left out when the rollout was planned, and why:
    # [{"device_id", "name", "reason"}], kept so `rollouts show` can answer
    # "why is my device not in it?" later.
    excluded: Mapped[list[dict[str, Any]]] = mapped_column(
        JSONType, default=list, server_default="[]"
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    # Set by abort: "revert" (every device that took the version goes back) or "keep".
    abort_mode: Mapped[str] = mapped_column(String(10), default="")
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    start_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    # When notifying started (a ramp counts from here).
    notify_started_at: Mapped[dt.datetime | None]
    # A fixed rate's next device is due then (domain.rollouts.rate_allowance).
    paced_until: Mapped[dt.datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None]
    # Bumped by operator actions that change members (retry, skip, resume,
    # approving a shadow stage): the orchestrator's copy of the members is
    # then stale, and it reads them again.
    members_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RolloutDeviceRow(Base):
    """One device's part in a rollout."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_device_id_state", "device_id", "state"),)

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    class_name: Mapped[str] = mapped_column(String(100))
    stage: Mapped[int] = mapped_column(Integer)
    # domain.rollout_states.MemberState's values.
    state: Mapped[str] = mapped_column(String(20))
    # A failure (or result) a resume acknowledged: out of the stage's success
    # denominator and error rate from then on; a retry clears it.
    acknowledged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The assignment sequence this rollout gave the device (0: none yet).
    sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    notified_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    # Not before this time (a retry's backoff).
    next_attempt_at: Mapped[dt.datetime | None]
    # What the device was assigned before, to revert to (None: nothing).
    previous_model_version_id: Mapped[str | None] = mapped_column(String(32))
