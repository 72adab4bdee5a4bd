"""Man in the middle between a real agent and a real `edgefleet server`
(issue 18): what an attacker on the path can and cannot make a device do.

TLS is end to end, so an attacker on the path cannot read or edit what an
agent and its control plane say to each other; what is left to test comes in
two parts.

1. An attacker OUTSIDE the trust boundary, on the network path. The agent
   reaches the control plane through TCP relays the test re-routes at will
   (the device port too: the control plane advertises its relay), to:
   - a TLS-terminating gRPC relay holding a certificate for 127.0.0.1 from
     a CA of its own, which the agent does not trust: the agent refuses to
     talk, on the enrollment port and, once enrolled, on the device port
     (no enrollment, no sync, nothing reaches the relay);
   - downgrades: the relay offering plain text, a TLS server that speaks
     only TLS 1.0/1.1 (with a certificate the agent does trust, so the
     version is the only thing wrong), an agent configured with a CA but
     pointed at a plain-text control plane, and an enrolled agent told
     `insecure = true`: each fails closed, the agent never falls back to
     plain text.
   Each refusal is followed by the honest path working again for the same
   agent, so it is the attacker that was refused.

2. A compromised relay INSIDE the trust boundary: a plain-text control
   plane (`--insecure`) with a gRPC-level relay (testkit/grpc_relay.py) that
   forwards every device RPC and rewrites the desired states pushed on
   Sync, as a compromised proxy, replica or load balancer could. TLS does
   not help here; the signed statements (docs/security.md, "Signed
   updates") must. A replayed older assignment, a statement field edited
   (signature kept), an assignment field edited outside its statement (model
   version, artifact, shadow, rollback), another device's statement swapped
   in, a forged key rotation, and rotations reordered or withheld: each ends
   with the agent refusing, the reason in the device's update status as the
   operator API shows it, and the device serving the model it served
   before (its inference API answers with the old version) with its
   trusted state (the device's trust.json, its signing keys, and the
   model's models/digits/trust.json) unchanged. The relay edits the
   assignment where the agent (protocol 2) reads it, in
   DesiredState.assignments, and copies it into the one-model field.

tests/e2e/test_signed_updates_e2e.py injects whole desired states of its own;
here the relay edits the control plane's genuine pushes for the assignment
the operator just made, the way the attacker would."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import pki, signing
from edgefleet.controlplane.services import statements
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess, wait_for
from testkit.builds import publish_digits_versions
from testkit.deployments import served, settled
from testkit.grpc_relay import GrpcRelay
from testkit.harness import ControlPlane
from testkit.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(300)

MODEL = "digits"
CLASS = "cpu"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
# Retries the agent made on a path, counted in its log ("enroll: ... (UNAVAILABLE: ...)").
_ENROLL_FAILED = re.compile(r"enroll: .*\(UNAVAILABLE")
_SYNC_FAILED = re.compile(r"sync: .*\(UNAVAILABLE")


def _count(pattern: re.Pattern[str], agent: AgentProcess) -> int:
    return len(pattern.findall(agent.log()))


def _route(front: TcpProxy, address: str) -> None:
    """Send new connections through `front` to `address`, and cut the live
    ones so the agent reconnects over the new path."""
    host, _, port = address.rpartition(":")
    front.upstream = (host, int(port))
    front.cut_all()


# ================================================================ part 1: outside TLS


@dataclass
class Network:
    """A TLS control plane reached only through two re-routable TCP relays:
    `main` (enrollment) and `device` (the device port it advertises)."""

    cp: ControlPlane
    main: TcpProxy
    device: TcpProxy
    token: str
    root: Path
    attacker_cert: bytes
    attacker_key: bytes
    attacker_ca: bytes
    agents: list[AgentProcess] = field(default_factory=list)

    def honest(self) -> None:
        _route(self.main, self.cp.address)
        _route(self.device, self.cp.device_address)

    def agent(self, name: str, **config: Any) -> AgentProcess:
        agent = AgentProcess(
            self.root / name, self.main.address, self.token, ca_cert=str(self.cp.ca_file),
            telemetry_interval_s=60, **config,
        )  # fmt: skip
        self.agents.append(agent)
        return agent

    def attacker(self, upstream: str, *, tls: bool = True) -> GrpcRelay:
        """A relay to `upstream` (the real main port, over TLS trusting the
        real CA) that serves the attacker's certificate, or plain text."""
        server = (
            grpc.ssl_server_credentials([(self.attacker_key, self.attacker_cert)]) if tls else None
        )
        upstream_tls = grpc.ssl_channel_credentials(self.cp.ca_file.read_bytes())
        return GrpcRelay(
            upstream, server_credentials=server, upstream_credentials=upstream_tls
        ).start()

    def hardware_ids(self) -> set[str]:
        listed = self.cp.operator().ListDevices(o.ListDevicesRequest())
        return {device.hardware_id for device in listed.devices}


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("mitm-tls")
    # The device port is advertised as the relay's address: every device
    # connection after enrollment goes through a path the test controls.
    main, device = TcpProxy("127.0.0.1:1").start(), TcpProxy("127.0.0.1:1").start()
    cp = ControlPlane(root / "cp", None, "--device-advertise", device.address, tls=True)
    now = dt.datetime.now(dt.UTC)
    attacker_ca = pki.new_authority("attacker", now)
    # A certificate for the very address the agent dials: only its issuer is wrong.
    issued, attacker_key = pki.issue_server_certificate(attacker_ca, ["127.0.0.1"], now)
    try:
        cp.start()
        token = (
            cp.operator().CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="mitm")).secret
        )
        net = Network(cp, main, device, token, root, issued.certificate_pem, attacker_key,
                      attacker_ca.certificate_pem)  # fmt: skip
        net.honest()
        yield net
    finally:
        main.close()
        device.close()
        cp.close()


