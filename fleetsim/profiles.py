"""Fleet profiles: which kinds of device a simulated fleet is made of and how
each kind behaves with each model version.

A profile is JSON (``edgefleet simulate --profile FILE``) or a dict; with
none, the built-in `default_profile()` is used (`edgefleet simulate
--print-profile` prints it). The whole format (the # comments explain, they
are not JSON)::

    {
      "heartbeat_interval_s": 15,     # until the control plane's config says otherwise
      "telemetry_interval_s": 10,     # likewise (DesiredState.config.telemetry_interval_s)
      "versions": {                   # behaviour overrides for every class
        "2.0.0": {"latency_factor": 1.5}
      },
      "classes": [
        {
          "name": "pi",               # required, unique
          "weight": 3,                # share of the fleet (default 1), or
          "count": 100,               # an exact number of devices (taken first)
          "hardware": {               # HardwareProfile fields (common.proto)
            "arch": "aarch64", "memory_mb": 3792, "cpu_cores": 4,
            "board_model": "Raspberry Pi 4 Model B Rev 1.4",
            "accelerators": [{"kind": "npu", "name": "Hailo-8"}]
          },
          "runtime": {"onnxruntime_version": "1.20.1"},   # RuntimeFingerprint fields
          "labels": {"site": "line-3"},
          # behaviour (the defaults are shown), for every version of this class:
          "install_s": [2, 6],        # total install time, uniform in [lo, hi] seconds
          "latency_p95_ms": 20,       # p50 defaults to p95 * 0.5, p99 to p95 * 1.4
          "latency_p50_ms": null,
          "latency_factor": 1.0,      # multiplies every latency (handy in "versions")
          "error_rate": 0.001,        # errors / requests
          "timeout_share": 0.1,       # timeouts / errors
          "requests_per_s": 5,
          "memory_mb": 80,            # the model's memory
          "cpu_percent": 15,
          "jitter": 0.1,              # relative noise on every figure
          "fail_rate": 0.0,           # probability that installing the version fails
          "fail_state": "validating", # downloading | verifying | validating | activating
          "fail_reason": null,        # default: a realistic reason for the state
          "agreement": 0.99,          # shadow stage: argmax agreement with the active model
          "max_diff": null,           # shadow max |diff|; default from the agreement
          "shadow_sample": 0.5,       # share of requests mirrored to a shadow model
          "silent_after_commit": false,  # go dark after committing (no heartbeat,
          "silent_for_s": 0,          #   no telemetry, stream closed); 0: for good
          "versions": {               # per-version overrides of any behaviour key
            "2.0.0": {"latency_p95_ms": 90, "error_rate": 0.2, "fail_rate": 0.5,
                      "fail_state": "validating", "agreement": 0.6}
          }
        }
      ]
    }

A version's behaviour on a class is the class's behaviour, overridden by the
top-level ``versions`` entry for that version, then by the class's own
``versions`` entry. Unknown keys are errors, so a typo does not silently
simulate the default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from edgefleet.v1 import common_pb2

# States an install can fail in, as the agent's update machine names them.
FAIL_STATES = ("downloading", "verifying", "validating", "activating")

# What a real agent reports when its update fails in each state.
DEFAULT_FAIL_REASONS = {
    "downloading": "download failed (NOT_FOUND): artifact not available to this device",
    "verifying": "manifest signature does not verify against the pinned keys",
    "validating": "golden outputs out of tolerance: max |diff| 0.31 > atol 0.001",
    "activating": "model failed to load: onnxruntime session creation failed",
}


class ProfileError(ValueError):
    """The profile cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class Behaviour:
    """How one class of device behaves with one model version."""

    install_s: tuple[float, float] = (2.0, 6.0)
    latency_p95_ms: float = 20.0
    latency_p50_ms: float | None = None
    latency_factor: float = 1.0
    error_rate: float = 0.001
    timeout_share: float = 0.1
    requests_per_s: float = 5.0
    memory_mb: float = 80.0
    cpu_percent: float = 15.0
    jitter: float = 0.1
    fail_rate: float = 0.0
    fail_state: str = "validating"
    fail_reason: str | None = None
    agreement: float = 0.99
    max_diff: float | None = None
    shadow_sample: float = 0.5
    silent_after_commit: bool = False
    silent_for_s: float = 0.0

    @property
    def p95_ms(self) -> float:
        return self.latency_p95_ms * self.latency_factor

    @property
    def p50_ms(self) -> float:
        p50 = self.latency_p50_ms if self.latency_p50_ms is not None else self.latency_p95_ms / 2
        return min(p50, self.latency_p95_ms) * self.latency_factor

    @property
    def reason(self) -> str:
        """Why an install of this version fails (when it does)."""
        return self.fail_reason or DEFAULT_FAIL_REASONS[self.fail_state]

    @property
    def shadow_max_diff(self) -> float:
        """Largest output difference a shadow model shows: lower agreement
        means outputs that differ more, unless the profile says otherwise."""
        if self.max_diff is not None:
            return self.max_diff
        return 0.001 + 2.0 * (1.0 - self.agreement)


