#!/usr/bin/env bash
# A configuration reloaded under load: streamed chats through one Backstop
# at a fixed rate with oha, in steps with no reload and steps with a reload
# every RELOAD_MS (250 by default), each reload changing the target that
# serves (its pool size), so that it starts afresh with a new pool while
# requests run on the old one. Reports requests lost (any answer but a 200,
# and connection errors; not the requests oha cuts at the end of a step) and
# the latency of both kinds of step.
#
#   benches/reload.sh [SECONDS_PER_STEP] [ROUNDS]     (defaults 10, 3)
#   RATE=1000 RELOAD_MS=250 benches/reload.sh
#
# Needs oha (`cargo install oha --locked`). Prints a markdown table for
# benches/README.md. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
rate=${RATE:-1000}
every=${RELOAD_MS:-250}
mock_a=127.0.0.1:18181
mock_b=127.0.0.1:18182
addr=127.0.0.1:18183
admin=127.0.0.1:18193
work=$(mktemp -d)

command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
cargo build --release --locked -q -p backstop-server -p backstop-benches

config() { # b's pool size
  printf '[server]\nlisten = "%s"\nadmin_listen = "%s"\n[store]\nenabled = false\n' "$addr" "$admin"
  printf '[[targets]]\nname = "a"\nbase_url = "http://%s/v1"\n' "$mock_a"
  printf '[[targets]]\nname = "b"\nbase_url = "http://%s/v1"\npool_max_idle = %s\n' "$mock_b" "$1"
  printf '[[routes]]\nmodels = "*"\ntargets = ["b", "a"]\n'
}
config 64 >"$work/backstop.toml"

target/release/bench-mock $mock_a >/dev/null &
a_pid=$!
target/release/bench-mock $mock_b >/dev/null &
b_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/backstop.toml" >/dev/null &
pid=$!
trap 'kill $a_pid $b_pid $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf http://$addr/readyz >/dev/null && break
  sleep 0.1
done

chat='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}'

# oha -> "p50_ms p99_ms lost total".
load() {
  oha --no-tui --output-format json -z "${secs}s" -c 32 -q "$rate" --latency-correction \
    -m POST -H 'content-type: application/json' -d "$chat" "http://$addr/v1/chat/completions" |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
codes = r.get("statusCodeDistribution", {})
# Requests oha itself cut at the end of the step are not lost.
errors = sum(n for e, n in r.get("errorDistribution", {}).items() if "aborted due to deadline" not in e)
total = sum(codes.values()) + errors
lost = total - codes.get("200", 0)
p50, p99 = (r["latencyPercentiles"][q] * 1e3 for q in ("p50", "p99"))
print(f"{p50:.3f} {p99:.3f} {lost} {total}")'
}

# Rewrites the file and asks for a reload every $every ms until stopped.
pause=$(python3 -c "print($every / 1000)")
reloads() {
  local size=64
  while :; do
    size=$((size == 64 ? 65 : 64))
    config $size >"$work/backstop.toml.next"
    mv "$work/backstop.toml.next" "$work/backstop.toml"
    curl -sf -X POST -H 'content-type: application/json' -d '{}' http://$admin/admin/reload >/dev/null ||
      echo "warning: a reload failed" >&2
    sleep "$pause"
  done
}

applied() {
  curl -sf http://$admin/metrics | awk '/^backstop_config_reloads_total\{outcome="applied"\}/ {print $2}'
}

median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }
steady50=() steady99=() busy50=() busy99=()
lost_steady=0 lost_busy=0 total_steady=0 total_busy=0
before=$(applied)
for round in $(seq "$rounds"); do
  order=(steady busy)
  [ $((round % 2)) = 0 ] && order=(busy steady)
  for which in "${order[@]}"; do
    if [ "$which" = busy ]; then
      reloads &
      reloader=$!
    fi
    read -r p50 p99 lost total <<<"$(load)"
    if [ "$which" = busy ]; then
      kill $reloader
      wait $reloader 2>/dev/null || true
    fi
    eval "${which}50+=($p50); ${which}99+=($p99)"
    eval "lost_$which=\$((lost_$which + lost)); total_$which=\$((total_$which + total))"
  done
done
after=$(applied)
echo "| rate (req/s) | steps | no reload p50 / p99 (ms) | reloading p50 / p99 (ms) | reloads applied | requests lost, no reload | requests lost, reloading |"
echo "|---|---|---|---|---|---|---|"
echo "| $rate | $rounds x ${secs} s each | $(median "${steady50[@]}") / $(median "${steady99[@]}") | $(median "${busy50[@]}") / $(median "${busy99[@]}") | $(python3 -c "print(int(${after:-0} - ${before:-0}))") | $lost_steady of $total_steady | $lost_busy of $total_busy |"