@pytest.fixture
def net(network: Network) -> Iterator[Network]:
    network.honest()
    yield network
    for agent in network.agents:
        agent.close()
    network.agents.clear()
    network.honest()


def _refused_to_enroll(net: Network, agent: AgentProcess, tries: int = 3) -> None:
    """The agent tried `tries` times and got nowhere: no identity, no
    certificate, no desired state, no device on the control plane."""
    agent.wait_for(lambda: _count(_ENROLL_FAILED, agent) >= tries, timeout=90)
    assert agent.identity() is None and agent.desired() is None
    assert not (agent.state_dir / "tls" / "device-cert.pem").exists()
    assert agent.hardware_id not in net.hardware_ids()
    assert "PLAIN TEXT" not in agent.log()


def _enrolls_and_syncs(net: Network, agent: AgentProcess) -> str:
    """The honest path: the same agent enrolls and syncs over mutual TLS."""
    net.honest()
    identity = agent.wait_for(agent.identity, timeout=60)
    agent.wait_for(lambda: "connected to" in agent.log(), timeout=60)
    return str(identity["device_id"])


def test_a_tls_terminating_attacker_with_its_own_ca_gets_no_enrollment(net: Network) -> None:
    with net.attacker(net.cp.address) as attacker:
        # The attacker works: a client that trusted its CA would be relayed
        # to the real control plane (which answers this one's missing CSR).
        fooled = dg.DeviceServiceStub(grpc.secure_channel(
            attacker.address, grpc.ssl_channel_credentials(net.attacker_ca)
        ))  # fmt: skip
        with pytest.raises(grpc.RpcError) as relayed:
            fooled.Enroll(d.EnrollRequest(enrollment_token=net.token, hardware_id="x"), timeout=10)
        assert relayed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert attacker.count("Enroll") == 1

        _route(net.main, attacker.address)
        agent = net.agent("fooled").start()
        _refused_to_enroll(net, agent)
        assert "CERTIFICATE_VERIFY_FAILED" in agent.log()
        assert "does not verify against ca_cert: set ca_cert to the ca.pem" in agent.log()
        assert attacker.count() == 1 and net.main.stats.connections >= 3
    _enrolls_and_syncs(net, agent)


