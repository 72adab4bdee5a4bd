"""Telemetry sample values out of the control plane's ranges (api/limits.py)
and what the refusal must say of each: the table the limits are checked with
in process, and sent to a real server."""

from __future__ import annotations

from typing import Any

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
NAN, INF = float("nan"), float("inf")

# (field, bad value, what the message must say about the range)
OUT_OF_RANGE: list[tuple[str, Any, str]] = [
    ("request_count", INT64_MAX, "between 0 and 1,000,000,000"),
    ("request_count", 10**9 + 1, "between 0 and 1,000,000,000"),
    ("error_count", UINT64_MAX, "between 0 and 1,000,000,000"),
    ("timeout_count", 2**63, "between 0 and 1,000,000,000"),
    ("dropped_samples", INT64_MAX, "between 0 and 1,000,000,000"),
    ("shadow_requests", UINT64_MAX - 1, "between 0 and 1,000,000,000"),
    ("fallback_request_count", UINT64_MAX - 1, "between 0 and 1,000,000,000"),
    ("latency_p50_ms", NAN, "between 0 and 86,400,000"),
    ("latency_p95_ms", INF, "between 0 and 86,400,000"),
    ("latency_p99_ms", -1.0, "between 0 and 86,400,000"),
    ("latency_max_ms", 1e308, "between 0 and 86,400,000"),
    ("latency_max_ms", -INF, "between 0 and 86,400,000"),
    ("shadow_latency_p95_ms", 86_400_001.0, "between 0 and 86,400,000"),
    ("memory_mb", 1e300, "between 0 and 16,777,216"),
    ("memory_mb", -0.5, "between 0 and 16,777,216"),
    ("model_memory_mb", INF, "between 0 and 16,777,216"),
    ("model_memory_mb", -1.0, "between 0 and 16,777,216"),
    ("cpu_percent", NAN, "between 0 and 102,400"),
    ("cpu_percent", 1e9, "between 0 and 102,400"),
    ("system_memory_percent", 100.5, "between 0 and 100"),
    ("temperature_c", -300.0, "between -273.15 and 1,000"),
    ("temperature_c", INF, "between -273.15 and 1,000"),
    ("battery_percent", 101.0, "between 0 and 100"),
    ("battery_percent", NAN, "between 0 and 100"),
    ("concurrency_limit", 2**32 - 1, "between 0 and 1,000,000"),
    ("shadow_agreement", 1.5, "between 0 and 1"),
    ("shadow_agreement", NAN, "between 0 and 1"),
    ("shadow_max_diff", INF, "a finite number of at least 0"),
    ("shadow_max_diff", NAN, "a finite number of at least 0"),
    ("shadow_max_diff", -1.0, "a finite number of at least 0"),
    ("seq", 2**63, "between 1 and 9,223,372,036,854,775,807"),
]
