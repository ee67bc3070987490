#!/usr/bin/env bash
# ffi-tools.sh - the compilers of the bindings' tests, fetched once into $SPA_HOME:
#   kotlin  kotlinc from the npm package kotlin-compiler (prints its KOTLIN_HOME)
#   swift   the Debian trixie chroot with Swift (scripts/swift-chroot.sh; prints its directory)
#   all     both, printing nothing (scripts/test.sh runs this in the background while cargo
#           compiles: both are mostly downloads, ~1.3 GB)
# Usage: scripts/ffi-tools.sh kotlin|swift|all
set -euo pipefail
cd "$(dirname "$0")/.."
SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"

kotlin_home() {
	local home="$SPA_HOME/tools/kotlin/node_modules/kotlin-compiler"
	if [ ! -x "$home/bin/kotlinc" ]; then
		npm install --no-audit --no-fund --silent --prefix "$SPA_HOME/tools/kotlin" kotlin-compiler@2.4 >&2
	fi
	[ -x "$home/bin/kotlinc" ] || { echo "ffi-tools.sh: no kotlinc after npm install" >&2; exit 1; }
	echo "$home"
}

case "${1:-}" in
kotlin) kotlin_home ;;
swift) bash scripts/swift-chroot.sh ;;
all)
	kotlin_home >/dev/null
	bash scripts/swift-chroot.sh >/dev/null
	;;
*)
	echo "usage: $0 kotlin|swift|all" >&2
	exit 64
	;;
esac
