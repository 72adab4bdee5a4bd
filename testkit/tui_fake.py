"""A FleetApi with fixed data and a fixed clock, for the TUI's snapshot
tests: the client is the UI's port, so faking it tests the screens alone.
Writes are recorded and answered from the same data."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import grpc

from edgefleet.controlplane.client.format import model_view
from edgefleet.controlplane.client.rollout_edit import describe_changes
from edgefleet.controlplane.client.stages import parse_stage
from edgefleet.tui import data as d
from edgefleet.tui import plots
from edgefleet.tui.client import (
    InputError,
    ServerError,
    edit_of,
    edited_spec,
    member_rollouts,
    model_from_view,
    rollout_spec,
)
from edgefleet.update_state import to_wire
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o

NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)


def ago(**kw: float) -> datetime:
    return NOW - timedelta(**kw)


PI_HW = d.Hardware(os="Linux", os_release="6.6.31", arch="aarch64", cpu_model="Cortex-A72",
                   cpu_cores=4, memory_mb=3884, disk_total_mb=30000, disk_free_mb=21000,
                   board_model="Raspberry Pi 4 Model B Rev 1.4", hostname="pi-kitchen")  # fmt: skip
RT = d.RuntimeInfo(python_version="3.11.9", agent_version="0.1.0", onnxruntime_version="1.20.1",
                   onnxruntime_providers=("CPUExecutionProvider",), litert_version="1.2.0",
                   litert_package="ai-edge-litert")  # fmt: skip


def model(
    name: str,
    assigned: str,
    state: str,
    serving: str = "",
    *,
    sequence: int = 1,
    reason: str = "",
    done: int = 0,
    total: int = 0,
) -> d.DeviceModel:
    """A model as the real client shows it (its summary and detail come from
    the same code), reported by the agent in `state` about `assigned`."""
    status = c.UpdateStatus(state=to_wire(state), model_name=name, model_version=assigned,
                            sequence=sequence, active_model_version=serving, reason=reason,
                            bytes_done=done, bytes_total=total)  # fmt: skip
    pb = c.DeviceModel(model_name=name, assigned_version=assigned, sequence=sequence, status=status)
    return model_from_view(model_view(pb))


DIGITS = model("digits", "1.0.0", "committed", "1.0.0")


def _device(i: int, name: str, cls: str, **kw: object) -> d.Device:
    base = d.Device(
        id=f"{i:08x}-0000-4000-8000-000000000000", name=name, state="accepted", online=True,
        class_name=cls, labels={"site": "demo", "tier": "stable"}, hardware=PI_HW, runtime=RT,
        update=d.UpdateInfo(state="committed", model_name="digits", model_version="1.0.0",
                            active_version="1.0.0"),
        last_seen_at=ago(seconds=4), enrolled_at=ago(hours=3), models=(DIGITS,), agent_protocol=2,
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


DEVICES = [
    _device(1, "pi-kitchen", "pi-class", labels={"site": "demo", "tier": "canary"},
            models=(DIGITS, model("vad", "5.0.0", "downloading", "4.0.0", sequence=3, done=400,
                                  total=1000))),
    _device(2, "pi-hallway", "pi-class"),
    _device(3, "jetson-dock", "jetson", update=d.UpdateInfo(
        state="failed", model_name="digits", model_version="1.0.0",
        reason="runtime tensorrt not available on this device"),
        models=(model("digits", "1.0.0", "failed", reason="runtime tensorrt not available on "
                      "this device"),)),
    _device(4, "gateway-1", "x86-gateway",
            hardware=replace(PI_HW, arch="x86_64", board_model="", cpu_model="Xeon", cpu_cores=2)),
    _device(5, "field-unit-7", "", state="pending", update=d.UpdateInfo(), online=True, models=(),
            agent_protocol=1),
    _device(6, "pi-garage", "pi-class", online=False, last_seen_at=ago(minutes=42)),
]  # fmt: skip

CLASSES = [
    d.DeviceClass("jetson", "NVIDIA Jetson modules", 10, "tensorrt", "fp16",
                  latency_budget_p95_ms=5, max_memory_mb=2048, accelerator="jetson",
                  rules=("accelerator == jetson",), device_count=1),
    d.DeviceClass("pi-class", "Raspberry Pi 4/5 class boards", 0, "tflite", "int8",
                  max_model_size_mb=4, latency_budget_p95_ms=30, max_memory_mb=256,
                  min_accuracy_retention=0.98,
                  rules=("arch == aarch64", "memory_mb < 4096"), device_count=3),
    d.DeviceClass("x86-gateway", "x86 gateways", 0, "onnxruntime", "auto",
                  latency_budget_p95_ms=10, max_memory_mb=1024, rules=("arch == x86_64",),
                  device_count=1),
]  # fmt: skip

VERSIONS = [
    d.ModelVersion("digits", "1.1.0", "retrained", "ab" * 32, 10_912,
                   ("input float32 [batch, 64]",), ("scores float32 [batch, 10]",), 17, "sklearn",
                   64, True, ago(minutes=20), "bootstrap-admin"),
    d.ModelVersion("digits", "1.0.0", "8x8 digits classifier", "cd" * 32, 10_880,
                   ("input float32 [batch, 64]",), ("scores float32 [batch, 10]",), 17, "sklearn",
                   64, True, ago(hours=2), "bootstrap-admin"),
]  # fmt: skip


def _candidates() -> tuple[d.Candidate, ...]:
    return (
        d.Candidate("fp32-opt", "fp32", 10_600, 0.031, 1.0, 0.97, True, False),
        d.Candidate("fp16", "fp16", 5_700, 0.044, 1.0, 0.97, True, False),
        d.Candidate("int8-dynamic", "int8", 3_900, 0.029, 0.99, 0.96, True, True),
        d.Candidate("int8-static-qdq", "int8", 4_100, 0.052, 0.94, 0.91, False, False,
                    ("agreement 94.0% < 95.0% (-1.0 pt)",)),
    )  # fmt: skip


BUILDS = [
    d.Build("b0000001", "digits", "1.1.0", "x86-gateway", "succeeded", 1.0, _candidates(),
            "sha256:" + "e" * 64, 3_900, duration_s=6.2),
    d.Build("b0000002", "digits", "1.1.0", "tiny-mcu", "failed", 1.0,
            (d.Candidate("tflite-int8", "int8", 3_200, 0.02, 0.99, 0.97, False, False,
                         ("size 0.003 MB > max 0.002 MB (+56%)",)),),
            error="no candidate meets the class's constraints", duration_s=9.8),
    d.Build("b0000003", "digits", "1.1.0", "pi-class", "running", 0.4),
]  # fmt: skip

ROLLOUT = d.Rollout(
    id="r0000001-aaaa-4bbb-8ccc-000000000000", model_name="digits", model_version="1.1.0",
    state="running", current_stage=1,
    stages=(
        d.StageStatus(0, "canary", 2, 2, 0, 0, "passed",
                      (d.Gate("memory", 48.0, 51.2, True),), spec="2,stratified,bake=8s",
                      phase="passed"),
        d.StageStatus(1, "", 3, 1, 1, 1, "rolling",
                      (d.Gate("latency_p95", 42.0, 30.0, False),
                       d.Gate("error_rate", 0.01, 0.05, True)), spec="100%,latency=1",
                      phase="rolling"),
    ),
    devices=(
        d.RolloutDevice("1", "pi-kitchen", "pi-class", 0, "committed"),
        d.RolloutDevice("4", "gateway-1", "x86-gateway", 0, "committed"),
        d.RolloutDevice("2", "pi-hallway", "pi-class", 1, "failed",
                        "golden outputs out of tolerance: max |diff| 0.31 > atol 0.001"),
        d.RolloutDevice("6", "pi-garage", "pi-class", 1, "in-progress"),
        d.RolloutDevice("7", "pi-attic", "pi-class", 1, "committed"),
    ),
    excluded=(d.ExcludedDevice("3", "jetson-dock", "no successful build for class jetson"),),
    reason="stage 2 running", cohort="classes pi-class, x86-gateway",
    pacing="unlimited, no device timeout, no retries", created_at=ago(minutes=5),
    created_by="bootstrap-admin",
)  # fmt: skip
DONE = replace(ROLLOUT, id="r0000000-aaaa-4bbb-8ccc-000000000000", model_version="1.0.0",
               state="succeeded", reason="every stage passed", created_at=ago(hours=1))  # fmt: skip

AUDIT = [
    d.AuditEntry(5, ago(minutes=5), "bootstrap-admin", "rollout.create", f"rollout:{ROLLOUT.id}",
                 "digits@1.1.0"),
    d.AuditEntry(4, ago(minutes=20), "bootstrap-admin", "model.push", "model:digits@1.1.0", ""),
    d.AuditEntry(3, ago(hours=2), "bootstrap-admin", "device.accept", "device:field-unit-7", ""),
    d.AuditEntry(2, ago(hours=3), "system", "device.enroll", "device:pi-kitchen", "token demo"),
    d.AuditEntry(1, ago(hours=3), "bootstrap-admin", "class.create", "class:pi-class", ""),
]  # fmt: skip


def _audit_matches(e: d.AuditEntry, query: d.AuditQuery) -> bool:
    """services/audit.py's search, on one entry: the actor's start, an action
    or its dotted group, what the target names (id, name, or from 4
    characters an id's start; `kind:text` for one kind)."""
    if query.actor and not e.actor.startswith(query.actor):
        return False
    if e.at is not None and (
        (query.since is not None and e.at < query.since)
        or (query.until is not None and e.at >= query.until)
    ):
        return False
    action = query.action.rstrip(".")
    if action and e.action != action and not e.action.startswith(action + "."):
        return False
    if not query.target:
        return True
    kind, rest = e.target.split(":", 1) if ":" in e.target else ("", e.target)
    wanted_kind, sep, wanted = query.target.partition(":")
    if not sep or not wanted:
        wanted_kind, wanted = kind, query.target
    return e.target == query.target or (
        kind == wanted_kind
        and (rest == wanted or e.target_name == wanted
             or (len(wanted) >= 4 and rest.startswith(wanted)))
    )  # fmt: skip


def _series(group: str, base: float) -> d.Series:
    return d.Series(group, tuple((ago(minutes=60 - i), base + (i % 7) * base / 10)
                                 for i in range(0, 60, 2)))  # fmt: skip


class FakeFleet:
    """FleetApi over the lists above; `calls` records what the UI asked."""

    def __init__(self) -> None:
        self.devices = list(DEVICES)
        # Tests may add rollouts in other states.
        self.rollouts = [ROLLOUT, DONE]
        self.calls: list[tuple[str, object]] = []
        self.events: asyncio.Queue[d.FleetEvent] = asyncio.Queue()

    @property
    def target(self) -> str:
        return "fake:7443"

    async def close(self) -> None:
        pass

    def _find(self, device_id: str) -> d.Device:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise ServerError(grpc.StatusCode.NOT_FOUND, f"no device {device_id!r}")

    def _change(self, device_id: str, fn: Callable[[d.Device], d.Device]) -> d.Device:
        new = fn(self._find(device_id))
        self.devices = [new if x.id == device_id else x for x in self.devices]
        return new

    async def whoami(self) -> str:
        """The role the real client reads from the server (FleetClient.whoami)."""
        return "admin"

    async def advice(self, err: ServerError) -> str | None:
        """The fake never fails to connect: no advice (FleetClient.advice)."""
        return None

    async def list_devices(self) -> list[d.Device]:
        return list(self.devices)

    async def get_device(self, device_id: str) -> d.Device:
        return self._find(device_id)

    async def accept_device(self, device_id: str) -> d.Device:
        self.calls.append(("accept", device_id))
        return self._change(device_id, lambda x: replace(x, state="accepted"))

    async def reject_device(self, device_id: str, reason: str = "") -> d.Device:
        self.calls.append(("reject", device_id))
        return self._change(device_id, lambda x: replace(x, state="rejected"))

    async def edit_labels(self, device_id: str, text: str) -> d.Device:
        self.calls.append(("labels", text))
        return self._find(device_id)

    async def pin_device(self, device_id: str, class_name: str) -> d.Device:
        self.calls.append(("pin", class_name))
        return self._change(
            device_id, lambda x: replace(x, class_name=class_name, class_pinned=bool(class_name))
        )

    async def device_history(self, device_id: str) -> list[d.DeploymentEvent]:
        return [
            d.DeploymentEvent(2, "digits", "1.1.0", "failed", "validation: golden outputs out of "
                              "tolerance", ago(minutes=3), ROLLOUT.id),
            d.DeploymentEvent(2, "digits", "1.1.0", "downloading", "", ago(minutes=4), ROLLOUT.id),
            d.DeploymentEvent(1, "digits", "1.0.0", "committed", "", ago(hours=2)),
            d.DeploymentEvent(1, "digits", "1.0.0", "downloading", "", ago(hours=2, seconds=9)),
            d.DeploymentEvent(3, "vad", "5.0.0", "downloading", "", ago(minutes=1)),
        ]  # fmt: skip

    async def unassign_model(self, device_id: str, model_name: str, reason: str = "") -> bool:
        """As the control plane: NOT_FOUND for an unknown device, an empty
        name refused; False when the device did not hold the model."""
        self.calls.append(("unassign", (device_id, model_name)))
        if not model_name:
            raise ServerError(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")
        device = self._find(device_id)
        if not any(m.name == model_name and m.assigned_version for m in device.models):
            return False
        self._change(device_id, lambda x: replace(
            x, models=tuple(m for m in x.models if m.name != model_name)))  # fmt: skip
        return True

    async def assign_model(self, device_id: str, model_name: str, version: str,
                           reason: str = "") -> None:  # fmt: skip
        """As the control plane (services.deployments.assign): the version
        must exist, the device be accepted and its class have a successful
        build of it (BUILDS); the model is added or its version replaced."""
        self.calls.append(("assign", (device_id, f"{model_name}@{version}")))
        if not model_name or not version:
            raise ServerError(grpc.StatusCode.INVALID_ARGUMENT,
                              "model name and version are required (MODEL@VERSION)")  # fmt: skip
        if not any(v.model_name == model_name and v.version == version for v in VERSIONS):
            raise ServerError(grpc.StatusCode.NOT_FOUND, f"no model version {model_name}@{version}")
        device = self._find(device_id)
        why = ""
        if device.state != "accepted":
            why = f"device is {device.state}; only accepted devices take models"
        elif not device.class_name:
            why = "device matches no device class"
        elif not any(b.model_version == version and b.class_name == device.class_name
                     and b.state == "succeeded" for b in BUILDS):  # fmt: skip
            why = "its class has no successful build of this version (edgefleet builds ls)"
        if why:
            raise ServerError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"cannot assign {model_name}@{version} to 1 of 1 device(s); "
                              f"nothing was assigned: {device_id}: {why}")  # fmt: skip
        # Not reported by its agent yet: what the real client shows then.
        held = next((m.sequence for m in device.models if m.name == model_name), 0)
        added = model_from_view(model_view(c.DeviceModel(
            model_name=model_name, assigned_version=version, sequence=held + 1)))  # fmt: skip
        self._change(device_id, lambda x: replace(
            x, models=(*(m for m in x.models if m.name != model_name), added)))  # fmt: skip

    async def assign_models(self, device_ids: Sequence[str], model_name: str, version: str,
                            reason: str = "") -> None:  # fmt: skip
        """As the control plane: assign_model's checks for every device, and
        all or nothing (one refused, none assigned)."""
        kept = list(self.devices)
        try:
            for device_id in device_ids:
                await self.assign_model(device_id, model_name, version, reason)
        except ServerError:
            self.devices = kept
            raise

    async def unassign_models(self, device_ids: Sequence[str], model_name: str,
                              reason: str = "") -> list[str]:  # fmt: skip
        """As the control plane: an unknown device fails the call before
        anything is removed; the ids that did not hold the model."""
        for device_id in device_ids:
            self._find(device_id)
        return [i for i in device_ids if not await self.unassign_model(i, model_name, reason)]

    async def device_rollouts(self, device_id: str) -> list[d.DeviceRollout]:
        self._find(device_id)
        return member_rollouts(device_id, self.rollouts)

    async def list_classes(self) -> list[d.DeviceClass]:
        return list(CLASSES)

    async def save_class(self, draft: d.ClassDraft, *, create: bool) -> d.DeviceClass:
        self.calls.append(("save_class", draft))
        if draft.latency_budget_ms.startswith("-"):
            raise ServerError(grpc.StatusCode.INVALID_ARGUMENT,
                              "latency_budget_p95_ms must be > 0")  # fmt: skip
        return d.DeviceClass(draft.name)

    async def list_models(self) -> list[d.Model]:
        return [d.Model("digits", "", "1.1.0", 2)]

    async def list_versions(self) -> list[d.ModelVersion]:
        return list(VERSIONS)

    async def push_model(self, name: str, version: str, model: Path, *,
                         sample_data: Path | None = None, labels: Path | None = None,
                         description: str = "",
                         on_progress: Callable[[int, int], None] | None = None,
                         ) -> d.ModelVersion:  # fmt: skip
        self.calls.append(("push", (name, version)))
        return d.ModelVersion(name, version)

    async def list_builds(self, model_name: str = "", version: str = "") -> list[d.Build]:
        return [b for b in BUILDS if not version or b.model_version == version]

    async def run_build(self, model_name: str, version: str, class_name: str = "",
                        force: bool = True) -> list[d.Build]:  # fmt: skip
        self.calls.append(("run_build", class_name))
        return []

    async def list_rollouts(self) -> list[d.Rollout]:
        return list(self.rollouts)

    def _rollout(self, rollout_id: str) -> d.Rollout:
        for r in self.rollouts:
            if r.id == rollout_id:
                return r
        raise ServerError(grpc.StatusCode.NOT_FOUND, f"no rollout with id {rollout_id!r}")

    async def get_rollout(self, rollout_id: str, device_limit: int = 0) -> d.Rollout:
        r = self._rollout(rollout_id)
        return replace(r, devices=r.devices[:device_limit]) if device_limit else r

    async def plan_rollout(self, draft: d.RolloutDraft) -> d.RolloutPlan:
        try:
            rollout_spec(draft)  # the real parser: the same messages as with a server
        except InputError:
            raise
        return d.RolloutPlan(
            stages=draft.stages,
            planned=(d.RolloutDevice("1", "pi-kitchen", "pi-class", 0, "waiting"),
                     d.RolloutDevice("4", "gateway-1", "x86-gateway", 0, "waiting"),
                     d.RolloutDevice("2", "pi-hallway", "pi-class", 1, "waiting")),
            excluded=(d.ExcludedDevice("3", "jetson-dock", "no successful build for its class"),
                      d.ExcludedDevice("5", "field-unit-7", "pending")),
        )  # fmt: skip

    async def start_rollout(self, draft: d.RolloutDraft) -> d.Rollout:
        self.calls.append(("start", draft))
        return ROLLOUT

    def _at_stage(self, r: d.Rollout, stage: int | None) -> None:
        """The server's guard: a stage named must be the current one."""
        if stage is not None and stage != r.current_stage:
            raise ServerError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"rollout {r.id} is at stage {r.current_stage + 1}, not stage "
                              f"{stage + 1}: nothing done (was it passed already?)")  # fmt: skip

    async def rollout_action(self, rollout_id: str, action: str, reason: str = "",
                             stage: int | None = None) -> d.Rollout:  # fmt: skip
        if action == "approve":
            self._at_stage(self._rollout(rollout_id), stage)
            self.calls.append((action, (rollout_id, stage)))
        else:
            self.calls.append((action, rollout_id))
        return ROLLOUT

    async def abort_rollout(self, rollout_id: str, *, revert: bool,
                            reason: str = "") -> d.Rollout:  # fmt: skip
        self.calls.append(("abort", revert))
        return replace(ROLLOUT, state="aborted")

    def _members(self, rollout_id: str, device_ids: Sequence[str],
                 allowed: frozenset[str], rule: str) -> d.Rollout:  # fmt: skip
        """The server's checks: every id a member, each in an allowed state."""
        r = self._rollout(rollout_id)
        members = {m.device_id: m for m in r.devices}
        missing = sorted(set(device_ids) - set(members))
        if missing:
            raise ServerError(grpc.StatusCode.NOT_FOUND,
                              f"not in rollout {rollout_id}: {', '.join(missing)}")  # fmt: skip
        wrong = [members[i] for i in device_ids if members[i].state not in allowed]
        if wrong:
            shown = ", ".join(f"{m.device_id} ({m.state.replace('-', ' ')})" for m in wrong)
            raise ServerError(grpc.StatusCode.FAILED_PRECONDITION, f"{rule}: {shown}")
        return r

    async def retry_rollout(self, rollout_id: str, device_ids: Sequence[str] = (),
                            reason: str = "") -> d.Rollout:  # fmt: skip
        self._members(rollout_id, device_ids, frozenset({"failed", "rejected", "timed-out"}),
                      "only failed, rejected or timed-out members are retried")  # fmt: skip
        self.calls.append(("retry", tuple(device_ids)))
        return ROLLOUT

    async def skip_rollout_devices(self, rollout_id: str, device_ids: Sequence[str],
                                   reason: str) -> d.Rollout:  # fmt: skip
        if not reason.strip():
            raise InputError("skip: say why the devices are skipped")
        self._members(rollout_id, device_ids,
                      frozenset({"waiting", "notified", "in-progress", "failed", "rejected",
                                 "timed-out", "rolled-back"}),
                      "only waiting, notified, installing or failed members are "
                      "skipped")  # fmt: skip
        self.calls.append(("skip", (tuple(device_ids), reason)))
        return ROLLOUT

    async def promote_rollout(self, rollout_id: str, reason: str = "",
                              stage: int | None = None) -> d.Rollout:  # fmt: skip
        r = self._rollout(rollout_id)
        self._at_stage(r, stage)
        if not r.active:
            raise ServerError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"rollout {rollout_id} is {r.state.replace('-', ' ')}; promote "
                              "applies to a rollout that is running, waiting approval, "
                              "paused")  # fmt: skip
        self.calls.append(("promote", (rollout_id, stage)))
        return ROLLOUT

    def _spec(self, rollout_id: str) -> o.RolloutSpec:
        r = self._rollout(rollout_id)
        return o.RolloutSpec(model_name=r.model_name, model_version=r.model_version,
                             stages=[parse_stage(s.spec) for s in r.stages])  # fmt: skip

    async def rollout_edit(self, rollout_id: str, stage: int) -> d.RolloutEdit:
        return edit_of(self._spec(rollout_id), stage)

    async def update_rollout(self, rollout_id: str, edit: d.RolloutEdit,
                             reason: str = "") -> tuple[d.Rollout, tuple[str, ...]]:  # fmt: skip
        spec = self._spec(rollout_id)
        try:  # the real edit: the same messages as with a server
            new = edited_spec(spec, edit)
        except ValueError as err:
            raise InputError(str(err)) from None
        if new == spec:
            raise InputError("nothing changed: the rollout has these settings already")
        self.calls.append(("update", edit))
        return ROLLOUT, tuple(describe_changes(spec, new))

    async def query_telemetry(self, metric: str, group_by: str, since: timedelta, *,
                              device_id: str = "", class_name: str = "",
                              model_name: str = "") -> list[d.Series]:  # fmt: skip
        return [_series("1.0.0", 12.0), _series("1.1.0", 20.0)]

    # The entries audit_log searches (a test may set its own).
    audit: Sequence[d.AuditEntry] = AUDIT

    async def audit_log(
        self, *, limit: int = 200, before_id: int = 0, query: d.AuditQuery = d.ALL_AUDIT
    ) -> list[d.AuditEntry]:
        """As ListAuditLog searches (services/audit.py), on self.audit."""
        for what, text in (("actor", query.actor), ("target", query.target)):
            if len(text) > 200:
                message = f"{what} is {len(text)} characters long; at most 200"
                raise ServerError(grpc.StatusCode.INVALID_ARGUMENT, message)
        found = [
            e for e in self.audit
            if (not before_id or e.id < before_id) and _audit_matches(e, query)
        ]  # fmt: skip
        return found[:limit]

    async def watch(self) -> AsyncIterator[d.FleetEvent]:
        while True:
            yield await self.events.get()


