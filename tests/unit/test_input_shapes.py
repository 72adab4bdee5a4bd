"""A device class's input shapes (issue 22, item 3): parsing and validation,
the check against a model, the push warnings, and what a TFLite build
converts at (conversion_shapes: no converter needed to tell)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.runtimes import TensorInfo as RuntimeTensorInfo
from edgefleet.agent.serving import InvalidInput, check_inputs
from edgefleet.controlplane.build.samples import Samples
from edgefleet.controlplane.build.shapes import fit_samples, shaped_inputs
from edgefleet.controlplane.build.tflite_ladder import conversion_shapes
from edgefleet.controlplane.build.toolchain import safe_copy
from edgefleet.controlplane.build.types import BuildTarget, TensorShape
from edgefleet.controlplane.db.models import ModelVersionRow
from edgefleet.controlplane.domain.input_shapes import (
    MAX_DIM,
    MAX_INPUT_SHAPES,
    check_against_model,
    describe_input_shapes,
    parse_input_shape,
    push_warnings,
    unused,
    validate_input_shapes,
)
from edgefleet.controlplane.domain.onnx_inspect import TensorInfo
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services.builds import dedup_key
from edgefleet.controlplane.services.classes import Constraints

DETECTOR = [("images", (-1, 3, 48, -1))]


def test_parse() -> None:
    assert parse_input_shape("images=1x3x48x320") == ("images", (1, 3, 48, 320))
    assert parse_input_shape("a=b=1,2") == ("a=b", (1, 2))  # the last = splits
    for bad, says in (
        ("images", "NAME=DIMS"),
        ("=1x2", "NAME=DIMS"),
        ("images=1xx2", "whole numbers"),
        ("images=1x3.5", "whole numbers"),
        ("images=", "whole numbers"),
    ):
        with pytest.raises(ValueError, match=says):
            parse_input_shape(bad)


def test_validate_sorts_and_refuses_with_the_reason() -> None:
    assert validate_input_shapes([("z", [1, 2]), ("a", (3,))]) == (("a", (3,)), ("z", (1, 2)))
    assert validate_input_shapes([]) == ()
    cases: list[tuple[list[tuple[str, list[int]]], str]] = [
        ([("x", [1, 0])], "dimension 1 is 0"),
        ([("x", [1, -1])], "not -1"),
        ([("x", [1, MAX_DIM + 1])], f"from 1 to {MAX_DIM}"),
        ([("x", [])], "at least one dimension"),
        ([("x", [1] * 9)], "rank 9 is more than 8"),
        ([("", [1])], "needs the input's name"),
        ([("n" * 257, [1])], "at most 256"),
        ([("a\x00b", [1])], "NUL"),
        ([("x", [1]), ("x", [2])], "given twice"),
        ([(f"i{k}", [1]) for k in range(MAX_INPUT_SHAPES + 1)], "at most 32 input shapes"),
    ]
    for shapes, says in cases:
        with pytest.raises(ValueError, match=says):
            validate_input_shapes(shapes)
    assert len(validate_input_shapes([(f"i{k}", [1] * 8) for k in range(32)])) == 32
    # The class service's check: INVALID_ARGUMENT with the same reason.
    with pytest.raises(InvalidArgument, match="input shapes: input 'x' is given twice"):
        Constraints(runtime="tflite", input_shapes=(("x", (1,)), ("x", (2,)))).validate()
    with pytest.raises(InvalidArgument, match="dimension 0 is True"):
        Constraints(runtime="tflite", input_shapes=(("x", (True,)),)).validate()  # type: ignore[arg-type]


def test_check_against_model() -> None:
    assert check_against_model((("images", (1, 3, 48, 320)),), DETECTOR) == []
    # A dynamic batch takes any size the class gives.
    assert check_against_model((("images", (4, 3, 48, 320)),), DETECTOR) == []
    # A shape for an input the model lacks is for another model of the class.
    assert check_against_model((("image", (1, 3, 48, 320)),), DETECTOR) == []
    assert unused((("image", (1, 3, 48, 320)),), DETECTOR) == ["image"]
    (rank,) = check_against_model((("images", (1, 48, 320)),), DETECTOR)
    assert "(rank 3) but the model's is ?x3x48x? (rank 4)" in rank
    (fixed,) = check_against_model((("images", (1, 1, 32, 320)),), DETECTOR)
    assert "dimension 1 is 3, not 1; dimension 2 is 48, not 32" in fixed


def test_push_warnings_say_what_each_tflite_class_fixes() -> None:
    classes = [
        ("ocr", (("images", (1, 3, 48, 320)),)),
        ("pi", ()),
        ("typo", (("image", (1, 3, 48, 320)),)),
    ]
    ocr, pi, typo, typo_fixes = push_warnings(DETECTOR, classes, has_samples=True, generated_dim=16)
    assert "'ocr'" in ocr and "images ?x3x48x? -> 1x3x48x320 (class)" in ocr
    assert "images ?x3x48x? -> the samples' shape" in pi and "--input-shape NAME=DIMS" in pi
    assert typo == (
        "TFLite class 'typo' fixes input 'image', which this model does not have (its inputs: "
        "'images'): not used for it"
    )
    assert "images ?x3x48x? -> the samples' shape" in typo_fixes
    (generated,) = push_warnings(DETECTOR, classes[1:2], has_samples=False, generated_dim=16)
    assert "images ?x3x48x? -> ?x3x48x16 (no samples)" in generated
    # A dynamic batch alone stays dynamic: nothing to warn about.
    assert push_warnings([("x", (-1, 64))], classes[1:2], has_samples=True, generated_dim=16) == []
    assert describe_input_shapes(classes[0][1]) == "images=1x3x48x320"


def _samples(width: int, *, generated: bool = False) -> Samples:
    rng = np.random.default_rng(0)
    return Samples({"images": rng.random((5, 3, 48, width), dtype=np.float32)}, None, generated)


def test_fit_samples_pads_cuts_or_regenerates() -> None:
    inputs = [TensorInfo("images", "float32", (-1, 3, 48, -1), ("N", "", "", "W"))]
    log: list[str] = []
    shapes = (("images", (1, 3, 48, 320)),)
    pushed = _samples(192)
    fitted = fit_samples(pushed, inputs, shapes, log.append)
    array = fitted.arrays["images"]
    assert array.shape == (5, 3, 48, 320) and array.flags.c_contiguous
    assert np.array_equal(array[..., :192], pushed.arrays["images"])
    assert not array[..., 192:].any()
    assert "images' 3x48x192 -> 3x48x320 (zero-padded or cut at the end)" in log[0]
    cut = fit_samples(pushed, inputs, (("images", (1, 3, 48, 100)),), log.append)
    assert np.array_equal(cut.arrays["images"], pushed.arrays["images"][..., :100])
    generated = fit_samples(_samples(16, generated=True), inputs, shapes, log.append)
    assert generated.generated and generated.arrays["images"].shape == (5, 3, 48, 320)
    assert generated.arrays["images"][..., 200:].any()  # made at the size, not padded
    # Shapes that already fit, none, or ones the model refuses: unchanged.
    same = _samples(320)
    assert fit_samples(same, inputs, shapes, log.append) is same
    assert fit_samples(pushed, inputs, (), log.append) is pushed
    assert fit_samples(pushed, inputs, (("images", (1, 1, 48, 320)),), log.append) is pushed
    assert shaped_inputs(inputs, shapes)[0].shape == (-1, 3, 48, 320)


def test_conversion_shapes_keep_the_batch_and_say_so() -> None:
    inputs = [TensorInfo("images", "float32", (-1, 3, 48, -1), ("N", "", "", "W"))]
    target = BuildTarget("ocr", "tflite", input_shapes=(("images", (1, 3, 48, 320)),))
    kept = conversion_shapes(inputs, _samples(320), target, keep_batch=True)
    assert kept.dynamic_batch and kept.inputs[0].shape == (-1, 3, 48, 320)
    assert kept.accepted == (TensorShape("images", "float32", (-1, 3, 48, 320), ("N", "", "", "")),)
    assert kept.notes == (
        "input images fixed to [1,3,48,320] (class input shape), batch kept dynamic",
    )
    fixed = conversion_shapes(
        inputs, _samples(192), BuildTarget("pi", "tflite"), keep_batch=False, why_fixed="no"
    )
    assert not fixed.dynamic_batch and fixed.inputs[0].shape == (1, 3, 48, 192)
    assert fixed.notes == (
        "input images fixed to [1,3,48,192] (the samples' shape), batch fixed to 1 (no)",
    )
    static = [TensorInfo("x", "float32", (1, 8), ("", ""))]
    plain = conversion_shapes(
        static, Samples({"x": np.zeros((2, 8), np.float32)}, None, True), target, keep_batch=True
    )
    assert plain.inputs[0].shape == (1, 8) and plain.notes == () and not plain.dynamic_batch


def test_targets_round_trip_and_keys_change_only_with_shapes() -> None:
    target = BuildTarget("ocr", "tflite", input_shapes=(("images", (1, 3, 48, 320)),))
    stored = json.loads(json.dumps(target.to_json()))
    assert BuildTarget.from_json(stored) == target
    # A row stored before input shapes existed.
    old = {k: v for k, v in BuildTarget("pi", "tflite").to_json().items() if k != "input_shapes"}
    assert BuildTarget.from_json(old) == BuildTarget("pi", "tflite")
    mv = ModelVersionRow(model_digest="m", sample_data_digest=None)
    plain = dedup_key(mv, BuildTarget("pi", "tflite"), {})
    assert dedup_key(mv, BuildTarget("other", "tflite"), {}) == plain
    assert dedup_key(mv, target, {}) != plain
    other = BuildTarget("ocr", "tflite", input_shapes=(("images", (1, 3, 48, 640)),))
    assert dedup_key(mv, other, {}) != dedup_key(mv, target, {})


def test_safe_copy_fixes_all_but_the_batch_and_names_a_nameless_one(tmp_path: Path) -> None:
    """The converter's copy: past the batch, the given sizes; a batch left
    dynamic keeps its name, or gets one where the exporter wrote -1 (as
    Paddle's do, which onnx2tf took for a size: "Dimension -1 must be >= 0")."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, None, None])
    y.type.tensor_type.shape.dim[0].dim_value = -1  # the Paddle habit
    out = helper.make_tensor_value_info("s", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["s"])], "g", [x, y], [out])
    source, copy = tmp_path / "m.onnx", tmp_path / "copy.onnx"
    onnx.save(helper.make_model(graph), str(source))
    safe_copy(source, copy, {"x": (-1, 3, 48, 320), "y": (-1, 3, 48, 320)})
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in onnx.load(str(copy)).graph.input
    }
    assert dims == {"x": ["N", 3, 48, 320], "y": ["dynamic_0", 3, 48, 320]}
    safe_copy(source, copy, {"x": (1, 3, 48, 320)})
    fixed = onnx.load(str(copy)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in fixed] == [1, 3, 48, 320]


def test_a_device_says_when_the_artifact_is_stricter_than_the_model() -> None:
    """A TFLite artifact whose batch could not stay dynamic takes one row
    where the model's spec allows any: the refusal says both."""
    accepts = [RuntimeTensorInfo("input", "float32", (1, 64))]
    model = [RuntimeTensorInfo("input", "float32", (-1, 64))]
    rows = {"input": np.zeros((8, 64), np.float32)}
    with pytest.raises(InvalidInput, match=r"the artifact on this device takes \[1, 64\]"):
        check_inputs(accepts, rows, declared=model)
    check_inputs(model, rows, declared=model)  # a dynamic batch: any rows
