"""Protobuf messages to rich renderables for the `edgefleet` CLI's human output.

Pure functions: each takes messages (and `now` where ages are shown) and
returns a rich Table or text; the CLI prints them. The plain-string figures
the TUI shows too (sizes, ages, shapes, stages, cohort, pacing) come from
the client library (controlplane.client.format, .stages, .syntax)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from edgefleet.controlplane.client import format as client_format
from edgefleet.controlplane.client.format import (
    NONE,
    ModelView,
    format_bar,
    format_bytes,
    format_cohort,
    format_pacing,
    format_shape,
    lowest_fidelity,
    model_update_text,
    model_views,
)
from edgefleet.controlplane.client.stages import format_stage, format_stage_size, stage_options
from edgefleet.controlplane.client.syntax import (
    enum_name,
    format_duration,
    format_labels,
    format_rule,
)
from edgefleet.controlplane.domain.input_shapes import format_dims
from edgefleet.update_state import name_of
from edgefleet.v1 import common_pb2, operator_pb2

# ------------------------------------------------------------------ scalars


# How many characters of an id tables show (the server takes any unique prefix).
SHORT_ID = 8


def short_id(full: str) -> str:
    """The first SHORT_ID characters, as tables show ids."""
    return full[:SHORT_ID]


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
    return client_format.format_ago(_when(ts), now)


def format_mb(mb: float) -> str:
    """Megabytes (MiB) for people: `512 MiB`, `3.8 GiB`; `-` for zero."""
    if mb <= 0:
        return NONE
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


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
    if c.HasField("device_memory_mb"):
        parts.append(f"device mem<={c.device_memory_mb:g} MiB")
    if c.HasField("min_accuracy_retention"):
        parts.append(f"accuracy>={c.min_accuracy_retention:g}")
    if c.accelerator:
        parts.append(f"accel={c.accelerator}")
    if c.HasField("threads"):
        parts.append(f"threads={c.threads}")
    if c.HasField("speed_factor"):
        parts.append(f"speed x{c.speed_factor:g}")
    if c.microcontroller:
        parts.append("microcontroller")
    if c.HasField("fallback") and c.fallback:
        parts.append(f"fallback={enum_name(common_pb2.Quantization, c.fallback)}")
    return ", ".join(parts)


# Columns whose cells may wrap onto several lines; the rest stay on one line
# (ids must stay whole to be typed back, and names read badly when split).
_WRAPPING = {
    "LABELS",
    "CONSTRAINTS",
    "RULES",
    "DESCRIPTION",
    "INPUTS",
    "OUTPUTS",
    "REASONS",
    "REASON",
    "MODELS",
    "DETAIL",
}


def _table(*headers: str) -> Table:
    """A borderless table, like `docker ps`."""
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for header in headers:
        wraps = header in _WRAPPING
        table.add_column(
            header,
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            # An id is what the next command takes: never cut below the 8
            # characters tables show (`builds ls` at 80 columns showed 5).
            min_width=12 if wraps else SHORT_ID if header == "ID" else None,
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


def operator_tokens_table(tokens: Sequence[operator_pb2.OperatorToken], now: datetime) -> Table:
    table = _table("ID", "NAME", "ROLE", "CREATED", "LAST USED", "EXPIRES", "STATUS")
    for t in tokens:
        expires = _when(t.expires_at)
        status = (
            "revoked" if _when(t.revoked_at)
            else "expired" if expires and expires <= now
            else "active"
        )  # fmt: skip
        _add_row(
            table, short_id(t.id), t.name, enum_name(operator_pb2.OperatorRole, t.role),
            format_ago(t.created_at, now), format_ago(t.last_used_at, now),
            format_ago(t.expires_at, now), status,
        )  # fmt: skip
    return table


def operator_token_created(resp: operator_pb2.CreateOperatorTokenResponse) -> RenderableType:
    t = resp.token
    details = _grid([
        ("id", t.id), ("name", t.name), ("role", enum_name(operator_pb2.OperatorRole, t.role)),
        ("expires", format_time(t.expires_at)),
    ])  # fmt: skip
    secret = Text.assemble(
        ("Operator token (shown once, store it now):\n", "bold yellow"), (resp.secret, "bold")
    )
    return Group(details, Text(), secret)


def signing_keys_table(keys: Sequence[common_pb2.SigningKey], now: datetime) -> Table:
    table = _table("KEY ID", "CREATED", "RETIRED", "STATUS")
    for k in keys:
        retired = _when(k.retired_at)
        _add_row(
            table, k.key_id, format_ago(k.created_at, now), format_ago(k.retired_at, now),
            "retired" if retired else "current",
        )  # fmt: skip
    return table


def signing_key_rotated(resp: operator_pb2.RotateSigningKeyResponse) -> RenderableType:
    return _grid([
        ("new key", resp.new_key.key_id), ("replaces", resp.previous_key.key_id),
        ("artifacts signed again", str(resp.artifacts_resigned)),
    ])  # fmt: skip


# ------------------------------------------------------------------ devices


def _class_cell(d: common_pb2.Device) -> str:
    if not d.class_name:
        return NONE
    return f"{d.class_name} (pinned)" if d.class_pinned else d.class_name


_MODEL_TONES = {"failed": "red", "moving": "yellow"}


def _models_cell(d: common_pb2.Device) -> Text:
    """Every model the device serves, compactly: `digits@1.2.0, vad@5.0.0
    (downloading 40%)`, each coloured by where its update stands."""
    cell = Text()
    for view in (v for v in model_views(d) if v.summary):
        if cell:
            cell.append(", ")
        cell.append(view.summary, style=_MODEL_TONES.get(view.tone, ""))
    return cell if cell else Text(NONE)


def devices_table(devices: Sequence[common_pb2.Device], now: datetime) -> Table:
    # Hardware (arch, memory) is in `devices show` and --json: at 80 columns
    # there is no room for it beside the labels, which matter more here.
    table = _table("ID", "NAME", "STATE", "CLASS", "MODELS", "LABELS", "ONLINE", "LAST SEEN")
    for d in devices:
        _add_row(
            table,
            short_id(d.id),
            d.name,
            enum_name(common_pb2.DeviceState, d.state),
            _class_cell(d),
            _models_cell(d),
            format_labels(d.labels) or NONE,
            Text("yes", style="green") if d.online else Text("no", style="dim"),
            format_ago(d.last_seen_at, now),
        )
    return table


def device_detail(d: common_pb2.Device, now: datetime) -> RenderableType:
    hw, rt = d.hardware, d.runtime
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
        (
            "agent",
            f"{rt.agent_version or '?'} (python {rt.python_version or '?'}"
            + (f", protocol {d.agent_protocol})" if d.agent_protocol else ")"),
        ),
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
    models = model_views(d)
    if not models:
        rows.append(("models", NONE))
        return _grid(rows)
    return Group(_grid(rows), Text(""), device_models_table(models))


def device_models_table(models: Sequence[ModelView]) -> Table:
    """`devices show`: each model's assigned and served version, its update
    state, and the update in flight or the last failure."""
    table = _table("MODEL", "ASSIGNED", "SERVING", "STATE", "SEQ", "ROLLOUT", "DETAIL")
    for v in models:
        state = v.state or NONE
        if v.shadow:
            state += " (shadow)"
        _add_row(
            table,
            v.name,
            v.assigned or "(unassigned)",
            v.serving or NONE,
            Text(state, style=_MODEL_TONES.get(v.tone, "")),
            str(v.sequence) if v.sequence else NONE,
            short_id(v.rollout_id) if v.rollout_id else NONE,
            model_update_text(v) or NONE,
        )
    return table


def assignments_table(assignments: Sequence[operator_pb2.DeviceAssignment], now: datetime) -> Table:
    table = _table("DEVICE", "CLASS", "MODEL@VERSION", "ARTIFACT", "SIZE", "SEQ", "ASSIGNED")
    for a in assignments:
        _add_row(
            table,
            short_id(a.device_id),
            a.class_name,
            model_ref(a.model_name, a.model_version),
            short_digest(a.artifact_digest),
            format_bytes(a.artifact_size),
            str(a.sequence),
            format_ago(a.assigned_at, now),
        )
    return table


def unassigned(model_name: str, resp: operator_pb2.UnassignModelResponse) -> Text:
    """`devices unassign`: which devices the model was removed from, which
    did not hold it."""
    text = Text()
    if resp.removed:
        text.append(f"removed {model_name} from {len(resp.removed)} device(s): ", style="green")
        text.append(", ".join(short_id(i) for i in resp.removed))
    if resp.not_assigned:
        if text:
            text.append("\n")
        text.append(f"{model_name} was not assigned to {len(resp.not_assigned)} device(s): ",
                    style="dim")  # fmt: skip
        text.append(", ".join(short_id(i) for i in resp.not_assigned))
    return text if text else Text(f"{model_name}: no devices named")


_DEPLOYMENT_STYLES = {"committed": "green", "failed": "red", "rolling_back": "yellow"}


def deployment_history(resp: operator_pb2.ListDeploymentsResponse, now: datetime) -> Group:
    """A device's assignment, then the states it reported, newest first."""
    events = _table("WHEN", "SEQ", "MODEL@VERSION", "STATE", "BYTES", "REASON")
    for e in resp.events:
        _add_row(
            events,
            format_ago(e.at, now),
            str(e.sequence),
            model_ref(e.model_name, e.model_version),
            Text(name_of(e.state) or NONE, style=_DEPLOYMENT_STYLES.get(name_of(e.state), "")),
            f"{format_bytes(e.bytes_done)}/{format_bytes(e.bytes_total)}" if e.bytes_total else "",
            e.reason or "",
        )
    return Group(assignments_table(resp.assignments, now), events)


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
            "device memory",
            f"{k.device_memory_mb:g} MiB (all models)" if k.HasField("device_memory_mb") else NONE,
        ),
        (
            "min accuracy",
            f"{k.min_accuracy_retention:g} of fp32"
            if k.HasField("min_accuracy_retention")
            else NONE,
        ),
        ("accelerator", k.accelerator or NONE),
        ("threads", str(k.threads) if k.HasField("threads") else "1 (default)"),
        (
            "speed factor",
            f"{k.speed_factor:g}" if k.HasField("speed_factor") else "1 (default)",
        ),
        ("microcontroller", "yes (also emits C source)" if k.microcontroller else "no"),
        (
            "fallback",
            f"{enum_name(common_pb2.Quantization, k.fallback)} (served while hot or low on battery)"
            if k.HasField("fallback") and k.fallback
            else NONE,
        ),
        (
            "input shapes",
            "\n".join(f"{s.name}={format_dims(s.dims)}" for s in k.input_shapes)
            or "(none: TFLite builds fix dynamic dims to the samples' shape)",
        ),
        (
            "match rules",
            "\n".join(format_rule(r) for r in c.match_rules)
            or "(none: devices join only by pinning)",
        ),
        (
            "mirrors",
            "\n".join(c.artifact_mirrors) or "(none: the server's mirrors, then the control plane)",
        ),
        (
            "download cap",
            f"{format_bytes(c.max_download_rate)}/s" if c.max_download_rate else NONE,
        ),
        ("created", format_time(c.created_at)),
        ("updated", format_time(c.updated_at)),
    ]
    return _grid(rows)


