#!/usr/bin/env bash
# What keeping generations costs: Responses streams through two Backstops in
# front of the same mock upstream, one with the store (every stream kept and
# resumable, the default) and one with it turned off, side by side at fixed
# rates, with oha; then background jobs accepted per second, and bytes on
# disk per stored response.
#
#   benches/store.sh [SECONDS_PER_STEP]      (default 10)
#
# Needs oha (`cargo install oha --locked`). Prints markdown tables for
# benches/README.md. Everything runs on loopback. bench-store measures the
# time to resume a stream.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
mock_addr=127.0.0.1:18081
on_addr=127.0.0.1:18082
off_addr=127.0.0.1:18083
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

target/release/bench-mock $mock_addr >/dev/null &
mock_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/on.toml" >/dev/null &
on_pid=$!
BACKSTOP_LOG=warn target/release/backstop --config "$work/off.toml" >/dev/null &
off_pid=$!
trap 'kill $mock_pid $on_pid $off_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf http://$on_addr/healthz >/dev/null && curl -sf http://$off_addr/healthz >/dev/null &&
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

echo "| rate (req/s) | direct p50 (ms) | direct p99 (ms) | store off p50 (ms) | store off p99 (ms) | store on p50 (ms) | store on p99 (ms) | store adds p50 / p99 (ms) | achieved off / on (req/s) |"
echo "|---|---|---|---|---|---|---|---|---|"
for rate in 500 1000 max; do
  read -r d50 d99 drps dok <<<"$(load http://$mock_addr/v1/responses "$stream" $rate)"
  read -r f50 f99 frps fok <<<"$(load http://$off_addr/v1/responses "$stream" $rate)"
  read -r n50 n99 nrps nok <<<"$(load http://$on_addr/v1/responses "$stream" $rate)"
  added=$(python3 -c "print(f'{$n50-$f50:.3f} / {$n99-$f99:.3f}')")
  echo "| $rate | $d50 | $d99 | $f50 | $f99 | $n50 | $n99 | $added | $frps / $nrps (ok $fok% / $nok%) |"
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
n, events = db.execute("SELECT COUNT(*), (SELECT COUNT(*) FROM events) FROM responses").fetchone()
pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
used = (pages - free) * size
files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
print(f"Stored: {n} responses, {events} events ({events / max(1, n):.1f} a response); "
      f"{used / max(1, n):.0f} bytes a response in the database, {files / max(1, n):.0f} with the files' slack "
      f"({files / 2**20:.1f} MiB on disk)")
PY
