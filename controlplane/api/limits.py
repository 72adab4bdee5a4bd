"""The size limits of everything a client sends, in one table, and the one
check that applies them to a request before any service sees it.

Why at the boundary: a string no column holds (longer than its VARCHAR, or
with a NUL, which neither PostgreSQL's text nor its JSONB can store) reached
the database and came back as INTERNAL, and on PostgreSQL only; a device's
8 MB hostname was stored, and then every ListDevices page that held it was
past the message limit, for every operator. Every string field of every
request now has a length in characters, and every repeated or map field a
count, refused with INVALID_ARGUMENT naming the field's path and the limit
before anything is read or written; so both databases see the same values.

Characters: single-line fields (names, ids, versions, hardware facts, label
keys and values) refuse every control character (C0, DEL and C1: U+0000-U+001F,
U+007F-U+009F), which no name needs and which a terminal would interpret
when `edgefleet devices ls` prints it, nor the bidirectional formatting
characters (U+200E/F, U+202A-U+202E, U+2066-U+2069) that would show a
terminal another order than the text has. Free text (descriptions, reasons)
also takes tab, newline and carriage return. Identifiers (ids, digests,
secrets, page tokens) must be ASCII, so their limit in bytes is their limit
in characters; any other string is at most four bytes a character (UTF-8).

A field without an entry gets DEFAULT: 256 characters of one line, 100
items, its bytes unlimited (bytes fields are bounded by the transport's
8 MiB message limit).

Numbers: RANGES holds the plausible range of every number a telemetry sample
carries and of the numbers of an update status, refused outside it with
INVALID_ARGUMENT naming the field and the range (a float must also be
finite: NaN and the infinities are refused). Why: a sample with
request_count 2^63-1 was stored, and then every query that summed it with
another sample overflowed SQLite's 64-bit SUM and failed, for every user.
Counts are per sample, that is per telemetry interval of one model version:
at most 10^9, so one device's counts summed over its whole life (at the
telemetry rate limit, 5 samples/s, 1.6 * 10^17 a year) and an hourly rollup
row's stay far inside int64. A number without an entry is not checked here
(its type bounds it).

Where it runs: the rpc decorator (api/rpc.py) checks every unary request
after authentication; the streaming handlers check their messages (Sync's
Hello and status reports, PushModel's header); a telemetry upload's samples
are checked as rows once converted (CHECKED_AS_ROWS, `check_rows`, their
numbers included; the conversion refuses a variant number it does not
know), before the upload joins a group commit. `clip` cuts a
message down to the same limits; list responses use it on a row stored
before the limits that would not fit in a response on its own
(api/paging.py)."""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from edgefleet.controlplane.domain import delivery
from edgefleet.controlplane.domain.pki import MAX_CSR_BYTES
from edgefleet.controlplane.errors import DomainError, InvalidArgument, ResourceExhausted

# Imported for their descriptors: the table names fields of these messages.
from edgefleet.v1 import common_pb2, device_pb2, operator_pb2  # noqa: F401

_PACKAGE = "edgefleet.v1."


@dataclass(frozen=True)
class Limit:
    """What one field may hold. `chars`: a string's length in characters
    (each item's, for a repeated string; each value's, for a map). `count`:
    items of a repeated field, entries of a map. `key_chars`: a map's keys.
    `bytes`: a bytes field's length (None: the transport's limit)."""

    chars: int = 256
    count: int = 100
    key_chars: int = 63
    bytes: int | None = None
    # Free text: tab, newline and carriage return are allowed.
    multiline: bool = False
    # Identifiers: ASCII only, so `chars` is also their size in bytes.
    ascii: bool = False
    # The error a field over its limit raises; RESOURCE_EXHAUSTED where the
    # caller should split the request rather than fix it.
    error: type[DomainError] = InvalidArgument
    # Appended to the error of a string over its length, or of too many
    # items: what to do instead.
    hint: str = ""
    count_hint: str = ""


DEFAULT = Limit()

