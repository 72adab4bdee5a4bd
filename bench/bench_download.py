"""Artifact download benchmark: DownloadArtifact against nginx serving the same file.

How fast does one control-plane process stream a large artifact to devices,
next to a web server doing the same job? All servers run side by side, each
its own subprocess on 127.0.0.1, and serve the very same file (the control
plane's blob cache entry):

* control plane: `edgefleet server --build-workers 0` on a data dir where the
  benchmark has published a --size-mb artifact; downloads go through
  DeviceService.DownloadArtifact with a real device credential, in chunks of
  each --chunk-kib;
* bare (optional): a grpc.aio DownloadArtifact in this file (--serve-bare)
  that streams the same bytes from memory with no auth, no database and no
  file reads: the ceiling of Python gRPC streaming on this machine;
* nginx with one worker and nginx's defaults, sendfile off (the baseline: the
  control plane is one process with one event loop); with one worker and
  sendfile on (as Debian's packaged nginx.conf has it); with `auto` workers.

Publishing needs no real build: an in-process control plane with no build
workers takes a tiny pushed model, and the benchmark claims the queued build
and finishes it with a hand-made result whose chosen candidate is the large
random file (as tests/integration/test_builds_service.py does). That server is stopped
before the measured one starts on the same data dir.

The clients live in this process: a grpc.aio stream per download (the agent's
library), and http.client reading 1 MiB at a time with readinto (in a thread)
for nginx. Each download is received into memory and its sha256 checked after
the clock stops; any mismatch, short read or out-of-order chunk fails the run.
Every row is downloaded --runs times, rows alternating in ABBA order, after
one uncounted warm-up round. One resumed download (from size/2) is checked
against the control plane. See docs/benchmarks.md.

    python -m bench.bench_download                       # 128 MiB, 5 runs
    python -m bench.bench_download --size-mb 512 --runs 3 --out results.json
    python -m bench.bench_download --smoke              # CI: seconds, figures meaningless

(from the repository root: the control plane starts as bench/common.py starts
it, and the bare server is this module again, in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import http.client
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import duration_pb2

from bench.common import ADMIN_TOKEN, read_port, server_command
from bench.jsonout import write_results
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from testkit.builds import one_candidate_result

CLASS_NAME = "bench-arm"
ARCH = "aarch64"  # the class's match rule; the benchmark's devices report it
MODEL_NAME, MODEL_VERSION = "bench-download", "1.0.0"
KIB, MIB, GIB = 1024, 1024**2, 1024**3
HTTP_READ = MIB  # bytes per readinto() of the HTTP client
MIN_CHUNK, DEFAULT_CHUNK, MAX_CHUNK = 64 * KIB, 256 * KIB, MIB  # as the control plane clamps
GOAL = 0.70  # control plane / nginx (1 worker)
# Over HTTP (issue 24): control plane / nginx (1 worker, sendfile on, like
# for like), and its server CPU per GiB at most twice nginx's.
HTTP_GOAL, HTTP_CPU_GOAL = 0.90, 2.0
# Own TCP connection per channel (grpc shares one between identical channels
# otherwise); room for a 1 MiB chunk and its framing.
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 8 * MIB),
]

# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every row, one run, a 4 MiB artifact. Figures meaningless.
SMOKE = {"size_mb": 4, "runs": 1, "concurrency": 2}

perf = time.perf_counter


class BenchError(Exception):
    """A download that did not deliver exactly the artifact's bytes."""


# ------------------------------------------------------------------ setup


