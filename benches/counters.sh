#!/usr/bin/env bash
# Redis or PostgreSQL for the replicas' shared rate budgets (issue 15: Redis
# only where it clearly beats PostgreSQL for hot counters):
#
# 1. a counter bumped once per request, as a shared budget kept in Redis
#    would be: Redis INCR (redis-benchmark) beside PostgreSQL's UPDATE ...
#    RETURNING of one row (pgbench), 8 clients each;
# 2. what Backstop does instead: each replica syncs its budgets every
#    250 ms (bench-replicas sync), here back to back with 2 and 8 replicas,
#    which is the most the database would take.
#
#   benches/counters.sh [SECONDS]   (default 10)
#
# Needs redis-server (Debian) and PostgreSQL (scripts/postgres). Both keep
# nothing on disk here (Redis without persistence, PostgreSQL with
# fsync=off), so neither pays for the disk. Prints a markdown table for
# benches/README.md. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
work=$(mktemp -d)
pg=$(mktemp -d) # its own: the server's user must reach it
redis_port=18391

command -v redis-server >/dev/null || { echo "redis-server is needed (Debian redis-server)" >&2; exit 1; }
cargo build --release --locked -q -p backstop-benches --bin bench-replicas

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  scripts/postgres stop "$pg" || true
  rm -rf "$work"
}
trap cleanup EXIT
BACKSTOP_TEST_POSTGRES=$(scripts/postgres start "$pg")
export BACKSTOP_TEST_POSTGRES
redis-server --bind 127.0.0.1 --port $redis_port --save '' --appendonly no >/dev/null &
pids+=($!)
for _ in $(seq 50); do redis-cli -p $redis_port ping >/dev/null 2>&1 && break; sleep 0.1; done

echo "| counter | per second | p50 (ms) | p99 (ms) |"
echo "|---|---|---|---|"
redis-benchmark -h 127.0.0.1 -p $redis_port -c 8 -n $((secs * 20000)) -t incr --csv |
  python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
v = dict(zip(rows[0], rows[1]))
rps, p50, p99 = (float(v[k]) for k in ("rps", "p50_latency_ms", "p99_latency_ms"))
print(f"| Redis INCR, one per request, 8 clients | {rps:.0f} | {p50:.2f} | {p99:.2f} |")'

psql "$BACKSTOP_TEST_POSTGRES" -qc "CREATE TABLE counters (name text PRIMARY KEY, used bigint NOT NULL); INSERT INTO counters VALUES ('up#0', 0)"
echo "UPDATE counters SET used = used + 1 WHERE name = 'up#0' RETURNING used;" >"$work/incr.sql"
(cd "$work" && pgbench -n -c 8 -j 2 -T "$secs" -f incr.sql -l --log-prefix=txlog "$BACKSTOP_TEST_POSTGRES" >/dev/null 2>&1)
cat "$work"/txlog.* | python3 -c "
import sys
us = sorted(int(l.split()[2]) for l in sys.stdin)
at = lambda p: us[int((len(us) - 1) * p)] / 1000
print(f'| PostgreSQL UPDATE ... RETURNING, one per request, 8 clients | {len(us) / $secs:.0f} | {at(0.5):.2f} | {at(0.99):.2f} |')"

for replicas in 2 8; do
  target/release/bench-replicas sync "$secs" $replicas
done
