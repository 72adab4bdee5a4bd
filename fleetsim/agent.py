"""One simulated device: the real device protocol, no real inference.

A `SimAgent` does what `edgefleet-agent` does on the wire, with figures drawn
from its class's profile instead of measured:

- enrolls with the enrollment token and its stable hardware id (re-enrolls
  when the control plane refuses its credential);
- holds a Sync stream: Hello (hardware and runtime from the profile, the
  applied revision and the latest update status), heartbeats at the interval
  the control plane's AgentConfig says, reconnects with jittered exponential
  backoff;
- installs each newer assignment by walking the update machine's states
  (downloading with byte progress, verifying, validating, activating,
  committed), or fails in the profile's state and rolls back; a shadow
  assignment stops in "shadowing" with the active model unchanged; a newer
  assignment aborts an update that has not reached activation, as the real
  agent does;
- uploads one TelemetrySample per interval (with the shadow comparison while
  shadowing), numbered per device.

It keeps no files and uses one task for its connection and one for its timers
(one more while it installs), so one process holds thousands. Agents share
gRPC channels: the Fleet hands each one a stub. With no files, a re-run with
the same prefix and the first run's `identities` enrolls as the same devices
(same hardware ids, proven with their credentials, so the same device ids)
but with nothing installed: it installs their current
assignment again, and numbers its telemetry past what the control plane
already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

from .profiles import Behaviour, ClassProfile, FleetProfile

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

# Share of an install's time each state takes (the download dominates).
STATE_SHARES = {"downloading": 0.4, "verifying": 0.1, "validating": 0.3, "activating": 0.2}
# States a newer assignment aborts; once activation started the update finishes.
ABORTABLE = frozenset({"downloading", "verifying", "validating"})
# Failures of the connection or the server rather than of this device.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)
# Download errors that retrying cannot fix (the real agent's classification).
FATAL_DOWNLOAD = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
DOWNLOAD_ATTEMPTS = 5
# Samples kept for the next interval while uploads fail (a real agent keeps
# far more on disk; a simulator only needs to show the redelivery).
MAX_PENDING_SAMPLES = 30
PROGRESS_EVERY_S = 0.5
# Update reports each agent remembers (for tests and debugging).
HISTORY_LENGTH = 24


@dataclass
class FleetStats:
    """Counters shared by every agent of a fleet."""

    enrollments: int = 0
    connects: int = 0
    heartbeats: int = 0
    status_reports: int = 0
    telemetry_uploads: int = 0
    telemetry_samples: int = 0
    telemetry_failures: int = 0
    # Samples made, and of those given up: pushed out of the buffer by its
    # bound (MAX_PENDING_SAMPLES) or refused whole (INVALID_ARGUMENT).
    telemetry_produced: int = 0
    telemetry_dropped: int = 0
    telemetry_refused: int = 0
    # Samples sent again after an upload that failed (each time counts).
    telemetry_resends: int = 0
    downloads: int = 0
    download_bytes: int = 0
    # "<rpc> <CODE>" -> count, e.g. "Sync UNAVAILABLE".
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class FleetContext:
    """What a fleet's agents share: the profile, the knobs, the counters,
    one random generator (one per agent would cost ~5 KB each) and the
    semaphore that bounds Enroll calls and Sync connects in flight."""

    profile: FleetProfile
    token: str
    connect_slots: asyncio.Semaphore
    rng: random.Random
    download: bool = False
    # Fixed intervals that win over the control plane's config (tests and
    # benchmarks want a known load); None: the server's, else the profile's.
    heartbeat_interval_s: float | None = None
    telemetry_interval_s: float | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rpc_timeout_s: float = 30.0
    labels: dict[str, str] = field(default_factory=dict)
    stats: FleetStats = field(default_factory=FleetStats)
    # False: make no new samples, only resend those held (a benchmark's drain).
    produce_telemetry: bool = True
    # Called with each HeartbeatAck's round trip (seconds, from the decision
    # to send) and with each DesiredState as it arrives: benchmarks time them.
    on_heartbeat_ack: Callable[[SimAgent, float], None] | None = None
    on_desired: Callable[[SimAgent, device_pb2.DesiredState], None] | None = None
    # hardware id -> (device id, credential) of every enrollment: what a
    # re-enrollment of the same hardware id proves itself with (the control
    # plane refuses one without). Share one between runs with the same
    # prefix to re-run as the same devices.
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)


def _jitter(rng: random.Random, value: float, jitter: float) -> float:
    return max(0.0, value * (1.0 + rng.uniform(-jitter, jitter)))


def _binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial draw, approximate: Poisson for small means, normal above
    (random.binomialvariate needs Python 3.12)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    mean = n * p
    if mean < 30:
        # Knuth's Poisson sampler, capped at n.
        limit, k, product = math.exp(-mean), 0, rng.random()
        while product > limit and k < n:
            k += 1
            product *= rng.random()
        return k
    draw = round(rng.gauss(mean, math.sqrt(mean * (1.0 - p))))
    return min(n, max(0, draw))


# An idle device: the agent alone, no model loaded.
_NO_MODEL = Behaviour(memory_mb=0.0, cpu_percent=2.0)


def make_sample(
    rng: random.Random,
    seq: int,
    interval_s: float,
    model_name: str,
    version: str,
    behaviour: Behaviour | None,
    memory_total_mb: int,
    shadow: tuple[str, Behaviour] | None = None,
) -> device_pb2.TelemetrySample:
    """One interval's TelemetrySample for the model `version` served with
    `behaviour` (None: no model, a device-level sample with resource figures
    only), with the shadow model's comparison when one is loaded."""
    sample = device_pb2.TelemetrySample(seq=seq, model_name=model_name, model_version=version)
    sample.at.GetCurrentTime()
    base = behaviour or _NO_MODEL
    jitter = base.jitter
    if behaviour is not None:
        requests = round(_jitter(rng, behaviour.requests_per_s * interval_s, jitter))
        errors = _binomial(rng, requests, behaviour.error_rate)
        p50 = _jitter(rng, behaviour.p50_ms, jitter)
        p95 = max(p50, _jitter(rng, behaviour.p95_ms, jitter))
        p99 = max(p95, _jitter(rng, behaviour.p95_ms * 1.4, jitter))
        sample.request_count = requests
        sample.error_count = errors
        sample.timeout_count = _binomial(rng, errors, behaviour.timeout_share)
        if requests:
            sample.latency_p50_ms = p50
            sample.latency_p95_ms = p95
            sample.latency_p99_ms = p99
            sample.latency_max_ms = max(p99, _jitter(rng, p99 * 1.5, jitter))
    memory = _jitter(rng, base.memory_mb, jitter / 2)
    sample.memory_mb = memory
    sample.cpu_percent = min(100.0, _jitter(rng, base.cpu_percent, jitter))
    # The OS and the agent take about a quarter of a small board's memory.
    used = 0.25 + memory / max(memory_total_mb, 1)
    sample.system_memory_percent = min(100.0, 100.0 * used)
    sample.power_mode = "normal"
    if shadow is not None and behaviour is not None:
        shadow_version, candidate = shadow
        sample.shadow_version = shadow_version
        sample.shadow_requests = round(sample.request_count * candidate.shadow_sample)
        if sample.shadow_requests:
            noise = candidate.jitter / 10
            sample.shadow_agreement = min(1.0, _jitter(rng, candidate.agreement, noise))
            sample.shadow_max_diff = _jitter(rng, candidate.shadow_max_diff, candidate.jitter)
            sample.shadow_latency_p95_ms = _jitter(rng, candidate.p95_ms, candidate.jitter)
    return sample


