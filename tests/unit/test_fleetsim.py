"""fleetsim without a control plane: profiles (overrides, errors, counted
classes), samples that pass the control plane's own validation, a shadow
stage and an update aborted by a newer assignment on one simulated agent,
and the CLI's profile check. Fleets against a control plane:
tests/integration/test_fleetsim.py and tests/e2e/test_fleetsim.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.controlplane.api.convert import sample_from_pb
from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.services.telemetry import validate_batch
from edgefleet.sim import (
    Behaviour,
    ProfileError,
    SimAgent,
    default_profile,
    make_sample,
    parse_profile,
)
from edgefleet.sim.agent import FleetContext
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d


def test_profile_overrides_apply_class_then_fleet_versions_then_class_versions() -> None:
    profile = parse_profile(
        {
            "versions": {"2.0.0": {"latency_factor": 2.0, "error_rate": 0.1}},
            "classes": [
                {
                    "name": "a",
                    "count": 2,
                    "latency_p95_ms": 10,
                    "versions": {"2.0.0": {"error_rate": 0.5, "fail_rate": 1.0}},
                },
                {"name": "b", "weight": 1, "hardware": {"arch": "x86_64"}},
            ],
        }
    )
    assert profile.behaviour("a", "1.0.0").p95_ms == 10
    two = profile.behaviour("a", "2.0.0")
    assert (two.p95_ms, two.p50_ms, two.error_rate, two.fail_rate) == (20, 10, 0.5, 1.0)
    assert two.reason.startswith("golden outputs")  # the default for "validating"
    assert profile.behaviour("b", "2.0.0").error_rate == 0.1
    b = profile.class_named("b")
    assert (b.hardware.arch, b.hardware.os, b.runtime.agent_version) == (
        "x86_64", "Linux", "0.1.0+fleetsim",
    )  # fmt: skip
    # Counts first, the rest by weight; classes interleave.
    assert [cls.name for cls in profile.allocate(5)] == ["b", "a", "b", "a", "b"]
    assert [cls.name for cls in profile.allocate(1)] == ["a"]
    # With weights only, a device keeps its class whatever the fleet's size.
    default = default_profile()
    small, large = default.allocate(12), default.allocate(600)
    assert [x.name for x in small] == [x.name for x in large[:12]]
    assert Counter(x.name for x in large) == {"pi": 300, "gateway": 200, "jetson": 100}
    # It round-trips through its JSON form.
    assert parse_profile(default.to_dict()).to_dict() == default.to_dict()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": [{"name": "a", "latency_p95": 3}]}, "unknown key(s) latency_p95"),
        ({"classes": [{"name": "a", "fail_state": "exploding"}]}, "fail_state: one of"),
        ({"classes": [{"name": "a", "error_rate": 2}]}, "between 0 and 1"),
        ({"classes": [{"name": "a", "install_s": [5, 1]}]}, "low <= high"),
        ({"classes": [{"name": "a", "hardware": {"arc": "x"}}]}, "hardware"),
        ({"classes": [{"name": "a"}, {"name": "a"}]}, "duplicate name(s) a"),
        ({"classes": [{"name": "a", "weight": 1, "count": 3}]}, "not both"),
        ({"classes": [{"name": "a", "versions": {"2": {"agreement": -1}}}]}, "versions.2"),
        ({"versions": {"2": {"nope": 1}}, "classes": [{"name": "a"}]}, "versions.2"),
        ({"classes": []}, "non-empty list"),
    ],
)
def test_profile_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError, match=None) as info:
        parse_profile(data)
    assert message in str(info.value)


def test_only_counted_classes_cannot_hold_more_devices() -> None:
    profile = parse_profile({"classes": [{"name": "a", "count": 2}]})
    assert len(profile.allocate(2)) == 2
    with pytest.raises(ProfileError, match="no class has a weight"):
        profile.allocate(3)


def test_samples_pass_the_control_plane_validation() -> None:
    rng = random.Random(1)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    good = Behaviour(latency_p95_ms=30, error_rate=0.3, requests_per_s=50, jitter=0.5)
    candidate = Behaviour(latency_p95_ms=60, agreement=0.6, shadow_sample=1.0)
    samples = [
        make_sample(rng, 1, 10.0, "", "", None, 4000),
        make_sample(rng, 2, 10.0, "m", "1.0.0", good, 4000),
        make_sample(rng, 3, 0.01, "m", "1.0.0", Behaviour(requests_per_s=0), 64),
        make_sample(rng, 4, 10.0, "m", "1.0.0", good, 4000, ("2.0.0", candidate)),
    ]
    for _ in range(200):
        samples.append(make_sample(rng, len(samples) + 1, 10.0, "m", "1", good, 512))
    validate_batch([sample_from_pb(s) for s in samples], now_ms)  # raises if invalid
    idle, busy, _, shadowed = samples[:4]
    assert idle.request_count == 0 and idle.memory_mb == 0 and idle.cpu_percent > 0
    assert 250 <= busy.request_count <= 750 and 0 < busy.error_count < busy.request_count
    assert busy.latency_p50_ms <= busy.latency_p95_ms <= busy.latency_p99_ms
    assert shadowed.shadow_version == "2.0.0" and shadowed.shadow_requests > 0
    assert 0.55 < shadowed.shadow_agreement < 0.65 and shadowed.shadow_max_diff > 0.5
    assert shadowed.shadow_latency_p95_ms > 30
    errors = sum(s.error_count for s in samples[4:])
    requests = sum(s.request_count for s in samples[4:])
    assert 0.27 < errors / requests < 0.33


def _desired(revision: int, sequence: int, version: str, *, shadow: bool = False) -> Any:
    return d.DesiredState(
        revision=revision,
        device_state=c.DEVICE_STATE_ACCEPTED,
        class_name="pi",
        assignment=d.Assignment(
            model_name="m", model_version=version, artifact_digest=f"digest-{version}",
            artifact_size=1000, sequence=sequence, shadow=shadow, rollout_id="r1",
        ),
    )  # fmt: skip


async def _settled(agent: SimAgent, state: str, version: str) -> None:
    for _ in range(400):
        if (agent.update_state, agent.update_version) == (state, version):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"agent at {agent.update_state} {agent.update_version}")


async def test_shadow_keeps_the_active_version_and_a_newer_assignment_aborts_an_update() -> None:
    profile = parse_profile(
        {
            "classes": [
                {
                    "name": "pi",
                    "install_s": [0.05, 0.05],
                    "versions": {
                        "2.0.0": {"agreement": 0.6, "latency_p95_ms": 99},
                        "3.0.0": {"install_s": [30, 30]},
                    },
                }
            ]
        }
    )
    ctx = FleetContext(profile, "token", asyncio.Semaphore(1), random.Random(2))
    agent = SimAgent(0, "unit", profile.classes[0], ctx)
    try:
        assert agent.apply_desired(_desired(1, 1, "1.0.0"))
        await _settled(agent, "committed", "1.0.0")
        assert agent.states() == [
            "downloading", "verifying", "validating", "activating", "committed",
        ]  # fmt: skip
        assert (agent.status.active_model_version, agent.status.bytes_done) == ("1.0.0", 1000)
        assert (agent.status.sequence, agent.status.rollout_id) == (1, "r1")

        assert agent.apply_desired(_desired(2, 2, "2.0.0", shadow=True))
        await _settled(agent, "shadowing", "2.0.0")
        assert agent.states() == ["downloading", "verifying", "validating", "shadowing"]
        assert (agent.active_version, agent.shadow_version) == ("1.0.0", "2.0.0")
        assert agent.status.active_model_version == "1.0.0"
        sample = agent.next_sample(10.0)
        assert (sample.model_version, sample.shadow_version) == ("1.0.0", "2.0.0")
        assert 0.55 < sample.shadow_agreement < 0.65 and sample.shadow_latency_p95_ms > 80
        # A repeated desired state (a reconnect) changes nothing.
        assert not agent.apply_desired(_desired(2, 2, "2.0.0", shadow=True))

        # 3.0.0 takes 30 s; 4.0.0 arriving while it downloads aborts it.
        agent.apply_desired(_desired(3, 3, "3.0.0"))
        await _settled(agent, "downloading", "3.0.0")
        assert agent.shadow_version == ""  # the new assignment unloaded the shadow
        agent.apply_desired(_desired(4, 4, "1.0.0"))
        await _settled(agent, "committed", "1.0.0")
        assert agent.update_sequence == 4
        assert agent.active_version == "1.0.0"
        assert (3, "failed", "superseded by assignment 4") in agent.update_history
        assert agent.states(3) == ["downloading", "failed"]
    finally:
        if agent._update_task is not None:
            agent._update_task.cancel()


def test_the_cli_checks_its_profile_and_prints_the_default(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["simulate", "--print-profile"])
    assert shown.exit_code == 0, shown.output
    assert [c["name"] for c in json.loads(shown.output)["classes"]] == ["pi", "jetson", "gateway"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"name": "a", "fail_rate": 3}]}))
    refused = runner.invoke(cli, ["simulate", "-n", "1", "--token", "t", "--profile", str(bad)])
    assert refused.exit_code == 2
    assert "fail_rate: must be between 0 and 1" in refused.output
    missing = runner.invoke(cli, ["simulate", "--token", "t"])
    assert missing.exit_code == 2 and "--agents is required" in missing.output
