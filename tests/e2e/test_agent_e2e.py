"""End to end: real `edgefleet-agent` processes against a real `edgefleet
server` process. Observed through OperatorService and the files the agents
persist. Timeouts are generous and nothing asserts on timing."""

from __future__ import annotations

import socket as socket_module
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.identity import load_trusted_keys
from edgefleet.v1 import common_pb2, device_pb2, operator_pb2
from testkit.agent_harness import AGENT_EXECUTABLE, AgentProcess, wait_for
from testkit.harness import ControlPlane

pytestmark = pytest.mark.timeout(240)

AgentFactory = Callable[..., AgentProcess]


def create_token(cp: ControlPlane, policy: int = operator_pb2.ENROLLMENT_POLICY_AUTO_ACCEPT) -> str:
    response = cp.operator().CreateEnrollmentToken(
        operator_pb2.CreateEnrollmentTokenRequest(name="e2e", policy=policy)  # type: ignore[arg-type]
    )
    return str(response.secret)


@pytest.fixture
def token(control_plane: ControlPlane) -> str:
    return create_token(control_plane)


@pytest.fixture
def agents(tmp_path: Path, control_plane: ControlPlane, token: str) -> Iterator[AgentFactory]:
    """Starts agents against the test's control plane; kills leftovers."""
    started: list[AgentProcess] = []

    def start(enrollment_token: str | None = None, **config: Any) -> AgentProcess:
        agent = AgentProcess(
            tmp_path / f"agent{len(started)}",
            control_plane.address,
            enrollment_token or token,
            **config,
        )
        started.append(agent)
        return agent.start()

    yield start
    for agent in started:
        agent.close()


def devices(cp: ControlPlane) -> dict[str, Any]:
    return {d.id: d for d in cp.operator().ListDevices(operator_pb2.ListDevicesRequest()).devices}


def device(cp: ControlPlane, device_id: str) -> Any:
    return cp.operator().GetDevice(operator_pb2.GetDeviceRequest(id=device_id))


def enrolled_id(agent: AgentProcess) -> str:
    identity = agent.wait_for(agent.identity)
    return str(identity["device_id"])


