"""Named connection settings, like kubectl's contexts: each context is a
server, an operator token and a CA certificate under a name, one of them
current. They live in one JSON file in the user's config directory
($EDGEFLEET_CONFIG, else $XDG_CONFIG_HOME/edgefleet/contexts.json, else
~/.config/edgefleet/contexts.json), mode 0600 in a 0700 directory, since it
holds bearer tokens.

What a command connects with, setting by setting: the option or its
environment variable, else the context named by --context
(EDGEFLEET_CONTEXT), else the current context, else the defaults
(resolve_connection). Pure client-library code: no click, no rich."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.controlplane.client.connection import DEFAULT_SERVER, Connection
from edgefleet.fsutil import atomic_write

CONFIG_ENV = "EDGEFLEET_CONFIG"
FORMAT_VERSION = 1
MAX_NAME_LENGTH = 64
ADD_HINT = "edgefleet context add NAME --server HOST:PORT --token-file FILE"


class ContextError(Exception):
    """A contexts file or a context that cannot be used, said in one line
    that tells what to do."""


@dataclass(frozen=True)
class Context:
    """One named set of connection settings. `ca_cert` is absolute, so the
    context works from any directory."""

    server: str
    token: str | None = None
    ca_cert: Path | None = None

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None


@dataclass
class Contexts:
    """A contexts file's content, and the file it was read from or goes to."""

    path: Path
    contexts: dict[str, Context] = field(default_factory=dict)
    current: str | None = None

    def names(self) -> list[str]:
        return sorted(self.contexts)

    def get(self, name: str) -> Context:
        """The context called `name`; ContextError naming the known ones."""
        try:
            return self.contexts[name]
        except KeyError:
            raise ContextError(self._unknown(name)) from None

    def add(self, name: str, context: Context, *, overwrite: bool = False) -> None:
        validate_name(name)
        if name in self.contexts and not overwrite:
            raise ContextError(
                f"context {name!r} exists already: pass --overwrite to replace it, "
                f"or remove it first (edgefleet context rm {name})"
            )
        self.contexts[name] = context

    def use(self, name: str) -> Context:
        """Make `name` the current context; the context."""
        context = self.get(name)
        self.current = name
        return context

    def remove(self, name: str) -> bool:
        """Remove `name`; whether it was the current context (then none is)."""
        self.get(name)
        del self.contexts[name]
        if self.current != name:
            return False
        self.current = None
        return True

    def _unknown(self, name: str) -> str:
        if not self.contexts:
            return f"no context named {name!r}: {self.path} holds none (add one: {ADD_HINT})"
        return f"no context named {name!r} in {self.path}; known: {', '.join(self.names())}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "current": self.current,
            "contexts": {
                name: {
                    "server": c.server,
                    "token": c.token,
                    "ca_cert": None if c.ca_cert is None else str(c.ca_cert),
                }
                for name, c in sorted(self.contexts.items())
            },
        }


def contexts_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the contexts file is: $EDGEFLEET_CONFIG, else under
    $XDG_CONFIG_HOME, else under ~/.config."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative path there.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"
    return base / "edgefleet" / "contexts.json"


def validate_name(name: str) -> str:
    """`name` when it can name a context: 1 to 64 printable characters, no
    spaces, not starting with '-'. ContextError saying what is wrong."""
    if not name:
        raise ContextError("a context name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ContextError(
            f"context name {name[:20]!r}... is {len(name)} characters long: "
            f"at most {MAX_NAME_LENGTH}"
        )
    if not name.isprintable() or any(ch.isspace() for ch in name):
        raise ContextError(f"context name {name!r} must not hold spaces or control characters")
    if name.startswith("-"):
        raise ContextError(f"context name {name!r} must not start with '-' (reads as an option)")
    return name


def _validate_token(token: str, where: str) -> str:
    if not token:
        raise ContextError(f"{where} is empty: expected an operator token")
    if not token.isprintable() or any(ch.isspace() for ch in token):
        raise ContextError(f"{where} does not look like a token: it holds spaces or line breaks")
    return token


