#!/usr/bin/env bash
# Runs every check of the project: formatting, clippy, and the whole test suite (unit,
# integration against the real SmolLM2 model, doc tests). Fetches the model first if needed.
# Usage: scripts/test.sh            (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
t_all=$SECONDS
t_step=$SECONDS
lap() { echo "-- test.sh: $1 took $((SECONDS - t_step)) s (total $((SECONDS - t_all)) s, target/ $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1), disk free $(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' '))"; t_step=$SECONDS; }

echo "== fetch assets (model, Gemma, BIG-bench tasks, personal text) =="
bash scripts/fetch-assets.sh model gemma data personal
lap assets

# The bindings' compilers (kotlinc from npm, a Debian chroot with Swift: ~1.3 GB, mostly
# downloads) are fetched while cargo compiles; the bindings' step waits for them.
bash scripts/ffi-tools.sh all >/tmp/spa-ffi-tools.log 2>&1 &
ffi_tools=$!

echo "== cargo fmt --check =="
cargo fmt --all -- --check
lap fmt

# `--features spa-ffi/bindgen` here and in `cargo test`: the bindings' step builds libspa_ffi and
# the uniffi-bindgen binary with it, and with the same features every dependency compiled for the
# tests is reused there (without it, 119 units were built again: ~5 min of CI).
echo "== cargo clippy =="
cargo clippy --workspace --all-targets --features spa-ffi/bindgen -- -D warnings
lap clippy

echo "== cargo test =="
cargo test --workspace --features spa-ffi/bindgen 2>&1 | tee /tmp/spa-test.log
lap "cargo test"

echo "== llama.cpp base engine: agreement with candle, the server and runtime suites on it =="
# Builds the vendored llama.cpp (cmake) and runs every spa-server test with its servers on the
# llama.cpp engine (tests/common: SPA_ENGINE), plus tests/llamacpp_engine.rs (docs/serving.md).
SPA_ENGINE=llamacpp cargo test -p spa-server --features llamacpp 2>&1 | tee -a /tmp/spa-test.log
# The device runtime's suites against servers on llama.cpp, their local reference on llama.cpp
# too (tests/common: `local`). One test at a time: llama.cpp's kernels depend on what else is in
# the batch and the cache (docs/serving.md, "Exactness"), so a session's tokens are llama.cpp's
# own only while it is alone on the server. The chaos test's concurrent lanes are that case (they
# run on candle in `cargo test` above); the eviction test's two sessions are too, so it compares
# tokens only on an engine that declares `BaseEngine::batch_invariant` (candle).
SPA_ENGINE=llamacpp cargo test -p spa-runtime --features spa-server/llamacpp -- --test-threads=1 \
	--skip randomized_faults_never_duplicate_or_lose_tokens 2>&1 | tee -a /tmp/spa-test.log
lap "llama.cpp engine"

echo "== mobile bindings: Kotlin (JVM) + Swift (Linux) =="
# The background fetch must be done (test-ffi.sh would otherwise start a second one); if it
# failed, say why: test-ffi.sh then tries once more itself.
wait "$ffi_tools" || { echo "bindings' toolchain fetch failed:"; tail -20 /tmp/spa-ffi-tools.log; }
lap "waiting for the bindings' toolchains"
bash scripts/test-ffi.sh
lap "Kotlin + Swift bindings"
bash scripts/test-cross.sh # aarch64 tests under qemu, android/ios release staticlibs, packaging
lap "cross targets"
# Live fuzzing needs a cold nightly + sanitizer build of the whole decoder stack (~15 min on a
# 2-core machine), which would push CI past its time budget; the fuzz corpus and every found input
# are replayed by `cargo test` (rust/spa-server/tests/fuzz_regressions.rs). SPA_CI_FUZZ=1 runs it.
if [ "${SPA_CI_FUZZ:-0}" = 1 ]; then
  bash scripts/fuzz.sh 15 # cargo-fuzz targets, 15 s each (docs/reliability.md)
fi