# Shared shapes (the column each is stored in, where there is one).
ID = Limit(chars=32, ascii=True)  # String(32) ids: devices, tokens, builds, rollouts
DIGEST = Limit(chars=64, ascii=True)  # sha256 hex, String(64)
MODEL_NAME = Limit(chars=100)  # String(100)
VERSION = Limit(chars=64)  # String(64)
CLASS_NAME = Limit(chars=100)  # String(100); the service allows 63 of [a-z0-9-]
TOKEN_NAME = Limit(chars=200)  # String(200), also the audit actor
# What names a device: its full id, its name (String(200), any script) or an
# id prefix (services/references.py resolves it).
DEVICE_REF = Limit(chars=200)
FACT = Limit(chars=256)  # a hardware or runtime fact (JSON)
RUNTIME_VERSION = Limit(chars=64)
REASON = Limit(chars=1024, multiline=True)  # an operator's why, kept in the audit log
DESCRIPTION = Limit(chars=4096, multiline=True)  # Text
# Labels: as devices.validate_labels checks them (keys also by pattern).
LABELS = Limit(count=64, key_chars=63, chars=256)
# A class's own mirrors (domain/delivery.py says what is wrong with each).
MIRRORS = Limit(count=delivery.MAX_MIRRORS, chars=delivery.MAX_URL_LENGTH)
# Page tokens are ours: base64 of a cursor made of values within these limits.
PAGE_TOKEN = Limit(
    chars=4096, ascii=True, hint="; it is not one a response gave: start again without it"
)

