"""Small real models of every output kind (edgefleet.fidelity), built in
code with onnx.helper: opset 17, weights from a seeded numpy RNG (and, where
a head is fitted, a deterministic least-squares or scikit-learn fit on the
features the seeded layers give), so every build of a model is the same
file. Each comes with sample data shaped as a push takes it (an .npz, one
array per input name, samples on axis 0 in place of the batch axis) and the
kind each output should be judged as.

The weights are fitted, not merely random, because a random net's outputs
are degenerate for fidelity: the same class for every image, a map that is
all below 0.5, a CTC head that decodes to nothing. Fitted ones agree with a
rule the sample data follows (classes of synthetic images, blob masks,
glyph sequences), so the metrics measure something.

| model | input | output (kind) |
|---|---|---|
| image_classifier | image [N,3,16,16] | probabilities [N,10] (class-scores) |
| unet_segmenter | image [N,3,32,32] | prob_map [N,1,32,32] (dense-map) |
| ctc_recognizer | image [N,1,16,64] | logits [N,16,12] log-probabilities (sequence, blank 0) |
| gru_stateful | x [1,1,4], h0 [1,1,8], gain [] | y [1,1,8] (regression), hn [1,1,8] (state of h0) |

gru_stateful comes without sample data of its own (tests/integration/
test_build_stateful.py pushes a GRU as sequences of steps); its kinds are
all inferred: `y` [1,1,8] (one dimension above 1: regression) and `hn`
(shaped like `h0`, a state's name: state).

`python -m testkit.model_zoo OUT_DIR [NAME...]` writes them there."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet import fidelity
from edgefleet.fidelity import OutputKind, OutputSpec

OPSET = 17
DEFAULT_SAMPLES = 64


@dataclass(frozen=True)
class ZooModel:
    """A built zoo model: its files and how its outputs are judged."""

    name: str
    model: Path
    # None where the model's samples do not fit the push format (gru_stateful).
    sample_data: Path | None
    # Output name -> the kind it should be judged as, in the model's order.
    kinds: dict[str, OutputKind]
    # Declarations an operator passes (--output) where shape inference
    # alone would pick another kind.
    declared: tuple[OutputSpec, ...] = ()
    # Whether the samples hold `labels` (the classifier's true classes).
    labelled: bool = False
    notes: tuple[str, ...] = field(default=())


def checked_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as an opset-17, IR-9 model, checked in full."""
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet-zoo"
    )
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def output_specs(model: Path, declared: Sequence[OutputSpec] = ()) -> list[OutputSpec]:
    """Every output's spec as a build resolves it: from the model's shapes
    (-1 for a dynamic dimension) and names, and `declared`."""
    from edgefleet.controlplane.domain.onnx_inspect import inspect_model

    info = inspect_model(model)
    outputs = [fidelity.Tensor(t.name, t.shape) for t in info.outputs]
    inputs = [fidelity.Tensor(t.name, t.shape) for t in info.inputs]
    return fidelity.resolve(outputs, inputs, declared)


def _probe(model: onnx.ModelProto, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The value of an intermediate `tensor` of `model` on `feeds` (batched),
    from ONNX Runtime: the features a fitted head is fitted on are the ones
    the shipped graph computes, to the last bit of ORT's kernels."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (value,) = session.run(None, feeds)
    return np.asarray(value)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _write(
    out_dir: Path, model: onnx.ModelProto, samples: dict[str, np.ndarray] | None
) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    onnx.save(model, path)
    if samples is None:
        return path, None
    sample_path = out_dir / "samples.npz"
    np.savez(sample_path, **samples)  # type: ignore[arg-type]
    return path, sample_path


# -- image_classifier -----------------------------------------------------------------------------

CLASSIFIER_FILTERS = 16
CLASSIFIER_CLASSES = 10
# Synthetic image classes: a hue (five) times a stripe orientation (two).
_HUES = np.array(
    [[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0], [1.0, 1.0, 0.2], [0.2, 1.0, 1.0]]
)


def striped_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,16,16) images and their class (N,): class k has hue k % 5 and
    horizontal (k < 5) or vertical stripes, at a random frequency, phase,
    contrast and brightness, with noise."""
    labels = rng.integers(0, CLASSIFIER_CLASSES, count)
    grid = np.arange(16, dtype=np.float64)
    images = np.empty((count, 3, 16, 16), dtype=np.float32)
    for n, label in enumerate(labels):
        freq = rng.uniform(0.5, 1.4)
        wave = 0.5 + 0.5 * np.sin(freq * grid + rng.uniform(0, 2 * np.pi))
        stripes = np.tile(wave[:, None], (1, 16)) if label < 5 else np.tile(wave[None, :], (16, 1))
        hue = _HUES[label % 5] * rng.uniform(0.7, 1.0)
        image = hue[:, None, None] * stripes[None] * rng.uniform(0.6, 1.0)
        images[n] = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    return images, labels


def classifier_graph(conv_w: np.ndarray, conv_b: np.ndarray, head_w: np.ndarray,
                     head_b: np.ndarray) -> onnx.ModelProto:  # fmt: skip
    """Conv(3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "head_w", "head_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "zoo_image_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info(
            "probabilities", TensorProto.FLOAT, ["batch", CLASSIFIER_CLASSES])],
        [_init("conv_w", conv_w), _init("conv_b", conv_b), _init("head_w", head_w),
         _init("head_b", head_b)],
    )  # fmt: skip
    return checked_model(graph)


