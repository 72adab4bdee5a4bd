"""Soak benchmark: N simulated devices (fleetsim) for M minutes against one
real control plane while operators work it, with a bare grpc.aio echo
server driven from the same process at the same time as the baseline.

Starts `edgefleet server` (embedded SQLite in a temp dir, or `--db URL`, e.g.
PostgreSQL) with one build worker and bench/echo_server.py, each its own
process. Creates the two device classes of bench_rollout (ONNX Runtime,
matched on arch) and pushes digits 1.0.0 and 2.0.0 (seeds 0 and 1), which
really build. Then, in this process:

1. setup: `--agents` SimAgents enroll and open their Sync streams;
   AssignModel puts every device on 1.0.0; `--echo-agents` more SimAgents
   hold Sync streams to the echo server, heartbeating at the same interval;
2. the soak, `--minutes` long: heartbeats every `--heartbeat-s` (default
   15 s, the control plane's default) and telemetry every `--telemetry-s`
   (default 30 s, ditto) while the operators' loops run, each closed (one
   call in flight, the next when it is due):
   - staged rollouts back and forth between the two versions: stages of
     10 % (approval required), 50 %, 100 %, each baking `--bake-s`; created
     as a draft and started, paused once the first device committed and
     resumed `--pause-s` later, approved after stage 1; every
     `--revert-every`-th rollout is aborted with revert once stage 2 has a
     committed device (the fleet then stays on its version; the next rollout
     waits until the revert is done), the rollout
     polled every 2 s with GetRollout(summary_only) and read whole (every
     device row) every 30 s;
   - a label change on a random device every `--label-every-s`
     (UpdateDeviceLabels), timed until that device's stream delivers the
     DesiredState carrying it (the push latency);
   - GetDevice of a random device, ListAuditLog (limit 50), QueryTelemetry
     (request counts by model version, last 10 minutes, 1-minute steps),
     ListDevices (the whole fleet, page by page) at their own intervals (QUERY_EVERY_S);
   - `--watchers` WatchFleet streams, counting the events they receive;
3. the drain: the agents make no new telemetry but keep resending what they
   hold, at their interval, until every sample is acked (or `--drain-s`);
   then the fleet stops and the stored telemetry is read from the database.

`--probe-agents` of the devices (200) and `--probe-echo-agents` echo agents
(100) run in a probe process of their own (bench/soak_probe.py) at the
control plane's priority, while this process, once everything has
started, lowers itself `--generator-nice` steps (10): it stands in for
devices with CPUs of their own.

With `--workers N` (> 1) the control plane is `edgefleet server --workers N`:
a supervisor and N worker processes serving the same port. Its own
figures are then scraped from every worker and added up, and its "main
process" RSS is the sum of the workers' (the tree holds the supervisor and
the build workers too).

Figures:

- sync latency: every heartbeat's round trip on its Sync stream (the agent
  decides to send -> its HeartbeatAck is read), per minute and overall
  (p50/p95/p99/max), and the same for the echo agents. In this process
  the echo figure is what the load generator adds by itself (at 10,000
  devices: seconds). The goal (p99 < 100 ms) is judged on the probe's
  devices, whose echo agents show what their own process adds;
- push latency: UpdateDeviceLabels sent -> that device's stream receives the
  DesiredState carrying the new label (missed: not within `--push-timeout-s`);
- control plane resources every 10 s (psutil): RSS of the main process and
  of its tree (the build worker), CPU cores; "stable": first- vs last-minute
  mean RSS and the least-squares slope in MB/min after `--warmup-s`;
- what the control plane measures of itself (its /metrics at the soak's
  start and end): event-loop lag, rollout orchestrator ticks, GC pauses;
- telemetry: per device, the seqs stored must be distinct, within what the
  agent made, contiguous unless the agent dropped some at its buffer bound
  (fleetsim keeps 30 samples), and stored + dropped == produced. Upload
  attempts refused (RESOURCE_EXHAUSTED: shed) and samples sent again are
  counted;
- each operator action: calls, errors by code, p50/p99 call time.

    python -m bench.bench_soak --agents 2000 --minutes 3        # a first try
    python -m bench.bench_soak                                 # 10,000 devices, 10 minutes
    python -m bench.bench_soak --db postgresql+psycopg://user@host/db --json soak.json
    python -m bench.bench_soak --smoke --json smoke.json       # CI: ~1 min, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import create_engine, text

from bench.common import (
    ADMIN_TOKEN,
    ASSIGN_BATCH,
    MODEL,
    Progress,
    cpu_seconds,
    enroll,
    every_device_on,
    free_port,
    healthy,
    log_tail,
    make_profile,
    rss_bytes,
    setup,
    start_control_plane,
    start_echo_server,
    stop_process,
    worker_pids,
)
from bench.jsonout import json_safe
from bench.latencies import Latencies, latency_summary
from bench.soak_probe import Probe, TelemetryTally
from edgefleet.controlplane import gc_policy
from edgefleet.controlplane.client.connection import CHANNEL_OPTIONS, bearer_metadata, operator_stub
from edgefleet.polling import wait_for
from edgefleet.sim import Fleet, FleetError, FleetProfile, SimAgent
from edgefleet.v1 import device_pb2, operator_pb2, operator_pb2_grpc
from testkit.metrics import (
    HistogramScrape,
    histogram_summary,
    merge_histograms,
    scrape_gauge,
    scrape_histograms,
)

GOAL_P99_MS = 100.0
LABEL_KEY = "soak"
VERSIONS = ("1.0.0", "2.0.0")
# Seconds between the operators' queries (each its own closed loop).
QUERY_EVERY_S = {"GetDevice": 2.0, "ListAuditLog": 5.0, "QueryTelemetry": 10.0,
                 "ListDevices": 30.0}  # fmt: skip
ROLLOUT_POLL_S = 2.0
# A poller's whole read of the rollout (every member row), between summaries.
FULL_ROLLOUT_EVERY_S = 30.0
RPC_TIMEOUT_S = 60.0
TERMINAL = (operator_pb2.ROLLOUT_STATE_SUCCEEDED, operator_pb2.ROLLOUT_STATE_ABORTED)
# What the control plane measures of itself (controlplane/loop_lag.py, the
# orchestrator's ticks, gc_policy's pauses), read from its /metrics at the
# soak's start and end.
SERVER_HISTOGRAMS = {
    "loop_lag": "edgefleet_event_loop_lag_seconds",
    "rollout_tick": "edgefleet_rollout_tick_seconds",
    "gc_full": 'edgefleet_gc_pause_seconds{generation="2"}',
    "gc_young": 'edgefleet_gc_pause_seconds{generation="0"}',
    "gc_middle": 'edgefleet_gc_pause_seconds{generation="1"}',
}


@dataclass
class SoakConfig:
    """The knobs of one soak (the CLI's flags)."""

    agents: int = 10_000
    minutes: float = 10.0
    heartbeat_s: float = 15.0
    telemetry_s: float = 30.0
    echo_agents: int = 500
    # Of `agents`, how many run in the probe process (bench/soak_probe.py),
    # with how many echo agents beside them.
    probe_agents: int = 200
    probe_echo_agents: int = 100
    # How much lower than the control plane and the probe this process runs
    # (os nice steps): it stands in for devices with CPUs of their own.
    generator_nice: int = 10
    bake_s: float = 10.0
    pause_s: float = 5.0
    revert_every: int = 3
    label_every_s: float = 1.0
    query_every_s: dict[str, float] = field(default_factory=lambda: dict(QUERY_EVERY_S))
    watchers: int = 2
    push_timeout_s: float = 10.0
    warmup_s: float = 60.0
    sample_every_s: float = 10.0
    drain_s: float = 300.0
    rollout_timeout_s: float = 600.0
    setup_timeout_s: float = 900.0
    seed: str = "bench-soak"
    # The control plane's worker processes (`edgefleet server --workers`).
    workers: int = 1


# --smoke: the run CI makes (tests/e2e/test_soak_smoke.py) so the benchmark
# cannot rot: 50 devices (5 in the probe) for 20 s with every operator loop,
# fast enough that each part runs a few times. Figures meaningless.
SMOKE = SoakConfig(
    agents=50, minutes=20 / 60, heartbeat_s=0.5, telemetry_s=0.5, echo_agents=10,
    probe_agents=5, probe_echo_agents=3, bake_s=0.5, pause_s=0.5, revert_every=2,
    label_every_s=0.2,
    query_every_s={"GetDevice": 1.0, "ListAuditLog": 1.0, "QueryTelemetry": 1.0,
                   "ListDevices": 2.0},
    watchers=2, push_timeout_s=10.0, warmup_s=5.0, sample_every_s=2.0, drain_s=30.0,
    setup_timeout_s=120.0,
)  # fmt: skip


# ------------------------------------------------------------------ statistics


def slope_per_min(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value per minute."""
    if len(points) < 2:
        return math.nan
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return math.nan
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var


# ------------------------------------------------------------------ resources


class Sampler:
    """Every `every_s` seconds, on a thread (the event loop is busy): the
    control plane's RSS (main process, or with `workers` > 1 the workers'
    sum, and tree) and CPU cores since the previous sample, this process's
    likewise, and the fleet's counters."""

    def __init__(
        self, server_pid: int, every_s: float, fleet: Fleet, t0: float, workers: int = 1
    ) -> None:
        self.server_pid = server_pid
        self.workers = workers
        self.every_s = every_s
        self.fleet = fleet
        self.t0 = t0
        self.rows: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._last = (time.monotonic(), 0.0, 0.0)

    def _run(self) -> None:
        self._last = (time.monotonic(), self._cpu(True), self._cpu(False))
        while not self._stop.wait(self.every_s):
            self.sample()

    def _cpu(self, server: bool) -> float:
        # The control plane is not this process's child when it runs in it
        # (soak() given an in-process server): then only the main process counts.
        if server:
            return cpu_seconds(self.server_pid, tree=self.server_pid != os.getpid())
        return cpu_seconds(os.getpid(), tree=False)

    def _main_rss(self) -> dict[str, float]:
        if self.workers == 1:
            return {"server_rss_mb": rss_bytes(self.server_pid, tree=False) / 1e6}
        # The supervisor only watches its workers: they are the control plane.
        pids = worker_pids(self.server_pid)
        return {"server_rss_mb": sum(rss_bytes(p, tree=False) for p in pids) / 1e6,
                "server_workers": len(pids)}  # fmt: skip

    def sample(self) -> None:
        now, server_cpu, bench_cpu = time.monotonic(), self._cpu(True), self._cpu(False)
        wall = max(1e-9, now - self._last[0])
        stats = self.fleet.ctx.stats
        self.rows.append({
            "t_s": now - self.t0,
            **self._main_rss(),
            "server_tree_rss_mb": rss_bytes(self.server_pid, tree=True) / 1e6,
            "server_cores": (server_cpu - self._last[1]) / wall,
            "bench_rss_mb": rss_bytes(os.getpid(), tree=False) / 1e6,
            "bench_cores": (bench_cpu - self._last[2]) / wall,
            "heartbeats": stats.heartbeats,
            "telemetry_uploads": stats.telemetry_uploads,
            "telemetry_failures": stats.telemetry_failures,
            "telemetry_shed": stats.errors["UploadTelemetry RESOURCE_EXHAUSTED"],
            "online": sum(a.online for a in self.fleet.agents),
        })  # fmt: skip
        self._last = (now, server_cpu, bench_cpu)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def rss_stability(
    rows: Sequence[dict[str, float]], warmup_s: float, end_s: float
) -> dict[str, Any]:
    """First- vs last-minute mean RSS and the slope after warm-up, for the
    control plane's main process (or its workers' sum) and its tree."""
    out: dict[str, Any] = {}
    for key in ("server_rss_mb", "server_tree_rss_mb"):
        first = [r[key] for r in rows if r["t_s"] <= 60.0]
        last = [r[key] for r in rows if end_s - 60.0 <= r["t_s"] <= end_s]
        after = [(r["t_s"], r[key]) for r in rows if warmup_s <= r["t_s"] <= end_s]
        out[key] = {
            "first_minute_mb": sum(first) / len(first) if first else math.nan,
            "last_minute_mb": sum(last) / len(last) if last else math.nan,
            "max_mb": max((r[key] for r in rows), default=math.nan),
            "slope_mb_per_min": slope_per_min(after),
            "samples_after_warmup": len(after),
        }
    return out


# ------------------------------------------------------------------ operators


def _finished(rollout: Any) -> bool:
    """Terminal and done: an aborted rollout still reverting is not, and
    holds its devices until it is (the next rollout would be refused)."""
    return rollout.state in TERMINAL and rollout.HasField("finished_at")


def _waiting_approval(rollout: Any) -> bool:
    return bool(rollout.state == operator_pb2.ROLLOUT_STATE_WAITING_APPROVAL)


class Operators:
    """The operators' loops over one channel, each call counted by name with
    its errors by status code and its call time."""

    def __init__(
        self, address: str, token: str, fleet: Fleet, cfg: SoakConfig, pushes: Latencies,
        rng: random.Random,
    ) -> None:  # fmt: skip
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub: Any = operator_pb2_grpc.OperatorServiceStub(self.channel)
        self.md = bearer_metadata(token)
        self.fleet = fleet
        self.cfg = cfg
        self.rng = rng
        self.pushes = pushes
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.call_s: defaultdict[str, list[float]] = defaultdict(list)
        self.rollouts: Counter[str] = Counter()
        self.watch_events: Counter[str] = Counter()
        self.push_missed = 0
        self.timeline: list[tuple[float, str]] = []
        # device id -> (label value, when UpdateDeviceLabels was sent)
        self._waiting: dict[str, tuple[str, float]] = {}
        self._labels = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.classes: list[str] = []
        self.version = VERSIONS[0]

    async def call(self, name: str, request: Any, label: str = "") -> Any:
        """Call `name` with `request`; the response, or None on an error.
        Counted and timed as `label` (default: `name`)."""
        started = time.monotonic()
        try:
            response = await getattr(self.stub, name)(
                request, metadata=self.md, timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            self.errors[f"{label or name} {exc.code().name}"] += 1
            return None
        self.calls[label or name] += 1
        self.call_s[label or name].append(time.monotonic() - started)
        if name not in self.cfg.query_every_s and name not in ("GetRollout", "UpdateDeviceLabels"):
            # The rollouts' steps, to line up with the latencies.
            self.timeline.append((round(started - self.pushes.t0, 2), name))
        return response

    # -------------------------------------------------------------- pushes

    def on_desired(self, agent: SimAgent, desired: device_pb2.DesiredState) -> None:
        """fleetsim's hook: a DesiredState reached `agent`."""
        waiting = self._waiting.get(agent.device_id)
        if waiting is not None and desired.labels.get(LABEL_KEY) == waiting[0]:
            del self._waiting[agent.device_id]
            self.pushes.add(time.monotonic() - waiting[1])

    async def label_loop(self) -> None:
        agents = self.fleet.agents
        while True:
            self._expire()
            agent = agents[self.rng.randrange(len(agents))]
            if agent.device_id in self._waiting:
                await asyncio.sleep(self.cfg.label_every_s)
                continue
            self._labels += 1
            value = f"u{self._labels}"
            self._waiting[agent.device_id] = (value, time.monotonic())
            request = operator_pb2.UpdateDeviceLabelsRequest(
                id=agent.device_id, set={LABEL_KEY: value}
            )
            if await self.call("UpdateDeviceLabels", request) is None:
                self._waiting.pop(agent.device_id, None)
            await asyncio.sleep(self.cfg.label_every_s)

    def _expire(self) -> None:
        limit = time.monotonic() - self.cfg.push_timeout_s
        for device_id, (_, sent) in list(self._waiting.items()):
            if sent < limit:
                del self._waiting[device_id]
                self.push_missed += 1

    # -------------------------------------------------------------- queries

    def _random_id(self) -> str:
        return self.fleet.agents[self.rng.randrange(len(self.fleet.agents))].device_id

    def _query(self, name: str) -> Any:
        if name == "GetDevice":
            return operator_pb2.GetDeviceRequest(id=self._random_id())
        if name == "ListAuditLog":
            return operator_pb2.ListAuditLogRequest(limit=50)
        if name == "ListDevices":
            return operator_pb2.ListDevicesRequest(labels={"fleetsim": self.fleet.prefix})
        now = dt.datetime.now(dt.UTC)
        start, end = Timestamp(), Timestamp()
        start.FromDatetime(now - dt.timedelta(minutes=10))
        end.FromDatetime(now)
        request = operator_pb2.QueryTelemetryRequest(
            metric=operator_pb2.TELEMETRY_METRIC_REQUEST_COUNT,
            group_by=operator_pb2.TELEMETRY_GROUP_BY_MODEL_VERSION,
            start=start, end=end, model_name=MODEL,
        )  # fmt: skip
        request.step.FromSeconds(60)
        return request

    async def query_loop(self, name: str, every_s: float) -> None:
        while True:
            if name == "ListDevices":
                await self._list_fleet()
            else:
                await self.call(name, self._query(name))
            await asyncio.sleep(every_s)

    async def _list_fleet(self) -> None:
        """The whole fleet, page by page (each page a timed call), as the
        TUI's device screen reads it; a walk that misses or repeats a device
        counts as an error."""
        request = self._query("ListDevices")
        seen: list[str] = []
        while True:
            page = await self.call("ListDevices", request)
            if page is None:
                return
            seen += (device.id for device in page.devices)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        if sorted(seen) != sorted(agent.device_id for agent in self.fleet.agents):
            self.errors["ListDevices walk incomplete"] += 1

    async def watch_loop(self) -> None:
        while True:
            stream = self.stub.WatchFleet(operator_pb2.WatchFleetRequest(), metadata=self.md)
            try:
                async for event in stream:
                    self.watch_events[event.kind] += 1
            except grpc.aio.AioRpcError as exc:
                self.errors[f"WatchFleet {exc.code().name}"] += 1
            finally:
                stream.cancel()
            await asyncio.sleep(1.0)  # then watch again, as a TUI would

    # -------------------------------------------------------------- rollouts

    async def _poll(self, rollout_id: str, done: Callable[[Any], bool], deadline: float) -> Any:
        """GetRollout every ROLLOUT_POLL_S until `done(rollout)`, a terminal
        state or `deadline` (monotonic); the last rollout read. A summary
        (counts, no rows) but every FULL_ROLLOUT_EVERY_S: what a watching
        operator's screen needs."""
        summary = operator_pb2.GetRolloutRequest(id=rollout_id, summary_only=True)
        whole = operator_pb2.GetRolloutRequest(id=rollout_id)
        rollout: Any = None
        last_whole = -math.inf
        while True:
            if time.monotonic() - last_whole >= FULL_ROLLOUT_EVERY_S:
                last_whole = time.monotonic()
                got = await self.call("GetRollout", whole, "GetRollout (whole)")
            else:
                got = await self.call("GetRollout", summary)
            rollout = got if got is not None else rollout
            if rollout is not None and (done(rollout) or _finished(rollout)):
                return rollout
            if time.monotonic() >= deadline:
                return rollout if rollout is not None else operator_pb2.Rollout()
            await asyncio.sleep(ROLLOUT_POLL_S)

    async def _settled(self) -> None:
        """Until no device is between versions (an update under way)."""
        still = ("idle", "committed", "failed")
        await self.fleet.wait_until(
            lambda f: all(a.update_state in still for a in f.agents), interval=1.0
        )

    def _spec(self, version: str) -> operator_pb2.RolloutSpec:
        spec = operator_pb2.RolloutSpec(
            model_name=MODEL, model_version=version, class_names=self.classes
        )
        for i, percent in enumerate((10.0, 50.0, 100.0)):
            stage = spec.stages.add(name=f"s{i + 1}", percent=percent, require_approval=i == 0)
            stage.bake_time.FromMilliseconds(int(self.cfg.bake_s * 1000))
        return spec

    async def rollout_loop(self) -> None:
        """Rollouts back and forth between the versions, forever."""
        cycle = 0
        while True:
            await self._settled()
            cycle += 1
            target = VERSIONS[1] if self.version == VERSIONS[0] else VERSIONS[0]
            revert = self.cfg.revert_every > 0 and cycle % self.cfg.revert_every == 0
            created = await self.call(
                "CreateRollout", operator_pb2.CreateRolloutRequest(spec=self._spec(target))
            )
            if created is None:
                await asyncio.sleep(5.0)
                continue
            rid = created.rollout.id
            deadline = time.monotonic() + self.cfg.rollout_timeout_s
            action = operator_pb2.RolloutActionRequest(id=rid, reason="soak")
            await self.call("StartRollout", action)
            rollout = await self._poll(
                rid, lambda r: bool(r.stages) and r.stages[0].committed > 0, deadline
            )
            if rollout.state not in TERMINAL:
                await self.call("PauseRollout", action)
                await asyncio.sleep(self.cfg.pause_s)
                await self.call("ResumeRollout", action)
            rollout = await self._poll(rid, _waiting_approval, deadline)
            if _waiting_approval(rollout):
                await self.call("ApproveRolloutStage", action)
            if revert:
                rollout = await self._poll(
                    rid, lambda r: r.current_stage >= 1 and r.stages[1].committed > 0, deadline
                )
                if rollout.state not in TERMINAL:
                    abort = operator_pb2.AbortRolloutRequest(id=rid, reason="soak", revert=True)
                    await self.call("AbortRollout", abort)
            rollout = await self._poll(rid, lambda r: False, deadline)
            if rollout.state in TERMINAL:
                state = operator_pb2.RolloutState.Name(rollout.state)
                outcome = state.removeprefix("ROLLOUT_STATE_").lower()
            else:  # stuck: give up on it, keeping what the devices run
                outcome = "timed out"
                abort = operator_pb2.AbortRolloutRequest(id=rid, reason="soak: timed out")
                await self.call("AbortRollout", abort)
            self.rollouts[outcome + (" (revert)" if revert else "")] += 1
            if rollout.state == operator_pb2.ROLLOUT_STATE_SUCCEEDED:
                self.version = target
            # A revert's assignments go out after the abort: let them start.
            await asyncio.sleep(2 * ROLLOUT_POLL_S)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        loops: list[Awaitable[None]] = [self.rollout_loop(), self.label_loop()]
        loops += [self.query_loop(n, s) for n, s in self.cfg.query_every_s.items()]
        loops += [self.watch_loop() for _ in range(self.cfg.watchers)]
        self._tasks = [asyncio.ensure_future(loop) for loop in loops]

    async def stop(self) -> None:
        """End every loop and close the channel. Idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                self.errors[f"loop {type(result).__name__}: {result}"] += 1
        self._expire()
        self.push_missed += len(self._waiting)  # still waiting at the end
        self._waiting.clear()
        await self.channel.close(None)

    def summary(self) -> dict[str, Any]:
        names = sorted(set(self.calls) | {k.split()[0] for k in self.errors})
        return {
            "calls": dict(sorted(self.calls.items())),
            "errors": dict(sorted(self.errors.items())),
            "call_ms": {
                n: {k: v for k, v in latency_summary(self.call_s[n]).items()
                    if k in ("count", "p50_ms", "p99_ms")}
                for n in names
            },
            "rollouts": dict(sorted(self.rollouts.items())),
            "watch_events": dict(sorted(self.watch_events.items())),
            "timeline": self.timeline,
            "label_updates": self._labels,
            "push_missed": self.push_missed,
        }  # fmt: skip


# ------------------------------------------------------------------ telemetry


def stored_seqs(db_url: str) -> dict[str, list[int]]:
    """Device id -> the telemetry seqs the database holds."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, seq FROM telemetry"))
            out: dict[str, list[int]] = defaultdict(list)
            for device_id, seq in rows:
                out[device_id].append(int(seq))
            return out
    finally:
        engine.dispose()


