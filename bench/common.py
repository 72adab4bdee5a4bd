"""What the benchmarks that drive a real `edgefleet server` share: the one
way to start it (server_command, start_control_plane; and the bare echo
server) as a subprocess, the two device classes and
two really built versions of the digits model, the fleetsim profile that
matches them, and psutil readings of a process tree.

Run the benchmarks that import this from the repository root as modules,
e.g. `python -m bench.bench_rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from edgefleet.polling import wait_for
from edgefleet.sim import Fleet, FleetProfile, parse_profile
from edgefleet.sim.profiles import DEFAULT_PROFILE_DATA
from edgefleet.v1 import common_pb2, operator_pb2

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # a throwaway server's token
MODEL = "digits"
# The model every device also holds in bench_rollout's two-model rollout.
SECOND_MODEL = "digits-cnn"
# AssignModel takes at most this many devices per call (MAX_DEVICES_PER_CALL).
ASSIGN_BATCH = 1_000
# Device class -> the arch its match rule selects.
CLASSES = {"arm64-onnx": "aarch64", "x86-onnx": "x86_64"}
# The default profile's Raspberry Pis and x86 gateways (3:2): one kind of
# device per class above, each with its own install time.
PROFILE_CLASSES = ("pi", "gateway")
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"


def clean_env() -> dict[str, str]:
    # gRPC honours proxy variables, which would send loopback traffic away.
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def read_port(path: Path) -> int | None:
    """The port a server wrote to its port file; None until it has."""
    try:
        return int(path.read_text().strip()) or None
    except (OSError, ValueError):
        return None


def edgefleet_command(override: str | None = None) -> list[str]:
    """How to run `edgefleet`: `override` (a shell-quoted command, e.g. an
    older build to compare with), else the one beside this Python, else the
    one on PATH."""
    if override:
        return shlex.split(override)
    beside = BIN / "edgefleet"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("edgefleet")
    if found is None:
        raise SystemExit("edgefleet: command not found (install the project: pip install -e .)")
    return [found]


def server_command(
    data: Path,
    port_file: Path,
    *,
    build_workers: int = 1,
    heartbeat_s: int | None = None,
    db: str | None = None,
    metrics_port: int | None = None,
    workers: int = 1,
    edgefleet_cmd: str | None = None,
) -> list[str]:
    """`edgefleet server` as every benchmark runs it: plain text (as the
    baselines it is compared with) on a loopback port the OS picks, written
    to `port_file`, with a throwaway admin token (ADMIN_TOKEN)."""
    command = [
        *edgefleet_command(edgefleet_cmd), "server", "--insecure", "--data-dir", str(data),
        "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        "--admin-token", ADMIN_TOKEN, "--build-workers", str(build_workers),
    ]  # fmt: skip
    if heartbeat_s is not None:
        command += ["--heartbeat-interval", str(heartbeat_s)]
    if db:
        command += ["--db", db]
    if metrics_port:
        command += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    if workers > 1:  # a single process needs no flag (and servers before --workers know none)
        command += ["--workers", str(workers)]
    return command


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A loopback port nothing listens on now (for the metrics endpoint);
    with `count`, the first of that many free in a row (one per worker)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + count <= 65536 and all(map(_bindable, range(port + 1, port + count))):
            return port


def start_control_plane(
    data: Path,
    db: str | None = None,
    heartbeat_s: int | None = None,
    metrics_port: int | None = None,
    workers: int = 1,
    *,
    build_workers: int = 1,
    edgefleet_cmd: str | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """server_command in `data` (its log in data/server.log), with
    `build_workers` build workers (and its Prometheus endpoint on
    `metrics_port`); (process, address) once it listens. With `workers` > 1
    the process is a supervisor of that many workers (the build workers are
    a worker's children), worker i serving its metrics on `metrics_port` + i.
    `edgefleet_cmd`: another `edgefleet` to run (see edgefleet_command)."""
    data.mkdir(parents=True)
    port_file = data / "port"
    command = server_command(
        data, port_file, build_workers=build_workers, heartbeat_s=heartbeat_s, db=db,
        metrics_port=metrics_port, workers=workers, edgefleet_cmd=edgefleet_cmd,
    )  # fmt: skip
    with (data / "server.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    port = wait_for(lambda: read_port(port_file), 120, what="the control plane to listen")
    return proc, f"127.0.0.1:{port}"


def start_echo_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench/echo_server.py, the bare grpc.aio baseline; (process, address)."""
    workdir.mkdir(parents=True)
    port_file = workdir / "port"
    command = [sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0",
               "--port-file", str(port_file)]  # fmt: skip
    with (workdir / "server.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    port = wait_for(lambda: read_port(port_file), 60, what="the echo server to listen")
    return proc, f"127.0.0.1:{port}"


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM, and SIGKILL only if it has not exited within `grace_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(data: Path, lines: int = 40) -> str:
    try:
        return "\n".join((data / "server.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def healthy(op: Any) -> bool:
    """The control plane answers an operator call."""
    try:
        op.ListDevices(operator_pb2.ListDevicesRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True


def push_model(
    op: Any, version: str, model: Path, sample_data: Path, model_name: str = MODEL
) -> None:
    """PushModel: the header, then each part in 1 MiB chunks."""
    parts = {
        operator_pb2.MODEL_PART_MODEL: model.read_bytes(),
        operator_pb2.MODEL_PART_SAMPLE_DATA: sample_data.read_bytes(),
    }
    header = operator_pb2.PushModelHeader(
        model_name=model_name,
        version=version,
        parts=[
            operator_pb2.PartDeclaration(
                part=part, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
            for part, data in parts.items()
        ],
    )

    def requests() -> Iterator[operator_pb2.PushModelRequest]:
        yield operator_pb2.PushModelRequest(header=header)
        for part, data in parts.items():
            for start in range(0, len(data), 1 << 20):
                chunk = operator_pb2.PushModelChunk(part=part, data=data[start : start + (1 << 20)])
                yield operator_pb2.PushModelRequest(chunk=chunk)

    op.PushModel(requests())


def setup(op: Any, root: Path, *, second_model: bool = False) -> str:
    """Classes, both versions pushed and built; an enrollment token. With
    `second_model`, also 3.0.0, 4.0.0 and SECOND_MODEL 1.0.0 (a second model
    for every device to hold while MODEL rolls out 3.0.0; 4.0.0 rolls out
    after it is removed again)."""
    from edgefleet.demo.models import build_digits_classifier, build_small_cnn

    for name, arch in CLASSES.items():
        op.CreateDeviceClass(
            operator_pb2.CreateDeviceClassRequest(
                name=name,
                constraints=common_pb2.ConstraintProfile(runtime=common_pb2.RUNTIME_ONNXRUNTIME),
                match_rules=[
                    common_pb2.MatchRule(field="arch", op=common_pb2.MATCH_OP_EQ, values=[arch])
                ],
            )
        )
    versions = ("1.0.0", "2.0.0", "3.0.0", "4.0.0") if second_model else ("1.0.0", "2.0.0")
    for seed, version in enumerate(versions):
        built = build_digits_classifier(root / version, seed=seed)
        push_model(op, version, built.model, built.sample_data)
    if second_model:
        cnn = build_small_cnn(root / SECOND_MODEL)
        push_model(op, "1.0.0", cnn.model, cnn.sample_data, model_name=SECOND_MODEL)
    expected = len(CLASSES) * (len(versions) + second_model)
    terminal = {operator_pb2.BUILD_STATE_SUCCEEDED, operator_pb2.BUILD_STATE_FAILED}

    def finished() -> list[Any] | None:
        builds = list(op.ListBuilds(operator_pb2.ListBuildsRequest()).builds)
        done = len(builds) >= expected and all(b.state in terminal for b in builds)
        return builds if done else None

    builds = wait_for(finished, 900, what="the builds", interval=0.5)
    failed = [b for b in builds if b.state != operator_pb2.BUILD_STATE_SUCCEEDED]
    if failed:
        raise SystemExit(f"{len(failed)} build(s) failed: {failed[0].error}")
    request = operator_pb2.CreateEnrollmentTokenRequest(name="bench-rollout")
    return str(op.CreateEnrollmentToken(request).secret)


def make_profile(heartbeat_s: float, telemetry_s: float) -> FleetProfile:
    classes = [c for c in DEFAULT_PROFILE_DATA["classes"] if c["name"] in PROFILE_CLASSES]
    return parse_profile(
        {"heartbeat_interval_s": heartbeat_s, "telemetry_interval_s": telemetry_s,
         "classes": classes}
    )  # fmt: skip


# ------------------------------------------------------------------ resources


def _tree(pid: int, tree: bool = True) -> list[psutil.Process]:
    """`pid` and, with `tree`, its descendants. Only ask for the tree when
    it is wanted: finding children reads every process's /proc entry, and
    this runs twice a second in the process that is the fleet."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)] if tree else [root]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int, tree: bool) -> float:
    """User + system CPU seconds of `pid` (and its descendants with `tree`)."""
    total = 0.0
    for process in _tree(pid, tree):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


# multiprocessing's own helpers: children of a process that uses it, but no
# control-plane worker.
_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def worker_pids(supervisor: int) -> list[int]:
    """The control-plane workers of `edgefleet server --workers N`: its
    supervisor's direct children (their build workers are theirs, not its)."""
    try:
        children = psutil.Process(supervisor).children()
    except psutil.NoSuchProcess:
        return []
    pids = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not any(h in " ".join(child.cmdline()) for h in _MP_HELPERS):
                pids.append(child.pid)
    return pids


def rss_bytes(pid: int, tree: bool) -> float:
    total = 0.0
    for process in _tree(pid, tree):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


class Progress:
    """Prints a line every few seconds while a phase runs (the fleet's
    connections or updates), so a long run shows it is moving."""

    def __init__(self, fleet: Fleet, every_s: float = 5.0) -> None:
        self.fleet = fleet
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self, what: str, line: Callable[[Fleet], str]) -> None:
        self.stop()
        self.t0 = time.monotonic()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.every_s)
                print(f"  [{time.monotonic() - self.t0:6.1f} s] {what}: {line(self.fleet)}",
                      flush=True)  # fmt: skip

        self._task = asyncio.create_task(loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def every_device_on(fleet: Fleet, version: str) -> bool:
    """Every agent of `fleet` runs `version`, committed."""
    return all(a.active_version == version and a.update_state == "committed" for a in fleet.agents)


async def enroll(fleet: Fleet, timeout_s: float, progress: Progress) -> float:
    """Start the fleet, printing progress; seconds until every agent held
    its Sync stream."""
    t0 = time.monotonic()
    progress.start("enrolled/connected", lambda f: (
        f"{sum(bool(a.device_id) for a in f.agents)} enrolled, "
        f"{sum(a.connects > 0 for a in f.agents)} connected of {len(f.agents)}"
    ))  # fmt: skip
    await fleet.start(wait=False)
    try:
        await fleet.wait_connected(timeout_s)
    finally:
        progress.stop()
    return time.monotonic() - t0
