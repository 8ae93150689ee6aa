#!/usr/bin/env bash
# The OpenAI Python SDK against the real server: builds `kiln`, then runs the pytest suite in
# tests/sdk with the SDK from the test virtualenv (scripts/prepare.sh installs it). Each test
# module starts its own server on a free 127.0.0.1 port and stops it by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_VENV="${KILN_VENV:-$HOME/.cache/kiln/venv}"
cargo build -q -p kiln --locked
export TEST_KILN_BIN="${CARGO_TARGET_DIR:-target}/debug/kiln"
"$KILN_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/sdk "$@"
