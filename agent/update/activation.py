"""The Activator port over the ModelHost, and the record of what is active.

There is one HostActivator per model name (a device holds several models,
each with its own update machine); each touches only its model's slot of the
shared ModelHost. <state_dir>/models/<model>/active.json (layout.py) names
the active artifact and, until the update commits, the standby (the one it
replaced). It is written atomically *after*
the host switched, so it only ever names artifacts that loaded and warmed on
this device; at boot, `restore()` loads what it names, and the daemon serves
that. The artifact files stay in <state_dir>/downloads/<digest> (only
complete, hash-checked files ever get that name) until a commit drops the
standby.

Crash cases, with the machine's rule that a restart in Activating rolls back:
- killed before the switch: active.json names the old model; the rollback
  finds it active and only makes sure it is loaded.
- killed after the switch, before active.json was written: same as above.
- killed after active.json was written: the new model is restored at boot,
  then the rollback loads the standby from disk and makes it active again.
Either way the device ends on the old model and says so.

A shadow (a rollout's shadow stage, Activator.shadow) is recorded as the
"shadow" entry, written after it loaded and warmed, and restored at boot
beside the active model. A commit keeps it and its file; a rollback or the
next activation drops it (and the next commit deletes its file unless it
became the active one).

The downloads are shared by every model (by digest): a commit deletes only
the files no model still needs, asking `in_use` for the digests the other
models' records name (active, standby, shadow, or an update in flight).

Fallback artifacts (fallback.py): an Installed version whose manifest names
a fallback records its digest too (`fallback_digest`), and is loaded with it:
the host serves whichever of the two it prefers (agent/serving.py). Its file
lives and goes with its version: `digests()` names it beside the primary, so
a commit keeps the active version's fallback (and a restart or a rollback
finds the previous version's, until the commit drops that version), and
deletes it once no record names it."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.disk import write_error
from edgefleet.agent.errors import DiskFull, StateError
from edgefleet.agent.runtimes import ONNXRUNTIME, TENSORRT, TFLITE, TensorInfo
from edgefleet.agent.serving import Artifact, ModelHost, ModelSpec, ServingError, decode_tensor
from edgefleet.fsutil import atomic_write
from edgefleet.v1 import common_pb2

from .download import DOWNLOADS_DIR, artifact_path
from .fallback import fallback_of
from .layout import model_dir
from .ports import FatalUpdateError

if TYPE_CHECKING:
    # Annotations only: an idle agent (no model) should not pay numpy's
    # ~12 MB of RSS; decode_tensor imports it when a tensor is decoded.
    import numpy as np

log = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
RUNTIME_NAMES = {
    common_pb2.RUNTIME_ONNXRUNTIME: ONNXRUNTIME,
    common_pb2.RUNTIME_TFLITE: TFLITE,
    common_pb2.RUNTIME_TENSORRT: TENSORRT,
}


@dataclass(frozen=True)
class Installed:
    """An artifact on this device that the host can load."""

    model_name: str
    model_version: str
    digest: str
    manifest_hex: str
    # The version's fallback artifact (its manifest's fallback_manifest);
    # "" when it has none. Records written before fallbacks lack it.
    fallback_digest: str = ""

    @classmethod
    def of(cls, manifest: bytes) -> Installed:
        """The version a (verified) manifest describes."""
        parsed = parse_manifest(manifest)
        fallback = fallback_of(manifest)
        return cls(
            parsed.model_name,
            parsed.model_version,
            parsed.sha256,
            manifest.hex(),
            fallback.digest if fallback is not None else "",
        )

    @property
    def manifest(self) -> common_pb2.ArtifactManifest:
        parsed = common_pb2.ArtifactManifest()
        parsed.ParseFromString(bytes.fromhex(self.manifest_hex))
        return parsed

    @property
    def digests(self) -> set[str]:
        """Its artifact files: the primary's and, if any, the fallback's."""
        return {self.digest, self.fallback_digest} - {""}


@dataclass(frozen=True)
class ActiveRecord:
    active: Installed | None = None
    # The artifact `active` replaced, kept until the update commits.
    standby: Installed | None = None
    # Loaded beside `active`, mirrored to, never answering (a shadow stage).
    shadow: Installed | None = None


def parse_manifest(manifest: bytes) -> common_pb2.ArtifactManifest:
    parsed = common_pb2.ArtifactManifest()
    parsed.ParseFromString(manifest)
    return parsed


def model_spec(manifest: common_pb2.ArtifactManifest) -> ModelSpec:
    """The source model's inputs and outputs, as the manifest lists them."""

    def infos(specs: Any) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(s.name, s.dtype, tuple(int(d) for d in s.shape)) for s in specs)

    return ModelSpec(infos(manifest.inputs), infos(manifest.outputs))


def golden_inputs(manifest: common_pb2.ArtifactManifest) -> dict[str, np.ndarray] | None:
    """The first golden sample's inputs (to warm a model with real data)."""
    if not manifest.golden:
        return None
    return {
        t.name: decode_tensor(t.name, t.dtype, list(t.shape), t.data)
        for t in manifest.golden[0].inputs
    }


