"""A simulated fleet: N SimAgents in one asyncio process against a real
control plane, sharing a few gRPC channels.

    async with Fleet("127.0.0.1:7443", token, profile, 1000, prefix="lab") as fleet:
        ...                                   # start() waited for every stream
        await fleet.wait_until(lambda f: f.counts()[("committed", "2.0.0")] == 1000)
        print(fleet.summary().to_dict())

Each channel is one TCP connection with its own HTTP/2 state; about 500
streams share one (`agents_per_channel`), which keeps this process's cost
per agent low without making any one connection a bottleneck. Enroll calls
and Sync connects in flight are bounded (`connect_concurrency`), so a fleet
starting, or reconnecting after a control-plane restart, queues here rather
than at the server's database.

Against a control plane serving TLS (`edgefleet server`'s default), give
`ca_cert`, the PEM of its CA (ca.pem in its data directory): the agents
enroll over TLS on `server`, each with a CSR, and then hold device RPCs
over mutual TLS on the device port with the certificate issued to them.
Each certificate names one device, so with TLS every enrolled agent holds
its own connection (`agents_per_channel` then groups only enrollments).
The agents do not renew their certificates: a run outlives them only if
it is shorter than the control plane's --device-cert-lifetime.

An agent costs this process about 35 KB; at 10,000 agents the control
plane, not the simulator, is the bottleneck. A process that holds thousands
of agents should call gc.freeze() once they are connected (the CLI does):
otherwise a full collection over them stalls the event loop (0.7 s at
10,000 agents).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import httpx

from edgefleet.agent.transport import new_key_and_csr
from edgefleet.v1 import device_pb2, device_pb2_grpc

from .agent import PROTOCOLS, FleetContext, FleetTls, SimAgent
from .profiles import FleetProfile, default_profile

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A local subchannel pool gives each channel its own TCP connection;
    # otherwise channels with identical arguments share one inside grpc.
    ("grpc.use_local_subchannel_pool", 1),
    # Above the heartbeat interval, so the server's ping policy never trips.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # After a control-plane restart, a channel must come back within the
    # agents' own backoff rather than grpc's default of up to two minutes.
    ("grpc.max_reconnect_backoff_ms", 5_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


class FleetError(Exception):
    """The fleet cannot do what was asked (e.g. the token is refused)."""


@dataclass(frozen=True)
class FleetSummary:
    """Where the fleet stands, counted over its agents."""

    agents: int
    elapsed_s: float
    # Connection state -> agents (online, connecting, backoff, silent, ...).
    connection: dict[str, int]
    # Model version -> update state -> agents, of each agent's most recently
    # assigned model; "" is no assignment yet.
    updates: dict[str, dict[str, int]]
    # Version served -> agents; "" is no model.
    active: dict[str, int]
    # Class the control plane placed the device in -> agents; "" unclassified.
    classes: dict[str, int]
    # FleetStats: RPCs made and errors seen.
    stats: dict[str, Any]
    # "model@version" -> update state -> agents, over every model of every
    # agent (several per device); "" -> {"idle": agents holding no model}.
    models: dict[str, dict[str, int]]
    # "model@version" served -> agents, counting only agents that hold a
    # live Sync stream (or held one when the fleet stopped).
    serving: dict[str, int]
    # Agents enrolled in this run (hold a device identity); of those, the
    # ones holding a live Sync stream (or that held one when the fleet
    # stopped); agents never enrolled whose last Enroll failed, and the
    # fleet's first failed Enroll ("" when none failed).
    enrolled: int = 0
    connected: int = 0
    enroll_failed: int = 0
    enroll_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


class Fleet:
    """N simulated agents. `start()`, then read `agents`, `counts()`,
    `summary()`; `stop()` ends every stream and closes the channels."""

    def __init__(
        self,
        server: str,
        token: str,
        profile: FleetProfile | None = None,
        n: int = 1,
        prefix: str = "sim",
        *,
        download: bool = False,
        seed: int | str | None = None,
        agents_per_channel: int = 500,
        connect_concurrency: int = 100,
        heartbeat_interval_s: float | None = None,
        telemetry_interval_s: float | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        rpc_timeout_s: float = 30.0,
        protocol: int = 2,
        labels: dict[str, str] | None = None,
        on_heartbeat_ack: Callable[[SimAgent, float], None] | None = None,
        on_desired: Callable[[SimAgent, device_pb2.DesiredState], None] | None = None,
        identities: dict[str, tuple[str, str]] | None = None,
        ca_cert: bytes | None = None,
    ) -> None:
        if n < 0 or agents_per_channel < 1 or connect_concurrency < 1:
            raise ValueError("need n >= 0, agents_per_channel >= 1, connect_concurrency >= 1")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol}: fleetsim speaks protocol 1 or 2")
        self.server = server
        self.prefix = prefix
        self.profile = profile or default_profile()
        self.agents_per_channel = agents_per_channel
        self.ctx = FleetContext(
            profile=self.profile,
            token=token,
            connect_slots=asyncio.Semaphore(connect_concurrency),
            rng=random.Random(seed),
            download=download,
            heartbeat_interval_s=heartbeat_interval_s,
            telemetry_interval_s=telemetry_interval_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            rpc_timeout_s=rpc_timeout_s,
            protocol=protocol,
            # Lets an operator select the simulated devices (and only them).
            labels={"fleetsim": prefix, **(labels or {})},
            on_heartbeat_ack=on_heartbeat_ack,
            on_desired=on_desired,
            identities={} if identities is None else identities,
            tls=self._tls(ca_cert, prefix),
            server=server,
        )
        self.agents = [
            SimAgent(i, prefix, cls, self.ctx) for i, cls in enumerate(self.profile.allocate(n))
        ]
        if download and self.ctx.tls is None:
            # One pool for the fleet: a device's download is one connection.
            self.ctx.http = httpx.AsyncClient(
                timeout=httpx.Timeout(rpc_timeout_s * 4, connect=rpc_timeout_s),
                limits=httpx.Limits(max_connections=connect_concurrency * 4,
                                    max_keepalive_connections=connect_concurrency),
            )  # fmt: skip
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._crash: BaseException | None = None
        self._started = 0.0

    @staticmethod
    def _tls(ca_cert: bytes | None, prefix: str) -> FleetTls | None:
        if ca_cert is None:
            return None
        if b"-----BEGIN CERTIFICATE-----" not in ca_cert:
            raise ValueError("ca_cert is not a PEM certificate (the control plane's ca.pem)")
        key_pem, csr_pem = new_key_and_csr(f"fleetsim-{prefix}")
        return FleetTls(ca_cert, key_pem, csr_pem, tuple(CHANNEL_OPTIONS))

    @property
    def tls(self) -> bool:
        """Whether the fleet talks TLS to the control plane."""
        return self.ctx.tls is not None

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Open the channels and start every agent; with `wait`, return once
        every agent holds its Sync stream (see wait_connected)."""
        if self._tasks:
            raise FleetError("the fleet is already started")
        self._started = time.monotonic()
        n_channels = max(1, math.ceil(len(self.agents) / self.agents_per_channel))
        tls = self.ctx.tls
        self._channels = [
            grpc.aio.insecure_channel(self.server, options=CHANNEL_OPTIONS)
            if tls is None
            else grpc.aio.secure_channel(
                self.server,
                grpc.ssl_channel_credentials(root_certificates=tls.ca_pem),
                options=CHANNEL_OPTIONS,
            )
            for _ in range(n_channels)
        ]
        stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in self._channels]
        for agent in self.agents:
            agent.enroll_stub = stubs[agent.index // self.agents_per_channel]
            # With TLS the device RPCs wait for the agent's own channel.
            agent.stub = agent.enroll_stub if tls is None else None
        self._run_agents()
        if wait:
            try:
                await self.wait_connected(timeout_s)
            except BaseException:
                await self.stop()
                raise

    def _run_agents(self) -> None:
        """One task per agent. An agent's run() ends only when cancelled;
        one that raised is a bug in the simulator (or in how its stubs were
        wired), kept so that waiting on the fleet fails at once instead of
        timing out with the agent silently missing."""

        def on_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None and self._crash is None:
                self._crash = task.exception()

        self._tasks = [
            asyncio.create_task(agent.run(), name=f"sim-agent-{agent.index}")
            for agent in self.agents
        ]
        for task in self._tasks:
            task.add_done_callback(on_done)

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Until every agent has had its first DesiredState on a Sync stream.
        Raises FleetError when every agent still waiting was refused (a bad
        token, say), TimeoutError after `timeout_s` seconds."""

        def connected(fleet: Fleet) -> bool:
            error = fleet.refused()
            if error:
                raise FleetError(error)
            return all(a.connects for a in fleet.agents)

        await self.wait_until(connected, timeout_s, what="every agent connected")

    async def wait_until(
        self,
        predicate: Callable[[Fleet], bool],
        timeout_s: float | None = None,
        *,
        interval: float = 0.05,
        what: str = "",
    ) -> None:
        """Poll `predicate(fleet)` until it is true; TimeoutError after
        `timeout_s` seconds, with the fleet's counts in the message."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not predicate(self):
            if self._crash is not None:
                raise FleetError(f"a simulated agent crashed: {self._crash!r}") from self._crash
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{what or 'condition'} not met within {timeout_s:g} s: "
                    f"connections {dict(self.connections())}, updates {dict(self.counts())}"
                )
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        """End every agent (cancelling its streams) and close the channels.
        Idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for agent in self.agents:
            await agent.close()
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close(grace=None)
        http, self.ctx.http = self.ctx.http, None
        if http is not None:
            await http.aclose()

    def drain_telemetry(self) -> None:
        """From now on the agents make no new telemetry samples but keep
        uploading, at their interval, those they hold (until acked)."""
        self.ctx.produce_telemetry = False

    def pending_samples(self) -> int:
        """Telemetry samples the agents hold, not acked yet."""
        return sum(a.pending_samples for a in self.agents)

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------ views

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    def refused(self) -> str:
        """Why the fleet gets nowhere: set when every agent that never
        connected was refused (a wrong or exhausted token, a rejected
        device), "" otherwise. Refused agents keep retrying slowly."""
        waiting = [a for a in self.agents if not a.connects]
        refused = [a for a in waiting if a.connection == "refused"]
        if waiting and len(refused) == len(waiting):
            return f"{len(refused)} agent(s) refused: {refused[0].last_error}"
        return ""

    def token_refused(self) -> str:
        """Why no agent can enroll at all: set when the control plane refused
        the enrollment token itself (UNAUTHENTICATED: invalid, revoked or
        expired), from the first such refusal, "" otherwise."""
        return self.ctx.token_refused

    def enrolled(self) -> int:
        """Agents enrolled in this run (holding a device identity)."""
        return sum(1 for a in self.agents if a.device_id)

    def connected(self) -> int:
        """Agents holding a live Sync stream (after stop(): those that held
        one when stopped)."""
        return sum(1 for a in self.agents if _live(a))

    def enroll_failures(self) -> tuple[int, str]:
        """Agents not enrolled whose last Enroll failed, and the fleet's
        first failed Enroll ("Enroll UNAVAILABLE: ...", "" when none)."""
        failed = sum(1 for a in self.agents if not a.device_id and a.last_error)
        return failed, self.ctx.first_enroll_error

    def agent(self, device_id: str) -> SimAgent:
        """The agent simulating device `device_id` (KeyError if none)."""
        for agent in self.agents:
            if agent.device_id == device_id:
                return agent
        raise KeyError(device_id)

    def counts(self) -> Counter[tuple[str, str]]:
        """(update state, model version) -> agents. An agent with no
        assignment counts as ("idle", "")."""
        return Counter((a.update_state, a.update_version) for a in self.agents)

    def model_counts(self) -> Counter[tuple[str, str, str]]:
        """(model name, update state, model version) -> agents, over every
        model each agent holds."""
        return Counter(
            (m.name, str(m.state), m.version) for a in self.agents for m in a.models.values()
        )

    def active_versions(self) -> Counter[str]:
        """Version served -> agents ("" for none)."""
        return Counter(a.active_version for a in self.agents)

    def connections(self) -> Counter[str]:
        """Connection state -> agents."""
        return Counter(a.connection for a in self.agents)

    def summary(self) -> FleetSummary:
        """Everything counted, for the CLI and for benchmark reports."""
        updates: dict[str, dict[str, int]] = {}
        for (state, version), count in sorted(self.counts().items()):
            updates.setdefault(version, {})[state] = count
        models: dict[str, dict[str, int]] = {}
        for (name, state, version), count in sorted(self.model_counts().items()):
            models.setdefault(f"{name}@{version}", {})[state] = count
        # Enrolled agents holding no model: one that never enrolled is not
        # "idle" on any model, it is counted as not enrolled.
        bare = sum(1 for a in self.agents if a.device_id and not a.models)
        if bare:
            models[""] = {"idle": bare}
        serving = Counter(
            f"{name}@{version}"
            for a in self.agents
            if _live(a)
            for name, version in a.serving().items()
        )
        stats = asdict(self.ctx.stats)
        stats["errors"] = dict(sorted(self.ctx.stats.errors.items()))
        failed, first_error = self.enroll_failures()
        return FleetSummary(
            agents=len(self.agents),
            elapsed_s=time.monotonic() - self._started if self._started else 0.0,
            connection=dict(sorted(self.connections().items())),
            updates=updates,
            active=dict(sorted(self.active_versions().items())),
            classes=dict(sorted(Counter(a.class_name for a in self.agents).items())),
            stats=stats,
            models=models,
            serving=dict(sorted(serving.items())),
            enrolled=self.enrolled(),
            connected=self.connected(),
            enroll_failed=failed,
            enroll_error=first_error,
        )


def _live(agent: SimAgent) -> bool:
    """Holds a Sync stream that got its DesiredState (or did when stopped)."""
    return agent.online or (agent.connection == "stopped" and agent.connected_at_stop)
