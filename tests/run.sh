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
"$venv/bin/python" -c "import gateway, openai, pytest" # fail here, clearly, if the install did not work

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
