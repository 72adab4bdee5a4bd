"""How the agent reaches the control plane: plain text (development only) or
TLS, with mutual TLS for device RPCs once enrolled.

With TLS the agent trusts the CA certificate it was provisioned with
(`ca_cert` in its config) to enroll on the control plane's main port,
sending a CSR for a key it made itself; the private key never leaves the
device. The control plane answers with a client certificate, its CA
certificate and the device port, and every later RPC goes there with the
certificate. The agent renews at two thirds of the certificate's life,
over the current certificate, and then opens new channels.

Files in the state directory (all written atomically, mode 0600):
- tls/device-key.pem, tls/device-cert.pem, tls/ca.pem;
- tls/certificate.json: not_before/not_after (Unix seconds) and the device
  endpoint.

An agent that holds a certificate never falls back to plain text, whatever
its config says later."""

from __future__ import annotations

import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgefleet.agent.errors import ConfigError, StateError
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import device_pb2

log = logging.getLogger(__name__)

TLS_DIR = "tls"
KEY_FILE, CERT_FILE, CA_FILE, META_FILE = (
    "device-key.pem", "device-cert.pem", "ca.pem", "certificate.json",
)  # fmt: skip
RENEW_AT_FRACTION = 2 / 3
# A failed renewal is tried again this often (well inside the last third of
# even a short-lived certificate).
RENEW_RETRY_S = 30.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class DeviceTls:
    """The device's key and certificate, and where to use them."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    endpoint: str
    not_before: float
    not_after: float

    def renew_at(self) -> float:
        """Unix time at which to renew."""
        return self.not_before + (self.not_after - self.not_before) * RENEW_AT_FRACTION


def new_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new EC P-256 private key (PEM) and a CSR for it. The CSR's subject is
    informational: the control plane names the device id itself."""
    # Imported here: cryptography's native library costs an idle agent ~6.6 MB
    # of RSS and is needed only at enrollment and renewal.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "device")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


REENROLL_CONTEXT = b"edgefleet-reenroll-v1\n"


def sign_reenrollment(key_pem: bytes, device_id: str, csr_pem: bytes) -> bytes:
    """The device's proof, with the key of its current certificate, that it
    asks for the new certificate in `csr_pem` (the control plane verifies it
    as controlplane/domain/pki.reenrollment_message describes)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = serialization.load_pem_private_key(key_pem, password=None)
    message = REENROLL_CONTEXT + device_id.encode() + b"\n" + csr_pem
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    raise StateError("the device key is neither EC nor RSA")


def transport_hint(details: str, tls: bool) -> str:
    """What to change in the agent's config when a connection failed the way
    a TLS mismatch fails ("" when `details` does not look like one): gRPC
    reports each as UNAVAILABLE, as if the control plane were down."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            "the control plane's certificate does not verify against ca_cert: set ca_cert to "
            "the ca.pem in the control plane's data directory"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return (
            "the control plane does not speak TLS (started with --insecure?): for a "
            "development control plane remove ca_cert and set insecure = true"
        )
    if not tls and "Socket closed" in details:
        return (
            "the control plane may serve TLS and this agent talks plain text: set ca_cert to "
            "the ca.pem in the control plane's data directory"
        )
    return ""


def resolve_endpoint(advertised: str, enrolled_with: str) -> str:
    """The device endpoint: what the control plane advertised, with a
    wildcard or missing host replaced by the host the agent enrolled with."""
    if not advertised:
        return enrolled_with
    host, _, port = advertised.rpartition(":")
    if host in _WILDCARD_HOSTS:
        return f"{enrolled_with.rpartition(':')[0]}:{port}"
    return advertised


