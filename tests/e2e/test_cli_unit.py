"""The `edgefleet` CLI without a control plane: the pure parsing and rendering
helpers, click's handling of bad input, and every command's request and output
against a small in-process fake OperatorService on a real gRPC channel."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import grpc
import pytest
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.cli import render as render
from edgefleet.controlplane.cli.base import to_json_dict
from edgefleet.controlplane.client.format import format_bytes, format_shape
from edgefleet.controlplane.client.push import describe_part, push_requests
from edgefleet.controlplane.client.syntax import (
    constraint_profile,
    enum_choices,
    enum_name,
    enum_value,
    format_duration,
    format_labels,
    format_rule,
    parse_address,
    parse_duration,
    parse_label,
    parse_match,
    resolve_prefix,
)
from edgefleet.controlplane.domain.rules import Op
from edgefleet.controlplane.wire import MATCH_OPS
from edgefleet.update_state import to_wire
from edgefleet.v1 import common_pb2, operator_pb2, operator_pb2_grpc
from testkit.cli import NOW, invoke, text_of, ts

DEVICE_ID = "a1b2c3d4" + "0" * 8
OTHER_ID = "a1b2ffff" + "1" * 8


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("30m", timedelta(minutes=30)),
        ("7d", timedelta(days=7)),
        ("90s", timedelta(seconds=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        (" 1H 30M ", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "5q", "1h-30m", "0m", "0h0s", "-1h", "1h 2x"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("delta", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(minutes=5), "5m"),
        (timedelta(days=1, hours=2, minutes=3), "1d2h"),
        (timedelta(hours=23, minutes=59, seconds=59), "23h59m"),
    ],
)
def test_format_duration(delta: timedelta, expected: str) -> None:
    assert format_duration(delta) == expected


# ------------------------------------------------------------------ labels


def test_parse_label() -> None:
    assert parse_label("tier=canary") == ("tier", "canary")
    assert parse_label(" site = lab 2 ") == ("site", "lab 2")
    assert parse_label("k=") == ("k", "")
    assert parse_label("url=a=b") == ("url", "a=b")


@pytest.mark.parametrize("text", ["tier", "=canary", " =x", ""])
def test_parse_label_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="key=value"):
        parse_label(text)


@pytest.mark.parametrize(
    "text", ["127.0.0.1:9464", "0.0.0.0:0", "[::1]:7443", "[::]:65535", "cp.example.com:7444"]
)
def test_parse_address(text: str) -> None:
    assert parse_address(text) == text


@pytest.mark.parametrize(
    "text",
    ["9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:x",
     ":9464", "http://127.0.0.1:9464", "a b:1", "host\x00:1", "::1:80", "127.0.0.1:٣"],
)  # fmt: skip
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_address(text)


def test_parse_address_any_host_takes_a_port_alone() -> None:
    assert parse_address(":7444", any_host=True) == ":7444"
    with pytest.raises(ValueError):
        parse_address(":", any_host=True)


def test_format_labels() -> None:
    assert format_labels({"b": "3", "a": "1"}) == "a=1,b=3"
    assert format_labels({}) == ""


# ------------------------------------------------------------------ enums


def test_enum_choices_drop_prefix_and_unspecified() -> None:
    assert enum_choices(operator_pb2.EnrollmentPolicy) == {
        "auto-accept": operator_pb2.ENROLLMENT_POLICY_AUTO_ACCEPT,
        "pending": operator_pb2.ENROLLMENT_POLICY_PENDING,
    }
    assert list(enum_choices(common_pb2.Runtime)) == ["onnxruntime", "tflite", "tensorrt"]
    assert list(enum_choices(common_pb2.Quantization)) == ["fp32", "fp16", "int8", "auto"]
    assert list(enum_choices(common_pb2.DeviceState)) == [
        "pending",
        "accepted",
        "rejected",
        "decommissioned",
    ]


def test_enum_value_and_name() -> None:
    assert enum_value(operator_pb2.EnrollmentPolicy, "AUTO_ACCEPT") == 1
    assert enum_value(common_pb2.Quantization, "int8") == common_pb2.QUANTIZATION_INT8
    with pytest.raises(ValueError, match="onnxruntime, tflite, tensorrt"):
        enum_value(common_pb2.Runtime, "openvino")
    assert enum_name(operator_pb2.EnrollmentPolicy, 1) == "auto-accept"
    assert enum_name(common_pb2.DeviceState, common_pb2.DEVICE_STATE_PENDING) == "pending"
    assert enum_name(common_pb2.Runtime, 0) == "-"
    assert enum_name(common_pb2.Runtime, 99) == "99"


# ------------------------------------------------------------------ rules


def test_every_rule_op_maps_to_a_distinct_match_op() -> None:
    assert set(MATCH_OPS) == set(Op)
    assert len(set(MATCH_OPS.values())) == len(Op)
    assert common_pb2.MATCH_OP_UNSPECIFIED not in MATCH_OPS.values()


@pytest.mark.parametrize(
    ("text", "field", "op", "values"),
    [
        ("arch == aarch64", "arch", common_pb2.MATCH_OP_EQ, ["aarch64"]),
        ("arch = x86_64", "arch", common_pb2.MATCH_OP_EQ, ["x86_64"]),
        ("memory_mb < 4096", "memory_mb", common_pb2.MATCH_OP_LT, ["4096"]),
        ("cpu_cores >= 4", "cpu_cores", common_pb2.MATCH_OP_GE, ["4"]),
        ("label.tier in canary,beta", "label.tier", common_pb2.MATCH_OP_IN, ["canary", "beta"]),
        ("os not in windows", "os", common_pb2.MATCH_OP_NOT_IN, ["windows"]),
        ("accelerator exists", "accelerator", common_pb2.MATCH_OP_EXISTS, []),
        (
            "board_model glob Raspberry Pi*",
            "board_model",
            common_pb2.MATCH_OP_GLOB,
            ["Raspberry Pi*"],
        ),
    ],
)
def test_parse_match(text: str, field: str, op: int, values: list[str]) -> None:
    rule = parse_match(text)
    assert (rule.field, rule.op, list(rule.values)) == (field, op, values)
    assert parse_match(format_rule(rule)) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour == red", "unknown match field"),
        ("memory_mb < lots", "compares numbers"),
        ("arch", "cannot parse"),
        ("accelerator exists gpu", "takes no value"),
    ],
)
def test_parse_match_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_match(text)


# ------------------------------------------------------------------ constraints & json


def test_constraint_profile_only_given_fields() -> None:
    assert constraint_profile() is None
    assert constraint_profile(accelerator=None, max_size_mb=None) is None
    profile = constraint_profile(runtime=common_pb2.RUNTIME_TFLITE, max_memory_mb=256.0)
    assert profile is not None
    assert profile.runtime == common_pb2.RUNTIME_TFLITE
    assert profile.HasField("max_memory_mb")
    assert not profile.HasField("max_model_size_mb")
    assert profile.quantization == common_pb2.QUANTIZATION_UNSPECIFIED


def sample_device(**overrides: Any) -> common_pb2.Device:
    device = common_pb2.Device(
        id=DEVICE_ID,
        hardware_id="hw-1",
        name="pi-kitchen",
        state=common_pb2.DEVICE_STATE_ACCEPTED,
        labels={"tier": "canary", "site": "lab"},
        hardware=common_pb2.HardwareProfile(arch="aarch64", memory_mb=3906, os="linux"),
        class_name="pi4",
        class_pinned=True,
        online=True,
        last_seen_at=ts(NOW - timedelta(minutes=5)),
        desired_revision=3,
    )
    for key, value in overrides.items():
        setattr(device, key, value)
    return device


def test_json_dict_uses_proto_names_and_keeps_defaults() -> None:
    data = to_json_dict(sample_device())
    assert data["id"] == DEVICE_ID
    assert data["class_name"] == "pi4"
    assert data["state"] == "DEVICE_STATE_ACCEPTED"
    assert data["labels"] == {"tier": "canary", "site": "lab"}
    assert data["hardware"]["memory_mb"] == "3906"  # uint64: a string in proto JSON
    assert data["last_seen_at"] == "2026-11-22T11:55:00Z"
    # Fields left at their defaults are still there, so scripts can rely on keys.
    assert data["applied_revision"] == "0"
    assert data["class_id"] == ""
    json.dumps(data)


def test_resolve_prefix() -> None:
    ids = [DEVICE_ID, OTHER_ID]
    assert resolve_prefix("a1b2c3", ids, "device") == DEVICE_ID
    assert resolve_prefix(OTHER_ID, ids, "device") == OTHER_ID
    assert resolve_prefix("zzz", ids, "device") == "zzz"
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_prefix("a1b2", ids, "device")


# ------------------------------------------------------------------ push stream


def test_push_requests_declare_then_chunk(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(bytes(range(256)) * 10)  # 2560 bytes
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    parts = [
        describe_part(operator_pb2.MODEL_PART_MODEL, model),
        describe_part(operator_pb2.MODEL_PART_LABELS, labels),
    ]
    assert parts[0].size_bytes == 2560
    assert parts[0].sha256 == hashlib.sha256(model.read_bytes()).hexdigest()

    seen: list[int] = []
    header = operator_pb2.PushModelHeader(model_name="m", version="1.0.0", description="d")
    stream = list(push_requests(header, parts, chunk_size=1000, on_chunk=seen.append))

    first = stream[0]
    assert first.WhichOneof("kind") == "header"
    assert first.header.model_name == "m" and first.header.description == "d"
    assert [(p.part, p.size_bytes, p.sha256) for p in first.header.parts] == [
        (p.part, p.size_bytes, p.sha256) for p in parts
    ]
    chunks = [r.chunk for r in stream[1:]]
    assert all(r.WhichOneof("kind") == "chunk" for r in stream[1:])
    assert [len(c.data) for c in chunks] == [1000, 1000, 560, 8]
    model_bytes = b"".join(c.data for c in chunks if c.part == operator_pb2.MODEL_PART_MODEL)
    assert model_bytes == model.read_bytes()
    assert seen == [1000, 1000, 560, 8]
    assert not header.parts  # the caller's header is left alone


# ------------------------------------------------------------------ rendering


def test_time_formatting() -> None:
    assert render.format_time(Timestamp()) == "-"
    assert render.format_time(ts(NOW)) == "2026-11-22 12:00:00Z"
    assert render.format_ago(Timestamp(), NOW) == "-"
    assert render.format_ago(ts(NOW - timedelta(minutes=5)), NOW) == "5m ago"
    assert render.format_ago(ts(NOW + timedelta(hours=24)), NOW) == "in 1d"
    assert render.format_ago(ts(NOW), NOW) == "just now"


def test_size_formatting() -> None:
    assert render.format_mb(0) == "-"
    assert render.format_mb(512) == "512 MiB"
    assert render.format_mb(3906) == "3.8 GiB"
    assert format_bytes(812) == "812 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    spec = common_pb2.TensorSpec(name="x", shape=[-1, 64, -1], dim_names=["batch", "", ""])
    assert format_shape(spec) == "[batch, 64, ?]"


def _model(
    name: str,
    assigned: str,
    state: str = "",
    *,
    serving: str = "",
    sequence: int = 1,
    rollout_id: str = "",
    **status: Any,
) -> common_pb2.DeviceModel:
    """A DeviceModel whose agent reported `state` about its current assignment."""
    m = common_pb2.DeviceModel(
        model_name=name, assigned_version=assigned, sequence=sequence, rollout_id=rollout_id
    )
    if state:
        m.status.CopyFrom(
            common_pb2.UpdateStatus(
                state=to_wire(state), model_name=name, model_version=assigned, sequence=sequence,
                active_model_version=serving, **status,
            )
        )  # fmt: skip
    return m


def test_devices_table_lists_every_model_with_its_update() -> None:
    offline = sample_device(id=OTHER_ID, name="jetson-1", online=False, class_pinned=False)
    offline.ClearField("labels")
    offline.models.append(_model("digits", "2.0", "failed", serving="1.0", reason="p95"))
    updating = sample_device(id="c3" * 8, name="gw")
    updating.models.extend([
        _model("digits", "1.2.0", "committed", serving="1.2.0"),
        _model("vad", "5.0.0", "downloading", serving="4.0.0", bytes_done=40, bytes_total=100),
    ])  # fmt: skip
    text = text_of(render.devices_table([sample_device(), offline, updating], NOW))
    header = "ID NAME STATE CLASS MODELS LABELS ONLINE LAST SEEN"
    assert header in " ".join(text.split())
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "a1b2c3d4 pi-kitchen accepted pi4 (pinned) - site=lab,tier=canary yes 5m ago" in rows
    assert "a1b2ffff jetson-1 accepted pi4 digits@2.0 (failed) - no 5m ago" in rows
    assert any("digits@1.2.0, vad@5.0.0 (downloading 40%)" in row for row in rows)


def test_models_cell_without_device_models_reads_the_single_update() -> None:
    # A control plane from before several models per device sends only
    # Device.update (a protocol-1 agent's string state).
    old = sample_device()
    old.update.CopyFrom(
        common_pb2.UpdateStatus(legacy_state="validating", model_name="digits",
                                model_version="2.0", active_model_version="1.0")
    )  # fmt: skip
    text = " ".join(text_of(render.devices_table([old], NOW)).split())
    assert "digits@2.0 (validating)" in text


def test_models_cell_marks_pending_shadow_and_unassigned_models() -> None:
    pending = _model("digits", "2.0", "committed", serving="1.0", sequence=1)
    pending.sequence = 4  # assigned after the agent's last report (about seq 1)
    shadow = _model("kws", "3.0", "committed", serving="2.0")
    shadow.shadow = True
    leaving = _model("vad", "", "idle", serving="5.0")  # unassigned, still loaded
    gone = _model("old", "", "idle")  # unassigned and unloaded: not shown
    device = sample_device()
    device.models.extend([pending, shadow, leaving, gone])
    cell = " ".join(text_of(render.devices_table([device], NOW)).split())
    assert "digits@2.0 (pending), kws@3.0 (shadow), vad@5.0 (unassigned)" in cell
    assert "old@" not in cell


def test_device_detail_lists_each_model() -> None:
    device = sample_device(agent_protocol=2)
    device.models.extend([
        _model("digits", "2.0", "failed", serving="1.0", sequence=3,
               reason="p95 latency 9 ms exceeds the class budget of 5 ms"),
        _model("vad", "5.0.0", "downloading", serving="4.0.0", sequence=4, bytes_done=1024,
               bytes_total=2048),
    ])  # fmt: skip
    text = text_of(render.device_detail(device, NOW))
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "MODEL ASSIGNED SERVING STATE SEQ ROLLOUT DETAIL" in rows
    assert any(r.startswith("digits 2.0 1.0 failed 3 - failed: p95 latency 9 ms") for r in rows)
    assert "vad 5.0.0 4.0.0 downloading 4 - downloading 5.0.0 1.0 KiB/2.0 KiB" in rows
    assert any("protocol 2" in r for r in rows)
    bare = text_of(render.device_detail(sample_device(), NOW))
    assert "models -" in [" ".join(r.split()) for r in bare.splitlines()]


def test_names_are_text_not_markup() -> None:
    device = sample_device(name="[bold]x[/bold]")
    assert "[bold]x[/bold]" in text_of(render.devices_table([device], NOW))
    assert "[bold]x[/bold]" in text_of(render.device_detail(device, NOW))


def test_token_status() -> None:
    token = operator_pb2.EnrollmentToken(expires_at=ts(NOW + timedelta(hours=1)))
    assert render.token_status(token, NOW) == "active"
    token.max_uses, token.uses = 2, 2
    assert render.token_status(token, NOW) == "used up"
    token.expires_at.CopyFrom(ts(NOW - timedelta(seconds=1)))
    assert render.token_status(token, NOW) == "expired"
    token.revoked_at.CopyFrom(ts(NOW))
    assert render.token_status(token, NOW) == "revoked"


def test_class_detail_lists_rules_and_constraints() -> None:
    cls = common_pb2.DeviceClass(
        name="pi4",
        priority=10,
        device_count=3,
        constraints=common_pb2.ConstraintProfile(
            runtime=common_pb2.RUNTIME_ONNXRUNTIME,
            quantization=common_pb2.QUANTIZATION_INT8,
            max_model_size_mb=20,
        ),
        match_rules=[parse_match("arch == aarch64"), parse_match("memory_mb < 4096")],
    )
    text = text_of(render.class_detail(cls))
    for expected in ("onnxruntime", "int8", "20 MiB", "arch == aarch64", "memory_mb < 4096"):
        assert expected in text
    table = " ".join(text_of(render.classes_table([cls])).split())
    assert "pi4 10 onnxruntime, int8, size<=20 MiB arch == aarch64" in table


# ------------------------------------------------------------------ click, no server


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("path", list(all_commands(cli)), ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output
    command: Any = cli
    for name in path:
        command = command.commands[name]
    assert command.help, f"{' '.join(path)} has no help text"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tokens", "create", "--name", "x", "--ttl", "5q"], "'5q' is not a duration"),
        (["tokens", "create", "--name", "x", "--label", "nokey"], "must look like key=value"),
        (["tokens", "create", "--name", "x", "--policy", "maybe"], "'maybe' is not one of"),
        (["devices", "ls", "--class", "a", "--unclassified"], "exclude each other"),
        (["devices", "label", DEVICE_ID], "--remove KEY"),
        (["classes", "create", "c"], "Missing option '--runtime'"),
        (
            ["classes", "create", "c", "--runtime", "onnxruntime", "--match", "x ~ 1"],
            "cannot parse",
        ),
        (["classes", "update", "c", "--match", "arch == x", "--clear-rules"], "exclude each other"),
        (["models", "push", "m", "1.0.0", "/does/not/exist.onnx"], "does not exist"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_is_one_line_error() -> None:
    result = invoke("devices", "ls", server=f"127.0.0.1:{closed_port()}")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: UNAVAILABLE: ")
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ------------------------------------------------------------------ against a fake server


class FakeOperator(operator_pb2_grpc.OperatorServiceServicer):
    """Records each request (with its metadata) and answers from canned data."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.devices = [sample_device(), sample_device(id=OTHER_ID, name="jetson-1")]
        self.pushed: dict[int, bytes] = {}

    def _record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata()}
        self.calls.append((name, request, metadata))

    def requests(self, name: str) -> list[Any]:
        return [req for n, req, _ in self.calls if n == name]

    def CreateEnrollmentToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("CreateEnrollmentToken", request, context)
        token = operator_pb2.EnrollmentToken(
            id="f" * 32, name=request.name, policy=request.policy, labels=request.labels
        )
        return operator_pb2.CreateEnrollmentTokenResponse(token=token, secret="ef_enroll_SECRET")

    def ListDevices(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("ListDevices", request, context)
        return operator_pb2.ListDevicesResponse(devices=self.devices)

    def AcceptDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("AcceptDevice", request, context)
        return self._device(request.id, context)

    def UpdateDeviceLabels(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("UpdateDeviceLabels", request, context)
        return self._device(request.id, context)

    def SetDeviceClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("SetDeviceClass", request, context)
        return self._device(request.id, context)

    def GetDevice(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetDevice", request, context)
        return self._device(request.id, context)

    def UnassignModel(self, request: Any, context: grpc.ServicerContext) -> Any:
        # As the control plane answers: unknown ids fail the whole call.
        self._record("UnassignModel", request, context)
        known = {d.id: d for d in self.devices}
        unknown = [i for i in request.device_ids if i not in known]
        if unknown:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no such device: {', '.join(unknown)}")
        response = operator_pb2.UnassignModelResponse()
        for i in request.device_ids:
            held = [m.model_name for m in known[i].models]
            (response.removed if request.model_name in held else response.not_assigned).append(i)
        return response

    def _device(self, device_id: str, context: grpc.ServicerContext) -> common_pb2.Device:
        for d in self.devices:
            if d.id == device_id:
                return d
        context.abort(grpc.StatusCode.NOT_FOUND, f"device {device_id!r} not found")
        raise AssertionError

    def CreateDeviceClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("CreateDeviceClass", request, context)
        return common_pb2.DeviceClass(
            name=request.name, constraints=request.constraints, match_rules=request.match_rules
        )

    def UpdateDeviceClass(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("UpdateDeviceClass", request, context)
        return common_pb2.DeviceClass(name=request.name)

    def PushModel(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        messages = list(request_iterator)
        self._record("PushModel", messages, context)
        header = messages[0].header
        if header.version == "9.9.9":
            context.abort(grpc.StatusCode.ALREADY_EXISTS, "model m version 9.9.9 exists")
        for m in messages[1:]:
            self.pushed[m.chunk.part] = self.pushed.get(m.chunk.part, b"") + m.chunk.data
        return common_pb2.ModelVersion(
            model_name=header.model_name,
            version=header.version,
            sha256=header.parts[0].sha256,
            size_bytes=header.parts[0].size_bytes,
            inputs=[common_pb2.TensorSpec(name="features", dtype="float32", shape=[-1, 64])],
            outputs=[common_pb2.TensorSpec(name="probs", dtype="float32", shape=[-1, 10])],
        )


@pytest.fixture
def fake() -> Iterator[tuple[FakeOperator, str]]:
    servicer = FakeOperator()  # type: ignore[abstract]  # the rest answer UNIMPLEMENTED
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    operator_pb2_grpc.add_OperatorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_tokens_create_sends_options_and_bearer_token(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    args = ["tokens", "create", "--name", "lab", "--policy", "pending", "--ttl", "7d"]
    result = invoke(*args, "--label", "site=lab", "--max-uses", "5", server=address)
    assert result.exit_code == 0, result.output
    assert "ef_enroll_SECRET" in result.stdout
    assert "shown once" in result.stdout
    (_, request, metadata) = servicer.calls[0]
    assert metadata["authorization"] == "Bearer tok"
    assert request.policy == operator_pb2.ENROLLMENT_POLICY_PENDING
    assert dict(request.labels) == {"site": "lab"}
    assert request.max_uses == 5
    assert request.ttl.ToTimedelta() == timedelta(days=7)


def test_tokens_create_json_and_server_defaults(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke("tokens", "create", "--name", "lab", "--json", server=address)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["secret"] == "ef_enroll_SECRET"
    assert data["token"]["name"] == "lab"
    (request,) = servicer.requests("CreateEnrollmentToken")
    assert request.policy == operator_pb2.ENROLLMENT_POLICY_UNSPECIFIED
    assert not request.HasField("ttl")


def test_devices_ls_json_is_a_list(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    args = ["devices", "ls", "--state", "accepted", "--label", "tier=canary", "--json"]
    result = invoke(*args, server=address)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["name"] for d in data] == ["pi-kitchen", "jetson-1"]
    assert data[0]["state"] == "DEVICE_STATE_ACCEPTED"
    (request,) = servicer.requests("ListDevices")
    assert request.state == common_pb2.DEVICE_STATE_ACCEPTED
    assert dict(request.labels) == {"tier": "canary"}
    assert not request.include_decommissioned


def test_devices_ls_human_table(fake: tuple[FakeOperator, str]) -> None:
    _, address = fake
    result = invoke("devices", "ls", server=address)
    assert result.exit_code == 0, result.output
    assert "pi-kitchen" in result.stdout and "a1b2c3d4" in result.stdout
    assert DEVICE_ID not in result.stdout  # short ids in tables


def test_device_commands_send_names_and_prefixes_as_given(fake: tuple[FakeOperator, str]) -> None:
    """The server resolves names and id prefixes (services/references.py,
    tests/integration/test_references.py): the CLI lists nothing to expand
    them and shows the server's answer as it is."""
    servicer, address = fake
    assert invoke("devices", "accept", DEVICE_ID, server=address).exit_code == 0
    result = invoke("devices", "accept", "ffff", server=address)
    assert result.exit_code == 1
    assert result.stderr == "error: NOT_FOUND: device 'ffff' not found\n"
    assert [r.id for r in servicer.requests("AcceptDevice")] == [DEVICE_ID, "ffff"]
    assert not servicer.requests("ListDevices")


def test_devices_unassign_names_removed_and_not_assigned(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    servicer.devices[0].models.append(_model("vad", "5.0.0", "committed", serving="5.0.0"))
    result = invoke("devices", "unassign", "vad", DEVICE_ID, OTHER_ID, "--reason", "retired",
                    server=address)  # fmt: skip
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "removed vad from 1 device(s): a1b2c3d4" in out
    assert "vad was not assigned to 1 device(s): a1b2ffff" in out
    (request,) = servicer.requests("UnassignModel")
    assert list(request.device_ids) == [DEVICE_ID, OTHER_ID]
    assert (request.model_name, request.reason) == ("vad", "retired")

    result = invoke("devices", "unassign", "vad", DEVICE_ID, "--json", server=address)
    assert json.loads(result.stdout) == {"removed": [DEVICE_ID], "not_assigned": []}


def test_devices_unassign_errors(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke("devices", "unassign", "vad@5.0.0", DEVICE_ID, server=address)
    assert result.exit_code == 2
    assert "not MODEL@VERSION" in result.stderr and "devices unassign vad ID" in result.stderr
    result = invoke("devices", "unassign", " ", DEVICE_ID, server=address)
    assert result.exit_code == 2 and "MODEL is empty" in result.stderr
    assert invoke("devices", "unassign", "vad", server=address).exit_code == 2  # no device
    result = invoke("devices", "unassign", "vad", "f" * 16, server=address)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: NOT_FOUND: no such device: ffffffff")
    assert len(servicer.requests("UnassignModel")) == 1  # the server refused, shown as is


def test_devices_show_json_lists_models(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    servicer.devices[0].models.extend([
        _model("digits", "2.0", "failed", serving="1.0", sequence=3, reason="too slow",
               rollout_id="r" * 32),
        _model("vad", "5.0.0", "downloading", serving="", sequence=4, bytes_done=10,
               bytes_total=20),
    ])  # fmt: skip
    result = invoke("devices", "show", DEVICE_ID, "--json", server=address)
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    assert models == [
        {"name": "digits", "version": "1.0", "assigned_version": "2.0", "state": "failed",
         "sequence": 3, "rollout_id": "r" * 32, "shadow": False, "bytes_done": 0,
         "bytes_total": 0, "reason": "too slow"},
        {"name": "vad", "version": "", "assigned_version": "5.0.0", "state": "downloading",
         "sequence": 4, "rollout_id": "", "shadow": False, "bytes_done": 10,
         "bytes_total": 20, "reason": ""},
    ]  # fmt: skip
    listed = json.loads(invoke("devices", "ls", "--json", server=address).stdout)
    assert [m["name"] for m in listed[0]["models"]] == ["digits", "vad"]
    text = invoke("devices", "show", DEVICE_ID, server=address).stdout
    assert "failed: too slow" in text


def test_devices_label_pin_unpin(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke("devices", "label", DEVICE_ID, "a=1", "b=2", "--remove", "old", server=address)
    assert result.exit_code == 0, result.output
    assert "labelled device pi-kitchen" in result.stdout
    (request,) = servicer.requests("UpdateDeviceLabels")
    assert dict(request.set) == {"a": "1", "b": "2"} and list(request.remove) == ["old"]

    assert invoke("devices", "pin", DEVICE_ID, "gpu", server=address).exit_code == 0
    assert invoke("devices", "unpin", DEVICE_ID, server=address).exit_code == 0
    pin, unpin = servicer.requests("SetDeviceClass")
    assert (pin.id, pin.class_name) == (DEVICE_ID, "gpu")
    assert (unpin.id, unpin.class_name) == (DEVICE_ID, "")


def test_classes_create_request(fake: tuple[FakeOperator, str]) -> None:
    servicer, address = fake
    result = invoke(
        "classes", "create", "pi4", "--runtime", "onnxruntime", "--max-size-mb", "20",
        "--latency-budget-ms", "15", "--min-accuracy-retention", "0.98", "--priority", "10",
        "--match", "arch == aarch64", "--match", "memory_mb < 4096", server=address,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("CreateDeviceClass")
    assert request.priority == 10
    c = request.constraints
    assert c.runtime == common_pb2.RUNTIME_ONNXRUNTIME
    assert c.quantization == common_pb2.QUANTIZATION_AUTO
    assert (c.max_model_size_mb, c.latency_budget_p95_ms) == (20, 15)
    assert c.min_accuracy_retention == pytest.approx(0.98)
    assert not c.HasField("max_memory_mb")
    assert [format_rule(r) for r in request.match_rules] == ["arch == aarch64", "memory_mb < 4096"]


@pytest.mark.parametrize(
    ("args", "has_constraints", "replace", "rules"),
    [
        (["--priority", "5"], False, False, []),
        (["--clear-rules"], False, True, []),
        (["--match", "os == linux", "--quantization", "int8"], True, True, ["os == linux"]),
    ],
)
def test_classes_update_request(
    fake: tuple[FakeOperator, str],
    args: list[str],
    has_constraints: bool,
    replace: bool,
    rules: list[str],
) -> None:
    servicer, address = fake
    result = invoke("classes", "update", "pi4", *args, server=address)
    assert result.exit_code == 0, result.output
    (request,) = servicer.requests("UpdateDeviceClass")
    assert request.HasField("constraints") is has_constraints
    assert request.HasField("priority") is ("--priority" in args)
    assert not request.HasField("description")
    assert request.replace_match_rules is replace
    assert [format_rule(r) for r in request.match_rules] == rules


def test_models_push_streams_parts(fake: tuple[FakeOperator, str], tmp_path: Path) -> None:
    servicer, address = fake
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x01" * (2 * 1024 * 1024 + 100))
    sample = tmp_path / "data.npz"
    sample.write_bytes(b"npz-bytes")
    args = ["models", "push", "m", "1.0.0", str(model), "--sample-data", str(sample)]
    result = invoke(*args, server=address)
    assert result.exit_code == 0, result.output
    (messages,) = servicer.requests("PushModel")
    assert len(messages) == 1 + 3 + 1  # header, 3 model chunks (1 MiB each), 1 sample chunk
    declared = {p.part: p.sha256 for p in messages[0].header.parts}
    uploaded = {operator_pb2.MODEL_PART_MODEL: model, operator_pb2.MODEL_PART_SAMPLE_DATA: sample}
    for part, path in uploaded.items():
        assert servicer.pushed[part] == path.read_bytes()
        assert declared[part] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "features" in result.stdout and "[?, 64]" in result.stdout
    assert "push m 1.0.0" in result.stderr  # the progress bar


def test_models_push_server_error(fake: tuple[FakeOperator, str], tmp_path: Path) -> None:
    _, address = fake
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    result = invoke("models", "push", "m", "9.9.9", str(model), server=address)
    assert result.exit_code == 1
    assert result.stderr.endswith("error: ALREADY_EXISTS: model m version 9.9.9 exists\n")
    assert "Traceback" not in result.output


def test_deployment_history_and_serving_detail() -> None:
    assignment = operator_pb2.DeviceAssignment(
        device_id="a1b2c3d4" * 2, class_name="pi4", model_name="digits", model_version="2.0",
        artifact_digest="ab" * 32, artifact_size=2048, sequence=3, assigned_at=ts(NOW),
    )  # fmt: skip
    failed = operator_pb2.DeploymentEvent(
        device_id="a1b2c3d4" * 2, sequence=3, model_name="digits", model_version="2.0",
        state=to_wire("failed"), reason="p95 latency 9 ms exceeds the class budget of 5 ms",
        at=ts(NOW - timedelta(seconds=30)),
    )  # fmt: skip
    downloading = operator_pb2.DeploymentEvent(
        device_id="a1b2c3d4" * 2, sequence=3, model_name="digits", model_version="2.0",
        state=to_wire("downloading"), bytes_done=1024, bytes_total=2048,
        at=ts(NOW - timedelta(minutes=1)),
    )  # fmt: skip
    text = text_of(
        render.deployment_history(
            operator_pb2.ListDeploymentsResponse(
                events=[failed, downloading], assignments=[assignment]
            ),
            NOW,
        )
    )
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert "a1b2c3d4 pi4 digits@2.0 abababababab 2.0 KiB 3 just now" in rows
    assert any(r.startswith("30s ago 3 digits@2.0 failed p95 latency") for r in rows)
    assert any("downloading 1.0 KiB/2.0 KiB" in r for r in rows)
    unknown = operator_pb2.DeploymentEvent(sequence=3, model_name="digits", model_version="2.0")
    text = text_of(render.deployment_history(operator_pb2.ListDeploymentsResponse(
        events=[unknown]), NOW))  # fmt: skip
    assert "digits@2.0 -" in " ".join(text.split())  # UNSPECIFIED: shown as unknown
