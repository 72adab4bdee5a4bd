#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: a virtual environment with
# EdgeFleet and its dev/demo extras, the TFLite converter toolchain,
# PostgreSQL running (for the tests), and the stock protoc (for the
# contract's other-language check).
# Source it: it leaves .venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.edgefleet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[dev,demo]"
  touch "$stamp"
fi

# The TFLite converter (onnx2tf + TensorFlow) in its own virtual environment:
# it pins TensorFlow and an old protobuf. Idempotent; ~90 s the first time.
edgefleet toolchain install tflite

if [ "${EDGEFLEET_SETUP_SYSTEM:-1}" = 1 ] && [ "$(id -u)" = 0 ]; then
  if ! command -v protoc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q protobuf-compiler >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q protobuf-compiler >/dev/null; }
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
      for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    fi
  fi
fi