# ------------------------------------------------------------------ telemetry over a week
# A fleet whose telemetry has what the explorer must get right: more devices
# than it draws lines for, one that sent a single sample, one that sent
# samples of no model (zeros) until its model was installed 10 hours ago, one
# whose model never installed, one gone offline. Samples every 20 minutes over
# 7 days and every 15 seconds over the last 20 minutes.
TELEMETRY_DEVICES = [
    *DEVICES,
    *(_device(0x10 + i, f"sensor-{i:02d}", "pi-class") for i in range(1, 11)),
    _device(0x20, "sensor-new", "pi-class", enrolled_at=ago(minutes=8)),
]
INSTALLED_AT = {"gateway-1": ago(hours=10), "jetson-dock": NOW + timedelta(days=1),
                "sensor-new": ago(minutes=8)}  # fmt: skip
_SAMPLE_TIMES = sorted({*(ago(minutes=20 * k) for k in range(1, 7 * 72)),
                        *(ago(seconds=15 * k) for k in range(1, 80))})  # fmt: skip


class _Sample(NamedTuple):
    at: datetime
    device_id: str
    class_name: str
    model: str  # "name@version"; "" while the agent serves none
    latency_p95_ms: float
    requests: int
    errors: int
    memory_mb: float
    model_memory_mb: float


