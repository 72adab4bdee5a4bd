"""Runs build jobs in worker processes, so model conversion and measurement
never block the gRPC event loop. Each replica runs one; jobs are shared
through SQL (claim with a lease, renew while running, publish or drop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from edgefleet.controlplane.build.types import BuildCancelled, BuildJob
from edgefleet.controlplane.build.worker import (
    exit_with_parent,
    read_progress,
    request_cancel,
    run_job,
)
from edgefleet.controlplane.errors import DomainError
from edgefleet.controlplane.services.builds import BuildService, ClaimedJob, Lease

log = logging.getLogger(__name__)

POLL_S = 2.0


class BuildRunner:
    def __init__(
        self,
        builds: BuildService,
        db_executor: Executor,
        workdir: Path,
        *,
        workers: int,
        lease_s: float,
        toolchains_dir: Path | None = None,
    ) -> None:
        self._builds = builds
        self._db = db_executor
        self._workdir = workdir
        # Workspaces left by a killed process: their jobs run again anyway.
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        self._workers = max(1, workers)
        self._lease_s = lease_s
        self._toolchains_dir = toolchains_dir
        self.owner = f"{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._pool = self._new_pool()
        self._tasks: set[asyncio.Task[None]] = set()
        # The workdir of each job this runner runs now, by build id.
        self._running: dict[str, Path] = {}
        builds.on_queued = self.wake_threadsafe
        builds.on_cancel = self.cancel_threadsafe
        self._loop = asyncio.get_running_loop()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the parent holds gRPC and database threads that a
        # forked child must not inherit.
        return ProcessPoolExecutor(
            self._workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=exit_with_parent, initargs=(os.getpid(),),
        )  # fmt: skip

    def wake_threadsafe(self) -> None:
        """Start claiming now (callable from service threads)."""
        self._loop.call_soon_threadsafe(self._wake.set)

    def cancel_threadsafe(self, build_id: str) -> None:
        """Stop the job of `build_id` if this runner runs it (callable from
        service threads)."""
        self._loop.call_soon_threadsafe(self._cancel_local, build_id)

    def _cancel_local(self, build_id: str) -> None:
        workdir = self._running.get(build_id)
        if workdir is not None:
            request_cancel(workdir)

    async def _db_call(self, fn: Any, *args: Any) -> Any:
        return await self._loop.run_in_executor(self._db, fn, *args)

    async def run(self) -> None:
        """Claim and run jobs until cancelled."""
        slots = asyncio.Semaphore(self._workers)
        while True:
            await slots.acquire()
            try:
                job = await self._db_call(self._builds.claim, self.owner, self._lease_s)
            except Exception:
                log.exception("could not claim a build job; retrying")
                job = None
            if job is None:
                slots.release()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                continue
            task = asyncio.create_task(self._run(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _run(self, job: ClaimedJob) -> None:
        workdir = self._workdir / f"{job.build_id}-{job.attempt}"
        log.info("build %s: attempt %d started", job.build_id, job.attempt)
        self._running[job.build_id] = workdir
        try:
            model, samples = await self._db_call(self._builds.local_inputs, job)
            build_job = BuildJob(model, samples, job.target, workdir, self._toolchains_dir)
            future = self._loop.run_in_executor(self._pool, run_job, build_job)
            lease = Lease.OURS
            while not future.done():
                await asyncio.wait({future}, timeout=max(0.5, self._lease_s / 4))
                progress, lines = read_progress(workdir)
                lease = await self._db_call(
                    self._builds.renew, job.build_id, self.owner, self._lease_s,
                    min(progress, 0.99), "\n".join(lines),
                )  # fmt: skip
                if lease is Lease.LOST:
                    log.warning("build %s: lease lost; its result will be dropped", job.build_id)
                elif lease is Lease.CANCELLED:
                    # The worker stops at its next step or log line; the
                    # lease is renewed until it has.
                    request_cancel(workdir)
            text = "\n".join(read_progress(workdir)[1])
            try:
                result = future.result()
            except BrokenProcessPool:
                # The worker died (killed, out of memory): the job stays
                # RUNNING with our lease, which expires, and is claimed
                # again (up to the attempt limit).
                log.error("build %s: worker process died; will retry", job.build_id)
                self._pool = self._new_pool()
                return
            except BuildCancelled:
                log.info("build %s: cancelled", job.build_id)
                await self._db_call(self._builds.cancelled, job, self.owner, text)
                return
            except DomainError as exc:
                await self._db_call(self._builds.fail, job, self.owner, exc.message, text)
                return
            except Exception as exc:
                log.exception("build %s failed", job.build_id)
                await self._db_call(
                    self._builds.fail, job, self.owner, f"{type(exc).__name__}: {exc}", text
                )
                return
            if lease is not Lease.LOST:
                text = "\n".join(result.log) or text
                await self._db_call(self._builds.finish, job, self.owner, result, text)
                log.info("build %s: finished", job.build_id)
        finally:
            self._running.pop(job.build_id, None)
            shutil.rmtree(workdir, ignore_errors=True)

    async def stop(self) -> None:
        """Stop claiming; kill running workers. Their jobs' leases expire and
        another runner (or this one after a restart) runs them again."""
        for task in list(self._tasks):
            task.cancel()
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
