#!/usr/bin/env bash
# `make image`: the OCI image localhost/herald:<version> (and :latest), built
# offline with podman from deploy/Dockerfile: the local Debian base
# (scripts/dist-base.sh) as BASE, and the herald binary the project's build
# already made (`cargo build --bin herald`) as BINARY=prebuilt, so no
# registry is contacted and RocksDB is not compiled again. Prints the image
# name last. HERALD_IMAGE overrides the name.
set -euo pipefail
cd "$(dirname "$0")/.."
podman=./scripts/podman.sh
target=$(./scripts/target-dir.sh)
bin=${HERALD_BIN:-$target/debug/herald}
[ -x "$bin" ] || { echo "no herald binary at $bin: run cargo build --bin herald first" >&2; exit 1; }
version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
image=${HERALD_IMAGE:-localhost/herald:$version}
base=${HERALD_BASE_IMAGE:-localhost/herald-base:bookworm}

./scripts/dist-base.sh >&2

# The build context: only the binary (debug info stripped, symbols kept for
# panic backtraces), not the repository.
context=$(mktemp -d "${TMPDIR:-/tmp}/herald-image.XXXXXX")
trap 'rm -rf "$context"' EXIT
install -m 0755 "$bin" "$context/herald"
strip --strip-debug "$context/herald"

# --format docker: OCI image configs have no HEALTHCHECK; podman keeps it in
# the Docker format only. --pull never: the base is local, and nothing else
# may be fetched.
dangling() { $podman images -q --no-trunc --filter dangling=true | sort; }
before=$(dangling)
$podman build --format docker --pull=never \
  --build-arg BASE="$base" --build-arg BINARY=prebuilt \
  -f deploy/Dockerfile -t "$image" "$context" >&2
if [ -z "${HERALD_IMAGE:-}" ]; then $podman tag "$image" localhost/herald:latest; fi
# What this build left nameless (the previous build of the tag, the
# prebuilt stage) would pile up, one binary's worth per build: removed,
# unless a container still uses it. Nameless images made by anything else
# are left alone. (--layers=false would avoid them, but buildah 1.28 then
# fails on the `FROM ${BINARY} AS binary` stage.)
comm -13 <(echo "$before") <(dangling) | while read -r id; do
  [ -n "$id" ] && $podman rmi "$id" >/dev/null 2>&1 || true
done
echo "$image"
