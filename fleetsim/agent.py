"""One simulated device: the real device protocol, no real inference.

A `SimAgent` does what `edgefleet-agent` does on the wire, with figures drawn
from its class's profile instead of measured:

- enrolls with the enrollment token and its stable hardware id (re-enrolls
  when the control plane refuses its credential);
- holds a Sync stream: Hello (protocol 2, hardware and runtime from the
  profile, the applied revision and every model's status), heartbeats at the
  interval the control plane's AgentConfig says, reconnects with jittered
  exponential backoff (the real agent's decision table, agent/daemon.py
  `decide`);
- holds several models (DesiredState.assignments, one per model name): for
  each newer assignment of a model it walks the real update machine's table
  (agent/update/states.py TRANSITIONS: downloading with byte progress,
  verifying, validating, activating, committed), or fails in the profile's
  state and rolls back; the models update concurrently, each reporting its
  own UpdateStatus (state as the UpdateState enum) in StatusReport.models. A
  shadow assignment goes through the same states and commits with the active
  version unchanged (the candidate runs beside it); a newer assignment of the
  model aborts an update that has not reached activation (the agent's
  abortable states), as the real agent does. A model absent from the
  assignments is removed: an abortable update is aborted, a later one
  settles first, then a last status (idle, nothing served) says it is gone;
- uploads one TelemetrySample per model served per interval (with the
  shadow comparison while a shadow runs), numbered per device.

With `protocol=1` (FleetContext) it is an old single-model agent instead: no
Hello.protocol, it reads only DesiredState.assignment and reports
Hello.update / StatusReport.update with the state as a string
(UpdateStatus.legacy_state): what the control plane's compatible view serves.

It keeps no files and uses one task for its connection and one for its timers
(one more per model while it installs), so one process holds thousands. Agents share
gRPC channels: the Fleet hands each one a stub (with TLS, an agent opens its
own mutual-TLS channel once enrolled: its certificate is its own). With no files, a re-run with
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
import httpx

from edgefleet.agent.reconnect import Delay, Step, decide
from edgefleet.agent.transport import resolve_endpoint, sign_reenrollment
from edgefleet.agent.update.states import ABORTABLE, TRANSITIONS, EventKind, State
from edgefleet.update_state import to_wire
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc

from .profiles import Behaviour, ClassProfile, FleetProfile

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

# Share of an install's time each state takes (the download dominates).
STATE_SHARES = {
    State.DOWNLOADING: 0.4, State.VERIFYING: 0.1, State.VALIDATING: 0.3, State.ACTIVATING: 0.2,
}  # fmt: skip
# The sync protocols this simulator speaks (Hello.protocol).
PROTOCOLS = (1, 2)
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
    # Downloads that arrived whole and verified, by where they came from:
    # "mirror", "control plane (HTTP)", "control plane (gRPC)".
    download_sources: Counter[str] = field(default_factory=Counter)
    # "<rpc> <CODE>" -> count, e.g. "Sync UNAVAILABLE".
    errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class FleetTls:
    """TLS as the control plane serves it with --tls: enrollment over TLS on
    the main port trusting `ca_pem`, device RPCs over mutual TLS on the
    device port with the certificate each enrollment returns. The agents
    share one key (and one CSR for it): the control plane names the device
    in each certificate it issues, and a simulator has no key to protect."""

    ca_pem: bytes
    key_pem: bytes
    csr_pem: bytes
    channel_options: tuple[tuple[str, Any], ...] = ()

    def device_channel(
        self, certificate: device_pb2.DeviceCertificate, enrolled_with: str
    ) -> grpc.aio.Channel:
        """A mutual-TLS channel to the device port with `certificate`."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=certificate.ca_certificate_pem or self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=certificate.certificate_pem,
        )
        endpoint = resolve_endpoint(certificate.device_endpoint, enrolled_with)
        return grpc.aio.secure_channel(endpoint, credentials, options=list(self.channel_options))


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
    # With `download` on a plain-text fleet: the client the agents share for
    # the assignments' HTTP sources (mirrors, the control plane's artifact
    # endpoint), before DownloadArtifact. None: DownloadArtifact only (a TLS
    # fleet: each device's certificate would need a client of its own).
    http: httpx.AsyncClient | None = None
    # Fixed intervals that win over the control plane's config (tests and
    # benchmarks want a known load); None: the server's, else the profile's.
    heartbeat_interval_s: float | None = None
    telemetry_interval_s: float | None = None
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rpc_timeout_s: float = 30.0
    # The sync protocol the agents speak: 2 (several models) or 1 (an old
    # single-model agent, for the control plane's compatible view).
    protocol: int = 2
    labels: dict[str, str] = field(default_factory=dict)
    stats: FleetStats = field(default_factory=FleetStats)
    # False: make no new samples, only resend those held (a benchmark's drain).
    produce_telemetry: bool = True
    # Called with each HeartbeatAck's round trip (seconds, from the decision
    # to send) and with each DesiredState as it arrives: benchmarks time them.
    on_heartbeat_ack: Callable[[SimAgent, float], None] | None = None
    on_desired: Callable[[SimAgent, device_pb2.DesiredState], None] | None = None
    # Called with each model's state as it reports it (m.state is set): a
    # benchmark follows a rollout by its transitions instead of scanning
    # 10,000 agents several times a second from the fleet's own event loop.
    on_state: Callable[[SimAgent, SimModel], None] | None = None
    # hardware id -> (device id, credential) of every enrollment: what a
    # re-enrollment of the same hardware id proves itself with (the control
    # plane refuses one without). Share one between runs with the same
    # prefix to re-run as the same devices.
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Set when the control plane serves TLS; None: plain text.
    tls: FleetTls | None = None
    # Where the agents enroll (the main port): a device endpoint advertised
    # with a wildcard host means this host.
    server: str = ""
    # The first failed Enroll of the fleet ("Enroll UNAVAILABLE: ..."), and
    # the first refusal of the token itself (UNAUTHENTICATED: invalid,
    # revoked or expired; no agent can enroll with it).
    first_enroll_error: str = ""
    token_refused: str = ""


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
# The agent process's own RSS without a model (docs/benchmarks.md: an idle
# agent is about 48 MB): a simulated agent's memory_mb is this plus its
# model's, as a real agent's RSS is.
AGENT_RSS_MB = 48.0


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
    # The model's own memory apart, as a real agent reports it; memory_mb
    # is the whole agent's RSS.
    sample.model_memory_mb = memory if behaviour is not None else 0.0
    sample.memory_mb = AGENT_RSS_MB + memory
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