def tiny_model() -> bytes:
    """A valid ONNX model for the push (the build result replaces it)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "bench_download",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [weights],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


async def _push_requests(model: bytes) -> AsyncIterator[operator_pb2.PushModelRequest]:
    yield operator_pb2.PushModelRequest(
        header=operator_pb2.PushModelHeader(
            model_name=MODEL_NAME,
            version=MODEL_VERSION,
            parts=[
                operator_pb2.PartDeclaration(
                    part=operator_pb2.MODEL_PART_MODEL,
                    size_bytes=len(model),
                    sha256=hashlib.sha256(model).hexdigest(),
                )
            ],
        )
    )
    yield operator_pb2.PushModelRequest(
        chunk=operator_pb2.PushModelChunk(part=operator_pb2.MODEL_PART_MODEL, data=model)
    )


async def publish_artifact(data_dir: Path, artifact: Path, limit_s: float) -> str:
    """Publish `artifact` for CLASS_NAME through an in-process control plane
    with no build workers; returns its digest. The server is stopped again."""
    from edgefleet.controlplane.config import ServerConfig
    from edgefleet.controlplane.server import create_server

    cp = await create_server(
        ServerConfig(data_dir=data_dir, listen="127.0.0.1:0", admin_token=ADMIN_TOKEN,
                     build_workers=0)
    )  # fmt: skip
    admin = bearer_metadata(ADMIN_TOKEN)
    try:
        async with grpc.aio.insecure_channel(cp.address) as channel:
            op = operator_pb2_grpc.OperatorServiceStub(channel)
            await op.CreateDeviceClass(
                operator_pb2.CreateDeviceClassRequest(
                    name=CLASS_NAME,
                    constraints=common_pb2.ConstraintProfile(
                        runtime=common_pb2.RUNTIME_ONNXRUNTIME
                    ),
                    match_rules=[
                        common_pb2.MatchRule(field="arch", op=common_pb2.MATCH_OP_EQ, values=[ARCH])
                    ],
                ),
                metadata=admin,
                timeout=limit_s,
            )
            await op.PushModel(_push_requests(tiny_model()), metadata=admin, timeout=limit_s)
            builds = cp.builds
            assert builds is not None
            deadline = perf() + limit_s
            # The push queues the class's build asynchronously.
            while (job := await asyncio.to_thread(builds.claim, "bench", 3600)) is None:
                if perf() > deadline:
                    raise RuntimeError("the push queued no build")
                await asyncio.sleep(0.05)
            finished = await asyncio.to_thread(
                builds.finish,
                job,
                "bench",
                one_candidate_result(artifact, "bench_download: hand-made result"),
                "bench_download",
            )
            if not finished:
                raise RuntimeError("could not publish the build (lease lost)")
            build = await op.GetBuild(
                operator_pb2.GetBuildRequest(id=job.build_id), metadata=admin, timeout=limit_s
            )
            if build.state != operator_pb2.BUILD_STATE_SUCCEEDED or not build.artifact_digest:
                raise RuntimeError(f"build did not publish an artifact: {build.error}")
            return str(build.artifact_digest)
    finally:
        await cp.stop(grace=0.5)


def write_random_file(path: Path, size: int) -> str:
    """`size` random bytes (incompressible, like weights); returns the sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MIB))
            digest.update(block)
            fh.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(start)
        while block := fh.read(8 * MIB):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ bare server


class BareDownloads(device_pb2_grpc.DeviceServiceServicer):
    """DownloadArtifact from memory: no auth, no database, no file reads.
    The other RPCs answer UNIMPLEMENTED."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def Enroll(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.EnrollResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare download server")

    async def Sync(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare download server")

    async def UploadTelemetry(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.UploadTelemetryResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare download server")

    async def RenewCertificate(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> device_pb2.RenewCertificateResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "bare download server")

    async def DownloadArtifact(
        self, request: device_pb2.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[device_pb2.ArtifactChunk]:
        data, size = self._data, len(self._data)
        chunk = min(max(request.chunk_size or DEFAULT_CHUNK, MIN_CHUNK), MAX_CHUNK)
        offset = request.offset
        while offset < size:
            piece = data[offset : offset + chunk]
            yield device_pb2.ArtifactChunk(offset=offset, data=piece, total_size=size)
            offset += len(piece)


async def serve_bare(data: bytes, port_file: Path) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    device_pb2_grpc.add_DeviceServiceServicer_to_server(BareDownloads(data), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    atomic_write(port_file, f"{port}\n".encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


# ------------------------------------------------------------------ server processes


@dataclass
class Server:
    """A server subprocess (with any children: nginx's workers)."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    address: str = ""
    rss_mb_start: float = math.nan

    def _processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_s(self) -> float:
        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total / MIB

    def peak_rss_mb(self) -> float:
        """Sum of each process's high-water resident memory (Linux VmHWM)."""
        total = 0.0
        for process in self._processes():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        return total or math.nan

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, limit_s: float = 15.0) -> dict[str, Any]:
        """SIGTERM (nginx: fast shutdown), wait, and only then SIGKILL."""
        started = perf()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), limit_s)
            clean = code == 0
        except TimeoutError:
            self.proc.kill()
            code = await self.proc.wait()
            clean = False
        return {"exit_code": code, "stop_s": perf() - started, "clean": clean}


async def spawn(name: str, command: Sequence[str], workdir: Path) -> Server:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C here must not kill it before we stop it
        )  # fmt: skip
    return Server(name=name, proc=proc, log_path=log_path)


async def wait_port_file(server: Server, port_file: Path, limit_s: float) -> None:
    deadline = perf() + limit_s
    while perf() < deadline and server.proc.returncode is None:
        port = read_port(port_file)
        if port:
            server.address = f"127.0.0.1:{port}"
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