def test_an_enrolled_agent_refuses_an_attacker_on_its_device_port(net: Network) -> None:
    agent = net.agent("hijacked").start()
    _enrolls_and_syncs(net, agent)
    endpoint = json.loads((agent.state_dir / "tls" / "certificate.json").read_text())["endpoint"]
    assert endpoint == net.device.address  # the path the test controls
    connected = agent.log().count("connected to")
    with net.attacker(net.cp.device_address) as attacker:
        # The attacker takes the device port over; live streams are cut.
        failed, seen = _count(_SYNC_FAILED, agent), len(agent.log())
        _route(net.device, attacker.address)
        agent.wait_for(lambda: _count(_SYNC_FAILED, agent) >= failed + 3, timeout=90)
        assert "CERTIFICATE_VERIFY_FAILED" in agent.log()[seen:]
        assert attacker.count() == 0
        assert agent.log().count("connected to") == connected
    # Back on the honest path it syncs again, with the certificate it had.
    net.honest()
    agent.wait_for(lambda: agent.log().count("connected to") > connected, timeout=60)


def test_a_plain_text_relay_gets_nothing_from_an_agent_that_expects_tls(net: Network) -> None:
    with net.attacker(net.cp.address, tls=False) as downgrade:
        # It relays plain text to the real control plane for whoever speaks it.
        plain = dg.DeviceServiceStub(grpc.insecure_channel(downgrade.address))
        with pytest.raises(grpc.RpcError) as relayed:
            plain.Enroll(d.EnrollRequest(enrollment_token=net.token, hardware_id="x"), timeout=10)
        assert relayed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _route(net.main, downgrade.address)
        agent = net.agent("downgraded").start()
        _refused_to_enroll(net, agent)
        # Its TLS handshake met HTTP/2 in plain text, and it stopped there.
        assert "WRONG_VERSION_NUMBER" in agent.log()
        assert "does not speak TLS (started with --insecure?)" in agent.log()
        assert downgrade.count() == 1
    _enrolls_and_syncs(net, agent)


def test_an_enrolled_agent_told_insecure_still_never_talks_plain_text(net: Network) -> None:
    agent = net.agent("told-insecure").start()
    _enrolls_and_syncs(net, agent)
    assert agent.stop() == 0
    # Its config now says plain text, with no CA; its device port offers
    # plain text (relayed to the real main port for whoever speaks it).
    agent.config.update(insecure=True, ca_cert=None)
    with net.attacker(net.cp.address, tls=False) as downgrade:
        _route(net.device, downgrade.address)
        failed, seen = _count(_SYNC_FAILED, agent), len(agent.log())
        agent.start()
        agent.wait_for(lambda: _count(_SYNC_FAILED, agent) >= failed + 3, timeout=90)
        # TLS met plain text and stopped there; no plain text was tried.
        assert "WRONG_VERSION_NUMBER" in agent.log()[seen:]
        assert downgrade.count() == 0
        assert "PLAIN TEXT" not in agent.log()
    connected = agent.log().count("connected to")
    net.honest()
    agent.wait_for(lambda: agent.log().count("connected to") > connected, timeout=60)


