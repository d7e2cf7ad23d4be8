#!/usr/bin/env bash
# `make chaos` (issue 25): three Herald nodes on a Redis Cluster (3 primaries
# + 3 replicas), every server in its own network namespace
# (scripts/chaos-net.sh), under `herald-loadtest chaos`, which injects the
# faults on a schedule, heals them, drains and accounts for every accepted
# message. First each fault alone (one run each), then random schedules in
# which every fault comes with a kill -9 of a node. Everything is torn down
# on exit. Prints a table per fault and exits non-zero if a checker failed,
# except for losses documented as inherent to a setting (a failover with
# redis_wait_replicas = 0, proto-docs/cluster.md): those are reported.
#
# Needs root (namespaces). Paths: the load generator runs in the root
# namespace and reaches each node through a faultproxy on 127.0.0.1 (it
# sends to loopback only); every Redis node is reached, by the nodes, by its
# replicas and by redirects, through a faultproxy in its namespace that it
# announces, which is where slow and lossy links are made.
#
# Knobs (environment): CHAOS_SECS (seconds of load in all, default 300),
# CHAOS_RUN_SECS (seconds of load per run, default 30), CHAOS_FAULTS (the
# faults to run alone, default all of: redis-partition node-partition
# primary-cut-wait1 primary-cut-wait0 failover-lagged-wait1
# failover-lagged-wait0 slow-redis lossy-redis halfopen-redis clock-ahead
# clock-behind kill9; also primary-restarted-empty, not in the default: a
# Redis primary without persistence restarted empty, which loses everything
# on its slots, the run that must fail), CHAOS_SEED (default: random),
# CHAOS_STRICT=1 (a loss documented for redis_wait_replicas = 0 fails too),
# CHAOS_UAS (default 24), CHAOS_PORT (default 18300: nodes on +0..+2, their
# proxies' control on +10..+12), CHAOS_ARGS (more `herald-loadtest chaos`
# flags), RESULTS (default loadtest/results/chaos), SKIP_BUILD=1,
# HERALD_BIN / LOADTEST_BIN.
#
# Internal, run by the schedules: scripts/chaos.sh act DIR ACTION ARGS...
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
net="$root/scripts/chaos-net.sh"
NODES=(n1 n2 n3)
REDIS=(r1 r2 r3 r4 r5 r6)
HERALD_PORT=8080  # each node's public listen, in its namespace
NODE_PORT=8081    # node-to-node wake-ups (node_listen)

die() { echo "chaos: $*" >&2; exit 1; }

# ---- actions the schedules run (scripts/chaos.sh act DIR ACTION ...) ----

# Sends one control line to a faultproxy and prints its answer.
proxy_ctl() {
  local host=$1 port=$2 line=$3 reply
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf '%s\n' "$line" >&3
  IFS= read -r -t 5 reply <&3 || reply="err no answer"
  exec 3>&-
  [[ "$reply" == ok* ]] || { echo "chaos: proxy $host:$port: $reply" >&2; return 1; }
}

node_index() {
  local i
  for i in "${!NODES[@]}"; do [ "${NODES[$i]}" = "$1" ] && { echo "$i"; return; }; done
  die "no node '$1'"
}

# Waits up to 30 s for node NAME to answer GET $CHAOS_READY (through its
# loopback proxy): /health by default, since a node restarted while a fault
# keeps it from Redis is up but not ready, which is part of the fault; the
# driver's first start asks for /ready.
wait_ready() {
  local dir=$1 name=$2 port deadline=$((SECONDS + 30)) path=${CHAOS_READY:-/health}
  port=$(($(cat "$dir/port") + $(node_index "$name")))
  until curl -sf -o /dev/null -m 2 "http://127.0.0.1:$port$path"; do
    [ "$SECONDS" -lt "$deadline" ] || die "node $name not ready in 30 s; see $dir/logs/$name.log"
    "$net" pid "$dir" "$name" >/dev/null 2>&1 || die "node $name exited; see $dir/logs/$name.log"
    sleep 0.2
  done
}