# "Message.field" -> its limit. Every request field of DeviceService and
# OperatorService that holds a string or repeats is here, so the documented
# limit of each is this line (a field missing falls back to DEFAULT; a test
# checks that every name here is a field).
LIMITS: dict[str, Limit] = {
    # ---- device-reported facts (Enroll, Sync's Hello)
    "EnrollRequest.enrollment_token": Limit(chars=256, ascii=True),
    "EnrollRequest.hardware_id": Limit(chars=200),  # String(200), unique
    # An agent without a configured name sends its hostname (253); the
    # enrollment keeps the first 200 characters, as it always did.
    "EnrollRequest.name": Limit(chars=253),
    "EnrollRequest.labels": LABELS,
    "EnrollRequest.csr": Limit(bytes=MAX_CSR_BYTES),
    "ReenrollmentProof.device_id": ID,
    "ReenrollmentProof.device_credential": Limit(chars=256, ascii=True),
    "ReenrollmentProof.certificate_pem": Limit(bytes=16 * 1024),
    "ReenrollmentProof.signature": Limit(bytes=2048),  # RSA-8192's is 1,024
    "HardwareProfile.os": FACT,
    "HardwareProfile.os_release": FACT,
    "HardwareProfile.arch": Limit(chars=64),
    "HardwareProfile.cpu_model": FACT,
    "HardwareProfile.accelerators": Limit(count=16),
    # RFC 1035: a host name is at most 253 characters.
    "HardwareProfile.hostname": Limit(chars=253),
    "HardwareProfile.board_model": FACT,
    "Accelerator.kind": Limit(chars=64),
    "Accelerator.name": FACT,
    "Accelerator.driver_version": RUNTIME_VERSION,
    "Accelerator.compute_capability": Limit(chars=32),
    "RuntimeFingerprint.python_version": RUNTIME_VERSION,
    "RuntimeFingerprint.agent_version": RUNTIME_VERSION,
    "RuntimeFingerprint.onnxruntime_version": RUNTIME_VERSION,
    "RuntimeFingerprint.onnxruntime_providers": Limit(count=32, chars=64),
    "RuntimeFingerprint.litert_version": RUNTIME_VERSION,
    "RuntimeFingerprint.litert_package": Limit(chars=64),
    "RuntimeFingerprint.tensorrt_version": RUNTIME_VERSION,
    # ---- an agent's update status (Hello, StatusReport): deployment_events
    "UpdateStatus.legacy_state": Limit(chars=32),  # String(32)
    "UpdateStatus.model_name": MODEL_NAME,
    "UpdateStatus.model_version": VERSION,
    "UpdateStatus.artifact_digest": DIGEST,
    # Why an update failed, in the agent's words (Text; reasons are joined
    # across retries). Generous: an agent's report over it is refused, and
    # its sync stream with it, every time it connects until the update moves.
    "UpdateStatus.reason": Limit(chars=16_384, multiline=True),
    "UpdateStatus.rollout_id": ID,
    "UpdateStatus.active_model_version": VERSION,
    "UpdateStatus.active_artifact_digest": DIGEST,
    # A source's name or a mirror's URL.
    "UpdateStatus.download_source": Limit(chars=2048),
    # One status per model (protocol 2). As deployments.MAX_MODELS_PER_DEVICE:
    # a report of more is refused whole (INVALID_ARGUMENT) rather than cut,
    # so no model's status is lost without the agent being told.
    "Hello.models": Limit(count=32, count_hint="; a device holds at most 32 models"),
    "StatusReport.models": Limit(count=32, count_hint="; a device holds at most 32 models"),
    # ---- other device RPCs
    "DownloadArtifactRequest.digest": DIGEST,
    "RenewCertificateRequest.csr": Limit(bytes=MAX_CSR_BYTES),
    # As telemetry.MAX_BATCH; over it the agent splits the upload.
    "UploadTelemetryRequest.samples": Limit(
        count=500, error=ResourceExhausted, count_hint="; split the upload"
    ),
    "TelemetrySample.model_name": MODEL_NAME,
    "TelemetrySample.model_version": VERSION,
    "TelemetrySample.power_mode": Limit(chars=32),  # String(32)
    "TelemetrySample.shadow_version": VERSION,
    # ---- tokens
    "CreateEnrollmentTokenRequest.name": TOKEN_NAME,
    "CreateEnrollmentTokenRequest.labels": LABELS,
    "RevokeEnrollmentTokenRequest.id": TOKEN_NAME,  # its id, name or id prefix
    "CreateOperatorTokenRequest.name": TOKEN_NAME,
    "RevokeOperatorTokenRequest.id": TOKEN_NAME,  # its id, name or id prefix
    # ---- devices
    "ListDevicesRequest.class_name": CLASS_NAME,
    "ListDevicesRequest.labels": LABELS,
    "ListDevicesRequest.page_token": PAGE_TOKEN,
    "GetDeviceRequest.id": DEVICE_REF,
    "AcceptDeviceRequest.id": DEVICE_REF,
    "RejectDeviceRequest.id": DEVICE_REF,
    "RejectDeviceRequest.reason": REASON,
    "DecommissionDeviceRequest.id": DEVICE_REF,
    "DecommissionDeviceRequest.reason": REASON,
    "UpdateDeviceLabelsRequest.id": DEVICE_REF,
    "UpdateDeviceLabelsRequest.set": LABELS,
    "UpdateDeviceLabelsRequest.remove": Limit(count=64, chars=63),
    "SetDeviceClassRequest.id": DEVICE_REF,
    "SetDeviceClassRequest.class_name": CLASS_NAME,
    # ---- deployments
    "AssignModelRequest.device_ids": Limit(
        count=10_000, chars=200, count_hint="; assign in several calls, or use a rollout"
    ),
    "AssignModelRequest.model_name": MODEL_NAME,
    "AssignModelRequest.model_version": VERSION,
    "AssignModelRequest.reason": REASON,
    "UnassignModelRequest.device_ids": Limit(
        count=10_000, chars=200, count_hint="; unassign in several calls"
    ),
    "UnassignModelRequest.model_name": MODEL_NAME,
    "UnassignModelRequest.reason": REASON,
    "ListDeploymentsRequest.device_id": DEVICE_REF,
    "ListDeploymentsRequest.model_name": MODEL_NAME,
    "ListDeploymentsRequest.model_version": VERSION,
    # ---- classes
    "CreateDeviceClassRequest.name": CLASS_NAME,
    "CreateDeviceClassRequest.description": DESCRIPTION,
    "CreateDeviceClassRequest.match_rules": Limit(count=16),
    "CreateDeviceClassRequest.artifact_mirrors": MIRRORS,
    "UpdateDeviceClassRequest.artifact_mirrors": MIRRORS,
    "UpdateDeviceClassRequest.name": CLASS_NAME,
    "UpdateDeviceClassRequest.description": DESCRIPTION,
    "UpdateDeviceClassRequest.match_rules": Limit(count=16),
    # ConstraintProfile field names (the service refuses any other).
    "UpdateDeviceClassRequest.clear_constraints": Limit(count=16, chars=64, ascii=True),
    "GetDeviceClassRequest.name": CLASS_NAME,
    "DeleteDeviceClassRequest.name": CLASS_NAME,
    "ConstraintProfile.accelerator": Limit(chars=32),  # String(32)
    # Fixed shapes for TFLite builds: domain/input_shapes.py's bounds (the
    # service says which value is wrong).
    "ConstraintProfile.input_shapes": Limit(count=32),
    "InputShape.name": Limit(chars=256),
    "InputShape.dims": Limit(count=8),
    # "label.<key>" is the longest field a rule names.
    "MatchRule.field": Limit(chars=128),
    # An IN list of board models or versions; 16 rules of 32 values keep a
    # class's rules (evaluated for every device) within about 64 KB.
    "MatchRule.values": Limit(count=32, chars=128),
    # ---- models, builds, artifacts
    "PushModelHeader.model_name": MODEL_NAME,
    "PushModelHeader.version": VERSION,
    "PushModelHeader.description": DESCRIPTION,
    "PushModelHeader.parts": Limit(count=8),
    # One declaration per output; ONNX names are free text, 256 covers any seen.
    "PushModelHeader.outputs": Limit(count=64),
    "OutputSpec.name": Limit(chars=256),
    "OutputSpec.state_input": Limit(chars=256),
    "PartDeclaration.sha256": DIGEST,
    "GetModelRequest.name": MODEL_NAME,
    "GetModelVersionRequest.model_name": MODEL_NAME,
    "GetModelVersionRequest.version": VERSION,
    "YankModelVersionRequest.model_name": MODEL_NAME,
    "YankModelVersionRequest.version": VERSION,
    "YankModelVersionRequest.reason": REASON,
    "UnyankModelVersionRequest.model_name": MODEL_NAME,
    "UnyankModelVersionRequest.version": VERSION,
    "UnyankModelVersionRequest.reason": REASON,
    "DeleteModelVersionRequest.model_name": MODEL_NAME,
    "DeleteModelVersionRequest.version": VERSION,
    "DeleteModelVersionRequest.reason": REASON,
    "RunBuildRequest.model_name": MODEL_NAME,
    "RunBuildRequest.model_version": VERSION,
    "RunBuildRequest.class_name": CLASS_NAME,
    "ListBuildsRequest.model_name": MODEL_NAME,
    "ListBuildsRequest.model_version": VERSION,
    "ListBuildsRequest.class_name": CLASS_NAME,
    "GetBuildRequest.id": ID,
    "CancelBuildRequest.id": ID,
    "ListArtifactsRequest.model_name": MODEL_NAME,
    "ListArtifactsRequest.model_version": VERSION,
    "ListArtifactsRequest.class_name": CLASS_NAME,
    "GetArtifactRequest.digest": DIGEST,
    # ---- rollouts
    "RolloutSpec.model_name": MODEL_NAME,
    "RolloutSpec.model_version": VERSION,
    "RolloutSpec.class_names": Limit(count=256, chars=100),
    "RolloutSpec.label_selector": LABELS,
    "RolloutSpec.stages": Limit(count=32),
    "StageSpec.name": Limit(chars=64),
    "GetRolloutRequest.id": ID,
    "RolloutActionRequest.id": ID,
    "RolloutActionRequest.reason": REASON,
    "AbortRolloutRequest.id": ID,
    "RetryRolloutRequest.id": ID,
    "RetryRolloutRequest.device_ids": Limit(count=10_000, chars=200),
    "RetryRolloutRequest.reason": REASON,
    "SkipRolloutDevicesRequest.id": ID,
    "SkipRolloutDevicesRequest.device_ids": Limit(count=10_000, chars=200),
    "SkipRolloutDevicesRequest.reason": REASON,
    "UpdateRolloutRequest.id": ID,
    "UpdateRolloutRequest.reason": REASON,
    "AbortRolloutRequest.reason": REASON,
    # ---- telemetry, audit, keys, watch
    "QueryTelemetryRequest.device_id": DEVICE_REF,
    "QueryTelemetryRequest.class_name": CLASS_NAME,
    "QueryTelemetryRequest.model_name": MODEL_NAME,
    "QueryTelemetryRequest.model_version": VERSION,
    "QueryTelemetryRequest.labels": LABELS,
    "ListAuditLogRequest.action": Limit(chars=100),  # String(100)
    "ListAuditLogRequest.target": Limit(chars=200),  # String(200)
    "ListAuditLogRequest.actor": TOKEN_NAME,
    "RotateSigningKeyRequest.reason": REASON,
    "WatchFleetRequest.kinds": Limit(count=64, chars=64),
}


