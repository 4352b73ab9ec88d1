#!/usr/bin/env bash
# Benchmarks: figures, not tests. One `name=value` line per figure, each beside the physical
# limit measured in the same run on the same machine; removes everything it started.
#   scripts/bench.sh                 # about 10 minutes on 2 cores with the defaults
#   BENCH_ROWS=20000 scripts/bench.sh
#   BENCH_ONLY=capture scripts/bench.sh           # the capture figures only (about 2 minutes)
#   BENCH_ONLY=lag scripts/bench.sh               # the capture figures, the big transaction and the lag case
#   BENCH_ONLY=e2e scripts/bench.sh               # end to end and fan-out only
#   BENCH_ONLY=instructions BENCH_ROWS=20000 scripts/bench.sh   # capture's instructions per row (callgrind;
#                                    # BENCH_CALLGRIND_KEEP=dir keeps the profiles)
#   BENCH_ONLY=brokers scripts/bench.sh           # broker destinations only (BENCH_BROKER_KINDS=nats: JetStream only)
#   BENCH_DELIVERY_EXTRA='workers = 256' ...       # extra [delivery] settings for `run`
#   BENCH_PERF=/tmp/cap.perf BENCH_ONLY=capture scripts/bench.sh   (BENCH_PERF_ALL=1: the whole machine)
#                                    # also records a perf profile of the 1-topic drain
#                                    # (BENCH_PERF_CASE=capture_20topics: of the 20-topic one;
#                                    # fanout_1|fanout_100|fanout_10000|fanout_100x100 with
#                                    # BENCH_ONLY=e2e: of
#                                    # the daemon during that fan-out case;
#                                    # broker_nats_1|broker_nats_10|broker_amqp_1|broker_amqp_10
#                                    # with BENCH_ONLY=brokers: of the deliver process)
# Figures:
#   store_insert_rows_per_s      the store's own insert rate (1 client, 100-row transactions)
#   recvlogical_rows_per_s       pg_recvlogical draining a twin pgoutput slot of the same WAL
#   capture_1topic_rows_per_s    fhir-cdc capture turning that backlog into queued events
#   capture_20topics_rows_per_s  the same with 20 topics (mixed triggers, 3 canFilterBy each,
#                                5 with a fhirPathCriteria)
#   *_ratio                      capture / recvlogical
#   *_store_ratio                capture (or recvlogical) / store_insert_rows_per_s
#   *_socket_*                   the same over the server's Unix socket (source URL ?host=<dir>)
#   lag_*                        4 writers at full rate for LAG_SECS while capture runs; the
#                                slot lag at the end read from Postgres and from /metrics;
#                                lag_recvlogical_*: the same load with pg_recvlogical reading
#                                instead (the limit: Postgres's own decoding);
#                                lag_load_* / lag_recvlogical_load_*: percent of one core the
#                                machine, the daemon, the walsender and the queue backend used
#                                while the writers ran; *_walsender_running|waiting_for_cpu|
#                                asleep_pct: how the walsender spent the load (schedstat;
#                                asleep while behind = blocked on a full socket, its client
#                                not reading), lag_load_daemon_*: the same for the daemon
#   big_txn_*                    one 30,000-resource (~50 MB) transaction
#   *_peak_rss_mb                the capture process's peak RSS (VmHWM)
#   *_daemon_cpu_us_per_row      capture's CPU for the drain from the moment it streams (its
#                                start-up, *_daemon_startup_cpu_s, apart), per row
#   *_daemon_page_faults_per_row the same for its minor page faults (fresh memory the kernel
#                                zeroes: the allocator handing pages back and taking them again)
#   *_daemon_syscalls_per_row, *_daemon_context_switches_per_row   perf stat of the daemon in
#                                the drain (start-up included), per row
#   *_rows_per_queue_commit      rows per queue transaction in the drain (its checkpoint writes)
#   *_walsender_cpu_us_per_row   Postgres's CPU in the same drain, per row: the walsender
#   *_queue_backend_cpu_us_per_row  decoding the slot, the queue database's backends writing
#   *_other_postgres_cpu_us_per_row  the events, and the rest (WAL writer, checkpointer, …)
#   *_daemon|walsender_running|waiting_for_cpu|asleep_pct  how each spent the drain
#                                (schedstat); waiting for a core = runnable while the others
#                                held both
#   *_all_cpu_us_per_row         the daemon's and Postgres's CPU per drained row
#   *_cores_for_1_2x_store       that CPU at 1.2x store_insert_rows_per_s, in cores (issue
#                                19's target): over about 1.8 of 2 it is out of reach that run;
#                                *_walsender_cores_for_1_2x_store: the walsender's part, which
#                                is one process: over 1, no client can drain at 1.2x
#   e2e_<rate>_*                 `fhir-cdc run` with 100 subscriptions (one patient each): single-row
#                                writes at 500 and 2,000/s for E2E_SECS; store commit → webhook
#                                arrival p50/p95/p99/max (ms), and the slot lag at the end
#   fanout_<n>_*                 notifications/s with 1, 100 and 10,000 subscriptions that all
#                                match, from the store commit of the first write to the last
#                                arrival; the longest commit → arrival wait (max_ms), and the
#                                first arrival after the first commit (first_arrival_ms);
#                                fanout_100x100: 100 subscriptions with maxCount 100
#   *_daemon_cpu_us_per_notification   the daemon's CPU (capture and sends) per notification
#   *_queue_rows_per_event_delivered   rows the queue inserted, updated and deleted (schema
#                                fhir_cdc, pg_stat_user_tables) per event delivered: the event
#                                rows apart from the delivery bookkeeping
#   *_wal_bytes_per_event_delivered    the cluster's WAL per event delivered and per store
#                                write, beside wal_bytes_per_write_without_subscriptions (the
#                                same writes with no subscription)
#   http_plain_requests_per_s    wrk POSTing a notification-sized body to the same receiver
#   evaluate_*                   trigger + canFilterBy evaluation per core (cargo bench)
#   broker_<nats|amqp>_<n>_*     [[destination]]s: notifications/s a `deliver` process publishes
#                                into JetStream and RabbitMQ from a queued backlog, with 1 and
#                                10 destinations (every event to each), and its CPU per
#                                notification (startup included), beside
#                                broker_<kind>_plain_acked_publishes_per_s: one publisher
#                                sending the same size one at a time, each waiting for its
#                                ack/confirm, to the same server in the same run
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${BENCH_ROWS:-100000}
LAG_SECS=${BENCH_LAG_SECS:-60}

