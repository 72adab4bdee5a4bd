"""Artifacts offloaded to a mirror: Debian's nginx serving a directory that
`edgefleet artifacts export` filled, named to agents with
`edgefleet server --artifact-mirror`, and a device class's own mirror
before it (`edgefleet classes update --artifact-mirror`). A real agent
installs from them; when a mirror hangs, has no such file or serves other
bytes, the agent leaves it (the signed digest is checked whatever the
source) and installs from the control plane. The class's download rate
cap holds."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.update.rate_limit import BURST_S
from edgefleet.polling import wait_for
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit import fault_scenarios as fs
from testkit.harness import ADMIN_TOKEN, ControlPlane

pytestmark = pytest.mark.timeout(300)

NGINX = Path("/usr/sbin/nginx")
# Every download first meets a mirror that accepts and never answers: the
# agent leaves it after this long without a byte.
STALL_S = 2


@dataclass
class Mirror:
    port: int
    directory: Path
    log: Path

    def requests(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    if not NGINX.exists():
        pytest.skip(f"no nginx at {NGINX} (scripts/setup.sh installs Debian's)")
    root = tmp_path_factory.mktemp("nginx")
    # Accepts connections (the kernel's backlog) and never answers.
    blackhole = socket.create_server(("127.0.0.1", 0))
    port = _free_port()
    (root / "blobs").mkdir()
    # As root, nginx's workers would drop to nobody, who cannot read the
    # test's private temporary directories.
    (root / "conf").write_text(f"""