@dataclass(frozen=True)
class Range:
    """What a number may hold: `low` <= value <= `high`, and a float must be
    finite. `unit` says what the number counts or measures (in the error)."""

    low: int | float
    high: int | float
    unit: str = ""

    def holds(self, value: float) -> bool:
        return (isinstance(value, int) or math.isfinite(value)) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.high == sys.float_info.max:
            return f"a finite number of at least {_number(self.low)}"
        kind = "an integer" if isinstance(self.high, int) else "a finite number"
        unit = f" ({self.unit})" if self.unit else ""
        return f"{kind} between {_number(self.low)} and {_number(self.high)}{unit}"


def _number(value: float) -> str:
    if isinstance(value, int) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:g}"


_INT64 = 2**63 - 1  # a BigInteger column
# Per sample: one telemetry interval (10 s by default) of one model version.
# A billion requests is 100 million a second for ten seconds, or 11,000 a
# second for a day-long interval; no edge device serves that. See Numbers in
# the module docstring for what it keeps within int64.
COUNT = Range(0, 10**9, "per sample, i.e. per telemetry interval")
# A latency past a day is a hung request or a broken clock, not a latency.
LATENCY_MS = Range(0.0, 86_400_000.0, "milliseconds; one day")
PERCENT = Range(0.0, 100.0, "percent")

