"""Several models per device, on the agent: per-model state directories and
the migration of the single-model layout, one update machine per model
running concurrently (real machines, real ModelHost with real ONNX models,
real HostActivator; fake downloads and validation: testkit.update_rig's
ModelsRig), unassigning, a crash in one model's update leaving the other
untouched, and the protocol-2 message shapes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.daemon import assignments_from_desired, batch_statuses, removes_unlisted
from edgefleet.agent.serving import ModelHost, ModelNotFound, warm_inputs
from edgefleet.agent.update.download import artifact_path, part_path
from edgefleet.agent.update.faults import MARKER_FILE, with_pause
from edgefleet.agent.update.layout import (
    InvalidModelName,
    check_model_name,
    held_models,
    migrate_single_model_layout,
    model_dir,
)
from edgefleet.agent.update.store import UpdateStore
from edgefleet.demo.models import build_digits_classifier
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2, device_pb2
from testkit.update_rig import ModelsRig, model_assignment


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        v: build_digits_classifier(root / v, hidden=16 + 8 * seed, seed=seed).model
        for seed, v in enumerate(("1.0.0", "2.0.0", "3.0.0"))
    }


def _answers(host: ModelHost, name: str) -> str:
    """The version of `name` that answers a request (it must answer)."""
    model = host.active(name)
    prediction = host.predict_sync(name, warm_inputs(model.accepts))
    assert all(isinstance(o, np.ndarray) for o in prediction.outputs)
    return prediction.model.version


# ---------------------------------------------------------------- layout


@pytest.mark.parametrize("bad", ["", "../x", "..", ".hidden", "A", "a/b", "a\\b", "x" * 101])
def test_model_names_that_are_not_the_control_planes_are_refused(bad: str) -> None:
    with pytest.raises(InvalidModelName, match="not valid"):
        check_model_name(bad)


def test_per_model_paths(tmp_path: Path) -> None:
    assert UpdateStore(tmp_path, "digits").path == tmp_path / "models" / "digits" / "update.json"
    assert model_dir(tmp_path, "a.b-c_1") == tmp_path / "models" / "a.b-c_1"
    (tmp_path / "models" / "Not-A-Model").mkdir(parents=True)
    (tmp_path / "models" / "ok").mkdir()
    assert held_models(tmp_path) == ["ok"]


def _legacy(state_dir: Path) -> None:
    (state_dir / "update.json").write_text(
        json.dumps({"state": "idle", "assignment": {"model_name": "digits"}, "outcome": "x"})
    )
    (state_dir / "active.json").write_text(
        json.dumps({"active": {"model_name": "digits", "digest": "d"}, "standby": None})
    )


def test_the_single_model_layout_moves_into_its_models_directory(tmp_path: Path) -> None:
    _legacy(tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in ("update.json", "active.json")}
    assert migrate_single_model_layout(tmp_path) == "digits"
    target = tmp_path / "models" / "digits"
    assert {p: (target / p).read_bytes() for p in before} == before
    assert not (tmp_path / "update.json").exists() and not (tmp_path / "active.json").exists()
    assert migrate_single_model_layout(tmp_path) is None  # nothing left to do


def test_an_interrupted_migration_is_finished_on_the_next_boot(tmp_path: Path) -> None:
    _legacy(tmp_path)
    target = tmp_path / "models" / "digits"
    target.mkdir(parents=True)
    # Killed after the first rename: update.json moved, active.json did not,
    # and what is left at the root does not name the model any more.
    (tmp_path / "update.json").rename(target / "update.json")
    (tmp_path / "active.json").write_text(json.dumps({"active": None, "standby": None}))
    assert migrate_single_model_layout(tmp_path) == "digits"
    assert (target / "active.json").exists() and not (tmp_path / "active.json").exists()


def test_a_legacy_record_naming_no_model_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "update.json").write_text(json.dumps({"state": "idle", "assignment": None}))
    assert migrate_single_model_layout(tmp_path) is None
    assert not (tmp_path / "update.json").exists()
    assert held_models(tmp_path) == []


def test_a_migrated_model_is_restored_and_served_at_boot(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """An agent of the single-model layout served digits 1.0.0: after the
    upgrade it serves it again, from models/digits/."""
    rig = ModelsRig(tmp_path)
    a, data = model_assignment(models["1.0.0"], "digits", "1.0.0", 1)
    rig.downloader.add(data)
    rig.boot()
    rig.assign(a)
    assert rig.settled("digits", 1) == "committed"
    rig.stop()
    for name in ("update.json", "active.json"):  # back to the old layout
        (tmp_path / "models" / "digits" / name).rename(tmp_path / name)
    (tmp_path / "models" / "digits").rmdir()
    again = ModelsRig(tmp_path)
    again.boot()
    assert _answers(again.host, "digits") == "1.0.0"
    assert (tmp_path / "models" / "digits" / "active.json").exists()
    again.stop()


# ---------------------------------------------------------------- concurrency


def test_two_models_update_at_once_each_on_its_own_machine(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """Model a's download is held on a slow link; model b installs meanwhile."""
    rig = ModelsRig(tmp_path)
    a, data_a = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    b, data_b = model_assignment(models["2.0.0"], "beta", "2.0.0", 2)
    slow = threading.Event()
    rig.downloader.gates[rig.downloader.add(data_a)] = slow
    rig.downloader.add(data_b)
    rig.boot()
    rig.assign(a, b)
    assert rig.settled("beta", 2) == "committed"
    assert _answers(rig.host, "beta") == "2.0.0"
    alpha = rig.updates.get("alpha")
    assert alpha is not None and name_of(rig.statuses("alpha")[-1].state) == "downloading"
    slow.set()
    assert rig.settled("alpha", 1) == "committed"
    assert (_answers(rig.host, "alpha"), _answers(rig.host, "beta")) == ("1.0.0", "2.0.0")
    # Each model has its own records; the downloads are shared by digest.
    for name, digest in (("alpha", a.artifact_digest), ("beta", b.artifact_digest)):
        record = json.loads((tmp_path / "models" / name / "active.json").read_text())
        assert record["active"]["digest"] == digest
        assert artifact_path(tmp_path, digest).exists()
    statuses = rig.updates.statuses()
    assert [(s.model_name, name_of(s.state)) for s in statuses] == [
        ("alpha", "committed"),
        ("beta", "committed"),
    ]
    rig.stop()


