"""The TUI's headless client: OperatorService over grpc.aio, answers as the
plain dataclasses of tui.data, failures as ClientError.

Never imports textual (tests check it), nor the control plane's database or
services: it is an adapter over the client library (controlplane.client),
like the CLI, and takes its connection settings, parsers, stage syntax,
upload code and formatting from there. The UI depends on the FleetApi
protocol, so snapshot tests can hand it a fake with fixed data."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.client import push
from edgefleet.controlplane.client.class_match import match_summary, match_warnings
from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.errors import rpc_status
from edgefleet.controlplane.client.format import (
    ModelView,
    format_cohort,
    format_pacing,
    format_shape,
    lowest_fidelity,
    model_update_text,
    model_views,
)
from edgefleet.controlplane.client.paging import list_devices_async
from edgefleet.controlplane.client.rollout_edit import describe_changes, edit_spec
from edgefleet.controlplane.client.stages import format_stage, parse_ramp, parse_stage
from edgefleet.controlplane.client.syntax import (
    CONSTRAINT_FIELDS,
    FALLBACK_CHOICES,
    constraint_profile,
    enum_value,
    format_duration,
    format_rule,
    parse_duration,
    parse_label,
    parse_match,
    parse_model_ref,
)
from edgefleet.controlplane.client.tls_probe import unavailable_advice
from edgefleet.controlplane.domain.input_shapes import format_dims
from edgefleet.tui import data as d
from edgefleet.tui import plots
from edgefleet.update_state import name_of, of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc

T = TypeVar("T")

# The metrics the telemetry explorer offers, by the names it shows.
METRICS: dict[str, o.TelemetryMetric.ValueType] = {
    "p95 latency (ms)": o.TELEMETRY_METRIC_LATENCY_P95_MS,
    "error rate": o.TELEMETRY_METRIC_ERROR_RATE,
    "memory (MB)": o.TELEMETRY_METRIC_MEMORY_MB,
    "request rate (/s)": o.TELEMETRY_METRIC_REQUEST_RATE,
    "model memory (MB)": o.TELEMETRY_METRIC_MODEL_MEMORY_MB,
}
GROUP_BY: dict[str, o.TelemetryGroupBy.ValueType] = {
    "version": o.TELEMETRY_GROUP_BY_MODEL_VERSION,
    "class": o.TELEMETRY_GROUP_BY_CLASS,
    "device": o.TELEMETRY_GROUP_BY_DEVICE,
}
RUNTIMES = ("onnxruntime", "tflite", "tensorrt")
QUANTIZATIONS = ("auto", "fp32", "fp16", "int8")


class ClientError(Exception):
    """A failure to show an operator: `title` heads the notification,
    `message` says what happened (the server's own words where it spoke)."""

    def __init__(self, message: str, title: str = "Error") -> None:
        super().__init__(message)
        self.message = message
        self.title = title


class InputError(ClientError):
    """What the operator typed does not parse; nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "Invalid input")


class ServerError(ClientError):
    """The control plane answered with an error status. `details`: the
    server's (or the transport's) own words, without the client's framing."""

    def __init__(self, code: grpc.StatusCode, message: str, details: str | None = None) -> None:
        super().__init__(message or code.name, code.name)
        self.code = code
        self.details = (message if details is None else details) or code.name

    @property
    def token_refused(self) -> bool:
        """The server does not take the token at all: every call fails alike."""
        return self.code == grpc.StatusCode.UNAUTHENTICATED


def _server_error(err: grpc.RpcError) -> ServerError:
    """The failure of a call on either stack (grpc.aio's errors are not
    grpc.Call, see rpc_status) as a ServerError titled with its code."""
    status = rpc_status(err)
    if status is None:
        return ServerError(grpc.StatusCode.UNKNOWN, str(err))
    code, details = status
    message = details
    if code == grpc.StatusCode.CANCELLED and details == "Cancelling all calls":
        # gRPC's own words when this client's channel closes under a call.
        message = "the connection to the control plane was closed"
    elif code == grpc.StatusCode.UNAVAILABLE and details:
        message = f"control plane unreachable ({details})"
    return ServerError(code, message, details)


# A refusal for lack of a role ends with the role the token has
# ("... operator token 'ci' has viewer", api/rpc.py).
_HELD_ROLE = re.compile(r"\bhas (\w+)$")
# Seconds the connection check may take: the app waits for it at start.
PROBE_TIMEOUT_S = 5.0
# The codes that say the token will not do: retrying cannot help.
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def _parse(fn: Callable[[str], T], text: str, what: str) -> T:
    try:
        return fn(text)
    except ValueError as err:
        raise InputError(f"{what}: {err}") from None


