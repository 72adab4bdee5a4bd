"""How a sample array's shape says what it holds for its model input, decided
from ranks alone (docs/operators/models.md#sample-data). Checked at push time
(onnx_inspect.inspect_sample_data, over the arrays' headers) and followed at
build time (build.samples.load_samples), so the two never disagree.

For an input of model rank r:

- rank r, where the model's dim 0 is 1 or dynamic (a batch axis): samples
  replace the batch axis, each fed as a batch of one (BATCH);
- rank r + 1: samples on axis 0, each `array[i]` fed exactly as is (EACH):
  a scalar input's samples are shaped (n,);
- rank r, where the input has no batch axis (rank 0, or dim 0 fixed and not
  1), matching its fixed dims: one value fed with every sample (CONSTANT);
- rank r + 2, for a model with state (an output fed back into an input) and
  an input that is not a state input: (sequences, steps, *model shape), a
  sequence of steps per entry (STEPS);
- absent, for a state input: zeros of its shape (ZEROS).

When some input is given as sequences, every other per-sample array holds
one entry per sequence (the same for each of its steps).

Pure functions: no gRPC, no SQL, no array data read."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.controlplane.errors import InvalidArgument

DOCS = "docs/operators/models.md#sample-data"


class Layout(enum.StrEnum):
    BATCH = "batch"  # rank r: samples replace the batch axis
    EACH = "each"  # rank r + 1: each array[i] fed as is
    CONSTANT = "constant"  # the input's own shape: fed with every sample
    STEPS = "steps"  # rank r + 2: (sequences, steps, *shape)
    ZEROS = "zeros"  # a state input left out: zeros


@dataclass(frozen=True)
class Spec:
    """What the rules need of a model input."""

    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for dynamic


@dataclass(frozen=True)
class InputPlan:
    name: str
    layout: Layout
    # The array's shape (the zeros' shape for ZEROS).
    shape: tuple[int, ...]

    @property
    def count(self) -> int | None:
        """Entries on axis 0 (samples, or sequences); None for one value."""
        if self.layout in (Layout.CONSTANT, Layout.ZEROS):
            return None
        return self.shape[0]


@dataclass(frozen=True)
class SamplePlan:
    """How every input's array is read, and how many samples they make."""

    inputs: dict[str, InputPlan]
    # Entries on the per-sample arrays' axis 0: sequences when steps > 1 or
    # any input is given as STEPS, samples otherwise.
    sequences: int
    steps: int
    has_labels: bool

    @property
    def num_samples(self) -> int:
        return self.sequences * self.steps

    @property
    def in_sequences(self) -> bool:
        return any(p.layout is Layout.STEPS for p in self.inputs.values())


def has_batch_axis(shape: Sequence[int]) -> bool:
    """Whether dim 0 of a model input stands for the batch: 1 or dynamic."""
    return len(shape) > 0 and shape[0] in (1, -1)


def accepted(spec: Spec, *, stateful: bool, state_input: bool) -> str:
    """The shapes the rules accept for `spec`, for an error message."""
    shape = list(spec.shape)
    r = len(shape)
    forms: list[str] = []
    if has_batch_axis(shape):
        forms.append(f"rank {r} (samples, {', '.join(map(str, shape[1:]))}) replacing the batch")
    else:
        forms.append(f"rank {r}: exactly {shape}, one value fed with every sample")
    forms.append(f"rank {r + 1} (samples, {', '.join(map(str, shape))}), each fed as is")
    if stateful and not state_input:
        forms.append(f"rank {r + 2} (sequences, steps, {', '.join(map(str, shape))})")
    if state_input:
        forms.append("no array (zeros)")
    return "; ".join(f.replace("(samples, )", "(samples,)") for f in forms)


def plan(
    specs: Sequence[Spec],
    arrays: Mapping[str, tuple[tuple[int, ...], np.dtype[Any]]],
    state: Sequence[tuple[str, str]] = (),
) -> SamplePlan:
    """Check every array against its input by the rules above and say how
    each is read. `arrays` maps a name to its (shape, dtype), `labels`
    included; `state` holds (output, input) pairs of the model's state.
    Raises InvalidArgument naming the input, its array's shape, the model's
    shape and the shapes accepted."""
    expected = {s.name for s in specs}
    state_inputs = {inp for _, inp in state}
    missing = sorted(s.name for s in specs if s.name not in arrays and s.name not in state_inputs)
    if missing:
        raise InvalidArgument(
            f"sample data lacks arrays for model inputs {missing}; it has {sorted(arrays)} "
            "(name each array after a model input)"
        )
    extra = sorted(arrays.keys() - expected - {"labels"})
    if extra:
        raise InvalidArgument(
            f"sample data has arrays {extra} that are not model inputs "
            f"({sorted(expected)}) or 'labels'"
        )
    plans: dict[str, InputPlan] = {}
    for spec in specs:
        if spec.name not in arrays:
            plans[spec.name] = _zeros(spec)
            continue
        shape, dtype = arrays[spec.name]
        if dtype.name != spec.dtype:
            raise InvalidArgument(
                f"sample data {spec.name!r} is {dtype.name}; the model input is {spec.dtype}"
            )
        plans[spec.name] = _classify(
            spec, tuple(shape), stateful=bool(state), state_input=spec.name in state_inputs
        )
    sequences, steps = _count(specs, plans)
    labels = arrays.get("labels")
    if labels is not None:
        label_shape = tuple(labels[0])
        in_sequences = any(p.layout is Layout.STEPS for p in plans.values())
        want = (sequences, steps) if in_sequences else (sequences,)
        if label_shape[: len(want)] != want:
            what = (
                f"{sequences} x {steps} entries, (sequences, steps)"
                if in_sequences
                else (f"{sequences} entries, one per sample")
            )
            raise InvalidArgument(
                f"sample data 'labels' has shape {list(label_shape)}; expected {what}"
            )
    return SamplePlan(plans, sequences, steps, labels is not None)


