"""Assembles the control plane: database, services, gRPC servicers, health,
reflection, metrics and background jobs. `create_server` is what tests use;
`run` is what `edgefleet server` calls.

The shapes: `build_services` makes every service once, into the frozen
`Services`; the servicers and the background jobs (`_background_jobs`: a
list of edgefleet.jobs.BackgroundJob) get what they need from it; the
running `ControlPlane` holds it all, made in one go, and stops it in one
order (`ControlPlane.stop`)."""

# ruff: noqa: E402 - the extra is checked before the imports it installs
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.extras import require

# Without the server extra, one line says what to install (edgefleet.extras)
# instead of a ModuleNotFoundError for grpc_health.
require("server", part=__name__)

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import make_url

from edgefleet.controlplane import file_modes, gc_policy, loop_lag, malloc_policy, open_files
from edgefleet.controlplane.api import artifact_http
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
from edgefleet.fsutil import atomic_write
from edgefleet.jobs import BackgroundJob, BackgroundJobs
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


@dataclass(frozen=True)
class Executors:
    """The thread pools that blocking work (SQL, files) runs on."""

    # Device RPCs and most background work.
    db: ThreadPoolExecutor
    # The orchestrator and the status writer: queued behind thousands of
    # device RPCs, a rollout's ticks waited tens of seconds.
    background: ThreadPoolExecutor
    # Operator RPCs: a CLI or TUI call must not wait behind 10,000 devices.
    operator: ThreadPoolExecutor

    @classmethod
    def create(cls) -> Executors:
        return cls(
            ThreadPoolExecutor(DB_THREADS, thread_name_prefix="db"),
            ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="db-bg"),
            ThreadPoolExecutor(OPERATOR_THREADS, thread_name_prefix="db-op"),
        )

    def shutdown(self) -> None:
        """Wait for what runs on them, then stop their threads."""
        for pool in (self.db, self.background, self.operator):
            pool.shutdown(wait=True)


@dataclass(frozen=True)
class Services:
    """The services of one control-plane process, made once by
    build_services and shared by the servicers and the background jobs."""

    events: EventBus
    hub: SyncHub
    credentials: DeviceCredentials
    enrollment: EnrollmentService
    # None in plain-text mode (no CA, no device certificates).
    certificates: CertificateService | None
    devices: DeviceService
    classes: ClassService
    registry: RegistryService
    builds: BuildService
    artifacts: ArtifactService
    telemetry: TelemetryService
    # Counts telemetry samples between "telemetry.updated" announcements.
    telemetry_pulse: Pulse
    deployments: DeploymentService
    statuses: StatusBuffer
    rollouts: RolloutService
    orchestrator: Orchestrator
    operator_tokens: OperatorTokenService
    blobs: BlobStore


EventBridge = PgEventBridge | LocalEventBridge


@dataclass(frozen=True)
class ControlPlane:
    """A running control plane. Stop it with `await cp.stop()`."""

    config: ServerConfig
    server: grpc.aio.Server
    port: int
    # The mutual-TLS device port; 0 in plain-text mode.
    device_port: int
    db: Database
    services: Services
    admin_token: str | None
    registry: CollectorRegistry
    executors: Executors
    jobs: BackgroundJobs
    # Carries events between replicas (PostgreSQL) or workers (SQLite).
    bridge: EventBridge | None
    # Stops the Prometheus endpoint; None when it is off.
    stop_metrics: Callable[[], None] | None
    # Artifact downloads over HTTP; None when off.
    artifact_http: ArtifactHttpSite | None = None

    @property
    def address(self) -> str:
        return _address(self.config.listen, self.port)

    @property
    def device_address(self) -> str:
        return _address(self.config.device_listen_address(), self.device_port)

    # The services tests and benchmarks reach for most.
    @property
    def hub(self) -> SyncHub:
        return self.services.hub

    @property
    def builds(self) -> BuildService:
        return self.services.builds

    @property
    def orchestrator(self) -> Orchestrator:
        return self.services.orchestrator

    async def stop(self, grace: float = 2.0) -> None:
        self.services.hub.close_all("control plane shutting down")
        # The loops stop before the RPCs' grace period, so nothing new starts
        # during it; what they hold is handed over after it, when no RPC can
        # add to it any more (the status reports the agents sent last are
        # what the next replica acts on).
        await self.jobs.cancel()
        if self.artifact_http is not None:
            await self.artifact_http.runner.cleanup()
        await self.server.stop(grace)
        await self.jobs.join()
        if self.stop_metrics is not None:
            self.stop_metrics()
        if self.bridge is not None:
            self.bridge.stop()
        self.executors.shutdown()
        self.db.dispose()


