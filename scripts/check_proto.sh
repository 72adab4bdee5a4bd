#!/usr/bin/env bash
# Fails when the committed generated code differs from what the .proto files
# produce (someone edited a .proto without regenerating, or edited gencode).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Only the contract's folder: proto/edgefleet also holds links to the parts,
# which point nowhere once copied.
mkdir -p "$tmp/proto/edgefleet"
cp -r proto/edgefleet/v1 "$tmp/proto/edgefleet/v1"
find "$tmp/proto/edgefleet/v1" -name '*_pb2*' -delete
"${PYTHON:-python}" -m grpc_tools.protoc -I "$tmp/proto" \
  --python_out="$tmp/proto" --grpc_python_out="$tmp/proto" \
  --mypy_out="$tmp/proto" --mypy_grpc_out="$tmp/proto" \
  "$tmp"/proto/edgefleet/v1/*.proto >/dev/null
if ! diff -r -x '__pycache__' proto/edgefleet/v1 "$tmp/proto/edgefleet/v1"; then
  echo "generated protobuf code is stale: run scripts/gen_proto.sh and commit" >&2
  exit 1
fi
echo "generated protobuf code is fresh"
