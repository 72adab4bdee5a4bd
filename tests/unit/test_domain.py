"""Pure domain logic: match rules, classification, semver, secrets, ONNX checks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.controlplane.domain import onnx_inspect, rules, secrets, semver
from edgefleet.controlplane.domain.rules import ClassCandidate, Op, parse_rule
from edgefleet.controlplane.errors import InvalidArgument

PI = {"os": "Linux", "arch": "aarch64", "memory_mb": 3900, "board_model": "Raspberry Pi 4 Model B"}
JETSON = {"arch": "aarch64", "memory_mb": 7600, "accelerators": [{"kind": "jetson"}]}
GATEWAY = {"arch": "x86_64", "memory_mb": 16000}


@pytest.mark.parametrize(
    ("text", "field", "op", "values"),
    [
        ("arch == aarch64", "arch", Op.EQ, ("aarch64",)),
        ("arch=x86_64", "arch", Op.EQ, ("x86_64",)),
        ("memory_mb < 4096", "memory_mb", Op.LT, ("4096",)),
        ("memory_mb>=4096", "memory_mb", Op.GE, ("4096",)),
        ("label.tier in canary, beta", "label.tier", Op.IN, ("canary", "beta")),
        ("label.tier not in prod", "label.tier", Op.NOT_IN, ("prod",)),
        ("accelerator exists", "accelerator", Op.EXISTS, ()),
        ("board_model glob Raspberry Pi*", "board_model", Op.GLOB, ("Raspberry Pi*",)),
    ],
)
def test_parse_rule(text: str, field: str, op: Op, values: tuple[str, ...]) -> None:
    rule = parse_rule(text)
    assert (rule.field, rule.op, rule.values) == (field, op, values)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour == red", "unknown match field"),
        ("memory_mb < lots", "compares numbers"),
        ("arch ==", "exactly one value"),
        ("just words", "cannot parse"),
        ("label. == x", "unknown match field"),
    ],
)
def test_parse_rule_rejects_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_rule(text)


def _facts(hw: dict[str, object], labels: dict[str, str] | None = None) -> dict[str, object]:
    return rules.device_facts(hw, {"onnxruntime_version": "1.20"}, labels or {})


def test_rules_match_hardware_and_labels() -> None:
    pi = _facts(PI, {"tier": "canary"})
    assert rules.rule_matches(parse_rule("memory_mb < 4096"), pi)
    assert not rules.rule_matches(parse_rule("memory_mb < 2048"), pi)
    assert rules.rule_matches(parse_rule("label.tier == canary"), pi)
    assert rules.rule_matches(parse_rule("board_model glob Raspberry*"), pi)
    assert rules.rule_matches(parse_rule("runtime.onnxruntime exists"), pi)
    # A missing fact satisfies only negative rules.
    assert not rules.rule_matches(parse_rule("accelerator exists"), pi)
    assert rules.rule_matches(parse_rule("accelerator != jetson"), pi)
    assert not rules.rule_matches(parse_rule("label.zone == eu"), pi)
    jetson = _facts(JETSON)
    assert rules.rule_matches(parse_rule("accelerator == jetson"), jetson)
    assert not rules.rule_matches(parse_rule("accelerator not in jetson,nvidia-gpu"), jetson)


def test_classify_picks_highest_priority_match() -> None:
    classes = [
        ClassCandidate("1", "arm-small", 0, (parse_rule("arch == aarch64"),)),
        ClassCandidate(
            "2", "jetson", 10, (parse_rule("arch == aarch64"), parse_rule("accelerator exists"))
        ),
        ClassCandidate("3", "pinned-only", 100, ()),
    ]
    assert rules.classify(_facts(JETSON), classes).name == "jetson"  # type: ignore[union-attr]
    assert rules.classify(_facts(PI), classes).name == "arm-small"  # type: ignore[union-attr]
    assert rules.classify(_facts(GATEWAY), classes) is None


def test_rules_round_trip_json() -> None:
    original = (parse_rule("arch == aarch64"), parse_rule("label.t in a,b"))
    assert rules.rules_from_json(rules.rules_to_json(original)) == original


@pytest.mark.parametrize("good", ["1.0.0", "0.1.2", "10.20.30-rc.1+build.5", "1.0.0-alpha"])
def test_semver_accepts(good: str) -> None:
    semver.validate(good)


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "01.0.0", "1.0.0-", "latest", ""])
def test_semver_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="semantic version"):
        semver.validate(bad)


def test_semver_sort_key_orders_like_semver() -> None:
    ordered = ["0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0", "2.0.0"]  # fmt: skip
    assert sorted(ordered, key=semver.sort_key) == ordered


def test_secrets_parse_and_match() -> None:
    token = secrets.issue(secrets.SecretKind.DEVICE, "abc123")
    assert secrets.parse_id(secrets.SecretKind.DEVICE, token) == "abc123"
    assert secrets.parse_id(secrets.SecretKind.OPERATOR, token) is None
    stored = secrets.hash_secret(token)
    assert secrets.matches(token, stored)
    assert not secrets.matches(token + "x", stored)
    assert token not in stored


def _write_model(path: Path, dims: list[int | str]) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_inspect_model_reads_spec(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _write_model(path, ["batch", 3, 4])
    info = onnx_inspect.inspect_model(path)
    assert info.opset == 17
    (x,) = info.inputs
    assert (x.name, x.dtype, x.shape, x.dim_names) == (
        "x",
        "float32",
        (-1, 3, 4),
        ("batch", "", ""),
    )


def test_inspect_model_rejects_garbage_and_broken_graphs(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf at all \x00\xff")
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        onnx_inspect.inspect_model(garbage)
    broken = tmp_path / "broken.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["nope"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), broken)
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        onnx_inspect.inspect_model(broken)


def test_sample_data_must_fit_the_model(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _write_model(path, ["batch", 3])
    info = onnx_inspect.inspect_model(path)
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 3), np.float32), labels=np.arange(5))
    assert onnx_inspect.inspect_sample_data(good, info) == onnx_inspect.SampleInfo(5, True)
    cases = {
        "wrong_shape": ({"x": np.zeros((5, 4), np.float32)}, "axis 1: 4 != 3"),
        "wrong_dtype": ({"x": np.zeros((5, 3), np.float64)}, "float64"),
        "missing": ({"y": np.zeros((5, 3), np.float32)}, "lacks arrays"),
        "labels": ({"x": np.zeros((5, 3), np.float32), "labels": np.arange(4)}, "5 entries"),
    }
    for name, (arrays, message) in cases.items():
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, **arrays)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match=message):
            onnx_inspect.inspect_sample_data(bad, info)
    not_npz = tmp_path / "x.npz"
    not_npz.write_text("hello")
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz"):
        onnx_inspect.inspect_sample_data(not_npz, info)


# -- sample data shapes, decided from ranks (docs/operators/models.md#sample-data) ---------------


def _write_vad_like(path: Path) -> onnx_inspect.ModelInfo:
    """A model with silero-vad's inputs and outputs: `input [-1, -1]` (a
    batch axis), `state [2, -1, 128]` (no batch axis, fed back from
    `stateN`), a scalar `sr`."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=1),
            helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["mean", "rate"], ["output"]),
            helper.make_node("Identity", ["state"], ["stateN"]),
        ],
        "vad",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", "n"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "b", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "b", 128]),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return onnx_inspect.inspect_model(path)


