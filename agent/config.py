"""Agent settings: a TOML file plus `EDGEFLEET_AGENT_<KEY>` environment
overrides. See agent/packaging/agent.example.toml for every key.

Loading is explicit (`load_config`), never done at import time, and every
error names the file and key (or the environment variable) it came from."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.errors import ConfigError

DEFAULT_SERVER = "127.0.0.1:7443"
DEFAULT_STATE_DIR = Path("/var/lib/edgefleet-agent")
DEFAULT_CONFIG_PATH = Path("/etc/edgefleet-agent/agent.toml")
ENV_PREFIX = "EDGEFLEET_AGENT_"


@dataclass(frozen=True)
class AcceleratorOverride:
    """One accelerator to report instead of the detected ones."""

    kind: str
    name: str = ""
    memory_mb: int = 0
    driver_version: str = ""
    compute_capability: str = ""


@dataclass(frozen=True)
class HardwareOverrides:
    """Facts that replace detected ones in the reported HardwareProfile.

    Meant for demos and tests that run several agents on one machine, each
    pretending to be a different kind of device, so device classes and
    rollouts can be exercised without a drawer full of boards. None means
    "use what was detected"; an empty accelerators tuple means "report none".
    """

    os: str | None = None
    os_release: str | None = None
    arch: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    memory_mb: int | None = None
    board_model: str | None = None
    accelerators: tuple[AcceleratorOverride, ...] | None = None


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent can be told."""

    server: str = DEFAULT_SERVER
    # The control plane's CA certificate (its data dir's ca.pem), provisioned
    # with the enrollment token: TLS, and mutual TLS once enrolled. None:
    # plain text (development only), until the agent holds a certificate.
    ca_cert: Path | None = None
    # Plain text to a control plane without TLS: local development and the
    # demo only. Without ca_cert or this, the agent refuses to start.
    insecure: bool = False
    enrollment_token: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    # Name shown to operators; None means the hostname.
    name: str | None = None
    # None means derived from the machine id (see identity.resolve_hardware_id).
    hardware_id: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Used until the control plane's DesiredState.config says otherwise.
    heartbeat_interval_s: float = 15.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    hardware: HardwareOverrides = field(default_factory=HardwareOverrides)
    # Threads running inference for the on-device API (runtimes block).
    inference_workers: int = 2
    # Loopback host:port to serve the inference API on besides the unix
    # socket (state_dir/inference.sock); None: the socket only.
    inference_listen: str | None = None
    # Seconds per telemetry interval (one sample per model version each).
    telemetry_interval_s: float = 10.0
    # Loopback host:port serving the last interval's figures for Prometheus
    # (/metrics); None: off (it costs ~2 MB of RSS: prometheus_client).
    metrics_listen: str | None = None
    # The power/thermal policy (agent/power.py, docs/power.md): seconds
    # between sensor reads; battery levels (percent, only while on battery)
    # and hottest-sensor temperatures (Celsius) that start the limited and
    # critical modes; how much better a reading must get to leave a mode;
    # the inference concurrency each mode allows (0: no limit).
    power_interval_s: float = 5.0
    power_battery_limited_percent: float = 30.0
    power_battery_critical_percent: float = 15.0
    power_temperature_limited_c: float = 70.0
    power_temperature_critical_c: float = 80.0
    power_battery_hysteresis_percent: float = 5.0
    power_temperature_hysteresis_c: float = 5.0
    power_limited_concurrency: int = 2
    power_critical_concurrency: int = 1
    # From which mode on the agent serves each model's lighter fallback
    # artifact, where its version has one: "limited" (limited and
    # critical), "critical" (critical only) or "never".
    power_fallback_mode: str = "limited"
    # A file holding the temperature in millidegrees Celsius (the format of
    # Linux /sys/class/thermal/thermal_zone*/temp, e.g. "85000"): the
    # temperature the policy acts on instead of psutil's hottest sensor.
    # None: psutil's.
    power_temperature_file: Path | None = None
    # Bytes per artifact download chunk; 0: the control plane's default
    # (1 MiB). Smaller chunks lose less to an interrupted link.
    download_chunk_size: int = 0
    # An HTTP(S) artifact source that sends nothing for this long is left
    # (before its first byte: for the next source; after: resumed later).
    download_stall_s: float = 60.0
    # At most this many bytes a second per download (a metered link); 0:
    # as fast as the source sends.
    max_download_rate: int = 0
    # A mirror slower than this (bytes/s over 30 s) is left for the next
    # source (agent/update/http_download.py); 0: never.
    download_min_mirror_rate: int = 32 * 1024
    # ONNX Runtime execution providers for serving, comma-separated; "auto":
    # TensorRT and CUDA where installed, then CPU; "cpu": CPU only.
    onnxruntime_providers: str = "auto"
    # Shadow stages: at most this many requests a second are mirrored to a
    # shadow model (every request while under it); 0 turns mirroring off.
    shadow_max_per_s: float = 20.0


