"""Measuring a model in a fresh child process: its outputs on given inputs,
its latency and the memory it adds. The build host measures every candidate
this way (controlplane.build.measure) and a device validates an artifact
this way before activating it (agent.update.validate), through the same
runtime adapters the agent serves with, so a build's numbers and a device's
check mean the same thing. The child process keeps a runtime that crashes,
hangs or leaks away from the caller, and a model's memory unmixed with the
caller's or another model's.

Parent half: `measure_in_child`. Child half: `python -m edgefleet.agent.runtimes.measure
DIR`, which imports nothing of the control plane: only numpy, psutil and the
runtime adapters.

Files in DIR:
  request.json  {path, runtime, threads, runs, warmup, time_cap_s, onnx_inputs, onnx_outputs,
                 steps?, state?}
                steps, state (optional; older parents send neither): the samples
                are sequences of `steps` consecutive samples and `state` lists
                [output, input] pairs; the outputs pass feeds each step's
                `output` into the next step's `input` within a sequence
  inputs.npz    one array per model input; axis 0 indexes the samples, each
                `array[i]` is fed as is (so a batch of one has shape (n, 1, ...));
                no arrays: one sample of zeros shaped like the model's inputs
  result.json   {latencies_ms, baseline_rss_mb, peak_rss_mb, output_names}
                or {stage, error, sample}                           (written by the child)
  outputs.npz   out_0..out_k: each output for every sample, stacked (written by the child)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.runtimes import RuntimeUnavailable, TensorInfo, open_runner
from edgefleet.agent.runtimes.memory import current_rss_mib, peak_rss_mib, preload, reset_peak_rss

if TYPE_CHECKING:
    # The agent imports this module at boot (through agent.update.validate);
    # numpy (~12 MB of RSS) is imported by the functions that use it, so an
    # idle agent never loads it. The child imports it before its baseline.
    import numpy as np

# Runs before timing starts: first runs pay for lazy allocation, kernel
# selection and cold caches, which a serving device pays once.
WARMUP_RUNS = 5
# A last axis of one element has no argmax; such outputs agree when they are
# this close, relative to the reference's spread.
SCALAR_AGREEMENT_RTOL = 0.01
MIB = 1024 * 1024

# Why a measurement failed (MeasureFailed.stage).
UNAVAILABLE = "unavailable"  # the runtime cannot be used on this machine
LOAD = "load"  # the runtime refused the model file
RUN = "run"  # a sample failed to run (MeasureFailed.sample says which)
CRASHED = "crashed"  # the child died without a result (a signal, an exit code)
TIMED_OUT = "timed_out"  # the child was killed at the time limit
ERROR = "error"  # anything else inside the child

# The child must not inherit a parent's thread-count overrides for BLAS or
# OpenMP: the runtime's own thread setting is what is measured.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class MeasureFailed(Exception):
    """The model could not be measured; `stage` says where (UNAVAILABLE,
    LOAD, RUN, CRASHED, TIMED_OUT, ERROR) and `sample` which sample failed
    to run, for RUN."""

    def __init__(self, stage: str, message: str, *, sample: int | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.sample = sample


@dataclass(frozen=True)
class Measured:
    """What the child saw."""

    # One entry per timed run, in milliseconds.
    latencies_ms: list[float]
    # Resident set just before loading the model (interpreter, numpy, the
    # runtime library and the inputs already in memory), and its peak while
    # loading and running the model.
    baseline_rss_mb: float
    peak_rss_mb: float
    # One array per model output, stacked over the samples (axis 0).
    outputs: list[np.ndarray]
    output_names: list[str]

    @property
    def added_memory_mb(self) -> float:
        """The memory the model adds: weights, arenas, buffers, threads."""
        return max(0.0, self.peak_rss_mb - self.baseline_rss_mb)

    def latency_percentile(self, q: float) -> float:
        """The q-th percentile of the timed runs (0.0 without any)."""
        if not self.latencies_ms:
            return 0.0
        import numpy as np

        return float(np.percentile(np.asarray(self.latencies_ms, dtype=np.float64), q))


# ------------------------------------------------------------------ parent half


def measure_in_child(
    path: Path,
    runtime: str,
    inputs: Mapping[str, np.ndarray],
    *,
    threads: int,
    runs: int,
    timeout_s: float,
    warmup: int = WARMUP_RUNS,
    time_cap_s: float | None = None,
    onnx_inputs: Sequence[TensorInfo] | None = None,
    onnx_outputs: Sequence[TensorInfo] | None = None,
    command: Sequence[str] | None = None,
    steps: int = 1,
    state: Sequence[tuple[str, str]] = (),
) -> Measured:
    """Load `path` in `runtime` in a fresh child process and measure it.

    `inputs` are the samples: axis 0 of each array indexes them and each
    `array[i]` is fed as is. Empty: one sample of zeros shaped like the
    model's inputs (dynamic dimensions 1), for latency and memory alone.

    - latency: `runs` timed runs cycling through the samples, after `warmup`
      untimed ones, with `threads` threads; with `time_cap_s`, the timed
      runs stop once they took that long (at least one runs).
    - memory: the child's peak resident set while loading and running the
      model, and its resident set just before loading. On Linux the kernel's
      high-water mark is reset before loading; elsewhere the lifetime peak is
      used, which can only over-state it.
    - outputs: every sample run once more after timing. With `steps` > 1
      and `state` ((output, input) pairs), the samples are sequences of
      `steps` consecutive samples, and within each the model's own `output`
      is fed as the next step's `input` (step 0 takes the sample's): a
      stateful model is judged with its own state, as it serves.

    Raises MeasureFailed; a child that dies or outlives `timeout_s` is
    CRASHED or TIMED_OUT. `command` replaces the child's command line (the
    directory is appended): by default this module run by this Python."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="measure-") as tmp:
        directory = Path(tmp)
        request = {
            "path": str(path),
            "runtime": runtime,
            "threads": max(1, threads),
            "runs": max(1, runs),
            "warmup": max(0, warmup),
            "time_cap_s": time_cap_s,
            "onnx_inputs": _specs_json(onnx_inputs),
            "onnx_outputs": _specs_json(onnx_outputs),
        }
        if steps > 1 and state:
            request["steps"] = steps
            request["state"] = [[output, name] for output, name in state]
        (directory / "request.json").write_text(json.dumps(request))
        np.savez(directory / "inputs.npz", **dict(inputs))  # type: ignore[arg-type]
        result = _run_child(directory, timeout_s, command)
        with np.load(directory / "outputs.npz", allow_pickle=False) as archive:
            outputs = [archive[f"out_{k}"] for k in range(len(archive.files))]
    return Measured(
        latencies_ms=[float(x) for x in result["latencies_ms"]],
        baseline_rss_mb=float(result["baseline_rss_mb"]),
        peak_rss_mb=float(result["peak_rss_mb"]),
        outputs=outputs,
        output_names=[str(n) for n in result["output_names"]],
    )


