"""Reads oha's JSON report on stdin; prints p50 and p99 (ms), req/s and success %."""

import json
import sys

report = json.load(sys.stdin)
p = report["latencyPercentiles"]
s = report["summary"]
codes = report.get("statusCodeDistribution", {})
ok = codes.get("200", 0) / max(1, sum(codes.values())) * 100
print(f"{p['p50'] * 1e3:.3f} {p['p99'] * 1e3:.3f} {s['requestsPerSec']:.0f} {ok:.1f}")
