#!/usr/bin/env bash
# Short run of every herald-loadtest scenario against a freshly started
# Herald on loopback, then the HTML report in loadtest/results/report.html
# and a side-by-side table (messages/s, server µs per delivered message,
# latency p50/p99, idle KiB per connection, idle setup and storm hello p99)
# printed at the end and written to loadtest/results/side-by-side-<stamp>.md.
#
# With AUTOPUSH_URL set (the websocket URL of an autopush-rs that is
# already running on loopback, e.g. ws://127.0.0.1:8080/), the same
# throughput, idle and storm runs also go against it, and the table has a
# row for each. This script neither builds, fetches nor starts autopush-rs,
# and it stops only what it started. AUTOPUSH_PIDS lists its processes for CPU and
# memory (comma-separated, optionally named:
# autoconnect=PID,autoendpoint=PID,redis=PID); without it the autopush row
# has no server figures. Its push endpoints are POSTed to as handed out
# (they must be on loopback), or at AUTOPUSH_PUSH_URLS (http://host:port,
# comma-separated) if set. Being long-running, it is not restarted between
# its runs: for each of its runs to start fresh, as Herald's do, run one
# scenario per invocation and restart it in between.
#
# Knobs (environment): BENCH_PORT (default 18080), RESULTS (default
# loadtest/results), SCENARIOS (default "idle throughput receipts backlog storm
# burst fanout abuse"), IDLE_UAS (default 25000: past this machine's
# 20,000-file ceiling), TP_UAS, TP_SENDERS, TP_SECS, TP_PAYLOAD, TP_RATE,
# BACKLOG_UAS, BACKLOG_MSGS, STORM_UAS, STORM_WINDOW, BURST_UAS,
# BURST_MSGS, BURST_BACKLOG, FANOUT_UAS (default 10000 followers),
# FANOUT_NON (default a tenth of them), FANOUT_CHANGES (default 5),
# ABUSE_UAS (default 100), ABUSE_RATE (default 100 msg/s), ABUSE_SECS (default
# 20 per phase), ABUSE_CONNECTIONS (the flooder's, default 64),
# SCENARIOS=restart (not in the default list: it builds a 1 GiB store and
# runs Herald itself) with RESTART_UAS (default 100000), RESTART_MSGS (per
# user agent, default 10), RESTART_RUNS (default 3) and RESTART_DATA (a
# data directory to keep and reuse; default a temporary one),
# AUTOPUSH_URL, AUTOPUSH_PIDS, AUTOPUSH_PUSH_URLS, AUTOPUSH_IDLE_UAS
# (default IDLE_UAS), SKIP_BUILD=1,
# HERALD_BIN / LOADTEST_BIN (default: $CARGO_TARGET_DIR or target/, debug/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=bench-lib.sh
source "$here/bench-lib.sh"
results="${RESULTS:-$here/results}"
port="${BENCH_PORT:-18080}"
scenarios="${SCENARIOS:-idle throughput receipts backlog storm burst fanout abuse}"
autopush_url="${AUTOPUSH_URL:-}"

for s in $scenarios; do
    case "$s" in
    idle | throughput | receipts | backlog | storm | burst | fanout | abuse | restart) ;;
    *) echo "bench: unknown scenario '$s' in SCENARIOS" >&2; exit 2 ;;
    esac
