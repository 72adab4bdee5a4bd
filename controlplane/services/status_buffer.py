"""Agents' update-status reports, written in batches.

An install sends the control plane several reports (downloading with
progress, verifying, validating, activating, committed); written one
transaction each they were the largest cost of a 10,000-device rollout
(docs/benchmarks.md). The sync streams hand reports to this buffer on the
event loop, which costs a dict update; a background task writes what
accumulated every `flush_s` in one transaction (DeploymentService.
record_statuses), so the per-report cost is a few rows of an executemany.

What a crash loses: at most `flush_s` of reports, which the agents repeat
when they reconnect (every Hello carries the device's current status), so
only intermediate history entries can go missing, never the state the
orchestrator acts on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from typing import Any

from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.controlplane.services.deployments import DeploymentService, StatusReport

log = logging.getLogger(__name__)

FLUSH_S = 0.2
# A batch larger than this is written at once rather than at the next tick,
# so one transaction stays short (SQLite holds its write lock throughout).
MAX_BATCH = 2000
# The columns these numbers land in are signed 64-bit; the wire's are uint64.
_MAX_INT = 2**63 - 1
_NUMBERS = ("sequence", "bytes_done", "bytes_total")


class StatusBuffer:
    """Lives on the event loop: `offer` from the sync streams, `run` as a task."""

    def __init__(
        self, deployments: DeploymentService, *, flush_s: float = FLUSH_S,
        max_batch: int = MAX_BATCH,
    ) -> None:  # fmt: skip
        self._deployments = deployments
        self._flush_s = flush_s
        self._max_batch = max_batch
        self._pending: dict[str, StatusReport] = {}
        self._full = asyncio.Event()

    def offer(self, device_id: str, applied_revision: int, status: dict[str, Any]) -> None:
        """Queue one report (never blocks). A number no column holds is
        refused here: queued, it would fail every later batch write, and so
        every other device's reports with it."""
        for name, value in (("applied_revision", applied_revision),
                            *((n, status.get(n, 0)) for n in _NUMBERS)):  # fmt: skip
            if not 0 <= value <= _MAX_INT:
                raise InvalidArgument(f"status report: {name} must be between 0 and {_MAX_INT}")
        report = self._pending.get(device_id)
        if report is None:
            self._pending[device_id] = StatusReport(applied_revision, [status] if status else [])
            if len(self._pending) >= self._max_batch:
                self._full.set()
        else:
            report.add(applied_revision, status)

    def pending(self) -> int:
        """Devices with reports not yet written."""
        return len(self._pending)

    async def flush(self, executor: Executor) -> None:
        """Write what is queued now; on failure it is queued again, before
        anything that arrived meanwhile."""
        batch, self._pending = self._pending, {}
        self._full.clear()
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._deployments.record_statuses, batch)
        except Exception:
            for device_id, later in self._pending.items():
                if device_id in batch:
                    batch[device_id].extend(later)
                else:
                    batch[device_id] = later
            self._pending = batch
            raise

    async def run(self, executor: Executor) -> None:
        """Flush every `flush_s`, or sooner when a batch fills; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self._flush_s)
            try:
                await self.flush(executor)
            except Exception:
                log.exception("could not record agents' status reports; will retry")
                await asyncio.sleep(self._flush_s)
