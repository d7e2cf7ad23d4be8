#!/usr/bin/env bash
# `make deb`: the Debian package of the herald binary the project's build
# already made (`cargo build --bin herald`, the dev profile, fully optimised:
# see Cargo.toml), written to <target dir>/dist/herald_<version>_<arch>.deb,
# whose path it prints last.
#
# Built with dpkg-deb from a staged tree rather than with cargo-deb: the
# package needs the binary of the one profile the project builds (cargo-deb
# builds the release profile unless told otherwise, which compiles RocksDB
# again), a unit whose ExecStart names /usr/bin/herald, and maintainer
# scripts written out anyway (deploy/debian/); what remains, a control file
# and a tar, is a few lines here, with no tool to download and compile.
#
# Contents: /usr/bin/herald (debug info stripped, symbols kept for panic
# backtraces), /lib/systemd/system/herald.service (deploy/herald.service with
# the packaged binary's path), /etc/herald/herald.toml (deploy/herald.toml,
# a conffile), the copyright file, and deploy/debian/{postinst,prerm,postrm}
# (system user, /var/lib/herald, service start; see those files).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(./scripts/target-dir.sh)
bin=${HERALD_BIN:-$target/debug/herald}
out=${DEB_DIR:-$target/dist}
[ -x "$bin" ] || { echo "no herald binary at $bin: run cargo build --bin herald first" >&2; exit 1; }

version=$(sed -n '/^\[package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
description=$(sed -n '/^\[package\]/,/^\[/s/^description = "\(.*\)"$/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d "${TMPDIR:-/tmp}/herald-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root

install -D -m 0755 "$bin" "$root/usr/bin/herald"
strip --strip-debug "$root/usr/bin/herald"

# The unit as deploy/herald.service has it, except where the binary is; its
# manual-install header does not apply to the package and is replaced.
unit=$root/lib/systemd/system/herald.service
mkdir -p "$(dirname "$unit")"
{
  echo "# systemd unit for Herald, the Web Push service, installed by the herald"
  echo "# Debian package. Settings: /etc/herald/herald.toml, or HERALD_<NAME>=value"
  echo "# lines in /etc/herald/herald.env; local changes to the unit: systemctl edit herald."
  echo
  sed -n '/^\[Unit\]/,$p' deploy/herald.service | sed 's|/usr/local/bin/herald|/usr/bin/herald|g'
} > "$unit"
chmod 0644 "$unit"
grep -q '^ExecStart=/usr/bin/herald serve ' "$unit" || { echo "packaged unit has no ExecStart=/usr/bin/herald" >&2; exit 1; }

install -D -m 0640 deploy/herald.toml "$root/etc/herald/herald.toml"

install -d -m 0755 "$root/usr/share/doc/herald"
cat > "$root/usr/share/doc/herald/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: herald

Files: *
Copyright: the Herald developers
License: MPL-2.0
 On Debian systems the full text of the Mozilla Public License 2.0 is in
 /usr/share/common-licenses/MPL-2.0.
COPYRIGHT
chmod 0644 "$root/usr/share/doc/herald/copyright"

install -d -m 0755 "$root/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "deploy/debian/$s" "$root/DEBIAN/$s"; done
echo /etc/herald/herald.toml > "$root/DEBIAN/conffiles"

# Library dependencies as Debian computes them (libc6, libgcc-s1, libstdc++6
# with minimum versions), plus passwd for useradd in postinst.
mkdir -p "$stage/src/debian"
printf 'Source: herald\n\nPackage: herald\nArchitecture: any\n' > "$stage/src/debian/control"
shlibs=$(cd "$stage/src" && dpkg-shlibdeps -O -e "$root/usr/bin/herald" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "dpkg-shlibdeps found no dependencies for $bin" >&2; exit 1; }

cat > "$root/DEBIAN/control" <<CONTROL
Package: herald
Version: $version
Architecture: $arch
Maintainer: Herald developers <herald@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $shlibs, passwd
Section: net
Priority: optional
Description: Web Push service
 $description
 .
 Runs as the systemd service herald (user herald, data in /var/lib/herald),
 configured by /etc/herald/herald.toml. Set public_url there before
 handing endpoints to the outside world.
CONTROL

mkdir -p "$out"
deb=$out/herald_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
