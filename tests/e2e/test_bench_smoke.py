"""The benchmarks added for issue 18 in their smoke size, so none can rot:
each runs as a real process and prints its figures with the ratio to the
baseline measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_blob_cache_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "bench/bench_blob_cache.py", "--size-mb", "2", "--runs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["size_mib"] == 2
    assert result["ratio_first_open_to_bare_hash"] > 0
    assert result["ratio_checked_stream_to_bare_pread"] > 0
    assert result["heal_s"]["median"] > 0


def test_bench_hostile_rss_smoke() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_hostile_rss", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert result["peak_tracked"]
    for row in result["requests"]:
        assert row["well_formed"] == "OK", row
        assert row["hostile"].startswith("INVALID_ARGUMENT"), row
        # The security bound of issue 18 (< 50 MB per hostile request).
        assert row["ratio_to_goal"] < 1, row
    assert "of the 50 MB goal" in out.stdout
