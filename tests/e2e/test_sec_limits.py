"""Issue 18, findings 4 and 5, as the attacker did them: a real `edgefleet
server` on SQLite and PostgreSQL, real gRPC clients sending the hostile
messages. An 8 MB hostname made `devices ls` fail for every operator; NUL
bytes and over-long strings were INTERNAL on PostgreSQL, and one device's
bad telemetry failed the other devices' uploads in the same group commit.
Now every field has a limit (api/limits.py), refused with INVALID_ARGUMENT
naming the field and the limit before anything is stored, and no response
outgrows what a client with gRPC's default 4 MiB receive limit can read
(paging.fit)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, update

from edgefleet.controlplane.api import paging
from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.db.engine import make_engine
from edgefleet.controlplane.db.models import AuditRow, DeviceRow, TelemetryRow
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og
from testkit.fuzzing import DbProbe, diff
from testkit.harness import ADMIN_TOKEN, ControlPlane, env_without_proxy

ADMIN = bearer_metadata(ADMIN_TOKEN)
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# Four bytes of UTF-8, and printable: the most a character can cost.
WIDE = "\U0001f600"
HUGE_HOSTNAME = "h" * 8_000_000
# A hostile device's client may send up to the server's 8 MiB.
BIG_SEND = [("grpc.max_send_message_length", 16 * 1024 * 1024)]


def wide(n: int) -> str:
    return WIDE * n


@pytest.fixture
def cp(tmp_path: Path, db_url: str) -> Iterator[ControlPlane]:
    server = ControlPlane(tmp_path / "cp", db_url)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def op(cp: ControlPlane) -> Iterator[og.OperatorServiceStub]:
    """An operator's stub with every gRPC default: it receives at most 4 MiB."""
    with grpc.insecure_channel(cp.address) as channel:
        yield og.OperatorServiceStub(channel)


@pytest.fixture
def dev(cp: ControlPlane) -> Iterator[dg.DeviceServiceStub]:
    with grpc.insecure_channel(cp.address, options=BIG_SEND) as channel:
        yield dg.DeviceServiceStub(channel)


def _token(op: og.OperatorServiceStub) -> str:
    request = o.CreateEnrollmentTokenRequest(name="fleet", max_uses=0)
    return str(op.CreateEnrollmentToken(request, metadata=ADMIN).secret)


def _refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _sync(dev: dg.DeviceServiceStub, credential: str, *messages: d.AgentMessage) -> Any:
    """A Sync stream sending `messages` then half-closing; what it ended with."""
    call = dev.Sync(iter(messages), metadata=bearer_metadata(credential), timeout=30)
    for _ in call:
        pass


def _cli_device_ids(cp: ControlPlane) -> set[str]:
    """What `edgefleet devices ls --json` lists: the operator's command."""
    env = env_without_proxy()
    env.update(EDGEFLEET_SERVER=cp.address, EDGEFLEET_TOKEN=cp.admin_token)
    result = subprocess.run(
        [EDGEFLEET, "devices", "ls", "--json"], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {device["id"] for device in json.loads(result.stdout)}


def _list_devices(op: og.OperatorServiceStub, request: o.ListDevicesRequest) -> list[c.Device]:
    """Every page, as the CLI's and the TUI's client.list_devices walk them."""
    listed: list[c.Device] = []
    while True:
        page = op.ListDevices(request, metadata=ADMIN)
        assert page.ByteSize() <= paging.MAX_RESPONSE_BYTES
        listed += page.devices
        if not page.next_page_token:
            return listed
        request.page_token = page.next_page_token


def _sample(seq: int, **fields: Any) -> d.TelemetrySample:
    base: dict[str, Any] = {
        "model_name": "digits", "model_version": "1.0.0", "request_count": 10,
        "latency_p50_ms": 1.0, "latency_p95_ms": 2.0, "latency_p99_ms": 3.0,
    }  # fmt: skip
    sample = d.TelemetrySample(seq=seq, **(base | fields))
    sample.at.GetCurrentTime()
    return sample


# ---------------------------------------------------------------- finding 4: 8 MB hostname


def test_an_8_mb_hostname_is_refused_and_every_operator_still_lists_devices(
    cp: ControlPlane, db_url: str, op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    token = _token(op)
    victims = [
        dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id=f"victim-{i}"))
        for i in range(3)
    ]
    attacker = dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id="attacker"))
    probe = DbProbe(db_url)
    try:
        before = probe.snapshot()
        # In the Hello of its sync stream, and enrolling a new device with it.
        hello = d.AgentMessage(hello=d.Hello(hardware=c.HardwareProfile(hostname=HUGE_HOSTNAME)))
        code, details = _refusal(lambda: _sync(dev, attacker.device_credential, hello))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello.hardware.hostname is 8,000,000 characters long; at most 253" in details
        enroll = d.EnrollRequest(
            enrollment_token=token, hardware_id="attacker-2",
            hardware=c.HardwareProfile(hostname=HUGE_HOSTNAME),
        )  # fmt: skip
        code, details = _refusal(lambda: dev.Enroll(enroll))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "hardware.hostname" in details and "253" in details
        assert diff(before, probe.snapshot()) == [], "nothing was stored"
    finally:
        probe.close()

    every = {v.device_id for v in victims} | {attacker.device_id}
    listed = _list_devices(op, o.ListDevicesRequest())
    assert {x.id for x in listed} == every
    assert _cli_device_ids(cp) == every

    # A hostname stored before these limits (as the attack left it) no
    # longer breaks the listing: that row alone goes out cut to the limits.
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            hardware = {"hostname": HUGE_HOSTNAME, "os": "linux"}
            row = DeviceRow.id == attacker.device_id
            conn.execute(update(DeviceRow).where(row).values(hardware=hardware))
    finally:
        engine.dispose()
    for size in (0, 2):
        listed = _list_devices(op, o.ListDevicesRequest(page_size=size))
        assert {x.id for x in listed} == every
        (stored,) = [x for x in listed if x.id == attacker.device_id]
        assert stored.hardware.hostname == "h" * 253 and stored.hardware.os == "linux"
    got = op.GetDevice(o.GetDeviceRequest(id=attacker.device_id), metadata=ADMIN)
    assert len(got.hardware.hostname) == 253
    assert _cli_device_ids(cp) == every


