"""Domain names <-> wire enums, shared by the server's converters and the
clients (CLI, TUI). Imports no server code."""

from __future__ import annotations

from edgefleet.controlplane.domain import rules
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.v1 import common_pb2 as c

MATCH_OPS: dict[rules.Op, c.MatchOp.ValueType] = {
    rules.Op.EQ: c.MATCH_OP_EQ,
    rules.Op.NE: c.MATCH_OP_NE,
    rules.Op.LT: c.MATCH_OP_LT,
    rules.Op.LE: c.MATCH_OP_LE,
    rules.Op.GT: c.MATCH_OP_GT,
    rules.Op.GE: c.MATCH_OP_GE,
    rules.Op.IN: c.MATCH_OP_IN,
    rules.Op.NOT_IN: c.MATCH_OP_NOT_IN,
    rules.Op.EXISTS: c.MATCH_OP_EXISTS,
    rules.Op.GLOB: c.MATCH_OP_GLOB,
}
MATCH_OP_NAMES = {v: k for k, v in MATCH_OPS.items()}


def rule_to_pb(rule: rules.Rule) -> c.MatchRule:
    return c.MatchRule(field=rule.field, op=MATCH_OPS[rule.op], values=list(rule.values))


def rule_from_pb(msg: c.MatchRule) -> rules.Rule:
    """Validate a wire rule into a domain rule (InvalidArgument if it is not one)."""
    if msg.op not in MATCH_OP_NAMES:
        raise InvalidArgument(f"match rule on {msg.field!r} has no operator")
    return rules.make_rule(msg.field, MATCH_OP_NAMES[msg.op], list(msg.values))