start_node() {
  local dir=$1 name=$2 skew=${3:-} a port fake=()
  a=$("$net" addr "$dir" "$name")
  port=$(($(cat "$dir/port") + $(node_index "$name")))
  [ -z "$skew" ] || fake=(--faketime "$skew")
  # Settings travel in the environment; DIR/herald.env holds the run's.
  local envs=()
  mapfile -t envs <"$dir/herald.env"
  # HERALD_BIN names our binary, not a setting (Herald warns of it).
  "$net" run "$dir" "$name" "${fake[@]}" -- env -u HERALD_BIN "${envs[@]}" "HERALD_NODE_LISTEN=$a:$NODE_PORT" "$HERALD_BIN" serve \
    --listen "$a:$HERALD_PORT" --data-dir "$dir/data-$name" \
    --public-url "http://127.0.0.1:$port" >/dev/null
  echo "${skew:-none}" >"$dir/skew-$name"
  wait_ready "$dir" "$name"
}

stop_node() {
  local dir=$1 name=$2 sig=${3:-TERM} _
  "$net" kill "$dir" "$name" "$sig" 2>/dev/null || return 0
  for _ in $(seq 1 200); do
    "$net" pid "$dir" "$name" >/dev/null 2>&1 || return 0
    sleep 0.1
  done
  "$net" kill "$dir" "$name" KILL 2>/dev/null || true
}

# The first Redis node answering ROLE master, asked directly (not through
# its proxy, whose faults may be on).
current_primary() {
  local dir=$1 n
  for n in "${REDIS[@]}"; do
    if timeout 2 redis-cli -h "$("$net" addr "$dir" "$n")" -p 6379 role 2>/dev/null | head -n 1 | grep -qx master; then
      echo "$n"
      return
    fi
  done
  return 1
}

# Cuts a primary from its replicas, the other primaries and every node but
# n1, which keeps writing to it: the minority side of the classic lost-write
# partition. The majority promotes its replica after cluster-node-timeout.
primary_cut() {
  local dir=$1 p others
  p=$(current_primary "$dir") || die "no Redis primary answers"
  echo "$p" >"$dir/primary-cut"
  others=$(printf '%s\n' "${REDIS[@]}" n2 n3 | grep -vx "$p" | paste -sd,)
  "$net" cut "$dir" "$p" "$others"
}

primary_heal() {
  local dir=$1 p others
  p=$(cat "$dir/primary-cut")
  others=$(printf '%s\n' "${REDIS[@]}" n2 n3 | grep -vx "$p" | paste -sd,)
  "$net" heal "$dir" "$p" "$others"
}

# Cuts a primary from its replica only: it keeps taking writes that never
# reach the replica (replication lag made long on purpose).
lag_cut() {
  local dir=$1 p r
  p=$(current_primary "$dir") || die "no Redis primary answers"
  r=$(replica_of "$dir" "$p") || die "primary $p has no replica"
  echo "$p $r" >"$dir/lag-cut"
  "$net" cut "$dir" "$p" "$r"
}

# The replica takes the slots over without the primary's agreement (CLUSTER
# FAILOVER TAKEOVER, what an operator does when the primary's side is gone),
# then the cut heals: the old primary rejoins as a replica and drops what the
# new one never got.
lag_failover() {
  local dir=$1 p r deadline=$((SECONDS + 20))
  read -r p r <"$dir/lag-cut"
  timeout 5 redis-cli -h "$("$net" addr "$dir" "$r")" -p 6379 cluster failover takeover >/dev/null
  until timeout 2 redis-cli -h "$("$net" addr "$dir" "$r")" -p 6379 role 2>/dev/null | head -n 1 | grep -qx master; do
    [ "$SECONDS" -lt "$deadline" ] || die "replica $r did not take over from $p"
    sleep 0.1
  done
  "$net" heal "$dir" "$p" "$r"
}

# The namespace NAME of the first replica PRIMARY lists (by its announced
# address, which is its namespace's).
replica_of() {
  local dir=$1 p=$2 ip
  ip=$(timeout 2 redis-cli -h "$("$net" addr "$dir" "$p")" -p 6379 role 2>/dev/null | sed -n 3p)
  [ -n "$ip" ] || return 1
  awk -v ip="$ip" '$2 == ip { print $1; found = 1 } END { exit !found }' "$dir/nodes"
}

redis_proxies() {
  local dir=$1 n
  shift
  for n in "${REDIS[@]}"; do proxy_ctl "$("$net" addr "$dir" "$n")" 6381 "$*"; done
}