# ---------------------------------------------------------------- both findings: every kind


# (kind, what, the call given the context, the field path and limit the error names)
Case = tuple[str, str, Callable[[dict[str, Any]], Any], tuple[str, ...]]


def _class(**fields: Any) -> o.CreateDeviceClassRequest:
    fields.setdefault("name", "pis")
    fields.setdefault("constraints", c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME))
    return o.CreateDeviceClassRequest(**fields)


def _hello(**hardware: Any) -> d.AgentMessage:
    return d.AgentMessage(hello=d.Hello(hardware=c.HardwareProfile(**hardware)))


CASES: list[Case] = [
    ("names", "too long", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"], hardware_id="n1", name="n" * 254)),
     ("name is 254 characters long", "at most 253")),
    ("names", "NUL", lambda x: x["op"].CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="line\x003"), metadata=ADMIN),
     ("name", "U+0000")),
    # "Trojan Source": a name that a terminal shows in another order.
    ("names", "bidi override", lambda x: x["op"].CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="a\u202eb"), metadata=ADMIN),
     ("name", "U+202E")),
    ("names", "too long", lambda x: x["op"].CreateOperatorToken(
        o.CreateOperatorTokenRequest(name="o" * 201, role=o.OPERATOR_ROLE_VIEWER), metadata=ADMIN),
     ("name is 201", "at most 200")),
    ("names", "NUL", lambda x: x["op"].CreateDeviceClass(_class(name="pi\x00s"), metadata=ADMIN),
     ("name", "U+0000")),
    ("descriptions", "too long", lambda x: x["op"].CreateDeviceClass(
        _class(description=wide(4097)), metadata=ADMIN),
     ("description is 4,097 characters long", "at most 4,096")),
    ("descriptions", "NUL", lambda x: x["op"].CreateDeviceClass(
        _class(description="first\nsecond\x00"), metadata=ADMIN),
     ("description", "U+0000")),
    ("descriptions", "too long", lambda x: x["op"].RejectDevice(
        o.RejectDeviceRequest(id=x["device_id"], reason="r" * 1025), metadata=ADMIN),
     ("reason", "at most 1,024")),
    ("hardware fields", "too long", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"], hardware_id="h1",
                        hardware=c.HardwareProfile(cpu_model="c" * 257))),
     ("hardware.cpu_model is 257", "at most 256")),
    ("hardware fields", "NUL", lambda x: _sync(x["dev"], x["credential"],
                                               _hello(os_release="6.1\x00")),
     ("hello.hardware.os_release", "U+0000")),
    ("hardware fields", "too many", lambda x: _sync(x["dev"], x["credential"],
                                                    _hello(accelerators=[c.Accelerator()] * 17)),
     ("hello.hardware.accelerators has 17 items", "at most 16")),
    ("hardware fields", "too long", lambda x: x["op"].CreateDeviceClass(
        _class(constraints=c.ConstraintProfile(runtime=c.RUNTIME_TENSORRT, accelerator="a" * 33)),
        metadata=ADMIN),
     ("constraints.accelerator is 33", "at most 32")),
    ("labels", "too long", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"], hardware_id="l1", labels={"site": "s" * 257})),
     ("labels['site'] is 257", "at most 256")),
    ("labels", "NUL", lambda x: x["op"].UpdateDeviceLabels(
        o.UpdateDeviceLabelsRequest(id=x["device_id"], set={"site": "lab\x00"}), metadata=ADMIN),
     ("set['site']", "U+0000")),
    ("labels", "too many", lambda x: x["op"].CreateEnrollmentToken(
        o.CreateEnrollmentTokenRequest(name="t", labels={f"k{i}": "v" for i in range(65)}),
        metadata=ADMIN),
     ("labels has 65 items", "at most 64")),
    ("telemetry", "too long", lambda x: x["dev"].UploadTelemetry(
        d.UploadTelemetryRequest(samples=[_sample(1), _sample(2, model_version="v" * 65)]),
        metadata=bearer_metadata(x["credential"])),
     ("samples[1].model_version is 65", "at most 64")),
    ("telemetry", "NUL", lambda x: x["dev"].UploadTelemetry(
        d.UploadTelemetryRequest(samples=[_sample(1, power_mode="nor\x00mal")]),
        metadata=bearer_metadata(x["credential"])),
     ("samples[0].power_mode", "U+0000")),
    ("telemetry", "too long", lambda x: _sync(x["dev"], x["credential"], _hello(), d.AgentMessage(
        status=d.StatusReport(applied_revision=1, update=c.UpdateStatus(legacy_state="s" * 33)))),
     ("status.update.legacy_state is 33", "at most 32")),
    ("ids", "too long", lambda x: x["op"].GetRollout(
        o.GetRolloutRequest(id="d" * 33), metadata=ADMIN),
     ("id is 33", "at most 32")),
    # A device is named by its id, name (String(200)) or id prefix.
    ("ids", "too long", lambda x: x["op"].GetDevice(
        o.GetDeviceRequest(id="d" * 201), metadata=ADMIN),
     ("id is 201", "at most 200")),
    ("ids", "NUL", lambda x: x["op"].AssignModel(
        o.AssignModelRequest(device_ids=[x["device_id"], "\x00"], model_name="m",
                             model_version="1.0.0"), metadata=ADMIN),
     ("device_ids[1]", "U+0000")),
    ("ids", "NUL", lambda x: x["op"].RevokeEnrollmentToken(
        o.RevokeEnrollmentTokenRequest(id="abc\x00"), metadata=ADMIN),
     ("id", "U+0000")),
    ("ids", "too long", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"], hardware_id="i" * 201)),
     ("hardware_id is 201", "at most 200")),
    ("enrollment token", "too long", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"] + "x" * 300, hardware_id="t1")),
     ("enrollment_token",)),
    ("enrollment token", "NUL", lambda x: x["dev"].Enroll(
        d.EnrollRequest(enrollment_token=x["token"][:10] + "\x00", hardware_id="t2")),
     ("enrollment_token",)),
]  # fmt: skip