def build_image_classifier(
    out_dir: Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> ZooModel:
    """Seeded random conv filters; the dense head a logistic regression
    fitted on their pooled features over 600 striped images. Samples: other
    striped images with their `labels`."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.6, (CLASSIFIER_FILTERS, 3, 3, 3))
    conv_b = rng.normal(0, 0.05, CLASSIFIER_FILTERS)
    zero_head = np.zeros((CLASSIFIER_CLASSES, CLASSIFIER_FILTERS))
    probe = classifier_graph(conv_w, conv_b, zero_head, np.zeros(CLASSIFIER_CLASSES))
    train, train_labels = striped_images(600, rng)
    features = _probe(probe, "features", {"image": train})
    head = LogisticRegression(max_iter=5000, C=10.0).fit(features, train_labels)
    model = classifier_graph(conv_w, conv_b, head.coef_, head.intercept_)
    images, labels = striped_images(samples, rng)
    path, sample_path = _write(out_dir, model, {"image": images, "labels": labels})
    return ZooModel("image_classifier", path, sample_path,
                    {"probabilities": OutputKind.CLASS_SCORES}, labelled=True)  # fmt: skip


# -- unet_segmenter -------------------------------------------------------------------------------

UNET_SIZE, UNET_CHANNELS = 32, 8


def blob_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N,3,32,32) images of one to three bright round blobs of random
    colour and size on a dark, graded, noisy background, and their masks
    (N,32,32) of where a blob is brighter than half its peak."""
    yy, xx = np.mgrid[0:UNET_SIZE, 0:UNET_SIZE].astype(np.float64)
    images = np.empty((count, 3, UNET_SIZE, UNET_SIZE), dtype=np.float32)
    masks = np.zeros((count, UNET_SIZE, UNET_SIZE), dtype=bool)
    for n in range(count):
        background = rng.uniform(0.0, 0.25) + np.linspace(0, rng.uniform(-0.1, 0.1), UNET_SIZE)
        image = np.broadcast_to(background[None, None, :], (3, UNET_SIZE, UNET_SIZE)).copy()
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(4, UNET_SIZE - 4, 2)
            radius = rng.uniform(2.5, 7.0)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            colour = rng.uniform(0.5, 1.0, 3)
            image += colour[:, None, None] * blob[None]
            masks[n] |= blob > 0.5
        images[n] = np.clip(image + rng.normal(0, 0.04, image.shape), 0, 1.5)
    return images, masks


def unet_graph(enc_w: np.ndarray, enc_b: np.ndarray, mid_w: np.ndarray, mid_b: np.ndarray,
               out_w: np.ndarray, out_b: np.ndarray) -> onnx.ModelProto:  # fmt: skip
    """conv -> MaxPool (down) -> conv -> Resize x2 (up) -> concat with the
    first conv's output (the skip) -> conv -> Sigmoid."""
    nodes = [
        helper.make_node("Conv", ["image", "enc_w", "enc_b"], ["enc_conv"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["enc_conv"], ["enc"]),
        helper.make_node("MaxPool", ["enc"], ["down"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["down", "mid_w", "mid_b"], ["mid_conv"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["mid_conv"], ["mid"]),
        helper.make_node("Resize", ["mid", "", "up_scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "enc"], ["skip"], axis=1),
        helper.make_node("Conv", ["skip", "out_w", "out_b"], ["map_logits"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["map_logits"], ["prob_map"]),
    ]  # fmt: skip
    size = UNET_SIZE
    graph = helper.make_graph(
        nodes,
        "zoo_unet_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("prob_map", TensorProto.FLOAT, ["batch", 1, size, size])],
        [_init("enc_w", enc_w), _init("enc_b", enc_b), _init("mid_w", mid_w),
         _init("mid_b", mid_b), _init("out_w", out_w), _init("out_b", out_b),
         _init("up_scales", np.array([1.0, 1.0, 2.0, 2.0]))],
    )  # fmt: skip
    return checked_model(graph)


# The fitted map's logit inside and outside a blob: sigmoid(+-4) = 0.98 / 0.02.
UNET_TARGET_LOGIT = 4.0


def build_unet_segmenter(
    out_dir: Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> ZooModel:
    """Seeded random encoder convolutions (the first with one smoothing
    brightness filter, so blobs are visible to it whatever their colour);
    the output convolution fitted by least squares so its logits are
    +UNET_TARGET_LOGIT inside the blob masks of 48 images and minus that
    outside. Samples: other blob images; their maps have regions above and
    below 0.5."""
    rng = np.random.default_rng(seed)
    c = UNET_CHANNELS
    enc_w = rng.normal(0, 0.4, (c, 3, 3, 3))
    enc_w[0] = 1.0 / 27.0
    enc_b = rng.normal(0, 0.05, c)
    mid_w = rng.normal(0, 0.2, (c, c, 3, 3))
    mid_b = rng.normal(0, 0.05, c)
    probe = unet_graph(enc_w, enc_b, mid_w, mid_b, np.zeros((1, 2 * c, 3, 3)), np.zeros(1))
    train, masks = blob_images(48, rng)
    skip = _probe(probe, "skip", {"image": train}).astype(np.float64)  # (N, 2c, 32, 32)
    padded = np.pad(skip, ((0, 0), (0, 0), (1, 1), (1, 1)))
    # im2col in Conv's weight order (channel, dy, dx), plus a column of ones for the bias.
    shifted = [padded[:, :, dy : dy + UNET_SIZE, dx : dx + UNET_SIZE] for dy in range(3)
               for dx in range(3)]  # fmt: skip
    windows = np.stack(shifted, axis=2)  # (N, 2c, 9, 32, 32)
    design = windows.transpose(0, 3, 4, 1, 2).reshape(-1, 2 * c * 9)
    design = np.hstack([design, np.ones((len(design), 1))])
    target = np.where(masks.reshape(-1), UNET_TARGET_LOGIT, -UNET_TARGET_LOGIT)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    out_w = solution[:-1].reshape(1, 2 * c, 3, 3)
    out_b = solution[-1:]
    model = unet_graph(enc_w, enc_b, mid_w, mid_b, out_w, out_b)
    images, _ = blob_images(samples, rng)
    path, sample_path = _write(out_dir, model, {"image": images})
    return ZooModel("unet_segmenter", path, sample_path, {"prob_map": OutputKind.DENSE_MAP})


# -- ctc_recognizer -------------------------------------------------------------------------------

CTC_HEIGHT, CTC_WIDTH, CTC_STEPS, CTC_CLASSES = 16, 64, 16, 12
CTC_FILTERS = 8
CTC_BLANK = 0
_CELL = CTC_WIDTH // CTC_STEPS  # input columns per time step


def glyph_lines(
    count: int, glyphs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(N,1,16,64) images of a line of glyphs, one 16x4 cell per time step,
    and each step's class (N,16): 0 (blank, an empty cell) or the glyph
    1..11 drawn there, at a random ink strength, with noise. A line always
    holds at least one glyph."""
    glyph = rng.integers(1, CTC_CLASSES, (count, CTC_STEPS))
    labels = np.where(rng.random((count, CTC_STEPS)) < 0.4, CTC_BLANK, glyph)
    labels[np.all(labels == CTC_BLANK, axis=1), 0] = 1
    images = np.zeros((count, 1, CTC_HEIGHT, CTC_WIDTH), dtype=np.float32)
    for n in range(count):
        for step, label in enumerate(labels[n]):
            if label != CTC_BLANK:
                ink = rng.uniform(0.6, 1.0)
                images[n, 0, :, step * _CELL : (step + 1) * _CELL] = ink * glyphs[label]
    images += rng.normal(0, 0.05, images.shape).astype(np.float32)
    return images, labels


def ctc_graph(conv_w: np.ndarray, conv_b: np.ndarray, head_w: np.ndarray,
              head_b: np.ndarray) -> onnx.ModelProto:  # fmt: skip
    """Conv (a 3x4 kernel with stride 1x4: one output column per 16x4 cell,
    i.e. per time step) -> Relu -> (N, steps, filters * height) -> MatMul + Add ->
    LogSoftmax over the classes."""
    features = CTC_FILTERS * CTC_HEIGHT
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, _CELL],
                         strides=[1, _CELL], pads=[1, 0, 1, 0]),
        helper.make_node("Relu", ["conv"], ["relu"]),  # (N, filters, 16, steps)
        helper.make_node("Transpose", ["relu"], ["by_step"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", ["by_step", "step_shape"], ["steps"]),  # (N, steps, features)
        helper.make_node("MatMul", ["steps", "head_w"], ["scores"]),
        helper.make_node("Add", ["scores", "head_b"], ["raw_logits"]),
        helper.make_node("LogSoftmax", ["raw_logits"], ["logits"], axis=-1),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "zoo_ctc_recognizer",
        [helper.make_tensor_value_info(
            "image", TensorProto.FLOAT, ["batch", 1, CTC_HEIGHT, CTC_WIDTH])],
        [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", CTC_STEPS, CTC_CLASSES])],
        [_init("conv_w", conv_w), _init("conv_b", conv_b), _init("head_w", head_w),
         _init("head_b", head_b),
         numpy_helper.from_array(np.array([0, CTC_STEPS, features], dtype=np.int64),
                                 "step_shape")],
    )  # fmt: skip
    return checked_model(graph)


def build_ctc_recognizer(
    out_dir: Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0
) -> ZooModel:
    """Seeded random glyphs and convolution filters; the per-step dense
    head a logistic regression fitted on the conv features of 400 lines'
    steps against each step's class, so greedy CTC decoding of the samples
    gives their glyph sequences (varied, never empty)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    glyphs = (rng.random((CTC_CLASSES, CTC_HEIGHT, _CELL)) < 0.5).astype(np.float32)
    glyphs[CTC_BLANK] = 0.0
    conv_w = rng.normal(0, 0.5, (CTC_FILTERS, 1, 3, _CELL))
    conv_b = rng.normal(0, 0.05, CTC_FILTERS)
    features = CTC_FILTERS * CTC_HEIGHT
    probe = ctc_graph(conv_w, conv_b, np.zeros((features, CTC_CLASSES)), np.zeros(CTC_CLASSES))
    train, train_labels = glyph_lines(400, glyphs, rng)
    steps = _probe(probe, "steps", {"image": train}).reshape(-1, features)
    head = LogisticRegression(max_iter=5000, C=10.0).fit(steps, train_labels.reshape(-1))
    model = ctc_graph(conv_w, conv_b, head.coef_.T, head.intercept_)
    images, _ = glyph_lines(samples, glyphs, rng)
    path, sample_path = _write(out_dir, model, {"image": images})
    return ZooModel("ctc_recognizer", path, sample_path, {"logits": OutputKind.SEQUENCE})


# -- gru_stateful ---------------------------------------------------------------------------------

GRU_FEATURES, GRU_HIDDEN = 4, 8


def gru_stateful_graph(w: np.ndarray, r: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """One GRU step, time-major as ONNX's GRU is: x [steps=1, batch=1, 4]
    and the previous state h0 [directions=1, batch=1, 8] in; y, the step's
    output times the scalar `gain`, and the new state hn out."""
    nodes = [
        helper.make_node("GRU", ["x", "gru_w", "gru_r", "gru_b", "", "h0"], ["gru_y", "hn"],
                         hidden_size=GRU_HIDDEN),  # gru_y: (steps, directions, batch, hidden)
        helper.make_node("Squeeze", ["gru_y", "direction_axis"], ["step_y"]),
        helper.make_node("Mul", ["step_y", "gain"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "zoo_gru_stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, GRU_FEATURES]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, GRU_HIDDEN]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, GRU_HIDDEN]),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, GRU_HIDDEN]),
        ],
        [_init("gru_w", w), _init("gru_r", r), _init("gru_b", b),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "direction_axis")],
    )  # fmt: skip
    return checked_model(graph)


def gru_stateful_model(*, seed: int = 0) -> onnx.ModelProto:
    """Seeded GRU weights, scaled so the state moves over a sequence
    without saturating."""
    rng = np.random.default_rng(seed)
    scale = 1.5 / np.sqrt(GRU_HIDDEN)
    w = rng.normal(0, scale, (1, 3 * GRU_HIDDEN, GRU_FEATURES))
    r = rng.normal(0, scale, (1, 3 * GRU_HIDDEN, GRU_HIDDEN))
    b = rng.normal(0, 0.1, (1, 6 * GRU_HIDDEN))
    return gru_stateful_graph(w, r, b)


def build_gru_stateful(out_dir: Path, *, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> ZooModel:
    """gru_stateful_model, written without sample data (see the module
    docstring); `gru_sequence` gives inputs for it."""
    del samples  # no sample format for it yet
    path, _ = _write(out_dir, gru_stateful_model(seed=seed), None)
    return ZooModel(
        "gru_stateful",
        path,
        None,
        {"y": OutputKind.REGRESSION, "hn": OutputKind.STATE},
        notes=("no sample data: a rank-0 input and a state fed back need another format",),
    )


def gru_sequence(steps: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for gru_stateful as independent steps, in the push format's
    layout as far as it goes (samples on axis 0 in place of the leading
    axis; `gain` has none, so it is (steps,)): x (steps,1,4) noisy sine waves, h0
    (steps,1,8) the state the model itself reaches after each step from
    zeros (so every step's h0 is a real one), gain (steps,) in 0.5..2."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)[:, None]
    waves = np.sin(0.3 * t * (1 + np.arange(GRU_FEATURES)) + rng.uniform(0, 6, GRU_FEATURES))
    x = (waves + rng.normal(0, 0.05, waves.shape)).astype(np.float32)[:, None, :]
    gain = rng.uniform(0.5, 2.0, steps).astype(np.float32)
    model = gru_stateful_model(seed=seed)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    h = np.zeros((1, 1, GRU_HIDDEN), dtype=np.float32)
    h0 = np.empty((steps, 1, GRU_HIDDEN), dtype=np.float32)
    for k in range(steps):
        h0[k] = h[0]
        _, h = session.run(
            None, {"x": x[k : k + 1], "h0": h, "gain": np.array(gain[k], dtype=np.float32)}
        )
    return {"x": x, "h0": h0, "gain": gain}


Builder = Callable[..., ZooModel]

# name -> (builder, what it is), as demo.models.BUILDERS.
BUILDERS: dict[str, tuple[Builder, str]] = {
    "image_classifier": (build_image_classifier,
                         "conv + global pool + dense + softmax, 10 classes; labelled samples"),
    "unet_segmenter": (build_unet_segmenter,
                       "tiny U-Net (down, up, skip) to a probability map of blobs"),
    "ctc_recognizer": (build_ctc_recognizer,
                       "conv over a text line to 16 steps of 12 log-probabilities (CTC, blank 0)"),
    "gru_stateful": (build_gru_stateful,
                     "one GRU step with a state input/output and a scalar gain; no samples"),
}  # fmt: skip

# Output name -> kind, per model: what the tests and the benchmark expect.
EXPECTED_KINDS: dict[str, dict[str, OutputKind]] = {
    "image_classifier": {"probabilities": OutputKind.CLASS_SCORES},
    "unet_segmenter": {"prob_map": OutputKind.DENSE_MAP},
    "ctc_recognizer": {"logits": OutputKind.SEQUENCE},
    "gru_stateful": {"y": OutputKind.REGRESSION, "hn": OutputKind.STATE},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.model_zoo", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILDERS]
    if unknown:
        parser.error(f"no zoo model named {unknown[0]!r}; known: {', '.join(BUILDERS)}")
    for name in args.names or list(BUILDERS):
        built = BUILDERS[name][0](args.out_dir / name)
        kinds = ", ".join(f"{k}={v.value}" for k, v in built.kinds.items())
        print(f"{name}: {built.model} ({kinds}); samples: {built.sample_data or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
