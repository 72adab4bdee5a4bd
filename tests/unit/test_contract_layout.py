"""The gRPC contract's layout: the proto package matches its directory, and
the generated package imports from its proto path. Freshness of the
generated code and compiling for other languages (protoc, a subprocess):
tests/integration/test_contract.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "proto" / "edgefleet" / "v1").glob("*.proto"))


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_proto_package_matches_its_directory(proto: Path) -> None:
    package = re.search(r"^package\s+([\w.]+);", proto.read_text(), re.M)
    assert package is not None
    expected = ".".join(proto.parent.relative_to(ROOT / "proto").parts)
    assert package.group(1) == expected


def test_generated_package_imports_from_its_proto_path() -> None:
    from edgefleet.v1 import device_pb2, operator_pb2

    assert device_pb2.DESCRIPTOR.package == "edgefleet.v1"
    assert operator_pb2.DESCRIPTOR.name == "edgefleet/v1/operator.proto"
