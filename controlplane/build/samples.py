"""The inputs a build measures and calibrates with: the model version's
sample data, or deterministic generated inputs when none were pushed.

A build uses a bounded number of the pushed samples, whatever the file
holds (up to sample_archive's MAX_SAMPLE_TOTAL_BYTES): every step runs the
model over every sample it uses (the fp32 reference, each candidate's
fidelity), and the outputs of all of them are held, so without a budget a
build's time and memory grew with the rows pushed (a 16 MB array of 1M rows
took a build worker to 1.2 GB; a 256 MiB one grew it past 10 GB)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controlplane.domain import sample_archive
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo
from edgefleet.controlplane.errors import InvalidArgument

GENERATED_SAMPLES = 32
# A dynamic dimension other than the batch gets this size in generated inputs.
DEFAULT_DYNAMIC_DIM = 16

MiB = sample_archive.MiB
# Most pushed samples a build uses. What needs them: int8 calibration takes
# 64 (ONNX Runtime, ort_ladder.CALIBRATION_LIMIT) or 100 (TFLite,
# tflite_ladder.CALIBRATION_SAMPLES); golden samples 8; latency cycles
# through them. Argmax agreement and accuracy are estimates whose standard
# error over n samples is at most 0.5 / sqrt(n): 1.6 points at 1,000, fine
# enough to judge a min_accuracy_retention of 0.95 or 0.99, while every
# candidate's run over them stays seconds for small models and a couple of
# minutes for ImageNet-sized CNNs.
MAX_BUILD_SAMPLES = 1000
# Most bytes of the used samples' arrays (every model input plus `labels`) a
# build holds: 111 ImageNet-sized float32 images (still above calibration's
# needs), 1,000 samples of anything under 64 KiB. When one sample is larger
# than this, the build uses that one sample.
MAX_BUILD_SAMPLE_BYTES = 64 * MiB
# Most bytes of the fp32 reference outputs on the used samples (and so of
# each candidate's outputs, measured on the same samples): a classifier's
# scores never come near it, while a detector with 3 MB of outputs per image
# is judged on its first 11 used samples rather than holding GBs.
MAX_BUILD_OUTPUT_BYTES = 32 * MiB


@dataclass(frozen=True)
class Samples:
    """Arrays keyed by model input name, each with a leading sample axis."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    generated: bool
    # How many samples the pushed file holds; None: the arrays hold them all.
    pushed: int | None = None

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    @property
    def pushed_count(self) -> int:
        return len(self) if self.pushed is None else self.pushed

    def one(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` as a batch of one (what a device serves)."""
        return {name: array[index : index + 1] for name, array in self.arrays.items()}

    def each(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(len(self)):
            yield self.one(index)

    def head(self, count: int) -> Samples:
        labels = None if self.labels is None else self.labels[:count]
        arrays = {k: v[:count] for k, v in self.arrays.items()}
        return Samples(arrays, labels, self.generated, self.pushed_count)

    def describe(self) -> str:
        """How many samples are used, of how many, for the build log."""
        if self.generated:
            return f"{len(self)} generated samples"
        if len(self) == self.pushed_count:
            return f"using all {len(self):,} pushed samples"
        return (
            f"using {len(self):,} of {self.pushed_count:,} pushed samples (evenly spaced; a "
            f"build uses at most MAX_BUILD_SAMPLES={MAX_BUILD_SAMPLES:,} samples of at most "
            f"MAX_BUILD_SAMPLE_BYTES={MAX_BUILD_SAMPLE_BYTES // MiB} MiB)"
        )


def build_sample_count(count: int, bytes_per_sample: int) -> int:
    """How many of `count` pushed samples of `bytes_per_sample` a build uses:
    all of them within MAX_BUILD_SAMPLES and MAX_BUILD_SAMPLE_BYTES, at
    least one."""
    fit = MAX_BUILD_SAMPLE_BYTES // bytes_per_sample if bytes_per_sample else count
    return max(1, min(count, MAX_BUILD_SAMPLES, fit))


def load_samples(path: Path | None, inputs: Sequence[TensorInfo], *, seed: int = 0) -> Samples:
    """Sample data from an .npz, or a plain .npy for a model with one input
    (validated at push time against the model's inputs, and read again here
    through sample_archive's limits: the stored blob is still client data),
    or generated inputs when there is none.

    Only `build_sample_count` of the pushed samples are read, evenly spaced
    (sample_archive.picked_rows): memory is what those take, whatever the
    file holds."""
    if path is None:
        return generate_samples(inputs, seed=seed)
    names = [t.name for t in inputs]
    headers = sample_archive.by_input_name(sample_archive.read_headers(path), names)
    missing = sorted(name for name in names if name not in headers)
    if missing:
        raise InvalidArgument(f"sample data lacks arrays for model inputs {missing}")
    used = [headers[name] for name in names] + ([headers["labels"]] if "labels" in headers else [])
    counts = {h.shape[0] if h.shape else 0 for h in used}
    if len(counts) != 1 or 0 in counts:
        raise InvalidArgument(
            f"sample data arrays {[h.name or names[0] for h in used]} must hold the same, "
            f"non-zero number of samples along their first axis; they hold {sorted(counts)}"
        )
    (count,) = counts
    per_sample = sum(h.nbytes // count for h in used)
    rows = build_sample_count(count, per_sample)
    stored = sample_archive.by_input_name(sample_archive.load(path, rows=rows), names)
    # Contiguous, one copy: a picked array already is, in native order.
    arrays = {name: np.ascontiguousarray(stored.pop(name)) for name in names}
    return Samples(arrays, stored.get("labels"), generated=False, pushed=count)


def generate_samples(
    inputs: Sequence[TensorInfo], *, seed: int = 0, count: int = GENERATED_SAMPLES
) -> Samples:
    """Deterministic inputs for models pushed without sample data: uniform
    [0, 1) for floats (the usual normalised range), small non-negative
    integers for index-like inputs. Accuracy cannot be judged on them, only
    agreement with the fp32 reference."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        dims = [d if d > 0 else DEFAULT_DYNAMIC_DIM for d in spec.shape[1:]]
        shape = (count, *dims)
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype == np.bool_:
            arrays[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return Samples(arrays, None, generated=True)