F32, I64 = np.float32, np.int64


@pytest.mark.parametrize(
    ("arrays", "count", "steps"),
    [
        # Samples replacing the batch axis; constants of the inputs' own shape.
        ({"input": (5, 512), "state": (2, 1, 128), "sr": ()}, 5, 1),
        # Samples on a new axis 0, each fed as is.
        ({"input": (5, 1, 512), "state": (5, 2, 1, 128), "sr": (5,)}, 5, 1),
        # Sequences of steps; the state one per sequence, or one constant.
        ({"input": (4, 8, 1, 512), "state": (4, 2, 1, 128), "sr": ()}, 32, 8),
        ({"input": (4, 8, 1, 512), "state": (2, 1, 128), "sr": (4,), "labels": (4, 8)}, 32, 8),
    ],
)
def test_sample_shapes_follow_the_rank_rules(
    tmp_path: Path, arrays: dict[str, tuple[int, ...]], count: int, steps: int
) -> None:
    info = _write_vad_like(tmp_path / "vad.onnx")
    assert onnx_inspect.state_pairs(info) == (("stateN", "state"),)
    dtypes = {"sr": I64, "labels": I64}
    path = tmp_path / "samples.npz"
    np.savez(path, **{k: np.zeros(s, dtypes.get(k, F32)) for k, s in arrays.items()})  # type: ignore[arg-type]
    got = onnx_inspect.inspect_sample_data(path, info)
    assert (got.num_samples, got.steps, got.has_labels) == (count, steps, "labels" in arrays)


