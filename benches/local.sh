#!/usr/bin/env bash
# The local model's speed next to llama.cpp's, on the same GGUF file and the
# same two threads, in one run.
#
#   benches/local.sh [LLAMA_BENCH]
#
# LLAMA_BENCH is llama.cpp's llama-bench binary (default: $LLAMA_BENCH, or
# llama-bench on the PATH). Build it from the llama.cpp source that the PyPI
# source distribution of llama-cpp-python==0.3.36 vendors:
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
#   tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   pip install cmake ninja
#   cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build --target llama-bench
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:-${LLAMA_BENCH:-llama-bench}}"
model="$(models/fetch)"
cargo build --release --locked -q -p backstop-benches --bin bench-local

echo "## llama.cpp (llama-bench -p 64 -n 128 -t 2)"
"$bench" -m "$model" -p 64 -n 128 -t 2 -o md
echo
echo "## Backstop (candle), 2 threads"
target/release/bench-local "$model"
