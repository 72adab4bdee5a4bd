"""The TFLite rung: real onnx2tf conversions in the toolchain venv, run back
in LiteRT through the agent's own runner and compared with ONNX Runtime.

The toolchain (~2.5 GB) is installed once per machine into
$EDGEFLEET_TOOLCHAINS_DIR or ~/.cache/edgefleet/toolchains; CI installs it
in its setup step, so the fixture only finds it there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent.runtimes import RuntimeUnavailable, TensorInfo, litert, open_runner
from edgefleet.agent.runtimes.litert import (
    LiteRtRunner,
    TfliteTensor,
    accepted_shape,
    channel_first_perm,
    channel_last_perm,
    dequantize,
    layout_perm,
    match_tensors,
    plain_name,
    quantize,
)
from edgefleet.controlplane.build.c_array import c_identifier, to_c_array
from edgefleet.controlplane.build.samples import Samples, load_samples
from edgefleet.controlplane.build.tflite_ladder import C_ARRAY_NAME, MEDIA_TYPE, build_candidates
from edgefleet.controlplane.build.toolchain import (
    INSTALL_TFLITE,
    MARKER,
    SELF_CHECK_FILE,
    SELF_CHECK_SHAPE,
    TFLITE,
    TFLITE_PINS,
    ConvertInput,
    TfliteToolchain,
    ToolchainMissing,
    _broadcast_literal,
    _failure_notes,
    default_toolchains_dir,
    find_tflite,
    install_tflite,
    safe_copy,
    self_check_images,
    tf_layout,
)
from edgefleet.controlplane.build.types import BuildTarget, Candidate
from edgefleet.controlplane.cli.toolchain import toolchain as toolchain_cli
from edgefleet.controlplane.domain.onnx_inspect import inspect_model
from edgefleet.demo.models import BuiltModel, build_digits_classifier

# Conversions are TensorFlow work: tens of seconds each on two cores, plus the
# one-off install when the cache is cold.
pytestmark = pytest.mark.timeout(900)

# Recorded on the digits MLP (held-out sklearn digits, 200 samples) with
# onnx2tf 1.29.24 / TensorFlow 2.19.0 / ai-edge-litert 2.1.0 on x86-64: the
# largest probability difference from ORT was 2.4e-7 for fp32, 7.6e-4 for
# fp16 and 0.041 for int8, every argmax agreeing. The bounds leave headroom
# for other CPUs' kernels.
FP32_ATOL = 1e-4
FP16_ATOL = 2e-2
INT8_ATOL = 0.15
INT8_MIN_AGREEMENT = 0.95


def _infos(specs: tuple[object, ...]) -> list[TensorInfo]:
    return [TensorInfo(s.name, s.dtype, s.shape) for s in specs]  # type: ignore[attr-defined]


def _compare(
    model: Path, samples: Samples, candidate: Candidate
) -> tuple[float, float]:  # (max abs diff over all outputs, argmax agreement on output 0)
    info = inspect_model(model)
    assert candidate.path is not None, candidate.error
    runner = open_runner(
        candidate.path,
        "tflite",
        onnx_inputs=_infos(info.inputs),
        onnx_outputs=_infos(info.outputs),
    )
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    worst, agree = 0.0, 0
    for feed in samples.each():
        want = session.run(None, feed)
        got = runner.run(feed)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(g.dtype == np.float32 for g in got)
        worst = max(worst, *(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)))
        agree += int(got[0].argmax() == want[0].argmax())
    return worst, agree / len(samples)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tflite_toolchain() -> TfliteToolchain:
    """The installed toolchain; installs it on a machine that lacks it."""
    return install_tflite(default_toolchains_dir())


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_digits_classifier(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def digits_samples(digits: BuiltModel) -> Samples:
    return load_samples(digits.sample_data, inspect_model(digits.model).inputs)


@pytest.fixture(scope="module")
def digits_build(
    tflite_toolchain: TfliteToolchain,
    digits: BuiltModel,
    digits_samples: Samples,
    tmp_path_factory: pytest.TempPathFactory,
) -> list[Candidate]:
    log: list[str] = []
    return build_candidates(
        digits.model,
        digits_samples,
        tmp_path_factory.mktemp("digits-tflite"),
        BuildTarget("pi", "tflite", threads=2),
        log.append,
        toolchains_dir=tflite_toolchain.venv.parent,
    )


def image_cnn(path: Path, *, seed: int = 0) -> Path:
    """A small 3-channel image CNN with a dynamic batch and three outputs:
    class probabilities, the NCHW feature map (which onnx2tf turns NHWC) and
    the logits (same shape as the probabilities, so only names or positions
    tell them apart). Node names are the kind that broke onnx2tf
    (`Softmax@0`) or empty."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4 * 8 * 8, 5)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["fmap"], name="Relu@0"),
        helper.make_node("MaxPool", ["fmap"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="Gemm@0"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="Softmax@0"),
    ]
    graph = helper.make_graph(
        nodes,
        "image_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("fmap", TensorProto.FLOAT, ["batch", 4, 16, 16]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


# ------------------------------------------------------------------ real conversions


def test_digits_ladder_builds_three_candidates(digits_build: list[Candidate]) -> None:
    by_name = {c.name: c for c in digits_build}
    assert list(by_name) == ["tflite-fp32", "tflite-fp16", "tflite-int8"]
    for candidate, precision in zip(digits_build, ["fp32", "fp16", "int8"], strict=True):
        assert candidate.error == ""
        assert candidate.path is not None and candidate.path.stat().st_size > 0
        assert candidate.path.read_bytes()[4:8] == b"TFL3"  # the flatbuffer identifier
        assert (candidate.runtime, candidate.precision) == ("tflite", precision)
        assert candidate.media_type == MEDIA_TYPE == "application/vnd.tflite"
        assert candidate.companion is None  # not a microcontroller class
    sizes = [c.path.stat().st_size for c in digits_build if c.path]
    assert sizes[2] < sizes[0]  # int8 weights are a quarter of fp32's


def test_digits_candidates_agree_with_onnxruntime(
    digits: BuiltModel, digits_samples: Samples, digits_build: list[Candidate]
) -> None:
    fp32, fp16, int8 = digits_build
    diff, agreement = _compare(digits.model, digits_samples, fp32)
    assert diff < FP32_ATOL and agreement == 1.0
    diff, agreement = _compare(digits.model, digits_samples, fp16)
    assert diff < FP16_ATOL and agreement >= 0.99
    diff, agreement = _compare(digits.model, digits_samples, int8)
    assert diff < INT8_ATOL and agreement >= INT8_MIN_AGREEMENT


def test_int8_candidate_is_full_integer(digits_build: list[Candidate]) -> None:
    """int8 I/O (what TFLite Micro needs); the runner still speaks float."""
    int8 = digits_build[2]
    assert int8.path is not None
    runner = open_runner(int8.path, "tflite")
    assert isinstance(runner, LiteRtRunner) and runner.int8_io
    (out,) = runner.run({"input": np.full((1, 64), 0.5, dtype=np.float32)})
    assert out.dtype == np.float32 and out.shape == (1, 10)
    assert abs(float(out.sum()) - 1.0) < 0.05  # dequantized probabilities


def test_image_cnn_converts_offline_and_maps_layout_and_outputs(
    tflite_toolchain: TfliteToolchain, tmp_path: Path
) -> None:
    """A 3-channel image input makes onnx2tf fetch a sample-image file unless
    one is in its cwd, and dynamic dims must be fixed; proxies point at a
    closed port, so a download attempt would fail the conversion."""
    model = image_cnn(tmp_path / "cnn.onnx")
    info = inspect_model(model)
    rng = np.random.default_rng(1)
    samples = Samples({"image": rng.random((24, 3, 16, 16), dtype=np.float32)}, None, True)
    log: list[str] = []
    work = tmp_path / "work"
    fp32, fp16, int8 = build_candidates(
        model,
        samples,
        work,
        BuildTarget("cam", "tflite"),
        log.append,
        toolchains_dir=tflite_toolchain.venv.parent,
    )
    assert (work / "onnx2tf" / SELF_CHECK_FILE).exists()
    onnx2tf_log = (work / "onnx2tf" / "onnx2tf.log").read_text()
    assert "github.com" not in onnx2tf_log and "wasabisys" not in onnx2tf_log
    # The original is untouched (onnx2tf rewrites the file it is given).
    assert onnx.load(str(model)).graph.node[-1].name == "Softmax@0"

    # The TFLite model is NHWC; the model's dynamic batch stayed dynamic
    # (issue 22), and every candidate says so.
    raw = LiteRtRunner(fp32.path) if fp32.path else None
    assert raw is not None and list(raw.inputs[0].shape) == [-1, 16, 16, 3]
    for candidate in (fp32, fp16, int8):
        assert [(t.name, t.shape) for t in candidate.accepted_inputs] == [
            ("image", (-1, 3, 16, 16))
        ]
        assert candidate.notes == ("input image: batch kept dynamic",)
    assert "tflite: input image: batch kept dynamic" in [line for line in log]
    # The runner resizes the interpreter to each call's batch: 1, 3, 1 again.
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for candidate, atol in ((fp32, FP32_ATOL), (int8, 0.3)):
        assert candidate.path is not None
        runner = open_runner(candidate.path, "tflite", onnx_inputs=_infos(info.inputs),
                             onnx_outputs=_infos(info.outputs))  # fmt: skip
        assert [list(t.shape) for t in runner.inputs] == [[-1, 3, 16, 16]]
        for rows in (1, 3, 1):
            feed = {"image": samples.arrays["image"][:rows]}
            got, want = runner.run(feed), session.run(None, feed)
            assert [g.shape for g in got] == [w.shape for w in want], rows
            assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) < atol

    diff, agreement = _compare(model, samples, fp32)
    assert diff < FP32_ATOL and agreement == 1.0
    diff, agreement = _compare(model, samples, fp16)
    assert diff < FP16_ATOL and agreement == 1.0
    diff, agreement = _compare(model, samples, int8)
    # Three outputs of very different ranges share this bound; agreement is on
    # the probabilities.
    assert diff < 0.3 and agreement >= 0.9
    runner = open_runner(
        fp32.path,  # type: ignore[arg-type]
        "tflite",
        onnx_inputs=_infos(info.inputs),
        onnx_outputs=_infos(info.outputs),
    )
    assert [o.name for o in runner.outputs] == ["probabilities", "fmap", "logits"]


