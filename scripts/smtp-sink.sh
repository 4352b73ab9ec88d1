#!/usr/bin/env bash
# Runs scripts/smtp-sink.py (an aiosmtpd server that stores mails as files) for the email
# tests. aiosmtpd comes from PyPI into a venv cached in ~/.cache/fhir-cdc.
#   scripts/smtp-sink.sh --port P --dir DIR [--cert C --key K]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/fhir-cdc/smtp-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q aiosmtpd==1.4.6 >&2
fi
exec "$venv/bin/python" "$here/smtp-sink.py" "$@"
