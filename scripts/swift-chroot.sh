#!/usr/bin/env bash
# swift-chroot.sh - create (once) and prepare a Debian trixie chroot with Swift 6.0.3 (Debian's
# `swiftlang`), used by scripts/test-ffi.sh to compile and run the Swift bindings' tests on Linux.
# swiftlang is never installed on the host (it would pull trixie's glibc); the host-built
# libspa_ffi.so runs inside the chroot (trixie's glibc is newer than the host's).
#
# Usage: scripts/swift-chroot.sh            prints the chroot directory on stdout
# Env:   SWIFT_ROOT  chroot directory (default $SPA_HOME/swift-root, SPA_HOME=~/.cache/spa-mobile)
#        DEBIAN_MIRROR  mirror for debootstrap (default: the host apt's Debian mirror)
# Needs root (debootstrap, chroot, mount) and the host package debootstrap (installed if missing).
# First run: ~1.2 GB download and a few minutes; later runs only check and re-mount /proc.
set -euo pipefail

SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"
ROOT="${SWIFT_ROOT:-$SPA_HOME/swift-root}"

log() { echo "swift-chroot: $*" >&2; }

host_mirror() {
	# First Debian (not -security) URI of the host's apt sources, deb822 or one-line format.
	local m=""
	m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' |
		grep -v security | grep '/debian/\?$' | head -n1 || true)
	if [ -z "$m" ]; then
		m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '{print $2}' | grep -v security | grep '/debian/\?$' | head -n1 || true)
	fi
	echo "${m:-http://deb.debian.org/debian}"
}

if [ "$(id -u)" != 0 ]; then
	log "must run as root (debootstrap/chroot)"
	exit 3
fi

if [ ! -x "$ROOT/usr/bin/swiftc" ]; then
	if ! command -v debootstrap >/dev/null; then
		log "installing debootstrap on the host"
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
	fi
	if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
		mirror="${DEBIAN_MIRROR:-$(host_mirror)}"
		log "debootstrap trixie into $ROOT from $mirror"
		mkdir -p "$ROOT"
		# A /proc left mounted by an interrupted earlier run would make debootstrap fail.
		if mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc"; fi
		debootstrap --variant=minbase --include=ca-certificates trixie "$ROOT" "$mirror" >&2
	fi
fi

mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

if [ ! -x "$ROOT/usr/bin/swiftc" ] || [ ! -e "$ROOT/usr/include/$(uname -m)-linux-gnu/sys/param.h" ]; then
	log "installing swiftlang in the chroot"
	chroot "$ROOT" /bin/sh -c 'apt-get update -qq &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends swiftlang libc6-dev libstdc++-14-dev' >&2
fi
chroot "$ROOT" swiftc --version 2>&1 | head -n1 >&2
echo "$ROOT"
