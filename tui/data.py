"""What the TUI shows, as plain frozen dataclasses.

The headless client (tui.client) turns protobuf messages into these; screens
only ever see these, and a fake client for snapshot tests builds them by
hand. No textual, no grpc, no protobuf here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from edgefleet.controlplane.client.syntax import parse_when


@dataclass(frozen=True)
class Accelerator:
    kind: str
    name: str
    memory_mb: int = 0


@dataclass(frozen=True)
class Hardware:
    os: str = ""
    os_release: str = ""
    arch: str = ""
    cpu_model: str = ""
    cpu_cores: int = 0
    memory_mb: int = 0
    disk_total_mb: int = 0
    disk_free_mb: int = 0
    board_model: str = ""
    hostname: str = ""
    accelerators: tuple[Accelerator, ...] = ()


@dataclass(frozen=True)
class RuntimeInfo:
    python_version: str = ""
    agent_version: str = ""
    onnxruntime_version: str = ""
    onnxruntime_providers: tuple[str, ...] = ()
    litert_version: str = ""
    litert_package: str = ""
    tensorrt_version: str = ""


@dataclass(frozen=True)
class DeviceModel:
    """One model a device holds: what is assigned, what it serves, where its
    update stands (controlplane.client.format.ModelView, as plain data)."""

    name: str
    assigned_version: str = ""
    serving_version: str = ""
    # Update state by name ("committed", "downloading", ...); "pending" when
    # the agent has not taken the current assignment up yet; "" unknown.
    state: str = ""
    # The version the state is about.
    target_version: str = ""
    sequence: int = 0
    rollout_id: str = ""
    shadow: bool = False
    bytes_done: int = 0
    bytes_total: int = 0
    reason: str = ""
    # `digits@1.2.0`, `vad@5.0.0 (downloading 40%)`: one cell's worth.
    summary: str = ""
    # The update in flight or the last failure, in words ("" when settled).
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.state == "failed"


@dataclass(frozen=True)
class UpdateInfo:
    """Where the agent's update machine is for the model it reported last."""

    state: str = ""
    model_name: str = ""
    model_version: str = ""
    reason: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rollout_id: str = ""
    # What the device serves now, whatever the update's state.
    active_version: str = ""


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    # "pending", "accepted", "rejected", "decommissioned".
    state: str
    online: bool = False
    class_name: str = ""
    class_pinned: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    hardware: Hardware = field(default_factory=Hardware)
    runtime: RuntimeInfo = field(default_factory=RuntimeInfo)
    update: UpdateInfo = field(default_factory=UpdateInfo)
    last_seen_at: datetime | None = None
    enrolled_at: datetime | None = None
    # Every model assigned or reported, by name.
    models: tuple[DeviceModel, ...] = ()
    # The sync protocol its agent speaks (0: not connected yet).
    agent_protocol: int = 0

    @property
    def active_version(self) -> str:
        return self.update.active_version

    @property
    def models_text(self) -> str:
        """`digits@1.2.0, vad@5.0.0 (downloading 40%)`; "" for no model."""
        return ", ".join(m.summary for m in self.models if m.summary)

    @property
    def failed_models(self) -> tuple[DeviceModel, ...]:
        return tuple(m for m in self.models if m.failed)

    @property
    def failed(self) -> bool:
        """A model's last update failed (the device may still serve an older
        version of it)."""
        return bool(self.failed_models) or (not self.models and self.update.state == "failed")