def _absurd_npz(path: Path, name: str, shape: tuple[int, ...]) -> None:
    """An .npz whose member `name` declares `shape` of float32 (and holds no data)."""
    import io
    import zipfile

    from numpy.lib import format as npy_format

    header = io.BytesIO()
    npy_format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.npy", header.getvalue())


# Samples fit for the VAD-like model, which each case below breaks one way.
FIT = {"input": np.zeros((5, 512), F32), "state": np.zeros((2, 1, 128), F32), "sr": I64(1)}
STEPS = {**FIT, "input": np.zeros((4, 8, 1, 512), F32)}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({**FIT, "state": None}, "state input 'state'.*dynamic"),
        ({**FIT, "input": None}, r"lacks arrays.*\['input'\]"),
        ({**FIT, "state": np.zeros((2, 1, 128))}, "'state' is float64; the model input is float32"),
        ({**FIT, "sr": np.int32(1)}, "'sr' is int32; the model input is int64"),
        (
            {**FIT, "state": np.zeros((2, 128), F32)},
            r"'state' has shape \[2, 128\] \(rank 2\); the model input is \[2, -1, 128\] "
            r"\(rank 3\); accepted: rank 3: exactly \[2, -1, 128\]",
        ),
        (
            {**FIT, "state": np.zeros((5, 3, 1, 128), F32)},
            r"'state' has shape \[5, 3, 1, 128\]; the model input is \[2, -1, 128\] "
            r"\(axis 1: 3 != 2\)",
        ),
        (
            {**FIT, "sr": np.zeros(4, I64)},
            r"disagree on the sample count: 'input' \[5, 512\] \(5 entries\), 'sr' \[4\] "
            r"\(4 entries\)",
        ),
        (
            {**STEPS, "state": np.zeros((3, 2, 1, 128), F32)},
            r"disagree on the sequence count: 'input' \[4, 8, 1, 512\] \(4 sequences of 8 "
            r"steps\), 'state' \[3, 2, 1, 128\]",
        ),
        (
            # A state input is never given as steps: the model computes them.
            {**STEPS, "state": np.zeros((4, 8, 2, 1, 128), F32)},
            r"'state' has shape \[4, 8, 2, 1, 128\] \(rank 5\)",
        ),
        (
            {**STEPS, "labels": np.zeros(32, I64)},
            r"'labels' has shape \[32\]; expected 4 x 8 entries",
        ),
        (
            {**FIT, "state": np.array([None] * 256, object).reshape(2, 1, 128)},
            r"array 'state' has dtype '\|O' \(object\)",
        ),
    ],
)
def test_sample_data_that_breaks_the_rules_is_refused_naming_the_input(
    tmp_path: Path, arrays: dict[str, object], message: str
) -> None:
    info = _write_vad_like(tmp_path / "vad.onnx")
    path = tmp_path / "samples.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=message):
        onnx_inspect.inspect_sample_data(path, info)


def test_sample_files_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    import pickle

    info = _write_vad_like(tmp_path / "vad.onnx")
    pickled = tmp_path / "samples.npz"
    pickled.write_bytes(pickle.dumps({"input": np.zeros((5, 512), F32)}))
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz or \.npy"):
        onnx_inspect.inspect_sample_data(pickled, info)
    text = tmp_path / "samples.txt"
    text.write_text("input,state,sr\n0.1,0,16000\n")
    with pytest.raises(InvalidArgument, match=r"not a readable \.npz or \.npy"):
        onnx_inspect.inspect_sample_data(text, info)
    # A plain .npy fits a one-input model only.
    np.save(tmp_path / "one.npy", np.zeros((5, 512), F32))
    with pytest.raises(InvalidArgument, match=r"plain \.npy .* but the model has 3 inputs"):
        onnx_inspect.inspect_sample_data(tmp_path / "one.npy", info)
    # An absurd shape is refused from its header, naming the array.
    absurd = tmp_path / "absurd.npz"
    _absurd_npz(absurd, "input", (10**12, 512))
    with pytest.raises(
        InvalidArgument, match=r"array 'input' declares shape \[1000000000000, 512\]"
    ):
        onnx_inspect.inspect_sample_data(absurd, info)