worker_processes 1;
{"user root;" if os.geteuid() == 0 else ""}
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp; uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location /blobs/ {{ alias {root}/blobs/; }}
        location /hang/ {{
            proxy_pass http://127.0.0.1:{blackhole.getsockname()[1]};
            proxy_read_timeout 1h;
        }}
    }}
}}
""")
    process = subprocess.Popen(
        [str(NGINX), "-p", str(root), "-c", str(root / "conf"), "-e", str(root / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def listening() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(root / 'error.log').read_text()}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 30, what="nginx")
        yield Mirror(port, root / "blobs", root / "access.log")
    finally:
        process.terminate()
        process.wait(15)
        blackhole.close()


@pytest.fixture(scope="module")
def rig(mirror: Mirror, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fs.AgentRig]:
    root = tmp_path_factory.mktemp("mirrored")
    cp = ControlPlane(
        root / "cp", None, "--artifact-mirror", f"http://127.0.0.1:{mirror.port}/blobs/"
    )
    cp.start()
    try:
        op = cp.operator()
        fs.create_classes(op, {"here": platform.machine()})
        # The class's own mirror (a site's, which hangs) before the server's.
        said = _edgefleet(
            cp, "classes", "update", "here", "--artifact-mirror",
            f"http://127.0.0.1:{mirror.port}/hang/",
        )  # fmt: skip
        # Stored without the trailing /.
        assert re.search(rf"^mirrors +http://127\.0\.0\.1:{mirror.port}/hang *$", said, re.M), said
        models = {
            v: fs.mlp_model(root / "models" / f"{v}.onnx", hidden=400 + i, seed=i)
            for i, v in enumerate(("1.0.0", "2.0.0", "3.0.0"))
        }
        digests = fs.publish_versions(cp, models)
        sizes = {v: p.stat().st_size for v, p in models.items()}
        yield fs.AgentRig(cp, fs.enrollment_token(op, "agents"), digests, sizes, root)
    finally:
        cp.close()


def _edgefleet(cp: ControlPlane | None, *args: str) -> str:
    """The CLI as an operator runs it (against `cp` when given)."""
    server = ["--server", cp.address, "--token", ADMIN_TOKEN] if cp is not None else []
    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), *server, *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _export(rig: fs.AgentRig, directory: Path) -> str:
    return _edgefleet(
        None, "artifacts", "export", str(directory), "--data-dir", str(rig.cp.data_dir)
    )


def test_an_agent_installs_from_the_mirror_and_from_the_control_plane_when_it_fails(
    rig: fs.AgentRig, mirror: Mirror, tmp_path: Path
) -> None:
    said = _export(rig, mirror.directory)
    assert "3 written, 0 replaced (wrong bytes), 0 already there" in said, said
    d1, d2, d3 = (rig.digests[v] for v in ("1.0.0", "2.0.0", "3.0.0"))
    for digest in (d1, d2, d3):
        exported = mirror.directory / digest
        assert hashlib.sha256(exported.read_bytes()).hexdigest() == digest
    # Again: nothing to write; a copy with wrong bytes is replaced.
    (mirror.directory / d1).write_bytes(b"torn")
    assert "0 written, 1 replaced (wrong bytes), 2 already there" in _export(rig, mirror.directory)
    # The mirror's faults: 2.0.0's file holds other bytes of the same size,
    # 3.0.0's is missing (404).
    (mirror.directory / d2).write_bytes(os.urandom(rig.sizes["2.0.0"]))
    (mirror.directory / d3).unlink()

    agent = rig.agent("agent", download_stall_s=STALL_S)
    agent.start()
    try:
        device_id = rig.device_id(agent)
        cp_url = f"{rig.cp.http_url}/v1/artifacts"
        for version, digest in (("1.0.0", d1), ("2.0.0", d2), ("3.0.0", d3)):
            status = rig.settled(agent, device_id, rig.assign(device_id, version))
            assert fs.of_status(status) == "committed", (version, status.reason, agent.log())
            rig.serving(agent, version)
            installed = agent.state_dir / "downloads" / digest
            assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest
            # Every download met the hanging mirror first and left it.
            assert f"/hang/{digest}: ReadTimeout" in agent.log(), agent.log()
        log = agent.log()
        # 1.0.0 came from the mirror alone.
        assert f'GET /blobs/{d1} HTTP/1.1" 200' in mirror.requests()
        assert f"{cp_url}/{d1}" not in log
        # 2.0.0: the mirror's bytes did not match the signed digest; the
        # agent said so, left the mirror and took the control plane's.
        assert f'GET /blobs/{d2} HTTP/1.1" 200' in mirror.requests()
        assert "sha256 mismatch" in log
        assert f"from mirror http://127.0.0.1:{mirror.port}/blobs" in log
        assert f"downloading {cp_url}/{d2} from byte 0" in log
        # 3.0.0: 404 at the mirror, then the control plane.
        assert f'GET /blobs/{d3} HTTP/1.1" 404' in mirror.requests()
        assert f"downloading {cp_url}/{d3} from byte 0" in log
        left = [p.name for p in (agent.state_dir / "downloads").iterdir() if p.suffix == ".part"]
        assert left == []
    finally:
        agent.close()


def test_the_class_download_cap_holds_and_a_lower_agent_cap_wins(
    rig: fs.AgentRig, tmp_path: Path
) -> None:
    """A metered site: the class caps each download, and the rates the
    device reports while downloading stay under it. The mirror has none of
    these versions (404), so the bytes come from the control plane, which
    serves as fast as it can: uncapped, 2.4 MB take milliseconds."""
    models = {
        v: fs.mlp_model(tmp_path / f"{v}.onnx", hidden=8000 + i, seed=10 + i)
        for i, v in enumerate(("4.0.0", "5.0.0"))
    }
    rig.digests.update(fs.publish_versions(rig.cp, models))
    shown = _edgefleet(rig.cp, "classes", "update", "here", "--max-download-rate", "1M")
    assert "1.0 MiB/s" in shown, shown
    agent = rig.agent("capped", download_stall_s=STALL_S)
    agent.start()
    try:
        device_id = rig.device_id(agent)
        op = rig.cp.operator()
        for version, limit in (("4.0.0", 1024 * 1024), ("5.0.0", 512 * 1024)):
            if version == "5.0.0":
                # The device's owner set a lower cap of its own: it wins.
                agent.stop()
                agent.config["max_download_rate"] = limit
                agent.start()
            size = models[version].stat().st_size
            started = time.monotonic()
            sequence = rig.assign(device_id, version)
            rates: list[int] = []

            def settled(
                sequence: int = sequence, rates: list[int] = rates
            ) -> c.UpdateStatus | None:
                u = op.GetDevice(o.GetDeviceRequest(id=device_id), timeout=5).update
                if u.sequence != sequence:
                    return None
                if u.download_rate:
                    rates.append(u.download_rate)
                return u if fs.of_status(u) in ("committed", "failed") else None

            status = wait_for(settled, 120, interval=0.2, what=f"{version} settled")
            took = time.monotonic() - started
            assert fs.of_status(status) == "committed", (version, status.reason, agent.log())
            # After the class's hanging mirror (STALL_S), the bytes at the cap
            # (less a bucketful, BURST_S, that may go at once).
            assert took >= STALL_S + size / limit * 0.9 - BURST_S, (version, took, size)
            # As reported every half second while it downloads: a bucketful
            # may land in one report, the rest keeps to the cap.
            rates.sort()
            assert rates and rates[len(rates) // 2] <= limit * 1.15, (version, rates)
            assert rates[-1] <= limit * 2, (version, rates)
    finally:
        agent.close()
        _edgefleet(rig.cp, "classes", "update", "here", "--clear", "max-download-rate")