class SimAgent:
    """One simulated device. `run()` loops until cancelled; the attributes
    say where the device stands (read them, do not set them)."""

    __slots__ = (
        "_assignment",
        "_attempt",
        "_call",
        "_heartbeat_sent_at",
        "_md",
        "_pending",
        "_silent_until",
        "_taken_seq",
        "_timer_task",
        "_update_task",
        "_wake",
        "_wanted",
        "_write_lock",
        "active_digest",
        "active_model",
        "active_version",
        "assignment_seen_at",
        "class_name",
        "connection",
        "connects",
        "credential",
        "ctx",
        "device_id",
        "device_state",
        "hardware_id",
        "heartbeat_seq",
        "index",
        "last_error",
        "name",
        "profile_class",
        "revision",
        "server_heartbeat_s",
        "server_telemetry_s",
        "shadow_version",
        "status",
        "stub",
        "telemetry_dropped",
        "telemetry_produced",
        "telemetry_seq",
        "update_history",
        "update_reason",
        "update_state",
    )

    def __init__(
        self,
        index: int,
        prefix: str,
        profile_class: ClassProfile,
        ctx: FleetContext,
        stub: device_pb2_grpc.DeviceServiceAsyncStub | None = None,
    ) -> None:
        self.index = index
        self.hardware_id = f"sim-{prefix}-{index:05d}"
        self.name = f"{prefix}-{index:05d}"
        self.profile_class = profile_class
        self.ctx = ctx
        self.stub = stub
        self.device_id = ""
        self.credential = ""
        self.device_state = common_pb2.DEVICE_STATE_UNSPECIFIED
        # The class the control plane placed the device in ("" until known).
        self.class_name = ""
        self.revision = 0
        # new | enrolling | connecting | online | backoff | refused | silent | stopped
        self.connection = "new"
        # Sync streams that got their first DesiredState.
        self.connects = 0
        self.last_error = ""
        self.server_heartbeat_s = 0.0
        self.server_telemetry_s = 0.0
        self.heartbeat_seq = 0
        self.telemetry_seq = 0
        # Samples this agent made, and of those given up (see FleetStats).
        self.telemetry_produced = 0
        self.telemetry_dropped = 0
        # What the device serves.
        self.active_model = ""
        self.active_version = ""
        self.active_digest = ""
        self.shadow_version = ""
        # The update of the newest assignment taken on: its state and the
        # reason of a failure; (sequence, state, reason) of the latest
        # reports, oldest first (see states()).
        self.update_state = "idle"
        self.update_reason = ""
        self.update_history: list[tuple[int, str, str]] = []
        self.status = common_pb2.UpdateStatus(state="idle")
        # time.monotonic() when the newest assignment arrived (0.0: none yet),
        # so a benchmark can time notification from the device's side.
        self.assignment_seen_at = 0.0
        self._assignment: device_pb2.Assignment | None = None
        self._wanted: device_pb2.Assignment | None = None
        self._taken_seq = 0
        self._update_task: asyncio.Task[None] | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._call: Any = None  # the open grpc.aio Sync call
        self._write_lock: asyncio.Lock | None = None
        self._md: tuple[tuple[str, str], ...] = ()
        self._pending: list[device_pb2.TelemetrySample] = []
        self._heartbeat_sent_at = 0.0  # of heartbeat_seq; 0.0: acked or none
        self._silent_until = 0.0
        self._attempt = 0

    # ------------------------------------------------------------ views

    @property
    def update_version(self) -> str:
        """The model version of the assignment taken on ("" when none)."""
        return self._assignment.model_version if self._assignment is not None else ""

    @property
    def update_sequence(self) -> int:
        """The sequence of the assignment taken on (0 when none)."""
        return self._assignment.sequence if self._assignment is not None else 0

    def states(self, sequence: int | None = None) -> list[str]:
        """The states assignment `sequence` (default: the current one) went
        through, in order, as far as the history reaches back (progress
        reports of one state count once)."""
        if sequence is None:
            sequence = self.update_sequence
        states: list[str] = []
        for seq, state, _ in self.update_history:
            if seq == sequence and (not states or states[-1] != state):
                states.append(state)
        return states

    @property
    def pending_samples(self) -> int:
        """Telemetry samples held for the next upload (not acked yet)."""
        return len(self._pending)

    @property
    def online(self) -> bool:
        """Holding a Sync stream that got its DesiredState."""
        return self.connection == "online"

    @property
    def silent(self) -> bool:
        """Gone dark after committing (silent_after_commit)."""
        return self._silent_until > time.monotonic()

    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats: the fleet's fixed interval, else the
        control plane's, else the profile's."""
        ctx = self.ctx
        return (
            ctx.heartbeat_interval_s or self.server_heartbeat_s or ctx.profile.heartbeat_interval_s
        )

    def telemetry_interval(self) -> float:
        """Seconds between telemetry uploads, chosen like heartbeat_interval."""
        ctx = self.ctx
        return (
            ctx.telemetry_interval_s or self.server_telemetry_s or ctx.profile.telemetry_interval_s
        )

    def behaviour(self, version: str) -> Behaviour:
        """How this device fares with model `version` (from the profile)."""
        return self.ctx.profile.behaviour(self.profile_class.name, version)

    # ------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Enroll and sync until cancelled, reconnecting with backoff."""
        try:
            await self._connect_forever()
        finally:
            if self._timer_task is not None:
                self._timer_task.cancel()
            if self._update_task is not None:
                self._update_task.cancel()
            self.connection = "stopped"

    async def _connect_forever(self) -> None:
        ctx = self.ctx
        while True:
            step = "Sync" if self.credential else "Enroll"
            code: grpc.StatusCode | None = None
            try:
                if step == "Enroll":
                    await self._enroll()
                    continue
                await self._sync()
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self.last_error = f"{step} {code.name}: {exc.details() or ''}".rstrip(": ")
                ctx.stats.errors[f"{step} {code.name}"] += 1
            except TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                self.last_error = f"{step}: no answer within {ctx.rpc_timeout_s:g} s"
                ctx.stats.errors[f"{step} DEADLINE_EXCEEDED"] += 1
            except Exception as exc:
                # A bug must not silently take the agent out of the fleet:
                # count it (the summary shows it) and retry like a failure.
                code = grpc.StatusCode.UNKNOWN
                self.last_error = f"{step}: {type(exc).__name__}: {exc}"
                ctx.stats.errors[f"{step} {type(exc).__name__}"] += 1
            if self.silent:
                await self._stay_silent()
                continue
            await asyncio.sleep(self._delay_after(step, code))

    def _delay_after(self, step: str, code: grpc.StatusCode | None) -> float:
        """The real agent's decision table, reduced: transient failures back
        off exponentially, a refused credential re-enrolls, a refused device
        or token retries slowly (an operator may fix it)."""
        ctx = self.ctx
        if code is None or code in RETRYABLE:
            self.connection = "backoff"
        elif step == "Sync" and code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.NOT_FOUND,
        ):
            # Enrolling again, with the refused credential as proof, returns
            # the same device with a fresh one if it was decommissioned (and
            # is refused if another process enrolled this hardware id).
            self.credential = ""
            self.connection = "backoff"
        else:
            self.connection = "refused"
            self._attempt = 64
            return ctx.backoff_max_s * (0.5 + 0.5 * ctx.rng.random())
        ceiling = min(ctx.backoff_max_s, ctx.backoff_initial_s * 2.0 ** min(self._attempt, 64))
        self._attempt += 1
        # Full jitter: a fleet that lost its control plane together must not
        # come back together.
        return ctx.rng.random() * ceiling

    async def _stay_silent(self) -> None:
        self.connection = "silent"
        remaining = self._silent_until - time.monotonic()
        if math.isinf(remaining):
            # Dark for good: only stopping the fleet (cancelling) ends it.
            await asyncio.get_running_loop().create_future()
        await asyncio.sleep(max(0.0, remaining))
        self._silent_until = 0.0

    # ------------------------------------------------------------ enroll

    async def _enroll(self) -> None:
        assert self.stub is not None
        ctx = self.ctx
        cls = self.profile_class
        hardware = common_pb2.HardwareProfile()
        hardware.CopyFrom(cls.hardware)
        hardware.hostname = self.name
        request = device_pb2.EnrollRequest(
            enrollment_token=ctx.token,
            hardware_id=self.hardware_id,
            name=self.name,
            labels={**cls.labels, **ctx.labels},
            hardware=hardware,
            runtime=cls.runtime,
        )
        known = ctx.identities.get(self.hardware_id)
        if known is not None:
            request.proof.device_id, request.proof.device_credential = known
        self.connection = "enrolling"
        async with ctx.connect_slots:
            response = await self.stub.Enroll(request, timeout=ctx.rpc_timeout_s)
        if response.device_id != self.device_id:
            # Revisions count per device: a new device id starts from 0.
            self.revision = 0
        self.device_id = response.device_id
        self.credential = response.device_credential
        ctx.identities[self.hardware_id] = (self.device_id, self.credential)
        self.device_state = response.state
        self._md = (("authorization", f"Bearer {self.credential}"),)
        ctx.stats.enrollments += 1

    # ------------------------------------------------------------ sync

    def _hello(self) -> device_pb2.AgentMessage:
        hello = device_pb2.Hello(
            hardware=self.profile_class.hardware,
            runtime=self.profile_class.runtime,
            applied_revision=self.revision,
            update=self.status,
        )
        hello.hardware.hostname = self.name
        return device_pb2.AgentMessage(hello=hello)

    async def _sync(self) -> None:
        """One Sync stream, until the server ends it (returns) or it fails
        (raises AioRpcError)."""
        assert self.stub is not None
        ctx = self.ctx
        self.connection = "connecting"
        call = self.stub.Sync(None, metadata=self._md)
        try:
            # Only the connect is bounded: a reconnect storm of thousands of
            # streams queues here instead of at the server's database.
            async with ctx.connect_slots, asyncio.timeout(ctx.rpc_timeout_s):
                # A call the server already ended (a refused credential)
                # refuses writes; reading it raises its status.
                with contextlib.suppress(asyncio.InvalidStateError):
                    await call.write(self._hello())
                first: Any = await call.read()
            if first is EOF:
                return
            self._call = call
            self.connection = "online"
            self._attempt = 0
            self.connects += 1
            ctx.stats.connects += 1
            if self._timer_task is None:
                # Only now: the phases are drawn from the control plane's
                # intervals, which the first DesiredState carries.
                self._adopt_config(first.desired.config)
                self._timer_task = asyncio.create_task(self._timers(), name=f"timers-{self.index}")
            message = first
            while message is not EOF:
                kind = message.WhichOneof("kind")
                if kind == "desired":
                    if ctx.on_desired is not None:
                        ctx.on_desired(self, message.desired)
                    if self.apply_desired(message.desired):
                        await self._send_status(applied_only=True)
                elif kind == "heartbeat_ack":
                    self._acked(message.heartbeat_ack.seq)
                message = await call.read()
        finally:
            self._call = None
            call.cancel()

    async def _write(self, message: device_pb2.AgentMessage) -> bool:
        """Write on the open stream; False when there is none (the next
        Hello carries the latest status instead)."""
        call = self._call
        if call is None:
            return False
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        # grpc.aio allows one write in flight per call.
        async with self._write_lock:
            try:
                await call.write(message)
            except (grpc.RpcError, asyncio.InvalidStateError):
                return False  # the read side sees the error and reconnects
        return True

    def apply_desired(self, desired: device_pb2.DesiredState) -> bool:
        """Take a DesiredState in (the sync loop calls this; tests may too):
        adopt its config, class and state, start installing a newer
        assignment. True when its revision is newer than the applied one."""
        self._adopt_config(desired.config)
        self.device_state = desired.device_state
        self.class_name = desired.class_name
        newer = desired.revision > self.revision
        if newer:
            self.revision = desired.revision
        if desired.HasField("assignment"):
            assignment = desired.assignment
            wanted = self._wanted
            if assignment.sequence > (wanted.sequence if wanted is not None else 0):
                self.assignment_seen_at = time.monotonic()
                self._want(assignment)
        return newer

    def _adopt_config(self, config: device_pb2.AgentConfig) -> None:
        self.server_heartbeat_s = float(config.heartbeat_interval_s)
        self.server_telemetry_s = float(config.telemetry_interval_s)

    # ------------------------------------------------------------ timers

    async def _timers(self) -> None:
        """Heartbeats and telemetry uploads, each at its interval, phases
        drawn at random so a fleet's load is spread over the interval."""
        loop = asyncio.get_running_loop()
        rng = self.ctx.rng
        now = loop.time()
        next_heartbeat = now + rng.random() * self.heartbeat_interval()
        next_telemetry = now + rng.random() * self.telemetry_interval()
        while True:
            await asyncio.sleep(max(0.0, min(next_heartbeat, next_telemetry) - loop.time()))
            now = loop.time()
            try:
                if now >= next_heartbeat:
                    next_heartbeat = now + self.heartbeat_interval()
                    if self._call is not None and not self.silent:
                        await self._heartbeat()
                if now >= next_telemetry:
                    interval = self.telemetry_interval()
                    next_telemetry += interval
                    if next_telemetry <= now:  # the interval shrank or an upload was slow
                        next_telemetry = now + interval
                    if self.credential and not self.silent:
                        await self._upload_telemetry(interval)
            except Exception as exc:  # counted; the timers must go on
                self.ctx.stats.errors[f"timers {type(exc).__name__}"] += 1

    async def _heartbeat(self) -> None:
        self.heartbeat_seq += 1
        self._heartbeat_sent_at = time.monotonic()
        heartbeat = device_pb2.Heartbeat(seq=self.heartbeat_seq)
        heartbeat.sent_at.GetCurrentTime()
        if await self._write(device_pb2.AgentMessage(heartbeat=heartbeat)):
            self.ctx.stats.heartbeats += 1

    def _acked(self, seq: int) -> None:
        # Only the latest heartbeat is timed: an ack of an older one (sent on
        # a stream that has since been replaced) says nothing about this one.
        if seq != self.heartbeat_seq or not self._heartbeat_sent_at:
            return
        rtt = time.monotonic() - self._heartbeat_sent_at
        self._heartbeat_sent_at = 0.0
        if self.ctx.on_heartbeat_ack is not None:
            self.ctx.on_heartbeat_ack(self, rtt)

    # ------------------------------------------------------------ telemetry

    def next_sample(self, interval_s: float) -> device_pb2.TelemetrySample:
        """The TelemetrySample of the interval that just ended."""
        self.telemetry_seq += 1
        version = self.active_version
        shadow = None
        if self.shadow_version and version:
            shadow = (self.shadow_version, self.behaviour(self.shadow_version))
        return make_sample(
            self.ctx.rng,
            self.telemetry_seq,
            interval_s,
            self.active_model,
            version,
            self.behaviour(version) if version else None,
            self.profile_class.hardware.memory_mb,
            shadow,
        )

    async def _upload_telemetry(self, interval_s: float) -> None:
        assert self.stub is not None
        stats = self.ctx.stats
        pending = self._pending
        made = self.ctx.produce_telemetry
        if made:
            pending.append(self.next_sample(interval_s))
            self.telemetry_produced += 1
            stats.telemetry_produced += 1
        if len(pending) > MAX_PENDING_SAMPLES:
            dropped = len(pending) - MAX_PENDING_SAMPLES
            del pending[:dropped]
            self.telemetry_dropped += dropped
            stats.telemetry_dropped += dropped
        if not pending:
            return
        # All but the new sample were in an upload that failed.
        stats.telemetry_resends += len(pending) - made
        try:
            response = await self._upload(pending)
            if response.acked_seq > pending[-1].seq:
                # The control plane holds higher seqs for this device (an
                # earlier run of the simulator): these would be taken for
                # redeliveries and dropped. Number them after its mark.
                self.telemetry_seq = response.acked_seq
                for sample in pending:
                    self.telemetry_seq += 1
                    sample.seq = self.telemetry_seq
                response = await self._upload(pending)
        except grpc.aio.AioRpcError as exc:
            stats.telemetry_failures += 1
            stats.errors[f"UploadTelemetry {exc.code().name}"] += 1
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                # Refused whole; resending cannot help.
                self.telemetry_dropped += len(pending)
                stats.telemetry_refused += len(pending)
                pending.clear()
            return
        stats.telemetry_uploads += 1
        stats.telemetry_samples += len(pending)
        self._pending = [s for s in pending if s.seq > response.acked_seq]

    async def _upload(
        self, samples: list[device_pb2.TelemetrySample]
    ) -> device_pb2.UploadTelemetryResponse:
        assert self.stub is not None
        return await self.stub.UploadTelemetry(
            device_pb2.UploadTelemetryRequest(samples=samples),
            metadata=self._md,
            timeout=self.ctx.rpc_timeout_s,
        )

    # ------------------------------------------------------------ updates

    def _want(self, assignment: device_pb2.Assignment) -> None:
        self._wanted = assignment
        if self._update_task is None or self._update_task.done():
            self._update_task = asyncio.create_task(
                self._update_loop(), name=f"update-{self.index}"
            )
        elif self._wake is not None:
            self._wake.set()  # supersedes the update under way

    async def _update_loop(self) -> None:
        while self._wanted is not None and self._wanted.sequence > self._taken_seq:
            assignment = self._wanted
            self._taken_seq = assignment.sequence
            self._assignment = assignment
            if self._wake is None:
                self._wake = asyncio.Event()
            self._wake.clear()
            # A new assignment replaces whatever ran beside the active model.
            self.shadow_version = ""
            try:
                await self._install(assignment)
            except Exception as exc:  # counted; the next assignment may work
                self.ctx.stats.errors[f"update {type(exc).__name__}"] += 1

    async def _pause(self, seconds: float, *, abortable: bool = True) -> bool:
        """Wait `seconds`; True when a newer assignment arrived meanwhile
        and the update may be aborted."""
        wake = self._wake
        assert wake is not None
        if not abortable:
            await asyncio.sleep(seconds)
            return False
        if not wake.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await wake.wait()
            except TimeoutError:
                return False
        return True

    async def _report(self, state: str, bytes_done: int = 0, reason: str = "") -> None:
        self.update_state = state
        self.update_reason = reason
        history = self.update_history
        history.append((self.update_sequence, state, reason))
        del history[:-HISTORY_LENGTH]
        await self._send_status(bytes_done=bytes_done)

    async def _send_status(self, *, bytes_done: int = 0, applied_only: bool = False) -> None:
        if not applied_only:
            assignment = self._assignment
            assert assignment is not None
            status = common_pb2.UpdateStatus(
                state=self.update_state,
                model_name=assignment.model_name,
                model_version=assignment.model_version,
                artifact_digest=assignment.artifact_digest,
                bytes_done=bytes_done,
                bytes_total=assignment.artifact_size,
                reason=self.update_reason,
                sequence=assignment.sequence,
                rollout_id=assignment.rollout_id,
                active_model_version=self.active_version,
                active_artifact_digest=self.active_digest,
            )
            status.updated_at.GetCurrentTime()
            self.status = status
        report = device_pb2.StatusReport(applied_revision=self.revision)
        if not applied_only:
            report.update.CopyFrom(self.status)
        if await self._write(device_pb2.AgentMessage(status=report)):
            self.ctx.stats.status_reports += 1

    async def _install(self, assignment: device_pb2.Assignment) -> None:
        """Walk the update machine's states for `assignment`, as the
        profile says this class fares with its version."""
        ctx = self.ctx
        rng = ctx.rng
        version = assignment.model_version
        behaviour = self.behaviour(version)
        total_s = rng.uniform(*behaviour.install_s)
        fail_state = behaviour.fail_state if rng.random() < behaviour.fail_rate else ""
        shadow = assignment.shadow
        if shadow and fail_state == "activating":
            fail_state = ""  # a shadow model is never activated
        size = assignment.artifact_size
        states = ["downloading", "verifying", "validating"]
        if not shadow:
            states.append("activating")
        for state in states:
            share = total_s * STATE_SHARES[state]
            abortable = state in ABORTABLE
            if state == "downloading":
                await self._report(state, 0)
                if ctx.download:
                    error = await self._download(assignment)
                    if error == "superseded":
                        return await self._superseded(state)
                    if error:
                        return await self._fail(state, error)
                    superseded = await self._pause(share)
                else:
                    superseded = await self._pause(share / 2)
                    if not superseded:
                        await self._report(state, size // 2)
                        superseded = await self._pause(share / 2)
            else:
                await self._report(state, size)
                if state == fail_state:
                    # Fails part-way through the state's work.
                    await self._pause(share * rng.random(), abortable=False)
                    return await self._fail(state, behaviour.reason)
                superseded = await self._pause(share, abortable=abortable)
            if superseded:
                return await self._superseded(state)
            if state == fail_state:
                return await self._fail(state, behaviour.reason)
        if shadow:
            self.shadow_version = version
            await self._report("shadowing", size)
            return None
        self.active_model = assignment.model_name
        self.active_version = version
        self.active_digest = assignment.artifact_digest
        await self._report("committed", size)
        if behaviour.silent_after_commit:
            await self._go_silent(behaviour.silent_for_s)
        return None

    async def _fail(self, state: str, reason: str) -> None:
        """Fatal failure in `state`: before the artifact is on the device
        nothing changed (straight to failed); after it, roll back first."""
        if state != "downloading":
            await self._report("rolling_back", self.status.bytes_done, reason)
            await self._pause(0.05 + 0.1 * self.ctx.rng.random(), abortable=False)
        await self._report("failed", self.status.bytes_done, reason)

    async def _superseded(self, state: str) -> None:
        wanted = self._wanted
        assert wanted is not None
        await self._fail(state, f"superseded by assignment {wanted.sequence}")

    async def _go_silent(self, seconds: float) -> None:
        """Stop heartbeats and telemetry and close the stream (half-close,
        so the control plane ends it cleanly), as a device that hung or lost
        power after activating would."""
        self._silent_until = time.monotonic() + (seconds if seconds > 0 else math.inf)
        call = self._call
        if call is not None:
            if self._write_lock is None:
                self._write_lock = asyncio.Lock()
            async with self._write_lock:
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await call.done_writing()

    async def _download(self, assignment: device_pb2.Assignment) -> str:
        """Download the artifact for real (resuming after transient errors)
        and check its digest; "" when it arrived, else why it failed
        ("superseded" when a newer assignment arrived meanwhile)."""
        assert self.stub is not None
        ctx = self.ctx
        hasher = hashlib.sha256()
        offset, attempts, last_report = 0, 0, time.monotonic()
        size = assignment.artifact_size
        while True:
            request = device_pb2.DownloadArtifactRequest(
                digest=assignment.artifact_digest, offset=offset
            )
            stream = self.stub.DownloadArtifact(
                request,
                metadata=self._md,
                timeout=max(ctx.rpc_timeout_s, 600.0),
            )
            try:
                async for chunk in stream:
                    if chunk.offset != offset:
                        return f"download out of order: chunk at {chunk.offset}, expected {offset}"
                    hasher.update(chunk.data)
                    offset += len(chunk.data)
                    ctx.stats.download_bytes += len(chunk.data)
                    if self._wake is not None and self._wake.is_set():
                        return "superseded"
                    if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        await self._report("downloading", offset)
                break
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                ctx.stats.errors[f"DownloadArtifact {code.name}"] += 1
                attempts += 1
                if code in FATAL_DOWNLOAD or attempts >= DOWNLOAD_ATTEMPTS:
                    return f"download failed ({code.name}): {exc.details() or ''}"
                if await self._pause(ctx.backoff_initial_s * 2**attempts):
                    return "superseded"
            finally:
                stream.cancel()
        ctx.stats.downloads += 1
        digest = hasher.hexdigest()
        if offset != size or digest != assignment.artifact_digest:
            return (
                f"artifact digest mismatch: got {offset} bytes with sha256 {digest[:12]}, "
                f"expected {size} bytes with {assignment.artifact_digest[:12]}"
            )
        return ""
