"""What a model output means, and how close a converted model's output is to
the original's by a metric that fits that meaning.

Shared by the build (controlplane.build: every candidate judged against the
fp32 model) and the agent (agent.update.validate: a device's run of the
artifact judged against the golden outputs), so both say the same thing
about the same arrays. numpy only, imported where used: the agent imports
this module at boot.

Output kinds (docs/operators/models.md#output-kinds):

| kind | what it is | metric judged against the floor | also shown |
|---|---|---|---|
| class-scores | scores over classes, last axis | top-1 agreement | top-5 agreement |
| dense-map | a value per pixel or cell | mask IoU | relative error, PSNR |
| sequence | class scores per step (CTC) | decoded exact match | per-step agreement, 1 - CER |
| regression | values, embeddings | cosine similarity | relative error |
| state | fed back into an input | not judged | max abs diff |

Arrays handed to `score` hold one entry per sample on axis 0, each as the
model gave it for that sample (a batch of one keeps its batch axis)."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


class OutputKind(enum.StrEnum):
    CLASS_SCORES = "class-scores"
    DENSE_MAP = "dense-map"
    SEQUENCE = "sequence"
    REGRESSION = "regression"
    STATE = "state"


# Other words operators use for a kind, accepted in `--output NAME=KIND`.
KIND_ALIASES: dict[str, OutputKind] = {
    **{k.value: k for k in OutputKind},
    "classes": OutputKind.CLASS_SCORES,
    "classifier": OutputKind.CLASS_SCORES,
    "scores": OutputKind.CLASS_SCORES,
    "map": OutputKind.DENSE_MAP,
    "mask": OutputKind.DENSE_MAP,
    "segmentation": OutputKind.DENSE_MAP,
    "heatmap": OutputKind.DENSE_MAP,
    "ctc": OutputKind.SEQUENCE,
    "embedding": OutputKind.REGRESSION,
    "values": OutputKind.REGRESSION,
}

# What each kind's options are called in `--output NAME=KIND:OPTION=VALUE`.
KIND_OPTIONS: dict[OutputKind, tuple[str, ...]] = {
    OutputKind.CLASS_SCORES: (),
    OutputKind.DENSE_MAP: ("threshold",),
    OutputKind.SEQUENCE: ("blank",),
    OutputKind.REGRESSION: (),
    OutputKind.STATE: ("input",),
}

# The metric of each kind compared with the fidelity floor.
METRIC: dict[OutputKind, str] = {
    OutputKind.CLASS_SCORES: "top-1 agreement",
    OutputKind.DENSE_MAP: "mask IoU",
    OutputKind.SEQUENCE: "decoded exact match",
    OutputKind.REGRESSION: "cosine similarity",
    OutputKind.STATE: "not judged",
}

DEFAULT_THRESHOLD = 0.5
DEFAULT_BLANK = 0
# A last axis of one element has no argmax; such class scores agree when
# they are this close, relative to the reference's spread.
SCALAR_AGREEMENT_RTOL = 0.01
# PSNR of identical arrays is infinite; JSON and protobuf readers get this.
PSNR_CAP_DB = 200.0
MAX_NAME_CHARS = 256


class SpecError(ValueError):
    """An output declaration that cannot be used; the message says why."""


@dataclass(frozen=True)
class OutputSpec:
    """One model output's kind and the options its metric takes."""

    name: str
    kind: OutputKind
    threshold: float | None = None  # dense-map
    blank: int | None = None  # sequence
    state_input: str = ""  # state: the input it feeds
    declared: bool = False

    @property
    def judged(self) -> bool:
        return self.kind is not OutputKind.STATE

    def describe(self) -> str:
        """`NAME=KIND[:OPTION=VALUE]`, the form `--output` takes."""
        option = ""
        if self.threshold is not None:
            option = f":threshold={self.threshold:g}"
        elif self.blank is not None:
            option = f":blank={self.blank}"
        elif self.state_input:
            option = f":input={self.state_input}"
        return f"{self.name}={self.kind.value}{option}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind.value}
        if self.threshold is not None:
            data["threshold"] = self.threshold
        if self.blank is not None:
            data["blank"] = self.blank
        if self.state_input:
            data["state_input"] = self.state_input
        if self.declared:
            data["declared"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputSpec:
        return cls(
            name=str(data["name"]),
            kind=OutputKind(data["kind"]),
            threshold=None if data.get("threshold") is None else float(data["threshold"]),
            blank=None if data.get("blank") is None else int(data["blank"]),
            state_input=str(data.get("state_input", "")),
            declared=bool(data.get("declared", False)),
        )


def parse_output(text: str) -> OutputSpec:
    """`NAME=KIND[:OPTION=VALUE]` as typed after `--output`, e.g.
    `maps=dense-map:threshold=0.3`, `logits=ctc:blank=0`,
    `stateN=state:input=state`. Output names may themselves hold `=` or
    `:` (`output:0`): the kind is the first word after an `=` that names
    one. Raises SpecError."""
    for at in range(len(text)):
        if text[at] != "=":
            continue
        name, rest = text[:at], text[at + 1 :]
        word, colon, option = rest.partition(":")
        kind = KIND_ALIASES.get(word.strip().lower())
        if kind is None or not name:
            continue
        return _with_option(OutputSpec(name, kind, declared=True), option, given=bool(colon))
    kinds = ", ".join(k.value for k in OutputKind)
    raise SpecError(
        f"--output {text!r}: expected NAME=KIND[:OPTION=VALUE] with KIND one of {kinds} "
        "(e.g. probs=dense-map:threshold=0.3, logits=sequence:blank=0, stateN=state:input=state)"
    )


def _with_option(spec: OutputSpec, option: str, *, given: bool = False) -> OutputSpec:
    if not option:
        if given:
            raise SpecError(f"--output {spec.name}={spec.kind.value}: nothing after ':'")
        return spec
    key, eq, value = option.partition("=")
    if ":" in value:
        raise SpecError(
            f"--output {spec.name}={spec.kind.value}:{option}: one option per output "
            f"({spec.kind} takes {', '.join(o + '=' for o in KIND_OPTIONS[spec.kind]) or 'none'})"
        )
    key = key.strip().lower()
    allowed = KIND_OPTIONS[spec.kind]
    if not eq or key not in allowed:
        takes = f"takes {', '.join(o + '=' for o in allowed)}" if allowed else "takes no option"
        raise SpecError(f"--output {spec.name}={spec.kind.value}:{option}: {spec.kind} {takes}")
    if key == "threshold":
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not math.isfinite(threshold):
            raise SpecError(f"--output {spec.name}: threshold {value!r} is not a finite number")
        return OutputSpec(spec.name, spec.kind, threshold=threshold, declared=True)
    if key == "blank":
        if not value.strip().isdigit() or int(value) > 1_000_000:
            raise SpecError(f"--output {spec.name}: blank {value!r} is not a class index")
        return OutputSpec(spec.name, spec.kind, blank=int(value), declared=True)
    if not value:
        raise SpecError(f"--output {spec.name}: input= names the input the state feeds")
    return OutputSpec(spec.name, spec.kind, state_input=value, declared=True)


@dataclass(frozen=True)
class Tensor:
    """What resolving needs of a model input or output: its name and shape
    (-1 or another negative number for a dynamic dimension)."""

    name: str
    shape: tuple[int, ...]


def resolve(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], declared: Sequence[OutputSpec]
) -> list[OutputSpec]:
    """Every output's spec, in the model's order: the declared ones as
    declared (checked against the model), the others inferred. Raises
    SpecError naming the output."""
    by_name = {o.name: o for o in outputs}
    input_names = {i.name: i for i in inputs}
    specs: dict[str, OutputSpec] = {}
    for spec in declared:
        if len(spec.name) > MAX_NAME_CHARS or "\x00" in spec.name:
            raise SpecError("--output names an output with an unusable name")
        if spec.name not in by_name:
            raise SpecError(
                f"--output {spec.name!r}: the model has no output of that name; its outputs "
                f"are {sorted(by_name)}"
            )
        if spec.name in specs:
            raise SpecError(f"--output {spec.name!r} is declared twice")
        if spec.kind is OutputKind.STATE:
            spec = _checked_state(spec, by_name[spec.name], inputs, input_names)
        elif spec.kind is OutputKind.SEQUENCE:
            _check_sequence(spec, by_name[spec.name])
        specs[spec.name] = spec
    return [specs.get(o.name) or infer(o, inputs) for o in outputs]


