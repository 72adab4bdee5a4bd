"""Hostile sample data pushed to a real `edgefleet server` (issue 18, findings
3 and 7). A zip bomb (3 MB declaring ~3 GiB) is refused by its headers
without the server growing; object arrays, truncated members, bad CRCs,
absurd shapes, a member lying about its size and files that are neither zip
nor .npy are each INVALID_ARGUMENT saying what is wrong, with nothing stored;
a plain .npy is the samples of a single-input model, and a build uses it."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import psutil
import pytest
from numpy.lib import format as npy_format
from onnx import TensorProto, helper

from edgefleet.demo.models import mlp_graph
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import operator_pb2 as o
from testkit.harness import ControlPlane, env_without_proxy

pytestmark = pytest.mark.timeout(900)

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
CHUNK = 1 << 20
# The bomb: ~3 GiB of float32 zeros behind a header that fits the model.
BOMB_SHAPE = (12_000_000, 64)
# What the server may grow by while refusing it (the finding: 3.2 GB).
MAX_RSS_GROWTH = 50 * 1024 * 1024


# ---------------------------------------------------------------- files


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    npy_format.write_array_header_1_0(out, header)
    return out.getvalue()


def _raw_npy_header(text: bytes) -> bytes:
    """An .npy 1.0 header holding `text` as it is, padded as numpy pads."""
    pad = (64 - (10 + len(text) + 1) % 64) % 64
    body = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


def _npz(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _savez(**arrays: Any) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _save(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _zip_bomb(path: Path, shape: tuple[int, ...]) -> None:
    """An .npz whose one member holds `shape` float32 zeros, deflated at the
    best ratio; written a MiB at a time, never allocating the array."""
    nbytes = int(np.prod(shape)) * 4
    zeros = bytes(CHUNK)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open("input.npy", "w", force_zip64=True) as member,
    ):
        member.write(_npy_header(shape))
        for start in range(0, nbytes, CHUNK):
            member.write(zeros[: min(CHUNK, nbytes - start)])


def _bad_crc() -> bytes:
    data = bytearray(_savez(input=np.ones((8, 64), np.float32)))
    at = data.index(np.ones(16, np.float32).tobytes())
    data[at + 3] ^= 0xFF
    return bytes(data)


def _lying_member() -> bytes:
    """A deflated member holding 4 samples then 64 MiB of zeros, whose zip
    entries claim it holds the 4 samples only (the CRC is the real one)."""
    honest = _npy_header((4, 64)) + np.ones((4, 64), np.float32).tobytes()
    data = bytearray(_npz({"input.npy": honest + bytes(64 * CHUNK)}, zipfile.ZIP_DEFLATED))
    local = 0  # the only member's local header starts the file
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<L", data, local + 22, len(honest))  # uncompressed size
    struct.pack_into("<L", data, central + 24, len(honest))
    return bytes(data)


def _too_many_members() -> bytes:
    array = _save(np.zeros((4, 64), np.float32))
    return _npz({"input.npy": array} | {f"extra{i}.npy": array for i in range(70)})


def _huge_directory() -> bytes:
    """Thousands of empty members: a zip directory zipfile would turn into
    thousands of objects before anything could count them."""
    return _npz({f"e{i}.npy": b"" for i in range(5000)})


# Each: the sample file, and what the error must say.
HOSTILE: dict[str, tuple[bytes, str | tuple[str, ...]]] = {
    "object array": (
        _savez(input=np.array([[1] * 64] * 4, dtype=object)),
        "has dtype '|O' (object); only bool, integer, float and complex",
    ),
    "structured array": (
        _savez(input=np.zeros(4, dtype=[("a", "<f4"), ("b", "<i4")])),
        "only bool, integer, float and complex",
    ),
    "truncated member": (
        _npz({"input.npy": _npy_header((200, 64)) + bytes(100 * 64 * 4)}),
        "array 'input' is truncated: its header declares shape [200, 64] of float32 "
        "(51200 bytes) but it holds 25600 bytes",
    ),
    "truncated file": (
        _savez(input=np.ones((8, 64), np.float32))[:1500],
        "not a valid .npz archive",
    ),
    "bad CRC": (_bad_crc(), "array 'input' is corrupted: Bad CRC-32"),
    # zipfile inflates no more than the size the entry declares, and checks
    # the CRC of what it inflated.
    "member lying about its size": (_lying_member(), "array 'input' is corrupted: Bad CRC-32"),
    "absurd shape": (
        _npz({"input.npy": _npy_header((10**15, 64)) + bytes(64)}),
        (
            "array 'input' declares shape [1000000000000000, 64] of float32 = ",
            "over the limit of 256 MiB per array (MAX_SAMPLE_ARRAY_BYTES)",
        ),
    ),
    "negative shape": (
        _npz({"input.npy": _npy_header((-4, 64))}),
        "impossible shape [-4, 64]",
    ),
    "bzip2 member": (
        _npz({"input.npy": _save(np.zeros((4, 64), np.float32))}, zipfile.ZIP_BZIP2),
        "compression method 12; only stored or deflate",
    ),
    "member that is not an array": (
        _npz({"input.npy": _save(np.zeros((4, 64), np.float32)), "notes.txt": b"hi"}),
        "member 'notes.txt' is not an array",
    ),
    "too many members": (
        _too_many_members(),
        "sample data holds 71 arrays; at most 64 are accepted (MAX_SAMPLE_ARRAYS",
    ),
    "huge zip directory": (
        _huge_directory(),
        ("sample data's zip directory is ", "at most 65536 are accepted (MAX_ZIP_DIRECTORY_BYTES"),
    ),
    "truncated .npy": (
        _save(np.ones((8, 64), np.float32))[:-100],
        "sample data array (.npy) is truncated",
    ),
    # numpy tokenizes the header dict with Python's tokenizer: an unclosed
    # bracket raised TokenError, which was INTERNAL.
    "header numpy cannot tokenize": (
        _npz(
            {
                "input.npy": _raw_npy_header(
                    b"{'descr': '<f4', 'fortran_order': False, 'shape': (16, 4, }"
                )
                + bytes(256)
            }
        ),
        "array 'input' has no valid .npy header",
    ),
    "neither zip nor .npy": (
        b"input,0,1,2\n" * 64,
        "neither the zip nor the .npy signature",
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-input classifier, a two-input model, valid samples, the bomb."""
    out = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    onnx.save(mlp_graph([rng.normal(size=(64, 10))], [rng.normal(size=10)], 17), out / "one.onnx")
    two = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    onnx.save(helper.make_model(two, opset_imports=[helper.make_opsetid("", 17)]), out / "two.onnx")
    np.savez(out / "good.npz", input=rng.random((20, 64), np.float32), labels=np.arange(20) % 10)
    np.save(out / "one-input.npy", rng.random((37, 64), np.float32))
    _zip_bomb(out / "bomb.npz", BOMB_SHAPE)
    return {p.name: p for p in out.iterdir()}


