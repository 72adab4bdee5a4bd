"""OperatorService: a thin adapter from gRPC to the services."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import Message

from edgefleet.controlplane.api import convert, limits, paging
from edgefleet.controlplane.api.rpc import Handlers, P, rpc
from edgefleet.controlplane.domain.delivery import Delivery
from edgefleet.controlplane.domain.roles import ADMIN, VIEWER
from edgefleet.controlplane.errors import InvalidArgument, NotFound
from edgefleet.controlplane.services import audit, auth, keys
from edgefleet.controlplane.services import references as ref
from edgefleet.controlplane.services.artifacts import ArtifactService
from edgefleet.controlplane.services.auth import OperatorPrincipal
from edgefleet.controlplane.services.builds import BuildService
from edgefleet.controlplane.services.classes import ClassService, ClassSpec, ClassUpdate
from edgefleet.controlplane.services.deployments import DeploymentService
from edgefleet.controlplane.services.devices import DeviceService
from edgefleet.controlplane.services.enrollment import EnrollmentService
from edgefleet.controlplane.services.events import EventBus, FleetEvent
from edgefleet.controlplane.services.operator_tokens import OperatorTokenService
from edgefleet.controlplane.services.registry import PartDecl, PushHeader, RegistryService
from edgefleet.controlplane.services.rollouts import RolloutService, RolloutView
from edgefleet.controlplane.services.telemetry import TelemetryService
from edgefleet.controlplane.wire import rule_from_pb
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc

Op = OperatorPrincipal

# Request fields that name a thing, by request message: operators may give
# its full id, its name or a unique id prefix (services/references.py).
# Resolved before any service sees the request, so services take full ids
# (classes: names) and responses carry them.
REFERENCE_FIELDS: dict[str, dict[str, ref.Kind]] = {
    "RevokeEnrollmentTokenRequest": {"id": ref.ENROLLMENT_TOKEN},
    "RevokeOperatorTokenRequest": {"id": ref.OPERATOR_TOKEN},
    "GetDeviceRequest": {"id": ref.DEVICE},
    "AcceptDeviceRequest": {"id": ref.DEVICE},
    "RejectDeviceRequest": {"id": ref.DEVICE},
    "DecommissionDeviceRequest": {"id": ref.DEVICE},
    "UpdateDeviceLabelsRequest": {"id": ref.DEVICE},
    "SetDeviceClassRequest": {"id": ref.DEVICE, "class_name": ref.DEVICE_CLASS},
    "AssignModelRequest": {"device_ids": ref.DEVICE},
    "UnassignModelRequest": {"device_ids": ref.DEVICE},
    "ListDeploymentsRequest": {"device_id": ref.DEVICE},
    "GetDeviceClassRequest": {"name": ref.DEVICE_CLASS},
    "UpdateDeviceClassRequest": {"name": ref.DEVICE_CLASS},
    "DeleteDeviceClassRequest": {"name": ref.DEVICE_CLASS},
    "RunBuildRequest": {"class_name": ref.DEVICE_CLASS},
    "GetBuildRequest": {"id": ref.BUILD},
    "CancelBuildRequest": {"id": ref.BUILD},
    "QueryTelemetryRequest": {"device_id": ref.DEVICE},
    "GetRolloutRequest": {"id": ref.ROLLOUT},
    "RolloutActionRequest": {"id": ref.ROLLOUT},
    "AbortRolloutRequest": {"id": ref.ROLLOUT},
    "RetryRolloutRequest": {"id": ref.ROLLOUT, "device_ids": ref.DEVICE},
    "SkipRolloutDevicesRequest": {"id": ref.ROLLOUT, "device_ids": ref.DEVICE},
    "UpdateRolloutRequest": {"id": ref.ROLLOUT},
}
# Fields whose texts that name nothing pass through: the service's own error
# says more ("not in rollout ...: name").
KEEP_UNKNOWN = frozenset({"RetryRolloutRequest.device_ids", "SkipRolloutDevicesRequest.device_ids"})


class OperatorServicer(Handlers, operator_pb2_grpc.OperatorServiceServicer):
    def __init__(
        self,
        *,
        enrollment: EnrollmentService,
        devices: DeviceService,
        classes: ClassService,
        registry: RegistryService,
        builds: BuildService,
        artifacts: ArtifactService,
        telemetry: TelemetryService,
        deployments: DeploymentService,
        rollouts: RolloutService,
        operator_tokens: OperatorTokenService,
        events: EventBus,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self._enrollment = enrollment
        self._devices = devices
        self._classes = classes
        self._registry = registry
        self._builds = builds
        self._artifacts = artifacts
        self._telemetry = telemetry
        self._deployments = deployments
        self._rollouts = rollouts
        self._operator_tokens = operator_tokens
        self._events = events
        self._references = ref.References(self.db)

    async def _resolve(self, request: Message) -> None:
        """Replace, in `request`, each reference of REFERENCE_FIELDS (a name
        or id prefix) with the full id it names; an unknown or ambiguous one
        is the RPC's error."""
        message = request.DESCRIPTOR.name
        fields = REFERENCE_FIELDS[message]

        def resolve() -> None:
            for field, kind in fields.items():
                value = getattr(request, field)
                if isinstance(value, str):
                    setattr(request, field, self._references.resolve(kind, value))
                else:
                    resolved = self._references.resolve_all(
                        kind, value, keep_unknown=f"{message}.{field}" in KEEP_UNKNOWN
                    )
                    del value[:]
                    value.extend(resolved)

        await self.run(resolve)

    # ------------------------------------------------------------ enrollment tokens

    @rpc("operator")
    async def CreateEnrollmentToken(
        self, request: operator_pb2.CreateEnrollmentTokenRequest, context: Any, who: Op
    ) -> operator_pb2.CreateEnrollmentTokenResponse:
        # Unset means the default; a policy this server does not know must not
        # fall back to the most permissive one.
        policy = (
            "auto-accept"
            if request.policy == operator_pb2.ENROLLMENT_POLICY_UNSPECIFIED
            else convert.enum_name(convert.POLICY_NAMES, request.policy, "policy")
        )
        ttl = convert.timedelta_from_pb(request.ttl, "ttl") if request.HasField("ttl") else None
        if ttl is not None and ttl <= dt.timedelta(0):
            raise InvalidArgument("token lifetime must be positive")
        row, secret = await self.run(
            self._enrollment.create_token,
            who.actor,
            name=request.name,
            policy=policy,
            labels=dict(request.labels),
            max_uses=request.max_uses,
            ttl=ttl,
        )
        return operator_pb2.CreateEnrollmentTokenResponse(
            token=convert.enrollment_token_to_pb(row), secret=secret
        )

    @rpc("operator", role=VIEWER)
    async def ListEnrollmentTokens(
        self, request: operator_pb2.ListEnrollmentTokensRequest, context: Any, who: Op
    ) -> operator_pb2.ListEnrollmentTokensResponse:
        rows = await self.run(self._enrollment.list_tokens, include_revoked=request.include_revoked)
        return operator_pb2.ListEnrollmentTokensResponse(
            tokens=[convert.enrollment_token_to_pb(r) for r in rows]
        )

    @rpc("operator")
    async def RevokeEnrollmentToken(
        self, request: operator_pb2.RevokeEnrollmentTokenRequest, context: Any, who: Op
    ) -> operator_pb2.EnrollmentToken:
        await self._resolve(request)
        row = await self.run(self._enrollment.revoke_token, who.actor, request.id)
        return convert.enrollment_token_to_pb(row)

    @rpc("operator", role=ADMIN)
    async def CreateOperatorToken(
        self, request: operator_pb2.CreateOperatorTokenRequest, context: Any, who: Op
    ) -> operator_pb2.CreateOperatorTokenResponse:
        role = convert.OPERATOR_ROLE_NAMES.get(request.role)
        if role is None:
            raise InvalidArgument("name the token's role: viewer, operator or admin")
        ttl = convert.timedelta_from_pb(request.ttl, "ttl") if request.HasField("ttl") else None
        view, secret = await self.run(
            self._operator_tokens.create, who.actor, name=request.name, role=role, ttl=ttl
        )
        return operator_pb2.CreateOperatorTokenResponse(
            token=convert.operator_token_to_pb(view), secret=secret
        )

    @rpc("operator", role=ADMIN)
    async def ListOperatorTokens(
        self, request: operator_pb2.ListOperatorTokensRequest, context: Any, who: Op
    ) -> operator_pb2.ListOperatorTokensResponse:
        views = await self.run(self._operator_tokens.list_tokens)
        return operator_pb2.ListOperatorTokensResponse(
            tokens=[convert.operator_token_to_pb(v) for v in views]
        )

    @rpc("operator", role=ADMIN)
    async def RevokeOperatorToken(
        self, request: operator_pb2.RevokeOperatorTokenRequest, context: Any, who: Op
    ) -> operator_pb2.OperatorToken:
        await self._resolve(request)
        view = await self.run(self._operator_tokens.revoke, who.actor, request.id)
        return convert.operator_token_to_pb(view)

    # ------------------------------------------------------------ devices

    @rpc("operator", role=VIEWER)
    async def ListDevices(
        self, request: operator_pb2.ListDevicesRequest, context: Any, who: Op
    ) -> operator_pb2.ListDevicesResponse:
        after = paging.decode(request, parts=2)

        def listed() -> operator_pb2.ListDevicesResponse:
            page = self._devices.list(
                state=convert.DEVICE_STATE_NAMES.get(request.state, ""),
                class_name=request.class_name,
                labels=dict(request.labels),
                unclassified=request.unclassified,
                include_decommissioned=request.include_decommissioned,
                page_size=paging.page_size(request.page_size),
                after=None if after is None else (after[0], after[1]),
            )
            response = operator_pb2.ListDevicesResponse(
                devices=[convert.device_to_pb(v) for v in page.devices],
                next_page_token=paging.encode(request, page.next_after),
            )
            # Devices that would take the page past the message size go to
            # the next page.
            cursors = [(v.row.name, v.row.id) for v in page.devices]
            paging.fit_page(request, response, "devices", cursors)
            return response

        # Converted in the thread as well: a whole fleet's conversion held the
        # event loop, and every sync stream's heartbeat, for a tenth of a
        # second per 1,000 devices (bench/bench_soak.py).
        return await self.run(listed)

    @rpc("operator", role=VIEWER)
    async def GetDevice(
        self, request: operator_pb2.GetDeviceRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        return convert.device_to_pb(await self.run(self._devices.get, request.id))

    @rpc("operator")
    async def AcceptDevice(
        self, request: operator_pb2.AcceptDeviceRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        return convert.device_to_pb(await self.run(self._devices.accept, who.actor, request.id))

    @rpc("operator")
    async def RejectDevice(
        self, request: operator_pb2.RejectDeviceRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        view = await self.run(self._devices.reject, who.actor, request.id, request.reason)
        return convert.device_to_pb(view)

    @rpc("operator")
    async def DecommissionDevice(
        self, request: operator_pb2.DecommissionDeviceRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        view = await self.run(self._devices.decommission, who.actor, request.id, request.reason)
        return convert.device_to_pb(view)

    @rpc("operator")
    async def UpdateDeviceLabels(
        self, request: operator_pb2.UpdateDeviceLabelsRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        view = await self.run(
            self._devices.update_labels, who.actor, request.id, dict(request.set), request.remove
        )
        return convert.device_to_pb(view)

    @rpc("operator")
    async def SetDeviceClass(
        self, request: operator_pb2.SetDeviceClassRequest, context: Any, who: Op
    ) -> common_pb2.Device:
        await self._resolve(request)
        view = await self.run(self._devices.set_class, who.actor, request.id, request.class_name)
        return convert.device_to_pb(view)

    # ------------------------------------------------------------ deployments

    @rpc("operator")
    async def AssignModel(
        self, request: operator_pb2.AssignModelRequest, context: Any, who: Op
    ) -> operator_pb2.AssignModelResponse:
        await self._resolve(request)
        views = await self.run(
            self._deployments.assign,
            who.actor,
            list(request.device_ids),
            request.model_name,
            request.model_version,
            reason=request.reason,
        )
        return operator_pb2.AssignModelResponse(
            assignments=[convert.device_assignment_to_pb(v) for v in views]
        )

    @rpc("operator")
    async def UnassignModel(
        self, request: operator_pb2.UnassignModelRequest, context: Any, who: Op
    ) -> operator_pb2.UnassignModelResponse:
        await self._resolve(request)
        done = await self.run(
            self._deployments.unassign,
            who.actor,
            list(request.device_ids),
            request.model_name,
            reason=request.reason,
        )
        return operator_pb2.UnassignModelResponse(
            removed=done.removed, not_assigned=done.not_assigned
        )

    @rpc("operator", role=VIEWER)
    async def ListDeployments(
        self, request: operator_pb2.ListDeploymentsRequest, context: Any, who: Op
    ) -> operator_pb2.ListDeploymentsResponse:
        await self._resolve(request)
        history = await self.run(
            self._deployments.history,
            device_id=request.device_id,
            model_name=request.model_name,
            version=request.model_version,
            limit=request.limit,
        )
        return operator_pb2.ListDeploymentsResponse(
            events=[convert.deployment_event_to_pb(e) for e in history.events],
            assignments=[convert.device_assignment_to_pb(a) for a in history.assignments],
        )

    # ------------------------------------------------------------ classes

    @rpc("operator")
    async def CreateDeviceClass(
        self, request: operator_pb2.CreateDeviceClassRequest, context: Any, who: Op
    ) -> common_pb2.DeviceClass:
        spec = ClassSpec(
            name=request.name,
            description=request.description,
            priority=request.priority,
            constraints=convert.constraints_from_pb(request.constraints),
            rules=tuple(rule_from_pb(r) for r in request.match_rules),
            delivery=Delivery(tuple(request.artifact_mirrors), request.max_download_rate),
        )
        return convert.class_to_pb(await self.run(self._classes.create, who.actor, spec))

    @rpc("operator", role=VIEWER)
    async def ListDeviceClasses(
        self, request: operator_pb2.ListDeviceClassesRequest, context: Any, who: Op
    ) -> operator_pb2.ListDeviceClassesResponse:
        views = await self.run(self._classes.list)
        return operator_pb2.ListDeviceClassesResponse(
            classes=[convert.class_to_pb(v) for v in views]
        )

    @rpc("operator", role=VIEWER)
    async def GetDeviceClass(
        self, request: operator_pb2.GetDeviceClassRequest, context: Any, who: Op
    ) -> common_pb2.DeviceClass:
        await self._resolve(request)
        return convert.class_to_pb(await self.run(self._classes.get, request.name))

    @rpc("operator")
    async def UpdateDeviceClass(
        self, request: operator_pb2.UpdateDeviceClassRequest, context: Any, who: Op
    ) -> common_pb2.DeviceClass:
        await self._resolve(request)
        change = ClassUpdate(
            description=request.description if request.HasField("description") else None,
            priority=request.priority if request.HasField("priority") else None,
            constraints=convert.constraint_changes(request.constraints),
            rules=(
                tuple(rule_from_pb(r) for r in request.match_rules)
                if request.replace_match_rules
                else None
            ),
            clear=tuple(request.clear_constraints),
            mirrors=(tuple(request.artifact_mirrors) if request.replace_artifact_mirrors else None),
            max_download_rate=(
                request.max_download_rate if request.HasField("max_download_rate") else None
            ),
        )
        view = await self.run(self._classes.update, who.actor, request.name, change)
        return convert.class_to_pb(view)

    @rpc("operator")
    async def DeleteDeviceClass(
        self, request: operator_pb2.DeleteDeviceClassRequest, context: Any, who: Op
    ) -> operator_pb2.DeleteDeviceClassResponse:
        await self._resolve(request)
        count = await self.run(self._classes.delete, who.actor, request.name)
        return operator_pb2.DeleteDeviceClassResponse(reclassified=count)

    # ------------------------------------------------------------ models

    @rpc("operator")
    async def PushModel(
        self,
        requests: AsyncIterator[operator_pb2.PushModelRequest],
        context: Any,
        who: Op,
    ) -> common_pb2.ModelVersion:
        stream = aiter(requests)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise InvalidArgument("empty push: send a PushModelHeader first") from None
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument("the first PushModel message must be the header")
        limits.check(first)  # a stream's messages are ours to check (rpc.py)
        h = first.header
        header = PushHeader(
            model_name=h.model_name,
            version=h.version,
            description=h.description,
            parts=tuple(
                PartDecl(convert.PART_NAMES.get(p.part, str(p.part)), p.size_bytes, p.sha256)
                for p in h.parts
            ),
            outputs=convert.declared_outputs(h.outputs),
            min_fidelity=h.min_fidelity if h.HasField("min_fidelity") else None,
        )
        upload = await self.run(self._registry.begin, header)
        try:
            async for message in stream:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                part = convert.PART_NAMES.get(message.chunk.part, str(message.chunk.part))
                upload.write(part, message.chunk.data)
            row = await self.run(self._registry.commit, who.actor, upload)
        finally:
            await asyncio.shield(self.run(upload.close))
        pushed = convert.model_version_to_pb(row, header.model_name)
        pushed.push_warnings.extend(await self.run(self._registry.shape_warnings, row))
        return pushed

    @rpc("operator", role=VIEWER)
    async def ListModels(
        self, request: operator_pb2.ListModelsRequest, context: Any, who: Op
    ) -> operator_pb2.ListModelsResponse:
        models = await self.run(self._registry.list_models)
        return operator_pb2.ListModelsResponse(models=[convert.model_to_pb(m) for m in models])

    @rpc("operator", role=VIEWER)
    async def GetModel(
        self, request: operator_pb2.GetModelRequest, context: Any, who: Op
    ) -> operator_pb2.GetModelResponse:
        summary, versions = await self.run(self._registry.get_model, request.name)
        return operator_pb2.GetModelResponse(
            model=convert.model_to_pb(summary),
            versions=[convert.model_version_to_pb(v, request.name) for v in versions],
        )

    @rpc("operator", role=VIEWER)
    async def GetModelVersion(
        self, request: operator_pb2.GetModelVersionRequest, context: Any, who: Op
    ) -> common_pb2.ModelVersion:
        row = await self.run(self._registry.get_version, request.model_name, request.version)
        return convert.model_version_to_pb(row, request.model_name)

    @rpc("operator")
    async def YankModelVersion(
        self, request: operator_pb2.YankModelVersionRequest, context: Any, who: Op
    ) -> common_pb2.ModelVersion:
        row = await self.run(
            self._registry.yank, who.actor, request.model_name, request.version, request.reason
        )
        return convert.model_version_to_pb(row, request.model_name)

    @rpc("operator")
    async def UnyankModelVersion(
        self, request: operator_pb2.UnyankModelVersionRequest, context: Any, who: Op
    ) -> common_pb2.ModelVersion:
        row = await self.run(
            self._registry.unyank, who.actor, request.model_name, request.version, request.reason
        )
        return convert.model_version_to_pb(row, request.model_name)

    @rpc("operator")
    async def DeleteModelVersion(
        self, request: operator_pb2.DeleteModelVersionRequest, context: Any, who: Op
    ) -> operator_pb2.DeleteModelVersionResponse:
        deleted = await self.run(
            self._registry.delete_version,
            who.actor,
            request.model_name,
            request.version,
            request.reason,
        )
        return operator_pb2.DeleteModelVersionResponse(
            builds_deleted=deleted.builds,
            artifacts_deleted=deleted.artifacts,
            blobs_deleted=deleted.blobs,
            bytes_freed=deleted.bytes_freed,
        )

    # ------------------------------------------------------------ builds, artifacts

    @rpc("operator")
    async def RunBuild(
        self, request: operator_pb2.RunBuildRequest, context: Any, who: Op
    ) -> operator_pb2.RunBuildResponse:
        await self._resolve(request)
        views = await self.run(
            self._builds.request,
            who.actor,
            request.model_name,
            request.model_version,
            request.class_name,
            request.force,
        )
        return operator_pb2.RunBuildResponse(builds=[convert.build_to_pb(v) for v in views])

    @rpc("operator", role=VIEWER)
    async def ListBuilds(
        self, request: operator_pb2.ListBuildsRequest, context: Any, who: Op
    ) -> operator_pb2.ListBuildsResponse:
        views = await self.run(
            self._builds.find,
            model_name=request.model_name,
            version=request.model_version,
            class_name=request.class_name,
            state=convert.BUILD_STATE_NAMES.get(request.state, ""),
        )
        return operator_pb2.ListBuildsResponse(builds=[convert.build_to_pb(v) for v in views])

    @rpc("operator", role=VIEWER)
    async def GetBuild(
        self, request: operator_pb2.GetBuildRequest, context: Any, who: Op
    ) -> operator_pb2.Build:
        await self._resolve(request)
        return convert.build_to_pb(await self.run(self._builds.get, request.id))

    @rpc("operator")
    async def CancelBuild(
        self, request: operator_pb2.CancelBuildRequest, context: Any, who: Op
    ) -> operator_pb2.Build:
        await self._resolve(request)
        return convert.build_to_pb(await self.run(self._builds.cancel, who.actor, request.id))

    @rpc("operator", role=VIEWER)
    async def ListArtifacts(
        self, request: operator_pb2.ListArtifactsRequest, context: Any, who: Op
    ) -> operator_pb2.ListArtifactsResponse:
        rows = await self.run(
            self._artifacts.find,
            model_name=request.model_name,
            version=request.model_version,
            class_name=request.class_name,
        )
        return operator_pb2.ListArtifactsResponse(
            artifacts=[convert.artifact_to_pb(r) for r in rows]
        )

    @rpc("operator", role=VIEWER)
    async def GetArtifact(
        self, request: operator_pb2.GetArtifactRequest, context: Any, who: Op
    ) -> operator_pb2.Artifact:
        return convert.artifact_to_pb(await self.run(self._artifacts.get, request.digest))

    # ------------------------------------------------------------ telemetry

    @rpc("operator", role=VIEWER)
    async def QueryTelemetry(
        self, request: operator_pb2.QueryTelemetryRequest, context: Any, who: Op
    ) -> operator_pb2.QueryTelemetryResponse:
        await self._resolve(request)
        query = convert.telemetry_query_from_pb(request)
        series = await self.run(self._telemetry.query, **query)
        return operator_pb2.QueryTelemetryResponse(series=[convert.series_to_pb(s) for s in series])

    # ------------------------------------------------------------ audit

    @rpc("operator", role=VIEWER)
    async def ListAuditLog(
        self, request: operator_pb2.ListAuditLogRequest, context: Any, who: Op
    ) -> operator_pb2.ListAuditLogResponse:
        page = await self.run(audit.search, self.db, convert.audit_search_from_pb(request))
        return operator_pb2.ListAuditLogResponse(
            entries=[
                convert.audit_to_pb(r, page.target_names.get(r.target, "")) for r in page.entries
            ]
        )

    # ------------------------------------------------------------ watch

    @rpc("operator", role=VIEWER)
    async def WatchFleet(
        self, request: operator_pb2.WatchFleetRequest, context: Any, who: Op
    ) -> AsyncIterator[operator_pb2.FleetEvent]:
        """Fleet events as they happen (of `request.kinds`, or all), until the
        client goes away. Drop-alerts are sent whatever the kinds."""
        mailbox = _Mailbox(frozenset(request.kinds), WATCH_QUEUE_SIZE)
        unsubscribe = self._events.subscribe(mailbox.offer)
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        loop = asyncio.get_running_loop()
        check_at = loop.time() + WATCH_REAUTH_S
        try:
            # Headers now, not with the first event: a client that awaits
            # them knows the watch is live and misses nothing after.
            await context.send_initial_metadata(())
            while True:
                if loop.time() >= check_at:
                    # The token was checked when the stream opened; one
                    # revoked or expired since (on any replica) ends it, as
                    # its next call would be refused, instead of streaming on.
                    await self.run(auth.authenticate_operator, self.db, authorization)
                    check_at = loop.time() + WATCH_REAUTH_S
                try:
                    async with asyncio.timeout(check_at - loop.time()):
                        at, event, dropped = await mailbox.take()
                except TimeoutError:
                    continue
                if dropped:
                    yield _fleet_event(at, FleetEvent("alert", message=_dropped_text(dropped)))
                out = _fleet_event(at, event)
                if event.kind == "rollout.updated" and event.subject:
                    try:
                        view = await self.run(self._rollouts.summary, event.subject)
                    except NotFound:
                        pass  # gone since: the id in `message` is all there is
                    else:
                        out.rollout.CopyFrom(convert.rollout_to_pb(view, with_devices=False))
                yield out
        finally:
            unsubscribe()

    # ------------------------------------------------------------ rollouts

    @rpc("operator")
    async def CreateRollout(
        self, request: operator_pb2.CreateRolloutRequest, context: Any, who: Op
    ) -> operator_pb2.CreateRolloutResponse:
        spec = convert.rollout_spec_from_pb(request.spec)

        def create() -> operator_pb2.CreateRolloutResponse:
            # Converted in the thread: the plan and the rollout name every
            # device (see _rollout_pb).
            view, plan = self._rollouts.create(
                who.actor, spec, dry_run=request.dry_run, start=request.start
            )
            planned, excluded = convert.planned_to_pb(plan)
            response = operator_pb2.CreateRolloutResponse(planned=planned, excluded=excluded)
            if view is not None:
                response.rollout.CopyFrom(convert.rollout_to_pb(view))
                response.rollout.excluded.extend(excluded)
            return response

        return await self.run(create)

    @rpc("operator", role=VIEWER)
    async def ListRollouts(
        self, request: operator_pb2.ListRolloutsRequest, context: Any, who: Op
    ) -> operator_pb2.ListRolloutsResponse:
        state = convert.ROLLOUT_STATE_NAMES.get(request.state, "")
        views = await self.run(self._rollouts.list_rollouts, state)
        return operator_pb2.ListRolloutsResponse(
            rollouts=[convert.rollout_to_pb(v, with_devices=False) for v in views]
        )

    @rpc("operator", role=VIEWER)
    async def GetRollout(
        self, request: operator_pb2.GetRolloutRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        if request.summary_only:
            view = await self.run(self._rollouts.summary, request.id)
            return convert.rollout_to_pb(view, with_devices=False)

        return await self._rollout_pb(
            self._rollouts.get, request.id, device_limit=request.device_limit or None
        )

    async def _rollout_pb(
        self, fn: Callable[P, RolloutView], *args: P.args, **kwargs: P.kwargs
    ) -> operator_pb2.Rollout:
        """fn's rollout, converted in the worker thread too. A rollout names
        every device (10,000 at fleet scale): converted on the event loop,
        each operator action stopped every device stream for 0.1-0.2 s
        (bench/bench_soak.py, docs/benchmarks.md)."""
        return await self.run(lambda: convert.rollout_to_pb(fn(*args, **kwargs)))

    @rpc("operator")
    async def StartRollout(
        self, request: operator_pb2.RolloutActionRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(self._rollouts.start, who.actor, request.id)

    @rpc("operator")
    async def PauseRollout(
        self, request: operator_pb2.RolloutActionRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(self._rollouts.pause, who.actor, request.id, request.reason)

    @rpc("operator")
    async def ResumeRollout(
        self, request: operator_pb2.RolloutActionRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(self._rollouts.resume, who.actor, request.id, request.reason)

    @rpc("operator")
    async def ApproveRolloutStage(
        self, request: operator_pb2.RolloutActionRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        stage = request.stage if request.HasField("stage") else None
        return await self._rollout_pb(self._rollouts.approve, who.actor, request.id, stage)

    @rpc("operator")
    async def AbortRollout(
        self, request: operator_pb2.AbortRolloutRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(
            self._rollouts.abort, who.actor, request.id, revert=request.revert,
            reason=request.reason,
        )  # fmt: skip

    @rpc("operator")
    async def RetryRollout(
        self, request: operator_pb2.RetryRolloutRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(
            self._rollouts.retry, who.actor, request.id, list(request.device_ids), request.reason
        )

    @rpc("operator")
    async def SkipRolloutDevices(
        self, request: operator_pb2.SkipRolloutDevicesRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        return await self._rollout_pb(
            self._rollouts.skip, who.actor, request.id, list(request.device_ids), request.reason
        )

    @rpc("operator")
    async def PromoteRollout(
        self, request: operator_pb2.RolloutActionRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        stage = request.stage if request.HasField("stage") else None
        return await self._rollout_pb(
            self._rollouts.promote, who.actor, request.id, request.reason, stage
        )

    @rpc("operator")
    async def UpdateRollout(
        self, request: operator_pb2.UpdateRolloutRequest, context: Any, who: Op
    ) -> operator_pb2.Rollout:
        await self._resolve(request)
        spec = convert.rollout_spec_from_pb(request.spec)
        return await self._rollout_pb(
            self._rollouts.update, who.actor, request.id, spec, request.reason
        )

    @rpc("operator", role=VIEWER)
    async def ListSigningKeys(
        self, request: operator_pb2.ListSigningKeysRequest, context: Any, who: Op
    ) -> operator_pb2.ListSigningKeysResponse:
        rows = await self.run(keys.all_keys, self.db)
        return operator_pb2.ListSigningKeysResponse(
            keys=[convert.signing_key_to_pb(r) for r in rows]
        )

    @rpc("operator", role=ADMIN)
    async def RotateSigningKey(
        self, request: operator_pb2.RotateSigningKeyRequest, context: Any, who: Op
    ) -> operator_pb2.RotateSigningKeyResponse:
        done = await self.run(keys.rotate, self.db, self._events, who.actor, reason=request.reason)
        return operator_pb2.RotateSigningKeyResponse(
            previous_key=convert.signing_key_to_pb(done.previous),
            new_key=convert.signing_key_to_pb(done.new),
            artifacts_resigned=done.artifacts_resigned,
        )


# ---------------------------------------------------------------- watch helpers

# Events a watcher may fall behind by before the oldest are dropped: a slow
# client must never hold up the bus, which also drives the sync hub.
WATCH_QUEUE_SIZE = 1024
# How often a watch checks its operator token again (revoked, expired).
WATCH_REAUTH_S = 5.0
# device.assigned can name thousands of devices; the text names this many.
WATCH_DEVICE_IDS = 20
# Device ids a watch event carries as ids (FleetEvent.device_ids): enough for
# a UI to re-read the devices an operator's action or a status report names,
# few enough that a 10,000-device assignment does not make one event huge.
WATCH_EVENT_DEVICE_IDS = 100


class _Mailbox:
    """One watcher's bounded queue, filled on the event loop by the bus. When
    full, the oldest event goes and is counted; the count is handed out with
    the next event taken, so the watcher learns what it missed. A rollout
    already waiting in the queue is not queued again: the watcher reads its
    current state when it gets there, so one read covers both."""

    def __init__(self, kinds: frozenset[str], size: int) -> None:
        self._kinds = kinds
        self._queue: asyncio.Queue[tuple[dt.datetime, FleetEvent]] = asyncio.Queue(size)
        self._dropped = 0
        self._rollouts: set[str] = set()

    def offer(self, event: FleetEvent) -> None:
        if self._kinds and event.kind not in self._kinds:
            return
        rollout = event.subject if event.kind == "rollout.updated" else ""
        if rollout and rollout in self._rollouts:
            return
        if self._queue.full():
            _, oldest = self._queue.get_nowait()
            self._forget(oldest)
            self._dropped += 1
        if rollout:
            self._rollouts.add(rollout)
        self._queue.put_nowait((dt.datetime.now(dt.UTC), event))

    async def take(self) -> tuple[dt.datetime, FleetEvent, int]:
        """The next event, when it was published, and how many were dropped
        before it."""
        at, event = await self._queue.get()
        self._forget(event)
        dropped, self._dropped = self._dropped, 0
        return at, event, dropped

    def _forget(self, event: FleetEvent) -> None:
        if event.kind == "rollout.updated":
            self._rollouts.discard(event.subject)


def _dropped_text(dropped: int) -> str:
    return (
        f"this watch fell behind and missed {dropped} event(s); "
        "re-read the state you show (the oldest were dropped)"
    )


def _event_text(event: FleetEvent) -> str:
    """`subject: message (devices a, b)`: what the bus event says, in words."""
    text = ": ".join(part for part in (event.subject, event.message) if part)
    ids = event.device_ids
    if ids:
        shown = ", ".join(ids[:WATCH_DEVICE_IDS])
        more = f" and {len(ids) - WATCH_DEVICE_IDS} more" if len(ids) > WATCH_DEVICE_IDS else ""
        devices = f"device {shown}" if len(ids) == 1 else f"devices {shown}{more}"
        text = f"{text} ({devices})" if text else devices
    return text


def _fleet_event(at: dt.datetime, event: FleetEvent) -> operator_pb2.FleetEvent:
    out = operator_pb2.FleetEvent(kind=event.kind, message=_event_text(event))
    if len(event.device_ids) <= WATCH_EVENT_DEVICE_IDS:
        out.device_ids.extend(event.device_ids)
    else:
        out.devices_elided = True
    out.at.FromDatetime(at)
    return out
