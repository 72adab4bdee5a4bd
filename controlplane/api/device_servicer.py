"""DeviceService: a thin adapter from gRPC to the enrollment and device services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.api import convert, limits
from edgefleet.controlplane.api.rpc import Handlers, rpc
from edgefleet.controlplane.domain.delivery import mirror_order
from edgefleet.controlplane.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from edgefleet.controlplane.services import keys
from edgefleet.controlplane.services.artifacts import ArtifactService
from edgefleet.controlplane.services.auth import DevicePrincipal
from edgefleet.controlplane.services.batching import Batcher, Coalescer
from edgefleet.controlplane.services.certificates import CertificateService, DeviceCertificate
from edgefleet.controlplane.services.deployments import (
    MULTI_MODEL_PROTOCOL,
    AssignmentView,
    DeploymentService,
    Desired,
)
from edgefleet.controlplane.services.devices import (
    ACCEPTED,
    DECOMMISSIONED,
    REJECTED,
    DesiredView,
    DeviceService,
)
from edgefleet.controlplane.services.enrollment import EnrollmentService, ReenrollmentProof
from edgefleet.controlplane.services.events import Pulse
from edgefleet.controlplane.services.hub import DeviceSession, SyncHub
from edgefleet.controlplane.services.ratelimit import StatusRateLimit, TelemetryRateLimit
from edgefleet.controlplane.services.status_buffer import StatusBuffer
from edgefleet.controlplane.services.telemetry import TelemetryService, Upload
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

# 1 MiB by default: 256 KiB chunks cost 20-40 % more CPU per GiB on both ends
# (bench/bench_download.py); the message limit leaves room up to 4 MiB.
MIN_CHUNK, DEFAULT_CHUNK, MAX_CHUNK = 64 * 1024, 1024 * 1024, 1024 * 1024
# Telemetry uploads are stored in group commits of up to TELEMETRY_BATCH
# (one transaction for every upload waiting, on one database thread). Up to
# MAX_TELEMETRY_IN_FLIGHT wait for one; more are refused with
# RESOURCE_EXHAUSTED at once, before they cost anything, and the agent sends
# the samples again with its next upload. A waiting upload holds no thread,
# only its samples: the bound is four commits, so that a 10,000-device
# fleet's uploads (333/s) outlast a rollout step holding SQLite's writer for
# a few seconds. At 256 (one commit) a quarter of the soak's attempts were
# refused, and every refusal and resend costs both ends more than waiting.
TELEMETRY_BATCH = 500
MAX_TELEMETRY_IN_FLIGHT = 4 * TELEMETRY_BATCH

log = logging.getLogger(__name__)


class _Reports:
    """One Sync stream's Hellos and status reports on their way to the
    database, at most at the device's write rate (ratelimit.StatusRateLimit).

    Past it the stream coalesces: it keeps only the latest Hello, the latest
    applied revision and the latest update status of each model, and one
    task writes them
    when the bucket has a token again. So a stream holds at most one report
    whatever its device sends, the database gets at most the rate, and a real
    agent's burst is never refused: what is lost is intermediate history
    (a "verifying" between "downloading" and "committed"), never the status
    the orchestrator acts on. Why not end the stream instead: an agent's
    normal bursts have no hard bound (a revision report per desired state an
    operator's script pushes, the steps of back-to-back updates), and a
    refused stream costs a reconnect with backoff and a missed push; a flood
    is ended by the received bucket anyway (StatusRateLimit.receive). On the
    event loop."""

    def __init__(
        self,
        device_id: str,
        limit: StatusRateLimit,
        record_hello: Callable[[str, device_pb2.Hello], Awaitable[None]],
        statuses: StatusBuffer,
        protocol: int = 0,
    ) -> None:
        self._device_id = device_id
        # The stream's protocol (its first Hello's): which fields carry the
        # statuses (Hello.protocol).
        self._multi = protocol >= MULTI_MODEL_PROTOCOL
        self._limit = limit
        self._record_hello = record_hello
        self._buffer = statuses
        # What is held: None where nothing is.
        self._hello: device_pb2.Hello | None = None
        self._revision: int | None = None
        # Per model name, its latest status.
        self._updates: dict[str, common_pb2.UpdateStatus] = {}
        self._task: asyncio.Task[None] | None = None
        # Reports folded into one held before it was written (for tests).
        self.coalesced = 0

    def _holds(self) -> bool:
        return self._hello is not None or self._revision is not None

    def _statuses(
        self, single: common_pb2.UpdateStatus | None, models: Sequence[common_pb2.UpdateStatus]
    ) -> list[common_pb2.UpdateStatus]:
        """The statuses a message carries, from the fields its protocol uses:
        `models` for protocol 2, the one `update` for protocol 1 (whatever
        the other field holds)."""
        if self._multi:
            return list(models)
        return [single] if single is not None else []

    async def hello(self, hello: device_pb2.Hello) -> None:
        """A Hello: its hardware and runtime, and the statuses it carries
        (only with an applied revision, as always)."""
        revision = hello.applied_revision or None
        single = hello.update if hello.HasField("update") else None
        updates = self._statuses(single, hello.models) if revision else []
        await self._add(hello, revision, updates)

    async def status(self, report: device_pb2.StatusReport) -> None:
        single = report.update if report.HasField("update") else None
        await self._add(None, report.applied_revision, self._statuses(single, report.models))

    async def _add(
        self,
        hello: device_pb2.Hello | None,
        revision: int | None,
        updates: list[common_pb2.UpdateStatus],
    ) -> None:
        if self._task is None and not self._holds() and self._limit.write(self._device_id) == 0:
            await self._write(hello, revision, updates)  # the common case
            return
        if self._holds():
            if not self.coalesced:
                log.info(
                    "device %s sends status reports faster than %g a second; "
                    "this stream keeps only the latest until it slows down",
                    self._device_id, self._limit.write_rate_per_s,
                )  # fmt: skip
            self.coalesced += 1
        if hello is not None:
            self._hello = hello
        if revision is not None:
            self._revision = revision
        for update in updates:
            self._updates[update.model_name] = update
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._holds():
                wait = self._limit.write(self._device_id)
                if wait:
                    await asyncio.sleep(wait)
                    continue
                held = self._hello, self._revision, list(self._updates.values())
                self._hello = self._revision = None
                self._updates = {}
                await self._write(*held)
        except Exception:
            # Dropped: the next stream's Hello carries the status again.
            log.exception("could not record a status report of device %s", self._device_id)
        finally:
            self._task = None

    async def _write(
        self,
        hello: device_pb2.Hello | None,
        revision: int | None,
        updates: list[common_pb2.UpdateStatus],
    ) -> None:
        if hello is not None:
            await self._record_hello(self._device_id, hello)
        if revision is not None:
            self._offer(revision, updates)

    def _offer(self, revision: int, updates: list[common_pb2.UpdateStatus]) -> None:
        if not updates:
            self._buffer.offer(self._device_id, revision, {})
        for update in updates:
            self._buffer.offer(self._device_id, revision, convert.update_status_to_dict(update))

    def close(self) -> None:
        """The stream ended: the task is cancelled and a held status offered
        if the bucket allows (a held Hello's hardware waits for the next
        stream's Hello, which also carries the status again)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._revision is not None and self._limit.write(self._device_id) == 0:
            self._offer(self._revision, list(self._updates.values()))
        self._hello = self._revision = None
        self._updates = {}


class DeviceServicer(Handlers, device_pb2_grpc.DeviceServiceServicer):
    def __init__(
        self,
        *,
        enrollment: EnrollmentService,
        devices: DeviceService,
        artifacts: ArtifactService,
        hub: SyncHub,
        telemetry: TelemetryService,
        deployments: DeploymentService,
        statuses: StatusBuffer,
        telemetry_pulse: Pulse,
        agent_config: device_pb2.AgentConfig,
        certificates: CertificateService | None = None,
        telemetry_rate: TelemetryRateLimit | None = None,
        status_rate: StatusRateLimit | None = None,
        device_endpoint: str = "",
        artifact_url: str = "",
        artifact_mirrors: tuple[str, ...] = (),
        **base: Any,
    ) -> None:
        super().__init__(**base)
        # Artifact downloads over HTTP (scheme://host:port); "" when off.
        self._artifact_url = artifact_url
        self._artifact_mirrors = artifact_mirrors
        self._certificates = certificates
        # Where agents with a certificate send device RPCs (host:port); ""
        # in plain-text mode.
        self.device_endpoint = device_endpoint
        self._enrollment = enrollment
        self._devices = devices
        self._artifacts = artifacts
        self._hub = hub
        self._telemetry = telemetry
        self._deployments = deployments
        self._statuses = statuses
        self._telemetry_pulse = telemetry_pulse
        # Uploads waiting for or holding a database thread (event loop only).
        self._telemetry_in_flight = 0
        self._telemetry_rate = telemetry_rate or TelemetryRateLimit()
        # Per device: the Hellos and status reports of its Sync streams.
        self._status_rate = status_rate or StatusRateLimit()
        self._agent_config = agent_config
        self._desired = Coalescer(self._desired_many)
        self._uploads = Batcher(self._ingest_many, max_batch=TELEMETRY_BATCH)

    @rpc("none")
    async def Enroll(
        self, request: device_pb2.EnrollRequest, context: Any, _: None
    ) -> device_pb2.EnrollResponse:
        result = await self.run(
            self._enrollment.enroll,
            token=request.enrollment_token,
            hardware_id=request.hardware_id,
            name=request.name,
            labels=dict(request.labels),
            hardware=convert.hardware_to_dict(request.hardware),
            runtime=convert.runtime_to_dict(request.runtime),
            csr=request.csr,
            proof=ReenrollmentProof(
                device_id=request.proof.device_id,
                credential=request.proof.device_credential,
                certificate_pem=request.proof.certificate_pem,
                signature=request.proof.signature,
            ),
        )
        signing_keys = await self.run(keys.public_keys, self.db)
        response = device_pb2.EnrollResponse(
            device_id=result.device_id,
            device_credential=result.credential,
            state=convert.DEVICE_STATES[result.state],
            signing_keys=[convert.signing_key_to_pb(k) for k in signing_keys],
        )
        if result.certificate is not None:
            response.certificate.CopyFrom(self._certificate_pb(result.certificate))
        return response

    def _certificate_pb(self, issued: DeviceCertificate) -> device_pb2.DeviceCertificate:
        pb = device_pb2.DeviceCertificate(
            certificate_pem=issued.certificate_pem,
            ca_certificate_pem=issued.ca_certificate_pem,
            device_endpoint=self.device_endpoint,
        )
        pb.not_after.FromDatetime(issued.not_after)
        return pb

    @rpc("device")
    async def RenewCertificate(
        self, request: device_pb2.RenewCertificateRequest, context: Any, device: DevicePrincipal
    ) -> device_pb2.RenewCertificateResponse:
        if self._certificates is None:
            raise FailedPrecondition(
                "this control plane serves plain text and issues no certificates"
            )
        issued = await self.run(self._certificates.renew, device.device_id, request.csr)
        return device_pb2.RenewCertificateResponse(certificate=self._certificate_pb(issued))

    def _desired_pb(
        self, device_id: str, view: DesiredView, assignments: list[AssignmentView], protocol: int
    ) -> device_pb2.ControlMessage:
        """The desired state as the agent's protocol reads it: protocol 2
        gets every assignment (and `assignment` too when there is exactly
        one); protocol 0/1 gets `assignment` only, the one assignment (the
        highest sequence, with a warning, if the device somehow holds
        several: assignments refuse a second model to such a device)."""
        desired = device_pb2.DesiredState(
            revision=view.revision,
            device_state=convert.DEVICE_STATES[view.device_state],
            class_name=view.class_name,
            labels=view.labels,
            config=self._agent_config,
            key_rotations=convert.key_rotations_to_pb(view.key_rotations),
        )
        # Pending, rejected and decommissioned devices get no work.
        if not assignments or view.device_state != ACCEPTED:
            return device_pb2.ControlMessage(desired=desired)
        # The class's own mirrors (a site's) before the server-wide ones.
        mirrors = mirror_order(view.delivery.mirrors, self._artifact_mirrors)
        rate = view.delivery.max_download_rate
        if protocol >= MULTI_MODEL_PROTOCOL:
            desired.assignments.extend(
                convert.assignment_to_pb(a, self._artifact_url, mirrors, rate) for a in assignments
            )
            if len(assignments) == 1:
                desired.assignment.CopyFrom(desired.assignments[0])
            return device_pb2.ControlMessage(desired=desired)
        single = max(assignments, key=lambda a: a.sequence)
        if len(assignments) > 1:
            log.warning(
                "device %s speaks the one-model protocol but holds %d models; sending only "
                "%s@%s (the latest) until its agent is upgraded",
                device_id, len(assignments), single.model_name, single.model_version,
            )  # fmt: skip
        desired.assignment.CopyFrom(
            convert.assignment_to_pb(single, self._artifact_url, mirrors, rate)
        )
        return device_pb2.ControlMessage(desired=desired)

    async def _desired_many(self, device_ids: list[str]) -> dict[str, Desired]:
        return await self.run(self._deployments.desired_many, device_ids)

    async def _ingest_many(self, uploads: list[Upload]) -> list[int | DomainError]:
        return await self.run(self._telemetry.ingest_many, uploads)

    @rpc("device")
    async def Sync(
        self,
        requests: AsyncIterator[device_pb2.AgentMessage],
        context: Any,
        device: DevicePrincipal,
    ) -> None:
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "hello":
            raise InvalidArgument("the first message on a sync stream must be Hello")
        # A device reconnecting right after its stream was ended for a
        # flood is refused here, before its Hello is written.
        self._status_rate.receive(device.device_id)
        limits.check(first)
        protocol = first.hello.protocol
        reports = _Reports(
            device.device_id, self._status_rate, self._record_hello, self._statuses, protocol
        )
        try:
            await reports.hello(first.hello)
        except BaseException:
            reports.close()
            raise
        session = self._hub.connect(device.device_id)
        write_lock = asyncio.Lock()
        reader: asyncio.Task[None] | None = None
        sent_revision = 0
        epoch = ""
        try:
            while True:
                desired = await self._desired.get(device.device_id)
                if desired is None:
                    raise NotFound(f"no device with id {device.device_id!r}")
                view, assignments = desired
                epoch = epoch or view.credential_epoch
                if view.credential_epoch != epoch:
                    if view.device_state in (REJECTED, DECOMMISSIONED):
                        # Its credential died with the operator's decision.
                        raise PermissionDenied(f"device {device.device_id} is {view.device_state}")
                    # The device enrolled again since this stream opened: the
                    # credential it was opened with is dead, and whoever holds
                    # it gets nothing more.
                    raise Unauthenticated(
                        f"device {device.device_id} enrolled again; this stream's credential "
                        "was replaced"
                    )
                if view.revision > sent_revision:
                    async with write_lock:
                        await context.write(
                            self._desired_pb(device.device_id, view, assignments, protocol)
                        )
                    sent_revision = view.revision
                if view.device_state in (REJECTED, DECOMMISSIONED):
                    raise PermissionDenied(f"device {device.device_id} is {view.device_state}")
                if reader is None:
                    # Only after the first DesiredState: it is always the first reply.
                    reader = asyncio.create_task(
                        self._read(requests, context, session, write_lock, reports)
                    )
                    reader.add_done_callback(lambda _: session.wake.set())
                await session.wake.wait()
                session.wake.clear()
                if reader.done():
                    reader.result()  # re-raise what ended the read side
                    return
                if session.closed_reason:
                    raise session.closed_error(session.closed_reason)
        finally:
            if reader is not None:
                reader.cancel()
            reports.close()
            self._hub.disconnect(session)

    async def _read(
        self,
        requests: AsyncIterator[device_pb2.AgentMessage],
        context: Any,
        session: DeviceSession,
        write_lock: asyncio.Lock,
        reports: _Reports,
    ) -> None:
        # The hot path: keep per-heartbeat work to a dict update and one write.
        async for message in requests:
            self._hub.seen(session)
            kind = message.WhichOneof("kind")
            if kind == "heartbeat":
                ack = device_pb2.HeartbeatAck(seq=message.heartbeat.seq, server_time=Timestamp())
                ack.server_time.GetCurrentTime()
                async with write_lock:
                    await context.write(device_pb2.ControlMessage(heartbeat_ack=ack))
                continue
            # Anything else is counted against the device's bucket first: a
            # flood ends the stream with RESOURCE_EXHAUSTED (ratelimit.py).
            self._status_rate.receive(session.device_id)
            # A status's strings are written in batches with other
            # devices' (status_buffer): one bad value must stop here.
            limits.check(message)
            if kind == "status":
                await reports.status(message.status)
            elif kind == "hello":
                await reports.hello(message.hello)

    async def _record_hello(self, device_id: str, hello: device_pb2.Hello) -> None:
        """A Hello's hardware, runtime and protocol (its statuses go to the
        buffer)."""
        await self.run(
            self._devices.record_hello,
            device_id,
            convert.hardware_to_dict(hello.hardware),
            convert.runtime_to_dict(hello.runtime),
            hello.protocol,
        )

    @rpc("device")
    async def DownloadArtifact(
        self, request: device_pb2.DownloadArtifactRequest, context: Any, device: DevicePrincipal
    ) -> AsyncIterator[device_pb2.ArtifactChunk]:
        # Verified against its digest before it is served (DATA_LOSS if damaged).
        with await self.run(
            self._artifacts.open_for_device, device.device_id, request.digest
        ) as blob:
            size = blob.size
            if request.offset > size:
                raise OutOfRange(
                    f"offset {request.offset} is past the end of the {size}-byte artifact; "
                    "restart the download from 0"
                )
            chunk = min(max(request.chunk_size or DEFAULT_CHUNK, MIN_CHUNK), MAX_CHUNK)
            offset = request.offset
            # Page-cache reads of at most 1 MiB are short enough for the loop;
            # an executor hop per chunk would cost more than the read.
            while offset < size:
                data = blob.read(offset, chunk)  # Unavailable if the file changed
                yield device_pb2.ArtifactChunk(offset=offset, data=data, total_size=size)
                offset += len(data)

    @rpc("device")
    async def UploadTelemetry(
        self, request: device_pb2.UploadTelemetryRequest, context: Any, device: DevicePrincipal
    ) -> device_pb2.UploadTelemetryResponse:
        if self._telemetry_in_flight >= MAX_TELEMETRY_IN_FLIGHT:
            # Shed telemetry first when the database threads are backed up:
            # waiting would only time out (and be resent) while status
            # reports and syncs queue behind it. Agents keep the samples
            # buffered and send them with their next upload.
            raise ResourceExhausted(
                "the control plane is busy; keep the samples buffered and send them "
                "with the next upload"
            )
        # Per device, before anything is converted or stored: a flooding
        # credential is refused whole with the delay to wait (ratelimit.py).
        self._telemetry_rate.charge(device.device_id, len(request.samples))
        samples = [convert.sample_from_pb(s) for s in request.samples]
        # Before the upload joins a group commit: a value no column holds
        # would fail every upload committed with it (api/limits.py).
        limits.check_rows(samples, "TelemetrySample", "samples")
        self._telemetry_in_flight += 1
        try:
            # Always the authenticated device: a request cannot name another.
            acked = await self._uploads.submit((device.device_id, samples))
        finally:
            self._telemetry_in_flight -= 1
        self._telemetry_pulse.add(len(samples))
        return device_pb2.UploadTelemetryResponse(acked_seq=acked)
