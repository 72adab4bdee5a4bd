"""Conversions between protobuf messages and domain values. Nothing else."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet import update_state
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    AuditRow,
    DeploymentEventRow,
    EnrollmentTokenRow,
    ModelVersionRow,
    SigningKeyRow,
)
from edgefleet.controlplane.domain import rules
from edgefleet.controlplane.domain.rollout_spec import PacingSpec, RolloutSpec, StageSpec
from edgefleet.controlplane.domain.rollout_states import (
    FAILED_STATES,
    MemberState,
    RolloutState,
    StagePhase,
    StageState,
    read_stages,
)
from edgefleet.controlplane.domain.rollouts import Gates
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services.audit import AuditSearch
from edgefleet.controlplane.services.builds import BuildView
from edgefleet.controlplane.services.classes import (
    ClassView,
    Constraints,
    MatchReport,
    input_shapes_of,
)
from edgefleet.controlplane.services.deployments import AssignmentView
from edgefleet.controlplane.services.devices import DeviceView
from edgefleet.controlplane.services.operator_tokens import OperatorTokenView
from edgefleet.controlplane.services.registry import ModelSummary
from edgefleet.controlplane.services.rollouts import Plan, RolloutView
from edgefleet.controlplane.services.telemetry import FALLBACK, PRIMARY, Sample, Series
from edgefleet.controlplane.wire import rule_to_pb
from edgefleet.fidelity import OutputScore, OutputSpec
from edgefleet.fidelity_wire import UnknownKind, score_to_wire, spec_from_wire, spec_to_wire
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import operator_pb2 as o

DEVICE_STATES = {
    "pending": c.DEVICE_STATE_PENDING,
    "accepted": c.DEVICE_STATE_ACCEPTED,
    "rejected": c.DEVICE_STATE_REJECTED,
    "decommissioned": c.DEVICE_STATE_DECOMMISSIONED,
}
DEVICE_STATE_NAMES = {v: k for k, v in DEVICE_STATES.items()}
RUNTIMES = {
    "onnxruntime": c.RUNTIME_ONNXRUNTIME,
    "tflite": c.RUNTIME_TFLITE,
    "tensorrt": c.RUNTIME_TENSORRT,
}
RUNTIME_NAMES = {v: k for k, v in RUNTIMES.items()}
QUANTIZATIONS = {
    "fp32": c.QUANTIZATION_FP32,
    "fp16": c.QUANTIZATION_FP16,
    "int8": c.QUANTIZATION_INT8,
    "auto": c.QUANTIZATION_AUTO,
}
QUANTIZATION_NAMES = {v: k for k, v in QUANTIZATIONS.items()}
POLICIES = {"auto-accept": o.ENROLLMENT_POLICY_AUTO_ACCEPT, "pending": o.ENROLLMENT_POLICY_PENDING}
POLICY_NAMES = {v: k for k, v in POLICIES.items()}
PART_NAMES = {
    o.MODEL_PART_MODEL: "model",
    o.MODEL_PART_SAMPLE_DATA: "sample_data",
    o.MODEL_PART_LABELS: "labels",
}


def ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_ts(stamp: Timestamp) -> dt.datetime:
    return stamp.ToDatetime(tzinfo=dt.UTC)


def datetime_from_pb(stamp: Timestamp, what: str) -> dt.datetime:
    """A request's Timestamp as a UTC datetime, INVALID_ARGUMENT if it is
    outside what a datetime holds (protobuf lets a client send any int64)."""
    try:
        return from_ts(stamp)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{what} is not a valid time: {exc}") from None


def timedelta_from_pb(duration: Duration, what: str) -> dt.timedelta:
    """A request's Duration as a timedelta, INVALID_ARGUMENT if it is outside
    what a timedelta holds (an int64 of seconds is not)."""
    try:
        return duration.ToTimedelta()
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{what} is not a valid duration: {exc}") from None


# ---------------------------------------------------------------- device facts

_HW_SCALARS = (
    "os",
    "os_release",
    "arch",
    "cpu_model",
    "cpu_cores",
    "memory_mb",
    "disk_total_mb",
    "disk_free_mb",
    "hostname",
    "board_model",
)
_ACC_FIELDS = ("kind", "name", "memory_mb", "driver_version", "compute_capability")
_RT_FIELDS = (
    "python_version",
    "agent_version",
    "onnxruntime_version",
    "litert_version",
    "litert_package",
    "tensorrt_version",
)


def hardware_to_dict(msg: c.HardwareProfile) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(msg, k) for k in _HW_SCALARS}
    out["accelerators"] = [{k: getattr(a, k) for k in _ACC_FIELDS} for a in msg.accelerators]
    return out


def hardware_to_pb(data: dict[str, Any]) -> c.HardwareProfile:
    msg = c.HardwareProfile(**{k: data[k] for k in _HW_SCALARS if k in data})
    for acc in data.get("accelerators", []):
        msg.accelerators.add(**{k: acc[k] for k in _ACC_FIELDS if k in acc})
    return msg


def runtime_to_dict(msg: c.RuntimeFingerprint) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(msg, k) for k in _RT_FIELDS}
    out["onnxruntime_providers"] = list(msg.onnxruntime_providers)
    return out


def runtime_to_pb(data: dict[str, Any]) -> c.RuntimeFingerprint:
    msg = c.RuntimeFingerprint(**{k: data[k] for k in _RT_FIELDS if k in data})
    msg.onnxruntime_providers.extend(data.get("onnxruntime_providers", []))
    return msg


def update_status_to_dict(msg: c.UpdateStatus) -> dict[str, Any]:
    """An agent's status as stored (devices.update_status): the state by
    name ("" for one this build does not know), from the enum or a
    protocol-1 agent's legacy string."""
    return {
        "state": update_state.of_status(msg),
        "model_name": msg.model_name,
        "model_version": msg.model_version,
        "artifact_digest": msg.artifact_digest,
        "bytes_done": msg.bytes_done,
        "bytes_total": msg.bytes_total,
        "reason": msg.reason,
        "sequence": msg.sequence,
        "rollout_id": msg.rollout_id,
        "active_model_version": msg.active_model_version,
        "active_artifact_digest": msg.active_artifact_digest,
        "download_source": msg.download_source,
        "download_rate": msg.download_rate,
    }


