#!/usr/bin/env bash
# Installs Debian's PostgreSQL server, only when missing: the tests of
# `herald import autopush --from postgres://…` (tests/import_autopush.rs)
# start their own server from its binaries (/usr/lib/postgresql/<ver>/bin)
# on a loopback port; the system service the package may start is not used.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  exit 0
fi
echo "installing: postgresql"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql
