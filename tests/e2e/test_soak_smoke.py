"""The soak benchmark (bench/bench_soak.py) in its smoke size, as CI runs it:
`python -m bench.bench_soak --smoke`, its own process with a real control
plane, the echo baseline and the probe process beside it; 50 simulated
devices (5 of them in the probe) for 20 s with the operators' loops running.
Checks the accounting in the figures it writes and that every part ran,
never a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.harness import env_without_proxy

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(420)


def test_a_small_soak_accounts_for_every_sample_and_runs_every_part(tmp_path: Path) -> None:
    figures = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.bench_soak", "--smoke", "--json", str(figures)],
        cwd=ROOT, env=env_without_proxy(), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "## Soak results" in run.stdout  # the human summary, made from the figures
    results = json.loads(figures.read_text())

    telemetry = results["telemetry"]
    assert telemetry["produced"] > 0 and telemetry["stored"] > 0
    assert telemetry["produced"] == telemetry["stored"] + telemetry["dropped_by_bound_or_refused"]
    assert telemetry["still_held"] == 0
    assert telemetry["ok"], telemetry["problems"]
    assert telemetry["devices"] == 50 and telemetry["foreign_rows"] == 0

    assert results["sync"]["overall"]["count"] > 0
    assert results["sync"]["per_minute"][0]["count"] > 0
    assert results["echo"]["overall"]["count"] > 0
    assert results["push"]["overall"]["count"] > 0
    # The probe process's devices are members of the fleet: counted in the
    # telemetry above (50 devices), timed on their own here.
    probe = results["probe"]
    assert probe["devices"] == 5
    assert probe["sync"]["overall"]["count"] > 0 and probe["echo"]["overall"]["count"] > 0
    assert probe["uploads"] > 0 and not probe["errors"], probe

    ops = results["operators"]
    for name in ("UpdateDeviceLabels", "GetDevice", "ListAuditLog", "QueryTelemetry",
                 "ListDevices", "CreateRollout", "StartRollout", "GetRollout",
                 "GetRollout (whole)"):  # fmt: skip
        assert ops["calls"].get(name, 0) > 0, (name, ops)
    assert sum(ops["watch_events"].values()) > 0
    assert not [k for k in ops["errors"] if k.startswith("loop ")], ops["errors"]
    assert "ListDevices walk incomplete" not in ops["errors"], ops["errors"]
    assert results["resources"]["samples"]
    assert results["fleet"]["agents"] == 45  # and the probe's 5


def test_the_load_generator_lowers_every_thread_of_its_own() -> None:
    # In a child: the priority would stay lowered for the rest of the suite.
    code = (
        "import os, threading, time\n"
        "from bench.bench_soak import lower_priority\n"
        "ev = threading.Event()\n"
        "t = threading.Thread(target=ev.wait); t.start()\n"
        "before = os.getpriority(os.PRIO_PROCESS, 0)\n"
        "lower_priority(3)\n"
        "tids = [int(x) for x in os.listdir('/proc/self/task')]\n"
        "print(before, *[os.getpriority(os.PRIO_PROCESS, x) for x in tids])\n"
        "ev.set()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        cwd=ROOT,
    ).stdout.split()  # fmt: skip
    before, *threads = (int(v) for v in out)
    assert len(threads) >= 2  # the main thread and the one it started
    assert threads == [min(19, before + 3)] * len(threads)
