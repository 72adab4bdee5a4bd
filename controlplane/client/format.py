"""Figures for people, as plain strings: sizes, ages, tensor shapes, a
rollout's cohort and pacing, progress bars. The CLI puts them in rich
tables, the TUI in its widgets; neither styles the text here."""

from __future__ import annotations

from datetime import datetime

from edgefleet.controlplane.client.syntax import format_duration, format_labels
from edgefleet.v1 import common_pb2, operator_pb2

# What a cell shows for a value that is not there.
NONE = "-"
BAR_WIDTH = 12


def format_bytes(n: int) -> str:
    """`812 B`, `1.5 KiB`, `12.0 MiB`, `1.2 GiB`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_ago(when: datetime | None, now: datetime) -> str:
    """`5m ago`, `in 23h59m`, `just now`; `-` when unknown."""
    if when is None:
        return NONE
    delta = now - when
    if abs(delta.total_seconds()) < 1:
        return "just now"
    if delta.total_seconds() > 0:
        return f"{format_duration(delta)} ago"
    return f"in {format_duration(-delta)}"


def format_shape(spec: common_pb2.TensorSpec) -> str:
    """`[batch, 64]`: dynamic dims by name (or `?`)."""
    dims = []
    for i, d in enumerate(spec.shape):
        name = spec.dim_names[i] if i < len(spec.dim_names) else ""
        dims.append(str(d) if d >= 0 else (name or "?"))
    return f"[{', '.join(dims)}]"


def format_cohort(spec: operator_pb2.RolloutSpec) -> str:
    """`classes pi, gw; labels site=a` (+ `; dynamic`)."""
    parts = []
    if spec.class_names:
        parts.append(f"class{'es' if len(spec.class_names) > 1 else ''} "
                     + ", ".join(spec.class_names))  # fmt: skip
    if spec.label_selector:
        parts.append(f"labels {format_labels(spec.label_selector)}")
    if spec.dynamic:
        parts.append("dynamic (devices that start matching join)")
    return "; ".join(parts) or NONE


def format_pacing(p: operator_pb2.Pacing) -> str:
    """`<= 60/min, ramp from 10/min, x2 each minute, device timeout 10m, 2 retries`."""
    parts = []
    if p.max_per_minute:
        parts.append(f"<= {p.max_per_minute}/min")
    if p.ramp_base_per_minute:
        parts.append(f"ramp from {p.ramp_base_per_minute}/min, x{p.ramp_factor or 1:g} each minute")
    if p.device_timeout.ToTimedelta():
        parts.append(f"device timeout {format_duration(p.device_timeout.ToTimedelta())}")
    if p.device_retries:
        parts.append(f"{p.device_retries} retr{'y' if p.device_retries == 1 else 'ies'}")
    return ", ".join(parts) or "unlimited, no device timeout, no retries"


def format_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`██████░░░░░░ 3/6`: a text progress bar (stable under snapshot tests)."""
    filled = round(width * done / total) if total else 0
    return "█" * filled + "░" * (width - filled) + f" {done}/{total}"