async def wait_listening(server: Server, port: int, limit_s: float) -> None:
    deadline = perf() + limit_s
    while perf() < deadline and server.proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        server.address = f"127.0.0.1:{port}"
        return
    raise RuntimeError(f"{server.name} did not start:\n{server.log_tail()}")


async def start_control_plane(data_dir: Path, workdir: Path, args: argparse.Namespace) -> Server:
    port_file = workdir / "cp.port"
    command = server_command(data_dir, port_file, build_workers=0, edgefleet_cmd=args.edgefleet_cmd)
    server = await spawn("control-plane", command, workdir)
    await wait_port_file(server, port_file, args.startup_timeout)
    return server


async def start_bare(blob: Path, workdir: Path, args: argparse.Namespace) -> Server:
    port_file = workdir / "bare.port"
    command = [sys.executable, "-m", "bench.bench_download", "--serve-bare", str(blob),
               "--port-file", str(port_file)]  # fmt: skip
    server = await spawn("bare", command, workdir)
    await wait_port_file(server, port_file, args.startup_timeout)
    return server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user {user};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile {sendfile};
    tcp_nopush {sendfile};
    default_type application/octet-stream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


async def start_nginx(
    name: str, blob: Path, workdir: Path, workers: str, sendfile: bool, args: argparse.Namespace
) -> Server:
    """nginx in the foreground with its own config, pid, logs and temp dirs;
    it serves the blob (by a symlink) as /artifact."""
    nginx_dir = workdir / name
    (nginx_dir / "www").mkdir(parents=True)
    (nginx_dir / "www" / "artifact").symlink_to(blob)
    port = free_port()
    conf = nginx_dir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers,
            # Only a root master switches user; its workers must read the blob
            # in our private temp dir. Ignored (a warning) when not root.
            user=pwd.getpwuid(os.geteuid()).pw_name,
            dir=nginx_dir,
            sendfile="on" if sendfile else "off",
            port=port,
            root=nginx_dir / "www",
        )
    )
    command = [args.nginx, "-p", str(nginx_dir), "-e", str(nginx_dir / "error.log"),
               "-c", str(conf)]  # fmt: skip
    server = await spawn(name, command, workdir)
    await wait_listening(server, port, args.startup_timeout)
    return server


# ------------------------------------------------------------------ clients


@dataclass
class Device:
    """An enrolled device: its credential and its own channel."""

    credential: str
    channel: grpc.aio.Channel
    stub: device_pb2_grpc.DeviceServiceAsyncStub


async def enroll_devices(
    address: str, count: int, limit_s: float
) -> tuple[list[Device], grpc.aio.Channel]:
    op_channel = grpc.aio.insecure_channel(address)
    op = operator_pb2_grpc.OperatorServiceStub(op_channel)
    token = await op.CreateEnrollmentToken(
        operator_pb2.CreateEnrollmentTokenRequest(
            name="bench-download",
            policy=operator_pb2.ENROLLMENT_POLICY_AUTO_ACCEPT,
            ttl=duration_pb2.Duration(seconds=3600),
        ),
        metadata=bearer_metadata(ADMIN_TOKEN),
        timeout=limit_s,
    )
    devices = []
    for i in range(count):
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        enrolled = await stub.Enroll(
            device_pb2.EnrollRequest(
                enrollment_token=token.secret,
                hardware_id=f"bench-download-{i}",
                name=f"bench-download-{i}",
                hardware=common_pb2.HardwareProfile(
                    os="Linux",
                    arch=ARCH,
                    cpu_model="Cortex-A72",
                    cpu_cores=4,
                    memory_mb=3792,
                    board_model="Raspberry Pi 4 Model B Rev 1.4",
                ),
                runtime=common_pb2.RuntimeFingerprint(
                    agent_version="0.1.0", onnxruntime_version="1.20.1"
                ),
            ),
            timeout=limit_s,
        )
        if enrolled.state != common_pb2.DEVICE_STATE_ACCEPTED:
            raise RuntimeError(f"device {i} enrolled as {enrolled.state}, not accepted")
        devices.append(Device(enrolled.device_credential, channel, stub))
    return devices, op_channel


def bare_devices(address: str, count: int) -> list[Device]:
    devices = []
    for _ in range(count):
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        devices.append(Device("none", channel, device_pb2_grpc.DeviceServiceStub(channel)))
    return devices


