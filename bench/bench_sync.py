"""Enrollment + Sync benchmark: the control plane against a bare grpc.aio server.

Starts two servers, each its own single-process subprocess, side by side:

* echo: bench/echo_server.py, a grpc.aio DeviceService with no auth, no DB and
  no logic: the ceiling one grpc.aio process reaches on this machine;
* control plane: `edgefleet server` on a fresh temp data dir (or --db URL).

Against each it drives N simulated agents that live in this process (asyncio +
grpc.aio) and speak the real protocol:

1. enrollment: every agent calls Enroll with a unique hardware id and a
   realistic hardware profile, --concurrency calls in flight;
2. sync: every agent opens its own Sync stream, sends Hello and waits for the
   DesiredState (the connect time), then sends heartbeats in a closed loop
   (send, await the ack, repeat). The --seconds of measurement per server are
   cut into --rounds blocks run alternately (echo, CP, CP, echo, ...) so
   background load and drift hit both servers alike;
3. push (control plane only): with every stream open, change one device's
   labels with OperatorService.UpdateDeviceLabels, device after device, and
   time until that agent's stream delivers the new DesiredState; once with the
   fleet idle and once while every agent heartbeats in a closed loop.

Agents share channels (--agents-per-channel, default 50): each channel is a TCP
connection with its own HTTP/2 state, and a thousand of them in one Python
process mostly measure this process, not the server. Every agent still has its
own stream. See docs/benchmarks.md for what each figure means.

    python -m bench.bench_sync --agents 1000 --seconds 20 --out results.json
    python -m bench.bench_sync --control-plane echo   # echo vs echo: tests the harness
    python -m bench.bench_sync --smoke                # CI: seconds, figures meaningless

(from the repository root: the servers start as bench/common.py starts them)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import duration_pb2

from bench.common import ADMIN_TOKEN, ECHO_SERVER, read_port, server_command
from bench.jsonout import write_results
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc

# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every phase with 20 agents. Figures meaningless.
SMOKE = {"agents": 20, "seconds": 2.0, "rounds": 2, "agents_per_channel": 10, "concurrency": 10,
         "enroll_warmup": 5, "pushes": 3}  # fmt: skip
LABEL_KEY = "bench"
# A local subchannel pool gives each channel its own TCP connection; otherwise
# channels with identical arguments share one inside grpc.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
IDLE_ROUND_TRIPS = 300

perf = time.perf_counter
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


# ------------------------------------------------------------------ fleet data

# Device kinds an edge fleet is made of; agents cycle through them.
_PROFILES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {"os_release": "6.6.31+rpt-rpi-v8", "arch": "aarch64", "cpu_model": "Cortex-A72",
         "cpu_cores": 4, "memory_mb": 3792, "disk_total_mb": 29_000, "disk_free_mb": 17_500,
         "board_model": "Raspberry Pi 4 Model B Rev 1.4"},
        {"python_version": "3.11.2", "onnxruntime_providers": ["CPUExecutionProvider"],
         "litert_version": "1.2.0", "litert_package": "ai-edge-litert"},
    ),
    (
        {"os_release": "5.15.136-tegra", "arch": "aarch64",
         "cpu_model": "ARMv8 Processor rev 1 (v8l)", "cpu_cores": 6, "memory_mb": 7620,
         "disk_total_mb": 116_000, "disk_free_mb": 80_200,
         "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
         "accelerators": [{"kind": "jetson", "name": "Orin (nvgpu)", "memory_mb": 7620,
                           "driver_version": "36.3.0", "compute_capability": "8.7"}]},
        {"python_version": "3.10.12", "tensorrt_version": "8.6.2",
         "onnxruntime_providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                   "CPUExecutionProvider"]},
    ),
    (
        {"os_release": "6.8.0-49-generic", "arch": "x86_64",
         "cpu_model": "Intel(R) Core(TM) i5-1135G7 @ 2.40GHz", "cpu_cores": 8,
         "memory_mb": 15_700, "disk_total_mb": 476_000, "disk_free_mb": 390_000,
         "board_model": "Intel NUC11TNHi5"},
        {"python_version": "3.12.3", "litert_version": "2.14.0", "litert_package": "tflite-runtime",
         "onnxruntime_providers": ["OpenVINOExecutionProvider", "CPUExecutionProvider"]},
    ),
    (
        {"os_release": "6.1.0-25-amd64", "arch": "x86_64",
         "cpu_model": "AMD Ryzen 7 5700G with Radeon Graphics", "cpu_cores": 16,
         "memory_mb": 31_900, "disk_total_mb": 953_000, "disk_free_mb": 610_000,
         "board_model": "ASRock DeskMini X300",
         "accelerators": [{"kind": "nvidia-gpu", "name": "NVIDIA RTX A2000 12GB",
                           "memory_mb": 12_282, "driver_version": "550.120",
                           "compute_capability": "8.6"}]},
        {"python_version": "3.11.2", "tensorrt_version": "10.3.0",
         "onnxruntime_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
    ),
]  # fmt: skip


def device_profile(
    index: int, host: str, rng: random.Random
) -> tuple[common_pb2.HardwareProfile, common_pb2.RuntimeFingerprint]:
    hardware, runtime = _PROFILES[index % len(_PROFILES)]
    profile = common_pb2.HardwareProfile(os="Linux", hostname=host, **hardware)
    profile.disk_free_mb = int(profile.disk_free_mb * rng.uniform(0.6, 1.0))
    fingerprint = common_pb2.RuntimeFingerprint(
        agent_version="0.1.0", onnxruntime_version="1.20.1", **runtime
    )
    return profile, fingerprint


# ------------------------------------------------------------------ agents


class StreamEnded(Exception):
    """The server closed a Sync stream the agent still needed."""


class Agent:
    """One simulated device: its identity, its Sync stream, the pushes it saw."""

    def __init__(
        self, index: int, run_id: str, stub: device_pb2_grpc.DeviceServiceAsyncStub,
        rng: random.Random,
    ) -> None:  # fmt: skip
        self.index = index
        self.name = f"edge-{run_id}-{index:05d}"
        self.hardware_id = f"bench-{run_id}-{index:05d}-{rng.getrandbits(64):016x}"
        self.hardware, self.runtime = device_profile(index, self.name, rng)
        self.stub = stub
        self.device_id = ""
        self.credential = ""
        self.call: Any = None  # the grpc.aio StreamStreamCall once connected
        self.seq = 0
        self.desired_seen = 0
        self.unexpected_acks = 0
        self._waiters: dict[str, asyncio.Future[float]] = {}

    def enroll_request(self, token: str) -> device_pb2.EnrollRequest:
        return device_pb2.EnrollRequest(
            enrollment_token=token,
            hardware_id=self.hardware_id,
            name=self.name,
            labels={"site": f"site-{self.index % 17}", LABEL_KEY: "enrolled"},
            hardware=self.hardware,
            runtime=self.runtime,
        )

    def expect_label(self, value: str) -> asyncio.Future[float]:
        """A future resolved with the arrival time of the first DesiredState
        whose LABEL_KEY label equals `value`."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[value] = future
        return future

    def on_desired(self, desired: device_pb2.DesiredState) -> None:
        arrived = perf()
        self.desired_seen += 1
        future = self._waiters.pop(desired.labels.get(LABEL_KEY, ""), None)
        if future is not None and not future.done():
            future.set_result(arrived)

    async def connect(self, limit_s: float) -> None:
        """Open Sync, send Hello, wait for the first DesiredState."""
        self.call = self.stub.Sync(None, metadata=bearer_metadata(self.credential))
        hello = device_pb2.Hello(hardware=self.hardware, runtime=self.runtime)
        await self.call.write(device_pb2.AgentMessage(hello=hello))
        message = await asyncio.wait_for(self.call.read(), limit_s)
        if message is EOF:
            raise StreamEnded(f"agent {self.index}: stream closed before DesiredState")
        if message.WhichOneof("kind") != "desired":
            raise StreamEnded(f"agent {self.index}: first message was {message.WhichOneof('kind')}")
        self.on_desired(message.desired)

    async def send_heartbeat(self) -> int:
        self.seq += 1
        heartbeat = device_pb2.Heartbeat(seq=self.seq)
        await self.call.write(device_pb2.AgentMessage(heartbeat=heartbeat))
        return self.seq

    async def read_until_ack(self, seq: int) -> None:
        """Read the stream, handling pushed DesiredStates, until the ack of `seq`."""
        call = self.call
        while True:
            message = await call.read()
            if message is EOF:
                raise StreamEnded(f"agent {self.index}: stream closed")
            kind = message.WhichOneof("kind")
            if kind == "heartbeat_ack":
                if message.heartbeat_ack.seq == seq:
                    return
                self.unexpected_acks += 1
            elif kind == "desired":
                self.on_desired(message.desired)

    async def close(self, limit_s: float) -> None:
        call = self.call
        if call is None:
            return
        try:
            await call.done_writing()
            async with asyncio.timeout(limit_s):
                while await call.read() is not EOF:
                    pass
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError):
            call.cancel()


