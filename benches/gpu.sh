#!/usr/bin/env bash
# The local model on GPU 0 next to llama.cpp's CUDA build, on the same
# LLaMA-2-7B-shaped Q4_K_M file: prompt (pp512) and decode (tg128) tokens/s
# at 1 and 4 sequences, and decode against the HBM bandwidth bound.
#
#   benches/gpu.sh LLAMA_CPP_DIR MODEL_GGUF BENCH_LOCAL [HBM_GB_S]
#
# Run on the GPU machine (it has no cargo). Build BENCH_LOCAL here first:
#   source ../shared/cuda/env.sh
#   CARGO_TARGET_DIR=target-cuda cargo build --release --locked \
#     -p backstop-benches --bin bench-local --features backstop-local/cuda
# and make MODEL_GGUF here with benches/make-llama7b.py (4 GB: copy it, or
# run the script there if its Python has numpy and gguf). LLAMA_CPP_DIR is
# llama.cpp's source (vendor/llama.cpp of the llama-cpp-python==0.3.36
# sdist); its CUDA build goes to build-cuda (under 3 minutes on an H200).
# HBM_GB_S is the GPU's memory bandwidth (default 4800, an H200's). On that
# machine, put its CUDA 13 libraries on LD_LIBRARY_PATH (see
# ../shared/cuda/README.md).
set -euo pipefail
llama_cpp="${1:?usage: benches/gpu.sh LLAMA_CPP_DIR MODEL_GGUF BENCH_LOCAL [HBM_GB_S]}"
model="${2:?MODEL_GGUF}"
bench_local="${3:?BENCH_LOCAL}"
hbm=${4:-4800}
bin="$llama_cpp/build-cuda/bin"
if [ ! -x "$bin/llama-batched-bench" ]; then
  cmake -S "$llama_cpp" -B "$llama_cpp/build-cuda" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAMA_CURL=OFF >/dev/null
  cmake --build "$llama_cpp/build-cuda" -j --target llama-batched-bench >/dev/null
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "## llama.cpp (CUDA): llama-batched-bench -npp 512 -ntg 128 -npl 1,4 -ngl 99"
"$bin/llama-batched-bench" -m "$model" -c 4096 -npp 512 -ntg 128 -npl 1,4 -ngl 99 2>&1 | grep -E '^\|'
echo "## Backstop (GPU 0): bench-local MODEL 512 128 512"
"$bench_local" "$model" 512 128 512
bytes=$(stat -c %s "$model")
python3 -c "print(f'HBM bound on decode: {$hbm * 1e9 / $bytes:.0f} tok/s ({$hbm} GB/s over {$bytes / 1e9:.2f} GB of weights)')"
