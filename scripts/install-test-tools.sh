#!/usr/bin/env bash
# Installs, only when missing, the Debian packages tests use: independent
# implementations of what Herald does itself, and the chaos runs' tools:
#
#   python3-cryptography  Fernet, to mint autopush-rs endpoint tokens the
#                         way autopush-rs did (tests/autopush_tokens.rs runs
#                         /usr/bin/python3, the interpreter this package is for)
#   iproute2, nftables    network namespaces and the partitions between them
#                         (scripts/chaos-net.sh, `make chaos`, tests/chaos.rs)
#   libfaketime           one Herald node's clock skewed in the chaos runs
#   jq, curl              the chaos runs' schedules, readiness checks and table
set -euo pipefail
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
need=()
for p in python3 python3-cryptography iproute2 nftables libfaketime jq curl; do have_pkg "$p" || need+=("$p"); done
[ "${#need[@]}" -gt 0 ] || exit 0
echo "installing: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