def test_every_kind_of_field_refuses_too_long_and_nul_and_stores_nothing(
    cp: ControlPlane, db_url: str, op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    """One over-long and one NUL case (or too many items) per kind of field.
    On PostgreSQL each was INTERNAL; on both databases each is now refused
    naming the field and the limit, and nothing is written."""
    assert {kind for kind, *_ in CASES} == {
        "names", "descriptions", "hardware fields", "labels", "telemetry", "ids",
        "enrollment token",
    }  # fmt: skip
    token = _token(op)
    device = dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id="victim"))
    context = {
        "op": op, "dev": dev, "token": token, "device_id": device.device_id,
        "credential": device.device_credential,
    }  # fmt: skip
    # What a sync stream records first (its Hello), so the cases below that
    # open one change nothing by it.
    _sync(dev, device.device_credential, _hello())
    probe = DbProbe(db_url)
    try:
        before = probe.snapshot()
        for kind, what, call, named in CASES:
            code, details = _refusal(lambda call=call: call(context))  # type: ignore[misc]
            if kind == "enrollment token":
                assert code in (
                    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED
                ), (kind, what, code, details)  # fmt: skip
            else:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (kind, what, code, details)
            for words in named:
                assert words in details, (kind, what, details)
        assert diff(before, probe.snapshot()) == [], "nothing was stored"
    finally:
        probe.close()
    # And the server serves the victim as before.
    assert op.GetDevice(o.GetDeviceRequest(id=device.device_id), metadata=ADMIN).id
    credential = bearer_metadata(device.device_credential)
    ok = dev.UploadTelemetry(d.UploadTelemetryRequest(samples=[_sample(1)]), metadata=credential)
    assert ok.acked_seq == 1


