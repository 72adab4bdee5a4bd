"""The device agent's pure parts: config, persisted state, hardware parsing,
backoff and the status-code transition table. The runtime fingerprint,
detected in a child process: tests/e2e/test_agent_imports.py."""

from __future__ import annotations

import json
import os
import random
import stat
from importlib import resources
from pathlib import Path

import grpc
import pytest

from edgefleet.agent import identity as store
from edgefleet.agent.config import (
    AcceleratorOverride,
    AgentConfig,
    HardwareOverrides,
    env_var,
    load_config,
)
from edgefleet.agent.daemon import describe_desired
from edgefleet.agent.errors import ConfigError, StateError
from edgefleet.agent.hardware import (
    HostPaths,
    apply_overrides,
    detect_hardware,
    jetson_accelerator,
    normalise_arch,
    parse_cpuinfo_model,
    parse_device_tree_model,
    parse_l4t_release,
    parse_nvidia_smi,
    parse_os_release,
)
from edgefleet.agent.identity import Identity
from edgefleet.agent.reconnect import Backoff, Decision, Delay, Step, decide
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2, device_pb2

# ---------------------------------------------------------------- config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


FULL_CONFIG = """
server = "cp.example:7443"
enrollment_token = "efe_abc.secret"
state_dir = "state"
name = "cam-1"
hardware_id = "serial-42"
heartbeat_interval_s = 5
backoff_initial_s = 0.25
backoff_max_s = 10

[labels]
site = "lab"
tier = "canary"

[hardware]
arch = "arm64"
memory_mb = 4096
cpu_cores = 4
board_model = "Raspberry Pi 4 Model B Rev 1.4"
os = "linux"

[[hardware.accelerators]]
kind = "npu"
name = "Hailo-8"
memory_mb = 0
"""


def test_defaults_without_file_or_environment() -> None:
    assert load_config(None, {}) == AgentConfig()
    assert AgentConfig().server == "127.0.0.1:7443"
    assert AgentConfig().state_dir == Path("/var/lib/edgefleet-agent")
    assert (AgentConfig().backoff_initial_s, AgentConfig().backoff_max_s) == (0.5, 30.0)


def test_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "agent.toml", FULL_CONFIG), {})
    assert config.server == "cp.example:7443"
    assert config.enrollment_token == "efe_abc.secret"
    # Relative to the config file, not the working directory.
    assert config.state_dir == tmp_path / "state"
    assert config.name == "cam-1"
    assert config.hardware_id == "serial-42"
    assert config.labels == {"site": "lab", "tier": "canary"}
    assert (config.heartbeat_interval_s, config.backoff_initial_s, config.backoff_max_s) == (
        5.0,
        0.25,
        10.0,
    )
    assert config.hardware == HardwareOverrides(
        os="linux",
        arch="arm64",
        cpu_cores=4,
        memory_mb=4096,
        board_model="Raspberry Pi 4 Model B Rev 1.4",
        accelerators=(AcceleratorOverride(kind="npu", name="Hailo-8"),),
    )


def test_environment_overrides_file(tmp_path: Path) -> None:
    environ = {
        env_var("server"): "10.0.0.5:9000",
        env_var("enrollment_token"): "efe_env.token",
        env_var("state_dir"): str(tmp_path / "elsewhere"),
        env_var("labels"): "site=field, tier=beta,,",
        env_var("hardware_id"): "hw-env",
        env_var("name"): "from-env",
        env_var("backoff_max_s"): "60",
        env_var("heartbeat_interval_s"): "2.5",
        "EDGEFLEET_AGENT_UNRELATED": "ignored",
    }
    config = load_config(write(tmp_path / "agent.toml", FULL_CONFIG), environ)
    assert config.server == "10.0.0.5:9000"
    assert config.enrollment_token == "efe_env.token"
    assert config.state_dir == tmp_path / "elsewhere"
    assert config.labels == {"site": "field", "tier": "beta"}
    assert config.hardware_id == "hw-env"
    assert config.name == "from-env"
    assert config.backoff_max_s == 60.0
    assert config.heartbeat_interval_s == 2.5
    # Untouched keys keep the file's values.
    assert config.backoff_initial_s == 0.25


def test_empty_environment_value_clears_optional_key(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path / "agent.toml", FULL_CONFIG), {env_var("enrollment_token"): ""}
    )
    assert config.enrollment_token is None


