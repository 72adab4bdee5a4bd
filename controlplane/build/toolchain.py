"""Build toolchains: converters that cannot share the control plane's Python
environment, installed in their own virtual environments and run as
subprocesses.

The TFLite toolchain is onnx2tf. It pins TensorFlow, and TensorFlow pins
protobuf 4 while the control plane's generated code needs protobuf 7, so it
lives in `<toolchains dir>/tflite` (a venv), installed by
`edgefleet toolchain install tflite`. Its versions are part of a build's
identity: the same model built with another onnx2tf is another artifact.

onnx2tf has habits a build must not inherit, each handled here:
- it rewrites its input file in place, so it gets a copy in a scratch dir;
- it names unnamed nodes `Softmax@0`-style and TensorFlow rejects `@` in a
  scope name, so node names are made valid first;
- it shells out to `onnxsim`, so the venv's bin/ leads PATH;
- for 4-D 3-channel inputs it downloads a sample-image .npy into the cwd
  unless the file is already there, so one made from the build's own samples
  is written first, and proxies point at a closed port so nothing can reach
  the network."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgefleet.controlplane.errors import DomainError, FailedPrecondition

TOOLCHAINS_ENV = "EDGEFLEET_TOOLCHAINS_DIR"
TFLITE = "tflite"
INSTALL_TFLITE = "edgefleet toolchain install tflite"
MARKER = "edgefleet-toolchain.json"

# onnx2tf pins its own dependencies exactly; the ones it leaves open
# (keras, via tensorflow) are pinned here too, so an install made today and
# one made next year convert alike. Changing this list makes every installed
# toolchain stale: find_tflite() stops seeing it and install reinstalls.
TFLITE_PINS: tuple[str, ...] = (
    "onnx2tf==1.29.24",
    "tensorflow==2.19.0",
    "tf-keras==2.19.0",
    "keras==3.15.1",
    "protobuf==4.25.5",
    "numpy==1.26.4",
    "ml-dtypes==0.5.1",
    "h5py==3.11.0",
    "flatbuffers==25.12.19",
    "onnx==1.19.1",
    "onnxruntime==1.23.0",
    "onnx-graphsurgeon==0.5.8",
    "onnxsim==0.4.36",
    "sng4onnx==2.0.1",
    "psutil==5.9.5",
)
# The versions that make a build's identity (its dedup key).
KEY_PACKAGES = ("onnx2tf", "tensorflow")

# onnx2tf looks for this file in its cwd before downloading it.
SELF_CHECK_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SELF_CHECK_SHAPE = (20, 128, 128, 3)
# A closed port: any download attempt fails at once instead of hanging.
_NO_NETWORK_PROXY = "http://127.0.0.1:9"
_INSTALL_TIMEOUT_S = 1800.0
DEFAULT_CONVERT_TIMEOUT_S = 1800.0
# What onnx2tf names its outputs: <stem>_<kind>.tflite.
_MODEL_STEM = "model"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# TensorFlow's C++ start-up chatter (cuDNN factories, absl) says nothing about
# a failure; left out of error excerpts.
_NOISE = re.compile(r"^([EWI]\d{4} |WARNING: All log messages before absl|\s*$)")
_VALID_SCOPE = re.compile(r"[^A-Za-z0-9_.\-]")


class ToolchainError(DomainError):
    title = "Toolchain"


class ToolchainMissing(FailedPrecondition):
    title = "Toolchain missing"


class ToolchainInstallFailed(ToolchainError):
    title = "Toolchain install failed"


class ConversionFailed(ToolchainError):
    title = "Conversion failed"


def default_toolchains_dir() -> Path:
    """`$EDGEFLEET_TOOLCHAINS_DIR`, else ~/.cache/edgefleet/toolchains."""
    configured = os.environ.get(TOOLCHAINS_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "edgefleet" / "toolchains"


@dataclass(frozen=True)
class TfliteToolchain:
    """An installed onnx2tf environment."""

    venv: Path
    # Every package in the venv -> its version (pip list), as installed.
    versions: Mapping[str, str]

    @property
    def bin_dir(self) -> Path:
        return self.venv / "bin"

    @property
    def onnx2tf(self) -> Path:
        return self.bin_dir / "onnx2tf"

    @property
    def onnx2tf_version(self) -> str:
        return self.versions.get("onnx2tf", "")

    @property
    def tensorflow_version(self) -> str:
        return self.versions.get("tensorflow", "")

    @property
    def key(self) -> str:
        """What identifies the converter in a build's dedup key:
        `onnx2tf==1.29.24,tensorflow==2.19.0`."""
        return ",".join(f"{name}=={self.versions.get(name, '?')}" for name in KEY_PACKAGES)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _read_marker(venv: Path) -> dict[str, object] | None:
    try:
        data = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_tflite(toolchains_dir: Path | None = None) -> TfliteToolchain | None:
    """The installed TFLite toolchain, or None when it is absent, half
    installed, or was installed with other pins than this release's."""
    venv = (toolchains_dir or default_toolchains_dir()) / TFLITE
    marker = _read_marker(venv)
    if marker is None or marker.get("pins") != list(TFLITE_PINS):
        return None
    if not (venv / "bin" / "onnx2tf").exists():
        return None
    versions = marker.get("versions")
    if not isinstance(versions, dict):
        return None
    return TfliteToolchain(venv, {_normalize(str(k)): str(v) for k, v in versions.items()})


