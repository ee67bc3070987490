#!/usr/bin/env bash
# The main job: generate text with the real base model (fetched on first use).
# Usage: scripts/demo.sh ["prompt"] [max tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"Once upon a time, there was a little girl who"}
max=${2:-48}
cargo run --release -q -p spa-cli -- generate "$prompt" --max-tokens "$max"
