"""The control plane's certificate authority, in pure functions over PEM bytes
(cryptography's x509): a self-signed CA, the server's own TLS certificate,
and device client certificates issued from CSRs made on the devices.

A device certificate names its device id twice: as the subject common name
(what people read) and as the URI SAN `edgefleet:device:<id>` (what the
control plane checks). The CSR's subject and extensions are ignored: the CA
decides what the certificate says, the CSR only proves the key."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEVICE_URI_PREFIX = "edgefleet:device:"
MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
# Certificates start this far in the past: a device clock a little behind
# the control plane's must not see a certificate from the future.
BACKDATE = dt.timedelta(minutes=5)
CA_LIFETIME = dt.timedelta(days=3650)
SERVER_LIFETIME = dt.timedelta(days=365)
_PEM = serialization.Encoding.PEM


class CertificateError(ValueError):
    """A CSR or certificate the CA refuses; the message says why."""


@dataclass(frozen=True)
class Authority:
    certificate_pem: bytes
    private_key_pem: bytes


@dataclass(frozen=True)
class Issued:
    certificate_pem: bytes
    serial: str
    not_after: dt.datetime


@dataclass(frozen=True)
class DeviceCertificateInfo:
    device_id: str
    serial: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeFleet"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])  # fmt: skip


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)  # fmt: skip


def new_authority(common_name: str, now: dt.datetime) -> Authority:
    """A new self-signed CA (EC P-256) that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert.public_bytes(_PEM), _key_pem(key))


def _load(authority: Authority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(authority.certificate_pem)
    key = serialization.load_pem_private_key(authority.private_key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _leaf(
    authority: Authority,
    public_key: CertificatePublicKeyTypes,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> Issued:
    ca_cert, ca_key = _load(authority)
    serial = x509.random_serial_number()
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(_PEM), _serial_hex(serial), not_after)


def issue_server_certificate(
    authority: Authority, names: list[str], now: dt.datetime
) -> tuple[Issued, bytes]:
    """A TLS server certificate (and its new private key, PEM) for `names`:
    host names and IP addresses the control plane is reached at."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    if not sans:
        raise CertificateError("the server certificate needs at least one host name or address")
    issued = _leaf(
        authority, key.public_key(), names[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, now,
        SERVER_LIFETIME,
    )  # fmt: skip
    return issued, _key_pem(key)


def issue_device_certificate(
    authority: Authority, csr_pem: bytes, device_id: str, now: dt.datetime,
    lifetime: dt.timedelta,
) -> Issued:  # fmt: skip
    """A client certificate for `device_id` over the key the CSR proves.
    Raises CertificateError for a CSR that does not parse, is not signed by
    its own key, or carries a weak key."""
    if not csr_pem:
        raise CertificateError("a certificate signing request (PEM) is required")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateError(f"the CSR is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"the CSR is not a PEM PKCS#10 request: {exc}") from None
    try:
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise CertificateError(f"the CSR cannot be checked: {exc}") from None
    if not valid:
        raise CertificateError("the CSR's signature does not match its key")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise CertificateError(
                f"RSA key of {public_key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
    elif not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        raise CertificateError("the CSR's key must be EC P-256, EC P-384 or RSA (2048+ bits)")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]
    return _leaf(
        authority, public_key, device_id, sans, ExtendedKeyUsageOID.CLIENT_AUTH, now, lifetime
    )


def device_certificate_info(certificate_pem: bytes) -> DeviceCertificateInfo:
    """The device id and serial a (TLS-verified) client certificate names."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CertificateError(f"not a device certificate: {exc}") from None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(DEVICE_URI_PREFIX)]  # fmt: skip
    if len(uris) != 1:
        raise CertificateError("the certificate does not name exactly one device")
    device_id = uris[0].removeprefix(DEVICE_URI_PREFIX)
    return DeviceCertificateInfo(device_id, _serial_hex(cert.serial_number))


REENROLL_CONTEXT = b"edgefleet-reenroll-v1\n"
MAX_PROOF_CERTIFICATE_BYTES = 16 * 1024


def reenrollment_message(device_id: str, csr_pem: bytes) -> bytes:
    """What a re-enrolling device signs with the key of its certificate: the
    context string keeps the signature from meaning anything else, and the
    new CSR ties it to this one enrollment (agent/transport.py signs it)."""
    return REENROLL_CONTEXT + device_id.encode() + b"\n" + csr_pem


def verify_possession(
    authority: Authority, certificate_pem: bytes, signature: bytes, message: bytes
) -> DeviceCertificateInfo:
    """The device a (possibly expired) certificate names, once the
    certificate is shown to be this CA's and `signature` over `message` to be
    made with its key. Expiry is not checked: a device offline past its
    certificate's life proves itself with it; the caller checks the serial
    against the device's current ones. Raises CertificateError."""
    if not certificate_pem or not signature:
        raise CertificateError("the device's certificate and a signature by its key are required")
    if len(certificate_pem) > MAX_PROOF_CERTIFICATE_BYTES or len(signature) > 1024:
        raise CertificateError("the proof's certificate or signature is too large")
    ca, _ = _load(authority)
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise CertificateError("the certificate is not a PEM X.509 certificate") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise CertificateError("the certificate was not issued by this control plane") from None
    info = device_certificate_info(certificate_pem)
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise CertificateError("the certificate's key is neither EC nor RSA")
    except InvalidSignature:
        raise CertificateError("the signature was not made with the certificate's key") from None
    return info