# ------------------------------------------------------------------ models


def models_table(models: Sequence[common_pb2.Model]) -> Table:
    table = _table("NAME", "LATEST", "VERSIONS", "CREATED", "DESCRIPTION")
    for m in models:
        versions = str(m.version_count)
        _add_row(
            table,
            m.name,
            m.latest_version or NONE,
            f"{versions} ({m.yanked_count} yanked)" if m.yanked_count else versions,
            format_time(m.created_at),
            m.description or NONE,
        )
    return table


def versions_table(versions: Sequence[common_pb2.ModelVersion]) -> Table:
    table = _table("VERSION", "SIZE", "INPUTS", "OUTPUTS", "SAMPLES", "SHA256", "CREATED")
    for v in versions:
        _add_row(
            table,
            f"{v.version} (yanked)" if v.yanked else v.version,
            format_bytes(v.size_bytes),
            ", ".join(f"{t.name}{format_shape(t)}" for t in v.inputs),
            ", ".join(f"{t.name}{format_shape(t)}" for t in v.outputs),
            str(v.sample_data.num_samples) if v.sample_data.sha256 else NONE,
            v.sha256[:12],
            format_time(v.created_at),
        )
    return table


def tensors_table(v: common_pb2.ModelVersion) -> Table:
    kinds = {spec.name: spec for spec in v.output_specs}
    table = _table("", "NAME", "DTYPE", "SHAPE", "JUDGED AS")
    for t in v.inputs:
        _add_row(table, "input", t.name, t.dtype, format_shape(t), "")
    for t in v.outputs:
        spec = kinds.get(t.name)
        _add_row(table, "output", t.name, t.dtype, format_shape(t), output_kind(spec))
    return table