def test_microcontroller_gets_int8_and_its_c_source(
    tflite_toolchain: TfliteToolchain,
    digits: BuiltModel,
    digits_samples: Samples,
    tmp_path: Path,
) -> None:
    log: list[str] = []
    fp32, fp16, int8 = build_candidates(
        digits.model,
        digits_samples,
        tmp_path / "mcu",
        BuildTarget("m4", "tflite", microcontroller=True),
        log.append,
        toolchains_dir=tflite_toolchain.venv.parent,
    )
    assert fp32.path is None and "full-integer int8" in fp32.error
    assert fp16.path is None and "TensorFlow Lite Micro" in fp16.error
    assert int8.path is not None and int8.companion is not None
    source = int8.companion.read_text()
    assert f"alignas(16) const unsigned char {C_ARRAY_NAME}[]" in source
    assert f"{C_ARRAY_NAME}_len = {int8.path.stat().st_size};" in source
    # The hex in the source is exactly the flatbuffer.
    hex_bytes = bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", source))
    assert hex_bytes == int8.path.read_bytes()
    _compile_and_dump(int8.companion, int8.path.read_bytes(), tmp_path)


def _compile_and_dump(source: Path, expected: bytes, tmp_path: Path) -> None:
    """Compile the array into a program that writes it back out, as C and as
    C++ when those compilers are present."""
    main = tmp_path / "main.c"
    main.write_text(
        f'#include <stdint.h>\n#include <stdio.h>\n#include "{source.name}"\n'
        "int main(void) {\n"
        f"  if ((uintptr_t){C_ARRAY_NAME} % 16 != 0) return 3;\n"
        f"  fwrite({C_ARRAY_NAME}, 1, {C_ARRAY_NAME}_len, stdout);\n"
        "  return 0;\n}\n"
    )
    shutil.copy(source, tmp_path / source.name)
    compilers = [
        (c, std) for c, std in (("gcc", "-std=c11"), ("g++", "-std=c++17")) if shutil.which(c)
    ]
    if not compilers:
        pytest.skip("no C compiler on this machine")
    for compiler, std in compilers:
        binary = tmp_path / f"dump-{compiler}"
        lang = ["-x", "c++"] if compiler == "g++" else []
        subprocess.run(
            [compiler, std, "-Wall", "-Werror", *lang, str(main), "-o", str(binary)],
            check=True,
            capture_output=True,
        )
        # The source alone is a valid translation unit too (`gcc -c`).
        subprocess.run(
            [compiler, std, "-Wall", "-Werror", *lang, "-c", str(tmp_path / source.name),
             "-o", str(tmp_path / f"model-{compiler}.o")],
            check=True,
            capture_output=True,
        )  # fmt: skip
        out = subprocess.run([str(binary)], check=True, capture_output=True)
        assert out.stdout == expected


