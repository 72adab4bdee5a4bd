"""Pure figures over tui.data for the screens: fleet counts, alerts,
formatting. No textual here, so they are tested without an app."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from edgefleet.controlplane.client.format import NONE, format_ago
from edgefleet.controlplane.domain.rollout_states import (
    ROLLOUT_TRANSITIONS,
    RolloutEvent,
    RolloutState,
    sources,
)
from edgefleet.tui.data import Device, Gate, Rollout

# An accepted device not heard from for this long is "silent" (an alert).
SILENT_AFTER = timedelta(minutes=2)


@dataclass(frozen=True)
class Alert:
    # "failed deployment", "gate", "silent", "rollout", "unclassified".
    kind: str
    subject: str
    text: str
    # What the alert is about, for Enter to open: a device's id (failed
    # deployment, silent) or a rollout's (gate, rollout); "" for the
    # unclassified devices, which are many.
    target_id: str = ""


@dataclass(frozen=True)
class FleetSummary:
    by_state: tuple[tuple[str, int], ...]
    by_class: tuple[tuple[str, int], ...]
    by_version: tuple[tuple[str, int], ...]
    alerts: tuple[Alert, ...]
    active_rollouts: tuple[Rollout, ...]


def device_status(device: Device) -> str:
    """online, offline, pending, failed (the last update), rejected."""
    if device.state in ("pending", "rejected", "decommissioned"):
        return device.state
    if device.failed:
        return "failed"
    return "online" if device.online else "offline"


def _sorted(counter: Counter[str]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(
    devices: Sequence[Device], rollouts: Sequence[Rollout], now: datetime
) -> FleetSummary:
    """The overview's figures: devices by status and class, models served
    by name@version (a device counts once per model);
    the active rollouts; alerts for failed deployments, failing gates,
    paused rollouts, rollouts that succeeded with failures, silent
    devices and accepted devices in no class."""
    states: Counter[str] = Counter({s: 0 for s in ("online", "offline", "pending", "failed")})
    states.update(device_status(dev) for dev in devices)
    classes = Counter(dev.class_name or "(unclassified)" for dev in devices)
    versions: Counter[str] = Counter()
    for dev in (x for x in devices if x.state == "accepted"):
        serving = [f"{m.name}@{m.serving_version}" for m in dev.models if m.serving_version]
        versions.update(serving or ["(none)"])
    alerts: list[Alert] = []
    for dev in devices:
        for m in dev.failed_models:
            what = f"{m.name} {m.target_version}".strip()
            alerts.append(Alert("failed deployment", dev.name, f"{what}: {m.reason}", dev.id))
        if dev.failed and not dev.models:
            what = f"{dev.update.model_name} {dev.update.model_version}".strip()
            alerts.append(
                Alert("failed deployment", dev.name, f"{what}: {dev.update.reason}", dev.id)
            )
    active = tuple(r for r in rollouts if r.active)
    for r in active:
        for stage in r.stages:
            for gate in stage.gates:
                if not gate.passing:
                    alerts.append(Alert("gate", f"{r.ref} stage {stage.index + 1}",
                                        format_gate(gate), r.id))  # fmt: skip
        if r.state == "paused" and r.reason:
            alerts.append(Alert("rollout", f"{r.ref} {r.id[:8]}", r.reason, r.id))
    # Finished, but some devices failed: an operator retries or lets them be.
    for r in rollouts:
        if r.state == "succeeded-with-failures":
            alerts.append(Alert("rollout", f"{r.ref} {r.id[:8]}", r.reason or r.state, r.id))
    for dev in devices:
        seen = dev.last_seen_at
        if dev.state == "accepted" and not dev.online and seen and now - seen > SILENT_AFTER:
            alerts.append(Alert("silent", dev.name, f"last seen {format_ago(seen, now)}", dev.id))
    unclassified = unclassified_alert(devices)
    if unclassified:
        alerts.append(unclassified)
    return FleetSummary(_sorted(states), _sorted(classes), _sorted(versions), tuple(alerts), active)


def unclassified_alert(devices: Sequence[Device], examples: int = 3) -> Alert | None:
    """One alert for the accepted devices in no class: no build or rollout
    reaches them until a class's rules match them or they are pinned."""
    lost = [dev for dev in devices if dev.state == "accepted" and not dev.class_name]
    if not lost:
        return None
    shown = []
    for dev in lost[:examples]:
        facts = ", ".join(f for f in (dev.hardware.arch, dev.hardware.board_model) if f)
        shown.append(f"{dev.name} ({facts})" if facts else dev.name)
    more = f" and {len(lost) - examples} more" if len(lost) > examples else ""
    noun = "device matches" if len(lost) == 1 else "devices match"
    return Alert(
        "unclassified",
        f"{len(lost)} {noun} no class",
        f"no class's rules fit {', '.join(shown)}{more}, so no build or rollout reaches "
        "them; fix a class's match rules or pin them to a class",
    )