# "Message.field" -> the range of a number. Every number of TelemetrySample
# (a test checks none is missing) and of an agent's update status.
RANGES: dict[str, Range] = {
    # ---- a pushed model's output declarations
    "PushModelHeader.min_fidelity": Range(0.0, 1.0, "the share of the original's quality kept"),
    "OutputSpec.threshold": Range(-1e9, 1e9, "a mask's threshold"),
    "OutputSpec.blank": Range(0, 1_000_000, "the blank class index"),
    # ---- a telemetry sample (TelemetrySample; the time `at` is checked
    # against the server's clock by services/telemetry.py)
    "TelemetrySample.seq": Range(1, _INT64, "the agent's sample number"),
    "TelemetrySample.request_count": COUNT,
    "TelemetrySample.error_count": COUNT,  # and at most request_count
    "TelemetrySample.timeout_count": COUNT,  # and at most error_count
    "TelemetrySample.dropped_samples": COUNT,
    "TelemetrySample.shadow_requests": COUNT,
    "TelemetrySample.fallback_request_count": COUNT,  # and at most request_count
    "TelemetrySample.latency_p50_ms": LATENCY_MS,  # and p50 <= p95 <= p99 <= max
    "TelemetrySample.latency_p95_ms": LATENCY_MS,
    "TelemetrySample.latency_p99_ms": LATENCY_MS,
    "TelemetrySample.latency_max_ms": LATENCY_MS,
    "TelemetrySample.shadow_latency_p95_ms": LATENCY_MS,
    # The agent's process RSS; 16 TiB.
    "TelemetrySample.memory_mb": Range(0.0, 16.0 * 1024 * 1024, "MB; 16 TiB"),
    # The memory the model adds to the agent (a part of memory_mb).
    "TelemetrySample.model_memory_mb": Range(0.0, 16.0 * 1024 * 1024, "MB; 16 TiB"),
    # The agent's process, 100 per busy core (psutil): 1,024 cores.
    "TelemetrySample.cpu_percent": Range(0.0, 102_400.0, "percent of one core; 1,024 cores"),
    "TelemetrySample.system_memory_percent": PERCENT,
    "TelemetrySample.temperature_c": Range(-273.15, 1000.0, "degrees Celsius"),  # optional
    "TelemetrySample.battery_percent": PERCENT,  # optional
    "TelemetrySample.concurrency_limit": Range(0, 1_000_000, "requests at once; 0: unlimited"),
    "TelemetrySample.shadow_agreement": Range(0.0, 1.0, "the fraction of rows that agreed"),
    # Any finite difference: the agent reports outputs it cannot compare as
    # the largest float (agent/serving.py INCOMPARABLE). Never summed.
    "TelemetrySample.shadow_max_diff": Range(0.0, sys.float_info.max),
    # ---- an agent's update status (Hello, StatusReport): signed 64-bit
    # columns, and what status_buffer.py checks again.
    "Hello.applied_revision": Range(0, _INT64),
    "StatusReport.applied_revision": Range(0, _INT64),
    "UpdateStatus.sequence": Range(0, _INT64),
    "UpdateStatus.bytes_done": Range(0, _INT64),
    "UpdateStatus.bytes_total": Range(0, _INT64),
    "UpdateStatus.download_rate": Range(0, _INT64),
}

