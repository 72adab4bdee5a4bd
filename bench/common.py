"""What the benchmarks that drive a real `edgefleet server` share: starting
it (and the bare echo server) as a subprocess, the two device classes and
two really built versions of the digits model, the fleetsim profile that
matches them, and psutil readings of a process tree.

Run the benchmarks that import this from the repository root as modules,
e.g. `python -m bench.bench_rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.sim import Fleet, FleetProfile, parse_profile
from edgefleet.sim.profiles import DEFAULT_PROFILE_DATA
from edgefleet.v1 import common_pb2, operator_pb2

T = TypeVar("T")

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # a throwaway server's token
MODEL = "digits"
# AssignModel takes at most this many devices per call (MAX_DEVICES_PER_CALL).
ASSIGN_BATCH = 1_000
# Device class -> the arch its match rule selects.
CLASSES = {"arm64-onnx": "aarch64", "x86-onnx": "x86_64"}
# The default profile's Raspberry Pis and x86 gateways (3:2): one kind of
# device per class above, each with its own install time.
PROFILE_CLASSES = ("pi", "gateway")
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"


def wait_for(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Poll `check` until it returns something; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def clean_env() -> dict[str, str]:
    # gRPC honours proxy variables, which would send loopback traffic away.
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def _read_port(path: Path) -> int | None:
    try:
        return int(path.read_text().strip()) or None
    except (OSError, ValueError):
        return None


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
    db: str | None,
    heartbeat_s: int,
    metrics_port: int | None = None,
    workers: int = 1,
) -> tuple[subprocess.Popen[bytes], str]:
    """`edgefleet server` with one build worker (and its Prometheus endpoint
    on `metrics_port`); (process, address). With `workers` > 1 the process
    is a supervisor of that many workers (the build worker is a worker's
    child), worker i serving its metrics on `metrics_port` + i."""
    data.mkdir(parents=True)
    port_file = data / "port"
    command = [
        str(BIN / "edgefleet"), "server", "--insecure", "--data-dir", str(data),
        "--listen", "127.0.0.1:0",
        "--port-file", str(port_file), "--admin-token", ADMIN_TOKEN, "--build-workers", "1",
        "--heartbeat-interval", str(heartbeat_s),
    ]  # fmt: skip
    if db:
        command += ["--db", db]
    if metrics_port:
        command += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
    if workers > 1:  # a single process needs no flag (and servers before --workers know none)
        command += ["--workers", str(workers)]
    with (data / "server.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    port = wait_for("the control plane to listen", lambda: _read_port(port_file), 120)
    return proc, f"127.0.0.1:{port}"


def start_echo_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench/echo_server.py, the bare grpc.aio baseline; (process, address)."""
    workdir.mkdir(parents=True)
    port_file = workdir / "port"
    command = [sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0",
               "--port-file", str(port_file)]  # fmt: skip
    with (workdir / "server.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    port = wait_for("the echo server to listen", lambda: _read_port(port_file), 60)
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


def push_model(op: Any, version: str, model: Path, sample_data: Path) -> None:
    """PushModel: the header, then each part in 1 MiB chunks."""
    parts = {
        operator_pb2.MODEL_PART_MODEL: model.read_bytes(),
        operator_pb2.MODEL_PART_SAMPLE_DATA: sample_data.read_bytes(),
    }
    header = operator_pb2.PushModelHeader(
        model_name=MODEL,
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


def setup(op: Any, root: Path) -> str:
    """Classes, both versions pushed and built; an enrollment token."""
    from edgefleet.demo.models import build_digits_classifier

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
    for seed, version in enumerate(("1.0.0", "2.0.0")):
        built = build_digits_classifier(root / version, seed=seed)
        push_model(op, version, built.model, built.sample_data)
    expected = len(CLASSES) * 2
    terminal = {operator_pb2.BUILD_STATE_SUCCEEDED, operator_pb2.BUILD_STATE_FAILED}

    def finished() -> list[Any] | None:
        builds = list(op.ListBuilds(operator_pb2.ListBuildsRequest()).builds)
        done = len(builds) >= expected and all(b.state in terminal for b in builds)
        return builds if done else None

    builds = wait_for("the builds", finished, 900)
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


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int, tree: bool) -> float:
    """User + system CPU seconds of `pid` (and its descendants with `tree`)."""
    total = 0.0
    for process in _tree(pid) if tree else _tree(pid)[:1]:
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
    for process in _tree(pid) if tree else _tree(pid)[:1]:
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


# --------------------------------------------------------------- /metrics


@dataclass(frozen=True)
class HistogramScrape:
    """One histogram (of one label set) as scraped: cumulative count per
    upper bound, and the sum of what was observed."""

    buckets: dict[float, float]
    total: float


def _metric_families(url: str) -> Iterable[Metric]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return text_string_to_metric_families(text)


def scrape_histograms(url: str, names: tuple[str, ...]) -> dict[str, HistogramScrape]:
    """The named histograms at `url` (a Prometheus text endpoint). A
    labelled one is named with its labels, as in the exposition:
    'edgefleet_gc_pause_seconds{generation="2"}'."""
    buckets: dict[str, dict[float, float]] = {}
    totals: dict[str, float] = {}
    for family in _metric_families(url):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            name = family.name + (
                "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                if labels else ""
            )  # fmt: skip
            if name not in names:
                continue
            if sample.name.endswith("_bucket"):
                buckets.setdefault(name, {})[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                totals[name] = sample.value
    return {n: HistogramScrape(b, totals.get(n, 0.0)) for n, b in buckets.items()}


def scrape_gauge(url: str, name: str) -> float | None:
    """An unlabelled gauge's value at `url` (a Prometheus text endpoint)."""
    for family in _metric_families(url):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None


def merge_histograms(scrapes: Sequence[dict[str, HistogramScrape]]) -> dict[str, HistogramScrape]:
    """The same histograms scraped from several processes (the workers) as
    one: per bound the counts add up, and so do the sums."""
    merged: dict[str, HistogramScrape] = {}
    for scrape in scrapes:
        for name, h in scrape.items():
            into = merged.get(name, HistogramScrape({}, 0.0))
            buckets = {b: into.buckets.get(b, 0.0) + h.buckets.get(b, 0.0)
                       for b in into.buckets.keys() | h.buckets.keys()}  # fmt: skip
            merged[name] = HistogramScrape(buckets, into.total + h.total)
    return merged


def histogram_summary(before: HistogramScrape, after: HistogramScrape) -> dict[str, float]:
    """What was observed between two scrapes: the count, the sum and, for
    p50, p99 and p99.9, the upper bound of the bucket the quantile falls in
    (a histogram knows no finer; inf: above the largest bound)."""
    bounds = sorted(after.buckets)
    counts = [after.buckets[b] - before.buckets.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    summary: dict[str, float] = {"count": total, "sum_s": after.total - before.total}
    for label, q in (("p50_le_s", 0.50), ("p99_le_s", 0.99), ("p999_le_s", 0.999)):
        summary[label] = next(
            (b for b, c in zip(bounds, counts, strict=True) if total and c >= q * total),
            math.nan,
        )
    return summary