def require_tflite(toolchains_dir: Path | None = None) -> TfliteToolchain:
    """find_tflite(), or ToolchainMissing naming the install command."""
    toolchain = find_tflite(toolchains_dir)
    if toolchain is not None:
        return toolchain
    where = (toolchains_dir or default_toolchains_dir()) / TFLITE
    stale = _read_marker(where) is not None
    reason = "was installed for another EdgeFleet release" if stale else "is not installed"
    raise ToolchainMissing(
        f"the TFLite toolchain (onnx2tf) {reason} at {where}; "
        f"run `{INSTALL_TFLITE}` on the build host"
        + (f" (with --dir {where.parent})" if toolchains_dir is not None else "")
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time per toolchains dir (CI and a test session may
    both try)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stream(
    command: Sequence[str], progress: Callable[[str], None], env: Mapping[str, str]
) -> tuple[int, list[str]]:
    """Run `command`, passing each output line to `progress`; returns the
    exit code and the last lines."""
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=dict(env),
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                progress(line)
        try:
            code = proc.wait(timeout=_INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    return code, list(tail)


def install_tflite(
    toolchains_dir: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
    *,
    step: Callable[[str], None] | None = None,
    python: str | None = None,
    force: bool = False,
) -> TfliteToolchain:
    """Create the onnx2tf venv with TFLITE_PINS (a few minutes, ~2.5 GB).
    `progress` gets every output line of pip and the checks; `step` (or
    `progress` when None) each stage's one-line summary.

    Idempotent: an install with the same pins is kept unless `force`; one
    with other pins is replaced. The marker file is written last, so an
    interrupted install is never taken for a finished one."""
    announce = step or progress
    root = toolchains_dir or default_toolchains_dir()
    venv = root / TFLITE
    with _locked(root / f"{TFLITE}.lock"):
        existing = None if force else find_tflite(root)
        if existing is not None:
            announce(f"already installed at {venv} ({existing.key})")
            return existing
        if venv.exists():
            announce(f"removing the previous install at {venv}")
            shutil.rmtree(venv)
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
        steps: list[tuple[str, list[str]]] = [
            (
                "creating the virtual environment",
                [python or sys.executable, "-m", "venv", str(venv)],
            ),
            (
                "installing onnx2tf and TensorFlow",
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--no-input",
                    "--progress-bar",
                    "off",
                    *TFLITE_PINS,
                ],
            ),
            # Imports TensorFlow once: a broken wheel shows here, not in a build.
            ("checking that onnx2tf runs", [str(venv / "bin" / "onnx2tf"), "-V"]),
        ]
        for what, command in steps:
            announce(what)
            try:
                code, tail = _stream(command, progress, env)
            except OSError as exc:
                raise ToolchainInstallFailed(f"{what} failed: {exc}") from exc
            if code != 0:
                raise ToolchainInstallFailed(
                    f"{what} failed (exit {code}):\n" + "\n".join(_clean(tail)[-15:])
                )
        listed = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        try:
            versions = {p["name"]: p["version"] for p in json.loads(listed.stdout)}
        except (ValueError, KeyError, TypeError) as exc:
            raise ToolchainInstallFailed(f"cannot list the installed packages: {exc}") from exc
        marker = {"pins": list(TFLITE_PINS), "versions": versions}
        tmp = venv / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=2, sort_keys=True))
        os.replace(tmp, venv / MARKER)
    toolchain = find_tflite(root)
    assert toolchain is not None
    announce(f"installed at {venv} ({toolchain.key})")
    return toolchain