class FleetApi(Protocol):
    """What the UI asks of the control plane. Every method is a coroutine
    except `watch`, an async iterator; each raises ClientError."""

    @property
    def target(self) -> str: ...

    async def close(self) -> None: ...

    async def list_devices(self) -> list[d.Device]: ...
    async def get_device(self, device_id: str) -> d.Device: ...
    async def accept_device(self, device_id: str) -> d.Device: ...
    async def reject_device(self, device_id: str, reason: str = "") -> d.Device: ...
    async def edit_labels(self, device_id: str, text: str) -> d.Device: ...
    async def pin_device(self, device_id: str, class_name: str) -> d.Device: ...
    async def device_history(self, device_id: str) -> list[d.DeploymentEvent]: ...
    async def unassign_model(self, device_id: str, model_name: str, reason: str = "") -> bool: ...
    async def assign_models(
        self, device_ids: Sequence[str], model_name: str, version: str, reason: str = ""
    ) -> None: ...
    async def unassign_models(
        self, device_ids: Sequence[str], model_name: str, reason: str = ""
    ) -> list[str]: ...
    async def assign_model(
        self, device_id: str, model_name: str, version: str, reason: str = ""
    ) -> None: ...
    async def device_rollouts(self, device_id: str) -> list[d.DeviceRollout]: ...

    async def list_classes(self) -> list[d.DeviceClass]: ...
    async def save_class(self, draft: d.ClassDraft, *, create: bool) -> d.DeviceClass: ...

    async def list_models(self) -> list[d.Model]: ...
    async def list_versions(self) -> list[d.ModelVersion]: ...
    async def push_model(
        self,
        name: str,
        version: str,
        model: Path,
        *,
        sample_data: Path | None = None,
        labels: Path | None = None,
        description: str = "",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> d.ModelVersion: ...
    async def list_builds(self, model_name: str = "", version: str = "") -> list[d.Build]: ...
    async def run_build(
        self, model_name: str, version: str, class_name: str = "", force: bool = True
    ) -> list[d.Build]: ...

    async def list_rollouts(self) -> list[d.Rollout]: ...
    async def get_rollout(self, rollout_id: str, device_limit: int = 0) -> d.Rollout: ...
    async def plan_rollout(self, draft: d.RolloutDraft) -> d.RolloutPlan: ...
    async def start_rollout(self, draft: d.RolloutDraft) -> d.Rollout: ...
    async def rollout_action(
        self, rollout_id: str, action: str, reason: str = "", stage: int | None = None
    ) -> d.Rollout: ...
    async def abort_rollout(
        self, rollout_id: str, *, revert: bool, reason: str = ""
    ) -> d.Rollout: ...
    async def retry_rollout(
        self, rollout_id: str, device_ids: Sequence[str] = (), reason: str = ""
    ) -> d.Rollout: ...
    async def skip_rollout_devices(
        self, rollout_id: str, device_ids: Sequence[str], reason: str
    ) -> d.Rollout: ...
    async def promote_rollout(
        self, rollout_id: str, reason: str = "", stage: int | None = None
    ) -> d.Rollout: ...
    async def rollout_edit(self, rollout_id: str, stage: int) -> d.RolloutEdit: ...
    async def update_rollout(
        self, rollout_id: str, edit: d.RolloutEdit, reason: str = ""
    ) -> tuple[d.Rollout, tuple[str, ...]]: ...

    async def query_telemetry(
        self,
        metric: str,
        group_by: str,
        since: timedelta,
        *,
        device_id: str = "",
        class_name: str = "",
        model_name: str = "",
    ) -> list[d.Series]: ...

    async def audit_log(
        self, *, limit: int = 200, before_id: int = 0, query: d.AuditQuery = d.ALL_AUDIT
    ) -> list[d.AuditEntry]: ...

    def watch(self) -> AsyncIterator[d.FleetEvent]: ...


@runtime_checkable
class KnowsRole(Protocol):
    """A FleetApi that can check its token and say its role, and what to do
    when it cannot connect (FleetClient; the snapshot tests' fake cannot:
    the app takes it as connected)."""

    async def whoami(self) -> str: ...

    async def advice(self, err: ServerError) -> str | None: ...


class FleetClient:
    """FleetApi over a grpc.aio channel, made on first use so that it belongs
    to the event loop the app runs on."""

    def __init__(
        self, server: str, token: str | None, ca_cert: Path | None = None, *, origin: str = ""
    ) -> None:
        self._connection = Connection(server, token, ca_cert, origin=origin)
        self._channel: grpc.aio.Channel | None = None
        # Typed Any: the generated stubs describe the blocking stack only.
        self._stub_: Any = None

    @property
    def target(self) -> str:
        return self._connection.server

    @property
    def _stub(self) -> Any:
        if self._stub_ is None:
            self._channel = self._connection.aio_channel()
            self._stub_ = operator_pb2_grpc.OperatorServiceStub(self._channel)
        return self._stub_

    async def advice(self, err: ServerError) -> str | None:
        """What to do about a failure to connect when the reason is TLS (the
        server speaks it and we do not, or the CA does not verify it), or
        nothing answers at an address the operator never gave; None else.
        A handshake of our own, off the event loop (a few seconds at most)."""
        if err.code != grpc.StatusCode.UNAVAILABLE:
            return None
        return await asyncio.to_thread(unavailable_advice, self._connection)

    async def close(self) -> None:
        """Close the channel (any open watch ends)."""
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stub_ = None

    async def _call(self, method: str, request: Any, deadline_s: float | None = None) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, metadata=self._connection.metadata, timeout=deadline_s
            )
        except grpc.RpcError as err:
            raise _server_error(err) from None

    async def whoami(self) -> str:
        """The token's role ("admin", "operator", "viewer"; "" if the server
        did not say), from the cheapest calls that tell it: the API has no
        who-am-I. Listing operator tokens needs admin, and its refusal names
        the role the token has; a token whose role that does not tell reads
        one small list to show it may see the fleet. ServerError when the
        server refuses the token (REFUSED) or cannot be reached."""
        try:
            await self._call("ListOperatorTokens", o.ListOperatorTokensRequest(),
                             deadline_s=PROBE_TIMEOUT_S)  # fmt: skip
            return "admin"
        except ServerError as err:
            if err.code != grpc.StatusCode.PERMISSION_DENIED:
                raise
            held = _HELD_ROLE.search(err.details)
        role = held.group(1) if held else ""
        if role not in ("viewer", "operator"):
            await self._call("ListDeviceClasses", o.ListDeviceClassesRequest(),
                             deadline_s=PROBE_TIMEOUT_S)  # fmt: skip
        return role

    # ------------------------------------------------------------ devices

    async def list_devices(self) -> list[d.Device]:
        """Every device but decommissioned ones (every page of them)."""
        listed = await list_devices_async(
            lambda r: self._call("ListDevices", r), o.ListDevicesRequest()
        )
        return [device_from_pb(m) for m in listed]

    async def get_device(self, device_id: str) -> d.Device:
        return device_from_pb(await self._call("GetDevice", o.GetDeviceRequest(id=device_id)))

    async def accept_device(self, device_id: str) -> d.Device:
        """Let a pending device receive work."""
        m = await self._call("AcceptDevice", o.AcceptDeviceRequest(id=device_id))
        return device_from_pb(m)

    async def reject_device(self, device_id: str, reason: str = "") -> d.Device:
        """Refuse a device (it cannot enroll again)."""
        m = await self._call("RejectDevice", o.RejectDeviceRequest(id=device_id, reason=reason))
        return device_from_pb(m)

    async def edit_labels(self, device_id: str, text: str) -> d.Device:
        """`tier=canary, site=a, -old`: set the k=v labels, remove the -k ones."""
        set_, remove = parse_label_edit(text)
        request = o.UpdateDeviceLabelsRequest(id=device_id, set=set_, remove=remove)
        return device_from_pb(await self._call("UpdateDeviceLabels", request))

    async def pin_device(self, device_id: str, class_name: str) -> d.Device:
        """Pin to `class_name`; an empty name unpins (rules apply again)."""
        request = o.SetDeviceClassRequest(id=device_id, class_name=class_name)
        return device_from_pb(await self._call("SetDeviceClass", request))

    async def device_history(self, device_id: str) -> list[d.DeploymentEvent]:
        """The device's update states, newest first."""
        resp = await self._call("ListDeployments", o.ListDeploymentsRequest(device_id=device_id))
        return [
            d.DeploymentEvent(
                sequence=e.sequence, model_name=e.model_name, model_version=e.model_version,
                state=name_of(e.state), reason=e.reason, at=_when(e.at), rollout_id=e.rollout_id,
            )
            for e in resp.events
        ]  # fmt: skip

    async def unassign_model(self, device_id: str, model_name: str, reason: str = "") -> bool:
        """Remove the model from the device (its other models stay); False
        when the device did not hold it."""
        request = o.UnassignModelRequest(device_ids=[device_id], model_name=model_name,
                                         reason=reason)  # fmt: skip
        response = await self._call("UnassignModel", request)
        return device_id in response.removed

    async def assign_models(
        self, device_ids: Sequence[str], model_name: str, version: str, reason: str = ""
    ) -> None:
        """Assign MODEL@VERSION to the devices: all of them or, refused, none."""
        request = o.AssignModelRequest(device_ids=device_ids, model_name=model_name,
                                       model_version=version, reason=reason)  # fmt: skip
        await self._call("AssignModel", request)

    async def unassign_models(
        self, device_ids: Sequence[str], model_name: str, reason: str = ""
    ) -> list[str]:
        """Remove the model from the devices (all, or refused, none); the
        ids of those that did not hold it."""
        request = o.UnassignModelRequest(device_ids=device_ids, model_name=model_name,
                                         reason=reason)  # fmt: skip
        return list((await self._call("UnassignModel", request)).not_assigned)

    async def assign_model(
        self, device_id: str, model_name: str, version: str, reason: str = ""
    ) -> None:
        """Assign `model_name@version` to the device (its class's artifact;
        its other models stay). The server refuses a device whose class has
        no successful build of the version, saying so."""
        await self.assign_models([device_id], model_name, version, reason)

    async def device_rollouts(self, device_id: str) -> list[d.DeviceRollout]:
        """The rollouts the device is a member of, newest first, with its
        state in each. No RPC looks rollouts up by member: this reads in full
        the rollouts that can hold it (every active one, and those its
        deployment history or assignments name) and keeps its row; a
        finished rollout that never notified it is not found."""
        listed, history = await asyncio.gather(
            self._call("ListRollouts", o.ListRolloutsRequest()),
            self._call("ListDeployments", o.ListDeploymentsRequest(device_id=device_id)),
        )
        named = {e.rollout_id for e in history.events} | {a.rollout_id for a in history.assignments}
        candidates = [r.id for r in map(rollout_from_pb, listed.rollouts)
                      if r.active or r.id in named]  # fmt: skip
        full = await asyncio.gather(
            *(self._call("GetRollout", o.GetRolloutRequest(id=i)) for i in candidates)
        )
        return member_rollouts(device_id, [rollout_from_pb(m) for m in full])

    # ------------------------------------------------------------ classes

    async def list_classes(self) -> list[d.DeviceClass]:
        resp = await self._call("ListDeviceClasses", o.ListDeviceClassesRequest())
        return [class_from_pb(m) for m in resp.classes]

    async def save_class(self, draft: d.ClassDraft, *, create: bool) -> d.DeviceClass:
        """Create the class, or replace the stored fields of an existing one
        with every field of the draft (its rules included): an emptied
        constraint field removes that constraint."""
        name, profile, rules, priority = class_request_parts(draft)
        if create:
            created = o.CreateDeviceClassRequest(
                name=name, description=draft.description, priority=priority,
                constraints=profile, match_rules=rules,
            )  # fmt: skip
            return saved_class(await self._call("CreateDeviceClass", created), "created")
        updated = o.UpdateDeviceClassRequest(
            name=name, description=draft.description, priority=priority, constraints=profile,
            match_rules=rules, replace_match_rules=True,
            clear_constraints=cleared_constraints(draft),
        )  # fmt: skip
        return saved_class(await self._call("UpdateDeviceClass", updated), "saved")

    # ------------------------------------------------------------ models and builds

    async def list_models(self) -> list[d.Model]:
        resp = await self._call("ListModels", o.ListModelsRequest())
        return [
            d.Model(m.name, m.description, m.latest_version, m.version_count) for m in resp.models
        ]

    async def list_versions(self) -> list[d.ModelVersion]:
        """Every version of every model, newest first within a model."""
        out: list[d.ModelVersion] = []
        for model in await self.list_models():
            resp = await self._call("GetModel", o.GetModelRequest(name=model.name))
            out.extend(version_from_pb(v) for v in resp.versions)
        return out

    async def push_model(
        self,
        name: str,
        version: str,
        model: Path,
        *,
        sample_data: Path | None = None,
        labels: Path | None = None,
        description: str = "",
        on_progress: Callable[[int, int], None] | None = None,
    ) -> d.ModelVersion:
        """Upload a model version; `on_progress(sent, total)` runs on this
        event loop as chunks go out. The upload runs in a thread, on the
        blocking stack (see push.push_model)."""
        loop = asyncio.get_running_loop()
        try:
            parts = await asyncio.to_thread(
                push.model_parts, model, sample_data=sample_data, labels=labels
            )
        except OSError as err:
            raise InputError(f"{err.strerror or err}: {err.filename}") from None

        def progress(sent: int, total: int) -> None:
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, sent, total)

        header = o.PushModelHeader(model_name=name, version=version, description=description)

        def upload() -> c.ModelVersion:
            with self._connection.channel() as channel:
                stub = operator_pb2_grpc.OperatorServiceStub(channel)
                return push.push_model(stub, header, parts, on_progress=progress)

        try:
            pushed = await asyncio.to_thread(upload)
        except grpc.RpcError as err:
            raise _server_error(err) from None
        return version_from_pb(pushed)

    async def list_builds(self, model_name: str = "", version: str = "") -> list[d.Build]:
        request = o.ListBuildsRequest(model_name=model_name, model_version=version)
        resp = await self._call("ListBuilds", request)
        return [build_from_pb(b) for b in resp.builds]

    async def run_build(
        self, model_name: str, version: str, class_name: str = "", force: bool = True
    ) -> list[d.Build]:
        """Queue the build(s) again; `force` rebuilds even an identical one."""
        request = o.RunBuildRequest(
            model_name=model_name, model_version=version, class_name=class_name, force=force
        )
        resp = await self._call("RunBuild", request)
        return [build_from_pb(b) for b in resp.builds]

    # ------------------------------------------------------------ rollouts

    async def list_rollouts(self) -> list[d.Rollout]:
        resp = await self._call("ListRollouts", o.ListRolloutsRequest())
        return [rollout_from_pb(r) for r in resp.rollouts]

    async def get_rollout(self, rollout_id: str, device_limit: int = 0) -> d.Rollout:
        """The rollout with its devices: all, or the `device_limit` that most
        need a look (failed, then moving); the stage counts are of all."""
        request = o.GetRolloutRequest(id=rollout_id, device_limit=device_limit)
        return rollout_from_pb(await self._call("GetRollout", request))

    async def plan_rollout(self, draft: d.RolloutDraft) -> d.RolloutPlan:
        """The server's dry run of the draft: nothing is created."""
        spec = rollout_spec(draft)
        resp = await self._call("CreateRollout", o.CreateRolloutRequest(spec=spec, dry_run=True))
        return d.RolloutPlan(
            stages=tuple(format_stage(s) for s in spec.stages),
            planned=tuple(_rollout_device(m) for m in resp.planned),
            excluded=tuple(_excluded(m) for m in resp.excluded),
        )

    async def start_rollout(self, draft: d.RolloutDraft) -> d.Rollout:
        """Create the rollout and start it now."""
        request = o.CreateRolloutRequest(spec=rollout_spec(draft), start=True)
        return rollout_from_pb((await self._call("CreateRollout", request)).rollout)

    async def rollout_action(
        self, rollout_id: str, action: str, reason: str = "", stage: int | None = None
    ) -> d.Rollout:
        """`start`, `pause`, `resume` or `approve` (the stage waiting for
        approval: `stage`, from 0, when given; the server refuses when the
        rollout is at another, so a repeated approve passes one stage)."""
        methods = {"start": "StartRollout", "pause": "PauseRollout",
                   "resume": "ResumeRollout", "approve": "ApproveRolloutStage"}  # fmt: skip
        request = o.RolloutActionRequest(id=rollout_id, reason=reason, stage=stage)
        return rollout_from_pb(await self._call(methods[action], request))

    async def abort_rollout(self, rollout_id: str, *, revert: bool, reason: str = "") -> d.Rollout:
        """Stop notifying devices; `revert` puts back every device that took
        the version."""
        request = o.AbortRolloutRequest(id=rollout_id, reason=reason, revert=revert)
        return rollout_from_pb(await self._call("AbortRollout", request))

    async def retry_rollout(
        self, rollout_id: str, device_ids: Sequence[str] = (), reason: str = ""
    ) -> d.Rollout:
        """Failed members try again with a fresh retry budget: `device_ids`,
        or every failed one; a paused rollout (or one that succeeded with
        failures) runs again."""
        request = o.RetryRolloutRequest(id=rollout_id, device_ids=device_ids, reason=reason)
        return rollout_from_pb(await self._call("RetryRollout", request))

    async def skip_rollout_devices(
        self, rollout_id: str, device_ids: Sequence[str], reason: str
    ) -> d.Rollout:
        """Leave members on the version they run; the reason is required."""
        if not device_ids:
            raise InputError("skip: select at least one device")
        if not reason.strip():
            raise InputError("skip: say why the devices are skipped")
        request = o.SkipRolloutDevicesRequest(id=rollout_id, device_ids=device_ids, reason=reason)
        return rollout_from_pb(await self._call("SkipRolloutDevices", request))

    async def promote_rollout(
        self, rollout_id: str, reason: str = "", stage: int | None = None
    ) -> d.Rollout:
        """Pass the current stage now, whatever its thresholds say; with
        `stage` (from 0) only if the rollout is at that stage still."""
        request = o.RolloutActionRequest(id=rollout_id, reason=reason, stage=stage)
        return rollout_from_pb(await self._call("PromoteRollout", request))

    async def _spec(self, rollout_id: str) -> o.RolloutSpec:
        request = o.GetRolloutRequest(id=rollout_id, summary_only=True)
        spec: o.RolloutSpec = (await self._call("GetRollout", request)).spec
        return spec

    async def rollout_edit(self, rollout_id: str, stage: int) -> d.RolloutEdit:
        """Stage `stage`'s (from 0) thresholds and bake, and the pacing, as
        the edit form shows them."""
        spec = await self._spec(rollout_id)
        if not 0 <= stage < len(spec.stages):
            raise InputError(f"stage {stage + 1}: the rollout has {len(spec.stages)}")
        return edit_of(spec, stage)

    async def update_rollout(
        self, rollout_id: str, edit: d.RolloutEdit, reason: str = ""
    ) -> tuple[d.Rollout, tuple[str, ...]]:
        """Send the rollout's spec with what `edit` changed (compared with
        the rollout as it is now); answers the rollout and what changed."""
        spec = await self._spec(rollout_id)
        if not 0 <= edit.stage < len(spec.stages):
            raise InputError(f"stage {edit.stage + 1}: the rollout has {len(spec.stages)}")
        try:
            new = edited_spec(spec, edit)
        except ValueError as err:
            raise InputError(str(err)) from None
        if new == spec:
            raise InputError("nothing changed: the rollout has these settings already")
        request = o.UpdateRolloutRequest(id=rollout_id, spec=new, reason=reason)
        updated = await self._call("UpdateRollout", request)
        return rollout_from_pb(updated), tuple(describe_changes(spec, updated.spec))

    # ------------------------------------------------------------ telemetry, audit

    async def query_telemetry(
        self,
        metric: str,
        group_by: str,
        since: timedelta,
        *,
        device_id: str = "",
        class_name: str = "",
        model_name: str = "",
    ) -> list[d.Series]:
        """`metric` (a METRICS name) over the last `since`, one series per
        GROUP_BY value, in about 60 buckets of a step the plot can label and
        that meets the server's hourly rollups (tui.plots.query_window)."""
        start, end, step = plots.query_window(since, datetime.now(UTC))
        request = o.QueryTelemetryRequest(
            metric=METRICS[metric], group_by=GROUP_BY[group_by], device_id=device_id,
            class_name=class_name, model_name=model_name,
        )  # fmt: skip
        request.start.FromDatetime(start)
        request.end.FromDatetime(end)
        request.step.FromTimedelta(step)
        resp = await self._call("QueryTelemetry", request)
        return [
            d.Series(s.group, tuple((p.at.ToDatetime(tzinfo=UTC), p.value) for p in s.points))
            for s in resp.series
        ]

    async def audit_log(
        self, *, limit: int = 200, before_id: int = 0, query: d.AuditQuery = d.ALL_AUDIT
    ) -> list[d.AuditEntry]:
        """Newest first; those `query` finds, searched on the server over the
        whole log (a target by name, full id or id prefix)."""
        request = o.ListAuditLogRequest(
            limit=limit, before_id=before_id, actor=query.actor, action=query.action,
            target=query.target,
        )  # fmt: skip
        if query.since is not None:
            request.since.FromDatetime(query.since)
        if query.until is not None:
            request.until.FromDatetime(query.until)
        resp = await self._call("ListAuditLog", request)
        return [
            d.AuditEntry(e.id, _when(e.at), e.actor, e.action, e.target, e.details, e.target_name)
            for e in resp.entries
        ]

    # ------------------------------------------------------------ watch

    async def watch(self) -> AsyncIterator[d.FleetEvent]:
        """Fleet events until the channel closes; the first event, `resync`,
        comes once the server has the watch live (nothing after it is missed),
        so a UI that reloads on it starts from a consistent state."""
        call = self._stub.WatchFleet(o.WatchFleetRequest(), metadata=self._connection.metadata)
        try:
            await call.initial_metadata()
            # A call that failed to connect "has" its (empty) initial metadata
            # too: without this, a server that is down would look connected.
            await call.wait_for_connection()
            yield d.FleetEvent("resync", "watch connected")
            async for event in call:
                rollout = rollout_from_pb(event.rollout, has_devices=False) if (
                    event.WhichOneof("subject") == "rollout") else None  # fmt: skip
                yield d.FleetEvent(event.kind, event.message, _when(event.at), rollout,
                                   tuple(event.device_ids), event.devices_elided)  # fmt: skip
        except grpc.RpcError as err:
            raise _server_error(err) from None
        finally:
            call.cancel()


