"""edgefleet.fidelity's values on the wire (edgefleet.v1 OutputKind,
OutputSpec, OutputFidelity) and back: one mapping, used by the control
plane's API, its manifests and the agent's validation."""

from __future__ import annotations

from edgefleet.fidelity import OutputKind, OutputScore, OutputSpec
from edgefleet.v1 import common_pb2 as c

KIND_TO_WIRE: dict[OutputKind, c.OutputKind.ValueType] = {
    OutputKind.CLASS_SCORES: c.OUTPUT_KIND_CLASS_SCORES,
    OutputKind.DENSE_MAP: c.OUTPUT_KIND_DENSE_MAP,
    OutputKind.SEQUENCE: c.OUTPUT_KIND_SEQUENCE,
    OutputKind.REGRESSION: c.OUTPUT_KIND_REGRESSION,
    OutputKind.STATE: c.OUTPUT_KIND_STATE,
}
KIND_FROM_WIRE = {wire: kind for kind, wire in KIND_TO_WIRE.items()}


class UnknownKind(ValueError):
    """An OutputSpec on the wire with no kind, or one this build does not know."""


def spec_to_wire(spec: OutputSpec) -> c.OutputSpec:
    msg = c.OutputSpec(
        name=spec.name,
        kind=KIND_TO_WIRE[spec.kind],
        state_input=spec.state_input,
        declared=spec.declared,
    )
    if spec.threshold is not None:
        msg.threshold = spec.threshold
    if spec.blank is not None:
        msg.blank = spec.blank
    return msg


def spec_from_wire(msg: c.OutputSpec, *, declared: bool | None = None) -> OutputSpec:
    """The spec a message carries; `declared` overrides the message's flag
    (a push's specs are declared whatever the client says). Raises
    UnknownKind for OUTPUT_KIND_UNSPECIFIED or a kind from a newer peer."""
    kind = KIND_FROM_WIRE.get(msg.kind)
    if kind is None:
        known = ", ".join(k.value for k in OutputKind)
        raise UnknownKind(f"output {msg.name!r} has no known kind (one of {known})")
    return OutputSpec(
        name=msg.name,
        kind=kind,
        threshold=msg.threshold if msg.HasField("threshold") else None,
        blank=msg.blank if msg.HasField("blank") else None,
        state_input=msg.state_input,
        declared=msg.declared if declared is None else declared,
    )


def score_to_wire(score: OutputScore) -> c.OutputFidelity:
    return c.OutputFidelity(
        output=score.output,
        kind=KIND_TO_WIRE[score.kind],
        metric=score.metric,
        value=score.value,
        details=score.details,
    )
