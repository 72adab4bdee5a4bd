"""Small real models built in code: no downloads. The digits classifier is an
MLP trained with scikit-learn on its bundled 8x8 digits data set, exported to
ONNX with onnx.helper, with the held-out split as sample/calibration data."""

from __future__ import annotations

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
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet-demo"
    )
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def build_digits_classifier(out_dir: Path, *, hidden: int = 32, seed: int = 0) -> BuiltModel:
    """Train and export the digits MLP; writes model.onnx, samples.npz, labels.txt."""
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
    model = mlp_graph(list(clf.coefs_), list(clf.intercepts_), opset=17)
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
