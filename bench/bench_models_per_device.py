"""Several models on one device: what a second and third model cost, and
whether updating one model disturbs the others.

A real control plane (`edgefleet server`, SQLite) and one real
`edgefleet-agent` process (ONNX Runtime). Three real models built in code
(demo/models.py): the digits MLP (A, versions 1.0.0 and 1.1.0), the digits
CNN (B) and a GRU sensor forecaster (C, a regressor).

1. Memory. The agent's RSS idle, then with A, then with A, B and C active
   and warm, against the idle agent plus each model's memory as its build
   measured it (ArtifactManifest.memory_mb). Goal: each model beyond the
   first costs at most 5 MB more than its own measured memory.
2. Isolation. An app (a process of its own) calls B on the framed fast
   path for `--seconds` with nothing else happening (the baseline), then for
   as long again while A is updated back and forth (1.0.0 <-> 1.1.0, each
   update committed before the next). Twice: an app calling back to back
   (it keeps one of the cores busy by itself), and one calling `--rate`
   times a second (200: a camera or sensor app). Goal: B's p99 during A's
   updates <= 1.2x its p99 alone; no B call fails and every answer names
   B's one version.

    python -m bench.bench_models_per_device            # real builds, figures
    python -m bench.bench_models_per_device --smoke    # CI: seconds, figures meaningless

In smoke mode the builds are answered by hand (the pushed file is the
artifact, memory 1 MB each), so the memory figures mean nothing there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import multiprocessing.process
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.bench_agent_rss import memory
from bench.common import ADMIN_TOKEN, start_control_plane, stop_process
from bench.latencies import percentile
from edgefleet.agent.inference_client import InferenceClient
from edgefleet.controlplane.client.connection import operator_stub
from edgefleet.controlplane.db.engine import make_engine, sqlite_url
from edgefleet.controlplane.db.uow import Database
from edgefleet.demo.models import (
    BuiltModel,
    build_digits_classifier,
    build_gru_forecaster,
    build_small_cnn,
)
from edgefleet.polling import wait_for
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.builds import answer_builds
from testkit.models import model_parts, push_model

OVERHEAD_GOAL_MB = 5.0
P99_GOAL_RATIO = 1.2
CLASS = "multi-model-bench"
SMOKE = {"seconds": 1.5, "settle": 0.5, "rate": 200.0}


def build_models(root: Path) -> dict[tuple[str, str], BuiltModel]:
    return {
        ("digits", "1.0.0"): build_digits_classifier(root / "a1"),
        ("digits", "1.1.0"): build_digits_classifier(root / "a2", seed=1),
        ("digits-cnn", "1.0.0"): build_small_cnn(root / "b"),
        ("sensor-gru", "1.0.0"): build_gru_forecaster(root / "c"),
    }


def wait_built(op: Any, count: int, timeout_s: float) -> None:
    def done() -> bool | None:
        builds = op.ListBuilds(o.ListBuildsRequest()).builds
        failed = [b for b in builds if b.state == o.BUILD_STATE_FAILED]
        if failed:
            raise SystemExit(f"a build failed: {failed[0].error}")
        ok = [b for b in builds if b.state == o.BUILD_STATE_SUCCEEDED]
        return len(ok) >= count or None

    wait_for(done, timeout_s, what="the builds", interval=0.5)


def model_memory_mb(op: Any, model: str, version: str) -> float:
    """The build's measured memory of the class's artifact (its manifest)."""
    artifacts = op.ListArtifacts(
        o.ListArtifactsRequest(model_name=model, model_version=version)
    ).artifacts
    if not artifacts:
        raise SystemExit(f"no artifact for {model}@{version}")
    return float(artifacts[0].manifest.memory_mb)


def assign_and_wait(op: Any, device_id: str, model: str, version: str) -> None:
    (assignment,) = op.AssignModel(
        o.AssignModelRequest(device_ids=[device_id], model_name=model, model_version=version)
    ).assignments

    def settled() -> bool | None:
        device = op.GetDevice(o.GetDeviceRequest(id=device_id))
        for held in device.models:
            if held.model_name != model or held.status.sequence != assignment.sequence:
                continue
            state = of_status(held.status)
            if state == "failed":
                raise SystemExit(f"{model}@{version} failed: {held.status.reason}")
            return state in ("committed", "idle") and held.status.active_model_version == version
        return None

    wait_for(settled, 300, what=f"{model}@{version} to commit", interval=0.05)


class Caller:
    """An app calling one model in a loop on the fast path, in a process of
    its own as apps are: latencies, failures and the versions that answered.

    Its own process matters: in this one, the thread that drives the updates
    (gRPC calls, polling) would hold the benchmark's GIL while the app's
    thread waits, and charge that wait to the agent."""

    def __init__(
        self, socket: Path, model: str, inputs: dict[str, np.ndarray], rate: float = 0.0
    ) -> None:
        # rate: calls per second on a fixed schedule (an app with a camera or
        # a sensor); 0: back to back, one call after another (a saturating
        # app, which keeps one core busy by itself).
        self.socket, self.model, self.inputs, self.rate = socket, model, inputs, rate
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.versions: Counter[str] = Counter()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._out = Path(tempfile.mkdtemp(prefix="caller-")) / "result.json"

    def start(self, seconds: float) -> None:
        """Start calling for `seconds` in a fresh (spawned) process."""
        context = multiprocessing.get_context("spawn")
        args = (str(self.socket), self.model, self.inputs, seconds, self.rate, str(self._out))
        self._process = context.Process(target=_call_loop, args=args, daemon=True)
        self._process.start()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def join(self) -> None:
        """Wait for the calls to end and read what they saw."""
        assert self._process is not None
        self._process.join()
        if self._process.exitcode != 0:
            raise SystemExit(f"the calling process exited with {self._process.exitcode}")
        result = json.loads(self._out.read_text())
        self.latencies = result["latencies"]
        self.failures = result["failures"]
        self.versions = Counter(result["versions"])

    def run(self, seconds: float) -> None:
        self.start(seconds)
        self.join()

    def p99_ms(self) -> float:
        return percentile(sorted(self.latencies), 99) * 1000


def _call_loop(
    socket: str, model: str, inputs: dict[str, np.ndarray], seconds: float, rate: float, out: str
) -> None:
    """The app's process: call `model` for `seconds` (`rate` per second on a
    fixed schedule, or back to back), write what happened."""
    latencies: list[float] = []
    failures: list[str] = []
    versions: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    due = time.perf_counter()
    with InferenceClient(socket) as client:
        while time.monotonic() < deadline:
            if rate:
                due += 1 / rate
                time.sleep(max(0.0, due - time.perf_counter()))
            start = time.perf_counter()
            try:
                reply = client.predict(model, inputs, timeout_s=5)
            except Exception as exc:  # every failure is a finding
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)
            versions[reply.model_version] += 1
    Path(out).write_text(
        json.dumps({"latencies": latencies, "failures": failures, "versions": versions})
    )


def rss_mb(agent: AgentProcess, settle_s: float) -> float:
    time.sleep(settle_s)
    assert agent.proc is not None
    samples = []
    for _ in range(5):
        samples.append(memory(agent.proc.pid)["rss"] / 1e6)
        time.sleep(0.2)
    return statistics.median(samples)


def warm(socket: Path, models: dict[str, dict[str, np.ndarray]]) -> None:
    """A few calls of each model: RSS is measured warm, as apps keep it."""
    with InferenceClient(socket) as client:
        for name, inputs in models.items():
            for _ in range(20):
                client.predict(name, inputs, timeout_s=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per latency phase")
    parser.add_argument("--settle", type=float, default=5.0, help="before each RSS sample")
    parser.add_argument(
        "--rate", type=float, default=200.0,
        help="calls per second of the second app (the first calls back to back)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {args.seconds:g} s per latency phase"
        + (" (smoke: builds answered by hand, figures meaningless)" if args.smoke else ""),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="edgefleet-models-") as tmp:
        root = Path(tmp)
        models = build_models(root / "models")
        server, address = start_control_plane(root / "cp", build_workers=0 if args.smoke else 1)
        agent: AgentProcess | None = None
        try:
            op = operator_stub(address, ADMIN_TOKEN)
            op.CreateDeviceClass(o.CreateDeviceClassRequest(
                name=CLASS, constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=[CLASS])],
            ))  # fmt: skip
            for (name, version), built in models.items():
                push_model(op, name, version, model_parts(
                    model=built.model, sample_data=built.sample_data,
                ))  # fmt: skip
            if args.smoke:
                files = {hashlib.sha256(b.model.read_bytes()).hexdigest(): b.model
                         for b in models.values()}  # fmt: skip
                engine = make_engine(sqlite_url(root / "cp"), pool_size=2)
                answer_builds(Database(engine), root / "cp" / "blobs", files, op)
                engine.dispose()
            else:
                wait_built(op, len(models), 1800)
            token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="bench")).secret
            agent = AgentProcess(root / "agent", address, token, name="models-bench",
                                 labels={"tier": CLASS}).start()  # fmt: skip
            device_id = str(agent.wait_for(agent.identity, 60)["device_id"])
            wait_for(lambda: op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name, 60,
                     what="the agent's class")  # fmt: skip
            socket = agent.state_dir / "predict.sock"
            inputs: dict[str, dict[str, np.ndarray]] = {
                "digits": {"input": np.zeros((1, 64), np.float32)},
                "digits-cnn": {"image": np.zeros((1, 1, 8, 8), np.float32)},
                "sensor-gru": {"series": np.zeros((1, 16, 4), np.float32)},
            }
            memory_of = {name: model_memory_mb(op, name, version)
                         for (name, version) in models if version == "1.0.0"}  # fmt: skip

            idle = rss_mb(agent, args.settle)
            assign_and_wait(op, device_id, "digits", "1.0.0")
            warm(socket, {"digits": inputs["digits"]})
            one = rss_mb(agent, args.settle)
            assign_and_wait(op, device_id, "digits-cnn", "1.0.0")
            assign_and_wait(op, device_id, "sensor-gru", "1.0.0")
            warm(socket, inputs)
            three = rss_mb(agent, args.settle)
            first = one - idle - memory_of["digits"]
            extra = (three - one - memory_of["digits-cnn"] - memory_of["sensor-gru"]) / 2
            print(f"agent RSS: idle {idle:.1f} MB; 1 model {one:.1f} MB; 3 models {three:.1f} MB")
            print("measured memory per model (build): " + ", ".join(
                f"{name} {mb:.1f} MB" for name, mb in memory_of.items()))  # fmt: skip
            met = "met" if extra <= OVERHEAD_GOAL_MB else "NOT met"
            print(f"overhead beyond the models' own memory: first model {first:+.1f} MB, "
                  f"each further model {extra:+.1f} MB "
                  f"(goal <= {OVERHEAD_GOAL_MB:g} MB: {met})")  # fmt: skip

            # Two apps: one calling B back to back (it keeps a core busy by
            # itself: the saturating case), one calling it `--rate` times a
            # second (a camera or sensor app, leaving the device headroom).
            failures: list[str] = []
            versions: set[str] = set()
            for rate in (0.0, args.rate):
                load = "back to back" if not rate else f"{rate:g} calls/s"
                alone = Caller(socket, "digits-cnn", inputs["digits-cnn"], rate)
                alone.run(args.seconds)
                during = Caller(socket, "digits-cnn", inputs["digits-cnn"], rate)
                updates = _update_loop(op, device_id)
                during.start(args.seconds)
                updated = updates(during.alive)
                during.join()
                ratio = during.p99_ms() / alone.p99_ms()
                met = "met" if ratio <= P99_GOAL_RATIO else "NOT met"
                print(f"digits-cnn called {load}: p99 alone {alone.p99_ms():.3f} ms "
                      f"({len(alone.latencies)} calls); during {updated} updates of digits "
                      f"{during.p99_ms():.3f} ms ({len(during.latencies)} calls): ratio "
                      f"{ratio:.2f} (goal <= {P99_GOAL_RATIO:g}: {met})")  # fmt: skip
                failures += alone.failures + during.failures
                versions |= set(alone.versions) | set(during.versions)
                if updated == 0:
                    raise SystemExit(f"no update of digits committed while calling {load}")
            print(f"digits-cnn failed calls: {len(failures)}; versions that answered: "
                  f"{sorted(versions)}")  # fmt: skip
            if failures or versions != {"1.0.0"}:
                raise SystemExit(f"isolation broken: {failures[:3]} {sorted(versions)}")
            if not agent.running:
                raise SystemExit("the agent exited")
        finally:
            if agent is not None and agent.running:
                agent.stop()
            stop_process(server, grace_s=15)


def _update_loop(op: Any, device_id: str) -> Callable[[Callable[[], bool]], int]:
    """Updates digits back and forth while `going()`; the number committed."""

    def loop(going: Callable[[], bool]) -> int:
        done = 0
        versions = ["1.1.0", "1.0.0"]
        while going():
            assign_and_wait(op, device_id, "digits", versions[done % 2])
            done += 1
        return done

    return loop


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as exc:
        raise SystemExit(f"RPC failed: {exc.code().name}: {exc.details()}") from exc