done
if [[ -n "$autopush_url" ]]; then
    # Only a running autopush on this machine: ws://127.x.x.x:PORT/ or ws://localhost:PORT/.
    ap_hostport="${autopush_url#ws://}"
    ap_hostport="${ap_hostport%%/*}"
    ap_host="${ap_hostport%:*}"
    ap_port="${ap_hostport##*:}"
    if [[ "$autopush_url" != ws://* || ! "$ap_port" =~ ^[0-9]+$ || ! ( "$ap_host" == localhost || "$ap_host" == 127.* ) ]]; then
        echo "bench: AUTOPUSH_URL must be ws://127.0.0.1:PORT/ (or localhost) of a running autopush-rs, got '$autopush_url'" >&2
        exit 2
    fi
    if ! port_in_use "$ap_port"; then
        echo "bench: nothing answers on 127.0.0.1:$ap_port (AUTOPUSH_URL); start autopush-rs first" >&2
        exit 1
    fi
    if [[ -z "${AUTOPUSH_PIDS:-}" ]]; then
        echo "bench: AUTOPUSH_PIDS not set: no server CPU or memory figures for autopush" >&2
    fi
fi

bench_bins
require_free_port "$port"

mkdir -p "$results"
pid=""
data=""
# Extra environment for the next Herald (VAR=VALUE words).
herald_env=()
# Its push quotas: off, except for the abuse scenario, which measures them.
quotas=("${unthrottled[@]}")
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
    # env execs Herald in its place, so $! is Herald's PID.
    env ${quotas[@]+"${quotas[@]}"} ${herald_env[@]+"${herald_env[@]}"} "$herald" serve --listen "127.0.0.1:$port" \
        --data-dir "$data/data" --public-url "http://127.0.0.1:$port" >"$log" 2>&1 &
    pid=$!
    wait_herald "$pid" "$port" "$log" || exit 1
}

url="ws://127.0.0.1:$port/"
stamp="$(date +%Y%m%d-%H%M%S)"
files=()
run() {
    run_as herald "$@"
}

# `run` under another target name: the same scenario with other options
# gets its own row in the side-by-side table.
run_as() {
    local target="$1" name="$2"; shift 2
    local out="$results/$name-$stamp.json"
    [[ "$target" != herald ]] && out="$results/$name-$target-$stamp.json"
    echo "== $name ($target)" >&2
    start_herald "$results/herald-$name-$target.log"
    "$lt" "$name" --url "$url" --target "$target" --server-pid "$pid" \
        --out "$out" "$@"
    files+=("$out")
    stop_herald
}

# The same run against the autopush-rs at AUTOPUSH_URL (left running).
run_autopush() {
    local name="$1"; shift
    local extra=()
    [[ -n "${AUTOPUSH_PIDS:-}" ]] && extra+=(--server-pid "$AUTOPUSH_PIDS")
    [[ -n "${AUTOPUSH_PUSH_URLS:-}" ]] && extra+=(--push-urls "$AUTOPUSH_PUSH_URLS")
    echo "== $name (autopush at $autopush_url)" >&2
    "$lt" "$name" --url "$autopush_url" --target autopush ${extra[@]+"${extra[@]}"} \
        --out "$results/autopush-$name-$stamp.json" "$@"
    files+=("$results/autopush-$name-$stamp.json")
}

wants() { [[ " $scenarios " == *" $1 "* ]]; }

# Connection setup times show a one-second step when the kernel caps Herald's
# listen backlog (listen_backlog, 4096) low enough for SYNs to be dropped.
somaxconn="$(cat /proc/sys/net/core/somaxconn 2>/dev/null || true)"
if [[ "$somaxconn" =~ ^[0-9]+$ ]] && ((somaxconn < 4096)) && { wants idle || wants storm; }; then
    echo "bench: net.core.somaxconn is $somaxconn, below Herald's listen_backlog of 4096: idle and storm setup times may show 1 s SYN retries (sysctl -w net.core.somaxconn=4096)" >&2
fi

idle_args=(--hold 5 --concurrency 400)
tp_args=(--uas "${TP_UAS:-2000}" --senders "${TP_SENDERS:-32}" --duration "${TP_SECS:-15}"
    --payload "${TP_PAYLOAD:-1024}" --rate "${TP_RATE:-0}")
storm_args=(--uas "${STORM_UAS:-5000}" --window "${STORM_WINDOW:-5}")

if wants idle; then run idle --uas "${IDLE_UAS:-25000}" "${idle_args[@]}"; fi
if wants throughput; then run throughput "${tp_args[@]}"; fi
# The same throughput with a delivery receipt asked for on every message.
if wants receipts; then run_as herald+receipts throughput "${tp_args[@]}" --receipts; fi
if wants backlog; then
    run backlog --uas "${BACKLOG_UAS:-2000}" --messages-per-channel "${BACKLOG_MSGS:-10}" --senders 32
fi
if wants storm; then run storm "${storm_args[@]}"; fi
if wants burst; then
    run burst --uas "${BURST_UAS:-4}" --messages "${BURST_MSGS:-1000}" --backlog "${BURST_BACKLOG:-500}"
fi
if wants fanout; then
    # The broadcast API exists only with a token; the generator reads it
    # from the environment, so it never shows in a process listing.
    token="bench-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
    herald_env=("HERALD_BROADCAST_TOKENS=$token")
    fanout_uas="${FANOUT_UAS:-10000}"
    HERALD_BROADCAST_TOKEN="$token" run fanout --uas "$fanout_uas" \
        --non-followers "${FANOUT_NON:-$((fanout_uas / 10))}" --changes "${FANOUT_CHANGES:-5}" \
        --api-url "http://127.0.0.1:$port" --concurrency 400
    herald_env=()
fi
if wants abuse; then
    # Herald's default quotas: what a public service would run with.
    quotas=()
    run abuse --uas "${ABUSE_UAS:-100}" --rate "${ABUSE_RATE:-100}" --duration "${ABUSE_SECS:-20}" \
        --flood-connections "${ABUSE_CONNECTIONS:-64}" --anonymous
    quotas=("${unthrottled[@]}")
fi

if wants restart; then
    # It starts and stops Herald itself, on a store it builds once.
    restart_data="${RESTART_DATA:-}"
    if [[ -z "$restart_data" ]]; then
        data="$(mktemp -d)"
        restart_data="$data/data"
    fi
    echo "== restart" >&2
    "$lt" restart --url "$url" --herald "$herald" --data-dir "$restart_data" \
        --uas "${RESTART_UAS:-100000}" --messages-per-ua "${RESTART_MSGS:-10}" \
        --runs "${RESTART_RUNS:-3}" --out "$results/restart-$stamp.json"
    files+=("$results/restart-$stamp.json")
    stop_herald
fi

if [[ -n "$autopush_url" ]]; then
    if wants idle; then run_autopush idle --uas "${AUTOPUSH_IDLE_UAS:-${IDLE_UAS:-25000}}" "${idle_args[@]}"; fi
    if wants throughput; then run_autopush throughput "${tp_args[@]}"; fi
    if wants storm; then run_autopush storm "${storm_args[@]}"; fi
fi

"$lt" report "${files[@]}" --out "$results/report.html"
side="$results/side-by-side-$stamp.md"
if wants idle || wants throughput || wants receipts || wants storm; then
    echo >&2
    echo "Side by side (also in $side and report.html):" >&2
    "$lt" compare "${files[@]}" --out "$side"
fi
