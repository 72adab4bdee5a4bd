"""Agent memory: the resident set of a real `edgefleet-agent` process (and any
children), idle after enrollment, and with a model deployed and serving.

Starts a real control plane (`edgefleet server` on SQLite in a temp dir) and
a real agent subprocess that enrolls with a fresh token; once the agent has
applied its first desired state it is left alone for `--settle` seconds (long
enough for a telemetry upload and a few heartbeats), then its RSS is sampled
every 0.5 s for `--sample-seconds` and the median and peak printed. USS
(pages only this process maps) and PSS (shared pages split between their
users) are printed beside it: RSS counts every shared library page the
process touched, so it is the strict figure. Goal: idle <= 48 MB
(48,000,000 bytes; MiB figures are printed too).

With `--with-model`, the digits MLP (demo.models, built here) is pushed, a
device class matching the agent builds it (ONNX Runtime), an operator assigns
it with AssignModel, and once the agent reports the update committed the RSS
is measured again, with the model loaded and warm.

    python bench/bench_agent_rss.py                  # idle
    python bench/bench_agent_rss.py --with-model     # idle, then with the model
    python bench/bench_agent_rss.py --imports        # also: what startup imports cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil

from edgefleet.controlplane.client import operator_stub
from edgefleet.v1 import common_pb2, operator_pb2

T = TypeVar("T")
GOAL_BYTES = 48_000_000
MIB = 1024 * 1024
BIN = Path(sys.executable).parent
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


def wait_for(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Poll `check` until it returns something; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def clean_env() -> dict[str, str]:
    # gRPC honours proxy variables, which would send loopback traffic away;
    # EDGEFLEET_AGENT_* would override the agent's config file.
    return {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith("EDGEFLEET_AGENT_")
    }


def start_control_plane(root: Path, build_workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """`edgefleet server` on SQLite in `root`; (process, address)."""
    data = root / "cp"
    data.mkdir()
    port_file = data / "port"
    with (data / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "edgefleet"), "server", "--insecure", "--data-dir", str(data),
             "--listen", "127.0.0.1:0", "--port-file", str(port_file),
             "--admin-token", ADMIN_TOKEN, "--build-workers", str(build_workers)],
            stdout=log, stderr=subprocess.STDOUT, env=clean_env(),
        )  # fmt: skip
    port = wait_for("the control plane to listen", lambda: _read_port(port_file), 60)
    return proc, f"127.0.0.1:{port}"


def _read_port(path: Path) -> int | None:
    try:
        return int(path.read_text().strip()) or None
    except (OSError, ValueError):
        return None


def start_agent(root: Path, server: str, token: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`edgefleet-agent` with a fresh identity; (process, state dir)."""
    directory = root / "agent"
    state = directory / "state"
    state.mkdir(parents=True)
    config = directory / "agent.toml"
    config.write_text(
        f'server = "{server}"\ninsecure = true\nenrollment_token = "{token}"\n'
        f'state_dir = "{state}"\n'
        f'hardware_id = "bench-{uuid.uuid4().hex}"\nname = "rss-bench"\n'
        '[labels]\ntier = "rss-bench"\n'
    )
    with (directory / "agent.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "edgefleet-agent"), "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    return proc, state


def memory(pid: int) -> dict[str, float]:
    """RSS, USS and PSS in bytes of `pid` plus all its descendants."""
    root = psutil.Process(pid)
    totals = {"rss": 0.0, "uss": 0.0, "pss": 0.0}
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        totals["rss"] += info.rss
        totals["uss"] += info.uss
        totals["pss"] += getattr(info, "pss", 0.0)
    return totals


def sample(pid: int, seconds: float) -> dict[str, dict[str, float]]:
    """Median and peak of each measure over `seconds`, every 0.5 s."""
    samples: list[dict[str, float]] = []
    deadline = time.monotonic() + seconds
    while True:
        samples.append(memory(pid))
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    return {
        key: {
            "median": statistics.median(s[key] for s in samples),
            "peak": max(s[key] for s in samples),
        }
        for key in ("rss", "uss", "pss")
    }


def show(label: str, figures: dict[str, dict[str, float]], goal: bool) -> None:
    rss = figures["rss"]["median"]
    line = (
        f"{label}: RSS {rss / 1e6:.1f} MB ({rss / MIB:.1f} MiB), peak "
        f"{figures['rss']['peak'] / 1e6:.1f} MB; USS {figures['uss']['median'] / 1e6:.1f} MB; "
        f"PSS {figures['pss']['median'] / 1e6:.1f} MB"
    )
    if goal:
        met = "met" if rss <= GOAL_BYTES else "NOT met"
        line += f"  (goal <= {GOAL_BYTES / 1e6:.0f} MB: {met})"
    print(line, flush=True)


def deploy_model(root: Path, server: str, op: Any, device_id: str) -> int:
    """Push the digits MLP, build it for a class holding the agent, assign
    it; the assignment's sequence."""
    from edgefleet.demo.models import build_digits_classifier

    built = build_digits_classifier(root / "digits")
    push = subprocess.run(
        [str(BIN / "edgefleet"), "--server", server, "--token", ADMIN_TOKEN, "models", "push",
         "digits", "1.0.0", str(built.model), "--sample-data", str(built.sample_data)],
        env=clean_env(), capture_output=True, text=True,
    )  # fmt: skip
    if push.returncode != 0:
        raise SystemExit(f"edgefleet models push failed:\n{push.stdout}{push.stderr}")
    op.CreateDeviceClass(
        operator_pb2.CreateDeviceClassRequest(
            name="rss-bench",
            constraints=common_pb2.ConstraintProfile(runtime=common_pb2.RUNTIME_ONNXRUNTIME),
            match_rules=[
                common_pb2.MatchRule(
                    field="label.tier", op=common_pb2.MATCH_OP_EQ, values=["rss-bench"]
                )
            ],
        )
    )

    def built_ok() -> bool | None:
        builds = op.ListBuilds(operator_pb2.ListBuildsRequest()).builds
        if builds and all(b.state == operator_pb2.BUILD_STATE_FAILED for b in builds):
            raise SystemExit(f"the build failed: {builds[0].error}")
        return any(b.state == operator_pb2.BUILD_STATE_SUCCEEDED for b in builds) or None

    wait_for("the build", built_ok, 600)
    wait_for(
        "the agent's class",
        lambda: op.GetDevice(operator_pb2.GetDeviceRequest(id=device_id)).class_name,
        60,
    )
    (assignment,) = op.AssignModel(
        operator_pb2.AssignModelRequest(
            device_ids=[device_id], model_name="digits", model_version="1.0.0"
        )
    ).assignments
    return int(assignment.sequence)


def startup_imports(top: int = 15) -> None:
    """The modules `import edgefleet.agent.main` spends most time on (python -X importtime),
    and the RSS once it has also built its argument parser, as every start does."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c",
         "import edgefleet.agent.main, sys, psutil; edgefleet.agent.main._parser(); "
         "print('RSS after imports', psutil.Process().memory_info().rss, file=sys.stderr); "
         "print('heavy', [m for m in ('numpy', 'onnxruntime', 'grpc', 'cryptography', "
         "'prometheus_client', 'importlib.metadata') if m in sys.modules], file=sys.stderr)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("RSS after imports"):
            print(f"RSS after `import edgefleet.agent.main`: {int(line.split()[-1]) / 1e6:.1f} MB")
        elif line.startswith("heavy"):
            print(f"heavy modules imported at startup: {line[6:]}")
        elif line.startswith("import time:") and "|" in line:
            _, total, name = (part.strip() for part in line[12:].split("|"))
            if total.isdigit():
                rows.append((int(total), name))
    print(f"top {top} imports by cumulative time (us):")
    for micros, name in sorted(rows, reverse=True)[:top]:
        print(f"  {micros:8d}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--settle", type=float, default=15.0, help="idle seconds before sampling")
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--with-model", action="store_true", help="also measure with a model")
    parser.add_argument("--imports", action="store_true", help="show startup import costs")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; settle {args.settle:g} s, then "
        f"{args.sample_seconds:g} s of samples",
        flush=True,
    )
    if args.imports:
        startup_imports()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-rss-") as tmp:
        root = Path(tmp)
        server, address = start_control_plane(root, build_workers=1 if args.with_model else 0)
        agent: subprocess.Popen[bytes] | None = None
        try:
            op = operator_stub(address, ADMIN_TOKEN)
            wait_for("the control plane", lambda: _healthy(op), 60)
            token = op.CreateEnrollmentToken(
                operator_pb2.CreateEnrollmentTokenRequest(name="rss-bench")
            ).secret
            agent, state = start_agent(root, address, token)
            wait_for("enrollment", lambda: (state / "identity.json").exists() or None, 60)
            wait_for("the first desired state", lambda: (state / "desired.json").exists(), 60)
            time.sleep(args.settle)
            results["idle"] = sample(agent.pid, args.sample_seconds)
            show("idle, enrolled, no model", results["idle"], goal=True)
            if args.with_model:
                device_id = json.loads((state / "identity.json").read_text())["device_id"]
                sequence = deploy_model(root, address, op, device_id)

                def committed() -> bool | None:
                    update = op.GetDevice(operator_pb2.GetDeviceRequest(id=device_id)).update
                    if update.sequence == sequence and update.state == "failed":
                        raise SystemExit(f"the update failed: {update.reason}")
                    return (update.sequence == sequence and update.state == "committed") or None

                wait_for("the update to commit", committed, 300)
                time.sleep(args.settle)
                results["with_model"] = sample(agent.pid, args.sample_seconds)
                show("with the digits MLP active (onnxruntime)", results["with_model"], goal=False)
            if agent.poll() is not None:
                raise SystemExit(f"the agent exited with {agent.returncode}")
        finally:
            for proc in (agent, server):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _healthy(op: Any) -> bool:
    try:
        op.ListDevices(operator_pb2.ListDevicesRequest(), timeout=2)
    except grpc.RpcError:
        return False
    return True


if __name__ == "__main__":
    main()
