"""Build-matrix benchmark: a real pretrained model built for four device classes.

Pushes PP-OCR's text-direction classifier (MobileNetV3, from the
rapidocr-onnxruntime wheel on PyPI) with 32 rendered text-line samples to a
real control plane (`edgefleet server` as a subprocess on 127.0.0.1:0, in a
temp data dir) that has four device classes:

* gateway (onnxruntime, auto, p95 budget 20 ms);
* pi (tflite, auto);
* mcu (tflite, microcontroller, int8);
* jetson (tensorrt, auto, jetson accelerator).

The push queues one build per class; the server's --build-workers worker
processes run them. The benchmark polls ListBuilds until every build is
terminal and reports, per class, every measured candidate (size, latency
p50/p95, peak memory, agreement with fp32, verdict), the chosen one, each
build's time, and the wall time of the whole matrix (push -> last build
finished). See docs/benchmarks.md.

    python -m bench.bench_builds                          # 1 build worker
    python -m bench.bench_builds --workers 2 --out results.json
    python -m bench.bench_builds --model cls.onnx         # skip the wheel download
    python -m bench.bench_builds --min-retention 0.95     # every class keeps 95% agreement
    python -m bench.bench_builds --smoke                  # CI: the matrix on 4 samples

(from the repository root: the server starts as bench/common.py starts it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from google.protobuf import timestamp_pb2

from bench.common import ADMIN_TOKEN, edgefleet_command, read_port, server_command
from bench.jsonout import write_results
from edgefleet.controlplane.client.connection import CHANNEL_OPTIONS, bearer_metadata
from edgefleet.demo.models import (
    RAPIDOCR_WHEEL,
    ModelUnavailable,
    fetch_ppocr_cls,
    render_text_lines,
)
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc

MODEL_NAME = "ppocr-cls"
MODEL_VERSION = "2.0.0"
CHUNK = 1 << 20
# --smoke: the run CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; the whole matrix on 4 samples, two builds at a time
# (about half the wait). Figures meaningless.
SMOKE = {"samples": 4, "workers": 2, "timeout": 300.0}
TERMINAL = (o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED, o.BUILD_STATE_CANCELLED)
STATE_NAMES = {
    o.BUILD_STATE_QUEUED: "queued",
    o.BUILD_STATE_RUNNING: "running",
    o.BUILD_STATE_SUCCEEDED: "succeeded",
    o.BUILD_STATE_FAILED: "failed",
    o.BUILD_STATE_CANCELLED: "cancelled",
}
QUANT_NAMES = {
    c.QUANTIZATION_FP32: "fp32",
    c.QUANTIZATION_FP16: "fp16",
    c.QUANTIZATION_INT8: "int8",
    c.QUANTIZATION_AUTO: "auto",
}
RUNTIME_NAMES = {
    c.RUNTIME_ONNXRUNTIME: "onnxruntime",
    c.RUNTIME_TFLITE: "tflite",
    c.RUNTIME_TENSORRT: "tensorrt",
}

perf = time.perf_counter
Parts = dict["o.ModelPart.ValueType", bytes]


@dataclass(frozen=True)
class ClassDef:
    name: str
    description: str
    constraints: c.ConstraintProfile
    rules: tuple[c.MatchRule, ...]


def _rule(field: str, value: str) -> c.MatchRule:
    return c.MatchRule(field=field, op=c.MATCH_OP_EQ, values=[value])


def device_classes(latency_budget_ms: float, min_retention: float | None) -> list[ClassDef]:
    """The matrix: one class per runtime, and a microcontroller class; with
    `min_retention`, every class also asks for that share of fp32's agreement."""
    classes = [
        ClassDef(
            "gateway", "x86 gateways, ONNX Runtime on the CPU",
            c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME, quantization=c.QUANTIZATION_AUTO,
                                latency_budget_p95_ms=latency_budget_ms),
            (_rule("arch", "x86_64"),),
        ),
        ClassDef(
            "pi", "Raspberry Pis, LiteRT",
            c.ConstraintProfile(runtime=c.RUNTIME_TFLITE, quantization=c.QUANTIZATION_AUTO),
            (_rule("arch", "aarch64"),),
        ),
        ClassDef(
            "mcu", "Cortex-M boards, TensorFlow Lite Micro",
            c.ConstraintProfile(runtime=c.RUNTIME_TFLITE, quantization=c.QUANTIZATION_INT8,
                                microcontroller=True),
            (_rule("label.board", "mcu"),),
        ),
        ClassDef(
            "jetson", "Jetsons, TensorRT",
            c.ConstraintProfile(runtime=c.RUNTIME_TENSORRT, quantization=c.QUANTIZATION_AUTO,
                                accelerator="jetson"),
            (_rule("accelerator", "jetson"),),
        ),
    ]  # fmt: skip
    if min_retention is not None:
        for cls in classes:
            cls.constraints.min_accuracy_retention = min_retention
    return classes