# ---------------------------------------------------------------- converters
#
# Each converter takes a value from TOML (already typed) and the place it came
# from, for the error message. Environment values are strings and go through
# the _env_* parsers first.


def _fail(where: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{where}: expected {expected}, got {value!r}")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, "a string", value)
    return value


def _nonempty_string(value: object, where: str) -> str:
    text = _string(value, where).strip()
    if not text:
        raise _fail(where, "a non-empty string", value)
    return text


def _optional_string(value: object, where: str) -> str | None:
    # An empty value clears an optional setting, which is how an environment
    # override undoes a value from the file.
    text = _string(value, where).strip()
    return text or None


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "true or false", value)
    return value


def _env_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    return lowered in ("1", "true", "yes")


def _optional_path(value: object, where: str) -> Path | None:
    text = _optional_string(value, where)
    return Path(text) if text else None


def _server(value: object, where: str) -> str:
    text = _nonempty_string(value, where)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise _fail(where, "host:port (e.g. 127.0.0.1:7443)", value)
    return text


def _positive_seconds(value: object, where: str) -> float:
    # bool is an int subclass; `heartbeat_interval_s = true` is a mistake.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, "a positive number of seconds", value)
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise _fail(where, "a positive number of seconds", value)
    return seconds


def _non_negative_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, "a non-negative integer", value)
    return value


def _positive_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(where, "a positive integer", value)
    return value


def _number(value: object, where: str, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, expected, value)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(where, expected, value)
    return number


def _percent(value: object, where: str) -> float:
    number = _number(value, where, "a percentage from 0 to 100")
    if not 0 <= number <= 100:
        raise _fail(where, "a percentage from 0 to 100", value)
    return number


def _celsius(value: object, where: str) -> float:
    return _number(value, where, "a temperature in degrees Celsius")


def _margin(value: object, where: str) -> float:
    number = _number(value, where, "a non-negative number")
    if number < 0:
        raise _fail(where, "a non-negative number", value)
    return number


FALLBACK_MODES = ("limited", "critical", "never")


def _fallback_mode(value: object, where: str) -> str:
    expected = "one of " + ", ".join(repr(m) for m in FALLBACK_MODES)
    if not isinstance(value, str) or value.strip().lower() not in FALLBACK_MODES:
        raise _fail(where, expected, value)
    return value.strip().lower()


def _absolute_file(value: object, where: str) -> Path | None:
    # Relative to what would be unclear (the file's directory, the agent's
    # working directory under systemd): only absolute paths.
    path = _optional_path(value, where)
    if path is not None and not path.is_absolute():
        raise _fail(
            where,
            "an absolute path (e.g. /sys/class/thermal/thermal_zone0/temp) or empty",
            value,
        )
    return path


def _loopback(value: object, where: str) -> str | None:
    text = _optional_string(value, where)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or host not in ("127.0.0.1", "[::1]", "localhost") or not port.isdigit():
        raise _fail(where, "a loopback host:port (e.g. 127.0.0.1:7450) or empty", value)
    return text


