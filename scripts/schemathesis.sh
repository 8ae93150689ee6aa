#!/usr/bin/env bash
# Property-based API test: starts the real server on a free loopback port with a throwaway
# data directory, runs schemathesis against /openapi.json (bounded examples; any 5xx fails),
# and stops the server by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_VENV="${KILN_VENV:-$HOME/.cache/kiln/venv}"
cargo build -q -p kiln
bin="${CARGO_TARGET_DIR:-target}/debug/kiln"
data=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
KILN_SERVER__LISTEN="127.0.0.1:$port" KILN_SERVER__DATA_DIR="$data" KILN_LOG__FILTER=warn "$bin" serve >"$data/out.log" 2>"$data/err.log" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
"$KILN_VENV/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --checks not_a_server_error --max-examples 30 --generation-deterministic \
  --request-timeout 10 --exclude-path /v1/workers/connect --exclude-path /v1/events
