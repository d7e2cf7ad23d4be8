#!/usr/bin/env bash
# Installs, only when missing, the real checkers tests/deploy_files runs on
# deploy/ and on a live Herald's /metrics:
#
#   nginx           `nginx -t` / `nginx -T` on deploy/nginx*.conf
#   prometheus      `promtool check metrics` on GET /metrics
#   docker-compose  `docker-compose config` on deploy/docker-compose.cluster.yml
#                   (reads and validates the file; needs no Docker daemon)
#   systemd         `systemd-analyze verify` on deploy/herald.service
#
# The nginx and prometheus packages start their daemons from postinst when an
# init system runs. The tests only need the binaries, so a policy-rc.d that
# refuses every start (exit 101, see invoke-rc.d(8)) is in place during the
# install, and whatever started anyway is stopped and disabled afterwards.
set -euo pipefail

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

need=()
for p in nginx prometheus docker-compose systemd; do have_pkg "$p" || need+=("$p"); done
[ "${#need[@]}" -gt 0 ] || exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# An existing policy-rc.d (Docker images ship one) is the machine's own: kept
# as it is. Ours is removed again on any exit.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# scripts/install-checkers.sh: no service starts during its install\nexit 101\n' |
    $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  trap '$sudo rm -f "$policy"' EXIT
fi

echo "installing: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"

# Only the services of packages installed just now: nothing the machine ran
# before is touched.
for p in "${need[@]}"; do
  case "$p" in
    nginx) svc=nginx ;;
    prometheus) svc=prometheus ;;
    *) continue ;;
  esac
  if [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$svc" ]; then
    $sudo "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
  fi
done
