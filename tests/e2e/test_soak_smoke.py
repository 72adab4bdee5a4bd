"""The soak benchmark's harness (bench/bench_soak.py) at toy scale: 50
simulated devices (5 of them in the probe process) for 20 s against a real
in-process control plane, with the operators' loops running and the echo
baseline beside it. Checks the
accounting and that every part ran, never a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio

from bench.bench_soak import SoakConfig, json_dumps, report, soak
from bench.common import PROFILE_CLASSES
from bench.echo_server import EchoDeviceService
from edgefleet.controlplane.db.engine import sqlite_url
from edgefleet.controlplane.server import ControlPlane
from edgefleet.sim import parse_profile
from edgefleet.sim.profiles import DEFAULT_PROFILE_DATA
from edgefleet.v1 import device_pb2_grpc as dg
from testkit.harness import ADMIN_TOKEN
from tests.e2e.test_fleetsim import Setup
from tests.e2e.test_fleetsim import setup as setup  # the fixture, re-exported

QUICK = SoakConfig(
    agents=50, minutes=20 / 60, heartbeat_s=0.5, telemetry_s=0.5, echo_agents=10,
    # The control plane runs in this process: lowering the load generator's
    # priority would lower it too.
    probe_agents=5, probe_echo_agents=3, generator_nice=0, bake_s=0.5,
    pause_s=0.5, revert_every=2, label_every_s=0.2,
    query_every_s={"GetDevice": 1.0, "ListAuditLog": 1.0, "QueryTelemetry": 1.0,
                   "ListDevices": 2.0},
    watchers=2, push_timeout_s=10.0, warmup_s=5.0, sample_every_s=2.0, drain_s=30.0,
    setup_timeout_s=60.0,
)  # fmt: skip


async def test_a_small_soak_accounts_for_every_sample_and_runs_every_part(
    server: ControlPlane, setup: Setup, tmp_path: Path
) -> None:
    classes = [
        {**c, "install_s": [0.1, 0.3]}
        for c in DEFAULT_PROFILE_DATA["classes"]
        if c["name"] in PROFILE_CLASSES
    ]
    profile = parse_profile({"classes": classes})
    echo = grpc.aio.server()
    dg.add_DeviceServiceServicer_to_server(EchoDeviceService(), echo)
    port = echo.add_insecure_port("127.0.0.1:0")
    await echo.start()
    try:
        results = await soak(
            QUICK, address=server.address, token=setup.token, admin_token=ADMIN_TOKEN,
            echo_address=f"127.0.0.1:{port}", db_url=sqlite_url(tmp_path / "cp"),
            server_pid=os.getpid(), profile=profile, say=lambda _: None,
        )  # fmt: skip
    finally:
        await echo.stop(None)

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
    # The summary and the JSON file are made from these.
    report({**results, "build_s": 0.0})
    assert json.loads(json_dumps(results))["telemetry"]["produced"] == telemetry["produced"]


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
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()  # fmt: skip
    before, *threads = (int(v) for v in out)
    assert len(threads) >= 2  # the main thread and the one it started
    assert threads == [min(19, before + 3)] * len(threads)