def _labels(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise _fail(where, "a table of string labels", value)
    labels: dict[str, str] = {}
    for key, label in value.items():
        if not isinstance(key, str) or not key.strip():
            raise _fail(where, "non-empty label names", key)
        labels[key] = _string(label, f"{where}.{key}")
    return labels


def _accelerator(value: object, where: str) -> AcceleratorOverride:
    if not isinstance(value, Mapping):
        raise _fail(where, "a table with kind, name, memory_mb", value)
    _reject_unknown(value, {f.name for f in fields(AcceleratorOverride)}, where)
    if "kind" not in value:
        raise ConfigError(f'{where}: missing key \'kind\' (e.g. "nvidia-gpu", "jetson")')
    return AcceleratorOverride(
        kind=_nonempty_string(value["kind"], f"{where}.kind"),
        name=_string(value.get("name", ""), f"{where}.name"),
        memory_mb=_non_negative_int(value.get("memory_mb", 0), f"{where}.memory_mb"),
        driver_version=_string(value.get("driver_version", ""), f"{where}.driver_version"),
        compute_capability=_string(
            value.get("compute_capability", ""), f"{where}.compute_capability"
        ),
    )


_HARDWARE_CONVERTERS: dict[str, Callable[[object, str], Any]] = {
    "os": _nonempty_string,
    "os_release": _string,
    "arch": _nonempty_string,
    "cpu_model": _string,
    "cpu_cores": _positive_int,
    "memory_mb": _positive_int,
    "board_model": _string,
}


def _hardware(value: object, where: str) -> HardwareOverrides:
    if not isinstance(value, Mapping):
        raise _fail(where, "a table", value)
    _reject_unknown(value, {*_HARDWARE_CONVERTERS, "accelerators"}, where)
    overrides: dict[str, Any] = {
        key: convert(value[key], f"{where}.{key}")
        for key, convert in _HARDWARE_CONVERTERS.items()
        if key in value
    }
    if "accelerators" in value:
        items = value["accelerators"]
        if not isinstance(items, list):
            raise _fail(
                f"{where}.accelerators", "a list of tables ([[hardware.accelerators]])", items
            )
        overrides["accelerators"] = tuple(
            _accelerator(item, f"{where}.accelerators[{index}]") for index, item in enumerate(items)
        )
    return HardwareOverrides(**overrides)


def _reject_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    # Typos ("heartbeat_interval" for "heartbeat_interval_s") would otherwise
    # be ignored silently and the default used.
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known keys: {', '.join(sorted(known))})"
        )


# ---------------------------------------------------------------- environment