def client_failure(err: Exception) -> str | None:
    """A ClientError as one device's failure in a bulk run (`NOT_FOUND: no
    such device`, the CLI's words); None for anything else (a bug)."""
    if isinstance(err, ServerError):
        return f"{err.code.name}: {err.details}"
    return err.message if isinstance(err, ClientError) else None


# ------------------------------------------------------------ parsing (pure)


def member_rollouts(device_id: str, rollouts: Sequence[d.Rollout]) -> list[d.DeviceRollout]:
    """The rollouts among `rollouts` (read with their devices) that have
    `device_id` as a member, newest first, without their device rows."""
    found = [
        d.DeviceRollout(replace(r, devices=(), has_devices=False), member)
        for r in rollouts
        for member in r.devices
        if member.device_id == device_id
    ]
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(found, key=lambda x: x.rollout.created_at or oldest, reverse=True)


def parse_label_edit(text: str) -> tuple[dict[str, str], list[str]]:
    """`tier=canary, -old` -> ({"tier": "canary"}, ["old"])."""
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item.startswith("-"):
            remove.append(item[1:].strip())
        else:
            key, value = _parse(parse_label, item, "labels")
            set_[key] = value
    if not set_ and not remove:
        raise InputError("labels: write key=value to set and -key to remove, comma-separated")
    return set_, remove


