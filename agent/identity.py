"""What the agent persists in its state directory, always written atomically:

- identity.json: device id, credential, the server it belongs to, hardware id;
- desired.json: the last applied DesiredState (its revision, labels, class,
  device state, config), in protobuf's JSON mapping;
- hardware-id: a generated id, only on machines without a machine id.

Files are written to a temp file in the same directory, fsynced, renamed over
the old one and the directory fsynced, so a power cut leaves either the old
or the new file, never a torn one. All are mode 0600: identity.json holds a
secret and the others say what the device is. A write that fails for lack
of room raises DiskFull (agent/disk.py), which the agent survives."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from edgefleet.agent.disk import write_error
from edgefleet.agent.errors import StateError

# Re-exported: the agent's state files are written with it (see above).
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import device_pb2

IDENTITY_FILE = "identity.json"
DESIRED_FILE = "desired.json"
TRUSTED_KEYS_FILE = "trusted-keys.json"
HARDWARE_ID_FILE = "hardware-id"
MACHINE_ID_PATHS = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
# Mixed into the machine id before hashing: machine-id(5) asks applications not
# to expose the raw id, and a per-application hash still stays stable.
_APP_KEY = b"edgefleet-agent/hardware-id/v1:"


@dataclass(frozen=True)
class Identity:
    """Who this device is to the control plane at `server`."""

    device_id: str
    device_credential: str
    server: str
    hardware_id: str


def _write_json(path: Path, document: dict[str, Any]) -> None:
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
    try:
        atomic_write(path, data)
    except OSError as exc:
        # DiskFull (the agent carries on and writes again) or StateError.
        raise write_error(path, exc) from exc


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed object in `path`; None when the file does not exist. Raises
    StateError when it exists but is unreadable or not a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise StateError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise StateError(f"{path}: expected a JSON object")
    return document


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state directory (0700) if needed; StateError if impossible."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"{state_dir}: cannot create state directory: {exc.strerror}") from exc
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StateError(f"{state_dir}: state directory is not writable")


LOCK_FILE = "agent.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold state_dir for this process (an exclusive flock on agent.lock,
    which records our pid), or raise StateError naming the agent that holds
    it. Two agents on one state directory would write its files at once,
    take each other's Sync stream, and the one that stops would remove the
    other's inference sockets. The lock goes with the process (kill -9
    included), so there is nothing stale to clean up. Returns the descriptor,
    to keep open for the process's life."""
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot open the state directory's lock: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"{state_dir}: another edgefleet-agent (pid {holder}) is using this state "
            "directory; stop it first, or give this agent its own state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ---------------------------------------------------------------- identity


def save_identity(state_dir: Path, identity: Identity) -> None:
    """Persist `identity` atomically to state_dir/identity.json (mode 0600)."""
    _write_json(state_dir / IDENTITY_FILE, asdict(identity))


def load_identity(state_dir: Path) -> Identity | None:
    """The stored identity, or None when the agent has not enrolled yet.
    Raises StateError when the file exists but is damaged."""
    path = state_dir / IDENTITY_FILE
    document = _read_json(path)
    if document is None:
        return None
    try:
        values = {key: document[key] for key in Identity.__dataclass_fields__}
    except KeyError as exc:
        raise StateError(f"{path}: missing key {exc.args[0]!r}") from None
    if not all(isinstance(value, str) and value for value in values.values()):
        raise StateError(f"{path}: every value must be a non-empty string")
    return Identity(**values)


# ---------------------------------------------------------------- pinned signing keys


def signing_key_id(public_key: bytes) -> str:
    """The id the control plane derives from an ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def save_trusted_keys(state_dir: Path, keys: dict[str, bytes]) -> None:
    """Pin the control plane's manifest-signing keys (key id -> raw ed25519
    public key). Refuses a key whose id does not match its bytes."""
    for key_id, public_key in keys.items():
        if len(public_key) != 32 or signing_key_id(public_key) != key_id:
            raise StateError(f"signing key {key_id!r} does not match its public key; not pinned")
    document = {key_id: public_key.hex() for key_id, public_key in sorted(keys.items())}
    _write_json(state_dir / TRUSTED_KEYS_FILE, document)


def load_trusted_keys(state_dir: Path) -> dict[str, bytes]:
    """The pinned keys; empty before the first enrollment."""
    path = state_dir / TRUSTED_KEYS_FILE
    document = _read_json(path) or {}
    try:
        return {str(k): bytes.fromhex(str(v)) for k, v in document.items()}
    except ValueError as exc:
        raise StateError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- desired state


def desired_to_document(desired: device_pb2.DesiredState) -> dict[str, Any]:
    """DesiredState in protobuf's JSON mapping with proto field names and every
    field present, except that the revision is a JSON number (the mapping
    writes uint64 as a string; parsing accepts either)."""
    document = json_format.MessageToDict(
        desired,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )
    document["revision"] = desired.revision
    return document


def save_desired(state_dir: Path, desired: device_pb2.DesiredState) -> None:
    """Persist the applied desired state atomically to state_dir/desired.json."""
    _write_json(state_dir / DESIRED_FILE, desired_to_document(desired))


def load_desired(state_dir: Path) -> device_pb2.DesiredState | None:
    """The last applied desired state, or None when none was applied yet.
    Raises StateError when the file exists but is damaged."""
    path = state_dir / DESIRED_FILE
    document = _read_json(path)
    if document is None:
        return None
    desired = device_pb2.DesiredState()
    try:
        # Unknown fields: a newer agent may have written fields this one lacks.
        json_format.ParseDict(document, desired, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise StateError(f"{path}: not a desired state: {exc}") from exc
    return desired


def forget_desired(state_dir: Path) -> None:
    """Remove desired.json: revisions belong to one device id, so a different
    device id starts again from revision 0."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / DESIRED_FILE).unlink()


# ---------------------------------------------------------------- hardware id


def hardware_id_from_machine_id(machine_id: str) -> str:
    """A stable, application-specific id derived from the machine id."""
    digest = hashlib.sha256(_APP_KEY + machine_id.strip().encode()).hexdigest()
    return f"mid-{digest[:32]}"


def resolve_hardware_id(
    configured: str | None,
    state_dir: Path,
    machine_id_paths: tuple[Path, ...] = MACHINE_ID_PATHS,
) -> str:
    """The hardware id to enroll with: the configured one; else derived from the
    first non-empty machine-id file; else a random id generated once and kept
    in state_dir/hardware-id, so it survives restarts (but not a wiped state
    directory, which is the best a machine without a machine id allows)."""
    if configured:
        return configured
    for path in machine_id_paths:
        try:
            machine_id = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        # systemd writes "uninitialized" before first boot completes.
        if machine_id and machine_id != "uninitialized":
            return hardware_id_from_machine_id(machine_id)
    stored_path = state_dir / HARDWARE_ID_FILE
    try:
        stored = stored_path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        stored = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError(f"{stored_path}: cannot read: {exc}") from exc
    if stored:
        return stored
    generated = f"gen-{uuid.uuid4().hex}"
    try:
        atomic_write(stored_path, (generated + "\n").encode())
    except OSError as exc:
        raise write_error(stored_path, exc) from exc
    return generated
