#!/usr/bin/env bash
# Runs every check of the project: formatting, clippy, and the whole test suite (unit,
# integration against the real SmolLM2 model, doc tests). Fetches the model first if needed.
# Usage: scripts/test.sh            (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fetch assets (model, Gemma, BIG-bench tasks, personal text) =="
bash scripts/fetch-assets.sh model gemma data personal

echo "== cargo fmt --check =="
cargo fmt --all -- --check

echo "== cargo clippy =="
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test =="
cargo test --workspace 2>&1 | tee /tmp/spa-test.log

echo "== mobile bindings: Kotlin (JVM) + Swift (Linux) =="
bash scripts/test-ffi.sh
bash scripts/test-cross.sh # aarch64 tests under qemu, android/ios check + staticlib, device lib size
bash scripts/fuzz.sh 15 # cargo-fuzz targets, 15 s each (docs/reliability.md)
