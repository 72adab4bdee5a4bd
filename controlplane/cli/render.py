"""Protobuf messages to rich renderables for the `edgefleet` CLI's human output.

Pure functions: each takes messages (and `now` where ages are shown) and
returns a rich Table or text; the CLI prints them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from controlplane.cli.convert import enum_name, format_duration, format_labels, format_rule
from edgefleet.v1 import common_pb2, operator_pb2

NONE = "-"


# ------------------------------------------------------------------ scalars


def short_id(full: str) -> str:
    """The first 8 characters, as tables show ids (the CLI accepts prefixes)."""
    return full[:8]


def _when(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def format_time(ts: Timestamp) -> str:
    """`2026-11-22 03:00:05Z`; `-` when unset."""
    when = _when(ts)
    return when.strftime("%Y-%m-%d %H:%M:%SZ") if when else NONE


def format_ago(ts: Timestamp, now: datetime) -> str:
    """`5m ago`, `in 23h59m`, `just now`; `-` when unset."""
    when = _when(ts)
    if when is None:
        return NONE
    delta = now - when
    if abs(delta.total_seconds()) < 1:
        return "just now"
    if delta.total_seconds() > 0:
        return f"{format_duration(delta)} ago"
    return f"in {format_duration(-delta)}"


def format_mb(mb: float) -> str:
    """Megabytes (MiB) for people: `512 MiB`, `3.8 GiB`; `-` for zero."""
    if mb <= 0:
        return NONE
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def format_bytes(n: int) -> str:
    """`812 B`, `1.5 KiB`, `12.0 MiB`, `1.2 GiB`."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_shape(spec: common_pb2.TensorSpec) -> str:
    """`[batch, 64]`: dynamic dims by name (or `?`)."""
    dims = []
    for i, d in enumerate(spec.shape):
        name = spec.dim_names[i] if i < len(spec.dim_names) else ""
        dims.append(str(d) if d >= 0 else (name or "?"))
    return f"[{', '.join(dims)}]"


def format_constraints(c: common_pb2.ConstraintProfile) -> str:
    """One line: `onnxruntime, int8, size<=20 MiB, p95<=15 ms, accel=jetson`."""
    parts = [
        enum_name(common_pb2.Runtime, c.runtime),
        enum_name(common_pb2.Quantization, c.quantization),
    ]
    if c.HasField("max_model_size_mb"):
        parts.append(f"size<={c.max_model_size_mb:g} MiB")
    if c.HasField("latency_budget_p95_ms"):
        parts.append(f"p95<={c.latency_budget_p95_ms:g} ms")
    if c.HasField("max_memory_mb"):
        parts.append(f"mem<={c.max_memory_mb:g} MiB")
    if c.HasField("min_accuracy_retention"):
        parts.append(f"accuracy>={c.min_accuracy_retention:g}")
    if c.accelerator:
        parts.append(f"accel={c.accelerator}")
    return ", ".join(parts)


# Columns whose cells may wrap onto several lines; the rest stay on one line
# (ids must stay whole to be typed back, and names read badly when split).
_WRAPPING = {"LABELS", "CONSTRAINTS", "RULES", "DESCRIPTION", "INPUTS", "OUTPUTS"}


