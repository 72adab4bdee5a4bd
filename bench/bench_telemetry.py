"""Telemetry ingest benchmark: UploadTelemetry through the control plane against
a raw bulk insert into the same database, in the same run.

For each backend (SQLite file; PostgreSQL when --pg is reachable) it starts an
in-process control plane on that database, enrolls --devices devices, and
then, alternating rounds so drift hits both alike:

* control plane: every device uploads its share of --rows samples in batches
  of --batch (the agent's 500) over gRPC, devices concurrently, each batch one
  call (auth, conversion, validation, one query for the device's class and
  seq high-water mark, insert, commit);
* raw: the same rows (every column the control plane fills) inserted straight
  into the `telemetry` table, one transaction per --batch rows (the same unit
  of durability): SQLite `executemany` through the sqlite3 module with the
  control plane's pragmas (synchronous=NORMAL, foreign keys on), PostgreSQL
  `COPY` through psycopg.

The client runs in the same process (and event loop) as the server, so the
control-plane figure also pays for sending the requests (building them is
outside the timing, as building the raw rows is). The report gives the ratio
of each round too: on a shared machine they spread widely.

    python bench/bench_telemetry.py --rows 50000 --append-docs
    python -m bench.bench_telemetry --smoke                 # CI: seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psycopg
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.controlplane.client.connection import bearer_metadata
from edgefleet.controlplane.config import ServerConfig
from edgefleet.controlplane.server import create_server
from edgefleet.controlplane.services.telemetry import INSERT_COLUMNS, Sample
from edgefleet.v1 import common_pb2 as c
from edgefleet.v1 import device_pb2 as d
from edgefleet.v1 import device_pb2_grpc as dg
from edgefleet.v1 import operator_pb2 as o
from edgefleet.v1 import operator_pb2_grpc as og

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
# The columns the control plane fills, so both sides store the same row.
COLUMNS = INSERT_COLUMNS
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; both backends, both round orders. Figures meaningless.
SMOKE = {"rows": 2_000, "devices": 2, "rounds": 2, "append_docs": False}


def _sample(seq: int, at: dt.datetime) -> d.TelemetrySample:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return d.TelemetrySample(
        seq=seq, at=stamp, model_name="digits", model_version="1.0.0", request_count=100,
        error_count=2, timeout_count=1, latency_p50_ms=1.5, latency_p95_ms=4.0,
        latency_p99_ms=7.5, latency_max_ms=12.0, memory_mb=42.0, cpu_percent=3.5,
        system_memory_percent=55.0, temperature_c=48.5, power_mode="normal",
    )  # fmt: skip


def _row(device_id: str, seq: int, at_ms: int) -> tuple[Any, ...]:
    # Built from the control plane's own Sample (the columns after device_id
    # and class_name, in order), so a new telemetry column cannot leave the
    # raw side a value short; the values are _sample's.
    sample = Sample(
        seq=seq, at_ms=at_ms, model_name="digits", model_version="1.0.0", request_count=100,
        error_count=2, timeout_count=1, latency_p50_ms=1.5, latency_p95_ms=4.0,
        latency_p99_ms=7.5, latency_max_ms=12.0, memory_mb=42.0, cpu_percent=3.5,
        system_memory_percent=55.0, temperature_c=48.5, power_mode="normal",
    )  # fmt: skip
    return (device_id, "", *sample)


async def _enroll(channel: grpc.aio.Channel, n: int) -> list[tuple[str, str]]:
    op, dev = og.OperatorServiceStub(channel), dg.DeviceServiceStub(channel)
    devices = []
    for i in range(n):
        token = await op.CreateEnrollmentToken(
            o.CreateEnrollmentTokenRequest(
                name=f"bench-{i}", policy=o.ENROLLMENT_POLICY_AUTO_ACCEPT
            ),
            metadata=bearer_metadata(ADMIN_TOKEN),
        )
        resp = await dev.Enroll(
            d.EnrollRequest(
                enrollment_token=token.secret,
                hardware_id=f"bench-hw-{uuid.uuid4().hex[:8]}",
                hardware=c.HardwareProfile(arch="aarch64", memory_mb=2048, cpu_cores=4),
            )
        )
        devices.append((resp.device_id, resp.device_credential))
    return devices


class Seqs:
    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> int:
        start, self.next = self.next, self.next + n
        return start


async def _control_plane_round(
    channel: grpc.aio.Channel, devices: list[tuple[str, str]], rows: int, batch: int, seqs: Seqs
) -> float:
    stub = dg.DeviceServiceStub(channel)
    now = dt.datetime.now(dt.UTC)
    per_device = rows // len(devices)
    start_seq = seqs.take(per_device)
    requests = [
        d.UploadTelemetryRequest(
            samples=[
                _sample(s, now) for s in range(first, min(first + batch, start_seq + per_device))
            ]
        )
        for first in range(start_seq, start_seq + per_device, batch)
    ]

    async def upload(credential: str) -> None:
        for request in requests:
            await stub.UploadTelemetry(request, metadata=bearer_metadata(credential))

    began = time.perf_counter()
    await asyncio.gather(*(upload(cred) for _, cred in devices))
    return per_device * len(devices) / (time.perf_counter() - began)


def _raw_round(
    insert: Callable[[list[tuple[Any, ...]]], None],
    devices: list[tuple[str, str]],
    rows: int,
    batch: int,
    seqs: Seqs,
) -> float:
    at_ms = int(time.time() * 1000)
    per_device = rows // len(devices)
    start_seq = seqs.take(per_device)
    batches = [
        [_row(dev, s, at_ms) for s in range(first, min(first + batch, start_seq + per_device))]
        for dev, _ in devices
        for first in range(start_seq, start_seq + per_device, batch)
    ]
    began = time.perf_counter()
    for chunk in batches:
        insert(chunk)
    return per_device * len(devices) / (time.perf_counter() - began)


def _sqlite_inserter(
    path: Path,
) -> tuple[Callable[[list[tuple[Any, ...]]], None], Callable[[], None]]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # The control plane's durability and integrity settings (engine.py), so
    # the two sides differ only in the path to the table.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    sql = f"INSERT INTO telemetry ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"

    def insert(rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")

    return insert, conn.close


def _pg_inserter(dsn: str) -> tuple[Callable[[list[tuple[Any, ...]]], None], Callable[[], None]]:
    conn = psycopg.connect(dsn)

    def insert(rows: list[tuple[Any, ...]]) -> None:
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY telemetry ({', '.join(COLUMNS)}) FROM STDIN") as cp,
        ):
            for row in rows:
                cp.write_row(row)
        conn.commit()

    return insert, conn.close


async def run_backend(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    pg_db = None
    if name == "sqlite":
        path = workdir / "bench.db"
        db_url = f"sqlite:///{path}"
    else:
        pg_db = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_db}"')
        raw_dsn = f"{args.pg.rsplit('/', 1)[0]}/{pg_db}"
        db_url = raw_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    cp = await create_server(
        ServerConfig(
            data_dir=workdir / name,
            listen="127.0.0.1:0",
            admin_token=ADMIN_TOKEN,
            build_workers=0,
            db_url=db_url,
            # Ingest throughput, not the per-device rate limit, is measured.
            telemetry_rate_per_s=1e9,
        )
    )
    insert, close = _sqlite_inserter(path) if name == "sqlite" else _pg_inserter(raw_dsn)
    cp_rates, raw_rates, seqs = [], [], Seqs()
    try:
        async with grpc.aio.insecure_channel(cp.address) as channel:
            devices = await _enroll(channel, args.devices)
            per_round = args.rows // args.rounds
            await _control_plane_round(
                channel, devices, args.batch * len(devices), args.batch, seqs
            )
            for i in range(args.rounds):
                order = ("cp", "raw") if i % 2 == 0 else ("raw", "cp")
                for which in order:
                    if which == "cp":
                        cp_rates.append(
                            await _control_plane_round(
                                channel, devices, per_round, args.batch, seqs
                            )
                        )
                    else:
                        raw_rates.append(
                            await asyncio.to_thread(
                                _raw_round, insert, devices, per_round, args.batch, seqs
                            )
                        )
    finally:
        close()
        await cp.stop(grace=0.5)
        if pg_db is not None:
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)')
    cp_rate = args.rows / sum(per_round / r for r in cp_rates) if cp_rates else 0.0
    raw_rate = args.rows / sum(per_round / r for r in raw_rates) if raw_rates else 0.0
    return {
        "backend": name,
        "cp": cp_rate,
        "raw": raw_rate,
        "ratio": cp_rate / raw_rate,
        "round_ratios": [c / r for c, r in zip(cp_rates, raw_rates, strict=True)],
    }


def _pg_reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "",
        f"## Telemetry ingest ({dt.date.today().isoformat()}, bench/bench_telemetry.py)",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.rows} rows per side, batches of {args.batch}, {args.devices} devices "
        f"uploading concurrently, {args.rounds} alternating rounds; raw = one transaction "
        "per batch (SQLite executemany with the control plane's synchronous=NORMAL and "
        "foreign keys on, PostgreSQL COPY) of the same rows into the same table and database. "
        "The gRPC client runs in the control plane's process. Goal: control plane >= 50 % of raw.",
        "",
        "| backend | control plane rows/s | raw bulk rows/s | ratio | ratio per round |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        rounds = ", ".join(f"{100 * x:.0f}" for x in r["round_ratios"])
        lines.append(
            f"| {r['backend']} | {r['cp']:,.0f} | {r['raw']:,.0f} "
            f"| {100 * r['ratio']:.0f} % | {rounds} % |"
        )
    met = all(r["ratio"] >= 0.5 for r in results)
    lines += ["", f"Goal (>= 50 %) {'met' if met else 'NOT met'} in this run."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--pg",
        default=os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--append-docs", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    backends = ["sqlite"] + (["postgresql"] if _pg_reachable(args.pg) else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in backends:
            results.append(asyncio.run(run_backend(name, args, Path(tmp))))
    report = _report(results, args)
    print(report)
    if args.append_docs:
        with DOCS.open("a", encoding="utf-8") as docs:
            docs.write(report)


if __name__ == "__main__":
    main()
