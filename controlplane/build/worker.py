"""The entry point a build worker process runs: a BuildJob in, a BuildResult
out, both picklable frozen dataclasses (build.types). Progress goes to a file
the parent polls, so no queue or manager process is needed across the
process boundary."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from edgefleet.controlplane.build.types import BuildCancelled, BuildJob, BuildResult

PROGRESS_FILE = "progress.json"
# Written by the runner into a job's workdir to stop it (a cancelled build):
# the worker checks for it at every step and log line. A file, like the
# progress, so no queue is needed across the process boundary, and only
# this job stops (killing the process would break the whole pool).
CANCEL_FILE = "cancel"
# How often a worker checks that the control plane that started it still runs.
PARENT_POLL_S = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker when its control plane is gone. A
    SIGKILLed control plane cannot stop its pool, and orphaned workers would
    otherwise idle (or finish a build nobody can publish) forever."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Progress:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._log: list[str] = []

    def __call__(self, fraction: float, message: str) -> None:
        self._log.append(message)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"progress": fraction, "log": self._log}))
        os.replace(tmp, self._path)


def request_cancel(workdir: Path) -> None:
    """Ask the job running in `workdir` to stop (BuildCancelled)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CANCEL_FILE).touch()


def _check_cancelled(workdir: Path) -> None:
    if (workdir / CANCEL_FILE).exists():
        raise BuildCancelled()


def read_progress(workdir: Path) -> tuple[float, list[str]]:
    """What a running job has reported so far."""
    try:
        data = json.loads((workdir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0, []
    return float(data.get("progress", 0.0)), list(data.get("log", []))


def run_job(job: BuildJob) -> BuildResult:
    """Build, measure and judge every candidate for one class. The job and
    the result cross the process boundary pickled (see build.types)."""
    from edgefleet.controlplane.build.pipeline import run_build

    if job.toolchains_dir is not None:
        # This is a worker process of its own: the ladders read it from here.
        os.environ["EDGEFLEET_TOOLCHAINS_DIR"] = str(job.toolchains_dir)

    job.workdir.mkdir(parents=True, exist_ok=True)
    return run_build(
        job.model_path,
        job.sample_path,
        job.target,
        job.workdir / "work",
        _Progress(job.workdir / PROGRESS_FILE),
        check_cancelled=lambda: _check_cancelled(job.workdir),
    )
