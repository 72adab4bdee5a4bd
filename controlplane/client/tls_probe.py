"""Why a call found the control plane UNAVAILABLE, when the reason is that
client and server disagree about TLS: gRPC reports a plain-text client at a
TLS server as "Socket closed" and the reverse as an OpenSSL error, which
name neither side's mistake. A TLS handshake of our own says which it is."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from edgefleet.controlplane.client.connection import Connection
from edgefleet.controlplane.client.errors import rpc_status


@dataclass(frozen=True)
class TlsProbe:
    """What a TLS handshake of our own found at a control plane's address."""

    # True: it completed a TLS handshake; False: it answered, but not with
    # TLS; None: nothing answered (down, refused, unreachable, not host:port).
    serves_tls: bool | None
    # Why its certificate does not verify against the CA we were given.
    untrusted: str | None = None


def probe_tls(server: str, ca_cert: Path | None, timeout: float = 3.0) -> TlsProbe:
    """Shake hands with `server` over TLS, for a call that found it
    UNAVAILABLE. Python's ssl says whether the server speaks TLS at all
    (certificate unchecked) and, given `ca_cert`, whether its certificate
    verifies for the host as gRPC checks it."""
    address = _host_port(server)
    if address is None:
        return TlsProbe(None)
    host, port = address
    anything = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anything.check_hostname = False
    anything.verify_mode = ssl.CERT_NONE
    serves = _handshake(address, anything, timeout)
    if not serves or ca_cert is None:
        return TlsProbe(serves)
    try:
        trusted = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError):
        return TlsProbe(True)  # the client itself reports an unreadable CA file
    trusted.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout) as raw,
            trusted.wrap_socket(raw, server_hostname=host),
        ):
            return TlsProbe(True)
    except ssl.SSLCertVerificationError as err:
        return TlsProbe(True, err.verify_message or str(err))
    except (OSError, ssl.SSLError):
        return TlsProbe(True)


def _handshake(address: tuple[str, int], context: ssl.SSLContext, timeout: float) -> bool | None:
    """True if `address` completes a TLS handshake, False if it answers
    otherwise, None if it cannot be reached."""
    context.set_alpn_protocols(["h2"])  # as a gRPC client offers
    try:
        raw = socket.create_connection(address, timeout)
    except OSError:
        return None
    try:
        with context.wrap_socket(raw, server_hostname=address[0]):
            return True
    except (ssl.SSLError, ConnectionError):
        return False  # a plain-text HTTP/2 server answers with frames, or hangs up
    except OSError:
        return None  # timed out: it said nothing either way
    finally:
        raw.close()


def _host_port(server: str) -> tuple[str, int] | None:
    """host and port of a `host:port` target (also `[v6]:port`, `dns:///…`);
    None for other gRPC targets (unix:, xds:…)."""
    target = server.removeprefix("dns:///")
    if "://" in target or target.startswith("unix:"):
        return None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def transport_hint(err: grpc.RpcError, connection: Connection) -> str | None:
    """For a call that found the control plane UNAVAILABLE, what to do when
    the reason is that this client and the server disagree about TLS; None
    for every other failure. The advice names the `edgefleet` options, which
    `edgefleet tui` shares."""
    status = rpc_status(err)
    if status is None or status[0] != grpc.StatusCode.UNAVAILABLE:
        return None
    return unavailable_advice(connection)


def unavailable_advice(connection: Connection) -> str | None:
    """transport_hint for a connection already known UNAVAILABLE."""
    found = probe_tls(connection.server, connection.ca_cert)
    if found.serves_tls is None and connection.origin:
        # Nothing answers where the operator never said to look: say where
        # the address came from, or they chase a server they never named.
        # The status stays first: scripts and people grep for UNAVAILABLE.
        return (
            f"UNAVAILABLE: no control plane answers at {connection.server} "
            f"({connection.origin}); start "
            "one (`edgefleet server`) or name it with --server or a context "
            "(`edgefleet context add NAME --server HOST:PORT`, then `edgefleet context use NAME`)"
        )
    if found.serves_tls is None and _host_port(connection.server) is not None:
        return (
            f"UNAVAILABLE: no control plane answers at {connection.server}: is it running, "
            "and is that the address it listens on (`edgefleet server --listen`)?"
        )
    return mismatch_advice(connection.server, connection.ca_cert, found)


def tls_mismatch(server: str, ca_cert: Path | None) -> str | None:
    """What to do when a client trusting `ca_cert` (None: plain text) and
    the control plane at `server` disagree about TLS, found by a handshake
    of our own (blocking, up to a few seconds); None when they agree or
    nothing answers. For a caller that saw UNAVAILABLE from something other
    than a blocking call (`edgefleet simulate`'s agents)."""
    return mismatch_advice(server, ca_cert, probe_tls(server, ca_cert))


def mismatch_advice(server: str, ca_cert: Path | None, found: TlsProbe) -> str | None:
    """tls_mismatch's advice from a probe already made."""
    if ca_cert is None and found.serves_tls:
        return (
            f"the control plane at {server} serves TLS and this connection was plain "
            "text: pass its CA certificate (ca.pem in the server's data directory) with "
            "--ca-cert or EDGEFLEET_CA_CERT"
        )
    if ca_cert is not None and found.serves_tls is False:
        return (
            f"the control plane at {server} does not speak TLS (started with --insecure?) "
            f"and this connection used TLS, trusting {ca_cert} (--ca-cert or "
            "EDGEFLEET_CA_CERT): leave that out to connect in plain text"
        )
    if ca_cert is not None and found.untrusted:
        fix = (
            "connect by a name or address its certificate names (the server's --tls-name)"
            if "hostname" in found.untrusted.lower()
            else "pass the ca.pem from that server's data directory with --ca-cert"
        )
        return (
            f"the control plane at {server} has a certificate that {ca_cert} does not "
            f"verify ({found.untrusted}): {fix}"
        )
    return None
