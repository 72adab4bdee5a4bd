"""Fault-injection benchmark (issue 7): the scenarios of tests/e2e/test_faults.py
at full size, with the figures docs/reliability.md records.

1. kill: `--devices` fleetsim agents, a staged rollout (`--stages`, each
   baking `--bake-s`) run twice in the same control plane: once untouched
   (the baseline), then again to the next version while the control plane
   is SIGKILLed `--kills` times at seeded random moments and restarted.
   Prints both durations and their ratio, the time from each SIGKILL to a
   control plane that answers and to a fleet that is reconnected, and what
   the database says about each device (assigned exactly once, committed).
2. pg: a private PostgreSQL cluster restarted (fast, immediate, stopped for
   `--outage-s`) under `--pg-devices` agents' status and telemetry and an
   operator writing back to back: writes accepted vs found afterwards,
   failures by status code, time from each restart to the next OK write.
3. net: a real agent behind a TCP proxy downloading a `--artifact-mb` model
   with every connection cut after `--cut-kb`, then telemetry through a
   flapping link: bytes carried vs the artifact's size, samples produced vs
   stored, duplicates.
4. disk: a real agent on a small tmpfs that is too full, then fills up
   mid-download: the reasons reported, the old model's predictions.

    python -m bench.bench_faults                       # everything, full size
    python -m bench.bench_faults --only kill --devices 200 --kills 5
    python -m bench.bench_faults --json faults.json
    python -m bench.bench_faults --smoke               # CI: short, figures meaningless

Run from the repository root as a module (it uses testkit).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testkit import fault_scenarios as fs
from testkit.private_pg import unavailable_reason

MIB = 1024 * 1024
# Hidden units of the MLP per MiB of ONNX file (fault_scenarios.mlp_model).
HIDDEN_PER_MIB = 3_500
# --smoke: the run CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every scenario, smaller than tests/e2e/test_faults.py.
# Figures meaningless.
SMOKE = {"devices": 20, "kills": 1, "stages": 2, "bake_s": 1.0, "pg_devices": 10,
         "outage_s": 1.0, "artifact_mb": 1.0, "cut_kb": 256, "flaps": 2}  # fmt: skip


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"median {statistics.median(values):.2f} s, max {max(values):.2f} s, "
            f"min {min(values):.2f} s")  # fmt: skip


async def run_kill(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    print(f"\n[kill] {args.devices} devices, {args.kills} SIGKILLs, {args.stages} stages "
          f"x {args.bake_s:g} s bake", flush=True)  # fmt: skip
    report = await fs.kill_control_plane_during_rollout(
        root / "kill", devices=args.devices, kills=args.kills, seed=args.seed, stages=args.stages,
        bake_s=args.bake_s, baseline=True, say=_say,
    )  # fmt: skip
    print(f"  baseline rollout: {report.baseline_s:.1f} s; with {len(report.recover_s)} kills: "
          f"{report.rollout_s:.1f} s; ratio {report.ratio:.2f}")  # fmt: skip
    print(f"  SIGKILL -> answering: {_spread(report.recover_s)}")
    print(f"  SIGKILL -> every agent reconnected: {_spread(report.reconnect_s)}")
    print(f"  committed when each kill landed: {report.committed_at_kill}")
    print(f"  problems: {report.problems or 'none'}")
    return {**asdict(report), "ratio": report.ratio}


async def run_pg(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    reason = unavailable_reason()
    if reason:
        print(f"\n[pg] skipped: {reason}")
        return {"skipped": reason}
    print(f"\n[pg] {args.pg_devices} devices; restarts fast, immediate, stop "
          f"{args.outage_s:g} s", flush=True)  # fmt: skip
    report = await fs.restart_postgres_under_load(
        root / "pg", devices=args.pg_devices, outage_s=args.outage_s, say=_say,
    )  # fmt: skip
    print(f"  writes: {report.writes} made, {report.writes_ok} accepted, {report.ok_found} "
          f"found afterwards; failed: {report.failures}")  # fmt: skip
    print(f"  telemetry rows stored in the 3 s after the restarts: {report.telemetry_after}")
    print(f"  problems: {report.problems or 'none'}")
    return asdict(report)


def _net(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    hidden = int(args.artifact_mb * HIDDEN_PER_MIB)
    print(f"\n[net] a {args.artifact_mb:g} MiB artifact, every connection cut after "
          f"{args.cut_kb} KiB", flush=True)  # fmt: skip
    rig = fs.agent_rig(root / "net", {"1.0.0": 64, "2.0.0": hidden})
    try:
        started = time.monotonic()
        report = fs.cut_network(rig, new_version="2.0.0", cut_after_bytes=args.cut_kb * 1024,
                                flaps=args.flaps, say=_say)  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        rig.close()
    ratio = report.download_bytes_down / report.artifact_bytes
    print(f"  {report.download_cuts} cuts; {report.download_bytes_down} bytes carried for "
          f"{report.artifact_bytes} ({ratio:.2f}x; {report.redownloaded_bytes} extra)")  # fmt: skip
    print(f"  telemetry: {report.produced} produced, {report.stored} stored, "
          f"{report.duplicates} duplicates, {len(report.missing)} missing, at most "
          f"{report.max_buffered} buffered while offline ({elapsed:.0f} s in all)")  # fmt: skip
    print(f"  problems: {report.problems or 'none'}")
    return {**asdict(report), "carried_ratio": ratio}


def _disk(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    reason = fs.tmpfs_unavailable(root / "probe")
    if reason:
        print(f"\n[disk] skipped: {reason}")
        return {"skipped": reason}
    print("\n[disk] a real agent on a small tmpfs", flush=True)
    rig = fs.agent_rig(root / "disk", {"1.0.0": 64, "2.0.0": 2 * HIDDEN_PER_MIB})
    try:
        report = fs.fill_disk_during_update(rig, new_version="2.0.0", say=_say)
    finally:
        rig.close()
    print(f"  old model answered {report.predictions_ok} of 2 checks; problems: "
          f"{report.problems or 'none'}")  # fmt: skip
    return asdict(report)


async def run_net(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    return await asyncio.to_thread(_net, args, root)


async def run_disk(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    return await asyncio.to_thread(_disk, args, root)


SCENARIOS = {"kill": run_kill, "pg": run_pg, "net": run_net, "disk": run_disk}


async def run_all(args: argparse.Namespace, chosen: list[str], root: Path) -> dict[str, Any]:
    """Every chosen scenario, in one event loop (grpc.aio binds to the first)."""
    results: dict[str, Any] = {}
    for name in chosen:
        started = time.monotonic()
        result = await SCENARIOS[name](args, root)
        result["wall_s"] = time.monotonic() - started
        results[name] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated: " + ", ".join(SCENARIOS))  # fmt: skip
    parser.add_argument("--devices", type=int, default=1_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--bake-s", type=float, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pg-devices", type=int, default=200)
    parser.add_argument("--outage-s", type=float, default=5)
    parser.add_argument("--artifact-mb", type=float, default=8)
    parser.add_argument("--cut-kb", type=int, default=512)
    parser.add_argument("--flaps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="CI's short run (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    print(f"bench_faults on {platform.machine()}, {os.cpu_count()} cores, "
          f"{dt.date.today().isoformat()}; {' '.join(sys.argv[1:]) or 'defaults'}")  # fmt: skip
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        results.update(asyncio.run(run_all(args, chosen, Path(tmp))))
    failed = any(r.get("problems") for r in results.values() if isinstance(r, dict))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