def _check_sequence(spec: OutputSpec, output: Tensor) -> None:
    """A sequence is class scores per step, [N, steps, classes] (or
    [steps, N, classes]): rank 3, at least two classes, and a blank among
    them where the class count is fixed (build_check checks it otherwise)."""
    classes = output.shape[-1] if output.shape else 1
    if len(output.shape) != 3 or classes == 1:
        raise SpecError(
            f"--output {spec.name}=sequence: its shape {list(output.shape)} is not class "
            "scores per step (a sequence is [N, steps, classes], rank 3); declare it as "
            "class-scores, regression or dense-map instead"
        )
    blank = DEFAULT_BLANK if spec.blank is None else spec.blank
    if classes > 0 and blank >= classes:
        raise SpecError(
            f"--output {spec.name}=sequence:blank={blank}: the output has {classes} classes "
            f"on its last axis (0-{classes - 1})"
        )


def check_against_outputs(specs: Sequence[OutputSpec], shapes: Sequence[tuple[int, ...]]) -> None:
    """What a declaration's options need of an output's size once it is
    known (the model left it dynamic): a sequence's blank among its classes.
    `shapes`: each output's shape as the model gave it. Raises SpecError."""
    for spec, shape in zip(specs, shapes, strict=True):
        blank = spec.blank
        if spec.kind is OutputKind.SEQUENCE and blank is not None and shape and blank >= shape[-1]:
            raise SpecError(
                f"output {spec.name!r} is declared sequence:blank={blank}, but it has "
                f"{shape[-1]} classes on its last axis (0-{shape[-1] - 1})"
            )


