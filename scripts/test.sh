#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against throwaway Postgres clusters
# (wal_level=logical) with real WAL, real webhooks and the official conformance validator.
# On a fresh Debian machine it installs what is missing (postgresql, python3-venv,
# nats-server, rabbitmq-server, chromium for the console test).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
if ! command -v pg_config >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need_apt+=(chromium)   # tests/it/console.rs drives /console headless
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]} with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The validator's Python environments, made once and shared by all tests.
shared=$(cd .. && pwd)/shared
if [ -z "${FHIR_VALIDATOR_DIR:-}" ]; then
  FHIR_VALIDATOR_DIR=$(bash "$shared/conformance/setup.sh")
  export FHIR_VALIDATOR_DIR
fi

# NATS (JetStream) and RabbitMQ for tests/it/brokers.rs: the local ones, or started here.
source scripts/brokers.sh

# All features: `failpoints` (src/failpoints.rs) and `test-utils` (the doubles); the same
# build .ci/run lints, so CI compiles it once.
cargo test --all-targets --all-features "$@"
