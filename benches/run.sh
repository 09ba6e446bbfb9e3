#!/usr/bin/env bash
# Backstop's added latency: the same mock upstream called directly and through
# Backstop, side by side in one run, with oha as the load generator.
#
#   benches/run.sh [SECONDS_PER_STEP]      (default 10)
#
# Needs oha (`cargo install oha --locked`). Prints markdown tables for
# benches/README.md. Everything runs on loopback.
#
# With BASELINE=path/to/an/older/backstop, that build runs too, beside the
# current one, on every step: the last table compares the two (how the
# breaker, routing and everything since cost against the Foundation build).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
mock_addr=127.0.0.1:18081
bs_addr=127.0.0.1:18080
base_addr=127.0.0.1:18082
direct=http://$mock_addr/v1
routed=http://$bs_addr/v1

command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
cargo build --release --locked -q -p backstop-server -p backstop-benches

target/release/bench-mock $mock_addr >/dev/null &
mock_pid=$!
OPENAI_BASE_URL=$direct OPENAI_API_KEY=sk-bench BACKSTOP_LOG=warn BACKSTOP_ADMIN_LISTEN=127.0.0.1:0 \
  target/release/backstop --listen $bs_addr &
bs_pid=$!
base_pid=
if [ -n "${BASELINE:-}" ]; then
  OPENAI_BASE_URL=$direct OPENAI_API_KEY=sk-bench BACKSTOP_LOG=warn BACKSTOP_ADMIN_LISTEN=127.0.0.1:0 \
    "$BASELINE" --listen $base_addr &
  base_pid=$!
fi
trap 'kill $mock_pid $bs_pid $base_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  curl -sf http://$bs_addr/healthz >/dev/null && curl -sf $direct/models >/dev/null &&
    { [ -z "$base_pid" ] || curl -sf http://$base_addr/healthz >/dev/null; } && break
  sleep 0.1
done

rss() { awk '/VmRSS/ {print $2}' /proc/$bs_pid/status; }
echo "Backstop idle RSS after start: $(rss) KiB"

chat='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}'
stream='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}'

# oha -> "p50_ms p99_ms req/s percent_200".
load() { # url body rate|max
  local url=$1 body=$2 rate=$3 q=()
  [ "$rate" = max ] || q=(-q "$rate" --latency-correction)
  oha --no-tui --output-format json -z "${secs}s" -c 32 "${q[@]}" -m POST \
    -H 'content-type: application/json' -d "$body" "$url/chat/completions" |
    python3 benches/oha_summary.py
}

compare=()
echo
echo "| kind | rate (req/s) | direct p50 (ms) | direct p99 (ms) | backstop p50 (ms) | backstop p99 (ms) | added p50 (ms) | added p99 (ms) | achieved direct / backstop (req/s) |"
echo "|---|---|---|---|---|---|---|---|---|"
for kind in chat stream; do
  body=$chat; [ $kind = stream ] && body=$stream
  for rate in 500 1000 2000 max; do
    read -r d50 d99 drps dok <<<"$(load $direct "$body" $rate)"
    read -r b50 b99 brps bok <<<"$(load $routed "$body" $rate)"
    added50=$(python3 -c "print(f'{$b50-$d50:.3f}')")
    added99=$(python3 -c "print(f'{$b99-$d99:.3f}')")
    echo "| $kind | $rate | $d50 | $d99 | $b50 | $b99 | $added50 | $added99 | $drps / $brps (ok $dok% / $bok%) |"
    if [ -n "$base_pid" ]; then
      read -r f50 f99 frps fok <<<"$(load http://$base_addr/v1 "$body" $rate)"
      compare+=("| $kind | $rate | $f50 | $f99 | $b50 | $b99 | $frps / $brps (ok $fok% / $bok%) |")
    fi
  done
done

if [ -n "$base_pid" ]; then
  echo
  echo "| kind | rate (req/s) | baseline p50 (ms) | baseline p99 (ms) | current p50 (ms) | current p99 (ms) | achieved baseline / current (req/s) |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${compare[@]}"
fi

echo
echo "Backstop RSS after the load: $(rss) KiB"
echo
target/release/bench-ttft $direct $routed 2000