def _number(text: str, what: str, cast: Callable[[str], T]) -> T | None:
    if not text.strip():
        return None
    try:
        return cast(text.strip())
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a number") from None


def _fallback(text: str) -> str:
    """A fallback precision as the form takes it ("" or none: no fallback)."""
    value = text.strip().lower() or "none"
    if value not in FALLBACK_CHOICES:
        raise ValueError("none, fp16, int8 or auto (an fp32 artifact is never lighter)")
    return value


def class_request_parts(
    draft: d.ClassDraft,
) -> tuple[str, c.ConstraintProfile, list[c.MatchRule], int]:
    """The draft as (name, constraints, rules, priority); InputError for
    anything that does not parse. Ranges are the server's to check."""
    if not draft.name.strip():
        raise InputError("name: a class needs a name")
    priority = _number(draft.priority, "priority", int) or 0
    profile = constraint_profile(
        runtime=_parse(lambda t: enum_value(c.Runtime, t), draft.runtime, "runtime")
        if draft.runtime else None,
        quantization=_parse(lambda t: enum_value(c.Quantization, t), draft.quantization,
                            "quantization") if draft.quantization else None,
        max_size_mb=_number(draft.max_size_mb, "max size", float),
        latency_budget_ms=_number(draft.latency_budget_ms, "latency budget", float),
        max_memory_mb=_number(draft.max_memory_mb, "max memory", float),
        device_memory_mb=_number(draft.device_memory_mb, "device memory", float),
        # Always sent: the form shows the class's fallback, so empty means none.
        fallback=_parse(_fallback, draft.fallback, "fallback"),
        accelerator=draft.accelerator.strip() or None,
        min_accuracy_retention=_number(draft.min_accuracy_retention, "accuracy retention", float),
        threads=_number(draft.threads, "threads", int),
        speed_factor=_number(draft.speed_factor, "speed factor", float),
        microcontroller=draft.microcontroller or None,
    )  # fmt: skip
    rules = [_parse(parse_match, r, "rule") for r in draft.rules if r.strip()]
    return draft.name.strip(), profile or c.ConstraintProfile(), rules, priority


