"""Transport security against a real `edgefleet server --tls`: TLS for
operators and enrollment, mutual TLS for device RPCs with certificates issued
from device CSRs and bound to the device id, renewal, revocation by
re-enrollment, refusal of rejected devices, and the loud plain-text mode."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from edgefleet.agent.transport import new_key_and_csr
from edgefleet.controlplane.db.engine import sqlite_url
from edgefleet.v1 import device_pb2, device_pb2_grpc
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.harness import ControlPlane, env_without_proxy
from testkit.tls_device import Device

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(
        tmp_path_factory.mktemp("tls") / "cp", None, "--device-cert-lifetime", "15s", tls=True
    )
    plane.start()
    try:
        yield plane
    finally:
        plane.close()


def _token(cp: ControlPlane, max_uses: int = 0) -> str:
    return str(cp.operator().CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="tls", max_uses=max_uses)
    ).secret)  # fmt: skip


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code(), raised.value.details()


def test_enrollment_issues_a_certificate_for_the_device_id_over_its_own_key(
    cp: ControlPlane,
) -> None:
    device = Device(cp, "hw-issue", _token(cp))
    cert = x509.load_pem_x509_certificate(device.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"edgefleet:device:{device.device_id}"
    ]
    key = serialization.load_pem_private_key(device.key_pem, password=None)
    assert cert.public_key() == key.public_key()  # the CSR's key, made by the device
    assert device.certificate.ca_certificate_pem == cp.ca_file.read_bytes()
    assert device.certificate.device_endpoint == cp.device_address
    assert device.upload(device.stub()).acked_seq == 0


def test_device_rpcs_without_the_client_certificate_are_refused(cp: ControlPlane) -> None:
    device = Device(cp, "hw-nocert", _token(cp))
    # The main port does not ask for a certificate: the credential alone is refused.
    code, details = _code(lambda: device.upload(cp.device_stub()))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in details
    # The device port refuses the TLS handshake without one.
    no_cert = device_pb2_grpc.DeviceServiceStub(grpc.secure_channel(
        cp.device_address, grpc.ssl_channel_credentials(cp.ca_file.read_bytes())
    ))  # fmt: skip
    code, _ = _code(lambda: device.upload(no_cert))
    assert code == grpc.StatusCode.UNAVAILABLE
    # Plain text to a TLS port does not get through either.
    plain = device_pb2_grpc.DeviceServiceStub(grpc.insecure_channel(cp.address))
    code, _ = _code(lambda: plain.UploadTelemetry(
        device_pb2.UploadTelemetryRequest(), metadata=device.metadata(), timeout=5
    ))  # fmt: skip
    assert code == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_works_only_with_its_own_devices_credential(cp: ControlPlane) -> None:
    token = _token(cp)
    a, b = Device(cp, "hw-a", token), Device(cp, "hw-b", token)
    code, details = _code(lambda: a.upload(a.stub(), credential=b.credential))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert a.device_id in details and b.device_id in details
    assert b.upload(b.stub()).acked_seq == 0


def test_a_certificate_from_another_ca_fails_the_handshake(cp: ControlPlane) -> None:
    device = Device(cp, "hw-forged", _token(cp))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device.device_id)])
    forged = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(x509.load_pem_x509_certificate(device.cert_pem).not_valid_before_utc)
        .not_valid_after(x509.load_pem_x509_certificate(device.cert_pem).not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"edgefleet:device:{device.device_id}")]
        ), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    stub = device.stub(forged.public_bytes(serialization.Encoding.PEM), key_pem)
    code, _ = _code(lambda: device.upload(stub))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_enrolling_again_revokes_the_earlier_certificate(cp: ControlPlane) -> None:
    token = _token(cp)
    first = Device(cp, "hw-again", token)
    second = Device(cp, "hw-again", token, previous=first)
    assert second.device_id == first.device_id
    # The old certificate with the new credential: TLS accepts it (same CA,
    # not expired), the control plane does not.
    code, details = _code(lambda: first.upload(first.stub(), credential=second.credential))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "replaced" in details
    assert second.upload(second.stub()).acked_seq == 0


def test_enroll_without_or_with_a_bad_csr_is_refused_and_uses_nothing(cp: ControlPlane) -> None:
    token = _token(cp, max_uses=1)
    stub = cp.device_stub()
    code, details = _code(lambda: stub.Enroll(
        device_pb2.EnrollRequest(enrollment_token=token, hardware_id="hw-nocsr")
    ))  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "certificate signing request" in details
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")]))
        .sign(weak, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    for bad, expected in ((b"not a csr", "PEM"), (weak_csr, "1024 bits")):
        code, details = _code(lambda bad=bad: stub.Enroll(  # type: ignore[misc]
            device_pb2.EnrollRequest(enrollment_token=token, hardware_id="hw-badcsr", csr=bad)
        ))  # fmt: skip
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in details
    # Nothing was written: the single-use token still enrolls a device.
    assert Device(cp, "hw-after", token).device_id
    engine = create_engine(sqlite_url(cp.data_dir))
    with engine.connect() as conn:
        found = conn.execute(text(
            "SELECT count(*) FROM devices WHERE hardware_id IN ('hw-nocsr', 'hw-badcsr')"
        )).scalar_one()  # fmt: skip
    engine.dispose()
    assert found == 0


def test_renewal_keeps_the_previous_certificate_until_the_next_one(cp: ControlPlane) -> None:
    device = Device(cp, "hw-renew", _token(cp))
    first = (device.cert_pem, device.key_pem)
    renewed_certs = []
    for _ in range(2):
        key_pem, csr = new_key_and_csr("hw-renew")
        response = device.stub().RenewCertificate(
            device_pb2.RenewCertificateRequest(csr=csr), metadata=device.metadata(), timeout=10
        )
        device.cert_pem, device.key_pem = response.certificate.certificate_pem, key_pem
        renewed_certs.append(device.cert_pem)
        assert device.upload(device.stub()).acked_seq == 0
        if len(renewed_certs) == 1:
            # The certificate it renewed from still works (channels move over).
            assert device.upload(device.stub(*first)).acked_seq == 0
    code, _ = _code(lambda: device.upload(device.stub(*first)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    entries = cp.operator().ListAuditLog(o.ListAuditLogRequest(action="device.certificate.renew"))
    assert sum(e.target == f"device:{device.device_id}" for e in entries.entries) == 2


def test_a_rejected_device_gets_no_certificate_and_no_service(cp: ControlPlane) -> None:
    device = Device(cp, "hw-reject", _token(cp))
    cp.operator().RejectDevice(o.RejectDeviceRequest(id=device.device_id, reason="stolen"))
    _key_pem, csr = new_key_and_csr("hw-reject")
    code, details = _code(lambda: device.stub().RenewCertificate(
        device_pb2.RenewCertificateRequest(csr=csr), metadata=device.metadata(), timeout=10
    ))  # fmt: skip
    assert code == grpc.StatusCode.PERMISSION_DENIED and "rejected" in details
    code, _ = _code(lambda: device.upload(device.stub()))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_the_cli_talks_tls_with_the_ca_certificate(cp: ControlPlane) -> None:
    base = [str(Path(sys.executable).parent / "edgefleet"), "--server", cp.address,
            "--token", cp.admin_token]  # fmt: skip
    Device(cp, "hw-cli", _token(cp))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args, "devices", "ls"], capture_output=True, text=True,
                              env=env_without_proxy(), timeout=60)  # fmt: skip

    listed = run("--ca-cert", str(cp.ca_file))
    assert listed.returncode == 0, listed.stderr
    assert "hw-cli" in listed.stdout
    assert run().returncode != 0  # plain text to a TLS port


def test_a_real_agent_enrolls_with_a_csr_syncs_over_mtls_and_renews(
    cp: ControlPlane, tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path / "agent", cp.address, _token(cp), ca_cert=str(cp.ca_file))
    agent.start()
    try:
        identity = agent.wait_for(agent.identity, timeout=60)
        agent.wait_for(lambda: "connected to" in agent.log(), timeout=60)
        tls_dir = agent.state_dir / "tls"
        key_mode = stat.S_IMODE((tls_dir / "device-key.pem").stat().st_mode)
        assert key_mode == 0o600
        meta = json.loads((tls_dir / "certificate.json").read_text())
        assert meta["endpoint"] == cp.device_address
        first_serial = _serial(tls_dir)
        # 15 s certificates: renewed at two thirds, then reconnected with it.
        agent.wait_for(lambda: "device certificate renewed" in agent.log(), timeout=60)
        agent.wait_for(lambda: agent.log().count("connected to") >= 2, timeout=60)
        assert _serial(tls_dir) != first_serial
        # Its heartbeats arrive over mutual TLS: the control plane sees it online.
        device = cp.operator().GetDevice(o.GetDeviceRequest(id=identity["device_id"]))
        assert device.hardware_id == agent.hardware_id and device.online
        assert "PLAIN TEXT" not in agent.log()
    finally:
        agent.close()


def _serial(tls_dir: Path) -> int:
    return x509.load_pem_x509_certificate((tls_dir / "device-cert.pem").read_bytes()).serial_number


def test_plain_text_mode_says_so_loudly(control_plane: ControlPlane, tmp_path: Path) -> None:
    assert "PLAIN TEXT" in control_plane.log()
    agent = AgentProcess(tmp_path / "agent", control_plane.address, _token(control_plane))
    agent.start()
    try:
        agent.wait_for(lambda: "PLAIN TEXT" in agent.log(), timeout=30)
    finally:
        agent.close()


def test_an_agent_without_a_ca_or_insecure_refuses_to_start(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent", "127.0.0.1:1", "token", insecure=None)
    agent.start()
    try:
        assert agent.proc is not None and agent.proc.wait(60) != 0
        assert "no ca_cert configured" in agent.log()
    finally:
        agent.close()


def test_edgefleet_server_serves_tls_unless_told_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgefleet.controlplane import server
    from edgefleet.controlplane.cli import cli
    from edgefleet.controlplane.config import ServerConfig

    seen: list[ServerConfig] = []
    # Only the command line is under test here; the server itself is above.
    monkeypatch.setattr(server, "run", lambda config, workers=1: seen.append(config))
    for args, tls in (([], True), (["--insecure"], False), (["--tls"], True)):
        result = CliRunner().invoke(cli, ["server", "--data-dir", "/tmp/unused", *args])
        assert result.exit_code == 0, result.output
        assert seen.pop().tls is tls


def test_a_real_agent_whose_certificate_expired_offline_reenrolls_and_keeps_uploading(
    cp: ControlPlane, tmp_path: Path
) -> None:
    """Offline past its certificate's life (frozen here), the agent enrolls
    again with its proof, and its telemetry goes on over a channel with the
    new certificate (it kept the revoked one until the fix, and every upload
    failed until the next renewal). Then it renews the new certificate in
    time (its renewal loop used to sleep out a 30 s retry meanwhile, let the
    new certificate expire and enroll again, every 30 s)."""
    agent = AgentProcess(
        tmp_path / "agent", cp.address, _token(cp), ca_cert=str(cp.ca_file),
        telemetry_interval_s=1,
    )  # fmt: skip
    agent.start()
    try:
        device_id = agent.wait_for(agent.identity, timeout=60)["device_id"]
        db = cp.data_dir / "edgefleet.db"

        def stored() -> int:
            with sqlite3.connect(db) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM telemetry WHERE device_id = ?", (device_id,)
                ).fetchone()
            return int(row[0])

        agent.wait_for(lambda: stored() > 0, timeout=60)
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGSTOP)  # offline: no renewal, no heartbeat
        time.sleep(17)  # past the 15 s certificate
        agent.proc.send_signal(signal.SIGCONT)
        agent.wait_for(lambda: agent.log().count("enrolled as device") >= 2, timeout=60)
        assert agent.identity()["device_id"] == device_id  # type: ignore[index]
        after = stored()
        agent.wait_for(lambda: stored() >= after + 3, timeout=60)
        tail = agent.log().split("enrolled as device")[-1]
        assert "telemetry upload failed" not in tail, tail
        agent.wait_for(
            lambda: "device certificate renewed" in agent.log().split("enrolled as device")[-1],
            timeout=60,
        )
        assert agent.log().count("enrolled as device") == 2, agent.log()
    finally:
        agent.close()
