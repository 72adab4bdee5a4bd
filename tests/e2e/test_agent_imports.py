"""The idle agent stays small: its boot path imports no inference runtime,
numpy, cryptography, prometheus_client or importlib.metadata
(docs/benchmarks.md, "Agent memory": together they were ~45 MB of the idle
agent's RSS). Checked in a fresh interpreter by what is in sys.modules, not
by measuring memory, so the test is deterministic;
bench/bench_agent_rss.py has the figures.

Also the runtime probe and its fallback: the fingerprint is detected in a
child process, which can fail in ways an import in the agent could not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.hardware import (
    ONNXRUNTIME_CPU_PROVIDER,
    RuntimeProbeFailed,
    detect_runtime,
    detect_runtime_here,
    probe_runtime,
)

# Packages an idle agent must not load. numpy comes in with any of
# the runtimes, so it also catches a runtime adapter imported too early.
HEAVY = (
    "numpy",
    "onnxruntime",
    "ai_edge_litert",
    "tflite_runtime",
    "tensorrt",
    "cryptography",
    "prometheus_client",
    # Package metadata is read in the runtime probe's child process.
    "importlib.metadata",
)

# Imports the agent as its console script does, then boots it as the daemon
# does before anything is assigned (state, hardware, runtime fingerprint),
# and prints which of HEAVY got loaded and the fingerprint's providers.
_BOOT = """
import json, sys
from pathlib import Path

import edgefleet.agent.main
edgefleet.agent.main._parser().parse_args([])
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.daemon import Agent

agent = Agent(AgentConfig(enrollment_token="t", state_dir=Path(sys.argv[1]), insecure=True))
agent.boot()
print(json.dumps([m for m in json.loads(sys.argv[2]) if m in sys.modules]))
print(json.dumps(list(agent.link.runtime.onnxruntime_providers)))
"""


def test_idle_agent_boot_imports_no_heavy_modules(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _BOOT, str(tmp_path / "state"), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded, providers = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert loaded == []
    # ...and the runtime fingerprint is still complete (onnxruntime is a
    # dependency of the project, so it is installed here).
    assert ONNXRUNTIME_CPU_PROVIDER in providers


def test_runtime_probe_reports_what_detection_here_finds() -> None:
    # onnxruntime is a dependency of the project, so it is installed here.
    fingerprint = probe_runtime()
    assert fingerprint == detect_runtime_here()
    assert ONNXRUNTIME_CPU_PROVIDER in fingerprint.onnxruntime_providers


def test_probe_that_does_not_finish_fails() -> None:
    with pytest.raises(RuntimeProbeFailed, match="no answer within"):
        probe_runtime(timeout_s=0.001)  # no Python starts in a millisecond


def test_probe_that_cannot_start_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(RuntimeProbeFailed, match="cannot start /nonexistent/python"):
        probe_runtime()


def test_metadata_fallback_imports_no_runtime() -> None:
    code = (
        "import json, sys; from edgefleet.agent.hardware import detect_runtime_here; "
        "detect_runtime_here(import_runtimes=False); "
        "print(json.dumps([m for m in ('onnxruntime', 'tensorrt', 'numpy') if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_runtime_fingerprint() -> None:
    runtime = detect_runtime()
    assert runtime.python_version.count(".") == 2
    assert runtime.agent_version  # the edgefleet distribution is installed in the venv
    # onnxruntime is a dependency of the project, so it is present here.
    assert runtime.onnxruntime_version
    assert "CPUExecutionProvider" in runtime.onnxruntime_providers
    assert bool(runtime.litert_version) == bool(runtime.litert_package)