def _checked_state(
    spec: OutputSpec,
    output: Tensor,
    inputs: Sequence[Tensor],
    input_names: Mapping[str, Tensor],
) -> OutputSpec:
    if not spec.state_input:
        paired = _state_input(output, inputs)
        if paired is None:
            raise SpecError(
                f"--output {spec.name}=state: say which input it feeds "
                f"({spec.name}=state:input=NAME; inputs: {sorted(input_names)})"
            )
        return OutputSpec(spec.name, spec.kind, state_input=paired.name, declared=True)
    feeds = input_names.get(spec.state_input)
    if feeds is None:
        raise SpecError(
            f"--output {spec.name}=state:input={spec.state_input}: the model has no input of "
            f"that name; its inputs are {sorted(input_names)}"
        )
    if not _same_shape(feeds.shape, output.shape):
        raise SpecError(
            f"--output {spec.name}=state:input={spec.state_input}: the output's shape "
            f"{list(output.shape)} cannot be fed into the input's {list(feeds.shape)}"
        )
    return spec


# Words in output names that say what they hold.
_STATE_WORDS = ("state", "hidden", "h_n", "hn", "c_n", "cn", "cache", "memory")
_MAP_WORDS = ("map", "mask", "seg", "heatmap", "heat", "density", "depth", "sigmoid")
_VALUE_WORDS = ("embed", "feature", "vector", "hidden", "latent", "regress", "box", "value")