@dataclass(frozen=True)
class ArtifactHttpSite:
    """Artifact downloads over HTTP (api/artifact_http.py), listening."""

    runner: web.AppRunner
    port: int
    # What agents are told: scheme://host:port, no path.
    url: str


async def _serve_artifact_http(
    config: ServerConfig,
    slot: WorkerSlot | None,
    services: Services,
    executors: Executors,
    authority: pki.Authority | None,
    key_and_certificate: tuple[bytes, bytes] | None,
) -> ArtifactHttpSite | None:
    """Listen for artifact downloads over HTTP, with mutual TLS when the
    control plane serves TLS."""
    address = config.artifact_http_address()
    if address is None:
        return None
    context = None
    if authority is not None and key_and_certificate is not None:
        context = artifact_http.mutual_tls_context(*key_and_certificate, authority.certificate_pem)
    handler = artifact_http.ArtifactHttp(
        artifacts=services.artifacts,
        credentials=services.credentials,
        executor=executors.db,
        peer_certificates=PeerCertificates() if context is not None else None,
        max_concurrent=config.max_concurrent_downloads,
    )
    host, _, port = address.rpartition(":")
    runner, bound = await artifact_http.start(
        handler, host, int(port), ssl_context=context,
        reuse_port=slot is not None and slot.workers > 1,
        max_connections=config.artifact_http_max_connections,
    )  # fmt: skip
    scheme = "https" if context is not None else "http"
    url = config.artifact_http_advertise or f"{scheme}://{_address(address, bound)}"
    return ArtifactHttpSite(runner=runner, port=bound, url=url.rstrip("/"))


