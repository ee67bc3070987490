#!/usr/bin/env bash
# build-xcframework.sh - build SpaMobileFFIFFI.xcframework (the Rust core of the Swift package in
# ios/) on a Mac with Xcode.
#
#   1. cargo rustc --release -p spa-ffi --lib --crate-type staticlib for aarch64-apple-ios (device) and
#      aarch64-apple-ios-sim + x86_64-apple-ios (simulator), iOS 14.0, no debug info
#   2. lipo: one fat simulator libspa_ffi.a (arm64 + x86_64)
#   3. uniffi-bindgen (library mode, uniffi.toml) on a host build: the C header + modulemap for the
#      framework's Headers/, and a check that the committed ios/Sources/SpaMobileFFI/SpaMobileFFI.swift
#      matches the library (--update-bindings copies the fresh one instead of failing)
#   4. xcodebuild -create-xcframework -> ios/build/SpaMobileFFIFFI.xcframework
#   5. zip + SwiftPM checksum -> ios/build/SpaMobileFFIFFI.xcframework.zip(.checksum)
#   6. with --release-url URL: ios/build/package/, the Swift package with Package.swift pointing at
#      URL + checksum, ready to push to the distribution repository (see docs/packaging.md)
#
# Without --release-url, ios/Package.swift (empty releaseChecksum, or SPA_LOCAL_XCFRAMEWORK=1) uses
# ios/build/SpaMobileFFIFFI.xcframework directly: `.package(path: ".../ios")` works at once.
#
# Usage: scripts/build-xcframework.sh [--release-url URL] [--update-bindings]
# Requirements (checked first; a missing one exits 3 with a message): macOS, Xcode (xcodebuild,
#   xcrun with the iphoneos + iphonesimulator SDKs, lipo), cargo, the rustup targets
#   aarch64-apple-ios, aarch64-apple-ios-sim, x86_64-apple-ios.
# Exit codes: 0 ok | 3 missing SDK/tool | 4 committed Swift bindings out of date | 64 usage error.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

release_url=""
update_bindings=0
while [ $# -gt 0 ]; do
	case "$1" in
	--release-url) release_url="${2:-}"; [ -n "$release_url" ] || { echo "build-xcframework.sh: --release-url needs a URL" >&2; exit 64; }; shift 2 ;;
	--update-bindings) update_bindings=1; shift ;;
	-h | --help) sed -n '2,24p' "$0"; exit 0 ;;
	*) echo "build-xcframework.sh: unknown argument '$1' (see --help)" >&2; exit 64 ;;
	esac
done

device=aarch64-apple-ios
sims=(aarch64-apple-ios-sim x86_64-apple-ios)

missing=()
if [ "$(uname -s)" != Darwin ]; then
	missing+=("macOS: this is $(uname -s); an XCFramework needs Xcode on a Mac")
fi
command -v xcodebuild >/dev/null || missing+=("Xcode: xcodebuild not found (install Xcode, then xcode-select -s /Applications/Xcode.app)")
if command -v xcrun >/dev/null; then
	for sdk in iphoneos iphonesimulator; do
		xcrun --sdk "$sdk" --show-sdk-path >/dev/null 2>&1 || missing+=("Xcode SDK $sdk: xcrun --sdk $sdk --show-sdk-path fails")
	done
else
	missing+=("xcrun (Xcode command line tools)")
fi
command -v lipo >/dev/null || missing+=("lipo (Xcode command line tools)")
command -v cargo >/dev/null || missing+=("cargo (Rust toolchain)")
if command -v rustup >/dev/null; then
	installed="$(rustup target list --installed)"
	for t in "$device" "${sims[@]}"; do
		grep -qx "$t" <<<"$installed" || missing+=("rust target $t: rustup target add $t")
	done
else
	missing+=("rustup (for the iOS targets)")
