#!/usr/bin/env bash
# `make soak`: a fresh Herald (empty data directory, loopback) under the
# load generator's `soak` scenario for SOAK_SECS seconds (default 3600):
# user agents that come and go, TTLs short and long, topics, acks, nacks and
# unregistrations, then a final drain and an exact account of every
# accepted message (delivered, expired, replaced, dropped by unregister,
# lost), duplicates, the server's peak and final memory and open files, and
# the store's size on disk, and a check of every delivery receipt asked for.
# Exits non-zero if any accepted message was lost or any receipt was wrong.
#
# Knobs (environment): SOAK_SECS, SOAK_UAS (default 40), SOAK_PORT (default
# 18090), RESULTS (default loadtest/results; the JSON goes to
# soak-<stamp>.json and Herald's log to herald-soak-<stamp>.log),
# SOAK_ARGS (more herald-loadtest soak flags, e.g. "--seed 7 --pace 0.2"),
# SKIP_BUILD=1, HERALD_BIN / LOADTEST_BIN.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../loadtest/bench-lib.sh
source "$root/loadtest/bench-lib.sh"
secs="${SOAK_SECS:-3600}"
port="${SOAK_PORT:-18090}"
results="${RESULTS:-$root/loadtest/results}"
[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || { echo "soak: SOAK_SECS must be a positive whole number, got '$secs'" >&2; exit 2; }

bench_bins
require_free_port "$port" SOAK_PORT
mkdir -p "$results"
stamp="$(date +%Y%m%d-%H%M%S)"
log="$results/herald-soak-$stamp.log"
out="$results/soak-$stamp.json"

pid=""
data="$(mktemp -d)"
cleanup() {
    stop_pid "$pid"
    rm -rf "$data"
}
trap cleanup EXIT

# env execs Herald in its place, so $! is Herald's PID.
env "$herald" serve --listen "127.0.0.1:$port" --data-dir "$data/data" \
    --public-url "http://127.0.0.1:$port" >"$log" 2>&1 &
pid=$!
wait_herald "$pid" "$port" "$log" || exit 1

echo "soak: Herald (pid $pid) on 127.0.0.1:$port for ${secs} s; log in $log" >&2
rc=0
# shellcheck disable=SC2086 # SOAK_ARGS is a list of flags
"$lt" soak --url "ws://127.0.0.1:$port/" --target herald --server-pid "$pid" \
    --data-dir "$data/data" --duration "$secs" --uas "${SOAK_UAS:-40}" \
    --out "$out" ${SOAK_ARGS:-} || rc=$?
if ! pid_alive "$pid"; then
    echo "soak: Herald exited during the run; see $log" >&2
    rc=1
fi
exit "$rc"