def _table(*headers: str) -> Table:
    """A borderless table, like `docker ps`."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for header in headers:
        wraps = header in _WRAPPING
        table.add_column(
            header,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=12 if wraps else None,
        )
    return table


def _add_row(table: Table, *cells: RenderableType) -> None:
    """Strings become Text, not markup: names, labels and shapes may hold `[`."""
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))


def _grid(rows: Iterable[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        _add_row(grid, key, value)
    return grid


# ------------------------------------------------------------------ tokens


def token_status(token: operator_pb2.EnrollmentToken, now: datetime) -> str:
    """`revoked`, `expired`, `used up` or `active`."""
    if _when(token.revoked_at):
        return "revoked"
    expires = _when(token.expires_at)
    if expires and expires <= now:
        return "expired"
    if token.max_uses and token.uses >= token.max_uses:
        return "used up"
    return "active"


def tokens_table(tokens: Sequence[operator_pb2.EnrollmentToken], now: datetime) -> Table:
    table = _table("ID", "NAME", "POLICY", "LABELS", "USES", "EXPIRES", "STATUS", "CREATED BY")
    for t in tokens:
        _add_row(
            table,
            short_id(t.id),
            t.name,
            enum_name(operator_pb2.EnrollmentPolicy, t.policy),
            format_labels(t.labels) or NONE,
            f"{t.uses}/{t.max_uses or '∞'}",
            format_ago(t.expires_at, now),
            token_status(t, now),
            t.created_by or NONE,
        )
    return table


def token_created(resp: operator_pb2.CreateEnrollmentTokenResponse) -> RenderableType:
    t = resp.token
    details = _grid(
        [
            ("id", t.id),
            ("name", t.name),
            ("policy", enum_name(operator_pb2.EnrollmentPolicy, t.policy)),
            ("labels", format_labels(t.labels) or NONE),
            ("max uses", str(t.max_uses or "unlimited")),
            ("expires", format_time(t.expires_at)),
        ]
    )
    secret = Text.assemble(
        ("Enrollment secret (shown once, store it now):\n", "bold yellow"), (resp.secret, "bold")
    )
    return Group(details, Text(), secret)


# ------------------------------------------------------------------ devices


def _class_cell(d: common_pb2.Device) -> str:
    if not d.class_name:
        return NONE
    return f"{d.class_name} (pinned)" if d.class_pinned else d.class_name


def devices_table(devices: Sequence[common_pb2.Device], now: datetime) -> Table:
    # Hardware (arch, memory) is in `devices show` and --json: at 80 columns
    # there is no room for it beside the labels, which matter more here.
    table = _table("ID", "NAME", "STATE", "CLASS", "LABELS", "ONLINE", "LAST SEEN")
    for d in devices:
        _add_row(
            table,
            short_id(d.id),
            d.name,
            enum_name(common_pb2.DeviceState, d.state),
            _class_cell(d),
            format_labels(d.labels) or NONE,
            Text("yes", style="green") if d.online else Text("no", style="dim"),
            format_ago(d.last_seen_at, now),
        )
    return table


def device_detail(d: common_pb2.Device, now: datetime) -> RenderableType:
    hw, rt, up = d.hardware, d.runtime, d.update
    accelerators = ", ".join(
        f"{a.kind} {a.name}".strip() + (f" ({format_mb(a.memory_mb)})" if a.memory_mb else "")
        for a in hw.accelerators
    )
    rows: list[tuple[str, RenderableType]] = [
        ("id", d.id),
        ("name", d.name),
        ("hardware id", d.hardware_id),
        ("state", enum_name(common_pb2.DeviceState, d.state)),
        ("class", _class_cell(d)),
        ("labels", format_labels(d.labels) or NONE),
        ("online", "yes" if d.online else "no"),
        ("last seen", f"{format_ago(d.last_seen_at, now)} ({format_time(d.last_seen_at)})"),
        ("enrolled", format_time(d.enrolled_at)),
        ("os", f"{hw.os} {hw.os_release}".strip() or NONE),
        ("arch", hw.arch or NONE),
        ("board", hw.board_model or NONE),
        ("cpu", f"{hw.cpu_model or '?'} ({hw.cpu_cores} cores)"),
        ("memory", format_mb(hw.memory_mb)),
        ("disk", f"{format_mb(hw.disk_free_mb)} free of {format_mb(hw.disk_total_mb)}"),
        ("accelerators", accelerators or NONE),
        ("agent", f"{rt.agent_version or '?'} (python {rt.python_version or '?'})"),
        (
            "onnxruntime",
            f"{rt.onnxruntime_version} [{', '.join(rt.onnxruntime_providers)}]"
            if rt.onnxruntime_version
            else NONE,
        ),
        ("litert", f"{rt.litert_package} {rt.litert_version}".strip() or NONE),
        ("tensorrt", rt.tensorrt_version or NONE),
        ("revision", f"desired {d.desired_revision}, applied {d.applied_revision}"),
    ]
    if up.state:
        model = f"{up.model_name} {up.model_version}".strip()
        progress = f" {format_bytes(up.bytes_done)}/{format_bytes(up.bytes_total)}"
        rows.append(
            (
                "update",
                f"{up.state} {model}".strip()
                + (progress if up.bytes_total else "")
                + (f": {up.reason}" if up.reason else ""),
            )
        )
    return _grid(rows)


# ------------------------------------------------------------------ classes


def classes_table(classes: Sequence[common_pb2.DeviceClass]) -> Table:
    table = _table("NAME", "PRIORITY", "CONSTRAINTS", "RULES", "DEVICES")
    for c in classes:
        _add_row(
            table,
            c.name,
            str(c.priority),
            format_constraints(c.constraints),
            "\n".join(format_rule(r) for r in c.match_rules) or "(pin only)",
            str(c.device_count),
        )
    return table


def class_detail(c: common_pb2.DeviceClass) -> RenderableType:
    k = c.constraints
    rows: list[tuple[str, RenderableType]] = [
        ("name", c.name),
        ("id", c.id),
        ("description", c.description or NONE),
        ("priority", str(c.priority)),
        ("devices", str(c.device_count)),
        ("runtime", enum_name(common_pb2.Runtime, k.runtime)),
        ("quantization", enum_name(common_pb2.Quantization, k.quantization)),
        ("max size", f"{k.max_model_size_mb:g} MiB" if k.HasField("max_model_size_mb") else NONE),
        (
            "latency p95",
            f"{k.latency_budget_p95_ms:g} ms" if k.HasField("latency_budget_p95_ms") else NONE,
        ),
        ("max memory", f"{k.max_memory_mb:g} MiB" if k.HasField("max_memory_mb") else NONE),
        (
            "min accuracy",
            f"{k.min_accuracy_retention:g} of fp32"
            if k.HasField("min_accuracy_retention")
            else NONE,
        ),
        ("accelerator", k.accelerator or NONE),
        (
            "match rules",
            "\n".join(format_rule(r) for r in c.match_rules)
            or "(none: devices join only by pinning)",
        ),
        ("created", format_time(c.created_at)),
        ("updated", format_time(c.updated_at)),
    ]
    return _grid(rows)


# ------------------------------------------------------------------ models


def models_table(models: Sequence[common_pb2.Model]) -> Table:
    table = _table("NAME", "LATEST", "VERSIONS", "CREATED", "DESCRIPTION")
    for m in models:
        _add_row(
            table,
            m.name,
            m.latest_version or NONE,
            str(m.version_count),
            format_time(m.created_at),
            m.description or NONE,
        )
    return table


def versions_table(versions: Sequence[common_pb2.ModelVersion]) -> Table:
    table = _table("VERSION", "SIZE", "INPUTS", "OUTPUTS", "SAMPLES", "SHA256", "CREATED")
    for v in versions:
        _add_row(
            table,
            v.version,
            format_bytes(v.size_bytes),
            ", ".join(f"{t.name}{format_shape(t)}" for t in v.inputs),
            ", ".join(f"{t.name}{format_shape(t)}" for t in v.outputs),
            str(v.sample_data.num_samples) if v.sample_data.sha256 else NONE,
            v.sha256[:12],
            format_time(v.created_at),
        )
    return table


def tensors_table(v: common_pb2.ModelVersion) -> Table:
    table = _table("", "NAME", "DTYPE", "SHAPE")
    for kind, specs in (("input", v.inputs), ("output", v.outputs)):
        for t in specs:
            _add_row(table, kind, t.name, t.dtype, format_shape(t))
    return table


def model_version_detail(v: common_pb2.ModelVersion) -> RenderableType:
    sample = NONE
    if v.sample_data.sha256:
        sample = f"{v.sample_data.num_samples} samples, {format_bytes(v.sample_data.size_bytes)}"
        sample += ", labelled" if v.sample_data.has_labels else ""
    rows: list[tuple[str, RenderableType]] = [
        ("model", v.model_name),
        ("version", v.version),
        ("description", v.description or NONE),
        ("size", format_bytes(v.size_bytes)),
        ("sha256", v.sha256),
        ("opset", str(v.opset)),
        ("producer", v.producer or NONE),
        ("sample data", sample),
        ("labels", f"{v.labels.count} classes" if v.labels.sha256 else NONE),
        ("created", f"{format_time(v.created_at)} by {v.created_by or '?'}"),
    ]
    return Group(_grid(rows), tensors_table(v))


def model_detail(resp: operator_pb2.GetModelResponse) -> RenderableType:
    m = resp.model
    head = _grid(
        [
            ("model", m.name),
            ("description", m.description or NONE),
            ("latest", m.latest_version or NONE),
            ("created", format_time(m.created_at)),
        ]
    )
    return Group(head, versions_table(resp.versions))