def output_kind(spec: common_pb2.OutputSpec | None) -> str:
    """`dense-map, threshold 0.3 (declared)`; `state of input h0 (inferred)`."""
    if spec is None:
        return NONE
    kind = enum_name(common_pb2.OutputKind, spec.kind)
    if spec.HasField("threshold"):
        kind += f", threshold {spec.threshold:g}"
    if spec.HasField("blank"):
        kind += f", blank {spec.blank}"
    if spec.state_input:
        kind += f" of input {spec.state_input}, not judged"
    return f"{kind} ({'declared' if spec.declared else 'inferred'})"


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
        ("min fidelity", f"{v.min_fidelity:g}" if v.HasField("min_fidelity")
                         else "the class's min accuracy retention"),
        ("created", f"{format_time(v.created_at)} by {v.created_by or '?'}"),
        ("deployed", f"since {format_time(v.first_assigned_at)}"
                     if v.HasField("first_assigned_at") else "never"),
    ]  # fmt: skip
    if v.yanked:
        rows.append((
            "yanked",
            Text(f"{v.yank_reason} ({format_time(v.yanked_at)} by {v.yanked_by or '?'}); "
                 "no new assignments or rollouts", style="red"),
        ))  # fmt: skip
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


# ------------------------------------------------------------------ builds

LOG_TAIL_LINES = 15

_STATE_STYLES = {
    operator_pb2.BUILD_STATE_QUEUED: "dim",
    operator_pb2.BUILD_STATE_RUNNING: "yellow",
    operator_pb2.BUILD_STATE_SUCCEEDED: "green",
    operator_pb2.BUILD_STATE_FAILED: "red",
    operator_pb2.BUILD_STATE_CANCELLED: "dim",
}


def short_digest(digest: str) -> str:
    """The first 12 hex digits, as tables show digests; `-` when empty."""
    return digest[:12] or NONE


def model_ref(name: str, version: str) -> str:
    """`classifier@1.2.0`, as `builds run` takes it."""
    return f"{name}@{version}"


def build_state(b: operator_pb2.Build) -> Text:
    return Text(enum_name(operator_pb2.BuildState, b.state), style=_STATE_STYLES.get(b.state, ""))


def format_progress(fraction: float) -> str:
    return f"{max(0.0, min(fraction, 1.0)) * 100:.0f}%"


def format_seconds(seconds: float) -> str:
    """`4.2s` under a minute, else `3m12s`; `-` for zero."""
    if seconds <= 0:
        return NONE
    if seconds < 60:
        return f"{seconds:.1f}s"
    return format_duration(timedelta(seconds=seconds))


def chosen_candidate(b: operator_pb2.Build) -> str:
    """The name of the candidate the build shipped; `-` when none."""
    return next((c.name for c in b.candidates if c.chosen), NONE)


def shape_rows(b: operator_pb2.Build) -> list[tuple[str, RenderableType]]:
    """`accepts`: the input shapes the chosen artifact takes when they are
    its own (a TFLite artifact fixes dynamic dims), `images [-1,3,48,320]`;
    none otherwise. (What was fixed is each candidate's note.)"""
    chosen = next((c for c in b.candidates if c.chosen), None)
    if chosen is None or not chosen.accepted_inputs:
        return []
    text = "\n".join(
        f"{t.name} [{','.join(str(d) for d in t.shape)}]"
        + (" (-1: any size)" if any(d < 0 for d in t.shape) else "")
        for t in chosen.accepted_inputs
    )
    return [("accepts", text)]


def fallback_cell(b: operator_pb2.Build) -> RenderableType:
    """The lighter fallback the build shipped beside the chosen artifact (name,
    digest, size), why there is none when the class asked for one, or `-`."""
    if b.fallback_digest:
        name = next((c.name for c in b.candidates if c.fallback), "?")
        return f"{name} as {b.fallback_digest} ({format_bytes(b.fallback_size)})"
    if b.fallback_reason:
        return Text(f"none: {b.fallback_reason}", style="yellow")
    return NONE


def builds_table(builds: Sequence[operator_pb2.Build], now: datetime) -> Table:
    table = _table(
        "ID", "MODEL@VERSION", "CLASS", "STATE", "PROGRESS", "CHOSEN", "ARTIFACT", "CREATED",
        "REUSED",
    )  # fmt: skip
    for b in builds:
        _add_row(
            table,
            short_id(b.id),
            model_ref(b.model_name, b.model_version),
            b.class_name,
            build_state(b),
            format_progress(b.progress),
            chosen_candidate(b),
            short_digest(b.artifact_digest),
            format_ago(b.created_at, now),
            short_id(b.reused_from) or NONE,
        )
    return table


def candidate_verdict(c: operator_pb2.BuildCandidate) -> Text:
    """`chosen` (shipped), `fallback` (shipped as the lighter fallback),
    `pass` (met every constraint) or `fail`."""
    if c.chosen:
        return Text("chosen", style="bold green")
    if c.fallback:
        return Text("fallback", style="bold cyan")
    if c.passed:
        return Text("pass", style="green")
    return Text("fail", style="red")