def installed_toolchains(toolchains_dir: Path | None = None) -> dict[str, TfliteToolchain | None]:
    """Each known toolchain -> its install, None when absent (for `toolchain ls`)."""
    return {TFLITE: find_tflite(toolchains_dir)}


def is_stale(name: str, toolchains_dir: Path | None = None) -> bool:
    """Whether `name` has a finished install that find_tflite() will not use
    (made with other pins): `toolchain install` replaces it."""
    root = toolchains_dir or default_toolchains_dir()
    return _read_marker(root / name) is not None and find_tflite(root) is None


# ------------------------------------------------------------------ onnx2tf


@dataclass(frozen=True)
class ConvertInput:
    """One model input as the conversion sees it."""

    name: str
    # The shape to convert at, in the ONNX layout: fixes the model's dynamic
    # dims. A -1 first dimension keeps a dynamic batch dynamic (every other
    # dim is fixed); otherwise the shape is static.
    shape: tuple[int, ...]
    # Sample values in the ONNX layout with a leading sample axis, for
    # calibration and for onnx2tf's own self-check.
    samples: np.ndarray


@dataclass(frozen=True)
class Onnx2TfResult:
    # onnx2tf's kind ("float32", "float16", "full_integer_quant", ...) -> file.
    files: Mapping[str, Path]
    log_path: Path
    # Lines of onnx2tf's warnings about outputs it could not make, e.g.
    # "Full INT8 Quantization tflite output failed." with its traceback tail.
    failures: Mapping[str, str]


def tf_layout(array: np.ndarray) -> np.ndarray:
    """An ONNX-layout batch in the layout onnx2tf gives the TFLite input:
    rank 3-5 tensors go channel-last (NCW -> NWC, NCHW -> NHWC,
    NCDHW -> NDHWC); others are unchanged."""
    if 3 <= array.ndim <= 5:
        return np.ascontiguousarray(array.transpose(0, *range(2, array.ndim), 1))
    return array


def self_check_images(inputs: Sequence[ConvertInput]) -> np.ndarray:
    """The 20x128x128x3 float32 array onnx2tf would download: the first
    3-channel image input's samples (NHWC, nearest-neighbour resized,
    repeated up to 20), or deterministic noise in [0, 1) if there is none."""
    for spec in inputs:
        data = spec.samples
        if data.ndim == 4 and data.shape[1] == 3 and np.issubdtype(data.dtype, np.floating):
            nhwc = tf_layout(data.astype(np.float32))
            rows = np.arange(128) * nhwc.shape[1] // 128
            cols = np.arange(128) * nhwc.shape[2] // 128
            resized = nhwc[:, rows][:, :, cols]
            picks = np.arange(SELF_CHECK_SHAPE[0]) % len(resized)
            return np.ascontiguousarray(resized[picks], dtype=np.float32)
    return np.random.default_rng(0).random(SELF_CHECK_SHAPE, dtype=np.float32)


def _converter_name(name: str) -> str:
    """The name onnx2tf gives an input in TensorFlow (it replaces `:` and a
    leading `/`); -cind must use it."""
    return re.sub(r"^/", "wa/", name.replace(":", "__"))


def _broadcast_literal(rank: int, value: float) -> str:
    """A mean/std literal that broadcasts over a rank-`rank` batch: [[[[0.0]]]]."""
    return "[" * max(rank, 1) + repr(float(value)) + "]" * max(rank, 1)