# Messages whose fields `check` leaves to `check_rows`: the servicer
# converts every field of them anyway (a telemetry upload's 500 samples),
# and reading their strings out of protobuf a second time cost about half
# as much as the whole conversion. Their limits are the table's all the same.
CHECKED_AS_ROWS = frozenset({_PACKAGE + "TelemetrySample"})

# Control characters a field refuses (see the module docstring), and the
# bidirectional formatting characters (LRM/RLM, the embeddings, overrides
# and isolates): "Trojan Source" text that shows an operator's terminal
# another order than the bytes have (a‮b).
_BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
_ONE_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
_FREE_TEXT = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_BIDI}]")


class _Plan:
    """What `check` reads of one message type, worked out once per type from
    its descriptor: only the fields that can break a limit, so a Timestamp or
    a message of numbers costs nothing."""

    def __init__(self) -> None:
        self.strings: list[tuple[str, Limit]] = []
        self.repeated_strings: list[tuple[str, Limit]] = []
        self.string_maps: list[tuple[str, Limit]] = []
        self.bytes: list[tuple[str, Limit]] = []
        # Counted only: repeated numbers, maps to numbers or messages.
        self.counted: list[tuple[str, Limit]] = []
        # Numbers with an entry in RANGES.
        self.numbers: list[tuple[str, Range]] = []
        self.messages: list[tuple[str, _Plan]] = []
        self.repeated_messages: list[tuple[str, Limit, _Plan]] = []
        self._deeper: _Plan | None = None

    def __bool__(self) -> bool:
        return any(
            (self.strings, self.repeated_strings, self.string_maps, self.bytes, self.counted,
             self.numbers, self.messages, self.repeated_messages)
        )  # fmt: skip

    def deeper(self) -> _Plan:
        """This plan without its singular strings: what is left to check
        item by item once a repeated field's strings were checked as columns."""
        if self._deeper is None:
            self._deeper = _Plan()
            self._deeper.__dict__.update(self.__dict__, strings=[], _deeper=None)
        return self._deeper


_PLANS: dict[str, _Plan] = {}


def _limit_of(message: Any, field: Any) -> Limit:
    if message.full_name.startswith(_PACKAGE):
        return LIMITS.get(f"{message.full_name.removeprefix(_PACKAGE)}.{field.name}", DEFAULT)
    return DEFAULT


def _plan(descriptor: Any) -> _Plan:
    plan = _PLANS.get(descriptor.full_name)
    if plan is not None:
        return plan
    plan = _PLANS[descriptor.full_name] = _Plan()  # before recursing: types may nest
    for field in descriptor.fields:
        limit = _limit_of(descriptor, field)
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                value = entry.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_STRING:
                    plan.string_maps.append((field.name, limit))
                else:
                    plan.counted.append((field.name, limit))
                continue
            if entry.full_name in CHECKED_AS_ROWS:
                plan.counted.append((field.name, limit))
                continue
            nested = _plan(entry)
            if repeated:
                plan.repeated_messages.append((field.name, limit, nested))
            elif nested:
                plan.messages.append((field.name, nested))
        elif field.type == FieldDescriptor.TYPE_STRING:
            (plan.repeated_strings if repeated else plan.strings).append((field.name, limit))
        elif field.type == FieldDescriptor.TYPE_BYTES:
            if repeated:
                plan.counted.append((field.name, limit))
            elif limit.bytes is not None:
                plan.bytes.append((field.name, limit))
        elif repeated:
            plan.counted.append((field.name, limit))
        elif (number := _range_of(descriptor, field)) is not None:
            plan.numbers.append((field.name, number))
    return plan


def _range_of(message: Any, field: Any) -> Range | None:
    return RANGES.get(f"{message.full_name.removeprefix(_PACKAGE)}.{field.name}")


def _out_of_range(path: str, value: float, number: Range) -> InvalidArgument:
    return InvalidArgument(f"{path} is {value!r}; it must be {number.describe()}")


def _path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _too_many(path: str, count: int, limit: Limit) -> DomainError:
    return limit.error(f"{path} has {count:,} items; at most {limit.count:,}{limit.count_hint}")


