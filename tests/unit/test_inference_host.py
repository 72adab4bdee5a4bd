"""The agent's model host without serving it: activation, rollback and commit
(idempotent), a model that fails to warm, the execution providers it picks,
the inference settings of the config, and a state directory too long for a
unix socket. The inference API over its sockets:
tests/integration/test_inference_api.py."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest

from edgefleet.agent.inference_server import (
    start_inference_server,
)
from edgefleet.agent.runtimes import ONNXRUNTIME
from edgefleet.agent.serving import ModelHost
from edgefleet.demo.models import BuiltModel
from testkit.models import adder_model


def test_rollback_and_commit_are_idempotent(tmp_path: Path) -> None:
    host = ModelHost()
    try:
        v1, v2 = adder_model(tmp_path / "v1.onnx", 1.0), adder_model(tmp_path / "v2.onnx", 2.0)
        host.activate("m", "1", "a", v1, ONNXRUNTIME)
        assert host.rollback("m") is None  # a first activation undone: nothing active
        assert host.rollback("m") is None
        host.activate("m", "1", "a", v1, ONNXRUNTIME)
        host.commit("m")
        host.activate("m", "2", "b", v2, ONNXRUNTIME)
        standby = host.standby("m")
        assert host.active("m").version == "2" and standby is not None and standby.version == "1"
        restored = host.rollback("m")
        assert restored is not None and restored.version == "1"
        assert host.rollback("m") is restored  # no uncommitted activation left: no change
        host.activate("m", "2", "b", v2, ONNXRUNTIME)
        host.commit("m")
        host.commit("m")
        assert host.active("m").version == "2" and host.standby("m") is None
        assert host.rollback("m") is not None and host.active("m").version == "2"
    finally:
        host.close()


def test_a_model_that_fails_to_warm_never_becomes_active(tmp_path: Path) -> None:
    from edgefleet.agent.serving import ActivationFailed

    host = ModelHost()
    try:
        host.activate("m", "1", "a", adder_model(tmp_path / "v1.onnx", 1.0), ONNXRUNTIME)
        host.commit("m")
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not a model")
        with pytest.raises(ActivationFailed, match="cannot load"):
            host.activate("m", "2", "b", broken, ONNXRUNTIME)
        assert host.active("m").version == "1" and host.standby("m") is None
    finally:
        host.close()


def test_inference_settings_from_config(tmp_path: Path) -> None:
    from edgefleet.agent.config import load_config
    from edgefleet.agent.errors import ConfigError

    path = tmp_path / "agent.toml"
    path.write_text('inference_workers = 4\ninference_listen = "127.0.0.1:7450"\n')
    config = load_config(path, environ={})
    assert (config.inference_workers, config.inference_listen) == (4, "127.0.0.1:7450")
    assert load_config(None, environ={}).inference_listen is None
    with pytest.raises(ConfigError, match="loopback"):
        load_config(None, environ={"EDGEFLEET_AGENT_INFERENCE_LISTEN": "0.0.0.0:7450"})
    with pytest.raises(ConfigError, match="positive integer"):
        load_config(None, environ={"EDGEFLEET_AGENT_INFERENCE_WORKERS": "0"})


def test_serving_uses_the_accelerated_execution_providers_installed(digits: BuiltModel) -> None:
    from edgefleet.agent.daemon import onnxruntime_providers
    from edgefleet.agent.runtimes.onnxruntime import ACCELERATED, CPU, OnnxRuntimeRunner

    assert onnxruntime_providers("auto") == ["auto"]
    assert onnxruntime_providers("cpu") is None
    assert onnxruntime_providers(" CUDAExecutionProvider , cpu") == ["CUDAExecutionProvider", CPU]
    installed = [p for p in ACCELERATED if p in ort.get_available_providers()]
    host = ModelHost(providers=["auto"])
    model = host.activate("digits", "1", "d", digits.model, ONNXRUNTIME)
    runner = model.runner
    assert isinstance(runner, OnnxRuntimeRunner)
    # On this CPU-only machine: CPU; with onnxruntime-gpu on a Jetson: TensorRT/CUDA first.
    assert runner.providers == [*installed, CPU]


async def test_a_state_dir_too_long_for_a_unix_socket_is_a_clear_error(tmp_path: Path) -> None:
    from edgefleet.agent.errors import StateError

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(StateError, match="too long for a unix socket"):
        await start_inference_server(ModelHost(), deep)