class OldTls:
    """A TLS server that speaks only TLS 1.0 and 1.1 (what a downgrade
    offers), with a certificate the agent trusts; it counts handshakes
    tried and completed, and then closes."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cert.pem").write_bytes(cert_pem)
        (directory / "key.pem").write_bytes(key_pem)
        self.context = _old_tls(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        self.tried = self.completed = 0
        self.errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.tried += 1
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    self.completed += 1
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(str(exc))
            finally:
                conn.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(5)


def _old_tls(purpose: int) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the point of the exercise
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS < 1.2 otherwise
    return context


def test_a_server_offering_only_old_tls_gets_no_enrollment(net: Network) -> None:
    # A certificate from the fleet's own CA: the version is all that is wrong.
    engine = create_engine(sqlite_url(net.cp.data_dir))
    with engine.connect() as conn:
        ca_cert, ca_key = conn.execute(text(
            "SELECT certificate_pem, private_key_pem FROM certificate_authorities"
        )).one()  # fmt: skip
    engine.dispose()
    issued, key_pem = pki.issue_server_certificate(
        pki.Authority(bytes(ca_cert), bytes(ca_key)), ["127.0.0.1"], dt.datetime.now(dt.UTC)
    )
    old = OldTls(issued.certificate_pem, key_pem, net.root / "old-tls")
    try:
        # It is a working TLS 1.1 server that a client allowing 1.1 accepts.
        client = _old_tls(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cadata=net.cp.ca_file.read_text())
        host, _, port = old.address.rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.version() in ("TLSv1", "TLSv1.1")
        wait_for(lambda: old.completed == 1, timeout=10)

        _route(net.main, old.address)
        agent = net.agent("old-tls").start()
        _refused_to_enroll(net, agent)
        assert "TLSV1_ALERT_PROTOCOL_VERSION" in agent.log()
        assert old.tried >= 3 and old.completed == 1, old.errors
        # The agent offered nothing below TLS 1.2: no version in common.
        assert all("UNSUPPORTED_PROTOCOL" in error for error in old.errors), old.errors
    finally:
        old.close()
    _enrolls_and_syncs(net, agent)


# ================================================================ part 2: inside TLS


@dataclass
class World:
    """A plain-text control plane with built versions of one model, reached
    by agents only through a rewriting gRPC relay."""

    cp: ControlPlane
    op: Any
    token: str
    root: Path
    relay: GrpcRelay
    digests: dict[str, str]
    count: int = 0

    def agent(self) -> AgentProcess:
        """A new agent (not started) that reaches the control plane only
        through the relay; the caller closes it."""
        self.count += 1
        return AgentProcess(
            self.root / f"agent-{self.count}", self.relay.address, self.token,
            labels={"tier": CLASS}, telemetry_interval_s=60,
        )  # fmt: skip

    def start(self, agent: AgentProcess) -> str:
        agent.start()
        device_id = str(agent.wait_for(agent.identity, timeout=60)["device_id"])
        wait_for(lambda: self.op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name)
        return device_id

    def assign(self, device_id: str, version: str) -> int:
        (done,) = self.op.AssignModel(
            o.AssignModelRequest(device_ids=[device_id], model_name=MODEL, model_version=version)
        ).assignments
        return int(done.sequence)

    def install(self, agent: AgentProcess, device_id: str, version: str) -> int:
        sequence = self.assign(device_id, version)
        status = settled(self.op, device_id, sequence, model=MODEL)
        assert of_status(status) == "committed", status
        assert served(agent) == (version, self.digests[version])
        return sequence

    def refused(
        self, agent: AgentProcess, device_id: str, version: str,
        edit: Callable[[d.DesiredState], None],
    ) -> c.UpdateStatus:  # fmt: skip
        """The operator assigns `version`; the relay applies `edit` to what
        the control plane pushes for it. The agent must refuse it and say why
        to the control plane, still serving what it served, trusting what it
        trusted."""
        serving, trusted = served(agent), _trust(agent)
        assert isinstance(serving, tuple)
        floor = _current_sequence(self.op, device_id)
        sent: list[d.DesiredState] = []

        def rewrite(device: str, message: d.ControlMessage) -> d.ControlMessage:
            desired = message.desired
            newest = max((a.sequence for a in desired.assignments), default=0)
            if device != device_id or newest <= floor:
                return message
            edited = d.DesiredState.FromString(desired.SerializeToString())
            edit(edited)
            # The one-model copy edited alike: the message stays as
            # consistent as the control plane's own.
            edited.assignment.CopyFrom(_assignment(edited))
            sent.append(edited)
            return d.ControlMessage(desired=edited)

        self.relay.rewrite = rewrite
        try:
            self.assign(device_id, version)
            wait_for(lambda: sent, timeout=30)
            status = settled(self.op, device_id, _assignment(sent[-1]).sequence, model=MODEL)
        finally:
            self.relay.rewrite = None
        assert of_status(status) == "failed", status
        # What it serves, what it says it serves, what it trusts: unchanged.
        assert served(agent) == serving
        assert (status.active_model_version, status.active_artifact_digest) == serving
        assert _trust(agent) == trusted
        return status


def _current_sequence(op: Any, device_id: str) -> int:
    listed = op.ListDeployments(o.ListDeploymentsRequest(device_id=device_id)).assignments
    return max((a.sequence for a in listed), default=0)


def _json(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    assert isinstance(document, dict), path
    return document


def _trust(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """What the agent trusts: "device", the signing keys (state_dir/trust.json),
    and "model", the model's own facts (models/<model>/trust.json: the
    highest sequence verified for it, that statement's digest, the version
    committed)."""
    return {
        "device": _json(agent.state_dir / "trust.json"),
        "model": _json(agent.state_dir / "models" / MODEL / "trust.json"),
    }


def _assignment(desired: d.DesiredState) -> d.Assignment:
    """The device's one assignment, where an agent of protocol 2 reads it
    (DesiredState.assignments). The control plane copies a device's only
    assignment into the singular `assignment` too (for one-model agents):
    the relay edits this one and copies it there (World.refused)."""
    (only,) = desired.assignments
    return only


def _statement(desired: d.DesiredState) -> c.AssignmentStatement:
    return c.AssignmentStatement.FromString(_assignment(desired).statement)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("mitm-relay")
    cp = ControlPlane(root / "cp")
    cp.start()
    db = Database(make_engine(sqlite_url(cp.data_dir)))
    relay = GrpcRelay(cp.address).start()
    try:
        op = cp.operator()
        digests = publish_digits_versions(op, db, root, blob_dir=cp.data_dir / "blobs")
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="mitm")).secret
        yield World(cp, op, token, root, relay, digests)
    finally:
        relay.close()
        db.dispose()
        cp.close()


@pytest.fixture
def w(world: World) -> Iterator[World]:
    yield world
    world.relay.rewrite = None


@dataclass
class Victim:
    agent: AgentProcess
    device_id: str
    # The genuine push of its first assignment (1.0.0), captured by the relay.
    first: d.DesiredState


@pytest.fixture(scope="module")
def victim(world: World) -> Iterator[Victim]:
    """A device that installed 1.0.0 then 2.0.0 through the relay; every
    case below assigns it 3.0.0 and the relay tampers with the push."""
    agent = world.agent()
    try:
        device_id = world.start(agent)
        first = world.install(agent, device_id, "1.0.0")
        second = world.install(agent, device_id, "2.0.0")
        assert _trust(agent)["model"]["sequence"] == second
        yield Victim(agent, device_id, world.relay.pushed(device_id, first))
    finally:
        agent.close()


def _replay(v: Victim) -> Callable[[d.DesiredState], None]:
    def edit(desired: d.DesiredState) -> None:
        _assignment(desired).CopyFrom(_assignment(v.first))

    return edit


def _other_artifact(v: Victim, desired: d.DesiredState) -> None:
    """1.0.0's artifact and its genuinely signed manifest, for this assignment."""
    old = _assignment(v.first)
    a = _assignment(desired)
    a.artifact_digest, a.artifact_size = old.artifact_digest, old.artifact_size
    a.manifest, a.manifest_signature = old.manifest, old.manifest_signature