_STATUS_FIELDS = (
    "model_name", "model_version", "artifact_digest", "bytes_done", "bytes_total", "reason",
    "sequence", "rollout_id", "active_model_version", "active_artifact_digest",
    "download_source", "download_rate",
)  # fmt: skip


def update_status_to_pb(status: dict[str, Any]) -> c.UpdateStatus:
    """A stored status (update_status_to_dict) as the wire's: the state as
    the enum; the legacy string stays empty."""
    msg = c.UpdateStatus(**{k: status[k] for k in _STATUS_FIELDS if k in status})
    msg.state = update_state.to_wire(str(status.get("state", "")))
    return msg


# ---------------------------------------------------------------- deployments


def assignment_to_pb(
    view: AssignmentView,
    artifact_url: str = "",
    mirrors: tuple[str, ...] = (),
    max_download_rate: int = 0,
) -> d.Assignment:
    """What the agent gets in its desired state, with where to fetch the
    artifact: `mirrors` (base URLs) in order, then `artifact_url` (the
    control plane's artifact downloads over HTTP, scheme://host:port), and
    the class's cap on the download's rate (bytes/s, 0: none)."""
    sources = [d.ArtifactSource(base_url=m) for m in mirrors]
    if artifact_url:
        sources.append(
            d.ArtifactSource(base_url=f"{artifact_url}/v1/artifacts", control_plane=True)
        )
    return d.Assignment(
        rollout_id=view.rollout_id,
        model_name=view.model_name,
        model_version=view.model_version,
        artifact_digest=view.artifact_digest,
        artifact_size=view.artifact_size,
        runtime=RUNTIMES.get(view.runtime, c.RUNTIME_UNSPECIFIED),
        manifest=view.manifest,
        manifest_signature=view.manifest_signature,
        sequence=view.sequence,
        shadow=view.shadow,
        statement=view.statement,
        statement_signature=view.statement_signature,
        rollback=view.rollback,
        sources=sources,
        max_download_rate=max_download_rate,
    )


def device_assignment_to_pb(view: AssignmentView) -> o.DeviceAssignment:
    """What operators see of an assignment."""
    return o.DeviceAssignment(
        device_id=view.device_id,
        class_name=view.class_name,
        model_name=view.model_name,
        model_version=view.model_version,
        artifact_digest=view.artifact_digest,
        artifact_size=view.artifact_size,
        sequence=view.sequence,
        rollout_id=view.rollout_id,
        assigned_at=ts(view.assigned_at),
        assigned_by=view.assigned_by,
    )


def deployment_event_to_pb(row: DeploymentEventRow) -> o.DeploymentEvent:
    return o.DeploymentEvent(
        device_id=row.device_id,
        sequence=row.sequence,
        model_name=row.model_name,
        model_version=row.model_version,
        artifact_digest=row.artifact_digest,
        state=update_state.to_wire(row.state),
        reason=row.reason,
        bytes_done=row.bytes_done,
        bytes_total=row.bytes_total,
        at=ts(row.at),
        rollout_id=row.rollout_id or "",
    )


def device_to_pb(view: DeviceView) -> c.Device:
    """The device with every model assigned to it or reported by its agent
    (by name), and `update` the most recently reported model's status."""
    row = view.row
    statuses = statuses_by_model(row.update_status)
    assigned = {a.model_name: a for a in view.assignments}
    models = []
    for name in sorted(set(statuses) | set(assigned)):
        model = c.DeviceModel(model_name=name)
        if (a := assigned.get(name)) is not None:
            model.assigned_version = a.model_version
            model.sequence = a.sequence
            model.rollout_id = a.rollout_id
            model.shadow = a.shadow
        if name in statuses:
            model.status.CopyFrom(update_status_to_pb(statuses[name]))
        models.append(model)
    latest = max(statuses.values(), key=lambda s: str(s.get("updated_at", "")), default=None)
    return c.Device(
        id=row.id,
        hardware_id=row.hardware_id,
        name=row.name,
        state=DEVICE_STATES.get(row.state, c.DEVICE_STATE_UNSPECIFIED),
        labels=row.labels,
        hardware=hardware_to_pb(row.hardware),
        runtime=runtime_to_pb(row.runtime),
        class_id=row.class_id or "",
        class_name=view.class_name,
        class_pinned=row.class_pinned,
        online=view.online,
        last_seen_at=ts(row.last_seen_at),
        enrolled_at=ts(row.enrolled_at),
        desired_revision=row.desired_revision,
        applied_revision=row.applied_revision,
        update=update_status_to_pb(latest) if latest is not None else None,
        models=models,
        agent_protocol=row.agent_protocol,
    )


