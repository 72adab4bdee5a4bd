"""The entry point a build worker process runs. Takes and returns plain,
picklable values: paths and dicts. Progress goes to a file the parent polls,
so no queue or manager process is needed across the process boundary."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.controlplane.build.types import BuildTarget, Evaluated

PROGRESS_FILE = "progress.json"
# How often a worker checks that the control plane that started it still runs.
PARENT_POLL_S = 1.0
GOLDEN_FILE = "golden.npz"


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


def read_progress(workdir: Path) -> tuple[float, list[str]]:
    """What a running job has reported so far."""
    try:
        data = json.loads((workdir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0, []
    return float(data.get("progress", 0.0)), list(data.get("log", []))


def candidate_json(item: Evaluated) -> dict[str, Any]:
    c, m = item.candidate, item.measurement
    return {
        "name": c.name,
        "runtime": c.runtime,
        "precision": c.precision,
        "media_type": c.media_type,
        "path": str(c.path) if c.path else None,
        "companion": str(c.companion) if c.companion else None,
        "tensorrt_spec": c.tensorrt_spec,
        "min_runtime_versions": c.min_runtime_versions,
        "size_bytes": m.size_bytes,
        "latency_p50_ms": m.latency_p50_ms,
        "latency_p95_ms": m.latency_p95_ms,
        "peak_memory_mb": m.peak_memory_mb,
        "max_abs_diff": m.max_abs_diff,
        "agreement": m.agreement,
        "accuracy": m.accuracy,
        "passed": item.passed,
        "reasons": list(item.reasons),
        "chosen": item.chosen,
        "error": c.error or m.error,
    }


def run_job(
    model_path: str,
    sample_path: str | None,
    target: dict[str, Any],
    workdir: str,
    toolchains_dir: str | None = None,
) -> dict[str, Any]:
    """Build, measure and judge every candidate for one class."""
    from edgefleet.controlplane.build.pipeline import run_build

    if toolchains_dir:
        # This is a worker process of its own: the ladders read it from here.
        os.environ["EDGEFLEET_TOOLCHAINS_DIR"] = toolchains_dir

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    outcome = run_build(
        Path(model_path),
        Path(sample_path) if sample_path else None,
        BuildTarget(**target),
        root / "work",
        _Progress(root / PROGRESS_FILE),
    )
    golden = getattr(outcome, "golden", None) or []
    golden_path = None
    if golden and outcome.chosen is not None:
        arrays: dict[str, np.ndarray] = {}
        for i, (inputs, outputs) in enumerate(golden):
            arrays.update({f"in{i}/{k}": v for k, v in inputs.items()})
            arrays.update({f"out{i}/{k}": v for k, v in outputs.items()})
        golden_path = root / GOLDEN_FILE
        np.savez(golden_path, **arrays)  # type: ignore[arg-type]
    return {
        "candidates": [candidate_json(e) for e in outcome.evaluated],
        "chosen": candidate_json(outcome.chosen) if outcome.chosen else None,
        "reference_accuracy": outcome.reference_accuracy,
        "log": list(outcome.log),
        "golden": str(golden_path) if golden_path else None,
        "atol": float(getattr(outcome, "atol", 0.0)),
        "rtol": float(getattr(outcome, "rtol", 0.0)),
        "min_agreement": float(getattr(outcome, "min_agreement", 0.0)),
    }
