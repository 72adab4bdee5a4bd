"""Artifact delivery benchmark: a rollout of a large artifact to N simulated
devices that download it for real, from the control plane and then from an
nginx mirror, in one run.

1. A `--size-mb` random artifact is published for one device class
   (aarch64, ONNX Runtime) through an in-process control plane with no
   build workers (bench_download.publish_artifact), then that server stops;
2. **from the control plane**: `edgefleet server` on that data dir; a
   fleet of `--devices` fleetsim agents (one class, quick installs) with
   `download=True`, so every device GETs the artifact over HTTP from the
   control plane's artifact endpoint (its assignment's source) and checks
   its sha256 before it reports committed; a one-stage rollout to all of
   them, timed from StartRollout to the last device committed (device side);
3. **from a mirror**: `edgefleet artifacts export` fills a directory, Debian's
   nginx (one worker, sendfile on) serves it, the control plane restarts
   with `--artifact-mirror`, and a fresh fleet (new devices) takes the same
   rollout.

Printed per path: wall time, GiB delivered and verified, the sources the
devices used, CPU seconds of the control plane, of nginx and of this
process (the fleet, which hashes every byte), and the mirror's figures as a
ratio to the control plane's.

    python -m bench.bench_delivery                     # 1,000 devices, 50 MB
    python -m bench.bench_delivery --devices 200 --size-mb 20
    python -m bench.bench_delivery --smoke             # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.bench_download import ARCH, CLASS_NAME, MODEL_NAME, MODEL_VERSION, publish_artifact
from bench.common import (
    ADMIN_TOKEN,
    clean_env,
    cpu_seconds,
    edgefleet_command,
    read_port,
    server_command,
)
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.polling import wait_for
from edgefleet.sim import Fleet, parse_profile
from edgefleet.v1 import operator_pb2, operator_pb2_grpc

NGINX = Path("/usr/sbin/nginx")
MIB = 1024 * 1024


def _profile() -> Any:
    return parse_profile({
        "heartbeat_interval_s": 30, "telemetry_interval_s": 300,
        "classes": [{
            "name": "arm", "hardware": {"arch": ARCH, "memory_mb": 4096, "cpu_cores": 4},
            "install_s": [0.05, 0.1], "fail_rate": 0.0,
        }],
    })  # fmt: skip


def _start_cp(data: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = data / "bench.port"
    port_file.unlink(missing_ok=True)
    command = [*server_command(data, port_file, build_workers=0, heartbeat_s=30), *extra]
    with (data / "server.log").open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    port = wait_for(lambda: read_port(port_file), 120, what="the control plane to listen")
    return proc, f"127.0.0.1:{port}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _start_nginx(root: Path, blobs: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(f"""
