"""The control plane's process and the messages it lets out, attacked as in
issue 18 (findings 6, 9 and 12), against a real `edgefleet server --tls`:

- key material on disk: the data dir 0700 and every file in it 0600, the
  database's WAL and shared memory included, though the server was started
  under umask 022 with a data dir an earlier version left readable;
- idle connections: hundreds of TCP connections that send nothing or half a
  ClientHello, more than the soft open-file limit the server was started
  with, are closed at the handshake bound while an operator call is
  answered at once;
- error text: a malformed model upload names no server path, a failing SQL
  statement leaves no credential hash in the log, and the CLI says which side
  speaks TLS when the two disagree."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import resource
import select
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.domain import pki
from edgefleet.controlplane.server import HANDSHAKE_TIMEOUT_MS
from edgefleet.demo.models import mlp_graph
from edgefleet.v1 import operator_pb2 as o
from testkit.harness import ControlPlane, env_without_proxy, wait_for

pytestmark = pytest.mark.timeout(300)

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
HANDSHAKE_S = HANDSHAKE_TIMEOUT_MS / 1000
# Below what the attack opens: without raising it the server could not
# accept them all, and an operator's connection would find no descriptor.
LOW_SOFT_LIMIT = 256
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def launch(cp: ControlPlane, *, soft_nofile: int | None = None, admin_token: bool = True) -> None:
    """Start `cp` as harness.ControlPlane.start does (with --tls), but as a
    careless service unit would: umask 022 and, given `soft_nofile`, a low
    soft open-file limit (the hard one unchanged). Its log goes outside
    the data dir, whose every file the tests inspect."""

    port_file = cp.data_dir / "port"
    cmd = [
        EDGEFLEET, "server", "--data-dir", str(cp.data_dir), "--listen", "127.0.0.1:0",
        "--port-file", str(port_file), "--tls", "--device-listen", "127.0.0.1:0",
        "--build-workers", "0",
        *(["--admin-token", cp.admin_token] if admin_token else []),
        *(["--db", cp.db_url] if cp.db_url else []),
    ]  # fmt: skip
    if soft_nofile is not None:
        # The shell lowers the limit and execs the server. A preexec_fn would
        # run Python in the forked child of this process, whose gRPC threads
        # do not survive the fork: once it aborted the child (epoll_wait on
        # a descriptor gone, SIGABRT) before the server even started.
        cmd = ["sh", "-c", 'ulimit -Sn "$0" && exec "$@"', str(soft_nofile), *cmd]
    log = open(cp.log_path, "ab")  # noqa: SIM115 - owned by the child
    cp.proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, umask=0o022, env=env_without_proxy()
    )
    proc = cp.proc
    wait_for(lambda: port_file.exists() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, cp.log()
    cp.port = int(port_file.read_text())
    cp.device_port = int((cp.data_dir / "device-port").read_text())
    cp.tls = True
    if not admin_token:
        cp.admin_token = (cp.data_dir / "admin-token").read_text().strip()
    with cp.channel() as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp")
    plane.log_path = tmp_path / "server.log"
    try:
        yield plane
    finally:
        plane.close()


@pytest.fixture(scope="module")
def tls_cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("tls") / "cp", tls=True)
    plane.start()
    try:
        yield plane
    finally:
        plane.close()


def _model_file(out: Path) -> Path:
    rng = np.random.default_rng(0)
    onnx.save(mlp_graph([rng.normal(size=(64, 10))], [rng.normal(size=10)], opset=17),
              out / "model.onnx")  # fmt: skip
    return out / "model.onnx"


def edgefleet(*args: str, server: str, token: str, ca_cert: Path | None = None
              ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The console script as an operator runs it, settings from the environment."""
    env = env_without_proxy()
    env.pop("EDGEFLEET_CA_CERT", None)
    env.update(EDGEFLEET_SERVER=server, EDGEFLEET_TOKEN=token, COLUMNS="200")
    if ca_cert is not None:
        env["EDGEFLEET_CA_CERT"] = str(ca_cert)
    result = subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


# ---------------------------------------------------------------- finding 6


