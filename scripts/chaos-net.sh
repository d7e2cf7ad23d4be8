#!/usr/bin/env bash
# Network namespaces for fault tests (`make chaos`, scripts/chaos.sh): one
# namespace per server, all joined to one bridge in the root namespace, where
# the load generator runs. Every name, address and PID it creates is recorded
# in DIR, and `down` removes exactly those, nothing else. Needs root.
#
#   chaos-net.sh up DIR NAME...          bridge + one namespace per NAME (short names:
#                                        [a-z0-9]{1,6}); prints NAME=ADDRESS lines
#   chaos-net.sh group DIR GROUP NAME... GROUP stands for these NAMEs in cut/heal/isolate
#   chaos-net.sh addr DIR NAME           NAME's address (the bridge's for "root")
#   chaos-net.sh run DIR NAME [--as ID] [--faketime OFFSET] [--log FILE] -- CMD...
#                                        starts CMD in NAME's namespace ("root": the root
#                                        one) in the background
#                                        and records its PID as ID (default NAME);
#                                        --faketime "+30s" / "-30s" skews its wall clock
#   chaos-net.sh pid DIR ID              the PID recorded as ID, if it still runs
#   chaos-net.sh kill DIR ID [SIGNAL]    signals the PID recorded as ID (default TERM)
#   chaos-net.sh cut DIR A B             drops all traffic between A and B, both ways
#   chaos-net.sh heal DIR A B            undoes `cut DIR A B`
#   chaos-net.sh heal DIR                undoes every cut and isolate
#   chaos-net.sh isolate DIR A           cuts A from every other namespace (not from root)
#   chaos-net.sh redis-cluster DIR PROXY_BIN|- NAME×6
#                                        3 primaries + 3 replicas, one per namespace;
#                                        with PROXY_BIN every node is reached through a
#                                        herald-loadtest faultproxy in its namespace that
#                                        the node announces; prints the seed URLs
#   chaos-net.sh redis-restart-empty DIR NAME
#                                        kill -9 of NAME's Redis, restarted at once with
#                                        its data gone (a node without persistence)
#   chaos-net.sh down DIR                stops every recorded PID, deletes the namespaces
#                                        and the bridge; safe to call twice
#
# A, B: a NAME, a GROUP, or NAME,NAME,... Cuts are sets of addresses per
# namespace, not counts: healing one cut heals an overlapping one too.
#
# Environment: CHAOS_NET_SUBNET (default: the first free 10.77.X.0/24).
set -euo pipefail

die() { echo "chaos-net.sh: $*" >&2; exit 1; }
usage() { sed -n '2,30p' "$0" >&2; exit 2; }

MARKER=.chaos-net   # marks DIR as ours
STOP_TIMEOUT=10     # seconds for a process to exit after SIGTERM
REDIS_PORT=6379     # inside each Redis namespace; the bus is +10000
PROXY_PORT=6380     # the faultproxy in front of it
CONTROL_PORT=6381   # the faultproxy's control address
FAKETIME_LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
  command -v ip >/dev/null || die "ip not found (iproute2); run scripts/install-test-tools.sh"
  command -v nft >/dev/null || die "nft not found (nftables); run scripts/install-test-tools.sh"
}

state() { [ -e "$1/$MARKER" ] || die "$1 is not a chaos-net directory (no 'up' yet?)"; }

# Looked up from DIR/nodes: "NAME ADDRESS NAMESPACE HOSTVETH" per line.
node_field() {
  awk -v n="$2" -v f="$3" '$1 == n { print $f; found = 1 } END { exit !found }' "$1/nodes" ||
    die "no namespace '$2' in $1"
}
ns_of() { node_field "$1" "$2" 3; }
addr() {
  if [ "$2" = root ]; then cat "$1/bridge-addr"; else node_field "$1" "$2" 2; fi
}

