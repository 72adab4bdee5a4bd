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

    python -m bench.bench_agent_rss                  # idle
    python -m bench.bench_agent_rss --with-model     # idle, then with the model
    python -m bench.bench_agent_rss --imports        # also: what startup imports cost
    python -m bench.bench_agent_rss --smoke          # CI: seconds, figures meaningless

(from the repository root: it starts both with bench/common.py's and
testkit's helpers).
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
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench.common import ADMIN_TOKEN, BIN, clean_env, start_control_plane, stop_process
from edgefleet.controlplane.client.connection import operator_stub
from edgefleet.polling import wait_for
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2, operator_pb2
from testkit.agent_harness import AgentProcess

GOAL_BYTES = 48_000_000
MIB = 1024 * 1024
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; idle and with the model, a second of samples each. Figures meaningless.
SMOKE = {"settle": 0.5, "sample_seconds": 1.0, "with_model": True}


def start_agent(root: Path, server: str, token: str) -> AgentProcess:
    """`edgefleet-agent` with a fresh identity, started. Its own config's
    timings, not the harness's quick test ones: measured as it runs."""
    agent = AgentProcess(
        root / "agent", server, token, name="rss-bench", labels={"tier": "rss-bench"},
        heartbeat_interval_s=None, backoff_initial_s=None, backoff_max_s=None,
    )  # fmt: skip
    return agent.start()


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

    wait_for(built_ok, 600, what="the build", interval=0.2)
    wait_for(
        lambda: op.GetDevice(operator_pb2.GetDeviceRequest(id=device_id)).class_name,
        60,
        what="the agent's class",
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
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)

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
        server, address = start_control_plane(
            root / "cp", build_workers=1 if args.with_model else 0
        )
        agent: AgentProcess | None = None
        try:
            op = operator_stub(address, ADMIN_TOKEN)
            wait_for(lambda: _healthy(op), 60, what="the control plane")
            token = op.CreateEnrollmentToken(
                operator_pb2.CreateEnrollmentTokenRequest(name="rss-bench")
            ).secret
            agent = start_agent(root, address, token)
            identity = agent.wait_for(agent.identity, 60)
            agent.wait_for(agent.desired, 60)
            assert agent.proc is not None
            time.sleep(args.settle)
            results["idle"] = sample(agent.proc.pid, args.sample_seconds)
            show("idle, enrolled, no model", results["idle"], goal=True)
            if args.with_model:
                device_id = str(identity["device_id"])
                sequence = deploy_model(root, address, op, device_id)

                def committed() -> bool | None:
                    update = op.GetDevice(operator_pb2.GetDeviceRequest(id=device_id)).update
                    state = of_status(update) if update.sequence == sequence else ""
                    if state == "failed":
                        raise SystemExit(f"the update failed: {update.reason}")
                    return state == "committed" or None

                wait_for(committed, 300, what="the update to commit", interval=0.2)
                time.sleep(args.settle)
                results["with_model"] = sample(agent.proc.pid, args.sample_seconds)
                show("with the digits MLP active (onnxruntime)", results["with_model"], goal=False)
            if not agent.running:
                raise SystemExit(f"the agent exited with {agent.proc.returncode}")
        finally:
            if agent is not None and agent.running:
                agent.stop()
            stop_process(server, grace_s=15)
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