# ---------------------------------------------------------------- finding 5: group commits


async def test_a_hostile_upload_fails_alone_among_concurrent_uploads(
    cp: ControlPlane, db_url: str, op: og.OperatorServiceStub
) -> None:
    """Seven devices and a hostile one upload at once, round after round, so
    their uploads share group commits. The hostile upload (a NUL in a text
    field, which PostgreSQL's COPY refused for the whole transaction) is
    refused alone; every other upload is stored."""
    token = _token(op)
    async with grpc.aio.insecure_channel(cp.address) as channel:
        dev = dg.DeviceServiceStub(channel)
        enrolled = [
            await dev.Enroll(d.EnrollRequest(enrollment_token=token, hardware_id=f"hw-{i}"))
            for i in range(8)
        ]
        hostile, honest = enrolled[0], enrolled[1:]

        async def upload(device: d.EnrollResponse, *samples: d.TelemetrySample) -> Any:
            request = d.UploadTelemetryRequest(samples=samples)
            try:
                return await dev.UploadTelemetry(
                    request, metadata=bearer_metadata(device.device_credential)
                )
            except grpc.aio.AioRpcError as err:
                return err

        # A NUL in each text field of a sample in turn. The hostile upload
        # goes last: the uploads arriving while a commit runs share the next.
        bad_fields = ["model_name", "model_version", "power_mode", "shadow_version"]
        rounds = len(bad_fields)
        for r, field in enumerate(bad_fields, start=1):
            bad = {field: "1.0\x00"}
            results = await asyncio.gather(
                *(upload(x, *(_sample(r * 100 + k) for k in range(50))) for x in honest),
                upload(hostile, _sample(r), _sample(r + 100, **bad)),
            )
            *answers, refused = results
            assert isinstance(refused, grpc.aio.AioRpcError), refused
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"samples[1].{field}" in (refused.details() or "")
            for answer in answers:
                assert isinstance(answer, d.UploadTelemetryResponse), answer
                assert answer.acked_seq == r * 100 + 49
        # The hostile device is not locked out: a good upload is stored.
        good = await upload(hostile, _sample(1))
        assert isinstance(good, d.UploadTelemetryResponse) and good.acked_seq == 1

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(TelemetryRow.device_id, func.count()).group_by(TelemetryRow.device_id)
                ).all()
            )
    finally:
        engine.dispose()
    assert counts == {hostile.device_id: 1} | {x.device_id: rounds * 50 for x in honest}


# ---------------------------------------------------------------- list responses


def _maximal_enroll(token: str, i: int) -> d.EnrollRequest:
    """A device whose every stored field is at its limit, in four-byte
    characters."""
    accelerator = c.Accelerator(
        kind=wide(64), name=wide(256), driver_version=wide(64), compute_capability=wide(32)
    )
    return d.EnrollRequest(
        enrollment_token=token,
        hardware_id=f"hw-{i:03d}" + wide(190),
        name=f"big-{i:03d}" + wide(190),
        labels={f"k{j:02d}": wide(256) for j in range(64)},
        hardware=c.HardwareProfile(
            os=wide(256), os_release=wide(256), arch=wide(64), cpu_model=wide(256),
            hostname=wide(253), board_model=wide(256), accelerators=[accelerator] * 16,
        ),
        runtime=c.RuntimeFingerprint(
            python_version=wide(64), agent_version=wide(64), onnxruntime_version=wide(64),
            onnxruntime_providers=[wide(64)] * 32, litert_version=wide(64),
            litert_package=wide(64), tensorrt_version=wide(64),
        ),
    )  # fmt: skip


def _omitted(call: Any) -> int:
    """The edgefleet-omitted-items trailer of a finished call (0 if none)."""
    trailer = dict(call.trailing_metadata() or ())
    return int(trailer.get("edgefleet-omitted-items", 0))


DEVICES, TOKENS, LABEL_UPDATES, CLASSES = 40, 70, 24, 16


