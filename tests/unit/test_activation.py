"""The Activator over a real ModelHost with real ONNX models: what active.json
records, warm standby rollbacks, restarts in the middle of an update, and
what a commit leaves on disk. Also the status reporter and the update
runner's planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.agent.serving import ModelHost, NoActiveModel
from edgefleet.agent.update.activation import ACTIVE_FILE, HostActivator
from edgefleet.agent.update.ports import FatalUpdateError
from edgefleet.agent.update.remote import StatusReporter
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import Assignment, UpdateRecord
from edgefleet.demo.models import build_digits_classifier
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2
from testkit.update_rig import install_artifact

NAME = "digits"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        v: build_digits_classifier(root / v, hidden=16 + 8 * seed, seed=seed).model
        for seed, v in enumerate(("1.0", "2.0"))
    }


def _serving_v1(state_dir: Path, models: dict[str, Path]) -> tuple[ModelHost, HostActivator, Path]:
    """A host serving version 1.0, committed; its artifact path."""
    host = ModelHost()
    activator = HostActivator(host, state_dir)
    path1, manifest1 = install_artifact(state_dir, models["1.0"], "1.0")
    activator.activate(path1, manifest1)
    activator.commit()
    return host, activator, path1


def _predict_version(host: ModelHost) -> str:
    return host.active(NAME).version


def _record(state_dir: Path) -> dict[str, object]:
    document = json.loads((state_dir / ACTIVE_FILE).read_text())
    assert isinstance(document, dict)
    return document


def test_activate_commit_records_the_active_model_and_drops_old_files(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host = ModelHost()
    activator = HostActivator(host, tmp_path)
    assert activator.active() is None
    path1, manifest1 = install_artifact(tmp_path, models["1.0"], "1.0")
    activator.activate(path1, manifest1)
    activator.commit()
    assert _predict_version(host) == "1.0" and activator.active() == path1.name
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    activator.activate(path2, manifest2)
    # Before the commit the old model is the warm standby, on record and on disk.
    assert _predict_version(host) == "2.0"
    assert host.standby(NAME) is not None and host.standby(NAME).version == "1.0"  # type: ignore[union-attr]
    assert _record(tmp_path)["standby"]["digest"] == path1.name  # type: ignore[index]
    activator.commit()
    activator.commit()  # idempotent
    assert host.standby(NAME) is None and _record(tmp_path)["standby"] is None
    assert not path1.exists() and path2.exists()


def test_rollback_uses_the_warm_standby_and_is_idempotent(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, path1 = _serving_v1(tmp_path, models)
    warm = host.active(NAME)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    activator.activate(path2, manifest2)
    activator.activate(path2, manifest2)  # a retried activation keeps the standby
    activator.rollback(path1.name)
    assert host.active(NAME) is warm  # the same loaded model: no reload
    activator.rollback(path1.name)
    assert host.active(NAME) is warm and activator.active() == path1.name


def test_restart_after_the_switch_restores_the_new_model_then_rolls_back_from_disk(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    _, first, path1 = _serving_v1(tmp_path, models)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    first.activate(path2, manifest2)
    # The process dies here; a new one starts on the same state directory.
    host = ModelHost()
    second = HostActivator(host, tmp_path)
    restored = second.restore()
    assert restored is not None and restored.model_version == "2.0"
    assert _predict_version(host) == "2.0"
    second.rollback(path1.name)
    assert _predict_version(host) == "1.0"
    assert _record(tmp_path) == {"active": _record(tmp_path)["active"], "standby": None}
    assert HostActivator(ModelHost(), tmp_path).restore().model_version == "1.0"  # type: ignore[union-attr]


def test_restore_falls_back_to_the_standby_when_the_active_file_is_gone(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    _, first, _ = _serving_v1(tmp_path, models)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    first.activate(path2, manifest2)
    path2.unlink()
    host = ModelHost()
    restored = HostActivator(host, tmp_path).restore()
    assert restored is not None and restored.model_version == "1.0"
    assert _record(tmp_path)["standby"] is None


def test_rollback_to_nothing_leaves_the_model_known_but_inactive(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host = ModelHost()
    activator = HostActivator(host, tmp_path)
    path1, manifest1 = install_artifact(tmp_path, models["1.0"], "1.0")
    activator.activate(path1, manifest1)
    activator.rollback(None)
    with pytest.raises(NoActiveModel):
        host.active(NAME)
    assert activator.active() is None
    with pytest.raises(FatalUpdateError, match="no longer on record"):
        activator.rollback("f" * 64)


def test_an_artifact_that_does_not_load_is_fatal_and_changes_nothing(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    host, activator, path1 = _serving_v1(tmp_path, models)
    path2, manifest2 = install_artifact(tmp_path, models["2.0"], "2.0")
    path2.write_bytes(b"not a model")  # damaged after it was checked
    with pytest.raises(FatalUpdateError, match="cannot load"):
        activator.activate(path2, manifest2)
    assert _predict_version(host) == "1.0" and activator.active() == path1.name


# ---------------------------------------------------------------- reporter


def test_reporter_throttles_download_progress_and_reports_outcomes() -> None:
    sent: list[common_pb2.UpdateStatus] = []
    now = [0.0]
    assignment = Assignment("digits", "2.0", "a" * 64, 1000, b"m", b"s", "", 7)
    record = UpdateRecord(state=State.DOWNLOADING, assignment=assignment)
    reporter = StatusReporter(
        sent.append, lambda: record, lambda: ("1.0", "b" * 64), clock=lambda: now[0]
    )
    reporter.report(State.DOWNLOADING, 100, 1000, None)
    reporter.report(State.DOWNLOADING, 200, 1000, None)  # too soon: dropped
    now[0] = 1.0
    reporter.report(State.DOWNLOADING, 300, 1000, None)
    reporter.report(State.DOWNLOADING, 1000, 1000, None)  # the last byte always
    reporter.report(State.VERIFYING, 1000, 1000, None)
    assert [(of_status(s), s.bytes_done) for s in sent] == [
        ("downloading", 100), ("downloading", 300), ("downloading", 1000), ("verifying", 1000),
    ]  # fmt: skip
    first = sent[0]
    assert (first.sequence, first.model_version, first.active_model_version) == (7, "2.0", "1.0")
    # Back in Idle, a settled update is reported by its outcome and reason.
    record.state, record.outcome, record.reason = State.IDLE, "failed", "p95 too slow"
    reporter.report(State.IDLE, 1000, 1000, None)
    assert (of_status(sent[-1]), sent[-1].reason) == ("failed", "p95 too slow")
    assert reporter.current().state == common_pb2.UPDATE_STATE_FAILED
    assert not reporter.current().legacy_state  # protocol 2: the enum only
