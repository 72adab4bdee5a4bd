"""Fault-injection scenarios, shared by tests/e2e/test_faults.py (CI sizes) and
bench/bench_faults.py (full sizes, figures for docs/reliability.md).

Each scenario runs the real parts (an `edgefleet server` subprocess, fleetsim
agents on the real protocol or real `edgefleet-agent` processes, SQLite or a
private PostgreSQL), injects one kind of fault, and returns a report: the
figures measured and `problems`, every broken promise it found (empty when
the system held up). Tests assert on the report; the benchmark prints it.

Builds are answered by hand (a fixed result over the pushed ONNX file, as in
test_builds_service): what is under test is what happens after a build, and
the build ladder's minutes would be spent on every run for nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import platform
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
from sqlalchemy import Engine, create_engine, text

from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.services.blobs import BlobStore
from edgefleet.controlplane.services.builds import BuildService
from edgefleet.controlplane.services.events import FleetEvent
from edgefleet.demo.models import mlp_graph
from edgefleet.sim import Fleet, parse_profile
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import inference_pb2, inference_pb2_grpc
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.builds import fake_result
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model
from testkit.private_pg import PrivatePostgres
from testkit.tcp_proxy import TcpProxy

T = TypeVar("T")
MODEL = "faults"
ASSIGN_BATCH = 1_000  # AssignModel's limit per call
# Two kinds of simulated device, one class each (matched on arch).
FLEET_CLASSES = {"pi": "aarch64", "gw": "x86_64"}


def _profile(heartbeat_s: float, telemetry_s: float) -> Any:
    return parse_profile({
        "heartbeat_interval_s": heartbeat_s, "telemetry_interval_s": telemetry_s,
        "classes": [{"name": name, "hardware": {"arch": arch}, "install_s": [0.5, 1.5]}
                    for name, arch in FLEET_CLASSES.items()],
    })  # fmt: skip


# ------------------------------------------------------------------ models and builds


def mlp_model(path: Path, *, hidden: int, seed: int = 0) -> Path:
    """An ONNX MLP (64 -> hidden -> 10) written to `path`: about 300 bytes
    per hidden unit, so its size is chosen (hidden=14_000 is ~4 MiB)."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((64, hidden)) * 0.05, rng.standard_normal((hidden, 10)) * 0.05]
    biases = [np.zeros(hidden), np.zeros(10)]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(mlp_graph(weights, biases, opset=17), path)
    return path


class _NoEvents:
    """The test process's BuildService tells nobody: the control plane reads
    the published artifacts from the database."""

    def publish(self, event: FleetEvent) -> None:
        pass


def db_url_of(cp: ControlPlane) -> str:
    return cp.db_url or sqlite_url(cp.data_dir)


def publish_versions(
    cp: ControlPlane, versions: dict[str, Path], *, timeout_s: float = 120
) -> dict[str, str]:
    """Push each version's ONNX file and answer its build jobs by hand with
    that same file as the chosen artifact (the control plane runs with
    --build-workers 0). Returns version -> artifact digest."""
    op = cp.operator()
    for version, model in versions.items():
        push_model(op, MODEL, version, model_parts(model=model))
    by_digest = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in versions.values()}
    engine = make_engine(db_url_of(cp), pool_size=2)
    # Published into the control plane's blob directory, where it serves them.
    builds = BuildService(Database(engine), BlobStore(cp.data_dir / "blobs"), _NoEvents())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = builds.claim("fault-scenarios", 60)
        if job is not None:
            builds.finish(job, "fault-scenarios", fake_result(by_digest[job.model_digest]), "")
            continue
        listed = op.ListBuilds(o.ListBuildsRequest(model_name=MODEL)).builds
        if listed and all(b.state == o.BUILD_STATE_SUCCEEDED for b in listed):
            engine.dispose()
            return {v: hashlib.sha256(p.read_bytes()).hexdigest() for v, p in versions.items()}
        time.sleep(0.05)
    engine.dispose()
    raise AssertionError("the builds did not all succeed")


def create_classes(op: Any, classes: dict[str, str]) -> None:
    """ONNX Runtime device classes matched on arch (name -> arch)."""
    for name, arch in classes.items():
        op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name=name, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=[arch])],
            )
        )  # fmt: skip


def enrollment_token(op: Any, name: str) -> str:
    return str(op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name=name)).secret)


def assign(op: Any, device_ids: Sequence[str], version: str) -> None:
    for start in range(0, len(device_ids), ASSIGN_BATCH):
        op.AssignModel(o.AssignModelRequest(
            device_ids=list(device_ids[start : start + ASSIGN_BATCH]),
            model_name=MODEL, model_version=version,
        ), timeout=120)  # fmt: skip