@pytest.mark.parametrize("backend", ["embedded", "postgresql"])
def test_data_dir_and_every_file_in_it_are_private(
    backend: str, hostile: ControlPlane, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # What an earlier version left: a world-readable data dir and database.
    (hostile.data_dir / "blobs").mkdir(parents=True, mode=0o755)
    hostile.data_dir.chmod(0o755)
    if backend == "embedded":
        (hostile.data_dir / "edgefleet.db").touch(mode=0o644)  # an empty SQLite database
    else:
        hostile.db_url = request.getfixturevalue("pg_url")
    launch(hostile, admin_token=False)

    pushed = edgefleet(
        "models", "push", "digits", "1.0.0", str(_model_file(tmp_path)),
        server=hostile.address, token=hostile.admin_token, ca_cert=hostile.ca_file,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr

    assert hostile.proc is not None
    status = Path(f"/proc/{hostile.proc.pid}/status").read_text()
    assert re.search(r"^Umask:\s+0077$", status, re.M), status
    found = {p.relative_to(hostile.data_dir).as_posix(): p.lstat().st_mode
             for p in [hostile.data_dir, *hostile.data_dir.rglob("*")]}  # fmt: skip
    expected = {".", "admin-token", "ca.pem", "port", "device-port", "blobs"}
    if backend == "embedded":
        expected |= {"edgefleet.db", "edgefleet.db-wal", "edgefleet.db-shm"}
    assert expected <= found.keys(), sorted(found)
    assert any(name.startswith("blobs/sha256/") for name in found), sorted(found)  # the push
    loose = {
        name: oct(stat.S_IMODE(mode))
        for name, mode in found.items()
        if stat.S_IMODE(mode) != (0o700 if stat.S_ISDIR(mode) else 0o600)
    }
    assert loose == {}


# ---------------------------------------------------------------- finding 9


def _half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello: a handshake that never ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello[: len(hello) // 2]


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _nofile_limits(pid: int) -> tuple[int, int]:
    line = next(
        line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    )  # fmt: skip
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def _wait_closed(socks: list[socket.socket], timeout: float) -> float:
    """Seconds until the server closed every one of `socks` (end of file or
    reset); fails if some are still open after `timeout`."""
    started = time.monotonic()
    waiting = set(socks)
    while waiting and time.monotonic() - started < timeout:
        readable, _, _ = select.select(list(waiting), [], [], 1.0)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except ConnectionError:
                data = b""
            if not data:  # the server says nothing to a stranger, it hangs up
                waiting.discard(sock)
    assert not waiting, f"{len(waiting)} of {len(socks)} connections still open after {timeout}s"
    return time.monotonic() - started


def test_idle_and_half_handshake_connections_are_closed_and_operators_served(
    hostile: ControlPlane,
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2 * LOW_SOFT_LIMIT:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise to")
    launch(hostile, soft_nofile=LOW_SOFT_LIMIT)
    assert hostile.proc is not None
    pid = hostile.proc.pid
    soft, server_hard = _nofile_limits(pid)
    assert soft == server_hard > LOW_SOFT_LIMIT
    assert f"raised the open-file limit from {LOW_SOFT_LIMIT}" in hostile.log()
    before = _open_files(pid)

    half = _half_client_hello()
    socks: list[socket.socket] = []
    try:
        for i in range(300):  # the operator port, which asks for no certificate
            sock = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
            if i % 3 == 0:
                sock.sendall(half)
            socks.append(sock)
        for i in range(60):  # and the devices' mutual-TLS port
            sock = socket.create_connection(("127.0.0.1", hostile.device_port), timeout=10)
            if i % 3 == 0:
                sock.sendall(half)
            socks.append(sock)
        # The server accepted more of them than its soft limit let it hold.
        wait_for(lambda: _open_files(pid) >= len(socks) > LOW_SOFT_LIMIT, timeout=30)

        started = time.monotonic()
        listed = hostile.operator().ListDevices(o.ListDevicesRequest(), timeout=10)
        answered_s = time.monotonic() - started
        assert list(listed.devices) == []
        assert answered_s < 5, f"an operator call took {answered_s:.1f}s under the attack"

        closed_s = _wait_closed(socks, timeout=HANDSHAKE_S + 30)
        assert closed_s < HANDSHAKE_S + 30
    finally:
        for sock in socks:
            sock.close()
    # Their descriptors are the server's again; it serves on.
    wait_for(lambda: _open_files(pid) <= before + 10, timeout=30)
    hostile.operator().ListDevices(o.ListDevicesRequest(), timeout=10)
    assert "Too many open files" not in hostile.log()


# ---------------------------------------------------------------- finding 12


def test_cli_without_ca_at_a_tls_server_says_it_serves_tls(tls_cp: ControlPlane) -> None:
    result = edgefleet("devices", "ls", server=tls_cp.address, token=tls_cp.admin_token)
    assert result.returncode == 1
    assert "serves TLS" in result.stderr
    assert "--ca-cert" in result.stderr and "EDGEFLEET_CA_CERT" in result.stderr
    assert "Socket closed" not in result.stderr
    # The advice works.
    fixed = edgefleet("devices", "ls", server=tls_cp.address, token=tls_cp.admin_token,
                      ca_cert=tls_cp.ca_file)  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr


def test_cli_with_ca_at_a_plain_text_server_says_it_does_not_speak_tls(
    control_plane: ControlPlane, tls_cp: ControlPlane
) -> None:
    result = edgefleet("devices", "ls", server=control_plane.address,
                       token=control_plane.admin_token, ca_cert=tls_cp.ca_file)  # fmt: skip
    assert result.returncode == 1
    assert "does not speak TLS" in result.stderr
    assert "--ca-cert" in result.stderr and "EDGEFLEET_CA_CERT" in result.stderr
    assert "WRONG_VERSION_NUMBER" not in result.stderr.splitlines()[-1]


def test_cli_with_another_fleets_ca_says_the_certificate_does_not_verify(
    tls_cp: ControlPlane, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(pki.new_authority("another fleet", dt.datetime.now(dt.UTC)).certificate_pem)
    result = edgefleet("devices", "ls", server=tls_cp.address, token=tls_cp.admin_token,
                       ca_cert=other)  # fmt: skip
    assert result.returncode == 1
    assert f"{other} does not verify" in result.stderr
    assert "ca.pem" in result.stderr


def test_cli_with_a_ca_file_that_is_no_certificate_says_so(
    tls_cp: ControlPlane, tmp_path: Path
) -> None:
    not_a_cert = tmp_path / "token.txt"
    not_a_cert.write_text("efo_0123.secret\n")
    result = edgefleet("devices", "ls", server=tls_cp.address, token=tls_cp.admin_token,
                       ca_cert=not_a_cert)  # fmt: skip
    assert result.returncode == 1
    assert (
        f"not a PEM certificate: pass the ca.pem from the control plane's data directory: "
        f"{not_a_cert}" in result.stderr
    )
    assert "handshaker" not in result.stderr


def test_cli_at_nothing_keeps_the_connection_error(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    result = edgefleet("devices", "ls", server=address, token="x")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr and "TLS" not in result.stderr


def test_malformed_model_upload_names_no_server_path(tls_cp: ControlPlane) -> None:
    garbage = b"\x08\x07not an onnx model at all" * 10
    header = o.PushModelHeader(
        model_name="leaky", version="1.0.0",
        parts=[o.PartDeclaration(part=o.MODEL_PART_MODEL, size_bytes=len(garbage),
                                 sha256=hashlib.sha256(garbage).hexdigest())],
    )  # fmt: skip
    requests = [
        o.PushModelRequest(header=header),
        o.PushModelRequest(chunk=o.PushModelChunk(part=o.MODEL_PART_MODEL, data=garbage)),
    ]
    op = tls_cp.operator()
    with pytest.raises(grpc.RpcError) as refused:
        op.PushModel(iter(requests), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert details.startswith("not a valid ONNX model: "), details
    for leak in (str(tls_cp.data_dir), "/", "upload-", "blobs", "tmp"):
        assert leak not in details, details
    # Nothing stayed behind: no model, no spooled upload.
    assert "leaky" not in {m.name for m in op.ListModels(o.ListModelsRequest()).models}
    assert list((tls_cp.data_dir / "blobs" / "tmp").iterdir()) == []


def test_failing_sql_statement_leaves_no_hash_in_the_log(db_url: str, tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", db_url)
    cp.start()
    try:
        # The database refuses the next token (a full disk, a trigger an
        # administrator added): the statement fails with the secret's hash
        # among its parameters.
        engine = create_engine(db_url)
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.execute(text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON enrollment_tokens "
                    "BEGIN SELECT RAISE(ABORT, 'could not extend file'); END"
                ))  # fmt: skip
            else:
                conn.execute(text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'could not extend file'; END $$"
                ))  # fmt: skip
                conn.execute(text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON enrollment_tokens "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                ))  # fmt: skip
        op = cp.operator()
        with pytest.raises(grpc.RpcError) as failed:
            op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="line-secret-name"))
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "/" not in (failed.value.details() or "")
        wait_for(lambda: "INSERT INTO enrollment_tokens" in cp.log())
        log = cp.log()
        assert "could not extend file" in log  # the failure is logged, with its statement
        assert HEX_DIGEST.search(log) is None, HEX_DIGEST.search(log)
        assert "line-secret-name" not in log  # nor any other parameter

        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse" + ("" if engine.dialect.name == "sqlite"
                                                       else " ON enrollment_tokens")))  # fmt: skip
        engine.dispose()
        created = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="after"))
        assert created.secret
        names = [t.name for t in op.ListEnrollmentTokens(o.ListEnrollmentTokensRequest()).tokens]
        assert names == ["after"]  # the failed one left no row
    finally:
        cp.close()