class ActiveStore:
    """Reads and writes active.json in `directory` (a model's directory)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ACTIVE_FILE

    def load(self) -> ActiveRecord:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return ActiveRecord()
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.path}: cannot read: {exc}") from exc
        try:
            return ActiveRecord(
                active=Installed(**document["active"]) if document.get("active") else None,
                standby=Installed(**document["standby"]) if document.get("standby") else None,
                shadow=Installed(**document["shadow"]) if document.get("shadow") else None,
            )
        except (KeyError, TypeError) as exc:
            raise StateError(f"{self.path}: not an active-model record: {exc}") from exc

    def save(self, record: ActiveRecord) -> None:
        document = {
            "active": asdict(record.active) if record.active else None,
            "standby": asdict(record.standby) if record.standby else None,
        }
        if record.shadow is not None:  # absent otherwise: the file stays as it was
            document["shadow"] = asdict(record.shadow)
        data = (json.dumps(document, indent=2) + "\n").encode()
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == data:
                # Already says so (a rollback to what is on record, a retried
                # step): no write, so none to fail on a full disk.
                return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, data)
        except OSError as exc:
            raise write_error(self.path, exc) from exc

    def digests(self) -> set[str]:
        """Every artifact this record names (a missing or unreadable record:
        none; cleanup then keeps fewer files, never deletes more)."""
        try:
            record = self.load()
        except StateError:
            return set()
        named: set[str] = set()
        for installed in (record.active, record.standby, record.shadow):
            if installed is not None:
                named |= installed.digests
        return named


class HostActivator:
    """Implements the Activator port: switches the ModelHost between
    installed artifacts and records what is active. `model_name` picks the
    model's directory (None: the state directory itself, as in tests of one
    model); `in_use` gives the digests other models still need, which a
    commit must not delete."""

    def __init__(
        self,
        host: ModelHost,
        state_dir: Path,
        model_name: str | None = None,
        *,
        in_use: Callable[[], set[str]] = set,
    ) -> None:
        self.host = host
        self.state_dir = state_dir
        self.model_name = model_name
        self._in_use = in_use
        directory = state_dir if model_name is None else model_dir(state_dir, model_name)
        self.store = ActiveStore(directory)

    # ------------------------------------------------------------ boot

    def restore(self) -> Installed | None:
        """Load what active.json names (at boot); the standby if the active
        artifact no longer loads; and the shadow, if any. Returns what is
        served."""
        record = self.store.load()
        served = None
        for candidate in (record.active, record.standby):
            if candidate is None:
                continue
            try:
                self._load(candidate)
            except FatalUpdateError as exc:
                log.error("cannot restore %s %s: %s", candidate.model_name,
                          candidate.model_version, exc.message)  # fmt: skip
                continue
            self.host.commit(candidate.model_name)
            if candidate is not record.active:
                self._save_at_boot(ActiveRecord(active=candidate, shadow=record.shadow))
            served = candidate
            break
        if record.shadow is not None:
            try:
                self._load(record.shadow, shadow=True)
            except FatalUpdateError as exc:
                # Serving comes first: a shadow that no longer loads is
                # forgotten (its stage sees no mirrored requests from here).
                log.error("cannot restore the shadow %s %s: %s", record.shadow.model_name,
                          record.shadow.model_version, exc.message)  # fmt: skip
                self._save_at_boot(ActiveRecord(active=served))
        return served

    def _save_at_boot(self, record: ActiveRecord) -> None:
        """Record what restore() serves, unless the disk is full: serving
        comes first, and the next start makes the same choice again."""
        try:
            self.store.save(record)
        except DiskFull as exc:
            log.warning("%s; serving anyway", exc.message)

    # ------------------------------------------------------------ the port

    def current(self) -> Installed | None:
        """What is active now (from the record)."""
        return self.store.load().active

    def active(self) -> str | None:
        current = self.current()
        return current.digest if current else None

    def activate(self, path: Path, manifest: bytes) -> None:
        new = Installed.of(manifest)
        record = self.store.load()
        # A retried activation must keep the committed artifact as standby.
        standby = record.standby if record.active and record.active.digest == new.digest else None
        standby = standby or record.active
        # An activation ends any shadow stage; dropped first so a small
        # device never holds active, standby, shadow and the new model at once.
        self._drop_shadow(record)
        self._load(new, path, require_fallback=True)
        self.store.save(ActiveRecord(active=new, standby=standby))

    def shadow(self, path: Path, manifest: bytes) -> None:
        # Its fallback is recorded (its file kept for when the version is
        # assigned for real) but not loaded: a shadow is compared as built.
        new = Installed.of(manifest)
        record = self.store.load()
        self._load(new, path, shadow=True)
        if record.shadow is not None and record.shadow.model_name != new.model_name:
            self.host.drop_shadow(record.shadow.model_name)  # one shadow at a time
        self.store.save(ActiveRecord(active=record.active, standby=record.standby, shadow=new))

    def rollback(self, previous: str | None) -> None:
        record = self.store.load()
        active, standby = record.active, record.standby
        # Whatever failed, a shadow goes with it (every record saved below
        # leaves it out).
        self._drop_shadow(record)
        if previous is None:
            if active is not None:
                # Nothing was active before: serve nothing (apps get
                # FAILED_PRECONDITION, not a model that failed).
                self.host.remove(active.model_name)
                self.host.declare(active.model_name)
            self.store.save(ActiveRecord())
            return
        if active is not None and active.digest == previous:
            if not self._serving(active):
                self._load(active)
                self.host.commit(active.model_name)
            self.store.save(ActiveRecord(active=active))
            return
        if standby is None or standby.digest != previous:
            raise FatalUpdateError(
                f"cannot roll back: the previous artifact {previous[:12]} is no longer on record"
            )
        restored = self.host.standby(standby.model_name) if active else None
        if (
            active is not None
            and active.model_name == standby.model_name
            and restored is not None
            and restored.primary_digest == standby.digest
        ):
            self.host.rollback(active.model_name)  # the warm standby: no load
        else:
            self._load(standby)
            self.host.commit(standby.model_name)
            if active is not None and active.model_name != standby.model_name:
                self.host.remove(active.model_name)
        self.store.save(ActiveRecord(active=standby))

    def commit(self) -> None:
        record = self.store.load()
        if record.active is None:
            return
        self.host.commit(record.active.model_name)
        dropped = record.standby
        if dropped is not None and dropped.model_name != record.active.model_name:
            self.host.remove(dropped.model_name)
        # A shadow stays loaded and on disk: committing a shadow update is
        # what makes it the shadow for the rest of its stage.
        self.store.save(ActiveRecord(active=record.active, shadow=record.shadow))
        keep = set(record.active.digests)
        if record.shadow is not None:
            keep |= record.shadow.digests
        self._remove_unused(keep)

    # ------------------------------------------------------------ helpers

    def _serving(self, installed: Installed) -> bool:
        try:
            # Whichever of its artifacts serves, the version is named by its primary.
            return self.host.active(installed.model_name).primary_digest == installed.digest
        except ServingError:
            return False

    def _drop_shadow(self, record: ActiveRecord) -> None:
        if record.shadow is not None:
            self.host.drop_shadow(record.shadow.model_name)

    def _load(
        self,
        installed: Installed,
        path: Path | None = None,
        *,
        shadow: bool = False,
        require_fallback: bool = False,
    ) -> None:
        """Load and warm `installed` as the active version of its model
        (the slot's pending activation; with its fallback, if it has one)
        or, with `shadow`, as its shadow (the primary only). A fallback
        that cannot be used fails a new version (`require_fallback`); a
        version restored or rolled back to serves its primary without it
        (logged): serving comes first."""
        manifest = installed.manifest
        runtime = RUNTIME_NAMES.get(manifest.runtime)
        if runtime is None:
            raise FatalUpdateError(f"unknown runtime in the manifest ({manifest.runtime})")
        path = path or artifact_path(self.state_dir, installed.digest)
        if not path.exists():
            raise FatalUpdateError(f"artifact {installed.digest[:12]} missing from {path.parent}")
        # What a shadow and an activation load alike.
        what = (installed.model_name, installed.model_version, installed.digest, path, runtime,
                model_spec(manifest))  # fmt: skip
        warm_up = golden_inputs(manifest)
        try:
            if shadow:
                self.host.load_shadow(*what, golden_inputs=warm_up)
                return
            self.host.activate(
                *what,
                golden_inputs=warm_up,
                fallback=self._fallback(installed, required=require_fallback),
            )
        except ServingError as exc:
            raise FatalUpdateError(exc.message) from exc

    def _fallback(self, installed: Installed, *, required: bool) -> Artifact | None:
        """What the host loads for `installed`'s fallback; None: it has none
        (or, unless `required`, it cannot be used: logged)."""
        try:
            fallback = fallback_of(bytes.fromhex(installed.manifest_hex))
            if fallback is None:
                return None
            manifest = parse_manifest(fallback.manifest)
            runtime = RUNTIME_NAMES.get(manifest.runtime)
            if runtime is None:
                raise FatalUpdateError(
                    f"{fallback.label}: unknown runtime in its manifest ({manifest.runtime})"
                )
            path = artifact_path(self.state_dir, fallback.digest)
            if not path.exists():
                raise FatalUpdateError(f"{fallback.label} missing from {path.parent}")
            return Artifact(
                fallback.digest, path, runtime, model_spec(manifest), golden_inputs(manifest)
            )
        except FatalUpdateError as exc:
            if required:
                raise
            log.error("%s %s serves its primary artifact only: %s", installed.model_name,
                      installed.model_version, exc.message)  # fmt: skip
            return None

    def _remove_unused(self, keep: set[str]) -> None:
        """Delete downloaded artifacts not in `keep` (committed: nothing can
        roll back to them any more); partial downloads are left alone."""
        downloads = self.state_dir / DOWNLOADS_DIR
        if not downloads.is_dir():
            return
        keep = keep | self._in_use()
        for path in downloads.iterdir():
            if path.name not in keep and "." not in path.name:
                with contextlib.suppress(OSError):
                    path.unlink()
