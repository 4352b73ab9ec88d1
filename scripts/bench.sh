#!/usr/bin/env bash
# Benchmarks (figures, not tests). Generates a realistic workload with ../shared/workload/gen.py
# (PyPI clinosim) and measures trigger + canFilterBy evaluation per core beside the JSON parse
# rate of the same resources.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-cdc-bench}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q clinosim==0.6.5 carebundle==0.5.0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/python" ../shared/workload/gen.py -n 3000 --seed 7 > "$work/resources.jsonl"
cargo bench --bench evaluate -- "$work/resources.jsonl"
