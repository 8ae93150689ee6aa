#!/usr/bin/env bash
# Architecture invariants that the dependency graph can prove (see docs/ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
deny_in_tree() { # package, features-args, forbidden crate regex
  local pkg=$1 args=$2 re=$3 out
  # shellcheck disable=SC2086
  out=$(cargo tree -p "$pkg" $args -e normal --prefix none --locked 2>/dev/null | awk '{print $1}' | sort -u)
  if echo "$out" | grep -Eqx "$re"; then
    echo "invariant broken: $pkg ($args) depends on $(echo "$out" | grep -Ex "$re" | tr '\n' ' ')"
    fail=1
  else
    echo "ok: $pkg ($args) has no $re"
  fi
}
[ -d crates/retry ] && deny_in_tree kiln-retry "--no-default-features" "tokio|hyper|hyper-util"
[ -d crates/protocol ] && deny_in_tree kiln-protocol "" "tokio|hyper|tungstenite|tokio-tungstenite|axum"
[ -d crates/webhooks ] && deny_in_tree kiln-webhooks "--no-default-features" "tokio|hyper|hyper-util"
[ -d crates/compress ] && deny_in_tree kiln-compress "--no-default-features" "tokio|hyper|http"
if [ -d crates/gateway ]; then
  # An embedder that leaves out kiln-gateway's features builds no C image library, no S3
  # signing and no PostgreSQL client.
  deny_in_tree kiln-gateway "--no-default-features" "turbojpeg|turbojpeg-sys|aws-sigv4|aws-credential-types|tokio-postgres"
  # The gateway builds with no optional feature, with all of them, and with the OpenAI API
  # (and its OpenAPI document) but no image compression, as its fuzz targets build it.
  for feats in --no-default-features --all-features "--no-default-features --features openapi"; do
    # shellcheck disable=SC2086 # "$feats" is one or more arguments
    if cargo check -p kiln-gateway $feats --locked --quiet; then
      echo "ok: kiln-gateway builds with $feats"
    else
      echo "invariant broken: kiln-gateway does not build with $feats"
      fail=1
    fi
  done
fi
# kiln-test-support (and kiln-test-support-gateway) is only ever a dev-dependency
# (docs/ARCHITECTURE.md).
if [ -d crates/test-support ]; then
  bad=$(cargo metadata --format-version 1 --no-deps --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(" ".join(sorted(p["name"] for p in m["packages"] for d in p["dependencies"]
                      if d["name"].startswith("kiln-test-support") and d["kind"] != "dev")))')
  if [ -n "$bad" ]; then
    echo "invariant broken: kiln-test-support is a normal or build dependency of $bad"
    fail=1
  else
    echo "ok: kiln-test-support and kiln-test-support-gateway are only dev-dependencies"
  fi
fi
exit $fail
