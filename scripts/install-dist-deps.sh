#!/usr/bin/env bash
# Installs, only when missing, what `make deb`, `make image` and `make
# test-dist` need: dpkg-dev (dpkg-shlibdeps computes the package's library
# dependencies), podman with runc (crun cannot set resource limits without
# CAP_SYS_RESOURCE on these machines) and debootstrap for the local Debian
# base (scripts/dist-base.sh).
set -euo pipefail
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
need=()
for p in dpkg-dev podman runc debootstrap; do have_pkg "$p" || need+=("$p"); done
[ "${#need[@]}" -gt 0 ] || exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