_BEHAVIOUR_KEYS = frozenset(f.name for f in fields(Behaviour))
_RATES = ("error_rate", "timeout_share", "fail_rate", "agreement", "shadow_sample", "jitter")
_NON_NEGATIVE = (
    "latency_p95_ms", "latency_p50_ms", "latency_factor", "requests_per_s", "memory_mb",
    "cpu_percent", "max_diff", "silent_for_s",
)  # fmt: skip


def _behaviour(base: Behaviour, overrides: Mapping[str, Any], where: str) -> Behaviour:
    """`base` with `overrides` applied, validated."""
    unknown = sorted(set(overrides) - _BEHAVIOUR_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "install_s":
            values[key] = _install_range(value, f"{where}.install_s")
        elif key in ("fail_state", "fail_reason"):
            if value is not None and not isinstance(value, str):
                raise ProfileError(f"{where}.{key}: expected a string")
            if key == "fail_state" and value not in FAIL_STATES:
                raise ProfileError(f"{where}.fail_state: one of {', '.join(FAIL_STATES)}")
            values[key] = value
        elif key == "silent_after_commit":
            if not isinstance(value, bool):
                raise ProfileError(f"{where}.{key}: expected true or false")
            values[key] = value
        else:
            if value is None and key in ("latency_p50_ms", "max_diff"):
                values[key] = None
                continue
            number = _number(value, f"{where}.{key}")
            if key in _RATES and not 0.0 <= number <= 1.0:
                raise ProfileError(f"{where}.{key}: must be between 0 and 1")
            if number < 0:
                raise ProfileError(f"{where}.{key}: must not be negative")
            values[key] = number
    return replace(base, **values)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: expected a number")
    return float(value)


def _install_range(value: Any, where: str) -> tuple[float, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        low = high = _number(value, where)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        low, high = (_number(v, where) for v in value)
    else:
        raise ProfileError(f"{where}: expected [low, high] seconds or one number")
    if not 0 <= low <= high:
        raise ProfileError(f"{where}: need 0 <= low <= high")
    return (low, high)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(f"{where}: expected an object")
    return value


@dataclass(frozen=True)
class ClassProfile:
    """One kind of device: what it reports about itself, and its behaviour
    (by default and per model version)."""

    name: str
    hardware: common_pb2.HardwareProfile
    runtime: common_pb2.RuntimeFingerprint
    labels: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    count: int | None = None
    behaviour: Behaviour = field(default_factory=Behaviour)
    # Per-version overrides, validated; applied by FleetProfile.behaviour.
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)


_CLASS_KEYS = frozenset({"name", "weight", "count", "hardware", "runtime", "labels", "versions"})


@dataclass(frozen=True)
class FleetProfile:
    """A whole simulated fleet: its classes and the version overrides that
    apply to all of them."""

    classes: tuple[ClassProfile, ...]
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    heartbeat_interval_s: float = 15.0
    telemetry_interval_s: float = 10.0
    # Resolved behaviours; the profile is immutable, so they never go stale.
    _cache: dict[tuple[str, str], Behaviour] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def class_named(self, name: str) -> ClassProfile:
        """The class called `name` (KeyError when there is none)."""
        for cls in self.classes:
            if cls.name == name:
                return cls
        raise KeyError(name)

    def behaviour(self, class_name: str, version: str) -> Behaviour:
        """How devices of `class_name` behave with model `version` (the
        class's behaviour, then the fleet's and the class's version overrides)."""
        key = (class_name, version)
        found = self._cache.get(key)
        if found is None:
            cls = self.class_named(class_name)
            found = cls.behaviour
            where = f"classes[{class_name}]"
            if version in self.versions:
                found = _behaviour(found, self.versions[version], f"versions.{version}")
            if version in cls.versions:
                found = _behaviour(found, cls.versions[version], f"{where}.versions.{version}")
            self._cache[key] = found
        return found

    def allocate(self, n: int) -> list[ClassProfile]:
        """The class of each of `n` devices, in device order. Classes with a
        `count` get exactly that many (while there are devices left); the
        rest is shared by weight. The order interleaves the classes (smooth
        weighted round robin), so the first k devices are a fair sample; with
        weights only, device i has the same class whatever `n` is (so a
        re-run with more devices keeps the existing ones as they were)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        counted = [c for c in self.classes if c.count is not None]
        weighted = [c for c in self.classes if c.count is None and c.weight > 0]
        quota: dict[str, float] = {}
        left = n
        for cls in counted:
            take = min(left, cls.count or 0)
            quota[cls.name] = take
            left -= take
        total_weight = sum(c.weight for c in weighted)
        if left > 0 and total_weight <= 0:
            raise ProfileError(
                f"{n} devices but the classes' counts add up to {n - left} and no class "
                "has a weight to take the rest"
            )
        for cls in weighted:
            quota[cls.name] = left * cls.weight / total_weight
        # Smooth weighted round robin over the quotas: each step every class
        # gains its quota and the one furthest ahead takes the slot.
        order = [c for c in self.classes if quota.get(c.name, 0) > 0]
        credit = dict.fromkeys((c.name for c in order), 0.0)
        taken = dict.fromkeys((c.name for c in order), 0)
        total = sum(quota[c.name] for c in order)
        result: list[ClassProfile] = []
        for _ in range(n):
            for cls in order:
                credit[cls.name] += quota[cls.name]
            # Counted classes never exceed their count.
            candidates = [
                c for c in order if c.count is None or taken[c.name] < quota[c.name]
            ] or order
            chosen = max(candidates, key=lambda c: credit[c.name])
            credit[chosen.name] -= total
            taken[chosen.name] += 1
            result.append(chosen)
        return result

    def to_dict(self) -> dict[str, Any]:
        """The profile as JSON-ready data (what `--print-profile` shows)."""
        defaults = Behaviour()

        def behaviour_dict(b: Behaviour) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for f in fields(Behaviour):
                value = getattr(b, f.name)
                if value != getattr(defaults, f.name):
                    out[f.name] = list(value) if isinstance(value, tuple) else value
            return out

        classes = []
        for cls in self.classes:
            entry: dict[str, Any] = {"name": cls.name}
            if cls.count is not None:
                entry["count"] = cls.count
            else:
                entry["weight"] = cls.weight
            entry["hardware"] = json_format.MessageToDict(
                cls.hardware, preserving_proto_field_name=True
            )
            entry["runtime"] = json_format.MessageToDict(
                cls.runtime, preserving_proto_field_name=True
            )
            if cls.labels:
                entry["labels"] = dict(cls.labels)
            entry.update(behaviour_dict(cls.behaviour))
            if cls.versions:
                entry["versions"] = cls.versions
            classes.append(entry)
        data: dict[str, Any] = {
            "heartbeat_interval_s": self.heartbeat_interval_s,
            "telemetry_interval_s": self.telemetry_interval_s,
        }
        if self.versions:
            data["versions"] = self.versions
        data["classes"] = classes
        return data


def _versions(value: Any, where: str) -> dict[str, dict[str, Any]]:
    versions = _mapping(value, where)
    out: dict[str, dict[str, Any]] = {}
    for version, overrides in versions.items():
        entry = dict(_mapping(overrides, f"{where}.{version}"))
        _behaviour(Behaviour(), entry, f"{where}.{version}")  # validate now, apply later
        out[str(version)] = entry
    return out


def _proto(message: Any, value: Any, where: str) -> Any:
    try:
        return json_format.ParseDict(dict(_mapping(value, where)), message)
    except json_format.ParseError as exc:
        raise ProfileError(f"{where}: {exc}") from None


def _class_profile(raw: Any, index: int) -> ClassProfile:
    data = _mapping(raw, f"classes[{index}]")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"classes[{index}].name: a non-empty string is required")
    where = f"classes[{name}]"
    unknown = sorted(set(data) - _CLASS_KEYS - _BEHAVIOUR_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "weight" in data and "count" in data:
        raise ProfileError(f"{where}: give a weight or a count, not both")
    weight = _number(data.get("weight", 1.0), f"{where}.weight")
    if weight < 0:
        raise ProfileError(f"{where}.weight: must not be negative")
    count = data.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ProfileError(f"{where}.count: expected a whole number >= 0")
    labels = _mapping(data.get("labels", {}), f"{where}.labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ProfileError(f"{where}.labels: keys and values must be strings")
    hardware = _proto(common_pb2.HardwareProfile(), data.get("hardware", {}), f"{where}.hardware")
    if not hardware.os:
        hardware.os = "Linux"
    runtime = _proto(common_pb2.RuntimeFingerprint(), data.get("runtime", {}), f"{where}.runtime")
    if not runtime.agent_version:
        runtime.agent_version = "0.1.0+fleetsim"
    behaviour = _behaviour(
        Behaviour(), {k: v for k, v in data.items() if k in _BEHAVIOUR_KEYS}, where
    )
    return ClassProfile(
        name=name,
        hardware=hardware,
        runtime=runtime,
        labels=dict(labels),
        weight=weight,
        count=count,
        behaviour=behaviour,
        versions=_versions(data.get("versions", {}), f"{where}.versions"),
    )


def parse_profile(data: Any) -> FleetProfile:
    """A FleetProfile from JSON-like data; ProfileError names what is wrong."""
    root = _mapping(data, "profile")
    unknown = sorted(
        set(root) - {"classes", "versions", "heartbeat_interval_s", "telemetry_interval_s"}
    )
    if unknown:
        raise ProfileError(f"profile: unknown key(s) {', '.join(unknown)}")
    raw_classes = root.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise ProfileError("profile.classes: a non-empty list is required")
    classes = tuple(_class_profile(raw, i) for i, raw in enumerate(raw_classes))
    names = [c.name for c in classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProfileError(f"profile.classes: duplicate name(s) {', '.join(duplicates)}")
    intervals = {}
    for key in ("heartbeat_interval_s", "telemetry_interval_s"):
        if key in root:
            value = _number(root[key], f"profile.{key}")
            if value <= 0:
                raise ProfileError(f"profile.{key}: must be positive")
            intervals[key] = value
    return FleetProfile(
        classes=classes, versions=_versions(root.get("versions", {}), "versions"), **intervals
    )


def load_profile(path: Path) -> FleetProfile:
    """Read and parse a JSON profile file (ProfileError for bad content)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from None
    try:
        return parse_profile(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


# The built-in fleet: the kinds of device an edge fleet is made of (as
# bench/bench_sync.py simulates them), with plausible figures for a small
# vision model on each.
DEFAULT_PROFILE_DATA: dict[str, Any] = {
    "heartbeat_interval_s": 15,
    "telemetry_interval_s": 10,
    "classes": [
        {
            "name": "pi",
            "weight": 3,
            "hardware": {
                "os_release": "6.6.31+rpt-rpi-v8", "arch": "aarch64", "cpu_model": "Cortex-A72",
                "cpu_cores": 4, "memory_mb": 3792, "disk_total_mb": 29000,
                "disk_free_mb": 17500, "board_model": "Raspberry Pi 4 Model B Rev 1.4",
            },
            "runtime": {
                "python_version": "3.11.2", "onnxruntime_version": "1.20.1",
                "onnxruntime_providers": ["CPUExecutionProvider"],
                "litert_version": "1.2.0", "litert_package": "ai-edge-litert",
            },
            "install_s": [3, 8],
            "latency_p95_ms": 35, "requests_per_s": 4, "memory_mb": 60, "cpu_percent": 35,
        },
        {
            "name": "jetson",
            "weight": 1,
            "hardware": {
                "os_release": "5.15.136-tegra", "arch": "aarch64",
                "cpu_model": "ARMv8 Processor rev 1 (v8l)", "cpu_cores": 6, "memory_mb": 7620,
                "disk_total_mb": 116000, "disk_free_mb": 80200,
                "board_model": "NVIDIA Jetson Orin Nano Developer Kit",
                "accelerators": [{
                    "kind": "jetson", "name": "Orin (nvgpu)", "memory_mb": 7620,
                    "driver_version": "36.3.0", "compute_capability": "8.7",
                }],
            },
            "runtime": {
                "python_version": "3.10.12", "onnxruntime_version": "1.20.1",
                "tensorrt_version": "8.6.2",
                "onnxruntime_providers": [
                    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
                ],
            },
            "install_s": [5, 15],
            "latency_p95_ms": 6, "requests_per_s": 20, "memory_mb": 250, "cpu_percent": 20,
        },
        {
            "name": "gateway",
            "weight": 2,
            "hardware": {
                "os_release": "6.8.0-49-generic", "arch": "x86_64",
                "cpu_model": "Intel(R) Core(TM) i5-1135G7 @ 2.40GHz", "cpu_cores": 8,
                "memory_mb": 15700, "disk_total_mb": 476000, "disk_free_mb": 390000,
                "board_model": "Intel NUC11TNHi5",
            },
            "runtime": {
                "python_version": "3.12.3", "onnxruntime_version": "1.20.1",
                "onnxruntime_providers": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
            },
            "install_s": [2, 5],
            "latency_p95_ms": 12, "requests_per_s": 10, "memory_mb": 120, "cpu_percent": 10,
        },
    ],
}  # fmt: skip


def default_profile() -> FleetProfile:
    """The built-in profile: Raspberry Pis, Jetsons and x86 gateways, 3:1:2."""
    return parse_profile(DEFAULT_PROFILE_DATA)
