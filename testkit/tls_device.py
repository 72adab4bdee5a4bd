"""A device that speaks the protocol itself against `edgefleet server --tls`:
its own key and CSR, enrolled (or enrolled again with proof of being an
earlier device), and device stubs over mutual TLS with its certificate."""

from __future__ import annotations

import grpc

from edgefleet.agent.transport import new_key_and_csr, sign_reenrollment
from edgefleet.v1 import device_pb2, device_pb2_grpc
from testkit.harness import ControlPlane


class Device:
    """A device speaking the protocol from the test: its own key and CSR."""

    def __init__(
        self, cp: ControlPlane, hardware_id: str, token: str, *, previous: Device | None = None
    ) -> None:
        """Enroll `hardware_id`; with `previous`, again as that device,
        proving it with its credential and the key of its certificate."""
        self.cp = cp
        self.key_pem, csr = new_key_and_csr(hardware_id)
        request = device_pb2.EnrollRequest(enrollment_token=token, hardware_id=hardware_id, csr=csr)
        if previous is not None:
            request.proof.CopyFrom(device_pb2.ReenrollmentProof(
                device_id=previous.device_id, device_credential=previous.credential,
                certificate_pem=previous.cert_pem,
                signature=sign_reenrollment(previous.key_pem, previous.device_id, csr),
            ))  # fmt: skip
        enrolled = cp.device_stub().Enroll(request)
        self.device_id: str = enrolled.device_id
        self.credential: str = enrolled.device_credential
        self.cert_pem: bytes = enrolled.certificate.certificate_pem
        self.certificate = enrolled.certificate

    def metadata(self, credential: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {credential or self.credential}"),)

    def stub(self, cert_pem: bytes | None = None, key_pem: bytes | None = None
             ) -> device_pb2_grpc.DeviceServiceStub:  # fmt: skip
        credentials = grpc.ssl_channel_credentials(
            self.cp.ca_file.read_bytes(), key_pem or self.key_pem, cert_pem or self.cert_pem
        )
        return device_pb2_grpc.DeviceServiceStub(
            grpc.secure_channel(self.cp.device_address, credentials)
        )

    def upload(self, stub: device_pb2_grpc.DeviceServiceStub, credential: str | None = None
               ) -> device_pb2.UploadTelemetryResponse:  # fmt: skip
        return stub.UploadTelemetry(
            device_pb2.UploadTelemetryRequest(), metadata=self.metadata(credential), timeout=10
        )
