#!/usr/bin/env bash
# test-cross.sh - the cross-target checks of spa-mobile, on a Linux x86_64 host without vendor SDKs
# (part of scripts/test.sh, so of CI):
#
#   aarch64   `cargo test` of the core crates spa-model + spa-protocol for aarch64-unknown-linux-gnu,
#             run under qemu-user: the library unit tests (among them the int8 quantized matmul
#             kernels on every ISA the CPU offers, i.e. scalar, NEON and NEON+dotprod, checked
#             against the scalar path and dequantized f32), spa-protocol's tests, and the
#             selected integration tests against the real model in $AARCH64_TESTS.
#   android   staticlib of spa-ffi for aarch64-linux-android (ring's C via
#             scripts/cc-wrappers/aarch64-linux-android-clang, no NDK)
#   ios       staticlib of spa-ffi for aarch64-apple-ios (clang with the minimal
#             SDK of headers in scripts/cc-wrappers/ios-sdk, no Xcode)
#             Both are built with $CROSS_PROFILE (default: dev). It compiles the same code, runs
#             the same C builds through the same wrappers and exports the same symbols as the
#             release profile, in about three quarters of the time (android on a 2-core machine:
#             295 s against 385 s); `CROSS_PROFILE=release` builds what the packaging scripts
#             ship, and the `size` step measures the shipped library.
#   size      cdylib of spa-ffi for aarch64-unknown-linux-gnu as the apps ship it (profile
#             `mobile`: fat LTO, one codegen unit), stripped: the device library size (the model
#             is not in it); target <= 10 MB
#   packaging scripts/build-android.sh and scripts/build-xcframework.sh fail early (exit 3) with
#             a clear message when the NDK / Xcode is absent
#
# Usage: scripts/test-cross.sh [aarch64|android|ios|size|packaging ...]   (default: all but size)
# Needs: Debian gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user clang llvm (llvm-ar), and the
# rustup targets aarch64-unknown-linux-gnu aarch64-linux-android aarch64-apple-ios (.ci/run installs
# them; this script adds missing rustup targets itself). Uses $CARGO_TARGET_DIR (default target/);
# every target has its own subdirectory there, so it does not disturb the host build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

