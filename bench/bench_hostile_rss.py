"""Peak memory growth of a real control plane per hostile request (issue 18,
"Figures"): each hostile request next to a well-formed one of the same RPC,
sent to the same `edgefleet server` process in the same run. The goal is
under 50 MB of peak RSS growth per hostile request; the ratio printed is the
hostile request's growth to that goal.

Requests: a sample-data zip bomb (a small .npz declaring a huge float32
array), and an 8,000,000-character string in Enroll's hostname, a Sync
Hello's hostname, a device class's description and a telemetry sample's
model name (just under the 8 MiB message limit). The peak is the process's
VmHWM, reset to its RSS before each request (/proc/PID/clear_refs), so an
allocation freed again before the answer is still counted.

    python -m bench.bench_hostile_rss            # a 2.9 GiB bomb
    python -m bench.bench_hostile_rss --smoke    # a 0.3 GiB bomb (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from numpy.lib import format as npy_format
from onnx import TensorProto, helper

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from testkit.fuzzing import ServerMemory
from testkit.harness import ControlPlane

GOAL_BYTES = 50 * 1024 * 1024
HUGE = "x" * 8_000_000
MIB = 1 << 20


def _model(path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["y"])], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _bomb(path: Path, rows: int) -> None:
    """An .npz whose one member declares `rows` x 64 float32 zeros, written
    a MiB at a time (the array is never allocated)."""
    header = {"descr": "<f4", "fortran_order": False, "shape": (rows, 64)}
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("input.npy", "w", force_zip64=True) as member,
    ):
        npy_format.write_array_header_1_0(member, header)
        left, zeros = rows * 64 * 4, bytes(MIB)
        while left:
            member.write(zeros[: min(MIB, left)])
            left -= min(MIB, left)


def _push(name: str, model: bytes, samples: bytes) -> Iterator[o.PushModelRequest]:
    parts = {o.MODEL_PART_MODEL: model, o.MODEL_PART_SAMPLE_DATA: samples}
    yield o.PushModelRequest(header=o.PushModelHeader(
        model_name=name, version="1.0.0",
        parts=[o.PartDeclaration(part=k, size_bytes=len(v), sha256=hashlib.sha256(v).hexdigest())
               for k, v in parts.items()],
    ))  # fmt: skip
    for kind, data in parts.items():
        for start in range(0, len(data), MIB):
            chunk = o.PushModelChunk(part=kind, data=data[start : start + MIB])
            yield o.PushModelRequest(chunk=chunk)


def _sync(channel: grpc.Channel, credential: str, hostname: str) -> None:
    """One Sync stream: a Hello, the first answer (or the refusal)."""
    hello = d.AgentMessage(hello=d.Hello(hardware=c.HardwareProfile(hostname=hostname)))
    replies: Any = dg.DeviceServiceStub(channel).Sync(
        iter([hello]), metadata=bearer_metadata(credential), timeout=30
    )
    try:
        next(replies)
    finally:
        replies.cancel()


def run(work: Path, bomb_rows: int) -> dict[str, Any]:
    _model(work / "model.onnx")
    model = (work / "model.onnx").read_bytes()
    rng = np.random.default_rng(0)
    np.savez(work / "good.npz", input=rng.random((20, 64), np.float32))
    good_samples = (work / "good.npz").read_bytes()
    _bomb(work / "bomb.npz", bomb_rows)
    bomb = (work / "bomb.npz").read_bytes()

    cp = ControlPlane(work / "cp")
    cp.start()
    try:
        op = cp.operator()
        channel = cp.channel()
        dev = dg.DeviceServiceStub(channel)
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="bench")).secret
        device = dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id="bench-0"))
        memory = ServerMemory(cp.proc.pid)  # type: ignore[union-attr]
        counter = iter(range(1_000_000))

        def measured(call: Callable[[], object]) -> tuple[float, str]:
            before = memory.before_call()
            try:
                call()
                code = "OK"
            except grpc.RpcError as exc:
                failed: Any = exc  # a grpc.Call as well
                code = f"{failed.code().name}: {(failed.details() or '')[:120]}"
            return memory.growth(before) / MIB, code

        def enroll(hostname: str) -> Callable[[], object]:
            return lambda: dev.Enroll(d.EnrollRequest(
                enrollment_token=token, hardware_id=f"bench-{next(counter) + 1}",
                hardware=c.HardwareProfile(hostname=hostname)))  # fmt: skip

        def upload(model_name: str) -> Callable[[], object]:
            sample = d.TelemetrySample(seq=next(counter) + 1, model_name=model_name)
            sample.at.GetCurrentTime()
            return lambda: dev.UploadTelemetry(
                d.UploadTelemetryRequest(samples=[sample]),
                metadata=bearer_metadata(device.device_credential),
            )

        def described(description: str) -> Callable[[], object]:
            return lambda: op.CreateDeviceClass(o.CreateDeviceClassRequest(
                name=f"class-{next(counter)}", description=description,
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME)))  # fmt: skip

        cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "PushModel, sample-data zip bomb": (
                lambda: op.PushModel(_push(f"good-{next(counter)}", model, good_samples)),
                lambda: op.PushModel(_push(f"bomb-{next(counter)}", model, bomb)),
            ),
            "Enroll, 8 MB hostname": (enroll("pi-1"), enroll(HUGE)),
            "Sync Hello, 8 MB hostname": (
                lambda: _sync(channel, device.device_credential, "pi-1"),
                lambda: _sync(channel, device.device_credential, HUGE),
            ),
            "CreateDeviceClass, 8 MB description": (described("arm boards"), described(HUGE)),
            "UploadTelemetry, 8 MB model name": (upload("digits"), upload(HUGE)),
        }
        rows = []
        for name, (good, hostile) in cases.items():
            good_mb, good_code = measured(good)
            bad_mb, bad_code = measured(hostile)
            rows.append({
                "request": name, "well_formed_mb": round(good_mb, 1), "well_formed": good_code,
                "hostile_mb": round(bad_mb, 1), "hostile": bad_code,
                "ratio_to_goal": round(bad_mb * MIB / GOAL_BYTES, 3),
            })  # fmt: skip
        channel.close()
    finally:
        cp.close()
    return {
        "bomb_declared_gib": round(bomb_rows * 64 * 4 / (1 << 30), 2),
        "bomb_file_mb": round(len(bomb) / 1e6, 1),
        "goal_mb": GOAL_BYTES / MIB,
        "peak_tracked": memory.peaks,
        "requests": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 0.3 GiB bomb (CI)")
    args = parser.parse_args()
    rows = 1_200_000 if args.smoke else 12_000_000
    with tempfile.TemporaryDirectory(prefix="bench-hostile-rss-") as work:
        result = run(Path(work), rows)
    print(json.dumps(result, indent=2))
    worst = max(r["ratio_to_goal"] for r in result["requests"])
    print(f"worst hostile request: {worst:.3f} of the {GOAL_BYTES // MIB} MB goal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
