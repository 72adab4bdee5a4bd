"""The agent's main loop: enroll once, then keep the Sync stream to the control
plane up, apply newer desired states and report them.

The loop has two steps, ENROLL and SYNC. A step never picks its successor:
it ends in a gRPC status (or a clean end of stream), and the pure `decide`
maps (step, status) to the next step and how long to wait first. `Backoff`
computes the waits. Both live in agent/reconnect.py (fleetsim reconnects by
the same table) and are unit-tested without a network.

Everything the agent learns is persisted before it acts on it: the identity
before the first Sync, a desired state before it is reported as applied.
Except on a full disk (agent/disk.py): then a desired state is applied from
memory and written again with backoff until it lands (the control plane
resends its current state on every connect, so losing it to a restart is
harmless), the device keeps serving, and it tells the control plane: a Hello
with the free space and "disk full: ..." as the update status's reason.

The agent speaks sync protocol 2 (Hello.protocol): a device holds several
models. A desired state's assignments (one per model name) go to the models'
update machines (agent/update/models.py), each on its own thread; a model
held but not listed is unassigned and unloaded. The machines' status
reports come back here and go out on the Sync stream, batched into
StatusReport.models (one status per model per message). A control plane that
sends only the singular `assignment` (protocol 1) is read as assigning that
one model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc
import grpc.aio
import psutil

from edgefleet.agent import identity as store
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.disk import DiskCondition, RetriedWrite, is_disk_full, retry_delay
from edgefleet.agent.errors import AgentError, DiskFull, NotProvisioned, StateError
from edgefleet.agent.hardware import detect_hardware, detect_runtime
from edgefleet.agent.identity import Identity
from edgefleet.agent.inference_server import start_inference_server
from edgefleet.agent.power import PowerPolicy, PowerThresholds, PsutilSensors
from edgefleet.agent.reconnect import Backoff, Delay, Step, decide
from edgefleet.agent.serving import ModelHost
from edgefleet.agent.telemetry import RequestStats, ResourceProbe
from edgefleet.agent.telemetry_buffer import WHAT as TELEMETRY_BUFFER
from edgefleet.agent.telemetry_buffer import TelemetryBuffer
from edgefleet.agent.telemetry_uploader import TelemetryMetrics, TelemetryUploader, serve_metrics
from edgefleet.agent.transport import (
    RENEW_RETRY_S,
    DeviceTls,
    Transport,
    from_response,
    new_key_and_csr,
    sign_reenrollment,
    transport_hint,
)
from edgefleet.agent.update.activation import HostActivator
from edgefleet.agent.update.http_download import HttpDownloader
from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.models import ModelUpdate, ModelUpdates
from edgefleet.agent.update.ports import Ports
from edgefleet.agent.update.rate_limit import RateLimitedDownloader, effective_rate
from edgefleet.agent.update.remote import GrpcDownloader, StatusReporter
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.store import Assignment, UpdateRecord, UpdateStore
from edgefleet.agent.update.trust import TrustStore
from edgefleet.agent.update.validate import ManifestValidator
from edgefleet.agent.update.verify import DeviceVerifier
from edgefleet.jobs import BackgroundJob, BackgroundJobs
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

log = logging.getLogger("edgefleet.agent")

ENROLL_TIMEOUT_S = 20.0
# How long shutdown may take after SIGTERM before the process exits anyway.
STOP_GRACE_S = 2.0
# In-flight inference calls get this long to finish when the agent stops.
STOP_SERVING_GRACE_S = 0.5
_MIB = 1024 * 1024
# The sync protocol this agent speaks (Hello.protocol): several models.
PROTOCOL = 2


def channel_options(config: AgentConfig) -> list[tuple[str, int]]:
    """gRPC channel options for the agent's connection."""
    return [
        # Keepalive finds a dead connection (a NAT that forgot us, a pulled
        # cable) in about a minute instead of the TCP retransmit timeout. It
        # stays well above the heartbeat interval so the server's ping-abuse
        # policy never fires: every heartbeat ack resets its ping strikes.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # A fresh channel is made per attempt, but within one attempt gRPC's
        # own reconnect backoff must not outgrow ours.
        ("grpc.max_reconnect_backoff_ms", int(config.backoff_max_s * 1000)),
    ]


def describe_desired(desired: device_pb2.DesiredState) -> str:
    """The one log line written when a desired state is applied."""
    state = common_pb2.DeviceState.Name(desired.device_state).removeprefix("DEVICE_STATE_")
    labels = ",".join(f"{key}={value}" for key, value in sorted(desired.labels.items()))
    return (
        f"desired state revision {desired.revision}: state={state.lower()} "
        f"class={desired.class_name or '-'} labels={labels or '-'}"
    )


