#!/usr/bin/env bash
# The test command (README): set up, lint, type-check, then the whole suite
# against real servers, real SQLite and the local PostgreSQL: the unit tier,
# then the integration and end-to-end tiers, each timed so that CI shows
# where the time goes. Arguments: run only `pytest ARGS` after the checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
ruff check .
mypy
if [ "$#" -gt 0 ]; then
  python -m pytest "$@"
  exit
fi

# tier NAME PATHS...: pytest over PATHS, then how long it took and how it ended.
failed=""
tier() {
  local name=$1 started=$SECONDS status=0
  shift
  python -m pytest "$@" || status=$?
  echo "test.sh: the $name tier took $((SECONDS - started)) s (pytest exit status $status)"
  [ "$status" = 0 ] || failed="${failed:+$failed, }$name"
}
# Both tiers run even when the first fails, so one CI run shows every failure.
tier unit tests/unit
# --durations: the slowest tests of the long tier, to see where CI's time goes.
tier "integration and end-to-end" tests/integration tests/e2e --durations=25
if [ -n "$failed" ]; then
  echo "test.sh: failed: $failed" >&2
  exit 1
fi
