#!/usr/bin/env bash
# The operator console in a real headless chromium against the real `kiln serve`
# (tests/ui/console.test.mjs; screenshots under target/ui-screenshots/), and the Prometheus
# alert rules through promtool (check + unit tests). Needs what scripts/prepare.sh installs:
# chromium, prometheus (promtool), tests/ui/node_modules (playwright-core).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== promtool"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml
echo "== console (chromium)"
if [ ! -d tests/ui/node_modules/playwright-core ]; then
  (cd tests/ui && npm ci --silent --no-audit --no-fund)
fi
cargo build -q -p kiln --locked
CONSOLE_TEST_BIN="${CARGO_TARGET_DIR:-target}/debug/kiln" node --test --test-concurrency=1 tests/ui/console.test.mjs
