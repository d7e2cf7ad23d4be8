#!/usr/bin/env bash
# Installs Synapse, the Matrix homeserver, from PyPI into a virtualenv
# outside the clone, only when that version is missing: tests/matrix_synapse.rs
# starts it (SQLite, a loopback port, no federation) to drive Herald's Matrix
# push gateway with a real homeserver's pusher. The tests find the venv at
# the same path (HERALD_SYNAPSE_VENV, default below; tests/support/synapse.rs).
#
# The version is pinned so that every machine tests against the same
# homeserver; raise it here (the tests read what is installed).
set -euo pipefail
VERSION=1.163.2
VENV=${HERALD_SYNAPSE_VENV:-/var/tmp/herald-synapse-venv}
# The dist-info directory pip writes is the cheap proof that this exact
# version is installed completely (pip writes it last).
if compgen -G "$VENV/lib/python3*/site-packages/matrix_synapse-$VERSION.dist-info" >/dev/null &&
  [ -x "$VENV/bin/python" ]; then
  exit 0
fi
python=${PYTHON:-python3}
if ! "$python" -c 'import venv, ensurepip, sqlite3' 2>/dev/null; then
  # Debian's python3 keeps venv/ensurepip in a package of their own.
  echo "installing: python3-venv"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
  python=/usr/bin/python3
fi
echo "installing: matrix-synapse $VERSION into $VENV"
# A half-made venv (an interrupted install) is started afresh.
rm -rf "$VENV"
"$python" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "matrix-synapse==$VERSION"
