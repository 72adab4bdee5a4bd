"""Labels the CLI and the TUI share: the candidate table's columns and
unmeasured candidates, members' state names, and gates before telemetry."""

from __future__ import annotations

from edgefleet.controlplane.cli import render
from edgefleet.controlplane.client.syntax import enum_name
from edgefleet.tui.client import _enum
from edgefleet.tui.data import Candidate, Gate, StageStatus
from edgefleet.tui.screens.models import CANDIDATE_COLUMNS, candidate_cells
from edgefleet.tui.screens.monitor import gate_line, stage_counts
from edgefleet.v1 import operator_pb2 as o


def _candidate(**fields: object) -> Candidate:
    base: dict[str, object] = dict(
        name="fp16", quantization="fp16", size_bytes=0, latency_p95_ms=0.0, agreement=0.0,
        accuracy=None, passed=False, chosen=False,
    )  # fmt: skip
    base.update(fields)
    return Candidate(**base)  # type: ignore[arg-type]


def test_tui_candidate_columns_say_what_they_are() -> None:
    assert CANDIDATE_COLUMNS == (
        "candidate", "size", "p95 ms", "peak MB", "fidelity", "accuracy", "verdict", "reasons",
    )  # fmt: skip


def test_tui_fidelity_names_its_metric_and_notes_follow_reasons() -> None:
    judged = _candidate(
        agreement=0.9312, size_bytes=10, metric="mask IoU", passed=True,
        notes=("latency p95 4.85 ms is 3.0% under the budget 5.00 ms",),
    )  # fmt: skip
    cells = candidate_cells(judged)
    assert cells[4] == "93.1% mask IoU"
    assert cells[7] == "note: latency p95 4.85 ms is 3.0% under the budget 5.00 ms"


def test_tui_unbuilt_candidate_shows_dashes_and_its_error() -> None:
    broken = _candidate(error="not built: unsupported op Resize")
    assert candidate_cells(broken) == (
        "fp16", "-", "-", "-", "-", "-", "error", "not built: unsupported op Resize",
    )  # fmt: skip
    measured = _candidate(
        name="int8-dynamic", size_bytes=1_100_000, latency_p95_ms=11.0, agreement=0.991,
        accuracy=0.953, passed=True, chosen=True, peak_memory_mb=40.2,
    )  # fmt: skip
    assert candidate_cells(measured) == (
        "int8-dynamic", "1.0 MiB", "11.000", "40.2", "99.1%", "95.3%", "CHOSEN", "-",
    )  # fmt: skip
    # Measured without labels: no accuracy, not 0%.
    assert candidate_cells(_candidate(agreement=0.97, size_bytes=10))[5] == "-"


def test_member_state_names_match_in_cli_and_tui() -> None:
    for value in o.RolloutDeviceState.values():
        if value:
            assert _enum(o.RolloutDeviceState, value) == enum_name(o.RolloutDeviceState, value)
    assert _enum(o.RolloutDeviceState, o.ROLLOUT_DEVICE_STATE_WAITING) == "waiting"


def test_stage_counts_match_in_cli_and_tui() -> None:
    tui = StageStatus(index=0, name="", total=6, committed=1, failed=1, in_progress=4,
                      state="rolling", phase="rolling", waiting=3)  # fmt: skip
    assert stage_counts(tui) == "1/6 rolling, 1 failed, 3 waiting, 1 installing"
    cli = o.StageStatus(index=0, total=6, committed=1, failed=1, in_progress=4, waiting=3)
    rollout = o.Rollout(id="r" * 32, state=o.ROLLOUT_STATE_RUNNING, stages=[cli])
    rollout.spec.stages.add(count=6)
    assert render.rollout_line(rollout).endswith("1/6 committed, 1 failed, 3 waiting, 1 installing")


def test_tui_gate_waits_for_telemetry() -> None:
    stage = StageStatus(index=0, name="", total=2, committed=0, failed=0, in_progress=2,
                        state="rolling", spec="100%,error-rate=0.05,latency=1.5")  # fmt: skip
    assert gate_line(stage, Gate("latency_p95", 0, 0, True)) == (
        "stage 1: latency_p95 waiting for telemetry"
    )
    assert gate_line(stage, Gate("error_rate", 0, 0, True)) == (
        "stage 1: error_rate waiting for telemetry"
    )
    assert gate_line(stage, Gate("latency_p95", 12, 30, True)) == (
        "stage 1: latency_p95 12.00 ms <= 30.00 ms ok"
    )
    strict = StageStatus(index=1, name="", total=2, committed=0, failed=0, in_progress=2,
                         state="rolling", spec="100%,error-rate=0")  # fmt: skip
    assert gate_line(strict, Gate("error_rate", 0, 0, True)) == (
        "stage 2: error_rate 0.00% <= 0.00% ok"
    )


def test_tui_versions_show_each_outputs_kind_and_carry_push_warnings() -> None:
    from edgefleet.tui.client import version_from_pb
    from edgefleet.v1 import common_pb2 as c

    pushed = c.ModelVersion(
        model_name="det", version="1.0.0",
        outputs=[c.TensorSpec(name="prob_map", dtype="float32", shape=[-1, 1, 48, -1]),
                 c.TensorSpec(name="extra", dtype="float32", shape=[-1, 4])],
        output_specs=[c.OutputSpec(name="prob_map", kind=c.OUTPUT_KIND_DENSE_MAP)],
        push_warnings=["TFLite class 'pi' takes static shapes; its build fixes ..."],
    )  # fmt: skip
    version = version_from_pb(pushed)
    assert version.outputs[0].endswith("(dense-map)")
    assert "(" not in version.outputs[1]  # no kind known: nothing said
    assert version.push_warnings == ("TFLite class 'pi' takes static shapes; its build fixes ...",)
