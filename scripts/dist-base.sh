#!/usr/bin/env bash
# The local Debian base image for `make image` and the package test:
# localhost/herald-base:bookworm, a `debootstrap --variant=minbase bookworm`
# root file system imported into podman. No registry is needed (or reachable
# on the test machines): the packages come from the Debian mirror apt already
# uses on this machine.
#
# Why a Debian root and not a FROM-scratch image with the libraries `ldd`
# lists: the package test needs dpkg, a shell and useradd in the container
# anyway, and the image then runs on the same Debian release as
# deploy/Dockerfile's debian:bookworm-slim, so the two differ only in where
# the base comes from.
#
# Cached: the image itself, and the root file system's tarball under
# $HERALD_DIST_CACHE (default /var/tmp/herald-dist), so a second run costs
# nothing and a run after `podman rmi` only re-imports.
#
# --include: what deploy/Dockerfile's runtime stage would otherwise install
# with apt-get (libstdc++6 is in minbase already; curl for the HEALTHCHECK).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${HERALD_BASE_IMAGE:-localhost/herald-base:bookworm}
cache=${HERALD_DIST_CACHE:-/var/tmp/herald-dist}
tarball=$cache/bookworm-minbase.tar
podman=./scripts/podman.sh
# debootstrap makes root-owned files (and chroots): root's work.
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if $podman image exists "$image"; then
  echo "base image $image: present"
  exit 0
fi
if [ ! -s "$tarball" ]; then
  mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  mkdir -p "$cache"
  root=$(mktemp -d "${TMPDIR:-/var/tmp}/herald-rootfs.XXXXXX")
  trap '$sudo rm -rf "$root"' EXIT
  echo "debootstrap bookworm (minbase) from $mirror into $root"
  started=$(date +%s)
  $sudo debootstrap --variant=minbase --include=curl bookworm "$root" "$mirror" > "$cache/debootstrap.log" 2>&1 || {
    tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # Smaller and reproducible enough: no package lists, no apt cache.
  $sudo rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  $sudo tar -C "$root" --numeric-owner -cf - . > "$tarball.part"
  mv "$tarball.part" "$tarball"
  echo "debootstrap took $(( $(date +%s) - started )) s"
fi
$podman import --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
echo "base image $image: imported from $tarball"
