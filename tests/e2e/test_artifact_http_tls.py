"""Artifact downloads over HTTPS from a real `edgefleet server --tls`: a real
agent installs over it with its client certificate, and the endpoint
refuses as DownloadArtifact does: no client certificate, no handshake; no
credential, 401; another device's credential or another class, 403."""

from __future__ import annotations

import platform
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit import fault_scenarios as fs
from testkit.harness import ControlPlane
from testkit.tls_device import Device

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fs.AgentRig]:
    root = tmp_path_factory.mktemp("https")
    cp = ControlPlane(root / "cp", None, tls=True)
    cp.start()
    try:
        op = cp.operator()
        fs.create_classes(op, {"here": platform.machine()})
        model = fs.mlp_model(root / "models" / "1.0.0.onnx", hidden=2_000)
        digests = fs.publish_versions(cp, {"1.0.0": model})
        yield fs.AgentRig(
            cp, fs.enrollment_token(op, "agents"), digests, {"1.0.0": model.stat().st_size}, root
        )
    finally:
        cp.close()


def _client(rig: fs.AgentRig, tmp_path: Path, device: Device | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(rig.cp.ca_file))
    if device is not None:
        cert, key = tmp_path / f"{device.device_id}.pem", tmp_path / f"{device.device_id}.key"
        cert.write_bytes(device.cert_pem)
        key.write_bytes(device.key_pem)
        context.load_cert_chain(cert, key)
    return httpx.Client(verify=context, timeout=30)


def test_a_real_agent_installs_over_https_with_its_client_certificate(
    rig: fs.AgentRig, tmp_path: Path
) -> None:
    agent = rig.agent("agent", ca_cert=str(rig.cp.ca_file))
    agent.start()
    try:
        device_id = rig.device_id(agent)
        status = rig.settled(agent, device_id, rig.assign(device_id, "1.0.0"))
        assert fs.of_status(status) == "committed", status.reason
        rig.serving(agent, "1.0.0")
        url = f"{rig.cp.http_url}/v1/artifacts/{rig.digests['1.0.0']}"
        assert f"downloading {url} from byte 0" in agent.log()
        # In one go: over TLS the last bytes once waited for the client's
        # 60 s read timeout, and the download finished only as a resume.
        assert agent.log().count(" from byte ") == 1, agent.log()
        assert "trying the next source" not in agent.log()
    finally:
        agent.close()


def test_https_refuses_as_download_artifact_does(rig: fs.AgentRig, tmp_path: Path) -> None:
    token = fs.enrollment_token(rig.cp.operator(), "devices")
    # Enrolled without hardware: in no class, so no artifact is built for it.
    a, b = Device(rig.cp, "hw-a", token), Device(rig.cp, "hw-b", token)
    url = f"{rig.cp.http_url}/v1/artifacts/{rig.digests['1.0.0']}"
    with _client(rig, tmp_path, None) as anonymous, pytest.raises(httpx.HTTPError):
        # No client certificate: the handshake fails, nothing is read.
        anonymous.get(url, headers={"Authorization": f"Bearer {a.credential}"})
    with _client(rig, tmp_path, a) as http:
        nobody = http.get(url)
        assert nobody.status_code == 401 and "Bearer" in nobody.text
        swapped = http.get(url, headers={"Authorization": f"Bearer {b.credential}"})
        assert swapped.status_code == 403
        assert a.device_id in swapped.text and b.device_id in swapped.text
        other_class = http.get(url, headers={"Authorization": f"Bearer {a.credential}"})
        assert other_class.status_code == 403
        assert "not built for this device's class" in other_class.text
    # Plain HTTP to the TLS port is not served either.
    with httpx.Client(timeout=10) as plain, pytest.raises(httpx.HTTPError):
        plain.get(url.replace("https://", "http://"))