async def grpc_download(
    device: Device, digest: str, chunk: int, buf: bytearray, size: int, offset: int = 0
) -> tuple[int, int]:
    """Stream the artifact from `offset` into buf[0:]; returns (bytes, chunks).
    Checks every chunk's offset and the total size."""
    view = memoryview(buf)
    position, chunks = offset, 0
    call = device.stub.DownloadArtifact(
        device_pb2.DownloadArtifactRequest(digest=digest, offset=offset, chunk_size=chunk),
        metadata=bearer_metadata(device.credential),
    )
    async for piece in call:
        if piece.offset != position or piece.total_size != size:
            raise BenchError(
                f"chunk at {piece.offset} (total {piece.total_size}), expected {position} "
                f"(total {size})"
            )
        data = piece.data
        end = position - offset + len(data)
        if end > len(buf):
            raise BenchError(f"more than the {size - offset} expected bytes")
        view[position - offset : end] = data
        position += len(data)
        chunks += 1
    return position - offset, chunks


def http_download(
    conn: http.client.HTTPConnection, buf: bytearray, size: int, path: str = "/artifact",
    headers: dict[str, str] | None = None,
) -> int:  # fmt: skip
    """GET `path`, reading HTTP_READ bytes at a time into buf."""
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    if response.status != 200:
        raise BenchError(f"HTTP {response.status} {response.reason}")
    length = int(response.getheader("Content-Length") or -1)
    if length != size:
        raise BenchError(f"Content-Length {length}, expected {size}")
    view = memoryview(buf)
    position = 0
    while position < length:
        got = response.readinto(view[position : min(position + HTTP_READ, length)])
        if not got:
            break
        position += got
    return position


# ------------------------------------------------------------------ rows


@dataclass
class Row:
    """One measured configuration: a server, a client kind, a chunk size and
    a number of simultaneous clients."""

    label: str
    server: Server
    kind: str  # "grpc" or "http"
    chunk: int  # gRPC chunk_size requested; HTTP: bytes per read
    clients: int
    devices: list[Device] = field(default_factory=list)
    conns: list[http.client.HTTPConnection] = field(default_factory=list)
    # HTTP: what to GET, with which headers (the control plane's needs a
    # device credential).
    path: str = "/artifact"
    headers: dict[str, str] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    bytes_: int = 0
    chunks: int = 0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    irq_cpu: float = 0.0
    other_cpu: float = 0.0

    def summary(self, size: int) -> dict[str, Any]:
        rates = [self.clients * size / MIB / s for s in self.seconds]
        gib = self.bytes_ / GIB or math.nan
        return {
            "label": self.label,
            "server": self.server.name,
            "kind": self.kind,
            "chunk_bytes": self.chunk,
            "clients": self.clients,
            "runs": len(self.seconds),
            "seconds": self.seconds,
            "mib_per_s": rates,
            "mib_per_s_median": statistics.median(rates) if rates else math.nan,
            "mib_per_s_min": min(rates, default=math.nan),
            "mib_per_s_max": max(rates, default=math.nan),
            "bytes": self.bytes_,
            "chunks_per_download": self.chunks / (len(self.seconds) * self.clients)
            if self.seconds and self.kind == "grpc"
            else None,
            "server_cpu_s_per_gib": self.server_cpu / gib,
            "client_cpu_s_per_gib": self.client_cpu / gib,
            "irq_cpu_s_per_gib": self.irq_cpu / gib,
            "other_cpu_s_per_gib": self.other_cpu / gib,
        }