@dataclass(frozen=True)
class DeploymentEvent:
    """One state a device's update went through, as its agent reported it."""

    sequence: int
    model_name: str
    model_version: str
    state: str
    reason: str
    at: datetime | None
    rollout_id: str = ""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    description: str = ""
    priority: int = 0
    # Constraint fields; None: not enforced.
    runtime: str = ""
    quantization: str = ""
    max_model_size_mb: float | None = None
    latency_budget_p95_ms: float | None = None
    max_memory_mb: float | None = None
    device_memory_mb: float | None = None
    # The lighter fallback artifact's precision ("": none).
    fallback: str = ""
    min_accuracy_retention: float | None = None
    accelerator: str = ""
    threads: int | None = None
    speed_factor: float | None = None
    microcontroller: bool = False
    # Rules written as the CLI reads them ("arch == aarch64").
    rules: tuple[str, ...] = ()
    device_count: int = 0
    # After a create or update: how many devices the rules match now, and
    # what looks like a mistake in them, in the CLI's words (class_match).
    match_summary: str = ""
    match_warnings: tuple[str, ...] = ()
    # Delivery: the class's own mirrors and download cap (bytes/s, 0: none).
    mirrors: tuple[str, ...] = ()
    max_download_rate: int = 0
    # TFLite builds' fixed input shapes, as the CLI takes them
    # ("images=1x3x48x320").
    input_shapes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassDraft:
    """A class as an operator typed it in the form: text fields, parsed and
    checked by the client (and then by the server)."""

    name: str
    description: str = ""
    priority: str = "0"
    runtime: str = ""
    quantization: str = ""
    max_size_mb: str = ""
    latency_budget_ms: str = ""
    max_memory_mb: str = ""
    device_memory_mb: str = ""
    fallback: str = ""
    min_accuracy_retention: str = ""
    accelerator: str = ""
    threads: str = ""
    speed_factor: str = ""
    microcontroller: bool = False
    # One rule per entry ("memory_mb < 4096").
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model:
    name: str
    description: str = ""
    latest_version: str = ""
    version_count: int = 0


@dataclass(frozen=True)
class ModelVersion:
    model_name: str
    version: str
    description: str = ""
    sha256: str = ""
    size_bytes: int = 0
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    opset: int = 0
    producer: str = ""
    samples: int = 0
    has_labels: bool = False
    created_at: datetime | None = None
    created_by: str = ""
    # What the push answered beside the version: what TFLite builds will
    # fix, class shapes that do not fit (ModelVersion.push_warnings).
    push_warnings: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.model_name}@{self.version}"


@dataclass(frozen=True)
class Candidate:
    """One measured rung of a build's ladder."""

    name: str
    quantization: str
    size_bytes: int
    latency_p95_ms: float
    agreement: float
    accuracy: float | None
    passed: bool
    chosen: bool
    reasons: tuple[str, ...] = ()
    error: str = ""
    peak_memory_mb: float = 0.0
    # Published as the build's lighter fallback artifact (docs/power.md).
    fallback: bool = False
    # What `agreement` measures: the lowest judged output's metric, named
    # after the output when there are several ("prob_map mask IoU"); ""
    # for a report from before output kinds (argmax agreement).
    metric: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Build:
    id: str
    model_name: str
    model_version: str
    class_name: str
    # "queued", "running", "succeeded", "failed".
    state: str
    progress: float = 0.0
    candidates: tuple[Candidate, ...] = ()
    artifact_digest: str = ""
    artifact_size: int = 0
    error: str = ""
    duration_s: float = 0.0
    reused_from: str = ""
    # The class asked for a fallback and there is none: why.
    fallback_reason: str = ""

    @property
    def chosen(self) -> str:
        return next((c.name for c in self.candidates if c.chosen), "")


@dataclass(frozen=True)
class Gate:
    name: str
    value: float
    limit: float
    passing: bool


@dataclass(frozen=True)
class StageStatus:
    index: int
    name: str
    total: int
    committed: int
    failed: int
    in_progress: int
    state: str
    gates: tuple[Gate, ...] = ()
    shadow: bool = False
    # The stage as written (`10%,stratified,bake=30s`).
    spec: str = ""
    # "pending", "rolling", "baking", "waiting-approval", "passed",
    # "promoted", "failed" (from StageStatus.phase).
    phase: str = ""
    skipped: int = 0
    # Failed members a resume acknowledged (out of the success count).
    acknowledged_failed: int = 0
    # Who passed it by hand (promote); "" when its thresholds did.
    promoted_by: str = ""
    # Of in_progress, the members not notified yet (or waiting to retry);
    # the rest are notified or installing.
    waiting: int = 0

    @property
    def installing(self) -> int:
        """Members notified or installing (in_progress counts waiting ones too)."""
        return max(self.in_progress - self.waiting, 0)


@dataclass(frozen=True)
class RolloutDevice:
    device_id: str
    device_name: str
    class_name: str
    stage: int
    # "waiting", "notified", "in-progress", "committed", "failed",
    # "skipped", "reverting", ...
    state: str
    reason: str = ""
    attempts: int = 0


@dataclass(frozen=True)
class ExcludedDevice:
    device_id: str
    device_name: str
    reason: str