def infer(output: Tensor, inputs: Sequence[Tensor]) -> OutputSpec:
    """An output's kind from its shape and name, where a declaration does
    not give it:

    - shaped like an input, with a state-like name (or its input's name
      with a suffix, state -> stateN): state, fed back into that input;
    - rank 3 and more with at most one dimension above 1 after the batch
      (a recurrent layer's [1, 1, 1, hidden]): regression;
    - rank 4 and more (N, C, H, W), or rank 3 with a map-like name:
      dense-map;
    - rank 3 (N, T, C) with C > 1: sequence, unless its name says values
      (an encoder's hidden states);
    - rank 2 with a last axis of more than one element: class-scores,
      unless its name says values (an embedding);
    - anything else (one value per sample): regression.
    A dynamic dimension counts as above 1."""
    name = output.name.lower()
    paired = _state_input(output, inputs)
    if paired is not None:
        return OutputSpec(output.name, OutputKind.STATE, state_input=paired.name)
    shape = output.shape
    rank = len(shape)
    last = shape[-1] if shape else 1
    says_values = any(w in name for w in _VALUE_WORDS)
    spread = [d for d in shape[1:] if d != 1]
    if rank >= 3 and len(spread) <= 1:
        return OutputSpec(output.name, OutputKind.REGRESSION)
    if rank >= 4 or (rank == 3 and any(w in name for w in _MAP_WORDS)):
        return OutputSpec(output.name, OutputKind.DENSE_MAP)
    if rank == 3 and last != 1 and not says_values:
        return OutputSpec(output.name, OutputKind.SEQUENCE)
    if rank == 2 and last != 1 and not says_values:
        return OutputSpec(output.name, OutputKind.CLASS_SCORES)
    return OutputSpec(output.name, OutputKind.REGRESSION)


def _state_input(output: Tensor, inputs: Sequence[Tensor]) -> Tensor | None:
    """The input this output is the next value of, if it looks like one: the
    same shape, and either a state-like name or the input's name plus a
    suffix (state -> stateN, h0 -> h0_out)."""
    name = output.name.lower()
    stateful = any(w in name for w in _STATE_WORDS) or name in ("h", "c", "h1", "c1")
    matches = [
        i
        for i in inputs
        if len(i.shape) >= 2
        and _same_shape(i.shape, output.shape)
        and (stateful or (name != i.name.lower() and name.startswith(i.name.lower())))
    ]
    return matches[0] if len(matches) == 1 else None