# A NAME, a GROUP or a comma list, as NAMEs one per line.
expand() {
  local dir=$1 spec=$2 item
  for item in ${spec//,/ }; do
    if [ -e "$dir/groups/$item" ]; then
      cat "$dir/groups/$item"
    else
      node_field "$dir" "$item" 1 >/dev/null
      echo "$item"
    fi
  done
}

subnet_free() {
  ! ip -4 route show | grep -q "^$1\.0/24\b" && ! ip -4 addr show | grep -q "inet $1\."
}

up() {
  local dir=$1
  shift
  need_root
  [ "$#" -gt 0 ] || usage
  mkdir -p "$dir"
  [ -e "$dir/$MARKER" ] && die "$dir is already up; call down first"
  local net="${CHAOS_NET_SUBNET:-}" x
  if [ -z "$net" ]; then
    for x in $(seq 0 254); do
      if subnet_free "10.77.$x"; then net="10.77.$x"; break; fi
    done
    [ -n "$net" ] || die "no free 10.77.X.0/24 subnet"
  fi
  net=${net%.0/24}
  subnet_free "$net" || die "subnet $net.0/24 is in use"
  # The prefix makes every interface and namespace name ours alone, so two
  # runs at once (a test and `make chaos`) never collide.
  local prefix
  prefix="hc$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
  mkdir -p "$dir/pids" "$dir/groups" "$dir/logs"
  touch "$dir/$MARKER"
  echo "$prefix" >"$dir/prefix"
  local br="${prefix}br"
  echo "$br" >"$dir/bridge"
  ip link add "$br" type bridge
  ip addr add "$net.1/24" dev "$br"
  ip link set "$br" up
  echo "$net.1" >"$dir/bridge-addr"
  : >"$dir/nodes"
  local i=10 name ns veth
  for name in "$@"; do
    [[ "$name" =~ ^[a-z0-9]{1,6}$ ]] || die "bad name '$name' (1-6 of [a-z0-9])"
    [ "$name" != root ] || die "'root' names the root namespace"
    ns="$prefix-$name"
    veth="$prefix$name"
    echo "$name $net.$i $ns $veth" >>"$dir/nodes"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$br" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$net.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    # Cuts are one set of blocked addresses per namespace, checked both ways.
    ip netns exec "$ns" nft -f - <<EOF
table inet chaosnet {
  set blocked { type ipv4_addr; }
  chain input { type filter hook input priority 0; ip saddr @blocked drop; }
  chain output { type filter hook output priority 0; ip daddr @blocked drop; }
}
EOF
    echo "$name=$net.$i"
    i=$((i + 1))
  done
}

group() {
  local dir=$1 g=$2
  shift 2
  state "$dir"
  [[ "$g" =~ ^[a-z0-9-]+$ ]] || die "bad group name '$g'"
  local n
  for n in "$@"; do node_field "$dir" "$n" 1 >/dev/null; done
  printf '%s\n' "$@" >"$dir/groups/$g"
}

# Process records: DIR/pids/ID holds "PID STARTTIME NAMESPACE"; the start
# time (field 22 of /proc/PID/stat) tells a recycled PID from ours.
starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086 # split into fields on purpose
  set -- $stat
  # After "comm)", field 3 (state) is $1, so field 22 is $20.
  [ "$1" != Z ] || return 1
  echo "${20}"
}

live_pid() {
  local dir=$1 id=$2 pid start ns
  [ -e "$dir/pids/$id" ] || return 1
  read -r pid start ns <"$dir/pids/$id"
  [ "$(starttime "$pid" 2>/dev/null)" = "$start" ] || return 1
  echo "$pid"
}

run() {
  local dir=$1 name=$2
  shift 2
  state "$dir"
  local id=$name fake="" log=""
  while [ "$#" -gt 0 ]; do
    case "$1" in
    --as) id=$2; shift 2 ;;
    --faketime) fake=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
    esac
  done
  [ "$#" -gt 0 ] || usage
  [[ "$id" =~ ^[a-z0-9-]+$ ]] || die "bad id '$id'"
  if live_pid "$dir" "$id" >/dev/null; then die "'$id' is still running"; fi
  # "root" runs CMD beside the load generator (e.g. a proxy from loopback
  # into a namespace).
  local ns=root enter=()
  if [ "$name" != root ]; then
    ns=$(ns_of "$dir" "$name")
    enter=(ip netns exec "$ns")
  fi
  [ -n "$log" ] || log="$dir/logs/$id.log"
  local pre=()
  if [ -n "$fake" ]; then
    [ -e "$FAKETIME_LIB" ] || die "$FAKETIME_LIB not found (libfaketime); run scripts/install-test-tools.sh"
    # Only the wall clock moves: tokio's timers and Instants read
    # CLOCK_MONOTONIC, and a faked one would also shift every sleep; a node
    # whose clock is wrong still counts seconds right.
    pre=(env "LD_PRELOAD=$FAKETIME_LIB" "FAKETIME=$fake" FAKETIME_DONT_FAKE_MONOTONIC=1
      FAKETIME_NO_CACHE=1)
  fi
  # `ip netns exec`, setsid and env exec in place, so $! is CMD's PID, and
  # CMD leads its own process group, which `kill` and `down` signal whole
  # (a shell's children too). Detached from our stdio so a caller reading
  # our output is not held open by CMD.
  "${enter[@]}" setsid "${pre[@]}" "$@" </dev/null >>"$log" 2>&1 &
  local pid=$!
  local start=""
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    start=$(starttime "$pid") && break
    sleep 0.01
  done
  [ -n "$start" ] || die "'$id' exited at once; see $log"
  echo "$pid $start $ns" >"$dir/pids/$id"
  echo "$pid"
}