def _scalar_rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def _count(engine: Engine, table: str) -> int:
    return int(_scalar_rows(engine, f"SELECT count(*) FROM {table}")[0][0])


async def _poll(
    what: str, check: Callable[[], T | None], timeout_s: float, every: float = 0.2
) -> T:
    """Await `check` (run in a thread: it may block on gRPC) until truthy."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = await asyncio.to_thread(check)
        except grpc.RpcError as exc:  # the control plane is restarting
            last = exc
        else:
            if value:
                return value
            last = value
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {timeout_s:g} s (last: {last!r})")


# ------------------------------------------------------------------ 1. SIGKILL the control plane


@dataclass
class KillReport:
    devices: int
    kills: int
    stages: int
    bake_s: float
    # The same rollout spec without kills, in the same run (None: not run).
    baseline_s: float | None
    rollout_s: float
    # Per kill: seconds from SIGKILL until the restarted process answered,
    # and until every agent held its Sync stream again.
    recover_s: list[float] = field(default_factory=list)
    reconnect_s: list[float] = field(default_factory=list)
    # Per kill: devices committed when it landed (shows where it hit).
    committed_at_kill: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return self.rollout_s / self.baseline_s if self.baseline_s else None


def _rollout_spec(version: str, stages: int, bake_s: float) -> o.RolloutSpec:
    spec = o.RolloutSpec(model_name=MODEL, model_version=version, class_names=list(FLEET_CLASSES))
    for i in range(stages):
        # Cumulative shares growing geometrically to 100 %: 4 stages are
        # 12.5, 25, 50, 100; the first stages are small, as canaries are.
        stage = spec.stages.add(name=f"s{i + 1}", percent=100.0 / 2 ** (stages - 1 - i))
        stage.bake_time.FromSeconds(int(bake_s))
    return spec


def _assignment_seqs(engine: Engine, device_ids: Sequence[str]) -> dict[str, int]:
    rows = _scalar_rows(engine, "SELECT id, assignment_seq FROM devices")
    wanted = set(device_ids)
    return {str(r[0]): int(r[1]) for r in rows if r[0] in wanted}


def check_assigned_once(
    engine: Engine, rollout_id: str, version: str, before: dict[str, int]
) -> list[str]:
    """Every device of `before` took part in the rollout, committed, was
    notified once, and got exactly one new assignment, for `version`."""
    problems: list[str] = []
    members = {
        str(r[0]): r[1:]
        for r in _scalar_rows(engine, "SELECT device_id, state, attempts, sequence FROM "
                              "rollout_devices WHERE rollout_id = :r", r=rollout_id)
    }  # fmt: skip
    missing = sorted(set(before) - set(members))
    if missing:
        problems.append(f"{len(missing)} device(s) missing from the rollout, e.g. {missing[0]}")
    after = _assignment_seqs(engine, list(before))
    current = {
        str(r[0]): (int(r[1]), r[2])
        for r in _scalar_rows(
            engine, "SELECT device_id, sequence, rollout_id FROM device_assignments"
        )
    }  # fmt: skip
    events: dict[str, set[int]] = {}
    for device_id, sequence in _scalar_rows(
        engine, "SELECT device_id, sequence FROM deployment_events WHERE model_version = :v",
        v=version,
    ):  # fmt: skip
        events.setdefault(str(device_id), set()).add(int(sequence))
    counts: Counter[str] = Counter()
    for device_id, seq in before.items():
        state, attempts, sequence = members.get(device_id, ("absent", 0, 0))
        if state != "committed":
            counts[f"not committed ({state})"] += 1
        if attempts != 1:
            counts[f"notified {attempts} times"] += 1
        if after.get(device_id) != seq + 1 or sequence != seq + 1:
            counts["assigned more (or less) than once"] += 1
        if current.get(device_id) != (seq + 1, rollout_id):
            counts["current assignment not the rollout's"] += 1
        if events.get(device_id) != {seq + 1}:
            counts[f"reported {len(events.get(device_id, ()))} assignment(s) of {version}"] += 1
    problems += [f"{n} device(s) {what}" for what, n in sorted(counts.items())]
    return problems


def _reconnected(connects: list[int]) -> Callable[[Fleet], bool]:
    """True once every agent opened a Sync stream more than `connects` says."""

    def check(fleet: Fleet) -> bool:
        return all(a.connects > n for a, n in zip(fleet.agents, connects, strict=True))

    return check


async def kill_control_plane_during_rollout(
    root: Path,
    *,
    devices: int,
    kills: int,
    seed: int = 7,
    stages: int = 4,
    bake_s: float = 6,
    delay_s: tuple[float, float] = (0.5, 2.5),
    baseline: bool = False,
    db_url: str | None = None,
    heartbeat_s: float = 5,
    telemetry_s: float = 10,
    say: Callable[[str], None] = lambda _: None,
) -> KillReport:
    """A staged rollout over `devices` fleetsim agents while the control
    plane is SIGKILLed `kills` times at seeded random moments (each a delay
    spread over the rollout, never sooner than a delay drawn from `delay_s`
    after the fleet was back) and restarted each time.
    With `baseline`, first the same rollout spec runs without kills."""
    rng = random.Random(seed)
    cp = ControlPlane(root / "cp", db_url, "--heartbeat-interval", str(int(heartbeat_s)))
    cp.start()
    fleet: Fleet | None = None
    try:
        op = cp.operator()
        create_classes(op, FLEET_CLASSES)
        versions = ["1.0.0", "2.0.0", "3.0.0"] if baseline else ["1.0.0", "2.0.0"]
        publish_versions(cp, {v: mlp_model(root / "models" / f"{v}.onnx", hidden=8, seed=i)
                              for i, v in enumerate(versions)})  # fmt: skip
        profile = _profile(heartbeat_s, telemetry_s)
        fleet = Fleet(cp.address, enrollment_token(op, "faults"), profile,
                      n=devices, prefix="kill", seed=seed, backoff_initial_s=0.2,
                      backoff_max_s=1.0)  # fmt: skip
        await fleet.start(timeout_s=300)
        ids = [a.device_id for a in fleet.agents]
        say(f"{devices} agents online")
        await asyncio.to_thread(assign, op, ids, versions[0])
        await fleet.wait_until(lambda f: all(a.active_version == versions[0] for a in f.agents),
                               300, what=f"every device on {versions[0]}")  # fmt: skip
        engine = create_engine(db_url_of(cp))

        def succeeded(rollout_id: str) -> Callable[[], o.Rollout | None]:
            def check() -> o.Rollout | None:
                r = cp.operator().GetRollout(o.GetRolloutRequest(id=rollout_id), timeout=10)
                return r if r.state == o.ROLLOUT_STATE_SUCCEEDED else None

            return check

        limit = 120 + stages * bake_s * 4 + kills * 60
        baseline_s = None
        if baseline:
            started = time.monotonic()
            r = op.CreateRollout(o.CreateRolloutRequest(
                spec=_rollout_spec(versions[1], stages, bake_s), start=True)).rollout  # fmt: skip
            await _poll("the baseline rollout", succeeded(r.id), limit)
            baseline_s = time.monotonic() - started
            say(f"baseline rollout (no kills): {baseline_s:.1f} s")
            await fleet.wait_until(lambda f: all(a.active_version == versions[1] for a in f.agents),
                                   120, what=f"every device on {versions[1]}")  # fmt: skip
        target = versions[-1]
        before = _assignment_seqs(engine, ids)
        started = time.monotonic()
        rollout = op.CreateRollout(o.CreateRolloutRequest(
            spec=_rollout_spec(target, stages, bake_s), start=True)).rollout  # fmt: skip
        report = KillReport(devices, kills, stages, bake_s, baseline_s, 0.0)
        # Seeded moments spread over what the rollout takes untouched (the
        # baseline, or its bake times), each at least a delay after the
        # fleet was back from the kill before.
        span = 0.8 * (baseline_s or stages * bake_s)
        moments = sorted(rng.uniform(0, span) for _ in range(kills))
        for k, moment in enumerate(moments):
            gap = rng.uniform(*delay_s)
            await asyncio.sleep(max(gap, started + moment - time.monotonic()))
            state = cp.operator().GetRollout(o.GetRolloutRequest(id=rollout.id), timeout=10)
            if state.state != o.ROLLOUT_STATE_RUNNING:
                report.problems.append(
                    f"the rollout was {o.RolloutState.Name(state.state)} before kill {k + 1}: "
                    "too short for the kills asked (more stages or a longer bake)"
                )
                break
            report.committed_at_kill.append(sum(s.committed for s in state.stages))
            connects = [a.connects for a in fleet.agents]
            killed = time.monotonic()
            cp.kill()
            await asyncio.to_thread(cp.start)
            report.recover_s.append(time.monotonic() - killed)
            await fleet.wait_until(_reconnected(connects), 120, what="every agent reconnected")
            report.reconnect_s.append(time.monotonic() - killed)
            say(f"kill {k + 1}/{kills}: {report.committed_at_kill[-1]} committed; back in "
                f"{report.recover_s[-1]:.1f} s, every agent reconnected in "
                f"{report.reconnect_s[-1]:.1f} s")  # fmt: skip
        await _poll("the rollout", succeeded(rollout.id), limit)
        report.rollout_s = time.monotonic() - started
        say(f"rollout with {len(report.recover_s)} kills: {report.rollout_s:.1f} s")
        try:
            await fleet.wait_until(lambda f: all(a.active_version == target for a in f.agents),
                                   120, what=f"every device on {target}")  # fmt: skip
        except TimeoutError as exc:
            report.problems.append(str(exc))
        report.problems += check_assigned_once(engine, rollout.id, target, before)
        if len({a.hardware_id for a in fleet.agents}) != len(
            _scalar_rows(engine, "SELECT id FROM devices")
        ):
            report.problems.append("the database holds another number of devices than the fleet")
        engine.dispose()
        return report
    finally:
        if fleet is not None:
            await fleet.stop()
        cp.close()


# ------------------------------------------------------------------ 2. PostgreSQL restarted


@dataclass
class WriteLog:
    """Operator writes made under load: which returned OK, which failed and how."""

    ok_tokens: list[str] = field(default_factory=list)
    # device id -> values of the label writes that returned OK, and of all attempted.
    ok_labels: dict[str, list[int]] = field(default_factory=dict)
    tried_labels: dict[str, list[int]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    # time.monotonic() of each OK write, to find recovery times.
    ok_at: list[float] = field(default_factory=list)
    attempts: int = 0


@dataclass
class PgReport:
    devices: int
    restarts: list[str]
    writes: int
    writes_ok: int
    ok_found: int
    failures: dict[str, int]
    # Per restart: seconds from the restart's end to the next OK write.
    recover_s: list[float] = field(default_factory=list)
    # Telemetry rows stored in `settle_s` once every agent was back online.
    telemetry_after: int = 0
    problems: list[str] = field(default_factory=list)


def _write_loop(
    cp: ControlPlane, device_ids: list[str], log: WriteLog, stop: threading.Event
) -> None:
    """Operator writes back to back: a new enrollment token, then a label
    on one device, alternately; every outcome recorded."""
    op = cp.operator()
    i = 0
    while not stop.is_set():
        i += 1
        log.attempts += 1
        try:
            if i % 2:
                op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name=f"w-{i}"), timeout=15)
                log.ok_tokens.append(f"w-{i}")
            else:
                device_id = device_ids[i % len(device_ids)]
                log.tried_labels.setdefault(device_id, []).append(i)
                op.UpdateDeviceLabels(o.UpdateDeviceLabelsRequest(id=device_id, set={"w": str(i)}),
                                      timeout=15)  # fmt: skip
                log.ok_labels.setdefault(device_id, []).append(i)
            log.ok_at.append(time.monotonic())
        except grpc.RpcError as exc:
            log.failures[exc.code().name] += 1
            time.sleep(0.05)


def _written_after(log: WriteLog, moment: float) -> Callable[[], bool]:
    return lambda: any(t > moment for t in log.ok_at)


def check_writes(engine: Engine, log: WriteLog) -> tuple[int, list[str]]:
    """How many OK writes are in the database, and what is wrong."""
    problems: list[str] = []
    names = {str(r[0]) for r in _scalar_rows(engine, "SELECT name FROM enrollment_tokens")}
    lost_tokens = [n for n in log.ok_tokens if n not in names]
    found = len(log.ok_tokens) - len(lost_tokens)
    if lost_tokens:
        problems.append(
            f"{len(lost_tokens)} enrollment token(s) created OK are missing: {lost_tokens[:3]}"
        )
    labels = {str(r[0]): r[1] for r in _scalar_rows(engine, "SELECT id, labels FROM devices")}
    for device_id, oks in log.ok_labels.items():
        value = labels.get(device_id)
        held = int((value if isinstance(value, dict) else _json(value)).get("w", 0))
        # The last OK write, or one tried after it whose outcome is unknown.
        allowed = {oks[-1], *(i for i in log.tried_labels[device_id] if i > oks[-1])}
        if held in allowed:
            found += len(oks)
        else:
            problems.append(
                f"device {device_id} has label w={held}; the last write OK'd was {oks[-1]}"
            )
    return found, problems


def _json(value: Any) -> dict[str, Any]:
    import json

    parsed = json.loads(value) if isinstance(value, str) else {}
    return parsed if isinstance(parsed, dict) else {}


async def restart_postgres_under_load(
    root: Path,
    *,
    devices: int,
    restarts: Sequence[str] = ("fast", "immediate", "stop"),
    outage_s: float = 3.0,
    settle_s: float = 3.0,
    say: Callable[[str], None] = lambda _: None,
) -> PgReport:
    """A control plane on a private PostgreSQL cluster, `devices` fleetsim
    agents sending heartbeats, status and telemetry every second, and an
    operator writing back to back, while the cluster is restarted in each
    mode of `restarts` ("fast", "immediate": pg_ctl restart -m; "stop": an
    immediate stop, `outage_s` down, then start)."""
    pg = PrivatePostgres().start()
    cp = ControlPlane(root / "cp", pg.url, "--heartbeat-interval", "1")
    fleet: Fleet | None = None
    stop = threading.Event()
    writer: threading.Thread | None = None
    try:
        cp.start()
        pid = cp.proc.pid  # type: ignore[union-attr]
        op = cp.operator()
        create_classes(op, FLEET_CLASSES)
        # Fixed 1 s intervals (the control plane's config would slow them).
        fleet = Fleet(cp.address, enrollment_token(op, "load"), _profile(1, 1), n=devices,
                      prefix="pg", seed=1, backoff_initial_s=0.2, backoff_max_s=1.0,
                      heartbeat_interval_s=1, telemetry_interval_s=1)  # fmt: skip
        await fleet.start(timeout_s=120)
        log = WriteLog()
        ids = [a.device_id for a in fleet.agents]
        writer = threading.Thread(target=_write_loop, args=(cp, ids, log, stop),
                                  daemon=True)  # fmt: skip
        writer.start()
        report = PgReport(devices, list(restarts), 0, 0, 0, {})
        await asyncio.sleep(settle_s)
        for mode in restarts:
            if mode == "stop":
                await asyncio.to_thread(pg.stop, "immediate")
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(pg.start)
            else:
                await asyncio.to_thread(pg.restart, mode)
            back = time.monotonic()
            await _poll(f"an OK write after the {mode} restart", _written_after(log, back), 60,
                        every=0.05)  # fmt: skip
            report.recover_s.append(min(t for t in log.ok_at if t > back) - back)
            say(f"PostgreSQL {mode}: first OK write {report.recover_s[-1]:.2f} s after it was back")
            await asyncio.sleep(settle_s)
        stop.set()
        writer.join(30)
        if cp.proc is None or cp.proc.poll() is not None or cp.proc.pid != pid:
            report.problems.append("the control plane did not survive the database restarts")
        engine = create_engine(pg.url)
        marked = _count(engine, "telemetry")
        try:
            await fleet.wait_until(lambda f: f.connections()["online"] == devices, 60,
                                   what="every agent online")  # fmt: skip
            marked = _count(engine, "telemetry")
            await asyncio.sleep(settle_s)
        except TimeoutError as exc:
            report.problems.append(str(exc))
        report.telemetry_after = _count(engine, "telemetry") - marked
        if not report.telemetry_after:
            report.problems.append(f"no telemetry stored in the {settle_s:g} s after the restarts")
        report.writes, report.failures = log.attempts, dict(log.failures)
        report.writes_ok = len(log.ok_tokens) + sum(len(v) for v in log.ok_labels.values())
        report.ok_found, problems = check_writes(engine, log)
        report.problems += problems
        wrong = {code: n for code, n in log.failures.items() if code != "UNAVAILABLE"}
        if wrong:
            report.problems.append(f"writes failed with other codes than UNAVAILABLE: {wrong}")
        engine.dispose()
        return report
    finally:
        stop.set()
        if writer is not None:
            writer.join(30)
        if fleet is not None:
            await fleet.stop()
        cp.close()
        pg.close()


# ------------------------------------------------------------------ real agents


def served(agent: AgentProcess) -> tuple[str, str] | grpc.StatusCode:
    """(version, digest) the agent's inference API serves, after a real
    prediction on it worked; or the error code it answers."""
    with grpc.insecure_channel(f"unix:{agent.state_dir / 'inference.sock'}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            meta = stub.GetModelMetadata(inference_pb2.GetModelMetadataRequest(model_name=MODEL),
                                         timeout=10)  # fmt: skip
            x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
            reply = stub.Predict(inference_pb2.PredictRequest(model_name=MODEL, inputs=[
                c.TensorData(name="input", dtype="float32", shape=[3, 64], data=x.tobytes())]),
                timeout=10)  # fmt: skip
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    if [list(out.shape) for out in reply.outputs] != [[3, 10]]:
        raise AssertionError(f"a prediction of the wrong shape: {reply.outputs}")
    return meta.model_version, meta.artifact_digest


@dataclass
class AgentRig:
    """A control plane (SQLite) with one device class for this machine and
    versions of the MODEL published; agents made by `agent()`."""

    cp: ControlPlane
    token: str
    digests: dict[str, str]
    sizes: dict[str, int]
    root: Path

    def agent(self, name: str, server: str | None = None, **config: Any) -> AgentProcess:
        return AgentProcess(self.root / name, server or self.cp.address, self.token, **config)

    def device_id(self, agent: AgentProcess, timeout: float = 60) -> str:
        return str(agent.wait_for(agent.identity, timeout)["device_id"])

    def assign(self, device_id: str, version: str) -> int:
        (a,) = self.cp.operator().AssignModel(o.AssignModelRequest(
            device_ids=[device_id], model_name=MODEL, model_version=version,
        )).assignments  # fmt: skip
        return int(a.sequence)

    def settled(self, agent: AgentProcess, device_id: str, sequence: int,
                timeout: float = 120) -> c.UpdateStatus:  # fmt: skip
        def done() -> c.UpdateStatus | None:
            with contextlib.suppress(grpc.RpcError):
                u = self.cp.operator().GetDevice(o.GetDeviceRequest(id=device_id), timeout=5).update
                if u.sequence == sequence and of_status(u) in ("committed", "failed"):
                    return u
            return None

        return agent.wait_for(done, timeout)

    def serving(self, agent: AgentProcess, version: str, timeout: float = 30) -> tuple[str, str]:
        want = (version, self.digests[version])
        got = agent.wait_for(lambda: s if (s := served(agent)) == want else None, timeout)
        return got

    def close(self) -> None:
        self.cp.close()


def agent_rig(root: Path, versions: dict[str, int]) -> AgentRig:
    """`versions`: version -> hidden units of its MLP (its size)."""
    cp = ControlPlane(root / "cp", None, "--heartbeat-interval", "1")
    cp.start()
    try:
        op = cp.operator()
        create_classes(op, {"here": platform.machine()})
        models = {v: mlp_model(root / "models" / f"{v}.onnx", hidden=h, seed=i)
                  for i, (v, h) in enumerate(versions.items())}  # fmt: skip
        digests = publish_versions(cp, models)
        sizes = {v: p.stat().st_size for v, p in models.items()}
        return AgentRig(cp, enrollment_token(op, "agents"), digests, sizes, root)
    except BaseException:
        cp.close()
        raise


# ------------------------------------------------------------------ 3. network cuts


@dataclass
class NetworkReport:
    artifact_bytes: int
    cut_after_bytes: int
    # Connections reset during the download, and bytes the proxy carried
    # towards the agent meanwhile (the artifact, framing, sync traffic).
    download_cuts: int
    download_bytes_down: int
    telemetry_flaps: int
    offline_s: float
    max_buffered: int
    produced: int  # samples the agent numbered
    stored: int  # telemetry rows the control plane holds for the device
    duplicates: int
    missing: list[int]
    dropped: int  # samples the agent's buffer dropped
    problems: list[str] = field(default_factory=list)

    @property
    def redownloaded_bytes(self) -> int:
        return max(0, self.download_bytes_down - self.artifact_bytes)


def _buffer_state(agent: AgentProcess) -> tuple[int, list[int], int]:
    """(next_seq, seqs still buffered, dropped_total) from the agent's
    telemetry buffer on disk (read-only; WAL lets the agent keep writing)."""
    path = agent.state_dir / "telemetry.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        pending = [int(r[0]) for r in db.execute("SELECT seq FROM samples ORDER BY seq")]
    return int(meta["next_seq"]), pending, int(meta["dropped_total"])


def cut_network(
    rig: AgentRig,
    *,
    new_version: str,
    cut_after_bytes: int,
    flaps: int = 6,
    offline_s: float = 2.0,
    seed: int = 3,
    via: str = "http",
    say: Callable[[str], None] = lambda _: None,
) -> NetworkReport:
    """A real agent reaches the control plane through a TcpProxy. Its
    download of `new_version` runs with every connection reset after
    `cut_after_bytes` bytes towards it (so it only finishes by resuming);
    then the link flaps `flaps` times (a reset; every other one an outage
    of `offline_s` in which telemetry must wait in the agent's buffer).
    Telemetry runs every 0.3 s throughout. `via`: "http", the download
    over HTTP from the control plane (advertised as a second proxy, the
    one that cuts), resumed with Range; "grpc", over DownloadArtifact (the
    control plane serves no HTTP)."""
    with TcpProxy(f"127.0.0.1:{rig.cp.http_port}") as http_proxy:
        settings = (
            ["--artifact-http-advertise", f"http://{http_proxy.address}"] if via == "http"
            else ["--artifact-http-listen", "off"]
        )  # fmt: skip
        rig.cp.extra += settings
        rig.cp.restart()
        # The control plane's HTTP port is new after a restart.
        http_proxy.upstream = ("127.0.0.1", rig.cp.http_port)
        try:
            return _cut_network(
                rig, http_proxy if via == "http" else None, new_version=new_version,
                cut_after_bytes=cut_after_bytes, flaps=flaps, offline_s=offline_s, seed=seed,
                say=say,
            )  # fmt: skip
        finally:
            del rig.cp.extra[-len(settings) :]
            rig.cp.restart()


def _cut_network(
    rig: AgentRig,
    http_proxy: TcpProxy | None,
    *,
    new_version: str,
    cut_after_bytes: int,
    flaps: int,
    offline_s: float,
    seed: int,
    say: Callable[[str], None],
) -> NetworkReport:
    rng = random.Random(seed)
    problems: list[str] = []
    with TcpProxy(rig.cp.address) as proxy:
        # The proxy the download goes through: its cuts are the download's.
        downloads = http_proxy or proxy
        name = "net-http" if http_proxy is not None else "net-grpc"
        agent = rig.agent(name, proxy.address, telemetry_interval_s=0.3, download_chunk_size=65536)
        try:
            agent.start()
            device_id = rig.device_id(agent)
            status = rig.settled(agent, device_id, rig.assign(device_id, "1.0.0"))
            if of_status(status) != "committed":
                raise AssertionError(f"the first install failed: {status}")
            rig.serving(agent, "1.0.0")
            # The download, through a link that drops every connection.
            cuts, down = downloads.stats.cuts, downloads.stats.bytes_down
            downloads.cut_after_bytes = cut_after_bytes
            status = rig.settled(agent, device_id, rig.assign(device_id, new_version), timeout=300)
            downloads.cut_after_bytes = None
            download_cuts = downloads.stats.cuts - cuts
            download_down = downloads.stats.bytes_down - down
            if of_status(status) != "committed":
                problems.append(
                    f"the download through the cut link did not finish: {status.reason}"
                )
            else:
                rig.serving(agent, new_version)
                artifact = agent.state_dir / "downloads" / rig.digests[new_version]
                if hashlib.sha256(artifact.read_bytes()).hexdigest() != rig.digests[new_version]:
                    problems.append("the downloaded artifact does not hash to its digest")
                left = sorted(p.name for p in artifact.parent.iterdir() if p.suffix == ".part")
                if left:
                    problems.append(f"partial downloads left behind: {left}")
            say(f"download of {rig.sizes[new_version]} bytes: {download_cuts} connections cut, "
                f"{download_down} bytes carried")  # fmt: skip
            # Telemetry through a flapping link.
            max_buffered = 0
            for flap in range(flaps):
                time.sleep(rng.uniform(0.5, 1.5))
                if flap % 2:
                    proxy.offline()
                    deadline = time.monotonic() + offline_s
                    while time.monotonic() < deadline:
                        max_buffered = max(max_buffered, len(_buffer_state(agent)[1]))
                        time.sleep(0.1)
                    proxy.online()
                else:
                    proxy.cut_all()
            # Back for good: everything buffered gets delivered.
            agent.wait_for(lambda: not _buffer_state(agent)[1], 60)
            assert agent.stop() == 0, "the agent did not stop cleanly"
            next_seq, pending, dropped = _buffer_state(agent)
        finally:
            agent.close()
    seqs = [
        int(r[0])
        for r in _scalar_rows(create_engine(db_url_of(rig.cp)),
                              "SELECT seq FROM telemetry WHERE device_id = :d", d=device_id)
    ]  # fmt: skip
    produced = next_seq - 1
    stored = set(seqs)
    # A sample still buffered at the stop may or may not have arrived.
    missing = sorted(set(range(1, next_seq)) - stored - set(pending))
    if missing:
        problems.append(f"{len(missing)} telemetry sample(s) never stored: seqs {missing[:10]}")
    if stored - set(range(1, next_seq)):
        problems.append(f"telemetry stored with seqs the agent never made: {sorted(stored)[-3:]}")
    if len(seqs) != len(stored):
        problems.append(f"{len(seqs) - len(stored)} telemetry sample(s) stored twice")
    if dropped:
        problems.append(f"the agent's buffer dropped {dropped} sample(s)")
    if max_buffered < 2:
        problems.append(f"telemetry never piled up while offline (at most {max_buffered} buffered)")
    return NetworkReport(
        artifact_bytes=rig.sizes[new_version], cut_after_bytes=cut_after_bytes,
        download_cuts=download_cuts, download_bytes_down=download_down, telemetry_flaps=flaps,
        offline_s=offline_s, max_buffered=max_buffered, produced=produced, stored=len(seqs),
        duplicates=len(seqs) - len(stored), missing=missing, dropped=dropped, problems=problems,
    )  # fmt: skip


# ------------------------------------------------------------------ 4. disk full


def tmpfs_unavailable(probe_dir: Path) -> str | None:
    """Why a small tmpfs cannot be mounted here (None: it can)."""
    import subprocess

    probe_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        return f"cannot mount a tmpfs for a small disk: {(done.stderr or done.stdout).strip()}"
    subprocess.run(["umount", str(probe_dir)], check=True)
    return None


@contextlib.contextmanager
def small_disk(where: Path, size_bytes: int) -> Any:
    """A tmpfs of `size_bytes` mounted at `where` for the block."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs",
                    str(where)], check=True)  # fmt: skip
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(path: Path, leave_bytes: int) -> None:
    """Write `path` until the filesystem has about `leave_bytes` free."""
    import shutil

    block = b"\0" * (64 * 1024)
    with path.open("ab") as handle:
        while (free := shutil.disk_usage(path.parent).free) > leave_bytes:
            try:
                handle.write(block[: min(len(block), free - leave_bytes)])
                handle.flush()
            except OSError:
                break


