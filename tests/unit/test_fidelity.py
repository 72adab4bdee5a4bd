"""Output kinds and their metrics (edgefleet.fidelity): what each kind is
inferred from, what `--output` accepts, and that each metric tells a
faithful conversion from a broken one where argmax over the last axis
could not (the text detector's probability map: 22% "agreement" for a
max|diff| of 7e-5)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.fidelity import (
    OutputKind,
    OutputScore,
    OutputSpec,
    SpecError,
    Tensor,
    check_against_outputs,
    decode_greedy,
    edit_distance,
    infer,
    lowest,
    parse_output,
    resolve,
    score,
)

K = OutputKind


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("probs", (-1, 10), K.CLASS_SCORES),
        ("logits", (1, 1000), K.CLASS_SCORES),
        ("prob_map", (-1, 1, 48, -1), K.DENSE_MAP),
        ("out", (1, 21, 64, 64), K.DENSE_MAP),
        ("logits", (-1, 40, 97), K.SEQUENCE),
        ("last_hidden_state", (1, 16, 384), K.REGRESSION),
        ("embedding", (1, 512), K.REGRESSION),
        ("output", (1, 1), K.REGRESSION),
        ("score", (-1,), K.REGRESSION),
        ("y", (), K.REGRESSION),
        ("Y", (1, 1, 1, 8), K.REGRESSION),  # an ONNX GRU's output
        ("y", (1, 1, 8), K.REGRESSION),
        ("mask", (-1, 32, 32), K.DENSE_MAP),
    ],
)
def test_kinds_are_inferred_from_shape_and_name(
    name: str, shape: tuple[int, ...], kind: OutputKind
) -> None:
    spec = infer(Tensor(name, shape), [Tensor("x", (1, 3, 32, 32))])
    assert spec.kind is kind and not spec.declared


def test_a_state_output_is_paired_with_its_input() -> None:
    # silero-vad: input/state/sr in, output/stateN out.
    inputs = [Tensor("input", (-1, 512)), Tensor("state", (2, -1, 128)), Tensor("sr", ())]
    outputs = [Tensor("output", (-1, 1)), Tensor("stateN", (2, -1, 128))]
    specs = resolve(outputs, inputs, [])
    assert [s.kind for s in specs] == [K.REGRESSION, K.STATE]
    assert specs[1].state_input == "state" and not specs[1].judged
    # A GRU: hn feeds h0.
    gru = resolve([Tensor("y", (1, 1, 8)), Tensor("hn", (1, 1, 8))],
                  [Tensor("x", (1, 1, 4)), Tensor("h0", (1, 1, 8))], [])  # fmt: skip
    assert gru[1].kind is K.STATE and gru[1].state_input == "h0"
    assert gru[0].kind is not K.STATE  # same shape, but not a state's name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("maps=dense-map:threshold=0.3", OutputSpec("maps", K.DENSE_MAP, threshold=0.3)),
        ("logits=ctc:blank=5", OutputSpec("logits", K.SEQUENCE, blank=5)),
        ("stateN=state:input=state", OutputSpec("stateN", K.STATE, state_input="state")),
        ("emb=embedding", OutputSpec("emb", K.REGRESSION)),
        ("output:0=classes", OutputSpec("output:0", K.CLASS_SCORES)),
        ("a=b=regression", OutputSpec("a=b", K.REGRESSION)),
    ],
)
def test_output_declarations_parse(text: str, expected: OutputSpec) -> None:
    import dataclasses

    assert parse_output(text) == dataclasses.replace(expected, declared=True)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("probs", "expected NAME=KIND"),
        ("probs=boxes", "expected NAME=KIND"),
        ("=dense-map", "expected NAME=KIND"),
        ("p=dense-map:threshold=nan", "not a finite number"),
        ("p=dense-map:threshold=x", "not a finite number"),
        ("p=sequence:blank=-1", "not a class index"),
        ("p=class-scores:threshold=0.5", "takes no option"),
        ("p=dense-map:blank=0", "takes threshold="),
        ("p=state:input=", "names the input"),
        ("p=dense-map:", "nothing after ':'"),
        ("p=dense-map:threshold=0.3:blank=2", "one option per output"),
    ],
)
def test_bad_output_declarations_say_why(text: str, says: str) -> None:
    with pytest.raises(SpecError, match=says):
        parse_output(text)


def test_declarations_are_checked_against_the_model() -> None:
    outputs = [Tensor("y", (1, 1, 8)), Tensor("hn", (1, 1, 8))]
    inputs = [Tensor("x", (1, 1, 4)), Tensor("h0", (1, 1, 8))]
    with pytest.raises(SpecError, match=r"no output of that name; its outputs are \['hn', 'y'\]"):
        resolve(outputs, inputs, [parse_output("z=regression")])
    with pytest.raises(SpecError, match="declared twice"):
        resolve(outputs, inputs, [parse_output("y=regression"), parse_output("y=state")])
    with pytest.raises(SpecError, match="no input of that name"):
        resolve(outputs, inputs, [parse_output("hn=state:input=h1")])
    with pytest.raises(SpecError, match=r"cannot be fed into the input's \[1, 1, 4\]"):
        resolve(outputs, inputs, [parse_output("hn=state:input=x")])
    for shape in ((-1, 1, 16, 1), (-1, 5), (-1, 1, 16, 16), (-1, 20, 1)):
        with pytest.raises(SpecError, match=r"is not class scores per step"):
            resolve([Tensor("p", shape)], inputs, [parse_output("p=sequence")])
    with pytest.raises(SpecError, match=r"blank=99: the output has 8 classes on its last axis"):
        resolve(outputs, inputs, [parse_output("y=sequence:blank=99")])
    # A class count the model leaves dynamic is checked once the build knows it.
    dynamic = resolve(
        [Tensor("logits", (-1, 20, -1))], inputs, [parse_output("logits=sequence:blank=9")]
    )
    check_against_outputs(dynamic, [(1, 20, 12)])
    with pytest.raises(SpecError, match=r"blank=9, but it has 4 classes on its last axis"):
        check_against_outputs(dynamic, [(1, 20, 4)])
    declared = resolve(outputs, inputs, [parse_output("y=dense-map:threshold=0")])
    assert declared[0] == OutputSpec("y", K.DENSE_MAP, threshold=0.0, declared=True)
    assert declared[1].kind is K.STATE  # still inferred


def test_spec_json_round_trip() -> None:
    for spec in (
        OutputSpec("m", K.DENSE_MAP, threshold=0.25, declared=True),
        OutputSpec("s", K.STATE, state_input="h0"),
        OutputSpec("c", K.SEQUENCE, blank=3),
    ):
        assert OutputSpec.from_json(spec.to_json()) == spec


# ------------------------------------------------------------------ metrics


def _prob_map(rng: np.random.Generator) -> np.ndarray:
    """A text detector's map: mostly saturated background near 0 (where
    argmax over the width is decided by the last bits), a few text boxes
    near 1."""
    maps = rng.uniform(0.0, 1e-4, size=(8, 1, 1, 48, 192)).astype(np.float32)
    maps[:, :, :, 10:20, 30:120] = rng.uniform(0.8, 1.0, size=(8, 1, 1, 10, 90))
    return maps


def test_a_faithful_probability_map_scores_high_where_argmax_scored_noise() -> None:
    rng = np.random.default_rng(0)
    reference = _prob_map(rng)
    faithful = reference + rng.normal(scale=7e-5, size=reference.shape).astype(np.float32)
    spec = OutputSpec("maps", K.DENSE_MAP)
    result = score(spec, faithful, reference)
    assert result.metric == "mask IoU" and result.value > 0.999
    assert result.details["PSNR dB"] > 60 and result.details["relative error"] < 1e-3
    # What argmax over the last axis said of the same arrays: noise.
    argmax = score(OutputSpec("maps", K.CLASS_SCORES), faithful, reference).value
    assert argmax < 0.5
    # A conversion that lost the boxes' edges is caught.
    eroded = reference.copy()
    eroded[:, :, :, 10:20, 30:60] = 0.1
    assert score(spec, eroded, reference).value < 0.7
    # A threshold picks what counts as the mask: at 0.05 the faded edges still do.
    assert score(OutputSpec("maps", K.DENSE_MAP, threshold=0.05), eroded, reference).value == 1


def test_an_empty_reference_mask_is_not_a_perfect_iou() -> None:
    """A threshold above every value (or silence for a voice detector) makes
    every mask empty and any IoU 1.0: judged by relative error instead, and
    the metric's name says why."""
    rng = np.random.default_rng(4)
    quiet = rng.uniform(0.0, 0.01, size=(16, 1, 1)).astype(np.float32)
    spec = OutputSpec("speech", K.DENSE_MAP, threshold=0.5)
    noisy = quiet + rng.normal(0, 0.01, size=quiet.shape).astype(np.float32)
    result = score(spec, noisy, quiet)
    assert result.metric == "1 - relative error (reference mask empty at threshold 0.5)"
    assert result.value < 0.5 and result.details["reference mask share"] == 0.0
    assert score(spec, quiet, quiet).value == 1.0
    full = score(OutputSpec("m", K.DENSE_MAP, threshold=-1), quiet, quiet)
    assert "reference mask full" in full.metric


