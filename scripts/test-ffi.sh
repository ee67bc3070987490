#!/usr/bin/env bash
# test-ffi.sh - the mobile bindings end to end: builds libspa_ffi.so (rust/spa-ffi), generates
# the Kotlin and Swift bindings with the workspace's uniffi-bindgen (library mode, uniffi.toml),
# checks that the committed copies are current, starts a real `spa serve` (TLS with a dev
# certificate, API keys) on loopback, then compiles and runs
#   - the Kotlin suite (android/jvm-test) on the JVM: kotlinc from npm `kotlin-compiler`, JNA
#     from Debian libjna-java;
#   - the Swift suite (ios/Tests/SpaMobileLinuxTests) with Swift 6.0.3 in a Debian trixie chroot
#     (scripts/swift-chroot.sh), the package's targets built one module each as SwiftPM does
#     (SpaMobileFFI, then SpaMobile importing it; the tests are a client of both);
#   - after each, the sample apps' view models (sample-apps/: chat + keyboard demo) and their
#     tests (sample-apps/jvm-test, sample-apps/swift-test) against the same server;
#   - then the documentation's code blocks of that language (scripts/test-snippets.sh).
# Prints each suite's "N passed, M failed" line; exits non-zero if anything fails.
#
# Usage: scripts/test-ffi.sh [--update-bindings] [--kotlin-only|--swift-only]
#   --update-bindings  copy freshly generated bindings over the committed ones (after an API change)
# Env: CARGO_TARGET_DIR (default target), SPA_HOME (~/.cache/spa-mobile), SWIFT_ROOT (chroot dir).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

update=0
run_kotlin=1
run_swift=1
for a in "$@"; do
	case "$a" in
	--update-bindings) update=1 ;;
	--kotlin-only) run_swift=0 ;;
	--swift-only) run_kotlin=0 ;;
	*) echo "usage: $0 [--update-bindings] [--kotlin-only|--swift-only]" >&2; exit 64 ;;
	esac
done

t_start=$(date +%s)
SPA_HOME="${SPA_HOME:-$HOME/.cache/spa-mobile}"
export SPA_HOME
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
WORK=$(mktemp -d /tmp/spa-ffi-test.XXXXXX)
SERVER_PID=""
ROOT=""
cleanup() {
	if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
	rm -rf "$WORK"
	# The chroot's /proc (mounted by scripts/swift-chroot.sh): left mounted, `rm -rf $SPA_HOME`
	# would fail on it.
	if [ -n "$ROOT" ] && mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || true; fi
}
trap cleanup EXIT

echo "== ffi: model and personal text =="
MODEL=$(bash scripts/fetch-assets.sh model | sed -n 's/^[A-Za-z_]*=//p' | head -n1)
[ -f "$MODEL" ] || { echo "model not found: '$MODEL'" >&2; exit 2; }
bash scripts/fetch-assets.sh personal >/dev/null
# The user's text of the personalization tests: two Moby Dick chapters to learn, one held out.
mkdir -p "$WORK/texts"
MOBY="$SPA_HOME/data/personal/moby-dick"
cp "$MOBY/chapter_1.txt" "$WORK/texts/train1.txt"
cp "$MOBY/chapter_2.txt" "$WORK/texts/train2.txt"
# The held-out text: the first 250 words of chapter 3 (whole lines). The before/after report
# scores every held-out word with the whole-vocabulary strip (a 256-token window per 128 words of
# text through the server, and 8 word continuations before every word), so the whole chapter
# (5,787 words) took over 300 s on a busy 2-core machine. These suites test the API (reports,
# saving, shipping, cancelling); `spa personalize` measures quality on 2,000 held-out words.
python3 - "$MOBY/chapter_3.txt" "$WORK/texts/held.txt" <<'PY'
import sys
out, n = [], 0
for line in open(sys.argv[1], encoding="utf-8"):
    if n >= 250:
        break
    out.append(line)
    n += len(line.split())