def candidate_reasons(c: operator_pb2.BuildCandidate) -> list[str]:
    """Each constraint missed, the build or run error first when no reason
    already carries it; then the notes (a latency near its budget, timing
    that stayed noisy, shapes fixed)."""
    reasons = list(c.reasons)
    if c.error and not any(c.error in r for r in reasons):
        reasons.insert(0, c.error)
    return reasons + [f"note: {note}" for note in c.notes]


def fidelity_cell(c: operator_pb2.BuildCandidate, *, compact: bool = False) -> str:
    """The lowest judged output's fidelity and its metric: `99.3% mask IoU`
    (the value alone for a report stored before output kinds: argmax
    agreement, as the docs of that column said then)."""
    lowest = lowest_fidelity(c)
    if lowest is None:
        return f"{c.agreement * 100:.1f}%"
    value, metric = lowest
    return f"{value * 100:.1f}%" if compact else f"{value * 100:.1f}% {metric}"


def fidelity_table(candidates: Sequence[operator_pb2.BuildCandidate]) -> Table | None:
    """Every candidate's fidelity output by output, with each metric's
    secondary figures; None when no candidate has per-output figures."""
    rows = [(c, f) for c in candidates for f in c.fidelity]
    if not rows:
        return None
    table = _table("CANDIDATE", "OUTPUT", "KIND", "METRIC", "VALUE", "ALSO")
    for c, f in rows:
        judged = f.kind != common_pb2.OUTPUT_KIND_STATE
        also = ", ".join(f"{k} {v:.4g}" for k, v in sorted(f.details.items()))
        _add_row(
            table,
            c.name,
            f.output,
            enum_name(common_pb2.OutputKind, f.kind),
            f.metric,
            f"{f.value:.4f}" if judged else NONE,
            also or NONE,
        )
    return table


# One line each, unit included: a header split over two lines read, on its
# second line, as `MS MS MB % %`.
_CANDIDATE_NUMBERS = (
    "SIZE", "P50 MS", "P95 MS", "PEAK MB", "FIDELITY", "ACCURACY", "MAX |DIFF|",
)  # fmt: skip
# Where even that does not fit (80 columns): shorter names, no MAX |DIFF|.
_COMPACT_NUMBERS = ("SIZE", "P50 MS", "P95 MS", "PEAK MB", "FIDEL", "ACC", "")
# Narrower than this, the REASONS column moves under the table: a reason
# ("latency p95 21.30 ms > budget 15.00 ms (+42.0%)") squeezed into a few
# characters reads worse than one on its own line.
_REASONS_MIN_WIDTH = 40


def format_ms(ms: float) -> str:
    """`21.30`; three decimals under 0.1 ms, where two would read as zero."""
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def _candidate_cells(c: operator_pb2.BuildCandidate, compact: bool = False) -> list[Text]:
    measured = not c.error
    cells = [
        c.name,
        enum_name(common_pb2.Runtime, c.runtime),
        enum_name(common_pb2.Quantization, c.quantization),
        format_bytes(c.size_bytes) if c.size_bytes else NONE,
        format_ms(c.latency_p50_ms) if measured else NONE,
        format_ms(c.latency_p95_ms) if measured else NONE,
        f"{c.peak_memory_mb:.1f}" if measured else NONE,
        fidelity_cell(c, compact=compact) if measured else NONE,
        f"{c.accuracy * 100:.1f}%" if measured and c.HasField("accuracy") else NONE,
        f"{c.max_abs_diff:.3g}" if measured else NONE,
    ]
    return [*(Text(cell) for cell in cells), candidate_verdict(c)]


def _candidates_table(
    candidates: Sequence[operator_pb2.BuildCandidate],
    *,
    reasons: bool,
    runtime: bool,
    compact: bool = False,
) -> Table:
    numbers = _COMPACT_NUMBERS if compact else _CANDIDATE_NUMBERS
    headers = ("CANDIDATE", "RUNTIME", "PRECISION", *numbers, "VERDICT")
    rows = [_candidate_cells(c, compact) for c in candidates]
    keep = [i for i in range(len(headers)) if (runtime or i not in (1, 2)) and headers[i]]
    table = _table(*(headers[i] for i in keep), *(("REASONS",) if reasons else ()))
    for column, i in zip(table.columns, keep, strict=False):
        if i >= 3:  # numbers and verdicts are never cut
            column.justify = "right" if i < len(headers) - 1 else "left"
            column.min_width = max((row[i].cell_len for row in rows), default=1)
    for c, row in zip(candidates, rows, strict=True):
        cells = [row[i] for i in keep]
        if reasons:
            cells.append(Text("\n".join(candidate_reasons(c)) or NONE))
        _add_row(table, *cells)
    return table


class CandidatesTable:
    """A build's optimization ladder: what each rung measured, its verdict
    and why it failed. Fitted to the console: the reasons are a wrapped last
    column where there is room, else listed under the table; narrower still,
    the runtime and precision columns go (candidate names carry both), then
    MAX |DIFF| and the long header names."""

    def __init__(self, candidates: Sequence[operator_pb2.BuildCandidate]) -> None:
        self.candidates = list(candidates)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = _candidates_table(self.candidates, reasons=False, runtime=True)
        # Measured as if unbounded: a measurement is capped at the console width.
        width = Measurement.get(console, options.update_width(10_000), table).maximum
        if width + 1 + _REASONS_MIN_WIDTH <= options.max_width:
            yield _candidates_table(self.candidates, reasons=True, runtime=True)
            return
        for compact in (False, True):
            if width <= options.max_width:
                break
            table = _candidates_table(
                self.candidates, reasons=False, runtime=False, compact=compact
            )
            width = Measurement.get(console, options.update_width(10_000), table).maximum
        yield table
        listed = [(c.name, "\n".join(candidate_reasons(c))) for c in self.candidates]
        rows = [(name, reasons) for name, reasons in listed if reasons]
        if rows:
            yield Text()
            yield Text("reasons:", style="bold")
            yield _grid(rows)


def candidates_table(candidates: Sequence[operator_pb2.BuildCandidate]) -> RenderableType:
    return CandidatesTable(candidates)


