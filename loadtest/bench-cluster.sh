#!/usr/bin/env bash
# One node vs. several: the same throughput and idle runs against
#   rocksdb  one Herald on its embedded RocksDB (the default store)
#   redis    one Herald on a standalone Redis (AOF, fsync every second)
#   cluster  three Herald nodes on a 6-node Redis Cluster (3 primaries and
#            3 replicas, AOF, fsync every second), user agents and POSTs
#            spread round-robin over the three
# Every run gets fresh servers (Redis through scripts/redis.sh, Herald from
# the debug build), all on 127.0.0.1, stopped by PID afterwards and on any
# exit. The configurations take turns within each repetition, so load from
# elsewhere on the machine falls on all of them alike. At the end: the
# median of each figure per configuration in $RESULTS/summary.md, and every
# run side by side in $RESULTS/report.html.
#
# Server CPU and memory count every server process: the Herald node(s) and,
# for redis and cluster, every redis-server (their share is in the JSON
# under `servers` and in summary.md).
#
# Knobs (environment): CONFIGS (default "rocksdb redis cluster"), REPEAT
# (default 3), BENCH_PORT (default 18180; nodes on BENCH_PORT..+2),
# REDIS_PORT (default 17300; Redis on REDIS_PORT..+5, cluster bus +10000),
# RESULTS (default loadtest/results/cluster), TP_UAS (1000), TP_SENDERS
# (32), TP_SECS (10), TP_PAYLOAD (1024), TP_RATE (unset: closed loop, as
# fast as the servers go; a number: that many pushes a second, open loop,
# whose CPU per message repeats within a few percent where a saturated run's
# moves by a tenth or more), IDLE_UAS (3000), IDLE_HOLD (3),
# RUN_TIMEOUT (seconds one herald-loadtest run may take, 300), DEADLINE
# (seconds for the whole script, 1800: no run starts after it), SKIP_BUILD=1,
# HERALD_BIN / LOADTEST_BIN (default: $CARGO_TARGET_DIR or target/, debug/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
# shellcheck source=bench-lib.sh
source "$here/bench-lib.sh"
results="${RESULTS:-$here/results/cluster}"
port="${BENCH_PORT:-18180}"
redis_port="${REDIS_PORT:-17300}"
repeat="${REPEAT:-3}"
configs="${CONFIGS:-rocksdb redis cluster}"
run_timeout="${RUN_TIMEOUT:-300}"
deadline=$((SECONDS + ${DEADLINE:-1800}))
redis_sh="$root/scripts/redis.sh"

for c in $configs; do
    case "$c" in
    rocksdb | redis | cluster) ;;
    *) echo "bench-cluster: unknown configuration '$c' (rocksdb, redis, cluster)" >&2; exit 2 ;;
    esac
done
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "bench-cluster: REPEAT must be a positive number" >&2; exit 2; }
[[ -z "${TP_RATE:-}" || "$TP_RATE" =~ ^[1-9][0-9]*$ ]] || { echo "bench-cluster: TP_RATE must be a positive number" >&2; exit 2; }
if [[ " $configs " == *" redis "* || " $configs " == *" cluster "* ]]; then
    command -v redis-server >/dev/null || { echo "bench-cluster: redis-server not found; run scripts/redis.sh install" >&2; exit 1; }
fi
command -v jq >/dev/null || echo "bench-cluster: jq not found: no summary.md (the JSON and report.html are still written)" >&2

bench_bins
for i in 0 1 2; do require_free_port $((port + i)) BENCH_PORT; done
for i in 0 1 2 3 4 5; do
    require_free_port $((redis_port + i)) REDIS_PORT
    require_free_port $((redis_port + i + 10000)) REDIS_PORT
done

mkdir -p "$results"
stamp="$(date +%Y%m%d-%H%M%S)"
key="$("$herald" keygen)"

