"""What a class's match report (DeviceClass.match_report, on create and
update) says, in words: how many devices its rules match now, and what
looks like a mistake in them. The CLI prints it; the TUI's class form
shows the same words."""

from __future__ import annotations

from edgefleet.controlplane.client.syntax import format_rule
from edgefleet.controlplane.domain.rules import quote_value
from edgefleet.v1 import common_pb2


def _devices(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def match_summary(cls: common_pb2.DeviceClass, verb: str) -> str:
    """`class pi created; its rules match 158 devices now (...)`."""
    r = cls.match_report
    if not cls.match_rules:
        return (
            f"class {cls.name} {verb}; it has no match rules: devices join it only when pinned "
            "(edgefleet devices pin)"
        )
    text = f"class {cls.name} {verb}; its rules match {_devices(r.matching)} now"
    elsewhere = [
        f"{r.pinned_elsewhere} pinned to other classes" if r.pinned_elsewhere else "",
        f"{r.outranked} in higher-priority classes" if r.outranked else "",
    ]
    if any(elsewhere):
        text += f" ({', '.join(e for e in elsewhere if e)})"
    if r.unclassified:
        text += f"; {_devices(r.unclassified)} of {r.fleet} in no class"
    return text


def match_warnings(cls: common_pb2.DeviceClass) -> list[str]:
    """What looks like a mistake in the rules: a rule no device satisfies
    (with the values devices have), or rules that match none together."""
    r = cls.match_report
    if not cls.match_rules or r.fleet == 0:
        return []
    out = []
    for miss in r.misses:
        field = miss.rule.field
        seen = (
            f"{field} of devices: {', '.join(quote_value(v) for v in miss.seen)}"
            if miss.seen
            else f"no device reports {field}"
        )
        out.append(
            f"rule '{format_rule(miss.rule)}' matches no device of {r.fleet}; "
            f"check the values: {seen}"
        )
    if not out and r.matching == 0:
        out.append(f"no device of {r.fleet} matches all {len(cls.match_rules)} rules together")
    return out