def _address(listen: str, port: int) -> str:
    """`listen`'s host with the port actually bound."""
    return f"{listen.rsplit(':', 1)[0]}:{port}"


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
    upgrade(db.engine, blob_dir=config.blob_dir)
    admin_token = ensure_bootstrap_admin(db, config.admin_token_file, config.admin_token)
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
    loop = asyncio.get_running_loop()
    executors = Executors.create()
    # Replicas may start together; Alembic's version table serializes them on
    # PostgreSQL, SQLite has one writer anyway.
    state = await loop.run_in_executor(executors.db, prepare, db, config)

    events = EventBus(loop)
    hub = SyncHub()
    events.subscribe(hub.on_event)
    bridge = _event_bridge(config, slot, db, events, executors.db)
    if bridge is not None:
        await bridge.start()
    metrics_registry = CollectorRegistry()
    services = build_services(
        config, db, events, hub, state.authority, executors.db, metrics_registry
    )
    metrics_registry.register(_DeviceStateCollector(services.devices, services.hub))

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
    # Bound before the servicers are made: the device servicer tells agents
    # where the device port is.
    device_port = 0
    key_and_certificate = None
    if state.authority is None:
        port = _bind(server.add_insecure_port, config.listen)
    else:
        port, device_port, key_and_certificate = _add_tls_ports(server, config, state.authority)
    artifact_http = await _serve_artifact_http(
        config, slot, services, executors, state.authority, key_and_certificate
    )
    device_endpoint = ""
    if device_port:
        device_endpoint = config.device_advertise or _address(
            config.device_listen_address(), device_port
        )
    health_servicer = _add_servicers(
        server, config, db, services, executors, RpcMetrics(metrics_registry), device_endpoint,
        artifact_http.url if artifact_http is not None else "",
    )  # fmt: skip
    # Every port is bound before serving starts: one that is taken stops the
    # start with its address named, and nothing was served.
    stop_metrics = None
    if config.metrics_listen:
        host, _, mport = config.metrics_listen.rpartition(":")
        try:
            metrics_server, _thread = start_http_server(
                int(mport), host or "127.0.0.1", registry=metrics_registry
            )
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {config.metrics_listen} "
                f"(in use, or not an address here): {exc.strerror or exc}"
            ) from None
        stop_metrics = metrics_server.shutdown
    await server.start()
    for name in ("", *_SERVED[:2]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    jobs = BackgroundJobs(_background_jobs(config, db, services, executors, metrics_registry))
    jobs.start()
    cp = ControlPlane(
        config=config, server=server, port=port, device_port=device_port, db=db,
        services=services, admin_token=state.admin_token, registry=metrics_registry,
        executors=executors, jobs=jobs, bridge=bridge, stop_metrics=stop_metrics,
        artifact_http=artifact_http,
    )  # fmt: skip
    if state.authority is None:
        log.warning(PLAINTEXT_BANNER, cp.address)
    else:
        log.info(
            "control plane listening on %s (TLS: operators, enrollment) and %s (mutual TLS: "
            "devices); agents and operators trust %s",
            cp.address, cp.device_address, config.ca_file,
        )  # fmt: skip
    if config.port_file:
        write_port_files(
            config.port_file, port, device_port, artifact_http.port if artifact_http else 0
        )
    return cp


def _event_bridge(
    config: ServerConfig,
    slot: WorkerSlot | None,
    db: Database,
    events: EventBus,
    executor: ThreadPoolExecutor,
) -> EventBridge | None:
    """What carries events to the other replicas (PostgreSQL) or to the
    other workers of this server (SQLite); None when there are none."""
    engine = db.engine
    if engine.dialect.name == "postgresql":
        dsn = libpq_dsn(engine.url.render_as_string(hide_password=False))
        return PgEventBridge(dsn, events, executor)
    if slot is not None and slot.workers > 1:
        return LocalEventBridge(config.data_dir, slot.index, slot.workers, events, executor)
    return None


def build_services(
    config: ServerConfig,
    db: Database,
    events: EventBus,
    hub: SyncHub,
    authority: pki.Authority | None,
    executor: ThreadPoolExecutor,
    metrics_registry: CollectorRegistry,
) -> Services:
    """Every service, wired to the event bus (whose first subscriber is
    `hub`); with `authority`, device certificates too."""
    certificates = (
        CertificateService(
            db, events, authority, dt.timedelta(seconds=config.device_cert_lifetime_s)
        )
        if authority is not None else None
    )  # fmt: skip
    # A lost or damaged blob is healed from the mirrors agents download from
    # (a callable: per-class mirrors can join the list later).
    blobs = BlobStore(config.blob_dir, mirrors=lambda: config.artifact_mirrors)
    builds = BuildService(db, blobs, events, toolchains_dir=config.toolchains_dir)
    events.subscribe(_build_triggers(builds, executor))
    credentials = DeviceCredentials(db)
    events.subscribe(credentials.on_event)
    deployments = DeploymentService(db, events)
    return Services(
        events=events,
        hub=hub,
        credentials=credentials,
        enrollment=EnrollmentService(db, events, certificates),
        certificates=certificates,
        devices=DeviceService(db, events, hub, config.offline_after_s),
        classes=ClassService(db, events),
        registry=RegistryService(db, blobs, events, int(config.max_upload_mb * 1024 * 1024)),
        builds=builds,
        artifacts=ArtifactService(db, blobs),
        telemetry=TelemetryService(
            db, retention=dt.timedelta(seconds=config.telemetry_retention_s)
        ),
        telemetry_pulse=Pulse(),
        deployments=deployments,
        statuses=StatusBuffer(deployments),
        rollouts=RolloutService(db, events, offline_after_s=config.offline_after_s),
        orchestrator=Orchestrator(
            db,
            events,
            owner=f"{socket.gethostname()}:{os.getpid()}:{secrets.new_id()[:8]}",
            offline_after_s=config.offline_after_s,
            tick_s=config.rollout_tick_s,
            on_tick=_tick_histogram(metrics_registry).observe,
        ),
        operator_tokens=OperatorTokenService(db),
        blobs=blobs,
    )


# What the server serves (and reflection lists); health is reported for the
# first two and for the server as a whole.
_SERVED = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name,
    operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def _add_servicers(
    server: grpc.aio.Server,
    config: ServerConfig,
    db: Database,
    services: Services,
    executors: Executors,
    metrics: RpcMetrics,
    device_endpoint: str,
    artifact_url: str,
) -> Any:
    """Add the device, operator, health and reflection servicers; the
    health servicer, for the caller to report serving once started."""
    base: dict[str, Any] = {
        "db": db, "executor": executors.db, "metrics": metrics,
        "credentials": services.credentials,
        "peer_certificates": PeerCertificates() if config.tls else None,
    }  # fmt: skip
    device_servicer = DeviceServicer(
        enrollment=services.enrollment,
        devices=services.devices,
        artifacts=services.artifacts,
        hub=services.hub,
        telemetry=services.telemetry,
        deployments=services.deployments,
        statuses=services.statuses,
        telemetry_pulse=services.telemetry_pulse,
        agent_config=device_pb2.AgentConfig(
            heartbeat_interval_s=config.heartbeat_interval_s,
            telemetry_interval_s=config.telemetry_interval_s,
        ),
        certificates=services.certificates,
        telemetry_rate=TelemetryRateLimit(config.telemetry_rate_per_s, config.telemetry_burst),
        device_endpoint=device_endpoint,
        artifact_url=artifact_url,
        artifact_mirrors=config.artifact_mirrors,
        **base,
    )
    device_pb2_grpc.add_DeviceServiceServicer_to_server(device_servicer, server)
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(
        OperatorServicer(
            enrollment=services.enrollment,
            devices=services.devices,
            classes=services.classes,
            registry=services.registry,
            builds=services.builds,
            artifacts=services.artifacts,
            telemetry=services.telemetry,
            deployments=services.deployments,
            rollouts=services.rollouts,
            operator_tokens=services.operator_tokens,
            events=services.events,
            **(base | {"executor": executors.operator}),
        ),
        server,
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(_SERVED, server)
    return health_servicer


def _background_jobs(
    config: ServerConfig,
    db: Database,
    services: Services,
    executors: Executors,
    metrics_registry: CollectorRegistry,
) -> list[BackgroundJob]:
    """The loops that run while the server serves, in the order they start
    and stop."""
    loop = asyncio.get_running_loop()
    statuses, orchestrator = services.statuses, services.orchestrator

    async def flush_statuses() -> None:
        await statuses.flush(executors.background)

    async def release_rollouts() -> None:
        # Hand our rollouts to another replica now, not when the lease expires.
        await loop.run_in_executor(executors.db, orchestrator.release)

    lag = loop_lag.lag_histogram(metrics_registry)
    jobs = [
        BackgroundJob(
            "status-writes", lambda: statuses.run(executors.background), hand_over=flush_statuses
        ),
        BackgroundJob(
            "presence",
            lambda: _flush_presence(services.hub, services.devices, executors.db, services.events),
        ),
        BackgroundJob(
            "telemetry-events",
            lambda: _announce_telemetry(services.telemetry_pulse, services.events),
        ),
        BackgroundJob(
            "rollouts", lambda: orchestrator.run(executors.background), hand_over=release_rollouts
        ),
        BackgroundJob("loop-lag", lambda: loop_lag.probe(lag.observe)),
        BackgroundJob(
            "telemetry-rollup",
            lambda: _roll_up_telemetry(
                services.telemetry, executors.db, config.telemetry_rollup_every_s
            ),
        ),
        BackgroundJob(
            "blob-gc",
            lambda: _collect_blobs(
                services.blobs,
                db,
                executors.db,
                config.blob_grace_s,
                config.blob_gc_every_s,
            ),
        ),
    ]
    if config.build_workers > 0:
        runner = BuildRunner(
            services.builds, executors.db, config.build_dir, workers=config.build_workers,
            lease_s=config.build_lease_s, toolchains_dir=config.toolchains_dir,
        )  # fmt: skip
        jobs.append(BackgroundJob("builds", runner.run, halt=runner.stop))
    return jobs


def write_port_files(port_file: Path, port: int, device_port: int, http_port: int = 0) -> None:
    """The bound ports, for whoever started the server with port 0; the
    device port (0: none, plain text) and the artifact downloads' HTTP port
    (0: off) first, so that whoever waits for the port file finds them all."""
    if http_port:
        write_atomically(port_file.with_name("artifact-http-port"), f"{http_port}\n")
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
    atomic_write(path, text.encode())


def _add_tls_ports(
    server: grpc.aio.Server, config: ServerConfig, authority: pki.Authority
) -> tuple[int, int, tuple[bytes, bytes]]:
    """Listen with TLS on `listen` (no client certificate: operators with
    tokens, devices enrolling) and with mutual TLS on the device port.
    gRPC's Python server either requires a client certificate or never asks
    for one, hence two ports. Returns both bound ports and the server's key
    and certificate (PEM), for the artifact downloads over HTTP."""
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
    return port, device_port, (key_pem, issued.certificate_pem)


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


async def _collect_blobs(
    blobs: BlobStore, db: Database, executor: ThreadPoolExecutor, grace_s: float, every_s: float
) -> None:
    """Collect unreferenced blobs and orphan files (BlobStore.collect_garbage),
    now and then every `every_s`. Every replica runs it: each deletion checks
    again in its own statement."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(
                executor, functools.partial(blobs.collect_garbage, db, grace_s=grace_s)
            )
        except Exception:
            log.exception("could not collect unreferenced blobs; will retry")
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
