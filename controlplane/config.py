"""Control-plane settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    """Everything `edgefleet server` can be told."""

    data_dir: Path
    # SQLAlchemy URL; None means the embedded SQLite file in data_dir.
    db_url: str | None = None
    listen: str = "127.0.0.1:7443"
    # host:port for the Prometheus endpoint; None disables it.
    metrics_listen: str | None = None
    # Use this admin token instead of generating one into data_dir/admin-token.
    admin_token: str | None = None
    max_upload_mb: float = 512.0
    heartbeat_interval_s: int = 15
    telemetry_interval_s: int = 30
    # A device not heard from for this long is shown offline.
    offline_after_s: float = 60.0
    # How often the rollout orchestrator reconciles (seconds).
    rollout_tick_s: float = 0.5
    # Written with the bound port once the server listens (useful with :0).
    port_file: Path | None = None
    # Build worker processes on this replica (0: run no builds here).
    build_workers: int = 1
    # A build whose runner has not renewed its lease for this long is re-run.
    build_lease_s: float = 30.0
    # Where toolchains (the TFLite converter's venv) live; None: the default.
    toolchains_dir: Path | None = None
    # Raw telemetry is kept this long (at least an hour), then rolled up into
    # hourly rollups; the roll-up job runs this often on every replica.
    telemetry_retention_s: float = 7 * 24 * 3600.0
    telemetry_rollup_every_s: float = 600.0
    # Per-device telemetry limit: samples a second, and how many at once (at
    # least one full upload, 500). Per process. Why these: services/ratelimit.py
    # (not imported here: the CLI reads these defaults and must stay light).
    telemetry_rate_per_s: float = 5.0
    telemetry_burst: int = 2000
    # Serve TLS: operators and enrollment on `listen` (server-authenticated),
    # device RPCs on `device_listen` with mutual TLS. False is plain text, for
    # local development only: `edgefleet server` defaults to TLS, the library
    # to plain text for in-process tests and benchmarks.
    tls: bool = False
    # host:port of the mutual-TLS device port; None: listen's host, port + 1
    # (port 0 when listen's is 0).
    device_listen: str | None = None
    # Extra host names / addresses the server certificate must name (how
    # agents and operators reach this replica, e.g. a load balancer's name).
    tls_names: tuple[str, ...] = ()
    # The device port agents are told to use, when it differs from what they
    # can reach at device_listen (behind a load balancer or NAT).
    device_advertise: str | None = None
    device_cert_lifetime_s: float = 30 * 24 * 3600.0
    # host:port of artifact downloads over HTTP (GET /v1/artifacts/<digest>,
    # with ranges; with TLS, mutual TLS as on the device port); None:
    # listen's host, port + 2 (port 0 when listen's is 0); "off": none.
    artifact_http_listen: str | None = None
    # The base URL agents fetch from (scheme://host:port), when it differs
    # from what they can reach at artifact_http_listen.
    artifact_http_advertise: str | None = None
    # Mirrors agents try first, in order (an HTTP server, a CDN, a bucket
    # serving the blobs by digest: <base>/<sha256>); the control plane stays
    # the fallback. No credential is ever sent to them.
    artifact_mirrors: tuple[str, ...] = ()
    # Artifact downloads over HTTP sending at once per replica (more wait:
    # 429, Retry-After); 0: no limit.
    max_concurrent_downloads: int = 0
    # Connections the artifact port holds at once, TLS handshakes included
    # (each costs a 256 KiB buffer); more are closed as they arrive.
    artifact_http_max_connections: int = 512
    # Where blob bytes (pushed models, built artifacts) live; None: the data
    # dir's blobs/. Replicas that share one (a network file system) serve
    # each other's blobs; otherwise each needs its own copy of every blob.
    blob_store_dir: Path | None = None
    # A blob nothing refers to (a deleted version's, a rolled-back push's
    # file) is deleted once this old; garbage collection runs this often.
    blob_grace_s: float = 3600.0
    blob_gc_every_s: float = 600.0

    @property
    def blob_dir(self) -> Path:
        return self.blob_store_dir or self.data_dir / "blobs"

    @property
    def build_dir(self) -> Path:
        return self.data_dir / "builds"

    @property
    def admin_token_file(self) -> Path:
        """Where the first start writes the bootstrap admin token."""
        return self.data_dir / "admin-token"

    @property
    def ca_file(self) -> Path:
        """The CA certificate agents and operators trust (written with TLS)."""
        return self.data_dir / "ca.pem"

    def artifact_http_address(self) -> str | None:
        """Where artifact downloads over HTTP listen; None when off."""
        if self.artifact_http_listen == "off":
            return None
        if self.artifact_http_listen:
            return self.artifact_http_listen
        return self._next_to_listen(2, "--artifact-http-listen (or off)")

    def device_listen_address(self) -> str:
        """Where the mutual-TLS device port listens."""
        if self.device_listen:
            return self.device_listen
        return self._next_to_listen(1, "--device-listen")

    def _next_to_listen(self, offset: int, option: str) -> str:
        """listen's host and port + `offset` (0 when listen's is 0: the OS
        picks); ValueError naming `option` when that is past the last port."""
        host, _, text = self.listen.rpartition(":")
        port = int(text) + offset if int(text) else 0
        if port > 65535:
            raise ValueError(
                f"--listen's port + {offset} ({port}) is past 65535: give {option}, or a lower "
                "--listen port"
            )
        return f"{host}:{port}"
