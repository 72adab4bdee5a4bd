"""Device-class match rules: parsing operator text and evaluating rules against
a device's facts. Pure logic: no gRPC, no SQL."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgefleet.controlplane.errors import InvalidArgument


class Op(StrEnum):
    EQ = "=="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    IN = "in"
    NOT_IN = "not in"
    EXISTS = "exists"
    GLOB = "glob"


SCALAR_FIELDS = {
    "os",
    "os_release",
    "arch",
    "cpu_model",
    "cpu_cores",
    "memory_mb",
    "disk_total_mb",
    "board_model",
    "hostname",
    "runtime.onnxruntime",
    "runtime.litert",
    "runtime.tensorrt",
}
LIST_FIELDS = {"accelerator", "runtime.providers"}
NUMERIC_OPS = {Op.LT, Op.LE, Op.GT, Op.GE}


@dataclass(frozen=True)
class Rule:
    field: str
    op: Op
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        """The text parse_rule reads back as this rule (values quoted where needed)."""
        if self.op is Op.EXISTS:
            return f"{self.field} exists"
        if self.op in (Op.IN, Op.NOT_IN):
            listed = ",".join(quote_value(v, in_list=True) for v in self.values)
            return f"{self.field} {self.op.value} {listed}"
        return f"{self.field} {self.op.value} {quote_value(self.values[0])}"


_RULE_RE = re.compile(
    r"^\s*(?P<field>[A-Za-z_][\w.\-/]*)\s*"
    r"(?P<op>==|!=|<=|>=|<|>|=|\bnot\s+in\b|\bin\b|\bexists\b|\bglob\b)"
)
_QUOTES = "\"'"


def quote_value(value: str, *, in_list: bool = False) -> str:
    """`value` as a rule writes it: as is when it reads back the same,
    else in double quotes with `"` and `\\` escaped."""
    # `;` too: the TUI's class form separates rules with it.
    special = (*_QUOTES, "\\", ";", *("," if in_list else ""))
    if value and not any(ch.isspace() or ch in special for ch in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _lex(text: str, rule: str) -> Iterator[tuple[int, str, bool]]:
    """The characters of a value as written: (position, character, literal).
    Quotes ("..." or '...') are dropped and make what they enclose literal;
    a backslash makes the quote or backslash after it literal. Literal
    characters never separate items and are never trimmed."""
    quote = ""
    i = 0
    while i < len(text):
        ch, nxt = text[i], text[i + 1 : i + 2]
        escapable = (quote, "\\") if quote else (*_QUOTES, "\\")
        if ch == "\\" and nxt and nxt in escapable:
            yield i, nxt, True
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
            else:
                yield i, ch, True
        elif ch in _QUOTES:
            quote = ch
        else:
            yield i, ch, False
        i += 1
    if quote:
        raise InvalidArgument(
            f"match rule {rule!r}: a {quote} quote is never closed; close it, or write a "
            f"quote that belongs to the value as \\{quote}"
        )


def split_unquoted(text: str, sep: str, *, rule: str = "") -> list[str]:
    """`text` split at each `sep` outside quotes, the parts as written
    (quotes kept): for `in` lists and the TUI's `;`-separated rules."""
    parts, start = [], 0
    for i, ch, literal in _lex(text, rule or text):
        if ch == sep and not literal:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def unquote(text: str, *, rule: str = "") -> str:
    """One value as written -> the value: quotes removed, the unquoted
    spaces at its ends dropped, every other character kept."""
    chars = list(_lex(text, rule or text))
    while chars and not chars[0][2] and chars[0][1].isspace():
        chars.pop(0)
    while chars and not chars[-1][2] and chars[-1][1].isspace():
        chars.pop()
    return "".join(ch for _, ch, _ in chars)


def validate_field(field: str) -> None:
    """Raise InvalidArgument for a field no device fact has."""
    if field in SCALAR_FIELDS or field in LIST_FIELDS:
        return
    if field.startswith("label.") and len(field) > len("label."):
        return
    known = ", ".join(sorted(SCALAR_FIELDS | LIST_FIELDS | {"label.<key>"}))
    raise InvalidArgument(f"unknown match field {field!r}; known fields: {known}")


def make_rule(field: str, op: Op, values: Sequence[str]) -> Rule:
    """Build a rule, checking the field and that the values fit the operator."""
    validate_field(field)
    vals = tuple(v.strip() for v in values)
    if op is Op.EXISTS:
        if vals:
            raise InvalidArgument(f"rule on {field!r}: 'exists' takes no value")
    elif op in (Op.IN, Op.NOT_IN):
        if not vals or any(not v for v in vals):
            raise InvalidArgument(f"rule on {field!r}: '{op.value}' needs a list like a,b,c")
    else:
        if len(vals) != 1 or not vals[0]:
            raise InvalidArgument(f"rule on {field!r}: '{op.value}' needs exactly one value")
        if op in NUMERIC_OPS and _number(vals[0]) is None:
            raise InvalidArgument(
                f"rule on {field!r}: '{op.value}' compares numbers, got {vals[0]!r}"
            )
    return Rule(field, op, vals)


