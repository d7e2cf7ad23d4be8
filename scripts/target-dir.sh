#!/usr/bin/env bash
# Prints the project's cargo target directory, exactly as cargo resolves it
# for a build started here (CARGO_TARGET_DIR, a cargo config's
# build.target-dir, or <repository>/target), so that every make target finds
# the build the others made instead of guessing a path.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --no-deps --format-version 1 --offline 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
