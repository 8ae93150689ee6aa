#!/usr/bin/env bash
# Idempotently installs the system tools that building kiln needs beyond the Rust toolchain and a
# C compiler: cmake and nasm, which build the vendored libjpeg-turbo (with its SIMD code) inside
# `turbojpeg-sys`. Safe to run any number of times; does nothing when both are present.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
command -v cc >/dev/null 2>&1 || need+=(gcc)
[ ${#need[@]} -eq 0 ] && exit 0

echo "build-deps: installing ${need[*]} (needed to build libjpeg-turbo)" >&2
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "build-deps: no apt-get here; install ${need[*]} with your package manager, then retry" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