pid_cmd() {
  state "$1"
  live_pid "$1" "$2" || die "'$2' is not running"
}

kill_id() {
  local dir=$1 id=$2 sig=${3:-TERM} pid
  state "$dir"
  pid=$(live_pid "$dir" "$id") || die "'$id' is not running"
  kill -s "$sig" -- "-$pid"
}

# Adds (op=add) or removes (op=delete) B's addresses in A's set and A's in B's.
block() {
  local dir=$1 op=$2 a b ns
  for a in $3; do
    ns=$(ns_of "$dir" "$a")
    for b in $4; do
      [ "$a" != "$b" ] || continue
      if [ "$op" = add ]; then
        ip netns exec "$ns" nft add element inet chaosnet blocked "{ $(addr "$dir" "$b") }"
      else
        # Deleting an absent element fails; healing twice is fine.
        ip netns exec "$ns" nft delete element inet chaosnet blocked "{ $(addr "$dir" "$b") }" 2>/dev/null || true
      fi
    done
  done
}

cut() {
  local dir=$1 a b
  state "$dir"
  a=$(expand "$dir" "$2")
  b=$(expand "$dir" "$3")
  block "$dir" add "$a" "$b"
  block "$dir" add "$b" "$a"
}

heal() {
  local dir=$1
  state "$dir"
  if [ "$#" -eq 1 ]; then
    local ns
    while read -r _ _ ns _; do
      ip netns exec "$ns" nft flush set inet chaosnet blocked
    done <"$dir/nodes"
    return 0
  fi
  local a b
  a=$(expand "$dir" "$2")
  b=$(expand "$dir" "$3")
  block "$dir" delete "$a" "$b"
  block "$dir" delete "$b" "$a"
}

isolate() {
  local dir=$1 a others
  state "$dir"
  a=$(expand "$dir" "$2")
  others=$(awk '{ print $1 }' "$dir/nodes" | grep -vxF -f <(echo "$a") || true)
  block "$dir" add "$a" "$others"
  block "$dir" add "$others" "$a"
}

rcli() {
  local dir=$1 name=$2 port=$3
  shift 3
  timeout 5 ip netns exec "$(ns_of "$dir" "$name")" redis-cli -h "$(addr "$dir" "$name")" -p "$port" "$@" 2>/dev/null
}

# As scripts/redis.sh's: every node sees 3 replicas and each replica synced.
redis_ready() {
  local dir=$1 n replicas=0
  shift
  for n in "$@"; do
    rcli "$dir" "$n" "$REDIS_PORT" cluster info | grep -q '^cluster_state:ok' || return 1
    [ "$(rcli "$dir" "$n" "$REDIS_PORT" cluster nodes | grep -cE '[ ,]slave ')" -eq 3 ] || return 1
    if rcli "$dir" "$n" "$REDIS_PORT" role | head -n 1 | grep -q '^slave'; then
      rcli "$dir" "$n" "$REDIS_PORT" info replication | grep -q '^master_link_status:up' || return 1
      replicas=$((replicas + 1))
    fi
  done
  [ "$replicas" -eq 3 ]
}

# Starts (or restarts) the Redis node of namespace NAME with its data in
# DIR/redis-NAME, as `redis-cluster` first did.
redis_start() {
  local dir=$1 n=$2 a announce=()
  a=$(addr "$dir" "$n")
  if [ "$(cat "$dir/redis-proxy")" != - ]; then
    # Clients, replicas and redirects all reach the node through its
    # proxy; the cluster bus (+10000) stays direct, so gossip and failure
    # detection see only the nftables cuts, not the proxy's faults.
    announce=(--cluster-announce-ip "$a" --cluster-announce-port "$PROXY_PORT"
      --cluster-announce-bus-port $((REDIS_PORT + 10000)))
  fi
  run "$dir" "$n" --as "redis-$n" -- redis-server --port "$REDIS_PORT" --bind "$a" \
    --protected-mode no --daemonize no --dir "$dir/redis-$n" --cluster-enabled yes \
    --cluster-config-file "$dir/redis-$n/nodes.conf" --cluster-node-timeout 2000 \
    --appendonly yes --appendfsync everysec --save '' --repl-diskless-sync-delay 0 \
    "${announce[@]}" >/dev/null
}

