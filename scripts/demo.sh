#!/usr/bin/env bash
# The main job (README): set up, then run the demo fleet on embedded SQLite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo needs neither PostgreSQL nor protoc.
export EDGEFLEET_SETUP_SYSTEM=0
# shellcheck disable=SC1091
. scripts/setup.sh
python -m edgefleet.demo.run_demo "$@"
