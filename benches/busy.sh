#!/usr/bin/env bash
# How long a client waits for a commit on a machine that other work keeps
# busy: background POSTs (each answered once its record is committed), one
# after another, through a Backstop with the store, while busy loops hold
# every core. The store's writer runs in idle time only while it keeps up;
# a flush must raise it, or the client waits for a core to idle.
#
#   benches/busy.sh [POSTS] [COMMAND...]    (default 6; COMMAND runs the
#                                             Backstop, e.g. setpriv
#                                             --bounding-set=-sys_nice)
#
# Prints each POST's total time in seconds (curl). Needs a release build
# (`cargo build --release --locked -p backstop-server -p backstop-benches`).
# Uses loopback ports 18481, 18482 and 18492.
set -euo pipefail
cd "$(dirname "$0")/.."
posts=${1:-6}
shift || true
work=$(mktemp -d)
target/release/bench-mock 127.0.0.1:18481 >/dev/null &
pids=($!)
printf '[server]\nlisten = "127.0.0.1:18482"\nadmin_listen = "127.0.0.1:18492"\n[store]\npath = "%s/data"\n[[targets]]\nname = "mock"\nbase_url = "http://127.0.0.1:18481/v1"\n' \
  "$work" >"$work/config.toml"
BACKSTOP_LOG=warn "$@" target/release/backstop --config "$work/config.toml" >/dev/null &
pids+=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  curl -sf http://127.0.0.1:18482/healthz >/dev/null && break
  sleep 0.1
done
for _ in $(seq $((2 * $(nproc)))); do
  (while :; do :; done) &
  pids+=($!)
done
sleep 1
for _ in $(seq "$posts"); do
  curl -s -o /dev/null -w '%{time_total} ' -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","background":true,"input":"hi"}' http://127.0.0.1:18482/v1/responses
done
echo