# kill -9 of NAME's Redis and a restart with its data gone but its cluster
# identity (nodes.conf) kept, within the node timeout: it comes back as the
# primary of its slots, empty, and its replica resyncs from it, emptied too.
# What a node without persistence that restarts quickly does.
redis_restart_empty() {
  local dir=$1 n=$2 pid
  state "$dir"
  pid=$(live_pid "$dir" "redis-$n") || die "redis in '$n' is not running"
  kill -KILL -- "-$pid"
  while live_pid "$dir" "redis-$n" >/dev/null; do sleep 0.01; done
  rm -rf "$dir/redis-$n/appendonlydir" "$dir/redis-$n"/*.rdb
  redis_start "$dir" "$n"
}

redis_cluster() {
  local dir=$1 proxy=$2
  shift 2
  state "$dir"
  [ "$#" -eq 6 ] || usage
  command -v redis-server >/dev/null || die "redis-server not found; run scripts/redis.sh install"
  local n a seeds=() port=$REDIS_PORT
  [ "$proxy" = - ] || port=$PROXY_PORT
  echo "$proxy" >"$dir/redis-proxy"
  for n in "$@"; do
    a=$(addr "$dir" "$n")
    mkdir -p "$dir/redis-$n"
    if [ "$proxy" != - ]; then
      run "$dir" "$n" --as "proxy-$n" -- "$proxy" faultproxy --listen "$a:$PROXY_PORT" \
        --upstream "$a:$REDIS_PORT" --control "$a:$CONTROL_PORT" >/dev/null
    fi
    redis_start "$dir" "$n"
    seeds+=("$a:$port")
  done
  local deadline=$((SECONDS + 10))
  for n in "$@"; do
    until rcli "$dir" "$n" "$REDIS_PORT" ping | grep -q PONG; do
      [ "$SECONDS" -lt "$deadline" ] || die "redis in '$n' did not come up; see $dir/logs/redis-$n.log"
      sleep 0.05
    done
  done
  if ! timeout 30 ip netns exec "$(ns_of "$dir" "$1")" redis-cli --cluster create "${seeds[@]}" \
    --cluster-replicas 1 --cluster-yes >"$dir/logs/cluster-create.log" 2>&1; then
    cat "$dir/logs/cluster-create.log" >&2
    die "redis-cli --cluster create failed (output above)"
  fi
  deadline=$((SECONDS + 30))
  until redis_ready "$dir" "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "cluster not ready within 30 s"
    sleep 0.1
  done
  printf '%s\n' "$@" >"$dir/groups/redis"
  local urls=()
  for a in "${seeds[@]}"; do urls+=("redis://$a"); done
  (IFS=,; echo "${urls[*]}")
}

down() {
  local dir=$1 f id pid live=()
  [ -e "$dir/$MARKER" ] || return 0
  for f in "$dir"/pids/*; do
    [ -e "$f" ] || continue
    id=${f##*/}
    if pid=$(live_pid "$dir" "$id"); then
      kill -TERM -- "-$pid" 2>/dev/null || true
      live+=("$id")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT))
  for id in "${live[@]}"; do
    while pid=$(live_pid "$dir" "$id"); do
      if [ "$SECONDS" -ge "$deadline" ]; then
        kill -KILL -- "-$pid" 2>/dev/null || true
        sleep 0.1
        break
      fi
      sleep 0.05
    done
  done
  rm -f "$dir"/pids/*
  local ns
  if [ -e "$dir/nodes" ]; then
    while read -r _ _ ns _; do
      # Whatever still runs in a namespace of ours was started there by us
      # (a child that left its group); it would keep the namespace alive.
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
      # Deleting the namespace deletes its veth end, and with it ours.
      ip netns delete "$ns" 2>/dev/null || true
    done <"$dir/nodes"
  fi
  if [ -e "$dir/bridge" ]; then ip link delete "$(cat "$dir/bridge")" 2>/dev/null || true; fi
  rm -f "$dir/$MARKER" "$dir/nodes" "$dir/bridge" "$dir/bridge-addr" "$dir/prefix"
  rm -rf "$dir/groups" "$dir/pids"
}

cmd=${1:-}
[ "$#" -ge 2 ] || usage
shift
case "$cmd" in
up) up "$@" ;;
group) [ "$#" -ge 3 ] || usage; group "$@" ;;
addr) [ "$#" -eq 2 ] || usage; state "$1"; addr "$@" ;;
run) [ "$#" -ge 4 ] || usage; run "$@" ;;
pid) [ "$#" -eq 2 ] || usage; pid_cmd "$@" ;;
kill) [ "$#" -eq 2 ] || [ "$#" -eq 3 ] || usage; kill_id "$@" ;;
cut) [ "$#" -eq 3 ] || usage; cut "$@" ;;
heal) [ "$#" -eq 1 ] || [ "$#" -eq 3 ] || usage; heal "$@" ;;
isolate) [ "$#" -eq 2 ] || usage; isolate "$@" ;;
redis-cluster) [ "$#" -eq 8 ] || usage; redis_cluster "$@" ;;
redis-restart-empty) [ "$#" -eq 2 ] || usage; redis_restart_empty "$@" ;;
down) [ "$#" -eq 1 ] || usage; down "$1" ;;
*) usage ;;
esac
