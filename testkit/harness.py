"""Test helpers that run the real thing: `edgefleet server` as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgefleet.controlplane.client.connection import bearer_metadata, operator_stub
from edgefleet.polling import WaitTimeout
from edgefleet.polling import wait_for as wait_for  # re-exported for the tests
from edgefleet.v1 import device_pb2, device_pb2_grpc, operator_pb2_grpc

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"


class ControlPlane:
    """`edgefleet server` in a subprocess, on a loopback port picked by the OS.
    Restarts reuse the port so agents can reconnect to the same address."""

    def __init__(
        self, data_dir: Path, db_url: str | None = None, *extra: str, tls: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.extra = list(extra)
        # --tls: TLS on `address`, mutual TLS for devices on `device_address`.
        self.tls = tls
        self.port = 0
        self.device_port = 0
        # Artifact downloads over HTTP (0 until started; new at each start).
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_token = ADMIN_TOKEN
        self.log_path = data_dir / "server.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def device_address(self) -> str:
        return f"127.0.0.1:{self.device_port}"

    @property
    def http_url(self) -> str:
        """Where artifact downloads over HTTP are served."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate the server writes with --tls."""
        return self.data_dir / "ca.pem"

    def channel(self) -> grpc.Channel:
        """A channel to the main port: TLS trusting our CA, or plain text."""
        if not self.tls:
            return grpc.insecure_channel(self.address)
        credentials = grpc.ssl_channel_credentials(self.ca_file.read_bytes())
        return grpc.secure_channel(self.address, credentials)

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.data_dir / "port"
        port_file.unlink(missing_ok=True)
        (self.data_dir / "device-port").unlink(missing_ok=True)
        http_port_file = self.data_dir / "artifact-http-port"
        http_port_file.unlink(missing_ok=True)
        cmd = [
            str(Path(sys.executable).parent / "edgefleet"), "server",
            "--data-dir", str(self.data_dir),
            "--listen", f"127.0.0.1:{self.port}",
            "--port-file", str(port_file),
            "--admin-token", self.admin_token,
            "--heartbeat-interval", "2",
            *(["--tls", "--device-listen", f"127.0.0.1:{self.device_port}"] if self.tls
              else ["--insecure"]),
            # A new port each start: pinning the last one raced with the
            # ephemeral ports of other tests' connections (EADDRINUSE).
            *([] if "--artifact-http-listen" in self.extra
              else ["--artifact-http-listen", "127.0.0.1:0"]),
            # Builds spawn worker processes; tests about builds ask for them.
            *([] if "--build-workers" in self.extra else ["--build-workers", "0"]),
            *self.extra,
        ]  # fmt: skip
        if self.db_url:
            cmd += ["--db", self.db_url]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            return port_file.exists()

        try:
            wait_for(listening, timeout, what="the server's port file")
        except WaitTimeout:
            raise RuntimeError(f"server did not start:\n{self.log()}") from None
        self.port = int(port_file.read_text())
        if self.tls:
            self.device_port = int((self.data_dir / "device-port").read_text())
        self.http_port = int(http_port_file.read_text()) if http_port_file.exists() else 0
        with self.channel() as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(15)

    def restart(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def operator(self, token: str | None = None) -> operator_pb2_grpc.OperatorServiceStub:
        ca = self.ca_file if self.tls else None
        return operator_stub(self.address, token or self.admin_token, ca)

    def device_stub(self) -> device_pb2_grpc.DeviceServiceStub:
        return device_pb2_grpc.DeviceServiceStub(self.channel())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        env.pop(key, None)
    return env


def open_sync(
    channel: grpc.aio.Channel, credential: str
) -> tuple[
    grpc.aio.StreamStreamCall[device_pb2.AgentMessage, device_pb2.ControlMessage],
    AsyncIterator[device_pb2.ControlMessage],
]:
    """A device's Sync stream from a test: says hello and sends nothing
    more; returns the call (to cancel) and the control messages."""

    async def requests() -> AsyncIterator[device_pb2.AgentMessage]:
        yield device_pb2.AgentMessage(hello=device_pb2.Hello())
        await asyncio.Event().wait()  # held open until the call is cancelled

    call = device_pb2_grpc.DeviceServiceStub(channel).Sync(
        requests(), metadata=bearer_metadata(credential)
    )
    return call, call.__aiter__()
