#!/usr/bin/env bash
# The main job, on one machine, no Docker: a throwaway Postgres (wal_level=logical) with a small
# FHIR store of the chosen layout (`fhir-cdc init-store`), fhir-cdc running with
# config/example.toml, a webhook receiver that prints what it gets, and a few Encounter writes
# (made with the store's own statements) so you see notifications arrive.
#   scripts/demo.sh                    # Aidbox layout; runs, shows the notifications, stops
#   scripts/demo.sh --profile hapi     # also: helios, medplum
#   scripts/demo.sh --keep             # leaves it running until Ctrl-C (API on 127.0.0.1:8090)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=
profile=aidbox
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=--keep ;;
    --profile) profile=${2:?--profile needs aidbox, hapi, helios or medplum}; shift ;;
    *) echo "usage: $0 [--profile aidbox|hapi|helios|medplum] [--keep]" >&2; exit 2 ;;
  esac
  shift
done

cargo build --release --quiet
eval "$(scripts/pg-cluster.sh start)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/pg-cluster.sh stop "$PGDATA_DIR"
  rm -f "${config:-}"
}
trap cleanup EXIT
psql() { "$PG_BIN/psql" -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PGPORT" -U postgres "$@"; }

psql -d postgres -c "CREATE DATABASE fhir"
export FHIR_CDC_SOURCE_URL="postgresql://postgres@127.0.0.1:$PGPORT/fhir"
target/release/fhir-cdc init-store --profile "$profile" >/dev/null
echo "demo: store ready on port $PGPORT (database fhir, $profile layout)"
# Beside example.toml, whose topic files are relative to it.
config=$(mktemp config/.demo-XXXXXX)
sed "s/^profile = \"aidbox\"/profile = \"$profile\"/" config/example.toml >"$config"

hook_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 scripts/receiver.py "$hook_port" &
pids+=($!)

target/release/fhir-cdc check --config "$config"
target/release/fhir-cdc run --config "$config" 2> >(sed 's/^/fhir-cdc: /' >&2) &
pids+=($!)
for _ in $(seq 1 100); do
  python3 -c 'import urllib.request,sys; urllib.request.urlopen("http://127.0.0.1:8090/readyz")' 2>/dev/null && break
  sleep 0.2
done

echo "demo: subscribing http://127.0.0.1:$hook_port/ to encounter-start (full-resource)"
python3 - "$hook_port" <<'PY'
import json, sys, urllib.request
sub = {
    "resourceType": "Subscription", "status": "requested",
    "topic": "http://example.org/fhir-cdc/SubscriptionTopic/encounter-start",
    "channelType": {"system": "http://terminology.hl7.org/CodeSystem/subscription-channel-type", "code": "rest-hook"},
    "endpoint": f"http://127.0.0.1:{sys.argv[1]}/", "content": "full-resource",
    "contentType": "application/fhir+json",
}
req = urllib.request.Request("http://127.0.0.1:8090/Subscription", json.dumps(sub).encode(),
                             {"Content-Type": "application/fhir+json"})
print("demo: created Subscription/" + json.load(urllib.request.urlopen(req))["id"])
PY
sleep 1

echo "demo: writing into the store (plain SQL, as the store itself would); the topic fires when an Encounter moves to in-progress"
psql -d fhir -c "SELECT fhir_put('Patient', 'p1', '{\"active\":true,\"name\":[{\"family\":\"Demo\"}]}')" >/dev/null
psql -d fhir -c "SELECT fhir_put('Encounter', 'enc-1', '{\"status\":\"planned\",\"subject\":{\"reference\":\"Patient/p1\"}}')" >/dev/null
psql -d fhir -c "SELECT fhir_put('Encounter', 'enc-1', '{\"status\":\"in-progress\",\"subject\":{\"reference\":\"Patient/p1\"}}')" >/dev/null
psql -d fhir -c "SELECT fhir_put('Encounter', 'enc-1', '{\"status\":\"in-progress\",\"subject\":{\"reference\":\"Patient/p1\"},\"priority\":{\"text\":\"urgent\"}}')" >/dev/null
psql -d fhir -c "BEGIN; SELECT fhir_put('Encounter', 'enc-rolled-back', '{\"status\":\"in-progress\"}'); ROLLBACK;" >/dev/null
psql -d fhir -c "SELECT fhir_put('Encounter', 'enc-2', '{\"status\":\"in-progress\",\"subject\":{\"reference\":\"Patient/p1\"}}')" >/dev/null
sleep 2
python3 - <<'PY'
import json, urllib.request
subs = json.load(urllib.request.urlopen("http://127.0.0.1:8090/Subscription"))
for e in subs.get("entry", []):
    sid = e["resource"]["id"]
    st = json.load(urllib.request.urlopen(f"http://127.0.0.1:8090/Subscription/{sid}/$status"))
    s = st["entry"][0]["resource"]
    print(f"demo: $status of Subscription/{sid}: status={s['status']} eventsSinceSubscriptionStart={s['eventsSinceSubscriptionStart']}")
PY
echo "demo: fhir-cdc status (read from the slot and the queue; works while the daemon is down too):"
target/release/fhir-cdc status --config "$config" || true
echo "demo: the console: http://127.0.0.1:8090/console"
if [ "$keep" = "--keep" ]; then
  echo "demo: running; write into the store with: $PG_BIN/psql -h 127.0.0.1 -p $PGPORT -U postgres fhir   (Ctrl-C stops)"
  echo "demo: status again with: target/release/fhir-cdc status --config $config"
  wait
fi