def test_segmentation_logits_are_judged_by_class_iou() -> None:
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(4, 1, 5, 16, 16)).astype(np.float32)
    same = score(OutputSpec("seg", K.DENSE_MAP), reference, reference)
    assert same.value == 1.0 and same.metric == "mean class IoU"
    shuffled = reference[:, :, ::-1]  # classes swapped per pixel
    result = score(OutputSpec("seg", K.DENSE_MAP), shuffled, reference)
    assert result.value < 0.5 and result.details["pixel agreement"] < 0.5


def test_ctc_sequences_are_decoded_and_compared() -> None:
    assert decode_greedy(np.eye(4)[[0, 1, 1, 0, 2, 2, 3, 0]], blank=0) == [1, 2, 3]
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 4]) == 2
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(6, 1, 20, 12)).astype(np.float32)
    spec = OutputSpec("logits", K.SEQUENCE, blank=0)
    same = score(spec, reference + 1e-6, reference)
    assert same.value == 1.0 and same.details["per-step agreement"] == 1.0
    # One step's best class changed in every sample: steps mostly agree,
    # sequences do not match exactly.
    changed = reference.copy()
    best = np.argmax(reference[:, :, 5], axis=-1)
    for k in range(6):
        changed[k, 0, 5, best[k, 0]] -= 100
    result = score(spec, changed, reference)
    assert result.details["per-step agreement"] == pytest.approx(19 / 20)
    assert result.value < 1.0 and result.details["1 - CER"] < 1.0