open(sys.argv[2], "w", encoding="utf-8").write("".join(out))
PY

echo "== ffi: build libspa_ffi + uniffi-bindgen + spa (debug) =="
# One invocation, so both share one feature resolution (and one set of dependency builds): the
# features of scripts/test.sh's `cargo test`, so after it only these three are compiled here.
cargo build -q -p spa-ffi -p spa-cli --features spa-ffi/bindgen
LIB="$TARGET/debug/libspa_ffi.so"
BINDGEN="$TARGET/debug/uniffi-bindgen"

echo "== ffi: generate bindings =="
GEN="$WORK/gen"
"$BINDGEN" generate --library "$LIB" --config uniffi.toml --language kotlin --out-dir "$GEN/kotlin" --no-format >/dev/null
"$BINDGEN" generate --library "$LIB" --config uniffi.toml --language swift --out-dir "$GEN/swift" --no-format >/dev/null
KT_GEN="$GEN/kotlin/ai/spa/mobile/ffi/spa_ffi.kt"
declare -A committed=(
	["$KT_GEN"]=android/src/main/kotlin/ai/spa/mobile/ffi/spa_ffi.kt
	["$GEN/swift/SpaMobileFFI.swift"]=ios/Sources/SpaMobileFFI/SpaMobileFFI.swift
	["$GEN/swift/SpaMobileFFIFFI.h"]=ios/Generated/SpaMobileFFIFFI.h
	["$GEN/swift/SpaMobileFFIFFI.modulemap"]=ios/Generated/SpaMobileFFIFFI.modulemap
)
stale=0
for g in "${!committed[@]}"; do
	c=${committed[$g]}
	if [ "$update" = 1 ]; then
		mkdir -p "$(dirname "$c")" && cp "$g" "$c"
	elif ! cmp -s "$g" "$c"; then
		echo "stale generated bindings: $c (run scripts/test-ffi.sh --update-bindings)" >&2
		stale=1
	fi
done
[ "$stale" = 0 ]

echo "== ffi: start spa serve (TLS, loopback) =="
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DOWN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
echo "$KEY" >"$WORK/keys"
mkdir -p "$WORK/cert"
# A random projection keeps the start fast; the server is the real spa-server either way.
# The access log (one line per request: method, route, status, body size) backs the sample
# apps' privacy test: nothing but base-feature requests reaches the server while personalizing.
RUST_LOG="${RUST_LOG:-warn},spa_server::access=info" "$TARGET/debug/spa" serve --addr "127.0.0.1:$PORT" --model "$MODEL" --dev-cert "$WORK/cert" \
	--keys-file "$WORK/keys" --projection random:7 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do
	grep -q "listening on" "$WORK/server.log" && break
	kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
	sleep 0.5
