#!/usr/bin/env bash
# Short run of every herald-loadtest scenario against a freshly started
# Herald on loopback, then the HTML report in loadtest/results/report.html.
#
# Knobs (environment): BENCH_PORT (default 18080), RESULTS (default
# loadtest/results), IDLE_UAS (default 25000: past this machine's
# 20,000-file ceiling), TP_UAS, TP_SENDERS, TP_SECS, TP_PAYLOAD, TP_RATE,
# BACKLOG_UAS, BACKLOG_MSGS, STORM_UAS, STORM_WINDOW, SKIP_BUILD=1,
# HERALD_BIN / LOADTEST_BIN (default: $CARGO_TARGET_DIR or target/, debug/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
results="${RESULTS:-$here/results}"
port="${BENCH_PORT:-18080}"

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$root" && cargo build --workspace --bins)
fi
herald="${HERALD_BIN:-$target_dir/debug/herald}"
lt="${LOADTEST_BIN:-$target_dir/debug/herald-loadtest}"
for b in "$herald" "$lt"; do
    [[ -x "$b" ]] || { echo "bench: $b not found; run cargo build --workspace --bins" >&2; exit 1; }
done

# A port already answering would mean benchmarking someone else's server.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "bench: 127.0.0.1:$port is already in use; set BENCH_PORT" >&2
    exit 1
fi

mkdir -p "$results"
pid=""
data=""
stop_herald() {
    if [[ -n "$pid" ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=""
    fi
    if [[ -n "$data" ]]; then rm -rf "$data"; data=""; fi
}
trap stop_herald EXIT

# Status line of GET /health, empty if nothing answers.
health() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
        printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
        timeout 2 head -n1 <&3
    ) 2>/dev/null || true
}

# A fresh Herald (empty data directory) for each scenario, so no scenario
# measures memory or storage left behind by another.
start_herald() {
    local log="$1"
    data="$(mktemp -d)"
    "$herald" serve --listen "127.0.0.1:$port" --data-dir "$data/data" \
        --public-url "http://127.0.0.1:$port" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: herald exited; see $log" >&2
            exit 1
        fi
        if [[ "$(health)" == *" 200"* ]]; then return 0; fi
        sleep 0.1
    done
    echo "bench: herald not ready after 60 s; see $log" >&2
    exit 1
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

"$lt" report "$results"/{idle,throughput,backlog,storm}-"$stamp".json --out "$results/report.html"