def _zeros(spec: Spec) -> InputPlan:
    if any(d < 0 for d in spec.shape):
        raise InvalidArgument(
            f"sample data has no array for state input {spec.name!r}, and its model shape "
            f"{list(spec.shape)} has dynamic dimensions, so its zeros' shape is unknown: "
            f"give its initial value, e.g. np.zeros({_example(spec.shape)}, {spec.dtype!r}) "
            f"(one value for every sequence), or one per sequence ({DOCS})"
        )
    return InputPlan(spec.name, Layout.ZEROS, spec.shape)


def _example(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d if d >= 0 else 1 for d in shape)


def _classify(
    spec: Spec, shape: tuple[int, ...], *, stateful: bool, state_input: bool
) -> InputPlan:
    r = len(spec.shape)
    if len(shape) == r and has_batch_axis(spec.shape):
        _match(spec, shape, shape[1:], spec.shape[1:], 1, stateful, state_input)
        return InputPlan(spec.name, Layout.BATCH, shape)
    if len(shape) == r:
        _match(spec, shape, shape, spec.shape, 0, stateful, state_input)
        return InputPlan(spec.name, Layout.CONSTANT, shape)
    if len(shape) == r + 1:
        _match(spec, shape, shape[1:], spec.shape, 1, stateful, state_input)
        return InputPlan(spec.name, Layout.EACH, shape)
    if len(shape) == r + 2 and stateful and not state_input:
        _match(spec, shape, shape[2:], spec.shape, 2, stateful, state_input)
        return InputPlan(spec.name, Layout.STEPS, shape)
    raise InvalidArgument(
        f"sample data {spec.name!r} has shape {list(shape)} (rank {len(shape)}); the model "
        f"input is {list(spec.shape)} (rank {r}); accepted: "
        f"{accepted(spec, stateful=stateful, state_input=state_input)} ({DOCS})"
    )


def _match(
    spec: Spec,
    shape: tuple[int, ...],
    got: Sequence[int],
    want: Sequence[int],
    offset: int,
    stateful: bool,
    state_input: bool,
) -> None:
    for axis, (g, w) in enumerate(zip(got, want, strict=True)):
        if w >= 0 and g != w:
            raise InvalidArgument(
                f"sample data {spec.name!r} has shape {list(shape)}; the model input is "
                f"{list(spec.shape)} (axis {axis + offset}: {g} != {w}); accepted: "
                f"{accepted(spec, stateful=stateful, state_input=state_input)} ({DOCS})"
            )


def _count(specs: Sequence[Spec], plans: Mapping[str, InputPlan]) -> tuple[int, int]:
    """(entries on axis 0, steps per entry), the same for every array."""
    counted = [(s.name, plans[s.name]) for s in specs if plans[s.name].count is not None]
    if not counted:
        return 1, 1  # constants alone: one sample
    counts = {p.shape[0] for _, p in counted}
    steps = {p.shape[1] for _, p in counted if p.layout is Layout.STEPS}
    in_sequences = bool(steps)
    if len(counts) > 1 or len(steps) > 1:
        what = "sequence" if in_sequences else "sample"
        held = ", ".join(f"{name!r} {list(p.shape)} ({_describe(p)})" for name, p in counted)
        raise InvalidArgument(
            f"sample data inputs disagree on the {what} count: {held}; every per-sample "
            f"array needs the same number of entries on axis 0 ({DOCS})"
        )
    (count,) = counts
    if count == 0 or 0 in steps:
        raise InvalidArgument("sample data holds no samples")
    return count, (steps.pop() if steps else 1)


def _describe(p: InputPlan) -> str:
    if p.layout is Layout.STEPS:
        return f"{p.shape[0]} sequences of {p.shape[1]} steps"
    return f"{p.shape[0]} entries"
