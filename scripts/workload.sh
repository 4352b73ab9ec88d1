#!/usr/bin/env bash
# Prints the path of a workload made by ../shared/workload/gen.py (clinosim 0.6.5 from PyPI):
# N write operations with SEED, one {"seq","op","resourceType","id","resource"} per line, or
# with MODE=resources N resources, one per line.
# The venv, the simulation and the file are cached under ~/.cache/fhir-cdc (outside the
# repository), so only the first run on a machine pays for them.
#   scripts/workload.sh 5000 7 [writes|resources]
set -euo pipefail
n=${1:?usage: workload.sh N SEED [MODE]}
seed=${2:?usage: workload.sh N SEED [MODE]}
mode=${3:-writes}
here=$(cd "$(dirname "$0")/.." && pwd)
gen="$here/../shared/workload/gen.py"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/fhir-cdc"
out="$cache/$mode-$n-$seed.jsonl"
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
# Tests call this in parallel: one makes the venv and the file while the others wait, then
# find the file made.
exec 9>"$cache/workload.lock"
flock 9
if [ -s "$out" ]; then echo "$out"; exit 0; fi
venv="$cache/workload-venv"
if [ ! -x "$venv/bin/clinosim" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q clinosim==0.6.5 >&2
fi
"$venv/bin/python" "$gen" -n "$n" --seed "$seed" --mode "$mode" --cache "$cache/sim" --out "$out.tmp" >&2
mv "$out.tmp" "$out"
echo "$out"
