"""What the agent trusts, and the statement checks of the Verifying step
(after TUF and Uptane; docs/security.md, "Signed updates").

Trusted state: the signing keys the agent trusts (state_dir/trust.json,
device-wide), and per model (models/<model>/trust.json) the highest
assignment sequence it verified for that model (and that statement's
digest) and the version it last committed. Sequences are issued per device,
over all models, but checked per model: the machines of two models run
concurrently, so model B's older assignment may be verified after model A's
newer one. It is written (atomically) only
after a verification succeeded, never before: trusting what is still being
checked is how TUF clients got CVEs.

The checks, in order, each refusing with a reason that names what failed:

1. key rotations (DesiredState.key_rotations, oldest first): a link whose
   signature verifies with a trusted key (the one it names as previous)
   replaces that key with the new one; a link naming a trusted key that does
   not verify is refused (forged); links from keys the agent never trusted
   or is already past prove nothing and are skipped. The old key is not kept:
   as with a new TUF root, a rotation ends the old key's authority (it is
   usually rotated because it may be compromised);
2. the assignment carries a statement, signed by a key trusted after step 1,
   whose key_id names that key;
3. the statement is for this device and says exactly what the Assignment
   says (sequence, model, version, artifact, sha256 of the manifest bytes,
   shadow, rollback), so no field outside the signature can be swapped;
4. its sequence is above the highest one verified before (replay); the same
   statement again is allowed, since a restart re-runs Verifying;
5. a (non-shadow) version below the one of that model last committed is
   refused unless the statement says rollback.

The functions here are pure; TrustStore reads and writes the file."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from edgefleet.agent.disk import write_error
from edgefleet.agent.errors import StateError
from edgefleet.agent.identity import load_identity, load_trusted_keys, signing_key_id
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2

from .layout import model_dir
from .ports import FatalUpdateError
from .store import Assignment
from .verify import signature_valid

TRUST_FILE = "trust.json"
# Rotation statements are format 1; assignment statements 1 or 2 (format 2
# also signs the rollout id and the artifact's size).
STATEMENT_FORMAT = 1
ASSIGNMENT_FORMATS = (1, 2)

REPLAYED = "replayed assignment"
DOWNGRADE = "downgrade without a signed rollback instruction"
UNTRUSTED = "not signed by a trusted key"

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)


@dataclass(frozen=True)
class TrustState:
    """What the agent trusts; a new value replaces the old one as a whole."""

    device_id: str = ""
    keys: Mapping[str, bytes] = field(default_factory=dict)
    # The enrollment pins (trusted-keys.json) this state started from: a
    # re-enrollment pins anew, and the new pins replace the keys.
    pinned: tuple[str, ...] = ()
    sequence: int = 0
    statement_sha256: str = ""
    committed: Mapping[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------- pure checks


def version_key(version: str) -> tuple[Any, ...]:
    """A key that orders versions by semver precedence (build metadata ignored)."""
    m = _SEMVER.match(version)
    if m is None:
        raise FatalUpdateError(f"model version {version!r} is not a semantic version")
    core = tuple(int(m.group(i)) for i in (1, 2, 3))
    if m.group(4) is None:
        return (core, 1, ())
    # Numeric identifiers sort before alphanumeric ones, numerically.
    pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in m.group(4).split("."))
    return (core, 0, pre)


def walk_rotations(
    keys: Mapping[str, bytes], rotations: tuple[tuple[bytes, bytes], ...]
) -> dict[str, bytes]:
    """The trusted keys after following every rotation the agent can verify."""
    trusted = dict(keys)
    for statement, signature in rotations:
        signer = next(
            (kid for kid, key in trusted.items() if signature_valid(key, statement, signature)),
            None,
        )
        try:
            link = common_pb2.KeyRotationStatement.FromString(statement)
        except DecodeError as exc:
            if signer is None:
                continue
            raise FatalUpdateError(f"key rotation by {signer} does not parse: {exc}") from exc
        if signer is None:
            if link.previous_key_id in trusted:
                raise FatalUpdateError(
                    f"key rotation to {link.key_id or '?'} names trusted key "
                    f"{link.previous_key_id} but is {UNTRUSTED} (forged)"
                )
            continue  # from a key never trusted here, or already walked past
        if link.format_version != STATEMENT_FORMAT or link.previous_key_id != signer:
            raise FatalUpdateError(
                f"key rotation signed by {signer} names {link.previous_key_id!r} as the key "
                f"it replaces (format {link.format_version})"
            )
        if len(link.public_key) != 32 or signing_key_id(link.public_key) != link.key_id:
            raise FatalUpdateError(f"key rotation from {signer}: key id does not match the key")
        del trusted[signer]
        trusted[link.key_id] = link.public_key
    return trusted


def verify_statement(state: TrustState, assignment: Assignment) -> TrustState:
    """The trusted state once `assignment` is accepted (checks 1-5 of the
    module docstring); FatalUpdateError with the reason otherwise."""
    keys = walk_rotations(state.keys, assignment.key_rotations)
    if not assignment.statement:
        raise FatalUpdateError("unsigned assignment: it carries no signed statement")
    signer = next(
        (
            kid
            for kid, key in keys.items()
            if signature_valid(key, assignment.statement, assignment.statement_signature)
        ),
        None,
    )
    if signer is None:
        raise FatalUpdateError(f"assignment statement is {UNTRUSTED}")
    statement = common_pb2.AssignmentStatement.FromString(assignment.statement)
    if statement.format_version not in ASSIGNMENT_FORMATS or statement.key_id != signer:
        raise FatalUpdateError(
            f"assignment statement (format {statement.format_version}) names key "
            f"{statement.key_id!r}, signed by {signer}"
        )
    if statement.device_id != state.device_id:
        raise FatalUpdateError(
            f"assignment statement is for device {statement.device_id!r}, "
            f"this is {state.device_id!r}"
        )
    said = {
        "sequence": (statement.sequence, assignment.sequence),
        "model name": (statement.model_name, assignment.model_name),
        "model version": (statement.model_version, assignment.model_version),
        "artifact": (statement.artifact_sha256, assignment.artifact_digest),
        "manifest": (
            statement.manifest_sha256,
            hashlib.sha256(assignment.manifest).hexdigest(),
        ),
        "shadow": (statement.shadow, assignment.shadow),
        "rollback": (statement.rollback, assignment.rollback),
    }
    if statement.format_version >= 2:
        said["rollout id"] = (statement.rollout_id, assignment.rollout_id)
        said["artifact size"] = (statement.artifact_size, assignment.artifact_size)
    for what, (signed, given) in said.items():
        if signed != given:
            raise FatalUpdateError(
                f"assignment does not match its signed statement: {what} {given!r}, "
                f"the statement says {signed!r}"
            )
    digest = hashlib.sha256(assignment.statement).hexdigest()
    if statement.sequence < state.sequence or (
        statement.sequence == state.sequence and digest != state.statement_sha256
    ):
        raise FatalUpdateError(
            f"{REPLAYED}: sequence {statement.sequence} is not newer than {state.sequence}, "
            "the highest this device verified"
        )
    committed = state.committed.get(statement.model_name)
    if (
        committed is not None
        and not statement.shadow
        and not statement.rollback
        and version_key(statement.model_version) < version_key(committed)
    ):
        raise FatalUpdateError(
            f"{DOWNGRADE}: {statement.model_name} {statement.model_version} is older than "
            f"{committed}, the version this device committed"
        )
    return replace(state, keys=keys, sequence=statement.sequence, statement_sha256=digest)


def with_commit(state: TrustState, assignment: Assignment) -> TrustState:
    """The trusted state once `assignment` committed (shadows change nothing:
    they never become the active version)."""
    if assignment.shadow:
        return state
    committed = dict(state.committed)
    committed[assignment.model_name] = assignment.model_version
    return replace(state, committed=committed)


# ---------------------------------------------------------------- the file


def _document(state: TrustState) -> dict[str, Any]:
    return {
        "device_id": state.device_id,
        "keys": {kid: key.hex() for kid, key in sorted(state.keys.items())},
        "pinned": list(state.pinned),
        "sequence": state.sequence,
        "statement_sha256": state.statement_sha256,
        "committed": dict(sorted(state.committed.items())),
    }


def _parse(path: Path, document: Any) -> TrustState:
    try:
        if not isinstance(document, dict):
            raise TypeError("expected a JSON object")
        return TrustState(
            device_id=str(document["device_id"]),
            keys={str(k): bytes.fromhex(str(v)) for k, v in document["keys"].items()},
            pinned=tuple(str(k) for k in document["pinned"]),
            sequence=int(document["sequence"]),
            statement_sha256=str(document["statement_sha256"]),
            committed={str(k): str(v) for k, v in document["committed"].items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateError(f"{path}: not a trust record: {exc}") from exc


# Device-wide trust.json is read and rewritten by every model's machine (the
# keys a rotation moves to): one lock per process keeps those read-modify-
# write cycles from interleaving.
_DEVICE_LOCK = threading.RLock()


def _model_facts(document: Any) -> tuple[int, str, str]:
    """(sequence, statement_sha256, committed version) of a per-model record."""
    if not isinstance(document, dict):
        raise TypeError("expected a JSON object")
    return (
        int(document["sequence"]),
        str(document["statement_sha256"]),
        str(document.get("committed", "")),
    )


class TrustStore:
    """Implements the Trust port over state_dir/trust.json.

    The state starts from the keys pinned at enrollment (trusted-keys.json)
    and belongs to one device id (sequences count per device): another
    device id starts afresh, and new pins (a re-enrollment) replace the keys
    but keep the sequence and the committed versions.

    With a `model_name` (the agent always passes one), the facts of that
    model (the highest sequence verified for it, that statement's digest,
    the version committed) live in models/<model>/trust.json (layout.py),
    and only the signing-key trust stays device-wide in state_dir/trust.json.
    A model with no record of its own yet starts from, in order: the facts
    kept when it was last removed ("retired" in the device file: a replayed
    old assignment stays refused after an unassign), or the device-wide
    sequence and committed version a single-model agent wrote before
    (migration: the old layout's sequence still bounds every replay)."""

    def __init__(self, state_dir: Path, model_name: str | None = None) -> None:
        self.state_dir = state_dir
        self.model_name = model_name
        self.path = state_dir / TRUST_FILE
        self.model_path = (
            None if model_name is None else model_dir(state_dir, model_name) / TRUST_FILE
        )

    def _read(self, path: Path) -> Any | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            return json.loads(text)
        except ValueError as exc:
            raise StateError(f"{path}: not valid JSON: {exc}") from exc

    def _load_device(self) -> tuple[TrustState, dict[str, Any]]:
        """The device-wide state, and its file's document (for what a
        per-model store keeps in it)."""
        identity = load_identity(self.state_dir)
        device_id = identity.device_id if identity else ""
        pins = load_trusted_keys(self.state_dir)
        pinned = tuple(sorted(pins))
        document = self._read(self.path)
        if document is None:
            return TrustState(device_id=device_id, keys=pins, pinned=pinned), {}
        state = _parse(self.path, document)
        if state.device_id != device_id:
            return TrustState(device_id=device_id, keys=pins, pinned=pinned), {}
        if state.pinned != pinned:
            return replace(state, keys=pins, pinned=pinned), document
        return state, document

    def load(self) -> TrustState:
        with _DEVICE_LOCK:
            device, document = self._load_device()
        if self.model_name is None or self.model_path is None:
            return device
        name = self.model_name
        facts: tuple[int, str, str] | None = None
        own = self._read(self.model_path)
        try:
            if isinstance(own, dict) and own.get("device_id") == device.device_id:
                facts = _model_facts(own)
            elif isinstance(document.get("retired"), dict) and name in document["retired"]:
                facts = _model_facts(document["retired"][name])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.model_path}: not a trust record: {exc}") from exc
        if facts is None:  # the single-model layout's device-wide facts
            facts = (device.sequence, device.statement_sha256, device.committed.get(name, ""))
        sequence, statement, committed = facts
        return replace(
            device,
            sequence=sequence,
            statement_sha256=statement,
            committed={name: committed} if committed else {},
        )

    def save(self, state: TrustState) -> None:
        if self.model_name is None or self.model_path is None:
            self._write(self.path, _document(state))
            return
        with _DEVICE_LOCK:
            _, document = self._load_device()
            # Keys move for every model at once; the legacy facts and the
            # retired models' facts stay as they were.
            updated = {
                "sequence": 0,
                "statement_sha256": "",
                "committed": {},
                **document,
                "device_id": state.device_id,
                "keys": {kid: key.hex() for kid, key in sorted(state.keys.items())},
                "pinned": list(state.pinned),
            }
            if document.get("device_id") != state.device_id:
                updated.update(sequence=0, statement_sha256="", committed={}, retired={})
            self._write(self.path, updated)
        self._write(self.model_path, self._model_document(state))

    def _model_document(self, state: TrustState) -> dict[str, Any]:
        assert self.model_name is not None
        return {
            "device_id": state.device_id,
            "sequence": state.sequence,
            "statement_sha256": state.statement_sha256,
            "committed": state.committed.get(self.model_name, ""),
        }

    def _write(self, path: Path, document: dict[str, Any]) -> None:
        data = (json.dumps(document, indent=2) + "\n").encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(path, data)
        except OSError as exc:
            raise write_error(path, exc) from exc

    def retire(self) -> None:
        """Keep this model's facts in the device-wide file before its
        directory is deleted (an unassign), so the replay and downgrade
        checks still hold if it is assigned again."""
        if self.model_name is None or self.model_path is None:
            return
        state = self.load()
        with _DEVICE_LOCK:
            _, document = self._load_device()
            if not document:
                document = _document(state)
            retired = dict(document.get("retired") or {})
            retired[self.model_name] = self._model_document(state)
            document["retired"] = retired
            self._write(self.path, document)

    # The Trust port.

    def check(self, assignment: Assignment) -> TrustState:
        """Verify without persisting anything; the state to accept()."""
        return verify_statement(self.load(), assignment)

    def accept(self, verified: TrustState) -> None:
        """Persist what check() returned, once every other check passed too."""
        self.save(verified)

    def committed(self, assignment: Assignment) -> None:
        """Record the version `assignment` committed."""
        self.save(with_commit(self.load(), assignment))
