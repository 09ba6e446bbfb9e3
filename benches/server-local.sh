#!/usr/bin/env bash
# The local model's decode speed as a client of the running binary sees it,
# next to llama.cpp's llama-bench on the same file and threads, in one run:
#
# 1. llama-bench tg128 (two threads): decode with no server, no sampling;
# 2. bench-local's one-sequence decode: Backstop's Backend, greedy, no HTTP;
# 3. the binary, offline, streamed to the official OpenAI Python SDK,
#    greedy and sampled (benches/server_local.py).
#
# The three alternate, ROUNDS times, so that this shared machine's drift
# falls on all; the table gives medians, and each ratio is the median of
# each round's own. Between them they show where a token's time goes
# outside the forward pass: 2 against 1 is the engine, 3 greedy against 2
# the server's path (events, encoding, HTTP, and the client's own CPU on
# these two cores), 3 sampled against 3 greedy is sampling.
#
#   benches/server-local.sh LLAMA_CPP_DIR [ROUNDS]   (default 7)
#
# LLAMA_CPP_DIR as for benches/local.sh (llama-bench built in build/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
llama_cpp="${1:?usage: benches/server-local.sh LLAMA_CPP_DIR [ROUNDS]}"
rounds=${2:-7}
model=$(models/fetch)
addr=127.0.0.1:18481
work=$(mktemp -d)
cargo build --release --locked -q -p backstop-server -p backstop-benches

env -u OPENAI_API_KEY BACKSTOP_MODEL="$model" BACKSTOP_LISTEN=$addr BACKSTOP_LOG=warn \
  target/release/backstop >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://$addr/readyz" >/dev/null && break; sleep 0.2; done

for _ in $(seq "$rounds"); do
  "$llama_cpp/build/bin/llama-bench" -m "$model" -p 0 -n 128 -t 2 -r 1 -o json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["avg_ts"])' >>"$work/llama"
  # One sequence only (the last argument): the server idles meanwhile.
  target/release/bench-local "$model" 64 128 64 1 |
    python3 -c '
import sys
for line in sys.stdin:
    cells = [c.strip() for c in line.split("|")]
    if len(cells) == 5 and cells[1] == "1":
        print(cells[3])' >>"$work/backend"
  python3 benches/server_local.py "http://$addr/v1" 1 >>"$work/server"
done

python3 - "$work" <<'PY'
import statistics, sys
work = sys.argv[1]
llama = [float(x) for x in open(f"{work}/llama")]
backend = [float(x) for x in open(f"{work}/backend")]
rows = [line.split() for line in open(f"{work}/server")]
greedy = [(float(r[1]), float(r[3])) for r in rows if r[0] == "greedy"]
sampled = [(float(r[1]), float(r[3])) for r in rows if r[0] == "sampled"]
med = statistics.median
print("| decode, one sequence, 2 threads | tok/s (median) | / llama.cpp (median of rounds) | client's CPU |")
print("|---|---|---|---|")
print(f"| llama.cpp llama-bench tg128 | {med(llama):.1f} | 1.00 | |")
ratio = med(b / l for b, l in zip(backend, llama))
print(f"| Backstop Backend (bench-local), greedy | {med(backend):.1f} | {ratio:.2f} | |")
for name, runs in (("greedy (temperature 0)", greedy), ("sampled (temperature 0.8)", sampled)):
    ratio = med(s / l for (s, _), l in zip(runs, llama))
    print(f"| the binary, OpenAI SDK stream, {name} | {med(s for s, _ in runs):.1f} | {ratio:.2f} | {med(c for _, c in runs):.0%} |")
path = med(s / b for (s, _), b in zip(greedy, backend))
print(f"\nthe server's path: its greedy stream at {path:.2f}x the Backend's decode (median of rounds)")
print(f"{len(llama)} rounds; llama-bench ranged {min(llama):.1f}-{max(llama):.1f} tok/s,")
print(f"the Backend {min(backend):.1f}-{max(backend):.1f} tok/s")
PY
