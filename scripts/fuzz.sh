#!/usr/bin/env bash
# `make fuzz`: coverage-guided fuzzing (libFuzzer through cargo-fuzz) of every
# target in fuzz/, FUZZ_SECS seconds each (default 60). FUZZ_TARGETS picks
# some (space-separated names); FUZZ_JOBS runs that many fuzzer processes
# per target (default 1). Prints, and writes to $FUZZ_WORK/summary.md, a
# table of runs per target; a failure leaves its input in
# fuzz/artifacts/<target>/ and makes this script exit non-zero.
#
# Stable Rust: cargo-fuzz runs with `--sanitizer none` (the sanitizers need
# nightly; coverage instrumentation does not).
#
# RocksDB: the fuzz crate depends on herald, so on librocksdb-sys. Its build
# gets its own target dir (instrumented code must not share hashes with the
# main build), and instead of compiling RocksDB's C++ again there it links the
# static library the main build already made (ROCKSDB_LIB_DIR): found in the
# main target dir for the same librocksdb-sys version, built there first with
# the same command as `make test` if missing.
#
# The main target dir is the one cargo itself uses for the project (asked
# with `cargo metadata`: CARGO_TARGET_DIR, a cargo config's build.target-dir,
# or ./target), so `make fuzz` finds the build `make test` or `make run` made
# however they were pointed at it. The fuzz build's own dir sits inside it
# (<target>/fuzz) unless FUZZ_TARGET_DIR says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
secs=${FUZZ_SECS:-60}
jobs=${FUZZ_JOBS:-1}
main_target=$(./scripts/target-dir.sh)
work=${FUZZ_WORK:-/var/tmp/herald-fuzz}
targets=${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^herald-fuzz$')}

./scripts/install-fuzz.sh

# The fuzz build uses exactly the project's dependency versions.
cp Cargo.lock fuzz/Cargo.lock

version=$(grep -A1 '^name = "librocksdb-sys"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
find_lib() {
  local out
  for out in $(grep -l "cargo:cargo_manifest_dir=.*/librocksdb-sys-${version}\$" \
                 "$main_target"/debug/build/librocksdb-sys-*/output 2>/dev/null); do
    out=$(dirname "$out")/out
    if [ -f "$out/librocksdb.a" ]; then echo "$out"; return; fi
  done
}
lib=$(find_lib || true)
if [ -z "$lib" ]; then
  echo "no RocksDB library in $main_target for librocksdb-sys $version: building it as make test does"
  CARGO_TARGET_DIR=$main_target cargo build --workspace --bins
  lib=$(find_lib || true)
fi
if [ -n "$lib" ]; then
  echo "linking RocksDB from $lib"
  export ROCKSDB_LIB_DIR=$lib ROCKSDB_STATIC=1
else
  echo "warning: no RocksDB library to reuse; the fuzz build compiles its own (about 20 minutes on 2 cores)"
fi

export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$main_target/fuzz}
cd fuzz
started=$(date +%s)
cargo fuzz build -s none
echo "fuzz build took $(( $(date +%s) - started )) s"
bin=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release

mkdir -p "$work"
summary="$work/summary.md"
{
  echo "| target | runs | seconds | runs/s | corpus (seeds + found) | coverage (edges) | failures |"
  echo "|---|---|---|---|---|---|---|"
} > "$summary"
failed=0
for t in $targets; do
  # New inputs go to the work dir; the committed seeds stay as they are.
  mkdir -p "$work/corpus/$t" "artifacts/$t"
  log="$work/$t.log"
  echo "== $t: ${secs}s"
  parallel=()
  [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
  status=0
  # The binary built above, run directly: `cargo fuzz run` would rebuild
  # whenever src/ changed meanwhile, in the middle of the targets.
  "$bin/$t" "$work/corpus/$t" "corpus/$t" \
    -max_total_time="$secs" "${parallel[@]}" -print_final_stats=1 \
    -max_len=8192 -timeout=10 -rss_limit_mb=4096 \
    -artifact_prefix="$root/fuzz/artifacts/$t/" > "$log" 2>&1 || status=$?
  if [ "$jobs" -gt 1 ]; then cat fuzz-*.log >> "$log" 2>/dev/null || true; rm -f fuzz-*.log; fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s+=$1} END {print s+0}')
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | sort -n | tail -1)
  [ "${took:-0}" -gt 0 ] || took=1
  cov=$( (grep -oE 'cov: [0-9]+' "$log" || true) | tail -1 | cut -d' ' -f2)
  seeds=$(find "corpus/$t" -type f | wc -l)
  found=$(find "$work/corpus/$t" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed=1
    fails="yes: $log, fuzz/artifacts/$t/"
    grep -A8 -m1 "panicked at" "$log" || tail -30 "$log"
  else
    fails=0
  fi
  echo "| $t | $runs | $took | $(( runs / took )) | $seeds + $found | ${cov:-?} | $fails |" >> "$summary"
done
echo
cat "$summary"
exit "$failed"
