# Helpers shared by bench.sh and bench-cluster.sh; sourced, not run.
# Expects $root (the checkout). Everything here talks to 127.0.0.1 only and
# stops processes by the PID it was given, never by name.

# Herald's push quotas off (VAR=VALUE words for env): every scenario but
# `abuse` measures the service, not its limits.
unthrottled=(HERALD_UA_RATE_LIMIT=off HERALD_SUBSCRIPTION_RATE_LIMIT=off
    HERALD_SENDER_RATE_LIMIT=off HERALD_ANONYMOUS_RATE_LIMIT=off)

# Builds (unless SKIP_BUILD=1) and sets $herald and $lt to the binaries.
bench_bins() {
    local target_dir="${CARGO_TARGET_DIR:-$root/target}"
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        (cd "$root" && cargo build --workspace --bins)
    fi
    herald="${HERALD_BIN:-$target_dir/debug/herald}"
    lt="${LOADTEST_BIN:-$target_dir/debug/herald-loadtest}"
    local b
    for b in "$herald" "$lt"; do
        [[ -x "$b" ]] || { echo "bench: $b not found; run cargo build --workspace --bins" >&2; exit 1; }
    done
}

# True when something answers on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Exits unless 127.0.0.1:PORT is free: a port already answering would mean
# benchmarking someone else's server. KNOB names the setting to change.
require_free_port() {
    local port=$1 knob=${2:-BENCH_PORT}
    if port_in_use "$port"; then
        echo "bench: 127.0.0.1:$port is already in use; set $knob" >&2
        exit 1
    fi
}

# Status line of GET PATH (default /health) on 127.0.0.1:PORT, empty if
# nothing answers.
http_status_line() {
    local port=$1 path=${2:-/health}
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
        printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
        timeout 2 head -n1 <&3
    ) 2>/dev/null || true
}

# True while PID exists and is not a zombie (an exited child not yet
# reaped still answers kill -0).
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ "${stat##*) }" != Z* ]]
}

# Waits up to 60 s for the Herald with PID to answer GET PATH (default
# /health) on PORT with 200. LOG is named if it does not.
wait_herald() {
    local pid=$1 port=$2 log=$3 path=${4:-/health}
    local _
    for _ in $(seq 1 600); do
        if ! pid_alive "$pid"; then
            echo "bench: herald exited; see $log" >&2
            return 1
        fi
        if [[ "$(http_status_line "$port" "$path")" == *" 200"* ]]; then return 0; fi
        sleep 0.1
    done
    echo "bench: herald not ready after 60 s; see $log" >&2
    return 1
}

# Stops our child PID: SIGTERM, up to 20 s for a clean shutdown (Herald
# closes websockets and flushes its store), then SIGKILL; reaps it.
stop_pid() {
    local pid=$1 _
    [[ -n "$pid" ]] || return 0
    kill "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for _ in $(seq 1 200); do
        pid_alive "$pid" || break
        sleep 0.1
    done
    if pid_alive "$pid"; then
        echo "bench: $pid ignored SIGTERM for 20 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
