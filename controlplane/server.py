"""Assembles the control plane: database, services, gRPC servicers, health,
reflection and metrics. `create_server` is what tests use; `run` is what
`edgefleet server` calls."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import make_url

from edgefleet.controlplane import file_modes, gc_policy, loop_lag, malloc_policy, open_files
from edgefleet.controlplane.api.device_servicer import DeviceServicer
from edgefleet.controlplane.api.operator_servicer import OperatorServicer
from edgefleet.controlplane.api.rpc import PeerCertificates, RpcMetrics
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.db.engine import make_engine, sqlite_url, upgrade
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import pki, secrets
from edgefleet.controlplane.services.artifacts import ArtifactService
from edgefleet.controlplane.services.auth import DeviceCredentials, ensure_bootstrap_admin
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.build_runner import BuildRunner
from edgefleet.controlplane.services.builds import BuildService
from edgefleet.controlplane.services.certificates import (
    CertificateService,
    ensure_authority,
    server_names,
)
from edgefleet.controlplane.services.classes import ClassService
from edgefleet.controlplane.services.deployments import DeploymentService
from edgefleet.controlplane.services.devices import DEVICE_STATES, DeviceService
from edgefleet.controlplane.services.enrollment import EnrollmentService
from edgefleet.controlplane.services.events import EventBus, FleetEvent, Pulse
from edgefleet.controlplane.services.hub import SyncHub
from edgefleet.controlplane.services.keys import ensure_signing_key
from edgefleet.controlplane.services.operator_tokens import OperatorTokenService
from edgefleet.controlplane.services.orchestrator import Orchestrator
from edgefleet.controlplane.services.ratelimit import TelemetryRateLimit
from edgefleet.controlplane.services.registry import RegistryService
from edgefleet.controlplane.services.replicas import LocalEventBridge, PgEventBridge, libpq_dsn
from edgefleet.controlplane.services.rollouts import RolloutService
from edgefleet.controlplane.services.status_buffer import StatusBuffer
from edgefleet.controlplane.services.telemetry import TelemetryService
from edgefleet.v1 import device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

log = logging.getLogger(__name__)

# The sync stream's hot path is short; enough threads for SQL to overlap I/O
# without letting thousands of enrollments pile onto SQLite's single writer.
DB_THREADS = 8
BACKGROUND_THREADS = 2
OPERATOR_THREADS = 4
PRESENCE_FLUSH_S = 5.0
# Live views hear about new telemetry at most this often.
TELEMETRY_EVENT_S = 5.0
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# How long a connection may take to finish its TLS handshake and HTTP/2
# preface (gRPC's default: 120 s). Until then nobody has shown a credential,
# yet each connection holds a file descriptor: 1,100 that sent nothing, or
# half a ClientHello, held the 1,024 of a default limit for two minutes.
# A handshake is two round trips; 10 s leaves room for a slow cellular link.
HANDSHAKE_TIMEOUT_MS = 10_000
# A connection without a call for this long is closed (GOAWAY; a client
# reconnects when it next calls). Agents hold their Sync stream (a call) and
# upload telemetry every 30 s; an idle CLI or TUI channel reconnects.
MAX_CONNECTION_IDLE_MS = 120_000
CONNECTION_OPTIONS: list[tuple[str, int]] = [
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
]


class _DeviceStateCollector(Collector):
    """devices by state, read from SQL at scrape time (correct across replicas)."""

    def __init__(self, devices: DeviceService, hub: SyncHub) -> None:
        self._devices = devices
        self._hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("edgefleet_devices", "Devices by state", labels=["state"])
        counts = self._devices.count_by_state()
        for state in DEVICE_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family
        yield GaugeMetricFamily(
            "edgefleet_sync_streams",
            "Agents holding a sync stream to this replica",
            value=self._hub.connected_count(),
        )


@dataclass
class ControlPlane:
    """A running control plane. Stop it with `await cp.stop()`."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    db: Database
    hub: SyncHub
    admin_token: str | None
    registry: CollectorRegistry
    _executor: ThreadPoolExecutor
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None
    builds: BuildService | None = None
    _bridge: PgEventBridge | LocalEventBridge | None = None
    _runner: BuildRunner | None = None
    orchestrator: Orchestrator | None = None
    _background: ThreadPoolExecutor | None = None
    _operator_executor: ThreadPoolExecutor | None = None
    _statuses: StatusBuffer | None = None

    # The mutual-TLS device port; 0 in plain-text mode.
    device_port: int = 0

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def device_address(self) -> str:
        host = self.config.device_listen_address().rsplit(":", 1)[0]
        return f"{host}:{self.device_port}"

    async def stop(self, grace: float = 2.0) -> None:
        self.hub.close_all("control plane shutting down")
        if self._runner is not None:
            await self._runner.stop()
        for task in self._tasks:
            task.cancel()
        await self.server.stop(grace)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._statuses is not None and self._background is not None:
            # What the agents reported last is what the next replica acts on.
            with contextlib.suppress(Exception):
                await self._statuses.flush(self._background)
        if self.orchestrator is not None:
            # Hand our rollouts to another replica now, not when the lease expires.
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.orchestrator.release
                )
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._bridge is not None:
            self._bridge.stop()
        self._executor.shutdown(wait=True)
        for pool in (self._background, self._operator_executor):
            if pool is not None:
                pool.shutdown(wait=True)
        self.db.dispose()