def cleared_constraints(draft: d.ClassDraft) -> list[str]:
    """The ConstraintProfile fields an edited draft leaves empty (unchecked,
    for the microcontroller box): an update removes them. The fallback is
    always sent (empty: none) and the runtime always kept."""
    cleared = []
    for option, field in CONSTRAINT_FIELDS.items():
        value: str | bool = getattr(draft, option)
        if option != "fallback" and not (value.strip() if isinstance(value, str) else value):
            cleared.append(field)
    return sorted(cleared)


def rollout_spec(draft: d.RolloutDraft) -> o.RolloutSpec:
    """The wizard's draft as a RolloutSpec (InputError saying what to fix)."""
    name, version = _parse(parse_model_ref, draft.model_ref, "version")
    if not draft.classes and not draft.labels:
        raise InputError("cohort: name at least one class or label")
    if not draft.stages:
        raise InputError("stages: give at least one stage, e.g. 100%")
    labels = dict(_parse(parse_label, t, "labels") for t in draft.labels)
    stages = [_parse(parse_stage, t, f"stage {i + 1}") for i, t in enumerate(draft.stages)]
    pacing = o.Pacing(
        max_per_minute=_number(draft.max_per_minute, "max per minute", int) or 0,
        device_retries=_number(draft.retries, "retries", int) or 0,
    )
    if draft.ramp.strip():
        pacing.ramp_base_per_minute, pacing.ramp_factor = _parse(parse_ramp, draft.ramp, "ramp")
    if draft.device_timeout.strip():
        pacing.device_timeout.FromTimedelta(
            _parse(parse_duration, draft.device_timeout, "device timeout")
        )
    return o.RolloutSpec(
        model_name=name, model_version=version, class_names=list(draft.classes),
        label_selector=labels, stages=stages, pacing=pacing, dynamic=draft.dynamic,
    )  # fmt: skip


