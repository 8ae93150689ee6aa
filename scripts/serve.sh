#!/usr/bin/env bash
# Runs the kiln server on its embedded defaults (SQLite queue and files under ./kiln-data,
# 127.0.0.1:8080, the built-in demo worker), after installing the build tools a fresh machine
# lacks (scripts/build-deps.sh). Extra arguments go to `kiln serve`, e.g. `--config kiln.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-deps.sh
exec cargo run --release --locked -p kiln -- serve "$@"
