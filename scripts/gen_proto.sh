#!/usr/bin/env bash
# Regenerates the Python protobuf/gRPC code beside the .proto files.
# The proto root (proto/) is both protoc's include path and the Python package
# root, so the proto package edgefleet.v1 is the import path edgefleet.v1.
# Generate with the oldest protobuf we support (see pyproject's "proto" extra):
# new gencode refuses to run on an older runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
find proto/edgefleet -name '*_pb2*.py' -o -name '*_pb2*.pyi' | xargs -r rm -f
"${PYTHON:-python}" -m grpc_tools.protoc -I proto \
  --python_out=proto --grpc_python_out=proto \
  --mypy_out=proto --mypy_grpc_out=proto \
  proto/edgefleet/v1/*.proto
