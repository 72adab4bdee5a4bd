"""Every benchmark in its smoke size (`python -m bench.X --smoke`), each its own
process, so that none can rot: a benchmark that no longer runs fails here,
not on the day someone needs its figures. The smoke figures mean nothing;
what is checked is that the run finished and printed its report.

The soak benchmark's smoke run is tests/e2e/test_soak_smoke.py (it checks
the accounting in its figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.harness import env_without_proxy

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

# Each benchmark and a line its report always prints.
REPORTS = {
    "bench_agent_install": "idle agent RSS (goal <= 40 MB)",
    "bench_agent_rss": "with the digits MLP active (onnxruntime)",
    "bench_builds": "matrix wall time (push -> last build finished)",
    "bench_delivery": "mirror / control plane: wall",
    "bench_download": "resume from byte",
    "bench_faults": "[net]",
    "bench_fuzz": "property failures: 0",
    "bench_inference": "floor: empty sync gRPC Predict",
    "bench_model_kinds": "## model quality: int8 vs fp32",
    "bench_models_per_device": "digits-cnn failed calls: 0",
    "bench_signing": "assign_devices, 1,000 devices in chunks of 1,000 (SQLite)",
    "bench_sync": "push < 1 s",
    "bench_telemetry": "| sqlite |",
    "bench_tui": "TUI idle CPU, worst screen:",
}


# Extra arguments for a smoke run. The fault benchmark's kill, pg and disk
# scenarios run at CI size in tests/e2e/test_faults.py already (the same
# testkit.fault_scenarios code); here only the network scenario and the
# benchmark's own report (CI's 30 minutes are nearly spent).
SMOKE_ARGS = {"bench_faults": ("--only", "net")}


def smoke(name: str, *args: str, timeout: float = 300) -> str:
    """`python -m bench.NAME --smoke ARGS` from the repository root; its stdout."""
    run = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke", *args],
        cwd=ROOT, env=env_without_proxy(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def test_every_benchmark_is_smoked() -> None:
    benchmarks = {p.stem for p in BENCH.glob("bench_*.py")}
    smoked = set(REPORTS) | {"bench_blob_cache", "bench_hostile_rss", "bench_rollout", "bench_soak"}
    assert benchmarks == smoked


@pytest.mark.timeout(360)
@pytest.mark.parametrize("name", sorted(REPORTS))
def test_bench_smoke(name: str) -> None:
    assert REPORTS[name] in smoke(name, *SMOKE_ARGS.get(name, ()))


@pytest.mark.timeout(360)
def test_bench_rollout_smoke_on_two_postgresql_replicas(pg_url: str) -> None:
    """bench_rollout's smoke run, in the configuration issue 21's
    PostgreSQL figure comes from: agents spread over two replicas
    (bench_rollout's own SpreadFleet, which once wired no Enroll stub, so
    its agents never enrolled and only a full run found out, after its
    900 s timeout). One run for CI's time: on SQLite the fleet is
    fleetsim's own Fleet, which the fleetsim tests cover."""
    out = smoke("bench_rollout", "--replicas", "2", "--db", pg_url)
    assert "overhead goal <= 30 s" in out
    assert "| phase | replica 0 | replica 1 |" in out


def test_bench_blob_cache_smoke() -> None:
    result = json.loads(smoke("bench_blob_cache"))
    assert result["size_mib"] == 2
    assert result["ratio_first_open_to_bare_hash"] > 0
    assert result["ratio_checked_stream_to_bare_pread"] > 0
    assert result["heal_s"]["median"] > 0


@pytest.mark.timeout(600)
def test_bench_hostile_rss_smoke() -> None:
    out = smoke("bench_hostile_rss", timeout=600)
    result = json.loads(out[: out.rindex("}") + 1])
    assert result["peak_tracked"]
    for row in result["requests"]:
        assert row["well_formed"] == "OK", row
        assert row["hostile"].startswith("INVALID_ARGUMENT"), row
        # The security bound of issue 18 (< 50 MB per hostile request).
        assert row["ratio_to_goal"] < 1, row
    assert "of the 50 MB goal" in out
