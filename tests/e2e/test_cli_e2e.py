"""The `edgefleet` console script, as an operator runs it, against a real
`edgefleet server` subprocess: tokens, classes, models, devices, and server
errors printed as one line with no traceback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgefleet.demo.models import mlp_graph
from edgefleet.v1 import common_pb2, device_pb2
from testkit.cli import EDGEFLEET, edgefleet, edgefleet_json
from testkit.harness import ControlPlane


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One server for the module: each test uses its own names."""
    plane = ControlPlane(tmp_path_factory.mktemp("cp"))
    plane.start()
    try:
        yield plane
    finally:
        plane.close()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 64-feature MatMul+Add+Softmax classifier, sample inputs and labels."""
    out = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    graph = mlp_graph([rng.normal(size=(64, 10))], [rng.normal(size=10)], opset=17)
    onnx.save(graph, out / "model.onnx")
    np.savez(
        out / "samples.npz",
        input=rng.random((20, 64), dtype=np.float32),
        labels=rng.integers(0, 10, 20),
    )
    (out / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(10)))
    return {
        "model": out / "model.onnx",
        "samples": out / "samples.npz",
        "labels": out / "labels.txt",
    }


def test_tokens_create_ls_revoke(cp: ControlPlane) -> None:
    human = edgefleet(cp, "tokens", "create", "--name", "human", "--ttl", "30m")
    assert "shown once" in human.stdout

    created = edgefleet_json(
        cp, "tokens", "create", "--name", "lab", "--policy", "pending",
        "--label", "site=lab", "--max-uses", "3", "--ttl", "7d",
    )  # fmt: skip
    token = created["token"]
    assert created["secret"]
    assert token["policy"] == "ENROLLMENT_POLICY_PENDING"
    assert token["labels"] == {"site": "lab"}
    assert token["max_uses"] == 3

    listed = edgefleet_json(cp, "tokens", "ls")
    assert {"human", "lab"} <= {t["name"] for t in listed}
    assert "lab" in edgefleet(cp, "tokens", "ls").stdout

    revoked = edgefleet(cp, "tokens", "revoke", token["id"][:8])
    assert f"revoked token lab ({token['id']})" in revoked.stdout
    assert token["id"] not in {t["id"] for t in edgefleet_json(cp, "tokens", "ls")}
    everything = {t["id"]: t for t in edgefleet_json(cp, "tokens", "ls", "--all")}
    assert everything[token["id"]]["revoked_at"]


def test_classes_create_show_update_delete(cp: ControlPlane) -> None:
    edgefleet(
        cp, "classes", "create", "pi4", "--runtime", "onnxruntime", "--max-size-mb", "20",
        "--latency-budget-ms", "15", "--priority", "10", "--description", "Raspberry Pi 4",
        "--match", "arch == aarch64", "--match", "memory_mb < 4096",
    )  # fmt: skip
    shown = edgefleet_json(cp, "classes", "show", "pi4")
    assert shown["constraints"]["runtime"] == "RUNTIME_ONNXRUNTIME"
    assert shown["constraints"]["quantization"] == "QUANTIZATION_AUTO"
    assert shown["constraints"]["max_model_size_mb"] == 20
    assert [(r["field"], r["op"]) for r in shown["match_rules"]] == [
        ("arch", "MATCH_OP_EQ"),
        ("memory_mb", "MATCH_OP_LT"),
    ]
    assert shown["device_count"] == 0
    human = edgefleet(cp, "classes", "show", "pi4").stdout
    assert "arch == aarch64" in human and "memory_mb < 4096" in human

    updated = edgefleet_json(
        cp, "classes", "update", "pi4", "--priority", "3", "--quantization", "int8", "--clear-rules"
    )
    assert updated["priority"] == 3
    assert updated["constraints"]["quantization"] == "QUANTIZATION_INT8"
    assert updated["constraints"]["max_model_size_mb"] == 20  # untouched
    assert updated["match_rules"] == []
    assert "pi4" in {c["name"] for c in edgefleet_json(cp, "classes", "ls")}

    assert "deleted class pi4" in edgefleet(cp, "classes", "delete", "pi4").stdout
    gone = edgefleet(cp, "classes", "show", "pi4", check=False)
    assert gone.returncode == 1
    assert gone.stderr.startswith("error: NOT_FOUND: ")


def test_models_push_ls_show(cp: ControlPlane, model_files: dict[str, Path]) -> None:
    pushed = edgefleet(
        cp, "models", "push", "digits", "1.0.0", str(model_files["model"]),
        "--sample-data", str(model_files["samples"]), "--labels", str(model_files["labels"]),
        "--description", "random weights",
    )  # fmt: skip
    assert "probabilities" in pushed.stdout and "[batch, 64]" in pushed.stdout

    (model,) = [m for m in edgefleet_json(cp, "models", "ls") if m["name"] == "digits"]
    assert model["latest_version"] == "1.0.0"
    assert model["version_count"] == 1

    version = edgefleet_json(cp, "models", "show", "digits", "1.0.0")
    assert version["inputs"][0]["name"] == "input"
    assert version["inputs"][0]["shape"] == ["-1", "64"]
    assert version["sample_data"]["num_samples"] == 20
    assert version["labels"]["count"] == 10
    assert version["size_bytes"] == str(model_files["model"].stat().st_size)
    assert [v["version"] for v in edgefleet_json(cp, "models", "show", "digits")["versions"]] == [
        "1.0.0"
    ]

    again = edgefleet(
        cp, "models", "push", "digits", "1.0.0", str(model_files["model"]), check=False
    )
    assert again.returncode == 1
    # stderr: the progress bar's last state, then the one-line error.
    assert again.stderr.splitlines()[-1].startswith("error: ALREADY_EXISTS: ")


def test_devices_enrolled_then_managed(cp: ControlPlane) -> None:
    secret = edgefleet_json(cp, "tokens", "create", "--name", "dev", "--policy", "pending")[
        "secret"
    ]
    enrolled = cp.device_stub().Enroll(
        device_pb2.EnrollRequest(
            enrollment_token=secret,
            hardware_id="hw-cli-e2e",
            name="pi-kitchen",
            hardware=common_pb2.HardwareProfile(arch="aarch64", memory_mb=3906, os="linux"),
        )
    )
    device_id = enrolled.device_id

    devices = {d["id"]: d for d in edgefleet_json(cp, "devices", "ls")}
    assert devices[device_id]["state"] == "DEVICE_STATE_PENDING"
    assert devices[device_id]["hardware"]["arch"] == "aarch64"
    pending = edgefleet_json(cp, "devices", "ls", "--state", "pending")
    assert device_id in {d["id"] for d in pending}
    table = edgefleet(cp, "devices", "ls").stdout
    assert device_id[:8] in table and "pi-kitchen" in table

    accepted = edgefleet(cp, "devices", "accept", device_id[:8])
    assert f"accepted device pi-kitchen ({device_id})" in accepted.stdout
    edgefleet(cp, "devices", "label", device_id, "tier=canary", "room=kitchen")
    labelled = edgefleet_json(cp, "devices", "label", device_id, "--remove", "room")
    assert labelled["labels"] == {"tier": "canary"}
    assert labelled["state"] == "DEVICE_STATE_ACCEPTED"
    by_label = edgefleet_json(cp, "devices", "ls", "--label", "tier=canary")
    assert [d["id"] for d in by_label] == [device_id]

    edgefleet(cp, "classes", "create", "pinned-only", "--runtime", "tflite")
    pinned = edgefleet_json(cp, "devices", "pin", device_id, "pinned-only")
    assert (pinned["class_name"], pinned["class_pinned"]) == ("pinned-only", True)
    assert "pinned-only (pinned)" in edgefleet(cp, "devices", "show", device_id).stdout
    unpinned = edgefleet_json(cp, "devices", "unpin", device_id)
    assert (unpinned["class_name"], unpinned["class_pinned"]) == ("", False)


def test_errors_are_one_line(cp: ControlPlane) -> None:
    no_token = edgefleet(cp, "models", "ls", token="not-a-token", check=False)
    assert no_token.returncode == 1
    assert no_token.stderr.startswith("error: UNAUTHENTICATED")
    assert len(no_token.stderr.strip().splitlines()) == 1

    missing = edgefleet(cp, "devices", "show", "0" * 32, check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: NOT_FOUND: ")


def test_db_upgrade(tmp_path: Path) -> None:
    result = subprocess.run(
        [EDGEFLEET, "db", "upgrade", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("database at revision ")
    assert (tmp_path / "d" / "edgefleet.db").exists()
