"""What signing assignment statements costs the rollout path.

Every assignment is now written with a signed AssignmentStatement
(services/deployments.assign_devices). This measures, in one run:

* build: 10,000 statements made and serialized, unsigned (the baseline for
  the signature's own cost);
* sign: the same plus an ed25519 signature each with one loaded key
  (signing.Signer, as assign_devices does);
* sign, key per call: signing.sign, which loads the private key for every
  signature (why assign_devices keeps one Signer);
* assign_devices: the real function assigning 10,000 devices on SQLite in
  chunks of 1,000 (a rollout's notify chunk), two versions alternately
  (so half the assignments are rollbacks), statements included; and the
  same with the signer swapped for one that returns 64 zero bytes (the
  baseline: everything but the signatures), the two interleaved ABBA.

Each row runs --runs times after one warm-up; medians are reported.

    python -m bench.bench_signing                 # 10,000 statements, 5 runs
    python -m bench.bench_signing --devices 2000 --runs 3
    python -m bench.bench_signing --smoke         # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgefleet.controlplane.db.bulk import insert_rows
from edgefleet.controlplane.db.engine import make_engine, sqlite_url, upgrade
from edgefleet.controlplane.db.models import (
    ArtifactRow,
    BlobRow,
    BuildRow,
    DeviceClassRow,
    DeviceRow,
    ModelRow,
    ModelVersionRow,
)
from edgefleet.controlplane.db.uow import Database
from edgefleet.controlplane.domain import semver, signing
from edgefleet.controlplane.services.deployments import assign_devices
from edgefleet.controlplane.services.keys import ensure_signing_key
from edgefleet.controlplane.services.statements import assignment_statement, manifest_sha256

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
MANIFEST = bytes(600)  # about the size of a real ArtifactManifest without golden data
CHUNK = 1000
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; one chunk, one run of each row. Figures meaningless.
SMOKE = {"devices": CHUNK, "runs": 1}


class _Unsigned:
    """The baseline's signer: no signature work at all."""

    def __init__(self, private_key: bytes) -> None:
        del private_key

    def sign(self, data: bytes) -> bytes:
        return bytes(64)


def _statements(n: int, sign: Callable[[bytes], bytes] | None) -> None:
    digest = manifest_sha256(MANIFEST)
    for i in range(n):
        statement = assignment_statement(
            device_id=f"dev{i:08d}", sequence=i + 1, model_name="digits", model_version="2.0.0",
            artifact_sha256="ab" * 32, manifest_digest=digest, shadow=False, rollback=False,
            key_id="0123456789abcdef", issued_at=NOW, rollout_id="", artifact_size=1,
        )  # fmt: skip
        if sign is not None:
            sign(statement)


def _fleet(db: Database, devices: int) -> tuple[list[str], list[str]]:
    """A class, two published versions, `devices` accepted devices of the class."""
    with db.unit_of_work() as uow:
        s = uow.session
        s.add(DeviceClassRow(id="cls", name="gw", runtime="onnxruntime", quantization="any"))
        s.add(ModelRow(id="m", name="digits"))
        versions = []
        for n, version in enumerate(("1.0.0", "2.0.0")):
            digest = f"{n:064x}"
            s.add(BlobRow(digest=digest, size_bytes=1, media_type="application/onnx"))
            s.flush()  # no ORM relationships: insert in foreign-key order by hand
            s.add(ModelVersionRow(
                id=f"v{n}", model_id="m", version=version, version_sort=semver.sort_key(version),
                model_digest=digest, size_bytes=1, inputs=[], outputs=[], opset=17,
                created_by="bench",
            ))  # fmt: skip
            s.flush()
            s.add(BuildRow(id=f"b{n}", model_version_id=f"v{n}", class_id="cls", class_name="gw",
                           target={"runtime": "onnxruntime"}, state="succeeded", dedup_key=f"k{n}",
                           finished_at=NOW))  # fmt: skip
            versions.append(f"v{n}")
        uow.commit()
    key = ensure_signing_key(db)
    with db.unit_of_work() as uow:
        for n in range(2):
            uow.session.add(ArtifactRow(
                id=f"a{n}", digest=f"{n:064x}", media_type="application/onnx", size_bytes=1,
                manifest=MANIFEST, signature=signing.sign(key.private_key, MANIFEST),
                key_id=key.key_id, build_id=f"b{n}", model_version_id=f"v{n}", class_name="gw",
            ))  # fmt: skip
        ids = [f"dev{i:08d}" for i in range(devices)]
        insert_rows(uow.session, DeviceRow, [
            {"id": i, "hardware_id": i, "name": i, "state": "accepted", "credential_hash": "",
             "class_id": "cls"}
            for i in ids
        ])  # fmt: skip
        uow.commit()
    return ids, versions


def _assign_all(db: Database, ids: list[str], version_id: str) -> None:
    for start in range(0, len(ids), CHUNK):
        with db.unit_of_work() as uow:
            mv = uow.session.get_one(ModelVersionRow, version_id)
            done = assign_devices(uow.session, mv, ids[start : start + CHUNK], actor="bench")
            assert all(not isinstance(v, str) for v in done.values())
            uow.commit()


def _median(runs: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    n = args.devices
    _, private, _ = signing.generate()
    signer = signing.Signer(private)
    build = _median(args.runs, lambda: _statements(n, None))
    signed = _median(args.runs, lambda: _statements(n, signer.sign))
    per_call = _median(args.runs, lambda: _statements(n, lambda data: signing.sign(private, data)))
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(sqlite_url(Path(tmp)))
        upgrade(engine)
        db = Database(engine)
        ids, versions = _fleet(db, n)
        turn = iter(range(10**9))
        timed: dict[bool, list[float]] = {True: [], False: []}
        # assign_devices looks the class up in the module at each call.
        real_signer = signing.Signer
        for index in range(args.runs * 2 + 2):
            real = index % 4 in (0, 3)  # ABBA
            vars(signing)["Signer"] = real_signer if real else _Unsigned
            started = time.perf_counter()
            _assign_all(db, ids, versions[next(turn) % 2])
            if index >= 2:  # the first A and B warm up
                timed[real].append(time.perf_counter() - started)
        vars(signing)["Signer"] = real_signer
        db.dispose()
    assign, unsigned = statistics.median(timed[True]), statistics.median(timed[False])

    def row(label: str, seconds: float) -> str:
        return f"  {label:<30} {seconds * 1000:8.1f} ms  {seconds / n * 1e6:6.1f} us each"

    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"{n:,} statements (median of {args.runs})")
    print(row("build + serialize (baseline)", build))
    print(row("+ sign (one loaded key)", signed) + f"  ({signed / build:.2f}x the baseline)")
    print(row("+ sign (key loaded per call)", per_call) + f"  ({per_call / signed:.2f}x one key)")
    print(f"assign_devices, {n:,} devices in chunks of {CHUNK:,} (SQLite)")
    print(f"  with signed statements         {assign * 1000:8.1f} ms")
    print(
        f"  signer returning zeros (base)  {unsigned * 1000:8.1f} ms  "
        f"(signed/base {assign / unsigned:.2f}x, +{(assign - unsigned) * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()
