"""The inputs a build measures and calibrates with: the model version's
sample data, or deterministic generated inputs when none were pushed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controlplane.domain import sample_archive
from controlplane.domain.onnx_inspect import TensorInfo
from controlplane.errors import InvalidArgument

GENERATED_SAMPLES = 32
# A dynamic dimension other than the batch gets this size in generated inputs.
DEFAULT_DYNAMIC_DIM = 16


@dataclass(frozen=True)
class Samples:
    """Arrays keyed by model input name, each with a leading sample axis."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    generated: bool

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0])

    def one(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` as a batch of one (what a device serves)."""
        return {name: array[index : index + 1] for name, array in self.arrays.items()}

    def each(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(len(self)):
            yield self.one(index)

    def head(self, count: int) -> Samples:
        labels = None if self.labels is None else self.labels[:count]
        return Samples({k: v[:count] for k, v in self.arrays.items()}, labels, self.generated)


def load_samples(path: Path | None, inputs: Sequence[TensorInfo], *, seed: int = 0) -> Samples:
    """Sample data from an .npz, or a plain .npy for a model with one input
    (validated at push time against the model's inputs, and read again here
    through sample_archive's limits: the stored blob is still client data),
    or generated inputs when there is none."""
    if path is not None:
        stored = sample_archive.by_input_name(sample_archive.load(path), [t.name for t in inputs])
        missing = sorted(t.name for t in inputs if t.name not in stored)
        if missing:
            raise InvalidArgument(f"sample data lacks arrays for model inputs {missing}")
        arrays = {t.name: np.ascontiguousarray(stored[t.name]) for t in inputs}
        return Samples(arrays, stored.get("labels"), generated=False)
    return generate_samples(inputs, seed=seed)


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