def wait_desired(
    agent: AgentProcess,
    predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """The agent's desired.json once it exists and satisfies `predicate`."""

    def check() -> dict[str, Any] | None:
        desired = agent.desired()
        return desired if desired is not None and predicate(desired) else None

    return agent.wait_for(check, timeout)


def test_agents_register_on_boot_with_profile_and_runtime(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    pi = agents(
        name="pi-1",
        labels={"site": "lab"},
        hardware={
            "arch": "arm64",
            "memory_mb": 4096,
            "cpu_cores": 4,
            "board_model": "Raspberry Pi 4 Model B Rev 1.4",
            "accelerators": [],
        },
    )
    jetson = agents(
        name="jetson-1",
        hardware={
            "arch": "aarch64",
            "memory_mb": 8192,
            "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
            "accelerators": [{"kind": "jetson", "name": "Orin Nano", "memory_mb": 8192}],
        },
    )
    pi_id, jetson_id = enrolled_id(pi), enrolled_id(jetson)
    assert pi_id != jetson_id
    assert pi.wait_for(pi.identity)["hardware_id"] == pi.hardware_id

    def both_listed() -> dict[str, Any] | None:
        found = devices(control_plane)
        return found if {pi_id, jetson_id} <= set(found) else None

    listed = wait_for(both_listed)
    assert len(listed) == 2
    pi_device, jetson_device = listed[pi_id], listed[jetson_id]
    assert pi_device.name == "pi-1"
    assert pi_device.hardware_id == pi.hardware_id
    assert pi_device.state == common_pb2.DEVICE_STATE_ACCEPTED
    assert pi_device.labels["site"] == "lab"
    assert (pi_device.hardware.arch, pi_device.hardware.memory_mb) == ("aarch64", 4096)
    assert pi_device.hardware.cpu_cores == 4
    assert pi_device.hardware.board_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert list(pi_device.hardware.accelerators) == []
    assert pi_device.hardware.os and pi_device.hardware.hostname
    assert pi_device.hardware.disk_total_mb > 0
    assert pi_device.runtime.python_version
    assert pi_device.runtime.agent_version
    assert pi_device.runtime.onnxruntime_version
    assert "CPUExecutionProvider" in pi_device.runtime.onnxruntime_providers
    assert [(a.kind, a.name) for a in jetson_device.hardware.accelerators] == [
        ("jetson", "Orin Nano")
    ]
    # The manifest-signing key was pinned at enrollment, and it is the one
    # the control plane hands out.
    token = control_plane.operator().CreateEnrollmentToken(
        operator_pb2.CreateEnrollmentTokenRequest(name="probe")
    )
    probe = control_plane.device_stub().Enroll(
        device_pb2.EnrollRequest(enrollment_token=token.secret, hardware_id="probe")
    )
    pinned = load_trusted_keys(pi.state_dir)
    assert pinned == {k.key_id: k.public_key for k in probe.signing_keys} and pinned

    # Both open a Sync stream and apply the first desired state.
    for agent, device_id in ((pi, pi_id), (jetson, jetson_id)):
        desired = wait_desired(agent)
        assert desired["device_state"] == "DEVICE_STATE_ACCEPTED"
        revision = desired["revision"]

        def reported(device_id: str = device_id, revision: int = revision) -> bool:
            found = device(control_plane, device_id)
            return bool(found.online and found.applied_revision == revision)

        agent.wait_for(reported)


def test_restart_keeps_device_id(control_plane: ControlPlane, agents: AgentFactory) -> None:
    agent = agents()
    device_id = enrolled_id(agent)
    wait_desired(agent)
    assert agent.stop() == 0

    agent.start()
    agent.wait_for(lambda: agent.log().count("connected to") >= 2)
    # A power cut (SIGKILL) is no different: identity.json was written atomically.
    agent.kill()
    agent.start()
    agent.wait_for(lambda: agent.log().count("connected to") >= 3)
    assert enrolled_id(agent) == device_id
    assert agent.log().count("enrolled as device") == 1
    assert list(devices(control_plane)) == [device_id]


def test_a_second_agent_on_the_same_state_directory_is_refused(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    """A second agent started with the first's config exits at once, naming
    the first; the first keeps its Sync stream and its inference sockets (the
    second used to take the stream and, on exit, delete the sockets)."""
    first = agents()
    wait_desired(first)
    assert first.proc is not None
    sockets = [first.state_dir / "inference.sock", first.state_dir / "predict.sock"]
    assert all(path.is_socket() for path in sockets)

    second = subprocess.run(
        [str(AGENT_EXECUTABLE), "--config", str(first.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1, second.stderr
    assert f"another edgefleet-agent (pid {first.proc.pid})" in second.stderr, second.stderr
    assert "connected to" not in second.stderr
    assert all(path.is_socket() for path in sockets)
    assert first.running and "replaced by a newer connection" not in first.log()
    # Still serving on its socket.
    with socket_module.socket(socket_module.AF_UNIX) as client:
        client.connect(str(sockets[0]))

    # The lock goes with the process: after a kill -9 the agent starts again.
    first.kill()
    first.start()
    first.wait_for(lambda: first.log().count("connected to") >= 2)


def test_agent_reconnects_after_control_plane_restart(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    agent = agents(labels={"site": "lab"})
    device_id = enrolled_id(agent)
    wait_desired(agent)
    pid = agent.proc.pid  # type: ignore[union-attr]

    control_plane.kill()
    control_plane.start()
    # Made after the restart: only a reconnected agent can learn about it.
    control_plane.operator().UpdateDeviceLabels(
        operator_pb2.UpdateDeviceLabelsRequest(id=device_id, set={"tier": "canary"})
    )
    desired = wait_desired(agent, lambda d: d["labels"].get("tier") == "canary", timeout=60)
    assert desired["labels"]["site"] == "lab"
    assert agent.running and agent.proc.pid == pid  # type: ignore[union-attr]
    assert enrolled_id(agent) == device_id
    agent.wait_for(lambda: device(control_plane, device_id).online)

    # A graceful control-plane restart too.
    assert control_plane.stop() == 0
    control_plane.start()
    control_plane.operator().UpdateDeviceLabels(
        operator_pb2.UpdateDeviceLabelsRequest(id=device_id, remove=["tier"])
    )
    wait_desired(agent, lambda d: "tier" not in d["labels"], timeout=60)


def test_sigterm_exits_zero(control_plane: ControlPlane, agents: AgentFactory) -> None:
    connected = agents()
    wait_desired(connected)
    assert connected.stop(timeout=15) == 0
    assert "stopping" in connected.log()

    # Also while it cannot reach the control plane and is backing off.
    control_plane.kill()
    waiting = agents()
    waiting.wait_for(lambda: "unreachable" in waiting.log())
    assert waiting.stop(timeout=15) == 0


def test_config_error_exits_non_zero(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "bad", "127.0.0.1:1", "token", backoff_max_s="soon")
    agent.start()
    assert agent.proc is not None
    assert agent.proc.wait(30) == 2
    assert "key backoff_max_s" in agent.log()
    assert str(agent.config_path) in agent.log()

    # Valid config, but nothing to authenticate with: a fatal, explained exit.
    unprovisioned = AgentProcess(tmp_path / "new", "127.0.0.1:1", None)
    unprovisioned.start()
    assert unprovisioned.proc is not None
    assert unprovisioned.proc.wait(30) == 1
    assert "no enrollment token configured" in unprovisioned.log()


def test_pending_device_waits_for_approval(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    pending_token = create_token(control_plane, operator_pb2.ENROLLMENT_POLICY_PENDING)
    agent = agents(enrollment_token=pending_token)
    device_id = enrolled_id(agent)
    assert device(control_plane, device_id).state == common_pb2.DEVICE_STATE_PENDING
    pending = control_plane.operator().ListDevices(
        operator_pb2.ListDevicesRequest(state=common_pb2.DEVICE_STATE_PENDING)
    )
    assert [d.id for d in pending.devices] == [device_id]

    control_plane.operator().AcceptDevice(operator_pb2.AcceptDeviceRequest(id=device_id))
    desired = wait_desired(agent, lambda d: d["device_state"] == "DEVICE_STATE_ACCEPTED")
    assert desired["revision"] >= 1
    assert device(control_plane, device_id).state == common_pb2.DEVICE_STATE_ACCEPTED
    assert agent.running


def test_rejected_device_keeps_running_and_backs_off(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    agent = agents()
    device_id = enrolled_id(agent)
    wait_desired(agent)
    control_plane.operator().RejectDevice(
        operator_pb2.RejectDeviceRequest(id=device_id, reason="not ours")
    )
    agent.wait_for(lambda: "refused by the control plane" in agent.log())
    assert agent.running
    assert agent.stop() == 0


def test_agent_serves_the_inference_api_and_uploads_telemetry(
    control_plane: ControlPlane, agents: AgentFactory
) -> None:
    import grpc

    from edgefleet.v1 import inference_pb2, inference_pb2_grpc

    with socket_module.socket() as probe:  # a free loopback port for /metrics
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    agent = agents(
        name="edge-1", telemetry_interval_s=0.5, metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    device_id = enrolled_id(agent)
    socket = agent.state_dir / "inference.sock"
    wait_for(socket.exists)
    # No model has been activated yet: the API answers, with NOT_FOUND.
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            stub.GetModelMetadata(inference_pb2.GetModelMetadataRequest(model_name="digits"))
            raise AssertionError("metadata for a model that was never activated")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    # Device-level telemetry (memory, CPU) arrives at the control plane.
    op = control_plane.operator()

    def memory_points() -> int:
        resp = op.QueryTelemetry(
            operator_pb2.QueryTelemetryRequest(
                metric=operator_pb2.TELEMETRY_METRIC_MEMORY_MB, device_id=device_id
            )
        )
        return sum(len(series.points) for series in resp.series)

    assert wait_for(memory_points, timeout=30)
    # The same figures on the agent's local Prometheus endpoint.

    def scraped() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as page:
                text = page.read().decode()
        except OSError:
            return None
        return text if "edgefleet_agent_process_rss_mb " in text else None

    assert "edgefleet_agent_" in wait_for(scraped, timeout=30)
    assert agent.stop() == 0
