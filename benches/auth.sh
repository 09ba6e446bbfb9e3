#!/usr/bin/env bash
# What authentication costs: streamed chats through Backstops in front of
# the same mock upstream, side by side at fixed rates with oha: without
# authentication, with an API key, with a JWT (ES256, its key from a JWKS
# file, which Backstop holds in memory and rereads only when it changes),
# and without again (an A/A pair: the machine's noise). Rounds rotate the
# order; the table gives medians.
#
#   benches/auth.sh [SECONDS_PER_STEP] [ROUNDS]     (defaults 10, 3; RATES="500 1000")
#
# Needs oha (`cargo install oha --locked`). Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
mock_addr=127.0.0.1:18181
work=$(mktemp -d)
declare -A addr=([off]=127.0.0.1:18182 [key]=127.0.0.1:18183 [jwt]=127.0.0.1:18184 [same]=127.0.0.1:18185)
declare -A admin=([off]=127.0.0.1:18192 [key]=127.0.0.1:18193 [jwt]=127.0.0.1:18194 [same]=127.0.0.1:18195)
names=(off key jwt same)

command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
cargo build --release --locked -q -p backstop-server -p backstop-benches

key="sk-bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
hash=$(printf %s "$key" | sha256sum | cut -d' ' -f1)
token=$(target/release/bench-jwt "$work/jwks.json")
identity="[[auth.identities]]
name = \"bench\"
key_sha256 = [\"$hash\"]"
declare -A auth=([off]="" [same]="" [key]="[auth]
enabled = true
$identity" [jwt]="[auth]
enabled = true
$identity
[auth.jwt]
jwks_file = \"$work/jwks.json\"")
declare -A credential=([off]=none [same]=none [key]="$key" [jwt]="$token")

pids=()
target/release/bench-mock $mock_addr >/dev/null &
pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
for n in "${names[@]}"; do
  printf '[server]\nlisten = "%s"\nadmin_listen = "%s"\n[store]\nenabled = false\n%s\n[[targets]]\nname = "mock"\nbase_url = "http://%s/v1"\n' \
    "${addr[$n]}" "${admin[$n]}" "${auth[$n]}" "$mock_addr" >"$work/$n.toml"
  BACKSTOP_LOG=warn target/release/backstop --config "$work/$n.toml" >/dev/null &
  pids+=($!)
done
for _ in $(seq 50); do
  up=1
  for n in "${names[@]}"; do curl -sf "http://${addr[$n]}/healthz" >/dev/null || up=0; done
  [ $up = 1 ] && break
  sleep 0.1
done

body='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}'
load() { # name rate -> "p50_ms p99_ms req/s percent_200"
  oha --no-tui --output-format json -z "${secs}s" -c 32 -q "$2" --latency-correction -m POST \
    -H 'content-type: application/json' -H "authorization: Bearer ${credential[$1]}" -d "$body" \
    "http://${addr[$1]}/v1/chat/completions" | python3 benches/oha_summary.py
}
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }

echo "| rate (req/s) | off p50 / p99 (ms) | API key p50 / p99 (ms) | JWT (ES256, JWKS) p50 / p99 (ms) | key adds p50 / p99 (ms) | JWT adds p50 / p99 (ms) | A/A: off twice, p50 / p99 apart (ms) |"
echo "|---|---|---|---|---|---|---|"
for rate in ${RATES:-500 1000}; do
  declare -A p50=() p99=()
  kd50=() kd99=() jd50=() jd99=() aa50=() aa99=()
  for round in $(seq "$rounds"); do
    k=$((round % ${#names[@]}))
    order=("${names[@]:$k}" "${names[@]:0:$k}")
    declare -A r50=() r99=()
    for n in "${order[@]}"; do
      read -r a b _ ok <<<"$(load "$n" $rate)"
      [ "$ok" = 100.0 ] || echo "warning: $n at $rate: $ok% ok" >&2
      r50[$n]=$a
      r99[$n]=$b
      p50[$n]+="$a "
      p99[$n]+="$b "
    done
    d() { python3 -c "print($1 - $2)"; }
    kd50+=("$(d "${r50[key]}" "${r50[off]}")"); kd99+=("$(d "${r99[key]}" "${r99[off]}")")
    jd50+=("$(d "${r50[jwt]}" "${r50[off]}")"); jd99+=("$(d "${r99[jwt]}" "${r99[off]}")")
    aa50+=("$(python3 -c "print(abs(${r50[same]} - ${r50[off]}))")")
    aa99+=("$(python3 -c "print(abs(${r99[same]} - ${r99[off]}))")")
  done
  m() { median ${p50[$1]}; }
  n99() { median ${p99[$1]}; }
  echo "| $rate | $(m off) / $(n99 off) | $(m key) / $(n99 key) | $(m jwt) / $(n99 jwt) | $(median "${kd50[@]}") / $(median "${kd99[@]}") | $(median "${jd50[@]}") / $(median "${jd99[@]}") | $(median "${aa50[@]}") / $(median "${aa99[@]}") |"
done