def onnxruntime_providers(setting: str) -> list[str] | None:
    """The providers list for the config's `onnxruntime_providers` text
    ("auto", "cpu", or execution provider names separated by commas)."""
    names = [part.strip() for part in setting.split(",") if part.strip()]
    if not names or names == ["cpu"]:
        return None
    # Not imported from edgefleet.agent.runtimes.onnxruntime: that loads onnxruntime,
    # which an idle agent must not pay for.
    return ["CPUExecutionProvider" if n.lower() == "cpu" else n for n in names]


def assignment_from_pb(
    pb: device_pb2.Assignment, key_rotations: Iterable[common_pb2.KeyRotation] = ()
) -> Assignment:
    """The update machine's view of an assignment, with the key rotations of
    the desired state it came in (Verifying walks them)."""
    return Assignment(
        model_name=pb.model_name,
        model_version=pb.model_version,
        artifact_digest=pb.artifact_digest,
        artifact_size=pb.artifact_size,
        manifest=pb.manifest,
        manifest_signature=pb.manifest_signature,
        rollout_id=pb.rollout_id,
        sequence=pb.sequence,
        shadow=pb.shadow,
        statement=pb.statement,
        statement_signature=pb.statement_signature,
        rollback=pb.rollback,
        key_rotations=tuple((r.statement, r.signature) for r in key_rotations),
        sources=tuple((s.base_url, s.control_plane) for s in pb.sources),
        max_download_rate=pb.max_download_rate,
    )


def assignment_from_desired(desired: device_pb2.DesiredState) -> Assignment:
    """The assignment of a desired state that has one."""
    return assignment_from_pb(desired.assignment, desired.key_rotations)


def assignments_from_desired(desired: device_pb2.DesiredState) -> list[Assignment]:
    """Every model's assignment in a desired state: `assignments`; or, from
    a control plane that only sets the singular `assignment` (protocol 1),
    that one."""
    if desired.assignments:
        return [assignment_from_pb(a, desired.key_rotations) for a in desired.assignments]
    if desired.HasField("assignment"):
        return [assignment_from_desired(desired)]
    return []


def removes_unlisted(desired: device_pb2.DesiredState) -> bool:
    """Whether models missing from `desired` are to be unloaded: only for an
    accepted device. A pending, rejected or decommissioned device's desired
    state lists nothing and changes nothing on it (as before several
    models)."""
    return desired.device_state == common_pb2.DEVICE_STATE_ACCEPTED


def batch_statuses(
    statuses: Iterable[common_pb2.UpdateStatus],
) -> list[list[common_pb2.UpdateStatus]]:
    """`statuses` in order, cut into batches holding each model at most once
    (StatusReport.models: one status per model that changed)."""
    batches: list[list[common_pb2.UpdateStatus]] = []
    names: set[str] = set()
    for status in statuses:
        if not batches or status.model_name in names:
            batches.append([])
            names = set()
        batches[-1].append(status)
        names.add(status.model_name)
    return batches


def report_served(stats: RequestStats, models: ModelHost) -> None:
    """Tell `stats` which models `models` serves, which artifact of each and
    the memory each adds (telemetry's per-model samples, their `variant` and
    `model_memory_mb`)."""

    def served() -> list[tuple[str, str]]:
        return [(m.name, m.version) for m in models.served()]

    def variants() -> dict[tuple[str, str], int]:
        return {(m.name, m.version): int(m.variant) for m in models.served()}

    def model_memory() -> dict[tuple[str, str], float]:
        return {(m.name, m.version): m.memory_mb for m in models.served()}

    stats.served = served
    stats.variants = variants
    stats.model_memory = model_memory


# ---------------------------------------------------------------- the agent's parts


@dataclass
class DeviceLink:
    """Who this device is to the control plane and how it reaches it:
    detected at boot, changed by enrollment and certificate renewal."""

    hardware_id: str
    hardware: common_pb2.HardwareProfile
    runtime: common_pb2.RuntimeFingerprint
    # Plain text or TLS, and the device's certificate.
    transport: Transport
    identity: Identity | None = None
    # Set once there is a credential (telemetry waits for one).
    has_identity: asyncio.Event = field(default_factory=asyncio.Event)
    # Set whenever a new identity or device certificate is adopted: the
    # renewal loop plans again from the new certificate.
    credentials_changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the live connections must move to another certificate
    # (renewed, or expired and about to be replaced by enrolling again).
    reconnect: asyncio.Event = field(default_factory=asyncio.Event)

    def adopt_identity(self, identity: Identity) -> None:
        """Use `identity` from now on (the caller persisted it)."""
        self.identity = identity
        self.has_identity.set()
        self.credentials_changed.set()

    def adopt_certificate(self, device: DeviceTls) -> None:
        """Persist and use a new key and certificate (channels made from now on)."""
        self.transport.adopt(device)
        self.credentials_changed.set()

    def credential(self) -> str:
        # Read at every call: a re-enrollment replaces the credential.
        assert self.identity is not None
        return self.identity.device_credential

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.credential()}"),)