def telemetry_accounting(
    agents: Sequence[SimAgent | TelemetryTally], stored: dict[str, list[int]]
) -> dict[str, Any]:
    """Every sample each agent made against what the database holds for its
    device: distinct seqs within what it made, contiguous unless it dropped
    some, stored + dropped == produced (where dropped is what fleetsim gave
    up: pushed out by its buffer bound or refused whole)."""
    problems: list[str] = []
    produced = dropped = kept = pending = 0
    for agent in agents:
        seqs = stored.get(agent.device_id, [])
        distinct = set(seqs)
        produced += agent.telemetry_produced
        dropped += agent.telemetry_dropped
        kept += len(seqs)
        pending += agent.pending_samples
        why = ""
        if len(distinct) != len(seqs):
            why = f"{len(seqs) - len(distinct)} duplicated"
        elif seqs and (min(distinct) < 1 or max(distinct) > agent.telemetry_seq):
            why = f"seqs {min(distinct)}..{max(distinct)} outside 1..{agent.telemetry_seq}"
        elif len(seqs) + agent.telemetry_dropped != agent.telemetry_produced:
            why = (f"stored {len(seqs)} + dropped {agent.telemetry_dropped} != produced "
                   f"{agent.telemetry_produced} ({agent.pending_samples} still held)")  # fmt: skip
        elif not agent.telemetry_dropped and distinct != set(range(1, len(seqs) + 1)):
            why = "gaps although none was dropped"
        if why:
            problems.append(f"{agent.name} ({agent.device_id}): {why}")
    ours = {a.device_id for a in agents}
    foreign = sum(len(v) for k, v in stored.items() if k not in ours)
    return {
        "devices": len(agents),
        "produced": produced,
        "stored": kept,
        "dropped_by_bound_or_refused": dropped,
        "still_held": pending,
        "foreign_rows": foreign,
        "devices_with_problems": len(problems),
        "problems": problems[:20],
        "ok": not problems and kept + dropped == produced,
    }


