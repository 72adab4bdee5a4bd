"""The fleet simulator (fleetsim) as processes: its CLI running a fleet
against a control plane until SIGTERM, the package importing no control
plane or agent code (in a fresh interpreter), and agents timing heartbeat
acknowledgements against the benchmarks' echo server. Profiles and single
agents: tests/unit/test_fleetsim.py; fleets against an in-process control
plane: tests/integration/test_fleetsim.py."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from edgefleet.controlplane.server import ControlPlane
from edgefleet.polling import wait_for_async
from edgefleet.sim import (
    Fleet,
    parse_profile,
)
from testkit.fleet import FAST, GW, FleetSetup, fleet_devices
from testkit.harness import env_without_proxy

ECHO_SERVER = Path(__file__).resolve().parents[2] / "bench" / "echo_server.py"


# ------------------------------------------------------------------ the CLI


async def test_the_cli_runs_a_fleet_until_sigterm_and_prints_json(
    server: ControlPlane, fleet_setup: FleetSetup, tmp_path: Path
) -> None:
    profile = tmp_path / "fleet.json"
    profile.write_text(json.dumps({"classes": [{"name": "gw", "hardware": GW, **FAST}]}))
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "edgefleet"), "--server", server.address, "simulate",
        "-n", "5", "--token", fleet_setup.token, "--profile", str(profile), "--prefix", "cli",
        "--refresh", "0.2", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        # The live summary, a line per refresh on a non-terminal stderr.
        assert proc.stderr is not None
        lines = []
        while not lines or "online=5 |" not in lines[-1]:
            lines.append((await asyncio.wait_for(proc.stderr.readline(), 20)).decode())
            assert lines[-1], "".join(lines)
        devices = await fleet_devices(fleet_setup.op, "cli")
        assert len(devices) == 5 and all(x.online and x.class_name == "gw" for x in devices)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["agents"] == 5
    assert summary["connection"] == {"stopped": 5}
    assert summary["classes"] == {"gw": 5}
    assert summary["updates"] == {"": {"idle": 5}}
    assert summary["stats"]["enrollments"] == 5


def test_fleetsim_is_a_client_and_imports_no_control_plane_or_agent_code() -> None:
    code = (
        "import sys, fleetsim, fleetsim.fleet, fleetsim.agent, fleetsim.profiles\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'controlplane', 'agent'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_agents_time_heartbeat_acks_and_account_for_every_sample_they_made(
    tmp_path: Path,
) -> None:
    """Against the benchmarks' bare echo server, its own process (acks
    heartbeats, refuses every upload with UNIMPLEMENTED): round trips reach
    the hook, refused samples are kept up to the buffer bound and the ones
    pushed out are counted, and a drained fleet makes no new samples but
    keeps resending."""
    from edgefleet.sim.agent import MAX_PENDING_SAMPLES

    port_file = tmp_path / "echo.port"
    echo = await asyncio.create_subprocess_exec(
        sys.executable, str(ECHO_SERVER), "--listen", "127.0.0.1:0", "--port-file", str(port_file),
        env=env_without_proxy(),
    )  # fmt: skip
    try:
        port = await wait_for_async(
            lambda: port_file.exists() and int(port_file.read_text()), 30, what="the echo server"
        )
    except BaseException:
        echo.kill()
        raise
    rtts: list[tuple[int, float]] = []
    desired: list[int] = []
    fleet = Fleet(
        f"127.0.0.1:{port}", "token", parse_profile({"classes": [{"name": "pi"}]}), 3,
        prefix="hooks", heartbeat_interval_s=0.05, telemetry_interval_s=0.01,
        on_heartbeat_ack=lambda agent, rtt: rtts.append((agent.index, rtt)),
        on_desired=lambda agent, _: desired.append(agent.index),
    )  # fmt: skip
    try:
        await fleet.start(timeout_s=30)
        assert sorted(desired) == [0, 1, 2]  # each stream's first DesiredState
        await fleet.wait_until(
            lambda f: (
                all(a.telemetry_dropped > 0 for a in f.agents) and {i for i, _ in rtts} == {0, 1, 2}
            ),
            30,
        )
        assert all(rtt > 0 for _, rtt in rtts)
        stats = fleet.ctx.stats
        for agent in fleet.agents:
            assert agent.pending_samples == MAX_PENDING_SAMPLES
            assert agent.telemetry_produced == agent.telemetry_dropped + agent.pending_samples
        assert stats.telemetry_produced == sum(a.telemetry_produced for a in fleet.agents)
        assert stats.telemetry_dropped == sum(a.telemetry_dropped for a in fleet.agents)
        assert stats.telemetry_refused == 0 and stats.telemetry_samples == 0
        assert stats.telemetry_resends > 0  # what a failed upload held went again

        fleet.drain_telemetry()
        produced, failures = stats.telemetry_produced, stats.telemetry_failures
        await fleet.wait_until(lambda f: f.ctx.stats.telemetry_failures >= failures + 9, 30)
        assert stats.telemetry_produced == produced
        assert fleet.pending_samples() == 3 * MAX_PENDING_SAMPLES  # still held, still resent
    finally:
        await fleet.stop()
        echo.terminate()
        await echo.wait()