@dataclass
class LoopControl:
    """Shared by every heartbeat loop: round trips that start in
    [measure_from, stop_at) are counted; loops end once stop_at has passed."""

    measure_from: float
    stop_at: float
    latencies: list[float] = field(default_factory=list)


async def heartbeat_loop(agent: Agent, control: LoopControl) -> None:
    """Closed loop: send a heartbeat, await its ack, repeat."""
    latencies = control.latencies
    while True:
        started = perf()
        if started >= control.stop_at:
            return
        seq = await agent.send_heartbeat()
        await agent.read_until_ack(seq)
        if started >= control.measure_from:
            latencies.append(perf() - started)


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "count": len(values),
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": (max(values) * 1000) if values else math.nan,
    }


def _errors(
    results: Sequence[BaseException | None], into: Counter[str] | None = None
) -> Counter[str]:
    counts: Counter[str] = Counter() if into is None else into
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            counts[result.code().name] += 1
        elif result is not None:
            counts[type(result).__name__] += 1
    return counts


def _system_cpu_s() -> tuple[float, float]:
    """CPU seconds (summed over cores) the whole machine has spent busy, and of
    those, in interrupts and softirqs (where loopback TCP is largely handled,
    charged to no process)."""
    times = psutil.cpu_times()
    irq = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0)), float(irq)


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    """A server subprocess and what we know about it."""

    name: str
    proc: asyncio.subprocess.Process
    workdir: Path
    log_path: Path
    address: str = ""

    def _processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total / 2**20

    def cpu_s(self) -> float:
        total = 0.0
        for process in self._processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, limit_s: float = 15.0) -> dict[str, Any]:
        """SIGTERM, wait, and only then SIGKILL."""
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


