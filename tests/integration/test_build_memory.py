"""A build's memory is bounded by its sample budget, not by the rows pushed.

Found by a tester: a 249 KB upload declaring a zero-filled float32 x[16M, 4]
(just under MAX_SAMPLE_ARRAY_BYTES) was accepted at push, and its build
worker then grew ~50 MB/s to 10 GB at "running the fp32 model for reference
outputs"; a 16 MB array of 1M rows took a worker to 1.23 GB. The build ran
the model over every pushed sample, one Python list entry per sample, and
held every candidate's outputs on all of them. Now a build uses at most
MAX_BUILD_SAMPLES evenly spaced samples within MAX_BUILD_SAMPLE_BYTES (read
from the file without loading the rest), and their outputs within
MAX_BUILD_OUTPUT_BYTES."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes.measure import agreement, max_abs_diff
from edgefleet.controlplane.build import measure, pipeline
from edgefleet.controlplane.build import samples as build_samples
from edgefleet.controlplane.build.measure import reference_outputs
from edgefleet.controlplane.build.pipeline import run_build
from edgefleet.controlplane.build.samples import MAX_BUILD_SAMPLES, load_samples
from edgefleet.controlplane.build.types import BuildTarget
from edgefleet.controlplane.domain import sample_archive
from edgefleet.controlplane.domain.onnx_inspect import inspect_model
from edgefleet.fidelity import OutputKind, OutputSpec, score

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024
# What the build worker may grow by, over its resident set after importing
# the build code, for pushed samples of any size: the samples it uses (at
# most MAX_BUILD_SAMPLE_BYTES, 64 MiB), the reference outputs and one
# candidate's outputs (at most MAX_BUILD_OUTPUT_BYTES, 32 MiB, each), the
# runtimes' sessions and the quantizer. Before the fix 2M rows of 4 floats
# (32 MB) grew it by ~2.4 GB.
MAX_WORKER_GROWTH = 300 * MB
PUSHED_ROWS = 2_000_000


def _tiny_model(path: Path, *, batch: str | int = "batch", width: int = 8) -> Path:
    """x[batch, 4] -> softmax(x W + b)[batch, width]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        [
            numpy_helper.from_array(rng.normal(size=(4, width)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.normal(size=width).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# The build worker's entry point in a process of its own: its resident set
# after importing the build code (numpy, onnx, onnxruntime, the quantizer),
# then its peak over the whole build, and its measurement children's peak.
_WORKER = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path

    import edgefleet.controlplane.build.ort_ladder  # noqa: F401
    import edgefleet.controlplane.build.pipeline  # noqa: F401
    from edgefleet.controlplane.build.types import BuildJob, BuildTarget
    from edgefleet.controlplane.build.worker import run_job

    def hwm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    baseline = hwm()
    target = BuildTarget("gw", "onnxruntime")
    out = run_job(BuildJob(Path(sys.argv[1]), Path(sys.argv[2]), target, Path(sys.argv[3])))
    print(json.dumps({
        "baseline": baseline,
        "peak": hwm(),
        "children_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "chosen": out.chosen and out.chosen.candidate.name,
        "log": out.log,
    }))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_a_build_over_millions_of_pushed_rows_stays_within_its_sample_budget(
    tmp_path: Path,
) -> None:
    model = _tiny_model(tmp_path / "model.onnx")
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=np.zeros((PUSHED_ROWS, 4), np.float32))  # 32 MB
    assert samples.stat().st_size > 30 * MB
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(model), str(samples), str(tmp_path / "job")],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log = "\n".join(result["log"])
    assert result["chosen"], log
    assert f"using {MAX_BUILD_SAMPLES:,} of {PUSHED_ROWS:,} pushed samples (evenly spaced" in log
    growth = result["peak"] - result["baseline"]
    print(
        f"worker: baseline {result['baseline'] / MB:.0f} MiB, peak {result['peak'] / MB:.0f} "
        f"MiB (+{growth / MB:.0f} MiB); measurement children peak "
        f"{result['children_peak'] / MB:.0f} MiB"
    )
    assert growth < MAX_WORKER_GROWTH, log
    # A measurement child holds the used samples and its outputs on them,
    # beside its interpreter, numpy and the runtime.
    assert result["children_peak"] < 400 * MB


def test_only_the_picked_rows_are_held_while_reading(tmp_path: Path) -> None:
    """sample_archive.load(rows=N) streams the file and keeps N rows: its
    allocations stay a chunk or two, not the 32 MB array."""
    path = tmp_path / "samples.npz"
    np.savez_compressed(path, x=np.zeros((PUSHED_ROWS, 4), np.float32))
    tracemalloc.start()
    try:
        arrays = sample_archive.load(path, rows=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arrays["x"].shape == (1000, 4)
    assert peak < 4 * MB, peak


@pytest.mark.parametrize("store", ["npz", "npz-deflated", "npy"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_picked_rows_are_evenly_spaced_and_what_numpy_holds_there(
    tmp_path: Path, store: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small chunks, so rows and elements straddle them.
    monkeypatch.setattr(sample_archive, "READ_CHUNK_BYTES", 1000)
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3001, 3, 5)) * 100).astype(">f8")  # big-endian, 120-byte rows
    x = np.asfortranarray(x) if order == "F" else x
    labels = np.arange(3001)
    path = tmp_path / ("samples.npy" if store == "npy" else "samples.npz")
    if store == "npy":
        np.save(path, x)
    elif store == "npz":
        np.savez(path, x=x, labels=labels)
    else:
        np.savez_compressed(path, x=x, labels=labels)
    picked = sample_archive.picked_rows(3001, 100)
    assert picked[0] == 0 and len(set(picked.tolist())) == 100
    assert np.all(np.diff(picked) >= 30) and picked[-1] >= 3001 - 31
    got = sample_archive.load(path, rows=100)
    key = sample_archive.SINGLE_ARRAY if store == "npy" else "x"
    assert got[key].dtype == np.dtype("f8") and np.array_equal(got[key], x[picked])
    if store != "npy":
        assert np.array_equal(got["labels"], picked)
    # Fewer rows than the cap: all of them, as without one.
    assert np.array_equal(sample_archive.load(path, rows=5000)[key], x)


def test_big_samples_are_capped_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLE_BYTES", MB)
    model = _tiny_model(tmp_path / "model.onnx")
    path = tmp_path / "samples.npz"
    # 16 + 8 bytes a sample with labels: 43,690 fit 1 MiB, MAX_BUILD_SAMPLES caps first.
    np.savez(path, x=np.ones((50_000, 4), np.float32), labels=np.zeros(50_000, np.int64))
    used = load_samples(path, inspect_model(model).inputs)
    assert used.labels is not None
    assert (len(used), used.pushed_count, len(used.labels)) == (1000, 50_000, 1000)
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLE_BYTES", 24 * 100)
    used = load_samples(path, inspect_model(model).inputs)
    assert (len(used), used.pushed_count) == (100, 50_000)
    assert "using 100 of 50,000 pushed samples" in used.describe()
    # One sample bigger than the budget: the build still has that one.
    monkeypatch.setattr(build_samples, "MAX_BUILD_SAMPLE_BYTES", 10)
    assert len(load_samples(path, inspect_model(model).inputs)) == 1


def test_reference_outputs_fit_their_budget_and_the_build_uses_that_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_model(tmp_path / "model.onnx", width=64)  # 256 bytes of outputs a sample
    path = tmp_path / "samples.npz"
    rng = np.random.default_rng(2)
    np.savez(path, x=rng.normal(size=(500, 4)).astype(np.float32))
    samples = load_samples(path, inspect_model(model).inputs)
    full = reference_outputs(model, samples)
    assert full[0].shape == (500, 1, 64) and full[0].flags.c_contiguous
    capped = reference_outputs(model, samples, max_bytes=256 * 40 + 100)
    assert capped[0].shape == (40, 1, 64) and np.array_equal(capped[0], full[0][:40])

    monkeypatch.setattr(pipeline, "MAX_BUILD_OUTPUT_BYTES", 256 * 40)
    outcome = run_build(
        model, path, BuildTarget("gw", "onnxruntime"), tmp_path / "work", lambda *_: None, runs=5
    )
    log = "\n".join(outcome.log)
    assert "using all 500 pushed samples" in log
    assert "256 bytes per sample: using the first 40 of the 500 samples" in log
    golden = outcome.golden
    assert outcome.chosen is not None and golden is not None, log
    assert 1 <= len(golden.samples) <= 8, log
    # Golden samples are copies: they keep no candidate's outputs alive.
    for sample in golden.samples:
        assert all(a.base is None for a in [*sample.inputs.values(), *sample.outputs.values()])


@pytest.mark.parametrize("classes", [7, 1])
def test_fidelity_in_slices_is_the_agents_rule(
    classes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(measure, "FIDELITY_CHUNK_BYTES", 100)
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(301, 3, classes)).astype(np.float32)
    output = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    spec = OutputSpec("scores", OutputKind.CLASS_SCORES)
    (sliced,) = measure.judge([spec], [output], [reference])
    assert sliced.value == pytest.approx(agreement(output, reference), abs=1e-12)
    assert sliced.value == pytest.approx(score(spec, output, reference).value, abs=1e-12)
    assert measure._max_abs_diff([output, output[:, :1]], [reference, reference[:, :1]]) == (
        max_abs_diff([output, output[:, :1]], [reference, reference[:, :1]])
    )