# ------------------------------------------------------------------ the soak


async def assign_all(
    address: str,
    token: str,
    fleet: Fleet,
    version: str,
    timeout_s: float,
    probe: Probe | None = None,
) -> float:
    """AssignModel `version` to every device (the probe's too), ASSIGN_BATCH
    per call; seconds until every device committed it."""
    t0 = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub: Any = operator_pb2_grpc.OperatorServiceStub(channel)
        ids = [a.device_id for a in fleet.agents] + (probe.device_ids if probe else [])
        for start in range(0, len(ids), ASSIGN_BATCH):
            request = operator_pb2.AssignModelRequest(
                device_ids=ids[start : start + ASSIGN_BATCH], model_name=MODEL,
                model_version=version, reason="soak setup",
            )  # fmt: skip
            await stub.AssignModel(request, metadata=bearer_metadata(token), timeout=300)

    await fleet.wait_until(
        lambda f: every_device_on(f, version), timeout_s, interval=0.5,
        what=f"every device on {version}",
    )  # fmt: skip
    if probe is not None:
        await probe.wait_version(version, timeout_s)
    return time.monotonic() - t0


def lower_priority(by: int) -> None:
    """Every thread of this process (and those it starts later) `by` nice
    steps below where it is: Linux keeps a nice value per thread."""
    if by <= 0:
        return
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            now = os.getpriority(os.PRIO_PROCESS, int(tid))
            os.setpriority(os.PRIO_PROCESS, int(tid), min(19, now + by))