# ------------------------------------------------------------------ inputs


def fetch_model(root: Path) -> Path:
    """PP-OCR's mobile direction classifier from the rapidocr-onnxruntime wheel."""
    try:
        return fetch_ppocr_cls(root)
    except ModelUnavailable as exc:
        raise SystemExit(str(exc)) from None


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    address: str = ""

    def cpu_s(self) -> float:
        """CPU seconds of the server and its build workers (and their children)."""
        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return total
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        return total

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, limit_s: float = 30.0) -> dict[str, Any]:
        """SIGTERM, wait, and only then SIGKILL."""
        started = perf()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(limit_s)
            clean = code == 0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            clean = False
        return {"exit_code": code, "stop_s": perf() - started, "clean": clean}


def start_server(workdir: Path, args: argparse.Namespace) -> Server:
    (workdir / "data").mkdir()
    log_path = workdir / "server.log"
    port_file = workdir / "port"
    command = server_command(
        workdir / "data", port_file, build_workers=args.workers, edgefleet_cmd=args.edgefleet_cmd
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C here must not kill it before we stop it
        )  # fmt: skip
    server = Server(proc=proc, workdir=workdir, log_path=log_path)
    deadline = perf() + args.startup_timeout
    while perf() < deadline and proc.poll() is None:
        port = read_port(port_file)
        if port:
            server.address = f"127.0.0.1:{port}"
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"the server did not start ({shlex.join(command)}):\n{server.log_tail()}")


# ------------------------------------------------------------------ the matrix


def push_requests(parts: Parts) -> Iterator[o.PushModelRequest]:
    header = o.PushModelHeader(
        model_name=MODEL_NAME,
        version=MODEL_VERSION,
        description="PP-OCR mobile v2.0 text-direction classifier (rapidocr-onnxruntime 1.4.4)",
        parts=[
            o.PartDeclaration(part=p, size_bytes=len(d), sha256=hashlib.sha256(d).hexdigest())
            for p, d in parts.items()
        ],
    )
    yield o.PushModelRequest(header=header)
    for part, data in parts.items():
        for start in range(0, len(data), CHUNK):
            chunk = o.PushModelChunk(part=part, data=data[start : start + CHUNK])
            yield o.PushModelRequest(chunk=chunk)


def _seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9 if ts.seconds or ts.nanos else math.nan


def candidate_record(cand: o.BuildCandidate) -> dict[str, Any]:
    return {
        "name": cand.name,
        "quantization": QUANT_NAMES.get(cand.quantization, str(cand.quantization)),
        "runtime": RUNTIME_NAMES.get(cand.runtime, str(cand.runtime)),
        "size_bytes": cand.size_bytes,
        "latency_p50_ms": cand.latency_p50_ms,
        "latency_p95_ms": cand.latency_p95_ms,
        "peak_memory_mb": cand.peak_memory_mb,
        "agreement": cand.agreement,
        "accuracy": cand.accuracy if cand.HasField("accuracy") else None,
        "max_abs_diff": cand.max_abs_diff,
        "passed": cand.passed,
        "chosen": cand.chosen,
        "reasons": list(cand.reasons),
        "error": cand.error,
    }


