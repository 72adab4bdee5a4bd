"""The two memory gates compare like with like (issue 21): `memory` judges
the memory the model adds (as builds measure a candidate's peak_memory_mb)
against its class's max_memory_mb x factor; `agent_memory` judges the
agent's whole resident set against one absolute figure. Also the gate's
spec, API and `--stage` syntax round trips."""

from __future__ import annotations

import math

import pytest

from edgefleet.controlplane.api.convert import rollout_spec_from_pb, rollout_spec_to_pb
from edgefleet.controlplane.client.stages import format_stage, parse_stage
from edgefleet.controlplane.domain.rollout_spec import RolloutSpec, SpecError, StageSpec
from edgefleet.controlplane.domain.rollouts import (
    AGENT_MEMORY,
    MEMORY,
    ClassLimits,
    DeviceHealth,
    GateResult,
    Gates,
    describe,
    evaluate_gates,
)
from edgefleet.v1 import operator_pb2

# The demo's classes: a Pi may add 256 MB of model, a gateway 1024 MB.
LIMITS = {
    "pi": ClassLimits(latency_budget_p95_ms=30, max_memory_mb=256),
    "gateway": ClassLimits(latency_budget_p95_ms=10, max_memory_mb=1024),
}


def device(
    device_id: str, class_name: str, *, rss: float | None = None, model: float | None = None
) -> DeviceHealth:
    return DeviceHealth(device_id, class_name, None, None, rss, 1.0, model_memory_mb=model)


def test_the_memory_gate_judges_the_models_memory_not_the_agents_rss() -> None:
    # The demo's old failure: an agent of 95 MB against 20 % of a Pi's 256 MB.
    # The model adds 3 MB, well within 51.2 MB: the gate passes.
    pi = device("pi-1", "pi", rss=94.99, model=3.0)
    (result,) = evaluate_gates([pi], Gates(memory_limit_factor=0.2), LIMITS)
    assert (result.name, result.passing) == (MEMORY, True)
    assert (result.value, result.limit) == (3.0, pytest.approx(51.2))


def test_the_memory_gate_fails_a_model_over_its_classs_limit() -> None:
    devices = [
        device("pi-1", "pi", rss=60.0, model=30.0),  # over 25.6 MB
        device("pi-2", "pi", rss=60.0, model=20.0),
        device("gw-1", "gateway", rss=60.0, model=90.0),  # within 102.4 MB
    ]
    (result,) = evaluate_gates(devices, Gates(memory_limit_factor=0.1), LIMITS)
    assert result.failing_devices == ("pi-1",)
    assert (result.worst_device, result.value) == ("pi-1", 30.0)
    assert result.limit == pytest.approx(25.6)
    assert "memory failing on 1 of 3 devices (pi-1): worst 30 MB on pi-1" in describe(result)


@pytest.mark.parametrize("figure", [None, 0.0, math.nan])
def test_a_device_without_a_model_figure_is_not_judged_on_memory(figure: float | None) -> None:
    # 0 is what an agent reports when it could not measure the model.
    (result,) = evaluate_gates(
        [device("pi-1", "pi", rss=500.0, model=figure)], Gates(memory_limit_factor=0.01), LIMITS
    )
    assert (result.passing, result.checked) == (True, 0)


def test_the_agent_memory_gate_judges_the_agents_rss_with_one_limit_for_every_class() -> None:
    devices = [
        device("pi-1", "pi", rss=130.0, model=1.0),
        device("gw-1", "gateway", rss=110.0, model=1.0),
        device("gw-2", "gateway", rss=None),  # no sample: not judged
        device("pi-2", "pi", rss=120.0),  # at the limit passes
    ]
    (result,) = evaluate_gates(devices, Gates(max_agent_memory_mb=120), LIMITS)
    assert (result.name, result.passing, result.failing_devices) == (
        AGENT_MEMORY, False, ("pi-1",)
    )  # fmt: skip
    assert (result.value, result.limit, result.checked) == (130.0, 120.0, 3)
    text = describe(result)
    assert "agent_memory failing on 1 of 3 devices (pi-1): worst 130 MB on pi-1, limit 120 MB" in (
        text
    )


def test_both_memory_gates_are_reported_in_order_and_apart() -> None:
    pi = device("pi-1", "pi", rss=95.0, model=3.0)
    gates = Gates(memory_limit_factor=0.2, max_agent_memory_mb=80, max_silence_s=60)
    results = evaluate_gates([pi], gates, LIMITS)
    assert [(r.name, r.passing) for r in results] == [
        ("memory", True), ("agent_memory", False), ("silence", True)
    ]  # fmt: skip


