"""`edgefleet simulate` fails loudly (issue 23, item 10): against a control
plane serving TLS, in this process, the real CLI (click's runner, in a
thread: the control plane runs on the test's loop) either gets its agents
enrolled and syncing over mutual TLS, or exits 1 soon, saying why and what
to do. The plain CLI says the same about a missing CA."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client.connection import operator_aio_channel
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import ControlPlane, create_server
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.harness import ADMIN_TOKEN
from testkit.rpc import ADMIN

# Settings from the environment must not change what the CLI connects with.
CLEAN_ENV: dict[str, str | None] = {
    "COLUMNS": "200",
    "EDGEFLEET_SERVER": None,
    "EDGEFLEET_TOKEN": None,
    "EDGEFLEET_CA_CERT": None,
    "EDGEFLEET_ENROLLMENT_TOKEN": None,
    "EDGEFLEET_CONTEXT": None,
    # No saved contexts but those a test makes.
    "EDGEFLEET_CONFIG": "/nonexistent/edgefleet/contexts.json",
}


async def edgefleet(*args: str, config: Path | None = None) -> tuple[Result, float]:
    """The CLI in a thread (with the contexts file `config`), and how long
    it ran (seconds)."""
    env = {**CLEAN_ENV, **({"EDGEFLEET_CONFIG": str(config)} if config else {})}
    started = time.monotonic()
    result = await asyncio.to_thread(
        CliRunner(env=env).invoke, cli, list(args), catch_exceptions=False
    )
    return result, time.monotonic() - started


def error_line(result: Result) -> str:
    """The one `error: ...` line a failed command ends stderr with."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane serving TLS (operators, enrollment) and mutual TLS
    (devices), as `edgefleet server` does by default."""
    cp = await create_server(
        ServerConfig(
            data_dir=tmp_path / "cp", listen="127.0.0.1:0", device_listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN, heartbeat_interval_s=2, build_workers=0, tls=True,
        )
    )  # fmt: skip
    try:
        yield cp
    finally:
        await cp.stop(grace=0.5)


@pytest.fixture
async def tls_op(tls_server: ControlPlane) -> AsyncIterator[og.OperatorServiceAsyncStub]:
    channel = operator_aio_channel(tls_server.address, tls_server.config.ca_file)
    try:
        yield og.OperatorServiceStub(channel)
    finally:
        await channel.close(None)


@pytest.fixture
async def enrollment_token(tls_op: og.OperatorServiceAsyncStub) -> str:
    created = await tls_op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="sim", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT),
        metadata=ADMIN,
    )
    return str(created.secret)


async def fleet_devices(op: og.OperatorServiceAsyncStub, prefix: str) -> list[str]:
    listed = await op.ListDevices(o.ListDevicesRequest(labels={"fleetsim": prefix}), metadata=ADMIN)
    return sorted(d.name for d in listed.devices)


async def test_simulate_without_the_ca_exits_1_at_once_saying_to_pass_it(
    tls_server: ControlPlane, tls_op: og.OperatorServiceAsyncStub, enrollment_token: str
) -> None:
    result, seconds = await edgefleet(
        "--server", tls_server.address, "simulate", "-n", "20", "--token", enrollment_token,
        "--prefix", "noca", "--duration", "120", "--refresh", "0.2",
    )  # fmt: skip
    line = error_line(result)
    assert seconds < 20  # not the --duration, not the --enroll-timeout
    assert "enroll failed for" in line and "of 20: Enroll UNAVAILABLE" in line
    assert f"the control plane at {tls_server.address} serves TLS" in line
    assert "--ca-cert" in line and "ca.pem" in line
    # The final summary tells the truth: nothing enrolled, nothing serves.
    assert "enrolled 0 of 20, connected 0, enroll failed for" in result.stdout
    # Agents that never enrolled are not "(no model) idle" devices, and the
    # failed Enroll calls say each retry counts.
    assert "(no model)" not in result.stdout
    assert "failed calls (each retry counted): Enroll UNAVAILABLE" in result.stdout
    assert await fleet_devices(tls_op, "noca") == []


async def test_simulate_with_the_ca_enrolls_and_syncs_over_mutual_tls(
    tls_server: ControlPlane, tls_op: og.OperatorServiceAsyncStub, enrollment_token: str
) -> None:
    result, _ = await edgefleet(
        "--server", tls_server.address, "--ca-cert", str(tls_server.config.ca_file),
        "simulate", "-n", "3", "--token", enrollment_token, "--prefix", "tls",
        "--duration", "4", "--refresh", "0.5", "--heartbeat-interval", "0.5",
        "--telemetry-interval", "0.5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["failure"] is None
    assert (summary["enrolled"], summary["connected"], summary["enroll_failed"]) == (3, 3, 0)
    assert summary["enroll_error"] == ""
    stats = summary["stats"]
    # Every device RPC went over the device port with the device's own
    # certificate: the control plane answers nothing else there.
    assert stats["enrollments"] == 3 and stats["connects"] >= 3
    assert stats["heartbeats"] >= 3 and stats["telemetry_uploads"] >= 3
    assert stats["errors"] == {}
    assert await fleet_devices(tls_op, "tls") == ["tls-00000", "tls-00001", "tls-00002"]
    # The live summary said so too.
    assert "enrolled 3 of 3, connected 3" in result.stderr


async def test_simulate_takes_the_server_and_ca_from_a_context(
    tls_server: ControlPlane,
    tls_op: og.OperatorServiceAsyncStub,
    enrollment_token: str,
    tmp_path: Path,
) -> None:
    config = tmp_path / "contexts.json"
    added, _ = await edgefleet(
        "context", "add", "lab", "--server", tls_server.address, "--token", ADMIN_TOKEN,
        "--ca-cert", str(tls_server.config.ca_file), "--use", config=config,
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    result, _ = await edgefleet(
        "simulate", "-n", "2", "--token", enrollment_token, "--prefix", "ctx",
        "--duration", "2", "--json", config=config,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["enrolled"], summary["connected"], summary["failure"]) == (2, 2, None)
    assert await fleet_devices(tls_op, "ctx") == ["ctx-00000", "ctx-00001"]


async def test_simulate_with_a_bad_token_exits_1_at_once_with_the_reason(
    tls_server: ControlPlane, tls_op: og.OperatorServiceAsyncStub
) -> None:
    result, seconds = await edgefleet(
        "--server", tls_server.address, "--ca-cert", str(tls_server.config.ca_file),
        "simulate", "-n", "20", "--token", "efe_bogus.secret", "--prefix", "bad",
        "--duration", "120", "--json",
    )  # fmt: skip
    line = error_line(result)
    assert seconds < 10
    assert "refused the enrollment token" in line and "invalid enrollment token" in line
    assert "edgefleet tokens create" in line
    summary = json.loads(result.stdout)
    assert summary["failure"] == line.removeprefix("error: ")
    assert summary["enrolled"] == 0 and summary["connected"] == 0
    # Each agent asked at most once: no retry loop.
    assert 1 <= summary["stats"]["errors"]["Enroll UNAUTHENTICATED"] <= 20
    assert await fleet_devices(tls_op, "bad") == []


async def test_simulate_with_the_ca_at_a_plain_text_server_says_it_does_not_speak_tls(
    server: ControlPlane, tls_server: ControlPlane
) -> None:
    result, seconds = await edgefleet(
        "--server", server.address, "--ca-cert", str(tls_server.config.ca_file),
        "simulate", "-n", "2", "--token", "efe_whatever.secret", "--duration", "120",
    )  # fmt: skip
    line = error_line(result)
    assert seconds < 20
    assert f"the control plane at {server.address} does not speak TLS" in line


async def test_simulate_gives_up_when_nothing_enrolls_within_the_enroll_timeout() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    result, seconds = await edgefleet(
        "--server", address, "simulate", "-n", "2", "--token", "efe_whatever.secret",
        "--enroll-timeout", "1.5", "--duration", "120", "--refresh", "0.5",
    )  # fmt: skip
    line = error_line(result)
    assert seconds < 15
    assert "no agent enrolled within 1.5 s (--enroll-timeout): Enroll UNAVAILABLE" in line
    assert f"is the control plane running at {address}?" in line


async def test_simulate_exits_1_when_some_agents_never_enrolled_by_the_end(
    tls_server: ControlPlane, tls_op: og.OperatorServiceAsyncStub
) -> None:
    """A token good for two enrollments and a fleet of three: two run, the
    third never enrolls, and the run ends with exit 1 and the count."""
    created = await tls_op.CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(
            name="two", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT, max_uses=2
        ),
        metadata=ADMIN,
    )
    result, _ = await edgefleet(
        "--server", tls_server.address, "--ca-cert", str(tls_server.config.ca_file),
        "simulate", "-n", "3", "--token", created.secret, "--prefix", "two",
        "--duration", "3", "--json",
    )  # fmt: skip
    line = error_line(result)
    assert "1 of 3 agents never enrolled (Enroll RESOURCE_EXHAUSTED" in line
    assert "is used up" in line
    summary = json.loads(result.stdout)
    assert (summary["enrolled"], summary["connected"], summary["enroll_failed"]) == (2, 2, 1)
    assert len(await fleet_devices(tls_op, "two")) == 2


async def test_devices_ls_without_the_ca_at_a_tls_server_says_to_pass_it(
    tls_server: ControlPlane,
) -> None:
    base = ("--server", tls_server.address, "--token", ADMIN_TOKEN)
    result, _ = await edgefleet(*base, "devices", "ls")
    line = error_line(result)
    assert f"the control plane at {tls_server.address} serves TLS" in line
    assert "--ca-cert" in line and "ca.pem" in line
    assert "Socket closed" not in line
    fixed, _ = await edgefleet(*base, "--ca-cert", str(tls_server.config.ca_file), "devices", "ls")
    assert fixed.exit_code == 0, fixed.output
