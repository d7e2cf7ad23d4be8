#!/usr/bin/env bash
# Installs what `make fuzz` needs, only when missing: cargo-fuzz (libFuzzer
# driver, from crates.io) and the Debian packages the build needs (clang for
# RocksDB's bindgen, g++ for libFuzzer's C++; install-deps.sh has them).
# cargo-fuzz runs on the stable toolchain with `--sanitizer none`: coverage
# instrumentation (-Cpasses=sancov-module) is a stable flag, only the
# sanitizers (-Zsanitizer) need nightly.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  # Its own build directory, not the project's shared target dir.
  env -u CARGO_TARGET_DIR cargo install --locked cargo-fuzz --version ^0.13
fi