@dataclass(frozen=True)
class Rollout:
    id: str
    model_name: str
    model_version: str
    # "draft", "scheduled", "running", "waiting-approval", "paused",
    # "succeeded", "succeeded-with-failures", "aborted".
    state: str
    current_stage: int = 0
    stages: tuple[StageStatus, ...] = ()
    devices: tuple[RolloutDevice, ...] = ()
    excluded: tuple[ExcludedDevice, ...] = ()
    reason: str = ""
    cohort: str = ""
    pacing: str = ""
    created_at: datetime | None = None
    created_by: str = ""
    # False when only stages were sent (watch events carry no devices).
    has_devices: bool = True

    @property
    def ref(self) -> str:
        return f"{self.model_name}@{self.model_version}"

    @property
    def active(self) -> bool:
        return self.state not in ("succeeded", "succeeded-with-failures", "aborted")

    @property
    def settled(self) -> bool:
        """Ended, with no device still going back to its previous version."""
        return not self.active and not any(d.state == "reverting" for d in self.devices)


@dataclass(frozen=True)
class DeviceRollout:
    """A rollout a device is a member of (without its device rows), and the
    device's own row in it: stage, member state, reason."""

    rollout: Rollout
    member: RolloutDevice


@dataclass(frozen=True)
class RolloutEdit:
    """What the monitor's edit form changes of a rollout: one stage's
    thresholds and bake time (in the `--stage` syntax: `90`, `20/3`, `5m`;
    empty for the server's default) and the pacing (empty: no limit, no
    timeout, no retries)."""

    stage: int  # from 0
    success: str = ""
    errors: str = ""
    bake: str = ""
    max_per_minute: str = ""
    device_timeout: str = ""
    retries: str = ""


@dataclass(frozen=True)
class RolloutDraft:
    """A rollout as typed in the wizard; the client parses it (stage syntax
    as `edgefleet rollouts create --stage`)."""

    model_ref: str
    classes: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    max_per_minute: str = ""
    ramp: str = ""
    device_timeout: str = ""
    retries: str = ""
    dynamic: bool = False


@dataclass(frozen=True)
class RolloutPlan:
    """A dry run: the devices each stage would take, and those left out."""

    stages: tuple[str, ...]
    planned: tuple[RolloutDevice, ...]
    excluded: tuple[ExcludedDevice, ...]

    def stage_devices(self, index: int) -> tuple[RolloutDevice, ...]:
        return tuple(d for d in self.planned if d.stage == index)


@dataclass(frozen=True)
class Series:
    group: str
    points: tuple[tuple[datetime, float], ...]


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime | None
    actor: str
    action: str
    target: str
    details: str
    # The current name of what `target` names ("": none, or gone).
    target_name: str = ""

    @property
    def target_text(self) -> str:
        """`device:e15f0a9c (edge-01)`: the target, an id cut to the 8
        characters tables show (the whole pushed the name out of sight at
        80 columns), and the name it has now."""
        kind, sep, rest = self.target.partition(":")
        shown = self.target
        if sep and kind not in ("class", "model") and len(rest) > 8:
            shown = f"{kind}:{rest[:8]}"
        if self.target_name and self.target_name != rest:
            return f"{shown} ({self.target_name})"
        return shown


# The fields of an audit search typed as `actor=alice action=rollout`.
AUDIT_SEARCH_FIELDS = ("actor", "action", "target")
# And its time range: `since=2h until=2026-12-01T00:00Z`.
AUDIT_SEARCH_TIMES = ("since", "until")


@dataclass(frozen=True)
class AuditQuery:
    """A search of the whole audit log, run on the server (ListAuditLog);
    every field empty: the newest entries. `target`: a name, full id or id
    prefix of what entries are about; `action`: one or a dotted group;
    `actor`: who, or the start of it."""

    actor: str = ""
    action: str = ""
    target: str = ""
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, text: str, now: datetime) -> AuditQuery:
        """`actor=alice action=device since=2h edge-01`: `field=value` words
        (since and until: a time ago or an ISO time, from `now`), and the
        other words (joined by spaces) as the target. ValueError for a
        `word=value` naming no field, or a time that is none: a search that
        silently read them as a target found nothing."""
        fields: dict[str, str] = {}
        times: dict[str, datetime] = {}
        rest: list[str] = []
        for word in text.split():
            key, sep, value = word.partition("=")
            if sep and key in AUDIT_SEARCH_FIELDS:
                fields[key] = value
            elif sep and key in AUDIT_SEARCH_TIMES:
                times[key] = parse_when(value, now)
            elif sep and key.isidentifier():
                known = ", ".join(f"{k}=" for k in (*AUDIT_SEARCH_FIELDS, *AUDIT_SEARCH_TIMES))
                raise ValueError(f"no search field {key!r}: use {known} or words of a target")
            else:
                rest.append(word)
        if rest:
            fields["target"] = " ".join([*filter(None, [fields.get("target", "")]), *rest])
        return cls(
            actor=fields.get("actor", ""), action=fields.get("action", ""),
            target=fields.get("target", ""), since=times.get("since"), until=times.get("until"),
        )  # fmt: skip

    def describe(self) -> str:
        """`actor=alice target=edge-01 since=2026-12-07 00:00`; empty for no search."""
        words = [f"{k}={getattr(self, k)}" for k in AUDIT_SEARCH_FIELDS if getattr(self, k)]
        words += [
            f"{k}={when:%Y-%m-%d %H:%M}"
            for k in AUDIT_SEARCH_TIMES
            if (when := getattr(self, k)) is not None
        ]
        return " ".join(words)