@dataclass(frozen=True)
class WorkerSlot:
    """Which of `edgefleet server --workers N`'s processes this one is. The
    workers share the listening ports (SO_REUSEPORT: the kernel spreads
    connections over them) and, on SQLite, hear each other's events over
    replicas.LocalEventBridge."""

    index: int
    workers: int


@dataclass(frozen=True)
class FleetState:
    """What every replica needs before it serves; made once, on first start."""

    admin_token: str | None
    authority: pki.Authority | None


def prepare(db: Database, config: ServerConfig) -> FleetState:
    """Migrate the schema and make the bootstrap admin token, the signing
    key and (with TLS) the CA if they do not exist yet. Idempotent; the
    supervisor of several workers runs it before it starts them, so that
    they find it all made instead of racing to make it."""
    upgrade(db.engine)
    admin_token = ensure_bootstrap_admin(db, config.data_dir, config.admin_token)
    ensure_signing_key(db)
    return FleetState(admin_token, ensure_authority(db) if config.tls else None)


def open_database(config: ServerConfig) -> Database:
    """The configured database (the data dir's SQLite file by default)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    return Database(
        make_engine(
            config.db_url or sqlite_url(config.data_dir),
            pool_size=DB_THREADS + BACKGROUND_THREADS + OPERATOR_THREADS,
        )
    )


async def create_server(config: ServerConfig, slot: WorkerSlot | None = None) -> ControlPlane:
    """Migrate the database, build the services and start serving."""
    db = open_database(config)
    engine = db.engine
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="db")
    # The orchestrator and the status writer get threads of their own: queued
    # behind thousands of device RPCs, a rollout's ticks waited tens of seconds.
    background = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="db-bg")
    # Operators too: a CLI or TUI call must not wait behind 10,000 devices.
    operator_executor = ThreadPoolExecutor(OPERATOR_THREADS, thread_name_prefix="db-op")
    # Replicas may start together; Alembic's version table serializes them on
    # PostgreSQL, SQLite has one writer anyway.
    state = await loop.run_in_executor(executor, prepare, db, config)
    admin_token, authority = state.admin_token, state.authority

    events = EventBus(loop)
    hub = SyncHub()
    events.subscribe(hub.on_event)
    bridge: PgEventBridge | LocalEventBridge | None = None
    if engine.dialect.name == "postgresql":
        bridge = PgEventBridge(
            libpq_dsn(engine.url.render_as_string(hide_password=False)), events, executor
        )
    elif slot is not None and slot.workers > 1:
        bridge = LocalEventBridge(config.data_dir, slot.index, slot.workers, events, executor)
    if bridge is not None:
        await bridge.start()
    devices = DeviceService(db, events, hub, config.offline_after_s)
    certificates = (
        CertificateService(
            db, events, authority, dt.timedelta(seconds=config.device_cert_lifetime_s)
        )
        if authority is not None else None
    )  # fmt: skip
    enrollment = EnrollmentService(db, events, certificates)
    classes = ClassService(db, events)
    blobs = BlobStore(config.blob_dir)
    registry = RegistryService(db, blobs, events, int(config.max_upload_mb * 1024 * 1024))
    builds = BuildService(db, blobs, events, toolchains_dir=config.toolchains_dir)
    artifacts = ArtifactService(db, blobs)
    telemetry = TelemetryService(db, retention=dt.timedelta(seconds=config.telemetry_retention_s))
    deployments = DeploymentService(db, events)
    statuses = StatusBuffer(deployments)
    telemetry_pulse = Pulse()
    rollouts = RolloutService(db, events, offline_after_s=config.offline_after_s)
    events.subscribe(_build_triggers(builds, executor))
    metrics_registry = CollectorRegistry()
    metrics = RpcMetrics(metrics_registry)
    orchestrator = Orchestrator(
        db, events, owner=f"{socket.gethostname()}:{os.getpid()}:{secrets.new_id()[:8]}",
        offline_after_s=config.offline_after_s, tick_s=config.rollout_tick_s,
        on_tick=_tick_histogram(metrics_registry).observe,
    )  # fmt: skip
    metrics_registry.register(_DeviceStateCollector(devices, hub))
    credentials = DeviceCredentials(db)
    events.subscribe(credentials.on_event)
    base: dict[str, Any] = {
        "db": db, "executor": executor, "metrics": metrics, "credentials": credentials,
        "peer_certificates": PeerCertificates() if config.tls else None,
    }  # fmt: skip

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Agents sit behind NATs that drop idle flows; allow their pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            # Only the workers of one server share a port; anything else
            # already on it is an error, not a peer.
            ("grpc.so_reuseport", int(slot is not None and slot.workers > 1)),
            *CONNECTION_OPTIONS,
        ]
    )
    agent_config = device_pb2.AgentConfig(
        heartbeat_interval_s=config.heartbeat_interval_s,
        telemetry_interval_s=config.telemetry_interval_s,
    )
    device_servicer = DeviceServicer(
        enrollment=enrollment,
        devices=devices,
        artifacts=artifacts,
        hub=hub,
        telemetry=telemetry,
        deployments=deployments,
        statuses=statuses,
        telemetry_pulse=telemetry_pulse,
        agent_config=agent_config,
        certificates=certificates,
        telemetry_rate=TelemetryRateLimit(config.telemetry_rate_per_s, config.telemetry_burst),
        **base,
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(device_servicer, server)
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(
        OperatorServicer(
            enrollment=enrollment,
            devices=devices,
            classes=classes,
            registry=registry,
            builds=builds,
            artifacts=artifacts,
            telemetry=telemetry,
            deployments=deployments,
            rollouts=rollouts,
            operator_tokens=OperatorTokenService(db),
            events=events,
            **(base | {"executor": operator_executor}),
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
        operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    device_port = 0
    if authority is None:
        port = _bind(server.add_insecure_port, config.listen)
    else:
        port, device_port = _add_tls_ports(server, config, authority)
    await server.start()
    for name in ("", *services[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    cp = ControlPlane(config, server, port, db, hub, admin_token, metrics_registry, executor)
    cp.device_port = device_port
    if device_port:
        device_servicer.device_endpoint = config.device_advertise or cp.device_address
    cp._background = background
    cp._operator_executor = operator_executor
    cp._statuses = statuses
    cp._tasks.append(asyncio.create_task(statuses.run(background)))
    cp._bridge = bridge
    cp.builds = builds
    cp._tasks.append(asyncio.create_task(_flush_presence(hub, devices, executor, events)))
    cp._tasks.append(asyncio.create_task(_announce_telemetry(telemetry_pulse, events)))
    cp.orchestrator = orchestrator
    cp._tasks.append(asyncio.create_task(orchestrator.run(background)))
    lag = loop_lag.lag_histogram(metrics_registry)
    cp._tasks.append(asyncio.create_task(loop_lag.probe(lag.observe)))
    cp._tasks.append(
        asyncio.create_task(
            _roll_up_telemetry(telemetry, executor, config.telemetry_rollup_every_s)
        )
    )
    if config.build_workers > 0:
        cp._runner = BuildRunner(
            builds, executor, config.build_dir, workers=config.build_workers,
            lease_s=config.build_lease_s, toolchains_dir=config.toolchains_dir,
        )  # fmt: skip
        cp._tasks.append(asyncio.create_task(cp._runner.run()))
    if config.metrics_listen:
        host, _, mport = config.metrics_listen.rpartition(":")
        cp._metrics_server, _thread = start_http_server(
            int(mport), host or "127.0.0.1", registry=metrics_registry
        )
    if authority is None:
        log.warning(PLAINTEXT_BANNER, cp.address)
    else:
        log.info(
            "control plane listening on %s (TLS: operators, enrollment) and %s (mutual TLS: "
            "devices); agents and operators trust %s",
            cp.address, cp.device_address, config.ca_file,
        )  # fmt: skip
    if config.port_file:
        write_port_files(config.port_file, port, device_port)
    return cp


def write_port_files(port_file: Path, port: int, device_port: int) -> None:
    """The bound ports, for whoever started the server with port 0; the
    device port (0: none, plain text) first, so that whoever waits for the
    port file finds both."""
    if device_port:
        write_atomically(port_file.with_name("device-port"), f"{device_port}\n")
    write_atomically(port_file, f"{port}\n")


PLAINTEXT_BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  PLAIN TEXT: control plane on %s without TLS. Credentials, tokens and\n"
    "!!  models cross the network unencrypted and devices are not authenticated\n"
    "!!  by certificate. For local development and the demo only; serve a real\n"
    "!!  fleet with TLS (the default of `edgefleet server`).\n" + "!" * 78
)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old file or the new one."""
    # Workers starting together write the same files; each its own temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _add_tls_ports(
    server: grpc.aio.Server, config: ServerConfig, authority: pki.Authority
) -> tuple[int, int]:
    """Listen with TLS on `listen` (no client certificate: operators with
    tokens, devices enrolling) and with mutual TLS on the device port.
    gRPC's Python server either requires a client certificate or never asks
    for one, hence two ports. Returns both bound ports."""
    host = config.listen.rpartition(":")[0]
    issued, key_pem = pki.issue_server_certificate(
        authority, server_names(config.tls_names, host), dt.datetime.now(dt.UTC)
    )
    write_atomically(config.ca_file, authority.certificate_pem.decode())
    pair = [(key_pem, issued.certificate_pem)]
    port = _bind(
        lambda address: server.add_secure_port(address, grpc.ssl_server_credentials(pair)),
        config.listen,
    )
    device_port = _bind(
        lambda address: server.add_secure_port(address, grpc.ssl_server_credentials(
            pair, root_certificates=authority.certificate_pem, require_client_auth=True
        )),
        config.device_listen_address(),
    )  # fmt: skip
    return port, device_port