done
grep -q "listening on" "$WORK/server.log" || { echo "server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }
export SPA_TEST_URL="https://127.0.0.1:$PORT" SPA_TEST_KEY="$KEY" SPA_TEST_CA="$WORK/cert/dev-cert.pem"
export SPA_TEST_MODEL="$MODEL" SPA_TEST_DOWN_URL="https://127.0.0.1:$DOWN_PORT"
export SPA_TEST_TEXTS="$WORK/texts" SPA_TEST_DIR="$WORK" SPA_TEST_SERVER_LOG="$WORK/server.log"
echo "server up at $SPA_TEST_URL after $(($(date +%s) - t_start)) s"

status=0
summary=()
# After a suite ran with its output in $WORK/NAME.log: its "NAME: N passed, M failed" line (or
# why it did not finish) and its time since $t0 go into the summary; a failure fails the script.
record() {
	local name=$1 rc=$2 line
	line=$(grep "^$name: " "$WORK/$name.log" || echo "$name: did not finish (exit $rc)")
	summary+=("$line ($(($(date +%s) - t0)) s incl. compile)")
	[ "$rc" = 0 ] || status=1
}

if [ "$run_kotlin" = 1 ]; then
	echo "== ffi: Kotlin (JVM) =="
	t0=$(date +%s)
	KOTLIN_HOME=$(bash scripts/ffi-tools.sh kotlin)
	JNA=/usr/share/java/jna.jar
	[ -f "$JNA" ] || { echo "missing $JNA (apt-get install libjna-java)" >&2; exit 3; }
	CP="$JNA:$KOTLIN_HOME/lib/kotlinx-coroutines-core-jvm.jar"
	"$KOTLIN_HOME/bin/kotlinc" -nowarn -cp "$CP" -d "$WORK/kt.jar" \
		android/src/main/kotlin/ai/spa/mobile/ffi/spa_ffi.kt \
		android/src/main/kotlin/ai/spa/mobile/SpaMobile.kt \
		android/jvm-test/SpaMobileJvmTest.kt
	set +e
	java -Djna.library.path="$(dirname "$LIB")" -cp "$CP:$KOTLIN_HOME/lib/kotlin-stdlib.jar:$WORK/kt.jar" \
		SpaMobileJvmTestKt 2>&1 | tee "$WORK/kotlin.log"
	rc=${PIPESTATUS[0]}
	set -e
	record kotlin "$rc"

	echo "== ffi: sample apps' view models (Kotlin, JVM) =="
	t0=$(date +%s)
	"$KOTLIN_HOME/bin/kotlinc" -nowarn -cp "$CP:$WORK/kt.jar" -d "$WORK/samples.jar" \
		sample-apps/chat-android/src/main/kotlin/ai/spa/sample/chat/ChatViewModel.kt \
		sample-apps/keyboard-demo/android/src/main/kotlin/ai/spa/sample/keyboard/KeyboardViewModel.kt \
		sample-apps/jvm-test/SampleAppsJvmTest.kt
	set +e
	java -Djna.library.path="$(dirname "$LIB")" \
		-cp "$CP:$KOTLIN_HOME/lib/kotlin-stdlib.jar:$WORK/kt.jar:$WORK/samples.jar" \
		SampleAppsJvmTestKt 2>&1 | tee "$WORK/samples-kotlin.log"
	rc=${PIPESTATUS[0]}
	set -e
	record samples-kotlin "$rc"

	echo "== ffi: documentation snippets (Kotlin) =="
	t0=$(date +%s)
	set +e
	KOTLIN_HOME="$KOTLIN_HOME" SNIPPETS_KOTLIN_JAR="$WORK/kt.jar" bash scripts/test-snippets.sh --kotlin-only 2>&1 |
		tee "$WORK/snippets-kotlin.log"
	rc=${PIPESTATUS[0]}
	set -e
	record snippets-kotlin "$rc"
fi

if [ "$run_swift" = 1 ]; then
	echo "== ffi: Swift (Linux, trixie chroot) =="
	t0=$(date +%s)
	ROOT=$(bash scripts/ffi-tools.sh swift)
	D=/opt/spa-ffi-test
	rm -rf "$ROOT$D" && mkdir -p "$ROOT$D/lib"
	cp "$LIB" "$ROOT$D/lib/"
	cp "$GEN/swift/SpaMobileFFIFFI.h" "$ROOT$D/"
	cp "$GEN/swift/SpaMobileFFIFFI.modulemap" "$ROOT$D/"
	cp ios/Sources/SpaMobileFFI/SpaMobileFFI.swift ios/Sources/SpaMobile/SpaMobile.swift \
		ios/Tests/SpaMobileLinuxTests/SpaMobileTests.swift "$SPA_TEST_CA" "$ROOT$D/"
	cp -r "$WORK/texts" "$ROOT$D/texts"
	# The model inside the chroot: a hard link when on the same filesystem, else a copy.
	mkdir -p "$ROOT/opt/spa-models"
	[ "$ROOT/opt/spa-models/model.gguf" -nt "$MODEL" ] ||
		ln -f "$MODEL" "$ROOT/opt/spa-models/model.gguf" 2>/dev/null || cp "$MODEL" "$ROOT/opt/spa-models/model.gguf"
	# One module per target of ios/Package.swift, as SwiftPM builds them: SpaMobileFFI (the
	# generated bindings over the C module SpaMobileFFIFFI), then SpaMobile (the wrapper, which
	# re-exports SpaMobileFFI); the tests are a separate client module that sees only the public
	# API. MAP: every module that imports SpaMobileFFI needs the C module's map.
	MAP="-Xcc -fmodule-map-file=$D/SpaMobileFFIFFI.modulemap"
	set +e
	chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LD_LIBRARY_PATH="$D/lib" \
		SPA_TEST_URL="$SPA_TEST_URL" SPA_TEST_KEY="$SPA_TEST_KEY" SPA_TEST_CA="$D/dev-cert.pem" \
		SPA_TEST_MODEL=/opt/spa-models/model.gguf SPA_TEST_DOWN_URL="$SPA_TEST_DOWN_URL" \
		SPA_TEST_TEXTS="$D/texts" SPA_TEST_DIR="$D" \
		/bin/sh -c "cd $D && mkdir -p mods &&
			swiftc -parse-as-library -module-name SpaMobileFFI $MAP -I $D \
				-emit-module -emit-module-path mods/SpaMobileFFI.swiftmodule -c SpaMobileFFI.swift -o SpaMobileFFI.o &&
			swiftc -parse-as-library -module-name SpaMobile $MAP -I mods \
				-emit-module -emit-module-path mods/SpaMobile.swiftmodule -c SpaMobile.swift -o SpaMobile.o &&
			swiftc -parse-as-library -module-name SpaMobileSwiftTests $MAP -I mods \
				SpaMobileTests.swift SpaMobileFFI.o SpaMobile.o -L $D/lib -lspa_ffi -o spa-swift-tests &&
			./spa-swift-tests" 2>&1 | tee "$WORK/swift.log"
	rc=${PIPESTATUS[0]}
	set -e
	record swift "$rc"

	echo "== ffi: sample apps' view models (Swift, Linux) =="
	t0=$(date +%s)
	cp sample-apps/chat-ios/ChatViewModel.swift sample-apps/keyboard-demo/ios/KeyboardViewModel.swift \
		sample-apps/swift-test/SampleAppsTests.swift "$ROOT$D/"
	set +e
	chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LD_LIBRARY_PATH="$D/lib" \
		SPA_TEST_URL="$SPA_TEST_URL" SPA_TEST_KEY="$SPA_TEST_KEY" SPA_TEST_CA="$D/dev-cert.pem" \
		SPA_TEST_MODEL=/opt/spa-models/model.gguf SPA_TEST_DOWN_URL="$SPA_TEST_DOWN_URL" \
		SPA_TEST_TEXTS="$D/texts" SPA_TEST_DIR="$D" \
		/bin/sh -c "cd $D && swiftc -parse-as-library -module-name SpaMobileSamples $MAP -I mods \
			ChatViewModel.swift KeyboardViewModel.swift SampleAppsTests.swift SpaMobileFFI.o SpaMobile.o \
			-L $D/lib -lspa_ffi -o spa-samples-tests && ./spa-samples-tests" 2>&1 | tee "$WORK/samples-swift.log"
	rc=${PIPESTATUS[0]}
	set -e
	record samples-swift "$rc"

	echo "== ffi: documentation snippets (Swift) =="
	t0=$(date +%s)
	set +e
	SWIFT_ROOT="$ROOT" bash scripts/test-snippets.sh --swift-only 2>&1 | tee "$WORK/snippets-swift.log"
	rc=${PIPESTATUS[0]}
	set -e
	record snippets-swift "$rc"
fi

echo "== ffi: summary =="
for l in "${summary[@]}"; do echo "$l"; done
echo "ffi total: $(($(date +%s) - t_start)) s"
exit $status
