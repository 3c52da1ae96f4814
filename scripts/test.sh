#!/usr/bin/env bash
# Runs every check and test. Installs what it needs when it is missing: redis-server,
# chromium, haproxy and prometheus (apt), a Python venv with SecantusDB (the MongoDB-protocol
# test server) and python-socketio, the npm packages of the JavaScript suite, and the deploy
# check tools (deploy/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

step "dependencies"
# Debian packages: Redis for the integration tests, Chromium for the chat page's browser
# test, HAProxy for the load-balancer test, promtool (package prometheus) for the deploy checks,
# podman, runc and mmdebstrap for the container images (deploy/images.sh).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  sudo_=(); [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
  "${sudo_[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
requirements=tests/python/requirements.txt
if [ ! -x .venv/bin/secantusd-py ] || ! cmp -s "$requirements" .venv/.requirements 2>/dev/null; then
  echo "creating .venv (SecantusDB, python-socketio)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --pre -r "$requirements"
  cp "$requirements" .venv/.requirements
fi
if ! cmp -s tests/js/package-lock.json tests/js/node_modules/.installed-lock 2>/dev/null; then
  echo "installing JavaScript test packages"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
fi
export SECANTUSD="$root/.venv/bin/secantusd-py"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny (licences, bans, sources)"
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "installing cargo-deny"
  cargo install --locked --quiet cargo-deny
fi
cargo deny check licenses bans sources
# Advisories, offline: the RustSec snapshot beside the project (../shared/advisory-db, see
# its SNAPSHOT.md) becomes the one-commit git repository cargo-deny reads (deny.toml's
# db-path), dated as the snapshot.
advisories=target/advisory-dbs/advisory-db-3157b0e258782691
snapshot=../shared/advisory-db
if [ -d "$snapshot/crates" ] && ! cmp -s "$snapshot/SNAPSHOT.md" "$advisories/SNAPSHOT.md" 2>/dev/null; then
  rm -rf "$advisories"
  mkdir -p "$advisories"
  cp -R "$snapshot/." "$advisories/"
  when=$(grep -o '([0-9]\{4\}-[0-9][0-9]-[0-9][0-9])' "$snapshot/SNAPSHOT.md" | head -1 | tr -d '()')
  (cd "$advisories" && git init -q && git add -A \
    && GIT_AUTHOR_DATE="${when}T00:00:00Z" GIT_COMMITTER_DATE="${when}T00:00:00Z" \
       git -c user.name=snapshot -c user.email=snapshot@localhost commit -q -m "RustSec snapshot $when")
fi
if [ -d "$advisories/.git" ]; then
  cargo deny --offline check advisories
elif [ -n "${CI:-}" ]; then
  echo "no RustSec snapshot in $snapshot: cargo deny check advisories cannot run offline" >&2
  exit 1
else
  echo "no RustSec snapshot in $snapshot: advisories not checked (CI requires it)"
fi

step "unused dependencies (cargo machete)"
if ! command -v cargo-machete >/dev/null 2>&1; then
  echo "installing cargo-machete"
  cargo install --locked --quiet cargo-machete
fi
cargo machete

step "cargo test (unit and integration, real Redis and SecantusDB)"
# The fault tests run the gateway and persister binaries as processes.
cargo build --workspace --locked --bins
# The README's run command builds with `--bin`: it must reuse what a workspace build made.
rebuilt=$(cargo build --locked --bin gateway 2>&1)
if grep -q Compiling <<< "$rebuilt"; then
  echo "cargo build --bin gateway compiled again what the workspace build made" >&2
  exit 1
fi
cargo test --workspace --locked

step "chaos runs (the whole deployment under faults drawn from a seed, then the history checked: loadtest/chaos-seeds)"
while read -r redis seed seconds faults; do
  [ -n "$redis" ] || continue
  target/debug/loadtest chaos --redis "$redis" --seed "$seed" --duration "$seconds" \
    ${faults:+--faults "$faults"} --out target/chaos
done < <(sed 's/#.*//' loadtest/chaos-seeds)

step "contract tests on a Redis Cluster (3 masters, 3 replicas; 2 gateways, 3 persisters)"
CHAT_TEST_REDIS=cluster cargo test --locked -p gateway --test socket --test rest --test presence --test server_api
# The gap tests that take their Redis from the environment (the 1,000-message ones run on a
# cluster in the plain run already).
CHAT_TEST_REDIS=cluster cargo test --locked -p gateway --test gaps -- \
  a_hole a_gap a_client a_removed

step "contract tests against the embedded mode (one process, SQLite)"
CHAT_TEST_MODE=embedded cargo test --locked -p gateway --test socket --test rest --test gaps \
  --test presence --test server_api

step "REST: /openapi.json is valid OpenAPI 3.1, and schemathesis finds no 5xx and no undescribed answer (embedded mode)"
bash scripts/check-openapi.sh

step "docs/asyncapi.yaml is valid AsyncAPI 3 (@asyncapi/parser; the contract suite checks every event against it)"
(cd tests/js && node --input-type=module -e "
  const { loadSchemas } = await import('./asyncapi.mjs');
  const { validators } = await loadSchemas();
  console.log('docs/asyncapi.yaml: valid, ' + validators.size + ' messages');
")

step "JavaScript suite (official socket.io-client, also embedded and on a Redis Cluster; HAProxy affinity; the chat page in Chromium)"
(cd tests/js && npm test && CHAT_MODE=embedded npm run test:contract \
  && CHAT_REDIS=cluster npm run test:contract)

step "Python suite (official python-socketio), both modes"
.venv/bin/python -m unittest discover -s tests/python -v
CHAT_MODE=embedded .venv/bin/python -m unittest discover -s tests/python -v

step "container images: deploy/Dockerfile's runtime stages on local stand-in bases (from this run's binaries), the compose topology on podman, the socket.io-client suite through its HAProxy"
bash deploy/images.sh runtime target/debug
bash deploy/images.sh compose

step "deploy checks (Helm chart, Dockerfile, compose, alerts, live metrics)"
deploy/check.sh

echo
echo "all checks passed"