async def soak(
    cfg: SoakConfig,
    *,
    address: str,
    token: str,
    admin_token: str,
    echo_address: str,
    db_url: str,
    server_pid: int,
    profile: FleetProfile,
    metrics_urls: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The soak against a control plane that has the classes and both
    versions built (see the module docstring); every figure as a dict.
    With `metrics_urls` (its Prometheus endpoints, one per worker) also
    what the control plane measured of itself over the soak, summed over
    the workers."""
    run_id = uuid.uuid4().hex[:6]
    t_setup = time.monotonic()
    # Reset when the soak's clock starts: setup's figures are not counted.
    heartbeats = Latencies(t_setup)
    echo = Latencies(t_setup)
    pushes = Latencies(t_setup)
    rng = random.Random(cfg.seed)
    fleet = Fleet(
        address, token, profile, n=cfg.agents - cfg.probe_agents, prefix=f"soak{run_id}",
        seed=cfg.seed,
        heartbeat_interval_s=cfg.heartbeat_s, telemetry_interval_s=cfg.telemetry_s,
        on_heartbeat_ack=lambda _, rtt: heartbeats.add(rtt),
    )  # fmt: skip
    operators = Operators(address, admin_token, fleet, cfg, pushes, rng)
    fleet.ctx.on_desired = operators.on_desired
    # No telemetry (the echo server refuses it): heartbeats only.
    echo_fleet = Fleet(
        echo_address, "echo", profile, n=cfg.echo_agents, prefix=f"echo{run_id}", seed=cfg.seed,
        heartbeat_interval_s=cfg.heartbeat_s, telemetry_interval_s=1e9,
        on_heartbeat_ack=lambda _, rtt: echo.add(rtt),
    )  # fmt: skip
    sampler: Sampler | None = None
    probe: Probe | None = None
    workdir = tempfile.TemporaryDirectory(prefix="edgefleet-soak-probe-")
    thresholds = gc.get_threshold()  # restored after: soak() may run inside another program
    results: dict[str, Any] = {"config": asdict(cfg), "workers": cfg.workers}
    try:
        progress = Progress(fleet)
        say(f"starting {cfg.agents:,} simulated agents and {cfg.echo_agents:,} echo agents")
        enroll_s = await enroll(fleet, cfg.setup_timeout_s, progress)
        await echo_fleet.start(timeout_s=cfg.setup_timeout_s)
        if cfg.probe_agents or cfg.probe_echo_agents:
            probe = await Probe.start(
                address=address, token=token, echo_address=echo_address,
                profile=profile.to_dict(), agents=cfg.probe_agents,
                echo_agents=cfg.probe_echo_agents, prefix=f"probe{run_id}",
                heartbeat_s=cfg.heartbeat_s, telemetry_s=cfg.telemetry_s,
                workdir=Path(workdir.name), timeout_s=cfg.setup_timeout_s, drain_s=cfg.drain_s,
            )  # fmt: skip
        # Below the control plane and the probe (which started at this
        # process's priority): the generator stands in for devices that
        # have CPUs of their own and take none of the control plane's.
        lower_priority(cfg.generator_nice)
        say(f"  connected in {enroll_s:.1f} s; AssignModel {VERSIONS[0]} to every device")
        assign_s = await assign_all(
            address, admin_token, fleet, VERSIONS[0], cfg.setup_timeout_s, probe
        )
        say(f"  every device committed {VERSIONS[0]} {assign_s:.1f} s after the first call")
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            listed = await operator_pb2_grpc.OperatorServiceStub(channel).ListDeviceClasses(
                operator_pb2.ListDeviceClassesRequest(), metadata=bearer_metadata(admin_token)
            )
        operators.classes = sorted(c.name for c in listed.classes)
        # Thousands of long-lived agents: without this a full collection over
        # them stalls the event loop (see fleetsim.fleet), skewing the stamps.
        # The control plane's policy (freeze, then a large young generation):
        # the same stalls come from what the soak itself keeps making.
        gc_policy.tune_for_serving()
        results["setup"] = {"enroll_s": enroll_s, "assign_s": assign_s,
                            "total_s": time.monotonic() - t_setup}  # fmt: skip

        duration = cfg.minutes * 60.0
        t0 = time.monotonic()
        # Every t_s of the figures counts from here: this lines them up with
        # the control plane's log and audit entries.
        results["soak_started_at"] = dt.datetime.now(dt.UTC).isoformat()
        for series in (heartbeats, echo, pushes):
            series.reset(t0)
        if probe is not None:
            await probe.start_clock(t0)
        sampler = Sampler(server_pid, cfg.sample_every_s, fleet, t0, cfg.workers)
        sampler.start()
        scraped = await _scrape(metrics_urls)
        operators.start()
        stats = fleet.ctx.stats
        progress.start("soak", lambda f: (
            f"{len(heartbeats.values):,} heartbeats acked, "
            f"{sum(operators.calls.values()):,} operator calls "
            f"({sum(operators.errors.values())} errors), rollouts {dict(operators.rollouts)}, "
            f"telemetry {stats.telemetry_uploads:,} uploads / {stats.telemetry_failures:,} "
            f"refused"
        ))  # fmt: skip
        say(f"soak: {cfg.minutes:g} min, heartbeats every {cfg.heartbeat_s:g} s, telemetry "
            f"every {cfg.telemetry_s:g} s, operators at work")  # fmt: skip
        await asyncio.sleep(duration)
        soak_end = time.monotonic() - t0
        # The probe drains its devices' telemetry while this process does.
        probed = asyncio.create_task(probe.finish(cfg.drain_s + 60)) if probe else None
        ended = await _scrape(metrics_urls)
        # How the kernel spread the streams' connections over the workers.
        streams = await asyncio.gather(*(
            asyncio.to_thread(scrape_gauge, u, "edgefleet_sync_streams") for u in metrics_urls
        ))  # fmt: skip
        own = {name: histogram_summary(scraped[m], ended[m])
               for name, m in SERVER_HISTOGRAMS.items() if m in scraped and m in ended}  # fmt: skip
        await operators.stop()
        produced_at_end = stats.telemetry_produced

        fleet.drain_telemetry()
        say(f"drain: resending {fleet.pending_samples():,} held samples (at most "
            f"{cfg.drain_s:g} s)")  # fmt: skip
        progress.start("drain", lambda f: f"{f.pending_samples():,} samples held")
        drain_t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await fleet.wait_until(lambda f: f.pending_samples() == 0, cfg.drain_s, interval=0.5)
        drain_s = time.monotonic() - drain_t0
        progress.stop()
        sampler.stop()
        await fleet.stop()
        await echo_fleet.stop()

        minutes = max(1, math.ceil(cfg.minutes - 1e-9))
        for row in sampler.rows:  # to line the resources up with the latencies
            window = heartbeats.window(row["t_s"] - cfg.sample_every_s, row["t_s"])
            row["sync_p99_ms"] = latency_summary(window)["p99_ms"]
        trips = round_trips(heartbeats, echo, soak_end, minutes)
        # Short windows, to line slow moments up with the operators' timeline.
        trips["sync"]["per_5s"] = heartbeats.series(5.0, soak_end)
        probe_results = await probed if probed is not None else None
        stored = await asyncio.to_thread(stored_seqs, db_url)
        tallies = [TelemetryTally(**t) for t in probe_results["tallies"]] if probe_results else []
        accounting = telemetry_accounting([*fleet.agents, *tallies], stored)
        accounting.update({
            "produced_during_soak": produced_at_end,
            "drain_s": drain_s,
            "uploads": stats.telemetry_uploads,
            "upload_failures": stats.telemetry_failures,
            "upload_errors": {k.split(" ", 1)[1]: v for k, v in stats.errors.items()
                              if k.startswith("UploadTelemetry ")},
            "shed_resource_exhausted": stats.errors["UploadTelemetry RESOURCE_EXHAUSTED"],
            "samples_resent": stats.telemetry_resends,
            "fleetsim_buffer_bound": "30 samples per device (fleetsim.agent.MAX_PENDING_SAMPLES)",
            "dropped_by_bound": stats.telemetry_dropped,
            "refused_whole": stats.telemetry_refused,
        })  # fmt: skip
        results.update({
            "soak_s": soak_end,
            **trips,
            "push": {
                "overall": latency_summary(pushes.window(0, math.inf)),
                "per_minute": pushes.per_minute(minutes),
                "missed": operators.push_missed,
            },
            "resources": {
                "server_rss_mb_of": ("the main process" if cfg.workers == 1
                                     else f"the sum of the {cfg.workers} worker processes"),
                "samples": sampler.rows,
                "rss": rss_stability(sampler.rows, cfg.warmup_s, soak_end),
                "server_cores_mean": _mean([r["server_cores"] for r in sampler.rows
                                            if r["t_s"] <= soak_end]),
                "bench_cores_mean": _mean([r["bench_cores"] for r in sampler.rows
                                           if r["t_s"] <= soak_end]),
            },
            "operators": operators.summary(),
            "telemetry": accounting,
            "fleet": fleet.summary().to_dict(),
            "echo_fleet_errors": dict(echo_fleet.ctx.stats.errors),
            "server_metrics": own,
            "server_sync_streams": streams,
        })  # fmt: skip
        if probe_results is not None:
            results["probe"] = probe_summary(probe_results, t0, soak_end, minutes)
        return results
    finally:
        if sampler is not None:
            sampler.stop()
        if probe is not None:
            await probe.close()
        workdir.cleanup()
        await operators.stop()
        await fleet.stop()
        await echo_fleet.stop()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


async def _scrape(urls: Sequence[str]) -> dict[str, HistogramScrape]:
    names = tuple(SERVER_HISTOGRAMS.values())
    scrapes = await asyncio.gather(*(asyncio.to_thread(scrape_histograms, u, names) for u in urls))
    return merge_histograms(scrapes)


def round_trips(sync: Latencies, echo: Latencies, soak_end: float, minutes: int) -> dict[str, Any]:
    """Sync round trips and the echo baseline taken beside them, over the
    soak: overall and per minute, their ratio, and the goal."""
    hb = latency_summary(sync.window(0, soak_end))
    ec = latency_summary(echo.window(0, soak_end))
    return {
        "sync": {"overall": hb, "per_minute": sync.per_minute(minutes),
                 "goal_p99_ms": GOAL_P99_MS, "met": hb["p99_ms"] < GOAL_P99_MS},
        "echo": {"overall": ec, "per_minute": echo.per_minute(minutes)},
        "ratio_cp_echo": {q: hb[q] / ec[q] if ec[q] else math.nan
                          for q in ("p50_ms", "p95_ms", "p99_ms")},
    }  # fmt: skip


def probe_summary(
    probed: dict[str, Any], t0: float, soak_end: float, minutes: int
) -> dict[str, Any]:
    """The probe's results (bench/soak_probe.py): its round trips summed up
    as the soak's own are; the goal is judged on them."""
    sync, echo = Latencies(t0), Latencies(t0)
    sync.extend(*probed["sync"])
    echo.extend(*probed["echo"])
    return {
        "devices": len(probed["tallies"]),
        **round_trips(sync, echo, soak_end, minutes),
        "uploads": probed["uploads"],
        "upload_failures": probed["upload_failures"],
        "errors": probed["errors"],
    }  # fmt: skip


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ------------------------------------------------------------------ report


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _le_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:g}"