def _same_shape(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class OutputScore:
    """One output's fidelity: its kind's metric and the figures beside it."""

    output: str
    kind: OutputKind
    metric: str
    value: float
    details: dict[str, float] = field(default_factory=dict)

    @property
    def judged(self) -> bool:
        return self.kind is not OutputKind.STATE

    def describe(self) -> str:
        """`probs: mask IoU 0.9931 (relative error 0.004, PSNR 48.1 dB)`."""
        if not self.judged:
            extra = ", ".join(f"{k} {v:.3g}" for k, v in self.details.items())
            return f"{self.output}: state, not judged" + (f" ({extra})" if extra else "")
        extra = ", ".join(f"{k} {v:.4g}" for k, v in self.details.items())
        return f"{self.output}: {self.metric} {self.value:.4f}" + (f" ({extra})" if extra else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "kind": self.kind.value,
            "metric": self.metric,
            "value": self.value,
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutputScore:
        return cls(
            str(data["output"]),
            OutputKind(data["kind"]),
            str(data["metric"]),
            float(data["value"]),
            {str(k): float(v) for k, v in dict(data.get("details", {})).items()},
        )


def score(spec: OutputSpec, output: np.ndarray, reference: np.ndarray) -> OutputScore:
    """How close `output` is to `reference` by `spec`'s kind; 1.0 is
    identical, and 0.0 where `output` holds NaN or infinite values. Both
    hold one entry per sample on axis 0, with the same shape (the caller
    checks; the reference is expected finite)."""
    import numpy as np

    kind = spec.kind
    bad = output.size - int(np.count_nonzero(np.isfinite(output))) if output.size else 0
    if bad and kind is not OutputKind.STATE:
        # NaN compares as nothing, so any metric over it would read as
        # whatever its arithmetic gives (a NaN that passes every floor).
        return OutputScore(spec.name, kind, METRIC[kind], 0.0, {"non-finite values": float(bad)})
    if kind is OutputKind.CLASS_SCORES:
        value, details = _class_scores(output, reference)
    elif kind is OutputKind.DENSE_MAP:
        value, details, metric = _dense_map(output, reference, spec.threshold)
        return OutputScore(spec.name, kind, metric, float(value), details)
    elif kind is OutputKind.SEQUENCE:
        value, details = _sequence(
            output, reference, DEFAULT_BLANK if spec.blank is None else spec.blank
        )
    elif kind is OutputKind.REGRESSION:
        value, details = _regression(output, reference)
    else:
        value, details = 1.0, {"max abs diff": _max_abs_diff(output, reference)}
    return OutputScore(spec.name, kind, METRIC[kind], float(value), details)


def state_pairs(specs: Sequence[OutputSpec]) -> tuple[tuple[str, str], ...]:
    """(output, input) of each state output: what is fed back at the next step."""
    return tuple((s.name, s.state_input) for s in specs if s.kind is OutputKind.STATE)


def lowest(scores: Sequence[OutputScore]) -> OutputScore | None:
    """The judged output farthest from the original: what the floor is
    compared with. None when no output is judged."""
    judged = [s for s in scores if s.judged]
    return min(judged, key=lambda s: s.value) if judged else None


def _f64(array: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.asarray(array, dtype=np.float64)


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(_f64(a) - _f64(b))))


def _per_sample(array: np.ndarray) -> np.ndarray:
    """(samples, everything else flattened)."""
    return array.reshape(array.shape[0] if array.ndim else 1, -1)


def _class_scores(output: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, float]]:
    import numpy as np

    if output.size == 0:
        return 1.0, {}
    classes = output.shape[-1] if output.ndim else 1
    if classes == 1:
        # No argmax: values within SCALAR_AGREEMENT_RTOL of the reference's spread.
        spread = float(np.ptp(reference)) or 1.0
        close = np.abs(_f64(output) - _f64(reference)) <= SCALAR_AGREEMENT_RTOL * spread
        return float(np.mean(close)), {}
    got = output.reshape(-1, classes)
    want = reference.reshape(-1, classes)
    top1 = float(np.mean(np.argmax(got, axis=-1) == np.argmax(want, axis=-1)))
    details: dict[str, float] = {}
    if classes > 5:
        top5 = np.argpartition(-_f64(got), 5, axis=-1)[:, :5]
        details["top-5 agreement"] = float(
            np.mean(np.any(top5 == np.argmax(want, axis=-1)[:, None], axis=-1))
        )
    return top1, details