def _run_child(directory: Path, timeout_s: float, command: Sequence[str] | None) -> dict[str, Any]:
    """Run the child on `directory`; its result, or MeasureFailed."""
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_ENV}
    argv = [
        *(command or (sys.executable, "-m", "edgefleet.agent.runtimes.measure")),
        str(directory),
    ]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        # subprocess.run has killed the child (SIGKILL) by now.
        raise MeasureFailed(
            TIMED_OUT, f"measurement did not finish within {timeout_s:g} s"
        ) from None
    result_file = directory / "result.json"
    if not result_file.exists():
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        raise MeasureFailed(
            CRASHED,
            f"measurement process died ({exit_description(proc.returncode)})"
            + (f": {tail[0]}" if tail else ""),
        )
    result: dict[str, Any] = json.loads(result_file.read_text())
    if "stage" in result:
        raise MeasureFailed(str(result["stage"]), str(result["error"]), sample=result.get("sample"))
    return result


def exit_description(returncode: int) -> str:
    """ "signal 11 SIGSEGV" for a process a signal killed, "exit 3" otherwise."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {-returncode} {name}"
    return f"exit {returncode}"


def _specs_json(specs: Sequence[TensorInfo] | None) -> list[dict[str, object]] | None:
    if specs is None:
        return None
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in specs]


# ------------------------------------------------------------------ comparing outputs


def max_abs_diff(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The largest absolute difference over every element of every output."""
    import numpy as np

    diffs = [
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        for a, b in zip(outputs, reference, strict=True)
    ]
    return max(diffs, default=0.0)


def predictions(output: np.ndarray) -> np.ndarray:
    """Argmax over the last axis (the class axis of a classifier's scores)."""
    import numpy as np

    return np.asarray(np.argmax(output, axis=-1))


def agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of argmax positions (over the last axis) where `output`
    picks what `reference` picks: for a classifier, the share of samples
    whose top class is unchanged. A last axis of one element has no argmax;
    there, the share of values within SCALAR_AGREEMENT_RTOL of the
    reference's range."""
    import numpy as np

    if output.size == 0:
        return 1.0
    if output.shape[-1] == 1:
        spread = float(np.ptp(reference)) or 1.0
        close = np.abs(output.astype(np.float64) - reference) <= SCALAR_AGREEMENT_RTOL * spread
        return float(np.mean(close))
    return float(np.mean(predictions(output) == predictions(reference)))


# ------------------------------------------------------------------ child half


def _specs(raw: list[dict[str, Any]] | None) -> list[TensorInfo] | None:
    if raw is None:
        return None
    return [TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in raw]


def _last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(exc)[-1].strip()