def _bind(add_port: Callable[[str], int], address: str) -> int:
    """The port `add_port` bound `address` to; OSError naming the address
    when it cannot (grpcio returns 0 or, since 1.60, raises RuntimeError:
    either reached the operator as a traceback)."""
    try:
        port = add_port(address)
    except RuntimeError as exc:
        raise OSError(
            f"cannot listen on {address} (in use, or not an address here): {exc}"
        ) from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use, or not an address here)")
    return port


def _tick_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "edgefleet_rollout_tick_seconds",
        "Wall time of one orchestrator tick (every rollout that needs work, one step each)",
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    )


def _build_triggers(builds: BuildService, executor: ThreadPoolExecutor) -> Any:
    """Queue builds when a model version is pushed or a class changes."""

    def on_event(event: FleetEvent) -> None:
        if event.remote:
            return  # the replica that made the change queued them
        loop = asyncio.get_running_loop()
        if event.kind == "model.pushed":
            name, _, version = event.subject.partition("@")
            future = loop.run_in_executor(executor, builds.request_for_version, name, version)
        elif event.kind == "class.updated":
            future = loop.run_in_executor(executor, builds.request_for_class, event.subject)
        else:
            return
        future.add_done_callback(_log_failure)

    return on_event


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("could not queue builds", exc_info=future.exception())


