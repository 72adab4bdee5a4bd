"""The agent's runtime probe without running it: parsing what the probe child
prints, and the fallback to package metadata when the probe fails. The
probe itself runs in a child process: tests/e2e/test_agent_imports.py."""

from __future__ import annotations

import pytest

from edgefleet.agent.hardware import (
    ONNXRUNTIME_CPU_PROVIDER,
    RuntimeProbeFailed,
    detect_runtime,
    parse_runtime_probe,
)
from edgefleet.v1 import common_pb2


def test_parse_runtime_probe() -> None:
    fingerprint = common_pb2.RuntimeFingerprint(
        python_version="3.11.7", onnxruntime_version="1.20.0", onnxruntime_providers=["CPU"]
    )
    line = fingerprint.SerializeToString().hex()
    assert parse_runtime_probe(line + "\n") == fingerprint
    # A runtime's own output before the answer is skipped.
    assert parse_runtime_probe("some warning\n" + line + "\n") == fingerprint
    for garbage in ("", "\n", "not hex\n", "abc\n", "ffff\n", "00\n"):
        assert parse_runtime_probe(garbage) is None, garbage


def test_failed_probe_falls_back_to_package_metadata(caplog: pytest.LogCaptureFixture) -> None:
    import importlib.metadata

    def died() -> common_pb2.RuntimeFingerprint:
        raise RuntimeProbeFailed("the probe process died (signal 11)")

    runtime = detect_runtime(probe=died)
    assert runtime.onnxruntime_version == importlib.metadata.version("onnxruntime")
    assert list(runtime.onnxruntime_providers) == [ONNXRUNTIME_CPU_PROVIDER]
    assert runtime.agent_version == importlib.metadata.version("edgefleet")
    assert runtime.python_version
    assert "(the probe process died (signal 11)); reporting them from package metadata" in (
        caplog.text
    )
