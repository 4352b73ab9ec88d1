#!/usr/bin/env bash
# Runs scripts/smtp-sink.py (an aiosmtpd server that stores mails as files) for the email
# tests. aiosmtpd comes from PyPI into a venv cached in ~/.cache/fhir-cdc.
#   scripts/smtp-sink.sh --port P --dir DIR [--cert C --key K]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/fhir-cdc/smtp-venv"
mkdir -p "$(dirname "$venv")"
# Tests start several servers at once: one makes the venv while the others wait.
(
  flock 9
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q aiosmtpd==1.4.6 >&2
  fi
) 9>"$(dirname "$venv")/smtp-venv.lock"
exec "$venv/bin/python" "$here/smtp-sink.py" "$@"