steps=("$@")
# CI (no arguments): everything but `size`, a fourth full release build (~4 min of a 2-core CI
# machine) that only re-measures the README figure.
[ ${#steps[@]} -gt 0 ] || steps=(packaging aarch64 android ios)

# Integration tests of spa-model run on aarch64 (the x86_64 suite runs all of them):
#   base_golden  the real SmolLM2 forward on aarch64 against the numpy float64 reference (top-5
#                logits, greedy outputs): catches any aarch64 numeric difference end to end;
#   corrupt      damaged GGUF/safetensors files -> typed errors, no panic.
# The others are slow under emulation (quant, side: > 7 min each here) and test nothing that
# base_golden and the kernel unit tests do not already cover for this target.
AARCH64_TESTS="${AARCH64_TESTS:-base_golden corrupt}"

. scripts/cross-env.sh
export SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"

need=()
for tool in aarch64-linux-gnu-gcc qemu-aarch64 clang; do
	command -v "$tool" >/dev/null || need+=("$tool")
done
[ -n "${AR_aarch64_linux_android:-}" ] && command -v "$AR_aarch64_linux_android" >/dev/null || need+=(llvm-ar)
if [ ${#need[@]} -gt 0 ]; then
	echo "test-cross.sh: missing ${need[*]} (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user clang llvm)" >&2
	exit 3
fi
installed="$(rustup target list --installed)"
for t in aarch64-unknown-linux-gnu aarch64-linux-android aarch64-apple-ios; do
	grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

t0=$SECONDS
lap() { echo "-- $1: $((SECONDS - t0)) s"; t0=$SECONDS; }
human() { awk -v b="$1" 'BEGIN { printf "%.2f MB (%d bytes)", b / 1e6, b }'; }

# Staticlib of spa-ffi for an SDK-less target, with $CROSS_PROFILE (building it type-checks and
# compiles everything a separate `cargo check` would, so there is none).
# (`cargo rustc --crate-type staticlib`: the cdylib of the crate would need the vendor linker.)
profile="${CROSS_PROFILE:-dev}"
# cargo's output directory of a profile.
case "$profile" in dev) out_dir=debug ;; *) out_dir=$profile ;; esac
staticlib() {
	local t="$1"
	echo "== staticlib: cargo rustc -p spa-ffi --lib --profile $profile --target $t --crate-type staticlib =="
	CARGO_PROFILE_RELEASE_DEBUG=0 cargo rustc -p spa-ffi --lib --profile "$profile" --target "$t" --crate-type staticlib
	local a="$target_dir/$t/$out_dir/libspa_ffi.a"
	[ -f "$a" ] || { echo "test-cross.sh: no $a" >&2; exit 1; }
	# The archive must hold aarch64 objects and export the UniFFI scaffolding.
	local syms
	syms="$(llvm-nm --defined-only "$a" 2>/dev/null | grep -c ' T _\?uniffi_spa_ffi_fn_' || true)"
	[ "$syms" -gt 0 ] || { echo "test-cross.sh: $a exports no uniffi_spa_ffi_fn_* symbols" >&2; exit 1; }
	llvm-strip --strip-debug -o "$target_dir/$t/$out_dir/libspa_ffi.stripped.a" "$a"
	echo "$t staticlib ($profile): $(human "$(stat -c %s "$a")"), debug-stripped $(human "$(stat -c %s "$target_dir/$t/$out_dir/libspa_ffi.stripped.a")"), $syms exported uniffi functions"
}

for step in "${steps[@]}"; do
	case "$step" in
	packaging)
		echo "== packaging scripts fail early without the vendor SDKs =="
		for s in build-android.sh build-xcframework.sh; do
			set +e
			out="$(env -u ANDROID_NDK_HOME -u ANDROID_NDK_ROOT -u ANDROID_HOME -u ANDROID_SDK_ROOT \
				PATH="/usr/bin:/bin:$(dirname "$(command -v cargo)")" bash "scripts/$s" 2>&1)"
			rc=$?
			set -e
			if [ "$(uname -s)" = Darwin ] && [ "$s" = build-xcframework.sh ]; then continue; fi
			if [ $rc -ne 3 ] || ! grep -q "cannot build" <<<"$out"; then
				echo "test-cross.sh: scripts/$s without SDK: expected exit 3 and a message, got rc=$rc:" >&2
				echo "$out" >&2
				exit 1
			fi
			echo "scripts/$s -> exit 3: $(grep -m1 '^  - ' <<<"$out" | sed 's/^  - //')"
		done
		lap packaging
		;;
	aarch64)
		bash scripts/fetch-assets.sh model >/dev/null
		tgt=aarch64-unknown-linux-gnu
		echo "== cargo test --target $tgt (qemu-aarch64): spa-protocol, spa-model lib + ${AARCH64_TESTS} =="
		test_args=()
		for t in $AARCH64_TESTS; do test_args+=(--test "$t"); done
		cargo test --target "$tgt" -p spa-protocol
		cargo test --target "$tgt" -p spa-model --lib "${test_args[@]}"
		# Show (and require) that the NEON kernels were among the ISAs the kernel tests ran on.
		isa="$(cargo test -q --target "$tgt" -p spa-model --lib qkern_int8::tests::isa_detection_is_consistent -- --nocapture 2>&1 | grep -m1 'available:' || true)"
		echo "aarch64 kernel ISAs under qemu: ${isa:-?}"
		grep -q 'Neon' <<<"$isa" || { echo "test-cross.sh: NEON kernels not available under qemu" >&2; exit 1; }
		lap aarch64
		;;
	android)
		staticlib aarch64-linux-android
		lap android
		;;
	ios)
		staticlib aarch64-apple-ios
		lap ios
		;;
	size)
		tgt=aarch64-unknown-linux-gnu
		echo "== size: cdylib of spa-ffi for $tgt (profile mobile), stripped =="
		cargo rustc -p spa-ffi --lib --profile mobile --target "$tgt" --crate-type cdylib
		so="$target_dir/$tgt/mobile/libspa_ffi.so"
		aarch64-linux-gnu-strip -o "$so.stripped" "$so"
		bytes="$(stat -c %s "$so.stripped")"
		echo "aarch64 device library (libspa_ffi.so, profile mobile, stripped, without the model): $(human "$bytes")"
		[ "$bytes" -le 10000000 ] || { echo "test-cross.sh: device library larger than 10 MB" >&2; exit 1; }
		lap size
		;;
	*)
		echo "test-cross.sh: unknown step '$step'" >&2
		exit 64
		;;
	esac
done
