#!/usr/bin/env bash
# Builds the inputs of deploy/Containerfile: a statically linked `spa` (glibc, crt-static;
# no dynamic loader, so it runs in a FROM scratch image) and the base model.
# Usage: deploy/build-static.sh   -> deploy/dist/{spa,model.gguf}
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p spa-cli --target "$target"
mkdir -p deploy/dist
cp "${CARGO_TARGET_DIR:-target}/$target/release/spa" deploy/dist/spa
if ldd deploy/dist/spa >/dev/null 2>&1; then
  echo "deploy/dist/spa is dynamically linked" >&2
  exit 1
fi
bash scripts/fetch-assets.sh model
model=$(ls "${SPA_HOME:-$HOME/.cache/spa-mobile}"/models/*Q4_1.gguf 2>/dev/null | head -n 1 || true)
[ -n "$model" ] || { echo "model not found under \$SPA_HOME/models" >&2; exit 1; }
cp "$model" deploy/dist/model.gguf
ls -l deploy/dist
