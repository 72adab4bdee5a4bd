"""Background jobs: the loops a process runs beside its main work (the
control plane's presence flush or rollout orchestrator, the agent's
telemetry upload or certificate renewal), started together and stopped
together in one way. Standard library only: the agent imports it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(eq=False)
class BackgroundJob:
    """One loop, run as a task named `name` until it is cancelled."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]
    # Winds the job's work down before its task is cancelled, where
    # cancelling alone would leave something behind (the build runner kills
    # its worker processes).
    halt: Callable[[], Awaitable[None]] | None = None
    # Passes on what the loop still holds once its task has ended (the
    # status buffer's last reports, the orchestrator's rollout leases).
    # A failure is logged: the process is stopping either way.
    hand_over: Callable[[], Awaitable[None]] | None = None
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def start(self) -> asyncio.Task[None]:
        assert self._task is None, f"{self.name} was started already"
        self._task = asyncio.create_task(self.run(), name=self.name)
        return self._task

    async def cancel(self) -> None:
        """Halt the job's work, then cancel its task (without waiting for it)."""
        if self.halt is not None:
            await self.halt()
        if self._task is not None:
            self._task.cancel()

    async def join(self) -> None:
        """Wait for the cancelled task to end, then hand over what it held.
        A job that failed on its own raises its error here."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.hand_over is not None:
            try:
                await self.hand_over()
            except Exception:
                log.exception("%s: could not hand over what it held", self.name)

    async def stop(self) -> None:
        await self.cancel()
        await self.join()


class BackgroundJobs:
    """A process's jobs, started and stopped in the order given."""

    def __init__(self, jobs: Iterable[BackgroundJob]) -> None:
        self._jobs = list(jobs)

    def start(self) -> None:
        for job in self._jobs:
            job.start()

    async def cancel(self) -> None:
        """Cancel every job; see BackgroundJob.cancel."""
        for job in self._jobs:
            await job.cancel()

    async def join(self) -> None:
        """Wait for every cancelled job; see BackgroundJob.join."""
        for job in self._jobs:
            await job.join()

    async def stop(self) -> None:
        """Cancel every job, then wait for them all."""
        await self.cancel()
        await self.join()