act() {
  local dir=$1 action=$2
  shift 2
  HERALD_BIN=$(cat "$dir/herald-bin")
  case "$action" in
  restart) stop_node "$dir" "$1"; start_node "$dir" "$1" "${2:-}" ;;
  kill9) stop_node "$dir" "$1" KILL ;;
  start) start_node "$dir" "$1" "${2:-}" ;;
  primary-cut) primary_cut "$dir" ;;
  primary-heal) primary_heal "$dir" ;;
  lag-cut) lag_cut "$dir" ;;
  wipe-primary)
    local p
    p=$(current_primary "$dir") || die "no Redis primary answers"
    "$net" redis-restart-empty "$dir" "$p"
    ;;
  lag-failover) lag_failover "$dir" ;;
  proxies) redis_proxies "$dir" "$@" ;;
  *) die "unknown action '$action'" ;;
  esac
}

if [ "${1:-}" = act ]; then
  [ "$#" -ge 3 ] || die "usage: chaos.sh act DIR ACTION ARGS..."
  act "${@:2}"
  exit 0
fi

# ---- the driver ----

secs="${CHAOS_SECS:-300}"
run_secs="${CHAOS_RUN_SECS:-30}"
port="${CHAOS_PORT:-18300}"
uas="${CHAOS_UAS:-24}"
seed="${CHAOS_SEED:-$RANDOM}"
results="${RESULTS:-$root/loadtest/results/chaos}"
all_faults="redis-partition node-partition primary-cut-wait1 primary-cut-wait0 failover-lagged-wait1 failover-lagged-wait0 slow-redis lossy-redis halfopen-redis clock-ahead clock-behind kill9"
read -r -a faults <<<"${CHAOS_FAULTS:-$all_faults}"
[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || die "CHAOS_SECS must be a positive whole number"
[[ "$run_secs" =~ ^[0-9]+$ && "$run_secs" -ge 15 ]] || die "CHAOS_RUN_SECS must be 15 or more"
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
known="$all_faults primary-restarted-empty"
for f in "${faults[@]}"; do [[ " $known " == *" $f "* ]] || die "unknown fault '$f' (known: $known)"; done
command -v jq >/dev/null || die "jq not found"
command -v curl >/dev/null || die "curl not found"

# shellcheck source=../loadtest/bench-lib.sh
source "$root/loadtest/bench-lib.sh"
bench_bins
HERALD_BIN=$herald
for i in 0 1 2 10 11 12; do require_free_port $((port + i)) CHAOS_PORT; done
mkdir -p "$results"
stamp="$(date +%Y%m%d-%H%M%S)"
dir="$(mktemp -d /tmp/herald-chaos.XXXXXX)"
keep="$results/chaos-$stamp"
mkdir -p "$keep"

lt_pid=""
cleanup() {
  local rc=$?
  [ -z "$lt_pid" ] || kill "$lt_pid" 2>/dev/null || true
  "$net" down "$dir" || true
  # Logs outlive the namespaces, for whoever reads a failure.
  cp -r "$dir/logs" "$keep/" 2>/dev/null || true
  rm -rf "$dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "$HERALD_BIN" >"$dir/herald-bin"
echo "$port" >"$dir/port"
"$net" up "$dir" "${NODES[@]}" "${REDIS[@]}" >/dev/null
"$net" group "$dir" nodes "${NODES[@]}"
seeds=$("$net" redis-cluster "$dir" "$lt" "${REDIS[@]}")
key=$("$herald" keygen)
urls=""
for i in "${!NODES[@]}"; do
  a=$("$net" addr "$dir" "${NODES[$i]}")
  "$net" run "$dir" root --as "front-${NODES[$i]}" -- "$lt" faultproxy \
    --listen "127.0.0.1:$((port + i))" --upstream "$a:$HERALD_PORT" \
    --control "127.0.0.1:$((port + 10 + i))" >/dev/null
  urls+="${urls:+,}ws://127.0.0.1:$((port + i))/"
done

# Writes the settings every node of the next run starts with.
node_env() {
  {
    printf '%s\n' "${unthrottled[@]}" HERALD_STORE=redis "HERALD_REDIS_URL=$seeds" \
      "HERALD_ENDPOINT_KEYS=$key" "HERALD_REDIS_WAIT_REPLICAS=$1"
  } >"$dir/herald.env"
}

# One schedule line. LABEL AT HEAL_AT START_ARGV HEAL_ARGV (argv as JSON arrays).
line() {
  jq -cn --arg l "$1" --argjson at "$2" --argjson h "$3" --argjson s "$4" --argjson e "$5" \
    '{label: $l, at: $at, heal_at: $h, start: $s, heal: $e}'
}
argv() { jq -cn '$ARGS.positional' --args "$@"; }
net_argv() { argv "$net" "$@" "$dir"; }
do_argv() { argv "$root/scripts/chaos.sh" act "$dir" "$@"; }

# Schedule lines of fault F between AT and HEAL_AT (seconds into the load);
# also sets wait_replicas for the run.
fault_lines() {
  local f=$1 at=$2 heal=$3 label
  case "$f" in
  redis-partition)
    line "redis-partition:n1" "$at" "$heal" "$(argv "$net" cut "$dir" n1 redis)" "$(argv "$net" heal "$dir" n1 redis)" ;;
  node-partition)
    line "node-partition:n1" "$at" "$heal" "$(argv "$net" cut "$dir" n1 n2,n3)" "$(argv "$net" heal "$dir" n1 n2,n3)" ;;
  primary-cut-wait1 | primary-cut-wait0)
    line "$f" "$at" "$heal" "$(do_argv primary-cut)" "$(do_argv primary-heal)" ;;
  failover-lagged-wait1 | failover-lagged-wait0)
    line "$f" "$at" "$heal" "$(do_argv lag-cut)" "$(do_argv lag-failover)" ;;
  primary-restarted-empty)
    line "$f" "$at" "$heal" "$(do_argv wipe-primary)" "[]" ;;
  slow-redis)
    line "slow-redis" "$at" "$heal" "$(do_argv proxies latency both 150)" "$(do_argv proxies clear)"
    ;;
  lossy-redis)
    line "lossy-redis" "$at" "$heal" "$(do_argv proxies reset-prob 0.02)" "$(do_argv proxies clear)" ;;
  halfopen-redis)
    line "halfopen-redis" "$at" "$heal" "$(do_argv proxies halfopen on)" "$(do_argv proxies halfopen off)" ;;
  clock-ahead)
    line "clock-ahead:n3" "$at" "$heal" "$(do_argv restart n3 +30s)" "$(do_argv restart n3)" ;;
  clock-behind)
    line "clock-behind:n3" "$at" "$heal" "$(do_argv restart n3 -30s)" "$(do_argv restart n3)" ;;
  kill9)
    label="kill9:n2"
    line "$label" "$at" "$heal" "$(do_argv kill9 n2)" "$(do_argv start n2)" ;;
  esac
}

