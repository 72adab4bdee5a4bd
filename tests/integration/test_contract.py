"""The gRPC contract itself: generated code is fresh (scripts/check_proto.sh)
and the protos compile for other languages (the stock protoc). Its layout:
tests/unit/test_contract_layout.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "proto" / "edgefleet" / "v1").glob("*.proto"))


def test_generated_code_is_fresh() -> None:
    # The interpreter running the tests (its grpc_tools and, on PATH beside
    # it, the mypy-protobuf plugins), whether its venv is activated or not.
    bindir = os.path.dirname(sys.executable)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_proto.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "PATH": path},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("language", ["cpp", "java", "csharp", "go"])
def test_protos_compile_for_other_languages(language: str, tmp_path: Path) -> None:
    # grpc_tools bundles only the Python generators; the stock protoc (Debian's
    # protobuf-compiler, installed by .ci/run) has the others built in. Go's
    # generator is a plugin, so for Go we check the descriptor set instead.
    protoc = shutil.which("protoc")
    if protoc is None:
        if os.environ.get("CI"):
            pytest.fail("protoc (protobuf-compiler) must be installed in CI")
        pytest.skip("protoc not installed: apt-get install protobuf-compiler")
    out = (
        f"--descriptor_set_out={tmp_path / 'set.pb'}"
        if language == "go"
        else f"--{language}_out={tmp_path}"
    )
    result = subprocess.run(
        [protoc, "-I", str(ROOT / "proto"), out, *map(str, PROTOS)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert any(tmp_path.rglob("*")), f"protoc wrote no {language} code"