def _bad_text(path: str, value: str, limit: Limit, chars: int) -> DomainError | None:
    """What is wrong with one string (None: nothing). Never echoes the value:
    a long one would not fit in the status's trailer."""
    if len(value) > chars:
        return limit.error(
            f"{path} is {len(value):,} characters long; at most {chars:,}{limit.hint}"
        )
    bad = (_FREE_TEXT if limit.multiline else _ONE_LINE).search(value)
    if bad is not None:
        allowed = (
            "of the control characters only tab, newline and carriage return are allowed"
            if limit.multiline
            else "it must be one line of printable text"
        )
        return InvalidArgument(
            f"{path} holds the control character U+{ord(bad.group()):04X} at position "
            f"{bad.start()}; {allowed}"
        )
    if limit.ascii and not value.isascii():
        return InvalidArgument(f"{path} is an identifier: ASCII characters only")
    return None


def _check_texts(
    values: Sequence[str], limit: Limit, chars: int, path: str, keys: Sequence[str] = ()
) -> None:
    """Check many strings with loops in C (a telemetry upload has 500
    samples); only a column that fails is looked at one by one, for the
    path of the first bad value: `path` with its index (or its key's repr,
    given `keys`) for the {}."""
    if not values:
        return
    joined = "".join(values)
    if (
        max(map(len, values)) <= chars
        and (_FREE_TEXT if limit.multiline else _ONE_LINE).search(joined) is None
        and (not limit.ascii or joined.isascii())
    ):
        return
    for index, value in enumerate(values):
        where = path.format(repr(keys[index]) if keys else index)
        error = _bad_text(where, value, limit, chars)
        if error is not None:
            raise error


def _check(message: Message, plan: _Plan, path: str) -> None:
    for name, limit in plan.strings:
        error = _bad_text(_path(path, name), getattr(message, name), limit, limit.chars)
        if error is not None:
            raise error
    for name, limit in plan.bytes:
        size = len(getattr(message, name))
        assert limit.bytes is not None
        if size > limit.bytes:
            raise limit.error(
                f"{_path(path, name)} is {size:,} bytes; at most {limit.bytes:,}{limit.hint}"
            )
    for name, limit in plan.repeated_strings:
        items = getattr(message, name)
        where = _path(path, name)
        if len(items) > limit.count:
            raise _too_many(where, len(items), limit)
        _check_texts(items, limit, limit.chars, where + "[{}]")
    for name, limit in plan.string_maps:
        entries = getattr(message, name)
        where = _path(path, name)
        if len(entries) > limit.count:
            raise _too_many(where, len(entries), limit)
        keys = list(entries)
        # A key's limit is key_chars, with the value's rules for characters;
        # a bad key is named by its position (it may be too long to show).
        _check_texts(keys, limit, limit.key_chars, where + ": the key at index {}")
        _check_texts([entries[k] for k in keys], limit, limit.chars, where + "[{}]", keys)
    for name, limit in plan.counted:
        count = len(getattr(message, name))
        if count > limit.count:
            raise _too_many(_path(path, name), count, limit)
    for name, number in plan.numbers:
        value = getattr(message, name)
        if not number.holds(value):
            raise _out_of_range(_path(path, name), value, number)
    for name, nested in plan.messages:
        if message.HasField(name):
            _check(getattr(message, name), nested, _path(path, name))
    for name, limit, nested in plan.repeated_messages:
        items = getattr(message, name)
        where = _path(path, name)
        if len(items) > limit.count:
            raise _too_many(where, len(items), limit)
        if not items or not nested:
            continue
        # Column by column for the items' own strings (the hot case:
        # telemetry samples), item by item for anything deeper.
        for field, field_limit in nested.strings:
            column = [getattr(item, field) for item in items]
            _check_texts(column, field_limit, field_limit.chars, where + "[{}]." + field)
        deeper = nested.deeper()
        if deeper:
            for index, item in enumerate(items):
                _check(item, deeper, f"{where}[{index}]")


@functools.cache
def _row_limits(message: str, fields: tuple[str, ...]) -> tuple[tuple[int, str, Limit], ...]:
    """(column index, field name, limit) of `message`'s limited fields."""
    return tuple(
        (fields.index(name), name, limit)
        for key, limit in LIMITS.items()
        for owner, _, name in [key.rpartition(".")]
        if owner == message and name in fields
    )


