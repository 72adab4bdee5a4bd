"""The agent's statement checks (agent/update/trust.py), pure: statements and
rotations are made by the control plane's own code (services/statements.py,
domain/signing.py), so both ends agree on the bytes. Plus the trust file's
rules (one device id, new pins on re-enrollment) and the Verifying step
persisting only after every check passed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.identity import Identity, save_identity, save_trusted_keys
from edgefleet.agent.update.machine import UpdateMachine
from edgefleet.agent.update.ports import Chunk, FatalUpdateError, Ports
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.states import State
from edgefleet.agent.update.store import Assignment, UpdateStore
from edgefleet.agent.update.trust import (
    DOWNGRADE,
    REPLAYED,
    UNTRUSTED,
    TrustState,
    TrustStore,
    verify_statement,
    version_key,
    walk_rotations,
    with_commit,
)
from edgefleet.agent.update.verify import DeviceVerifier
from edgefleet.controlplane.domain import signing
from edgefleet.controlplane.services import statements
from edgefleet.v1 import common_pb2

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
DEVICE = "dev-1"
MANIFEST = b"manifest bytes"


@dataclasses.dataclass(frozen=True)
class Key:
    key_id: str
    private: bytes
    public: bytes


def _key() -> Key:
    return Key(*signing.generate())


def _assignment(
    key: Key, sequence: int, version: str = "1.0.0", *, rollback: bool = False,
    shadow: bool = False, device: str = DEVICE, rotations: tuple[tuple[bytes, bytes], ...] = (),
    model: str = "digits",
) -> Assignment:  # fmt: skip
    statement = statements.assignment_statement(
        device_id=device, sequence=sequence, model_name=model, model_version=version,
        artifact_sha256="ab" * 32, manifest_digest=hashlib.sha256(MANIFEST).hexdigest(),
        shadow=shadow, rollback=rollback, key_id=key.key_id, issued_at=NOW, rollout_id="",
        artifact_size=1,
    )  # fmt: skip
    return Assignment(
        model_name=model, model_version=version, artifact_digest="ab" * 32, artifact_size=1,
        manifest=MANIFEST, manifest_signature=b"", sequence=sequence, shadow=shadow,
        statement=statement, statement_signature=signing.sign(key.private, statement),
        rollback=rollback, key_rotations=rotations,
    )  # fmt: skip


def _rotation(old: Key, new: Key, *, signer: Key | None = None) -> tuple[bytes, bytes]:
    statement = statements.rotation_statement(
        previous_key_id=old.key_id, key_id=new.key_id, public_key=new.public, rotated_at=NOW
    )
    return statement, signing.sign((signer or old).private, statement)


def _state(*keys: Key, **kw: object) -> TrustState:
    return TrustState(device_id=DEVICE, keys={k.key_id: k.public for k in keys}, **kw)  # type: ignore[arg-type]


def _refused(state: TrustState, assignment: Assignment) -> str:
    with pytest.raises(FatalUpdateError) as err:
        verify_statement(state, assignment)
    return err.value.message


def test_a_statement_is_accepted_once_and_raises_the_sequence() -> None:
    k1 = _key()
    first = _assignment(k1, 3)
    after = verify_statement(_state(k1), first)
    assert after.sequence == 3
    assert after.statement_sha256 == hashlib.sha256(first.statement).hexdigest()
    # The same statement again (a restart re-runs Verifying) is fine...
    assert verify_statement(after, first) == after
    # ...another one at or below the sequence is a replay.
    assert REPLAYED in _refused(after, _assignment(k1, 3, "2.0.0"))
    assert REPLAYED in _refused(after, _assignment(k1, 2))
    assert verify_statement(after, _assignment(k1, 4)).sequence == 4


def test_what_the_assignment_says_must_be_what_was_signed() -> None:
    k1, other = _key(), _key()
    state = _state(k1)
    good = _assignment(k1, 1)
    assert UNTRUSTED in _refused(state, _assignment(other, 1))
    assert "unsigned" in _refused(state, dataclasses.replace(good, statement=b""))
    flipped = bytearray(good.statement)
    flipped[-1] ^= 1
    assert UNTRUSTED in _refused(state, dataclasses.replace(good, statement=bytes(flipped)))
    assert "for device 'dev-2'" in _refused(state, _assignment(k1, 1, device="dev-2"))
    # Every field outside the signature must agree with the statement.
    for change, what in (
        ({"sequence": 2}, "sequence"),
        ({"model_version": "9.0.0"}, "model version"),
        ({"artifact_digest": "cd" * 32}, "artifact"),
        ({"manifest": b"another manifest"}, "manifest"),
        ({"shadow": True}, "shadow"),
        ({"rollback": True}, "rollback"),
        ({"rollout_id": "made-up"}, "rollout id"),
        ({"artifact_size": 2**40}, "artifact size"),
    ):
        reason = _refused(state, dataclasses.replace(good, **change))  # type: ignore[arg-type]
        assert f"does not match its signed statement: {what}" in reason


def test_a_downgrade_needs_the_rollback_flag_and_shadows_are_exempt() -> None:
    k1 = _key()
    state = with_commit(_state(k1, sequence=1), _assignment(k1, 1, "2.0.0"))
    assert state.committed == {"digits": "2.0.0"}
    assert DOWNGRADE in _refused(state, _assignment(k1, 2, "1.9.9"))
    assert DOWNGRADE in _refused(state, _assignment(k1, 2, "2.0.0-rc.1"))
    assert verify_statement(state, _assignment(k1, 2, "1.0.0", rollback=True)).sequence == 2
    assert verify_statement(state, _assignment(k1, 2, "1.0.0", shadow=True)).sequence == 2
    assert verify_statement(state, _assignment(k1, 2, "2.0.0")).sequence == 2
    # A shadow's commit does not move the committed version.
    assert with_commit(state, _assignment(k1, 2, "3.0.0", shadow=True)) == state


def test_versions_order_by_semver_precedence() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2",
               "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]  # fmt: skip
    assert sorted(ordered, key=version_key) == ordered
    assert version_key("1.0.0+build.5") == version_key("1.0.0")
    with pytest.raises(FatalUpdateError):
        version_key("one")


def test_rotations_are_walked_from_any_trusted_key_and_replace_it() -> None:
    k1, k2, k3 = _key(), _key(), _key()
    chain = (_rotation(k1, k2), _rotation(k2, k3))
    assert walk_rotations({k1.key_id: k1.public}, chain) == {k3.key_id: k3.public}
    # Already past the first link: it is skipped.
    assert walk_rotations({k2.key_id: k2.public}, chain) == {k3.key_id: k3.public}
    assert walk_rotations({k3.key_id: k3.public}, chain) == {k3.key_id: k3.public}
    # A statement by k3 verifies through the chain; the old key no longer does.
    after = verify_statement(_state(k1), _assignment(k3, 1, rotations=chain))
    assert set(after.keys) == {k3.key_id}
    assert UNTRUSTED in _refused(after, _assignment(k1, 2))


def test_a_rotation_not_signed_by_the_key_it_replaces_is_refused() -> None:
    k1, k2, evil = _key(), _key(), _key()
    forged = _rotation(k1, evil, signer=evil)
    with pytest.raises(FatalUpdateError, match="forged"):
        walk_rotations({k1.key_id: k1.public}, (forged,))
    reason = _refused(_state(k1), _assignment(evil, 1, rotations=(_rotation(k1, k2), forged)))
    assert "forged" in reason or UNTRUSTED in reason
    # A link claiming a key id that is not its public key's.
    statement = statements.rotation_statement(
        previous_key_id=k1.key_id, key_id=k2.key_id, public_key=evil.public, rotated_at=NOW
    )
    with pytest.raises(FatalUpdateError, match="key id does not match"):
        walk_rotations({k1.key_id: k1.public}, ((statement, signing.sign(k1.private, statement)),))


def _enrolled(state_dir: Path, device_id: str, *keys: Key) -> TrustStore:
    save_identity(state_dir, Identity(device_id, "efd_x.y", "127.0.0.1:1", "hw"))
    save_trusted_keys(state_dir, {k.key_id: k.public for k in keys})
    return TrustStore(state_dir)


def test_the_trust_file_belongs_to_one_device_and_adopts_new_pins(tmp_path: Path) -> None:
    k1, k2 = _key(), _key()
    store = _enrolled(tmp_path, DEVICE, k1)
    assert store.load() == TrustState(DEVICE, {k1.key_id: k1.public}, (k1.key_id,))
    verified = store.check(_assignment(k1, 5))
    assert not store.path.exists()  # check() persists nothing
    store.accept(verified)
    store.committed(_assignment(k1, 5))
    assert (store.load().sequence, dict(store.load().committed)) == (5, {"digits": "1.0.0"})
    # Re-enrolled as the same device with a new pin: new keys, same history.
    save_trusted_keys(tmp_path, {k2.key_id: k2.public})
    assert (set(store.load().keys), store.load().sequence) == ({k2.key_id}, 5)
    # Another device id: sequences start again.
    save_identity(tmp_path, Identity("dev-2", "efd_x.y", "127.0.0.1:1", "hw"))
    assert (store.load().device_id, store.load().sequence, store.load().committed) == (
        "dev-2", 0, {},
    )  # fmt: skip
    document = json.loads(store.path.read_text())
    assert document["sequence"] == 5 and document["device_id"] == DEVICE


# ---------------------------------------------------------------- in the machine


class _Downloader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def fetch(self, digest: str, offset: int) -> Iterator[Chunk]:
        yield Chunk(offset=offset, data=self.data[offset:], total_size=len(self.data))


class _Validator:
    def validate(self, path: Path, manifest: bytes) -> None:
        pass


class _Activator:
    def __init__(self) -> None:
        self.current: str | None = None

    def active(self) -> str | None:
        return self.current

    def activate(self, path: Path, manifest: bytes) -> None:
        self.current = path.name

    def shadow(self, path: Path, manifest: bytes) -> None:
        pass

    def rollback(self, previous: str | None) -> None:
        self.current = previous

    def commit(self) -> None:
        pass


class _Reporter:
    def report(self, state: State, bytes_done: int, bytes_total: int, reason: str | None) -> None:
        pass


def _signed_update(key: Key, sequence: int, data: bytes, *, manifest_key: Key) -> Assignment:
    digest = hashlib.sha256(data).hexdigest()
    manifest = common_pb2.ArtifactManifest(
        model_name="digits",
        model_version="1.0.0",
        class_name="cpu",
        sha256=digest,
        size_bytes=len(data),
    ).SerializeToString()
    statement = statements.assignment_statement(
        device_id=DEVICE, sequence=sequence, model_name="digits", model_version="1.0.0",
        artifact_sha256=digest, manifest_digest=statements.manifest_sha256(manifest),
        shadow=False, rollback=False, key_id=key.key_id, issued_at=NOW, rollout_id="",
        artifact_size=len(data),
    )  # fmt: skip
    return Assignment(
        model_name="digits", model_version="1.0.0", artifact_digest=digest,
        artifact_size=len(data), manifest=manifest,
        manifest_signature=signing.sign(manifest_key.private, manifest), sequence=sequence,
        statement=statement, statement_signature=signing.sign(key.private, statement),
    )  # fmt: skip


def test_the_machine_writes_the_trusted_state_only_after_every_check_passed(
    tmp_path: Path,
) -> None:
    k1, other = _key(), _key()
    trust = _enrolled(tmp_path, DEVICE, k1)
    data = b"model bytes" * 100
    ports = Ports(
        downloader=_Downloader(data), verifier=DeviceVerifier(tmp_path, lambda: "cpu"),
        validator=_Validator(), activator=_Activator(), reporter=_Reporter(),
        sleep=lambda s: None, trust=trust,
    )  # fmt: skip
    machine = UpdateMachine(UpdateStore(tmp_path), ports)
    # The statement verifies; the manifest is signed by a key nobody trusts.
    machine.assign(_signed_update(k1, 1, data, manifest_key=other))
    record = machine.run_until_settled()
    assert record.outcome == "failed" and "manifest signature" in (record.reason or "")
    assert "verifying" in record.history and not trust.path.exists()
    machine.assign(_signed_update(k1, 2, data, manifest_key=k1))
    assert machine.run_until_settled().outcome == "committed"
    assert (trust.load().sequence, dict(trust.load().committed)) == (2, {"digits": "1.0.0"})
    # Sequence 1 again (a replay, now genuinely signed throughout): refused.
    machine.assign(_signed_update(k1, 1, data, manifest_key=k1))
    record = machine.run_until_settled()
    assert record.outcome == "failed" and REPLAYED in (record.reason or "")
    assert trust.load().sequence == 2


def test_the_runner_hands_older_sequences_to_verification_and_ignores_the_same_one(
    tmp_path: Path,
) -> None:
    k1 = _key()
    _enrolled(tmp_path, DEVICE, k1)
    data = b"model bytes" * 100
    ports = Ports(
        downloader=_Downloader(data), verifier=DeviceVerifier(tmp_path, lambda: "cpu"),
        validator=_Validator(), activator=_Activator(), reporter=_Reporter(),
        sleep=lambda s: None, trust=TrustStore(tmp_path),
    )  # fmt: skip
    runner = UpdateRunner(UpdateMachine(UpdateStore(tmp_path), ports))

    def settle(assignment: Assignment) -> int:
        runner.submit(assignment)
        steps = 0
        while runner._plan_and_act():
            steps += 1
        return steps

    assert settle(_signed_update(k1, 2, data, manifest_key=k1)) > 0
    assert runner.machine.record.outcome == "committed"
    # Sequence 2 signed again (a rotation does that): the same assignment.
    k2 = _key()
    first = runner.machine.record.assignment
    assert first is not None
    statement = statements.with_key(first.statement, k2.key_id)
    again = dataclasses.replace(
        first, statement=statement, statement_signature=signing.sign(k2.private, statement)
    )
    assert settle(again) == 0 and runner.machine.record.assignment == first
    # An older one is not dropped unseen: Verifying refuses it, and says why.
    assert settle(_signed_update(k1, 1, data, manifest_key=k1)) > 0
    record = runner.machine.record
    assert (record.outcome, record.assignment.sequence) == ("failed", 1)  # type: ignore[union-attr]
    assert REPLAYED in (record.reason or "")
    assert settle(_signed_update(k1, 3, data, manifest_key=k1)) > 0
    assert runner.machine.record.outcome == "committed"


# ---------------------------------------------------------------- per model


def _enrolled_model(state_dir: Path, model: str, *keys: Key) -> TrustStore:
    _enrolled(state_dir, DEVICE, *keys)
    return TrustStore(state_dir, model)


def test_sequences_are_checked_per_model_and_keys_stay_device_wide(tmp_path: Path) -> None:
    """Two models' machines run concurrently: model B's assignment 4 may be
    verified after model A's 5; a replay is still refused per model."""
    k1, k2 = _key(), _key()
    a = _enrolled_model(tmp_path, "alpha", k1)
    b = TrustStore(tmp_path, "beta")
    a.accept(a.check(_assignment(k2, 5, model="alpha", rotations=(_rotation(k1, k2),))))
    # The rotation alpha walked is trusted by beta too (device-wide keys).
    assert set(b.load().keys) == {k2.key_id}
    b.accept(b.check(_assignment(k2, 4, model="beta")))
    assert (a.load().sequence, b.load().sequence) == (5, 4)
    with pytest.raises(FatalUpdateError, match=REPLAYED):
        b.check(_assignment(k2, 3, model="beta"))
    assert json.loads((tmp_path / "models" / "beta" / "trust.json").read_text())["sequence"] == 4
    assert "sequence" not in json.loads((tmp_path / "trust.json").read_text()) or (
        json.loads((tmp_path / "trust.json").read_text())["sequence"] == 0
    )


