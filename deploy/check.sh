#!/usr/bin/env bash
# Offline checks of everything under deploy/ and k8s/, from the registries only:
#   helm lint --strict and helm template (Helm's library, through deploy/helm.py)
#   kubernetes-validate --strict, checkov, yamllint on the rendered manifests
#   the ServiceMonitor and PrometheusRule against the Prometheus Operator's schemas
#   hadolint and checkov on the Dockerfile, `docker compose config -q`
#   promtool check rules / test rules, and promtool check metrics on a live scrape of the
#   gateway and the persister
# Tools are installed once into .tools/venv and deploy/node_modules (re-installed when their
# lists change); promtool comes from Debian's `prometheus` package. `deploy/check.sh tools`
# only installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=target/deploy-check
mkdir -p "$out"

step() { printf '\n--> %s\n' "$*"; }

install_tools() {
  if ! command -v promtool >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq prometheus >/dev/null; fi
  fi
  if [ ! -x .tools/venv/bin/checkov ] || ! cmp -s deploy/requirements.txt .tools/venv/.requirements 2>/dev/null; then
    echo "installing the check tools into .tools/venv"
    python3 -m venv .tools/venv
    .tools/venv/bin/pip install -q --disable-pip-version-check -r deploy/requirements.txt
    cp deploy/requirements.txt .tools/venv/.requirements
  fi
  if ! cmp -s deploy/package-lock.json deploy/node_modules/.installed-lock 2>/dev/null; then
    (cd deploy && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
  fi
}
install_tools
# `deploy/check.sh tools`: only the installs (the test command runs them while it compiles).
[ "${1:-}" = tools ] && exit 0
tools=.tools/venv/bin
export BC_SKIP_MAPPING=TRUE # checkov: no network

step "helm lint --strict"
"$tools/python" deploy/helm.py lint k8s/chat --strict
"$tools/python" deploy/helm.py lint k8s/chat --strict -f deploy/ci-values.yaml

step "helm template (defaults, and every option on)"
"$tools/python" deploy/helm.py template k8s/chat > "$out/default.yaml"
"$tools/python" deploy/helm.py template k8s/chat -f deploy/ci-values.yaml > "$out/production.yaml"
# The schema refuses what the chart cannot use.
if "$tools/python" deploy/helm.py template k8s/chat --set-json '{"gateway":{"replicas":0}}' >/dev/null 2>&1; then
  echo "values.schema.json accepted gateway.replicas=0" >&2
  exit 1
fi

step "kubernetes-validate --strict"
"$tools/kubernetes-validate" --strict --quiet "$out/default.yaml" "$out/production.yaml"

step "Prometheus Operator resources"
(cd deploy && node validate-crds.mjs "$root/$out/production.yaml")

step "yamllint"
"$tools/yamllint" -c deploy/yamllint.yml "$out/default.yaml" "$out/production.yaml" \
  deploy/docker-compose.yml deploy/compose.standins.yml deploy/ci-values.yaml deploy/yamllint.yml \
  k8s/chat/Chart.yaml k8s/chat/values.yaml k8s/chat/files/alerts.yml deploy/prometheus/alerts.test.yml

step "checkov (kubernetes, dockerfile)"
"$tools/checkov" --quiet --compact --framework kubernetes -f "$out/production.yaml"
"$tools/checkov" --quiet --compact --framework dockerfile -f deploy/Dockerfile

step "hadolint"
"$tools/hadolint" deploy/Dockerfile deploy/standins/*.Containerfile

step "docker compose config -q"
JWT_SECRET=check "$tools/docker-compose" -f deploy/docker-compose.yml config -q
JWT_SECRET=check SERVER_API_KEY=check "$tools/docker-compose" -f deploy/docker-compose.yml \
  -f deploy/compose.standins.yml config -q

step "promtool: alerting rules"
promtool check rules k8s/chat/files/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

step "promtool check metrics (live scrape of a gateway and a persister)"
# `--bin`, not `-p`: the workspace's features, so a workspace build's artefacts are reused.
# The test command has built them already (CHAT_BINARIES_BUILT=1).
[ -n "${CHAT_BINARIES_BUILT:-}" ] || cargo build --locked -q --bin gateway --bin persister
scratch=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ok() {
  for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no answer from $1" >&2
  return 1
}
redis_port=$(free_port) mongo_port=$(free_port) g_port=$(free_port) g_admin=$(free_port) p_admin=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null &
pids+=($!)
"${SECANTUSD:-.venv/bin/secantusd-py}" --host 127.0.0.1 --port "$mongo_port" --storage-path :memory: --log-level WARNING &
pids+=($!)
export REDIS_URL="redis://127.0.0.1:$redis_port" MONGODB_URI="mongodb://127.0.0.1:$mongo_port" \
  MONGODB_DB=check REDIS_PREFIX=check HOST=127.0.0.1 RUST_LOG=warn
METRICS_PORT=$p_admin target/debug/persister &
pids+=($!)
PORT=$g_port METRICS_PORT=$g_admin JWT_SECRET=check-secret-of-at-least-thirty-two-bytes target/debug/gateway &
pids+=($!)
wait_ok "http://127.0.0.1:$g_admin/readyz"
wait_ok "http://127.0.0.1:$p_admin/readyz"
# Some traffic, so that counters and histograms have samples.
token=$(curl -fsS -H 'content-type: application/json' \
  -d '{"email":"check@example.com","password":"password123"}' \
  "http://127.0.0.1:$g_port/auth/register" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accessToken"])')
room=$(curl -fsS -H 'content-type: application/json' -H "authorization: Bearer $token" \
  -d '{"participantIds":[]}' "http://127.0.0.1:$g_port/chat/rooms" | python3 -c 'import json,sys; print(json.load(sys.stdin)["_id"])')
curl -fsS -o /dev/null -H 'content-type: application/json' -H "authorization: Bearer $token" \
  -d '{"content":"hello"}' "http://127.0.0.1:$g_port/chat/rooms/$room/messages"
curl -sS -o /dev/null "http://127.0.0.1:$g_port/auth/me" # a 401
for name in gateway:$g_admin persister:$p_admin; do
  curl -fsS "http://127.0.0.1:${name#*:}/metrics" > "$out/${name%%:*}.prom"
  echo "${name%%:*}: $(grep -vc '^#' "$out/${name%%:*}.prom") samples"
  promtool check metrics < "$out/${name%%:*}.prom"
done
# The container probe works against the live admin ports, and fails on a dead one.
METRICS_PORT=$g_admin target/debug/gateway --healthcheck
METRICS_PORT=$p_admin target/debug/persister --healthcheck
if METRICS_PORT=$(free_port) target/debug/gateway --healthcheck; then
  echo "--healthcheck succeeded with nothing listening" >&2
  exit 1
fi

echo
echo "deploy checks passed"