def build_record(build: o.Build, pushed_at: float, cls: ClassDef) -> dict[str, Any]:
    created, started, finished = (
        _seconds(build.created_at), _seconds(build.started_at), _seconds(build.finished_at)
    )  # fmt: skip
    chosen = next((cand.name for cand in build.candidates if cand.chosen), None)
    return {
        "class": build.class_name,
        "description": cls.description,
        "runtime": RUNTIME_NAMES.get(cls.constraints.runtime, "?"),
        "quantization": QUANT_NAMES.get(cls.constraints.quantization, "?"),
        "constraints": _constraints(cls.constraints),
        "id": build.id,
        "state": STATE_NAMES.get(build.state, str(build.state)),
        "error": build.error,
        "duration_s": build.duration_s,
        "queued_s": started - created,
        "push_to_finished_s": finished - pushed_at,
        "chosen": chosen,
        "artifact_digest": build.artifact_digest,
        "artifact_size": build.artifact_size,
        "candidates": [candidate_record(cand) for cand in build.candidates],
        "log": build.log,
    }


def _constraints(profile: c.ConstraintProfile) -> str:
    parts = [RUNTIME_NAMES.get(profile.runtime, "?"), QUANT_NAMES.get(profile.quantization, "?")]
    if profile.HasField("latency_budget_p95_ms"):
        parts.append(f"p95 <= {profile.latency_budget_p95_ms:g} ms")
    if profile.HasField("max_model_size_mb"):
        parts.append(f"size <= {profile.max_model_size_mb:g} MB")
    if profile.HasField("min_accuracy_retention"):
        parts.append(f"retention >= {profile.min_accuracy_retention:g}")
    if profile.accelerator:
        parts.append(profile.accelerator)
    if profile.microcontroller:
        parts.append("microcontroller")
    return ", ".join(parts)


def _system_busy_s() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def run_matrix(
    stub: operator_pb2_grpc.OperatorServiceStub,
    server: Server,
    parts: Parts,
    classes: Sequence[ClassDef],
    args: argparse.Namespace,
) -> dict[str, Any]:
    metadata = bearer_metadata(ADMIN_TOKEN)
    for cls in classes:
        stub.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=cls.name, description=cls.description,
                constraints=cls.constraints, match_rules=list(cls.rules),
            ),
            metadata=metadata, timeout=args.rpc_timeout,
        )  # fmt: skip
    _say(f"classes: {', '.join(cls.name for cls in classes)}; pushing {MODEL_NAME}")

    busy0, server_cpu0, own0 = _system_busy_s(), server.cpu_s(), time.process_time()
    pushed_wall, pushed = time.time(), perf()
    version = stub.PushModel(push_requests(parts), metadata=metadata, timeout=args.rpc_timeout)
    push_s = perf() - pushed

    builds: list[o.Build] = []
    last_states: dict[str, str] = {}
    deadline = pushed + args.timeout
    done_seen = math.nan
    while True:
        request = o.ListBuildsRequest(model_name=MODEL_NAME, model_version=MODEL_VERSION)
        builds = list(stub.ListBuilds(request, metadata=metadata, timeout=args.rpc_timeout).builds)
        states = {b.class_name: STATE_NAMES.get(b.state, "?") for b in builds}
        if states != last_states:
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(states.items()))
            _say(f"[{perf() - pushed:6.1f}s] {summary}")
            last_states = states
        if len(builds) >= len(classes) and all(b.state in TERMINAL for b in builds):
            done_seen = perf() - pushed
            break
        if perf() > deadline:
            raise RuntimeError(f"builds not finished after {args.timeout:g} s: {states}")
        if server.proc.poll() is not None:
            raise RuntimeError(f"the server exited ({server.proc.returncode})")
        time.sleep(args.poll)

    busy = _system_busy_s() - busy0
    server_cpu = server.cpu_s() - server_cpu0
    own = time.process_time() - own0
    by_name = {cls.name: cls for cls in classes}
    records = [build_record(b, pushed_wall, by_name[b.class_name]) for b in builds]
    records.sort(key=lambda r: [cls.name for cls in classes].index(r["class"]))
    last_finished = max(r["push_to_finished_s"] for r in records)
    return {
        "model": {
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "size_bytes": len(parts[o.MODEL_PART_MODEL]),
            "sha256": version.sha256,
            "inputs": [(t.name, t.dtype, list(t.shape)) for t in version.inputs],
            "outputs": [(t.name, t.dtype, list(t.shape)) for t in version.outputs],
            "samples": version.sample_data.num_samples,
        },
        "push_s": push_s,
        "matrix_wall_s": last_finished,  # push -> last build's finished_at
        "matrix_seen_s": done_seen,  # push -> this poll saw them all terminal
        "build_seconds_total": sum(r["duration_s"] for r in records),
        "cpu": {
            "server_and_workers_cores": server_cpu / done_seen,
            "other_processes_cores": max(0.0, busy - server_cpu - own) / done_seen,
            "load_avg_end": list(os.getloadavg()),
        },
        "builds": records,
    }