def command_for(kind: str, workdir: Path, args: argparse.Namespace) -> list[str]:
    """The echo server's or `edgefleet server`'s command line, writing its
    port to workdir/port."""
    port_file = workdir / "port"
    if kind == "echo":
        return [sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0",
                "--port-file", str(port_file)]  # fmt: skip
    return server_command(
        workdir / "data", port_file, heartbeat_s=3600, db=args.db, edgefleet_cmd=args.edgefleet_cmd
    )


async def start_server(name: str, kind: str, args: argparse.Namespace) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"edgefleet-bench-{name}-"))
    (workdir / "data").mkdir()
    log_path = workdir / "server.log"
    command = command_for(kind, workdir, args)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C here must not kill it before we stop it
        )  # fmt: skip
    server = Server(name=name, proc=proc, workdir=workdir, log_path=log_path)
    port_file = workdir / "port"
    deadline = perf() + args.startup_timeout
    while perf() < deadline and proc.returncode is None:
        port = read_port(port_file)
        if port:
            server.address = f"127.0.0.1:{port}"
            return server
        await asyncio.sleep(0.05)
    await server.stop()
    tail = server.log_tail()
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"{name} server did not start ({shlex.join(command)}):\n{tail}")


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    """One server under test, its channels and its simulated fleet."""

    label: str
    kind: str
    server: Server
    channels: list[grpc.aio.Channel]
    agents: list[Agent]
    warmup_agents: list[Agent]
    operator: operator_pb2_grpc.OperatorServiceAsyncStub
    token: str = ""
    connected: list[Agent] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def is_control_plane(self) -> bool:
        return self.kind != "echo"


