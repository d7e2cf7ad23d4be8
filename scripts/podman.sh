#!/usr/bin/env bash
# podman as `make image` and `make test-dist` run it: with runc (crun fails
# where the sandbox lacks CAP_SYS_RESOURCE or has a hybrid cgroup layout) and
# scripts/containers.conf, unless the caller set CONTAINERS_CONF. Arguments
# are podman's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
exec podman --runtime runc "$@"
