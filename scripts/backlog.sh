#!/usr/bin/env bash
# The backlog bench.sh and profile-walsender.sh load, written once so both measure the same
# thing: gen.py's Observations as Aidbox stores them, and one client's 100-row transactions.
#   scripts/backlog.sh csv RESOURCES.jsonl    # Observations without id and meta, one per CSV row
#   scripts/backlog.sh sql ROWS N             # ROWS inserts into `observation`, cycling over
#                                             # the N bodies of table bench_src (n serial, body jsonb)
set -euo pipefail
case "${1:-}" in
csv)
  python3 - "$2" <<'PY'
import csv, json, sys
w = csv.writer(sys.stdout)
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("resourceType") == "Observation":
        r.pop("id", None); r.pop("meta", None)
        w.writerow([json.dumps(r, separators=(",", ":"))])
PY
  ;;
sql)
  python3 - "$2" "$3" <<'PY'
import sys
rows, n = int(sys.argv[1]), int(sys.argv[2])
for start in range(0, rows, 100):
    print("BEGIN;")
    print(f"INSERT INTO observation (id, txid, resource_type, status, resource) "
          f"SELECT 'o' || g, txid_current(), 'Observation', 'created', s.body "
          f"FROM generate_series({start}, {min(start + 100, rows) - 1}) g JOIN bench_src s ON s.n = g % {n} + 1;")
    print("COMMIT;")
PY
  ;;
*)
  echo "usage: scripts/backlog.sh csv RESOURCES.jsonl | sql ROWS N" >&2
  exit 2
  ;;
esac
