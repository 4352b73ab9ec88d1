#!/usr/bin/env bash
# Benchmarks: figures, not tests. One `name=value` line per figure, each beside the physical
# limit measured in the same run on the same machine; removes everything it started.
#   scripts/bench.sh                 # about 10 minutes on 2 cores with the defaults
#   BENCH_ROWS=20000 scripts/bench.sh
# Figures:
#   store_insert_rows_per_s      the store's own insert rate (1 client, 100-row transactions)
#   recvlogical_rows_per_s       pg_recvlogical draining a twin pgoutput slot of the same WAL
#   capture_1topic_rows_per_s    fhir-cdc capture turning that backlog into queued events
#   capture_20topics_rows_per_s  the same with 20 topics (mixed triggers, 3 canFilterBy each,
#                                5 with a fhirPathCriteria)
#   *_ratio                      capture / recvlogical
#   lag_*                        4 writers at full rate for LAG_SECS while capture runs
#   big_txn_*                    one 30,000-resource (~50 MB) transaction
#   *_peak_rss_mb                the capture process's peak RSS (VmHWM)
#   evaluate_*                   trigger + canFilterBy evaluation per core (cargo bench)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${BENCH_ROWS:-100000}
LAG_SECS=${BENCH_LAG_SECS:-60}

cargo build --release --quiet
bin=target/release/fhir-cdc
eval "$(scripts/pg-cluster.sh start)"
work=$(mktemp -d /tmp/fhir-cdc-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/pg-cluster.sh stop "$PGDATA_DIR"
  rm -rf "$work"
}
trap cleanup EXIT
psql() { "$PG_BIN/psql" -q -X -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }
now() { date +%s.%N; }
rate() { python3 -c "import sys; print(round(float(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2]))))" "$@"; }
ratio() { python3 -c "import sys; print(round(float(sys.argv[1]) / float(sys.argv[2]), 2))" "$@"; }
peak_rss_mb() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }

echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine=$(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo) GiB, $(uname -sr), $("$PG_BIN/postgres" --version)"
echo "rows=$ROWS"

# The store: Aidbox layout; ~1.5 KB Observations from gen.py (clinosim), cycled with new ids.
psql -d postgres -c "CREATE DATABASE fhir" -c "CREATE DATABASE q1" -c "CREATE DATABASE q20" -c "CREATE DATABASE qbig"
url="postgresql://postgres@127.0.0.1:$PGPORT"
"$bin" init-store --profile aidbox --url "$url/fhir" >/dev/null
res=$(scripts/workload.sh 3000 7 resources)
python3 - "$res" >"$work/obs.csv" <<'PY'
import csv, json, sys
w = csv.writer(sys.stdout)
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("resourceType") == "Observation":
        r.pop("id", None); r.pop("meta", None)
        w.writerow([json.dumps(r, separators=(",", ":"))])
PY
psql -d fhir -c "CREATE TABLE bench_src (n serial, body jsonb)" \
  -c "\\copy bench_src (body) FROM '$work/obs.csv' WITH (FORMAT csv)"
src_n=$(psql -d fhir -c "SELECT count(*) FROM bench_src")
echo "resource_bytes=$(psql -d fhir -c "SELECT round(avg(length(body::text))) FROM bench_src")"

# Configs: 1 topic, and 20 topics.
topics1='
[[topic]]
url = "http://bench/topic/obs"
resourceTrigger = [{ resource = "Observation", supportedInteraction = ["create", "update", "delete"] }]
canFilterBy = [{ resource = "Observation", filterParameter = "patient" }, { resource = "Observation", filterParameter = "code" }, { resource = "Observation", filterParameter = "value-quantity" }]
'
topics20="$topics1"
for i in $(seq 2 20); do
  case $((i % 4)) in
    0) trig='{ resource = "Observation", supportedInteraction = ["create"], fhirPathCriteria = "(%current.value as Quantity).value > 100" }' ;;
    1) trig='{ resource = "Observation", supportedInteraction = ["create", "update"], queryCriteria = { current = "status=final", resultForCreate = "test-passes" } }' ;;
    2) trig='{ resource = "Observation", supportedInteraction = ["create", "update", "delete"] }' ;;
    3) trig='{ resource = "Encounter", supportedInteraction = ["create", "update"] }' ;;
  esac
  [ "$i" -gt 17 ] && trig='{ resource = "Observation", supportedInteraction = ["create"], fhirPathCriteria = "%current.status = '"'"'final'"'"'" }'
  topics20="$topics20