@pytest.fixture
def cp(tmp_path: Path, db_url: str) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp", db_url)
    plane.start()
    try:
        yield plane
    finally:
        plane.close()


# ---------------------------------------------------------------- helpers


def _push(cp: ControlPlane, name: str, version: str, model: Path, samples: bytes) -> Any:
    parts = {o.MODEL_PART_MODEL: model.read_bytes(), o.MODEL_PART_SAMPLE_DATA: samples}
    header = o.PushModelHeader(
        model_name=name,
        version=version,
        parts=[
            o.PartDeclaration(part=p, size_bytes=len(d), sha256=hashlib.sha256(d).hexdigest())
            for p, d in parts.items()
        ],
    )

    def requests() -> Iterator[o.PushModelRequest]:
        yield o.PushModelRequest(header=header)
        for part, data in parts.items():
            for start in range(0, len(data), CHUNK):
                chunk = o.PushModelChunk(part=part, data=data[start : start + CHUNK])
                yield o.PushModelRequest(chunk=chunk)

    return cp.operator().PushModel(requests(), timeout=300)


def _refused(cp: ControlPlane, name: str, version: str, model: Path, samples: bytes) -> str:
    """Push, expect INVALID_ARGUMENT, check nothing of it was stored; the
    error's details."""
    with pytest.raises(grpc.RpcError) as info:
        _push(cp, name, version, model, samples)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as lookup:
        cp.operator().GetModelVersion(o.GetModelVersionRequest(model_name=name, version=version))
    assert lookup.value.code() == grpc.StatusCode.NOT_FOUND
    assert not list((cp.data_dir / "blobs" / "tmp").iterdir())
    return info.value.details() or ""


def _stored_blobs(cp: ControlPlane) -> set[str]:
    return {p.name for p in (cp.data_dir / "blobs" / "sha256").rglob("*") if p.is_file()}