def _system_cpu_s() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine, and of those in interrupts and
    softirqs (where loopback TCP is largely handled, charged to no process)."""
    times = psutil.cpu_times()
    irq = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0)), float(irq)


@dataclass
class Artifact:
    digest: str
    size: int
    sha256: str  # of the bytes; equals digest for the control plane's blob
    half_sha256: str  # of bytes [size // 2:], for the resume check


async def download_once(
    row: Row, artifact: Artifact, buffers: list[bytearray], servers: Sequence[Server],
    measure: bool,
) -> None:  # fmt: skip
    """All of the row's clients download the whole artifact at once; then
    every copy is checked. `measure` adds the time and CPU to the row."""
    size = artifact.size

    async def one(i: int) -> tuple[int, int]:
        if row.kind == "grpc":
            return await grpc_download(row.devices[i], artifact.digest, row.chunk, buffers[i], size)
        got = await asyncio.to_thread(
            http_download, row.conns[i], buffers[i], size, row.path, row.headers
        )
        return got, 0

    servers0 = [s.cpu_s() for s in servers]
    server0, client0, (busy0, irq0) = row.server.cpu_s(), time.process_time(), _system_cpu_s()
    started = perf()
    results = await asyncio.gather(*(one(i) for i in range(row.clients)))
    wall = perf() - started
    busy, irq = (b - a for a, b in zip((busy0, irq0), _system_cpu_s(), strict=True))
    client = time.process_time() - client0
    server = row.server.cpu_s() - server0
    ours = sum(s.cpu_s() for s in servers) - sum(servers0) + client
    for i, (received, _) in enumerate(results):
        if received != size:
            raise BenchError(f"{row.label}: client {i} received {received} of {size} bytes")
        got = hashlib.sha256(memoryview(buffers[i])[:size]).hexdigest()
        if got != artifact.sha256:
            raise BenchError(f"{row.label}: client {i}: sha256 {got} != {artifact.sha256}")
    if measure:
        row.seconds.append(wall)
        row.bytes_ += size * row.clients
        row.chunks += sum(c for _, c in results)
        row.server_cpu += server
        row.client_cpu += client
        row.irq_cpu += irq
        row.other_cpu += max(0.0, busy - irq - ours)


async def resume_check(device: Device, artifact: Artifact, buf: bytearray) -> dict[str, Any]:
    """Download from size // 2 (as an interrupted agent resumes) and check it."""
    start = artifact.size // 2
    received, chunks = await grpc_download(device, artifact.digest, MAX_CHUNK, buf, artifact.size,
                                           offset=start)  # fmt: skip
    got = hashlib.sha256(memoryview(buf)[:received]).hexdigest()
    if received != artifact.size - start or got != artifact.half_sha256:
        raise BenchError(f"resume from {start}: {received} bytes, sha256 {got}")
    # Past the end is refused; exactly at the end is an empty, successful stream.
    at_end, _ = await grpc_download(device, artifact.digest, MAX_CHUNK, buf, artifact.size,
                                    offset=artifact.size)  # fmt: skip
    try:
        await grpc_download(device, artifact.digest, MAX_CHUNK, buf, artifact.size,
                            offset=artifact.size + 1)  # fmt: skip
        past_end = "accepted"
    except grpc.aio.AioRpcError as error:
        past_end = error.code().name
    if at_end != 0 or past_end != "OUT_OF_RANGE":
        raise BenchError(f"resume at the end: {at_end} bytes; past the end: {past_end}")
    return {"offset": start, "bytes": received, "chunks": chunks, "sha256_ok": True,
            "past_end": past_end}  # fmt: skip


# ------------------------------------------------------------------ run


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def nginx_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stderr or done.stdout).strip().split(":", 1)[-1].strip()


