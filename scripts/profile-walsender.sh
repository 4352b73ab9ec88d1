#!/usr/bin/env bash
# Where Postgres's walsender spends its time while pg_recvlogical (pgoutput, proto v1, no
# fhir-cdc at all) drains a backlog like bench.sh's: the part of a drain no client can make
# cheaper. Not a test; about 2 minutes. Needs `perf` and a release build.
#   scripts/profile-walsender.sh                 # 100,000 rows, 4 s sampled, /tmp/walsender.perf
#   ROWS=200000 SECS=8 OUT=/tmp/w.perf scripts/profile-walsender.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "profile-walsender.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }
ROWS=${ROWS:-100000}
eval "$(scripts/pg-cluster.sh start)"
trap 'scripts/pg-cluster.sh stop "$PGDATA_DIR" >/dev/null 2>&1' EXIT
export PGHOST=127.0.0.1 PGPORT PGUSER=postgres
psql() { "$PG_BIN/psql" -q -X -A -t -v ON_ERROR_STOP=1 "$@"; }
bin=target/release/fhir-cdc
psql -d postgres -c "CREATE DATABASE fhir"
"$bin" init-store --profile aidbox --url "postgresql://postgres@127.0.0.1:$PGPORT/fhir" >/dev/null
res=$(scripts/workload.sh 3000 7 resources)
work=$(mktemp -d)
trap 'scripts/pg-cluster.sh stop "$PGDATA_DIR" >/dev/null 2>&1; rm -rf "$work"' EXIT
scripts/backlog.sh csv "$res" >"$work/obs.csv"
psql -d fhir -c "CREATE TABLE bench_src (n serial, body jsonb)" -c "\\copy bench_src (body) FROM '$work/obs.csv' WITH (FORMAT csv)"
n=$(psql -d fhir -c "SELECT count(*) FROM bench_src")
psql -d fhir -c "CREATE PUBLICATION fhir_cdc FOR TABLE observation" 2>/dev/null || true
psql -d fhir -c "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')" >/dev/null
scripts/backlog.sh sql "$ROWS" "$n" >"$work/write.sql"
now() { date +%s.%N; }
t0=$(now); psql -d fhir -f "$work/write.sql"; t1=$(now)
echo "store_insert_rows_per_s=$(python3 -c "print(round($ROWS/($t1-$t0)))")"
end=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
t0=$(now)
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PGPORT" -U postgres -d fhir --slot recv --start \
  -o proto_version=1 -o publication_names=fhir_cdc --endpos "$end" -f /dev/null &
rp=$!
ws=""
for _ in $(seq 1 100); do ws=$(psql -d fhir -c "SELECT pid FROM pg_stat_replication LIMIT 1"); [ -n "$ws" ] && break; sleep 0.05; done
perf record -F 999 -g -p "$ws" -o "${OUT:-/tmp/walsender.perf}" -- sleep "${SECS:-4}" >/dev/null 2>&1 || true
wait $rp
t1=$(now)
echo "recvlogical_rows_per_s=$(python3 -c "print(round($ROWS/($t1-$t0)))")"
perf report -i "${OUT:-/tmp/walsender.perf}" --no-children --sort symbol --stdio -g none 2>/dev/null \
  | grep "%" | sed -n 1,20p