# ------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_int8")
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cpu_flags": [f for f in wanted if f in flags],
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()),
    }


def toolchains(args: argparse.Namespace) -> dict[str, Any]:
    """`edgefleet toolchain ls --json`, trimmed to the versions that matter."""
    command = [*edgefleet_command(args.edgefleet_cmd), "toolchain", "ls", "--json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    try:
        listed = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": (proc.stderr or proc.stdout).strip()[-300:]}
    keep = ("onnx2tf", "tensorflow", "tf-keras", "ai-edge-litert", "onnx", "onnxruntime")
    return {
        name: {
            "key": entry.get("key", ""),
            "versions": {k: v for k, v in entry.get("versions", {}).items() if k in keep},
        }
        for name, entry in listed.items()
    }


def host_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("onnxruntime", "onnx", "onnxconverter-common", "numpy", "grpcio"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _verdict(cand: dict[str, Any], runtime: str) -> str:
    if cand["error"]:
        return "not built: " + str(cand["error"]).splitlines()[0]
    text = "CHOSEN" if cand["chosen"] else ("passes" if cand["passed"] else "fails")
    if cand["reasons"]:
        text += ": " + "; ".join(cand["reasons"])
    if runtime == "tensorrt":
        text += " (ORT CPU proxy)"
    return text


def _ms(value: float) -> str:
    return f"{value:.2f}" if value > 0 else "-"


def candidate_rows(build: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for cand in build["candidates"]:
        built = not cand["error"]
        rows.append(
            (
                cand["name"],
                f"{cand['size_bytes'] / 1024:,.1f}" if built and cand["size_bytes"] else "-",
                _ms(cand["latency_p50_ms"]) if built else "-",
                _ms(cand["latency_p95_ms"]) if built else "-",
                f"{cand['peak_memory_mb']:.1f}" if built else "-",
                f"{cand['agreement'] * 100:.1f}" if built else "-",
                _verdict(cand, build["runtime"]),
            )
        )
    return rows


HEADERS = ("candidate", "size KiB", "p50 ms", "p95 ms", "mem MB", "agree %", "verdict")


def summary_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for build in results["matrix"]["builds"]:
        rows.append(
            (
                build["class"],
                build["constraints"],
                build["state"],
                build["chosen"] or "-",
                f"{build['duration_s']:.1f}",
                f"{build['queued_s']:.1f}",
                f"{build['push_to_finished_s']:.1f}",
            )
        )
    return rows


SUMMARY_HEADERS = ("class", "constraints", "state", "chosen", "build s", "queued s", "push->done s")


def print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, shutil.get_terminal_size().columns))
    machine, matrix = results["machine"], results["matrix"]
    for build in matrix["builds"]:
        table = Table(
            title=f"{build['class']} ({build['constraints']}): {build['state']}, "
            f"chose {build['chosen'] or 'nothing'}, build {build['duration_s']:.1f} s"
        )
        for i, header in enumerate(HEADERS):
            table.add_column(header, justify="left" if i in (0, 6) else "right")
        for row in candidate_rows(build):
            table.add_row(*row)
        console.print(table)
        if build["error"]:
            console.print(f"[red]build error:[/red] {build['error']}")
    table = Table(
        title=f"Build matrix: {matrix['model']['name']} {matrix['model']['version']} "
        f"({matrix['model']['size_bytes'] / 1024:,.0f} KiB), {results['args']['workers']} "
        f"build worker(s); {machine['cores']} x {machine['cpu_model']}, "
        f"Python {machine['python']}"
    )
    for i, header in enumerate(SUMMARY_HEADERS):
        table.add_column(header, justify="left" if i < 4 else "right")
    for row in summary_rows(results):
        table.add_row(*row)
    console.print(table)
    cpu = matrix["cpu"]
    console.print(
        f"matrix wall time (push -> last build finished): {matrix['matrix_wall_s']:.1f} s; "
        f"sum of build times {matrix['build_seconds_total']:.1f} s; push {matrix['push_s']:.2f} s\n"
        f"CPU during the matrix: server + workers {cpu['server_and_workers_cores']:.2f} cores, "
        f"other processes {cpu['other_processes_cores']:.2f} cores "
        f"(of {machine['cores']}); shutdown clean: {results['shutdown']['clean']}"
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="EdgeFleet build-matrix benchmark")
    add = parser.add_argument
    add("--out", type=Path, help="write the JSON results (with every build's log) here")
    add("--workers", type=int, default=1, help="the server's --build-workers")
    add("--model", type=Path, help=f"the ONNX model (default: the classifier in {RAPIDOCR_WHEEL})")
    add("--samples", type=int, default=32, help="rendered text-line samples pushed with it")
    add("--latency-budget-ms", type=float, default=20.0, help="the gateway class's p95 budget")
    add("--min-retention", type=float,
        help="also give every class this min_accuracy_retention (default: none, as the "
        "classes' constraints leave it)")  # fmt: skip
    add("--timeout", type=float, default=900.0, help="seconds the whole matrix may take")
    add("--poll", type=float, default=0.25, help="seconds between ListBuilds polls")
    add("--rpc-timeout", type=float, default=60.0)
    add("--startup-timeout", type=float, default=60.0)
    add("--edgefleet-cmd",
        help="command that runs the CLI, e.g. 'python -m edgefleet.controlplane.cli' (default: the "
        "edgefleet script of this environment)")  # fmt: skip
    add("--smoke", action="store_true", help="CI's short run (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.workers < 1 or args.samples < 1:
        parser.error("--workers and --samples must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-builds-"))
    server: Server | None = None
    try:
        if args.model:
            model = args.model
        else:
            _say(f"downloading {RAPIDOCR_WHEEL} (pip download --no-deps)")
            (tmp / "wheel").mkdir()
            model = fetch_model(tmp / "wheel")
        samples = tmp / "samples.npz"
        np.savez(samples, x=render_text_lines(args.samples))
        parts: Parts = {
            o.MODEL_PART_MODEL: model.read_bytes(),
            o.MODEL_PART_SAMPLE_DATA: samples.read_bytes(),
        }
        info = {"machine": machine_info(), "toolchains": toolchains(args),
                "host_packages": host_versions()}  # fmt: skip
        (tmp / "cp").mkdir()
        server = start_server(tmp / "cp", args)
        _say(f"control plane on {server.address}, {args.workers} build worker(s)")
        channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=args.rpc_timeout)
            stub = operator_pb2_grpc.OperatorServiceStub(channel)
            matrix = run_matrix(
                stub,
                server,
                parts,
                device_classes(args.latency_budget_ms, args.min_retention),
                args,
            )
        finally:
            channel.close()
        shutdown = server.stop()
        server = None
        return {
            "date": started.date().isoformat(),
            "started_at": started.isoformat(timespec="seconds"),
            **info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "matrix": matrix,
            "shutdown": shutdown,
        }
    except BaseException:
        if server is not None:
            _say(f"server log tail:\n{server.log_tail()}")
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = perf()
    results = run(args)
    results["total_s"] = perf() - started
    print_report(results)
    if args.out:
        write_results(args.out, results)
        _say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
