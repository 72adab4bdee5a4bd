"""A class's lighter fallback artifact, end to end: a real control plane
builds the digits classifier for a class that asks for an int8 fallback
(real build ladder, both artifacts measured, validated and signed); a real
agent installs both, and its power/thermal policy, reading a simulated
thermal zone (a file in the format of /sys/class/thermal/*/temp), switches
to the fallback when the device runs hot and back once it has cooled by the
hysteresis margin. Every answer says which artifact served it, and the
control plane's telemetry counts the requests the fallback served."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.inference_client import InferenceClient, tensor_message
from edgefleet.demo.models import build_digits_classifier
from edgefleet.polling import wait_for
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import inference_pb2
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess
from testkit.harness import ControlPlane
from testkit.models import model_parts, push_model, wait_builds

pytestmark = pytest.mark.timeout(600)

CLASS = "hot-boards"
MODEL = "digits"
INPUT = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
PRIMARY, FALLBACK = c.ARTIFACT_VARIANT_PRIMARY, c.ARTIFACT_VARIANT_FALLBACK


def _set_temperature(path: Path, celsius: float) -> None:
    # Written whole and renamed, as a sysfs read never sees half a value.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{int(celsius * 1000)}\n")
    tmp.replace(path)


class Caller:
    """An app calling the model in a loop: every failure, and which
    artifact answered each call."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.variants: Counter[int] = Counter()
        self.failures: list[str] = []
        self.last = c.ARTIFACT_VARIANT_UNSPECIFIED
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        with InferenceClient(self.socket) as client:
            while not self._stop.is_set():
                try:
                    answer = client.predict_message(_request(), timeout_s=5)
                except Exception as err:  # every failure is a finding
                    self.failures.append(repr(err))
                    continue
                self.variants[answer.variant] += 1
                self.last = answer.variant
                time.sleep(0.005)


def _request() -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(
        model_name=MODEL, inputs=[tensor_message(k, v) for k, v in INPUT.items()]
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Any, str]]:
    root = tmp_path_factory.mktemp("fallback")
    cp = ControlPlane(root / "cp", None, "--build-workers", "1")
    cp.start()
    try:
        op = cp.operator()
        op.CreateDeviceClass(o.CreateDeviceClassRequest(
            name=CLASS,
            constraints=c.ConstraintProfile(
                runtime=c.RUNTIME_ONNXRUNTIME, quantization=c.QUANTIZATION_FP32,
                fallback=c.QUANTIZATION_INT8,
            ),
            match_rules=[c.MatchRule(field="label.tier", op=c.MATCH_OP_EQ, values=[CLASS])],
        ))  # fmt: skip
        digits = build_digits_classifier(root / "digits", hidden=256)
        push_model(
            op, MODEL, "1.0.0", model_parts(model=digits.model, sample_data=digits.sample_data)
        )
        (build,) = wait_builds(op, 1, timeout=300)
        assert build.state == o.BUILD_STATE_SUCCEEDED, build.error
        token = op.CreateEnrollmentToken(o.CreateEnrollmentTokenRequest(name="hot")).secret
        yield cp, op, token
    finally:
        cp.close()


def test_the_build_publishes_a_signed_lighter_fallback(
    built: tuple[ControlPlane, Any, str],
) -> None:
    _, op, _ = built
    (build,) = op.ListBuilds(o.ListBuildsRequest(model_name=MODEL)).builds
    chosen = next(b for b in build.candidates if b.chosen)
    fallback = next(b for b in build.candidates if b.fallback)
    assert fallback.quantization == c.QUANTIZATION_INT8 and fallback.passed
    assert fallback.size_bytes < chosen.size_bytes
    assert build.fallback_digest and build.fallback_size == fallback.size_bytes
    (artifact,) = op.ListArtifacts(o.ListArtifactsRequest(model_name=MODEL)).artifacts
    assert artifact.fallback_digest == build.fallback_digest
    nested = c.ArtifactManifest.FromString(artifact.manifest.fallback_manifest)
    assert (nested.model_name, nested.model_version, nested.class_name) == (MODEL, "1.0.0", CLASS)
    assert nested.sha256 == build.fallback_digest and nested.golden
    assert not nested.fallback_manifest


def test_a_hot_device_serves_the_fallback_and_cools_back_to_the_primary(
    built: tuple[ControlPlane, Any, str], tmp_path: Path
) -> None:
    cp, op, token = built
    sensor = tmp_path / "thermal_zone0_temp"
    _set_temperature(sensor, 45)
    agent = AgentProcess(
        tmp_path / "agent", cp.address, token, labels={"tier": CLASS},
        telemetry_interval_s=1, power_interval_s=0.2, power_temperature_file=str(sensor),
    ).start()  # fmt: skip
    try:
        device_id = str(wait_for(agent.identity, timeout=60)["device_id"])
        wait_for(lambda: op.GetDevice(o.GetDeviceRequest(id=device_id)).class_name == CLASS or None)
        (assigned,) = op.AssignModel(o.AssignModelRequest(
            device_ids=[device_id], model_name=MODEL, model_version="1.0.0",
        )).assignments  # fmt: skip

        def settled() -> c.UpdateStatus | None:
            device = op.GetDevice(o.GetDeviceRequest(id=device_id))
            held = next((m for m in device.models if m.model_name == MODEL), None)
            if held is None or held.status.sequence != assigned.sequence:
                return None
            return held.status if of_status(held.status) in ("committed", "failed") else None

        status = wait_for(settled, timeout=120)
        assert of_status(status) == "committed", status.reason
        socket = agent.state_dir / "predict.sock"
        with InferenceClient(socket) as client:
            meta = client.metadata(MODEL)
        (artifact,) = op.ListArtifacts(o.ListArtifactsRequest(model_name=MODEL)).artifacts
        assert meta.variant == PRIMARY and meta.artifact_digest == artifact.digest
        assert meta.fallback_digest == artifact.fallback_digest

        with Caller(socket) as app:
            wait_for(lambda: app.variants[PRIMARY] > 20 or None, timeout=30)
            _set_temperature(sensor, 85)  # past the 70 C "limited" level
            wait_for(lambda: app.last == FALLBACK or None, timeout=30, what="the switch")
            with InferenceClient(socket) as client:
                assert client.metadata(MODEL).artifact_digest == artifact.fallback_digest
            # Hovering between 65 and 70 C: cooler than the level, but not by
            # the 5 C margin, so the device stays on the fallback.
            _set_temperature(sensor, 67)
            time.sleep(1.5)
            served = app.variants[FALLBACK]
            time.sleep(0.5)
            assert app.last == FALLBACK and app.variants[FALLBACK] > served
            _set_temperature(sensor, 60)
            wait_for(lambda: app.last == PRIMARY or None, timeout=30, what="the switch back")
        assert app.failures == [], app.failures[:3]

        def fallback_requests() -> float | None:
            resp = op.QueryTelemetry(o.QueryTelemetryRequest(
                metric=o.TELEMETRY_METRIC_FALLBACK_REQUEST_COUNT, model_name=MODEL,
                group_by=o.TELEMETRY_GROUP_BY_DEVICE,
            ))  # fmt: skip
            total = sum(p.value for s in resp.series for p in s.points)
            return total if total > 0 else None

        assert wait_for(fallback_requests, timeout=30, what="fallback telemetry")
    finally:
        agent.close()