def test_a_commit_of_one_model_keeps_the_other_models_files(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    rig = ModelsRig(tmp_path)
    a1, d1 = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    b1, d2 = model_assignment(models["2.0.0"], "beta", "2.0.0", 2)
    a2, _ = model_assignment(models["2.0.0"], "alpha", "2.0.0", 3)
    for data in (d1, d2):
        rig.downloader.add(data)
    rig.boot()
    rig.assign(a1, b1)
    rig.settled("alpha", 1)
    rig.settled("beta", 2)
    rig.assign(a2, b1)  # alpha moves to beta's artifact; its old one goes
    assert rig.settled("alpha", 3) == "committed"
    assert not artifact_path(tmp_path, a1.artifact_digest).exists()
    assert artifact_path(tmp_path, b1.artifact_digest).exists()
    assert _answers(rig.host, "beta") == "2.0.0"
    rig.stop()


# ---------------------------------------------------------------- unassign


def test_an_unassigned_model_is_unloaded_and_its_records_and_files_removed(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    rig = ModelsRig(tmp_path)
    a, data_a = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    b, data_b = model_assignment(models["2.0.0"], "beta", "2.0.0", 2)
    rig.downloader.add(data_a)
    rig.downloader.add(data_b)
    rig.boot()
    rig.assign(a, b)
    rig.settled("alpha", 1)
    rig.settled("beta", 2)
    in_flight = rig.host.active("alpha")  # a request that already started on alpha
    rig.assign(b)
    rig.wait_for(lambda: rig.updates.get("alpha") is None)
    with pytest.raises(ModelNotFound):
        rig.host.active("alpha")
    # The request in flight finishes on the object it holds.
    assert in_flight.run(warm_inputs(in_flight.accepts))
    assert not (tmp_path / "models" / "alpha").exists()
    assert not artifact_path(tmp_path, a.artifact_digest).exists()
    assert artifact_path(tmp_path, b.artifact_digest).exists()
    last = rig.statuses("alpha")[-1]
    assert name_of(last.state) == "idle" and last.active_model_version == ""
    assert "unassigned" in last.reason
    assert [s.model_name for s in rig.updates.statuses()] == ["beta"]
    assert _answers(rig.host, "beta") == "2.0.0"
    rig.stop()


def test_unassigning_during_a_download_aborts_it(tmp_path: Path, models: dict[str, Path]) -> None:
    rig = ModelsRig(tmp_path)
    a, data_a = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    slow = threading.Event()
    rig.downloader.gates[rig.downloader.add(data_a)] = slow
    rig.boot()
    rig.assign(a)
    rig.wait_for(lambda: part_path(tmp_path, a.artifact_digest).exists())
    rig.assign()
    slow.set()
    rig.wait_for(lambda: rig.updates.get("alpha") is None)
    states = [name_of(s.state) for s in rig.statuses("alpha")]
    assert "failed" in states and "committed" not in states
    assert not part_path(tmp_path, a.artifact_digest).exists()
    assert not artifact_path(tmp_path, a.artifact_digest).exists()
    assert "alpha" not in rig.host.names()
    rig.stop()


def test_an_interrupted_removal_is_finished_at_boot(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    rig = ModelsRig(tmp_path)
    a, data_a = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    rig.downloader.add(data_a)
    rig.boot()
    rig.assign(a)
    rig.settled("alpha", 1)
    rig.stop()
    # Killed right after the removal was recorded.
    (tmp_path / "models" / "alpha" / "removing").write_text("not in the desired state any more")
    again = ModelsRig(tmp_path)
    again.boot()
    again.wait_for(lambda: not (tmp_path / "models" / "alpha").exists())
    assert "alpha" not in again.host.names()
    assert not artifact_path(tmp_path, a.artifact_digest).exists()
    again.stop()


def test_a_model_assigned_again_while_being_removed_starts_afresh(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    rig = ModelsRig(tmp_path)
    a, data_a = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    a2, data_a2 = model_assignment(models["2.0.0"], "alpha", "2.0.0", 3)
    slow = threading.Event()
    rig.downloader.gates[rig.downloader.add(data_a)] = slow
    rig.downloader.add(data_a2)
    rig.boot()
    rig.assign(a)
    rig.wait_for(lambda: part_path(tmp_path, a.artifact_digest).exists())
    rig.assign()
    rig.assign(a2)
    slow.set()
    assert rig.settled("alpha", 3) == "committed"
    assert _answers(rig.host, "alpha") == "2.0.0"
    rig.stop()


# ---------------------------------------------------------------- crashes


@pytest.mark.parametrize("point", ["downloading", "verifying", "validating", "activating"])
def test_a_crash_in_one_models_update_leaves_the_other_serving(
    tmp_path: Path, models: dict[str, Path], point: str
) -> None:
    """Model alpha's update stops dead inside `point` (the crash tests'
    pause); beta serves throughout; after a restart alpha ends old or new
    (activating: old, by the machine's rule) and beta is untouched."""
    rig = ModelsRig(tmp_path)
    a1, d1 = model_assignment(models["1.0.0"], "alpha", "1.0.0", 1)
    b1, d2 = model_assignment(models["2.0.0"], "beta", "2.0.0", 2)
    # Its own artifact (not beta's): the download must really happen.
    a2, d3 = model_assignment(models["3.0.0"], "alpha", "3.0.0", 3)
    for data in (d1, d2, d3):
        rig.downloader.add(data)
    rig.boot()
    rig.assign(a1, b1)
    rig.settled("alpha", 1)
    rig.settled("beta", 2)
    rig.wrap["alpha"] = lambda ports: with_pause(ports, point, tmp_path)
    # A fresh machine for alpha with the pause: drop and re-make it.
    rig.stop()
    crashed = ModelsRig(tmp_path)
    crashed.downloader = rig.downloader
    crashed.wrap["alpha"] = lambda ports: with_pause(ports, point, tmp_path)
    crashed.boot()
    crashed.assign(a2, b1)
    crashed.wait_for(lambda: (tmp_path / MARKER_FILE).exists())
    assert _answers(crashed.host, "beta") == "2.0.0"
    (tmp_path / MARKER_FILE).unlink()
    # The restart: a new process (host, machines) over the same directory.
    restarted = ModelsRig(tmp_path)
    restarted.downloader = rig.downloader
    restarted.boot()
    assert _answers(restarted.host, "beta") == "2.0.0"
    restarted.assign(a2, b1)
    outcome = restarted.settled("alpha", 3)
    served = _answers(restarted.host, "alpha")
    assert served == ("3.0.0" if outcome == "committed" else "1.0.0")
    if point == "activating":
        assert outcome == "failed"
    assert _answers(restarted.host, "beta") == "2.0.0"
    beta = json.loads((tmp_path / "models" / "beta" / "update.json").read_text())
    assert beta["outcome"] == "committed" and beta["assignment"]["sequence"] == 2
    restarted.stop()


# ---------------------------------------------------------------- protocol 2


def test_assignments_come_from_the_list_or_from_an_old_control_planes_one() -> None:
    one = device_pb2.Assignment(model_name="a", sequence=1)
    two = device_pb2.Assignment(model_name="b", sequence=2)
    new = device_pb2.DesiredState(assignments=[one, two], assignment=one)
    assert [a.model_name for a in assignments_from_desired(new)] == ["a", "b"]
    old = device_pb2.DesiredState(assignment=two)
    assert [a.model_name for a in assignments_from_desired(old)] == ["b"]
    assert assignments_from_desired(device_pb2.DesiredState()) == []
    accepted = device_pb2.DesiredState(device_state=common_pb2.DEVICE_STATE_ACCEPTED)
    assert removes_unlisted(accepted)
    assert not removes_unlisted(
        device_pb2.DesiredState(device_state=common_pb2.DEVICE_STATE_PENDING)
    )


def test_statuses_are_batched_with_one_status_per_model_per_message() -> None:
    def s(name: str, state: str) -> common_pb2.UpdateStatus:
        return common_pb2.UpdateStatus(model_name=name, legacy_state=state)

    batches = batch_statuses([s("a", "1"), s("b", "1"), s("a", "2"), s("c", "1"), s("b", "2")])
    assert [[(x.model_name, x.legacy_state) for x in b] for b in batches] == [
        [("a", "1"), ("b", "1")],
        [("a", "2"), ("c", "1"), ("b", "2")],
    ]


def test_every_served_model_gets_a_sample_with_the_process_memory() -> None:
    from edgefleet.agent.telemetry import RequestStats, Resources

    stats = RequestStats(probe=lambda: Resources(memory_mb=500.0))
    stats.served = lambda: [("alpha", "1.0.0"), ("beta", "2.0.0")]
    stats.record("beta", "2.0.0", 0.01, "ok")
    import datetime as dt

    samples = stats.snapshot_and_reset(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert [(s.model_name, s.model_version, s.request_count, s.memory_mb) for s in samples] == [
        # A sample even without requests; the memory is the process's.
        ("alpha", "1.0.0", 0, 500.0),
        ("beta", "2.0.0", 1, 500.0),
    ]