def edit_of(spec: o.RolloutSpec, stage: int) -> d.RolloutEdit:
    """The edit form's fields for stage `stage` (from 0) of `spec`."""
    s, p = spec.stages[stage], spec.pacing
    errors = ""
    if s.error_threshold_percent or s.min_finished_for_error_threshold > 1:
        errors = f"{s.error_threshold_percent:g}"
        if s.min_finished_for_error_threshold > 1:
            errors += f"/{s.min_finished_for_error_threshold}"
    return d.RolloutEdit(
        stage=stage,
        success=f"{s.success_threshold_percent:g}" if s.success_threshold_percent else "",
        errors=errors,
        bake=format_duration(s.bake_time.ToTimedelta()) if s.bake_time.ToTimedelta() else "",
        max_per_minute=str(p.max_per_minute) if p.max_per_minute else "",
        device_timeout=format_duration(p.device_timeout.ToTimedelta())
        if p.device_timeout.ToTimedelta() else "",
        retries=str(p.device_retries) if p.device_retries else "",
    )  # fmt: skip


def edited_spec(spec: o.RolloutSpec, edit: d.RolloutEdit) -> o.RolloutSpec:
    """`spec` with the fields of `edit` that differ from it applied (an
    emptied field: the server's default); ValueError saying what to fix."""
    was = edit_of(spec, edit.stage)
    stage_fields = {"success": "success", "errors": "errors", "bake": "bake"}
    pacing_fields = {"max_per_minute": "max-per-minute", "device_timeout": "device-timeout",
                     "retries": "retries"}  # fmt: skip
    off = {"success": "off", "errors": "off", "bake": "off", "max_per_minute": "0",
           "device_timeout": "off", "retries": "0"}  # fmt: skip

    def changed(fields: dict[str, str]) -> dict[str, str]:
        return {
            key: getattr(edit, name).strip() or off[name]
            for name, key in fields.items()
            if getattr(edit, name).strip() != getattr(was, name)
        }

    return edit_spec(spec, stage=edit.stage + 1, stage_changes=changed(stage_fields),
                     pacing_changes=changed(pacing_fields))  # fmt: skip


