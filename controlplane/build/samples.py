"""The inputs a build measures and calibrates with: the model version's
sample data, or deterministic generated inputs when none were pushed.

A build uses a bounded number of the pushed samples, whatever the file
holds (up to sample_archive's MAX_SAMPLE_TOTAL_BYTES): every step runs the
model over every sample it uses (the fp32 reference, each candidate's
fidelity), and the outputs of all of them are held, so without a budget a
build's time and memory grew with the rows pushed (a 16 MB array of 1M rows
took a build worker to 1.2 GB; a 256 MiB one grew it past 10 GB)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.controlplane.domain import onnx_inspect, sample_archive, sample_shapes
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo
from edgefleet.controlplane.domain.sample_shapes import Layout

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
    """Arrays keyed by model input name, each with a leading sample axis.

    An input named in `as_is` holds each sample exactly as it is fed
    (`array[i]`: the model has no batch axis there, or the samples were
    pushed on an axis of their own); any other input's axis 0 replaces the
    model's batch axis, each sample fed as a batch of one (`array[i:i+1]`).
    A constant input is a read-only view repeating one value.

    For a model with state (`state`: (output, input) pairs, an output fed
    back into an input at the next step), samples may come in sequences of
    `steps`: consecutive runs of `steps` samples, whose state input holds the
    state the fp32 model had at that step (build.measure.unroll_sequences).
    A candidate is judged over each sequence with its own state looped."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    generated: bool
    # How many samples the pushed file holds; None: the arrays hold them all.
    pushed: int | None = None
    as_is: frozenset[str] = frozenset()
    steps: int = 1
    state: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    @property
    def pushed_count(self) -> int:
        return len(self) if self.pushed is None else self.pushed

    @property
    def sequences(self) -> int:
        return len(self) // self.steps

    def one(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` as it is fed (a batch of one, what a device serves,
        where the model has a batch axis)."""
        return {
            # [index, ...]: a scalar input's sample is a 0-d array, not a
            # numpy scalar (which ORT's quantizer cannot take).
            name: array[index, ...] if name in self.as_is else array[index : index + 1]
            for name, array in self.arrays.items()
        }

    def each(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(len(self)):
            yield self.one(index)

    def fed(self) -> dict[str, np.ndarray]:
        """Every sample as fed, on axis 0: `fed()[name][i]` is what
        `one(i)[name]` is (the measuring child's inputs)."""
        return {
            name: array if name in self.as_is else array[:, None]
            for name, array in self.arrays.items()
        }

    def fed_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one sample of input `name` as it is fed."""
        rest = tuple(int(d) for d in self.arrays[name].shape[1:])
        return rest if name in self.as_is else (1, *rest)

    def head(self, count: int) -> Samples:
        """The first `count` samples; whole sequences (at least one)."""
        if self.steps > 1:
            count = max(self.steps, count // self.steps * self.steps)
        labels = None if self.labels is None else self.labels[:count]
        arrays = {k: v[:count] for k, v in self.arrays.items()}
        return dataclasses.replace(self, arrays=arrays, labels=labels, pushed=self.pushed_count)

    def describe(self) -> str:
        """How many samples are used, of how many, for the build log."""
        if self.generated:
            return f"{len(self)} generated samples"
        if self.steps > 1:
            pushed = self.pushed_count // self.steps
            used = f"{self.sequences:,} of {pushed:,}" if self.sequences < pushed else "all"
            return (
                f"using {used} pushed sequences of {self.steps:,} steps "
                f"({len(self):,} samples), state looped through {_pairs(self.state)}"
            )
        if len(self) == self.pushed_count:
            return f"using all {len(self):,} pushed samples"
        return (
            f"using {len(self):,} of {self.pushed_count:,} pushed samples (evenly spaced; a "
            f"build uses at most MAX_BUILD_SAMPLES={MAX_BUILD_SAMPLES:,} samples of at most "
            f"MAX_BUILD_SAMPLE_BYTES={MAX_BUILD_SAMPLE_BYTES // MiB} MiB)"
        )


def _pairs(state: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{out} -> {inp}" for out, inp in state)


def build_sample_count(count: int, bytes_per_sample: int) -> int:
    """How many of `count` pushed samples of `bytes_per_sample` a build uses:
    all of them within MAX_BUILD_SAMPLES and MAX_BUILD_SAMPLE_BYTES, at
    least one."""
    fit = MAX_BUILD_SAMPLE_BYTES // bytes_per_sample if bytes_per_sample else count
    return max(1, min(count, MAX_BUILD_SAMPLES, fit))


def load_samples(
    path: Path | None,
    inputs: Sequence[TensorInfo],
    *,
    seed: int = 0,
    state: Sequence[tuple[str, str]] = (),
) -> Samples:
    """Sample data from an .npz, or a plain .npy for a model with one input
    (validated at push time against the model's inputs, and read again here
    through sample_archive's limits: the stored blob is still client data),
    or generated inputs when there is none. Arrays are read by the rules of
    sample_shapes (docs/operators/models.md#sample-data); `state` holds the
    model's (output, input) state pairs (onnx_inspect.state_pairs).

    Only `build_sample_count` of the pushed samples are read, evenly spaced
    (sample_archive.picked_rows): memory is what those take, whatever the
    file holds. Sequences are picked whole; their steps count as samples.
    Samples in sequences come back with each step's state input holding the
    sequence's initial state: build.measure.unroll_sequences fills in the
    rest by running the fp32 model."""
    if path is None:
        return generate_samples(inputs, seed=seed, state=state)
    names = [t.name for t in inputs]
    in_file = sample_archive.read_headers(path)
    headers = sample_archive.by_input_name(in_file, names)
    plan = sample_shapes.plan(
        onnx_inspect.sample_specs(inputs),
        {name: (h.shape, h.dtype) for name, h in headers.items()},
        state,
    )
    steps = plan.steps
    counted = [headers[name] for name, p in plan.inputs.items() if p.count is not None] + (
        [headers["labels"]] if "labels" in headers else []
    )
    # Bytes one step takes: a per-sequence array's entry is shared by its
    # steps, while a constant (or a state's zeros) is held once but travels
    # with every sample to each measuring child, which takes them stacked.
    per_sample = sum(h.nbytes // plan.num_samples for h in counted) + sum(
        math.prod(p.shape) * np.dtype(spec.dtype).itemsize
        for spec in inputs
        if (p := plan.inputs[spec.name]).count is None
    )
    budget = build_sample_count(plan.num_samples, per_sample)
    rows = max(1, budget // steps)
    # One sequence over the budget: its first steps that fit.
    used_steps = min(steps, budget)
    constants = {n for n, p in plan.inputs.items() if p.layout is Layout.CONSTANT}
    # A plain .npy's one array is stored under SINGLE_ARRAY.
    single = set(in_file) == {sample_archive.SINGLE_ARRAY}
    whole = ({sample_archive.SINGLE_ARRAY} if constants else set()) if single else constants
    stored = sample_archive.by_input_name(sample_archive.load(path, rows=rows, whole=whole), names)
    sequences = min(plan.sequences, rows)
    count = sequences * used_steps
    arrays: dict[str, np.ndarray] = {}
    as_is: set[str] = set()
    for spec in inputs:
        p = plan.inputs[spec.name]
        if p.layout is Layout.ZEROS:
            value = np.zeros(spec.shape, np.dtype(spec.dtype))
            arrays[spec.name] = np.broadcast_to(value, (count, *value.shape))
            as_is.add(spec.name)
            continue
        array = stored.pop(spec.name)
        if p.layout is Layout.CONSTANT:
            arrays[spec.name] = np.broadcast_to(array, (count, *array.shape))
        elif p.layout is Layout.STEPS:
            steps_used = array[:, :used_steps]
            arrays[spec.name] = np.ascontiguousarray(steps_used.reshape(count, *array.shape[2:]))
        elif used_steps > 1:
            # One entry per sequence, the same for each of its steps.
            arrays[spec.name] = np.repeat(array, used_steps, axis=0)
        else:
            # Contiguous, one copy: a picked array already is, in native order.
            arrays[spec.name] = np.ascontiguousarray(array)
        if p.layout is not Layout.BATCH:
            as_is.add(spec.name)
    labels = stored.get("labels")
    if labels is not None and plan.in_sequences:
        labels = np.ascontiguousarray(labels[:, :used_steps].reshape(count, *labels.shape[2:]))
    return Samples(
        arrays,
        labels,
        generated=False,
        pushed=plan.num_samples,
        as_is=frozenset(as_is),
        steps=used_steps,
        state=tuple(state) if used_steps > 1 else (),
    )


def generate_samples(
    inputs: Sequence[TensorInfo],
    *,
    seed: int = 0,
    count: int = GENERATED_SAMPLES,
    state: Sequence[tuple[str, str]] = (),
) -> Samples:
    """Deterministic inputs for models pushed without sample data: uniform
    [0, 1) for floats (the usual normalised range), small non-negative
    integers for index-like inputs, zeros for state inputs (`state`: the
    model's (output, input) pairs). Shaped by the same rules as pushed
    samples: a batch of one where the model has a batch axis, the input's
    own shape where it has none. Accuracy cannot be judged on them, only
    agreement with the fp32 reference."""
    rng = np.random.default_rng(seed)
    state_inputs = {inp for _, inp in state}
    arrays: dict[str, np.ndarray] = {}
    as_is: set[str] = set()
    for spec in inputs:
        batched = sample_shapes.has_batch_axis(spec.shape)
        dims = list(spec.shape[1:] if batched else spec.shape)
        dtype = np.dtype(spec.dtype)
        if not batched:
            as_is.add(spec.name)
        if spec.name in state_inputs:
            # A state's dynamic dims are most often the batch: one.
            shape = (count, *(d if d >= 0 else 1 for d in dims))
            arrays[spec.name] = np.zeros(shape, dtype)
            continue
        shape = (count, *(d if d > 0 else DEFAULT_DYNAMIC_DIM for d in dims))
        if np.issubdtype(dtype, np.floating):
            arrays[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype == np.bool_:
            arrays[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            arrays[spec.name] = rng.integers(0, 10, shape).astype(dtype)
    return Samples(arrays, None, generated=True, as_is=frozenset(as_is))