# What is running now, so the trap can stop it.
lt_pid=""
herald_pids=()
redis_dir=""
data=""
stop_all() {
    local p
    stop_pid "$lt_pid"
    lt_pid=""
    for p in "${herald_pids[@]}"; do stop_pid "$p"; done
    herald_pids=()
    if [[ -n "$redis_dir" ]]; then
        "$redis_sh" stop "$redis_dir" || true
        rm -rf "$redis_dir"
        redis_dir=""
    fi
    if [[ -n "$data" ]]; then rm -rf "$data"; data=""; fi
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# PIDs of the Redis servers recorded in $redis_dir, as redis=PID,...
redis_pid_list() {
    local f out=()
    for f in "$redis_dir"/redis-*.pid; do
        [[ -e "$f" ]] && out+=("redis=$(cat "$f")")
    done
    (IFS=,; echo "${out[*]}")
}

# Starts configuration $1 with fresh data; sets urls and server_pids.
start_config() {
    local config=$1 log=$2 nodes=1 redis_url="" i p
    data="$(mktemp -d)"
    case "$config" in
    redis)
        redis_dir="$data/redis"
        redis_url=$(REDIS_SH_PERSIST=1 REDIS_SH_OWNER_PID=$$ "$redis_sh" standalone "$redis_dir" "$redis_port")
        ;;
    cluster)
        nodes=3
        redis_dir="$data/redis"
        redis_url=$(REDIS_SH_OWNER_PID=$$ "$redis_sh" cluster "$redis_dir" "$redis_port")
        ;;
    esac
    urls=""
    server_pids=""
    for ((i = 0; i < nodes; i++)); do
        p=$((port + i))
        if [[ -n "$redis_url" ]]; then
            env "${unthrottled[@]}" HERALD_STORE=redis HERALD_REDIS_URL="$redis_url" HERALD_ENDPOINT_KEYS="$key" \
                HERALD_METRICS_PUBLIC=true "$herald" serve --listen "127.0.0.1:$p" --data-dir "$data/node$i" \
                --public-url "http://127.0.0.1:$port" >"$log.node$i" 2>&1 &
        else
            env "${unthrottled[@]}" HERALD_METRICS_PUBLIC=true "$herald" serve --listen "127.0.0.1:$p" --data-dir "$data/node$i" \
                --public-url "http://127.0.0.1:$port" >"$log.node$i" 2>&1 &
        fi
        herald_pids+=($!)
        urls+="${urls:+,}ws://127.0.0.1:$p/"
        server_pids+="${server_pids:+,}herald=$!"
    done
    for ((i = 0; i < nodes; i++)); do
        # /ready answers 200 once the store does.
        wait_herald "${herald_pids[$i]}" $((port + i)) "$log.node$i" /ready || exit 1
    done
    if [[ -n "$redis_dir" ]]; then server_pids+=",$(redis_pid_list)"; fi
}

# Body of GET PATH on 127.0.0.1:PORT (with the status line and headers).
http_get() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
        timeout 5 cat <&3
    ) 2>/dev/null || true
}