# ------------------------------------------------------------ protobuf -> data


def _when(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _enum(wrapper: Any, value: int) -> str:
    """ROLLOUT_STATE_WAITING_APPROVAL -> `waiting-approval`."""
    name: str = wrapper.Name(value)
    prefix = wrapper.Name(0).removesuffix("UNSPECIFIED")
    return "" if value == 0 else name.removeprefix(prefix).lower().replace("_", "-")


def device_from_pb(m: c.Device) -> d.Device:
    hw, rt, up = m.hardware, m.runtime, m.update
    return d.Device(
        id=m.id, name=m.name, state=_enum(c.DeviceState, m.state), online=m.online,
        class_name=m.class_name, class_pinned=m.class_pinned, labels=dict(m.labels),
        hardware=d.Hardware(
            os=hw.os, os_release=hw.os_release, arch=hw.arch, cpu_model=hw.cpu_model,
            cpu_cores=hw.cpu_cores, memory_mb=hw.memory_mb, disk_total_mb=hw.disk_total_mb,
            disk_free_mb=hw.disk_free_mb, board_model=hw.board_model, hostname=hw.hostname,
            accelerators=tuple(d.Accelerator(a.kind, a.name, a.memory_mb)
                               for a in hw.accelerators),
        ),
        runtime=d.RuntimeInfo(
            python_version=rt.python_version, agent_version=rt.agent_version,
            onnxruntime_version=rt.onnxruntime_version,
            onnxruntime_providers=tuple(rt.onnxruntime_providers),
            litert_version=rt.litert_version, litert_package=rt.litert_package,
            tensorrt_version=rt.tensorrt_version,
        ),
        update=d.UpdateInfo(
            state=of_status(up), model_name=up.model_name, model_version=up.model_version,
            reason=up.reason, bytes_done=up.bytes_done, bytes_total=up.bytes_total,
            rollout_id=up.rollout_id, active_version=up.active_model_version,
        ),
        last_seen_at=_when(m.last_seen_at), enrolled_at=_when(m.enrolled_at),
        models=tuple(model_from_view(v) for v in model_views(m)),
        agent_protocol=m.agent_protocol,
    )  # fmt: skip


def model_from_view(v: ModelView) -> d.DeviceModel:
    return d.DeviceModel(
        name=v.name, assigned_version=v.assigned, serving_version=v.serving, state=v.state,
        target_version=v.target, sequence=v.sequence, rollout_id=v.rollout_id, shadow=v.shadow,
        bytes_done=v.bytes_done, bytes_total=v.bytes_total, reason=v.reason, summary=v.summary,
        detail=model_update_text(v),
    )  # fmt: skip


def saved_class(m: c.DeviceClass, verb: str) -> d.DeviceClass:
    """A class as created or updated: with what its match report says, in
    the CLI's words (device_count is the class's members, which a change of
    rules moves only as devices report next)."""
    if not m.HasField("match_report"):
        return class_from_pb(m)
    return replace(
        class_from_pb(m),
        match_summary=match_summary(m, verb),
        match_warnings=tuple(match_warnings(m)),
    )


def class_from_pb(m: c.DeviceClass) -> d.DeviceClass:
    k = m.constraints

    def opt(name: Any) -> Any:
        return getattr(k, name) if k.HasField(name) else None

    return d.DeviceClass(
        name=m.name, description=m.description, priority=m.priority,
        runtime=_enum(c.Runtime, k.runtime), quantization=_enum(c.Quantization, k.quantization),
        max_model_size_mb=opt("max_model_size_mb"),
        latency_budget_p95_ms=opt("latency_budget_p95_ms"), max_memory_mb=opt("max_memory_mb"),
        device_memory_mb=opt("device_memory_mb"),
        fallback=_enum(c.Quantization, k.fallback) if opt("fallback") else "",
        min_accuracy_retention=opt("min_accuracy_retention"), accelerator=k.accelerator,
        threads=opt("threads"), speed_factor=opt("speed_factor"),
        microcontroller=bool(opt("microcontroller")),
        rules=tuple(format_rule(r) for r in m.match_rules), device_count=m.device_count,
        mirrors=tuple(m.artifact_mirrors), max_download_rate=m.max_download_rate,
        input_shapes=tuple(f"{s.name}={format_dims(s.dims)}" for s in k.input_shapes),
    )  # fmt: skip


def version_from_pb(m: c.ModelVersion) -> d.ModelVersion:
    return d.ModelVersion(
        model_name=m.model_name, version=m.version, description=m.description, sha256=m.sha256,
        size_bytes=m.size_bytes,
        inputs=tuple(f"{t.name} {t.dtype} {format_shape(t)}" for t in m.inputs),
        outputs=tuple(
            f"{t.name} {t.dtype} {format_shape(t)}" + _judged_as(t.name, m.output_specs)
            for t in m.outputs
        ),
        opset=m.opset, producer=m.producer, samples=m.sample_data.num_samples,
        has_labels=m.sample_data.has_labels, created_at=_when(m.created_at),
        created_by=m.created_by, push_warnings=tuple(m.push_warnings),
    )  # fmt: skip


def _judged_as(name: str, specs: Sequence[c.OutputSpec]) -> str:
    """` (dense-map)`: the kind builds judge an output as, when known."""
    spec = next((s for s in specs if s.name == name), None)
    return f" ({_enum(c.OutputKind, spec.kind)})" if spec is not None else ""


def build_from_pb(m: o.Build) -> d.Build:
    return d.Build(
        id=m.id, model_name=m.model_name, model_version=m.model_version,
        class_name=m.class_name, state=_enum(o.BuildState, m.state), progress=m.progress,
        candidates=tuple(
            d.Candidate(
                name=k.name, quantization=_enum(c.Quantization, k.quantization),
                size_bytes=k.size_bytes, latency_p95_ms=k.latency_p95_ms,
                agreement=k.agreement, accuracy=k.accuracy if k.HasField("accuracy") else None,
                passed=k.passed, chosen=k.chosen, reasons=tuple(k.reasons), error=k.error,
                peak_memory_mb=k.peak_memory_mb, fallback=k.fallback,
                metric=(lowest_fidelity(k) or (0.0, ""))[1], notes=tuple(k.notes),
            )
            for k in m.candidates
        ),
        artifact_digest=m.artifact_digest, artifact_size=m.artifact_size, error=m.error,
        duration_s=m.duration_s, reused_from=m.reused_from, fallback_reason=m.fallback_reason,
    )  # fmt: skip


def _rollout_device(m: o.RolloutDevice) -> d.RolloutDevice:
    return d.RolloutDevice(
        device_id=m.device_id, device_name=m.device_name, class_name=m.class_name,
        stage=m.stage, state=_enum(o.RolloutDeviceState, m.state), reason=m.reason,
        attempts=m.attempts,
    )  # fmt: skip


def _excluded(m: o.ExcludedDevice) -> d.ExcludedDevice:
    return d.ExcludedDevice(m.device_id, m.device_name, m.reason)


def rollout_from_pb(m: o.Rollout, *, has_devices: bool = True) -> d.Rollout:
    specs: Sequence[o.StageSpec] = m.spec.stages
    return d.Rollout(
        id=m.id, model_name=m.spec.model_name, model_version=m.spec.model_version,
        state=_enum(o.RolloutState, m.state), current_stage=m.current_stage,
        stages=tuple(
            d.StageStatus(
                index=s.index, name=s.name, total=s.total, committed=s.committed,
                failed=s.failed, in_progress=s.in_progress, state=s.state,
                phase=_enum(o.StagePhase, s.phase), skipped=s.skipped,
                acknowledged_failed=s.acknowledged_failed, promoted_by=s.promoted_by,
                waiting=s.waiting,
                gates=tuple(d.Gate(g.name, g.value, g.limit, g.passing) for g in s.gates),
                shadow=s.index < len(specs) and specs[s.index].shadow,
                spec=format_stage(specs[s.index]) if s.index < len(specs) else "",
            )
            for s in m.stages
        ),
        devices=tuple(_rollout_device(x) for x in m.devices),
        excluded=tuple(_excluded(x) for x in m.excluded), reason=m.reason,
        cohort=format_cohort(m.spec), pacing=format_pacing(m.spec.pacing),
        created_at=_when(m.created_at), created_by=m.created_by, has_devices=has_devices,
    )  # fmt: skip
