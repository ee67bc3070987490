#!/usr/bin/env bash
# build-android.sh - build the spa-mobile Android library (AAR) on a machine with the Android SDK + NDK.
#
#   1. cargo ndk: libspa_ffi.so (release, stripped) for arm64-v8a and x86_64, API 24
#      -> android/build/rustJniLibs/<abi>/libspa_ffi.so
#   2. Gradle (android/, Kotlin DSL library module): assembleRelease
#      -> android/build/outputs/aar/spa-mobile-release.aar
#   3. optionally publish it with maven-publish: --publish local (~/.m2) | --publish remote
#      (to -PspaMavenUrl / ORG_GRADLE_PROJECT_spaMavenUrl, default android/build/maven-repo)
#
# Usage: scripts/build-android.sh [--publish none|local|remote] [--abi arm64-v8a,x86_64]
#
# Requirements (checked first, before anything is built; a missing one exits 3 with a message):
#   ANDROID_NDK_HOME (or ANDROID_NDK_ROOT, or an NDK under $ANDROID_HOME/ndk/), cargo-ndk
#   (`cargo install cargo-ndk`), the rustup targets aarch64-linux-android + x86_64-linux-android,
#   ANDROID_HOME (or ANDROID_SDK_ROOT) for Gradle, JDK 17+, and `gradle` (8.9+) or android/gradlew.
# Exit codes: 0 ok | 3 missing SDK/tool | 64 usage error | other: the failing build step's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

publish=none
abis="arm64-v8a,x86_64"
while [ $# -gt 0 ]; do
	case "$1" in
	--publish) publish="${2:-}"; shift 2 ;;
	--abi) abis="${2:-}"; shift 2 ;;
	-h | --help) sed -n '2,19p' "$0"; exit 0 ;;
	*) echo "build-android.sh: unknown argument '$1' (see --help)" >&2; exit 64 ;;
	esac
done
case "$publish" in none | local | remote) ;; *) echo "build-android.sh: --publish must be none, local or remote" >&2; exit 64 ;; esac

missing=()
# --- Android NDK
ndk="${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}"
sdk="${ANDROID_HOME:-${ANDROID_SDK_ROOT:-}}"
if [ -z "$ndk" ] && [ -n "$sdk" ] && [ -d "$sdk/ndk" ]; then
	ndk="$(ls -d "$sdk"/ndk/*/ 2>/dev/null | sort -V | tail -n1 || true)"
	ndk="${ndk%/}"
fi
if [ -z "$ndk" ]; then
	missing+=("Android NDK: set ANDROID_NDK_HOME (or install one with sdkmanager \"ndk;27.2.12479018\" under \$ANDROID_HOME/ndk)")
elif [ ! -f "$ndk/source.properties" ] || [ ! -d "$ndk/toolchains/llvm/prebuilt" ]; then
	missing+=("Android NDK: '$ndk' is not an NDK (no source.properties / toolchains/llvm/prebuilt)")
fi
# --- Android SDK (Gradle needs it for compileSdk)
if [ -z "$sdk" ]; then
	missing+=("Android SDK: set ANDROID_HOME (or ANDROID_SDK_ROOT) to the SDK with platforms;android-35")
elif [ ! -d "$sdk/platforms" ]; then
	missing+=("Android SDK: '$sdk' has no platforms/ directory")
fi
# --- Rust side
command -v cargo >/dev/null || missing+=("cargo (Rust toolchain)")
if command -v cargo >/dev/null && ! cargo ndk --version >/dev/null 2>&1; then
	missing+=("cargo-ndk: cargo install cargo-ndk")
fi
declare -A rust_target=([arm64-v8a]=aarch64-linux-android [x86_64]=x86_64-linux-android
	[armeabi-v7a]=armv7-linux-androideabi [x86]=i686-linux-android)
IFS=',' read -r -a abi_list <<<"$abis"
if command -v rustup >/dev/null; then
	installed="$(rustup target list --installed)"
	for abi in "${abi_list[@]}"; do
		t="${rust_target[$abi]:-}"
		if [ -z "$t" ]; then echo "build-android.sh: unknown ABI '$abi'" >&2; exit 64; fi
		grep -qx "$t" <<<"$installed" || missing+=("rust target $t: rustup target add $t")
	done
fi
# --- Gradle + JDK
gradle_cmd=()
if [ -x "$root/android/gradlew" ]; then
	gradle_cmd=("$root/android/gradlew")
elif command -v gradle >/dev/null; then
	gradle_cmd=(gradle)
else
	missing+=("Gradle 8.9+: install gradle or add a wrapper (gradle wrapper --gradle-version 8.10.2 in android/)")
fi
command -v java >/dev/null || missing+=("JDK 17+ (java)")

if [ ${#missing[@]} -gt 0 ]; then
	echo "build-android.sh: cannot build the Android library on this machine; missing:" >&2
	for m in "${missing[@]}"; do echo "  - $m" >&2; done
	echo "(the SDK-free checks of the Android target are scripts/test-cross.sh)" >&2
	exit 3
fi
export ANDROID_NDK_HOME="$ndk"
# scripts/cross-env.sh (the NDK-free CI setup) must not leak into the NDK build.
unset CC_aarch64_linux_android AR_aarch64_linux_android
# What ships: the release profile without line tables, one codegen unit and whole-program LTO
# (smaller and a little faster; set here rather than as a named profile because cargo-ndk copies
# from target/<abi>/release).
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1

echo "== cargo ndk: libspa_ffi.so for ${abis} (NDK $ndk) =="
out="$root/android/build/rustJniLibs"
rm -rf "$out"
ndk_args=()
for abi in "${abi_list[@]}"; do ndk_args+=(-t "$abi"); done
(cd "$root" && cargo ndk "${ndk_args[@]}" --platform 24 -o "$out" build --release -p spa-ffi --lib)
for abi in "${abi_list[@]}"; do
	f="$out/$abi/libspa_ffi.so"
	[ -f "$f" ] || { echo "build-android.sh: cargo ndk produced no $f" >&2; exit 1; }
	echo "  $abi: $(du -h "$f" | cut -f1) $f"
done

echo "== gradle assembleRelease =="
gradle_args=(-p "$root/android" --no-daemon "-PspaAbis=$abis")
"${gradle_cmd[@]}" "${gradle_args[@]}" assembleRelease
aar="$root/android/build/outputs/aar/spa-mobile-release.aar"
[ -f "$aar" ] || { echo "build-android.sh: no AAR at $aar" >&2; exit 1; }
echo "AAR: $aar ($(du -h "$aar" | cut -f1))"

case "$publish" in
local) "${gradle_cmd[@]}" "${gradle_args[@]}" publishReleasePublicationToMavenLocal ;;
remote) "${gradle_cmd[@]}" "${gradle_args[@]}" publishReleasePublicationToSpaRepository ;;
none) ;;
esac