[[topic]]
url = \"http://bench/topic/t$i\"
resourceTrigger = [$trig]
canFilterBy = [{ resource = \"Observation\", filterParameter = \"patient\" }, { resource = \"Observation\", filterParameter = \"code\" }, { resource = \"Observation\", filterParameter = \"date\" }]
"
done
config() { # name slot queue-db topics
  cat >"$work/$1.toml" <<TOML
[source]
url = "$url/fhir"
profile = "aidbox"
fhir_version = "R4"
slot = "$2"
publication = "fhir_cdc"

[queue]
url = "$url/$3"

[api]
listen = "127.0.0.1:0"
$4
TOML
}
config c1 s1 q1 "$topics1"
config c20 s20 q20 "$topics20"
config cbig sbig qbig "$topics1"

# Publication and slots exist before the backlog is written: start each capture once.
prime() { # config
  "$bin" capture --config "$work/$1.toml" 2>"$work/$1.prime.log" &
  local p=$!
  for _ in $(seq 1 300); do grep -qs "capture streaming" "$work/$1.prime.log" && break; sleep 0.1; done
  kill "$p"; wait "$p" 2>/dev/null || true
}
prime c1; prime c20; prime cbig
psql -d fhir -c "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')" >/dev/null

# The backlog: ROWS Observations in 100-row transactions, one client.
python3 - "$ROWS" "$src_n" >"$work/write.sql" <<'PY'
import sys
rows, n = int(sys.argv[1]), int(sys.argv[2])
for start in range(0, rows, 100):
    print("BEGIN;")
    print(f"INSERT INTO observation (id, txid, resource_type, status, resource) "
          f"SELECT 'o' || g, txid_current(), 'Observation', 'created', s.body "
          f"FROM generate_series({start}, {min(start + 100, rows) - 1}) g JOIN bench_src s ON s.n = g % {n} + 1;")
    print("COMMIT;")
PY
t0=$(now); psql -d fhir -f "$work/write.sql"; t1=$(now)
store_rate=$(rate "$ROWS" "$t0" "$t1")
echo "store_insert_rows_per_s=$store_rate"
# A marker commit: when it is queued, everything before it is.
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end\"}}')" >/dev/null
end_lsn=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")

t0=$(now)
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PGPORT" -U postgres -d fhir --slot recv --start \
  -o proto_version=1 -o publication_names=fhir_cdc --endpos "$end_lsn" -f /dev/null
t1=$(now)
recv_rate=$(rate "$ROWS" "$t0" "$t1")
echo "recvlogical_rows_per_s=$recv_rate"

drain() { # config queue-db label [markers]
  "$bin" capture --config "$work/$1.toml" 2>"$work/$1.log" &
  local p=$!; pids+=("$p")
  local t0; t0=$(now)
  until [ "$(psql -d "$2" -c "SELECT count(*) FROM fhir_cdc.event WHERE resource_id = 'bench-end'")" -ge "${4:-1}" ]; do sleep 0.05; done
  local t1; t1=$(now)
  echo "$3_rows_per_s=$(rate "$ROWS" "$t0" "$t1")"
  echo "$3_ratio=$(ratio "$(rate "$ROWS" "$t0" "$t1")" "$recv_rate")"
  echo "$3_peak_rss_mb=$(peak_rss_mb "$p")"
  kill "$p"; wait "$p" 2>/dev/null || true
}
drain c1 q1 capture_1topic
drain c20 q20 capture_20topics

# One 30,000-resource transaction (~50 MB), drained by capture alone.
psql -d fhir -c "BEGIN; INSERT INTO observation (id, txid, resource_type, status, resource)
  SELECT 'big' || g, txid_current(), 'Observation', 'created', s.body || jsonb_build_object('note', jsonb_build_array(jsonb_build_object('text', repeat(md5(g::text), 10))))
  FROM generate_series(1, 30000) g JOIN bench_src s ON s.n = g % $src_n + 1; COMMIT;"
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end2\"}}')" >/dev/null
ROWS_SAVED=$ROWS; ROWS=$((ROWS + 30000 + 2))
drain cbig qbig big_txn 2
ROWS=$ROWS_SAVED

# Lag under load: 4 writers at full rate for LAG_SECS while capture (1 topic) runs.
"$bin" capture --config "$work/c1.toml" 2>"$work/c1.lag.log" &
cap=$!; pids+=("$cap")
for _ in $(seq 1 300); do grep -qs "capture streaming" "$work/c1.lag.log" && break; sleep 0.1; done
until [ "$(psql -d q1 -c "SELECT count(*) FROM fhir_cdc.event WHERE resource_id = 'bench-end'")" -gt 1 ]; do sleep 0.2; done
writers=()
for w in 1 2 3 4; do
  ( end=$(( $(date +%s) + LAG_SECS )); k=0
    while [ "$(date +%s)" -lt "$end" ]; do
      echo "BEGIN; INSERT INTO observation (id, txid, resource_type, status, resource) SELECT 'w${w}-${k}-' || g, txid_current(), 'Observation', 'created', s.body FROM generate_series(1, 100) g JOIN bench_src s ON s.n = g % $src_n + 1; COMMIT;"
      k=$((k + 1))
    done | psql -d fhir >/dev/null ) &
  writers+=($!)
done
max_bytes=0; max_secs=0
t0=$(now)
while kill -0 "${writers[0]}" 2>/dev/null; do
  b=$(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'")
  [ "$b" -gt "$max_bytes" ] && max_bytes=$b
  sleep 1
done
wait "${writers[@]}"
t1=$(now)
written=$(psql -d fhir -c "SELECT count(*) FROM observation WHERE id LIKE 'w%'")
end_bytes=$(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'")
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end3\"}}')" >/dev/null
t2=$(now)
# Time to catch up after the load stops, waited for at most CATCHUP_SECS.
deadline=$(( $(date +%s) + ${BENCH_CATCHUP_SECS:-120} ))
caught=no
while [ "$(date +%s)" -lt "$deadline" ]; do
  if [ "$(psql -d q1 -c "SELECT count(*) FROM fhir_cdc.event WHERE resource_id = 'bench-end'")" -gt 2 ]; then caught=yes; break; fi
  sleep 0.05
done
t3=$(now)
echo "lag_store_rows_per_s=$(rate "$written" "$t0" "$t1")"
echo "lag_max_bytes=$max_bytes"
echo "lag_end_bytes=$end_bytes"
if [ "$caught" = yes ]; then
  echo "lag_end_secs=$(python3 -c "print(round($t3 - $t2, 1))")"
else
  echo "lag_end_secs=>${BENCH_CATCHUP_SECS:-120} (not caught up; $(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'") bytes behind)"
fi
echo "lag_peak_rss_mb=$(peak_rss_mb "$cap")"
kill "$cap"; wait "$cap" 2>/dev/null || true

# Evaluation per core, beside the JSON parse rate of the same resources.
cargo bench --quiet --bench evaluate -- "$res" 2>/dev/null | sed "s/^/evaluate: /"