@functools.cache
def _row_ranges(message: str, fields: tuple[str, ...]) -> tuple[tuple[int, str, Range, bool], ...]:
    """(column index, field name, range, optional) of `message`'s numbers in
    RANGES; an optional field's column holds None where it was not set."""
    descriptor = descriptor_pool.Default().FindMessageTypeByName(_PACKAGE + message)
    return tuple(
        (fields.index(name), name, number, descriptor.fields_by_name[name].has_presence)
        for key, number in RANGES.items()
        for owner, _, name in [key.rpartition(".")]
        if owner == message and name in fields
    )


def _check_numbers(column: Sequence[Any], number: Range, optional: bool, path: str) -> None:
    """Check a column of numbers with loops in C; only a column that fails
    is looked at one by one, for the index of the first bad value: `path`
    with it for the {}."""
    values = [v for v in column if v is not None] if optional else column
    if not values:
        return
    # min() and max() are meaningless with a NaN among the values: a finite
    # sum says there is none (a sum of large finite values may overflow to
    # infinity; that column is then looked at value by value).
    if (
        (isinstance(number.high, int) or math.isfinite(sum(values)))
        and number.low <= min(values)
        and max(values) <= number.high
    ):
        return
    for index, value in enumerate(column):
        if value is not None and not number.holds(value):
            raise _out_of_range(path.format(index), value, number)


def check_rows(rows: Sequence[tuple[Any, ...]], message: str, path: str) -> None:
    """`check` for the string fields and the numbers of many `message`s (a
    CHECKED_AS_ROWS type, e.g. "TelemetrySample") converted to named tuples
    with the same field names, column by column; `path` names the repeated
    field they came in."""
    if not rows:
        return
    fields: tuple[str, ...] = getattr(rows[0], "_fields")  # noqa: B009 - a NamedTuple's
    for index, name, limit in _row_limits(message, fields):
        column = list(map(itemgetter(index), rows))
        if isinstance(column[0], str):
            _check_texts(column, limit, limit.chars, f"{path}[{{}}].{name}")
    numbers = _row_ranges(message, fields)
    if numbers:
        columns = list(zip(*rows, strict=True))
        for index, name, number, optional in numbers:
            _check_numbers(columns[index], number, optional, f"{path}[{{}}].{name}")


def check(message: Message) -> None:
    """Raise the field's error (InvalidArgument, unless its limit says
    otherwise) for the first field of `message`, at any depth, that breaks
    its limit; the error names the field's path and the limit."""
    plan = _plan(message.DESCRIPTOR)
    if plan:
        _check(message, plan, "")


def clip(message: Message) -> None:
    """Cut `message` down to the limits in place: strings to their length,
    repeated fields and maps to their count. For output only (a row stored
    before these limits, too large to send), so characters are left alone."""
    descriptor: Any = message.DESCRIPTOR
    field: Any
    for field in descriptor.fields:
        limit = _limit_of(descriptor, field)
        name = field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                entries = getattr(message, name)
                for key in list(entries)[limit.count :]:
                    del entries[key]
                if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_STRING:
                    for key in list(entries):
                        if len(entries[key]) > limit.chars:
                            entries[key] = entries[key][: limit.chars]
                continue
            if field.is_repeated:
                items = getattr(message, name)
                del items[limit.count :]
                for item in items:
                    clip(item)
            elif message.HasField(name):
                clip(getattr(message, name))
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                items = getattr(message, name)
                del items[limit.count :]
                for index, value in enumerate(items):
                    if len(value) > limit.chars:
                        items[index] = value[: limit.chars]
            elif len(getattr(message, name)) > limit.chars:
                setattr(message, name, getattr(message, name)[: limit.chars])
        elif field.is_repeated:
            del getattr(message, name)[limit.count :]


def unknown_keys() -> list[str]:
    """Keys of LIMITS and RANGES that name no field of ours (a typo would
    leave that field on DEFAULT, or unchecked, silently;
    tests/test_sec_limits.py asserts none)."""
    pool = descriptor_pool.Default()
    unknown = []
    for key in [*LIMITS, *RANGES]:
        message_name, _, field = key.rpartition(".")
        try:
            message = pool.FindMessageTypeByName(_PACKAGE + message_name)
        except KeyError:
            unknown.append(key)
            continue
        if field not in message.fields_by_name:
            unknown.append(key)
    return unknown