worker_processes 1; {user} daemon off; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
    client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
    server {{ listen 127.0.0.1:{port} backlog=4096; location /blobs/ {{ alias {blobs}/; }} }}
}}
""")
    proc = subprocess.Popen(
        [str(NGINX), "-p", str(root), "-c", str(root / "nginx.conf"),
         "-e", str(root / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def up() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, 30, what="nginx")
    return proc, port


async def _rollout(address: str, devices: int, prefix: str, args: argparse.Namespace,
                   servers: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """A fleet of `devices` (new ones, named by `prefix`), one rollout of
    the artifact to all of them; its figures."""
    channel = grpc.aio.insecure_channel(address)
    op = operator_pb2_grpc.OperatorServiceStub(channel)
    admin = bearer_metadata(ADMIN_TOKEN)
    token = (await op.CreateEnrollmentToken(
        operator_pb2.CreateEnrollmentTokenRequest(name=prefix), metadata=admin
    )).secret  # fmt: skip
    fleet = Fleet(address, token, _profile(), devices, prefix=prefix, download=True,
                  connect_concurrency=50, rpc_timeout_s=60)  # fmt: skip
    try:
        await fleet.start(timeout_s=args.timeout_s)
        spec = operator_pb2.RolloutSpec(model_name=MODEL_NAME, model_version=MODEL_VERSION,
                                        class_names=[CLASS_NAME])  # fmt: skip
        spec.stages.add(name="all", percent=100)
        created = await op.CreateRollout(operator_pb2.CreateRolloutRequest(spec=spec),
                                         metadata=admin, timeout=120)  # fmt: skip
        cpu0 = {name: cpu_seconds(pid, tree=True) for name, pid in servers.items()}
        fleet_cpu0, t0 = time.process_time(), time.monotonic()
        await op.StartRollout(operator_pb2.RolloutActionRequest(id=created.rollout.id),
                              metadata=admin)  # fmt: skip

        def done(f: Fleet) -> bool:
            return sum(a.models.get(MODEL_NAME) is not None and str(a.models[MODEL_NAME].state)
                       == "committed" for a in f.agents) == devices  # fmt: skip

        await fleet.wait_until(done, args.timeout_s)
        wall = time.monotonic() - t0
        stats = fleet.ctx.stats
        return {
            "devices": devices, "wall_s": wall, "downloads": stats.downloads,
            "gib": stats.download_bytes / 1024**3, "sources": dict(stats.download_sources),
            "errors": dict(stats.errors),
            "cpu_s": {n: cpu_seconds(pid, tree=True) - cpu0[n] for n, pid in servers.items()},
            "fleet_cpu_s": time.process_time() - fleet_cpu0,
        }  # fmt: skip
    finally:
        await fleet.stop()
        await channel.close(None)


def _report(label: str, r: dict[str, Any]) -> None:
    cpu = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in r["cpu_s"].items())
    print(f"| {label} | {r['devices']:,} | {r['wall_s']:.1f} | {r['gib']:.2f} | "
          f"{r['gib'] * 1024 / r['wall_s']:,.0f} | {cpu} | {r['fleet_cpu_s']:.1f} | "
          f"{r['sources']} | {r['errors'] or 'none'} |", flush=True)  # fmt: skip


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="edgefleet-delivery-"))
    data = root / "cp"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        artifact = root / "artifact.bin"
        artifact.write_bytes(os.urandom(args.size_mb * MIB))
        digest = await publish_artifact(data, artifact, 120)
        artifact.unlink()
        print(f"published a {args.size_mb} MiB artifact ({digest[:12]}) for {args.devices:,} "
              "devices", flush=True)  # fmt: skip
        cp, address = _start_cp(data)
        procs.append(cp)
        direct = await _rollout(address, args.devices, "cp", args, {"control plane": cp.pid})
        _stop(cp)
        procs.remove(cp)

        mirror = root / "mirror"
        export = await asyncio.to_thread(
            subprocess.run,
            [*edgefleet_command(), "artifacts", "export", str(mirror),
             "--data-dir", str(data)],
            capture_output=True, text=True, env=clean_env(), check=False,
        )  # fmt: skip
        if export.returncode != 0:
            raise SystemExit(f"edgefleet artifacts export failed: {export.stderr}")
        nginx, port = _start_nginx(root / "nginx", mirror)
        procs.append(nginx)
        cp, address = _start_cp(data, "--artifact-mirror", f"http://127.0.0.1:{port}/blobs")
        procs.append(cp)
        mirrored = await _rollout(address, args.devices, "mirror", args,
                                  {"control plane": cp.pid, "nginx": nginx.pid})  # fmt: skip
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)

    print("\n| path | devices | wall s | GiB verified | MiB/s | server CPU | fleet CPU s "
          "| sources | errors |\n|---|---:|---:|---:|---:|---|---:|---|---|")  # fmt: skip
    _report("control plane (HTTP)", direct)
    _report("nginx mirror", mirrored)
    cp_direct = direct["cpu_s"]["control plane"]
    cp_mirrored = mirrored["cpu_s"]["control plane"]
    print(f"\nmirror / control plane: wall {mirrored['wall_s'] / direct['wall_s']:.2f}x; "
          f"control-plane CPU {cp_mirrored:.1f} s against {cp_direct:.1f} s "
          f"({cp_mirrored / cp_direct if cp_direct else float('nan'):.2f}x)")  # fmt: skip
    for label, r in (("control plane", direct), ("mirror", mirrored)):
        if r["downloads"] != r["devices"]:
            raise SystemExit(f"{label}: {r['downloads']} downloads for {r['devices']} devices")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--smoke", action="store_true", help="CI: 20 devices, 2 MB")
    args = parser.parse_args(argv)
    if args.smoke:
        args.devices, args.size_mb, args.timeout_s = 20, 2, 120
    if not NGINX.exists():
        print(f"no nginx at {NGINX}: scripts/setup.sh installs Debian's", file=sys.stderr)
        return 2
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