def test_the_old_constructors_still_work() -> None:
    # Positional DeviceHealth and Gates keep their meaning; the new fields default off.
    health = DeviceHealth("d", "pi", 10.0, 0.0, 95.0, 1.0)
    assert health.model_memory_mb is None
    assert Gates(0.5, 0.1, 1.0, 60.0).max_agent_memory_mb is None
    assert evaluate_gates([health], Gates(), LIMITS) == []


def test_describe_names_megabytes_for_the_agent_memory_gate() -> None:
    result = GateResult(AGENT_MEMORY, 95.5, 120, True, (), "p1", 1)
    assert describe(result) == "agent_memory passing on 1 device: worst 95.5 MB on p1, limit 120 MB"


# ------------------------------------------------------------------ spec, API, syntax


def _spec(gates: Gates) -> RolloutSpec:
    return RolloutSpec(
        model_name="digits",
        model_version="1.1.0",
        class_names=("pi",),
        stages=(StageSpec("canary", count=2, gates=gates),),
    )


def test_the_spec_refuses_an_agent_memory_gate_that_fails_every_device() -> None:
    with pytest.raises(SpecError, match="max_agent_memory_mb must be a finite number"):
        _spec(Gates(max_agent_memory_mb=-1)).validate()
    for nonsense in (math.nan, math.inf):
        with pytest.raises(SpecError, match="must be a finite number"):
            _spec(Gates(max_agent_memory_mb=nonsense)).validate()
    # 0 would fail every device: leave the gate out instead.
    with pytest.raises(SpecError, match="more than 0"):
        _spec(Gates(max_agent_memory_mb=0)).validate()
    _spec(Gates(max_agent_memory_mb=0.5)).validate()


def test_the_agent_memory_gate_round_trips_the_api_and_the_stored_spec() -> None:
    spec = _spec(Gates(memory_limit_factor=0.5, max_agent_memory_mb=120.5))
    pb = rollout_spec_to_pb(spec)
    assert pb.stages[0].gates.max_agent_memory_mb == 120.5
    back = rollout_spec_from_pb(pb)
    assert back.stages[0].gates == spec.stages[0].gates
    assert RolloutSpec.from_dict(back.to_dict()).stages[0].gates.max_agent_memory_mb == 120.5
    # Unset stays unset (off), not 0 (a gate nothing passes).
    off = rollout_spec_from_pb(rollout_spec_to_pb(_spec(Gates())))
    assert off.stages[0].gates.max_agent_memory_mb is None


def test_a_stored_spec_from_before_the_gate_loads_with_it_off() -> None:
    document = _spec(Gates(memory_limit_factor=0.2)).to_dict()
    del document["stages"][0]["gates"]["max_agent_memory_mb"]
    gates = RolloutSpec.from_dict(document).stages[0].gates
    assert (gates.memory_limit_factor, gates.max_agent_memory_mb) == (0.2, None)


def test_the_stage_syntax_reads_and_writes_the_agent_memory_gate() -> None:
    stage = parse_stage("2,stratified,memory=0.2,agent-memory=120")
    assert stage.gates.memory_limit_factor == pytest.approx(0.2)
    assert stage.gates.max_agent_memory_mb == 120
    assert format_stage(stage) == "2,stratified,memory=0.2,agent-memory=120"
    assert not operator_pb2.StageSpec().gates.HasField("max_agent_memory_mb")
    for bad, says in (("agent-memory=-5", "at least 0"), ("agent-memory=lots", "not a number")):
        with pytest.raises(ValueError, match=says):
            parse_stage(f"10%,{bad}")


def _one_stage(text: str) -> RolloutSpec:
    return rollout_spec_from_pb(operator_pb2.RolloutSpec(
        model_name="digits", model_version="1.1.0", class_names=["pi"], stages=[parse_stage(text)],
    ))  # fmt: skip


def test_errors_100_alone_is_refused_as_it_would_pass_a_stage_with_every_device_failed() -> None:
    """Unset, the success threshold is 100 less the error threshold: 0 for
    errors=100, and a stage with 0 committed devices passed (a stranger's
    try). success= with it is a threshold again."""
    with pytest.raises(SpecError, match=r"success threshold must be more than 0.*promote"):
        _one_stage("100%,errors=100").validate()
    _one_stage("100%,errors=100,success=50").validate()
    _one_stage("100%,errors=99").validate()


def test_bake_0_is_no_bake_as_the_docs_give_its_default() -> None:
    for zero in ("0", "0s", "0m", "0.0s"):
        assert parse_stage(f"10%,bake={zero}").bake_time.ToTimedelta().total_seconds() == 0
    assert parse_stage("10%,bake=5s").bake_time.ToTimedelta().total_seconds() == 5
    for bad in ("bake=", "bake=-5s", "bake=soon"):
        with pytest.raises(ValueError, match="bake"):
            parse_stage(f"10%,{bad}")