# The monitor's actions and the rollout event each is; the server's table
# (domain.rollout_states, pure and shared) says in which states each applies.
ACTION_EVENTS = {
    "pause": RolloutEvent.PAUSE, "resume": RolloutEvent.RESUME, "approve": RolloutEvent.APPROVE,
    "abort": RolloutEvent.ABORT, "retry": RolloutEvent.RETRY, "skip": RolloutEvent.SKIP,
    "promote": RolloutEvent.PROMOTE, "edit": RolloutEvent.UPDATE,
}  # fmt: skip


def _words(state: str) -> str:
    return state.replace("_", " ").replace("-", " ")


def action_refusal(r: Rollout, action: str) -> str:
    """Why `action` (ACTION_EVENTS) does not apply to `r` in its state, in
    the server's words; "" when it does (or the state is unknown: the
    server decides)."""
    event = ACTION_EVENTS[action]
    try:
        state = RolloutState(r.state.replace("-", "_"))
    except ValueError:
        return ""
    if (state, event) in ROLLOUT_TRANSITIONS:
        return ""
    where = ", ".join(_words(s.value) for s in sources(event))
    return f"rollout {r.id[:8]} is {_words(r.state)}; {action} applies to a rollout that is {where}"


def format_time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when else NONE


def format_labels(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels))


def rollout_progress(r: Rollout) -> tuple[int, int]:
    """(committed, total) over every stage."""
    return sum(s.committed for s in r.stages), sum(s.total for s in r.stages)


def _gate_number(name: str, value: float) -> str:
    if value == float("inf"):
        return "never" if name == "silence" else "∞"
    if "rate" in name or "agreement" in name:
        return f"{value * 100:.2f}%"
    if name == "silence":
        return f"{value:.0f}s"
    if "latency" in name:
        return f"{value:.2f} ms"
    if "memory" in name:
        return f"{value:.1f} MB"
    return f"{value:.4g}"


def format_gate(g: Gate) -> str:
    """`latency_p95 12.00 ms <= 30.00 ms ok` or `... > ... FAIL`."""
    if g.value == 0 and g.limit == 0 and g.name != "error_rate":
        return f"{g.name} no data yet"
    relations = (">=", "<") if "agreement" in g.name else ("<=", ">")
    relation = relations[0] if g.passing else relations[1]
    verdict = "ok" if g.passing else "FAIL"
    return f"{g.name} {_gate_number(g.name, g.value)} {relation} {_gate_number(g.name, g.limit)} " \
           f"{verdict}"  # fmt: skip


def compose_stages(
    *,
    shadow: str = "",
    stages: str = "",
    thresholds: str = "",
    gates: str = "",
    on_failure: str = "pause",
    approve: bool = False,
) -> tuple[str, ...]:
    """The wizard's fields as `--stage` strings: an optional shadow stage
    (`2,agreement=0.95`), then the `;`-separated stages, each given the
    thresholds and gates (`errors=20/3`, `latency=1.5,silence=2m`) it does
    not set itself, `on-failure=abort` when asked, and `approve` on every
    stage but the last when approval is wanted between stages."""
    extra = [p.strip() for p in f"{thresholds},{gates}".split(",") if p.strip()]
    heads = [s.strip() for s in stages.split(";") if s.strip()]
    out: list[str] = []
    if shadow.strip():
        out.append(f"shadow:{shadow.strip().removeprefix('shadow:')}")
    for i, stage in enumerate(heads):
        options = [p.strip() for p in stage.split(",")]
        keys = {p.split("=", 1)[0].lower() for p in options[1:]}
        options += [p for p in extra if p.split("=", 1)[0].lower() not in keys]
        if on_failure == "abort" and "on-failure" not in keys:
            options.append("on-failure=abort")
        if approve and i < len(heads) - 1 and "approve" not in keys:
            options.append("approve")
        out.append(",".join(options))
    return tuple(out)