def statuses_by_model(stored: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """devices.update_status: model name -> status (what is not a status
    dict is skipped rather than fail a listing)."""
    return {k: v for k, v in (stored or {}).items() if isinstance(v, dict)}


# ---------------------------------------------------------------- classes


def enum_name(names: dict[Any, str], number: int, what: str) -> str:
    """An enum value's name; INVALID_ARGUMENT for a number this server does
    not know (proto3 enums are open: any int32 arrives)."""
    if number not in names:
        raise InvalidArgument(f"unknown {what} {number}: one of {', '.join(names.values())}")
    return names[number]


# The class limits a 0 removes (none of them can be 0 otherwise).
CLEARED_BY_ZERO = (
    "max_model_size_mb",
    "latency_budget_p95_ms",
    "max_memory_mb",
    "device_memory_mb",
)


def constraint_changes(msg: c.ConstraintProfile) -> dict[str, Any]:
    """The constraint fields present in a message (for partial updates)."""
    changes: dict[str, Any] = {}
    for name in (
        "max_model_size_mb",
        "latency_budget_p95_ms",
        "max_memory_mb",
        "min_accuracy_retention",
        "threads",
        "speed_factor",
        "microcontroller",
        "device_memory_mb",
    ):
        if msg.HasField(name):
            changes[name] = getattr(msg, name)
    for name in CLEARED_BY_ZERO:
        # A limit of 0 is no limit: how an update removes one it set.
        if changes.get(name) == 0:
            changes[name] = None
    if msg.runtime != c.RUNTIME_UNSPECIFIED:
        changes["runtime"] = enum_name(RUNTIME_NAMES, msg.runtime, "runtime")
    if msg.quantization != c.QUANTIZATION_UNSPECIFIED:
        changes["quantization"] = enum_name(QUANTIZATION_NAMES, msg.quantization, "quantization")
    if msg.accelerator:
        changes["accelerator"] = msg.accelerator
    if msg.input_shapes:
        # Replaces the class's shapes (an update clears them by name).
        changes["input_shapes"] = tuple(
            sorted((shape.name, tuple(shape.dims)) for shape in msg.input_shapes)
        )
    if msg.HasField("fallback"):
        # UNSPECIFIED set explicitly: no fallback (drops one in an update).
        changes["fallback"] = (
            ""
            if msg.fallback == c.QUANTIZATION_UNSPECIFIED
            else enum_name(QUANTIZATION_NAMES, msg.fallback, "fallback")
        )
    return changes


def constraints_from_pb(msg: c.ConstraintProfile) -> Constraints:
    changes = constraint_changes(msg)
    if "runtime" not in changes:
        raise InvalidArgument("a device class needs a runtime: onnxruntime, tflite or tensorrt")
    changes.setdefault("quantization", "auto")
    return Constraints(**changes)


def class_to_pb(view: ClassView) -> c.DeviceClass:
    row = view.row
    return c.DeviceClass(
        id=row.id,
        name=row.name,
        description=row.description,
        priority=row.priority,
        constraints=c.ConstraintProfile(
            max_model_size_mb=row.max_model_size_mb,
            latency_budget_p95_ms=row.latency_budget_p95_ms,
            max_memory_mb=row.max_memory_mb,
            runtime=RUNTIMES[row.runtime],
            quantization=QUANTIZATIONS[row.quantization],
            accelerator=row.accelerator,
            min_accuracy_retention=row.min_accuracy_retention,
            threads=row.threads,
            speed_factor=row.speed_factor,
            microcontroller=row.microcontroller,
            device_memory_mb=row.device_memory_mb,
            fallback=QUANTIZATIONS[row.fallback] if row.fallback else None,
            input_shapes=[
                c.InputShape(name=name, dims=dims) for name, dims in input_shapes_of(row)
            ],
        ),
        match_rules=[rule_to_pb(r) for r in rules.rules_from_json(row.match_rules)],
        device_count=view.device_count,
        created_at=ts(row.created_at),
        updated_at=ts(row.updated_at),
        match_report=match_report_to_pb(view.report) if view.report else None,
        artifact_mirrors=row.artifact_mirrors or [],
        max_download_rate=row.max_download_rate or 0,
    )


def match_report_to_pb(report: MatchReport) -> c.RuleMatchReport:
    return c.RuleMatchReport(
        matching=report.matching,
        pinned_elsewhere=report.pinned_elsewhere,
        outranked=report.outranked,
        fleet=report.fleet,
        unclassified=report.unclassified,
        misses=[c.RuleMiss(rule=rule_to_pb(m.rule), seen=m.seen) for m in report.misses],
    )


# ---------------------------------------------------------------- tokens, models, audit


OPERATOR_ROLES = {
    "viewer": o.OPERATOR_ROLE_VIEWER,
    "operator": o.OPERATOR_ROLE_OPERATOR,
    "admin": o.OPERATOR_ROLE_ADMIN,
}
OPERATOR_ROLE_NAMES = {v: k for k, v in OPERATOR_ROLES.items()}


def operator_token_to_pb(view: OperatorTokenView) -> o.OperatorToken:
    return o.OperatorToken(
        id=view.id,
        name=view.name,
        role=OPERATOR_ROLES.get(view.role, o.OPERATOR_ROLE_UNSPECIFIED),
        created_at=ts(view.created_at),
        expires_at=ts(view.expires_at),
        revoked_at=ts(view.revoked_at),
        last_used_at=ts(view.last_used_at),
    )


def enrollment_token_to_pb(row: EnrollmentTokenRow) -> o.EnrollmentToken:
    return o.EnrollmentToken(
        id=row.id,
        name=row.name,
        policy=POLICIES.get(row.policy, o.ENROLLMENT_POLICY_UNSPECIFIED),
        labels=row.labels,
        max_uses=row.max_uses,
        uses=row.uses,
        created_at=ts(row.created_at),
        expires_at=ts(row.expires_at),
        revoked_at=ts(row.revoked_at),
        created_by=row.created_by,
    )


def _tensor(spec: dict[str, Any]) -> c.TensorSpec:
    return c.TensorSpec(
        name=spec["name"], dtype=spec["dtype"], shape=spec["shape"], dim_names=spec["dim_names"]
    )


def declared_outputs(specs: Iterable[c.OutputSpec]) -> tuple[OutputSpec, ...]:
    """A push's declared output kinds; INVALID_ARGUMENT for one without a
    kind this server knows."""
    try:
        return tuple(spec_from_wire(spec, declared=True) for spec in specs)
    except UnknownKind as exc:
        raise InvalidArgument(str(exc)) from exc


def model_version_to_pb(row: ModelVersionRow, model_name: str) -> c.ModelVersion:
    return c.ModelVersion(
        model_name=model_name,
        version=row.version,
        description=row.description,
        sha256=row.model_digest,
        size_bytes=row.size_bytes,
        inputs=[_tensor(t) for t in row.inputs],
        outputs=[_tensor(t) for t in row.outputs],
        opset=row.opset,
        producer=row.producer,
        sample_data=(
            c.SampleDataInfo(
                sha256=row.sample_data_digest,
                size_bytes=row.sample_size_bytes,
                num_samples=row.sample_count,
                has_labels=row.sample_has_labels,
            )
            if row.sample_data_digest
            else None
        ),
        labels=(
            c.LabelsInfo(sha256=row.labels_digest, count=row.labels_count)
            if row.labels_digest
            else None
        ),
        created_at=ts(row.created_at),
        created_by=row.created_by,
        yanked=row.yanked_at is not None,
        yank_reason=row.yank_reason,
        yanked_by=row.yanked_by,
        yanked_at=ts(row.yanked_at),
        first_assigned_at=ts(row.first_assigned_at),
        output_specs=[spec_to_wire(OutputSpec.from_json(o)) for o in row.output_specs or ()],
        min_fidelity=row.min_fidelity,
    )


def model_to_pb(summary: ModelSummary) -> c.Model:
    return c.Model(
        name=summary.row.name,
        description=summary.row.description,
        latest_version=summary.latest_version,
        version_count=summary.version_count,
        yanked_count=summary.yanked_count,
        created_at=ts(summary.row.created_at),
    )


def audit_to_pb(row: AuditRow, target_name: str = "") -> o.AuditEntry:
    return o.AuditEntry(
        id=row.id,
        at=ts(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        details=json.dumps(row.details, sort_keys=True) if row.details else "",
        target_name=target_name,
    )


def audit_search_from_pb(msg: o.ListAuditLogRequest) -> AuditSearch:
    return AuditSearch(
        before_id=msg.before_id,
        limit=msg.limit,
        action=msg.action.strip(),
        target=msg.target.strip(),
        actor=msg.actor.strip(),
        since=datetime_from_pb(msg.since, "since") if msg.HasField("since") else None,
        until=datetime_from_pb(msg.until, "until") if msg.HasField("until") else None,
    )


# ---------------------------------------------------------------- builds, artifacts

BUILD_STATES = {
    "queued": o.BUILD_STATE_QUEUED,
    "running": o.BUILD_STATE_RUNNING,
    "succeeded": o.BUILD_STATE_SUCCEEDED,
    "failed": o.BUILD_STATE_FAILED,
    "cancelled": o.BUILD_STATE_CANCELLED,
}
BUILD_STATE_NAMES = {v: k for k, v in BUILD_STATES.items()}


def _candidate_to_pb(data: dict[str, Any]) -> o.BuildCandidate:
    return o.BuildCandidate(
        name=data["name"],
        quantization=QUANTIZATIONS.get(data.get("precision", ""), c.QUANTIZATION_UNSPECIFIED),
        size_bytes=int(data.get("size_bytes") or 0),
        latency_p50_ms=data.get("latency_p50_ms") or 0.0,
        latency_p95_ms=data.get("latency_p95_ms") or 0.0,
        peak_memory_mb=data.get("peak_memory_mb") or 0.0,
        agreement=data.get("agreement") or 0.0,
        accuracy=data.get("accuracy"),
        max_abs_diff=data.get("max_abs_diff") or 0.0,
        passed=bool(data.get("passed")),
        reasons=list(data.get("reasons") or []),
        chosen=bool(data.get("chosen")),
        runtime=RUNTIMES.get(data.get("runtime", ""), c.RUNTIME_UNSPECIFIED),
        error=data.get("error") or "",
        # Reports stored before fallbacks existed have no such key.
        fallback=bool(data.get("fallback")),
        # Nor those before output kinds and timing spread (ladder 1).
        fidelity=[score_to_wire(OutputScore.from_json(f)) for f in data.get("fidelity") or ()],
        latency_cv=data.get("latency_cv") or 0.0,
        latency_p95_over_p50=data.get("latency_p95_over_p50") or 0.0,
        latency_measurements=int(data.get("latency_measurements") or 1),
        host_load=data.get("host_load") or 0.0,
        notes=list(data.get("notes") or []),
        # Nor those before accepted shapes (issue 22).
        accepted_inputs=[_tensor(t) for t in data.get("accepted_inputs") or []],
    )


def build_to_pb(view: BuildView) -> o.Build:
    row = view.row
    duration = 0.0
    if row.started_at and row.finished_at and not row.reused_from:
        duration = (row.finished_at - row.started_at).total_seconds()
    return o.Build(
        id=row.id,
        model_name=view.model_name,
        model_version=view.model_version,
        class_name=row.class_name,
        state=BUILD_STATES[row.state],
        progress=row.progress,
        candidates=[_candidate_to_pb(c_) for c_ in row.candidates],
        artifact_digest=row.artifact_digest or "",
        artifact_size=view.artifact_size,
        error=row.error,
        log=row.log,
        created_at=ts(row.created_at),
        started_at=ts(row.started_at),
        finished_at=ts(row.finished_at),
        dedup_key=row.dedup_key,
        reused_from=row.reused_from or "",
        duration_s=duration,
        fallback_digest=row.fallback_digest or "",
        fallback_size=view.fallback_size,
        fallback_reason=row.fallback_reason or "",
        cancelled_by=row.cancelled_by or "",
    )


def artifact_to_pb(row: ArtifactRow) -> o.Artifact:
    return o.Artifact(
        digest=row.digest,
        size_bytes=row.size_bytes,
        media_type=row.media_type,
        manifest=c.ArtifactManifest.FromString(row.manifest),
        signed_manifest=c.SignedManifest(
            manifest=row.manifest, signature=row.signature, key_id=row.key_id
        ),
        build_id=row.build_id,
        created_at=ts(row.created_at),
        fallback_digest=row.fallback_digest or "",
    )


def signing_key_to_pb(row: SigningKeyRow) -> c.SigningKey:
    return c.SigningKey(
        key_id=row.id,
        public_key=row.public_key,
        created_at=ts(row.created_at),
        retired_at=ts(row.retired_at),
    )


def key_rotations_to_pb(chain: Iterable[tuple[bytes, bytes]]) -> list[c.KeyRotation]:
    return [c.KeyRotation(statement=stmt, signature=sig) for stmt, sig in chain]


# ---------------------------------------------------------------- telemetry

TELEMETRY_METRICS = {
    o.TELEMETRY_METRIC_LATENCY_P95_MS: "latency_p95_ms",
    o.TELEMETRY_METRIC_ERROR_RATE: "error_rate",
    o.TELEMETRY_METRIC_MEMORY_MB: "memory_mb",
    o.TELEMETRY_METRIC_REQUEST_RATE: "request_rate",
    o.TELEMETRY_METRIC_CPU_PERCENT: "cpu_percent",
    o.TELEMETRY_METRIC_REQUEST_COUNT: "request_count",
    o.TELEMETRY_METRIC_ERROR_COUNT: "error_count",
    o.TELEMETRY_METRIC_TIMEOUT_RATE: "timeout_rate",
    o.TELEMETRY_METRIC_LATENCY_P50_MS: "latency_p50_ms",
    o.TELEMETRY_METRIC_LATENCY_P99_MS: "latency_p99_ms",
    o.TELEMETRY_METRIC_LATENCY_MAX_MS: "latency_max_ms",
    o.TELEMETRY_METRIC_DROPPED_SAMPLES: "dropped_samples",
    o.TELEMETRY_METRIC_SYSTEM_MEMORY_PERCENT: "system_memory_percent",
    o.TELEMETRY_METRIC_TEMPERATURE_C: "temperature_c",
    o.TELEMETRY_METRIC_BATTERY_PERCENT: "battery_percent",
    o.TELEMETRY_METRIC_FALLBACK_REQUEST_COUNT: "fallback_request_count",
    o.TELEMETRY_METRIC_FALLBACK_SHARE: "fallback_share",
    o.TELEMETRY_METRIC_MODEL_MEMORY_MB: "model_memory_mb",
}
TELEMETRY_GROUPS = {
    o.TELEMETRY_GROUP_BY_UNSPECIFIED: "",
    o.TELEMETRY_GROUP_BY_MODEL_VERSION: "model_version",
    o.TELEMETRY_GROUP_BY_CLASS: "class",
    o.TELEMETRY_GROUP_BY_DEVICE: "device",
}


# ArtifactVariant -> a telemetry row's variant ("": the agent did not say).
SAMPLE_VARIANTS = {
    c.ARTIFACT_VARIANT_UNSPECIFIED: "",
    c.ARTIFACT_VARIANT_PRIMARY: PRIMARY,
    c.ARTIFACT_VARIANT_FALLBACK: FALLBACK,
}


def sample_from_pb(msg: d.TelemetrySample) -> Sample:
    """The service's Sample. Hot (500 per upload): epoch milliseconds come
    straight from the Timestamp's fields (a datetime per sample cost more than
    the rest; the service refuses times outside its window, an unset one
    included), and the fields go positionally, in Sample's order (keywords
    cost 30 % more); a test round-trips every field. A variant number this
    server does not know (proto3 enums are open) is INVALID_ARGUMENT."""
    at = msg.at
    variant = SAMPLE_VARIANTS.get(msg.variant)
    if variant is None:
        raise InvalidArgument(
            f"sample seq={msg.seq}: unknown variant {msg.variant}: one of "
            + ", ".join(f"{n} ({c.ArtifactVariant.Name(n)})" for n in SAMPLE_VARIANTS)
        )
    return Sample(
        msg.seq,
        at.seconds * 1000 + at.nanos // 1_000_000,
        msg.model_name,
        msg.model_version,
        msg.request_count,
        msg.error_count,
        msg.timeout_count,
        msg.dropped_samples,
        msg.latency_p50_ms,
        msg.latency_p95_ms,
        msg.latency_p99_ms,
        msg.latency_max_ms,
        msg.memory_mb,
        msg.cpu_percent,
        msg.system_memory_percent,
        msg.temperature_c if msg.HasField("temperature_c") else None,
        msg.battery_percent if msg.HasField("battery_percent") else None,
        msg.power_mode,
        msg.concurrency_limit,
        msg.shadow_version,
        msg.shadow_requests,
        msg.shadow_agreement,
        msg.shadow_max_diff,
        msg.shadow_latency_p95_ms,
        variant,
        msg.fallback_request_count,
        msg.model_memory_mb,
    )


def telemetry_query_from_pb(msg: o.QueryTelemetryRequest) -> dict[str, Any]:
    """Keyword arguments for TelemetryService.query."""
    if msg.metric not in TELEMETRY_METRICS:
        raise InvalidArgument("metric is required")
    if msg.group_by not in TELEMETRY_GROUPS:
        raise InvalidArgument(f"unknown group_by {msg.group_by}")
    start = datetime_from_pb(msg.start, "start") if msg.HasField("start") else None
    end = datetime_from_pb(msg.end, "end") if msg.HasField("end") else None
    return {
        "metric": TELEMETRY_METRICS[msg.metric],
        "group_by": TELEMETRY_GROUPS[msg.group_by],
        "start": start,
        "end": end,
        "step": timedelta_from_pb(msg.step, "step") if msg.HasField("step") else None,
        "device_id": msg.device_id,
        "class_name": msg.class_name,
        "model_name": msg.model_name,
        "model_version": msg.model_version,
        "labels": dict(msg.labels),
    }


def series_to_pb(series: Series) -> o.TelemetrySeries:
    return o.TelemetrySeries(
        group=series.group,
        points=[o.TelemetryPoint(at=ts(p.at), value=p.value) for p in series.points],
    )


# ---------------------------------------------------------------- rollouts

ROLLOUT_STATES: dict[str, o.RolloutState.ValueType] = {
    RolloutState.DRAFT: o.ROLLOUT_STATE_DRAFT,
    RolloutState.SCHEDULED: o.ROLLOUT_STATE_SCHEDULED,
    RolloutState.RUNNING: o.ROLLOUT_STATE_RUNNING,
    RolloutState.WAITING_APPROVAL: o.ROLLOUT_STATE_WAITING_APPROVAL,
    RolloutState.PAUSED: o.ROLLOUT_STATE_PAUSED,
    RolloutState.SUCCEEDED: o.ROLLOUT_STATE_SUCCEEDED,
    RolloutState.SUCCEEDED_WITH_FAILURES: o.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES,
    RolloutState.ABORTED: o.ROLLOUT_STATE_ABORTED,
}
ROLLOUT_STATE_NAMES = {v: k for k, v in ROLLOUT_STATES.items()}
ROLLOUT_DEVICE_STATES: dict[str, o.RolloutDeviceState.ValueType] = {
    MemberState.WAITING: o.ROLLOUT_DEVICE_STATE_WAITING,
    MemberState.NOTIFIED: o.ROLLOUT_DEVICE_STATE_NOTIFIED,
    MemberState.IN_PROGRESS: o.ROLLOUT_DEVICE_STATE_IN_PROGRESS,
    MemberState.COMMITTED: o.ROLLOUT_DEVICE_STATE_COMMITTED,
    MemberState.FAILED: o.ROLLOUT_DEVICE_STATE_FAILED,
    MemberState.REJECTED: o.ROLLOUT_DEVICE_STATE_REJECTED,
    MemberState.TIMED_OUT: o.ROLLOUT_DEVICE_STATE_TIMED_OUT,
    MemberState.REVERTING: o.ROLLOUT_DEVICE_STATE_REVERTING,
    MemberState.REVERTED: o.ROLLOUT_DEVICE_STATE_REVERTED,
    MemberState.REVERT_FAILED: o.ROLLOUT_DEVICE_STATE_REVERT_FAILED,
    MemberState.DROPPED: o.ROLLOUT_DEVICE_STATE_DROPPED,
    MemberState.SKIPPED: o.ROLLOUT_DEVICE_STATE_SKIPPED,
}
STAGE_PHASES = {
    StagePhase.PENDING: o.STAGE_PHASE_PENDING,
    StagePhase.ROLLING: o.STAGE_PHASE_ROLLING,
    StagePhase.BAKING: o.STAGE_PHASE_BAKING,
    StagePhase.WAITING_APPROVAL: o.STAGE_PHASE_WAITING_APPROVAL,
    StagePhase.PASSED: o.STAGE_PHASE_PASSED,
    StagePhase.PROMOTED: o.STAGE_PHASE_PROMOTED,
    StagePhase.FAILED: o.STAGE_PHASE_FAILED,
    StagePhase.ABORTED: o.STAGE_PHASE_ABORTED,
}
FAILURE_ACTIONS = {
    o.FAILURE_ACTION_UNSPECIFIED: "pause",
    o.FAILURE_ACTION_PAUSE: "pause",
    o.FAILURE_ACTION_ABORT_REVERT: "abort_revert",
}


def _seconds(duration: Duration, what: str) -> float:
    return float(timedelta_from_pb(duration, what).total_seconds())


def _duration(seconds: float) -> Duration:
    out = Duration()
    out.FromTimedelta(dt.timedelta(seconds=seconds))
    return out


def rollout_spec_from_pb(msg: o.RolloutSpec) -> RolloutSpec:
    """The domain spec. Unset proto fields take the defaults an operator
    expects: success threshold 100 % less the error threshold (what the
    error threshold tolerates does not fail the stage), errors counted from
    the first finished device, on failure pause."""
    stages = []
    for s in msg.stages:
        size = s.WhichOneof("size")
        g = s.gates
        stages.append(
            StageSpec(
                name=s.name,
                percent=s.percent if size == "percent" else None,
                count=s.count if size == "count" else None,
                stratified=s.stratified,
                shadow=s.shadow,
                min_agreement=s.min_agreement if s.HasField("min_agreement") else None,
                # Unset: every member but those the error threshold tolerates
                # (errors=10 alone would otherwise fail a stage on one failure).
                success_threshold_percent=(
                    s.success_threshold_percent or 100.0 - s.error_threshold_percent
                ),
                error_threshold_percent=s.error_threshold_percent,
                min_finished_for_error_threshold=s.min_finished_for_error_threshold or 1,
                bake_time_s=_seconds(s.bake_time, "bake_time"),
                gates=Gates(
                    latency_budget_factor=(
                        g.latency_budget_factor if g.HasField("latency_budget_factor") else None
                    ),
                    max_error_rate=g.max_error_rate if g.HasField("max_error_rate") else None,
                    memory_limit_factor=(
                        g.memory_limit_factor if g.HasField("memory_limit_factor") else None
                    ),
                    max_silence_s=(
                        _seconds(g.max_silence, "max_silence")
                        if g.HasField("max_silence")
                        else None
                    ),
                    max_agent_memory_mb=(
                        g.max_agent_memory_mb if g.HasField("max_agent_memory_mb") else None
                    ),
                ),
                require_approval=s.require_approval,
                on_failure=FAILURE_ACTIONS.get(s.on_failure, "pause"),
            )
        )
    p = msg.pacing
    return RolloutSpec(
        model_name=msg.model_name,
        model_version=msg.model_version,
        class_names=tuple(msg.class_names),
        label_selector=dict(msg.label_selector),
        stages=tuple(stages),
        pacing=PacingSpec(
            max_per_minute=p.max_per_minute,
            ramp_base_per_minute=p.ramp_base_per_minute,
            ramp_factor=p.ramp_factor or 1.0,
            device_timeout_s=_seconds(p.device_timeout, "device_timeout"),
            device_retries=p.device_retries,
        ),
        dynamic=msg.dynamic,
        start_at=datetime_from_pb(msg.start_at, "start_at") if msg.HasField("start_at") else None,
    )


def rollout_spec_to_pb(spec: RolloutSpec) -> o.RolloutSpec:
    out = o.RolloutSpec(
        model_name=spec.model_name,
        model_version=spec.model_version,
        class_names=list(spec.class_names),
        label_selector=spec.label_selector,
        dynamic=spec.dynamic,
        pacing=o.Pacing(
            max_per_minute=spec.pacing.max_per_minute,
            ramp_base_per_minute=spec.pacing.ramp_base_per_minute,
            ramp_factor=spec.pacing.ramp_factor,
            device_timeout=_duration(spec.pacing.device_timeout_s),
            device_retries=spec.pacing.device_retries,
        ),
    )
    if spec.start_at is not None:
        out.start_at.FromDatetime(spec.start_at)
    for s in spec.stages:
        stage = out.stages.add(
            name=s.name,
            stratified=s.stratified,
            shadow=s.shadow,
            success_threshold_percent=s.success_threshold_percent,
            error_threshold_percent=s.error_threshold_percent,
            min_finished_for_error_threshold=s.min_finished_for_error_threshold,
            bake_time=_duration(s.bake_time_s),
            require_approval=s.require_approval,
            on_failure=(
                o.FAILURE_ACTION_ABORT_REVERT
                if s.on_failure == "abort_revert"
                else o.FAILURE_ACTION_PAUSE
            ),
        )
        if s.percent is not None:
            stage.percent = s.percent
        if s.count is not None:
            stage.count = s.count
        if s.min_agreement is not None:
            stage.min_agreement = s.min_agreement
        gates = s.gates
        if gates.latency_budget_factor is not None:
            stage.gates.latency_budget_factor = gates.latency_budget_factor
        if gates.max_error_rate is not None:
            stage.gates.max_error_rate = gates.max_error_rate
        if gates.memory_limit_factor is not None:
            stage.gates.memory_limit_factor = gates.memory_limit_factor
        if gates.max_silence_s is not None:
            stage.gates.max_silence.CopyFrom(_duration(gates.max_silence_s))
        if gates.max_agent_memory_mb is not None:
            stage.gates.max_agent_memory_mb = gates.max_agent_memory_mb
    return out


def _stage_status(view: RolloutView, index: int, state: StageState) -> o.StageStatus:
    counts = view.stage_counts(index)
    out = o.StageStatus(
        index=index,
        name=view.spec.stages[index].name,
        total=sum(counts.values()),
        committed=counts.get(MemberState.COMMITTED, 0),
        failed=sum(counts.get(s, 0) for s in FAILED_STATES),
        in_progress=sum(
            counts.get(s, 0)
            for s in (MemberState.WAITING, MemberState.NOTIFIED, MemberState.IN_PROGRESS)
        ),
        waiting=counts.get(MemberState.WAITING, 0),
        skipped=counts.get(MemberState.SKIPPED, 0),
        acknowledged_failed=view.acknowledged_failed.get(index, 0),
        gates=[
            o.GateValue(name=g.name, value=g.value, limit=g.limit, passing=g.passing)
            for g in state.gates
        ],
        state=state.phase.value,
        phase=STAGE_PHASES[state.phase],
        promoted_by=state.promoted_by,
    )
    if state.bake_started_at is not None:
        out.bake_started_at.FromDatetime(state.bake_started_at)
    return out


def rollout_to_pb(view: RolloutView, *, with_devices: bool = True) -> o.Rollout:
    row = view.row
    out = o.Rollout(
        id=row.id,
        spec=rollout_spec_to_pb(view.spec),
        state=ROLLOUT_STATES.get(row.state, o.ROLLOUT_STATE_UNSPECIFIED),
        current_stage=row.current_stage,
        stages=[
            _stage_status(view, i, state)
            for i, state in enumerate(read_stages(row.stages, len(view.spec.stages)))
        ],
        reason=row.reason,
        created_at=ts(row.created_at),
        created_by=row.created_by,
        started_at=ts(row.started_at),
        finished_at=ts(row.finished_at),
    )
    if with_devices:
        out.devices.extend(
            o.RolloutDevice(
                device_id=d.device_id,
                device_name=view.names.get(d.device_id, ""),
                class_name=d.class_name,
                stage=d.stage,
                state=ROLLOUT_DEVICE_STATES.get(d.state, o.ROLLOUT_DEVICE_STATE_UNSPECIFIED),
                reason=d.reason,
                attempts=d.attempts,
            )
            for d in view.devices
        )
        out.excluded.extend(
            o.ExcludedDevice(device_id=e["device_id"], device_name=e["name"], reason=e["reason"])
            for e in row.excluded
        )
    return out


def planned_to_pb(plan: Plan) -> tuple[list[o.RolloutDevice], list[o.ExcludedDevice]]:
    planned = [
        o.RolloutDevice(
            device_id=p.device_id, device_name=p.name, class_name=p.class_name, stage=p.stage,
            state=o.ROLLOUT_DEVICE_STATE_WAITING,
        )
        for p in plan.devices
    ]  # fmt: skip
    excluded = [
        o.ExcludedDevice(device_id=e.device_id, device_name=e.name, reason=e.reason)
        for e in plan.excluded
    ]
    return planned, excluded