async def open_target(label: str, kind: str, args: argparse.Namespace) -> Target:
    server = await start_server(label, kind, args)
    channels: list[grpc.aio.Channel] = []
    try:
        n_channels = math.ceil(args.agents / args.agents_per_channel)
        for _ in range(n_channels):
            channels.append(grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS))
            await asyncio.wait_for(channels[-1].channel_ready(), args.rpc_timeout)
        stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in channels]
        rng = random.Random(f"{args.seed}-{label}")
        run_id = f"{rng.getrandbits(32):08x}"

        def fleet(count: int, prefix: str) -> list[Agent]:
            return [
                Agent(i, prefix, stubs[i // args.agents_per_channel], rng) for i in range(count)
            ]

        target = Target(
            label=label,
            kind=kind,
            server=server,
            channels=channels,
            agents=fleet(args.agents, run_id),
            warmup_agents=fleet(min(args.enroll_warmup, args.agents), f"{run_id}w"),
            operator=operator_pb2_grpc.OperatorServiceStub(channels[0]),
            result={"server": kind, "channels": n_channels, "rss_mb_start": server.rss_mb()},
        )
        target.token = (
            await create_enrollment_token(target.operator, args.rpc_timeout)
            if target.is_control_plane
            else "echo"
        )
        return target
    except BaseException:
        _say(f"[{label}] server log tail:\n{server.log_tail()}")
        for channel in channels:
            await channel.close(None)
        await server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
        raise


async def close_target(target: Target) -> None:
    await asyncio.gather(*(a.close(5.0) for a in target.agents), return_exceptions=True)
    for channel in target.channels:
        await channel.close(None)
    target.result["shutdown"] = await target.server.stop()
    shutil.rmtree(target.server.workdir, ignore_errors=True)


async def create_enrollment_token(
    operator: operator_pb2_grpc.OperatorServiceAsyncStub, limit_s: float
) -> str:
    response = await operator.CreateEnrollmentToken(
        operator_pb2.CreateEnrollmentTokenRequest(
            name="bench",
            policy=operator_pb2.ENROLLMENT_POLICY_AUTO_ACCEPT,
            max_uses=0,
            ttl=duration_pb2.Duration(seconds=3600),
        ),
        metadata=bearer_metadata(ADMIN_TOKEN),
        timeout=limit_s,
    )
    return str(response.secret)


# ------------------------------------------------------------------ phases


async def phase_enroll(
    target: Target, agents: Sequence[Agent], args: argparse.Namespace
) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []

    async def enroll(agent: Agent) -> None:
        request = agent.enroll_request(target.token)
        async with semaphore:
            started = perf()
            response = await agent.stub.Enroll(request, timeout=args.rpc_timeout)
            latencies.append(perf() - started)
        agent.device_id = response.device_id
        agent.credential = response.device_credential

    cpu0, started = target.server.cpu_s(), perf()
    results = await asyncio.gather(*(enroll(a) for a in agents), return_exceptions=True)
    wall = perf() - started
    cpu = target.server.cpu_s() - cpu0
    return {
        "agents": len(agents),
        "concurrency": args.concurrency,
        "wall_s": wall,
        "per_s": len(latencies) / wall if wall else math.nan,
        "latency": latency_summary(latencies),
        "errors": dict(_errors(results)),
        "server_cpu_ms_per_enroll": cpu / len(latencies) * 1000 if latencies else math.nan,
    }


async def phase_connect(agents: Sequence[Agent], args: argparse.Namespace) -> dict[str, Any]:
    limit = args.connect_concurrency or len(agents)
    semaphore = asyncio.Semaphore(limit)
    latencies: list[float] = []

    async def connect(agent: Agent) -> None:
        async with semaphore:
            started = perf()
            await agent.connect(args.rpc_timeout)
            latencies.append(perf() - started)

    started = perf()
    results = await asyncio.gather(*(connect(a) for a in agents), return_exceptions=True)
    wall = perf() - started
    return {
        "streams": len(latencies),
        "concurrency": limit,
        "all_connected_s": wall,
        "latency": latency_summary(latencies),
        "errors": dict(_errors(results)),
    }


async def phase_idle_round_trips(agent: Agent, count: int) -> dict[str, float | int]:
    """One agent heartbeats alone (the rest of the fleet connected and quiet):
    the round trip with no queueing, the floor under the closed-loop latency."""
    latencies = []
    for _ in range(count):
        started = perf()
        await agent.read_until_ack(await agent.send_heartbeat())
        latencies.append(perf() - started)
    return latency_summary(latencies)


@dataclass
class SyncTally:
    """A target's closed-loop heartbeat figures, summed over its blocks."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    block_rates: list[float] = field(default_factory=list)
    block_other_cpu: list[float] = field(default_factory=list)
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    irq_cpu: float = 0.0
    other_cpu: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self, streams: int, warmup_s: float) -> dict[str, Any]:
        count = len(self.latencies)
        seconds = self.seconds or math.nan
        return {
            "streams": streams,
            "seconds": self.seconds,
            "blocks": len(self.block_rates),
            "block_warmup_s": warmup_s,
            "round_trips": count,
            "per_s": count / seconds,
            "block_per_s": self.block_rates,
            "block_other_cpu_cores": self.block_other_cpu,
            "latency": latency_summary(self.latencies),
            "errors": dict(self.errors),
            "server_cpu_us_per_round_trip": self.server_cpu / count * 1e6 if count else math.nan,
            "server_cpu_cores": self.server_cpu / seconds,
            "client_cpu_cores": self.client_cpu / seconds,
            "irq_cpu_cores": self.irq_cpu / seconds,
            "other_cpu_cores": self.other_cpu / seconds,
        }


async def sync_block(
    target: Target, servers: Sequence[Server], measure_s: float, warmup_s: float, tally: SyncTally
) -> None:
    """All of `target`'s connected agents heartbeat in a closed loop for
    warmup_s + measure_s; the last measure_s count."""
    now = perf()
    control = LoopControl(measure_from=now + warmup_s, stop_at=now + warmup_s + measure_s)
    agents = target.connected
    tasks = [asyncio.create_task(heartbeat_loop(a, control)) for a in agents]
    await asyncio.sleep(max(0.0, control.measure_from - perf()))
    ours0 = [s.cpu_s() for s in servers]
    server0, client0, (busy0, irq0) = target.server.cpu_s(), time.process_time(), _system_cpu_s()
    await asyncio.sleep(max(0.0, control.stop_at - perf()))
    server, client = target.server.cpu_s() - server0, time.process_time() - client0
    busy, irq = (b - a for a, b in zip((busy0, irq0), _system_cpu_s(), strict=True))
    ours = sum(s.cpu_s() for s in servers) - sum(ours0) + client
    results = await asyncio.gather(*tasks, return_exceptions=True)
    _errors(results, into=tally.errors)
    # A dead stream would fail every later block too.
    target.connected = [a for a, r in zip(agents, results, strict=True) if r is None]
    tally.seconds += measure_s
    tally.latencies += control.latencies
    tally.block_rates.append(len(control.latencies) / measure_s)
    tally.server_cpu += server
    tally.client_cpu += client
    other = max(0.0, busy - irq - ours)
    tally.irq_cpu += irq
    tally.other_cpu += other
    tally.block_other_cpu.append(other / measure_s)


async def phase_sync(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """Alternate blocks, ABBA order, so drift and neighbours' load spread over
    both targets."""
    tallies = {t.label: SyncTally() for t in targets}
    streams = {t.label: len(t.connected) for t in targets}
    servers = [t.server for t in targets]
    block_s = args.seconds / args.rounds
    for round_ in range(args.rounds):
        order = targets if round_ % 2 == 0 else list(reversed(targets))
        for target in order:
            await sync_block(target, servers, block_s, args.warmup, tallies[target.label])
    for target in targets:
        target.result["sync"] = tallies[target.label].summary(streams[target.label], args.warmup)


def _spread(agents: Sequence[Agent], count: int) -> list[Agent]:
    """`count` agents spread evenly over the fleet (so over every channel)."""
    count = min(count, len(agents))
    step = len(agents) / count if count else 1
    return [agents[int(i * step)] for i in range(count)]


async def _push_series(target: Target, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    """UpdateDeviceLabels on one device after another; time until its agent
    sees the new DesiredState."""
    from_return: list[float] = []
    from_call: list[float] = []
    before_return = 0
    missed: Counter[str] = Counter()
    metadata = bearer_metadata(ADMIN_TOKEN)
    for i, agent in enumerate(_spread(target.connected, args.pushes)):
        value = f"{tag}-{i}"
        arrived = agent.expect_label(value)
        request = operator_pb2.UpdateDeviceLabelsRequest(id=agent.device_id, set={LABEL_KEY: value})
        called = perf()
        try:
            await target.operator.UpdateDeviceLabels(
                request, metadata=metadata, timeout=args.rpc_timeout
            )
        except grpc.aio.AioRpcError as error:
            missed[error.code().name] += 1
            continue
        returned = perf()
        try:
            at = await asyncio.wait_for(asyncio.shield(arrived), args.push_timeout)
        except TimeoutError:
            missed["not_delivered"] += 1
            continue
        before_return += at < returned
        from_return.append(max(0.0, at - returned))
        from_call.append(at - called)
    return {
        "pushes": args.pushes,
        "from_return": latency_summary(from_return),
        "from_call": latency_summary(from_call),
        "arrived_before_rpc_returned": before_return,
        "missed": dict(missed),
    }


async def phase_push(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    live = target.connected
    # Idle: every agent sits in read(); a final heartbeat's ack releases it.
    readers = [asyncio.create_task(a.read_until_ack(a.seq + 1)) for a in live]
    idle = await _push_series(target, "idle", args)
    for agent in live:
        await agent.send_heartbeat()
    await asyncio.gather(*readers, return_exceptions=True)

    # Loaded: the same while every agent heartbeats in a closed loop.
    control = LoopControl(measure_from=perf(), stop_at=math.inf)
    loops = [asyncio.create_task(heartbeat_loop(a, control)) for a in live]
    started = perf()
    loaded = await _push_series(target, "loaded", args)
    control.stop_at = perf()
    await asyncio.gather(*loops, return_exceptions=True)
    loaded["background_round_trips_per_s"] = len(control.latencies) / (control.stop_at - started)
    return {"idle": idle, "under_load": loaded}


async def run_phases(targets: Sequence[Target], args: argparse.Namespace) -> None:
    for target in targets:
        result = target.result
        if target.warmup_agents:
            # Warms both ends (connections, caches); these devices never connect.
            result["enroll_warmup"] = await phase_enroll(target, target.warmup_agents, args)
        _say(f"[{target.label}] enrolling {len(target.agents)} agents")
        result["enroll"] = await phase_enroll(target, target.agents, args)
        result["rss_mb_after_enroll"] = target.server.rss_mb()
        enrolled = [a for a in target.agents if a.credential]
        if not enrolled:
            raise RuntimeError(f"{target.label}: no agent enrolled: {result['enroll']['errors']}")

        _say(f"[{target.label}] connecting {len(enrolled)} Sync streams")
        result["connect"] = await phase_connect(enrolled, args)
        result["rss_mb_connected"] = target.server.rss_mb()
        target.connected = [a for a in enrolled if a.call is not None and a.desired_seen]
        if not target.connected:
            raise RuntimeError(f"{target.label}: no stream: {result['connect']['errors']}")
        result["idle_round_trip"] = await phase_idle_round_trips(
            target.connected[0], IDLE_ROUND_TRIPS
        )

    _say(f"heartbeats: {args.rounds} rounds of {args.warmup:g}+{args.seconds / args.rounds:g} s")
    await phase_sync(targets, args)

    for target in targets:
        target.result["rss_mb_after_sync"] = target.server.rss_mb()
        if target.is_control_plane and args.pushes > 0:
            _say(f"[{target.label}] {args.pushes} desired-state pushes, idle then under load")
            target.result["push"] = await phase_push(target, args)
        target.result["desired_states_received"] = sum(a.desired_seen for a in target.agents)
        target.result["unexpected_acks"] = sum(a.unexpected_acks for a in target.agents)
        target.result["rss_mb_end"] = target.server.rss_mb()


# ------------------------------------------------------------------ report


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
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def comparison(cp: dict[str, Any], echo: dict[str, Any]) -> dict[str, Any]:
    sync_ratio = _ratio(cp["sync"]["per_s"], echo["sync"]["per_s"])
    summary: dict[str, Any] = {
        "enroll_ratio": _ratio(cp["enroll"]["per_s"], echo["enroll"]["per_s"]),
        "sync_ratio": sync_ratio,
        "sync_ratio_goal": 0.80,
        "sync_ratio_met": sync_ratio >= 0.80,
        # Server CPU per round trip, echo / control plane: what the throughput
        # ratio would be with the server alone the bottleneck.
        "sync_cost_ratio": _ratio(
            echo["sync"]["server_cpu_us_per_round_trip"], cp["sync"]["server_cpu_us_per_round_trip"]
        ),
    }
    push = cp.get("push")
    if push:
        series = (push["idle"], push["under_load"])
        worst = max(s["from_return"]["max_ms"] for s in series)
        missed = sum(sum(s["missed"].values()) for s in series)
        summary["push_goal_ms"] = 1000
        summary["push_met"] = worst < 1000 and missed == 0
    return summary


def _fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, dict):  # error counts
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "0"
    if isinstance(value, list):  # per-block rates
        return f"{_fmt(min(value), 0)}-{_fmt(max(value), 0)}" if value else "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def table_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    cp, echo, cmp_ = results["control_plane"], results["echo"], results["comparison"]

    def row(
        label: str, path: Sequence[str], digits: int = 1, ratio: float | None = None
    ) -> tuple[str, str, str, str]:
        def get(result: dict[str, Any]) -> Any:
            value: Any = result
            for key in path:
                value = value.get(key, math.nan) if isinstance(value, dict) else math.nan
            return value

        return (
            label,
            _fmt(get(cp), digits),
            _fmt(get(echo), digits),
            "" if ratio is None else _fmt(ratio, 2),
        )

    rows = [
        row("enrollments/s", ["enroll", "per_s"], ratio=cmp_["enroll_ratio"]),
        row("enroll p50 ms", ["enroll", "latency", "p50_ms"]),
        row("enroll p99 ms", ["enroll", "latency", "p99_ms"]),
        row("enroll errors", ["enroll", "errors"]),
        row("server CPU ms / enroll", ["enroll", "server_cpu_ms_per_enroll"], 2),
        row("all streams connected s", ["connect", "all_connected_s"], 2),
        row("connect p99 ms", ["connect", "latency", "p99_ms"]),
        row("idle round trip p50 ms", ["idle_round_trip", "p50_ms"], 2),
        row("sync round trips/s", ["sync", "per_s"], 0, ratio=cmp_["sync_ratio"]),
        row("  per block (min-max)", ["sync", "block_per_s"]),
        row("round trip p50 ms", ["sync", "latency", "p50_ms"]),
        row("round trip p99 ms", ["sync", "latency", "p99_ms"]),
        row(
            "server CPU us / round trip",
            ["sync", "server_cpu_us_per_round_trip"],
            1,
            ratio=cmp_["sync_cost_ratio"],
        ),
        row("server CPU (cores)", ["sync", "server_cpu_cores"], 2),
        row("client CPU (cores)", ["sync", "client_cpu_cores"], 2),
        row("irq/softirq CPU (cores)", ["sync", "irq_cpu_cores"], 2),
        row("other processes CPU (cores)", ["sync", "other_cpu_cores"], 2),
        row("sync errors", ["sync", "errors"]),
        row("server RSS start MB", ["rss_mb_start"]),
        row("server RSS connected MB", ["rss_mb_connected"]),
        row("server RSS end MB", ["rss_mb_end"]),
    ]
    if "push" in cp:
        for mode, label in (("idle", "idle"), ("under_load", "loaded")):
            rows += [
                row(f"push {label} p50 ms", ["push", mode, "from_return", "p50_ms"]),
                row(f"push {label} p99 ms", ["push", mode, "from_return", "p99_ms"]),
                row(f"push {label} max ms", ["push", mode, "from_return", "max_ms"]),
                row(f"push {label} missed", ["push", mode, "missed"]),
            ]
    rows.append(row("clean shutdown", ["shutdown", "clean"]))
    return rows


def verdict(results: dict[str, Any]) -> list[str]:
    cmp_ = results["comparison"]
    met = {True: "met", False: "NOT met"}
    lines = [f"sync/echo = {_fmt(cmp_['sync_ratio'], 2)} (goal >= 0.80: "
             f"{met[cmp_['sync_ratio_met']]})"]  # fmt: skip
    if "push_met" in cmp_:
        lines.append(f"push < 1 s: {met[cmp_['push_met']]}")
    cores = results["machine"]["cores"] or 1
    other = max(results[t]["sync"]["other_cpu_cores"] for t in ("echo", "control_plane"))
    if other > 0.1 * cores:
        lines.append(f"WARNING: other processes used {other:.2f} cores during the sync phase")
    return lines


def print_report(results: dict[str, Any]) -> None:
    rows = table_rows(results)
    cp_name = "control plane" if results["control_plane"]["server"] != "echo" else "echo (as CP)"
    machine = results["machine"]
    title = (
        f"EdgeFleet sync benchmark: {results['args']['agents']} agents, "
        f"{results['args']['seconds']:g} s; {machine['cores']} x {machine['cpu_model']}, "
        f"Python {machine['python']}"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(r[0]) for r in rows)
        print(title)
        print(f"{'':{width}}  {cp_name:>14}  {'echo':>14}  {'CP/echo':>7}")
        for label, a, b, r in rows:
            print(f"{label:{width}}  {a:>14}  {b:>14}  {r:>7}")
        print("\n".join(verdict(results)))
        return
    table = Table(title=title)
    table.add_column("")
    table.add_column(cp_name, justify="right")
    table.add_column("echo", justify="right")
    table.add_column("CP/echo", justify="right")
    for cells in rows:
        table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print("\n".join(verdict(results)))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EdgeFleet enrollment + Sync benchmark")
    add = parser.add_argument
    add("--agents", type=int, default=1000)
    add("--seconds", type=float, default=20.0, help="measured heartbeat seconds per server")
    add("--rounds", type=int, default=8, help="blocks --seconds is cut into, run alternately")
    add("--warmup", type=float, default=0.5, help="uncounted seconds at the start of each block")
    add("--db", help="database URL for the control plane (default: SQLite in a temp data "
                     "dir); give it a throwaway database")  # fmt: skip
    add("--out", type=Path, help="write the JSON results here")
    add("--agents-per-channel", type=int, default=50)
    add("--concurrency", type=int, default=200, help="Enroll calls in flight")
    add("--enroll-warmup", type=int, default=100, help="uncounted enrollments before phase 1")
    add("--connect-concurrency", type=int, default=0,
        help="Sync connects in flight; 0: all at once (a reconnect storm)")  # fmt: skip
    add("--pushes", type=int, default=50, help="label updates per series; 0 skips the push phase")
    add("--push-timeout", type=float, default=5.0)
    add("--rpc-timeout", type=float, default=60.0)
    add("--startup-timeout", type=float, default=60.0)
    add("--seed", type=int, default=1)
    add("--edgefleet-cmd",
        help="command that runs the CLI, e.g. 'python -m edgefleet.controlplane.cli' (default: the "
        "edgefleet script of this environment); 'server' and its options are appended")  # fmt: skip
    add("--control-plane", choices=["edgefleet", "echo"], default="edgefleet",
        help="'echo' runs echo against echo, to test the harness")  # fmt: skip
    add("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if min(args.agents, args.agents_per_channel, args.concurrency, args.rounds) < 1:
        parser.error("--agents, --agents-per-channel, --concurrency and --rounds must be >= 1")
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    targets: list[Target] = []
    try:
        targets.append(await open_target("echo", "echo", args))
        targets.append(await open_target("control-plane", args.control_plane, args))
        await run_phases(targets, args)
    except BaseException:
        for target in targets:
            _say(f"[{target.label}] server log tail:\n{target.server.log_tail()}")
        raise
    finally:
        for target in targets:
            await close_target(target)
    echo, control_plane = (t.result for t in targets)
    return {
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "control_plane": control_plane,
        "echo": echo,
        "comparison": comparison(control_plane, echo),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
