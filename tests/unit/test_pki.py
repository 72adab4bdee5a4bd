"""The certificate authority's pure functions (controlplane.domain.pki) and
the agent's endpoint resolution."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.agent.transport import new_key_and_csr, resolve_endpoint
from edgefleet.controlplane.domain import pki

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def authority() -> pki.Authority:
    return pki.new_authority("test CA", NOW)


def test_device_certificate_ignores_the_csr_subject_and_names_the_device(
    authority: pki.Authority,
) -> None:
    _key, csr = new_key_and_csr("pretends-to-be-someone-else")
    issued = pki.issue_device_certificate(authority, csr, "dev123", NOW, dt.timedelta(days=1))
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "dev123"
    assert pki.device_certificate_info(issued.certificate_pem) == pki.DeviceCertificateInfo(
        "dev123", issued.serial
    )
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.not_after == NOW + dt.timedelta(days=1)
    ca = x509.load_pem_x509_certificate(authority.certificate_pem)
    cert.verify_directly_issued_by(ca)


def test_a_csr_whose_signature_does_not_match_its_key_is_refused(
    authority: pki.Authority,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")])
    der = bytearray(
        x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )  # fmt: skip
    der[-5] ^= 0xFF  # inside the signature: the request no longer proves the key
    broken = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.CertificateError, match="signature"):
        pki.issue_device_certificate(authority, broken, "d", NOW, dt.timedelta(days=1))


@pytest.mark.parametrize("bad", [b"", b"x" * (pki.MAX_CSR_BYTES + 1), b"-----BEGIN nonsense"])
def test_malformed_csrs_are_refused_with_a_reason(authority: pki.Authority, bad: bytes) -> None:
    with pytest.raises(pki.CertificateError):
        pki.issue_device_certificate(authority, bad, "d", NOW, dt.timedelta(days=1))


def test_device_lifetime_never_outlives_the_ca(authority: pki.Authority) -> None:
    _key, csr = new_key_and_csr("x")
    issued = pki.issue_device_certificate(authority, csr, "d", NOW, dt.timedelta(days=100_000))
    ca = x509.load_pem_x509_certificate(authority.certificate_pem)
    assert issued.not_after == ca.not_valid_after_utc


def test_server_certificate_names_hosts_and_addresses(authority: pki.Authority) -> None:
    issued, key_pem = pki.issue_server_certificate(
        authority, ["cp.example", "10.0.0.5", "cp.example", "::1"], NOW
    )
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["cp.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert serialization.load_pem_private_key(key_pem, None).public_key() == cert.public_key()
    with pytest.raises(pki.CertificateError):
        pki.issue_server_certificate(authority, [" "], NOW)


def test_a_client_certificate_without_a_device_name_is_refused(authority: pki.Authority) -> None:
    server, _ = pki.issue_server_certificate(authority, ["cp.example"], NOW)
    with pytest.raises(pki.CertificateError, match="exactly one device"):
        pki.device_certificate_info(server.certificate_pem)


@pytest.mark.parametrize(
    ("advertised", "enrolled_with", "expected"),
    [
        ("cp.example:7444", "10.0.0.1:7443", "cp.example:7444"),
        ("0.0.0.0:7444", "cp.example:7443", "cp.example:7444"),
        ("[::]:7444", "cp.example:7443", "cp.example:7444"),
        (":7444", "cp.example:7443", "cp.example:7444"),
        ("", "cp.example:7443", "cp.example:7443"),
    ],
)
def test_device_endpoint_resolution(advertised: str, enrolled_with: str, expected: str) -> None:
    assert resolve_endpoint(advertised, enrolled_with) == expected