def _telemetry_samples() -> list[_Sample]:
    samples = []
    for i, dev in enumerate(TELEMETRY_DEVICES):
        if dev.state != "accepted":
            continue  # a pending device sends nothing
        times = [ago(minutes=7)] if dev.name == "sensor-new" else _SAMPLE_TIMES
        last = ago(minutes=42) if dev.name == "pi-garage" else NOW
        for k, at in enumerate(t for t in times if t <= last):
            hour = at.hour + at.minute / 60
            served = at >= INSTALLED_AT.get(dev.name, NOW - timedelta(days=30))
            daily = 1 + 0.3 * math.sin(2 * math.pi * hour / 24)
            requests = int((100 + 10 * i) * daily) if served else 0
            samples.append(_Sample(
                at, dev.id, dev.class_name, "digits@1.0.0" if served else "",
                round((8 + 2.5 * i) * daily + k % 5 * 0.4, 1) if served else 0.0, requests,
                (k % (i + 3) == 0) * i if served else 0, 120.0 + 5 * i + k % 7,
                30.0 + i if served else 0.0,
            ))  # fmt: skip
    return samples


class TelemetryFleet(FakeFleet):
    """FakeFleet whose QueryTelemetry buckets samples like the server
    (controlplane/services/telemetry.py query) over the client's window."""

    def __init__(self) -> None:
        super().__init__()
        self.devices = list(TELEMETRY_DEVICES)
        self.samples = _telemetry_samples()

    async def query_telemetry(self, metric: str, group_by: str, since: timedelta, *,
                              device_id: str = "", class_name: str = "",
                              model_name: str = "") -> list[d.Series]:  # fmt: skip
        self.calls.append(("telemetry", (metric, group_by, since, device_id)))
        start, end, step = plots.query_window(since, NOW)
        buckets: dict[tuple[str, int], list[_Sample]] = {}
        for s in self.samples:
            if not start <= s.at < end or (device_id and s.device_id != device_id):
                continue
            if class_name and s.class_name != class_name:
                continue
            if model_name and s.model.partition("@")[0] != model_name:
                continue
            group = {"version": s.model or plots.NO_MODEL, "class": s.class_name,
                     "device": s.device_id}[group_by]  # fmt: skip
            buckets.setdefault((group, (s.at - start) // step), []).append(s)
        series: dict[str, list[tuple[datetime, float]]] = {}
        for (group, index), rows in sorted(buckets.items()):
            requests = sum(r.requests for r in rows)
            value = {
                "p95 latency (ms)": max(r.latency_p95_ms for r in rows),
                "error rate": sum(r.errors for r in rows) / requests if requests else None,
                "memory (MB)": max(r.memory_mb for r in rows),
                "request rate (/s)": requests / step.total_seconds(),
                "model memory (MB)": max(r.model_memory_mb for r in rows),
            }[metric]
            if value is not None:  # a rate over a bucket without requests
                series.setdefault(group, []).append((start + step * index, value))
        return [d.Series(g, tuple(points)) for g, points in series.items()]
