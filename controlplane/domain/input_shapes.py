"""A device class's input shapes: the static sizes a TFLite build fixes a
model's dynamic input dimensions to (`classes create --input-shape
images=1x3x48x320`). TFLite runs a graph with the shapes it was converted
with, so a text detector that takes any width as ONNX takes one width as
TFLite: the class says which.

A shape is a build constraint (ConstraintProfile.input_shapes): changing it
rebuilds. Pure functions: the CLI parses with them, the class service
validates with them and the TFLite build checks them against the model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Bounds on what a class may store: generous for real models (rank 8 covers
# every ONNX tensor in practice, 65536 the widest image or longest
# sequence), small enough that a typo (an extra 0) or a hostile request
# cannot make a build allocate gigabytes.
MAX_INPUT_SHAPES = 32
MAX_RANK = 8
MAX_DIM = 65536
MAX_NAME_LENGTH = 256

# (input name, dims), sorted by name: the form a class and a build target hold.
InputShapes = tuple[tuple[str, tuple[int, ...]], ...]


def format_dims(dims: Iterable[int]) -> str:
    """(1, 3, 48, 320) -> "1x3x48x320" (-1, a free dimension, as "?")."""
    return "x".join("?" if d < 0 else str(d) for d in dims)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`images=1x3x48x320` -> ("images", (1, 3, 48, 320)). The name is
    everything before the last `=` (ONNX names may hold one); dims are
    separated by `x` or `,`. ValueError saying what is wrong; the bounds
    are validate_input_shapes'."""
    name, sep, dims_text = text.rpartition("=")
    if not sep or not name:
        raise ValueError(f"{text!r} must look like NAME=DIMS, e.g. images=1x3x48x320")
    parts = dims_text.replace(",", "x").split("x")
    try:
        dims = tuple(int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"{text!r}: the dimensions must be whole numbers separated by x, e.g. 1x3x48x320"
        ) from None
    return name, dims


def validate_input_shapes(shapes: Sequence[tuple[str, Sequence[int]]]) -> InputShapes:
    """The shapes in their stored form (sorted by name, dims as ints);
    ValueError saying what is wrong: an empty, over-long or NUL-holding
    name, a name given twice, no dimensions, more than MAX_RANK of them, a
    dimension that is not a positive whole number up to MAX_DIM, or more
    than MAX_INPUT_SHAPES inputs."""
    if len(shapes) > MAX_INPUT_SHAPES:
        raise ValueError(
            f"a class fixes at most {MAX_INPUT_SHAPES} input shapes, got {len(shapes)}"
        )
    seen: set[str] = set()
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, dims in shapes:
        if not name:
            raise ValueError("an input shape needs the input's name")
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(
                f"input name {name[:40]!r}... is {len(name)} characters; at most {MAX_NAME_LENGTH}"
            )
        if "\x00" in name:
            raise ValueError(f"input name {name!r} holds a NUL character")
        if name in seen:
            raise ValueError(f"input {name!r} is given twice; give each input one shape")
        seen.add(name)
        if not dims:
            raise ValueError(f"input {name!r}: a shape needs at least one dimension")
        if len(dims) > MAX_RANK:
            raise ValueError(f"input {name!r}: rank {len(dims)} is more than {MAX_RANK}")
        for axis, dim in enumerate(dims):
            # bool is an int subclass; True is no size.
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= MAX_DIM:
                raise ValueError(
                    f"input {name!r}: dimension {axis} is {dim!r}; each is a whole number "
                    f"from 1 to {MAX_DIM} (a fixed size, not -1)"
                )
        out.append((name, tuple(int(d) for d in dims)))
    return tuple(sorted(out))


def describe_input_shapes(shapes: InputShapes) -> str:
    """`images=1x3x48x320, mask=1x48` (empty: "")."""
    return ", ".join(f"{name}={format_dims(dims)}" for name, dims in shapes)


def check_against_model(
    shapes: InputShapes, inputs: Sequence[tuple[str, Sequence[int]]]
) -> list[str]:
    """What disagrees between a class's shapes and a model's inputs (name,
    shape with -1 for a dynamic dimension): a shape of another rank, or one
    whose size differs from a dimension the model fixes. Empty when they
    fit. A shape naming an input the model does not have is not for this
    model (a class holds many models): `unused` names those."""
    model = {name: tuple(shape) for name, shape in inputs}
    problems: list[str] = []
    for name, dims in shapes:
        shape = model.get(name)
        if shape is None:
            continue
        if len(shape) != len(dims):
            problems.append(
                f"the class fixes input {name!r} to {format_dims(dims)} (rank {len(dims)}) "
                f"but the model's is {format_dims(shape)} (rank {len(shape)})"
            )
            continue
        fixed = [
            f"dimension {axis} is {size}, not {want}"
            for axis, (size, want) in enumerate(zip(shape, dims, strict=True))
            if size >= 0 and size != want
        ]
        if fixed:
            problems.append(
                f"the class fixes input {name!r} to {format_dims(dims)} but the model's "
                f"shape is {format_dims(shape)}: {'; '.join(fixed)}"
            )
    return problems


def unused(shapes: InputShapes, inputs: Sequence[tuple[str, Sequence[int]]]) -> list[str]:
    """The class's shapes naming an input the model does not have."""
    names = {name for name, _ in inputs}
    return [name for name, _ in shapes if name not in names]


def push_warnings(
    inputs: Sequence[tuple[str, Sequence[int]]],
    tflite_classes: Sequence[tuple[str, InputShapes]],
    *,
    has_samples: bool,
    generated_dim: int,
) -> list[str]:
    """What a TFLite build will fix in a model just pushed, one line per
    TFLite class (name, its input shapes) when the model has an input with a
    dynamic dimension past the batch, or a class shape that does not fit
    (that build will fail). A dynamic batch alone is no warning: it stays
    dynamic where the converter can keep it."""
    free = [(name, tuple(shape)) for name, shape in inputs if any(d < 0 for d in shape[1:])]
    warnings: list[str] = []
    for class_name, shapes in tflite_classes:
        problems = check_against_model(shapes, inputs)
        if problems:
            warnings.append(
                f"TFLite class {class_name!r}: its build will fail: {'; '.join(problems)} "
                f"(edgefleet classes update {class_name} --input-shape NAME=DIMS or "
                "--clear input-shapes)"
            )
            continue
        names = ", ".join(repr(n) for n, _ in inputs) or "none"
        warnings += [
            f"TFLite class {class_name!r} fixes input {name!r}, which this model does not have "
            f"(its inputs: {names}): not used for it"
            for name in unused(shapes, inputs)
        ]
        fixed = dict(shapes)
        parts = []
        for name, shape in free:
            if name in fixed:
                parts.append(f"{name} {format_dims(shape)} -> {format_dims(fixed[name])} (class)")
            elif has_samples:
                parts.append(f"{name} {format_dims(shape)} -> the samples' shape")
            else:
                # The batch stays as the model has it (kept dynamic where
                # the converter can).
                dims = (shape[0], *(d if d >= 0 else generated_dim for d in shape[1:]))
                parts.append(f"{name} {format_dims(shape)} -> {format_dims(dims)} (no samples)")
        if parts and any(name not in fixed for name, _ in free):
            warnings.append(
                f"TFLite class {class_name!r} takes static shapes; its build fixes the dynamic "
                f"dimensions: {', '.join(parts)}; set them with `edgefleet classes update "
                f"{class_name} --input-shape NAME=DIMS`"
            )
        elif parts:
            warnings.append(
                f"TFLite class {class_name!r} takes static shapes; its build fixes "
                f"{', '.join(parts)}"
            )
    return warnings
