"""StatusBuffer on its own: progress collapses, and a failed batch is queued
again before newer reports. Batches written to SQLite and PostgreSQL:
tests/integration/test_status_batches.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from edgefleet.controlplane.services.deployments import StatusReport
from edgefleet.controlplane.services.status_buffer import StatusBuffer


def _status(state: str, sequence: int, **extra: Any) -> dict[str, Any]:
    return {"state": state, "sequence": sequence, "model_name": "digits",
            "model_version": "1.0.0", **extra}  # fmt: skip


class _FlakyDeployments:
    """A port for the buffer's own logic: fails the first write."""

    def __init__(self) -> None:
        self.calls: list[dict[str, StatusReport]] = []

    def record_statuses(self, reports: dict[str, StatusReport]) -> None:
        self.calls.append({k: StatusReport(v.applied_revision, list(v.statuses))
                           for k, v in reports.items()})  # fmt: skip
        if len(self.calls) == 1:
            raise RuntimeError("database went away")


async def test_buffer_collapses_progress_and_requeues_a_failed_batch_before_newer_reports() -> None:
    port = _FlakyDeployments()
    buffer = StatusBuffer(port)  # type: ignore[arg-type]
    buffer.offer("a", 1, _status("downloading", 1, bytes_done=10))
    buffer.offer("a", 1, _status("downloading", 1, bytes_done=90))
    buffer.offer("a", 2, _status("verifying", 1))
    buffer.offer("b", 3, {})
    with ThreadPoolExecutor(1) as executor:
        with pytest.raises(RuntimeError):
            await buffer.flush(executor)
        assert buffer.pending() == 2  # nothing lost
        buffer.offer("a", 2, _status("committed", 1))
        await buffer.flush(executor)
    first, second = port.calls
    assert [s["bytes_done"] for s in first["a"].statuses if s["state"] == "downloading"] == [90]
    assert [s["state"] for s in second["a"].statuses] == ["downloading", "verifying", "committed"]
    assert (second["a"].applied_revision, second["b"].applied_revision) == (2, 3)
    assert buffer.pending() == 0