def _zeros(spec: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    import numpy as np

    return {
        t.name: np.zeros(tuple(d if d >= 0 else 1 for d in t.shape), dtype=np.dtype(t.dtype))
        for t in spec
    }


def run(directory: Path) -> dict[str, Any]:
    """Measure the request in `directory` in this process; the result
    document (outputs.npz is written beside it). Raises MeasureFailed."""
    # Before the memory baseline, like the runtime adapter below: numpy is
    # every model's cost on the device, not this model's.
    import numpy as np

    request = json.loads((directory / "request.json").read_text())
    with np.load(directory / "inputs.npz", allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    count = int(next(iter(arrays.values())).shape[0]) if arrays else 1
    samples = [{k: v[i, ...] for k, v in arrays.items()} for i in range(count)]
    runtime = str(request["runtime"])
    # The runtime's adapter and library before the baseline: every model on
    # the device pays for them once, model or not (agent.runtimes.memory).
    try:
        preload(runtime)
    except RuntimeUnavailable as exc:
        raise MeasureFailed(UNAVAILABLE, str(exc)) from exc
    except ImportError as exc:  # onnxruntime's adapter imports it at the top
        raise MeasureFailed(UNAVAILABLE, _last_line(exc)) from exc

    baseline = current_rss_mib()
    reset_ok = reset_peak_rss()
    try:
        runner = open_runner(
            Path(request["path"]),
            runtime,
            threads=int(request["threads"]),
            onnx_inputs=_specs(request.get("onnx_inputs")),
            onnx_outputs=_specs(request.get("onnx_outputs")),
        )
    except RuntimeUnavailable as exc:
        raise MeasureFailed(UNAVAILABLE, str(exc)) from exc
    except Exception as exc:  # whatever the runtime raises for a bad file
        raise MeasureFailed(LOAD, _last_line(exc)) from exc
    if not arrays:
        samples = [_zeros(runner.inputs)]

    def run_one(index: int) -> list[np.ndarray]:
        try:
            return runner.run(samples[index])
        except Exception as exc:  # a sample the model cannot take
            raise MeasureFailed(RUN, _last_line(exc), sample=index) from exc

    for i in range(int(request["warmup"])):
        run_one(i % count)
    cap = request.get("time_cap_s")
    latencies: list[float] = []
    started = time.perf_counter()
    for i in range(int(request["runs"])):
        start = time.perf_counter()
        run_one(i % count)
        latencies.append((time.perf_counter() - start) * 1000.0)
        if cap is not None and time.perf_counter() - started >= float(cap):
            break
    # Peak is read before collecting every sample's outputs: holding those
    # is the measurement's cost, not the model's.
    peak = peak_rss_mib(reset_ok)
    assert peak is not None  # with lifetime=True

    # Outputs come in the ONNX model's order (onnx_outputs when given).
    names = [t["name"] for t in request.get("onnx_outputs") or []] or [
        t.name for t in runner.outputs
    ]
    per_sample = _outputs_pass(
        run_one, samples, names, int(request.get("steps") or 1), request.get("state") or []
    )
    outputs: dict[str, np.ndarray] = {}
    for k in range(len(per_sample[0])):
        shapes = {np.shape(outs[k]) for outs in per_sample}
        if len(shapes) > 1:
            name = names[k] if k < len(names) else str(k)
            raise MeasureFailed(
                RUN, f"output {name!r} changes shape between samples ({sorted(shapes)})"
            )
        outputs[f"out_{k}"] = np.stack([np.asarray(outs[k]) for outs in per_sample])
    np.savez(directory / "outputs.npz", **outputs)  # type: ignore[arg-type]
    return {
        "latencies_ms": latencies,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "output_names": names,
    }


def _outputs_pass(
    run_one: Callable[[int], list[np.ndarray]],
    samples: list[dict[str, np.ndarray]],
    names: Sequence[str],
    steps: int,
    state: Sequence[Sequence[str]],
) -> list[list[np.ndarray]]:
    """Every sample's outputs. In sequences of `steps` with `state` pairs,
    each step after the first gets the previous step's state outputs as its
    state inputs (cast and shaped like the sample's own)."""
    if steps <= 1 or not state:
        return [run_one(i) for i in range(len(samples))]
    import numpy as np

    positions: list[tuple[int, str]] = []
    for output, name in state:
        if output not in names:
            raise MeasureFailed(
                RUN, f"state output {output!r} is not an output of the model (its outputs: {names})"
            )
        positions.append((list(names).index(output), str(name)))
    per_sample: list[list[np.ndarray]] = []
    for i in range(len(samples)):
        if i % steps:
            sample = dict(samples[i])
            for k, name in positions:
                previous = np.asarray(per_sample[i - 1][k])
                own = sample[name]
                if previous.size != own.size:
                    raise MeasureFailed(
                        RUN,
                        f"state output {names[k]!r} has shape {list(previous.shape)}; its input "
                        f"{name!r} takes {list(own.shape)}",
                        sample=i,
                    )
                sample[name] = previous.astype(own.dtype, copy=False).reshape(own.shape)
            # run_one runs samples[i]: the looped state takes the pushed one's place.
            samples[i] = sample
        per_sample.append(run_one(i))
    return per_sample


def main(argv: list[str]) -> int:
    """Child entry point: measure DIR, write DIR/result.json, exit 0 (the
    parent reads failures from the result, and a missing result as a crash)."""
    directory = Path(argv[1])
    result: dict[str, Any]
    try:
        result = run(directory)
    except MeasureFailed as exc:
        result = {"stage": exc.stage, "error": exc.message, "sample": exc.sample}
    except Exception as exc:  # reported to the parent as the measurement's error
        result = {"stage": ERROR, "error": _last_line(exc), "sample": None}
    (directory / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
