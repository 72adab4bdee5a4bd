"""The contexts file (controlplane.client.contexts): where it is, its modes
(0600 file, 0700 directory, from creation), the atomic write, refusing a
file others may read, corrupt files, names and token files; the resolution
order of the connection settings; and where the root group moves global
options found after the subcommand (RootGroup)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgefleet.controlplane.cli import cli
from edgefleet.controlplane.client import contexts as ctxs
from edgefleet.controlplane.client.connection import DEFAULT_SERVER, Connection
from edgefleet.controlplane.client.contexts import (
    Context,
    ContextError,
    Contexts,
    choose,
    contexts_path,
    load,
    make_context,
    read_token_file,
    resolve_connection,
    save,
    set_aside_hint,
    validate_name,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _two(path: Path) -> Contexts:
    """prod (TLS, token) current, and staging (plain, no token)."""
    contexts = Contexts(path)
    contexts.add("prod", Context("prod:7443", "tok-prod", Path("/etc/ef/ca.pem")))
    contexts.add("staging", Context("staging:7443"))
    contexts.use("prod")
    return contexts


# ------------------------------------------------------------------ where


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"EDGEFLEET_CONFIG": "/x/mine.json", "XDG_CONFIG_HOME": "/xdg"}, "/x/mine.json"),
        ({"EDGEFLEET_CONFIG": "", "XDG_CONFIG_HOME": "/xdg"}, "/xdg/edgefleet/contexts.json"),
        ({"XDG_CONFIG_HOME": "/xdg"}, "/xdg/edgefleet/contexts.json"),
        # The XDG spec: a relative XDG_CONFIG_HOME is ignored.
        ({"XDG_CONFIG_HOME": "rel"}, "~/.config/edgefleet/contexts.json"),
        ({}, "~/.config/edgefleet/contexts.json"),
    ],
)
def test_contexts_path(env: dict[str, str], expected: str) -> None:
    assert contexts_path(env) == Path(expected).expanduser()


# ------------------------------------------------------------------ the file


def test_save_creates_private_dirs_and_file_and_load_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "config" / "edgefleet" / "contexts.json"
    old = os.umask(0)  # the loosest umask: the modes must not come from it
    try:
        save(_two(path))
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert _mode(path.parent.parent) == 0o700
    loaded = load(path)
    assert loaded.current == "prod"
    assert loaded.contexts == _two(path).contexts
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["contexts.json"]  # no temp file left


def test_save_keeps_an_existing_directorys_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    save(_two(tmp_path / "contexts.json"))
    assert _mode(tmp_path) == 0o755
    assert _mode(tmp_path / "contexts.json") == 0o600


def test_save_replaces_the_file_by_rename_so_a_reader_holds_old_or_new(tmp_path: Path) -> None:
    path = tmp_path / "contexts.json"
    save(_two(path))
    inode = path.stat().st_ino
    with path.open() as reader:  # opened before the write
        contexts = load(path)
        contexts.remove("staging")
        save(contexts)
        assert "staging" in json.load(reader)["contexts"]  # the old file, whole
    assert path.stat().st_ino != inode
    assert load(path).names() == ["prod"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "contexts.json"
    save(_two(path))
    before = path.read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ctxs.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save(Contexts(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contexts.json"]


def test_a_missing_file_is_no_contexts(tmp_path: Path) -> None:
    contexts = load(tmp_path / "nope.json")
    assert contexts.contexts == {} and contexts.current is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o610])
def test_a_file_others_may_open_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "contexts.json"
    save(_two(path))
    path.chmod(mode)
    with pytest.raises(ContextError) as err:
        load(path)
    assert f"(mode {mode:04o}): run chmod 600 {path}" in str(err.value)
    path.chmod(0o600)
    assert load(path).current == "prod"
    path.chmod(0o400)  # read-only for its owner is fine too
    assert load(path).current == "prod"


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"version": 2}', "format version 2"),
        ('{"contexts": []}', '"contexts" is not an object'),
        ('{"contexts": {"p": "x"}}', "context 'p' is not an object"),
        ('{"contexts": {"p": {}}}', "context 'p' has no server"),
        ('{"contexts": {"p": {"server": 7}}}', "the server of context 'p' is not a string"),
        ('{"contexts": {"p": {"server": "s", "token": 1}}}', "the token of context 'p' is not"),
        ('{"contexts": {"a b": {"server": "s"}}}', "must not hold spaces"),
        ('{"contexts": {"p": {"server": "s"}}, "current": "q"}', "current context 'q' is not"),
        ('{"current": 3}', '"current" is not a string'),
    ],
)
def test_a_corrupt_file_names_itself_and_the_fix(tmp_path: Path, content: str, detail: str) -> None:
    path = tmp_path / "contexts.json"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ContextError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path} is not a valid contexts file (")
    assert detail in message
    assert "fix it, or move it away and add the contexts again" in message
    assert "\n" not in message


def test_a_file_written_by_hand_without_version_or_current_loads(tmp_path: Path) -> None:
    path = tmp_path / "contexts.json"
    path.write_text('{"contexts": {"lab": {"server": "lab:7443"}}}')
    path.chmod(0o600)
    assert load(path).contexts == {"lab": Context("lab:7443")}


# ------------------------------------------------------------------ names, tokens


@pytest.mark.parametrize("name", ["prod", "eu-west.1", "a@b:c/d", "x" * 64, "Ünïcode"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 65, "65 characters long: at most 64"),
        ("a b", "must not hold spaces or control characters"),
        ("a\tb", "must not hold spaces or control characters"),
        ("bell\x07", "must not hold spaces or control characters"),
        ("-prod", "must not start with '-'"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(ContextError, match=message):
        validate_name(name)
    with pytest.raises(ContextError, match=message):
        Contexts(Path("c.json")).add(name, Context("s:1"))


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("efo_abc123\n")
    assert read_token_file(token) == "efo_abc123"
    missing = re.escape(f"token file {tmp_path / 'nope'} does not exist")
    with pytest.raises(ContextError, match=missing):
        read_token_file(tmp_path / "nope")
    token.write_text("  \n")
    with pytest.raises(ContextError, match="is empty: expected an operator token"):
        read_token_file(token)
    token.write_text("one\ntwo\n")
    with pytest.raises(ContextError, match="holds spaces or line breaks"):
        read_token_file(token)
    token.write_bytes(b"\xff\xfe")
    with pytest.raises(ContextError, match="is not text"):
        read_token_file(token)


def test_make_context_checks_and_makes_the_ca_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    made = make_context(" prod:7443 ", "tok", Path("ca.pem"))
    assert made == Context("prod:7443", "tok", tmp_path / "ca.pem")
    assert made.tls and not make_context("s:1").tls
    with pytest.raises(ContextError, match="expected HOST:PORT"):
        make_context("  ")
    with pytest.raises(ContextError, match="the token is empty"):
        make_context("s:1", "")


def test_unknown_and_existing_contexts(tmp_path: Path) -> None:
    contexts = _two(tmp_path / "c.json")
    with pytest.raises(ContextError, match=r"no context named 'dev' in .*; known: prod, staging"):
        contexts.get("dev")
    with pytest.raises(ContextError, match="holds none \\(add one: edgefleet context add"):
        Contexts(tmp_path / "c.json").use("dev")
    with pytest.raises(ContextError, match="exists already: pass --overwrite"):
        contexts.add("prod", Context("other:1"))
    contexts.add("prod", Context("other:1"), overwrite=True)
    assert contexts.get("prod").server == "other:1"
    assert contexts.remove("prod") is True and contexts.current is None
    assert contexts.remove("staging") is False


# ------------------------------------------------------------------ resolution


def _choose(
    contexts: Contexts,
    server: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    context: str | None = None,
) -> Connection:
    return choose(
        contexts, server=server, token=token, ca_cert=Path(ca) if ca else None, context=context
    )


def test_resolution_order(tmp_path: Path) -> None:
    two = _two(tmp_path / "c.json")
    prod_ca = Path("/etc/ef/ca.pem")
    # The current context.
    assert _choose(two) == Connection("prod:7443", "tok-prod", prod_ca)
    # --context over the current one.
    assert _choose(two, context="staging") == Connection("staging:7443", None, None)
    # Each explicit setting over the context's, the others from it.
    assert _choose(two, token="mine") == Connection("prod:7443", "mine", prod_ca)
    assert _choose(two, ca="/my.pem") == Connection("prod:7443", "tok-prod", Path("/my.pem"))
    assert _choose(two, server="prod:7443") == Connection("prod:7443", "tok-prod", prod_ca)
    assert _choose(two, context="staging", token="t") == Connection("staging:7443", "t", None)
    # --context and --server together: meant, so the context's token goes there.
    assert _choose(two, server="replica:7443", context="prod") == Connection(
        "replica:7443", "tok-prod", prod_ca
    )
    # No context at all: the defaults.
    empty = Contexts(tmp_path / "none.json")
    assert _choose(empty) == Connection(DEFAULT_SERVER, None, None)
    two.current = None
    assert _choose(two, token="t") == Connection(DEFAULT_SERVER, "t", None)
    with pytest.raises(ContextError, match="no context named 'dev'"):
        _choose(two, context="dev")


def test_another_server_never_gets_the_current_contexts_token(tmp_path: Path) -> None:
    two = _two(tmp_path / "c.json")
    assert _choose(two, server="dev:7443") == Connection("dev:7443", None, None)
    assert _choose(two, server="dev:7443", token="t") == Connection("dev:7443", "t", None)


def test_a_connection_says_where_its_server_came_from(tmp_path: Path) -> None:
    """What an error about an unreachable server names (tls_probe)."""
    two = _two(tmp_path / "c.json")
    current = _choose(two)
    assert (current.origin, current.context) == ("the server of context 'prod'", "prod")
    named = _choose(two, context="staging")
    assert (named.origin, named.context) == ("the server of context 'staging'", "staging")
    assert _choose(two, server="replica:7443", context="prod").origin == ""
    assert _choose(two, server="dev:7443").origin == ""
    default = _choose(Contexts(tmp_path / "none.json"))
    assert default.origin.startswith("the default address: no --server, EDGEFLEET_SERVER")


def test_resolve_connection_reads_the_file_only_when_needed(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{broken")
    path.chmod(0o600)
    ca = tmp_path / "ca.pem"
    everything = resolve_connection(server="s:1", token="t", ca_cert=ca, context=None, path=path)
    assert everything == Connection("s:1", "t", ca)
    with pytest.raises(ContextError, match="not a valid contexts file"):
        resolve_connection(server="s:1", token="t", ca_cert=None, context=None, path=path)
    save(_two(path))
    assert resolve_connection(
        server=None, token=None, ca_cert=None, context="staging", path=path
    ) == Connection("staging:7443", None, None)


# ------------------------------------------------------------------ global options


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["devices", "ls", "--server", "X"], ["--server", "X", "devices", "ls"]),
        (["devices", "ls", "--server=X", "--json"], ["--server=X", "devices", "ls", "--json"]),
        (["devices", "--context", "p", "ls"], ["--context", "p", "devices", "ls"]),
        (
            ["--token", "A", "tui", "--server", "X", "--token", "T", "--ca-cert", "c"],
            ["--token", "A", "--server", "X", "--token", "T", "--ca-cert", "c", "tui"],
        ),
        (["rollouts", "ls", "--context", "prod"], ["--context", "prod", "rollouts", "ls"]),
        # simulate's own --token (the enrollment token) stays with it.
        (
            ["simulate", "-n", "5", "--token", "E", "--server", "X"],
            ["--server", "X", "simulate", "-n", "5", "--token", "E"],
        ),
        (["simulate", "--token=E"], ["simulate", "--token=E"]),
        # So do context add's --server, --token and --ca-cert.
        (
            ["context", "add", "p", "--server", "S", "--token", "T", "--context", "q"],
            ["--context", "q", "context", "add", "p", "--server", "S", "--token", "T"],
        ),
        # An option's value is not an option; nothing after -- moves.
        (["devices", "reject", "I", "--reason", "--server"], None),
        (["devices", "label", "I", "--", "--server", "X"], None),
        (["--server", "X", "devices", "ls"], None),
        (["nosuch", "--server", "X"], None),
        ([], None),
    ],
)
def test_global_options_after_the_subcommand_move_before_it(
    args: list[str], expected: list[str] | None
) -> None:
    ctx = click.Context(cli)
    assert cli._hoist_global_options(ctx, args) == (args if expected is None else expected)


def test_a_global_option_without_its_value_is_a_usage_error() -> None:
    with pytest.raises(click.UsageError, match="Option '--server' requires an argument"):
        cli._hoist_global_options(click.Context(cli), ["devices", "ls", "--server"])


def test_edits_at_once_take_turns_and_none_is_lost(tmp_path: Path) -> None:
    """A second edit waits for the first to save: without the lock, both
    read the empty file and the later save dropped the earlier context (a
    stranger's 8 `context add` at once kept 7)."""
    import threading

    path = tmp_path / "edgefleet" / "contexts.json"
    inside, release = threading.Event(), threading.Event()

    def first() -> None:
        with ctxs.editing(path) as contexts:
            contexts.add("one", make_context("h:1"))
            inside.set()
            release.wait(10)

    def second() -> None:
        with ctxs.editing(path) as contexts:
            contexts.add("two", make_context("h:2"))

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    b.join(0.5)
    assert b.is_alive()  # waiting for the first edit's turn
    release.set()
    a.join(10)
    b.join(10)
    assert load(path).names() == ["one", "two"]
    assert _mode(path) == 0o600


def test_a_contexts_path_that_is_a_directory_is_named(tmp_path: Path) -> None:
    """It said "Is a directory: 3" (the descriptor, not the path)."""
    with pytest.raises(ContextError, match=re.escape(f"contexts file {tmp_path} is not a file")):
        load(tmp_path)


def test_a_context_set_aside_by_server_is_named_when_the_token_is_missing(
    tmp_path: Path,
) -> None:
    two = _two(tmp_path / "c.json")
    elsewhere = _choose(two, server="dev:7443")
    assert elsewhere.set_aside == "prod"
    assert set_aside_hint(elsewhere) == (
        "context 'prod' (in use) was left out, with its token, because --server names another "
        "server than its own: add --context prod to send its token there, or --token"
    )
    assert set_aside_hint(_choose(two, server="dev:7443", token="t")) == ""
    assert set_aside_hint(_choose(two)) == ""


def test_a_context_whose_ca_file_is_gone_is_named_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said only "No such file or directory: /…/ca.pem"."""
    path = tmp_path / "c.json"
    ca = tmp_path / "ca.pem"
    save(Contexts(path, {"lab": Context("lab:7443", "tok", ca)}, current="lab"))
    monkeypatch.setenv(ctxs.CONFIG_ENV, str(path))
    for name in ("EDGEFLEET_SERVER", "EDGEFLEET_TOKEN", "EDGEFLEET_CA_CERT", "EDGEFLEET_CONTEXT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, ["devices", "ls"])
    assert result.exit_code == 1
    assert f"context 'lab': its CA certificate {ca} is gone" in result.output
    assert "edgefleet context add lab --overwrite --server lab:7443 --ca-cert" in result.output
