#!/usr/bin/env bash
# cross-env.sh - environment for cross-building spa-mobile on a Linux x86_64 host without
# vendor SDKs. Source it:   . scripts/cross-env.sh
#
#   aarch64-unknown-linux-gnu  Debian gcc-aarch64-linux-gnu + libc6-dev-arm64-cross as linker/CC;
#                              `cargo test` runs the binaries under qemu-user
#                              (`qemu-aarch64 -L /usr/aarch64-linux-gnu`).
#   aarch64-linux-android      clang --target=aarch64-linux-android24 (scripts/cc-wrappers) + llvm-ar,
#                              enough for ring's C/asm; no NDK, so no final link (check + staticlib only).
#   aarch64-apple-ios          clang --target=arm64-apple-ios14.0 with a committed minimal SDKROOT
#                              (scripts/cc-wrappers/ios-sdk: the few libc headers ring needs;
#                              scripts/cc-wrappers/android-sysroot likewise for Android);
#                              no Xcode, so no final link (check + staticlib only).
#
# No linker is set for the Android/iOS targets: a cdylib or test binary for them needs the NDK or
# Xcode; here only `cargo check` and `cargo build --lib` (staticlib, an archive) are possible.
#
# The real device builds (NDK, Xcode) are scripts/build-android.sh and scripts/build-xcframework.sh;
# they do not use this file.

_spa_cross_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_spa_wrappers="$_spa_cross_dir/cc-wrappers"

# Linux aarch64 (tests under qemu).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

# llvm-ar: Debian's `llvm` package provides /usr/bin/llvm-ar; fall back to a versioned one.
_spa_llvm_ar="$(command -v llvm-ar || ls /usr/bin/llvm-ar-* 2>/dev/null | sort -V | tail -n1 || true)"

# Android aarch64 (API 24), C only (ring).
export CC_aarch64_linux_android="$_spa_wrappers/aarch64-linux-android-clang"
export AR_aarch64_linux_android="${_spa_llvm_ar:-llvm-ar}"

# iOS device arm64 (iOS 14), C only (ring).
export CC_aarch64_apple_ios="$_spa_wrappers/arm64-apple-ios-clang"
export AR_aarch64_apple_ios="${_spa_llvm_ar:-llvm-ar}"
# The cc crate passes -isysroot "$SDKROOT" for Apple targets (it would run xcrun otherwise).
# Only Apple targets read SDKROOT, so setting it does not affect the Linux builds.
export SDKROOT="$_spa_wrappers/ios-sdk"
export IPHONEOS_DEPLOYMENT_TARGET=14.0

unset _spa_cross_dir _spa_wrappers _spa_llvm_ar