@dataclass
class SyncState:
    """What the Sync stream has applied, and how it talks."""

    heartbeat_interval_s: float
    applied_revision: int = 0
    class_name: str = ""
    # The desired state stored when the agent booted: its assignment resumes
    # once the update machine runs.
    boot_desired: device_pb2.DesiredState | None = None
    # Set when the heartbeat interval changed (the heartbeat task waits again).
    interval_changed: asyncio.Event = field(default_factory=asyncio.Event)
    heartbeat_seq: int = 0
    # Whether the current stream received anything (then the backoff restarts).
    received_in_session: bool = False
    # Set while a Sync stream is up: where Hellos and status reports go.
    outbox: asyncio.Queue[device_pb2.AgentMessage] | None = None


@dataclass(frozen=True)
class Serving:
    """The on-device inference side: the models, what their requests
    measure, and the power policy that bounds their concurrency."""

    models: ModelHost
    stats: RequestStats
    power: PowerPolicy


@dataclass(frozen=True)
class Updates:
    """Every model's update machine, each on its thread."""

    models: ModelUpdates


# Wraps a model's update machine ports (the model's name, its ports), to
# inject faults (crash tests only: agent/update/faults.py; agent/main.py
# passes one when told to).
UpdateFaults = Callable[[str, Ports], Ports]


# ---------------------------------------------------------------- the agent


