"""Fault injection at CI size (issue 7; full sizes: bench/bench_faults.py,
figures in docs/reliability.md). The scenarios are in fault_scenarios.py:

- the control plane SIGKILLed at seeded random moments of a fleetsim rollout,
  restarted each time: the rollout completes, every device once;
- a private PostgreSQL restarted (fast, immediate, down for seconds) under
  device and operator load: every write answered OK is stored, failures are
  UNAVAILABLE, the control plane recovers without a restart;
- a real agent behind a TCP proxy that cuts its connections: the download
  resumes, telemetry is buffered and stored once each, no gaps;
- a real agent on a small tmpfs that is full, or fills mid-download: the
  update fails saying so, nothing partial is left, the old model serves.

An agent killed inside each update state is tests/e2e/test_deployments_e2e.py
(test_kill_9_inside_each_state_ends_on_one_complete_version)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit import fault_scenarios as fs
from testkit.private_pg import unavailable_reason

pytestmark = pytest.mark.timeout(300)

# ~2 MiB; every connection cut after 256 KiB: about eight cuts per download.
BIG_HIDDEN = 7_000
CUT_AFTER = 256 * 1024


async def test_sigkill_the_control_plane_repeatedly_during_a_rollout(tmp_path: Path) -> None:
    report = await fs.kill_control_plane_during_rollout(
        tmp_path, devices=100, kills=3, stages=4, bake_s=5, seed=11
    )
    assert report.problems == []
    assert len(report.recover_s) == 3
    # The kills landed at different points of the rollout.
    assert len(set(report.committed_at_kill)) > 1 or report.committed_at_kill[0] > 0


async def test_postgresql_restarted_under_load_loses_no_accepted_write(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    report = await fs.restart_postgres_under_load(tmp_path, devices=30)
    assert report.problems == []
    assert report.writes_ok > 0 and report.ok_found == report.writes_ok
    # The database was down for seconds: some writes failed, all retryable.
    assert set(report.failures) == {"UNAVAILABLE"}, report.failures
    assert report.telemetry_after > 0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fs.AgentRig]:
    rig = fs.agent_rig(tmp_path_factory.mktemp("faults"), {"1.0.0": 64, "2.0.0": BIG_HIDDEN})
    try:
        yield rig
    finally:
        rig.close()


@pytest.mark.parametrize("via", ["http", "grpc"])
def test_network_cuts_resume_the_download_and_deliver_telemetry_once(
    rig: fs.AgentRig, via: str
) -> None:
    """Over HTTP from the control plane (resumed with Range), and over
    DownloadArtifact (a control plane that serves no HTTP)."""
    report = fs.cut_network(rig, new_version="2.0.0", cut_after_bytes=CUT_AFTER, via=via)
    assert report.problems == []
    # Every connection carried at most CUT_AFTER bytes, yet the whole
    # artifact arrived: only a download that resumed can do that.
    assert report.artifact_bytes > 4 * CUT_AFTER
    assert report.download_cuts >= report.artifact_bytes // CUT_AFTER - 1
    assert report.duplicates == 0 and report.missing == []
    assert report.stored >= report.produced - 1  # the last may still be buffered


def test_disk_full_fails_the_update_cleanly_and_the_old_model_serves(
    rig: fs.AgentRig, tmp_path: Path
) -> None:
    reason = fs.tmpfs_unavailable(tmp_path / "probe")
    if reason:
        pytest.skip(reason)
    report = fs.fill_disk_during_update(rig, new_version="2.0.0")
    assert report.problems == []
    assert "bytes free" in report.upfront_reason
    assert "disk full while downloading" in report.midway_reason
    assert 0 < report.midway_at_bytes < report.artifact_bytes
    assert report.predictions_ok == 2
