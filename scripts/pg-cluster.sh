#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster with wal_level=logical in a temp dir on a free port.
#   eval "$(scripts/pg-cluster.sh start)"   # sets PGDATA_DIR, PGPORT, PG_BIN
#   scripts/pg-cluster.sh start PID         # ... and stops it by itself once process PID is gone
#   scripts/pg-cluster.sh stop "$PGDATA_DIR"
# Installs Debian's postgresql package when no server binaries are found.
set -euo pipefail

find_bin() {
  if command -v pg_config >/dev/null 2>&1; then
    local b; b=$(pg_config --bindir)
    if [ -x "$b/initdb" ]; then echo "$b"; return; fi
  fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  return 1
}

ensure_postgres() {
  if ! find_bin >/dev/null; then
    echo "PostgreSQL server binaries not found; installing postgresql with apt" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
  fi
  find_bin
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    bin=$(ensure_postgres)
    dir=$(mktemp -d /tmp/fhir-cdc-pg.XXXXXX)
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    port=$(free_port)
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
    # In the config file, so a restart keeps them.
    cat >>"$dir/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$dir'
listen_addresses = '127.0.0.1'
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
fsync = off
CONF
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
    owner=${2:-}
    if [ -n "$owner" ]; then
      # A cluster shared by a test binary has no destructor: a detached watcher stops it
      # once the owning process has exited, however it exited.
      setsid nohup bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$0' stop '$dir'" \
        </dev/null >/dev/null 2>&1 &
    fi
    echo "PGDATA_DIR=$dir; PGPORT=$port; PG_BIN=$bin; export PGDATA_DIR PGPORT PG_BIN"
    ;;
  restart)
    # Stops the server abruptly (as a crash would) and starts it again on the same port.
    dir=${2:?usage: restart DIR}
    bin=$(find_bin)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
    sleep "${3:-0}"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
    ;;
  stop)
    dir=${2:?usage: stop DIR}
    bin=$(find_bin)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start [OWNER_PID] | restart DIR [PAUSE] | stop DIR" >&2; exit 2 ;;
esac