fi
if [ ${#missing[@]} -gt 0 ]; then
	echo "build-xcframework.sh: cannot build the XCFramework on this machine; missing:" >&2
	for m in "${missing[@]}"; do echo "  - $m" >&2; done
	echo "(the SDK-free checks of the iOS target are scripts/test-cross.sh)" >&2
	exit 3
fi

# scripts/cross-env.sh (the SDK-free CI setup) must not leak into a real Xcode build.
unset CC_aarch64_apple_ios AR_aarch64_apple_ios
case "${SDKROOT:-}" in */cc-wrappers/*) unset SDKROOT ;; esac

export IPHONEOS_DEPLOYMENT_TARGET=14.0
# What ships: the release profile without line tables, one codegen unit and whole-program LTO
# (smaller and a little faster), as in scripts/build-android.sh.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
target_dir="${CARGO_TARGET_DIR:-$root/target}"
build="$root/ios/build"
fw="$build/SpaMobileFFIFFI.xcframework"
rm -rf "$build/slices" "$build/gen" "$build/headers" "$fw" "$build/package"
mkdir -p "$build/slices" "$build/gen" "$build/headers"

cd "$root"
for t in "$device" "${sims[@]}"; do
	echo "== cargo rustc --release -p spa-ffi --lib --target $t --crate-type staticlib =="
	cargo rustc --release -p spa-ffi --lib --target "$t" --crate-type staticlib
done

echo "== lipo: simulator arm64 + x86_64 =="
lipo -create -output "$build/slices/libspa_ffi-sim.a" \
	"$target_dir/aarch64-apple-ios-sim/release/libspa_ffi.a" \
	"$target_dir/x86_64-apple-ios/release/libspa_ffi.a"
cp "$target_dir/$device/release/libspa_ffi.a" "$build/slices/libspa_ffi-device.a"
lipo -info "$build/slices/libspa_ffi-sim.a" "$build/slices/libspa_ffi-device.a"

echo "== uniffi-bindgen (Swift) =="
# Library mode reads the exported interface from a built library; the host dylib carries the same
# metadata as the iOS slices.
cargo build --release -p spa-ffi --lib
cargo run --release -p spa-ffi --features bindgen --bin uniffi-bindgen -- generate \
	--library "$target_dir/release/libspa_ffi.dylib" --config "$root/uniffi.toml" \
	--language swift --out-dir "$build/gen"
cp "$build/gen/SpaMobileFFIFFI.h" "$build/headers/"
cp "$build/gen/SpaMobileFFIFFI.modulemap" "$build/headers/module.modulemap"
committed="$root/ios/Sources/SpaMobileFFI/SpaMobileFFI.swift"
if ! cmp -s "$build/gen/SpaMobileFFI.swift" "$committed"; then
	if [ "$update_bindings" = 1 ]; then
		cp "$build/gen/SpaMobileFFI.swift" "$committed"
		echo "updated $committed"
	else
		echo "build-xcframework.sh: $committed differs from the bindings of this library;" >&2
		echo "  rerun with --update-bindings (and commit it), or regenerate with scripts/test-ffi.sh" >&2
		exit 4
	fi
fi

echo "== xcodebuild -create-xcframework =="
xcodebuild -create-xcframework \
	-library "$build/slices/libspa_ffi-device.a" -headers "$build/headers" \
	-library "$build/slices/libspa_ffi-sim.a" -headers "$build/headers" \
	-output "$fw"

echo "== zip + checksum =="
zip="$fw.zip"
rm -f "$zip"
(cd "$build" && ditto -c -k --sequesterRsrc --keepParent "$(basename "$fw")" "$(basename "$zip")")
if command -v swift >/dev/null; then
	checksum="$(swift package --package-path "$root/ios" compute-checksum "$zip")"
else
	checksum="$(shasum -a 256 "$zip" | cut -d' ' -f1)"
fi
echo "$checksum" >"$zip.checksum"
echo "XCFramework: $fw"
echo "zip:         $zip ($(du -h "$zip" | cut -f1))"
echo "checksum:    $checksum"

if [ -n "$release_url" ]; then
	pkg="$build/package"
	mkdir -p "$pkg"
	cp -R "$root/ios/Sources" "$pkg/"
	sed -e "s|^let releaseURL = .*|let releaseURL = \"$release_url\"|" \
		-e "s|^let releaseChecksum = .*|let releaseChecksum = \"$checksum\"|" \
		"$root/ios/Package.swift" >"$pkg/Package.swift"
	grep -q "\"$checksum\"" "$pkg/Package.swift" || { echo "build-xcframework.sh: could not set the checksum in $pkg/Package.swift" >&2; exit 1; }
	echo "Swift package for $release_url: $pkg (upload $zip to that URL, push $pkg, tag it)"
fi