def report(results: dict[str, Any]) -> None:
    """The human summary."""
    cfg = results["config"]
    sync, echo, push = results["sync"], results["echo"], results["push"]
    res, tel, ops = results["resources"], results["telemetry"], results["operators"]
    print("\n## Soak results\n")
    print(results.get("machine", ""))
    print(f"{cfg['agents']:,} devices (+{cfg['echo_agents']} echo agents) for "
          f"{results['soak_s'] / 60:.1f} min; heartbeats every {cfg['heartbeat_s']:g} s, "
          f"telemetry every {cfg['telemetry_s']:g} s; setup {results['setup']['total_s']:.0f} s "
          f"(+ builds {results.get('build_s', 0):.0f} s)")  # fmt: skip
    workers = results.get("workers", 1)
    if workers == 1:
        print("control plane: one process\n")
    else:
        print(f"control plane: {workers} worker processes (--workers {workers}); its own figures "
              f"below are over all of them, its RSS (main) is theirs summed\n")  # fmt: skip
    print("| minute | heartbeats | sync p50 ms | p95 | p99 | max | echo p99 ms | pushes | "
          "push p99 ms | CP RSS MB | CP cores |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = res["samples"]
    for m, (s, e, p) in enumerate(zip(sync["per_minute"], echo["per_minute"],
                                      push["per_minute"], strict=True)):  # fmt: skip
        inside = [r for r in rows if 60 * m < r["t_s"] <= 60 * (m + 1)]
        rss = _mean([r["server_rss_mb"] for r in inside])
        cores = _mean([r["server_cores"] for r in inside])
        print(f"| {m + 1} | {s['count']:,.0f} | {_ms(s['p50_ms'])} | {_ms(s['p95_ms'])} | "
              f"{_ms(s['p99_ms'])} | {_ms(s['max_ms'])} | {_ms(e['p99_ms'])} | "
              f"{p['count']:.0f} | {_ms(p['p99_ms'])} | {_ms(rss)} | {cores:.2f} |")  # fmt: skip
    o, e = sync["overall"], echo["overall"]
    ratio = results["ratio_cp_echo"]
    print(
        f"\nsync round trip, the load generator's devices: p50 {_ms(o['p50_ms'])} / "
        f"p95 {_ms(o['p95_ms'])} / "
        f"p99 {_ms(o['p99_ms'])} / max {_ms(o['max_ms'])} ms over {o['count']:,.0f} "
        f"heartbeats; goal p99 < {GOAL_P99_MS:g} ms: {'met' if sync['met'] else 'NOT met'}"
    )
    print(
        f"  echo (same process, same time): p50 {_ms(e['p50_ms'])} / p95 {_ms(e['p95_ms'])} / "
        f"p99 {_ms(e['p99_ms'])} / max {_ms(e['max_ms'])} ms over {e['count']:,.0f}; "
        f"CP/echo p50 {ratio['p50_ms']:.2f}x, p99 {ratio['p99_ms']:.2f}x"
    )
    if "probe" in results:
        pr = results["probe"]
        o, e, ratio = pr["sync"]["overall"], pr["echo"]["overall"], pr["ratio_cp_echo"]
        print(
            f"sync round trip, the probe's {pr['devices']} devices (a process of their own, "
            f"bench/soak_probe.py): p50 {_ms(o['p50_ms'])} / p95 {_ms(o['p95_ms'])} / "
            f"p99 {_ms(o['p99_ms'])} / max {_ms(o['max_ms'])} ms over {o['count']:,.0f}; "
            f"goal p99 < {GOAL_P99_MS:g} ms: {'met' if pr['sync']['met'] else 'NOT met'}"
        )
        print(f"  the probe's echo agents: p50 {_ms(e['p50_ms'])} / p99 {_ms(e['p99_ms'])} / "
              f"max {_ms(e['max_ms'])} ms over {e['count']:,.0f}; CP/echo p99 "
              f"{ratio['p99_ms']:.2f}x")  # fmt: skip
    own = results.get("server_metrics") or {}
    if len(results.get("server_sync_streams") or ()) > 1:
        print(
            "  sync streams per worker at the end: "
            + " / ".join(f"{n:,.0f}" for n in results["server_sync_streams"] if n is not None)
        )
    if "loop_lag" in own:
        lag = own["loop_lag"]
        print(f"  the control plane's event loop, late by (bucket bounds): p50 <= "
              f"{_le_ms(lag['p50_le_s'])}, p99 <= {_le_ms(lag['p99_le_s'])}, p99.9 <= "
              f"{_le_ms(lag['p999_le_s'])} ms over {lag['count']:,.0f} probes")  # fmt: skip
    if "rollout_tick" in own:
        tick = own["rollout_tick"]
        print(f"  rollout orchestrator: {tick['count']:,.0f} ticks, p50 <= "
              f"{_le_ms(tick['p50_le_s'])} / p99 <= {_le_ms(tick['p99_le_s'])} ms, busy "
              f"{100 * tick['sum_s'] / results['soak_s']:.0f} % of the soak")  # fmt: skip
    for key, name in (("gc_full", "full"), ("gc_middle", "generation-1"),
                      ("gc_young", "young")):  # fmt: skip
        if key in own:
            g = own[key]
            print(f"  {name} garbage collections: {g['count']:,.0f}, p50 <= "
                  f"{_le_ms(g['p50_le_s'])} / p99 <= {_le_ms(g['p99_le_s'])} ms, "
                  f"{g['sum_s']:.1f} s in all")  # fmt: skip
    po = push["overall"]
    print(f"push (label change -> DesiredState on the device): p50 {_ms(po['p50_ms'])} / "
          f"p99 {_ms(po['p99_ms'])} / max {_ms(po['max_ms'])} ms over {po['count']:.0f}, "
          f"missed {push['missed']}")  # fmt: skip
    main = "main process" if workers == 1 else f"{workers} workers summed"
    for key, name in (("server_rss_mb", main), ("server_tree_rss_mb", "tree, with build workers")):
        r = res["rss"][key]
        print(f"control plane RSS ({name}): first minute {_ms(r['first_minute_mb'])} MB, last "
              f"minute {_ms(r['last_minute_mb'])} MB, max {_ms(r['max_mb'])} MB, slope after "
              f"{cfg['warmup_s']:g} s {r['slope_mb_per_min']:+.2f} MB/min")  # fmt: skip
    print(f"CPU: control plane {res['server_cores_mean']:.2f} cores, this process "
          f"{res['bench_cores_mean']:.2f} cores (means over the soak)")  # fmt: skip
    print(f"telemetry: produced {tel['produced']:,}, stored {tel['stored']:,}, dropped at the "
          f"buffer bound {tel['dropped_by_bound']:,}, refused whole {tel['refused_whole']:,}, "
          f"still held {tel['still_held']:,} after a {tel['drain_s']:.0f} s drain")  # fmt: skip
    print(
        f"  uploads {tel['uploads']:,} ok, {tel['upload_failures']:,} refused "
        f"({tel['upload_errors'] or 'none'}); samples sent again {tel['samples_resent']:,}"
    )
    print(f"  stored + dropped == produced, per device: "
          f"{'yes' if tel['ok'] else 'NO: ' + '; '.join(tel['problems'][:3])}")  # fmt: skip
    print(f"operators: {ops['calls']}")
    print(f"  errors: {ops['errors'] or 'none'}; rollouts {ops['rollouts']}; "
          f"watch events {sum(ops['watch_events'].values()):,}")  # fmt: skip
    print(
        "  call ms p50/p99: "
        + ", ".join(f"{n} {_ms(v['p50_ms'])}/{_ms(v['p99_ms'])}" for n, v in ops["call_ms"].items())
    )


# ------------------------------------------------------------------ main


async def run(args: argparse.Namespace, cfg: SoakConfig, root: Path) -> dict[str, Any]:
    data = root / "cp"
    metrics_port = free_port(cfg.workers)
    server, address = start_control_plane(
        data, args.db, max(1, round(cfg.heartbeat_s)), metrics_port, cfg.workers
    )
    echo_proc, echo_address = start_echo_server(root / "echo")
    try:
        op = operator_stub(address, ADMIN_TOKEN)
        wait_for(lambda: healthy(op), 60, what="the control plane")
        t0 = time.monotonic()
        token = setup(op, root)
        build_s = time.monotonic() - t0
        print(f"classes, 2 versions pushed and built in {build_s:.1f} s", flush=True)
        db_url = args.db or f"sqlite:///{(data / 'edgefleet.db').resolve()}"
        results = await soak(
            cfg, address=address, token=token, admin_token=ADMIN_TOKEN,
            echo_address=echo_address, db_url=db_url, server_pid=server.pid,
            profile=make_profile(cfg.heartbeat_s, cfg.telemetry_s),
            metrics_urls=[f"http://127.0.0.1:{metrics_port + i}/metrics"
                          for i in range(cfg.workers)],
            say=lambda line: print(line, flush=True),
        )  # fmt: skip
        results["build_s"] = build_s
        return results
    except BaseException:
        print(f"--- control plane log (tail) ---\n{log_tail(data)}", file=sys.stderr)
        raise
    finally:
        stop_process(server)
        stop_process(echo_proc)
        if args.keep:
            shutil.copytree(data, args.keep, dirs_exist_ok=True)
            print(f"control plane data kept in {args.keep}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    d = SoakConfig()
    add("--agents", type=int, default=d.agents)
    add("--minutes", type=float, default=d.minutes)
    add("--db", help="SQLAlchemy URL for the control plane (default: SQLite in a temp dir)")
    add("--heartbeat-s", type=float, default=d.heartbeat_s, help="the agents' heartbeat interval")
    add("--telemetry-s", type=float, default=d.telemetry_s, help="the agents' telemetry interval")
    add("--echo-agents", type=int, default=d.echo_agents, help="agents on the echo baseline")
    add("--probe-agents", type=int, default=d.probe_agents,
        help="of --agents, how many run in the probe process (0: no probe)")  # fmt: skip
    add("--probe-echo-agents", type=int, default=d.probe_echo_agents,
        help="echo agents in the probe process")  # fmt: skip
    add("--generator-nice", type=int, default=d.generator_nice,
        help="nice steps this process runs below the control plane and the probe")  # fmt: skip
    add("--bake-s", type=float, default=d.bake_s, help="bake time of every rollout stage")
    add("--pause-s", type=float, default=d.pause_s, help="how long each rollout stays paused")
    add("--revert-every", type=int, default=d.revert_every,
        help="abort with revert every n-th rollout (0: never)")  # fmt: skip
    add("--label-every-s", type=float, default=d.label_every_s, help="label change interval")
    add("--watchers", type=int, default=d.watchers, help="WatchFleet streams")
    add("--push-timeout-s", type=float, default=d.push_timeout_s)
    add("--warmup-s", type=float, default=d.warmup_s, help="left out of the RSS slope")
    add("--drain-s", type=float, default=d.drain_s, help="longest drain of held telemetry")
    add("--seed", default=d.seed)
    add("--workers", type=int, default=d.workers,
        help="the control plane's worker processes (edgefleet server --workers)")  # fmt: skip
    add("--json", type=Path, default=Path("soak-results.json"), help="write every figure here")
    add("--keep", type=Path, help="copy the control plane's data dir here")
    add("--smoke", action="store_true", help="CI's short run (SMOKE; the size flags are ignored)")
    args = parser.parse_args(argv)
    if args.agents < 10 or args.minutes <= 0:
        parser.error("--agents must be at least 10 and --minutes positive")
    if not 0 <= args.probe_agents < args.agents:
        parser.error("--probe-agents must be at least 0 and fewer than --agents")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    cfg = SoakConfig(
        agents=args.agents, minutes=args.minutes, heartbeat_s=args.heartbeat_s,
        telemetry_s=args.telemetry_s, echo_agents=args.echo_agents,
        probe_agents=args.probe_agents, probe_echo_agents=args.probe_echo_agents,
        generator_nice=args.generator_nice, bake_s=args.bake_s,
        pause_s=args.pause_s, revert_every=args.revert_every, label_every_s=args.label_every_s,
        watchers=args.watchers, push_timeout_s=args.push_timeout_s, warmup_s=args.warmup_s,
        drain_s=args.drain_s, seed=args.seed, workers=args.workers,
    )  # fmt: skip
    if args.smoke:
        cfg = SMOKE
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="edgefleet-soak-") as tmp:
        try:
            results = asyncio.run(run(args, cfg, Path(tmp)))
        except FleetError as exc:
            raise SystemExit(f"the fleet could not connect: {exc}") from None
    results["date"] = started.date().isoformat()
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, db {'SQLite' if not args.db else args.db.split(':')[0]}"
    )
    report(results)
    args.json.write_text(json_dumps(results))
    print(f"\nevery figure in {args.json}")


def json_dumps(results: dict[str, Any]) -> str:
    """Every figure as JSON (NaN and infinities as null)."""
    return json.dumps(json_safe(results), indent=2, default=str) + "\n"


if __name__ == "__main__":
    main()