# Wake-ups the nodes sent, and the node-to-node requests that carried
# them (batches, and the rare eviction), summed over the nodes: "W R".
wakeups_sent() {
    local i n=${#herald_pids[@]}
    for ((i = 0; i < n; i++)); do
        http_get $((port + i)) /metrics
    done | awk '/^herald_node_wakeups_sent_total/ { s += $NF }
        /^herald_node_request_seconds_count/ { r += $NF }
        END { print s + 0, r + 0 }'
}

# run CONFIG SCENARIO REP ARGS...: fresh servers, one bounded run, stop.
failed=0
run() {
    local config=$1 scenario=$2 rep=$3
    shift 3
    local out="$results/$config-$scenario-r$rep-$stamp.json"
    if ((SECONDS >= deadline)); then
        echo "bench-cluster: DEADLINE reached; skipping $config $scenario #$rep" >&2
        failed=$((failed + 1))
        return 0
    fi
    echo "== $config $scenario #$rep" >&2
    start_config "$config" "$results/herald-$config-$scenario-r$rep.log"
    # In the background, so a signal to this script is handled at once
    # (bash runs traps only after a foreground command ends).
    timeout -s INT -k 10 "$run_timeout" "$lt" "$scenario" --url "$urls" \
        --target "herald-$config" --server-pid "$server_pids" --out "$out" "$@" &
    lt_pid=$!
    local ok=0
    wait "$lt_pid" || ok=$?
    lt_pid=""
    if ((ok != 0)); then
        echo "bench-cluster: $config $scenario #$rep failed" >&2
        rm -f "$out"
        failed=$((failed + 1))
    elif [[ "$scenario" == throughput ]]; then
        wakeups_sent >"${out%.json}.wakeups"
    fi
    stop_all
}

for ((rep = 1; rep <= repeat; rep++)); do
    for config in $configs; do
        run "$config" throughput "$rep" --uas "${TP_UAS:-1000}" --senders "${TP_SENDERS:-32}" \
            --duration "${TP_SECS:-10}" --payload "${TP_PAYLOAD:-1024}" ${TP_RATE:+--rate "$TP_RATE"}
        run "$config" idle "$rep" --uas "${IDLE_UAS:-3000}" --hold "${IDLE_HOLD:-3}" --concurrency 200
    done
done

# Every run in one report, labelled config#rep.
labels=()
for f in "$results"/*-"$stamp".json; do
    [[ -e "$f" ]] || continue
    b=$(basename "$f" "-$stamp.json")
    labels+=(--label "${b%%-*}#${b##*-r}=$f")
done
if ((${#labels[@]} > 0)); then
    "$lt" report "${labels[@]}" --out "$results/report.html"
fi

# Medians per configuration (each figure on its own, over the runs that
# finished).
summary=""
if command -v jq >/dev/null; then
    summary="$results/summary.md"
    {
        echo "Median of each figure over the runs listed ($stamp; TP_UAS=${TP_UAS:-1000} TP_SENDERS=${TP_SENDERS:-32} TP_SECS=${TP_SECS:-10} TP_PAYLOAD=${TP_PAYLOAD:-1024} TP_RATE=${TP_RATE:-closed loop} IDLE_UAS=${IDLE_UAS:-3000})."
        echo
        echo "| configuration | runs | delivered/s | server CPU µs per message (Herald + Redis) | Herald CPU µs per message | latency p50 ms | p99 ms | Herald RSS after MiB | Redis RSS after MiB | idle: KiB per connection (Herald + Redis) | idle: Herald KiB per connection |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|"
        for config in $configs; do
            tp=("$results/$config"-throughput-r*-"$stamp".json)
            idle=("$results/$config"-idle-r*-"$stamp".json)
            [[ -e "${tp[0]}" ]] || tp=()
            [[ -e "${idle[0]}" ]] || idle=()
            jq -rn --arg config "$config" --argjson tpn "${#tp[@]}" --argjson idlen "${#idle[@]}" \
                --slurpfile tp <(if ((${#tp[@]})); then cat "${tp[@]}"; fi) \
                --slurpfile idle <(if ((${#idle[@]})); then cat "${idle[@]}"; fi) '
                def median: map(select(. != null)) | sort |
                    if length == 0 then null
                    elif length % 2 == 1 then .[length / 2 | floor]
                    else (.[length / 2 - 1] + .[length / 2]) / 2 end;
                def f(d): if . == null then "–" else (. * pow(10; d) | round) / pow(10; d) | tostring end;
                def ratio(x; n): if x == null or n == null or n == 0 then null else x / n end;
                def mine(name): [.servers[] | select(name == null or .name == name)];
                def cpu(name): mine(name) | if any(.cpu_s == null) or length == 0 then null else map(.cpu_s) | add end;
                def rss(name): mine(name) | if any(.rss_after_kib == null) or length == 0 then null else map(.rss_after_kib) | add end;
                def grown(name): mine(name)
                    | if any(.rss_after_kib == null or .rss_before_kib == null) or length == 0 then null
                      else map(.rss_after_kib - .rss_before_kib) | add end;
                [
                  $config,
                  "\($tpn) + \($idlen)",
                  ($tp | map(.metrics.delivered_per_s) | median | f(0)),
                  ($tp | map(ratio(cpu(null); .metrics.delivered / 1e6)) | median | f(0)),
                  ($tp | map(ratio(cpu("herald"); .metrics.delivered / 1e6)) | median | f(0)),
                  ($tp | map(.latency.end_to_end.p50_ms) | median | f(2)),
                  ($tp | map(.latency.end_to_end.p99_ms) | median | f(2)),
                  ($tp | map(ratio(rss("herald"); 1024)) | median | f(1)),
                  ($tp | map(ratio(rss("redis"); 1024)) | median | f(1)),
                  ($idle | map(ratio(grown(null); .metrics.open_at_end)) | median | f(1)),
                  ($idle | map(ratio(grown("herald"); .metrics.open_at_end)) | median | f(1))
                ] | "| " + join(" | ") + " |"'
        done
        echo
        for what in 1 2; do
            if ((what == 1)); then
                printf 'Wake-ups sent per delivered message, median:'
            else
                printf 'Node-to-node requests (wake-up batches, evictions) per delivered message, median:'
            fi
            for config in $configs; do
                for f in "$results/$config"-throughput-r*-"$stamp".wakeups; do
                    [[ -e "$f" ]] || continue
                    d=$(jq '.metrics.delivered' "${f%.wakeups}.json")
                    awk -v w="$(cut -d' ' -f"$what" "$f")" -v d="$d" 'BEGIN { if (d > 0) printf "%.4f\n", (w + 0) / d }'
                done | sort -g | awk -v c="$config" '{ v[NR] = $1 }
                    END { m = NR == 0 ? "–" : (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)
                          printf " %s %s;", c, m }'
            done
            echo
        done
    } >"$summary"
    cat "$summary"
fi
echo "bench-cluster: results in $results (report.html${summary:+, summary.md}); $failed run(s) failed or skipped" >&2
((failed == 0))
