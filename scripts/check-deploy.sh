#!/usr/bin/env bash
# Checks the deploy files CI cannot run: the Kubernetes manifests against a current
# Kubernetes schema (kubernetes-validate, PyPI) and the Prometheus rules (promtool, Debian's
# `prometheus`). Installs what is missing: promtool with apt, kubernetes-validate in a venv
# under ~/.cache/fhir-cdc. (Every metric these files name is checked by tests/it/examples.rs.)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "check-deploy.sh: installing ${need_apt[*]} with apt" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
promtool check rules deploy/prometheus/alerts.yaml

venv=${XDG_CACHE_HOME:-$HOME/.cache}/fhir-cdc/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q kubernetes-validate==1.37.0
fi
# secret.example.yaml is validated too: a Secret users copy must be a valid one.
"$venv/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml
echo "check-deploy: ok"
