"""Fuzzing benchmark: 100,000 generated calls across every RPC of the
control plane, against the same number of health checks as the baseline.

bench/fuzzing.py does the work (generation from the protobuf descriptors,
the server, the property checks); this runs it at size and reports:

* calls and messages per second, and the same-run baseline: as many
  grpc.health.v1 Check calls over the same kind of channel, sequentially,
  against the same server; the ratio is fuzz calls/s over health calls/s
  (what the generation, the handlers and the database checks cost);
* the count of every status code per RPC, and per principal;
* every call that failed a property (INTERNAL/UNKNOWN/UNIMPLEMENTED/
  DATA_LOSS, a hang, a failing call that changed the database, the server
  not healthy), and the invariants checked at the end.

    nice -n 10 python -m bench.bench_fuzz --calls 100000 --out fuzz.json
    python -m bench.bench_fuzz --db postgresql+psycopg://postgres@127.0.0.1:5432/fuzz
    python -m bench.bench_fuzz --smoke            # CI: seconds, figures meaningless

Run it from the repository root (it imports testkit.fuzzing). Exit status 1
if any property failed."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from testkit import fuzzing

ADMIN_TOKEN = "bench-fuzz-admin-token-0123456789"
# --smoke: the run of seconds CI makes (tests/e2e/test_bench_smoke.py) so the
# benchmark cannot rot; a few hundred calls. Figures meaningless.
SMOKE = {"calls": 300, "baseline_calls": 300}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db", help="SQLAlchemy URL of an empty database (default: SQLite)")
    parser.add_argument("--baseline-calls", type=int, help="health checks (default: --calls)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="CI's run of seconds (SMOKE)")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        started = time.perf_counter()
        fuzzer = fuzzing.start(Path(tmp), ADMIN_TOKEN, args.db)
        setup_s = time.perf_counter() - started
        try:
            baseline_n = args.baseline_calls or args.calls
            baseline_s = fuzzer.health_calls(baseline_n)
            fuzzer.progress = lambda r: print(
                f"... {r.calls} calls, {len(r.failures)} failures", file=sys.stderr, flush=True
            )
            report = fuzzer.run(args.calls, args.seed)
        finally:
            fuzzer.close()
            fuzzer.server.stop()

    fuzz_rate = report.calls / report.seconds
    health_rate = baseline_n / baseline_s
    by_principal: Counter[str] = Counter()
    for (_, who), n in report.principals.items():
        by_principal["garbage" if who.startswith("garbage") else who] += n
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"set-up (server start, a small fleet, two built model versions): {setup_s:.1f} s")
    print(f"baseline: {baseline_n} health checks in {baseline_s:.1f} s = {health_rate:.0f}/s")
    print(
        f"fuzz: {report.calls} calls ({report.messages} messages, "
        f"{len({r for r, _ in report.codes})} RPCs) in {report.seconds:.1f} s = "
        f"{fuzz_rate:.0f} calls/s, {report.messages / report.seconds:.0f} messages/s"
    )
    print(
        f"ratio fuzz/baseline: {fuzz_rate / health_rate:.3f} "
        f"({health_rate / fuzz_rate:.1f}x slower per call)"
    )
    print(f"database snapshots: {report.snapshots}; health checks: {report.health_checks}")
    print("calls by principal: " + ", ".join(f"{w} {n}" for w, n in by_principal.most_common()))
    for who, _ in by_principal.most_common():
        got = Counter({code: n for (w, code), n in report.by_who.items() if w == who})
        print(f"  {who:9} " + ", ".join(f"{code} {n}" for code, n in got.most_common()))
    codes: Counter[str] = Counter()
    for (_, code), n in report.codes.items():
        codes[code] += n
    print("status codes: " + ", ".join(f"{c} {n}" for c, n in codes.most_common()))
    print(report.table())
    print(f"property failures: {len(report.failures)}")
    for failure in report.failures[:50]:
        print(failure)
    print(f"invariants broken: {len(report.invariants)}")
    for broken in report.invariants:
        print(f"  {broken}")
    if args.out:
        results: dict[str, Any] = {
            "machine": {
                "arch": platform.machine(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
            },
            "db": "postgresql" if args.db else "sqlite",
            "seed": args.seed,
            "setup_s": setup_s,
            "baseline": {"calls": baseline_n, "seconds": baseline_s, "per_s": health_rate},
            "fuzz": {
                "calls": report.calls,
                "messages": report.messages,
                "seconds": report.seconds,
                "per_s": fuzz_rate,
                "snapshots": report.snapshots,
            },
            "ratio": fuzz_rate / health_rate,
            "codes": {f"{rpc} {code}": n for (rpc, code), n in sorted(report.codes.items())},
            "by_principal": {f"{w} {code}": n for (w, code), n in sorted(report.by_who.items())},
            "failures": [str(f) for f in report.failures],
            "invariants": report.invariants,
        }
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if report.failures or report.invariants else 0


if __name__ == "__main__":
    sys.exit(main())
