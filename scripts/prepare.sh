#!/usr/bin/env bash
# Idempotently prepares what kiln's tests need on this machine: the build tools
# (scripts/build-deps.sh: cmake + nasm for the vendored libjpeg-turbo), Debian packages (nginx-light
# for the HTTP/2 fault tests), and the local Redis and PostgreSQL servers the broker backends are
# tested against. Safe to run any number of times.
set -euo pipefail

bash "$(dirname "$0")/build-deps.sh"

need_pkgs=()
for p in nginx-light; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "prepare: installing ${need_pkgs[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# Redis on 127.0.0.1:6379 (nothing kept on disk), for the Redis Streams broker backend and
# the multi-instance test.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "prepare: installing redis-server"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "prepare: starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL on 127.0.0.1:5432, database `test`, trust auth.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "prepare: starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 100); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.1; done
fi
if command -v psql >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; then
  psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null 2>&1 || true
fi

# --- kiln-upload: S3-protocol test server ---
# moto[server] in a venv under target/ (tests start `moto_server` on a free 127.0.0.1 port and
# stop it by pid; without it the S3 tests print a notice and skip).
KILN_S3_VENV="$(cd "$(dirname "$0")/.." && pwd)/target/.venv-s3"
if [ ! -x "$KILN_S3_VENV/bin/moto_server" ]; then
  echo "prepare: installing moto[server] into $KILN_S3_VENV"
  if ! python3 -m venv "$KILN_S3_VENV" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$KILN_S3_VENV"
  fi
  "$KILN_S3_VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.*' \
    || echo "prepare: moto install failed; S3 tests will skip"
fi

# --- kiln-broker ---

# --- kiln-gateway / SDK tests ---
# A Python virtualenv for API tests (schemathesis against /openapi.json).
KILN_VENV="${KILN_VENV:-$HOME/.cache/kiln/venv}"
if [ ! -x "$KILN_VENV/bin/st" ]; then
  echo "prepare: creating $KILN_VENV with schemathesis"
  mkdir -p "$(dirname "$KILN_VENV")"
  python3 -m venv "$KILN_VENV"
  "$KILN_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis>=4,<5"
fi
# The official OpenAI Python SDK and pytest for tests/sdk (scripts/sdk-tests.sh).
if ! "$KILN_VENV/bin/python" -c 'import openai, pytest' >/dev/null 2>&1; then
  echo "prepare: installing the openai SDK and pytest into $KILN_VENV"
  "$KILN_VENV/bin/pip" install -q --disable-pip-version-check "openai>=1.50,<4" "pytest>=8,<10"
fi
# The official Standard Webhooks library: scripts/webhook_receiver.py verifies every delivery
# with it (kiln-webhooks' tests and the webhook end-to-end tests).
if ! "$KILN_VENV/bin/python" -c 'import standardwebhooks' >/dev/null 2>&1; then
  echo "prepare: installing standardwebhooks into $KILN_VENV"
  "$KILN_VENV/bin/pip" install -q --disable-pip-version-check "standardwebhooks>=1,<2"
fi

# --- operator console / Prometheus rules (scripts/ui-tests.sh) ---
# Debian's chromium (headless browser tests), prometheus (ships promtool), and playwright-core
# from npm into tests/ui/node_modules (versions pinned by tests/ui/package-lock.json).
ui_pkgs=()
command -v chromium >/dev/null 2>&1 || ui_pkgs+=(chromium)
command -v promtool >/dev/null 2>&1 || ui_pkgs+=(prometheus)
if [ ${#ui_pkgs[@]} -gt 0 ]; then
  echo "prepare: installing ${ui_pkgs[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${ui_pkgs[@]}" >/dev/null
  # The package starts a Prometheus server on :9090; only promtool is wanted.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi
KILN_UI_DIR="$(cd "$(dirname "$0")/.." && pwd)/tests/ui"
if [ -f "$KILN_UI_DIR/package-lock.json" ] && [ ! -d "$KILN_UI_DIR/node_modules/playwright-core" ]; then
  echo "prepare: installing playwright-core into $KILN_UI_DIR/node_modules"
  (cd "$KILN_UI_DIR" && npm ci --silent --no-audit --no-fund)
fi

# --- Python worker SDK (sdk/python): a venv with pytest and the SDK, installed as users do ---
KILN_SDK_VENV="${KILN_SDK_VENV:-$HOME/.cache/kiln/venv-sdk}"
if ! "$KILN_SDK_VENV/bin/python" -c 'import kiln_worker, websockets, pytest' >/dev/null 2>&1; then
  echo "prepare: creating $KILN_SDK_VENV with pytest and ./sdk/python (kiln-worker)"
  mkdir -p "$(dirname "$KILN_SDK_VENV")"
  python3 -m venv "$KILN_SDK_VENV"
  "$KILN_SDK_VENV/bin/pip" install -q --disable-pip-version-check "pytest>=8,<10" \
    "$(cd "$(dirname "$0")/.." && pwd)/sdk/python"
fi