def _peak_rss(pid: int) -> int:
    """The process's high-water resident set (Linux VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _edgefleet(cp: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_without_proxy()
    env.update(EDGEFLEET_SERVER=cp.address, EDGEFLEET_TOKEN=cp.admin_token, COLUMNS="200")
    return subprocess.run(
        [EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


# ---------------------------------------------------------------- tests


def test_a_zip_bomb_is_refused_by_its_header_and_the_server_does_not_grow(
    cp: ControlPlane, files: dict[str, Path]
) -> None:
    bomb = files["bomb.npz"].read_bytes()
    assert len(bomb) < 4 * CHUNK  # a few MB on the wire, ~3 GiB declared
    # Warm the push path (and its error path) before measuring.
    _push(cp, "warm", "1.0.0", files["one.onnx"], files["good.npz"].read_bytes())
    _refused(cp, "warm", "1.0.1", files["one.onnx"], HOSTILE["absurd shape"][0])
    blobs = _stored_blobs(cp)
    server = psutil.Process(cp.proc.pid if cp.proc else 0)
    rss_before, peak_before = server.memory_info().rss, _peak_rss(server.pid)

    details = _refused(cp, "bomb", "1.0.0", files["one.onnx"], bomb)

    rss_after, peak_after = server.memory_info().rss, _peak_rss(server.pid)
    assert "declares 2.9 GiB uncompressed" in details, details
    assert "over the limit of 256 MiB per array (MAX_SAMPLE_ARRAY_BYTES)" in details
    print(f"zip bomb: RSS {rss_before >> 20} -> {rss_after >> 20} MiB, "
          f"peak {peak_before >> 20} -> {peak_after >> 20} MiB")  # fmt: skip
    assert rss_after - rss_before < MAX_RSS_GROWTH
    assert peak_after - peak_before < MAX_RSS_GROWTH
    assert _stored_blobs(cp) == blobs
    # The server is fine: a valid push goes through.
    _push(cp, "warm", "1.1.0", files["one.onnx"], files["good.npz"].read_bytes())


def test_malformed_sample_files_are_invalid_argument_and_store_nothing(
    cp: ControlPlane, files: dict[str, Path]
) -> None:
    _push(cp, "digits", "1.0.0", files["one.onnx"], files["good.npz"].read_bytes())
    blobs = _stored_blobs(cp)
    server = psutil.Process(cp.proc.pid if cp.proc else 0)
    peak_before = _peak_rss(server.pid)
    for i, (case, (samples, says)) in enumerate(HOSTILE.items()):
        details = _refused(cp, "digits", f"2.0.{i}", files["one.onnx"], samples)
        assert details.startswith("sample data"), f"{case}: {details}"
        for message in (says,) if isinstance(says, str) else says:
            assert message in details, f"{case}: {details}"
        assert _stored_blobs(cp) == blobs, case
    # The lying member's 64 MiB of zeros were never inflated.
    assert _peak_rss(server.pid) - peak_before < MAX_RSS_GROWTH
    listed = cp.operator().ListModels(o.ListModelsRequest())
    assert [(m.name, m.version_count) for m in listed.models] == [("digits", 1)]
    # A valid push still works after all of them, from the same client.
    pushed = _push(cp, "digits", "3.0.0", files["one.onnx"], files["good.npz"].read_bytes())
    assert pushed.sample_data.num_samples == 20 and pushed.sample_data.has_labels


def test_a_plain_npy_is_the_samples_of_a_single_input_model_and_the_build_uses_it(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--build-workers", "1")
    cp.start()
    try:
        op = cp.operator()
        op.CreateDeviceClass(
            o.CreateDeviceClassRequest(
                name="gateway",
                constraints=c.ConstraintProfile(runtime=c.RUNTIME_ONNXRUNTIME),
                match_rules=[c.MatchRule(field="arch", op=c.MATCH_OP_EQ, values=["x86_64"])],
            )
        )
        # A plain .npy for a model with two inputs: which input would it be?
        two_samples = _save(np.ones((5, 8), np.float32))
        details = _refused(cp, "two", "1.0.0", files["two.onnx"], two_samples)
        assert "is a plain .npy (one array) but the model has 2 inputs ['a', 'b']" in details
        # Through the CLI, as its help says: the .npy is the only input's samples.
        pushed = _edgefleet(
            cp, "models", "push", "mlp", "1.0.0", str(files["one.onnx"]),
            "--sample-data", str(files["one-input.npy"]), "--json",
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        version = json.loads(pushed.stdout)
        assert version["sample_data"]["num_samples"] == 37
        assert not version["sample_data"].get("has_labels")
        deadline = time.monotonic() + 600
        builds: list[o.Build] = []
        while time.monotonic() < deadline:
            builds = list(op.ListBuilds(o.ListBuildsRequest()).builds)
            done = (o.BUILD_STATE_SUCCEEDED, o.BUILD_STATE_FAILED)
            if builds and all(b.state in done for b in builds):
                break
            time.sleep(0.5)
        (build,) = builds
        assert build.state == o.BUILD_STATE_SUCCEEDED, (build.error, build.log)
        assert "37 pushed samples" in build.log, build.log
    finally:
        cp.close()