# No search: the newest entries.
ALL_AUDIT = AuditQuery()


@dataclass(frozen=True)
class FleetEvent:
    """One event of the WatchFleet stream."""

    kind: str
    message: str = ""
    at: datetime | None = None
    rollout: Rollout | None = None
    # The devices it is about, when the server named them all (at most 100).
    device_ids: tuple[str, ...] = ()
    devices_elided: bool = False

    @property
    def topic(self) -> str:
        """`device`, `rollout`, `build`, ... (`resync` after a reconnect)."""
        return self.kind.split(".", 1)[0]


# Topics every screen must reload on: the watch reconnected or fell behind.
RESYNC_TOPICS = frozenset({"resync", "alert"})


@dataclass(frozen=True)
class ConnectionStatus:
    """The TUI's link to the control plane, for the status line and the
    start screen. `connecting` until the first answer (retrying while the
    server cannot be reached), then `connected` or `reconnecting` (the watch
    stream broke); `refused` when the server turned the token down."""

    server: str = ""
    state: str = "connecting"  # "connecting", "connected", "reconnecting", "refused"
    # The token's role as the server named it ("" when it did not say).
    role: str = ""
    # The first failed try of the current outage, and how many failed since.
    since: datetime | None = None
    tries: int = 0
    reason: str = ""

    def connected(self, role: str | None = None) -> ConnectionStatus:
        return ConnectionStatus(self.server, "connected", self.role if role is None else role)

    def failed(self, reason: str, at: datetime) -> ConnectionStatus:
        """One more failed try to reach the server."""
        state = "connecting" if self.state == "connecting" else "reconnecting"
        since = self.since if self.state == state and self.since else at
        tries = self.tries + 1 if self.state == state else 1
        return ConnectionStatus(self.server, state, self.role, since, tries, reason)

    def refused(self, reason: str) -> ConnectionStatus:
        return ConnectionStatus(self.server, "refused", self.role, reason=reason)

    @property
    def retrying(self) -> str:
        """`since 12:00:05 (3 tries)`."""
        at = self.since.strftime("%H:%M:%S") if self.since else "?"
        return f"since {at} ({self.tries} {'try' if self.tries == 1 else 'tries'})"

    @property
    def line(self) -> str:
        """The status line, in words (it must read without colour)."""
        parts = [f"server {self.server}"]
        if self.role:
            parts.append(f"role {self.role}")
        if self.state == "connected":
            parts.append("connected")
        elif self.state == "refused":
            parts.append(f"disconnected: token refused: {self.reason}")
        elif self.tries:
            doing = "reconnecting" if self.state == "reconnecting" else "cannot connect, retrying"
            parts.append(f"{doing} {self.retrying}: {self.reason}")
        else:
            parts.append("connecting...")
        return " · ".join(parts)

    @property
    def screen_text(self) -> str:
        """What the start screen says (it shows until the first answer, and
        again when the token is refused)."""
        if self.state == "refused":
            return (
                f"The control plane at {self.server} refused the token: "
                f"{self.reason.rstrip('.')}.\n"
                "Check --token / the context (edgefleet context ls).\n\n"
                "Press q to quit."
            )
        if self.state == "connecting" and self.tries:
            return (
                f"Cannot reach {self.server} ({self.reason}); retrying... "
                f"{self.retrying}\n\nPress q to quit."
            )
        if self.state == "connecting":
            return f"Connecting to {self.server}..."
        return self.line
