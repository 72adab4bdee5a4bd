"""Issue 18, finding 1: device takeover by re-enrollment, as an attacker
would try it against a real `edgefleet server --tls` (SQLite and
PostgreSQL): with an enrollment token of each policy and use count and the
victim's hardware id (operators see it), with a forged proof, and with the
victim's stolen credential but not its key. Each is refused and audited, and
the victim keeps its identity, state, labels and service. The real device
re-enrolls with proof, and the stream opened with its old credential ends
at once; a decommissioned device enrolls afresh by its token's policy."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.agent.transport import new_key_and_csr, sign_reenrollment
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2
from edgefleet.v1 import operator_pb2 as o
from testkit.harness import ControlPlane, open_sync
from testkit.tls_device import Device

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def cp(tmp_path: Path, db_url: str) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp", db_url, tls=True)
    plane.start()
    try:
        yield plane
    finally:
        plane.close()


def _token(cp: ControlPlane, name: str, policy: str, max_uses: int = 0) -> str:
    policies = {"auto-accept": o.ENROLLMENT_POLICY_AUTO_ACCEPT,
                "pending": o.ENROLLMENT_POLICY_PENDING}  # fmt: skip
    return str(cp.operator().CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name=name, policy=policies[policy], max_uses=max_uses)
    ).secret)  # fmt: skip


def _self_signed(device_id: str) -> tuple[bytes, bytes]:
    """A key and a certificate naming `device_id`, from a CA of the attacker's."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"edgefleet:device:{device_id}")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def _attempt(
    cp: ControlPlane, token: str, hardware_id: str, proof: device_pb2.ReenrollmentProof | None,
    csr: bytes,
) -> tuple[grpc.StatusCode, str]:  # fmt: skip
    request = device_pb2.EnrollRequest(
        enrollment_token=token, hardware_id=hardware_id, csr=csr, labels={"owner": "mallory"},
        proof=proof,
    )  # fmt: skip
    with pytest.raises(grpc.RpcError) as refused:
        cp.device_stub().Enroll(request, timeout=30)
    return refused.value.code(), refused.value.details()


@pytest.mark.parametrize(
    ("policy", "max_uses", "use_up"),
    [
        ("auto-accept", 0, False),
        ("pending", 0, False),
        ("auto-accept", 1, False),
        ("auto-accept", 1, True),
    ],
    ids=["auto-accept", "pending", "single-use", "used-up"],
)
def test_a_token_and_a_hardware_id_cannot_take_over_a_device(
    cp: ControlPlane, policy: str, max_uses: int, use_up: bool
) -> None:
    op = cp.operator()
    victim = Device(cp, "hw-victim", _token(cp, "installer", "pending"))
    op.AcceptDevice(o.AcceptDeviceRequest(id=victim.device_id))
    op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id=victim.device_id, set={"site": "plant"}))
    token = _token(cp, "leaked", policy, max_uses)
    if use_up:
        Device(cp, "hw-someone-else", token)
    # Hardware ids are no secret: a viewer lists them.
    listed = op.ListDevices(o.ListDevicesRequest())
    assert [d.hardware_id for d in listed.devices if d.id == victim.device_id] == ["hw-victim"]
    before = op.GetDevice(o.GetDeviceRequest(id=victim.device_id))

    attacker_key, csr = new_key_and_csr("mallory")
    forged_key, forged_cert = _self_signed(victim.device_id)
    attempts = {
        "no proof": None,
        "a guessed credential": device_pb2.ReenrollmentProof(
            device_id=victim.device_id, device_credential="dev_x.guess"
        ),
        # The victim's credential stolen, its certificate (public) copied,
        # but signed with the attacker's key: the device's key never left it.
        "the stolen credential without the key": device_pb2.ReenrollmentProof(
            device_id=victim.device_id, device_credential=victim.credential,
            certificate_pem=victim.cert_pem,
            signature=sign_reenrollment(attacker_key, victim.device_id, csr),
        ),
        "the stolen credential and a certificate of another CA": device_pb2.ReenrollmentProof(
            device_id=victim.device_id, device_credential=victim.credential,
            certificate_pem=forged_cert,
            signature=sign_reenrollment(forged_key, victim.device_id, csr),
        ),
        # A signature by the real key over another CSR (replayed) proves nothing
        # for this one.
        "a proof made for another CSR": device_pb2.ReenrollmentProof(
            device_id=victim.device_id, device_credential=victim.credential,
            certificate_pem=victim.cert_pem,
            signature=sign_reenrollment(victim.key_pem, victim.device_id, b"another csr"),
        ),
    }  # fmt: skip
    reasons = set()
    for what, proof in attempts.items():
        code, details = _attempt(cp, token, "hw-victim", proof, csr)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (what, details)
        assert f"already enrolled as device {victim.device_id}" in details, what
        assert "decommission" in details  # what the operator does for a wiped device
        reasons.add(details)
    # The same refusal again and again (a loop with a dead token) is audited
    # once a minute, not each time.
    for _ in range(10):
        _attempt(cp, token, "hw-victim", None, csr)

    # The victim: same identity, state, labels, certificate and credential.
    after = op.GetDevice(o.GetDeviceRequest(id=victim.device_id))
    assert after.state == c.DEVICE_STATE_ACCEPTED
    assert dict(after.labels) == dict(before.labels) and after.labels["site"] == "plant"
    assert "owner" not in after.labels
    assert victim.upload(victim.stub()).acked_seq == 0
    assert len(op.ListDevices(o.ListDevicesRequest()).devices) == (2 if use_up else 1)
    # Nothing counted against the token: it still enrolls a new device.
    if not use_up:
        Device(cp, "hw-new", token)
    audit = op.ListAuditLog(o.ListAuditLogRequest(action="device.reenroll.refused"))
    assert len(audit.entries) == len(reasons)
    assert {e.target for e in audit.entries} == {f"device:{victim.device_id}"}


