#!/usr/bin/env bash
# The local model's speed next to llama.cpp's, on the same GGUF files and the
# same two threads, in one run: the default SmolLM2 file, then a file shaped
# like LLaMA-2-7B Q4_K_M with random weights (made by make-llama7b.py).
#
#   benches/local.sh LLAMA_CPP_DIR [smollm2|llama7b]...
#
# LLAMA_CPP_DIR is a llama.cpp source tree with llama-bench and
# llama-batched-bench built in build/bin; its models/ggml-vocab-llama-spm.gguf
# is the LLaMA tokenizer the 7B-shaped file copies. We use the llama.cpp that
# the PyPI source distribution of llama-cpp-python==0.3.36 vendors:
#   pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
#   tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   pip install cmake ninja gguf numpy
#   cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build --target llama-bench llama-batched-bench
set -euo pipefail
cd "$(dirname "$0")/.."
llama_cpp="${1:?usage: benches/local.sh LLAMA_CPP_DIR [smollm2|llama7b]...}"
shift
bin="$llama_cpp/build/bin"
models=("${@:-smollm2 llama7b}")
cargo build --release --locked -q -p backstop-benches --bin bench-local

# One model: llama.cpp's batched and single-sequence runs, then ours.
# $1 model file, $2 prompt tokens per sequence, $3 answer tokens per sequence.
compare() {
    local model="$1" prompt="$2" decode="$3"
    echo "## llama.cpp: llama-batched-bench -npp $prompt -ntg $decode -npl 1,2,4 -t 2"
    /usr/bin/time -f "llama.cpp peak RSS: %M KiB" \
        "$bin/llama-batched-bench" -m "$model" -c 4096 -npp "$prompt" -ntg "$decode" \
        -npl 1,2,4 -t 2 2>&1 | grep -E '^\||peak RSS'
    echo "## llama.cpp: llama-bench -p 512 -n $decode -t 2 (time to first token = 512 / pp512)"
    "$bin/llama-bench" -m "$model" -p 512 -n "$decode" -t 2 -r 2 -o md
    echo "## Backstop: bench-local (2 threads)"
    target/release/bench-local "$model" "$prompt" "$decode" 512
    echo
}

for name in ${models[@]}; do
    case "$name" in
        smollm2)
            compare "$(models/fetch)" 64 128
            ;;
        llama7b)
            file=target/llama7b-q4km-random.gguf
            [ -f "$file" ] ||
                python3 benches/make-llama7b.py "$llama_cpp/models/ggml-vocab-llama-spm.gguf" "$file"
            compare "$file" 64 16
            ;;
        *)
            echo "unknown model $name (smollm2 or llama7b)" >&2
            exit 2
            ;;
    esac
done