wait_for() {
  case "$1" in
  *-wait1) echo 1 ;;
  *) echo 0 ;;
  esac
}

runs=$((secs / run_secs))
[ "$runs" -ge 1 ] || runs=1
failed=0
allowed=0
outs=()
# Sets R to a number below $1. Not `$(rand N)`: a command substitution runs
# in a subshell, whose RANDOM bash reseeds, so the parent's sequence never
# advanced and CHAOS_SEED did not fix the random schedules.
rand() { R=$((RANDOM % $1)); }
RANDOM=$seed

# How long an old socket may outlive its user agent's move: a node cut from
# Redis cannot record the connections it accepts, so a move away from one of
# them is fenced only once it reaches Redis again (the next heartbeat, 2 s,
# claims them again and closes the ones taken over). The bound is the
# longest fault a schedule below makes, plus 5 s.
single_len=$((run_secs * 3 / 5 - run_secs / 5)) random_len=$((6 + run_secs / 3))
dual_bound=$(( (single_len > random_len ? single_len : random_len) + 5 ))

# run N KIND: writes the schedule, starts the nodes, runs the checker.
run_one() {
  local n=$1 sched=$2 wait=$3 tag=$4
  local out="$keep/run$n-$tag.json" hist="$keep/run$n-$tag.history.jsonl" rc=0
  node_env "$wait"
  local name
  for name in "${NODES[@]}"; do CHAOS_READY=/ready "$root/scripts/chaos.sh" act "$dir" start "$name"; done
  echo "chaos: run $n ($tag, redis_wait_replicas=$wait, ${run_secs}s): $(jq -r .label "$sched" | paste -sd' ')" >&2
  # In the background, so INT/TERM reach the trap at once.
  # shellcheck disable=SC2086 # CHAOS_ARGS is a list of flags
  "$lt" chaos --nodes "$urls" --duration "$run_secs" --schedule "$sched" --out "$out" \
    --history "$hist" --uas "$uas" --seed "$((seed + n))" --dual-owner-bound "$dual_bound" ${CHAOS_ARGS:-} \
    >"$keep/run$n-$tag.log" 2>&1 &
  lt_pid=$!
  wait "$lt_pid" || rc=$?
  lt_pid=""
  tail -n 3 "$keep/run$n-$tag.log" >&2
  for name in "${NODES[@]}"; do "$root/scripts/chaos.sh" act "$dir" kill9 "$name" >/dev/null; done
  "$net" heal "$dir"
  "$root/scripts/chaos.sh" act "$dir" proxies clear
  outs+=("$out")
  if [ "$rc" -ne 0 ]; then
    # Allowed only when lost writes are the run's one failure: messages,
    # registrations and receipts written to the old primary in its last
    # seconds (proto-docs/cluster.md); never a duplicate or a late
    # redelivery.
    if [ "${CHAOS_STRICT:-0}" != 1 ] && [[ "$tag" == *-wait0 ]] &&
      jq -e '.metrics | (.lost + .registrations_lost + .receipt_errors) > 0
        and .duplicates == 0 and .acked_redelivered_late == 0' "$out" >/dev/null 2>&1; then
      echo "chaos: run $n lost writes with redis_wait_replicas = 0 during a failover: documented, not a failure" >&2
      allowed=$((allowed + 1))
    else
      echo "chaos: run $n FAILED (exit $rc); see $keep/run$n-$tag.log" >&2
      failed=$((failed + 1))
    fi
  fi
}

