#!/usr/bin/env bash
# Installs the Debian packages the build needs, only when missing: clang and
# libclang-dev (RocksDB's bindgen), a C++ compiler, and libssl-dev with
# pkg-config (the `ece` library the load generator and tests use), and
# strace (the simulated power loss in tests/faults.rs reads which WAL bytes
# were fsynced from its trace).
# The browser for the end-to-end tests comes from install-firefox.sh, and
# Redis for the Redis store's tests from `scripts/redis.sh install`: `make
# run` needs neither (Debian's redis-server package would also start a
# system Redis on machines with systemd).
set -euo pipefail
need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in clang libclang-dev g++ make libssl-dev pkg-config strace; do have_pkg "$p" || need+=("$p"); done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