def save_device_tls(state_dir: Path, tls: DeviceTls) -> None:
    """Persist the key, certificate and CA atomically (key first: a crash
    in between leaves the old certificate with a key it does not match, which
    the control plane refuses, and the agent enrolls or renews again)."""
    directory = state_dir / TLS_DIR
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        atomic_write(directory / KEY_FILE, tls.key_pem)
        atomic_write(directory / CERT_FILE, tls.cert_pem)
        atomic_write(directory / CA_FILE, tls.ca_pem)
        meta = {"endpoint": tls.endpoint, "not_before": tls.not_before, "not_after": tls.not_after}
        atomic_write(directory / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    except OSError as exc:
        raise StateError(f"{directory}: cannot write: {exc.strerror or exc}") from exc


def load_device_tls(state_dir: Path) -> DeviceTls | None:
    """The stored key and certificate; None before TLS enrollment."""
    directory = state_dir / TLS_DIR
    if not (directory / META_FILE).exists():
        return None
    try:
        meta = json.loads((directory / META_FILE).read_text())
        return DeviceTls(
            key_pem=(directory / KEY_FILE).read_bytes(),
            cert_pem=(directory / CERT_FILE).read_bytes(),
            ca_pem=(directory / CA_FILE).read_bytes(),
            endpoint=str(meta["endpoint"]),
            not_before=float(meta["not_before"]),
            not_after=float(meta["not_after"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{directory}: damaged TLS state ({exc}); enroll again") from exc


def from_response(
    key_pem: bytes, certificate: device_pb2.DeviceCertificate, enrolled_with: str
) -> DeviceTls:
    """DeviceTls from the control plane's answer to a CSR made with `key_pem`."""
    if not certificate.certificate_pem or not certificate.ca_certificate_pem:
        raise StateError("the control plane answered without a certificate")
    now = time.time()
    return DeviceTls(
        key_pem=key_pem,
        cert_pem=certificate.certificate_pem,
        ca_pem=certificate.ca_certificate_pem,
        endpoint=resolve_endpoint(certificate.device_endpoint, enrolled_with),
        # Our clock, not the certificate's back-dated start: renewal timing
        # is about how long we have had it.
        not_before=now,
        not_after=max(now, certificate.not_after.ToSeconds() or now),
    )


def read_ca_cert(path: Path) -> bytes:
    """The control plane's CA certificate (the agent's ca_cert) as PEM. A
    ConfigError when it cannot be read or is no PEM certificate: handed to
    gRPC, such a file fails every handshake, which would read as an
    unreachable control plane, retried forever."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the control plane's CA certificate (ca_cert): "
            f"{exc.strerror or exc}"
        ) from exc
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError(
            f"{path}: not a PEM certificate; ca_cert must be the control plane's CA "
            "certificate (ca.pem in its data directory)"
        )
    return pem


class Transport:
    """Makes the agent's channels, from the device's certificate once it
    has one."""

    def __init__(
        self, server: str, ca_cert: Path | None, state_dir: Path,
        options: list[tuple[str, int]], *, insecure: bool = False,
    ) -> None:  # fmt: skip
        """Raises ConfigError when neither TLS (a CA certificate, or a device
        certificate from an earlier enrollment) nor plain text (`insecure`)
        was chosen: silently talking plain text would hand the credential to
        anyone in the middle."""
        self.server = server
        self._bootstrap_ca = ca_cert
        self._state_dir = state_dir
        self._options = options
        self.device: DeviceTls | None = load_device_tls(state_dir)
        if self.device is None and ca_cert is not None:
            read_ca_cert(ca_cert)  # a wrong file is a config error now, not a retry loop
        if self.device is None and ca_cert is None:
            if not insecure:
                raise ConfigError(
                    "no ca_cert configured: set ca_cert to the control plane's CA certificate "
                    "(ca.pem in its data directory) for TLS, or insecure = true to talk plain "
                    "text to a development control plane"
                )
            log.warning(
                "PLAIN TEXT to the control plane at %s (insecure = true): credentials and "
                "models travel unencrypted and the server is not authenticated. For local "
                "development only.",
                server,
            )

    @property
    def tls(self) -> bool:
        """Whether the agent talks TLS (a CA configured, or a certificate held)."""
        return self.device is not None or self._bootstrap_ca is not None

    def _server_trust(self) -> bytes:
        if self.device is not None:
            return self.device.ca_pem
        assert self._bootstrap_ca is not None
        return read_ca_cert(self._bootstrap_ca)

    def _main_port(self) -> tuple[str, grpc.ChannelCredentials | None]:
        """The main port: server-authenticated TLS, or plain text (None)."""
        if not self.tls:
            return self.server, None
        return self.server, grpc.ssl_channel_credentials(root_certificates=self._server_trust())

    def _device_port(self) -> tuple[str, grpc.ChannelCredentials | None]:
        """Where device RPCs go: the device port with mutual TLS. Before TLS
        enrollment, the main port (whose answer, UNAUTHENTICATED, sends the
        agent to enroll)."""
        if self.device is None:
            return self._main_port()
        return self.device.endpoint, grpc.ssl_channel_credentials(
            root_certificates=self.device.ca_pem,
            private_key=self.device.key_pem,
            certificate_chain=self.device.cert_pem,
        )

    def _aio(self, target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        return grpc.aio.secure_channel(target, credentials, options=self._options)

    @property
    def device_target(self) -> str:
        return self._device_port()[0]

    def enroll_channel(self) -> grpc.aio.Channel:
        """A channel to the main port."""
        return self._aio(*self._main_port())

    def device_channel(self) -> grpc.aio.Channel:
        """A channel for device RPCs (see _device_port)."""
        return self._aio(*self._device_port())

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """For artifact downloads over HTTPS from the control plane: its CA
        trusted, the device's certificate presented (the same identity as
        the device port). None before a certificate (plain text)."""
        if self.device is None:
            return None
        directory = self._state_dir / TLS_DIR
        context = ssl.create_default_context(cadata=self.device.ca_pem.decode())
        context.load_cert_chain(directory / CERT_FILE, directory / KEY_FILE)
        return context

    def blocking_device_channel(self) -> grpc.Channel:
        """device_channel for threads (the artifact downloader)."""
        target, credentials = self._device_port()
        if credentials is None:
            return grpc.insecure_channel(target, options=self._options)
        return grpc.secure_channel(target, credentials, options=self._options)

    def adopt(self, device: DeviceTls) -> None:
        """Persist and switch to a new key and certificate (channels made
        from now on use it)."""
        save_device_tls(self._state_dir, device)
        self.device = device
