"""Detecting what the agent runs on: the HardwareProfile and the
RuntimeFingerprint sent with Enroll and Hello.

The parsers are pure functions over text so they are tested on fixture files;
`detect_hardware` only gathers the text (from paths in a HostPaths, which
tests point elsewhere) and applies the config's overrides last.

`detect_runtime` keeps the agent's own process small: importing a runtime
maps its native library for the life of the process (onnxruntime: ~20 MB of
RSS), and reading package metadata loads importlib.metadata with its email,
zipfile and csv modules (~1.5 MB); an agent with no model loaded should pay
for neither. So the detection (`detect_runtime_here`) runs in a short-lived
child process of this Python, with this process's sys.path, and only the
fingerprint comes back (`probe_runtime`). When the child gives no answer,
the fingerprint is read from package metadata in this process, importing no
runtime."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from google.protobuf.message import DecodeError

from edgefleet.agent.config import HardwareOverrides
from edgefleet.extras import needs
from edgefleet.v1 import common_pb2

log = logging.getLogger(__name__)

_MIB = 1024 * 1024
NVIDIA_SMI_QUERY = (
    "--query-gpu=name,memory.total,driver_version,compute_cap",
    "--format=csv,noheader,nounits",
)
NVIDIA_SMI_TIMEOUT_S = 5.0
# The runtime probe imports onnxruntime: well under a second on a PC,
# several on a small board reading from an SD card; past this it is given up.
RUNTIME_PROBE_TIMEOUT_S = 30.0
# Every onnxruntime build has the CPU provider, so it is all the metadata
# fallback claims: under-reporting only keeps the device out of classes that
# need an accelerator.
ONNXRUNTIME_CPU_PROVIDER = "CPUExecutionProvider"
# The distributions that install the `onnxruntime` module, for the fallback.
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
)
# What the probe child runs (argv[1]: the parent's sys.path as JSON, so it
# finds the runtimes the agent itself would load); it prints the serialized
# RuntimeFingerprint as one hex line.
_RUNTIME_PROBE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from edgefleet.agent.hardware import _runtime_probe_child; _runtime_probe_child()"
)

_ARCH_ALIASES = {
    "amd64": "x86_64",
    "x64": "x86_64",
    "x86-64": "x86_64",
    "arm64": "aarch64",
    "armv8": "aarch64",
    "armv8l": "aarch64",
}

# Compute capability of Jetson integrated GPUs by module family, most specific
# first ("Orin Nano" is an Orin, not a Nano). Without CUDA installed nothing
# else on the device reports it.
_JETSON_COMPUTE_CAPABILITY = (
    ("thor", "11.0"),
    ("orin", "8.7"),
    ("xavier", "7.2"),
    ("tx2", "6.2"),
    ("nano", "5.3"),
    ("tx1", "5.3"),
)


@dataclass(frozen=True)
class HostPaths:
    """Where host facts are read from; tests point these at fixture files."""

    cpuinfo: Path = Path("/proc/cpuinfo")
    os_release: Path = Path("/etc/os-release")
    device_tree_model: Path = Path("/proc/device-tree/model")
    nv_tegra_release: Path = Path("/etc/nv_tegra_release")


# A command runner: argv -> stdout, or None when it cannot run or fails.
CommandRunner = Callable[[Sequence[str]], str | None]


class RuntimeProbeFailed(Exception):
    """The runtime probe child gave no fingerprint: it could not start, did
    not finish in time, died (a runtime's native library can crash on
    import) or printed something else."""


# Detects the runtime fingerprint elsewhere; raises RuntimeProbeFailed.
RuntimeProbe = Callable[[], common_pb2.RuntimeFingerprint]


# ---------------------------------------------------------------- pure parsers


def normalise_arch(machine: str) -> str:
    """Map platform spellings onto one name per architecture (amd64 -> x86_64,
    arm64 -> aarch64); unknown names pass through lower-cased."""
    name = machine.strip().lower()
    return _ARCH_ALIASES.get(name, name)


def parse_cpuinfo_model(text: str) -> str:
    """The CPU model from /proc/cpuinfo text: "model name" (x86 and some ARM),
    else "Hardware" (older ARM kernels), else "Model" (Raspberry Pi); "" when
    none is present."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and value.strip() and key not in found:
            found[key] = value.strip()
    for key in ("model name", "hardware", "model"):
        if key in found:
            return found[key]
    return ""


