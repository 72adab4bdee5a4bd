"""Figures for people, as plain strings: sizes, ages, tensor shapes, a
rollout's cohort and pacing, progress bars. The CLI puts them in rich
tables, the TUI in its widgets; neither styles the text here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from edgefleet.controlplane.client.syntax import format_duration, format_labels
from edgefleet.update_state import of_status
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


# ------------------------------------------------------------ a device's models

# Update states that mean an update is under way (the device may still serve
# the previous version meanwhile).
MOVING_STATES = frozenset({"downloading", "verifying", "validating", "activating", "rolling_back"})


@dataclass(frozen=True)
class ModelView:
    """One model on a device, as the CLI and the TUI show it: what the
    control plane assigned, what the agent serves and where its update
    stands. `tone` is "failed", "moving" or "" (settled), for styling."""

    name: str
    assigned: str
    serving: str
    # The update state by name (edgefleet.update_state): "" before the agent
    # reported anything for the model; "pending" when its report is about an
    # older assignment than the current one.
    state: str
    # The version the reported state is about.
    target: str
    sequence: int
    rollout_id: str
    shadow: bool
    bytes_done: int
    bytes_total: int
    reason: str
    summary: str
    tone: str
    # While downloading: from where, and bytes a second ("", 0 otherwise).
    download_source: str = ""
    download_rate: int = 0


def device_models(device: common_pb2.Device) -> list[common_pb2.DeviceModel]:
    """The device's models, by name. A control plane that predates several
    models per device fills only `Device.update`: that one status is then
    shown as the device's one model."""
    if device.models:
        return sorted(device.models, key=lambda m: m.model_name)
    up = device.update
    if not (up.model_name or up.active_model_version):
        return []
    return [
        common_pb2.DeviceModel(
            model_name=up.model_name,
            assigned_version=up.model_version,
            sequence=up.sequence,
            rollout_id=up.rollout_id,
            status=up,
        )
    ]


def _percent(done: int, total: int) -> str:
    return f" {min(100, 100 * done // total)}%" if total else ""


def model_view(m: common_pb2.DeviceModel) -> ModelView:
    """`m` for people. The summary is compact, for one cell of a table:
    `digits@1.2.0` when the model serves its assigned version, else the
    assigned version with where its update stands: `vad@5.0.0 (downloading
    40%)`, `vad@5.0.0 (failed)`, `vad@5.0.0 (shadow)`; a model no longer
    assigned that the agent still reports: `vad@4.0.0 (unassigned)`."""
    st = m.status
    serving = st.active_model_version
    state = of_status(st) if m.HasField("status") else ""
    stale = bool(m.assigned_version) and st.sequence < m.sequence
    if stale:
        # The agent has not picked the current assignment up yet: its last
        # report is about an older one.
        state = "pending"
    target = m.assigned_version if stale or not st.model_version else st.model_version
    moving = state in MOVING_STATES
    tone = "failed" if state == "failed" else "moving" if moving or state == "pending" else ""
    if not m.assigned_version:
        summary = f"{m.model_name}@{serving} (unassigned)" if serving else ""
        tone = "moving" if serving else ""
    elif m.shadow and state == "committed":
        summary = f"{m.model_name}@{m.assigned_version} (shadow)"
    elif serving == m.assigned_version and not moving and state != "failed":
        summary = f"{m.model_name}@{serving}"
    else:
        detail = state or "pending"
        if state == "downloading":
            detail += _percent(st.bytes_done, st.bytes_total)
        summary = f"{m.model_name}@{m.assigned_version} ({detail})"
        tone = tone or "moving"
    return ModelView(
        name=m.model_name, assigned=m.assigned_version, serving=serving, state=state,
        target=target, sequence=m.sequence, rollout_id=m.rollout_id, shadow=m.shadow,
        bytes_done=st.bytes_done, bytes_total=st.bytes_total,
        reason=st.reason if not stale else "", summary=summary, tone=tone,
        download_source=st.download_source if state == "downloading" else "",
        download_rate=st.download_rate if state == "downloading" else 0,
    )  # fmt: skip


def model_views(device: common_pb2.Device) -> list[ModelView]:
    """Every model of the device (device_models), as model_view."""
    return [model_view(m) for m in device_models(device)]


def model_update_text(v: ModelView) -> str:
    """The update in flight (`downloading 1.0 KiB/2.0 KiB`) or the last
    failure with its reason (`failed: p95 over budget`); "" when settled."""
    if v.state == "failed":
        return f"failed: {v.reason}" if v.reason else "failed"
    if v.state in MOVING_STATES:
        progress = f" {format_bytes(v.bytes_done)}/{format_bytes(v.bytes_total)}"
        if v.download_rate:
            progress += f" at {format_bytes(v.download_rate)}/s"
        source = f" from {v.download_source}" if v.download_source else ""
        return f"{v.state} {v.target}" + (progress if v.bytes_total else "") + source + (
            f": {v.reason}" if v.reason else "")  # fmt: skip
    if v.state == "pending":
        return f"waiting for the agent to take {v.assigned}"
    return v.reason


def lowest_fidelity(candidate: operator_pb2.BuildCandidate) -> tuple[float, str] | None:
    """The lowest judged output's fidelity and its metric (`mask IoU`),
    named after the output when several are judged (`prob_map mask IoU`):
    what the floor was compared with. None for a report stored before
    output kinds, whose `agreement` is argmax agreement. The CLI's and the
    TUI's candidate tables both show it."""
    judged = [f for f in candidate.fidelity if f.kind != common_pb2.OUTPUT_KIND_STATE]
    if not judged:
        return None
    worst = min(judged, key=lambda f: f.value)
    return worst.value, f"{worst.output} {worst.metric}" if len(judged) > 1 else worst.metric
