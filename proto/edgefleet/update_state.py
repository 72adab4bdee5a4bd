"""The agent's update states on the wire (UpdateState, a proto enum) and by
name ("idle", "downloading", ... as agent/update/states.py names them, and as
the control plane stores them in deployment history). One table, used by the
agent, the control plane, the simulator, the CLI and the TUI alike.

Protocol-1 agents sent the state as a free string (UpdateStatus.legacy_state);
`of_status` reads either."""

from __future__ import annotations

from edgefleet.v1 import common_pb2 as c

# Name -> wire value, in the order a successful update goes through them.
WIRE: dict[str, c.UpdateState.ValueType] = {
    "idle": c.UPDATE_STATE_IDLE,
    "downloading": c.UPDATE_STATE_DOWNLOADING,
    "verifying": c.UPDATE_STATE_VERIFYING,
    "validating": c.UPDATE_STATE_VALIDATING,
    "activating": c.UPDATE_STATE_ACTIVATING,
    "committed": c.UPDATE_STATE_COMMITTED,
    "rolling_back": c.UPDATE_STATE_ROLLING_BACK,
    "failed": c.UPDATE_STATE_FAILED,
}
NAMES: dict[int, str] = {int(value): name for name, value in WIRE.items()}


def to_wire(name: str) -> c.UpdateState.ValueType:
    """The wire value of a state name; UNSPECIFIED for an unknown one."""
    return WIRE.get(name, c.UPDATE_STATE_UNSPECIFIED)


def name_of(value: int) -> str:
    """The name of a wire value; "" for UNSPECIFIED or one this build does
    not know (a newer peer's)."""
    return NAMES.get(int(value), "")


def of_status(status: c.UpdateStatus) -> str:
    """The state an UpdateStatus reports, by name: the enum, or a protocol-1
    agent's string when the enum is unspecified. "" when neither names a
    known state (a hostile or newer peer: callers treat it as unknown)."""
    name = name_of(status.state)
    if name:
        return name
    legacy = status.legacy_state
    return legacy if legacy in WIRE else ""
