"""Artifact builds: the optimization ladder per runtime, measurement of every
candidate, and the verdict per device class. Runs in worker processes; knows
nothing about gRPC or SQL (its inputs are files and a BuildTarget)."""

from edgefleet.extras import require

# Before any module here imports them: without its extra, this package says
# in one line what to install (edgefleet.extras).
require(
    "server", "onnx", "onnxconverter_common", "onnxruntime", part="edgefleet.controlplane.build"
)