def test_steps_need_a_model_with_state(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    _write_model(path, ["batch", 3])
    info = onnx_inspect.inspect_model(path)
    assert onnx_inspect.state_pairs(info) == ()
    samples = tmp_path / "steps.npz"
    np.savez(samples, x=np.zeros((4, 8, 1, 3), np.float32))
    with pytest.raises(
        InvalidArgument,
        match=r"'x' has shape \[4, 8, 1, 3\] \(rank 4\); the model input is \[-1, 3\] \(rank 2\); "
        r"accepted: rank 2 \(samples, 3\) replacing the batch; rank 3 \(samples, -1, 3\), each "
        r"fed as is \(docs",
    ):
        onnx_inspect.inspect_sample_data(samples, info)
    # Rank r + 1: samples on a new axis, fed as is (a batch of one each).
    np.savez(samples, x=np.zeros((6, 1, 3), np.float32))
    assert onnx_inspect.inspect_sample_data(samples, info).num_samples == 6


@pytest.mark.parametrize("chunk", [7, 1 << 20])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_sample_values_are_refused_naming_the_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float, chunk: int
) -> None:
    """NaN in, NaN out: every candidate would compare as perfect. Checked
    while the data streams through, also where a chunk cuts an element
    (7-byte chunks of 8-byte floats), in big-endian arrays too."""
    from edgefleet.controlplane.domain import sample_archive

    monkeypatch.setattr(sample_archive, "READ_CHUNK_BYTES", chunk)
    values = np.zeros((40, 3), ">f8")
    values[37, 1] = bad
    np.savez(tmp_path / "s.npz", x=values, labels=np.arange(40))
    with pytest.raises(InvalidArgument, match=r"array 'x' holds 1 NaN or infinite values"):
        sample_archive.verify(tmp_path / "s.npz")
    np.save(tmp_path / "s.npy", values.astype(np.float32))
    # A plain .npy's array is named after the input it feeds.
    with pytest.raises(InvalidArgument, match=r"array 'x' \(.npy\) holds 1 NaN"):
        sample_archive.verify(tmp_path / "s.npy", single_name="x")
    values[37, 1] = 0.0
    np.savez(tmp_path / "ok.npz", x=values, labels=np.arange(40))
    assert set(sample_archive.verify(tmp_path / "ok.npz")) == {"x", "labels"}


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (np.full(6, 1.5), "is float64: labels are class indices"),
        (np.array([True, False] * 3), "is bool: labels are class indices"),
        (np.array([0, 1, -1, 2, 0, 1]), "hold -1: class indices start at 0"),
        (np.array([0, 1, 99, 2, 0, 1]), "hold 99, but the model scores 3 classes (0-2)"),
    ],
)
def test_labels_must_be_class_indices_of_the_model(
    tmp_path: Path, labels: np.ndarray, says: str
) -> None:
    """Labels out of range measured an accuracy of 0% for the fp32 model and
    every candidate alike, so every candidate passed."""
    model = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["scores"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    info = onnx_inspect.inspect_model(model)
    specs = onnx_inspect.output_specs(info, ())
    classes = onnx_inspect.label_classes(info, specs)
    assert classes == 3
    np.savez(tmp_path / "s.npz", x=np.zeros((6, 3), np.float32), labels=labels)
    with pytest.raises(InvalidArgument, match=re.escape(says)):
        onnx_inspect.inspect_sample_data(tmp_path / "s.npz", info, classes=classes)
    np.savez(tmp_path / "ok.npz", x=np.zeros((6, 3), np.float32), labels=np.arange(6) % 3)
    assert onnx_inspect.inspect_sample_data(tmp_path / "ok.npz", info, classes=classes).has_labels
