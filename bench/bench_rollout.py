"""Rollout benchmark: N simulated devices (fleetsim) through a staged rollout
against one real control plane, with a bulk AssignModel of the same fleet as
the baseline.

Starts `edgefleet server` (embedded SQLite in a temp dir, or `--db URL`, e.g.
PostgreSQL; with `--replicas N`, N of them on that database, the agents
spread over them round robin, operator calls to the first, and the
orchestrator's lease picking the one that drives) with one build worker,
so the digits MLP (demo.models) really builds, and a 30 s heartbeat.
Creates two device classes (ONNX Runtime, matched on arch: aarch64 and
x86_64, the fleetsim profile's two kinds of device), pushes 1.0.0 and 2.0.0
of the model (seeds 0 and 1) and waits for the four builds. Then, in this
process:

1. the fleet: `--agents` SimAgents enroll and open their Sync streams
   (progress printed); heartbeats and telemetry every 30 s, so the fleet's
   own chatter stays small next to the rollout's work; `--idle-s` seconds
   with nothing happening measure that chatter's cost on the control plane;
2. **the baseline**: 1.0.0 assigned to every device with AssignModel, 1,000
   devices per call (the server's limit), calls back to back; until every
   device committed. Its notification rate (devices/min, timed on the
   devices: first to last device that saw its assignment) is the raw bulk
   assignment rate of the same server in the same run;
3. **the rollout** of 2.0.0 over both classes: stages reaching 1 %, 10 %,
   50 % and 100 % of the cohort (`--stages`, cumulative; each stage holds
   the difference), each baking `--bake-s` seconds, no pacing limit, default
   thresholds (every device of a stage committed, no failure). Created as a
   draft (the planning timed on its own), then started; until it succeeded;
4. **two models per device** (skipped with `--one-model`): a second model
   (the digits CNN) assigned to every device, then the rollout of 3.0.0 as
   in 3, every device now holding two models; then the CNN removed again
   and 4.0.0 rolled out with one model (A-B-A: drift over the run shows as
   the gap between the two one-model rollouts). Goal: the two-model rollout
   no slower than the one-model rollouts' mean.

Figures:

- notification rate: devices notified per minute, timed on the devices
  (each SimAgent stamps time.monotonic() when a newer assignment arrives),
  per stage over its notification window (first to last device notified)
  and overall (all devices over the sum of the windows); also counted from
  each stage's start (the orchestrator's "rollout.stage" audit entry), which
  adds the time the orchestrator took to begin notifying. Goal >= 10,000/min,
  printed as a ratio to the baseline and to AWS IoT Jobs' 1,000/min cap;
- orchestration overhead beyond bake times: the rollout's wall time (start
  to the "rollout.succeeded" audit entry) minus the stages' bake times minus
  each stage's slowest simulated install (the profile's install_s upper
  bound among the stage's classes). Goal <= 30 s (issue 21; 60 s before). Each stage's time is split
  into: start -> first device notified, first -> last notified, last
  notified -> every device committed (device side, stamped as the last
  member reports it),
  committed -> the "rollout.stage_passed" audit entry, and from there to
  the next stage (the bake). Audit entries are stamped when the step that
  wrote them commits, so a slow step shows in "-> passed" and can make
  "passed -> next" shorter than the bake;
- CPU (cores: process CPU seconds / wall seconds, from psutil cpu_times over
  the phase) and peak RSS of the control plane (its process tree; RSS of the
  main process beside it) and of this benchmark process (the fleet);
- with `--before CHECKOUT`, every phase again, after this checkout's, with
  the control plane of another checkout (its proto/ first on PYTHONPATH;
  this process, the fleet, unchanged), a fresh fleet and database, then a
  before/after table of the rollout's figures;
- a queue probe: once a second a trivial operator call that reads the
  database (ListAuditLog, limit 1), timed. Device RPCs, the orchestrator's
  ticks and operator calls share the control plane's database threads, so
  this shows how long anything waited for them in each phase;
- the fleet's event-loop lag: how late this process woke a 50 ms sleep.
  Every simulated agent runs on that one loop, so a lag of seconds delays
  their installs and reports, and the figures are then the simulator's.

    python -m bench.bench_rollout --agents 2000           # a first try
    python -m bench.bench_rollout                         # 10,000 devices
    python -m bench.bench_rollout --telemetry-s 300       # a quieter fleet
    python -m bench.bench_rollout --db postgresql+psycopg://user@host/db --json out.json
    python -m bench.bench_rollout --db postgresql+psycopg://user@host/scratch --fresh-db \
        --replicas 2 --one-model --before ../before   # two replicas; the previous engine too
    python -m bench.bench_rollout --smoke                 # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    ADMIN_TOKEN,
    ASSIGN_BATCH,
    CLASSES,
    MODEL,
    SECOND_MODEL,
    Progress,
    cpu_seconds,
    enroll,
    healthy,
    log_tail,
    make_profile,
    rss_bytes,
    setup,
    start_control_plane,
    stop_process,
)
from edgefleet.agent.update.states import State
from edgefleet.controlplane import loop_lag
from edgefleet.controlplane.client.connection import operator_stub
from edgefleet.polling import wait_for
from edgefleet.sim import Fleet, FleetError, FleetProfile, SimAgent, SimModel
from edgefleet.sim.fleet import CHANNEL_OPTIONS
from edgefleet.v1 import device_pb2_grpc, operator_pb2

GOAL_PER_MIN = 10_000
AWS_IOT_JOBS_PER_MIN = 1_000
GOAL_OVERHEAD_S = 30.0
POLL_S = 0.2


# ------------------------------------------------------------------ resources


class PeakRss:
    """Peak RSS of the control plane (tree and main process; with replicas,
    their sum, and each replica's tree) and of this process, sampled every
    0.5 s on a thread (the event loop is busy)."""

    def __init__(self, server_pids: Sequence[int]) -> None:
        self.server_pids = list(server_pids)
        self.peaks: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.5)

    def sample(self) -> None:
        trees = [rss_bytes(pid, tree=True) for pid in self.server_pids]
        now = {
            "server_tree": sum(trees),
            "server_main": sum(rss_bytes(pid, tree=False) for pid in self.server_pids),
            "bench": rss_bytes(os.getpid(), tree=False),
        }
        if len(trees) > 1:
            now |= {f"replica{i}_tree": tree for i, tree in enumerate(trees)}
        for key, value in now.items():
            self.peaks[key] = max(self.peaks[key], int(value))

    def reset(self) -> None:
        self.peaks.clear()
        self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Window:
    """CPU used by the control plane (every replica's tree: their sum, and
    each one's) and by this process over one phase."""

    server_pids: Sequence[int]
    wall0: float = field(default_factory=time.monotonic)
    server0: list[float] = field(default_factory=list)
    bench0: float = 0.0

    def __post_init__(self) -> None:
        self.server0 = [cpu_seconds(pid, tree=True) for pid in self.server_pids]
        # Not the tree: the control plane is this process's child.
        self.bench0 = cpu_seconds(os.getpid(), tree=False)

    def close(self, end: float | None = None) -> dict[str, Any]:
        wall = (end if end is not None else time.monotonic()) - self.wall0
        replicas = [
            cpu_seconds(pid, tree=True) - before
            for pid, before in zip(self.server_pids, self.server0, strict=True)
        ]
        server = sum(replicas)
        bench = cpu_seconds(os.getpid(), tree=False) - self.bench0
        return {
            "wall_s": wall,
            "server_cpu_s": server,
            "server_cores": server / wall if wall > 0 else 0.0,
            "replica_cores": [r / wall if wall > 0 else 0.0 for r in replicas],
            "bench_cpu_s": bench,
            "bench_cores": bench / wall if wall > 0 else 0.0,
        }


class Probe:
    """Once a second, a trivial operator call that reads the database
    (ListAuditLog, limit 1), timed: device RPCs, the orchestrator's ticks and
    operator calls all queue for the same database threads, so this shows how
    long anything waits there in each phase.

    Also the fleet's own event-loop lag (controlplane.loop_lag's probe, run
    here): every simulated agent shares this process's one loop, so when it
    wakes a 50 ms sleep seconds late, agents install, report and commit that
    much late too, and the simulator, not the control plane, set the pace."""

    def __init__(self, op: Any) -> None:
        self.op = op
        self.samples: list[tuple[float, float]] = []
        self.lags: list[tuple[float, float]] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        request = operator_pb2.ListAuditLogRequest(limit=1, action="bench.probe")
        while True:
            t = time.monotonic()
            with contextlib.suppress(grpc.RpcError):  # a timeout is a sample too
                await asyncio.to_thread(self.op.ListAuditLog, request, timeout=120)
            self.samples.append((t, time.monotonic() - t))
            await asyncio.sleep(1.0)

    def start(self) -> None:
        lag = loop_lag.probe(lambda late: self.lags.append((time.monotonic(), late)))
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(lag)]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def summary(self, t0: float, t1: float) -> dict[str, float]:
        return _distribution(self.samples, t0, t1)

    def lag_summary(self, t0: float, t1: float) -> dict[str, float]:
        return _distribution(self.lags, t0, t1)


def _distribution(samples: list[tuple[float, float]], t0: float, t1: float) -> dict[str, float]:
    values = sorted(v for t, v in samples if t0 <= t <= t1)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "median_s": values[len(values) // 2],
        "p90_s": values[min(len(values) - 1, math.ceil(len(values) * 0.9) - 1)],
        "max_s": values[-1],
    }


# ------------------------------------------------------------------ measuring


def per_minute(count: int, seconds: float) -> float | None:
    """Devices per minute; None when the window is too short to mean a rate."""
    return count * 60.0 / seconds if seconds >= 1e-3 else None


def _rate(value: float | None) -> str:
    return "instant" if value is None else f"{value:,.0f}/min"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _state(agent: SimAgent, model: str, version: str) -> str | None:
    """The update state of `model` on `agent` if its assignment is `version`."""
    held = agent.models.get(model)
    return str(held.state) if held is not None and held.version == version else None


def committed(agent: SimAgent, version: str, model: str = MODEL) -> bool:
    return _state(agent, model, version) == "committed"


def failed_agents(agents: Sequence[SimAgent], version: str, model: str = MODEL) -> list[SimAgent]:
    return [a for a in agents if _state(a, model, version) == "failed"]


def reason(agent: SimAgent, model: str = MODEL) -> str:
    held = agent.models.get(model)
    return held.reason if held is not None else ""


def update_line(version: str, model: str = MODEL) -> Callable[[Fleet], str]:
    def line(fleet: Fleet) -> str:
        states = [_state(a, model, version) for a in fleet.agents]
        counts = Counter(s for s in states if s is not None)
        seen = sum(counts.values())
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return f"{model}@{version} notified {seen}/{len(fleet.agents)} ({shown})"

    return line


def assign_retrying(op: Any, request: operator_pb2.AssignModelRequest, tries: int = 5) -> None:
    """AssignModel, again while the server says UNAVAILABLE ("try again": a
    transaction PostgreSQL aborted, e.g. a deadlock between replicas);
    counted, so a run that needed it says so."""
    for attempt in range(tries):
        try:
            op.AssignModel(request)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == tries - 1:
                raise
            RETRIED.append(str(exc.details()))
            time.sleep(0.5 * (attempt + 1))


# The details of every AssignModel the baseline had to repeat.
RETRIED: list[str] = []


async def baseline(
    op: Any,
    fleet: Fleet,
    server_pids: Sequence[int],
    rss: PeakRss,
    timeout_s: float,
    progress: Progress,
    probe: Probe,
    model: str = MODEL,
) -> dict[str, Any]:
    """`model` 1.0.0 to every device with AssignModel, ASSIGN_BATCH per call,
    back to back; until all committed."""
    agents = fleet.agents
    ids = [a.device_id for a in agents]
    rss.reset()
    window = Window(server_pids)
    t0 = window.wall0
    progress.start("baseline", update_line("1.0.0", model))
    call_s: list[float] = []
    for start in range(0, len(ids), ASSIGN_BATCH):
        request = operator_pb2.AssignModelRequest(
            device_ids=ids[start : start + ASSIGN_BATCH], model_name=model,
            model_version="1.0.0", reason="bench baseline",
        )  # fmt: skip
        c0 = time.monotonic()
        await asyncio.to_thread(assign_retrying, op, request)
        call_s.append(time.monotonic() - c0)
    calls_done = time.monotonic()
    deadline = time.monotonic() + timeout_s
    while not all(committed(a, "1.0.0", model) for a in agents):
        failed = failed_agents(agents, "1.0.0", model)
        if failed:
            raise SystemExit(f"{len(failed)} device(s) failed 1.0.0: {reason(failed[0], model)}")
        if time.monotonic() > deadline:
            raise SystemExit(f"baseline: not every device committed within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)
    done = time.monotonic()
    progress.stop()
    resources = window.close(done)
    seen = sorted(a.assignment_seen_at for a in agents)
    first, last = seen[0], seen[-1]
    return {
        "devices": len(agents),
        "calls": len(call_s),
        "call_s": call_s,
        "calls_s": calls_done - t0,
        "first_notified_s": first - t0,
        "last_notified_s": last - t0,
        "all_committed_s": done - t0,
        "rate_window_per_min": per_minute(len(agents), last - first),
        "rate_from_call_per_min": per_minute(len(agents), last - t0),
        "queue_probe": probe.summary(t0, done),
        "fleet_lag": probe.lag_summary(t0, done),
        "resources": resources,
        "rss_peak": dict(rss.peaks),
    }


def _audit(op: Any, rollout_id: str) -> list[Any]:
    listed = op.ListAuditLog(
        operator_pb2.ListAuditLogRequest(target=f"rollout:{rollout_id}", limit=1000), timeout=30
    )
    return sorted(listed.entries, key=lambda e: e.id)


async def unassign_everywhere(op: Any, fleet: Fleet, model: str, timeout_s: float) -> None:
    """Remove `model` from every device, ASSIGN_BATCH per call; until no
    simulated agent holds it."""
    ids = [a.device_id for a in fleet.agents]
    for start in range(0, len(ids), ASSIGN_BATCH):
        request = operator_pb2.UnassignModelRequest(
            device_ids=ids[start : start + ASSIGN_BATCH], model_name=model, reason="bench A-B-A"
        )
        await asyncio.to_thread(op.UnassignModel, request)
    deadline = time.monotonic() + timeout_s
    while any(model in a.models for a in fleet.agents):
        if time.monotonic() > deadline:
            held = sum(model in a.models for a in fleet.agents)
            raise SystemExit(f"{held} devices still hold {model} after {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def rollout(
    op: Any,
    fleet: Fleet,
    profile: FleetProfile,
    server_pids: Sequence[int],
    rss: PeakRss,
    args: argparse.Namespace,
    progress: Progress,
    probe: Probe,
    version: str = "2.0.0",
) -> dict[str, Any]:
    """`version` through the staged rollout; every figure of the report."""
    agents = fleet.agents
    by_id = {a.device_id: a for a in agents}
    reach = args.stages
    spec = operator_pb2.RolloutSpec(
        model_name=MODEL, model_version=version, class_names=list(CLASSES)
    )
    for i, percent in enumerate(reach):
        stage = spec.stages.add(name=f"{percent:g}%")
        # Stage sizes are shares of the cohort; `--stages` gives how far each
        # stage reaches, so each stage holds the difference.
        stage.percent = percent - (reach[i - 1] if i else 0.0)
        stage.bake_time.FromMilliseconds(round(args.bake_s * 1000))
    c0 = time.monotonic()
    created = await asyncio.to_thread(
        op.CreateRollout, operator_pb2.CreateRolloutRequest(spec=spec), timeout=300
    )
    create_s = time.monotonic() - c0
    rollout_id = created.rollout.id
    if created.excluded:
        reasons = Counter(e.reason for e in created.excluded)
        print(f"  excluded {len(created.excluded)} device(s): {dict(reasons)}", flush=True)
    stages: list[list[SimAgent]] = [[] for _ in reach]
    for planned in created.planned:
        stages[planned.stage].append(by_id[planned.device_id])
    print(f"  created rollout {rollout_id} in {create_s:.2f} s; stage sizes "
          f"{[len(s) for s in stages]}", flush=True)  # fmt: skip
    members = [a for s in stages for a in s]

    # Offsets map the server's wall-clock audit times onto this process's
    # monotonic clock (same machine, same clock source).
    mono_minus_wall = time.monotonic() - time.time()
    rss.reset()
    window = Window(server_pids)
    t0 = window.wall0
    progress.start("rollout", update_line(version))
    await asyncio.to_thread(op.StartRollout, operator_pb2.RolloutActionRequest(id=rollout_id))

    start_call_s = time.monotonic() - t0

    all_committed: list[float | None] = [None] * len(stages)

    # Stamped by the fleet as each member reports (FleetContext.on_state),
    # not polled: scanning the 5,000 members of a stage five times a second
    # took a fifth of the fleet's event loop, and the fleet shares this
    # machine's two cores with the control plane it measures.
    stage_of = {id(a): i for i, s in enumerate(stages) for a in s}
    pending = [{id(a) for a in s if not committed(a, version)} for s in stages]
    for i, left in enumerate(pending):
        if not left:
            all_committed[i] = time.monotonic()
    failures: list[SimAgent] = []
    failed = asyncio.Event()

    def on_state(agent: SimAgent, model: SimModel) -> None:
        i = stage_of.get(id(agent))
        if i is None or model.name != MODEL or model.version != version:
            return
        if model.state is State.COMMITTED:
            left = pending[i]
            if id(agent) in left:
                left.discard(id(agent))
                if not left:
                    all_committed[i] = time.monotonic()
        elif model.state is State.FAILED:
            failures.append(agent)
            failed.set()

    fleet.ctx.on_state = on_state

    async def watch_commits() -> None:
        await failed.wait()
        raise SystemExit(f"{len(failures)} device(s) failed {version}: {reason(failures[0])}")

    entries: dict[int, Any] = {}

    async def watch_audit() -> str:
        while True:
            outcome = ""
            for entry in await asyncio.to_thread(_audit, op, rollout_id):
                if entry.id in entries:
                    continue
                entries[entry.id] = entry
                since = entry.at.ToDatetime(dt.UTC).timestamp() + mono_minus_wall - t0
                print(f"  [{since:6.1f} s] {entry.action} {entry.details}", flush=True)
                if entry.action in ("rollout.succeeded", "rollout.pause", "rollout.abort"):
                    outcome = entry.action
            if outcome:
                return outcome
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_commits())
    try:
        audit = asyncio.create_task(watch_audit())
        finished, _ = await asyncio.wait(
            {watcher, audit}, timeout=args.timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if watcher in finished:
            watcher.result()  # raises what stopped it
        if audit not in finished:
            audit.cancel()
            raise SystemExit(f"the rollout did not finish within {args.timeout_s:g} s")
        outcome = audit.result()
    finally:
        watcher.cancel()
        fleet.ctx.on_state = None
    seen_end = time.monotonic()
    progress.stop()
    if outcome != "rollout.succeeded":
        raise SystemExit(f"the rollout ended with {outcome}")

    def at(entry: Any) -> float:
        return float(entry.at.ToDatetime(dt.UTC).timestamp() + mono_minus_wall)

    def details(entry: Any) -> dict[str, Any]:
        try:
            value = json.loads(entry.details or "{}")
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    log = sorted(entries.values(), key=lambda e: e.id)
    end = next(at(e) for e in log if e.action == "rollout.succeeded")
    resources = window.close(seen_end)
    started = [t0] + [0.0] * (len(stages) - 1)
    passed = [0.0] * len(stages)
    for e in log:
        number = details(e).get("stage")  # the audit log counts stages from 1
        if not isinstance(number, int) or not 1 <= number <= len(stages):
            continue
        if e.action == "rollout.stage":
            started[number - 1] = at(e)
        elif e.action == "rollout.stage_passed":
            passed[number - 1] = at(e)
    stage_rows: list[dict[str, Any]] = []
    for i, stage_agents in enumerate(stages):
        seen = sorted(a.assignment_seen_at for a in stage_agents)
        first, last = seen[0], seen[-1]
        install_hi = max(
            profile.behaviour(a.profile_class.name, version).install_s[1] for a in stage_agents
        )
        stage_end = started[i + 1] if i + 1 < len(stages) else end
        committed_at = all_committed[i] or seen_end
        stage_rows.append({
            "stage": i + 1,
            "reach_percent": reach[i],
            "devices": len(stage_agents),
            "start_to_first_notified_s": first - started[i],
            "notify_window_s": last - first,
            "last_notified_to_all_committed_s": committed_at - last,
            "all_committed_to_passed_s": passed[i] - committed_at,
            "passed_to_next_s": stage_end - passed[i],
            "stage_s": stage_end - started[i],
            "install_upper_s": install_hi,
            "bake_s": args.bake_s,
            "rate_window_per_min": per_minute(len(stage_agents), last - first),
            "rate_from_start_per_min": per_minute(len(stage_agents), last - started[i]),
        })  # fmt: skip
    wall = end - t0
    bakes = args.bake_s * len(stages)
    installs = sum(r["install_upper_s"] for r in stage_rows)
    windows = sum(r["notify_window_s"] for r in stage_rows)
    from_start = sum(r["start_to_first_notified_s"] + r["notify_window_s"] for r in stage_rows)
    return {
        "rollout_id": rollout_id,
        "devices": len(members),
        "excluded": len(created.excluded),
        "create_s": create_s,
        "start_call_s": start_call_s,
        "wall_s": wall,
        "observed_s": seen_end - t0,
        "bake_total_s": bakes,
        "install_upper_total_s": installs,
        "overhead_s": wall - bakes - installs,
        "rate_window_per_min": per_minute(len(members), windows),
        "rate_from_start_per_min": per_minute(len(members), from_start),
        "stages": stage_rows,
        "queue_probe": probe.summary(t0, seen_end),
        "fleet_lag": probe.lag_summary(t0, seen_end),
        "audit": [[round(at(e) - t0, 3), e.action, details(e)] for e in log],
        "resources": resources,
        "rss_peak": dict(rss.peaks),
    }


# ------------------------------------------------------------------ report


def report(results: dict[str, Any]) -> None:
    base, roll, idle = results["baseline"], results["rollout"], results["idle"]
    mb = 1e6
    print(f"\n## Results ({results['engine']})\n")
    print(f"{results['machine']}, {results['replicas']} control-plane replica(s); load average "
          f"at start {', '.join(f'{v:.2f}' for v in results['load_avg'])}")  # fmt: skip
    print(f"devices {results['agents']}, enrolled and connected in {results['enroll_s']:.1f} s; "
          f"stages reaching {', '.join(f'{p:g} %' for p in results['stages'])}, "
          f"bake {results['bake_s']:g} s each, no pacing limit\n")  # fmt: skip
    print(
        f"baseline (AssignModel, {base['calls']} calls of <= {ASSIGN_BATCH}): calls took "
        f"{base['calls_s']:.1f} s (per call {min(base['call_s']):.2f}-{max(base['call_s']):.2f} "
        f"s); devices notified from {base['first_notified_s']:.2f} to "
        f"{base['last_notified_s']:.2f} s; all committed at {base['all_committed_s']:.1f} s"
    )
    print(
        f"  baseline notification rate: {_rate(base['rate_window_per_min'])} (first to last "
        f"notified), {_rate(base['rate_from_call_per_min'])} from the first call\n"
    )
    print("| stage | reach | devices | start -> 1st notified s | notify window s | "
          "-> all committed s | -> passed s | passed -> next s | stage s | install hi s | "
          "rate (window) | rate (from start) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in roll["stages"]:
        print(
            f"| {r['stage']} | {r['reach_percent']:g} % | {r['devices']:,} | "
            f"{r['start_to_first_notified_s']:.2f} | {r['notify_window_s']:.2f} | "
            f"{r['last_notified_to_all_committed_s']:.2f} | "
            f"{r['all_committed_to_passed_s']:.2f} | {r['passed_to_next_s']:.2f} | "
            f"{r['stage_s']:.2f} | {r['install_upper_s']:g} | "
            f"{_rate(r['rate_window_per_min'])} | {_rate(r['rate_from_start_per_min'])} |"
        )
    rate = roll["rate_window_per_min"] or math.inf
    rate_start = roll["rate_from_start_per_min"] or math.inf
    base_rate = base["rate_window_per_min"] or math.inf
    print(
        f"\ncreate (plan {roll['devices']:,} devices, {roll['excluded']} excluded): "
        f"{roll['create_s']:.2f} s; StartRollout call {roll['start_call_s']:.2f} s"
    )
    print(
        f"notification rate, overall: {_rate(roll['rate_window_per_min'])} over the stages' "
        f"windows; {_rate(roll['rate_from_start_per_min'])} counted from each stage's start"
    )
    print(
        f"  vs baseline {rate / base_rate:.2f}x (from start {rate_start / base_rate:.2f}x); "
        f"vs AWS IoT Jobs' {AWS_IOT_JOBS_PER_MIN:,}/min cap {rate / AWS_IOT_JOBS_PER_MIN:.1f}x "
        f"(from start {rate_start / AWS_IOT_JOBS_PER_MIN:.1f}x)"
    )
    print(
        f"  goal >= {GOAL_PER_MIN:,}/min: {_met(rate >= GOAL_PER_MIN)} "
        f"(from stage start: {_met(rate_start >= GOAL_PER_MIN)})"
    )
    print(
        f"rollout wall time {roll['wall_s']:.1f} s = bakes {roll['bake_total_s']:g} s + slowest "
        f"installs {roll['install_upper_total_s']:g} s + overhead {roll['overhead_s']:.1f} s"
    )
    print(
        f"  overhead goal <= {GOAL_OVERHEAD_S:g} s: {_met(roll['overhead_s'] <= GOAL_OVERHEAD_S)}"
    )
    print(
        "\n| phase | wall s | control plane cores | control plane peak RSS (main) MB | "
        "bench cores | bench peak RSS MB | DB queue probe median / max s | "
        "fleet loop lag median / p90 / max s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, phase in (("idle (fleet connected)", idle), ("baseline", base), ("rollout", roll)):
        res, peaks = phase["resources"], phase["rss_peak"]
        print(
            f"| {name} | {res['wall_s']:.1f} | {res['server_cores']:.2f} | "
            f"{peaks['server_tree'] / mb:.0f} ({peaks['server_main'] / mb:.0f}) | "
            f"{res['bench_cores']:.2f} | {peaks['bench'] / mb:.0f} | {_probe(phase)} | "
            f"{_lag(phase)} |"
        )
    if results["replicas"] > 1:
        print("\nper replica (the first builds and takes the operator calls), cores / peak RSS "
              "of its tree MB:\n")  # fmt: skip
        print("| phase | " + " | ".join(f"replica {i}" for i in range(results["replicas"])) + " |")
        print("|---|" + "---:|" * results["replicas"])
        for name, phase in (("idle", idle), ("baseline", base), ("rollout", roll)):
            res, peaks = phase["resources"], phase["rss_peak"]
            cells = [
                f"{cores:.2f} / {peaks.get(f'replica{i}_tree', 0) / mb:.0f}"
                for i, cores in enumerate(res["replica_cores"])
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
    two = results.get("rollout_two_models")
    again = results.get("rollout_one_model_again")
    if two is not None and again is not None:
        _two_models_report(roll, two, again)
    stats = results["fleet"]["stats"]
    print(
        f"\nfleet: {stats['telemetry_uploads']:,} telemetry uploads, "
        f"{stats['telemetry_failures']:,} failed; {stats['status_reports']:,} status reports; "
        f"errors {stats['errors'] or 'none'}"
    )
    if RETRIED:
        print(f"baseline AssignModel calls repeated after UNAVAILABLE: {len(RETRIED)} "
              f"({RETRIED[0]})")  # fmt: skip


def _two_models_report(one: dict[str, Any], two: dict[str, Any], again: dict[str, Any]) -> None:
    """The two-model rollout (3.0.0) between the one-model rollouts before
    (2.0.0) and after it (4.0.0): A-B-A, so drift over the run is not charged
    to the second model. Goal: no slower than the one-model rollouts' mean,
    within their own difference (the noise this run shows) or 5 s and 10 %,
    whichever is larger."""
    rates = [r["rate_window_per_min"] or math.inf for r in (one, two, again)]
    overheads = [r["overhead_s"] for r in (one, two, again)]
    walls = [r["wall_s"] for r in (one, two, again)]
    cores = [r["resources"]["server_cores"] for r in (one, two, again)]
    one_rate = (rates[0] + rates[2]) / 2
    one_overhead = (overheads[0] + overheads[2]) / 2
    print(
        f"\nevery device holding two models ({MODEL} and {SECOND_MODEL}), rollout of 3.0.0, "
        f"between one-model rollouts of 2.0.0 before and 4.0.0 after ({SECOND_MODEL} removed):"
    )
    print("| | one model (2.0.0) | two models (3.0.0) | one model again (4.0.0) | "
          "two / mean of one |\n|---|---:|---:|---:|---:|")  # fmt: skip
    print(f"| notification rate (window) | {_rate(rates[0])} | {_rate(rates[1])} | "
          f"{_rate(rates[2])} | {rates[1] / one_rate:.2f} |")  # fmt: skip
    print(f"| overhead beyond bakes and installs s | {overheads[0]:.1f} | {overheads[1]:.1f} | "
          f"{overheads[2]:.1f} | {overheads[1] - one_overhead:+.1f} s |")  # fmt: skip
    print(f"| wall s | {walls[0]:.1f} | {walls[1]:.1f} | {walls[2]:.1f} | "
          f"{walls[1] / ((walls[0] + walls[2]) / 2):.2f} |")  # fmt: skip
    print(f"| control plane cores | {cores[0]:.2f} | {cores[1]:.2f} | {cores[2]:.2f} | - |")
    overhead_noise = max(5.0, abs(overheads[0] - overheads[2]))
    rate_noise = max(0.10, abs(rates[0] - rates[2]) / one_rate)
    met = overheads[1] - one_overhead <= overhead_noise and rates[1] >= (1 - rate_noise) * one_rate
    print(
        f"  goal: no slower with two models than with one (their mean): overhead "
        f"{overheads[1] - one_overhead:+.1f} s (noise {overhead_noise:.1f} s), rate "
        f"{rates[1] / one_rate:.2f}x (noise {rate_noise:.0%}): {_met(met)}"
    )


def compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The before/after table of --before: the same fleet code and phases,
    one control plane (or set of replicas) after the other."""
    b, a = before["rollout"], after["rollout"]

    def row(name: str, get: Callable[[dict[str, Any]], float | None], fmt: str) -> None:
        vb, va = get(b), get(a)
        shown = [("instant" if v is None else format(v, fmt)) for v in (vb, va)]
        ratio = f"{va / vb:.2f}" if va is not None and vb else "-"
        print(f"| {name} | {shown[0]} | {shown[1]} | {ratio} |")

    print(f"\n## Before / after ({after['replicas']} replica(s), {after['agents']:,} devices)\n")
    print("| | before | after | after / before |\n|---|---:|---:|---:|")
    row("notification rate, window (/min)", lambda r: r["rate_window_per_min"], ",.0f")
    row("notification rate, from stage start (/min)",
        lambda r: r["rate_from_start_per_min"], ",.0f")  # fmt: skip
    row("overhead beyond bakes and installs s", lambda r: r["overhead_s"], ".1f")
    row("rollout wall s", lambda r: r["wall_s"], ".1f")
    row("create (plan) s", lambda r: r["create_s"], ".2f")
    row("control plane cores (rollout)", lambda r: r["resources"]["server_cores"], ".2f")
    base = [before["baseline"]["rate_window_per_min"], after["baseline"]["rate_window_per_min"]]
    print(f"| baseline AssignModel rate, window (/min) | {_rate(base[0])} | {_rate(base[1])} | - |")
    for name, r in (("before", before), ("after", after)):
        roll = r["rollout"]
        rate = roll["rate_window_per_min"] or math.inf
        rate_start = roll["rate_from_start_per_min"] or math.inf
        print(
            f"  {name}: rate goal >= {GOAL_PER_MIN:,}/min {_met(rate >= GOAL_PER_MIN)} "
            f"(from stage start {_met(rate_start >= GOAL_PER_MIN)}); overhead goal <= "
            f"{GOAL_OVERHEAD_S:g} s {_met(roll['overhead_s'] <= GOAL_OVERHEAD_S)}; "
            f"load average at start {', '.join(f'{v:.2f}' for v in r['load_avg'])}"
        )


def _probe(phase: dict[str, Any]) -> str:
    q = phase.get("queue_probe", {})
    return f"{q['median_s']:.2f} / {q['max_s']:.2f}" if q.get("n") else "-"


def _lag(phase: dict[str, Any]) -> str:
    q = phase.get("fleet_lag", {})
    return f"{q['median_s']:.3f} / {q['p90_s']:.3f} / {q['max_s']:.2f}" if q.get("n") else "-"


# ------------------------------------------------------------------ main


class SpreadFleet(Fleet):
    """A Fleet whose agents are spread over several control-plane replicas,
    round robin (agent i talks to addresses[i % len(addresses)]), each
    replica with its own channels of up to agents_per_channel agents."""

    def __init__(self, addresses: Sequence[str], *args: Any, **kwargs: Any) -> None:
        super().__init__(addresses[0], *args, **kwargs)
        self.addresses = list(addresses)

    async def start(self, *, wait: bool = True, timeout_s: float | None = None) -> None:
        if len(self.addresses) == 1:
            await super().start(wait=wait, timeout_s=timeout_s)
            return
        if self._tasks:
            raise FleetError("the fleet is already started")
        self._started = time.monotonic()
        n = len(self.addresses)
        stubs: list[list[device_pb2_grpc.DeviceServiceAsyncStub]] = []
        for i, address in enumerate(self.addresses):
            share = len(self.agents[i::n])
            channels = [
                grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                for _ in range(max(1, math.ceil(share / self.agents_per_channel)))
            ]
            self._channels += channels
            stubs.append([device_pb2_grpc.DeviceServiceStub(c) for c in channels])
        for agent in self.agents:
            replica = stubs[agent.index % n]
            # Plain text: Enroll and the device RPCs share a channel.
            agent.stub = agent.enroll_stub = replica[(agent.index // n) // self.agents_per_channel]
        self._run_agents()
        if wait:
            try:
                await self.wait_connected(timeout_s)
            except BaseException:
                await self.stop()
                raise


def recreate_database(url: str) -> None:
    """DROP and CREATE the PostgreSQL database of `url` (--fresh-db: each
    control plane starts from an empty one)."""
    import psycopg
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = target.set(drivername="postgresql", database="postgres")
    name = target.database
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def engine_command(checkout: Path) -> str:
    """`edgefleet` from another checkout (--before): this Python with the
    checkout's proto/ first on PYTHONPATH, so `edgefleet` (proto/edgefleet
    and its links to controlplane/ and the rest) is imported from there."""
    launcher = "import sys; from edgefleet.console import edgefleet; sys.exit(edgefleet())"
    return shlex.join(["env", f"PYTHONPATH={checkout / 'proto'}", sys.executable, "-c", launcher])


async def run(
    args: argparse.Namespace, root: Path, engine: str = "after", edgefleet_cmd: str | None = None
) -> dict[str, Any]:
    """Every phase against `args.replicas` control-plane processes
    (`edgefleet_cmd`, else this checkout's) on one database, with a fleet of
    its own."""
    if args.fresh_db:
        recreate_database(args.db)
    servers: list[subprocess.Popen[bytes]] = []
    addresses: list[str] = []
    data_dirs = [root / f"cp{i}" for i in range(args.replicas)]
    # One at a time: the first migrates the database, the next find it ready.
    # The first builds (the builds are waited for on it); the rest build nothing.
    for i, data in enumerate(data_dirs):
        server, address = start_control_plane(
            data, args.db, args.server_heartbeat_s, build_workers=1 if i == 0 else 0,
            edgefleet_cmd=edgefleet_cmd,
        )  # fmt: skip
        servers.append(server)
        addresses.append(address)
    pids = [server.pid for server in servers]
    rss = PeakRss(pids)
    rss.start()
    fleet: Fleet | None = None
    results: dict[str, Any] = {
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}, db {'SQLite' if not args.db else args.db.split(':')[0]}"
        ),
        "date": dt.date.today().isoformat(),
        "engine": engine,
        "edgefleet_cmd": edgefleet_cmd or "",
        "replicas": args.replicas,
        "load_avg": os.getloadavg(),
        "agents": args.agents,
        "stages": args.stages,
        "bake_s": args.bake_s,
        "heartbeat_s": args.heartbeat_s,
        "telemetry_s": args.telemetry_s,
    }
    try:
        # Operator calls go to the first replica; which replica drives the
        # rollout is the orchestrator's lease's business.
        op = operator_stub(addresses[0], ADMIN_TOKEN)
        for stub in [operator_stub(a, ADMIN_TOKEN) for a in addresses]:
            wait_for(functools.partial(healthy, stub), 60, what="the control plane")
        t0 = time.monotonic()
        token = setup(op, root, second_model=args.two_models)
        print(f"classes and versions pushed and built in {time.monotonic() - t0:.1f} s", flush=True)
        profile = make_profile(args.heartbeat_s, args.telemetry_s)
        fleet = SpreadFleet(
            addresses, token, profile, n=args.agents, prefix=f"ro{uuid.uuid4().hex[:6]}",
            seed=args.seed, heartbeat_interval_s=args.heartbeat_s,
            telemetry_interval_s=args.telemetry_s,
        )  # fmt: skip
        progress = Progress(fleet)
        probe = Probe(op)
        print(
            f"starting {args.agents:,} simulated agents on {len(addresses)} replica(s)", flush=True
        )
        results["enroll_s"] = await enroll(fleet, args.timeout_s, progress)
        # Thousands of long-lived agents: without this a full collection over
        # them stalls the event loop (see fleetsim.fleet), skewing the stamps.
        gc.collect()
        gc.freeze()
        print(f"all connected in {results['enroll_s']:.1f} s; {args.idle_s:g} s idle", flush=True)
        probe.start()
        rss.reset()
        idle = Window(pids)
        await asyncio.sleep(args.idle_s)
        results["idle"] = {
            "resources": idle.close(),
            "rss_peak": dict(rss.peaks),
            "queue_probe": probe.summary(idle.wall0, time.monotonic()),
            "fleet_lag": probe.lag_summary(idle.wall0, time.monotonic()),
        }
        print("baseline: AssignModel 1.0.0 to every device", flush=True)
        results["baseline"] = await baseline(op, fleet, pids, rss, args.timeout_s, progress, probe)
        print(f"  all committed {results['baseline']['all_committed_s']:.1f} s after the first "
              f"call", flush=True)  # fmt: skip
        # Let the devices' last status reports and the presence flush settle,
        # so the rollout starts from a quiet control plane.
        await asyncio.sleep(args.settle_s)
        print("rollout: 2.0.0", flush=True)
        results["rollout"] = await rollout(op, fleet, profile, pids, rss, args, progress, probe)
        if args.two_models:
            await asyncio.sleep(args.settle_s)
            print(f"a second model on every device: AssignModel {SECOND_MODEL} 1.0.0", flush=True)
            results["second_model"] = await baseline(
                op, fleet, pids, rss, args.timeout_s, progress, probe, model=SECOND_MODEL
            )
            await asyncio.sleep(args.settle_s)
            print(f"rollout: 3.0.0, every device also holding {SECOND_MODEL}", flush=True)
            results["rollout_two_models"] = await rollout(
                op, fleet, profile, pids, rss, args, progress, probe, version="3.0.0"
            )
            # A-B-A: one model again, so drift over the run (a database that
            # grew, a warmer cache) shows as the gap between the two
            # one-model rollouts instead of being charged to the second model.
            await asyncio.sleep(args.settle_s)
            print(f"{SECOND_MODEL} removed from every device: UnassignModel", flush=True)
            await unassign_everywhere(op, fleet, SECOND_MODEL, args.timeout_s)
            await asyncio.sleep(args.settle_s)
            print("rollout: 4.0.0, one model again", flush=True)
            results["rollout_one_model_again"] = await rollout(
                op, fleet, profile, pids, rss, args, progress, probe, version="4.0.0"
            )
        probe.stop()
        results["fleet"] = fleet.summary().to_dict()
        return results
    except BaseException:
        for i, data in enumerate(data_dirs):
            print(f"--- control plane {i} log (tail) ---\n{log_tail(data)}", file=sys.stderr)
        raise
    finally:
        rss.stop()
        if fleet is not None:
            await fleet.stop()
        # The next engine's run (--before) starts a fleet of its own.
        gc.unfreeze()
        for server in servers:
            stop_process(server)
        if args.keep:
            keep = args.keep / engine if args.before else args.keep
            for data in data_dirs:
                dest = keep / data.name if len(data_dirs) > 1 else keep
                shutil.copytree(data, dest, dirs_exist_ok=True)
            print(f"control plane data kept in {keep}", file=sys.stderr)


# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; every phase with 20 devices and short bakes. Figures meaningless.
# The two-model rollout is left out: its four more real builds and second
# rollout cost CI a minute and more; tests/integration/test_fleetsim.py and
# bench_models_per_device's smoke run cover devices holding two models.
SMOKE = {"agents": 20, "stages": [50.0, 100.0], "bake_s": 0.5, "idle_s": 1.0, "settle_s": 0.5,
         "timeout_s": 120.0, "two_models": False}  # fmt: skip


def _stages(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or values[-1] != 100 or any(b <= a for a, b in itertools.pairwise(values)):
        raise argparse.ArgumentTypeError("increasing percentages ending with 100, e.g. 1,10,50,100")
    if values[0] <= 0:
        raise argparse.ArgumentTypeError("percentages must be positive")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--db", help="SQLAlchemy URL for the control plane (default: SQLite)")
    parser.add_argument(
        "--stages",
        type=_stages,
        default=[1.0, 10.0, 50.0, 100.0],
        help="cumulative %% of the cohort each stage reaches (default 1,10,50,100)",
    )
    parser.add_argument("--bake-s", type=float, default=5.0, help="bake time of every stage")
    parser.add_argument(
        "--heartbeat-s", type=float, default=30.0, help="the simulated agents' heartbeat interval"
    )
    parser.add_argument(
        "--telemetry-s", type=float, default=30.0, help="the simulated agents' telemetry interval"
    )
    parser.add_argument(
        "--server-heartbeat-s",
        type=int,
        default=30,
        help="the control plane's --heartbeat-interval",
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="seconds measured with the fleet connected and idle",
    )
    parser.add_argument(
        "--settle-s", type=float, default=5.0, help="pause between the baseline and the rollout"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="limit for each phase")
    parser.add_argument("--seed", default="bench-rollout", help="the fleet's random seed")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", type=Path, help="copy the control plane's data dir here")
    parser.add_argument(
        "--one-model",
        dest="two_models",
        action="store_false",
        help=f"skip the two-model rollout (3.0.0, every device also holding {SECOND_MODEL}) "
        "and the one-model rollout of 4.0.0 after it",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="control-plane processes on the one database (> 1 needs --db PostgreSQL); the "
        "agents are spread over them round robin, operator calls go to the first",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="CHECKOUT",
        help="also run every phase, after this checkout's, with the control plane of another "
        "checkout (e.g. a git worktree of the previous engine); the same fleet code, a fresh "
        "fleet and database; then a before/after table",
    )
    parser.add_argument(
        "--fresh-db",
        action="store_true",
        help="DROP and CREATE the --db database before each control plane starts (a scratch "
        "PostgreSQL database; needed with --before and --db)",
    )
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    if args.agents < 10:
        parser.error("--agents must be at least 10")
    postgres = bool(args.db) and args.db.startswith("postgresql")
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.replicas > 1 and not postgres:
        parser.error("--replicas > 1 needs --db postgresql+psycopg://... (replicas share it)")
    if args.fresh_db and not postgres:
        parser.error("--fresh-db needs --db postgresql+psycopg://...")
    if args.before and args.db and not args.fresh_db:
        parser.error("--before with --db needs --fresh-db (each control plane an empty database)")
    if args.before and not (args.before / "proto" / "edgefleet" / "console.py").is_file():
        parser.error(f"--before {args.before}: no edgefleet checkout (proto/edgefleet/console.py)")
    with tempfile.TemporaryDirectory(prefix="edgefleet-rollout-") as tmp:
        try:
            asyncio.run(engines(args, Path(tmp)))
        except FleetError as exc:
            raise SystemExit(f"the fleet could not connect: {exc}") from None


async def engines(args: argparse.Namespace, root: Path) -> None:
    """This checkout's control plane; with --before, then the other
    checkout's, in the same run, and the before/after table. Each report
    (and the JSON) as soon as its run ends, so a failed second run keeps
    the first's figures."""
    results = await run(args, root / "after")
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if not args.before:
        return
    print(f"\n# before: the control plane of {args.before}\n", flush=True)
    await asyncio.sleep(args.settle_s)
    before = await run(args, root / "before", "before", engine_command(args.before.resolve()))
    report(before)
    compare(before, results)
    if args.json:
        both = {"after": results, "before": before}
        args.json.write_text(json.dumps(both, indent=2, default=str))


if __name__ == "__main__":
    main()