def test_example_config_loads() -> None:
    # From the installed package: the example ships with it (agent/packaging).
    example = Path(str(resources.files("edgefleet.agent") / "packaging" / "agent.example.toml"))
    config = load_config(example, {})
    assert config.server == "127.0.0.1:7443"
    assert config.labels == {"site": "lab"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('serverr = "x:1"', "unknown key 'serverr'"),
        ('server = "no-port"', "key server: expected host:port"),
        ("server = 7443", "key server: expected a string"),
        ("heartbeat_interval_s = 0", "key heartbeat_interval_s: expected a positive number"),
        ("backoff_max_s = true", "key backoff_max_s: expected a positive number"),
        ('backoff_initial_s = "fast"', "key backoff_initial_s: expected a positive number"),
        ("backoff_initial_s = 5\nbackoff_max_s = 1", "backoff_max_s (1) must not be less"),
        ('labels = "site=lab"', "key labels: expected a table"),
        ("[labels]\ntier = 3", "key labels.tier: expected a string"),
        ("[hardware]\nram = 1", "unknown key 'ram'"),
        ("[hardware]\ncpu_cores = -1", "key hardware.cpu_cores: expected a positive integer"),
        ("[[hardware.accelerators]]\nname = 'x'", "hardware.accelerators[0]: missing key 'kind'"),
        ("[hardware]\naccelerators = 'gpu'", "key hardware.accelerators: expected a list"),
        ("server = ", "not valid TOML"),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, {})
    assert str(path) in excinfo.value.message
    assert expected in excinfo.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml", {})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("backoff_max_s", "soon", "expected a positive number"),
        ("heartbeat_interval_s", "-1", "expected a positive number"),
        ("labels", "site", "comma-separated key=value"),
        ("server", "", "expected a non-empty string"),
    ],
)
def test_bad_environment_names_variable(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {env_var(key): value})
    assert f"environment variable EDGEFLEET_AGENT_{key.upper()}" in excinfo.value.message
    assert expected in excinfo.value.message


# ---------------------------------------------------------------- persisted state


IDENTITY = Identity(
    device_id="dev-1", device_credential="efd_x.secret", server="127.0.0.1:7443", hardware_id="hw"
)


def test_identity_round_trip_is_private_and_atomic(tmp_path: Path) -> None:
    assert store.load_identity(tmp_path) is None
    store.save_identity(tmp_path, IDENTITY)
    path = tmp_path / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load_identity(tmp_path) == IDENTITY
    assert json.loads(path.read_text())["device_id"] == "dev-1"
    # Overwriting keeps the mode and leaves no temp file behind.
    store.save_identity(tmp_path, Identity(**{**IDENTITY.__dict__, "device_credential": "new"}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load_identity(tmp_path).device_credential == "new"  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.json"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "identity.json"
    atomic_write(target, b"old")

    def fail_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["identity.json"]


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        '{"device_id": "x"}',
        '{"device_id": "", "device_credential": "c", "server": "s", "hardware_id": "h"}',
    ],
)
def test_damaged_identity_is_a_state_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "identity.json").write_text(content)
    with pytest.raises(StateError, match=r"identity\.json"):
        store.load_identity(tmp_path)


def test_desired_state_round_trip(tmp_path: Path) -> None:
    desired = device_pb2.DesiredState(
        revision=7,
        device_state=common_pb2.DEVICE_STATE_ACCEPTED,
        class_name="pi4",
        labels={"site": "lab"},
        config=device_pb2.AgentConfig(heartbeat_interval_s=2, telemetry_interval_s=30),
    )
    store.save_desired(tmp_path, desired)
    path = tmp_path / "desired.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = json.loads(path.read_text())
    assert document["revision"] == 7
    assert document["device_state"] == "DEVICE_STATE_ACCEPTED"
    assert document["class_name"] == "pi4"
    assert document["labels"] == {"site": "lab"}
    assert document["config"] == {"heartbeat_interval_s": 2, "telemetry_interval_s": 30}
    assert store.load_desired(tmp_path) == desired
    store.forget_desired(tmp_path)
    assert store.load_desired(tmp_path) is None
    store.forget_desired(tmp_path)  # idempotent


def test_hardware_id_configured_wins(tmp_path: Path) -> None:
    assert store.resolve_hardware_id("serial-1", tmp_path, ()) == "serial-1"