def read_token_file(path: Path) -> str:
    """The token in `path` (an operator token or a data dir's admin-token),
    surrounding whitespace removed."""
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ContextError(f"token file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ContextError(f"token file {path} is not text: expected an operator token") from None
    except OSError as err:
        raise ContextError(f"token file {path}: {err.strerror or err}") from None
    return _validate_token(text.strip(), f"token file {path}")


def make_context(server: str, token: str | None = None, ca_cert: Path | None = None) -> Context:
    """A context from what an operator typed: the server checked, the token
    checked, the CA certificate's path made absolute."""
    server = server.strip()
    if not server or any(ch.isspace() for ch in server):
        raise ContextError(f"server {server!r} is not an address: expected HOST:PORT")
    if token is not None:
        _validate_token(token, "the token")
    return Context(server, token, None if ca_cert is None else ca_cert.expanduser().absolute())


# ------------------------------------------------------------------ the file


def load(path: Path) -> Contexts:
    """The contexts in `path`; none when it does not exist. ContextError when
    it is unreadable, not a contexts file, or open to other users."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Contexts(path)
    except OSError as err:
        raise ContextError(f"cannot read contexts file {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        # open() of a directory's descriptor fails naming the descriptor.
        os.close(fd)
        raise ContextError(
            f"contexts file {path} is not a file (a directory?); "
            "point EDGEFLEET_CONFIG at a file, e.g. DIR/contexts.json"
        )
    with os.fdopen(fd, "rb") as file:
        _check_private(path, os.fstat(file.fileno()))
        try:
            raw = file.read()
        except OSError as err:  # a directory, say
            raise ContextError(f"cannot read contexts file {path}: {err.strerror or err}") from None
    return _parse(path, raw)


def _check_private(path: Path, st: os.stat_result) -> None:
    # What ssh does with a private key ("UNPROTECTED PRIVATE KEY FILE", the
    # key is not used): refuse, not warn. The file holds bearer tokens; a
    # warning scrolls past while they stay readable, a refusal gets the mode
    # fixed once. Like ssh, only a file of one's own is held to it (one that
    # root keeps for a shared account is root's business).
    mode = stat.S_IMODE(st.st_mode)
    if os.name == "posix" and st.st_uid == os.getuid() and mode & 0o077:
        raise ContextError(
            f"contexts file {path} holds tokens and other users may open it "
            f"(mode {mode:04o}): run chmod 600 {path}"
        )


def _corrupt(path: Path, detail: str) -> ContextError:
    return ContextError(
        f"{path} is not a valid contexts file ({detail}): fix it, or move it away "
        "and add the contexts again (edgefleet context add)"
    )


def _optional_str(value: Any, path: Path, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _corrupt(path, f"{where} is not a string")
    return value


def _parse(path: Path, raw: bytes) -> Contexts:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise _corrupt(path, "not a JSON object")
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise _corrupt(path, f"format version {data.get('version')!r}, this edgefleet reads 1")
    entries = data.get("contexts", {})
    if not isinstance(entries, dict):
        raise _corrupt(path, '"contexts" is not an object')
    contexts = Contexts(path)
    for name, entry in entries.items():
        try:
            validate_name(name)
        except ContextError as err:
            raise _corrupt(path, str(err)) from None
        if not isinstance(entry, dict):
            raise _corrupt(path, f"context {name!r} is not an object")
        server = _optional_str(entry.get("server"), path, f"the server of context {name!r}")
        if not server:
            raise _corrupt(path, f"context {name!r} has no server")
        token = _optional_str(entry.get("token"), path, f"the token of context {name!r}")
        ca_cert = _optional_str(entry.get("ca_cert"), path, f"the ca_cert of context {name!r}")
        contexts.contexts[name] = Context(server, token, Path(ca_cert) if ca_cert else None)
    current = _optional_str(data.get("current"), path, '"current"')
    if current is not None and current not in contexts.contexts:
        raise _corrupt(path, f"the current context {current!r} is not among its contexts")
    contexts.current = current
    return contexts


@contextlib.contextmanager
def editing(path: Path) -> Iterator[Contexts]:
    """The contexts in `path` to change, saved when the block ends without
    an exception. Edits take turns: a lock (flock) on a file beside it is
    held from the read to the rename. Without it, two `context add` at once
    each read the file before the other's rename, both said "saved", and
    the later write dropped the earlier context."""
    import fcntl  # POSIX, as the CLI's other file handling

    _make_private_dirs(path.parent)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        contexts = load(path)
        yield contexts
        save(contexts)
    finally:
        os.close(fd)  # and with it the lock


def save(contexts: Contexts) -> None:
    """Write the file whole (atomic_write: a private temporary file beside
    it, renamed over it), so a reader sees the old file or the new one and
    the tokens are never readable by others, not even for a moment."""
    _make_private_dirs(contexts.path.parent)
    data = json.dumps(contexts.to_dict(), indent=2) + "\n"
    atomic_write(contexts.path, data.encode("utf-8"), mode=0o600)


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents mode 0700 (as the XDG spec
    asks); existing ones keep their mode."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for each in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            os.mkdir(each, 0o700)


# ------------------------------------------------------------------ resolution


def choose(
    contexts: Contexts,
    *,
    server: str | None,
    token: str | None,
    ca_cert: Path | None,
    context: str | None,
) -> Connection:
    """The connection from the explicit settings (options or environment;
    None when not given) over the named context, else the current one, else
    the defaults."""
    chosen: Context | None = None
    name = context if context is not None else contexts.current
    if context is not None:
        chosen = contexts.get(context)
    elif contexts.current is not None:
        chosen = contexts.get(contexts.current)
        # A context's token was issued by its own server: a --server (or
        # EDGEFLEET_SERVER) naming another one must not be sent it, nor be
        # held to its CA. Naming the context too (--context) says it is meant.
        if server is not None and server != chosen.server:
            return Connection(server, token, ca_cert, set_aside=contexts.current)
    if chosen is None:
        if server is not None:
            return Connection(server, token, ca_cert)
        return Connection(
            DEFAULT_SERVER,
            token,
            ca_cert,
            origin="the default address: no --server, EDGEFLEET_SERVER or context in use",
        )
    return Connection(
        server if server is not None else chosen.server,
        token if token is not None else chosen.token,
        ca_cert if ca_cert is not None else chosen.ca_cert,
        origin="" if server is not None else f"the server of context {name!r}",
        context=name or "",
    )


def set_aside_hint(connection: Connection) -> str:
    """For a call refused for want of a token: the context in use that
    --server (or EDGEFLEET_SERVER) left out, and how to use it anyway; ""
    when no context was set aside or a token was sent."""
    if not connection.set_aside or connection.token:
        return ""
    name = connection.set_aside
    return (
        f"context {name!r} (in use) was left out, with its token, because --server names "
        f"another server than its own: add --context {name} to send its token there, or --token"
    )


def resolve_connection(
    *,
    server: str | None,
    token: str | None,
    ca_cert: Path | None,
    context: str | None,
    path: Path | None = None,
) -> Connection:
    """choose() over the contexts file at `path` (default: contexts_path()),
    which is not read when every setting is given and no context named."""
    if context is None and server is not None and token is not None and ca_cert is not None:
        return Connection(server, token, ca_cert)
    return choose(
        load(path or contexts_path()), server=server, token=token, ca_cert=ca_cert, context=context
    )
