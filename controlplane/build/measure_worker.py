"""The child half of a measurement: `python -m controlplane.build.measure_worker DIR`.

Loads one candidate in a fresh process (so its memory is not mixed with the
build's or another candidate's), times it and records its outputs. DIR holds
the request written by controlplane.build.measure; the result is written
back beside it. Imports nothing of the control plane: only numpy and the
runtime adapters the agent itself serves with.

Files in DIR:
  request.json  {path, runtime, threads, runs, warmup, onnx_inputs, onnx_outputs}
  inputs.npz    one array per model input, leading sample axis
  result.json   {latencies_ms, baseline_rss_mb, peak_rss_mb, error}   (written here)
  outputs.npz   out_0..out_k: each output for every sample, stacked   (written here)
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from agent.runtimes import TensorInfo, open_runner

# The adapter module each runtime lives in: imported before the memory
# baseline is taken, so the runtime library's own code is not counted as the
# model's memory (every model on the device pays it once, model or not).
_RUNNER_MODULES = {
    "onnxruntime": "agent.runtimes.onnxruntime",
    "tflite": "agent.runtimes.litert",
    "tensorrt": "agent.runtimes.tensorrt",
}
MIB = 1024 * 1024


def _status_mib(field: str) -> float | None:
    """A VmRSS/VmHWM line of /proc/self/status in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB  # the value is in kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the
    current RSS, so the peak read later covers only what follows. Linux
    only; False when unavailable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_mib(reset_ok: bool) -> float:
    hwm = _status_mib("VmHWM") if reset_ok else None
    if hwm is not None:
        return hwm
    # Fallback: the lifetime peak. ru_maxrss is kB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB


def _current_mib() -> float:
    rss = _status_mib("VmRSS")
    if rss is not None:
        return rss
    return _peak_mib(False)


def _specs(raw: list[dict[str, Any]] | None) -> list[TensorInfo] | None:
    if raw is None:
        return None
    return [TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in raw]


def run(directory: Path) -> dict[str, Any]:
    request = json.loads((directory / "request.json").read_text())
    with np.load(directory / "inputs.npz", allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    count = int(next(iter(arrays.values())).shape[0])
    samples = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)]
    module = _RUNNER_MODULES.get(request["runtime"])
    if module is not None:
        importlib.import_module(module)

    baseline = _current_mib()
    reset_ok = _reset_peak()
    runner = open_runner(
        Path(request["path"]),
        request["runtime"],
        threads=int(request["threads"]),
        onnx_inputs=_specs(request.get("onnx_inputs")),
        onnx_outputs=_specs(request.get("onnx_outputs")),
    )
    for i in range(int(request["warmup"])):
        runner.run(samples[i % count])
    latencies: list[float] = []
    for i in range(int(request["runs"])):
        feed = samples[i % count]
        start = time.perf_counter()
        runner.run(feed)
        latencies.append((time.perf_counter() - start) * 1000.0)
    # Peak is read before collecting every sample's outputs: holding those
    # is the measurement's cost, not the model's.
    peak = _peak_mib(reset_ok)

    per_sample = [runner.run(feed) for feed in samples]
    outputs = {
        f"out_{k}": np.stack([np.asarray(outs[k]) for outs in per_sample])
        for k in range(len(per_sample[0]))
    }
    np.savez(directory / "outputs.npz", **outputs)  # type: ignore[arg-type]
    return {"latencies_ms": latencies, "baseline_rss_mb": baseline, "peak_rss_mb": peak}


def main(argv: list[str]) -> int:
    directory = Path(argv[1])
    try:
        result = run(directory)
    except Exception as exc:  # reported to the parent as the candidate's error
        last = traceback.format_exception_only(exc)[-1].strip()
        result = {"error": last}
    (directory / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