def safe_copy(model: Path, dest: Path, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
    """Copy `model` to `dest` as one file (external weights pulled in),
    giving every node a name TensorFlow accepts as a scope (`Softmax@0` ->
    `Softmax_0`; unnamed, which onnx2tf would name `Softmax@0`, ->
    `<op>_<index>`). Node names are not part of the model's interface, so
    nothing a caller sees changes.

    `shapes` (input name -> dims, -1 for one to leave as it is) fixes input
    dimensions in the copy: how a conversion keeps a dynamic batch while
    fixing the rest, which onnx2tf's -ois cannot (it fixes every dimension
    it is given)."""
    proto = onnx.load(str(model), load_external_data=True)
    for value in proto.graph.input:
        dims = (shapes or {}).get(value.name)
        tensor_dims = value.type.tensor_type.shape.dim
        if dims is None or len(dims) != len(tensor_dims):
            continue
        for axis, dim in enumerate(tensor_dims):
            size = dims[axis]
            if size >= 0:
                dim.dim_value = size  # a oneof: drops the symbolic name
            elif not dim.dim_param:
                # Left dynamic but with no name: unset, or the -1 some
                # exporters (Paddle) write, which onnx2tf takes for a size
                # ("Dimension -1 must be >= 0"). A name makes it dynamic.
                dim.dim_param = f"dynamic_{axis}"
    used: set[str] = set()
    for index, node in enumerate(proto.graph.node):
        name = _VALID_SCOPE.sub("_", node.name) or f"{node.op_type}_{index}"
        if name[0] in "._-":
            name = f"n{name}"
        while name in used:
            name = f"{name}_{index}"
        used.add(name)
        node.name = name
    onnx.save(proto, str(dest))


def _clean(lines: Sequence[str]) -> list[str]:
    out = []
    for line in lines:
        text = _ANSI.sub("", line).rstrip()
        if not _NOISE.match(text):
            out.append(text)
    return out


def log_excerpt(log_path: Path, lines: int = 15) -> str:
    """The last meaningful lines of a conversion log (TensorFlow's start-up
    noise and colour codes removed)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(_clean(text.splitlines())[-lines:])


def _failure_notes(log_path: Path) -> dict[str, str]:
    """onnx2tf logs a failed quantized output as a warning and carries on;
    `"Full INT8 Quantization tflite output failed."` -> the lines before it."""
    kinds = {
        "INT8 Quantization tflite output failed.": "integer_quant",
        "Full INT8 Quantization tflite output failed.": "full_integer_quant",
    }
    notes: dict[str, str] = {}
    lines = _clean(log_path.read_text(errors="replace").splitlines())
    for i, line in enumerate(lines):
        for marker, kind in kinds.items():
            if line.endswith(marker) and not (kind == "integer_quant" and "Full INT8" in line):
                context = [x for x in lines[max(0, i - 6) : i] if x.strip()]
                notes[kind] = "\n".join([*context, line.strip()])
    return notes


# onnx2tf's line naming the ONNX node it is converting, and the last line
# of a Python traceback: what a failed conversion summary quotes.
_NODE_LINE = re.compile(r"onnx_op_type: (?P<type>\S+)\s+onnx_op_name: (?P<name>\S+)")
_FAILED_NODE = re.compile(r"^ERROR: onnx_op_name: (?P<name>\S+)")
_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?(?P<kind>\w*(?:Error|Exception)): (?P<message>.+)")


MAX_ERROR_CHARS = 400


def failure_summary(log_path: Path, inputs: Sequence[ConvertInput], code: int) -> str:
    """One paragraph on why onnx2tf failed: the ONNX node it could not
    convert (its type and name, from onnx2tf's own ERROR lines or the last
    node it started), the error it raised, and the static input shapes it
    was given; the log's path for the rest. Without a recognisable node,
    the log's last lines."""
    try:
        lines = _clean(log_path.read_text(errors="replace").splitlines())
    except OSError:
        lines = []
    failed = next((m["name"] for m in map(_FAILED_NODE.match, lines) if m), None)
    started = [m for m in map(_NODE_LINE.search, lines) if m]
    node = next((m for m in reversed(started) if failed is None or m["name"] == failed), None)
    error = ""
    for at in range(len(lines) - 1, -1, -1):
        m = _EXCEPTION.match(lines[at])
        if m:
            error = f"{m['kind']}: {m['message'].strip()}"
            # Keras wraps the op's own error: "Exception encountered when
            # calling layer ..." and, on the next line, what went wrong.
            after = lines[at + 1].strip() if at + 1 < len(lines) else ""
            if after and not after.startswith(("Call arguments", "File ", "•")):
                error += " " + after.split(" for '{{")[0]
            break
    error = error[:MAX_ERROR_CHARS]
    # A batch kept dynamic shows as ?, as the model's own shapes do.
    shapes = ", ".join(
        f"{i.name} [{', '.join('?' if d < 0 else str(d) for d in i.shape)}]" for i in inputs
    )
    if node is None and failed is None:
        return (
            f"onnx2tf failed (exit {code}) with inputs fixed to {shapes}; log: {log_path}\n"
            + log_excerpt(log_path)
        )
    what = f"{node['type']} node {node['name']!r}" if node else f"node {failed!r}"
    return (
        f"onnx2tf cannot convert the {what}"
        + (f" ({error})" if error else "")
        + f"; inputs were fixed to {shapes}; log: {log_path}"
    )


def run_onnx2tf(
    toolchain: TfliteToolchain,
    model: Path,
    workdir: Path,
    inputs: Sequence[ConvertInput],
    *,
    quantize: bool,
    calibration_limit: int = 100,
    timeout_s: float = DEFAULT_CONVERT_TIMEOUT_S,
    log: Callable[[str], None] = lambda _line: None,
) -> Onnx2TfResult:
    """Convert `model` with onnx2tf in `workdir` (created; the scratch copy,
    .npy files, log and outputs stay there). Always makes float32 and float16
    models; with `quantize`, also int8 ones calibrated on each input's
    samples (at most `calibration_limit` of them), which needs float inputs.
    Raises ConversionFailed with the end of onnx2tf's log when it fails or
    runs past `timeout_s`."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"{_MODEL_STEM}.onnx"
    # Dynamic dims fixed in the copy (a dynamic batch may stay): onnx2tf
    # needs static shapes past the batch.
    safe_copy(model, source, {s.name: s.shape for s in inputs})
    np.save(workdir / SELF_CHECK_FILE, self_check_images(inputs))
    out_dir = workdir / "out"
    args = [str(toolchain.onnx2tf), "-i", source.name, "-o", out_dir.name]
    static = [s for s in inputs if min(s.shape, default=1) > 0]
    if static:
        args += ["-ois", *(f"{s.name}:{','.join(str(d) for d in s.shape)}" for s in static)]
    if quantize:
        args += ["-oiqt", "-qt", "per-channel"]
        for index, spec in enumerate(inputs):
            file = f"calibration_{index}.npy"
            data = spec.samples[:calibration_limit].astype(np.float32)
            # Calibration data is in the TF layout; inputs are pre-normalized
            # (mean 0, std 1 leaves them as the model receives them).
            np.save(workdir / file, tf_layout(data))
            rank = data.ndim
            args += [
                "-cind",
                _converter_name(spec.name),
                file,
                _broadcast_literal(rank, 0.0),
                _broadcast_literal(rank, 1.0),
            ]
    env = {
        **os.environ,
        "PATH": f"{toolchain.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(toolchain.venv),
        "PYTHONNOUSERSITE": "1",
        "CUDA_VISIBLE_DEVICES": "-1",  # conversion is CPU work; TF's GPU probe only slows it
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **{k: _NO_NETWORK_PROXY for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        **{k.lower(): _NO_NETWORK_PROXY for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        "NO_PROXY": "",
        "no_proxy": "",
    }
    env.pop("PYTHONPATH", None)
    log_path = workdir / "onnx2tf.log"
    log(f"onnx2tf {toolchain.onnx2tf_version} (TensorFlow {toolchain.tensorflow_version})")
    with log_path.open("w") as log_file:
        log_file.write("$ " + " ".join(args) + "\n")
        log_file.flush()
        proc = subprocess.Popen(
            args,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Its own process group, so a timeout also ends onnxsim.
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise ConversionFailed(
                f"onnx2tf ran past {timeout_s:.0f} s and was stopped; log: {log_path}\n"
                + log_excerpt(log_path)
            ) from None
    files = {
        path.name.removeprefix(f"{_MODEL_STEM}_").removesuffix(".tflite"): path
        for path in sorted(out_dir.glob(f"{_MODEL_STEM}_*.tflite"))
    }
    if "float32" not in files:
        raise ConversionFailed(failure_summary(log_path, inputs, code))
    failures = _failure_notes(log_path)
    if code != 0:
        # The float models are written before quantization starts; an error
        # there that onnx2tf does not catch still leaves them usable.
        failures.setdefault("full_integer_quant", log_excerpt(log_path))
    return Onnx2TfResult(files, log_path, failures)