async def _stream_ends(cp: ControlPlane, device: Device) -> grpc.StatusCode:
    """Open a Sync stream as `device`, let the test re-enroll, and return how
    the stream ended."""
    credentials = grpc.ssl_channel_credentials(
        cp.ca_file.read_bytes(), device.key_pem, device.cert_pem
    )
    async with grpc.aio.secure_channel(cp.device_address, credentials) as channel:
        call, messages = open_sync(channel, device.credential)
        first = await anext(messages)
        assert first.WhichOneof("kind") == "desired"
        # The real device enrolls again (its certificate expired offline).
        again = await asyncio.to_thread(
            Device, cp, "hw-real", _token(cp, "again", "pending", 1), previous=device
        )
        assert again.device_id == device.device_id
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(5):
                async for _ in messages:
                    pass
        call.cancel()
        assert again.upload(again.stub()).acked_seq == 0
        assert "enrolled again" in (ended.value.details() or "")
        return ended.value.code()


async def test_the_real_device_reenrolls_with_proof_and_its_old_stream_ends(
    cp: ControlPlane,
) -> None:
    op = cp.operator()
    device = Device(cp, "hw-real", _token(cp, "installer", "auto-accept"))
    op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id=device.device_id, set={"site": "a"}))
    assert await _stream_ends(cp, device) == grpc.StatusCode.UNAUTHENTICATED
    # Proof kept its state (a pending-policy token did not demote it) and the
    # operator's labels.
    shown = op.GetDevice(o.GetDeviceRequest(id=device.device_id))
    assert shown.state == c.DEVICE_STATE_ACCEPTED and shown.labels["site"] == "a"
    # The old credential is dead for every RPC.
    stub = device.stub()
    with pytest.raises(grpc.RpcError) as refused:
        stub.UploadTelemetry(device_pb2.UploadTelemetryRequest(), metadata=bearer_metadata(
            device.credential), timeout=10)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    actions = [e.action for e in op.ListAuditLog(o.ListAuditLogRequest()).entries]
    assert "device.reenroll" in actions


def test_a_decommissioned_device_enrolls_afresh_by_its_tokens_policy(cp: ControlPlane) -> None:
    op = cp.operator()
    lost = Device(cp, "hw-wiped", _token(cp, "installer", "auto-accept"))
    op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id=lost.device_id, set={"site": "b"}))
    pending = _token(cp, "replacement", "pending", 1)
    _, csr = new_key_and_csr("wiped")
    code, _ = _attempt(cp, pending, "hw-wiped", None, csr)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    op.DecommissionDevice(o.DecommissionDeviceRequest(id=lost.device_id, reason="new disk"))
    # Its credential and certificate are refused at once.
    with pytest.raises(grpc.RpcError) as refused:
        lost.upload(lost.stub())
    assert refused.value.code() in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    # Its own agent, still holding the retired identity, gets nothing back.
    with pytest.raises(grpc.RpcError) as retired:
        Device(cp, "hw-wiped", pending, previous=lost)
    assert retired.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "decommissioned by an operator" in retired.value.details()
    # A reinstalled board, with no identity left, enrolls afresh.
    fresh = Device(cp, "hw-wiped", pending)
    assert fresh.device_id == lost.device_id
    shown = op.GetDevice(o.GetDeviceRequest(id=lost.device_id))
    assert shown.state == c.DEVICE_STATE_PENDING and shown.labels["site"] == "b"
    # The single-use token is now used.
    code, details = _attempt(cp, pending, "hw-other", None, csr)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


def test_concurrent_reenrollments_with_one_proof_give_one_identity(cp: ControlPlane) -> None:
    """Two enrollments of one device at once with the same genuine proof (a
    race, or a replay racing the device): exactly one gets an identity, and
    it is the one that works (PostgreSQL took both before the row lock)."""
    device = Device(cp, "hw-race", _token(cp, "installer", "auto-accept"))
    token = _token(cp, "again", "auto-accept")

    def enroll_again() -> Device | grpc.StatusCode:
        try:
            return Device(cp, "hw-race", token, previous=device)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]

    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(lambda _: enroll_again(), range(4)))
        won = [o for o in outcomes if isinstance(o, Device)]
        assert len(won) == 1, outcomes
        assert all(o == grpc.StatusCode.PERMISSION_DENIED for o in outcomes if o not in won)
        assert won[0].upload(won[0].stub()).acked_seq == 0
        device = won[0]
