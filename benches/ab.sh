#!/usr/bin/env bash
# Backstops of one build that differ only in their environment or store
# setting, side by side: Responses streams through each, in front of the same
# mock upstream, at a fixed rate and then flat out, in rounds whose order
# rotates, with the median of each column (the CPU columns: the Backstop
# process's user and system time over the streams it served, from /proc, and
# the part of it its store's writer thread ran, from that thread's schedstat).
# For an experiment kept behind an environment variable until it has been
# measured.
#
#   benches/ab.sh SECONDS ROUNDS VARIANT...
#
# A VARIANT is NAME:STORE[:ENV=VALUE[,ENV=VALUE...][:COMMAND]], STORE `on`
# or `off`, COMMAND a program (and its arguments, split at commas) to run
# that Backstop under:
#
#   benches/ab.sh 10 5 off:off on:on nice:on::setpriv,--bounding-set=-sys_nice
#
# Needs oha (`cargo install oha --locked`) and a release build
# (`cargo build --release --locked -p backstop-server -p backstop-benches`).
# Uses loopback ports 18181 on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=$1
rounds=$2
shift 2
mock_addr=127.0.0.1:18181
work=$(mktemp -d)
command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }

target/release/bench-mock $mock_addr >/dev/null &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
names=() addrs=() servers=()
port=18182
for variant in "$@"; do
  IFS=: read -r name store env wrap <<<"$variant"
  addr=127.0.0.1:$port admin=127.0.0.1:$((port + 100))
  port=$((port + 1))
  if [ "$store" = on ]; then
    section="[store]
path = \"$work/$name\"
max_running = 64
max_queued = 1000000"
  else
    section="[store]
enabled = false"
  fi
  printf '[server]\nlisten = "%s"\nadmin_listen = "%s"\n%s\n[[targets]]\nname = "mock"\nbase_url = "http://%s/v1"\n' \
    "$addr" "$admin" "$section" "$mock_addr" >"$work/$name.toml"
  IFS=, read -r -a vars <<<"${env:-}"
  IFS=, read -r -a under <<<"${wrap:-}"
  env "${vars[@]}" BACKSTOP_LOG=warn "${under[@]}" target/release/backstop --config "$work/$name.toml" >/dev/null &
  pids+=($!)
  servers+=($!)
  names+=("$name")
  addrs+=("$addr")
done
for addr in "${addrs[@]}" "$mock_addr"; do
  for _ in $(seq 50); do
    curl -sf "http://$addr/healthz" >/dev/null || curl -sf "http://$addr/v1/models" >/dev/null && break
    sleep 0.1
  done
done

stream='{"model":"gpt-4o-mini","stream":true,"input":"Tell me about failover routers in one short paragraph."}'
load() { # url rate|max -> "p50_ms p99_ms req/s percent_200"
  local q=()
  [ "$2" = max ] || q=(-q "$2" --latency-correction)
  oha --no-tui --output-format json -z "${secs}s" -c 32 "${q[@]}" -m POST \
    -H 'content-type: application/json' -d "$stream" "$1" | python3 benches/oha_summary.py
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system, in clock ticks
writer_ns() { # the store's writer thread's run time, in ns (0 without a store)
  local t
  for t in /proc/"$1"/task/*; do
    [ "$(cat "$t/comm")" = backstop-store ] && { cut -d' ' -f1 "$t/schedstat"; return; }
  done
  echo 0
}
tick=$(getconf CLK_TCK)
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }

n=${#names[@]}
echo "| rate (req/s) | variant | p50 (ms) | p99 (ms) | achieved (req/s) | Backstop's CPU a stream (µs) | of which its store's writer (µs) |"
echo "|---|---|---|---|---|---|---|"
for rate in 1000 max; do
  declare -A p50=() p99=() rps=() cpu=() wcpu=()
  for round in $(seq "$rounds"); do
    for k in $(seq 0 $((n - 1))); do
      i=$(((k + round) % n))
      before=$(cpu_ticks "${servers[$i]}") wbefore=$(writer_ns "${servers[$i]}")
      read -r a b c ok <<<"$(load "http://${addrs[$i]}/v1/responses" "$rate")"
      after=$(cpu_ticks "${servers[$i]}") wafter=$(writer_ns "${servers[$i]}")
      [ "$ok" = 100.0 ] || echo "warning: ${names[$i]} at $rate: $ok% ok" >&2
      p50[$i]+=" $a" p99[$i]+=" $b" rps[$i]+=" $c"
      cpu[$i]+=" $(python3 -c "print(($after - $before) / $tick * 1e6 / ($c * $secs))")"
      wcpu[$i]+=" $(python3 -c "print(($wafter - $wbefore) / 1e3 / ($c * $secs))")"
    done
  done
  for i in $(seq 0 $((n - 1))); do
    # shellcheck disable=SC2086
    echo "| $rate | ${names[$i]} | $(median ${p50[$i]}) | $(median ${p99[$i]}) | $(median ${rps[$i]}) | $(median ${cpu[$i]}) | $(median ${wcpu[$i]}) |"
  done
  unset p50 p99 rps cpu wcpu
done
