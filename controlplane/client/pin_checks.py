"""What an operator should know after pinning a device to a class, asked of
the control plane with the calls any client has (the CLI's `devices pin`;
the TUI can show the same)."""

from __future__ import annotations

from typing import Any

from edgefleet.controlplane.client.format import device_models
from edgefleet.v1 import common_pb2, operator_pb2


def pin_warnings(stub: Any, device: common_pb2.Device, class_name: str) -> list[str]:
    """A line for each model the device is assigned whose version has no
    successful build for the class it is now pinned to: the pin is done, but
    the device cannot take that version until one exists. `stub`: an
    OperatorService stub (blocking)."""
    warnings = []
    for m in device_models(device):
        if not m.assigned_version:
            continue
        builds = stub.ListBuilds(
            operator_pb2.ListBuildsRequest(
                model_name=m.model_name,
                model_version=m.assigned_version,
                class_name=class_name,
                state=operator_pb2.BUILD_STATE_SUCCEEDED,
            )
        ).builds
        if not builds:
            ref = f"{m.model_name}@{m.assigned_version}"
            warnings.append(
                f"class {class_name} has no successful build of {ref}, which this device is "
                f"assigned: it cannot take it until one exists "
                f"(edgefleet builds run {ref} --class {class_name})"
            )
    return warnings
