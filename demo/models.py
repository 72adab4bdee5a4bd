"""Small real models built in code: no downloads. The digits classifier is an
MLP trained with scikit-learn on its bundled 8x8 digits data set, exported to
ONNX with onnx.helper, with the held-out split as sample/calibration data.

`python -m edgefleet.demo.models` lists them; `... OUT_DIR [NAME...]` builds
them there and prints the `edgefleet models push` for each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class BuiltModel:
    model: Path
    sample_data: Path
    labels: Path
    accuracy: float


def checked_model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    """`graph` as a model of `opset` (IR 9, which every runtime here reads),
    checked in full."""
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-demo"
    )
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp_graph(weights: list[np.ndarray], biases: list[np.ndarray], opset: int) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "input"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(b.astype(np.float32), f"B{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"B{i}"], [f"z{i}"]),
        ]
        current = f"z{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return checked_model(graph, opset)


def build_digits_classifier(
    out_dir: Path, *, hidden: int = 32, seed: int = 0, padding: int = 0
) -> BuiltModel:
    """Train and export the digits MLP; writes model.onnx, samples.npz, labels.txt.
    `padding` widens the hidden layer by that many units whose outputs are
    weighted 0: the same answers from a model that holds 74 more weights
    per unit in memory (the demo's heavier version)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=1000, random_state=seed)
    clf.fit(x_train, y_train)
    accuracy = float(clf.score(x_test, y_test))
    out_dir.mkdir(parents=True, exist_ok=True)
    coefs, intercepts = list(clf.coefs_), list(clf.intercepts_)
    if padding:
        rng = np.random.default_rng(seed)
        coefs[0] = np.hstack([coefs[0], rng.normal(0, 0.1, (coefs[0].shape[0], padding))])
        intercepts[0] = np.concatenate([intercepts[0], np.zeros(padding)])
        coefs[1] = np.vstack([coefs[1], np.zeros((padding, coefs[1].shape[1]))])
    model = mlp_graph(coefs, intercepts, opset=17)
    paths = BuiltModel(
        model=out_dir / "model.onnx",
        sample_data=out_dir / "samples.npz",
        labels=out_dir / "labels.txt",
        accuracy=accuracy,
    )
    onnx.save(model, paths.model)
    np.savez(paths.sample_data, input=x_test[:200], labels=y_test[:200].astype(np.int64))
    paths.labels.write_text("".join(f"digit-{i}\n" for i in range(10)))
    return paths


# -- a small CNN ----------------------------------------------------------------------------------

CNN_FILTERS = 16


def _conv3x3_relu_pool(images: np.ndarray, kernels: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What the CNN graph computes before its head, in numpy (to fit the
    head on): 3x3 convolution with padding 1, ReLU, 2x2 max pooling.
    images (N, 1, 8, 8) -> features (N, filters, 4, 4)."""
    n, _, h, w = images.shape
    padded = np.pad(images[:, 0], ((0, 0), (1, 1), (1, 1)))
    # im2col: (N, 8, 8, 9) windows against (filters, 9) kernels.
    windows = np.stack(
        [padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=-1
    )
    conv = np.einsum("nhwk,fk->nfhw", windows, kernels.reshape(len(kernels), 9))
    conv = np.maximum(conv + bias[None, :, None, None], 0.0)
    pooled: np.ndarray = conv.reshape(n, len(kernels), h // 2, 2, w // 2, 2).max(axis=(3, 5))
    return pooled


def cnn_graph(
    kernels: np.ndarray, conv_bias: np.ndarray, head_w: np.ndarray, head_b: np.ndarray, opset: int
) -> onnx.ModelProto:
    """Conv(3x3, pad 1) -> Relu -> MaxPool(2x2) -> Flatten -> Gemm -> Softmax
    over 1x8x8 images."""
    inits = [
        numpy_helper.from_array(kernels.astype(np.float32), "conv_w"),
        numpy_helper.from_array(conv_bias.astype(np.float32), "conv_b"),
        numpy_helper.from_array(head_w.astype(np.float32), "head_w"),  # (classes, features)
        numpy_helper.from_array(head_b.astype(np.float32), "head_b"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["image", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1] * 4
        ),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "head_w", "head_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return checked_model(graph, opset)


def build_small_cnn(out_dir: Path, *, seed: int = 0) -> BuiltModel:
    """A small real CNN on the digits data as 1x8x8 images; writes
    model.onnx, samples.npz (input `image`, `labels`) and labels.txt.

    The convolution's filters are random but fixed (seeded); the linear head
    on their pooled ReLU features is a logistic regression fitted with
    scikit-learn, so the accuracy is real (about 0.95-0.97 on the held-out
    split) without a deep-learning framework."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)
    kernels = rng.normal(0.0, 1.0, (CNN_FILTERS, 1, 3, 3)).astype(np.float32)
    conv_bias = rng.normal(0.0, 0.1, CNN_FILTERS).astype(np.float32)

    def features(x: np.ndarray) -> np.ndarray:
        return _conv3x3_relu_pool(x, kernels, conv_bias).reshape(len(x), -1)

    head = LogisticRegression(max_iter=2000, C=1.0)
    head.fit(features(x_train), y_train)
    accuracy = float(head.score(features(x_test), y_test))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = cnn_graph(kernels, conv_bias, head.coef_, head.intercept_, opset=17)
    paths = BuiltModel(
        model=out_dir / "model.onnx",
        sample_data=out_dir / "samples.npz",
        labels=out_dir / "labels.txt",
        accuracy=accuracy,
    )
    onnx.save(model, paths.model)
    np.savez(paths.sample_data, image=x_test[:200], labels=y_test[:200].astype(np.int64))
    paths.labels.write_text("".join(f"digit-{i}\n" for i in range(10)))
    return paths


GRU_STEPS, GRU_FEATURES, GRU_HIDDEN = 16, 4, 24


def gru_graph(
    w: np.ndarray, r: np.ndarray, b: np.ndarray, head_w: np.ndarray, head_b: np.ndarray, opset: int
) -> onnx.ModelProto:
    """GRU -> its last hidden state -> Gemm: a sequence in, one
    value out (a regressor, not a classifier)."""
    inits = [
        numpy_helper.from_array(w.astype(np.float32), "gru_w"),
        numpy_helper.from_array(r.astype(np.float32), "gru_r"),
        numpy_helper.from_array(b.astype(np.float32), "gru_b"),
        numpy_helper.from_array(head_w.astype(np.float32), "head_w"),  # (1, hidden)
        numpy_helper.from_array(head_b.astype(np.float32), "head_b"),
    ]
    # Time-major inside: ONNX Runtime's CPU GRU has no batch-first layout.
    nodes = [
        helper.make_node("Transpose", ["series"], ["steps"], perm=[1, 0, 2]),
        helper.make_node(
            "GRU", ["steps", "gru_w", "gru_r", "gru_b"], ["", "last"], hidden_size=GRU_HIDDEN
        ),
        helper.make_node("Transpose", ["last"], ["last_batch"], perm=[1, 0, 2]),
        helper.make_node("Flatten", ["last_batch"], ["state"], axis=1),
        helper.make_node("Gemm", ["state", "head_w", "head_b"], ["forecast"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "sensor_gru",
        [
            helper.make_tensor_value_info(
                "series", TensorProto.FLOAT, ["batch", GRU_STEPS, GRU_FEATURES]
            )
        ],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch", len(head_w)])],
        inits,
    )
    return checked_model(graph, opset)


def sensor_series(count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy multi-channel sine waves (N, GRU_STEPS, GRU_FEATURES) and the next
    value of the first channel after each window (N,)."""
    rng = np.random.default_rng(seed)
    t = np.arange(GRU_STEPS + 1, dtype=np.float64)
    freq = rng.uniform(0.1, 0.6, (count, 1, GRU_FEATURES))
    phase = rng.uniform(0, 2 * np.pi, (count, 1, GRU_FEATURES))
    waves = np.sin(freq * t[None, :, None] + phase) + rng.normal(
        0, 0.05, (count, GRU_STEPS + 1, GRU_FEATURES)
    )
    return waves[:, :-1].astype(np.float32), waves[:, -1, 0].astype(np.float32)


def build_gru_forecaster(out_dir: Path, *, seed: int = 0) -> BuiltModel:
    """A real sequence regressor: a GRU with fixed random weights as the
    feature extractor (run by ONNX Runtime) and a ridge-regression head fitted
    with scikit-learn to forecast the next value of the first channel; writes
    model.onnx and samples.npz (input `series`, no labels: a regressor). Its
    `accuracy` is the head's R^2 on held-out windows."""
    import onnxruntime as ort
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(GRU_HIDDEN)
    w = rng.normal(0, scale, (1, 3 * GRU_HIDDEN, GRU_FEATURES))
    r = rng.normal(0, scale, (1, 3 * GRU_HIDDEN, GRU_HIDDEN))
    b = np.zeros((1, 6 * GRU_HIDDEN))
    # Features first: the same graph with an identity head, then the fitted one.
    probe = gru_graph(w, r, b, np.eye(GRU_HIDDEN), np.zeros(GRU_HIDDEN), opset=17)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = sensor_series(1200, seed=seed)
    (features,) = session.run(None, {"series": x})
    head = Ridge(alpha=1e-3).fit(features[:1000], y[:1000])
    accuracy = float(head.score(features[1000:], y[1000:]))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = gru_graph(w, r, b, head.coef_[None, :], np.array([head.intercept_]), opset=17)
    paths = BuiltModel(
        model=out_dir / "model.onnx",
        sample_data=out_dir / "samples.npz",
        labels=out_dir / "labels.txt",
        accuracy=accuracy,
    )
    onnx.save(model, paths.model)
    np.savez(paths.sample_data, series=x[1000:1200])
    paths.labels.write_text("")
    return paths


def render_text_lines(
    count: int, *, seed: int = 0, height: int = 48, width: int = 192
) -> np.ndarray:
    """Text-like line images, preprocessed as PP-OCR's classifier expects
    ((x / 255 - 0.5) / 0.5, NCHW): dark glyph strokes of varying size,
    spacing and line length on a light, slightly graded and noisy background."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, height, width), dtype=np.float32)
    for n in range(count):
        page = np.full((height, width), rng.uniform(170, 250), dtype=np.float32)
        page += np.linspace(0, rng.uniform(-20, 20), width, dtype=np.float32)[None, :]
        ink = rng.uniform(0, 80)
        cell_w, cell_h = int(rng.integers(16, 28)), int(rng.integers(26, 38))
        top = int(rng.integers(2, height - cell_h - 1))
        x = int(rng.integers(0, 6))
        for _ in range(int(rng.integers(3, width // cell_w + 1))):
            if x + cell_w > width:
                break
            for _ in range(int(rng.integers(2, 5))):
                t = int(rng.integers(2, 4))
                kind = int(rng.integers(0, 3))
                if kind == 0:  # horizontal stroke
                    y = top + int(rng.integers(0, cell_h - t))
                    x0 = x + int(rng.integers(0, cell_w // 2))
                    x1 = min(x0 + int(rng.integers(cell_w // 3, cell_w)), x + cell_w)
                    page[y : y + t, x0:x1] = ink
                elif kind == 1:  # vertical stroke
                    xx = x + int(rng.integers(0, cell_w - t))
                    y0 = top + int(rng.integers(0, cell_h // 2))
                    y1 = min(y0 + int(rng.integers(cell_h // 3, cell_h)), top + cell_h)
                    page[y0:y1, xx : xx + t] = ink
                else:  # diagonal stroke
                    length = int(rng.integers(cell_h // 2, cell_h))
                    x0 = x + int(rng.integers(0, cell_w // 2))
                    y0 = top + int(rng.integers(0, cell_h // 3))
                    for k in range(length):
                        yy, xx = y0 + k, x0 + k * cell_w // (2 * length)
                        if yy < height - t and xx < width - t:
                            page[yy : yy + t, xx : xx + t] = ink
            x += cell_w + int(rng.integers(1, 5))
        page = np.clip(page + rng.normal(0, 4, page.shape), 0, 255)
        rgb = page[None] * rng.uniform(0.9, 1.0, (3, 1, 1))
        images[n] = (rgb / 255.0 - 0.5) / 0.5
    return images


# PP-OCR's mobile text-direction classifier (MobileNetV3, opset 11), a real
# pretrained CNN that ships inside a PyPI wheel.
RAPIDOCR_WHEEL = "rapidocr-onnxruntime==1.4.4"
PPOCR_CLS_MODEL = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"


class ModelUnavailable(RuntimeError):
    """The wheel carrying a real model could not be fetched."""


def fetch_ppocr_cls(root: Path) -> Path:
    """Download the rapidocr-onnxruntime wheel (from the package index, never
    a model hub) into `root` and extract the classifier from it."""
    return _fetch_from_wheel(RAPIDOCR_WHEEL, PPOCR_CLS_MODEL, root)


# Silero VAD (a stateful voice-activity detector: 512 audio samples, an LSTM
# state [2, batch, 128] fed back at every step, the sample rate as a scalar
# input), a real pretrained model that ships inside a PyPI wheel.
SILERO_VAD_WHEEL = "silero-vad==6.2.3"
SILERO_VAD_MODEL = "silero_vad/data/silero_vad.onnx"


def fetch_silero_vad(root: Path) -> Path:
    """Download the silero-vad wheel (from the package index, never a model
    hub) into `root` and extract its ONNX model from it."""
    return _fetch_from_wheel(SILERO_VAD_WHEEL, SILERO_VAD_MODEL, root)


def _fetch_from_wheel(requirement: str, member: str, root: Path) -> Path:
    import subprocess
    import zipfile

    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement,
         "-d", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    wheels = list(root.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelUnavailable(f"could not download {requirement}: {proc.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(member, root)
    return root / member


# What `python -m edgefleet.demo.models` builds: name -> (builder, what it is).
BUILDERS: dict[str, tuple[Callable[[Path], BuiltModel], str]] = {
    "digits": (build_digits_classifier, "MLP classifier of 8x8 digits; labelled samples"),
    "cnn": (build_small_cnn, "small CNN on the digits as 1x8x8 images; labelled samples"),
    "gru": (build_gru_forecaster, "GRU forecaster of a sensor series; a regressor, no labels"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """List the demo models; with OUT_DIR, build them (or the NAMEs given)
    into OUT_DIR/NAME and print how to push each."""
    parser = argparse.ArgumentParser(
        prog="python -m edgefleet.demo.models",
        description="The demo's small real ONNX models, built in code (no downloads). "
        "Without OUT_DIR: list them.",
    )
    parser.add_argument("out_dir", nargs="?", type=Path, metavar="OUT_DIR")
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these (default: all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BUILDERS]
    if unknown:
        parser.error(f"no demo model named {unknown[0]!r}; known: {', '.join(BUILDERS)}")
    if args.out_dir is None:
        for name, (_, what) in BUILDERS.items():
            print(f"{name:<8}{what}")
        print(f"\nbuild them: {parser.prog} OUT_DIR [NAME...]")
        return 0
    for name in args.names or list(BUILDERS):
        built = BUILDERS[name][0](args.out_dir / name)
        labels = f" --labels {built.labels}" if built.labels.read_text() else ""
        print(f"{name}: {built.model} (held-out score {built.accuracy:.3f})")
        print(f"  edgefleet models push {name} 1.0.0 {built.model} "
              f"--sample-data {built.sample_data}{labels}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