n=0
a=$((run_secs / 5)) h=$((run_secs * 3 / 5))
for f in "${faults[@]}"; do
  [ "$n" -lt "$runs" ] || break
  sched="$dir/schedule-$n.jsonl"
  fault_lines "$f" "$a" "$h" >"$sched"
  run_one "$n" "$sched" "$(wait_for "$f")" "$f"
  n=$((n + 1))
done
# The rest: random faults, each with a kill -9 of a random node inside its
# window (restarted just after the heal), one after another.
while [ "$n" -lt "$runs" ]; do
  sched="$dir/schedule-$n.jsonl"
  rand "${#faults[@]}"
  f=${faults[$R]}
  [ "$f" != kill9 ] || f=${faults[0]}
  rand $((run_secs / 5))
  at=$((2 + R))
  rand $((run_secs / 3))
  heal=$((at + 6 + R))
  rand 3
  victim=${NODES[$R]}
  [[ "$f" != clock-* ]] || victim=n1
  {
    fault_lines "$f" "$at" "$heal"
    # Restarted after the fault heals, as in the sittings measured before
    # Herald waited for Redis at start (it exited after about 2.5 s then),
    # so runs stay comparable with them.
    restart=$((heal + 1 < run_secs ? heal + 1 : run_secs - 1))
    line "kill9:$victim@$f" "$((at + 2))" "$restart" "$(do_argv kill9 "$victim")" "$(do_argv start "$victim")"
  } >"$sched"
  run_one "$n" "$sched" "$(wait_for "$f")" "random-$f"
  n=$((n + 1))
done

# Per fault label: runs, messages accepted while it was active, lost among
# them, and the whole run's accepted, lost and duplicates; recovery after
# its heal.
echo
echo "Chaos runs $stamp: CHAOS_SECS=$secs CHAOS_RUN_SECS=$run_secs CHAOS_UAS=$uas CHAOS_SEED=$seed; $(uptime | sed 's/.*load/load/')"
echo
echo "| fault | runs | accepted during | lost during | run accepted | run lost | run duplicates | recovery s (max) |"
echo "|---|---|---|---|---|---|---|---|"
jq -rs '
  [ .[] | select(.metrics != null) | .metrics as $m
    | ($m | to_entries | map(select(.key | test("^fault\\..*\\.recovery_secs$")))
      | map(.key | sub("^fault\\."; "") | sub("\\.recovery_secs$"; ""))) [] as $l
    | { l: $l, during: ($m["fault.\($l).accepted_during"] // 0), lost: ($m["fault.\($l).lost"] // 0),
        rec: $m["fault.\($l).recovery_secs"], acc: $m.accepted, rlost: $m.lost, dup: $m.duplicates } ]
  | group_by(.l)[]
  | "| \(.[0].l) | \(length) | \(map(.during) | add) | \(map(.lost) | add) | \(map(.acc) | add) | \(map(.rlost) | add) | \(map(.dup) | add) | \(map(.rec) | max) |"
' "${outs[@]}" 2>/dev/null || echo "(no result files)"
echo
echo "chaos: results in $keep; $failed run(s) failed, $allowed with documented losses" >&2
[ "$failed" -eq 0 ]