@dataclass
class DiskFullReport:
    artifact_bytes: int
    disk_bytes: int
    # The reason each failed update reported, up front and mid-download.
    upfront_reason: str
    midway_reason: str
    # Bytes of the .part file when the disk was filled under it.
    midway_at_bytes: int
    predictions_ok: int  # on the old model while the updates failed
    problems: list[str] = field(default_factory=list)


def fill_disk_during_update(
    rig: AgentRig,
    *,
    new_version: str,
    say: Callable[[str], None] = lambda _: None,
) -> DiskFullReport:
    """A real agent whose state directory is a small tmpfs, serving 1.0.0.
    Update to `new_version` (1) with too little room for it (the free-space
    check refuses it), (2) with room, but the disk filled by something else
    while the download streams (slowed by a TcpProxy), (3) with room again:
    it installs. The old model must answer throughout the failures."""
    from edgefleet.agent.update.download import DEFAULT_MARGIN

    problems: list[str] = []
    size = rig.sizes[new_version]
    disk = rig.sizes["1.0.0"] + size + DEFAULT_MARGIN + 2 * 1024 * 1024
    # Slowed by the agent itself whatever the source (the proxy slows gRPC
    # only; HTTP downloads go straight to the control plane).
    agent = rig.agent(
        "disk", telemetry_interval_s=60, download_chunk_size=65536, max_download_rate=256 * 1024
    )
    predictions = 0

    def downloads() -> list[str]:
        return sorted(p.name for p in (agent.state_dir / "downloads").iterdir())

    def old_model_answers() -> None:
        nonlocal predictions
        if served(agent) != ("1.0.0", rig.digests["1.0.0"]):
            problems.append(f"the old model stopped serving: {served(agent)}")
        else:
            predictions += 1

    with TcpProxy(rig.cp.address) as proxy, small_disk(agent.state_dir, disk):
        agent.config["server"] = proxy.address
        filler = agent.state_dir / "filler"
        try:
            agent.start()
            device_id = rig.device_id(agent)
            status = rig.settled(agent, device_id, rig.assign(device_id, "1.0.0"))
            if of_status(status) != "committed":
                raise AssertionError(f"the first install failed: {status}")
            rig.serving(agent, "1.0.0")
            # (1) Not enough room to start.
            fill_disk(filler, size + DEFAULT_MARGIN // 2)
            upfront = rig.settled(agent, device_id, rig.assign(device_id, new_version))
            say(f"too little room: {of_status(upfront)}: {upfront.reason}")
            if of_status(upfront) != "failed" or "disk full" not in upfront.reason:
                problems.append(f"up front: {of_status(upfront)} ({upfront.reason})")
            old_model_answers()
            if downloads() != [rig.digests["1.0.0"]]:
                problems.append(f"files left after the refused update: {downloads()}")
            # (2) Room to start; the disk fills up while the bytes stream in.
            filler.unlink()
            proxy.down_bytes_per_s = 256 * 1024
            sequence = rig.assign(device_id, new_version)
            part = agent.state_dir / "downloads" / f"{rig.digests[new_version]}.part"
            at = agent.wait_for(lambda: part.exists() and part.stat().st_size, 60)
            fill_disk(filler, 0)
            midway = rig.settled(agent, device_id, sequence)
            proxy.down_bytes_per_s = None
            say(f"disk filled at {at} bytes: {of_status(midway)}: {midway.reason}")
            if of_status(midway) != "failed" or "disk full" not in midway.reason:
                problems.append(f"mid-download: {of_status(midway)} ({midway.reason})")
            old_model_answers()
            if downloads() != [rig.digests["1.0.0"]]:
                problems.append(f"files left after the disk filled: {downloads()}")
            if midway.active_model_version != "1.0.0":
                problems.append(f"reported active {midway.active_model_version!r}, not 1.0.0")
            # (3) Room again: the same version installs.
            filler.unlink()
            status = rig.settled(agent, device_id, rig.assign(device_id, new_version))
            if of_status(status) != "committed":
                problems.append(f"with room again the update did not install: {status.reason}")
            else:
                rig.serving(agent, new_version)
        finally:
            agent.close()
    return DiskFullReport(size, disk, upfront.reason, midway.reason, int(at), predictions, problems)
