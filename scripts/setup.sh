#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent: a virtual environment with
# EdgeFleet and its dev/demo extras, the TFLite converter toolchain,
# PostgreSQL running (for the tests), and the stock protoc (for the
# contract's other-language check).
# Source it: it leaves .venv activated. It says what it does in a few lines;
# the tools' own output (pip's above all) goes to .venv/setup.log, whose end
# is shown when a step fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

mkdir -p .venv
setup_log="$root/.venv/setup.log"
: >"$setup_log"

# setup_quietly CMD...: CMD's output into the log; on failure, the log's end.
setup_quietly() {
  if ! "$@" >>"$setup_log" 2>&1; then
    printf '\nsetup: failed: %s\nsetup: the end of %s:\n' "$*" "$setup_log" >&2
    tail -n 40 "$setup_log" >&2
    return 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  printf 'setup: creating the virtual environment .venv ... '
  setup_quietly python3 -m venv .venv
  echo done
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.edgefleet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  printf 'setup: installing EdgeFleet and its dev and demo extras into .venv ... '
  setup_started=$SECONDS
  setup_quietly python -m pip install --upgrade pip
  setup_quietly python -m pip install -e ".[dev,demo]"
  touch "$stamp"
  echo "done ($((SECONDS - setup_started)) s)"
else
  echo "setup: .venv is up to date with pyproject.toml"
fi

# The TFLite converter (onnx2tf + TensorFlow) in its own virtual environment:
# it pins TensorFlow and an old protobuf. Idempotent; ~90 s the first time.
# Its last line says what is installed, and where.
printf 'setup: TFLite converter toolchain ... '
setup_quietly edgefleet toolchain install tflite
tail -n 1 "$setup_log"

if [ "${EDGEFLEET_SETUP_SYSTEM:-1}" = 1 ] && [ "$(id -u)" = 0 ]; then
  if ! command -v protoc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    printf 'setup: installing protoc (apt-get install protobuf-compiler) ... '
    apt-get install -y -q protobuf-compiler >>"$setup_log" 2>&1 \
      || { setup_quietly apt-get update -q && setup_quietly apt-get install -y -q protobuf-compiler; }
    echo done
  fi
  # Debian's nginx: the artifact mirror the delivery tests and the download
  # benchmark serve blobs from (installed only; the tests start their own).
  if ! [ -x /usr/sbin/nginx ] && command -v apt-get >/dev/null 2>&1; then
    printf 'setup: installing nginx (apt-get install nginx) ... '
    apt-get install -y -q --no-install-recommends nginx >>"$setup_log" 2>&1 \
      || { setup_quietly apt-get update -q \
           && setup_quietly apt-get install -y -q --no-install-recommends nginx; }
    echo done
  fi
  # tmux: the end-to-end test that drives the real TUI in a terminal.
  if ! command -v tmux >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    printf 'setup: installing tmux (apt-get install tmux) ... '
    apt-get install -y -q --no-install-recommends tmux >>"$setup_log" 2>&1 \
      || { setup_quietly apt-get update -q \
           && setup_quietly apt-get install -y -q --no-install-recommends tmux; }
    echo done
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
      printf 'setup: starting PostgreSQL ... '
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start \
        >>"$setup_log" 2>&1 || true
      for _ in $(seq 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
    else
      printf 'setup: PostgreSQL ... '
    fi
    if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
      echo "running on 127.0.0.1:5432"
    else
      echo "not answering on 127.0.0.1:5432 (see $setup_log)"
    fi
  fi
elif [ "${EDGEFLEET_SETUP_SYSTEM:-1}" = 1 ]; then
  echo "setup: not root: PostgreSQL and protoc are left as they are"
fi
unset -f setup_quietly