def _server_with_a_port_taken(
    tmp_path: Path, *args: str
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """`edgefleet server` run with `args`, where "{taken}" is an address a
    listening socket already holds; returns that address and the run."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [EDGEFLEET, "server", "--insecure", "--data-dir", str(tmp_path / "cp"),
             "--admin-token", "t" * 40, *(a.format(taken=address) for a in args)],
            capture_output=True, text=True, timeout=120, env=env_without_proxy(),
        )  # fmt: skip
    return address, result


def test_a_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    address, result = _server_with_a_port_taken(tmp_path, "--listen", "{taken}")
    assert result.returncode == 1
    assert f"error: cannot listen on {address} (in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_metrics_port_in_use_stops_the_start_naming_it(tmp_path: Path, workers: int) -> None:
    address, result = _server_with_a_port_taken(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "{taken}",
        "--workers",
        str(workers),
    )
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on {address} (in use" in result.stderr
    assert "Traceback" not in result.stderr


def _server_usage(tmp_path: Path, *args: str) -> Result:
    """`edgefleet server ARGS` in this process, expected to stop at a usage
    error before anything is made (so it never serves here)."""
    result = CliRunner().invoke(cli, ["server", "--data-dir", str(tmp_path / "cp"), *args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert not (tmp_path / "cp").exists()  # refused before anything was made
    return result


NOT_HOST_PORT = "is not host:port with a port from 0 to 65535"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--listen", "garbage", NOT_HOST_PORT),
        ("--metrics-listen", "127.0.0.1:99999", NOT_HOST_PORT),
        ("--metrics-listen", "127.0.0.1", NOT_HOST_PORT),
        ("--device-listen", "127.0.0.1:x", NOT_HOST_PORT),
        ("--device-advertise", "a b:7444", NOT_HOST_PORT),
        ("--device-advertise", "cp.example.com:0", "agents cannot reach port 0"),
        ("--artifact-http-listen", "nope", NOT_HOST_PORT),
        ("--artifact-http-listen", "http://127.0.0.1:7445", NOT_HOST_PORT),
    ],
)
def test_an_address_that_is_not_host_port_is_a_usage_error(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    result = _server_usage(tmp_path, "--insecure", option, value)
    assert f"Invalid value for '{option}'" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--insecure", "--listen", "127.0.0.1:65535"],
         "--listen's port + 2 (65537) is past 65535: give --artifact-http-listen (or off)"),
        (["--listen", "127.0.0.1:65535", "--artifact-http-listen", "off"],
         "--listen's port + 1 (65536) is past 65535: give --device-listen"),
        (["--insecure", "--metrics-listen", "127.0.0.1:65535", "--workers", "2"],
         "with --workers 2 the metrics ports run to 65536, past 65535"),
    ],
)  # fmt: skip
def test_a_port_derived_past_65535_is_a_usage_error(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _server_usage(tmp_path, *args)
    assert message in result.stderr, result.stderr


def test_workers_name_a_listen_host_that_does_not_resolve(tmp_path: Path) -> None:
    result = subprocess.run(
        [EDGEFLEET, "server", "--insecure", "--data-dir", str(tmp_path / "cp"),
         "--listen", "nosuchhost.invalid:0", "--workers", "2"],
        capture_output=True, text=True, timeout=60, env=env_without_proxy(),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "cannot listen on nosuchhost.invalid:0: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_listen_off_serves_without_metrics(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--metrics-listen", "off")
    cp.start()
    try:
        names = cp.operator().ListEnrollmentTokens(o.ListEnrollmentTokensRequest()).tokens
        assert list(names) == []
    finally:
        cp.close()
