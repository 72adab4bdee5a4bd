"""The shapes a TFLite build converts at: a class's input shapes
(domain/input_shapes.py) or the samples', and the samples made to fit them.

A build judges a candidate by running it on the samples, and a TFLite
artifact takes only the shapes it was converted with. So when a class fixes
a dynamic dimension to another size than the samples have (the samples are
192 wide, the class's devices feed 320), the samples are fitted first:
zero-padded at the end of that dimension, or cut there. The fp32 reference
runs on the same fitted samples, so fidelity compares like with like."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from edgefleet.controlplane.build.samples import Samples, generate_samples
from edgefleet.controlplane.domain.input_shapes import (
    InputShapes,
    check_against_model,
    format_dims,
)
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo


def shaped_inputs(inputs: Sequence[TensorInfo], shapes: InputShapes) -> list[TensorInfo]:
    """`inputs` with the class's sizes in the dimensions they leave dynamic
    (the batch stays as the model has it)."""
    fixed = dict(shapes)
    out = []
    for spec in inputs:
        dims = fixed.get(spec.name)
        if dims is None or len(dims) != len(spec.shape):
            out.append(spec)
            continue
        shape = tuple(
            size if size >= 0 or axis == 0 else want
            for axis, (size, want) in enumerate(zip(spec.shape, dims, strict=True))
        )
        out.append(TensorInfo(spec.name, spec.dtype, shape, spec.dim_names))
    return out


def fit_array(array: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """`array` (a leading sample axis, then one sample's dims) cut or
    zero-padded at the end of each axis to `dims`."""
    cut = array[(slice(None), *(slice(0, d) for d in dims))]
    pad = [(0, 0), *((0, max(0, d - s)) for s, d in zip(cut.shape[1:], dims, strict=True))]
    return np.ascontiguousarray(np.pad(cut, pad) if any(p[1] for p in pad) else cut)


def fit_samples(
    samples: Samples,
    inputs: Sequence[TensorInfo],
    shapes: InputShapes,
    log: Callable[[str], None],
) -> Samples:
    """The samples with each input the class fixes at the class's size
    (past the batch): generated ones made again at that size, pushed ones
    zero-padded or cut at the end of each dimension that differs. Unchanged
    when the shapes do not fit the model (the TFLite ladder fails the build
    with the reason) or already fit the samples."""
    if not shapes or check_against_model(shapes, [(t.name, t.shape) for t in inputs]):
        return samples
    # Only the inputs this model has (a class's shapes serve all its models).
    fixed = {name: dims for name, dims in shapes if name in samples.arrays}

    def per_sample(name: str, dims: Sequence[int]) -> tuple[int, ...]:
        # One sample's dims as held: past the batch, or whole for an input
        # fed as it is (Samples.as_is).
        return tuple(dims if name in samples.as_is else dims[1:])

    changed = {
        name: dims
        for name, dims in fixed.items()
        if tuple(samples.arrays[name].shape[1:]) != per_sample(name, dims)
    }
    if not changed:
        return samples
    arrays = dict(samples.arrays)
    if samples.generated:
        log(
            "samples: generated at the class's input shapes ("
            + ", ".join(f"{n} {format_dims(d)}" for n, d in sorted(changed.items()))
            + ")"
        )
        remade = generate_samples(
            [t for t in shaped_inputs(inputs, shapes) if t.name in changed], count=len(samples)
        )
        arrays.update(remade.arrays)
        return dataclasses.replace(samples, arrays=arrays)
    for name, dims in sorted(changed.items()):
        before = arrays[name].shape[1:]
        arrays[name] = fit_array(arrays[name], per_sample(name, dims))
        log(
            f"samples: input {name!r} {format_dims(before)} -> "
            f"{format_dims(per_sample(name, dims))} (zero-padded or cut at the end) to fit the "
            f"class's input shape {format_dims(dims)}; the reference and every candidate run "
            "on the fitted samples"
        )
    return dataclasses.replace(samples, arrays=arrays)
