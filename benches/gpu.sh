#!/usr/bin/env bash
# The local model on GPU 0 next to llama.cpp's CUDA build, on the same
# LLaMA-2-7B-shaped Q4_K_M file, in one run:
#
# 1. the binary serves chat from the file on the GPU, offline (one answer
#    by curl, then decode speed as the OpenAI Python SDK sees it, greedy and
#    sampled, through benches/server_local.py when `openai` imports);
# 2. prompt (pp512) and decode (tg128) tokens/s at 1, 2 and 4 sequences:
#    llama.cpp's llama-batched-bench -ngl 99 and Backstop's bench-local;
# 3. decode against the HBM bandwidth bound, and the GPU memory each used;
# 4. that a prompt's logits are the same run in one step (the f16 tensor-core
#    products) as token by token (the quantized one-row products).
#
#   benches/gpu.sh LLAMA_CPP_DIR BIN_DIR [HBM_GB_S]
#
# Run on the GPU machine (it has no cargo). BIN_DIR holds `backstop` and
# `bench-local` built with the `cuda` feature on a machine without a GPU:
#   source ../shared/cuda/env.sh
#   export CARGO_TARGET_DIR=target-cuda
#   cargo build --release --locked -p backstop-server --features backstop-local/cuda
#   cargo build --release --locked -p backstop-benches --bin bench-local \
#     --features backstop-local/cuda
# LLAMA_CPP_DIR is llama.cpp's source (vendor/llama.cpp of the
# llama-cpp-python==0.3.36 sdist: see benches/local.sh); its CUDA build goes
# to build-cuda (under 3 minutes there, by ../shared/cuda/README.md; here it
# ran while the binary served), and its gguf-py writes the
# model (benches/make-llama7b.py, with numpy) unless GPU_MODEL names one.
# HBM_GB_S is the GPU's memory bandwidth (default 4800, an H200's). The
# binaries need the CUDA 13 runtime, cuBLAS and cuRAND on LD_LIBRARY_PATH
# (see ../shared/cuda/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
llama_cpp="${1:?usage: benches/gpu.sh LLAMA_CPP_DIR BIN_DIR [HBM_GB_S]}"
bins="${2:?BIN_DIR}"
hbm=${3:-4800}
model=${GPU_MODEL:-/tmp/llama7b-q4km-random.gguf}
addr=127.0.0.1:18581
build="$llama_cpp/build-cuda"
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ ! -x "$build/bin/llama-batched-bench" ]; then
  (cmake -S "$llama_cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF && cmake --build "$build" --target llama-batched-bench) \
    >"$work/llama-build.log" 2>&1 &
  building=$!
fi
[ -f "$model" ] || PYTHONPATH="$llama_cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}" \
  python3 benches/make-llama7b.py "$llama_cpp/models/ggml-vocab-llama-spm.gguf" "$model"
echo "model: $model, first 200 MB md5 $(head -c 200000000 "$model" | md5sum | cut -c1-32)"

# The most GPU memory in use (MiB) while a command runs.
gpu_peak() {
  local log="$work/gpu-mem"
  : >"$log"
  (while :; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$log"
    sleep 0.2
  done) &
  local sampler=$!
  "$@" || echo "FAILED ($?): $*"
  kill $sampler
  echo "GPU memory in use at most: $(sort -n "$log" | tail -1) MiB"
}

echo "## The binary, offline on GPU 0: backstop with BACKSTOP_MODEL=$model"
serve() {
  env -u OPENAI_API_KEY BACKSTOP_MODEL="$model" BACKSTOP_LISTEN=$addr BACKSTOP_LOG=warn \
    BACKSTOP_DATA="$work/data" "$bins/backstop" >"$work/server.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    curl -sf "http://$addr/readyz" >/dev/null && break
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.2
  done
  curl -sS -m 120 "http://$addr/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "gpt-4o-mini", "max_tokens": 24, "temperature": 0,
      "messages": [{"role": "user", "content": "Say hello."}]}'
  echo
  if python3 -c 'import openai' 2>/dev/null; then
    echo "mode, decode tok/s, answer tokens, client CPU"
    timeout 300 python3 benches/server_local.py "http://$addr/v1" 3
  else
    echo "(no openai module here: SDK timing skipped)"
  fi
  kill "${pids[-1]}"
  wait "${pids[-1]}" 2>/dev/null || true
  tail -5 "$work/server.log"
}
gpu_peak serve

if [ -n "${building:-}" ]; then
  wait "$building" || { tail -30 "$work/llama-build.log"; echo "llama.cpp's CUDA build failed"; }
fi
if [ -x "$build/bin/llama-batched-bench" ]; then
  echo "## llama.cpp (CUDA): llama-batched-bench -npp 512 -ntg 128 -npl 1,2,4 -ngl 99"
  gpu_peak timeout 300 "$build/bin/llama-batched-bench" -m "$model" -c 4096 -npp 512 -ntg 128 \
    -npl 1,2,4 -ngl 99 2>&1 | grep -E '^\||GPU memory|FAILED'
fi
echo "## Backstop (GPU 0): bench-local MODEL 512 128 512"
gpu_peak timeout 300 "$bins/bench-local" "$model" 512 128 512
echo "## Backstop (GPU 0): bench-local --agree MODEL"
timeout 120 "$bins/bench-local" --agree "$model" || echo "FAILED ($?): bench-local --agree"
bytes=$(stat -c %s "$model")
python3 -c "print(f'HBM bound on decode: {$hbm * 1e9 / $bytes:.0f} tok/s ({$hbm} GB/s over {$bytes / 1e9:.2f} GB of weights)')"