if ! command -v wrk >/dev/null 2>&1; then
  echo "bench.sh: installing wrk with apt" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --quiet
cargo build --release --quiet --example bench_receiver
# BENCH_BIN: another build of the daemon, e.g. one with frame pointers for BENCH_PERF's call
# graphs (RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=/tmp/fp cargo build --release).
bin=${BENCH_BIN:-target/release/fhir-cdc}
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
# queued MARK: SQL, for a queue database, that is true once its newest event is a `bench-end`
# marker committed after WAL position MARK (taken just before the marker was written). It reads one
# row by the primary key: counting markers over the whole event table was a sequential scan
# per poll (1.6–2.7 million rows by the end of the lag case), which took CPU from what it timed.
queued() { echo "SELECT coalesce((SELECT resource_id = 'bench-end' AND commit_lsn >= '$1' FROM fhir_cdc.event ORDER BY id DESC LIMIT 1), false)"; }
# wait_for DB SQL [SECONDS]: runs SQL (true/false) every 50 ms on one connection until it
# is true (status 0), or until SECONDS have passed (status 1). One session for the whole
# wait: a psql started per poll cost the machine a process and a backend 20 times a second,
# which pg_recvlogical's figures, measured beside these, do not pay.
wait_for() {
  local until=$(( $(date +%s) + ${3:-100000} )) line ok=1
  coproc WAITER { "$PG_BIN/psql" -q -X -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$1" 2>&1; }
  while [ "$(date +%s)" -lt "$until" ]; do
    echo "$2;" >&"${WAITER[1]}"
    IFS= read -r line <&"${WAITER[0]}" || break
    if [ "$line" = t ]; then ok=0; break; fi
    sleep 0.05
  done
  exec {WAITER[1]}>&-
  wait "$WAITER_PID" 2>/dev/null || true
  return $ok
}
# Queue transactions in database $1 so far: each writes the checkpoint once (statistics,
# flushed within a second).
xacts() { psql -d "$1" -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables WHERE schemaname = 'fhir_cdc' AND relname = 'checkpoint'"; }
rate() { python3 -c "import sys; print(round(float(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2]))))" "$@"; }
ratio() { python3 -c "import sys; print(round(float(sys.argv[1]) / float(sys.argv[2]), 2))" "$@"; }
peak_rss_mb() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }
# CPU seconds a process used so far (user + system), and the machine's busy/total jiffies.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{print ($14 + $15) / hz}' "/proc/$1/stat"; }
# Minor page faults a process took so far: the kernel zeroing fresh pages for its allocator.
minflt() { awk '{print $10}' "/proc/$1/stat"; }
machine_jiffies() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
# Scheduler time of pid $1 and its threads so far (/proc/…/schedstat): ns on a core, ns
# runnable but waiting for one.
sched() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{r += $1; w += $2} END {print r + 0, w + 0}'; }
# Of SECONDS between two sched snapshots, percent on a core, waiting for one, and asleep (a
# walsender asleep while its slot is behind is blocked on a full socket: its client is not
# reading).
sched_pct() { # label before after seconds
  python3 -c "import sys; l, t = sys.argv[1], float(sys.argv[4]); r0, w0 = map(int, sys.argv[2].split()); r1, w1 = map(int, sys.argv[3].split()); r, w = (r1 - r0) / 1e9 / t, (w1 - w0) / 1e9 / t; print(f'{l}_running_pct={100 * r:.0f} {l}_waiting_for_cpu_pct={100 * w:.0f} {l}_asleep_pct={100 * max(0.0, 1 - r - w):.0f}')" "$@"
}
slot_pid() { psql -d fhir -c "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '$1'"; }
# The cluster's processes: "pid cpu_seconds title" for each child of the postmaster.
pg_procs() {
  python3 - "$(head -1 "$PGDATA_DIR/data/postmaster.pid")" "$(getconf CLK_TCK)" <<'PY'
import os, sys
master, hz = sys.argv[1], int(sys.argv[2])
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        title = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
    except OSError:
        continue
    if stat[1] == master:
        print(pid, (int(stat[11]) + int(stat[12])) / hz, title)
PY
}
# Postgres's CPU between two pg_procs snapshots, by process: the walsender, the queue
# database's backends (the queue writes) and the rest (WAL writer, checkpointer, …).
# pg_cpu_per_row: µs per row of a drain; pg_cpu_pct: percent of one core over SECONDS (where
# the CPU went during a timed load).
pg_cpu() { # per_row|pct before after queue-db rows|seconds label
  python3 - "$@" <<'PY'
import sys
mode, before, after, qdb, n, label = sys.argv[1:]
def load(path):
    out = {}
    for line in open(path):
        pid, cpu, title = line.rstrip("\n").split(" ", 2)
        out[pid] = (float(cpu), title)
    return out
b, a = load(before), load(after)
sums = {"walsender": 0.0, "queue_backend": 0.0, "other_postgres": 0.0}
for pid, (cpu, title) in a.items():
    d = cpu - b.get(pid, (0.0, ""))[0]
    words = title.split()
    kind = "walsender" if "walsender" in words else "queue_backend" if qdb in words else "other_postgres"
    sums[kind] += d
if mode == "per_row":
    for kind, s in sums.items():
        print(f"{label}_{kind}_cpu_us_per_row={round(1e6 * s / int(n), 1)}")
else:
    print(" ".join(f"{label}_{k}_cpu_pct={round(100 * s / float(n))}" for k, s in sums.items()))
PY
}
pg_cpu_per_row() { pg_cpu per_row "$@"; } # before after queue-db rows label
pg_cpu_pct() { pg_cpu pct "$@"; }         # before after queue-db seconds label
busy_pct() { python3 -c "import sys; b0, t0, b1, t1 = map(float, sys.argv[1:]); print(round(100 * (b1 - b0) / (t1 - t0)))" $1 $2; }

echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine=$(nproc) cores, $(awk '/MemTotal/ {print int($2/1048576)}' /proc/meminfo) GiB, $(uname -sr), $("$PG_BIN/postgres" --version)"
echo "rows=$ROWS"

# The store: Aidbox layout; ~1.5 KB Observations from gen.py (clinosim), cycled with new ids.
psql -d postgres -c "CREATE DATABASE fhir" -c "CREATE DATABASE q1" -c "CREATE DATABASE q20" -c "CREATE DATABASE qbig" \
  -c "CREATE DATABASE q1u"
url="postgresql://postgres@127.0.0.1:$PGPORT"
# The same server through its Unix socket, as a daemon on the database's machine reaches it.
sock=$(psql -d postgres -c "SHOW unix_socket_directories" | cut -d, -f1)
sock_url() { echo "postgresql:///$1?host=$sock&port=$PGPORT&user=postgres"; }
"$bin" init-store --profile aidbox --url "$url/fhir" >/dev/null
res=$(scripts/workload.sh 3000 7 resources)
scripts/backlog.sh csv "$res" >"$work/obs.csv"
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
config() { # name slot queue-db topics [socket]
  local src="$url/fhir" queue="$url/$3"
  if [ -n "${5:-}" ]; then src=$(sock_url fhir); queue=$(sock_url "$3"); fi
  cat >"$work/$1.toml" <<TOML
[source]
url = "$src"
profile = "aidbox"
fhir_version = "R4"
slot = "$2"
publication = "fhir_cdc"

[queue]
url = "$queue"

[api]
listen = "127.0.0.1:0"
$4
TOML
}
config c1 s1 q1 "$topics1"
config c20 s20 q20 "$topics20"
config cbig sbig qbig "$topics1"
config c1u s1u q1u "$topics1" socket

# Publication and slots exist before the backlog is written: start each capture once.
prime() { # config
  "$bin" capture --config "$work/$1.toml" 2>"$work/$1.prime.log" &
  local p=$!
  for _ in $(seq 1 300); do grep -qs "capture streaming" "$work/$1.prime.log" && break; sleep 0.1; done
  sleep 0.5
  kill "$p"; wait "$p" 2>/dev/null || true
}
# The backlog's SQL (scripts/backlog.sh, shared with profile-walsender.sh).
backlog_sql() { scripts/backlog.sh sql "$ROWS" "$src_n"; }
prime c1; prime c20; prime cbig; prime c1u

# BENCH_ONLY=instructions: the daemon's own instructions per drained row, under callgrind
# (the whole process: the replication client, decoding, matching, the queue writer and the
# runtime; not the kernel). It does not move with the machine's load, as CPU time does.
# Start-up with nothing to drain is measured the same way and subtracted.
if [ "${BENCH_ONLY:-}" = instructions ]; then
  if ! command -v valgrind >/dev/null 2>&1; then
    echo "bench.sh: installing valgrind with apt" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  fi
  ir() { awk '/^summary:/ {print $2}' "$1"; }
  cg_run() { # config out-file [queue-db mark]: under callgrind until streaming (or queued)
    valgrind --tool=callgrind --callgrind-out-file="$2" "$bin" capture --config "$work/$1.toml" 2>"$2.log" &
    local p=$!
    if [ -n "${3:-}" ]; then
      wait_for "$3" "$(queued "$4")"
    else
      until grep -qs "capture streaming" "$2.log"; do sleep 0.2; done
      sleep 1
    fi
    kill "$p"; wait "$p" 2>/dev/null || true
  }
  cg_run c1 "$work/start1.cg"; cg_run c20 "$work/start20.cg"
  backlog_sql | psql -d fhir -f -
  mark=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
  psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end\"}}')" >/dev/null
  cg_run c1 "$work/drain1.cg" q1 "$mark"; cg_run c20 "$work/drain20.cg" q20 "$mark"
  # BENCH_CALLGRIND_KEEP=dir: keep the callgrind files there (callgrind_annotate reads them).
  if [ -n "${BENCH_CALLGRIND_KEEP:-}" ]; then cp "$work"/*.cg "$BENCH_CALLGRIND_KEEP"/; fi
  for t in 1 20; do
    echo "capture_${t}topic_daemon_instructions_per_row=$(( ($(ir "$work/drain$t.cg") - $(ir "$work/start$t.cg")) / ROWS ))   # callgrind, whole process, (drain - start-up) / rows"
  done
  exit 0
fi
psql -d fhir -c "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')" >/dev/null
psql -d fhir -c "SELECT pg_create_logical_replication_slot('recvu', 'pgoutput')" >/dev/null

if [ "${BENCH_ONLY:-}" != e2e ] && [ "${BENCH_ONLY:-}" != brokers ]; then
# The backlog: ROWS Observations in 100-row transactions, one client.
backlog_sql >"$work/write.sql"
t0=$(now); psql -d fhir -f "$work/write.sql"; t1=$(now)
store_rate=$(rate "$ROWS" "$t0" "$t1")
echo "store_insert_rows_per_s=$store_rate"
# A marker commit: when it is queued, everything before it is.
mark=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end\"}}')" >/dev/null
end_lsn=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")

t0=$(now)
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PGPORT" -U postgres -d fhir --slot recv --start \
  -o proto_version=1 -o publication_names=fhir_cdc --endpos "$end_lsn" -f /dev/null
t1=$(now)
recv_rate=$(rate "$ROWS" "$t0" "$t1")
echo "recvlogical_rows_per_s=$recv_rate"
echo "recvlogical_store_ratio=$(ratio "$recv_rate" "$store_rate")"

drain() { # config queue-db label mark (the WAL position before the last marker)
  "$bin" capture --config "$work/$1.toml" 2>"$work/$1.log" &
  local p=$!; pids+=("$p")
  local t0; t0=$(now)
  local j0; j0=$(machine_jiffies)
  pg_procs >"$work/$3.pg0"
  local x0; x0=$(xacts "$2")
  # Syscalls and context switches of the daemon (start-up included), where perf can count.
  local pstat=
  if command -v perf >/dev/null 2>&1; then
    perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$p" -o "$work/$3.stat" 2>/dev/null & pstat=$!
  fi
  local perf=
  # The daemon's CPU and page faults once it streams: start-up (connect, the FHIR model,
  # topics, catalog) is not drain work. Taken in this run, not from the priming one, whose
  # start-up also created the queue schema, publication and slot (0.01-0.14 s of CPU
  # there, up to 1.4 us per row of error).
  for _ in $(seq 1 3000); do grep -qs "capture streaming" "$work/$1.log" && break; sleep 0.01; done
  local startup; startup=$(cpu_s "$p")
  local flt0; flt0=$(minflt "$p")
  if [ -n "${BENCH_PERF:-}" ] && [ "$3" = "${BENCH_PERF_CASE:-capture_1topic}" ]; then
    perf record -q -F 999 -g $( [ -n "${BENCH_PERF_ALL:-}" ] && echo -a || echo -p "$p") -o "$BENCH_PERF" 2>/dev/null & perf=$!
  fi
  wait_for "$2" "$(queued "$4")"
  local t1; t1=$(now)
  local j1; j1=$(machine_jiffies)
  pg_procs >"$work/$3.pg1"
  if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi
  echo "$3_rows_per_s=$(rate "$ROWS" "$t0" "$t1")"
  echo "$3_ratio=$(ratio "$(rate "$ROWS" "$t0" "$t1")" "$recv_rate")"
  echo "$3_store_ratio=$(ratio "$(rate "$ROWS" "$t0" "$t1")" "$store_rate")   # / store_insert_rows_per_s"
  echo "$3_peak_rss_mb=$(peak_rss_mb "$p")"
  # Where the time went: the daemon's CPU, and how busy both cores were (Postgres's
  # walsender and queue backend use the rest).
  local cpu; cpu=$(cpu_s "$p")
  echo "$3_daemon_page_faults_per_row=$(python3 -c "import sys; print(round((int(sys.argv[1]) - int(sys.argv[2])) / int(sys.argv[3]), 2))" "$(minflt "$p")" "$flt0" "$ROWS")   # after start-up, per row"
  if [ -n "$pstat" ]; then
    kill -INT "$pstat"; wait "$pstat" 2>/dev/null || true
    python3 - "$ROWS" "$3" "$work/$3.stat" <<'PY'
import sys
rows, label, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
names = {"raw_syscalls:sys_enter": "syscalls", "context-switches": "context_switches"}
for line in open(path):
    f = line.strip().split(",")
    if len(f) > 2 and f[2] in names and f[0].isdigit():
        print(f"{label}_daemon_{names[f[2]]}_per_row={round(int(f[0]) / rows, 3)}")
PY
  fi
  echo "$3_daemon_cpu_s=$cpu"
  echo "$3_daemon_startup_cpu_s=$startup      # until it logged \"capture streaming\""
  local daemon_us
  daemon_us=$(python3 -c "import sys; print(round(1e6 * (float(sys.argv[1]) - float(sys.argv[2])) / int(sys.argv[3]), 1))" "$cpu" "$startup" "$ROWS")
  echo "$3_daemon_cpu_us_per_row=$daemon_us   # after start-up, per row"
  echo "$3_machine_busy_pct=$(busy_pct "$j0" "$j1")"
  # How the daemon and the walsender spent the drain (schedstat over their lives, which are
  # the drain: the walsender starts when the daemon connects). A process "waiting for a
  # core" was runnable while the other processes of the pipeline held both.
  local secs; secs=$(python3 -c "print($t1 - $t0)")
  local ws; ws=$(slot_pid "$(awk -F'"' '/^slot/ {print $2}' "$work/$1.toml")")
  sched_pct "$3_daemon" "0 0" "$(sched "$p")" "$secs"
  if [ -n "$ws" ]; then sched_pct "$3_walsender" "0 0" "$(sched "$ws")" "$secs"; fi
  local pg; pg=$(pg_cpu_per_row "$work/$3.pg0" "$work/$3.pg1" "$2" "$ROWS" "$3")
  echo "$pg"
  # The CPU budget of the issue's 1.2x the store's inserts: all of a row's CPU (the daemon,
  # the walsender, the queue backend and the rest of Postgres) at 1.2x store_insert_rows_per_s,
  # in cores. Over about 1.8 of this machine's 2 the target is out of reach in this run
  # however the work is scheduled.
  if [ "$3" != big_txn ]; then python3 - "$3" "$store_rate" "$daemon_us" "$pg" <<'PY'
import sys
label, store, daemon_us = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
pg = sum(float(l.split("=")[1]) for l in sys.argv[4].splitlines() if "_cpu_us_per_row=" in l)
total = daemon_us + pg
print(f"{label}_all_cpu_us_per_row={total:.1f}   # daemon + Postgres")
print(f"{label}_cores_for_1_2x_store={1.2 * store * total / 1e6:.2f}   # of 2")
ws = sum(float(l.split("=")[1]) for l in sys.argv[4].splitlines() if "_walsender_cpu_us_per_row=" in l)
print(f"{label}_walsender_cores_for_1_2x_store={1.2 * store * ws / 1e6:.2f}   # one process: over 1 is out of reach")
PY
  fi
  kill "$p"; wait "$p" 2>/dev/null || true
  # Queue transactions (each a COPY of a batch, the checkpoint and its wake-ups; Postgres's
  # fixed cost per COPY is paid per batch): read after the daemon is gone and the
  # statistics are flushed.
  sleep 1.1
  echo "$3_rows_per_queue_commit=$(python3 -c "import sys; print(round(int(sys.argv[1]) / max(1, int(sys.argv[2]) - int(sys.argv[3]))))" "$ROWS" "$(xacts "$2")" "$x0")"
}
drain c1 q1 capture_1topic "$mark"
drain c20 q20 capture_20topics "$mark"
# The same over the server's Unix socket: pg_recvlogical, then capture with 1 topic (its
# ratio is to pg_recvlogical over the socket). Loopback TCP costs the walsender per message.
t0=$(now)
"$PG_BIN/pg_recvlogical" -h "$sock" -p "$PGPORT" -U postgres -d fhir --slot recvu --start \
  -o proto_version=1 -o publication_names=fhir_cdc --endpos "$end_lsn" -f /dev/null
t1=$(now)
recv_socket_rate=$(rate "$ROWS" "$t0" "$t1")
echo "recvlogical_socket_rows_per_s=$recv_socket_rate"
echo "recvlogical_socket_store_ratio=$(ratio "$recv_socket_rate" "$store_rate")"
recv_rate=$recv_socket_rate drain c1u q1u capture_1topic_socket "$mark"
[ "${BENCH_ONLY:-}" = capture ] && exit 0

# One 30,000-resource transaction (~50 MB), drained by capture alone.
psql -d fhir -c "BEGIN; INSERT INTO observation (id, txid, resource_type, status, resource)
  SELECT 'big' || g, txid_current(), 'Observation', 'created', s.body || jsonb_build_object('note', jsonb_build_array(jsonb_build_object('text', repeat(md5(g::text), 10))))
  FROM generate_series(1, 30000) g JOIN bench_src s ON s.n = g % $src_n + 1; COMMIT;"
mark2=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end2\"}}')" >/dev/null
ROWS_SAVED=$ROWS; ROWS=$((ROWS + 30000 + 2))
drain cbig qbig big_txn "$mark2"
ROWS=$ROWS_SAVED

# Lag under load: 4 writers at full rate for LAG_SECS while capture (1 topic) runs. Its
# /metrics (--health-listen) is scraped at the end of the load: the slot lag it reports is
# printed beside the one read from pg_replication_slots here.
lag_writers() { # id-prefix: starts the 4 writers, their pids in `writers`
  writers=()
  for w in 1 2 3 4; do
    ( end=$(( $(date +%s) + LAG_SECS )); k=0
      while [ "$(date +%s)" -lt "$end" ]; do
        echo "BEGIN; INSERT INTO observation (id, txid, resource_type, status, resource) SELECT '${1}${w}-${k}-' || g, txid_current(), 'Observation', 'created', s.body FROM generate_series(1, 100) g JOIN bench_src s ON s.n = g % $src_n + 1; COMMIT;"
        k=$((k + 1))
      done | psql -d fhir >/dev/null ) &
    writers+=($!)
  done
}


hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" capture --config "$work/c1.toml" --health-listen "127.0.0.1:$hport" 2>"$work/c1.lag.log" &
cap=$!; pids+=("$cap")
for _ in $(seq 1 300); do grep -qs "capture streaming" "$work/c1.lag.log" && break; sleep 0.1; done
wait_for q1 "$(queued "$mark2")"
lag_writers w
max_bytes=0; max_secs=0
ws=$(slot_pid s1)
t0=$(now); j0=$(machine_jiffies); c0=$(cpu_s "$cap"); pg_procs >"$work/lag.pg0"; ws0=$(sched "$ws"); d0=$(sched "$cap")
while kill -0 "${writers[0]}" 2>/dev/null; do
  b=$(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'")
  [ "$b" -gt "$max_bytes" ] && max_bytes=$b
  sleep 1
done
wait "${writers[@]}"
t1=$(now); j1=$(machine_jiffies); c1=$(cpu_s "$cap"); pg_procs >"$work/lag.pg1"; ws1=$(sched "$ws"); d1=$(sched "$cap")
written=$(psql -d fhir -c "SELECT count(*) FROM observation WHERE id LIKE 'w%'")
end_bytes=$(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'")
metrics_at_end=$(curl -fs "http://127.0.0.1:$hport/metrics" || true)
mark3=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
psql -d fhir -c "SELECT fhir_put('Observation', 'bench-end', '{\"status\":\"final\",\"code\":{\"text\":\"end3\"}}')" >/dev/null
t2=$(now)
# Time to catch up after the load stops, waited for at most CATCHUP_SECS.
caught=no
if wait_for q1 "$(queued "$mark3")" "${BENCH_CATCHUP_SECS:-120}"; then caught=yes; fi
t3=$(now)
echo "lag_store_rows_per_s=$(rate "$written" "$t0" "$t1")"
echo "lag_max_bytes=$max_bytes"
echo "lag_end_bytes=$end_bytes"
# What /metrics said at the same moment (its gauges are refreshed every [source.lag]
# check_secs, 5 s by default, so they trail by up to that much).
echo "lag_end_metrics_bytes=$(echo "$metrics_at_end" | awk '$1 == "fhir_cdc_slot_lag_bytes" {printf "%d", $2}')"
echo "lag_end_metrics_secs=$(echo "$metrics_at_end" | awk '$1 == "fhir_cdc_slot_lag_seconds" {print $2}')"
if [ "$caught" = yes ]; then
  echo "lag_end_secs=$(python3 -c "print(round($t3 - $t2, 1))")"
else
  echo "lag_end_secs=>${BENCH_CATCHUP_SECS:-120} (not caught up; $(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 's1'") bytes behind)"
fi
echo "lag_peak_rss_mb=$(peak_rss_mb "$cap")"
# Where the CPU went while the writers ran, in percent of one core: what capture's daemon,
# walsender and queue backend got of the two cores (the writers and their backends, gone
# by the second snapshot, are the rest of the machine's busy time).
load_secs=$(python3 -c "print($t1 - $t0)")
echo "lag_load_machine_busy_pct=$(busy_pct "$j0" "$j1") lag_load_daemon_cpu_pct=$(python3 -c "print(round(100 * ($c1 - $c0) / $load_secs))") $(pg_cpu_pct "$work/lag.pg0" "$work/lag.pg1" q1 "$load_secs" lag_load)"
# How the walsender and the daemon spent the load (schedstat; the daemon's threads summed).
sched_pct lag_load_walsender "$ws0" "$ws1" "$load_secs"
sched_pct lag_load_daemon "$d0" "$d1" "$load_secs"
kill "$cap"; wait "$cap" 2>/dev/null || true

# The physical limit: the same load with pg_recvlogical (pgoutput, the same
# publication) reading a slot of its own and nothing else running. Postgres decodes the WAL
# for it as for capture; when the writers outrun that decoding, no client can keep up. Its
# catch-up ends when the walsender has sent past the WAL written by the load's end.
psql -d fhir -c "SELECT pg_create_logical_replication_slot('lagrecv', 'pgoutput')" >/dev/null
"$PG_BIN/pg_recvlogical" -h 127.0.0.1 -p "$PGPORT" -U postgres -d fhir --slot lagrecv --start \
  -o proto_version=1 -o publication_names=fhir_cdc -f /dev/null 2>"$work/lagrecv.log" &
recv=$!; pids+=("$recv")
until [ "$(psql -d fhir -c "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_recvlogical'")" -gt 0 ]; do sleep 0.1; done
ws=$(slot_pid lagrecv)
t0=$(now); j0=$(machine_jiffies); pg_procs >"$work/lagrecv.pg0"; ws0=$(sched "$ws")
lag_writers lr
wait "${writers[@]}"
t1=$(now); j1=$(machine_jiffies); pg_procs >"$work/lagrecv.pg1"; ws1=$(sched "$ws")
target=$(psql -d fhir -c "SELECT pg_current_wal_lsn()")
t2=$(now)
caught=no
if wait_for fhir "SELECT count(*) > 0 FROM pg_stat_replication WHERE application_name = 'pg_recvlogical' AND sent_lsn >= '$target'" "${BENCH_CATCHUP_SECS:-120}"; then caught=yes; fi
t3=$(now)
echo "lag_recvlogical_store_rows_per_s=$(rate "$(psql -d fhir -c "SELECT count(*) FROM observation WHERE id LIKE 'lr%'")" "$t0" "$t1")"
if [ "$caught" = yes ]; then
  echo "lag_recvlogical_end_secs=$(python3 -c "print(round($t3 - $t2, 1))")   # the limit: pg_recvlogical's catch-up after the same load"
else
  echo "lag_recvlogical_end_secs=>${BENCH_CATCHUP_SECS:-120} (pg_recvlogical not caught up)"
fi
echo "lag_recvlogical_load_machine_busy_pct=$(busy_pct "$j0" "$j1") $(pg_cpu_pct "$work/lagrecv.pg0" "$work/lagrecv.pg1" q1 "$(python3 -c "print($t1 - $t0)")" lag_recvlogical_load)"
sched_pct lag_recvlogical_load_walsender "$ws0" "$ws1" "$(python3 -c "print($t1 - $t0)")"
kill "$recv"; wait "$recv" 2>/dev/null || true
psql -d fhir -c "SELECT pg_drop_replication_slot('lagrecv')" >/dev/null
[ "${BENCH_ONLY:-}" = lag ] && exit 0

fi

# End to end and fan-out: `fhir-cdc run` (R5) delivering to the bench receiver.
E2E_SECS=${BENCH_E2E_SECS:-20}
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
aport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/examples/bench_receiver "127.0.0.1:$rport" & pids+=($!)
psql -d postgres -c "CREATE DATABASE qe"
cat >"$work/ce.toml" <<TOML
[source]
url = "$url/fhir"
profile = "aidbox"
fhir_version = "R5"
slot = "se"
publication = "fhir_cdc"

[queue]
url = "$url/qe"

[api]
listen = "127.0.0.1:$aport"

[delivery]
allow_private_endpoints = true
require_https_for_full_resource = false
${BENCH_DELIVERY_EXTRA:-}
$topics1
TOML
"$bin" run --config "$work/ce.toml" 2>"$work/ce.log" & run=$!; pids+=("$run")
until curl -fs "http://127.0.0.1:$aport/readyz" >/dev/null 2>&1; do sleep 0.2; done
rstat() { curl -fs "http://127.0.0.1:$rport/stats"; }
# Events received so far; polled every 0.1 s, so it must cost little (no Python).
revents() { curl -fs "http://127.0.0.1:$rport/events"; }
rget() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$(rstat)" "$1"; }
# subscribe N FILTERED [MAXCOUNT]: N id-only subscriptions; FILTERED=yes gives each its own
# patient.
subscribe() {
  python3 - "$aport" "$rport" "$1" "$2" "${3:-1}" <<'PY'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
api, rport, n, filtered = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "yes"
max_count = int(sys.argv[5])
def one(i):
    s = {"resourceType": "Subscription", "status": "requested", "topic": "http://bench/topic/obs",
         "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
         "endpoint": f"http://127.0.0.1:{rport}/hook/s{i}", "content": "id-only", "contentType": "application/fhir+json"}
    if max_count > 1:
        s["maxCount"] = max_count
    if filtered:
        s["filterBy"] = [{"resourceType": "Observation", "filterParameter": "patient", "value": f"Patient/p{i}"}]
    req = urllib.request.Request(f"http://127.0.0.1:{api}/Subscription", json.dumps(s).encode(),
                                 {"Content-Type": "application/fhir+json"})
    urllib.request.urlopen(req).read()
with ThreadPoolExecutor(8) as ex:
    list(ex.map(one, range(n)))
PY
  until [ "$(psql -d qe -c "SELECT count(*) FROM fhir_cdc.subscription WHERE status = 'active'")" -ge "$1" ]; do sleep 0.2; done
}
unsubscribe() { psql -d qe -c "DELETE FROM fhir_cdc.subscription" >/dev/null; }
# What the queue writes: rows inserted, updated and deleted in schema fhir_cdc (capture's
# event and checkpoint rows, and delivery's bookkeeping apart), and the cluster's WAL position. Backends report their row
# counts to the statistics within a second; the pause lets the last ones arrive.
qrows() { sleep 1.5; psql -d qe -F ' ' -c "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname IN ('event', 'checkpoint')), 0), coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname NOT IN ('event', 'checkpoint')), 0) FROM pg_stat_user_tables WHERE schemaname = 'fhir_cdc'"; }
wal() { psql -d qe -c "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint"; }
# queue_report CASE ROWS0 ROWS1 WAL0 WAL1 DELIVERED_EVENTS WRITES: rows per delivered event,
# and the cluster's WAL per delivered event and per store write (full-page images after a
# checkpoint make WAL differences between phases too noisy to subtract a baseline).
queue_report() {
  python3 - "$@" <<'PY'
import sys
case, r0, r1, w0, w1, delivered, writes = sys.argv[1:8]
e0, d0 = map(int, r0.split()); e1, d1 = map(int, r1.split())
delivered, writes = int(delivered), int(writes)
print(f"{case}_queue_rows_per_event_delivered={((e1 - e0) + (d1 - d0)) / delivered:.3f} "
      f"(capture's event and checkpoint rows {(e1 - e0) / delivered:.3f}, delivery bookkeeping {(d1 - d0) / delivered:.3f})")
wal = int(w1) - int(w0)
print(f"{case}_wal_bytes_per_event_delivered={wal / delivered:.0f} "
      f"(the cluster's, store writes included: {wal / writes:.0f} per store write)")
PY
}
# writes RATE SECS PREFIX: single-row transactions at RATE/s, patients p0…p99 in turn.
writes() {
  python3 - "$1" "$2" "$3" "$src_n" <<'PY' | psql -d fhir >/dev/null
import sys, time
rate, secs, prefix, n = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t0 = time.time(); k = 0
while k < rate * secs:
    due = t0 + k / rate
    d = due - time.time()
    if d > 0:
        time.sleep(d)
    print(f"INSERT INTO observation (id, txid, resource_type, status, resource) SELECT '{prefix}{k}', txid_current(), "
          f"'Observation', 'created', body || '{{\"subject\": {{\"reference\": \"Patient/p{k % 100}\"}}}}' FROM bench_src WHERE n = {k % n + 1};",
          flush=True)
    k += 1
PY
}
# The WAL the writes cost with no subscription (the store's row and capture's event row):
# the baseline the delivery cases' WAL is reported beyond.
if [ "${BENCH_ONLY:-}" != brokers ]; then
w0=$(wal); writes 500 4 "w-"; sleep 2; w1=$(wal)
wal_per_write=$(( (w1 - w0) / 2000 ))
echo "wal_bytes_per_write_without_subscriptions=$wal_per_write"
subscribe 100 yes
for r in 500 2000; do
  curl -fs -X POST "http://127.0.0.1:$rport/reset" >/dev/null
  q0=$(qrows); w0=$(wal); c0=$(cpu_s "$run")
  writes "$r" "$E2E_SECS" "e$r-"
  want=$((r * E2E_SECS)); waited=0
  while [ "$(revents)" -lt "$want" ] && [ "$waited" -lt 600 ]; do sleep 0.1; waited=$((waited + 1)); done
  c1=$(cpu_s "$run"); w1=$(wal); q1=$(qrows)
  echo "e2e_${r}_per_s_delivered=$(rget events)/$want"
  for k in p50_ms p95_ms p99_ms max_ms; do echo "e2e_${r}_$k=$(rget $k)"; done
  # Where the median event spent its time: store commit -> its queue transaction began
  # (capture); the rest of the end-to-end time is the send.
  echo "e2e_${r}_p50_capture_ms=$(psql -d qe -c "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY 1000 * extract(epoch FROM e.queued_at - e.commit_time))::numeric, 1) FROM fhir_cdc.event e WHERE e.resource_id LIKE 'e$r-%'")"
  echo "e2e_${r}_lag_end_bytes=$(psql -d fhir -c "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 'se'")"
  echo "e2e_${r}_daemon_cpu_us_per_notification=$(python3 -c "import sys; print(round(1e6 * (float(sys.argv[2]) - float(sys.argv[1])) / int(sys.argv[3])))" "$c0" "$c1" "$want")"
  queue_report "e2e_$r" "$q0" "$q1" "$w0" "$w1" "$want" "$want"
done
unsubscribe
# Fan-out: every subscription matches every event; EVENTS chosen so each case sends ~20,000.
# The case 100x100 is 100 subscriptions with maxCount 100 (batches of up to 100 events).
for case in 1 100 10000 100x100; do
  n=${case%x*}; mc=1; [ "$case" != "$n" ] && mc=${case#*x}
  subscribe "$n" no "$mc"
  events=$(( 20000 * mc / n )); [ "$events" -lt 5 ] && events=5
  want=$((events * n))
  curl -fs -X POST "http://127.0.0.1:$rport/reset" >/dev/null
  q0=$(qrows); w0=$(wal)
  c0=$(cpu_s "$run"); j0=$(machine_jiffies)
  perf=
  if [ -n "${BENCH_PERF:-}" ] && [ "fanout_$case" = "${BENCH_PERF_CASE:-}" ]; then
    perf record -q -F 999 -g $( [ -n "${BENCH_PERF_ALL:-}" ] && echo -a || echo -p "$run") -o "$BENCH_PERF" 2>/dev/null & perf=$!
  fi
  writes 100000 "$(python3 -c "print($events / 100000)")" "f$case-"
  waited=0
  while [ "$(revents)" -lt "$want" ] && [ "$waited" -lt 3000 ]; do sleep 0.1; waited=$((waited + 1)); done
  c1=$(cpu_s "$run"); j1=$(machine_jiffies)
  # The run is from the store commit of its first write (the events' commit_time) to the
  # last notification's arrival (the receiver's clock): not from before the writer's Python
  # and psql started (~0.17 s, a third of a 20,000-notification run), nor to the poll that
  # saw the end (up to 0.1 s later).
  t0=$(psql -d qe -c "SELECT extract(epoch FROM min(commit_time)) FROM fhir_cdc.event WHERE resource_id LIKE 'f$case-%'")
  t1=$(rget last_at)
  if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi
  w1=$(wal); q1=$(qrows)
  sent=$(rget requests)
  echo "fanout_${case}_notifications_per_s=$(rate "$sent" "$t0" "$t1") ($(rget events)/$want events in $sent notifications)"
  echo "fanout_${case}_events_per_s=$(rate "$(rget events)" "$t0" "$t1")"
  echo "fanout_${case}_max_ms=$(rget max_ms)"
  # From the store commit of the case's first write to the first arrival: capture and the
  # first send.
  echo "fanout_${case}_first_arrival_ms=$(python3 -c "import sys; print(round(1000 * (float(sys.argv[2]) - float(sys.argv[1]))))" "$t0" "$(rget first_at)")"
  # The daemon's CPU per notification and per event delivered (capture and sends), and
  # how busy both cores were (the receiver and Postgres use the rest).
  echo "fanout_${case}_daemon_cpu_us_per_notification=$(python3 -c "import sys; print(round(1e6 * (float(sys.argv[2]) - float(sys.argv[1])) / int(sys.argv[3])))" "$c0" "$c1" "$sent")"
  echo "fanout_${case}_machine_busy_pct=$(busy_pct "$j0" "$j1")"
  queue_report "fanout_$case" "$q0" "$q1" "$w0" "$w1" "$want" "$events"
  unsubscribe
done
echo "fanout_peak_rss_mb=$(peak_rss_mb "$run")"
kill "$run"; wait "$run" 2>/dev/null || true
body=$(python3 -c "import json; print(json.dumps({'resourceType':'Bundle','type':'subscription-notification','entry':[{'resource':{'resourceType':'SubscriptionStatus','status':'active','type':'event-notification','notificationEvent':[{'eventNumber':'1','timestamp':'2026-01-01T00:00:00.000Z','focus':{'reference':'Observation/1'}}],'topic':'http://bench/topic/obs'}}]}))")
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/fhir+json"\nwrk.body = [[%s]]\n' "$body" >"$work/post.lua"
plain=$(wrk -t2 -c64 -d10s -s "$work/post.lua" "http://127.0.0.1:$rport/hook/plain" | awk '/Requests\/sec/ {print int($2)}')
echo "http_plain_requests_per_s=$plain"
fi
kill "$run" 2>/dev/null || true; wait "$run" 2>/dev/null || true

# Broker destinations. The local NATS (JetStream) and RabbitMQ, or ones brokers.sh starts.
source scripts/brokers.sh
cargo build --release --quiet --example bench_broker
bb=target/release/examples/bench_broker
nats_url=${FHIR_CDC_TEST_NATS_URL:-nats://127.0.0.1:4222}
amqp_url=${FHIR_CDC_TEST_AMQP_URL:-amqp://guest@127.0.0.1:5672/%2f}
export FHIR_CDC_BENCH_AMQP_PASSWORD=${FHIR_CDC_TEST_AMQP_PASSWORD:-guest}
amqp_full=$(python3 -c "import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(p._replace(netloc=f'{p.username}:{sys.argv[2]}@{p.hostname}:{p.port}').geturl())" "$amqp_url" "$FHIR_CDC_BENCH_AMQP_PASSWORD")
psql -d postgres -c "CREATE DATABASE qb"
# destinations KIND N: the [[destination]] tables.
destinations() {
  for i in $(seq 0 $(($2 - 1))); do
    echo "[[destination]]"
    echo "id = \"bench-$1-d$i\""
    echo 'topic = "http://bench/topic/obs"'
    echo "kind = \"$1\""
    if [ "$1" = nats ]; then
      echo "url = \"$nats_url\""
      echo "subject = \"bench.d$i\""
    else
      echo "url = \"$amqp_url\""
      echo 'exchange = "fhircdc.bench"'
      echo "routing_key = \"d$i\""
      echo 'password_env = "FHIR_CDC_BENCH_AMQP_PASSWORD"'
    fi
  done
}
for kind in ${BENCH_BROKER_KINDS:-nats amqp}; do
  url_b=$nats_url; [ "$kind" = amqp ] && url_b=$amqp_full
  # Messages per case: RabbitMQ's confirmed persistent publishes are several times slower.
  total=20000; [ "$kind" = amqp ] && total=6000
  for n in 1 10; do
    "$bb" "$kind-setup" "$url_b" "$n"
    cat >"$work/cb.toml" <<TOML
[source]
url = "$url/fhir"
profile = "aidbox"
fhir_version = "R5"
slot = "sb"
publication = "fhir_cdc"

[queue]
url = "$url/qb"

[api]
listen = "127.0.0.1:$aport"

$topics1
$(destinations "$kind" "$n")
TOML
    # The destinations are synced by a deliver process; capture queues the events with no
    # delivery running; then a deliver process alone publishes the backlog: the publishing is
    # what is measured, from its first message to its last.
    "$bin" capture --config "$work/cb.toml" 2>"$work/cb-$kind-$n-capture.log" & bcap=$!; pids+=("$bcap")
    until grep -qs "capture streaming" "$work/cb-$kind-$n-capture.log"; do sleep 0.1; done
    "$bin" deliver --config "$work/cb.toml" 2>"$work/cb-$kind-$n-sync.log" & brun=$!; pids+=("$brun")
    until [ "$(psql -d qb -c "SELECT count(*) FROM fhir_cdc.subscription WHERE origin = 'config' AND status = 'active' AND id LIKE 'bench-$kind-%'")" -ge "$n" ]; do sleep 0.2; done
    kill "$brun"; wait "$brun" 2>/dev/null || true
    events=$((total / n)); want=$((events * n))
    writes 100000 "$(python3 -c "print($events / 100000)")" "b$kind$n-"
    until [ "$(psql -d qb -c "SELECT count(*) FROM fhir_cdc.event WHERE resource_id LIKE 'b$kind$n-%'")" -ge "$events" ]; do sleep 0.2; done
    kill "$bcap"; wait "$bcap" 2>/dev/null || true
    "$bin" deliver --config "$work/cb.toml" 2>"$work/cb-$kind-$n.log" & brun=$!; pids+=("$brun")
    c0=$(cpu_s "$brun")
    perf=
    if [ -n "${BENCH_PERF:-}" ] && [ "broker_${kind}_$n" = "${BENCH_PERF_CASE:-}" ]; then
      perf record -q -F 999 -g -p "$brun" -o "$BENCH_PERF" 2>/dev/null & perf=$!
    fi
    read -r t0 got0 t1 got < <("$bb" "$kind-wait" "$url_b" "$n" "$want")
    c1=$(cpu_s "$brun")
    if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi
    echo "broker_${kind}_${n}_notifications_per_s=$(rate "$((got - got0))" "$t0" "$t1") ($got/$want messages, $n destination(s))"
    echo "broker_${kind}_${n}_deliver_cpu_us_per_notification=$(python3 -c "import sys; print(round(1e6 * (float(sys.argv[2]) - float(sys.argv[1])) / int(sys.argv[3])))" "$c0" "$c1" "$want")"
    kill "$brun"; wait "$brun" 2>/dev/null || true
    "$bb" "$kind-teardown" "$url_b" "$n"
  done
  echo "broker_${kind}_plain_acked_publishes_per_s=$("$bb" "$kind-plain" "$url_b" "$total")"
done
[ "${BENCH_ONLY:-}" = brokers ] && exit 0

# Evaluation per core, beside the JSON parse rate of the same resources.
cargo bench --quiet --bench evaluate -- "$res" 2>/dev/null | sed "s/^/evaluate: /"
