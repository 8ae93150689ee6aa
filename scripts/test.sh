#!/usr/bin/env bash
# The whole test suite: prepares what the tests need (idempotently), then runs every test in the
# workspace, including doc tests. Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/prepare.sh
cargo test --workspace --locked "$@"
# The HTTP API against its own OpenAPI document: no input may produce a 5xx.
bash scripts/schemathesis.sh
# The official OpenAI Python SDK as the client of the images API.
bash scripts/sdk-tests.sh
# The operator console in headless chromium, and the Prometheus alert rules (promtool).
bash scripts/ui-tests.sh
bash scripts/python-sdk-tests.sh
