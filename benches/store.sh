#!/usr/bin/env bash
# What keeping generations costs: Responses streams through Backstops in
# front of the same mock upstream, one with the store (every stream kept and
# resumable, the default) and two with it turned off (the second measures
# the machine's noise), side by side at fixed rates, with oha, and the CPU
# time each Backstop used a stream (from /proc); then
# background jobs accepted per second, and bytes on disk per stored
# response.
#
#   benches/store.sh [SECONDS_PER_STEP] [ROUNDS]     (defaults 10, 3)
#
# Needs oha (`cargo install oha --locked`). Prints markdown tables for
# benches/README.md. Everything runs on loopback. bench-store measures the
# time to resume a stream.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
mock_addr=127.0.0.1:18081
on_addr=127.0.0.1:18082
off_addr=127.0.0.1:18083
same_addr=127.0.0.1:18084
work=$(mktemp -d)

command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
cargo build --release --locked -q -p backstop-server -p backstop-benches

config() { # listen admin store-section
  printf '[server]\nlisten = "%s"\nadmin_listen = "%s"\n%s\n[[targets]]\nname = "mock"\nbase_url = "http://%s/v1"\n' \
    "$1" "$2" "$3" "$mock_addr"
}
config $on_addr 127.0.0.1:18092 "[store]
path = \"$work/data\"
max_running = 64
max_queued = 1000000" >"$work/on.toml"
config $off_addr 127.0.0.1:18093 "[store]
enabled = false" >"$work/off.toml"
config $same_addr 127.0.0.1:18094 "[store]
enabled = false" >"$work/same.toml"

target/release/bench-mock $mock_addr >/dev/null &
mock_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/on.toml" >/dev/null &
on_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/off.toml" >/dev/null &
off_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/same.toml" >/dev/null &
same_pid=$!
trap 'kill $mock_pid $on_pid $off_pid $same_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf http://$on_addr/healthz >/dev/null && curl -sf http://$off_addr/healthz >/dev/null &&
    curl -sf http://$same_addr/healthz >/dev/null &&
    curl -sf http://$mock_addr/v1/models >/dev/null && break
  sleep 0.1
done

stream='{"model":"gpt-4o-mini","stream":true,"input":"Tell me about failover routers in one short paragraph."}'
background='{"model":"gpt-4o-mini","background":true,"input":"Tell me about failover routers in one short paragraph."}'

# oha -> "p50_ms p99_ms req/s percent_200".
load() { # url body rate|max
  local url=$1 body=$2 rate=$3 q=()
  [ "$rate" = max ] || q=(-q "$rate" --latency-correction)
  oha --no-tui --output-format json -z "${secs}s" -c 32 "${q[@]}" -m POST \
    -H 'content-type: application/json' -d "$body" "$url" |
    python3 benches/oha_summary.py
}

# Each rate runs the Backstops in turn, $rounds times, the order rotated
# each round: the store's, the one without, and a second one without, whose
# difference from the first (A/A) is what this machine's noise alone makes.
# The table gives the median of each column, and of the differences.
# CPU time a process has used (user + system), in microseconds, from /proc:
# what each stream costs the machine, which unlike latency this shared
# machine's noise barely moves.
tick_us=$((1000000 / $(getconf CLK_TCK)))
cpu_us() { awk -v t="$tick_us" '{print ($14 + $15) * t}' "/proc/$1/stat"; }
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }
echo "| rate (req/s) | direct p50 / p99 (ms) | store off p50 / p99 (ms) | store on p50 / p99 (ms) | the store adds p50 / p99 (ms) | A/A: store off twice, p50 / p99 apart (ms) | achieved off / on (req/s) | Backstop's CPU a stream off / on (µs) |"
echo "|---|---|---|---|---|---|---|---|"
for rate in 500 1000 max; do
  read -r d50 d99 _ _ <<<"$(load http://$mock_addr/v1/responses "$stream" $rate)"
  cols=(off50 off99 offrps offcpu on50 on99 onrps oncpu same50 same99 samerps samecpu a50 a99 aa50 aa99)
  for c in "${cols[@]}"; do eval "$c=()"; done
  for round in $(seq "$rounds"); do
    order=(off on same)
    case $((round % 3)) in
      2) order=(on same off) ;;
      0) order=(same off on) ;;
    esac
    for which in "${order[@]}"; do
      addr_var=${which}_addr pid_var=${which}_pid
      before=$(cpu_us "${!pid_var}")
      read -r p50 p99 rps ok <<<"$(load "http://${!addr_var}/v1/responses" "$stream" $rate)"
      used=$(($(cpu_us "${!pid_var}") - before))
      [ "$ok" = 100.0 ] || echo "warning: $which at $rate: $ok% ok" >&2
      per=$(python3 -c "print(f'{$used / ($rps * $secs):.1f}')")
      eval "${which}50+=($p50); ${which}99+=($p99); ${which}rps+=($rps); ${which}cpu+=($per)"
    done
    a50+=("$(python3 -c "print(${on50[-1]} - ${off50[-1]})")")
    a99+=("$(python3 -c "print(${on99[-1]} - ${off99[-1]})")")
    aa50+=("$(python3 -c "print(abs(${same50[-1]} - ${off50[-1]}))")")
    aa99+=("$(python3 -c "print(abs(${same99[-1]} - ${off99[-1]}))")")
  done
  echo "| $rate | $d50 / $d99 | $(median "${off50[@]}") / $(median "${off99[@]}") | $(median "${on50[@]}") / $(median "${on99[@]}") | $(median "${a50[@]}") / $(median "${a99[@]}") | $(median "${aa50[@]}") / $(median "${aa99[@]}") | $(median "${offrps[@]}") / $(median "${onrps[@]}") | $(median "${offcpu[@]}") / $(median "${oncpu[@]}") |"
done
echo
read -r j50 j99 jrps jok <<<"$(load http://$on_addr/v1/responses "$background" max)"
echo "Background responses accepted: $jrps req/s (p50 $j50 ms, p99 $j99 ms, ok $jok%)"

# Let the jobs finish, then stop the store's Backstop so its log is checkpointed.
for _ in $(seq 600); do
  left=$(python3 - "$work/data/backstop.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(db.execute("SELECT COUNT(*) FROM responses WHERE status IN ('queued', 'in_progress')").fetchone()[0])
PY
)
  [ "$left" = 0 ] && break
  sleep 0.5
done
kill $on_pid; wait $on_pid 2>/dev/null || true
python3 - "$work/data" <<'PY'
import os, sqlite3, sys
path = sys.argv[1]
db = sqlite3.connect(os.path.join(path, "backstop.db"))
n = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
events = sum(len(lens.split()) for (lens,) in db.execute("SELECT lens FROM segments"))
pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
used = (pages - free) * size
files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
print(f"Stored: {n} responses, {events} events ({events / max(1, n):.1f} a response); "
      f"{used / max(1, n):.0f} bytes a response in the database, {files / max(1, n):.0f} with the files' slack "
      f"({files / 2**20:.1f} MiB on disk)")
PY