async def _flush_presence(
    hub: SyncHub, devices: DeviceService, executor: ThreadPoolExecutor, events: EventBus
) -> None:
    """Write last-seen times in batches: a heartbeat must not cost a SQL write.
    Devices that came online or went offline are announced once per flush
    ("device.presence"), for live views."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(PRESENCE_FLUSH_S)
        seen = hub.take_seen()
        try:
            await loop.run_in_executor(executor, devices.touch, seen)
        except Exception:
            log.exception("could not record last-seen times; will retry")
        changed = hub.take_presence()
        if changed:
            events.publish(FleetEvent(
                "device.presence", tuple(changed),
                message=f"{len(changed)} device(s) came online or went offline",
            ))  # fmt: skip


async def _announce_telemetry(pulse: Pulse, events: EventBus) -> None:
    """Tell live views that telemetry arrived, at most every TELEMETRY_EVENT_S."""
    while True:
        await asyncio.sleep(TELEMETRY_EVENT_S)
        samples = pulse.take()
        if samples:
            events.publish(FleetEvent("telemetry.updated", message=f"{samples} new sample(s)"))


async def _roll_up_telemetry(
    telemetry: TelemetryService, executor: ThreadPoolExecutor, every_s: float
) -> None:
    """Roll raw telemetry past its retention up into hourly rows, now and then
    every `every_s`. Every replica runs it; see TelemetryService.roll_up for
    why that is safe."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            moved = await loop.run_in_executor(executor, telemetry.roll_up)
            if moved:
                log.info("rolled %d raw telemetry rows up into hourly rollups", moved)
        except Exception:
            log.exception("could not roll telemetry up; will retry")
        await asyncio.sleep(every_s)


