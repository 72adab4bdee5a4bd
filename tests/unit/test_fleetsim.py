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
from edgefleet.sim.agent import AGENT_RSS_MB, FleetContext
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
    assert idle.request_count == 0 and idle.cpu_percent > 0
    # The agent's own RSS, and no model's memory, on an idle device.
    assert idle.memory_mb == AGENT_RSS_MB and idle.model_memory_mb == 0
    # With a model, the agent's RSS is its own plus the model's.
    assert 70 < busy.model_memory_mb < 90
    assert busy.memory_mb == pytest.approx(AGENT_RSS_MB + busy.model_memory_mb)
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

        assert agent.status.state == c.UPDATE_STATE_COMMITTED and not agent.status.legacy_state

        # A shadow goes through the same states and commits (as the real
        # agent's machine), the active version unchanged.
        assert agent.apply_desired(_desired(2, 2, "2.0.0", shadow=True))
        await _settled(agent, "committed", "2.0.0")
        assert agent.states() == [
            "downloading", "verifying", "validating", "activating", "committed",
        ]  # fmt: skip
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
        agent.stop_tasks()


def _assignment(model: str, version: str, sequence: int, size: int = 1000) -> Any:
    return d.Assignment(model_name=model, model_version=version, artifact_size=size,
                        artifact_digest=f"digest-{model}-{version}", sequence=sequence)  # fmt: skip


class _Wire:
    """Stands in for the Sync stream: keeps every message the agent writes."""

    def __init__(self) -> None:
        self.sent: list[d.AgentMessage] = []

    async def write(self, message: d.AgentMessage) -> None:
        self.sent.append(message)

    def statuses(self) -> list[c.UpdateStatus]:
        out: list[c.UpdateStatus] = []
        for m in self.sent:
            out.extend(m.status.models)
            if m.status.HasField("update"):
                out.append(m.status.update)
        return out


def _agent(protocol: int = 2, install_s: float = 0.05) -> tuple[SimAgent, _Wire]:
    slow = {"9.0.0": {"install_s": [30, 30]}}
    profile = parse_profile(
        {"classes": [{"name": "pi", "install_s": [install_s, install_s], "versions": slow}]}
    )
    ctx = FleetContext(profile, "token", asyncio.Semaphore(1), random.Random(3), protocol=protocol)
    agent = SimAgent(0, "unit", profile.classes[0], ctx)
    wire = _Wire()
    agent._call = wire
    return agent, wire