def parse_rule(text: str) -> Rule:
    """Parse operator text such as `arch == aarch64`, `memory_mb < 4096`,
    `label.tier in canary,beta`, `accelerator exists`,
    `board_model glob "Raspberry Pi*"`. A value may be quoted, shell-style
    (docs/operators/classes.md#quoting); unquoted, it is the rest of the
    text (an `in` list's item: up to the next comma), ends trimmed."""
    m = _RULE_RE.match(text)
    if not m:
        raise InvalidArgument(
            f"cannot parse match rule {text!r}; write FIELD OP VALUE, e.g. 'arch == aarch64', "
            "'memory_mb < 4096', 'label.tier in canary,beta', 'accelerator exists'"
        )
    op_text = re.sub(r"\s+", " ", m["op"])
    op = Op.EQ if op_text == "=" else Op(op_text)
    value = text[m.end() :]
    if op in (Op.IN, Op.NOT_IN):
        values = [unquote(v, rule=text) for v in split_unquoted(value, ",", rule=text)]
    elif op is Op.EXISTS:
        values = [value.strip()] if value.strip() else []
    else:
        values = [unquote(value, rule=text)]
    return make_rule(m["field"], op, values)


def device_facts(
    hardware: Mapping[str, Any], runtime: Mapping[str, Any], labels: Mapping[str, str]
) -> dict[str, Any]:
    """Flatten a device's hardware profile, runtime fingerprint and labels into
    the fields rules refer to. Missing facts are absent, not empty."""
    facts: dict[str, Any] = {}
    for key in ("os", "os_release", "arch", "cpu_model", "board_model", "hostname"):
        if hardware.get(key):
            facts[key] = str(hardware[key])
    for key in ("cpu_cores", "memory_mb", "disk_total_mb"):
        if hardware.get(key) is not None:
            facts[key] = hardware[key]
    kinds = [a.get("kind", "") for a in hardware.get("accelerators", []) if a.get("kind")]
    if kinds:
        facts["accelerator"] = kinds
    for fact, key in (
        ("runtime.onnxruntime", "onnxruntime_version"),
        ("runtime.litert", "litert_version"),
        ("runtime.tensorrt", "tensorrt_version"),
    ):
        if runtime.get(key):
            facts[fact] = runtime[key]
    if runtime.get("onnxruntime_providers"):
        facts["runtime.providers"] = list(runtime["onnxruntime_providers"])
    for key, value in labels.items():
        facts[f"label.{key}"] = value
    return facts


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _scalar_matches(actual: Any, op: Op, values: tuple[str, ...]) -> bool:
    if op in NUMERIC_OPS:
        a, b = _number(actual), _number(values[0])
        if a is None or b is None:
            return False
        return {Op.LT: a < b, Op.LE: a <= b, Op.GT: a > b, Op.GE: a >= b}[op]
    text = str(actual)
    if op is Op.EQ:
        a, b = _number(text), _number(values[0])
        return text == values[0] or (a is not None and b is not None and a == b)
    if op is Op.NE:
        return not _scalar_matches(actual, Op.EQ, values)
    if op is Op.IN:
        return any(_scalar_matches(actual, Op.EQ, (v,)) for v in values)
    if op is Op.NOT_IN:
        return not _scalar_matches(actual, Op.IN, values)
    if op is Op.GLOB:
        return fnmatch.fnmatchcase(text, values[0])
    return False


def rule_matches(rule: Rule, facts: Mapping[str, Any]) -> bool:
    """A missing fact matches only negative rules (!=, not in)."""
    if rule.field not in facts:
        return rule.op in (Op.NE, Op.NOT_IN)
    if rule.op is Op.EXISTS:
        return True
    actual = facts[rule.field]
    if isinstance(actual, list):
        # List facts (accelerator kinds, providers): positive ops match if any
        # element does; negative ops only if no element matches the positive.
        if rule.op is Op.NE:
            return not any(_scalar_matches(a, Op.EQ, rule.values) for a in actual)
        if rule.op is Op.NOT_IN:
            return not any(_scalar_matches(a, Op.IN, rule.values) for a in actual)
        return any(_scalar_matches(a, rule.op, rule.values) for a in actual)
    return _scalar_matches(actual, rule.op, rule.values)


@dataclass(frozen=True)
class ClassCandidate:
    """What classification needs to know about a class."""

    id: str
    name: str
    priority: int
    rules: tuple[Rule, ...]


def classify(facts: Mapping[str, Any], classes: Iterable[ClassCandidate]) -> ClassCandidate | None:
    """The highest-priority class whose rules all match (ties: by name).
    A class with no rules matches nothing: it is for pinning only."""
    ordered = sorted(classes, key=lambda c: (-c.priority, c.name))
    for cls in ordered:
        if cls.rules and all(rule_matches(r, facts) for r in cls.rules):
            return cls
    return None


def rules_to_json(rules: Iterable[Rule]) -> list[dict[str, Any]]:
    return [{"field": r.field, "op": r.op.value, "values": list(r.values)} for r in rules]


def rules_from_json(data: Iterable[Mapping[str, Any]]) -> tuple[Rule, ...]:
    return tuple(Rule(d["field"], Op(d["op"]), tuple(d.get("values", ()))) for d in data)