async def serve(
    config: ServerConfig,
    slot: WorkerSlot | None = None,
    on_ready: Callable[[ControlPlane], None] | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until one of `signals`, then stop gracefully. `on_ready` is
    called once the server listens."""
    gc_limits = gc_policy.thresholds()  # a bad override fails before serving
    cp = await create_server(config, slot)
    if on_ready is not None:
        on_ready(cp)
    gc_policy.tune_for_serving(gc_limits)
    gc_policy.observe_pauses(gc_policy.pause_histogram(cp.registry))
    trimming = asyncio.create_task(malloc_policy.trim_periodically())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.warning("shutting down")
    trimming.cancel()
    await cp.stop()


def run(config: ServerConfig, workers: int = 1) -> None:
    """Entry point for `edgefleet server`: this process serves, or with
    `workers` > 1 it supervises that many worker processes that do."""
    if workers > 1:
        from edgefleet.controlplane.workers import supervise  # it imports this module

        raise SystemExit(supervise(config, workers))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prepare_process(config)
    malloc_policy.limit_arenas()
    asyncio.run(serve(config))


def prepare_process(config: ServerConfig) -> None:
    """What `edgefleet server` does to its own process before it opens
    anything: files private to its user (the keys live in the database),
    the data dir 0700, and as many open files as it may have. Worker
    processes inherit all three."""
    file_modes.restrict_new_files()
    file_modes.secure_data_dir(config.data_dir, _sqlite_file(config))
    open_files.raise_open_file_limit()


def _sqlite_file(config: ServerConfig) -> Path | None:
    """The SQLite database file, wherever --db puts it; None on PostgreSQL."""
    url = make_url(config.db_url or sqlite_url(config.data_dir))
    path = url.database or ""
    if url.get_backend_name() != "sqlite" or path in ("", ":memory:") or path.startswith("file:"):
        return None  # PostgreSQL, or an in-memory database
    return Path(path)