def test_a_removed_models_facts_are_kept_so_a_replay_stays_refused(tmp_path: Path) -> None:
    k1 = _key()
    store = _enrolled_model(tmp_path, "alpha", k1)
    store.accept(store.check(_assignment(k1, 6, "2.0.0", model="alpha")))
    store.committed(_assignment(k1, 6, "2.0.0", model="alpha"))
    store.retire()
    (tmp_path / "models" / "alpha" / "trust.json").unlink()  # the unassign deletes the dir
    again = TrustStore(tmp_path, "alpha")
    with pytest.raises(FatalUpdateError, match=REPLAYED):
        again.check(_assignment(k1, 5, "2.0.0", model="alpha"))
    with pytest.raises(FatalUpdateError, match="downgrade"):
        again.check(_assignment(k1, 7, "1.0.0", model="alpha"))
    again.check(_assignment(k1, 7, "2.1.0", model="alpha"))


def test_the_single_model_layouts_trust_file_bounds_every_model(tmp_path: Path) -> None:
    """Migration: an old agent's trust.json (one sequence for the device, the
    committed versions by model) still refuses replays and downgrades."""
    k1 = _key()
    old = _enrolled(tmp_path, DEVICE, k1)
    old.accept(old.check(_assignment(k1, 9, "3.0.0")))
    old.committed(_assignment(k1, 9, "3.0.0"))
    digits = TrustStore(tmp_path, "digits")
    assert digits.load().sequence == 9
    with pytest.raises(FatalUpdateError, match=REPLAYED):
        digits.check(_assignment(k1, 8, "3.1.0"))
    with pytest.raises(FatalUpdateError, match="downgrade"):
        digits.check(_assignment(k1, 10, "2.0.0"))
    digits.accept(digits.check(_assignment(k1, 10, "3.1.0")))
    assert digits.load().sequence == 10