def log_tail(log: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(log.rstrip("\n").splitlines()[-lines:])


def _duration_cell(b: operator_pb2.Build) -> str:
    if b.reused_from:
        return "- (reused)"
    return format_seconds(b.duration_s)


def _build_state_cell(b: operator_pb2.Build) -> Text:
    """The state, and who cancelled it (or asked to, while it still runs)."""
    cell = build_state(b)
    if b.cancelled_by and b.state == operator_pb2.BUILD_STATE_RUNNING:
        cell.append(f" (cancel requested by {b.cancelled_by})")
    elif b.cancelled_by:
        cell.append(f" by {b.cancelled_by}")
    return cell


def build_detail(b: operator_pb2.Build, now: datetime) -> RenderableType:
    rows: list[tuple[str, RenderableType]] = [
        ("id", b.id),
        ("model", model_ref(b.model_name, b.model_version)),
        ("class", b.class_name),
        ("state", _build_state_cell(b)),
        ("progress", format_progress(b.progress)),
        ("created", f"{format_ago(b.created_at, now)} ({format_time(b.created_at)})"),
        ("duration", _duration_cell(b)),
        ("chosen", chosen_candidate(b)),
        # Only when there is something to say (a TFLite artifact's own shapes).
        *shape_rows(b),
        ("artifact", b.artifact_digest or NONE),
        ("fallback", fallback_cell(b)),
        ("dedup key", b.dedup_key or NONE),
        ("reused from", b.reused_from or NONE),
        ("error", Text(b.error, style="red") if b.error else NONE),
    ]
    parts: list[RenderableType] = [_grid(rows), Text()]
    if b.candidates:
        parts.append(candidates_table(b.candidates))
        per_output = fidelity_table(b.candidates)
        if per_output is not None:
            parts += [Text(), Text("fidelity by output:", style="bold"), per_output]
    else:
        parts.append(Text("no candidates measured yet", style="dim"))
    tail = log_tail(b.log)
    if tail:
        parts += [Text(), Text(f"log (last {LOG_TAIL_LINES} lines):", style="bold"), Text(tail)]
    return Group(*parts)


def build_report(builds: Sequence[operator_pb2.Build]) -> RenderableType:
    """What `builds run --wait` prints at the end: per build, one headline
    (state, chosen candidate, artifact) and its candidate table."""
    parts: list[RenderableType] = []
    for b in builds:
        head = Text.assemble(
            (f"{model_ref(b.model_name, b.model_version)} for class {b.class_name}: ", "bold"),
            build_state(b),
            f" (build {short_id(b.id)})",
        )
        if b.state == operator_pb2.BUILD_STATE_SUCCEEDED:
            head.append(
                f"\nshipping {chosen_candidate(b)} as {short_digest(b.artifact_digest)}"
                + (f", reused from build {short_id(b.reused_from)}" if b.reused_from else "")
            )
            if b.fallback_digest:
                name = next((c.name for c in b.candidates if c.fallback), "?")
                head.append(f"\nfallback {name} as {short_digest(b.fallback_digest)}")
            elif b.fallback_reason:
                head.append(f"\nno fallback: {b.fallback_reason}", style="yellow")
        if b.error:
            head.append(f"\n{b.error}", style="red")
        parts += [head, candidates_table(b.candidates) if b.candidates else Text(), Text()]
    return Group(*parts[:-1])


# ------------------------------------------------------------------ artifacts


def _tensors_cell(specs: Iterable[common_pb2.TensorSpec]) -> str:
    return "\n".join(f"{t.name}{format_shape(t)} {t.dtype}".strip() for t in specs) or NONE


def artifacts_table(artifacts: Sequence[operator_pb2.Artifact], now: datetime) -> Table:
    table = _table(
        "DIGEST", "MODEL@VERSION", "CLASS", "RUNTIME", "PRECISION", "CANDIDATE", "SIZE", "KEY ID",
        "CREATED",
    )  # fmt: skip
    for a in artifacts:
        m = a.manifest
        _add_row(
            table,
            short_digest(a.digest),
            model_ref(m.model_name, m.model_version),
            m.class_name,
            enum_name(common_pb2.Runtime, m.runtime),
            enum_name(common_pb2.Quantization, m.precision),
            m.candidate or NONE,
            format_bytes(a.size_bytes),
            short_id(a.signed_manifest.key_id) or NONE,
            format_ago(a.created_at, now),
        )
    return table


def format_tensorrt(spec: common_pb2.TensorRTBuildSpec) -> str:
    """`fp16, workspace 1024 MiB` and a line per input's shape range."""
    head = spec.precision or "?"
    if spec.workspace_mb:
        head += f", workspace {spec.workspace_mb} MiB"
    ranges = [
        f"{r.input}: min {list(r.min)} opt {list(r.opt)} max {list(r.max)}" for r in spec.profile
    ]
    return "\n".join([head, *ranges])


def _fallback_artifact(a: operator_pb2.Artifact) -> str:
    """The lighter fallback shipped with the artifact: its digest, and what
    its nested manifest says it is."""
    if not a.fallback_digest:
        return NONE
    nested = common_pb2.ArtifactManifest.FromString(a.manifest.fallback_manifest)
    what = ", ".join(
        (
            nested.candidate or "?",
            enum_name(common_pb2.Quantization, nested.precision),
            format_bytes(nested.size_bytes),
            f"{len(nested.golden)} golden samples",
        )
    )
    return f"{a.fallback_digest}\n{what}"


def artifact_detail(a: operator_pb2.Artifact) -> RenderableType:
    m = a.manifest
    runtimes = ", ".join(f"{k}>={v}" for k, v in sorted(m.min_runtime_versions.items()))
    rows: list[tuple[str, RenderableType]] = [
        ("digest", a.digest),
        ("model", m.model_name),
        ("version", m.model_version),
        ("class", m.class_name),
        ("runtime", enum_name(common_pb2.Runtime, m.runtime)),
        ("precision", enum_name(common_pb2.Quantization, m.precision)),
        ("candidate", m.candidate or NONE),
        ("sha256", m.sha256 or NONE),
        ("size", format_bytes(m.size_bytes or a.size_bytes)),
        ("media type", m.media_type or a.media_type or NONE),
        ("inputs", _tensors_cell(m.inputs)),
        ("outputs", _tensors_cell(m.outputs)),
        ("golden samples", str(len(m.golden))),
        ("atol", f"{m.atol:g}"),
        ("rtol", f"{m.rtol:g}"),
        ("min agreement", f"{m.min_agreement * 100:g}%"),
        ("min runtimes", runtimes or NONE),
        ("tensorrt", format_tensorrt(m.tensorrt) if m.HasField("tensorrt") else NONE),
        ("companion", m.companion_sha256 or NONE),
        ("fallback", _fallback_artifact(a)),
        ("build", m.build_id or a.build_id or NONE),
        ("signed by", f"key {a.signed_manifest.key_id}" if a.signed_manifest.key_id else NONE),
        ("manifest format", str(m.format_version)),
        ("created", format_time(a.created_at)),
    ]
    return _grid(rows)


# ------------------------------------------------------------------ telemetry

_RATIO_METRICS = {
    operator_pb2.TELEMETRY_METRIC_ERROR_RATE,
    operator_pb2.TELEMETRY_METRIC_TIMEOUT_RATE,
}


def format_metric(metric: int, value: float) -> str:
    """Rates of errors as percentages, everything else with 4 significant digits."""
    if metric in _RATIO_METRICS:
        return f"{value * 100:.2f}%"
    return f"{value:.4g}"


def telemetry_table(series: Sequence[operator_pb2.TelemetrySeries], metric: int) -> RenderableType:
    """One row per bucket of each series; a note when nothing matched."""
    if not series:
        return Text("no telemetry in this range")
    table = _table("GROUP", "TIME", enum_name(operator_pb2.TelemetryMetric, metric).upper())
    for s in series:
        for point in s.points:
            _add_row(table, s.group, format_time(point.at), format_metric(metric, point.value))
    return table


# ------------------------------------------------------------------ rollouts

_ROLLOUT_STYLES = {
    operator_pb2.ROLLOUT_STATE_DRAFT: "dim",
    operator_pb2.ROLLOUT_STATE_SCHEDULED: "cyan",
    operator_pb2.ROLLOUT_STATE_RUNNING: "yellow",
    operator_pb2.ROLLOUT_STATE_WAITING_APPROVAL: "bold cyan",
    operator_pb2.ROLLOUT_STATE_PAUSED: "magenta",
    operator_pb2.ROLLOUT_STATE_SUCCEEDED: "green",
    operator_pb2.ROLLOUT_STATE_ABORTED: "red",
    operator_pb2.ROLLOUT_STATE_SUCCEEDED_WITH_FAILURES: "bold yellow",
}
_ROLLOUT_DEVICE_STYLES = {
    operator_pb2.ROLLOUT_DEVICE_STATE_WAITING: "dim",
    operator_pb2.ROLLOUT_DEVICE_STATE_NOTIFIED: "yellow",
    operator_pb2.ROLLOUT_DEVICE_STATE_IN_PROGRESS: "yellow",
    operator_pb2.ROLLOUT_DEVICE_STATE_COMMITTED: "green",
    operator_pb2.ROLLOUT_DEVICE_STATE_FAILED: "red",
    operator_pb2.ROLLOUT_DEVICE_STATE_ROLLED_BACK: "red",
    operator_pb2.ROLLOUT_DEVICE_STATE_REJECTED: "red",
    operator_pb2.ROLLOUT_DEVICE_STATE_TIMED_OUT: "red",
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERTED: "magenta",
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERTING: "magenta",
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERT_FAILED: "bold red",
    operator_pb2.ROLLOUT_DEVICE_STATE_DROPPED: "dim",
    operator_pb2.ROLLOUT_DEVICE_STATE_SKIPPED: "cyan",
}
# Devices listed first when a listing is cut short (`rollouts watch`): the
# ones an operator acts on, then the ones still moving.
_DEVICE_ORDER = {
    operator_pb2.ROLLOUT_DEVICE_STATE_FAILED: 0,
    operator_pb2.ROLLOUT_DEVICE_STATE_ROLLED_BACK: 0,
    operator_pb2.ROLLOUT_DEVICE_STATE_REJECTED: 0,
    operator_pb2.ROLLOUT_DEVICE_STATE_TIMED_OUT: 0,
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERT_FAILED: 0,
    operator_pb2.ROLLOUT_DEVICE_STATE_IN_PROGRESS: 1,
    operator_pb2.ROLLOUT_DEVICE_STATE_NOTIFIED: 1,
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERTING: 1,
    operator_pb2.ROLLOUT_DEVICE_STATE_REVERTED: 2,
    operator_pb2.ROLLOUT_DEVICE_STATE_DROPPED: 2,
    operator_pb2.ROLLOUT_DEVICE_STATE_SKIPPED: 2,
}
_STAGE_PHASE_STYLES = {
    operator_pb2.STAGE_PHASE_PENDING: "dim", operator_pb2.STAGE_PHASE_ROLLING: "yellow",
    operator_pb2.STAGE_PHASE_BAKING: "yellow", operator_pb2.STAGE_PHASE_WAITING_APPROVAL:
    "bold cyan", operator_pb2.STAGE_PHASE_PASSED: "green",
    operator_pb2.STAGE_PHASE_PROMOTED: "bold green", operator_pb2.STAGE_PHASE_FAILED: "red",
    operator_pb2.STAGE_PHASE_ABORTED: "magenta",
}  # fmt: skip
# Gate units: how `GateValue.value` and `.limit` read (see domain.rollouts.Gates).
_GATE_UNITS = {"latency_p95": "ms", "memory": "MB", "agent_memory": "MB"}
_INF = float("inf")
# Rollouts whose current stage is worth pointing at.
_MOVING = frozenset(
    {
        operator_pb2.ROLLOUT_STATE_RUNNING,
        operator_pb2.ROLLOUT_STATE_WAITING_APPROVAL,
        operator_pb2.ROLLOUT_STATE_PAUSED,
    }
)


def rollout_state(r: operator_pb2.Rollout) -> Text:
    name = enum_name(operator_pb2.RolloutState, r.state)
    return Text(name, style=_ROLLOUT_STYLES.get(r.state, ""))


def rollout_device_state(d: operator_pb2.RolloutDevice) -> Text:
    name = enum_name(operator_pb2.RolloutDeviceState, d.state)
    return Text(name, style=_ROLLOUT_DEVICE_STYLES.get(d.state, ""))


def stage_title(index: int, name: str) -> str:
    """`stage 2 (canary)`; stages count from 1 for people."""
    return f"stage {index + 1}" + (f" ({name})" if name else "")


def _gate_number(name: str, value: float) -> str:
    if value == _INF:
        return "never" if name == "silence" else "∞"
    if name == "error_rate" or "agreement" in name:
        return f"{value * 100:.2f}%"
    if name == "silence":
        return format_seconds(value) if value > 0 else "0s"
    unit = _GATE_UNITS.get(name)
    return f"{value:.2f} {unit}" if unit else f"{value:.4g}"


def awaiting_telemetry(
    g: operator_pb2.GateValue, spec: operator_pb2.StageSpec | None = None
) -> bool:
    """Whether no device has been checked against the gate yet: the server
    sends 0 against 0 then. For the error rate 0 against 0 is also a real
    reading where the stage's spec sets `error-rate=0`."""
    if g.value != 0 or g.limit != 0:
        return False
    if g.name != "error_rate":
        return True
    return not (
        spec is not None
        and spec.gates.HasField("max_error_rate")
        and spec.gates.max_error_rate == 0
    )


def format_gate(g: operator_pb2.GateValue, spec: operator_pb2.StageSpec | None = None) -> Text:
    """`latency_p95 12.00 ms <= 30.00 ms ok` or `... > ... FAIL` (red): the
    stage's worst device against its limit; `latency_p95 waiting for
    telemetry` where no device has reported, not a passing line."""
    if awaiting_telemetry(g, spec):
        return Text(f"{g.name} waiting for telemetry", style="dim")
    # Agreement is the one gate where more is better.
    relations = (">=", "<") if "agreement" in g.name else ("<=", ">")
    relation = relations[0] if g.passing else relations[1]
    text = Text(
        f"{g.name} {_gate_number(g.name, g.value)} {relation} {_gate_number(g.name, g.limit)} "
    )
    text.append("ok" if g.passing else "FAIL", style="green" if g.passing else "bold red")
    return text


def stage_phase(s: operator_pb2.StageStatus) -> Text:
    """`rolling`, `waiting-approval`, `promoted by alice`: from the phase
    (the `state` string is for older clients)."""
    name = enum_name(operator_pb2.StagePhase, s.phase)
    if s.phase == operator_pb2.STAGE_PHASE_PROMOTED and s.promoted_by:
        name += f" by {s.promoted_by}"
    return Text(name, style=_STAGE_PHASE_STYLES.get(s.phase, ""))


def _stage_counts(s: operator_pb2.StageStatus) -> str:
    parts = [format_bar(s.committed, s.total)]
    if s.failed:
        acknowledged = f" ({s.acknowledged_failed} acknowledged)" if s.acknowledged_failed else ""
        parts.append(f"{s.failed} failed{acknowledged}")
    # The members' own state names, as the TUI shows them: `waiting` (not
    # notified yet, or waiting to retry) and `installing` (the rest).
    if s.waiting:
        parts.append(f"{s.waiting} waiting")
    if s.in_progress > s.waiting:
        parts.append(f"{s.in_progress - s.waiting} installing")
    if s.skipped:
        parts.append(f"{s.skipped} skipped")
    return ", ".join(parts)


def stages_table(r: operator_pb2.Rollout) -> Table:
    """Per stage: its spec, where it stands, committed of total, and each
    gate's value against its limit."""
    table = _table("#", "NAME", "SIZE", "STATE", "PROGRESS", "GATES", "RULES")
    specs = list(r.spec.stages)
    statuses = {s.index: s for s in r.stages}
    for index, spec in enumerate(specs):
        status = statuses.get(index, operator_pb2.StageStatus(index=index))
        marker = "▶" if index == r.current_stage and r.state in _MOVING else " "
        gates = (
            Text("\n").join(format_gate(g, spec) for g in status.gates) if status.gates else NONE
        )
        _add_row(
            table,
            f"{marker}{index + 1}",
            spec.name or NONE,
            format_stage_size(spec),
            stage_phase(status),
            _stage_counts(status),
            gates,
            # The name has its own column.
            ",".join(o for o in stage_options(spec) if not o.startswith("name=")) or NONE,
        )
    return table


def rollout_devices_table(devices: Sequence[operator_pb2.RolloutDevice]) -> Table:
    table = _table("NAME", "ID", "CLASS", "STAGE", "STATE", "TRIES", "REASON")
    for d in devices:
        _add_row(
            table,
            d.device_name or NONE,
            short_id(d.device_id),
            d.class_name or NONE,
            str(d.stage + 1),
            rollout_device_state(d),
            str(d.attempts),
            d.reason or NONE,
        )
    return table


def excluded_table(excluded: Sequence[operator_pb2.ExcludedDevice]) -> Table:
    table = _table("NAME", "ID", "REASON")
    for e in excluded:
        _add_row(table, e.device_name or NONE, short_id(e.device_id), e.reason)
    return table


def _current_stage(r: operator_pb2.Rollout) -> str:
    total = len(r.spec.stages)
    if not total:
        return NONE
    index = min(r.current_stage, total - 1)
    name = r.spec.stages[index].name
    return f"{index + 1}/{total}" + (f" {name}" if name else "")


def rollouts_table(rollouts: Sequence[operator_pb2.Rollout], now: datetime) -> Table:
    table = _table(
        "ID", "MODEL@VERSION", "STATE", "STAGE", "COMMITTED", "FAILED", "CREATED", "REASON"
    )
    for r in rollouts:
        committed = sum(s.committed for s in r.stages)
        total = sum(s.total for s in r.stages)
        _add_row(
            table,
            short_id(r.id),
            model_ref(r.spec.model_name, r.spec.model_version),
            rollout_state(r),
            _current_stage(r),
            format_bar(committed, total, width=8),
            str(sum(s.failed for s in r.stages)),
            format_ago(r.created_at, now),
            r.reason or NONE,
        )
    return table


def _devices_cut(
    devices: Sequence[operator_pb2.RolloutDevice], limit: int | None
) -> list[operator_pb2.RolloutDevice]:
    """At most `limit` devices, failures and moving ones first."""
    if limit is None or len(devices) <= limit:
        return list(devices)
    ranked = sorted(devices, key=lambda d: (_DEVICE_ORDER.get(d.state, 3), d.stage))
    return ranked[:limit]


def rollout_detail(
    r: operator_pb2.Rollout, now: datetime, *, max_devices: int | None = None
) -> RenderableType:
    """`rollouts show`: the spec in brief, the state and why, each stage's
    progress and gates, and the devices with their state and reason (at most
    `max_devices`, the failed and moving ones first)."""
    spec = r.spec
    reason_style = "red" if r.state == operator_pb2.ROLLOUT_STATE_ABORTED else ""
    rows: list[tuple[str, RenderableType]] = [
        ("id", r.id),
        ("model", model_ref(spec.model_name, spec.model_version)),
        ("cohort", format_cohort(spec)),
        ("state", rollout_state(r)),
        ("stage", _current_stage(r)),
        ("reason", Text(r.reason, style=reason_style) if r.reason else NONE),
        ("pacing", format_pacing(spec.pacing)),
        ("created", f"{format_ago(r.created_at, now)} by {r.created_by or '?'}"),
        ("started", format_ago(r.started_at, now)),
        ("finished", _finished(r, now)),
    ]
    if spec.HasField("start_at"):
        start = f"{format_time(spec.start_at)} ({format_ago(spec.start_at, now)})"
        rows.insert(5, ("start at", start))
    parts: list[RenderableType] = [_grid(rows), Text(), stages_table(r)]
    if r.devices:
        shown = _devices_cut(r.devices, max_devices)
        # The server may have sent only some (GetRolloutRequest.device_limit);
        # the stage totals count them all.
        total = max(len(r.devices), sum(s.total for s in r.stages))
        left_out = total - len(shown)
        parts += [Text(), Text(f"devices ({total}):", style="bold")]
        parts.append(rollout_devices_table(shown))
        if left_out:
            parts.append(Text(f"... and {left_out} more (edgefleet rollouts show)", style="dim"))
    if r.excluded:
        parts += [Text(), Text(f"excluded ({len(r.excluded)}):", style="bold")]
        parts.append(excluded_table(r.excluded))
    return Group(*parts)


def rollout_line(r: operator_pb2.Rollout) -> str:
    """One plain line for `rollouts watch` into a pipe or a file:
    `r0110u7a digits@2.0.0 running, stage 1/2 canary rolling: 1/2 committed,
    1 failed, 2 waiting; REASON`."""
    head = (
        f"{short_id(r.id)} {model_ref(r.spec.model_name, r.spec.model_version)} "
        f"{enum_name(operator_pb2.RolloutState, r.state)}"
    )
    statuses = {s.index: s for s in r.stages}
    if r.spec.stages:
        index = min(r.current_stage, len(r.spec.stages) - 1)
        s = statuses.get(index, operator_pb2.StageStatus(index=index))
        counts = [f"{s.committed}/{s.total} committed"]
        counts += [part for part in _stage_counts(s).split(", ")[1:]]
        phase = enum_name(operator_pb2.StagePhase, s.phase)
        head += f", stage {_current_stage(r)} {phase}: {', '.join(counts)}"
    return head + (f"; {r.reason}" if r.reason else "")


def _finished(r: operator_pb2.Rollout, now: datetime) -> str:
    """`3m ago, after 12m40s`: when the rollout needed no more work, and how
    long it ran from its start; `-` while it still does."""
    finished, started = _when(r.finished_at), _when(r.started_at)
    if finished is None:
        return NONE
    ago = client_format.format_ago(finished, now)
    return f"{ago}, after {format_duration(finished - started)}" if started else ago


def rollout_plan(
    spec: operator_pb2.RolloutSpec,
    planned: Sequence[operator_pb2.RolloutDevice],
    excluded: Sequence[operator_pb2.ExcludedDevice],
) -> RenderableType:
    """The dry run: per stage, the devices that land there (name, class);
    then the excluded devices and why. Nothing was created."""
    parts: list[RenderableType] = []
    for index, stage in enumerate(spec.stages):
        members = [d for d in planned if d.stage == index]
        head = Text(f"{stage_title(index, stage.name)}: ", style="bold")
        head.append(f"{format_stage(stage)} -> {len(members)} device(s)")
        parts.append(head)
        if members:
            table = _table("NAME", "ID", "CLASS")
            for d in members:
                _add_row(table, d.device_name or NONE, short_id(d.device_id), d.class_name or NONE)
            parts.append(table)
        parts.append(Text())
    if excluded:
        parts += [Text(f"excluded ({len(excluded)}):", style="bold"), excluded_table(excluded)]
        parts.append(Text())
    parts.append(
        Text(
            f"dry run: {len(planned)} device(s) in {len(spec.stages)} stage(s), "
            f"{len(excluded)} excluded; nothing was created",
            style="dim",
        )
    )
    return Group(*parts)


def rollout_action(verb: str, r: operator_pb2.Rollout) -> Text:
    """`paused rollout 1a2b3c4d (digits@2.0.0): now paused` and the reason."""
    text = Text(f"{verb} rollout {short_id(r.id)} "
                f"({model_ref(r.spec.model_name, r.spec.model_version)}): now ")  # fmt: skip
    text.append_text(rollout_state(r))
    if r.reason:
        text.append(f"\n{r.reason}")
    return text
