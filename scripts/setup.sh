#!/usr/bin/env bash
# Idempotent setup of a fresh machine: virtualenv with pinned dependencies, Debian's redis-server and prometheus,
# and the default base network's offline ImageNet weights (converted once into ~/.cache/mushroom-serving; the
# other bases' when first used).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
REQS_HASH=$(cat requirements.txt requirements-nodeps.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# A virtualenv without pip is one whose making was cut short (venv installs pip last): made again from scratch.
if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/pip" ]; then
  echo "==> creating virtualenv $VENV"
  "$PY" -m venv --clear "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQS_HASH" ]; then
  echo "==> installing pinned Python dependencies (first time: a few minutes)"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r requirements.txt
  "$VENV/bin/pip" install --quiet --no-deps -r requirements-nodeps.txt
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || "$VENV/bin/pip" install --no-deps --no-build-isolation -e .
  echo "$REQS_HASH" > "$STAMP"
fi

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# headless browser for the web page tests (tests/test_web*.py)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# the load generator in C that bench/model_server_bench.py and tests/test_bench_h2load.py drive the model server with
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# ss, which tests/test_gateway_faults.py reads the HTTP servers' listen queues with
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts its own instances; the project starts its own on free ports instead.
    (service redis-server stop || true; service prometheus stop || true) >/dev/null 2>&1
  else
    echo "!! missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}' (setup installs them itself when run as root)" >&2
    exit 1
  fi
fi

"$VENV/bin/python" -m services.protos  # Python stubs of protos/ (gitignored)
"$VENV/bin/python" -m training_job weights --default_architecture  # the other bases: when first used