def _in_statement(change: Callable[[Victim, d.DesiredState, c.AssignmentStatement], None]
                  ) -> Callable[[Victim], Callable[[d.DesiredState], None]]:  # fmt: skip
    """An edit of the signed statement (and, to match it, the assignment),
    its signature kept."""

    def for_victim(v: Victim) -> Callable[[d.DesiredState], None]:
        def edit(desired: d.DesiredState) -> None:
            statement = _statement(desired)
            change(v, desired, statement)
            _assignment(desired).statement = statement.SerializeToString()

        return edit

    return for_victim


def _outside(change: Callable[[Victim, d.DesiredState], None]
             ) -> Callable[[Victim], Callable[[d.DesiredState], None]]:  # fmt: skip
    """An edit of the assignment outside its statement."""
    return lambda v: lambda desired: change(v, desired)


def _statement_version(v: Victim, desired: d.DesiredState, s: c.AssignmentStatement) -> None:
    s.model_version = _assignment(desired).model_version = "1.0.0"


def _statement_artifact(v: Victim, desired: d.DesiredState, s: c.AssignmentStatement) -> None:
    _other_artifact(v, desired)
    s.artifact_sha256 = _assignment(desired).artifact_digest
    s.manifest_sha256 = hashlib.sha256(_assignment(desired).manifest).hexdigest()