class SimModel:
    """One model on a simulated device: its newest assignment, the update
    under way and what the device serves of it. The agent's `models` holds
    them by name (read them, do not set them)."""

    __slots__ = (
        "active_digest",
        "active_model",
        "active_version",
        "assignment",
        "name",
        "reason",
        "removing",
        "reported",
        "shadow_version",
        "state",
        "status",
        "taken_seq",
        "task",
        "wake",
        "wanted",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        # The newest assignment received, and the one taken on (the update
        # that runs or ran last); taken_seq: its sequence.
        self.wanted: device_pb2.Assignment | None = None
        self.assignment: device_pb2.Assignment | None = None
        self.taken_seq = 0
        self.state: str = State.IDLE
        self.reason = ""
        # What the device serves under this name (a protocol-1 agent's one
        # model may serve another name until its new assignment commits).
        self.active_model = ""
        self.active_version = ""
        self.active_digest = ""
        self.shadow_version = ""
        self.status = common_pb2.UpdateStatus()
        # The agent has reported a status for it (Hello lists only those).
        self.reported = False
        # Unassigned: the update loop removes it once its update settled.
        self.removing = False
        self.task: asyncio.Task[None] | None = None
        # Set when a newer assignment or the removal supersedes the update.
        self.wake = asyncio.Event()

    @property
    def version(self) -> str:
        """The model version of the assignment taken on ("" when none)."""
        return self.assignment.model_version if self.assignment is not None else ""

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


class SimAgent:
    """One simulated device. `run()` loops until cancelled; the attributes
    say where the device stands (read them, do not set them). `models` has
    each model by name; the single-model views (update_state, active_version,
    status, ...) are those of the model assigned most recently."""

    __slots__ = (
        "_attempt",
        "_call",
        "_channel",
        "_heartbeat_sent_at",
        "_md",
        "_pending",
        "_silent_until",
        "_timer_task",
        "_write_lock",
        "assignment_seen_at",
        "cert_pem",
        "class_name",
        "connected_at_stop",
        "connection",
        "connects",
        "credential",
        "ctx",
        "device_id",
        "device_state",
        "enroll_stub",
        "hardware_id",
        "heartbeat_seq",
        "index",
        "last_error",
        "models",
        "name",
        "profile_class",
        "revision",
        "server_heartbeat_s",
        "server_telemetry_s",
        "stub",
        "telemetry_dropped",
        "telemetry_produced",
        "telemetry_seq",
        "update_history",
    )

    def __init__(
        self,
        index: int,
        prefix: str,
        profile_class: ClassProfile,
        ctx: FleetContext,
        stub: device_pb2_grpc.DeviceServiceAsyncStub | None = None,
    ) -> None:
        if ctx.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {ctx.protocol}: fleetsim speaks protocol 1 or 2")
        self.index = index
        self.hardware_id = f"sim-{prefix}-{index:05d}"
        self.name = f"{prefix}-{index:05d}"
        self.profile_class = profile_class
        self.ctx = ctx
        # Device RPCs go to `stub`, Enroll to `enroll_stub` (the main port);
        # with TLS, `stub` is the agent's own mutual-TLS channel's, made at
        # enrollment.
        self.stub = stub
        self.enroll_stub = stub
        self._channel: grpc.aio.Channel | None = None
        self.device_id = ""
        self.credential = ""
        self.cert_pem = b""
        self.device_state = common_pb2.DEVICE_STATE_UNSPECIFIED
        # The class the control plane placed the device in ("" until known).
        self.class_name = ""
        self.revision = 0
        # new | enrolling | connecting | online | backoff | refused | silent | stopped
        self.connection = "new"
        # Sync streams that got their first DesiredState.
        self.connects = 0
        # Whether it held its Sync stream when the fleet stopped it.
        self.connected_at_stop = False
        self.last_error = ""
        self.server_heartbeat_s = 0.0
        self.server_telemetry_s = 0.0
        self.heartbeat_seq = 0
        self.telemetry_seq = 0
        # Samples this agent made, and of those given up (see FleetStats).
        self.telemetry_produced = 0
        self.telemetry_dropped = 0
        # Model name -> its state. A protocol-1 agent holds at most one.
        self.models: dict[str, SimModel] = {}
        # (sequence, state, reason) of the latest reports of every model,
        # oldest first (see states()); sequences are per device.
        self.update_history: list[tuple[int, str, str]] = []
        # time.monotonic() when the newest assignment arrived (0.0: none yet),
        # so a benchmark can time notification from the device's side.
        self.assignment_seen_at = 0.0
        self._timer_task: asyncio.Task[None] | None = None
        self._call: Any = None  # the open grpc.aio Sync call
        self._write_lock: asyncio.Lock | None = None
        self._md: tuple[tuple[str, str], ...] = ()
        self._pending: list[device_pb2.TelemetrySample] = []
        self._heartbeat_sent_at = 0.0  # of heartbeat_seq; 0.0: acked or none
        self._silent_until = 0.0
        self._attempt = 0

    # ------------------------------------------------------------ views

    @property
    def primary(self) -> SimModel | None:
        """The model assigned most recently (None: no model)."""
        return max(self.models.values(), key=lambda m: m.taken_seq, default=None)

    @property
    def update_state(self) -> str:
        """The update state of the primary model ("idle" when none)."""
        m = self.primary
        return str(m.state) if m is not None else State.IDLE.value

    @property
    def update_reason(self) -> str:
        m = self.primary
        return m.reason if m is not None else ""

    @property
    def update_version(self) -> str:
        """The version of the primary model's assignment ("" when none)."""
        m = self.primary
        return m.version if m is not None else ""

    @property
    def update_sequence(self) -> int:
        """The sequence of the primary model's assignment (0 when none)."""
        m = self.primary
        return m.taken_seq if m is not None else 0

    @property
    def status(self) -> common_pb2.UpdateStatus:
        """The primary model's last reported status."""
        m = self.primary
        return m.status if m is not None else common_pb2.UpdateStatus()

    @property
    def active_model(self) -> str:
        m = self.primary
        return m.active_model if m is not None else ""

    @property
    def active_version(self) -> str:
        """The version the primary model serves ("" when none)."""
        m = self.primary
        return m.active_version if m is not None else ""

    @property
    def active_digest(self) -> str:
        m = self.primary
        return m.active_digest if m is not None else ""

    @property
    def shadow_version(self) -> str:
        m = self.primary
        return m.shadow_version if m is not None else ""

    def serving(self) -> dict[str, str]:
        """Model name -> version served, of every model serving one."""
        return {m.active_model: m.active_version for m in self.models.values() if m.active_version}

    def states(self, sequence: int | None = None) -> list[str]:
        """The states assignment `sequence` (default: the primary model's
        current one) went through, in order, as far as the history reaches
        back (progress reports of one state count once)."""
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
        self.connected_at_stop = False
        try:
            await self._connect_forever()
        finally:
            self.connected_at_stop = self.connection == "online"
            self.stop_tasks()
            self.connection = "stopped"

    async def close(self) -> None:
        """Close the agent's own channel (with TLS; after run() ended)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)

    def stop_tasks(self) -> None:
        """Cancel the timers and every model's update."""
        if self._timer_task is not None:
            self._timer_task.cancel()
        for m in self.models.values():
            if m.task is not None:
                m.task.cancel()

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
            if step == "Enroll":
                ctx.first_enroll_error = ctx.first_enroll_error or self.last_error
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    ctx.token_refused = ctx.token_refused or self.last_error
            if self.silent:
                await self._stay_silent()
                continue
            await asyncio.sleep(self._delay_after(step, code))

    def _delay_after(self, step: str, code: grpc.StatusCode | None) -> float:
        """The real agent's decision table (agent/daemon.py `decide`):
        transient failures back off exponentially, a refused credential
        re-enrolls, a refused device or token retries slowly (an operator
        may fix it)."""
        ctx = self.ctx
        decision = decide(Step.ENROLL if step == "Enroll" else Step.SYNC, code, can_enroll=True)
        if decision.next_step is Step.ENROLL and step == "Sync":
            # Enrolling again, with the refused credential as proof, returns
            # the same device with a fresh one if it was decommissioned (and
            # is refused if another process enrolled this hardware id).
            self.credential = ""
        if decision.delay is Delay.MAX:
            self.connection = "refused"
            self._attempt = 64
            return ctx.backoff_max_s * (0.5 + 0.5 * ctx.rng.random())
        self.connection = "backoff"
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
        assert self.enroll_stub is not None
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
        tls = ctx.tls
        if tls is not None:
            request.csr = tls.csr_pem
            if known is not None and self.cert_pem:
                # With TLS the proof also shows the key of its certificate.
                request.proof.certificate_pem = self.cert_pem
                request.proof.signature = sign_reenrollment(tls.key_pem, known[0], tls.csr_pem)
        self.connection = "enrolling"
        async with ctx.connect_slots:
            response = await self.enroll_stub.Enroll(request, timeout=ctx.rpc_timeout_s)
        old_channel = None
        if tls is not None:
            certificate = response.certificate
            if not certificate.certificate_pem:
                raise RuntimeError(
                    "the control plane answered without a client certificate (is it "
                    "serving plain text? then leave the CA certificate out)"
                )
            old_channel, self._channel = self._channel, tls.device_channel(certificate, ctx.server)
            self.stub = device_pb2_grpc.DeviceServiceStub(self._channel)
            self.cert_pem = certificate.certificate_pem
        if response.device_id != self.device_id:
            # Revisions count per device: a new device id starts from 0.
            self.revision = 0
        self.device_id = response.device_id
        self.credential = response.device_credential
        ctx.identities[self.hardware_id] = (self.device_id, self.credential)
        self.device_state = response.state
        self._md = (("authorization", f"Bearer {self.credential}"),)
        ctx.stats.enrollments += 1
        if old_channel is not None:  # the certificate it was opened with is revoked now
            await old_channel.close(grace=None)

    # ------------------------------------------------------------ sync

    def _hello(self) -> device_pb2.AgentMessage:
        hello = device_pb2.Hello(
            hardware=self.profile_class.hardware,
            runtime=self.profile_class.runtime,
            applied_revision=self.revision,
        )
        if self.ctx.protocol >= 2:
            hello.protocol = self.ctx.protocol
            hello.models.extend(m.status for m in self.models.values() if m.reported)
        elif self.models:
            # An old agent: no protocol field, its one model's status.
            hello.update.CopyFrom(next(iter(self.models.values())).status)
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
                        await self._send_status(())
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
        adopt its config, class and state, start installing each newer
        assignment, remove the models no longer assigned (protocol 2). True
        when its revision is newer than the applied one."""
        self._adopt_config(desired.config)
        self.device_state = desired.device_state
        self.class_name = desired.class_name
        newer = desired.revision > self.revision
        if newer:
            self.revision = desired.revision
        if self.ctx.protocol < 2:
            if desired.HasField("assignment"):
                self._want_single(desired.assignment)
            return newer
        assignments = list(desired.assignments)
        if not assignments and desired.HasField("assignment"):
            # A control plane older than protocol 2 sets only `assignment`.
            assignments = [desired.assignment]
        for assignment in assignments:
            m = self.models.get(assignment.model_name)
            if m is None:
                m = self.models[assignment.model_name] = SimModel(assignment.model_name)
            if m.removing or assignment.sequence > (m.wanted.sequence if m.wanted else 0):
                self.assignment_seen_at = time.monotonic()
                m.removing = False
                self._want(m, assignment)
        listed = {a.model_name for a in assignments}
        for name, m in list(self.models.items()):
            if name not in listed and not m.removing:
                self._remove(m)
        return newer

    def _want_single(self, assignment: device_pb2.Assignment) -> None:
        """Protocol 1: the device's one model takes the assignment, whatever
        its name (an old agent replaces its model)."""
        m = next(iter(self.models.values()), None)
        if m is None:
            m = self.models[assignment.model_name] = SimModel(assignment.model_name)
        elif m.name != assignment.model_name:
            del self.models[m.name]
            m.name = assignment.model_name
            self.models[m.name] = m
        if assignment.sequence > (m.wanted.sequence if m.wanted else 0):
            self.assignment_seen_at = time.monotonic()
            self._want(m, assignment)

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

    def _sample(self, interval_s: float, m: SimModel | None) -> device_pb2.TelemetrySample:
        self.telemetry_seq += 1
        version = m.active_version if m is not None else ""
        shadow = None
        if m is not None and m.shadow_version and version:
            shadow = (m.shadow_version, self.behaviour(m.shadow_version))
        return make_sample(
            self.ctx.rng,
            self.telemetry_seq,
            interval_s,
            m.active_model if m is not None and version else "",
            version,
            self.behaviour(version) if version else None,
            self.profile_class.hardware.memory_mb,
            shadow,
        )

    def next_sample(self, interval_s: float) -> device_pb2.TelemetrySample:
        """The TelemetrySample of the primary model for the interval that
        just ended (a device-level one when it serves nothing)."""
        m = self.primary
        return self._sample(interval_s, m if m is not None and m.active_version else None)

    def next_samples(self, interval_s: float) -> list[device_pb2.TelemetrySample]:
        """The interval's samples: one per model served (by name), or one
        device-level sample when none is."""
        serving = sorted((m for m in self.models.values() if m.active_version),
                         key=lambda m: m.name)  # fmt: skip
        if not serving:
            return [self._sample(interval_s, None)]
        return [self._sample(interval_s, m) for m in serving]

    async def _upload_telemetry(self, interval_s: float) -> None:
        assert self.stub is not None
        stats = self.ctx.stats
        pending = self._pending
        made = 0
        if self.ctx.produce_telemetry:
            made_now = self.next_samples(interval_s)
            pending.extend(made_now)
            self.telemetry_produced += len(made_now)
            stats.telemetry_produced += len(made_now)
            made = len(made_now)
        if len(pending) > MAX_PENDING_SAMPLES:
            dropped = len(pending) - MAX_PENDING_SAMPLES
            del pending[:dropped]
            self.telemetry_dropped += dropped
            stats.telemetry_dropped += dropped
        if not pending:
            return
        # All but the new samples were in an upload that failed.
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

    def _want(self, m: SimModel, assignment: device_pb2.Assignment) -> None:
        m.wanted = assignment
        if m.busy:
            m.wake.set()  # supersedes the update under way
        else:
            m.task = asyncio.create_task(self._model_loop(m), name=f"update-{self.index}-{m.name}")

    def _remove(self, m: SimModel) -> None:
        """Unassigned: abort an abortable update, let a later one settle,
        then unload the model (the loop does it)."""
        m.removing = True
        if m.busy:
            m.wake.set()
        else:
            m.task = asyncio.create_task(self._model_loop(m), name=f"remove-{self.index}-{m.name}")

    async def _model_loop(self, m: SimModel) -> None:
        while not m.removing and m.wanted is not None and m.wanted.sequence > m.taken_seq:
            assignment = m.wanted
            m.taken_seq = assignment.sequence
            m.assignment = assignment
            m.wake.clear()
            # A new assignment replaces whatever ran beside the active model.
            m.shadow_version = ""
            try:
                await self._install(m, assignment)
            except Exception as exc:  # counted; the next assignment may work
                self.ctx.stats.errors[f"update {type(exc).__name__}"] += 1
        if m.removing:
            await self._unload(m)

    async def _unload(self, m: SimModel) -> None:
        """The model is gone: a last status, idle with nothing served, tells
        the control plane (the real agent's removal report)."""
        if self.models.get(m.name) is m:
            del self.models[m.name]
        m.state, m.reason = State.IDLE, "unassigned"
        m.active_model = m.active_version = m.active_digest = m.shadow_version = ""
        self._remember(m.taken_seq, State.IDLE, "unassigned")
        status = common_pb2.UpdateStatus(model_name=m.name, sequence=m.taken_seq)
        self._set_state(status, State.IDLE)
        status.updated_at.GetCurrentTime()
        m.status = status
        await self._send_status((m,))

    async def _pause(self, m: SimModel, seconds: float, *, abortable: bool = True) -> bool:
        """Wait `seconds`; True when a newer assignment (or the removal)
        arrived meanwhile and the update may be aborted."""
        if not abortable:
            await asyncio.sleep(seconds)
            return False
        if not m.wake.is_set():
            try:
                async with asyncio.timeout(seconds):
                    await m.wake.wait()
            except TimeoutError:
                return False
        return True

    def _remember(self, sequence: int, state: str, reason: str) -> None:
        history = self.update_history
        history.append((sequence, str(state), reason))
        del history[:-HISTORY_LENGTH]

    def _set_state(self, status: common_pb2.UpdateStatus, state: State) -> None:
        if self.ctx.protocol >= 2:
            status.state = to_wire(state)
        else:
            status.legacy_state = state

    async def _report(
        self, m: SimModel, state: State, bytes_done: int = 0, reason: str = ""
    ) -> None:
        m.state = state
        m.reason = reason
        self._remember(m.taken_seq, state, reason)
        assignment = m.assignment
        assert assignment is not None
        status = common_pb2.UpdateStatus(
            model_name=assignment.model_name,
            model_version=assignment.model_version,
            artifact_digest=assignment.artifact_digest,
            bytes_done=bytes_done,
            bytes_total=assignment.artifact_size,
            reason=reason,
            sequence=assignment.sequence,
            rollout_id=assignment.rollout_id,
            active_model_version=m.active_version,
            active_artifact_digest=m.active_digest,
        )
        self._set_state(status, state)
        status.updated_at.GetCurrentTime()
        m.status = status
        m.reported = True
        if self.ctx.on_state is not None:
            self.ctx.on_state(self, m)
        await self._send_status((m,))

    async def _send_status(self, changed: tuple[SimModel, ...]) -> None:
        """A StatusReport with the applied revision and the statuses of the
        `changed` models (none: the revision only)."""
        report = device_pb2.StatusReport(applied_revision=self.revision)
        if self.ctx.protocol >= 2:
            report.models.extend(m.status for m in changed)
        elif changed:
            report.update.CopyFrom(changed[-1].status)
        if await self._write(device_pb2.AgentMessage(status=report)):
            self.ctx.stats.status_reports += 1

    async def _install(self, m: SimModel, assignment: device_pb2.Assignment) -> None:
        """Walk the update machine's table (TRANSITIONS) for `assignment`,
        each state's outcome drawn from how the profile says this class
        fares with its version."""
        rng = self.ctx.rng
        version = assignment.model_version
        behaviour = self.behaviour(version)
        total_s = rng.uniform(*behaviour.install_s)
        fail_state = behaviour.fail_state if rng.random() < behaviour.fail_rate else ""
        state = TRANSITIONS[(State.IDLE, EventKind.SUCCESS)]
        reason = ""
        while state is not State.IDLE:
            kind, why = await self._run_state(
                m, assignment, state, total_s, fail_state == state, behaviour, reason
            )
            reason = why or reason
            state = TRANSITIONS[(state, kind)]
        if m.state == State.COMMITTED and behaviour.silent_after_commit:
            await self._go_silent(behaviour.silent_for_s)

    async def _run_state(
        self,
        m: SimModel,
        assignment: device_pb2.Assignment,
        state: State,
        total_s: float,
        fails: bool,
        behaviour: Behaviour,
        reason: str,
    ) -> tuple[EventKind, str]:
        """Report `state` and do its simulated work; its event and reason."""
        size = assignment.artifact_size
        if state is State.ROLLING_BACK:
            await self._report(m, state, m.status.bytes_done, reason)
            await self._pause(m, 0.05 + 0.1 * self.ctx.rng.random(), abortable=False)
            if m.shadow_version == assignment.model_version:
                m.shadow_version = ""  # rolling back drops the shadow
            return EventKind.SUCCESS, reason
        if state is State.FAILED:
            await self._report(m, state, m.status.bytes_done, reason)
            return EventKind.SUCCESS, reason
        if state is State.COMMITTED:
            await self._report(m, state, size)
            return EventKind.SUCCESS, ""
        share = total_s * STATE_SHARES[state]
        abortable = state in ABORTABLE
        if state is State.DOWNLOADING:
            await self._report(m, state, 0)
            if self.ctx.download:
                error = await self._download(m, assignment)
                if error == "superseded":
                    return EventKind.ABORTED, self._abort_reason(m)
                if error:
                    return EventKind.FATAL, error
                superseded = await self._pause(m, share)
            else:
                superseded = await self._pause(m, share / 2)
                if not superseded:
                    await self._report(m, state, size // 2)
                    superseded = await self._pause(m, share / 2)
        else:
            await self._report(m, state, size)
            if fails:
                # Fails part-way through the state's work.
                await self._pause(m, share * self.ctx.rng.random(), abortable=False)
                return EventKind.FATAL, behaviour.reason
            superseded = await self._pause(m, share, abortable=abortable)
        if superseded:
            return EventKind.ABORTED, self._abort_reason(m)
        if fails:
            return EventKind.FATAL, behaviour.reason
        if state is State.ACTIVATING:
            if assignment.shadow:
                # Loaded beside the active version, which does not change.
                m.shadow_version = assignment.model_version
            else:
                m.active_model = assignment.model_name
                m.active_version = assignment.model_version
                m.active_digest = assignment.artifact_digest
        return EventKind.SUCCESS, ""

    def _abort_reason(self, m: SimModel) -> str:
        if m.removing:
            return "aborted: model unassigned"
        wanted = m.wanted
        assert wanted is not None
        return f"superseded by assignment {wanted.sequence}"

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

    async def _download(self, m: SimModel, assignment: device_pb2.Assignment) -> str:
        """Download the artifact for real and check its digest: from the
        assignment's HTTP sources in order, then DownloadArtifact. "" when
        it arrived, else why it failed ("superseded" when a newer
        assignment arrived meanwhile)."""
        if self.ctx.http is not None:
            for source in assignment.sources:
                outcome = await self._download_http(m, assignment, source)
                if outcome is not None:
                    return outcome
        return await self._download_grpc(m, assignment)

    async def _download_http(
        self, m: SimModel, assignment: device_pb2.Assignment, source: device_pb2.ArtifactSource
    ) -> str | None:
        """One HTTP source, whole (no resume: the real agent's resume is
        tested with real agents); None when it failed (the next source is
        tried), else as _download."""
        ctx = self.ctx
        assert ctx.http is not None
        digest, size = assignment.artifact_digest, assignment.artifact_size
        url = f"{source.base_url.rstrip('/')}/{digest}"
        headers = {"Authorization": f"Bearer {self.credential}"} if source.control_plane else {}
        hasher, got = hashlib.sha256(), 0
        try:
            async with ctx.http.stream("GET", url, headers=headers) as response:
                if response.status_code != 200:
                    ctx.stats.errors[f"HTTP GET {response.status_code}"] += 1
                    return None
                async for data in response.aiter_raw():
                    hasher.update(data)
                    got += len(data)
                    ctx.stats.download_bytes += len(data)
                    if m.wake.is_set():
                        return "superseded"
        except httpx.HTTPError as exc:
            ctx.stats.errors[f"HTTP GET {type(exc).__name__}"] += 1
            return None
        if got != size or hasher.hexdigest() != digest:
            ctx.stats.errors["HTTP GET wrong bytes"] += 1
            return None
        ctx.stats.downloads += 1
        ctx.stats.download_sources[
            "control plane (HTTP)" if source.control_plane else "mirror"
        ] += 1
        return ""

    async def _download_grpc(self, m: SimModel, assignment: device_pb2.Assignment) -> str:
        """Over DownloadArtifact (resuming after transient errors)."""
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
                    if m.wake.is_set():
                        return "superseded"
                    if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                        last_report = time.monotonic()
                        await self._report(m, State.DOWNLOADING, offset)
                break
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                ctx.stats.errors[f"DownloadArtifact {code.name}"] += 1
                attempts += 1
                if code in FATAL_DOWNLOAD or attempts >= DOWNLOAD_ATTEMPTS:
                    return f"download failed ({code.name}): {exc.details() or ''}"
                if await self._pause(m, ctx.backoff_initial_s * 2**attempts):
                    return "superseded"
            finally:
                stream.cancel()
        ctx.stats.downloads += 1
        ctx.stats.download_sources["control plane (gRPC)"] += 1
        digest = hasher.hexdigest()
        if offset != size or digest != assignment.artifact_digest:
            return (
                f"artifact digest mismatch: got {offset} bytes with sha256 {digest[:12]}, "
                f"expected {size} bytes with {assignment.artifact_digest[:12]}"
            )
        return ""
