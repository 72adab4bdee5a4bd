"""The persisted update record of one model: state_dir/models/<model>/update.json
(layout.py; state_dir/update.json for a store made without a model name, as
in the machine's own tests), written atomically
(edgefleet.fsutil.atomic_write) by the machine before each state's side
effects, and loaded on restart. Bytes (manifest, statement, signatures,
rotations) are hex."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.agent.disk import write_error
from edgefleet.agent.errors import StateError
from edgefleet.fsutil import atomic_write

from .layout import model_dir
from .states import State

UPDATE_FILE = "update.json"


@dataclass(frozen=True)
class Assignment:
    """The artifact to install, as the control plane assigned it."""

    model_name: str
    model_version: str
    artifact_digest: str  # sha256 hex of the artifact
    artifact_size: int
    manifest: bytes  # serialized ArtifactManifest, exactly the signed bytes
    manifest_signature: bytes
    rollout_id: str = ""
    sequence: int = 0
    # A shadow stage: load the artifact beside the active model and mirror
    # requests to it, but never make it active (docs/agent-updates.md).
    shadow: bool = False
    # The signed AssignmentStatement and its signature (agent/update/trust.py).
    statement: bytes = b""
    statement_signature: bytes = b""
    # The control plane's signed permission to go back to an older version.
    rollback: bool = False
    # The desired state's key rotations, oldest first: (statement, signature).
    key_rotations: tuple[tuple[bytes, bytes], ...] = ()
    # Where to fetch the artifact over HTTP(S) before DownloadArtifact, in
    # order: (base URL, whether it is the control plane itself). Unsigned:
    # the bytes are checked against the signed digest whatever their source.
    sources: tuple[tuple[str, bool], ...] = ()
    # The device class's cap on the download, bytes/s (0: none); the agent
    # keeps to the lower of this and its own max_download_rate.
    max_download_rate: int = 0


@dataclass
class UpdateRecord:
    state: State = State.IDLE
    assignment: Assignment | None = None
    bytes_downloaded: int = 0
    # State name -> handler runs in this update (restarts included).
    attempts: dict[str, int] = field(default_factory=dict)
    # Handler runs in this update over all states: the loop guard's counter.
    loops: int = 0
    # The artifact that was active before this update (Activator.active()).
    previous: str | None = None
    # Why the update failed (set by the first fatal failure, kept to the end).
    reason: str | None = None
    # "committed" or "failed" once the update settled; None while it runs.
    outcome: str | None = None
    # Set by UpdateMachine.abort(); honoured before activation.
    abort_reason: str | None = None
    # The states this update went through, in order.
    history: list[str] = field(default_factory=list)

    @property
    def pending(self) -> bool:
        """An assignment waits to be (or is being) installed."""
        return self.assignment is not None and self.outcome is None


_BYTES = ("manifest", "manifest_signature", "statement", "statement_signature")


def _encode(record: UpdateRecord) -> bytes:
    document = asdict(record)
    document["state"] = record.state.value
    if record.assignment is not None:
        written = document["assignment"]
        for name in _BYTES:
            written[name] = getattr(record.assignment, name).hex()
        written["key_rotations"] = [[a.hex(), b.hex()] for a, b in record.assignment.key_rotations]
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _decode(path: Path, document: Any) -> UpdateRecord:
    try:
        if not isinstance(document, dict):
            raise TypeError("expected a JSON object")
        raw = document.get("assignment")
        assignment = None
        if raw is not None:
            raw = dict(raw)
            # Records written before shadows and statements existed lack those.
            for name in _BYTES:
                raw[name] = bytes.fromhex(raw.get(name, ""))
            raw["shadow"] = bool(raw.get("shadow", False))
            raw["rollback"] = bool(raw.get("rollback", False))
            raw["key_rotations"] = tuple(
                (bytes.fromhex(a), bytes.fromhex(b)) for a, b in raw.get("key_rotations", [])
            )
            raw["sources"] = tuple((str(url), bool(cp)) for url, cp in raw.get("sources", []))
            raw["max_download_rate"] = int(raw.get("max_download_rate", 0))
            assignment = Assignment(**raw)
        return UpdateRecord(
            state=State(document["state"]),
            assignment=assignment,
            bytes_downloaded=int(document.get("bytes_downloaded", 0)),
            attempts={str(k): int(v) for k, v in document.get("attempts", {}).items()},
            loops=int(document.get("loops", 0)),
            previous=document.get("previous"),
            reason=document.get("reason"),
            outcome=document.get("outcome"),
            abort_reason=document.get("abort_reason"),
            history=[str(s) for s in document.get("history", [])],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: not an update record: {exc}") from exc


class UpdateStore:
    """Loads and saves the update record of `model_name` in `state_dir`.
    `state_dir` stays the device's state directory: the downloads under it
    are shared by every model."""

    def __init__(self, state_dir: Path, model_name: str | None = None) -> None:
        self.state_dir = state_dir
        self.model_name = model_name
        self.directory = state_dir if model_name is None else model_dir(state_dir, model_name)
        self.path = self.directory / UPDATE_FILE

    def load(self) -> UpdateRecord:
        """The stored record; a fresh Idle one when none was written yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return UpdateRecord()
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror or exc}") from exc
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{self.path}: not valid JSON: {exc}") from exc
        return _decode(self.path, document)

    def save(self, record: UpdateRecord) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, _encode(record))
        except OSError as exc:
            raise write_error(self.path, exc) from exc
