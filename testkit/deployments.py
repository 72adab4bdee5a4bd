"""Where a deployment to a real agent process got: the device's update status
once it settled, and what the agent's inference API serves."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from edgefleet.polling import wait_for
from edgefleet.update_state import of_status
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import inference_pb2, inference_pb2_grpc
from edgefleet.v1 import operator_pb2 as o
from testkit.agent_harness import AgentProcess


def settled(
    op: Any, device_id: str, sequence: int, timeout: float = 60, model: str = ""
) -> c.UpdateStatus:
    """The device's status (of `model`; "": its latest report) once the
    update `sequence` committed or failed (`op`: a blocking OperatorService
    stub)."""

    def done() -> c.UpdateStatus | None:
        device: c.Device = op.GetDevice(o.GetDeviceRequest(id=device_id))
        update = device.update
        if model:
            found = [m.status for m in device.models if m.model_name == model]
            if not found:
                return None
            update = found[0]
        if update.sequence == sequence and of_status(update) in ("committed", "failed"):
            return update
        return None

    return wait_for(done, timeout=timeout)


def served(agent: AgentProcess, model: str = "digits") -> tuple[str, str] | grpc.StatusCode:
    """(version, digest) the agent's inference API serves of `model` (a
    64-feature classifier), or its error code; a real prediction must work
    on what it serves."""
    with grpc.insecure_channel(f"unix:{agent.state_dir / 'inference.sock'}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            meta = stub.GetModelMetadata(
                inference_pb2.GetModelMetadataRequest(model_name=model), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code()
        x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
        reply = stub.Predict(
            inference_pb2.PredictRequest(
                model_name=model,
                inputs=[
                    c.TensorData(name="input", dtype="float32", shape=[3, 64], data=x.tobytes())
                ],
            ),
            timeout=10,
        )
    (out,) = reply.outputs
    assert out.shape[0] == 3 and reply.model_version == meta.model_version
    return meta.model_version, meta.artifact_digest
