#!/usr/bin/env bash
# Sourced by scripts/test.sh (and bench.sh): makes sure a NATS server with JetStream and a
# RabbitMQ broker are reachable for the broker tests, and exports their URLs:
#   FHIR_CDC_TEST_NATS_URL   (default: the server at 127.0.0.1:4222 when one listens)
#   FHIR_CDC_TEST_AMQP_URL, FHIR_CDC_TEST_AMQP_PASSWORD (default: 127.0.0.1:5672, guest)
# When none listens (a fresh Debian machine), it installs nats-server / rabbitmq-server with
# apt and starts its own on free ports in a temp dir; they are stopped when the sourcing
# shell exits. FHIR_CDC_OWN_BROKERS=1 starts its own even when the defaults listen.

_fc_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

_fc_free_port() {
  # Below 40000: RabbitMQ's Erlang distribution port is the AMQP port + 20000.
  python3 -c 'import random, socket
while True:
    p = random.randint(20000, 39999)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass'
}

_fc_apt() {
  echo "brokers.sh: installing $* with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "$@" >/dev/null
}

_fc_bin() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; }; }

_fc_brokers_dir=""
_fc_stop_brokers() {
  [ -n "$_fc_brokers_dir" ] || return 0
  [ -f "$_fc_brokers_dir/nats.pid" ] && kill "$(cat "$_fc_brokers_dir/nats.pid")" 2>/dev/null
  if [ -n "${_fc_rabbit_node:-}" ]; then
    "$(_fc_bin rabbitmqctl)" -n "$_fc_rabbit_node" stop >/dev/null 2>&1 || true
  fi
  rm -rf "$_fc_brokers_dir"
}

_fc_start_nats() {
  [ -n "$(_fc_bin nats-server)" ] || _fc_apt nats-server
  local port; port=$(_fc_free_port)
  mkdir -p "$_fc_brokers_dir/nats"
  "$(_fc_bin nats-server)" -js -a 127.0.0.1 -p "$port" -sd "$_fc_brokers_dir/nats" \
    >"$_fc_brokers_dir/nats.log" 2>&1 &
  echo $! >"$_fc_brokers_dir/nats.pid"
  for _ in $(seq 1 100); do _fc_listening "$port" && break; sleep 0.1; done
  _fc_listening "$port" || { cat "$_fc_brokers_dir/nats.log" >&2; return 1; }
  export FHIR_CDC_TEST_NATS_URL="nats://127.0.0.1:$port"
  echo "brokers.sh: nats-server -js on $FHIR_CDC_TEST_NATS_URL" >&2
}

_fc_start_rabbit() {
  [ -n "$(_fc_bin rabbitmq-server)" ] || _fc_apt rabbitmq-server
  local port; port=$(_fc_free_port)
  local d="$_fc_brokers_dir/rabbit"
  mkdir -p "$d"
  # rabbitmq-server run as root drops to the rabbitmq user: it must own its directory.
  chmod 755 "$_fc_brokers_dir"
  if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq: "$d"; fi
  _fc_rabbit_node="fhircdc$port@localhost"
  # Its own config files: the machine's (/etc/rabbitmq) may pin the listener to 5672.
  : >"$d/env.conf"
  printf 'listeners.tcp.default = 127.0.0.1:%s\n' "$port" >"$d/rabbitmq.conf"
  chown rabbitmq: "$d"/*.conf 2>/dev/null || true
  RABBITMQ_CONF_ENV_FILE="$d/env.conf" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_NODE_PORT=$port RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_NODENAME=$_fc_rabbit_node RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/plugins" ERL_CRASH_DUMP="$d/erl_crash.dump" \
    "$(_fc_bin rabbitmq-server)" -detached >"$d/start.log" 2>&1
  # -detached returns before the node registers: wait for the port, then for boot to end.
  for _ in $(seq 1 1200); do _fc_listening "$port" && break; sleep 0.1; done
  if ! _fc_listening "$port" ||
    ! timeout 60 "$(_fc_bin rabbitmqctl)" -n "$_fc_rabbit_node" await_startup >/dev/null 2>&1; then
    cat "$d/start.log" "$d"/log/* >&2 2>/dev/null
    return 1
  fi
  export FHIR_CDC_TEST_AMQP_URL="amqp://guest@127.0.0.1:$port/%2f"
  export FHIR_CDC_TEST_AMQP_PASSWORD=guest
  echo "brokers.sh: rabbitmq-server on 127.0.0.1:$port" >&2
}

if [ -z "${FHIR_CDC_TEST_NATS_URL:-}" ] && { [ "${FHIR_CDC_OWN_BROKERS:-}" = 1 ] || ! _fc_listening 4222; }; then
  _fc_brokers_dir=${_fc_brokers_dir:-$(mktemp -d)}
  trap _fc_stop_brokers EXIT
  _fc_start_nats
fi
if [ -z "${FHIR_CDC_TEST_AMQP_URL:-}" ] && { [ "${FHIR_CDC_OWN_BROKERS:-}" = 1 ] || ! _fc_listening 5672; }; then
  _fc_brokers_dir=${_fc_brokers_dir:-$(mktemp -d)}
  trap _fc_stop_brokers EXIT
  _fc_start_rabbit
fi