def test_regression_and_embeddings_by_cosine_and_relative_error() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(10, 1, 64)).astype(np.float32)
    spec = OutputSpec("emb", K.REGRESSION)
    close = score(spec, reference * 1.001, reference)
    assert close.value > 0.9999 and close.details["relative error"] == pytest.approx(0.001, 1e-3)
    assert score(spec, -reference, reference).value == pytest.approx(-1.0)
    # One value per sample: the vector over the samples is compared.
    scalars = rng.uniform(size=(10, 1, 1))
    assert score(spec, scalars, scalars).value == pytest.approx(1.0)
    assert score(spec, scalars[::-1].copy(), scalars).value < 0.99


def test_state_outputs_are_not_judged_and_lowest_skips_them() -> None:
    state = score(OutputSpec("hn", K.STATE), np.ones((2, 3)), np.zeros((2, 3)))
    assert not state.judged and state.details["max abs diff"] == 1.0
    judged = OutputScore("y", K.REGRESSION, "cosine similarity", 0.97)
    assert lowest([state, judged]) == judged and lowest([state]) is None
    assert OutputScore.from_json(judged.to_json()) == judged


def test_non_finite_candidate_outputs_score_zero_never_nan() -> None:
    """A NaN compares false with every floor: were it the value, it would
    pass. A candidate whose outputs overflowed scores 0, and says why."""
    reference = np.ones((4, 1, 8), np.float32)
    broken = reference.copy()
    broken[2, 0, 3] = np.nan
    for kind in (K.REGRESSION, K.CLASS_SCORES, K.DENSE_MAP, K.SEQUENCE):
        result = score(OutputSpec("y", kind), broken, reference)
        assert result.value == 0.0 and result.details == {"non-finite values": 1.0}
    assert not score(OutputSpec("h", K.STATE), broken, reference).judged
