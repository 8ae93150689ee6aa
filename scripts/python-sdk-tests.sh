#!/usr/bin/env bash
# The Python worker SDK (sdk/python) against the real server: builds `kiln`, then runs its
# pytest suite with the venv scripts/prepare.sh sets up ($KILN_SDK_VENV, default
# ~/.cache/kiln/venv-sdk: pytest, websockets and the SDK installed with pip). The tests import
# the SDK from the working tree (PYTHONPATH), so they always test the current source. Each test
# starts its own `kiln serve` on a free 127.0.0.1 port and stops it by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
KILN_SDK_VENV="${KILN_SDK_VENV:-$HOME/.cache/kiln/venv-sdk}"
cargo build -q -p kiln --locked
export TEST_KILN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/kiln"
export PYTHONPATH="$PWD/sdk/python/src${PYTHONPATH:+:$PYTHONPATH}"
"$KILN_SDK_VENV/bin/python" -m pytest -q -p no:cacheprovider sdk/python/tests "$@"