def _statement_shadow(v: Victim, desired: d.DesiredState, s: c.AssignmentStatement) -> None:
    s.shadow = _assignment(desired).shadow = True


def _statement_rollback(v: Victim, desired: d.DesiredState, s: c.AssignmentStatement) -> None:
    s.rollback = _assignment(desired).rollback = True


def _version_outside(v: Victim, desired: d.DesiredState) -> None:
    _assignment(desired).model_version = "1.0.0"


def _shadow_outside(v: Victim, desired: d.DesiredState) -> None:
    _assignment(desired).shadow = True


def _rollback_outside(v: Victim, desired: d.DesiredState) -> None:
    _assignment(desired).rollback = True


def _size(size: int) -> Callable[[Victim, d.DesiredState], None]:
    def change(v: Victim, desired: d.DesiredState) -> None:
        _assignment(desired).artifact_size = size

    return change


def _rollout_outside(v: Victim, desired: d.DesiredState) -> None:
    _assignment(desired).rollout_id = "a-rollout-the-relay-made-up"


UNTRUSTED = "assignment statement is not signed by a trusted key"
MISMATCH = "assignment does not match its signed statement: "
Edit = Callable[[Victim], Callable[[d.DesiredState], None]]
CASES = [
    pytest.param(
        _replay, "replayed assignment: sequence {first} is not newer than {current}",
        id="replayed-older-assignment",
    ),
    pytest.param(_in_statement(_statement_version), UNTRUSTED, id="statement-model-version"),
    pytest.param(_in_statement(_statement_artifact), UNTRUSTED, id="statement-artifact"),
    pytest.param(_in_statement(_statement_shadow), UNTRUSTED, id="statement-shadow"),
    pytest.param(_in_statement(_statement_rollback), UNTRUSTED, id="statement-rollback"),
    pytest.param(
        _outside(_version_outside), MISMATCH + "model version '1.0.0', the statement says '3.0.0'",
        id="outside-model-version",
    ),
    pytest.param(
        _outside(_other_artifact), MISMATCH + "artifact '{first_digest}'", id="outside-artifact"
    ),
    pytest.param(_outside(_shadow_outside), MISMATCH + "shadow True", id="outside-shadow"),
    pytest.param(_outside(_rollback_outside), MISMATCH + "rollback True", id="outside-rollback"),
    # The size and the rollout are in the statement since its format 2 (the
    # relay's rollout id was reported as sent before). Downloading comes
    # before Verifying, so a wrong size is refused by the download first:
    # it holds the size to the source's and to the free disk.
    pytest.param(
        _outside(_size(1)), "the source says the artifact has", id="outside-size-smaller"
    ),
    pytest.param(_outside(_size(2**50)), "disk full while downloading", id="outside-size-huge"),
    pytest.param(
        _outside(_rollout_outside), MISMATCH + "rollout id 'a-rollout-the-relay-made-up'",
        id="outside-rollout-id",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("make", "expected"), CASES)
def test_a_relay_cannot_replay_or_edit_what_was_signed(
    w: World, victim: Victim, make: Edit, expected: str
) -> None:
    current = _trust(victim.agent)["model"]["sequence"]
    # Refused, reported, and the version served before still served (refused()).
    status = w.refused(victim.agent, victim.device_id, "3.0.0", make(victim))
    reason = expected.format(
        first=_assignment(victim.first).sequence, current=current,
        first_digest=_assignment(victim.first).artifact_digest,
    )  # fmt: skip
    assert reason in status.reason, status.reason


def test_a_relay_cannot_forge_a_key_rotation(w: World, victim: Victim) -> None:
    (trusted,) = _trust(victim.agent)["device"]["keys"]
    evil_id, evil, evil_public = signing.generate()

    def forge(desired: d.DesiredState) -> None:
        # "The trusted key was replaced by evil", signed by evil, and the
        # assignment (statement and manifest) signed by evil too.
        link = statements.rotation_statement(
            previous_key_id=trusted, key_id=evil_id, public_key=evil_public,
            rotated_at=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        desired.key_rotations.add(statement=link, signature=signing.sign(evil, link))
        statement = _statement(desired)
        statement.key_id = evil_id
        a = _assignment(desired)
        a.statement = statement.SerializeToString()
        a.statement_signature = signing.sign(evil, a.statement)
        a.manifest_signature = signing.sign(evil, a.manifest)

    status = w.refused(victim.agent, victim.device_id, "3.0.0", forge)
    assert f"names trusted key {trusted} but is not signed by a trusted key (forged)" in (
        status.reason
    ), status.reason


def test_a_relay_cannot_swap_in_another_devices_statement(w: World) -> None:
    a, b = w.agent(), w.agent()
    try:
        a_id, b_id = w.start(a), w.start(b)
        w.install(a, a_id, "1.0.0")
        w.install(b, b_id, "1.0.0")
        # B's genuine, correctly signed assignment of 3.0.0: sequence 2, as A's next.
        b_sequence = w.install(b, b_id, "3.0.0")
        theirs = w.relay.pushed(b_id, b_sequence)

        def swap(desired: d.DesiredState) -> None:
            _assignment(desired).CopyFrom(_assignment(theirs))
            del desired.key_rotations[:]
            desired.key_rotations.extend(theirs.key_rotations)

        status = w.refused(a, a_id, "2.0.0", swap)
        assert status.sequence == b_sequence == _current_sequence(w.op, a_id)
        assert f"assignment statement is for device {b_id!r}, this is {a_id!r}" in status.reason
        assert served(a) == ("1.0.0", w.digests["1.0.0"])
        # B, whose statement it was, is untouched.
        assert served(b) == ("3.0.0", w.digests["3.0.0"])
    finally:
        a.close()
        b.close()


def test_rotations_reordered_or_withheld_are_refused_and_the_genuine_chain_is_taken(
    w: World, victim: Victim
) -> None:
    (k0,) = _trust(victim.agent)["device"]["keys"]
    k1 = w.op.RotateSigningKey(o.RotateSigningKeyRequest(reason="mitm 1")).new_key.key_id
    k2 = w.op.RotateSigningKey(o.RotateSigningKeyRequest(reason="mitm 2")).new_key.key_id
    seen: list[list[str]] = []

    def reorder(desired: d.DesiredState) -> None:
        chain = list(desired.key_rotations)
        seen.append([c.KeyRotationStatement.FromString(r.statement).key_id for r in chain])
        del desired.key_rotations[:]
        desired.key_rotations.extend(reversed(chain))

    status = w.refused(victim.agent, victim.device_id, "3.0.0", reorder)
    assert seen[-1][-2:] == [k1, k2]  # the genuine chain ends k0 -> k1 -> k2
    assert UNTRUSTED in status.reason, status.reason

    def withhold(desired: d.DesiredState) -> None:
        del desired.key_rotations[:]

    status = w.refused(victim.agent, victim.device_id, "3.0.0", withhold)
    assert UNTRUSTED in status.reason, status.reason
    assert set(_trust(victim.agent)["device"]["keys"]) == {k0}

    # The same agent takes the genuine chain, in order, and the update.
    w.install(victim.agent, victim.device_id, "3.0.0")
    assert set(_trust(victim.agent)["device"]["keys"]) == {k2}


def test_an_agent_with_a_ca_pointed_at_a_plain_text_control_plane_does_not_enroll(
    w: World, network: Network, tmp_path: Path
) -> None:
    # The relay's control plane serves plain text (--insecure); the agent
    # has a CA certificate, so it must speak TLS or nothing.
    agent = AgentProcess(tmp_path / "agent", w.cp.address, w.token,
                         ca_cert=str(network.cp.ca_file))  # fmt: skip
    try:
        agent.start()
        agent.wait_for(lambda: _count(_ENROLL_FAILED, agent) >= 3, timeout=90)
        assert agent.identity() is None and "PLAIN TEXT" not in agent.log()
        assert "WRONG_VERSION_NUMBER" in agent.log()
        listed = w.op.ListDevices(o.ListDevicesRequest()).devices
        assert agent.hardware_id not in {device.hardware_id for device in listed}
    finally:
        agent.close()