def _env_labels(text: str, where: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, label = item.partition("=")
        if not sep or not key.strip():
            raise _fail(where, "comma-separated key=value pairs (e.g. site=lab,tier=canary)", text)
        labels[key.strip()] = label.strip()
    return labels


def _env_int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(where, "a positive integer", text) from None


def _env_number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _fail(where, "a positive number of seconds", text) from None


def _env_float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _fail(where, "a number", text) from None


def _env_count(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(where, "a non-negative integer", text) from None


# key -> (converter for typed values, parser from environment text or None
# when the key cannot be set from the environment)
_TOP_LEVEL: dict[str, tuple[Callable[[object, str], Any], Callable[[str, str], object] | None]] = {
    "server": (_server, lambda text, where: text),
    "ca_cert": (_optional_path, lambda text, where: text),
    "insecure": (_bool, _env_bool),
    "enrollment_token": (_optional_string, lambda text, where: text),
    "state_dir": (_nonempty_string, lambda text, where: text),
    "name": (_optional_string, lambda text, where: text),
    "hardware_id": (_optional_string, lambda text, where: text),
    "labels": (_labels, _env_labels),
    "heartbeat_interval_s": (_positive_seconds, _env_number),
    "backoff_initial_s": (_positive_seconds, _env_number),
    "backoff_max_s": (_positive_seconds, _env_number),
    "hardware": (_hardware, None),
    "inference_workers": (_positive_int, _env_int),
    "inference_listen": (_loopback, lambda text, where: text),
    "telemetry_interval_s": (_positive_seconds, _env_number),
    "metrics_listen": (_loopback, lambda text, where: text),
    "download_chunk_size": (_non_negative_int, _env_int),
    "download_stall_s": (_positive_seconds, _env_number),
    "max_download_rate": (_non_negative_int, _env_int),
    "download_min_mirror_rate": (_non_negative_int, _env_int),
    "onnxruntime_providers": (_nonempty_string, lambda text, where: text),
    "power_interval_s": (_positive_seconds, _env_number),
    "power_battery_limited_percent": (_percent, _env_float),
    "power_battery_critical_percent": (_percent, _env_float),
    "power_temperature_limited_c": (_celsius, _env_float),
    "power_temperature_critical_c": (_celsius, _env_float),
    "power_battery_hysteresis_percent": (_margin, _env_float),
    "power_temperature_hysteresis_c": (_margin, _env_float),
    "power_limited_concurrency": (_non_negative_int, _env_count),
    "power_critical_concurrency": (_non_negative_int, _env_count),
    "power_fallback_mode": (_fallback_mode, lambda text, where: text),
    "power_temperature_file": (_absolute_file, lambda text, where: text),
    "shadow_max_per_s": (_margin, _env_float),
}


def env_var(key: str) -> str:
    """The environment variable that overrides config key `key`."""
    return ENV_PREFIX + key.upper()


# ---------------------------------------------------------------- loading


def read_toml(path: Path) -> dict[str, Any]:
    """Parse `path` as TOML, turning every failure into a ConfigError naming it."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Build the configuration from `path` (None: defaults only) and then the
    `EDGEFLEET_AGENT_<KEY>` variables in `environ` (default: os.environ).

    Raises ConfigError naming the file and key, or the variable, at fault.
    A relative state_dir in the file is relative to the file's directory.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if path is not None:
        table = read_toml(path)
        _reject_unknown(table, set(_TOP_LEVEL), str(path))
        for key, (convert, _) in _TOP_LEVEL.items():
            if key in table:
                values[key] = convert(table[key], f"{path}: key {key}")
        if "state_dir" in values:
            values["state_dir"] = path.parent / Path(values["state_dir"]).expanduser()

    for key, (convert, parse_env) in _TOP_LEVEL.items():
        var = env_var(key)
        if parse_env is None or var not in environ:
            continue
        where = f"environment variable {var}"
        values[key] = convert(parse_env(environ[var], where), where)
        if key == "state_dir":
            values["state_dir"] = Path(values["state_dir"]).expanduser()

    if "state_dir" in values:
        values["state_dir"] = Path(values["state_dir"]).absolute()
    config = replace(AgentConfig(), **values)
    if config.backoff_max_s < config.backoff_initial_s:
        origin = str(path) if path is not None else "configuration"
        raise ConfigError(
            f"{origin}: key backoff_max_s ({config.backoff_max_s:g}) must not be less than "
            f"backoff_initial_s ({config.backoff_initial_s:g})"
        )
    _check_power(config, str(path) if path is not None else "configuration")
    return config


def _check_power(config: AgentConfig, origin: str) -> None:
    # Critical is the worse mode: a lower battery, a higher temperature.
    if config.power_battery_critical_percent > config.power_battery_limited_percent:
        raise ConfigError(
            f"{origin}: key power_battery_critical_percent "
            f"({config.power_battery_critical_percent:g}) must not be more than "
            f"power_battery_limited_percent ({config.power_battery_limited_percent:g})"
        )
    if config.power_temperature_critical_c < config.power_temperature_limited_c:
        raise ConfigError(
            f"{origin}: key power_temperature_critical_c "
            f"({config.power_temperature_critical_c:g}) must not be less than "
            f"power_temperature_limited_c ({config.power_temperature_limited_c:g})"
        )


def default_config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read when --config is not given: $EDGEFLEET_AGENT_CONFIG, else
    /etc/edgefleet-agent/agent.toml when it exists, else none (defaults and
    environment only)."""
    environ = os.environ if environ is None else environ
    if environ.get(env_var("config")):
        return Path(environ[env_var("config")])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
