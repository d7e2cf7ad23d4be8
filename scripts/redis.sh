#!/usr/bin/env bash
# Real Redis servers on loopback for tests and by hand. Every server runs in
# the foreground of its own background process, is recorded in DIR by PID,
# and is stopped by that PID only.
#
#   scripts/redis.sh install                 install redis-server and redis-tools if missing
#   scripts/redis.sh standalone DIR PORT     one server; prints its URL
#   scripts/redis.sh cluster DIR PORT0       3 primaries + 3 synced replicas on PORT0..PORT0+5
#                                            (and bus ports +10000); prints the seed URLs
#   scripts/redis.sh stop DIR                stops every server recorded in DIR
#
# Environment:
#   REDIS_SH_OWNER_PID=PID   stop DIR's servers once process PID is gone (test
#                            processes that cannot rely on their own cleanup)
#   REDIS_SH_OWNER_RMDIR=1   with the above, also remove DIR afterwards
#   REDIS_SH_PERSIST=1       standalone: keep RDB snapshots and an AOF
set -euo pipefail

die() { echo "redis.sh: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "$0" >&2; exit 2; }

START_TIMEOUT=10   # seconds for one server to answer PING
CLUSTER_TIMEOUT=30 # seconds for cluster_state:ok everywhere
STOP_TIMEOUT=10    # seconds for servers to exit after SIGTERM
MARKER=.redis-sh   # marks DIR as ours, so only such a DIR is ever removed

need_tools() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    die "redis-server/redis-cli not found; run: scripts/redis.sh install"
}

check_port() {
  [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$2" ] ||
    die "bad port '$1' (1..$2)"
}

install() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return 0
  fi
  echo "installing: redis-server redis-tools"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    redis-server redis-tools
}

cli() { timeout 5 redis-cli -h 127.0.0.1 -p "$1" "${@:2}" 2>/dev/null; }

# True while PID is a redis-server listening on PORT: a recycled PID is
# never signalled.
is_our_server() {
  local pid=$1 port=$2
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ] || return 1
  # Redis retitles itself "redis-server 127.0.0.1:PORT [cluster]".
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -Eq ":$port( |$)"
}

# Starts redis-server on 127.0.0.1:PORT in the background; extra args follow.
spawn() {
  local dir=$1 port=$2 workdir=$3
  shift 3
  mkdir -p "$workdir"
  # Detached from our stdio so a caller reading our output sees EOF when we
  # exit, not when the server does.
  redis-server --port "$port" --bind 127.0.0.1 --protected-mode yes --daemonize no \
    --dir "$workdir" "$@" \
    </dev/null >>"$dir/redis-$port.log" 2>&1 &
  echo $! >"$dir/redis-$port.pid"
}

wait_ping() {
  local dir=$1 port=$2 deadline=$((SECONDS + START_TIMEOUT)) pid
  pid=$(cat "$dir/redis-$port.pid")
  # Asking for the PID, not just PING, so another server already on the
  # port is never mistaken for ours.
  until cli "$port" info server | grep -q "^process_id:$pid\b"; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 20 "$dir/redis-$port.log" >&2 || true
      return 1
    fi
    sleep 0.05
  done
}

watchdog() {
  local dir=$1
  [ -n "${REDIS_SH_OWNER_PID:-}" ] || return 0
  local owner=$REDIS_SH_OWNER_PID rmdir=${REDIS_SH_OWNER_RMDIR:-} self=$0
  (
    # Ends by itself once DIR has no servers left (a normal `stop`).
    while kill -0 "$owner" 2>/dev/null; do
      compgen -G "$dir/*.pid" >/dev/null || exit 0
      sleep 0.5
    done
    "$self" stop "$dir"
    if [ "$rmdir" = 1 ] && [ -e "$dir/$MARKER" ]; then rm -rf -- "$dir"; fi
  ) </dev/null >/dev/null 2>&1 &
}

prepare_dir() {
  [ -n "$1" ] || usage
  mkdir -p "$1"
  touch "$1/$MARKER"
}

