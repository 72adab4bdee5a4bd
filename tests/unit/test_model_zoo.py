"""The model zoo (testkit.model_zoo): every model runs in ONNX Runtime, its
outputs resolve to the kinds they should be judged as, its outputs are not
degenerate, and a numerically exact conversion (fp16 with float32 I/O)
scores >= 0.99 on every judged output's metric, the fp32 model itself 1.0."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgefleet import fidelity
from testkit import model_zoo
from testkit.model_zoo import ZooModel

# Every judged output of a numerically exact conversion (the bar).
EXACT_FLOOR = 0.99
GRU_STEPS = 32


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ZooModel]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: build(root / name) for name, (build, _) in model_zoo.BUILDERS.items()}


def _samples(model: ZooModel) -> list[dict[str, np.ndarray]]:
    """Each sample as a batch of one, as a build runs them; gru_stateful's
    as the independent steps of model_zoo.gru_sequence."""
    if model.sample_data is None:
        seq = model_zoo.gru_sequence(GRU_STEPS)
        return [
            {
                "x": seq["x"][k : k + 1],
                "h0": seq["h0"][k : k + 1],
                "gain": seq["gain"][k : k + 1].reshape(()),
            }
            for k in range(GRU_STEPS)
        ]
    with np.load(model.sample_data) as data:
        arrays = {k: data[k] for k in data.files if k != "labels"}
    count = len(next(iter(arrays.values())))
    return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)]


def _run(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """One array per output, stacked over samples (the layout `score` takes)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    per_sample = [session.run(None, feeds) for feeds in samples]
    return [np.stack(outputs) for outputs in zip(*per_sample, strict=True)]


def _fp16(model: ZooModel) -> onnx.ModelProto:
    from onnxconverter_common import float16  # type: ignore[import-untyped]

    converted: onnx.ModelProto = float16.convert_float_to_float16(
        onnx.load(model.model), keep_io_types=True
    )
    return converted


def _scores(model: ZooModel, candidate: onnx.ModelProto) -> Iterator[fidelity.OutputScore]:
    samples = _samples(model)
    reference = _run(onnx.load(model.model), samples)
    outputs = _run(candidate, samples)
    specs = model_zoo.output_specs(model.model, model.declared)
    for spec, got, want in zip(specs, outputs, reference, strict=True):
        yield fidelity.score(spec, got, want)


@pytest.mark.parametrize("name", sorted(model_zoo.BUILDERS))
def test_outputs_resolve_to_the_expected_kinds(zoo: dict[str, ZooModel], name: str) -> None:
    model = zoo[name]
    specs = model_zoo.output_specs(model.model, model.declared)
    assert {s.name: s.kind for s in specs} == model.kinds == model_zoo.EXPECTED_KINDS[name]
    # Only what inference cannot tell is declared.
    inferred = {s.name: s.kind for s in model_zoo.output_specs(model.model)}
    declared = {s.name for s in model.declared}
    assert {k: v for k, v in inferred.items() if k not in declared} == {
        k: v for k, v in model.kinds.items() if k not in declared
    }
    assert all(inferred[n] is not model.kinds[n] for n in declared), "declaration not needed"


def test_gru_state_feeds_h0(zoo: dict[str, ZooModel]) -> None:
    specs = {s.name: s for s in model_zoo.output_specs(zoo["gru_stateful"].model)}
    assert specs["hn"].state_input == "h0"


@pytest.mark.parametrize("name", sorted(model_zoo.BUILDERS))
def test_fp32_scores_one_against_itself(zoo: dict[str, ZooModel], name: str) -> None:
    scores = list(_scores(zoo[name], onnx.load(zoo[name].model)))
    assert [s.value for s in scores if s.judged] == [1.0] * sum(s.judged for s in scores)


@pytest.mark.parametrize("name", sorted(model_zoo.BUILDERS))
def test_fp16_conversion_scores_at_least_099(zoo: dict[str, ZooModel], name: str) -> None:
    scores = list(_scores(zoo[name], _fp16(zoo[name])))
    judged = [s for s in scores if s.judged]
    assert judged
    for s in judged:
        assert s.value >= EXACT_FLOOR, s.describe()
    # fp16 is close, not bit-exact: the metrics are compared, not the bytes.
    assert any(s.details.get("relative error", 1e-3) > 0 for s in judged)


def test_outputs_are_not_degenerate(zoo: dict[str, ZooModel]) -> None:
    """What makes each model's metric mean something: several classes
    predicted, maps with regions on both sides of 0.5, varied non-empty
    decoded sequences, a state that moves."""
    (probs,) = _run(onnx.load(zoo["image_classifier"].model), _samples(zoo["image_classifier"]))
    assert zoo["image_classifier"].sample_data is not None
    with np.load(zoo["image_classifier"].sample_data) as data:
        labels = data["labels"]
    predicted = probs.reshape(len(probs), -1).argmax(-1)
    assert len(np.unique(predicted)) >= 8
    assert np.mean(predicted == labels) >= 0.9

    (maps,) = _run(onnx.load(zoo["unet_segmenter"].model), _samples(zoo["unet_segmenter"]))
    above = np.mean(maps > 0.5, axis=tuple(range(1, maps.ndim)))
    assert np.all(above > 0.0) and np.all(above < 0.6)

    (logits,) = _run(onnx.load(zoo["ctc_recognizer"].model), _samples(zoo["ctc_recognizer"]))
    assert np.allclose(np.exp(logits).sum(-1), 1.0, atol=1e-4)  # log-probabilities
    decoded = [tuple(fidelity.decode_greedy(s[0], model_zoo.CTC_BLANK)) for s in logits]
    assert all(decoded)
    assert len(set(decoded)) >= len(decoded) * 0.9

    y, hn = _run(onnx.load(zoo["gru_stateful"].model), _samples(zoo["gru_stateful"]))
    assert y.shape[1:] == hn.shape[1:] == (1, 1, model_zoo.GRU_HIDDEN)
    assert float(np.std(hn)) > 0.1


def test_gru_gain_scales_y_only(zoo: dict[str, ZooModel]) -> None:
    session = ort.InferenceSession(
        str(zoo["gru_stateful"].model), providers=["CPUExecutionProvider"]
    )
    feeds = _samples(zoo["gru_stateful"])[5]
    y1, h1 = session.run(None, {**feeds, "gain": np.array(1.0, dtype=np.float32)})
    y3, h3 = session.run(None, {**feeds, "gain": np.array(3.0, dtype=np.float32)})
    np.testing.assert_allclose(y3, 3 * y1, rtol=1e-6)
    np.testing.assert_array_equal(h1, h3)
    np.testing.assert_allclose(y1, h1, rtol=1e-6)  # one step: the output is the new state


def test_builds_are_deterministic(tmp_path: Path) -> None:
    for name in ("unet_segmenter", "ctc_recognizer"):
        a = model_zoo.BUILDERS[name][0](tmp_path / "a" / name, samples=4)
        b = model_zoo.BUILDERS[name][0](tmp_path / "b" / name, samples=4)
        assert a.model.read_bytes() == b.model.read_bytes()
        assert a.sample_data and b.sample_data
        assert a.sample_data.read_bytes() == b.sample_data.read_bytes()