def _dense_map(
    output: np.ndarray, reference: np.ndarray, threshold: float | None
) -> tuple[float, dict[str, float], str]:
    """(value, details, metric name): mask IoU; mean IoU of each pixel's
    class over several channels without a threshold; and where the
    reference's mask is empty (or full) on every sample, which makes any IoU
    a perfect 1.0 that measured nothing, 1 - relative error instead."""
    import numpy as np

    got, want = _f64(output), _f64(reference)
    details = {"relative error": _relative_error(got, want), "PSNR dB": _psnr(got, want)}
    # Per sample (N, C, ...) after the batch of one: several channels and no
    # threshold read as a class per pixel on the channel axis (ONNX's NCHW).
    per_sample = got.shape[1:]
    channels_axis = 2 if len(per_sample) >= 3 and per_sample[0] == 1 else 1
    channels = got.shape[channels_axis] if got.ndim > channels_axis else 1
    if threshold is None and channels > 1 and got.ndim >= 4:
        got_class = np.argmax(got, axis=channels_axis)
        want_class = np.argmax(want, axis=channels_axis)
        ious = []
        for c in np.union1d(np.unique(got_class), np.unique(want_class)):
            ious.append(_iou(got_class == c, want_class == c))
        details["pixel agreement"] = float(np.mean(got_class == want_class))
        return float(np.mean(ious)) if ious else 1.0, details, "mean class IoU"
    cut = DEFAULT_THRESHOLD if threshold is None else threshold
    mask_got, mask_want = got > cut, want > cut
    details["pixel agreement"] = float(np.mean(mask_got == mask_want)) if got.size else 1.0
    share = float(np.mean(mask_want)) if want.size else 0.0
    details["reference mask share"] = share
    if want.size and share in (0.0, 1.0):
        side = "empty" if share == 0.0 else "full"
        error = details["relative error"]
        value = 0.0 if not math.isfinite(error) else max(0.0, 1.0 - error)
        return value, details, f"1 - relative error (reference mask {side} at threshold {cut:g})"
    return _iou(mask_got, mask_want), details, METRIC[OutputKind.DENSE_MAP]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    union = int(np.count_nonzero(a | b))
    if union == 0:
        return 1.0  # both masks empty: nothing to disagree on
    return int(np.count_nonzero(a & b)) / union


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    import numpy as np

    norm = float(np.linalg.norm(want))
    diff = float(np.linalg.norm(got - want))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _psnr(got: np.ndarray, want: np.ndarray) -> float:
    import numpy as np

    if got.size == 0:
        return PSNR_CAP_DB
    mse = float(np.mean((got - want) ** 2))
    peak = float(np.ptp(want)) or float(np.max(np.abs(want), initial=0.0)) or 1.0
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(peak * peak / mse))


def decode_greedy(steps: np.ndarray, blank: int) -> list[int]:
    """CTC greedy decoding of one sample's (steps, classes) scores: the best
    class per step, repeats collapsed, blanks dropped."""
    import numpy as np

    best = np.argmax(steps, axis=-1).tolist()
    decoded: list[int] = []
    previous = None
    for label in best:
        if label != previous and label != blank:
            decoded.append(int(label))
        previous = label
    return decoded


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance, O(len(a) x len(b)) time, O(len(b)) memory."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def _sequence(
    output: np.ndarray, reference: np.ndarray, blank: int
) -> tuple[float, dict[str, float]]:
    import numpy as np

    if output.size == 0:
        return 1.0, {}
    classes = output.shape[-1]
    count = output.shape[0]
    got = output.reshape(count, -1, classes)
    want = reference.reshape(count, -1, classes)
    steps = float(np.mean(np.argmax(got, axis=-1) == np.argmax(want, axis=-1)))
    exact = 0
    errors = 0
    length = 0
    for k in range(count):
        decoded, expected = decode_greedy(got[k], blank), decode_greedy(want[k], blank)
        exact += decoded == expected
        errors += edit_distance(decoded, expected)
        length += len(expected)
    cer = errors / length if length else float(errors > 0)
    return exact / count, {"per-step agreement": steps, "1 - CER": max(0.0, 1.0 - cer)}


def _regression(output: np.ndarray, reference: np.ndarray) -> tuple[float, dict[str, float]]:
    import numpy as np

    got, want = _per_sample(_f64(output)), _per_sample(_f64(reference))
    details = {"relative error": _relative_error(got, want)}
    if got.shape[1] < 2:
        # One value per sample: compare the vector of every sample's value.
        got, want = got.reshape(1, -1), want.reshape(1, -1)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    dots = np.sum(got * want, axis=1)
    both_zero = (np.linalg.norm(got, axis=1) == 0) & (np.linalg.norm(want, axis=1) == 0)
    cosines = np.where(
        both_zero, 1.0, np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    )
    return float(np.mean(cosines)), details