def test_hardware_id_from_machine_id_is_stable_and_hashed(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    first = store.resolve_hardware_id(None, tmp_path, (tmp_path / "missing", machine_id))
    assert first == store.resolve_hardware_id(None, tmp_path, (machine_id,))
    assert first.startswith("mid-")
    assert "0123456789abcdef" not in first
    assert not (tmp_path / "hardware-id").exists()


def test_hardware_id_generated_once_without_machine_id(tmp_path: Path) -> None:
    uninitialized = tmp_path / "machine-id"
    uninitialized.write_text("uninitialized\n")
    state = tmp_path / "state"
    state.mkdir()
    first = store.resolve_hardware_id(None, state, (uninitialized, tmp_path / "missing"))
    assert first.startswith("gen-")
    assert store.resolve_hardware_id(None, state, ()) == first
    assert (state / "hardware-id").read_text().strip() == first


# ---------------------------------------------------------------- hardware

CPUINFO_X86 = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
flags\t\t: fpu vme

processor\t: 1
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
"""

CPUINFO_PI4 = """\
processor\t: 0
BogoMIPS\t: 108.00
CPU implementer\t: 0x41
CPU part\t: 0xd08

Hardware\t: BCM2835
Revision\t: c03114
Serial\t\t: 10000000abcdef01
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""

CPUINFO_PI5 = """\
processor\t: 0
BogoMIPS\t: 108.00
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CPUINFO_X86, "Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz"),
        (CPUINFO_PI4, "BCM2835"),
        (CPUINFO_PI5, "Raspberry Pi 5 Model B Rev 1.0"),
        ("processor\t: 0\nmodel name\t:\n", ""),
        ("", ""),
    ],
)
def test_cpu_model(text: str, expected: str) -> None:
    assert parse_cpuinfo_model(text) == expected


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("amd64", "x86_64"),
        ("arm64", "aarch64"),
        ("aarch64", "aarch64"),
        ("armv7l", "armv7l"),
        ("riscv64", "riscv64"),
    ],
)
def test_normalise_arch(machine: str, expected: str) -> None:
    assert normalise_arch(machine) == expected


def test_device_tree_model_strips_nul() -> None:
    assert parse_device_tree_model(b"Raspberry Pi 4 Model B Rev 1.4\x00") == (
        "Raspberry Pi 4 Model B Rev 1.4"
    )
    assert parse_device_tree_model(b"") == ""


def test_os_release() -> None:
    text = (
        '# comment\nNAME="Ubuntu"\nVERSION_ID="22.04"\n'
        'PRETTY_NAME="Ubuntu 22.04.4 LTS"\nID=ubuntu\n'
    )
    assert parse_os_release(text) == {
        "NAME": "Ubuntu",
        "VERSION_ID": "22.04",
        "PRETTY_NAME": "Ubuntu 22.04.4 LTS",
        "ID": "ubuntu",
    }


def test_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559, 550.54.15, 9.0\nTesla T4, [N/A], 535.104.05, [N/A]\n\n"
    first, second = parse_nvidia_smi(text)
    assert first == common_pb2.Accelerator(
        kind="nvidia-gpu",
        name="NVIDIA H100 80GB HBM3",
        memory_mb=81559,
        driver_version="550.54.15",
        compute_capability="9.0",
    )
    assert (second.name, second.memory_mb, second.compute_capability) == ("Tesla T4", 0, "")


def test_jetson_from_tegra_release_and_device_tree() -> None:
    release = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64"
    assert parse_l4t_release(release) == "R35.4.1"
    jetson = jetson_accelerator("NVIDIA Jetson Orin Nano Developer Kit", release, 7620)
    assert jetson == common_pb2.Accelerator(
        kind="jetson",
        name="NVIDIA Jetson Orin Nano Developer Kit",
        memory_mb=7620,
        driver_version="R35.4.1",
        compute_capability="8.7",
    )
    # The device tree alone is enough; without either it is not a Jetson.
    jetson = jetson_accelerator("NVIDIA Jetson Xavier NX", None, 8000)
    assert jetson is not None
    assert jetson.compute_capability == "7.2"
    assert jetson_accelerator("Raspberry Pi 4 Model B", None, 4000) is None


def test_detect_hardware_from_fixture_files(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(CPUINFO_PI4)
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    (tmp_path / "model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    paths = HostPaths(
        cpuinfo=tmp_path / "cpuinfo",
        os_release=tmp_path / "os-release",
        device_tree_model=tmp_path / "model",
        nv_tegra_release=tmp_path / "absent",
    )
    calls: list[tuple[str, ...]] = []

    def fake_smi(argv: object) -> str | None:
        calls.append(tuple(argv))  # type: ignore[arg-type]
        return "NVIDIA RTX A2000, 6138, 535.1, 8.6\n"

    profile = detect_hardware(tmp_path, None, paths, fake_smi)
    assert profile.cpu_model == "BCM2835"
    assert profile.os == "linux"
    assert profile.os_release == "Debian GNU/Linux 12 (bookworm)"
    assert profile.board_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert profile.memory_mb > 0 and profile.cpu_cores > 0
    assert profile.disk_total_mb >= profile.disk_free_mb > 0
    assert profile.hostname
    assert [a.name for a in profile.accelerators] == ["NVIDIA RTX A2000"]
    assert calls[0][0] == "nvidia-smi"
    assert "--format=csv,noheader,nounits" in calls[0]


def test_detect_hardware_on_jetson_skips_nvidia_smi(tmp_path: Path) -> None:
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson AGX Orin\x00")
    (tmp_path / "tegra").write_text("# R36 (release), REVISION: 3.0, GCID: 1\n")
    paths = HostPaths(
        cpuinfo=tmp_path / "absent",
        os_release=tmp_path / "absent",
        device_tree_model=tmp_path / "model",
        nv_tegra_release=tmp_path / "tegra",
    )

    def no_smi(argv: object) -> str | None:
        raise AssertionError("nvidia-smi must not run on a Jetson")

    profile = detect_hardware(tmp_path, None, paths, no_smi)
    assert [(a.kind, a.driver_version) for a in profile.accelerators] == [("jetson", "R36.3.0")]


def test_overrides_replace_detected_facts() -> None:
    detected = common_pb2.HardwareProfile(
        os="linux",
        arch="x86_64",
        cpu_cores=16,
        memory_mb=64000,
        hostname="build-box",
        accelerators=[common_pb2.Accelerator(kind="nvidia-gpu", name="H100")],
    )
    overrides = HardwareOverrides(
        arch="arm64",
        cpu_cores=4,
        memory_mb=4096,
        board_model="NVIDIA Jetson Orin Nano",
        accelerators=(AcceleratorOverride(kind="jetson", name="Orin Nano", memory_mb=8192),),
    )
    profile = apply_overrides(detected, overrides)
    assert (profile.arch, profile.cpu_cores, profile.memory_mb) == ("aarch64", 4, 4096)
    assert profile.board_model == "NVIDIA Jetson Orin Nano"
    assert profile.hostname == "build-box"  # not overridden
    assert [(a.kind, a.name, a.memory_mb) for a in profile.accelerators] == [
        ("jetson", "Orin Nano", 8192)
    ]
    # An empty list reports no accelerators; the input is left alone.
    assert list(apply_overrides(detected, HardwareOverrides(accelerators=())).accelerators) == []
    assert len(detected.accelerators) == 1


# ---------------------------------------------------------------- backoff


def test_backoff_doubles_to_the_maximum_and_resets() -> None:
    backoff = Backoff(0.5, 30.0, rng=lambda: 0.999999)
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    backoff.reset()
    assert backoff.ceiling() == 0.5
    assert backoff.at_max() == pytest.approx(30.0)
    # After a failure at max, ordinary backoff continues from the top.
    assert backoff.ceiling() == 30.0


def test_backoff_full_jitter_stays_within_bounds() -> None:
    rng = random.Random(1234)
    backoff = Backoff(0.5, 30.0, rng=rng.random)
    delays = []
    for _ in range(2000):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay < ceiling <= 30.0
        delays.append(delay)
    # Full jitter spreads delays over [0, max): not all near the ceiling.
    capped = delays[100:]
    assert min(capped) < 3.0 and max(capped) > 27.0


def test_backoff_at_max_is_jittered_near_the_maximum() -> None:
    rng = random.Random(99)
    backoff = Backoff(0.5, 30.0, rng=rng.random)
    delays = [backoff.at_max() for _ in range(500)]
    assert all(15.0 <= d <= 30.0 for d in delays)
    assert max(delays) - min(delays) > 10.0


def test_backoff_survives_a_very_long_outage() -> None:
    backoff = Backoff(0.5, 30.0, rng=lambda: 0.5)
    for _ in range(5000):
        backoff.next_delay()
    assert backoff.next_delay() == 15.0


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


# ---------------------------------------------------------------- decisions

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("step", "code", "can_enroll", "next_step", "delay"),
    [
        # Control plane restarting or unreachable: retry the same step.
        (Step.SYNC, S.UNAVAILABLE, True, Step.SYNC, Delay.BACKOFF),
        (Step.SYNC, S.UNAVAILABLE, False, Step.SYNC, Delay.BACKOFF),
        (Step.SYNC, None, True, Step.SYNC, Delay.BACKOFF),
        (Step.SYNC, S.INTERNAL, True, Step.SYNC, Delay.BACKOFF),
        (Step.SYNC, S.DEADLINE_EXCEEDED, True, Step.SYNC, Delay.BACKOFF),
        (Step.ENROLL, S.UNAVAILABLE, True, Step.ENROLL, Delay.BACKOFF),
        # Credential no longer valid: re-enroll when a token allows it.
        (Step.SYNC, S.UNAUTHENTICATED, True, Step.ENROLL, Delay.BACKOFF),
        (Step.SYNC, S.UNAUTHENTICATED, False, Step.SYNC, Delay.MAX),
        (Step.SYNC, S.NOT_FOUND, True, Step.ENROLL, Delay.BACKOFF),
        # Rejected or decommissioned: keep trying, slowly.
        (Step.SYNC, S.PERMISSION_DENIED, True, Step.SYNC, Delay.MAX),
        (Step.ENROLL, S.PERMISSION_DENIED, True, Step.ENROLL, Delay.MAX),
        # A bad or expired token, or a request the server cannot accept.
        (Step.ENROLL, S.UNAUTHENTICATED, True, Step.ENROLL, Delay.MAX),
        (Step.ENROLL, S.INVALID_ARGUMENT, True, Step.ENROLL, Delay.MAX),
        (Step.SYNC, S.FAILED_PRECONDITION, True, Step.SYNC, Delay.MAX),
        (Step.SYNC, S.UNIMPLEMENTED, True, Step.SYNC, Delay.MAX),
    ],
)
def test_decide(
    step: Step,
    code: grpc.StatusCode | None,
    can_enroll: bool,
    next_step: Step,
    delay: Delay,
) -> None:
    decision = decide(step, code, can_enroll=can_enroll)
    assert isinstance(decision, Decision)
    assert (decision.next_step, decision.delay) == (next_step, delay)
    assert decision.reason


def test_describe_desired() -> None:
    desired = device_pb2.DesiredState(
        revision=4,
        device_state=common_pb2.DEVICE_STATE_PENDING,
        labels={"tier": "canary", "site": "lab"},
    )
    assert describe_desired(desired) == (
        "desired state revision 4: state=pending class=- labels=site=lab,tier=canary"
    )


def test_trusted_keys_round_trip_and_refuse_mismatched_ids(tmp_path: Path) -> None:
    import hashlib

    from edgefleet.agent.errors import StateError
    from edgefleet.agent.identity import load_trusted_keys, save_trusted_keys

    assert load_trusted_keys(tmp_path) == {}
    public = bytes(range(32))
    key_id = hashlib.sha256(public).hexdigest()[:16]
    save_trusted_keys(tmp_path, {key_id: public})
    assert load_trusted_keys(tmp_path) == {key_id: public}
    with pytest.raises(StateError, match="does not match"):
        save_trusted_keys(tmp_path, {"0123456789abcdef": public})
    assert load_trusted_keys(tmp_path) == {key_id: public}  # unchanged


def test_tls_mismatches_get_a_config_hint() -> None:
    from edgefleet.agent.transport import transport_hint

    assert "set ca_cert to the ca.pem" in transport_hint(
        "UNAVAILABLE: Ssl handshake failed: CERTIFICATE_VERIFY_FAILED", tls=True
    )
    assert "insecure = true" in transport_hint(
        "UNAVAILABLE: Ssl handshake failed: WRONG_VERSION_NUMBER", tls=True
    )
    assert "may serve TLS" in transport_hint("UNAVAILABLE: Socket closed", tls=False)
    assert transport_hint("UNAVAILABLE: Socket closed", tls=True) == ""
    assert transport_hint("UNAVAILABLE: failed to connect: Connection refused", tls=True) == ""


def test_a_ca_cert_that_is_no_certificate_is_a_config_error(tmp_path: Path) -> None:
    """Handed to gRPC, it would fail every handshake, read as an unreachable
    control plane and be retried forever (found by the stranger's try)."""
    from edgefleet.agent.transport import Transport

    not_pem = tmp_path / "agent.toml"
    not_pem.write_text('server = "127.0.0.1:7443"\n')
    with pytest.raises(ConfigError, match="not a PEM certificate; ca_cert must be"):
        Transport("127.0.0.1:7443", not_pem, tmp_path / "state", [])
    with pytest.raises(ConfigError, match="cannot read the control plane's CA certificate"):
        Transport("127.0.0.1:7443", tmp_path / "missing.pem", tmp_path / "state", [])


def test_two_agents_cannot_hold_one_state_directory(tmp_path: Path) -> None:
    held = store.lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateError, match=f"another edgefleet-agent \\(pid {os.getpid()}\\)"):
            store.lock_state_dir(tmp_path)
    finally:
        os.close(held)
    os.close(store.lock_state_dir(tmp_path))  # free again once the holder let go