class Agent:
    """One device's connection to the control plane. `run` loops until
    cancelled, and raises AgentError only for fatal problems.

    Its state lives in a few parts: the DeviceLink (identity, hardware,
    transport) and the SyncState, made by `boot`; Serving and Updates, made
    by `run`; and the background jobs `run` starts beside the Sync loop
    (power policy, retried desired-state writes, telemetry upload,
    certificate renewal), which it stops together when it ends."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        update_faults: UpdateFaults | None = None,
    ) -> None:
        self.config = config
        self._backoff = Backoff(config.backoff_initial_s, config.backoff_max_s, rng)
        self._sleep = sleep
        self._update_faults = update_faults
        # Made by boot().
        self._link: DeviceLink | None = None
        self._sync_state = SyncState(config.heartbeat_interval_s)
        # Made by run() (which also makes the Serving part, for itself).
        self._updates: Updates | None = None
        # Set while the telemetry job runs: it moves to a new certificate.
        self._uploader: TelemetryUploader | None = None
        # Statuses waiting to go out together (_send_status).
        self._pending_statuses: list[common_pb2.UpdateStatus] = []
        # Which state writes wait for room on a full disk (agent/disk.py).
        self._disk = DiskCondition()
        self._desired_writes: RetriedWrite[device_pb2.DesiredState] = RetriedWrite(
            "desired.json",
            lambda desired: store.save_desired(self.config.state_dir, desired),
            self._disk,
        )

    @property
    def can_enroll(self) -> bool:
        """Whether an enrollment token is configured."""
        return bool(self.config.enrollment_token)

    @property
    def link(self) -> DeviceLink:
        """The device's identity, hardware and transport (made by boot())."""
        assert self._link is not None, "boot() makes the link"
        return self._link

    # ------------------------------------------------------------ boot

    def boot(self) -> Step:
        """Load persisted state and detect the machine; the first step to run.
        Raises StateError or NotProvisioned when the agent cannot start."""
        state_dir = self.config.state_dir
        store.ensure_state_dir(state_dir)
        hardware_id = store.resolve_hardware_id(self.config.hardware_id, state_dir)
        hardware = detect_hardware(state_dir, self.config.hardware)
        log.info(
            "hardware id %s: %s %s, %d cores, %d MiB, accelerators: %s",
            hardware_id,
            hardware.os_release,
            hardware.arch,
            hardware.cpu_cores,
            hardware.memory_mb,
            ", ".join(a.name or a.kind for a in hardware.accelerators) or "none",
        )
        link = DeviceLink(
            hardware_id=hardware_id,
            hardware=hardware,
            runtime=detect_runtime(),
            transport=Transport(
                self.config.server,
                self.config.ca_cert,
                state_dir,
                channel_options(self.config),
                insecure=self.config.insecure,
            ),
        )
        self._link = link
        identity = self._load_identity(hardware_id)
        if identity is not None:
            link.adopt_identity(identity)
        try:
            desired = store.load_desired(state_dir)
        except StateError as exc:
            # Harmless to lose: the control plane resends its current state.
            log.warning("ignoring the stored desired state: %s", exc.message)
            desired = None
        if desired is not None:
            self._sync_state.applied_revision = desired.revision
            self._sync_state.class_name = desired.class_name
            self._adopt_config(desired.config)
        self._sync_state.boot_desired = desired

        if identity is not None:
            log.info("device %s (server %s)", identity.device_id, identity.server)
            return Step.SYNC
        if not self.can_enroll:
            raise NotProvisioned(
                f"no identity in {state_dir / store.IDENTITY_FILE} and no enrollment token "
                "configured; set enrollment_token in the config file or "
                "EDGEFLEET_AGENT_ENROLLMENT_TOKEN"
            )
        return Step.ENROLL

    def _load_identity(self, hardware_id: str) -> Identity | None:
        try:
            identity = store.load_identity(self.config.state_dir)
        except StateError as exc:
            if not self.can_enroll:
                raise
            log.warning("%s; enrolling again", exc.message)
            return None
        if identity is None or not self.can_enroll:
            return identity
        # A credential belongs to one server and one hardware id; with a token
        # at hand, enrolling again is better than presenting it elsewhere.
        if identity.server != self.config.server:
            log.info(
                "server changed from %s to %s; enrolling again", identity.server, self.config.server
            )
            return None
        if identity.hardware_id != hardware_id:
            log.info(
                "hardware id changed from %s to %s; enrolling again",
                identity.hardware_id,
                hardware_id,
            )
            return None
        return identity

    # ------------------------------------------------------------ loop

    async def run(self) -> None:
        """Boot; serve the on-device inference API and upload telemetry
        while enrolling and syncing forever. Returns only by cancellation."""
        step = self.boot()
        serving = self._start_serving()
        updates = self._make_updates(serving.models)
        for served in await asyncio.to_thread(updates.models.load):
            log.info("serving %s %s", served.model_name, served.model_version)
        inference = await start_inference_server(
            serving.models, self.config.state_dir, listen=self.config.inference_listen
        )
        log.info("inference API on %s (fast path %s)", inference.unix_target,
                 inference.fast_socket_path)  # fmt: skip
        loop = asyncio.get_running_loop()

        def disk_changed() -> None:  # on whichever thread reported
            # The update thread may outlive the loop by a step at shutdown.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._disk_changed)

        self._disk.subscribe(disk_changed)
        self._updates = updates
        updates.models.start()
        boot_desired = self._sync_state.boot_desired
        if boot_desired is not None:
            updates.models.apply(
                assignments_from_desired(boot_desired), remove_others=removes_unlisted(boot_desired)
            )
        jobs = BackgroundJobs([
            BackgroundJob("power", serving.power.run),
            BackgroundJob("desired-writes", self._desired_writes.run),
            BackgroundJob("telemetry", lambda: self._upload_telemetry(serving.stats)),
            BackgroundJob("certificates", self._renew_certificates),
        ])  # fmt: skip
        jobs.start()
        try:
            await self._sync_forever(step)
        finally:
            await jobs.stop()
            await asyncio.to_thread(updates.models.stop)
            await inference.stop(grace=STOP_SERVING_GRACE_S)

    def _start_serving(self) -> Serving:
        """The model host (nothing loaded yet) with its stats and power policy."""
        temperature_file = self.config.power_temperature_file
        stats = RequestStats(ResourceProbe(temperature_file=temperature_file))
        models = ModelHost(
            workers=self.config.inference_workers,
            recorder=stats,
            providers=onnxruntime_providers(self.config.onnxruntime_providers),
            shadow_max_per_s=self.config.shadow_max_per_s,
        )
        power = PowerPolicy(
            models,
            PowerThresholds.from_config(self.config),
            sensors=PsutilSensors(temperature_file=temperature_file),
            interval_s=self.config.power_interval_s,
        )
        stats.power_status = power.status
        report_served(stats, models)
        return Serving(models, stats, power)

    def _make_updates(self, host: ModelHost) -> Updates:
        """The models' update machines (none started yet: ModelUpdates.load
        makes those of the models on disk, apply() the others)."""
        loop = asyncio.get_running_loop()
        models: ModelUpdates

        def publish(status: common_pb2.UpdateStatus) -> None:
            # The update threads may outlive the loop by a step at shutdown.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._send_status, status)

        def build(name: str, remove: Callable[[str], None]) -> ModelUpdate:
            return self._build_model_update(
                name, host, publish, remove, lambda: models.in_use(exclude=name)
            )

        models = ModelUpdates(self.config.state_dir, build)
        return Updates(models)

    def _build_model_update(
        self,
        name: str,
        host: ModelHost,
        publish: Callable[[common_pb2.UpdateStatus], None],
        remove: Callable[[str], None],
        shared: Callable[[], set[str]],
    ) -> ModelUpdate:
        """One model's update machine with its real ports (wrapped by the
        update faults, if any), resuming whatever update its record on disk
        says was under way; its runner is not started."""
        state_dir = self.config.state_dir
        link = self.link
        activator = HostActivator(host, state_dir, name, in_use=shared)
        trust = TrustStore(state_dir, name)
        machine: UpdateMachine | None = None

        def active() -> tuple[str, str]:
            current = activator.current()
            return (current.model_version, current.digest) if current else ("", "")

        def record() -> UpdateRecord:
            assert machine is not None
            return machine.record

        def sources() -> tuple[tuple[str, bool], ...]:
            assignment = record().assignment
            return assignment.sources if assignment is not None else ()

        def download_rate() -> int:
            assignment = record().assignment
            assigned = assignment.max_download_rate if assignment is not None else 0
            return effective_rate(self.config.max_download_rate, assigned)

        downloader = HttpDownloader(
            sources,
            GrpcDownloader(
                link.transport.blocking_device_channel,
                link.credential,
                chunk_size=self.config.download_chunk_size,
            ),
            link.credential,
            link.transport.http_ssl_context,
            stall_s=self.config.download_stall_s,
            max_rate=download_rate,
            min_mirror_rate=self.config.download_min_mirror_rate,
        )
        reporter = StatusReporter(
            publish, record, active, condition=lambda: self._disk.reason, model_name=name,
            source=lambda: downloader.last_source,
        )  # fmt: skip
        ports = Ports(
            downloader=RateLimitedDownloader(downloader, download_rate),
            verifier=DeviceVerifier(state_dir, lambda: self._sync_state.class_name),
            validator=ManifestValidator(fingerprint=link.runtime),
            activator=activator,
            reporter=reporter,
            sleep=lambda seconds: runner.wait(seconds),
            trust=trust,
            shared=shared,
            kept=activator.store.digests,
        )
        if self._update_faults is not None:
            ports = self._update_faults(name, ports)
        machine = UpdateMachine(UpdateStore(state_dir, name), ports, disk=self._disk)
        runner = UpdateRunner(machine, name=f"update-{name}", remove=remove)
        return ModelUpdate(name, machine, runner, reporter, activator, trust)

    def _disk_changed(self) -> None:
        # On the event loop: a state write started or stopped waiting for
        # room. A Hello tells the control plane both ways at once: its
        # hardware profile has the free space, its update status the reason.
        # With no stream up, the next stream's Hello says the same.
        outbox = self._sync_state.outbox
        if outbox is not None:
            outbox.put_nowait(self._hello())

    def _send_status(self, status: common_pb2.UpdateStatus) -> None:
        # On the event loop. Statuses that arrive together (several models'
        # machines, or one machine's quick steps) go out in one StatusReport,
        # with at most one status per model per message so no step of a
        # model's history is lost. With no stream up, the next Hello
        # carries every model's latest status instead.
        if self._sync_state.outbox is None:
            return
        pending = self._pending_statuses
        pending.append(status)
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush_statuses)

    def _flush_statuses(self) -> None:
        pending, self._pending_statuses = self._pending_statuses, []
        outbox = self._sync_state.outbox
        if outbox is None:
            return
        for batch in batch_statuses(pending):
            outbox.put_nowait(
                device_pb2.AgentMessage(
                    status=device_pb2.StatusReport(
                        applied_revision=self._sync_state.applied_revision, models=batch
                    )
                )
            )

    async def _upload_telemetry(self, stats: RequestStats) -> None:
        """Upload telemetry once the device has a credential to send it with;
        until then (and while offline) samples wait in the disk buffer."""
        link = self.link
        await link.has_identity.wait()
        buffer = await self._open_telemetry_buffer()
        metrics = None
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            metrics = TelemetryMetrics()
            serve_metrics(metrics, int(port), host.strip("[]") or "127.0.0.1")
            log.info("telemetry for Prometheus on http://%s/metrics", self.config.metrics_listen)
            gauge = metrics
            gauge.observe_disk(bool(self._disk.waiting()))
            self._disk.subscribe(lambda: gauge.observe_disk(bool(self._disk.waiting())))
        uploader = TelemetryUploader(
            stats=stats,
            buffer=buffer,
            target=self.config.server,
            credential=link.credential,
            interval_s=self.config.telemetry_interval_s,
            metrics=metrics,
            channel=link.transport.device_channel,
        )
        self._uploader = uploader
        try:
            await uploader.run()
        finally:
            self._uploader = None
            await uploader.close()
            buffer.close()

    async def _open_telemetry_buffer(self) -> TelemetryBuffer:
        """The on-disk buffer; on a full disk (it could not even be opened)
        tried again with backoff, while samples wait in RequestStats."""
        attempt = 0
        while True:
            try:
                buffer = TelemetryBuffer(self.config.state_dir, disk=self._disk)
            except DiskFull as exc:
                self._disk.failed(TELEMETRY_BUFFER, exc.message)
                await asyncio.sleep(retry_delay(attempt))
                attempt += 1
                continue
            self._disk.recovered(TELEMETRY_BUFFER)
            return buffer

    async def _sync_forever(self, step: Step) -> None:
        link = self.link
        transport = link.transport
        while True:
            device = transport.device
            expired = device is not None and time.time() >= device.not_after
            if step is Step.SYNC and expired and self.can_enroll:
                log.warning("the device certificate expired while offline; enrolling again")
                step = Step.ENROLL
            if step is Step.ENROLL:
                channel = transport.enroll_channel()
            else:
                channel = transport.device_channel()
            link.reconnect.clear()
            disk_full: str | None = None
            try:
                error = await self._run_step(step, channel)
            except StateError as exc:
                if step is not Step.ENROLL or not is_disk_full(exc):
                    raise
                disk_full = exc.message
            finally:
                await channel.close(grace=None)
            if disk_full is not None:
                # The identity could not be written, so nothing of this
                # enrollment is used; enrolling again is idempotent (the same
                # device id, a fresh credential).
                self._disk.failed("the enrollment", disk_full)
                await self._sleep(self._backoff.next_delay())
                continue
            if step is Step.ENROLL and error is None:
                self._disk.recovered("the enrollment")
                step = Step.SYNC
                continue
            if link.reconnect.is_set():
                log.info("reconnecting with the renewed certificate")
                continue
            code = error.code() if error is not None else None
            decision = decide(step, code, can_enroll=self.can_enroll)
            if step is Step.SYNC and self._sync_state.received_in_session:
                self._backoff.reset()
            if decision.delay is Delay.MAX:
                delay = self._backoff.at_max()
            else:
                delay = self._backoff.next_delay()
            outcome = (
                f"{error.code().name}: {error.details()}" if error is not None else "stream ended"
            )
            hint = transport_hint(outcome, transport.tls)
            if hint:
                outcome = f"{outcome}; {hint}"
            log.log(
                logging.WARNING if decision.delay is Delay.MAX else logging.INFO,
                "%s: %s (%s); %s in %.1f s",
                step.value,
                decision.reason,
                outcome,
                "retrying" if decision.next_step is step else decision.next_step.value,
                delay,
            )
            await self._sleep(delay)
            step = decision.next_step

    async def _run_step(self, step: Step, channel: grpc.aio.Channel) -> grpc.aio.AioRpcError | None:
        """Run one step; the error it failed with, None when an enroll
        succeeded or the server closed the Sync stream cleanly."""
        try:
            if step is Step.ENROLL:
                await self._enroll(channel)
            else:
                await self._sync_until_renewed(channel)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    async def _sync_until_renewed(self, channel: grpc.aio.Channel) -> None:
        """The Sync stream, ended early (cleanly) by a certificate renewal:
        the stream must move to a channel with the new certificate."""
        sync = asyncio.ensure_future(self._sync(channel))
        renewed = asyncio.ensure_future(self.link.reconnect.wait())
        try:
            await asyncio.wait({sync, renewed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            renewed.cancel()
            if not sync.done():
                sync.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await sync
        if sync.done() and not sync.cancelled():
            sync.result()

    # ------------------------------------------------------------ certificates

    async def _renew_certificates(self) -> None:
        """Renew the device certificate at two thirds of its life, over the
        current one, then move every connection to the new one. A failed
        renewal is retried every RENEW_RETRY_S; an expired certificate leads
        to re-enrollment (see _sync_forever).

        Whenever a new certificate arrives (renewed, or from enrolling again
        meanwhile), the loop plans again from that certificate's renew_at,
        at once: sleeping out the retry instead let a short-lived
        certificate from a re-enrollment expire unrenewed, which forced
        another re-enrollment every RENEW_RETRY_S."""
        link = self.link
        while True:
            link.credentials_changed.clear()
            device = link.transport.device
            if device is None or link.identity is None:
                await link.credentials_changed.wait()  # not enrolled with TLS (yet)
                continue
            if await self._credentials_change_within(device.renew_at() - time.time()):
                continue
            try:
                await self._renew_once()
                self._disk.recovered("the device certificate")
            except (grpc.aio.AioRpcError, StateError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc.message
                if isinstance(exc, StateError) and is_disk_full(exc):
                    self._disk.failed("the device certificate", exc.message)  # logged once
                else:
                    log.warning("certificate renewal failed (%s); retrying in %.0f s",
                                detail, RENEW_RETRY_S)  # fmt: skip
                if time.time() >= device.not_after:
                    # Too late to renew: reconnecting enrolls again (with a
                    # token) or keeps saying why it cannot.
                    link.reconnect.set()
                await self._credentials_change_within(RENEW_RETRY_S)

    async def _credentials_change_within(self, seconds: float) -> bool:
        """Wait up to `seconds` for a new identity or certificate; whether
        one came."""
        changed = self.link.credentials_changed
        if changed.is_set():
            return True
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True

    async def _renew_once(self) -> None:
        link = self.link
        assert link.identity is not None
        key_pem, csr = new_key_and_csr(link.identity.device_id)
        channel = link.transport.device_channel()
        try:
            response = await device_pb2_grpc.DeviceServiceStub(channel).RenewCertificate(
                device_pb2.RenewCertificateRequest(csr=csr),
                metadata=link.metadata(),
                timeout=ENROLL_TIMEOUT_S,
            )
        finally:
            await channel.close(grace=None)
        renewed = from_response(key_pem, response.certificate, link.transport.device_target)
        link.adopt_certificate(renewed)
        log.info("device certificate renewed; valid until %s",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(renewed.not_after)))  # fmt: skip
        link.reconnect.set()
        if self._uploader is not None:
            await self._uploader.reconnect()

    # ------------------------------------------------------------ enroll

    async def _enroll(self, channel: grpc.aio.Channel) -> None:
        assert self.config.enrollment_token  # boot() and decide() guarantee it
        link = self.link
        transport = link.transport
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        name = self.config.name or link.hardware.hostname
        request = device_pb2.EnrollRequest(
            enrollment_token=self.config.enrollment_token,
            hardware_id=link.hardware_id,
            name=name,
            labels=dict(self.config.labels),
            hardware=link.hardware,
            runtime=link.runtime,
        )
        key_pem = b""
        if transport.tls:
            # A new key per enrollment; it never leaves this device.
            key_pem, request.csr = new_key_and_csr(name or link.hardware_id)
        previous = link.identity
        if previous is not None:
            # Enrolling this hardware id again (an expired certificate, a
            # refused credential): prove we are the device it belongs to, with
            # what only this device holds.
            request.proof.device_id = previous.device_id
            request.proof.device_credential = previous.device_credential
            if transport.device is not None and request.csr:
                request.proof.certificate_pem = transport.device.cert_pem
                request.proof.signature = sign_reenrollment(
                    transport.device.key_pem, previous.device_id, request.csr
                )
        response = await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
        identity = Identity(
            device_id=response.device_id,
            device_credential=response.device_credential,
            server=self.config.server,
            hardware_id=link.hardware_id,
        )
        if previous is None or previous.device_id != identity.device_id:
            # Revisions count per device: a new device id starts from 0.
            store.forget_desired(self.config.state_dir)
            self._sync_state.applied_revision = 0
        # Pin the keys that sign artifact manifests before anything else can
        # arrive from this control plane (trust on first enrollment).
        store.save_trusted_keys(
            self.config.state_dir, {k.key_id: k.public_key for k in response.signing_keys}
        )
        if transport.tls:
            link.adopt_certificate(from_response(key_pem, response.certificate, self.config.server))
        # Persist before use: a crash after Sync but before saving would leave
        # the device enrolled with a credential nobody knows.
        store.save_identity(self.config.state_dir, identity)
        link.adopt_identity(identity)
        if transport.tls and self._uploader is not None:
            # Its channel presents the certificate this enrollment revoked
            # (or one that expired): upload over one with the new certificate.
            await self._uploader.reconnect()
        log.info(
            "enrolled as device %s (state %s)",
            identity.device_id,
            common_pb2.DeviceState.Name(response.state).removeprefix("DEVICE_STATE_").lower(),
        )

    # ------------------------------------------------------------ sync

    def _hello(self) -> device_pb2.AgentMessage:
        link = self.link
        hardware = common_pb2.HardwareProfile()
        hardware.CopyFrom(link.hardware)
        # Free disk space changes while the agent runs; the rest does not.
        with contextlib.suppress(OSError):
            usage = psutil.disk_usage(str(self.config.state_dir))
            hardware.disk_free_mb = usage.free // _MIB
        hello = device_pb2.Hello(
            hardware=hardware,
            runtime=link.runtime,
            applied_revision=self._sync_state.applied_revision,
            protocol=PROTOCOL,
        )
        if self._updates is not None:
            hello.models.extend(self._updates.models.statuses())
        return device_pb2.AgentMessage(hello=hello)

    async def _sync(self, channel: grpc.aio.Channel) -> None:
        """One Sync stream, until the server ends it (returns) or it fails
        (raises AioRpcError)."""
        state = self._sync_state
        state.received_in_session = False
        # One queue feeds the request stream, so the heartbeat task and the
        # status reports never write to the call concurrently.
        outbox: asyncio.Queue[device_pb2.AgentMessage] = asyncio.Queue()
        outbox.put_nowait(self._hello())
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        call = stub.Sync(_drain(outbox), metadata=self.link.metadata())
        heartbeats = asyncio.create_task(self._send_heartbeats(outbox))
        state.outbox = outbox
        try:
            async for message in call:
                if not state.received_in_session:
                    log.info("connected to %s", self.link.transport.device_target)
                    state.received_in_session = True
                kind = message.WhichOneof("kind")
                if kind == "desired":
                    report = self._apply(message.desired)
                    if report is not None:
                        outbox.put_nowait(report)
                elif kind == "heartbeat_ack":
                    log.debug("heartbeat %d acknowledged", message.heartbeat_ack.seq)
        finally:
            state.outbox = None
            heartbeats.cancel()
            call.cancel()
            await asyncio.wait({heartbeats})

    async def _send_heartbeats(self, outbox: asyncio.Queue[device_pb2.AgentMessage]) -> None:
        state = self._sync_state
        while True:
            state.interval_changed.clear()
            try:
                await asyncio.wait_for(
                    state.interval_changed.wait(), timeout=state.heartbeat_interval_s
                )
                continue  # the interval changed: wait again with the new one
            except TimeoutError:
                pass
            state.heartbeat_seq += 1
            heartbeat = device_pb2.Heartbeat(seq=state.heartbeat_seq)
            heartbeat.sent_at.GetCurrentTime()
            outbox.put_nowait(device_pb2.AgentMessage(heartbeat=heartbeat))

    def _adopt_config(self, config: device_pb2.AgentConfig) -> None:
        state = self._sync_state
        interval = float(config.heartbeat_interval_s)
        if interval and interval != state.heartbeat_interval_s:
            log.info("heartbeat interval %g s", interval)
            state.heartbeat_interval_s = interval
            state.interval_changed.set()

    def _apply(self, desired: device_pb2.DesiredState) -> device_pb2.AgentMessage | None:
        """Apply a pushed desired state; the StatusReport to send, or None when
        it is not newer than what was applied already."""
        state = self._sync_state
        # The config is current even when the revision is not new (the first
        # message after a reconnect repeats the applied revision).
        self._adopt_config(desired.config)
        if desired.revision <= state.applied_revision:
            log.debug("desired state revision %d already applied", desired.revision)
            return None
        # Written now, or (disk full) kept and written again until it lands:
        # applied from memory meanwhile (module docstring).
        self._desired_writes.submit(desired)
        state.applied_revision = desired.revision
        state.class_name = desired.class_name
        log.info(describe_desired(desired))
        if self._updates is not None:
            self._updates.models.apply(
                assignments_from_desired(desired), remove_others=removes_unlisted(desired)
            )
        return device_pb2.AgentMessage(
            status=device_pb2.StatusReport(applied_revision=desired.revision)
        )


async def _drain(
    outbox: asyncio.Queue[device_pb2.AgentMessage],
) -> AsyncIterator[device_pb2.AgentMessage]:
    while True:
        yield await outbox.get()


# ---------------------------------------------------------------- process


async def serve(config: AgentConfig, *, update_faults: UpdateFaults | None = None) -> int:
    """Run an Agent until SIGTERM or SIGINT; the process exit status. Fatal
    agent errors are logged and give 1."""
    try:
        store.ensure_state_dir(config.state_dir)
        # Held until the process exits (see lock_state_dir).
        store.lock_state_dir(config.state_dir)
    except AgentError as exc:
        log.error("%s: %s", exc.title, exc.message)
        return 1
    agent = Agent(config, update_faults=update_faults)
    agent_task = asyncio.create_task(agent.run(), name="agent")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stop_task = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({agent_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("stopping")
            # Cancelling closes the channel (and with it the stream) in the
            # step's finally; a wedged close must not hold the exit up.
            agent_task.cancel()
            await asyncio.wait({agent_task}, timeout=STOP_GRACE_S)
            return 0
        try:
            agent_task.result()
        except AgentError as exc:
            log.error("%s: %s", exc.title, exc.message)
            return 1
        log.error("agent loop ended unexpectedly")
        return 1
    finally:
        stop_task.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