standalone() {
  local dir=$1 port=$2
  need_tools
  prepare_dir "$dir"
  dir=$(cd "$dir" && pwd)
  check_port "$port" 65535
  local persist=(--save '' --appendonly no)
  [ "${REDIS_SH_PERSIST:-}" = 1 ] && persist=(--appendonly yes --appendfsync everysec)
  spawn "$dir" "$port" "$dir/node-$port" "${persist[@]}"
  if ! wait_ping "$dir" "$port"; then
    stop "$dir"
    die "redis-server on 127.0.0.1:$port did not come up (waited up to ${START_TIMEOUT}s; log above)"
  fi
  watchdog "$dir"
  echo "redis://127.0.0.1:$port"
}

# Ready means more than cluster_state:ok, which comes before the replicas
# are attached: every node must see 3 replicas, and each replica must have
# synced with its primary (a replica that never did refuses to fail over).
cluster_ready() {
  local p replicas=0
  for p in "$@"; do
    cli "$p" cluster info | grep -q '^cluster_state:ok' || return 1
    [ "$(cli "$p" cluster nodes | grep -cE '[ ,]slave ')" -eq 3 ] || return 1
    if cli "$p" role | head -n 1 | grep -q '^slave'; then
      cli "$p" info replication | grep -q '^master_link_status:up' || return 1
      replicas=$((replicas + 1))
    fi
  done
  [ "$replicas" -eq 3 ]
}

cluster() {
  local dir=$1 port0=$2 ports=() p
  need_tools
  prepare_dir "$dir"
  dir=$(cd "$dir" && pwd)
  # Cluster bus ports are PORT+10000.
  check_port "$port0" $((65535 - 10005))
  for i in 0 1 2 3 4 5; do ports+=($((port0 + i))); done
  for p in "${ports[@]}"; do
    spawn "$dir" "$p" "$dir/node-$p" --cluster-enabled yes \
      --cluster-config-file "$dir/node-$p/nodes.conf" --cluster-node-timeout 2000 \
      --appendonly yes --appendfsync everysec --save '' --repl-diskless-sync-delay 0
  done
  for p in "${ports[@]}"; do
    if ! wait_ping "$dir" "$p"; then
      stop "$dir"
      die "cluster node 127.0.0.1:$p did not come up (waited up to ${START_TIMEOUT}s; log above)"
    fi
  done
  local addrs=()
  for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
  if ! timeout 30 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 \
    --cluster-yes >"$dir/cluster-create.log" 2>&1; then
    cat "$dir/cluster-create.log" >&2
    stop "$dir"
    die "redis-cli --cluster create failed (output above)"
  fi
  local deadline=$((SECONDS + CLUSTER_TIMEOUT))
  until cluster_ready "${ports[@]}"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      for p in "${ports[@]}"; do
        echo "== $p" >&2
        cli "$p" cluster info | head -n 1 >&2
        cli "$p" info replication | grep -E '^(role|master_link_status)' >&2
      done
      stop "$dir"
      die "cluster on ports ${ports[0]}..${ports[5]} not ready within ${CLUSTER_TIMEOUT}s"
    fi
    sleep 0.1
  done
  watchdog "$dir"
  local urls=()
  for p in "${ports[@]}"; do urls+=("redis://127.0.0.1:$p"); done
  (IFS=,; echo "${urls[*]}")
}

stop() {
  local dir=$1 f pid port live=()
  [ -d "$dir" ] || return 0
  for f in "$dir"/redis-*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    port=${f##*/redis-}
    port=${port%.pid}
    if is_our_server "$pid" "$port"; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$pid:$port")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT)) entry
  for entry in "${live[@]}"; do
    pid=${entry%%:*}
    port=${entry##*:}
    while is_our_server "$pid" "$port"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "redis.sh: redis-server $pid (port $port) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.1
        is_our_server "$pid" "$port" && die "redis-server $pid (port $port) would not exit"
        break
      fi
      sleep 0.05
    done
  done
  rm -f "$dir"/redis-*.pid
}

case "${1:-}" in
install) install ;;
standalone) [ $# -eq 3 ] || usage; standalone "$2" "$3" ;;
cluster) [ $# -eq 3 ] || usage; cluster "$2" "$3" ;;
stop) [ $# -eq 2 ] || usage; stop "$2" ;;
*) usage ;;
esac
