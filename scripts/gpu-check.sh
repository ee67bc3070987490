#!/usr/bin/env bash
# gpu-check.sh - the llama.cpp base engine on an NVIDIA GPU: builds `spa` with the `cuda` feature
# and prints `spa bench model` and `spa bench serve` with every layer on the GPU (docs/serving.md).
# Run it whenever a GPU machine is available; CI never needs one.
# Needs: the CUDA toolkit (nvcc), an NVIDIA driver, cmake, clang, libclang-dev.
# Usage: scripts/gpu-check.sh            (CMAKE_CUDA_ARCHITECTURES defaults to the GPU's own)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "gpu-check.sh: nvcc not found (install the CUDA toolkit)" >&2; exit 3; }
command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu-check.sh: no NVIDIA GPU visible" >&2; exit 3; }
export CMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-native}"
bash scripts/fetch-assets.sh model
t=$SECONDS
cargo build --release -p spa-cli --features cuda
echo "gpu-check: build took $((SECONDS - t)) s"
spa="${CARGO_TARGET_DIR:-target}/release/spa"
echo "== spa bench model (llama.cpp, every layer on the GPU; candle on the CPU) =="
"$spa" bench model --gpu-layers -1 --json | tail -1
echo "== spa bench serve (llama.cpp on the GPU) =="
"$spa" bench serve --engine llamacpp --gpu-layers -1 --sessions 1,8,32,64 --tokens 32 --json | tail -1