async def _until(check: Any, what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def test_protocol_2_updates_each_model_concurrently_and_removes_unlisted_ones() -> None:
    agent, wire = _agent()
    try:
        desired = d.DesiredState(revision=1, device_state=c.DEVICE_STATE_ACCEPTED, assignments=[
            _assignment("digits", "1.0.0", 1), _assignment("vad", "5.0.0", 2)])  # fmt: skip
        assert agent.apply_desired(desired)
        await _until(lambda: agent.serving() == {"digits": "1.0.0", "vad": "5.0.0"}, "both serve")
        statuses = wire.statuses()
        assert {s.model_name for s in statuses} == {"digits", "vad"}
        # Enums on the wire, no legacy strings, each report names its model.
        assert all(s.state != c.UPDATE_STATE_UNSPECIFIED and not s.legacy_state for s in statuses)
        assert [s.sequence for s in statuses if s.state == c.UPDATE_STATE_COMMITTED] != []
        assert all(len(m.status.models) <= 1 for m in wire.sent)
        # Both updates ran at once: vad started before digits committed.
        order = [(s.model_name, s.state) for s in statuses]
        assert order.index(("vad", c.UPDATE_STATE_DOWNLOADING)) < order.index(
            ("digits", c.UPDATE_STATE_COMMITTED)
        )
        samples = agent.next_samples(10.0)
        assert [(s.model_name, s.model_version) for s in samples] == [
            ("digits", "1.0.0"), ("vad", "5.0.0")]  # fmt: skip
        assert len({s.seq for s in samples}) == 2
        hello = agent._hello().hello
        assert hello.protocol == 2 and {m.model_name for m in hello.models} == {"digits", "vad"}
        assert not hello.HasField("update")

        # vad is no longer listed: it is unloaded and reported gone (idle,
        # nothing served); digits is untouched.
        wire.sent.clear()
        agent.apply_desired(d.DesiredState(revision=2, assignments=[
            _assignment("digits", "1.0.0", 1)]))  # fmt: skip
        await _until(lambda: "vad" not in agent.models, "vad removed")
        (gone,) = wire.statuses()
        assert (gone.model_name, gone.state, gone.active_model_version) == (
            "vad",
            c.UPDATE_STATE_IDLE,
            "",
        )
        assert agent.serving() == {"digits": "1.0.0"}
        assert [s.model_name for s in agent.next_samples(10.0)] == ["digits"]

        # Removing a model mid-download aborts it (an abortable state).
        agent.apply_desired(d.DesiredState(revision=3, assignments=[
            _assignment("digits", "1.0.0", 1), _assignment("kws", "9.0.0", 3)]))  # fmt: skip
        await _until(lambda: agent.models["kws"].state == "downloading", "kws downloading")
        agent.apply_desired(d.DesiredState(revision=4, assignments=[
            _assignment("digits", "1.0.0", 1)]))  # fmt: skip
        await _until(lambda: "kws" not in agent.models, "kws removed")
        assert agent.states(3) == ["downloading", "failed", "idle"]
        assert (3, "failed", "aborted: model unassigned") in agent.update_history
    finally:
        agent.stop_tasks()


async def test_protocol_1_agent_sends_strings_and_reads_only_the_single_assignment() -> None:
    agent, wire = _agent(protocol=1)
    try:
        desired = d.DesiredState(revision=1, assignment=_assignment("digits", "1.0.0", 1),
                                 assignments=[_assignment("vad", "5.0.0", 2)])  # fmt: skip
        agent.apply_desired(desired)
        await _settled(agent, "committed", "1.0.0")
        assert list(agent.models) == ["digits"]
        statuses = wire.statuses()
        assert all(s.state == c.UPDATE_STATE_UNSPECIFIED for s in statuses)
        assert [s.legacy_state for s in statuses][-1] == "committed"
        assert not any(m.status.models for m in wire.sent)
        hello = agent._hello().hello
        assert hello.protocol == 0 and not hello.models
        assert hello.update.legacy_state == "committed"
        # Another model name replaces the one model (an old agent holds one).
        agent.apply_desired(d.DesiredState(revision=2, assignment=_assignment("kws", "2.0.0", 3)))
        await _settled(agent, "committed", "2.0.0")
        assert list(agent.models) == ["kws"] and agent.serving() == {"kws": "2.0.0"}
        # No assignment: an old agent keeps what it serves.
        agent.apply_desired(d.DesiredState(revision=3))
        await asyncio.sleep(0.05)
        assert agent.serving() == {"kws": "2.0.0"}
    finally:
        agent.stop_tasks()


async def test_an_old_control_plane_setting_only_assignment_still_installs() -> None:
    agent, _ = _agent()
    try:
        agent.apply_desired(d.DesiredState(revision=1, assignment=_assignment("m", "1.0.0", 1)))
        await _settled(agent, "committed", "1.0.0")
        assert agent.serving() == {"m": "1.0.0"}
    finally:
        agent.stop_tasks()


def test_fleetsim_reuses_the_agents_tables() -> None:
    # One table for the real agent and the simulator: the abortable states
    # and the reconnect decisions are the agent's own objects.
    from edgefleet.agent.reconnect import decide
    from edgefleet.agent.update import states
    from edgefleet.sim import agent as sim_agent

    assert vars(sim_agent)["ABORTABLE"] is states.ABORTABLE
    assert vars(sim_agent)["TRANSITIONS"] is states.TRANSITIONS
    assert vars(sim_agent)["decide"] is decide
    ctx = FleetContext(default_profile(), "t", asyncio.Semaphore(1), random.Random(), protocol=3)
    with pytest.raises(ValueError, match="protocol 3: fleetsim speaks protocol 1 or 2"):
        SimAgent(0, "x", default_profile().classes[0], ctx)


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