def parse_os_release(text: str) -> dict[str, str]:
    """The KEY=value pairs of an os-release(5) file, quotes removed."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def parse_device_tree_model(raw: bytes) -> str:
    """The board name from /proc/device-tree/model (NUL-terminated)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace").strip()


def _int_or_zero(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        # nvidia-smi prints "[N/A]" or "[Not Supported]" for unknown values.
        return 0


def parse_nvidia_smi(text: str) -> list[common_pb2.Accelerator]:
    """Accelerators from `nvidia-smi --query-gpu=name,memory.total,
    driver_version,compute_cap --format=csv,noheader,nounits` output."""
    accelerators = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 4 or not parts[0]:
            continue
        name, memory, driver, capability = parts[:4]
        accelerators.append(
            common_pb2.Accelerator(
                kind="nvidia-gpu",
                name=name,
                memory_mb=_int_or_zero(memory),
                driver_version="" if driver.startswith("[") else driver,
                compute_capability="" if capability.startswith("[") else capability,
            )
        )
    return accelerators


def parse_runtime_probe(text: str) -> common_pb2.RuntimeFingerprint | None:
    """The fingerprint from the probe child's stdout: its last line, the
    serialized RuntimeFingerprint in hex (a runtime may print its own lines
    before it). None when that line is not one."""
    lines = text.strip().splitlines()
    if not lines:
        return None
    try:
        fingerprint = common_pb2.RuntimeFingerprint.FromString(bytes.fromhex(lines[-1]))
    except (ValueError, DecodeError):
        return None
    # Every fingerprint names its Python; an empty parse is not an answer.
    return fingerprint if fingerprint.python_version else None


def parse_l4t_release(text: str) -> str:
    """The L4T release ("R35.4.1") from /etc/nv_tegra_release; "" if unknown.
    The file reads like "# R35 (release), REVISION: 4.1, GCID: ..."."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else ""


def jetson_accelerator(
    board_model: str, tegra_release: str | None, memory_mb: int
) -> common_pb2.Accelerator | None:
    """The Jetson's integrated GPU, when either /etc/nv_tegra_release exists
    (`tegra_release` is its text) or the board model names a Jetson. It
    shares system memory, so its memory is the machine's."""
    if tegra_release is None and "jetson" not in board_model.lower():
        return None
    lowered = board_model.lower()
    capability = next((cc for family, cc in _JETSON_COMPUTE_CAPABILITY if family in lowered), "")
    return common_pb2.Accelerator(
        kind="jetson",
        name=board_model or "NVIDIA Jetson",
        memory_mb=memory_mb,
        driver_version=parse_l4t_release(tegra_release or ""),
        compute_capability=capability,
    )


def apply_overrides(
    profile: common_pb2.HardwareProfile, overrides: HardwareOverrides
) -> common_pb2.HardwareProfile:
    """A copy of `profile` with every fact set in `overrides` replaced."""
    result = common_pb2.HardwareProfile()
    result.CopyFrom(profile)
    if overrides.os is not None:
        result.os = overrides.os
    if overrides.os_release is not None:
        result.os_release = overrides.os_release
    if overrides.arch is not None:
        result.arch = normalise_arch(overrides.arch)
    if overrides.cpu_model is not None:
        result.cpu_model = overrides.cpu_model
    if overrides.cpu_cores is not None:
        result.cpu_cores = overrides.cpu_cores
    if overrides.memory_mb is not None:
        result.memory_mb = overrides.memory_mb
    if overrides.board_model is not None:
        result.board_model = overrides.board_model
    if overrides.accelerators is not None:
        del result.accelerators[:]
        result.accelerators.extend(
            common_pb2.Accelerator(
                kind=item.kind,
                name=item.name,
                memory_mb=item.memory_mb,
                driver_version=item.driver_version,
                compute_capability=item.compute_capability,
            )
            for item in overrides.accelerators
        )
    return result


# ---------------------------------------------------------------- gathering


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def run_command(argv: Sequence[str]) -> str | None:
    """Run a probe command; its stdout, or None if it is missing, fails or
    takes longer than NVIDIA_SMI_TIMEOUT_S. Probes are best effort: a broken
    driver must not stop the agent from enrolling."""
    executable = shutil.which(argv[0])
    if executable is None:
        return None
    try:
        completed = subprocess.run(
            [executable, *argv[1:]],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s failed: %s", argv[0], exc)
        return None
    if completed.returncode != 0:
        log.debug("%s exited %d: %s", argv[0], completed.returncode, completed.stderr.strip())
        return None
    return completed.stdout


def detect_hardware(
    state_dir: Path,
    overrides: HardwareOverrides | None = None,
    paths: HostPaths | None = None,
    run: CommandRunner = run_command,
) -> common_pb2.HardwareProfile:
    """Detect this machine's HardwareProfile, then apply `overrides`. Disk
    figures are those of the filesystem holding `state_dir`, where models
    will be stored."""
    paths = paths or HostPaths()
    os_release = parse_os_release(_read_text(paths.os_release) or "")
    system = platform.system()
    memory_mb = psutil.virtual_memory().total // _MIB
    try:
        disk = psutil.disk_usage(str(state_dir))
        disk_total_mb, disk_free_mb = disk.total // _MIB, disk.free // _MIB
    except OSError:
        disk_total_mb = disk_free_mb = 0
    try:
        board_model = parse_device_tree_model(paths.device_tree_model.read_bytes())
    except OSError:
        board_model = ""

    profile = common_pb2.HardwareProfile(
        os=system.lower(),
        os_release=os_release.get("PRETTY_NAME") or f"{system} {platform.release()}".strip(),
        arch=normalise_arch(platform.machine()),
        cpu_model=parse_cpuinfo_model(_read_text(paths.cpuinfo) or "") or platform.processor(),
        cpu_cores=os.cpu_count() or 1,
        memory_mb=memory_mb,
        disk_total_mb=disk_total_mb,
        disk_free_mb=disk_free_mb,
        hostname=socket.gethostname(),
        board_model=board_model,
    )
    jetson = jetson_accelerator(board_model, _read_text(paths.nv_tegra_release), memory_mb)
    if jetson is not None:
        # The integrated GPU is the Jetson itself; nvidia-smi (where JetPack
        # ships it) would report the same GPU again.
        profile.accelerators.append(jetson)
    else:
        smi = run(("nvidia-smi", *NVIDIA_SMI_QUERY))
        if smi:
            profile.accelerators.extend(parse_nvidia_smi(smi))
    return apply_overrides(profile, overrides) if overrides else profile


def _distribution_version(*names: str) -> str:
    # Imported here: importlib.metadata (with email, zipfile, csv) costs the
    # process ~1 MB of RSS, which only the probe child should pay.
    import importlib.metadata

    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _module_present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def agent_version() -> str:
    """The installed edgefleet distribution's version, "" when not installed."""
    return _distribution_version("edgefleet")


def detect_runtime_here(*, import_runtimes: bool = True) -> common_pb2.RuntimeFingerprint:
    """Which inference runtimes this Python can use, detected in this
    process. Every probe is best effort: a runtime that fails to import
    counts as absent. With `import_runtimes` False no runtime is imported:
    onnxruntime's version comes from package metadata and only its CPU
    provider is reported (the fallback of `detect_runtime`)."""
    fingerprint = common_pb2.RuntimeFingerprint(
        python_version=platform.python_version(),
        agent_version=agent_version(),
    )
    if _module_present("onnxruntime"):
        if import_runtimes:
            try:
                onnxruntime = importlib.import_module("onnxruntime")
                fingerprint.onnxruntime_version = str(onnxruntime.__version__)
                fingerprint.onnxruntime_providers.extend(onnxruntime.get_available_providers())
            except Exception as exc:  # a broken native library must not stop the agent
                log.warning("onnxruntime is installed but cannot be imported: %s", exc)
        else:
            version = _distribution_version(*ONNXRUNTIME_DISTRIBUTIONS)
            if version:
                fingerprint.onnxruntime_version = version
                fingerprint.onnxruntime_providers.append(ONNXRUNTIME_CPU_PROVIDER)
    # LiteRT is the successor of tflite-runtime; report whichever is installed,
    # preferring LiteRT. Versions come from package metadata so the (large)
    # interpreters are not imported just to be counted.
    for module, package in (
        ("ai_edge_litert", "ai-edge-litert"),
        ("tflite_runtime", "tflite-runtime"),
    ):
        if _module_present(module):
            version = _distribution_version(package)
            if version:
                fingerprint.litert_version = version
                fingerprint.litert_package = package
                break
    if _module_present("tensorrt"):
        version = _distribution_version("tensorrt", "tensorrt-cu12", "tensorrt-cu11")
        # Some JetPack installs carry no package metadata for TensorRT; only
        # the library itself can tell its version then.
        if not version and import_runtimes:
            try:
                version = str(importlib.import_module("tensorrt").__version__)
            except Exception as exc:  # a broken native library must not stop the agent
                log.warning("tensorrt is installed but cannot be imported: %s", exc)
        fingerprint.tensorrt_version = version
    return fingerprint


def _runtime_probe_child() -> None:
    """The probe child's work (see _RUNTIME_PROBE): detect, print one hex line."""
    print(detect_runtime_here().SerializeToString().hex(), flush=True)


def _exit_description(returncode: int) -> str:
    return f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"


def probe_runtime(timeout_s: float = RUNTIME_PROBE_TIMEOUT_S) -> common_pb2.RuntimeFingerprint:
    """`detect_runtime_here` run in a child process of this Python with this
    process's sys.path, so whatever it imports stays out of this process.
    What the child logs (a runtime that cannot be imported) is logged here.
    Raises RuntimeProbeFailed."""
    if not sys.executable:
        raise RuntimeProbeFailed("no Python executable to run it with")
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _RUNTIME_PROBE, json.dumps(sys.path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeProbeFailed(f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise RuntimeProbeFailed(f"cannot start {sys.executable}: {exc.strerror or exc}") from exc
    messages = completed.stderr.strip().splitlines()
    if completed.returncode != 0:
        raise RuntimeProbeFailed(
            f"the probe process died ({_exit_description(completed.returncode)})"
            + (f": {messages[-1]}" if messages else "")
        )
    fingerprint = parse_runtime_probe(completed.stdout)
    if fingerprint is None:
        raise RuntimeProbeFailed(
            f"unexpected output from the probe process: {completed.stdout.strip()[-200:]!r}"
        )
    for message in messages:
        log.warning("runtime probe: %s", message)
    return fingerprint


def detect_runtime(probe: RuntimeProbe = probe_runtime) -> common_pb2.RuntimeFingerprint:
    """Which inference runtimes this Python can use: `detect_runtime_here`
    in a child process (`probe`), so that no runtime or package metadata is
    loaded into the agent's process. When the child gives no answer, the
    fingerprint comes from package metadata in this process instead, with no
    runtime imported."""
    try:
        fingerprint = probe()
    except RuntimeProbeFailed as exc:
        log.warning(
            "cannot detect the inference runtimes in a child process (%s); reporting them "
            "from package metadata (onnxruntime with its CPU provider only)",
            exc,
        )
        fingerprint = detect_runtime_here(import_runtimes=False)
    if not fingerprint.onnxruntime_version:
        # The base install has no runtime; the agent runs, and says what to add.
        log.info("no ONNX Runtime here: %s", needs("serving ONNX models", "onnxruntime"))
    return fingerprint