def test_install_is_idempotent(tflite_toolchain: TfliteToolchain) -> None:
    steps: list[str] = []
    again = install_tflite(tflite_toolchain.venv.parent, step=steps.append)
    assert again == tflite_toolchain
    assert steps and steps[0].startswith("already installed")
    assert tflite_toolchain.onnx2tf_version == "1.29.24"
    assert tflite_toolchain.tensorflow_version == "2.19.0"
    assert tflite_toolchain.key == "onnx2tf==1.29.24,tensorflow==2.19.0"


def test_toolchain_cli_ls(tflite_toolchain: TfliteToolchain, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(toolchain_cli, ["ls", "--dir", str(tflite_toolchain.venv.parent)])
    assert result.exit_code == 0, result.output
    assert "1.29.24" in result.output and "2.19.0" in result.output
    result = runner.invoke(toolchain_cli, ["ls", "--json", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"tflite": None}


# ------------------------------------------------------------------ no toolchain


def test_missing_toolchain_names_the_install_command(
    digits: BuiltModel, digits_samples: Samples, tmp_path: Path
) -> None:
    with pytest.raises(ToolchainMissing) as raised:
        build_candidates(
            digits.model,
            digits_samples,
            tmp_path / "work",
            BuildTarget("pi", "tflite"),
            lambda _line: None,
            toolchains_dir=tmp_path / "toolchains",
        )
    assert INSTALL_TFLITE in raised.value.message
    assert INSTALL_TFLITE == "edgefleet toolchain install tflite"
    assert "is not installed" in raised.value.message


def test_toolchain_with_other_pins_is_stale(tmp_path: Path) -> None:
    venv = tmp_path / TFLITE
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "onnx2tf").touch()
    marker = {"pins": ["onnx2tf==0.0.1"], "versions": {"onnx2tf": "0.0.1"}}
    (venv / MARKER).write_text(json.dumps(marker))
    assert find_tflite(tmp_path) is None
    with pytest.raises(ToolchainMissing, match="another EdgeFleet release"):
        build_candidates(
            Path("unused.onnx"), Samples({}, None, True), tmp_path, BuildTarget("x", "tflite"),
            lambda _line: None, toolchains_dir=tmp_path,
        )  # fmt: skip
    result = CliRunner().invoke(toolchain_cli, ["ls", "--dir", str(tmp_path)])
    assert result.exit_code == 0 and "stale" in result.output
    marker["pins"] = list(TFLITE_PINS)
    (venv / MARKER).write_text(json.dumps(marker))
    found = find_tflite(tmp_path)
    assert found is not None and found.onnx2tf_version == "0.0.1"


def test_cli_install_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Python that cannot make a venv: the CLI reports the failed step."""
    # The CLI imports the build package's install_tflite when the command runs.
    build_module = sys.modules["edgefleet.controlplane.build.toolchain"]

    def with_bad_python(*args: Any, **kwargs: Any) -> TfliteToolchain:
        return install_tflite(*args, python="/nonexistent/python3", **kwargs)

    monkeypatch.setattr(build_module, "install_tflite", with_bad_python)
    result = CliRunner().invoke(toolchain_cli, ["install", "tflite", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "creating the virtual environment failed" in result.output


def test_runner_without_any_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litert, "_INTERPRETER_MODULES", ("no_such_litert.interpreter",))
    with pytest.raises(RuntimeUnavailable, match="ai-edge-litert"):
        LiteRtRunner(Path("model.tflite"))


# ------------------------------------------------------------------ pure helpers


def test_layout_perm() -> None:
    assert channel_last_perm(4) == (0, 2, 3, 1)
    assert channel_first_perm(4) == (0, 3, 1, 2)
    assert channel_last_perm(3) == (0, 2, 1) and channel_first_perm(5) == (0, 4, 1, 2, 3)
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert np.array_equal(x.transpose(channel_last_perm(4)).transpose(channel_first_perm(4)), x)
    # NCHW -> NHWC, with dynamic dims in the ONNX shape.
    assert layout_perm((-1, 3, 48, 192), (1, 48, 192, 3)) == (0, 2, 3, 1)
    assert layout_perm((1, 4, 10), (1, 10, 4)) == (0, 2, 1)
    # Unchanged layouts.
    assert layout_perm((-1, 64), (1, 64)) is None
    assert layout_perm((1, 3, 4, 5), (1, 3, 4, 5)) is None
    # Both fit: onnx2tf moved it.
    assert layout_perm((1, 8, 8, 8), (1, 8, 8, 8)) == (0, 2, 3, 1)
    with pytest.raises(ValueError, match="matches neither"):
        layout_perm((1, 3, 4, 5), (1, 5, 3, 4))
    with pytest.raises(ValueError):
        layout_perm((1, 10), (1, 5))
    # An ONNX scalar (a GRU's gain, silero's sample rate): onnx2tf makes it
    # one element, which the runner feeds and reads back as a scalar.
    assert layout_perm((), (1,)) is None and layout_perm((), (-1,)) is None
    with pytest.raises(ValueError):
        layout_perm((), (2,))
    scalar = TensorInfo("gain", "float32", ())
    assert accepted_shape(scalar, (1,), None) == scalar


def _t(index: int, name: str, shape: tuple[int, ...]) -> TfliteTensor:
    return TfliteTensor(index, name, np.dtype(np.float32), shape, 0.0, 0)


def _o(name: str, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(name, "float32", shape)


def test_match_tensors() -> None:
    onnx_out = [_o("probabilities", (-1, 5)), _o("fmap", (-1, 4, 16, 16)), _o("logits", (-1, 5))]
    # Names survive (a signature keyed by the ONNX names), in another order.
    tfl = [_t(7, "fmap", (1, 16, 16, 4)), _t(11, "logits", (1, 5)), _t(12, "probabilities", (1, 5))]
    assert match_tensors(onnx_out, tfl) == [2, 0, 1]
    # Positional signature keys: output_K is ONNX output K.
    tfl = [
        _t(7, "output_1", (1, 16, 16, 4)),
        _t(12, "output_0", (1, 5)),
        _t(11, "output_2", (1, 5)),
    ]
    assert match_tensors(onnx_out, tfl) == [1, 0, 2]
    # Identity, Identity_1, ...
    tfl = [
        _t(1, "Identity_2", (1, 5)),
        _t(2, "Identity", (1, 5)),
        _t(3, "Identity_1", (1, 16, 16, 4)),
    ]
    assert match_tensors(onnx_out, tfl) == [1, 2, 0]
    # Unknown names: a shape only one tensor has, then order.
    tfl = [_t(1, "a", (1, 5)), _t(2, "b", (1, 16, 16, 4)), _t(3, "c", (1, 5))]
    assert match_tensors(onnx_out, tfl) == [0, 1, 2]
    # Inputs: the signature prefix and index go; `:` became `__` in TF.
    onnx_in = [_o("x:0", (1, 3, 8, 8)), _o("y", (1, 4))]
    tfl = [_t(0, "serving_default_y:0", (1, 4)), _t(1, "serving_default_x__0:0", (1, 8, 8, 3))]
    assert match_tensors(onnx_in, tfl) == [1, 0]
    assert plain_name("serving_default_x:0") == "x"
    with pytest.raises(ValueError):
        match_tensors(onnx_in, tfl[:1])


def test_quantize_and_dequantize() -> None:
    scale, zero_point = 1 / 256, -128  # a softmax output's usual params
    x = np.array([0.0, 0.25, 0.998, 2.0, -1.0], dtype=np.float32)
    q = quantize(x, scale, zero_point, np.dtype(np.int8))
    assert q.dtype == np.int8
    assert q.tolist() == [-128, -64, 127, 127, -128]  # saturated at both ends
    back = dequantize(q, scale, zero_point)
    assert back.dtype == np.float32
    assert np.allclose(back[:3], x[:3], atol=scale / 2 + 1e-7)
    u = quantize(np.array([0.0, 1.0]), 0.5, 10, np.dtype(np.uint8))
    assert u.dtype == np.uint8 and u.tolist() == [10, 12]
    assert dequantize(u, 0.5, 10).tolist() == [0.0, 1.0]
    # Round trip within half a step for in-range values.
    v = np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32)
    err = np.abs(dequantize(quantize(v, 0.01, 3, np.dtype(np.int8)), 0.01, 3) - v)
    assert float(err.max()) <= 0.005 + 1e-6


def test_tf_layout_and_self_check_images() -> None:
    x = np.random.default_rng(0).random((5, 3, 12, 20), dtype=np.float32)
    assert tf_layout(x).shape == (5, 12, 20, 3)
    assert np.array_equal(tf_layout(x)[2, 4, 7], x[2, :, 4, 7])
    assert tf_layout(np.zeros((5, 64))).shape == (5, 64)
    assert tf_layout(np.zeros((5, 4, 10))).shape == (5, 10, 4)
    images = self_check_images([ConvertInput("x", (1, 3, 12, 20), x)])
    assert images.shape == SELF_CHECK_SHAPE and images.dtype == np.float32
    assert np.array_equal(images[0, 0, 0], x[0, :, 0, 0])  # the samples, resized
    assert np.array_equal(images[5], images[0])  # five samples repeated up to 20
    noise = self_check_images([ConvertInput("ids", (1, 8), np.zeros((4, 8), np.int64))])
    assert noise.shape == SELF_CHECK_SHAPE and 0.0 <= float(noise.min()) < float(noise.max()) < 1.0
    assert _broadcast_literal(4, 0.0) == "[[[[0.0]]]]"
    assert _broadcast_literal(2, 1.0) == "[[1.0]]"


def test_safe_copy_renames_nodes_tensorflow_rejects(tmp_path: Path) -> None:
    model = image_cnn(tmp_path / "cnn.onnx")
    copy = tmp_path / "copy.onnx"
    safe_copy(model, copy)
    names = [n.name for n in onnx.load(str(copy)).graph.node]
    assert names == ["Conv_0", "Relu_0", "MaxPool_2", "Flatten_3", "Gemm_0", "Softmax_0"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", n) for n in names)
    original = onnx.load(str(model))
    renamed = onnx.load(str(copy))
    for node in original.graph.node:
        node.name = ""
    for node in renamed.graph.node:
        node.name = ""
    assert original.SerializeToString() == renamed.SerializeToString()


def test_failure_notes(tmp_path: Path) -> None:
    log = tmp_path / "onnx2tf.log"
    log.write_text(
        "\x1b[32mINFO:\x1b[0m INT8 Quantization tflite output complete!\n"
        "W0000 00:00:1 noise.cc:1] ignored\n"
        "RuntimeError: Quantization not yet supported for op: 'FLEX'\n"
        "\x1b[33mWARNING:\x1b[0m Full INT8 Quantization tflite output failed.\n"
    )
    notes = _failure_notes(log)
    assert list(notes) == ["full_integer_quant"]
    assert "Quantization not yet supported" in notes["full_integer_quant"]
    assert "noise.cc" not in notes["full_integer_quant"]


def test_c_array_format() -> None:
    data = bytes(range(30))
    source = to_c_array(data, "model-int8.tflite")
    assert "alignas(16) const unsigned char model_int8_tflite[] = {" in source
    assert "const unsigned int model_int8_tflite_len = 30;" in source
    assert "extern const unsigned char model_int8_tflite[];" in source
    body = source.split("{", 1)[1].split("}", 1)[0]
    assert bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body)) == data
    assert max(len(line) for line in body.splitlines()) <= 80  # 12 bytes a line
    assert "_len = 0;" in to_c_array(b"", "empty")
    assert c_identifier("3d-model") == "_3d_model"
