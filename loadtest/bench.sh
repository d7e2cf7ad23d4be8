#!/usr/bin/env bash
# Short run of every herald-loadtest scenario against a freshly started
# Herald on loopback, then the HTML report in loadtest/results/report.html.
#
# Knobs (environment): BENCH_PORT (default 18080), RESULTS (default
# loadtest/results), IDLE_UAS (default 25000: past this machine's
# 20,000-file ceiling), TP_UAS, TP_SENDERS, TP_SECS, TP_PAYLOAD, TP_RATE,
# BACKLOG_UAS, BACKLOG_MSGS, STORM_UAS, STORM_WINDOW, BURST_UAS,
# BURST_MSGS, BURST_BACKLOG, SKIP_BUILD=1,
# HERALD_BIN / LOADTEST_BIN (default: $CARGO_TARGET_DIR or target/, debug/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=bench-lib.sh
source "$here/bench-lib.sh"
results="${RESULTS:-$here/results}"
port="${BENCH_PORT:-18080}"

bench_bins
require_free_port "$port"

mkdir -p "$results"
pid=""
data=""
stop_herald() {
    stop_pid "$pid"
    pid=""
    if [[ -n "$data" ]]; then rm -rf "$data"; data=""; fi
}
trap stop_herald EXIT

# A fresh Herald (empty data directory) for each scenario, so no scenario
# measures memory or storage left behind by another.
start_herald() {
    local log="$1"
    data="$(mktemp -d)"
    "$herald" serve --listen "127.0.0.1:$port" --data-dir "$data/data" \
        --public-url "http://127.0.0.1:$port" >"$log" 2>&1 &
    pid=$!
    wait_herald "$pid" "$port" "$log" || exit 1
}

url="ws://127.0.0.1:$port/"
stamp="$(date +%Y%m%d-%H%M%S)"
run() {
    local name="$1"; shift
    echo "== $name" >&2
    start_herald "$results/herald-$name.log"
    "$lt" "$name" --url "$url" --target herald --server-pid "$pid" \
        --out "$results/$name-$stamp.json" "$@"
    stop_herald
}

run idle --uas "${IDLE_UAS:-25000}" --hold 5 --concurrency 400
run throughput --uas "${TP_UAS:-2000}" --senders "${TP_SENDERS:-32}" \
    --duration "${TP_SECS:-15}" --payload "${TP_PAYLOAD:-1024}" --rate "${TP_RATE:-0}"
run backlog --uas "${BACKLOG_UAS:-2000}" --messages-per-channel "${BACKLOG_MSGS:-10}" --senders 32
run storm --uas "${STORM_UAS:-5000}" --window "${STORM_WINDOW:-5}"
run burst --uas "${BURST_UAS:-4}" --messages "${BURST_MSGS:-1000}" --backlog "${BURST_BACKLOG:-500}"

"$lt" report "$results"/{idle,throughput,backlog,storm,burst}-"$stamp".json --out "$results/report.html"
