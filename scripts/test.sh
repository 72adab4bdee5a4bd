#!/usr/bin/env bash
# The test command (README): set up, lint, type-check, then the whole suite
# against real servers, real SQLite and the local PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
ruff check .
mypy
python -m pytest "$@"