def _kib(chunk: int) -> str:
    return f"{chunk // MIB} MiB" if chunk % MIB == 0 else f"{chunk // KIB} KiB"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    size = args.size_mb * MIB
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-download-"))
    servers: list[Server] = []
    channels: list[grpc.aio.Channel] = []
    rows: list[Row] = []
    setup: dict[str, Any] = {}
    # What else runs here: a busy machine makes every figure below noise.
    busy_before = psutil.cpu_percent(interval=2.0) / 100 * (os.cpu_count() or 1)
    if busy_before > 0.1 * (os.cpu_count() or 1):
        _say(f"WARNING: the machine is busy ({busy_before:.2f} cores) before the benchmark")
    try:
        # ---- publish
        _say(f"writing a {args.size_mb} MiB random artifact and publishing it")
        source = workdir / "artifact.bin"
        t0 = perf()
        sha = write_random_file(source, size)
        data_dir = workdir / "data"
        t1 = perf()
        digest = await publish_artifact(data_dir, source, args.rpc_timeout)
        setup["publish_s"] = perf() - t1
        setup["write_s"] = t1 - t0
        if digest != sha:
            raise BenchError(f"published digest {digest} is not the file's sha256 {sha}")
        source.unlink()  # every server serves the blob cache entry below
        blob = data_dir / "blobs" / "sha256" / digest[:2] / digest
        if not blob.is_file() or blob.stat().st_size != size:
            raise RuntimeError(f"no blob cache entry at {blob}")
        artifact = Artifact(digest, size, sha, file_sha256(blob, size // 2))

        # ---- servers
        _say("starting the servers")
        cp = await start_control_plane(data_dir, workdir, args)
        servers.append(cp)
        counts = [1] + ([args.concurrency] if args.concurrency > 1 else [])
        bare = None
        if not args.skip_bare:
            bare = await start_bare(blob, workdir, args)
            servers.append(bare)
        # nginx's own defaults (sendfile off) are the baseline; Debian's
        # packaged nginx.conf turns sendfile on, so that is measured as well.
        nginx_rows: list[tuple[str, Server, list[int]]] = []
        if not args.skip_nginx:
            nginx_1 = await start_nginx("nginx-1w", blob, workdir, "1", False, args)
            servers.append(nginx_1)
            nginx_sf = await start_nginx("nginx-1w-sendfile", blob, workdir, "1", True, args)
            servers.append(nginx_sf)
            nginx_auto = await start_nginx("nginx-auto", blob, workdir, "auto", False, args)
            servers.append(nginx_auto)
            nginx_rows = [
                ("nginx, 1 worker", nginx_1, counts),
                ("nginx, 1 worker, sendfile on", nginx_sf, counts),
                (f"nginx, auto workers ({os.cpu_count()})", nginx_auto, counts),
            ]
        await asyncio.sleep(0.5)  # let the bare server finish reading the file
        for server in servers:
            server.rss_mb_start = server.rss_mb()

        # ---- clients
        max_clients = max(1, args.concurrency)
        cp_devices, op_channel = await enroll_devices(cp.address, max_clients, args.rpc_timeout)
        channels += [op_channel, *(d.channel for d in cp_devices)]
        bare_devs = bare_devices(bare.address, max_clients) if bare else []
        channels += [d.channel for d in bare_devs]

        def http_conns(
            server: Server, count: int, address: str | None = None
        ) -> list[http.client.HTTPConnection]:
            host, port = (address or server.address).rsplit(":", 1)
            return [http.client.HTTPConnection(host, int(port), timeout=args.rpc_timeout)
                    for _ in range(count)]  # fmt: skip

        big = max(args.chunk_kib) * KIB
        grpc_targets = [("control plane", cp, cp_devices)]
        if bare:
            grpc_targets.append(("bare grpc.aio", bare, bare_devs))
        for name, server, devs in grpc_targets:
            for chunk_kib in args.chunk_kib:
                rows.append(Row(f"{name}, {_kib(chunk_kib * KIB)} chunks", server, "grpc",
                                chunk_kib * KIB, 1, devices=devs[:1]))  # fmt: skip
            if args.concurrency > 1:
                rows.append(Row(f"{name}, {_kib(big)} chunks, {args.concurrency} clients",
                                server, "grpc", big, args.concurrency,
                                devices=devs[: args.concurrency]))  # fmt: skip
        # The control plane's artifact downloads over HTTP (sendfile from
        # the verified blob), with a device's credential.
        cp_http = f"127.0.0.1:{int((workdir / 'artifact-http-port').read_text())}"
        device_auth = {"Authorization": f"Bearer {cp_devices[0].credential}"}
        for count in counts:
            label = "control plane, HTTP" + ("" if count == 1 else f", {count} clients")
            rows.append(Row(label, cp, "http", HTTP_READ, count,
                            conns=http_conns(cp, count, cp_http),
                            path=f"/v1/artifacts/{digest}",
                            headers=device_auth))  # fmt: skip
        for name, server, counts_ in nginx_rows:
            for count in counts_:
                label = name if count == 1 else f"{name}, {count} clients"
                rows.append(Row(label, server, "http", HTTP_READ, count,
                                conns=http_conns(server, count)))  # fmt: skip

        buffers = [bytearray(size) for _ in range(max_clients)]

        # ---- resume check (control plane), then the measured rounds
        resume = await resume_check(cp_devices[0], artifact, buffers[0])
        _say(f"resume from {resume['offset']}: ok; {len(rows)} rows x "
             f"(1 warm-up + {args.runs}) downloads")  # fmt: skip
        t_rounds = perf()
        for round_ in range(args.runs + 1):
            order = rows if round_ % 2 == 0 else list(reversed(rows))
            for row in order:
                await download_once(row, artifact, buffers, servers, measure=round_ > 0)
        rounds_s = perf() - t_rounds

        server_info: dict[str, dict[str, Any]] = {
            s.name: {"rss_mb_start": s.rss_mb_start, "rss_mb_end": s.rss_mb(),
                     "peak_rss_mb": s.peak_rss_mb(), "processes": len(s._processes())}
            for s in servers
        }  # fmt: skip
    except BaseException:
        for server in servers:
            _say(f"[{server.name}] log tail:\n{server.log_tail()}")
        raise
    finally:
        for row in rows:
            for conn in row.conns:
                conn.close()
        for channel in channels:
            await channel.close(None)
        shutdown = {s.name: await s.stop() for s in servers}
        if args.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for name, info in server_info.items():
        info["shutdown"] = shutdown[name]
    summaries = [r.summary(size) for r in rows]
    return {
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "nginx": "not run" if args.skip_nginx else nginx_version(args.nginx),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "artifact": {"digest": digest, "size_bytes": size},
        "busy_cores_before": busy_before,
        "setup": setup,
        "rounds_s": rounds_s,
        "resume": resume,
        "servers": server_info,
        "rows": summaries,
        "comparison": comparison(summaries),
    }


def _over(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN (printed "-") for a zero denominator: a
    short run can finish within the CPU clock's tick."""
    return numerator / denominator if denominator else math.nan


def comparison(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per chunk size, one client: control plane / nginx (1 worker, defaults)
    in MiB/s (the goal), the same for server CPU per GiB (nginx / control
    plane: the ratio if the server alone were the bottleneck), and control
    plane / bare grpc.aio (what the control plane costs over gRPC itself)."""
    single = {(r["server"], r["kind"], r["chunk_bytes"]): r for r in rows if r["clients"] == 1}
    nginx = single.get(("nginx-1w", "http", HTTP_READ))
    out: dict[str, Any] = {
        "goal": GOAL, "baseline": "nginx, 1 worker", "ratios": {}, "http": {},
        "http_goal": HTTP_GOAL, "http_cpu_goal": HTTP_CPU_GOAL,
    }  # fmt: skip
    if nginx is None:
        return out
    by_clients = {(r["server"], r["kind"], r["clients"]): r for r in rows}
    for (server, kind, clients), row in by_clients.items():
        sendfile = by_clients.get(("nginx-1w-sendfile", "http", clients))
        if server != "control-plane" or kind != "http" or sendfile is None:
            continue
        ratio = row["mib_per_s_median"] / sendfile["mib_per_s_median"]
        cpu = _over(row["server_cpu_s_per_gib"], sendfile["server_cpu_s_per_gib"])
        out["http"][clients] = {
            "ratio": ratio, "cpu_ratio": cpu,
            "met": ratio >= HTTP_GOAL and cpu <= HTTP_CPU_GOAL,
            "vs_nginx_defaults": row["mib_per_s_median"]
            / by_clients[("nginx-1w", "http", clients)]["mib_per_s_median"],
        }  # fmt: skip
    for (server, kind, chunk), row in single.items():
        if server != "control-plane" or kind != "grpc":
            continue
        ratio = row["mib_per_s_median"] / nginx["mib_per_s_median"]
        bare = single.get(("bare", "grpc", chunk))
        out["ratios"][_kib(chunk)] = {
            "ratio": ratio,
            "met": ratio >= GOAL,
            "server_cost_ratio": _over(nginx["server_cpu_s_per_gib"], row["server_cpu_s_per_gib"]),
            "vs_bare": row["mib_per_s_median"] / bare["mib_per_s_median"] if bare else None,
            "server_cpu_vs_bare": _over(row["server_cpu_s_per_gib"], bare["server_cpu_s_per_gib"])
            if bare
            else None,
        }
    return out


# ------------------------------------------------------------------ report


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = results["rows"]
    base = {r["clients"]: r for r in rows if r["server"] == "nginx-1w"}
    out: list[tuple[str, ...]] = []
    for r in rows:
        ref = base.get(r["clients"])
        ratio = r["mib_per_s_median"] / ref["mib_per_s_median"] if ref else math.nan
        out.append((
            r["label"],
            _fmt(r["mib_per_s_median"], 0),
            f"{_fmt(r['mib_per_s_min'], 0)}-{_fmt(r['mib_per_s_max'], 0)}",
            _fmt(r["server_cpu_s_per_gib"], 2),
            _fmt(r["client_cpu_s_per_gib"], 2),
            _fmt(r["irq_cpu_s_per_gib"], 2),
            _fmt(ratio, 2),
        ))  # fmt: skip
    return out


COLUMNS = ("", "MiB/s (median)", "min-max", "server CPU s/GiB", "client CPU s/GiB",
           "irq CPU s/GiB", "vs nginx 1w")  # fmt: skip


def verdict(results: dict[str, Any]) -> list[str]:
    cmp_ = results["comparison"]
    met = {True: "met", False: "NOT met"}
    lines = []
    for chunk, r in cmp_["ratios"].items():
        lines.append(
            f"control plane / nginx (1 worker), {chunk} chunks = {_fmt(r['ratio'], 2)} "
            f"(goal >= {GOAL:.2f}: {met[r['met']]}); server CPU per GiB, nginx / control "
            f"plane = {_fmt(r['server_cost_ratio'], 2)}"
        )
        if r["vs_bare"] is not None:
            lines.append(
                f"  control plane / bare grpc.aio, {chunk} chunks: MiB/s "
                f"{_fmt(r['vs_bare'], 2)}, server CPU per GiB {_fmt(r['server_cpu_vs_bare'], 2)}"
            )
    for clients, r in cmp_.get("http", {}).items():
        lines.append(
            f"control plane over HTTP / nginx (1 worker, sendfile on), {clients} client(s) = "
            f"{_fmt(r['ratio'], 2)}, server CPU per GiB {_fmt(r['cpu_ratio'], 2)}x nginx's "
            f"(goal >= {HTTP_GOAL:.2f} and <= {HTTP_CPU_GOAL:.0f}x: {met[r['met']]}); "
            f"/ nginx with its defaults {_fmt(r['vs_nginx_defaults'], 2)}"
        )
    resume = results["resume"]
    lines.append(f"resume from byte {resume['offset']:,}: sha256 ok; past the end: "
                 f"{resume['past_end']}")  # fmt: skip
    servers = results["servers"]
    lines.append("server RSS MiB start / end / peak: " + "; ".join(
        f"{name} {_fmt(s['rss_mb_start'], 0)} / {_fmt(s['rss_mb_end'], 0)} / "
        f"{_fmt(s['peak_rss_mb'], 0)}" for name, s in servers.items()))  # fmt: skip
    unclean = [name for name, s in servers.items() if not s["shutdown"]["clean"]]
    lines.append(f"clean shutdown: {'all' if not unclean else 'NOT ' + ', '.join(unclean)}")
    cores = results["machine"]["cores"] or 1
    rates = [r["other_cpu_s_per_gib"] * r["mib_per_s_median"] / 1024 for r in results["rows"]]
    if max(rates, default=0.0) > 0.1 * cores:
        lines.append(f"WARNING: other processes used up to {max(rates):.2f} cores")
    return lines


def print_report(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    machine = results["machine"]
    title = (
        f"EdgeFleet download benchmark: {results['args']['size_mb']} MiB x "
        f"{results['args']['runs']} runs; {machine['cores']} x {machine['cpu_model']}, "
        f"Python {machine['python']}, grpcio {machine['grpcio']}, nginx {results['nginx']}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        width = max(len(r[0]) for r in rows)
        print(f"{'':{width}}  " + "  ".join(f"{c:>16}" for c in COLUMNS[1:]))
        for cells in rows:
            print(f"{cells[0]:{width}}  " + "  ".join(f"{c:>16}" for c in cells[1:]))
        print("\n".join(verdict(results)))
        return
    table = Table(title=title)
    table.add_column(COLUMNS[0])
    for column in COLUMNS[1:]:
        table.add_column(column, justify="right")
    for cells in rows:
        table.add_row(*cells)
    # Wide enough for the table when the output is not a terminal (a log file).
    console = Console(width=None if sys.stdout.isatty() else 132)
    console.print(table)
    console.print("\n".join(verdict(results)))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EdgeFleet artifact download benchmark")
    add = parser.add_argument
    add("--size-mb", type=int, default=128, help="artifact size in MiB")
    add("--runs", type=int, default=5, help="measured downloads per row (after one warm-up)")
    add(
        "--chunk-kib",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[256, 1024],
        help="gRPC chunk sizes to request, comma-separated (the server clamps to 64-1024)",
    )
    add("--concurrency", type=int, default=4,
        help="clients downloading at once in the concurrent rows; 0 or 1: none")  # fmt: skip
    add("--skip-bare", action="store_true", help="no bare grpc.aio server")
    add("--skip-nginx", action="store_true",
        help="no nginx rows, so no ratio to the baseline (--smoke without nginx)")  # fmt: skip
    add("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx binary")
    add("--out", type=Path, help="write the JSON results here")
    add("--keep", action="store_true", help="keep the temp dir (data dir, logs, nginx configs)")
    add("--rpc-timeout", type=float, default=120.0)
    add("--startup-timeout", type=float, default=60.0)
    add("--edgefleet-cmd",
        help="command that runs the CLI, e.g. 'python -m edgefleet.controlplane.cli' (default: the "
        "edgefleet script of this environment); 'server' and its options are appended")  # fmt: skip
    add("--serve-bare", type=Path, help=argparse.SUPPRESS)
    add("--port-file", type=Path, help=argparse.SUPPRESS)
    add("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.serve_bare is None:
        if args.size_mb < 1 or args.runs < 1:
            parser.error("--size-mb and --runs must be >= 1")
        if any(not 64 <= c <= 1024 for c in args.chunk_kib):
            parser.error("--chunk-kib values must be within 64..1024 (the server clamps)")
        if args.smoke and not Path(args.nginx).exists():
            _say(f"no nginx at {args.nginx}: the smoke run skips its rows")
            args.skip_nginx = True
        if not args.skip_nginx and not Path(args.nginx).exists():
            parser.error(f"nginx not found at {args.nginx} (apt-get install nginx-light)")
    elif args.port_file is None:
        parser.error("--serve-bare needs --port-file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare is not None:
        asyncio.run(serve_bare(args.serve_bare.read_bytes(), args.port_file))
        return 0
    started = perf()
    results = asyncio.run(run(args))
    results["total_s"] = perf() - started
    print_report(results)
    if args.out:
        write_results(args.out, results)
        _say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
