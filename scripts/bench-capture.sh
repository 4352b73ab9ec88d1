#!/usr/bin/env bash
# Capture's CPU per row on recorded pgoutput bytes, without Postgres (benches/capture.rs):
# wall-clock ns and heap allocations per row for 1 and 20 topics, and callgrind's
# instruction count per row, which does not move with the machine's load.
#   scripts/bench-capture.sh                 # about 3 minutes (callgrind is most of it)
#   BENCH_CAPTURE_ROWS=100000 scripts/bench-capture.sh
#   BENCH_CAPTURE_CALLGRIND=0 scripts/bench-capture.sh   # skip the instruction counts
# Instructions per row are the difference of two callgrind runs (N and 3N rows) over 2N, so
# start-up (loading the FHIR model and search parameters) is not counted.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${BENCH_CAPTURE_ROWS:-50000}
res=$(scripts/workload.sh 3000 7 resources)
cargo build --release --quiet --bench capture
bin=$(cargo bench --bench capture --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "capture" and m.get("executable"):
        print(m["executable"])')
"$bin" "$res" "$rows"
if [ "${BENCH_CAPTURE_CALLGRIND:-1}" = 0 ]; then exit 0; fi
if ! command -v valgrind >/dev/null 2>&1; then
  echo "bench-capture.sh: installing valgrind with apt" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
tmp=$(mktemp -d /tmp/fhir-cdc-callgrind.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
n=${BENCH_CAPTURE_CALLGRIND_ROWS:-1000}
for topics in 1 20; do
  for k in 1 3; do
    CAPTURE_BENCH_TOPICS=$topics valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$topics.$k" \
      "$bin" "$res" $((n * k)) >/dev/null 2>"$tmp/log.$topics.$k"
  done
  ir() { awk '/^summary:/ {print $2}' "$1"; }
  echo "capture_bench_${topics}topic_instructions_per_row=$(( ($(ir "$tmp/cg.$topics.3") - $(ir "$tmp/cg.$topics.1")) / (2 * n) ))   # callgrind, $n vs $((3 * n)) rows"
done
