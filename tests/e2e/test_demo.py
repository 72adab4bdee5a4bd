"""README's main command runs: the demo fleet comes up and does its job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A short directory, as an operator's would be: the agents' sockets live
    under it, and a unix socket's path holds at most 107 bytes (pytest's
    tmp_path under an xdist worker is long enough to pass that)."""
    path = Path(tempfile.mkdtemp(prefix="ef-demo-"))
    yield path / "demo"
    shutil.rmtree(path, ignore_errors=True)


# Builds of five classes, twice (1.0.0 and the heavier 1.1.0), then the
# staged rollout: more than the default 180 s on a loaded 2-core machine.
@pytest.mark.timeout(400)
def test_demo_runs_end_to_end(demo_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.demo.run_demo", "--data-dir", str(demo_dir),
         "--tui-headless"],
        cwd=ROOT, capture_output=True, text=True, timeout=380, env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for name, cls in [("pi-kitchen", "pi-class"), ("jetson-dock", "jetson"),
                      ("gateway-1", "x86-gateway")]:  # fmt: skip
        assert any(name in line and cls in line for line in out.splitlines()), (name, out)
    assert "accepted device field-unit-7" in out
    assert "input   input          float32  [batch, 64]" in out
    # Deployed: the gateway and the Pis serve the model to apps; the Jetson's
    # agent refused its TensorRT artifact (no TensorRT here) and said why.
    assert any("jetson-dock" in line and "digits@1.0.0 (failed)" in line
               for line in out.splitlines())  # fmt: skip
    assert "runtime tensorrt not available on this device" in out
    for name in ("gateway-1", "pi-kitchen"):
        for model in ("digits", "digits-cnn"):  # both models, side by side on each device
            line = next(
                line for line in out.splitlines() if line.startswith(f"{name} ({model} 1.0.0)")
            )
            shown = line.split("predicted ")[1].split(", true ")
            predicted, true = (json.loads(part) for part in shown)
            # Real classifiers (95-98 % held-out accuracy) on 8 held-out images.
            assert sum(p == t for p, t in zip(predicted, true, strict=True)) >= 6, line
    assert "LATENCY-P95-MS" in out
    # The staged rollout of 1.1.0: the Pis fail the memory gate on the memory
    # the model adds (not the agent's RSS) and go back to 1.0.0, the gateway
    # completes.
    assert "dropped and reverted: pi-class" in out
    # On the memory the model adds, as the Pis' agents measured it.
    assert "memory failing" in out
    # Apps called the CNN all through the digits rollout: never a failure,
    # never another version.
    cnn = next(line for line in out.splitlines() if line.startswith("digits-cnn on "))
    answered = int(cnn.split("rolled out: ")[1].split(" calls")[0])
    assert answered > 0 and ", 0 failed, versions ['1.0.0']" in cnn, cnn
    ls = out.rsplit("$ edgefleet devices ls", 1)[1].splitlines()
    assert any("gateway-1" in line and "digits@1.1.0, digits-cnn@1.0.0" in line for line in ls), ls
    assert any("pi-kitchen" in line and "digits@1.0.0, digits-cnn@1.0.0" in line for line in ls), ls
    # The TUI, headless: a pilot visited every screen over the demo fleet.
    tour = out.split("The operators' TUI", 1)[1]
    for screen in ("[Overview]", "[Devices]", "[DeviceDetail]", "[Classes]", "[Models]",
                   "[Rollouts]", "[Monitor]", "[Telemetry]", "[Audit]"):  # fmt: skip
        assert screen in tour, (screen, tour[-3000:])
    devices = tour.split("[Devices]", 1)[1].split("[DeviceDetail]", 1)[0]
    assert "gateway-1" in devices and "pi-kitchen" in devices, devices
    monitor = tour.split("[Monitor]", 1)[1]
    assert "digits@1.1.0" in monitor and "dropped" in monitor, monitor[:2000]
    assert "Traceback" not in out
    # Every process was stopped cleanly.
    logs = (demo_dir / "server.log").read_text()
    assert "shutting down" in logs
