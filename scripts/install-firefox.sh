#!/bin/sh
# Install the browser the end-to-end tests drive (tests/firefox_e2e.rs).
# Debian's firefox-esr runs headless without a display, so nothing else
# (Xvfb, a window manager) is needed. Safe to run repeatedly: it does
# nothing when firefox-esr is already on PATH.
set -eu

if command -v firefox-esr >/dev/null 2>&1; then
    echo "firefox-esr already installed: $(firefox-esr --version 2>/dev/null || echo unknown version)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-firefox.sh: firefox-esr is missing and apt-get is not available;" >&2
    echo "install firefox-esr (or a Firefox ESR on PATH as firefox-esr) by hand." >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-firefox.sh: need root (or sudo) to apt-get install firefox-esr" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y firefox-esr
firefox-esr --version
