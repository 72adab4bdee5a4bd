"""Issue 23 items 8 and 9, the pure parts: quoted values in match rules (and
printing rules back so they parse the same), the CLI's match report and
warnings, the TUI's emptied class fields and its unclassified-devices alert.
End to end: tests/integration/test_class_rules_cli.py and
test_class_form_tui.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.controlplane.client.class_match import match_summary, match_warnings
from edgefleet.controlplane.domain import rules
from edgefleet.controlplane.domain.rules import Op, Rule, make_rule, parse_rule
from edgefleet.controlplane.errors import InvalidArgument
from edgefleet.tui import data as d
from edgefleet.tui.client import cleared_constraints
from edgefleet.tui.screens.class_form import split_rules
from edgefleet.tui.summary import summarize, unclassified_alert
from edgefleet.v1 import common_pb2 as c

PI4 = {"arch": "aarch64", "board_model": "Raspberry Pi 4 Model B"}


@pytest.mark.parametrize(
    ("text", "op", "values"),
    [
        # README's example: the quotes are not part of the value.
        ('board_model glob "Raspberry Pi*"', Op.GLOB, ("Raspberry Pi*",)),
        ("board_model glob 'Raspberry Pi*'", Op.GLOB, ("Raspberry Pi*",)),
        # Unquoted, the value is still the rest of the rule.
        ("board_model glob Raspberry Pi*", Op.GLOB, ("Raspberry Pi*",)),
        ('board_model == "Raspberry Pi 4 Model B"', Op.EQ, ("Raspberry Pi 4 Model B",)),
        ('board_model=="x"', Op.EQ, ("x",)),
        # A comma or spaces inside quotes belong to the item.
        ('label.site in "Lab 1, north",lab-2', Op.IN, ("Lab 1, north", "lab-2")),
        ("label.site not in 'a,b' , c", Op.NOT_IN, ("a,b", "c")),
        # Backslash-escaped quotes, inside and outside quotes.
        (r'hostname == "pi \"A\""', Op.EQ, ('pi "A"',)),
        (r"hostname == 'it\'s'", Op.EQ, ("it's",)),
        ('hostname == "it\'s"', Op.EQ, ("it's",)),
        (r"hostname == pi\"A", Op.EQ, ('pi"A',)),
        (r'hostname == "back\\slash"', Op.EQ, ("back\\slash",)),
        # A backslash before anything else is itself.
        (r'hostname == "C:\dir"', Op.EQ, ("C:\\dir",)),
        # Quoted parts join their neighbours, shell-style.
        ('hostname == pi-"kitchen 1"', Op.EQ, ("pi-kitchen 1",)),
        ('label.tier in "canary",beta', Op.IN, ("canary", "beta")),
    ],
)
def test_quoted_values(text: str, op: Op, values: tuple[str, ...]) -> None:
    rule = parse_rule(text)
    assert (rule.op, rule.values) == (op, values)
    assert parse_rule(str(rule)) == rule


def test_readmes_example_matches_a_raspberry_pi() -> None:
    rule = parse_rule('board_model glob "Raspberry Pi*"')
    assert rules.rule_matches(rule, rules.device_facts(PI4, {}, {}))


@pytest.mark.parametrize(
    "text",
    [
        'board_model glob "Raspberry Pi*',
        "board_model glob 'Raspberry Pi*",
        'label.site in "a,b',
        r'hostname == "ends with an escaped quote\"',
    ],
)
def test_an_unterminated_quote_is_refused_naming_the_rule(text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_rule(text)
    assert repr(text) in info.value.message
    assert "never closed" in info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('arch == ""', "exactly one value"),
        ('label.t in a,"",b', "needs a list"),
        ('arch exists "x"', "takes no value"),
    ],
)
def test_quoted_but_empty_or_misplaced_values_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_rule(text)


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Rule("board_model", Op.GLOB, ("Raspberry Pi*",)), 'board_model glob "Raspberry Pi*"'),
        (Rule("arch", Op.EQ, ("aarch64",)), "arch == aarch64"),
        (Rule("label.t", Op.IN, ("a,b", "c")), 'label.t in "a,b",c'),
        # A comma needs no quotes outside a list.
        (Rule("label.t", Op.EQ, ("a,b",)), "label.t == a,b"),
        (Rule("hostname", Op.EQ, ('say "hi"',)), r'hostname == "say \"hi\""'),
        # A value stored with its quotes (before quoting) shows them.
        (
            Rule("board_model", Op.GLOB, ('"Raspberry Pi*"',)),
            r'board_model glob "\"Raspberry Pi*\""',
        ),
        (Rule("label.x", Op.EQ, ("a;b",)), 'label.x == "a;b"'),
        (Rule("accelerator", Op.EXISTS), "accelerator exists"),
    ],
)
def test_rules_print_with_quotes_where_needed(rule: Rule, text: str) -> None:
    assert str(rule) == text
    assert parse_rule(text) == rule


# Any text, quotes, backslashes, commas and odd whitespace included.
_VALUE = st.text(
    st.one_of(st.sampled_from("\"'\\,; \t\n\u00a0\x1c"), st.characters(codec="utf-8")),
    min_size=1,
    max_size=12,
).filter(lambda v: bool(v.strip()))


@given(
    op=st.sampled_from([Op.EQ, Op.NE, Op.GLOB, Op.IN, Op.NOT_IN]),
    values=st.lists(_VALUE, min_size=1, max_size=4),
    field=st.sampled_from(["board_model", "hostname", "label.site", "accelerator"]),
)
def test_printing_and_parsing_round_trip(op: Op, values: list[str], field: str) -> None:
    rule = make_rule(field, op, values if op in (Op.IN, Op.NOT_IN) else values[:1])
    assert parse_rule(str(rule)) == rule


def test_the_tui_splits_rules_at_unquoted_semicolons() -> None:
    text = 'arch == aarch64; label.note == "a;b" ;memory_mb < 4096'
    assert [r.strip() for r in split_rules(text)] == [
        "arch == aarch64",
        'label.note == "a;b"',
        "memory_mb < 4096",
    ]
    # A quote left open: one rule, whose parsing names the open quote.
    assert split_rules('a == "x; b == y') == ['a == "x; b == y']


# ------------------------------------------------------------------ the CLI's report


def _class(rule_texts: list[str], **report: object) -> c.DeviceClass:
    from edgefleet.controlplane.wire import rule_to_pb

    misses = report.pop("misses", [])
    return c.DeviceClass(
        name="pi",
        match_rules=[rule_to_pb(parse_rule(t)) for t in rule_texts],
        match_report=c.RuleMatchReport(misses=misses, **report),  # type: ignore[arg-type]
    )


def test_the_summary_counts_matches_and_says_where_they_are() -> None:
    cls = _class(["arch == aarch64"], matching=158, pinned_elsewhere=2, outranked=1, fleet=171,
                 unclassified=3)  # fmt: skip
    assert match_summary(cls, "created") == (
        "class pi created; its rules match 158 devices now (2 pinned to other classes, "
        "1 in higher-priority classes); 3 devices of 171 in no class"
    )
    assert match_warnings(cls) == []
    one = _class(["arch == aarch64"], matching=1, fleet=1)
    assert match_summary(one, "updated") == "class pi updated; its rules match 1 device now"
    no_rules = _class([], fleet=5, unclassified=5)
    assert "no match rules" in match_summary(no_rules, "created")
    assert match_warnings(no_rules) == []


def test_a_rule_that_matches_nothing_is_warned_about_with_the_values_devices_have() -> None:
    from edgefleet.controlplane.wire import rule_to_pb

    typo = parse_rule('board_model glob "Raspberry PI*"')
    cls = _class(
        ['board_model glob "Raspberry PI*"'], matching=0, fleet=158,
        misses=[c.RuleMiss(rule=rule_to_pb(typo), seen=["Raspberry Pi 4 Model B", "Jetson"])],
    )  # fmt: skip
    (warning,) = match_warnings(cls)
    assert warning == (
        "rule 'board_model glob \"Raspberry PI*\"' matches no device of 158; check the values: "
        'board_model of devices: "Raspberry Pi 4 Model B", Jetson'
    )
    unreported = _class(
        ["label.zone == eu"], fleet=4,
        misses=[c.RuleMiss(rule=rule_to_pb(parse_rule("label.zone == eu")))],
    )  # fmt: skip
    assert match_warnings(unreported)[0].endswith("no device reports label.zone")
    # Each rule matches some device, but none matches both.
    together = _class(["arch == aarch64", "arch == x86_64"], matching=0, fleet=3)
    assert match_warnings(together) == ["no device of 3 matches all 2 rules together"]
    # No devices yet: nothing to warn about.
    assert match_warnings(_class(["arch == aarch64"], fleet=0)) == []


# ------------------------------------------------------------------ the TUI


def test_an_edited_drafts_empty_fields_are_cleared() -> None:
    draft = d.ClassDraft(
        name="pi", runtime="tflite", quantization="int8", max_size_mb="4",
        latency_budget_ms="", max_memory_mb=" ", device_memory_mb="512", fallback="",
        min_accuracy_retention="0.98", accelerator="", threads="4", speed_factor="",
        microcontroller=False,
    )  # fmt: skip
    assert cleared_constraints(draft) == [
        "accelerator", "latency_budget_p95_ms", "max_memory_mb", "microcontroller",
        "speed_factor",
    ]  # fmt: skip
    full = d.ClassDraft(
        name="pi", quantization="auto", max_size_mb="1", latency_budget_ms="2",
        max_memory_mb="3", device_memory_mb="4", min_accuracy_retention="0.9",
        accelerator="jetson", threads="1", speed_factor="1", microcontroller=True,
    )  # fmt: skip
    assert cleared_constraints(full) == []


NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _device(name: str, cls: str, state: str = "accepted", board: str = "") -> d.Device:
    hw = d.Hardware(arch="aarch64", board_model=board)
    return d.Device(id=name, name=name, state=state, online=True, class_name=cls, hardware=hw)


def test_accepted_devices_in_no_class_are_one_overview_alert() -> None:
    devices = [
        _device("pi-1", "pi"),
        _device("gw-1", "", board="Raspberry Pi 4 Model B"),
        _device("gw-2", ""),
        _device("new", "", state="pending"),
    ]
    alert = unclassified_alert(devices)
    assert alert is not None
    assert (alert.kind, alert.subject) == ("unclassified", "2 devices match no class")
    assert "gw-1 (aarch64, Raspberry Pi 4 Model B), gw-2 (aarch64)" in alert.text
    assert "fix a class's match rules or pin them" in alert.text
    assert alert in summarize(devices, [], NOW).alerts
    many = [_device(f"d{i}", "") for i in range(5)]
    assert "and 2 more" in unclassified_alert(many).text  # type: ignore[union-attr]
    # Pending devices are not classified yet; classified ones are fine.
    assert unclassified_alert([devices[0], devices[3]]) is None