def test_every_list_response_stays_under_the_message_limit_after_hostile_writes(
    cp: ControlPlane, db_url: str, op: og.OperatorServiceStub, dev: dg.DeviceServiceStub
) -> None:
    """Rows at every limit, enough of them that any list of them is past
    4 MiB; then every list RPC, through a client with gRPC's defaults."""
    token = _token(op)
    enrolled = [dev.Enroll(_maximal_enroll(token, i)) for i in range(DEVICES)]
    labels = {f"k{j:02d}": wide(256) for j in range(64)}
    for i in range(TOKENS):
        op.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(name=f"t{i}" + wide(190), labels=labels),
            metadata=ADMIN,
        )
    for i in range(LABEL_UPDATES):
        relabel = o.UpdateDeviceLabelsRequest(id=enrolled[i].device_id, set=labels)
        op.UpdateDeviceLabels(relabel, metadata=ADMIN)
    rules = [
        c.MatchRule(field=f"label.k{j:02d}", op=c.MATCH_OP_IN, values=[wide(128)] * 32)
        for j in range(16)
    ]
    for i in range(CLASSES):
        request = _class(name=f"class-{i}", description=wide(4096), match_rules=rules)
        op.CreateDeviceClass(request, metadata=ADMIN)

    # Devices: pages end where the message would be full; walking them
    # (as the CLI and the TUI do) gives every device once.
    first = op.ListDevices(o.ListDevicesRequest(), metadata=ADMIN)
    assert 1 <= len(first.devices) < DEVICES and first.next_page_token
    assert first.ByteSize() <= paging.MAX_RESPONSE_BYTES
    listed = _list_devices(op, o.ListDevicesRequest())
    assert sorted(x.id for x in listed) == sorted(x.device_id for x in enrolled)
    assert _cli_device_ids(cp) == {x.device_id for x in enrolled}

    # The lists without a page token keep the newest rows that fit and say
    # how many they left out.
    tokens, call = op.ListEnrollmentTokens.with_call(
        o.ListEnrollmentTokensRequest(), metadata=ADMIN
    )
    assert 1 <= len(tokens.tokens) < TOKENS + 1
    assert len(tokens.tokens) + _omitted(call) == TOKENS + 1
    classes, call = op.ListDeviceClasses.with_call(o.ListDeviceClassesRequest(), metadata=ADMIN)
    assert 1 <= len(classes.classes) < CLASSES
    assert len(classes.classes) + _omitted(call) == CLASSES
    # The operator's command says so.
    env = env_without_proxy()
    env.update(EDGEFLEET_SERVER=cp.address, EDGEFLEET_TOKEN=cp.admin_token)
    shown = subprocess.run(
        [EDGEFLEET, "classes", "ls"], capture_output=True, text=True, env=env, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert f"ListDeviceClasses left out {_omitted(call)} item(s)" in shown.stderr

    # The audit log pages backwards by id (what the TUI does): every entry.
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            audited = set(conn.scalars(select(AuditRow.id)))
    finally:
        engine.dispose()
    seen: list[int] = []
    before_id, pages = 0, 0
    while True:
        page, call = op.ListAuditLog.with_call(
            o.ListAuditLogRequest(limit=1000, before_id=before_id), metadata=ADMIN
        )
        if not page.entries:
            break
        seen += [e.id for e in page.entries]
        pages += 1
        before_id = page.entries[-1].id
    assert set(seen) == audited and len(seen) == len(audited) and pages > 1

    # And every other list answers within the limit.
    others: list[Callable[[], Any]] = [
        lambda: op.ListOperatorTokens(o.ListOperatorTokensRequest(), metadata=ADMIN),
        lambda: op.ListDeployments(o.ListDeploymentsRequest(limit=1000), metadata=ADMIN),
        lambda: op.ListModels(o.ListModelsRequest(), metadata=ADMIN),
        lambda: op.ListBuilds(o.ListBuildsRequest(), metadata=ADMIN),
        lambda: op.ListArtifacts(o.ListArtifactsRequest(), metadata=ADMIN),
        lambda: op.ListRollouts(o.ListRolloutsRequest(), metadata=ADMIN),
        lambda: op.ListSigningKeys(o.ListSigningKeysRequest(), metadata=ADMIN),
        lambda: op.QueryTelemetry(
            o.QueryTelemetryRequest(
                metric=o.TELEMETRY_METRIC_REQUEST_COUNT, group_by=o.TELEMETRY_GROUP_BY_DEVICE
            ),
            metadata=ADMIN,
        ),
    ]
    for other in others:
        assert other().ByteSize() <= paging.MAX_RESPONSE_BYTES
